#!/usr/bin/env python3
"""PyKMIP's client (a real, independent KMIP implementation) against ferry's mock KMS.

Driven by mocks/tests/kms_pykmip.rs, which starts the mock and passes its connection
details as JSON on stdin. Every check raises on failure; the last line of stdout is
a JSON summary the Rust test asserts on too.

Covers DiscoverVersions and Query (low-level KMIPProxy), CreateKeyPair, Activate,
Locate, Get of the public and the private key, GetAttributes, Decrypt (RSA-OAEP
SHA-1, the ciphertext made with the `cryptography` package from the public key
PyKMIP fetched), Revoke, Destroy and the refusal of Get afterwards, over TLS as
negotiated by default and over TLS 1.2 pinned. Leaves one active pair named
`py/shared` for ferry's own client to use afterwards.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")

from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import padding  # noqa: E402
from kmip.core import enums  # noqa: E402
from kmip.core.factories import attributes as attr_factory  # noqa: E402
from kmip.pie import exceptions  # noqa: E402
from kmip.pie.client import ProxyKmipClient  # noqa: E402
from kmip.services.kmip_client import KMIPProxy  # noqa: E402

cfg = json.load(sys.stdin)
summary = {}
af = attr_factory.AttributeFactory()


def check(cond, what):
    if not cond:
        raise AssertionError(what)


def client(ssl_version=None):
    return ProxyKmipClient(
        hostname=cfg["host"], port=cfg["port"], cert=cfg["cert"], key=cfg["key"],
        ca=cfg["ca"], ssl_version=ssl_version, config_file="/dev/null",
        kmip_version=enums.KMIPVersion.KMIP_1_4)


# Low level: DiscoverVersions and Query.
proxy = KMIPProxy(host=cfg["host"], port=cfg["port"], certfile=cfg["cert"],
                  keyfile=cfg["key"], ca_certs=cfg["ca"], config_file="/dev/null",
                  kmip_version=enums.KMIPVersion.KMIP_1_4)
proxy.open()
dv = proxy.discover_versions()
check(dv.result_status.value == enums.ResultStatus.SUCCESS, "DiscoverVersions failed")
summary["versions"] = ["%d.%d" % (v.major, v.minor) for v in dv.protocol_versions]
q = proxy.query(query_functions=[enums.QueryFunction.QUERY_OPERATIONS,
                                 enums.QueryFunction.QUERY_OBJECTS,
                                 enums.QueryFunction.QUERY_SERVER_INFORMATION])
check(q.result_status.value == enums.ResultStatus.SUCCESS, "Query failed")
summary["operations"] = sorted(o.name for o in q.operations)
summary["vendor"] = q.vendor_identification
proxy.close()

RSA_OAEP_SHA1 = {
    "cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
    "padding_method": enums.PaddingMethod.OAEP,
    "hashing_algorithm": enums.HashingAlgorithm.SHA_1,
}


def lifecycle(c, name, tag):
    out = {}
    pub_id, priv_id = c.create_key_pair(
        enums.CryptographicAlgorithm.RSA, 2048,
        public_name=name, private_name=name,
        public_usage_mask=[enums.CryptographicUsageMask.ENCRYPT,
                           enums.CryptographicUsageMask.WRAP_KEY],
        private_usage_mask=[enums.CryptographicUsageMask.DECRYPT,
                            enums.CryptographicUsageMask.UNWRAP_KEY])
    out["ids"] = [pub_id, priv_id]
    uid, attrs = c.get_attributes(priv_id, ["State"])
    check(uid == priv_id, "GetAttributes uid")
    out["state_created"] = attrs[0].attribute_value.value.name
    c.activate(pub_id)
    c.activate(priv_id)
    found = c.locate(attributes=[
        af.create_attribute(enums.AttributeType.NAME, name),
        af.create_attribute(enums.AttributeType.OBJECT_TYPE, enums.ObjectType.PRIVATE_KEY),
        af.create_attribute(enums.AttributeType.STATE, enums.State.ACTIVE),
    ])
    check(found == [priv_id], "Locate found %r" % found)
    pub = c.get(pub_id)
    priv = c.get(priv_id)
    out["public_format"] = pub.key_format_type.name
    out["private_format"] = priv.key_format_type.name
    out["public_length"] = pub.cryptographic_length
    check(pub.cryptographic_algorithm == enums.CryptographicAlgorithm.RSA, "algorithm")
    pk = serialization.load_der_public_key(bytes(pub.value))
    sk = serialization.load_der_private_key(bytes(priv.value), password=None)
    check(pk.public_numbers() == sk.public_key().public_numbers(), "the halves match")
    uid, attrs = c.get_attributes(priv_id, [
        "State", "Name", "Cryptographic Length", "Object Type", "Cryptographic Algorithm"])
    by = {a.attribute_name.value: a.attribute_value for a in attrs}
    out["state"] = by["State"].value.name
    out["name"] = by["Name"].name_value.value
    out["length"] = by["Cryptographic Length"].value
    out["object_type"] = by["Object Type"].value.name
    secret = b"ferry data key, 32 bytes long!!!"
    ct = pk.encrypt(secret, padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()),
                                         algorithm=hashes.SHA1(), label=None))
    plain = c.decrypt(ct, uid=priv_id, cryptographic_parameters=RSA_OAEP_SHA1)
    check(plain == secret, "Decrypt returned other bytes")
    out["decrypt"] = "ok"
    # Destroying an Active key is refused; revoke first.
    try:
        c.destroy(priv_id)
        raise AssertionError("Destroy of an Active key succeeded")
    except exceptions.KmipOperationFailure as e:
        out["destroy_active"] = e.reason.name
    c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, priv_id,
             revocation_message="done by %s" % tag)
    uid, attrs = c.get_attributes(priv_id, ["State"])
    out["state_revoked"] = attrs[0].attribute_value.value.name
    c.destroy(priv_id)
    uid, attrs = c.get_attributes(priv_id, ["State"])
    out["state_destroyed"] = attrs[0].attribute_value.value.name
    try:
        c.get(priv_id)
        raise AssertionError("Get of a destroyed key succeeded")
    except exceptions.KmipOperationFailure as e:
        out["get_destroyed"] = e.reason.name
    return out


with client() as c:
    summary["default_tls"] = c.proxy.socket.version()
    summary["default"] = lifecycle(c, "py/lifecycle", "default")
    # A pair for ferry's own client to use afterwards (interoperability).
    pub_id, priv_id = c.create_key_pair(
        enums.CryptographicAlgorithm.RSA, 2048, public_name="py/shared",
        private_name="py/shared",
        private_usage_mask=[enums.CryptographicUsageMask.DECRYPT])
    c.activate(pub_id)
    c.activate(priv_id)
    summary["shared"] = [pub_id, priv_id]

with client("PROTOCOL_TLSv1_2") as c:
    summary["tls12"] = c.proxy.socket.version()
    summary["tls12_lifecycle"] = lifecycle(c, "py/tls12", "tls12")

print(json.dumps(summary))
