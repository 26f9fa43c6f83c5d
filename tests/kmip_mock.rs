//! ferry's KMIP client and KMS key source against the mock KMS of `ferry-mocks`:
//! every operation and the KMIP object states, ReKeyKeyPair links and the
//! rotation-aware key source, persistence across a restart, each fault mode as a
//! typed error that names the KMS, the key and the fix, TLS session resumption
//! (counted by the server), TLS 1.2 as well as 1.3, certificate refusals (wrong
//! CA, unknown client certificate, expired client certificate) and PKCS#12 client
//! bundles.

use ferry::keys::{KeyError, KeySource, KmsFailure, KmsKeySource};
use ferry::kmip::client::{ClientIdentity, KmsClient, KmsConfig, KmsError};
use ferry::kmip::message::{self as m, KMIP_1_4};
use ferry::kmip::tags::*;
use ferry::kmip::ttlv::Ttlv;
use ferry_mocks::kms::{KmsMock, KmsOptions, MissingKeys};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use std::sync::Arc;
use std::time::Duration;

fn mock() -> KmsMock {
    KmsMock::start(KmsOptions::default()).unwrap()
}

fn client(k: &KmsMock) -> KmsClient {
    KmsClient::new(k.client_config()).unwrap()
}

/// Wait (up to a minute) until the server's counters say `cond`: the server
/// counts some events just after the client has already seen their effect.
fn wait_for(k: &KmsMock, what: &str, cond: impl Fn(&ferry_mocks::kms::KmsStats) -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !cond(&k.stats()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {:?}",
            k.stats()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kms_failure(e: &KeyError) -> (KmsFailure, String, String) {
    match e {
        KeyError::Kms { kind, kms, key, .. } => (*kind, kms.clone(), key.clone()),
        other => panic!("expected KeyError::Kms, got {other:?}"),
    }
}

#[test]
fn every_operation_and_the_object_states() {
    let k = mock();
    let c = client(&k);
    assert_eq!(c.discover_versions().unwrap()[0], (1, 4));
    assert_eq!(c.version(), KMIP_1_4);
    let q = c.query().unwrap();
    for op in [
        OP_CREATE_KEY_PAIR,
        OP_LOCATE,
        OP_GET,
        OP_GET_ATTRIBUTES,
        OP_ACTIVATE,
        OP_REVOKE,
        OP_DESTROY,
        OP_REKEY_KEY_PAIR,
        OP_DECRYPT,
        OP_QUERY,
        OP_DISCOVER_VERSIONS,
    ] {
        assert!(q.operations.contains(&op), "{}", operation_name(op));
    }
    assert_eq!(q.vendor.as_deref(), Some(ferry_mocks::kms::ops::VENDOR));
    assert_eq!(q.object_types, vec![OBJ_PUBLIC_KEY, OBJ_PRIVATE_KEY]);

    for bits in [3072, 4096] {
        let (sk, _) = c
            .create_rsa_key_pair(&format!("size/{bits}"), bits)
            .unwrap();
        assert_eq!(c.object_attributes(&sk).unwrap().length, Some(bits));
    }
    let (sk, pk) = c.create_rsa_key_pair("acme/repo", 2048).unwrap();
    assert_eq!(c.state(&sk).unwrap(), STATE_PRE_ACTIVE);
    assert_eq!(c.state(&pk).unwrap(), STATE_PRE_ACTIVE);
    assert!(c
        .locate("acme/repo", OBJ_PRIVATE_KEY, Some(STATE_ACTIVE))
        .unwrap()
        .is_empty());
    c.activate(&sk).unwrap();
    c.activate(&pk).unwrap();
    assert_eq!(
        c.locate("acme/repo", OBJ_PRIVATE_KEY, Some(STATE_ACTIVE))
            .unwrap(),
        vec![sk.clone()]
    );
    assert_eq!(
        c.locate("acme/repo", OBJ_PUBLIC_KEY, None).unwrap(),
        vec![pk.clone()]
    );
    assert!(c.locate("other", OBJ_PUBLIC_KEY, None).unwrap().is_empty());

    // Attributes and links between the halves.
    let a = c.object_attributes(&sk).unwrap();
    assert_eq!(a.object_type, Some(OBJ_PRIVATE_KEY));
    assert_eq!(a.names, vec!["acme/repo".to_string()]);
    assert_eq!(a.link(LINK_PUBLIC_KEY), Some(pk.as_str()));
    assert_eq!(
        c.object_attributes(&pk).unwrap().link(LINK_PRIVATE_KEY),
        Some(sk.as_str())
    );
    let usage = c
        .get_attributes(&sk, &["Cryptographic Usage Mask"])
        .unwrap();
    assert_eq!(
        usage[0].1.as_int().unwrap(),
        USAGE_DECRYPT | USAGE_UNWRAP_KEY
    );

    // Get: public as PKCS#1 (default) and X.509 SPKI, private as PKCS#8 (default)
    // and PKCS#1; all four are the same key pair.
    let p1 = c.get(&pk, None).unwrap();
    let p5 = c.get(&pk, Some(FMT_X509)).unwrap();
    assert_eq!((p1.format, p5.format), (FMT_PKCS1, FMT_X509));
    let pub1 = ferry::keys::kms_public_from(p1.format, &p1.material).unwrap();
    assert_eq!(
        pub1,
        ferry::keys::kms_public_from(p5.format, &p5.material).unwrap()
    );
    let s8 = c.get(&sk, None).unwrap();
    let s1 = c.get(&sk, Some(FMT_PKCS1)).unwrap();
    assert_eq!((s8.format, s1.format), (FMT_PKCS8, FMT_PKCS1));
    let sk8 = rsa::RsaPrivateKey::from_pkcs8_der(&s8.material).unwrap();
    assert_eq!(
        sk8,
        rsa::RsaPrivateKey::from_pkcs1_der(&s1.material).unwrap()
    );
    assert_eq!(rsa::RsaPublicKey::from(&sk8), pub1);
    let e = c.get(&pk, Some(FMT_PKCS8)).unwrap_err();
    assert_eq!(
        e.reason(),
        Some(REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED),
        "{e}"
    );

    // Decrypt (RSA-OAEP SHA-1) of a secret wrapped with the public key.
    let wrapped = ferry::keys::rsa_oaep_wrap(&pub1, &[5u8; 32], "t").unwrap();
    assert_eq!(
        &c.decrypt_rsa_oaep_sha1(&sk, &wrapped).unwrap()[..],
        &[5u8; 32]
    );
    let e = c.decrypt_rsa_oaep_sha1(&pk, &wrapped).unwrap_err();
    assert_eq!(e.reason(), Some(REASON_INVALID_FIELD), "{e}");

    // States: Active cannot be destroyed or activated again; Revoke deactivates;
    // Deactivated keys still decrypt (process) but are no longer located as
    // Active; Destroy removes the key material and keeps the metadata.
    assert_eq!(
        c.activate(&sk).unwrap_err().reason(),
        Some(REASON_ILLEGAL_OPERATION)
    );
    assert_eq!(
        c.destroy(&sk).unwrap_err().reason(),
        Some(REASON_ILLEGAL_OPERATION)
    );
    c.revoke(&sk, REVOKE_CESSATION, Some("test")).unwrap();
    assert_eq!(c.state(&sk).unwrap(), STATE_DEACTIVATED);
    assert_eq!(
        &c.decrypt_rsa_oaep_sha1(&sk, &wrapped).unwrap()[..],
        &[5u8; 32]
    );
    assert_eq!(
        c.revoke(&sk, REVOKE_CESSATION, None).unwrap_err().reason(),
        Some(REASON_ILLEGAL_OPERATION)
    );
    c.destroy(&sk).unwrap();
    assert_eq!(c.state(&sk).unwrap(), STATE_DESTROYED);
    let e = c.get(&sk, None).unwrap_err();
    assert_eq!(e.reason(), Some(REASON_ITEM_NOT_FOUND));
    assert!(e.to_string().contains("destroyed"), "{e}");
    assert_eq!(
        c.decrypt_rsa_oaep_sha1(&sk, &wrapped).unwrap_err().reason(),
        Some(REASON_ITEM_NOT_FOUND)
    );
    assert_eq!(
        c.locate("acme/repo", OBJ_PRIVATE_KEY, Some(STATE_DESTROYED))
            .unwrap(),
        vec![sk.clone()]
    );
    // Compromise from any state.
    c.revoke(&pk, REVOKE_KEY_COMPROMISE, None).unwrap();
    assert_eq!(c.state(&pk).unwrap(), STATE_COMPROMISED);
    // Errors name the KMS.
    let e = c.get("424242", None).unwrap_err();
    assert!(e.to_string().contains(&k.address()), "{e}");
    let stats = k.stats();
    assert!(stats.operations["Get"] >= 6, "{stats:?}");
}

#[test]
fn rekey_links_and_the_rotation_aware_key_source() {
    let k = mock();
    let name = "acme/rotating";
    let ks = KmsKeySource::open(client(&k), name, true, 2048).unwrap();
    let v1 = ks.current_key().unwrap();
    assert_eq!(v1.key_version, 1);
    let w1 = ks.wrap(&[1u8; 32]).unwrap();

    let c = client(&k);
    let (sk2, pk2) = c.rekey_key_pair(&v1.key_id).unwrap();
    let old = c.object_attributes(&v1.key_id).unwrap();
    assert_eq!(old.link(LINK_REPLACEMENT), Some(sk2.as_str()));
    assert_eq!(old.state, Some(STATE_DEACTIVATED));
    assert!(old.names.is_empty(), "the name moved to the new pair");
    let new = c.object_attributes(&sk2).unwrap();
    assert_eq!(new.link(LINK_REPLACED), Some(v1.key_id.as_str()));
    assert_eq!(new.link(LINK_PUBLIC_KEY), Some(pk2.as_str()));
    assert_eq!(new.state, Some(STATE_ACTIVE));
    assert_eq!(new.names, vec![name.to_string()]);
    let e = c.rekey_key_pair(&v1.key_id).unwrap_err();
    assert_eq!(e.reason(), Some(REASON_ILLEGAL_OPERATION), "{e}");
    let (sk3, _) = c.rekey_key_pair(&sk2).unwrap();

    // A source opened now follows the links to version 3; the old source notices
    // on refresh. Points wrapped by version 1 still unwrap (Deactivated keys
    // decrypt).
    let ks3 = KmsKeySource::open(client(&k), name, false, 2048).unwrap();
    let cur = ks3.current_key().unwrap();
    assert_eq!((cur.key_id.as_str(), cur.key_version), (sk3.as_str(), 3));
    let l = ks3.lineage().unwrap();
    let ids: Vec<(&str, u32, &str)> = l
        .pairs
        .iter()
        .map(|p| (p.private_id.as_str(), p.version, p.state_name.as_str()))
        .collect();
    assert_eq!(
        ids,
        vec![
            (v1.key_id.as_str(), 1, "Deactivated"),
            (sk2.as_str(), 2, "Deactivated"),
            (sk3.as_str(), 3, "Active")
        ]
    );
    assert_eq!(&ks3.unwrap(&w1).unwrap()[..], &[1u8; 32]);
    let mut ks = ks;
    let (o, n) = ks.refresh().unwrap().expect("rotation seen");
    assert_eq!((o.key_version, n.key_version), (1, 3));
    assert_eq!(ks.wrap(&[2u8; 32]).unwrap().key_ref.key_id, sk3);
    assert!(ks.refresh().unwrap().is_none(), "no second change");

    // No Active version at all: a typed NotActive error, even with create.
    c.revoke(&sk3, REVOKE_CESSATION, None).unwrap();
    let e = KmsKeySource::open(client(&k), name, true, 2048)
        .err()
        .unwrap();
    let (kind, kms, key) = kms_failure(&e);
    assert_eq!(
        (kind, kms.as_str(), key.as_str()),
        (KmsFailure::NotActive, k.address().as_str(), name)
    );
    assert!(e.to_string().contains("fix:"), "{e}");
    assert_eq!(
        k.objects().len(),
        6,
        "ferry created nothing: {:?}",
        k.objects()
    );
}

#[test]
fn state_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let opts = KmsOptions {
        state_dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    };
    let k = KmsMock::start(opts.clone()).unwrap();
    let ks = KmsKeySource::open(client(&k), "p/r", true, 2048).unwrap();
    let wrapped = ks.wrap(&[9u8; 32]).unwrap();
    let c = client(&k);
    let v1 = ks.current_key().unwrap().key_id;
    let (v2, _) = c.rekey_key_pair(&v1).unwrap();
    let before = k.objects();
    let public_before = c
        .get(
            &ks.lineage().unwrap().pairs[0].public_id.clone().unwrap(),
            None,
        )
        .unwrap();
    let port = k.addr().port();
    k.stop();
    assert!(dir.path().join(ferry_mocks::kms::STATE_FILE).exists());

    // Same directory, same port: same certificates, same objects, same keys.
    let k = KmsMock::start(KmsOptions { port, ..opts }).unwrap();
    assert_eq!(k.objects(), before);
    let c = client(&k);
    let public_after = c
        .get(
            &ks.lineage().unwrap().pairs[0].public_id.clone().unwrap(),
            None,
        )
        .unwrap();
    assert_eq!(&public_before.material[..], &public_after.material[..]);
    let ks = KmsKeySource::open(client(&k), "p/r", false, 2048).unwrap();
    assert_eq!(ks.current_key().unwrap().key_id, v2);
    assert_eq!(&ks.unwrap(&wrapped).unwrap()[..], &[9u8; 32]);
    // New ids continue after the old ones.
    let (s, _) = c.create_rsa_key_pair("p/other", 2048).unwrap();
    assert!(s.parse::<u64>().unwrap() > v2.parse::<u64>().unwrap());
}

#[test]
fn each_fault_is_a_typed_error_naming_kms_key_and_fix() {
    let k = mock();
    let name = "acme/faults";
    let ks = KmsKeySource::open(client(&k), name, true, 2048).unwrap();
    let key_id = ks.current_key().unwrap().key_id;
    let wrapped = ks.wrap(&[3u8; 32]).unwrap();
    let f = k.faults();

    // Down.
    f.set_down(true);
    let e = KmsKeySource::open(client(&k), name, false, 2048)
        .err()
        .unwrap();
    let (kind, kms, key) = kms_failure(&e);
    assert_eq!(
        (kind, kms, key.as_str()),
        (KmsFailure::Unreachable, k.address(), name)
    );
    assert!(e.is_unavailable());
    assert!(e.to_string().contains("check the KMS address"), "{e}");
    assert!(k.stats().refused_down > 0);
    f.set_down(false);

    // Slow: no answer within the client's timeout. Locate changes nothing, so it
    // is retried: exactly 3 attempts, each on a new connection.
    f.set_latency(Duration::from_millis(1500));
    let handshakes = |k: &KmsMock| k.stats().handshakes_full + k.stats().handshakes_resumed;
    let mut cfg = k.client_config();
    cfg.timeout = Duration::from_millis(300);
    let h0 = handshakes(&k);
    let e = KmsKeySource::open(KmsClient::new(cfg.clone()).unwrap(), name, false, 2048)
        .err()
        .unwrap();
    assert_eq!(kms_failure(&e).0, KmsFailure::Unreachable);
    assert!(e.to_string().contains("no answer within"), "{e}");
    // Every attempt was made before the client gave up; the server may count the
    // last handshake a moment later.
    wait_for(&k, "three attempts", |s| {
        s.handshakes_full + s.handshakes_resumed >= h0 + 3
    });
    assert_eq!(handshakes(&k) - h0, 3, "bounded retries");
    // A create whose answer is lost is not sent again (one connection only), and
    // the KMS made exactly one pair.
    let before = k.objects().len();
    let h0 = handshakes(&k);
    let e = KmsClient::new(cfg)
        .unwrap()
        .create_rsa_key_pair("slow/create", 2048)
        .unwrap_err();
    assert!(matches!(e, KmsError::Unreachable { .. }), "{e}");
    assert_eq!(
        handshakes(&k) - h0,
        1,
        "CreateKeyPair must not be retried after sending"
    );
    f.set_latency(Duration::ZERO);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while k.objects().len() == before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        k.objects().len(),
        before + 2,
        "the server made the one pair"
    );

    // Key missing: every object, then just the private key of the point.
    f.set_missing(MissingKeys::All);
    let e = KmsKeySource::open(client(&k), name, false, 2048)
        .err()
        .unwrap();
    assert_eq!(kms_failure(&e).0, KmsFailure::KeyNotFound);
    assert!(e.to_string().contains("ferry keys create"), "{e}");
    f.set_missing(MissingKeys::Ids([key_id.clone()].into()));
    let e = ks.unwrap(&wrapped).unwrap_err();
    let (kind, kms, key) = kms_failure(&e);
    assert_eq!(
        (kind, kms, key),
        (KmsFailure::KeyNotFound, k.address(), key_id.clone())
    );
    assert!(e.to_string().contains("--extra-private-key"), "{e}");
    f.set_missing(MissingKeys::None);

    // Decrypt unsupported: the Get-private path unwraps, and later unwraps go
    // straight to Get.
    f.set_decrypt_unsupported(true);
    assert!(!client(&k).query().unwrap().operations.contains(&OP_DECRYPT));
    let ks2 = KmsKeySource::open(client(&k), name, false, 2048).unwrap();
    let gets = |k: &KmsMock| k.stats().operations.get("Get").copied().unwrap_or(0);
    let decrypts = |k: &KmsMock| k.stats().operations.get("Decrypt").copied().unwrap_or(0);
    let (g0, d0) = (gets(&k), decrypts(&k));
    assert_eq!(&ks2.unwrap(&wrapped).unwrap()[..], &[3u8; 32]);
    assert_eq!(&ks2.unwrap(&wrapped).unwrap()[..], &[3u8; 32]);
    assert_eq!((gets(&k) - g0, decrypts(&k) - d0), (2, 1));
    f.set_decrypt_unsupported(false);

    // Attributes inside KeyValue (seed 003): the raw answer carries them, ferry
    // accepts it.
    f.set_attributes_in_key_value(true);
    let pub_id = ks
        .lineage()
        .unwrap()
        .current()
        .unwrap()
        .public_id
        .clone()
        .unwrap();
    let raw = k.handle_raw(&m::request(KMIP_1_4, OP_GET, m::get(&pub_id, None)).encode());
    let root = Ttlv::decode(&raw).unwrap();
    let kv = root
        .child(BATCH_ITEM)
        .and_then(|i| i.child(RESPONSE_PAYLOAD))
        .and_then(|p| p.child(PUBLIC_KEY))
        .and_then(|p| p.child(KEY_BLOCK))
        .and_then(|b| b.child(KEY_VALUE))
        .unwrap();
    assert!(kv.children(ATTRIBUTE).count() >= 5, "{kv:?}");
    let ks3 = KmsKeySource::open(client(&k), name, false, 2048).unwrap();
    assert_eq!(ks3.current_key().unwrap(), ks.current_key().unwrap());
    f.set_attributes_in_key_value(false);
    let raw = k.handle_raw(&m::request(KMIP_1_4, OP_GET, m::get(&pub_id, None)).encode());
    assert!(
        !raw.windows(3).any(|w| w == [0x42, 0x00, 0x08]),
        "no Attribute tag at all by default"
    );
}

#[test]
fn tls_sessions_are_resumed_on_reconnect() {
    let k = mock();
    let c = client(&k);
    c.query().unwrap();
    c.disconnect();
    c.query().unwrap();
    c.disconnect();
    c.locate("x", OBJ_PRIVATE_KEY, None).unwrap();
    assert_eq!(c.stats().handshakes, 3);
    assert!(c.stats().resumed >= 2, "{:?}", c.stats());
    let s = k.stats();
    assert_eq!(s.handshakes_full, 1, "{s:?}");
    assert_eq!(s.handshakes_resumed, 2, "{s:?}");
    // A kept-alive connection is reused: no new handshake per request.
    for _ in 0..5 {
        c.query().unwrap();
    }
    assert_eq!(k.stats().handshakes_full + k.stats().handshakes_resumed, 3);
}

fn tls12_client(k: &KmsMock) -> Arc<rustls::ClientConfig> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(k.ca_path()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = CertificateDer::pem_file_iter(k.client_cert_path())
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(k.client_key_path()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .unwrap(),
    )
}

#[test]
fn tls_1_2_works_and_resumes_too() {
    use std::io::{Read, Write};
    let k = mock();
    let cfg = tls12_client(&k);
    for round in 0..2 {
        let sock = std::net::TcpStream::connect(k.addr()).unwrap();
        let conn =
            rustls::ClientConnection::new(cfg.clone(), "localhost".try_into().unwrap()).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&m::request(KMIP_1_4, OP_QUERY, m::query(&[QUERY_OPERATIONS])).encode())
            .unwrap();
        let mut head = [0u8; 8];
        tls.read_exact(&mut head).unwrap();
        let mut rest = vec![0u8; ferry::kmip::ttlv::frame_len(&head, 1 << 20).unwrap() - 8];
        tls.read_exact(&mut rest).unwrap();
        assert_eq!(
            tls.conn.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        let resumed = tls.conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        assert_eq!(resumed, round == 1, "round {round}");
        let resp = Ttlv::decode(&[&head[..], &rest[..]].concat()).unwrap();
        assert!(
            !m::parse_query(&m::response_payload(&resp, OP_QUERY).unwrap())
                .unwrap()
                .operations
                .is_empty()
        );
    }
    assert_eq!(k.stats().handshakes_resumed, 1);
}

#[test]
fn certificates_are_checked_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(ferry_mocks::pki::Ca::new("tenant KMS CA").unwrap());
    let k = KmsMock::start(KmsOptions {
        ca: Some(ca.clone()),
        ..Default::default()
    })
    .unwrap();
    let other = ferry_mocks::pki::Ca::new("some other CA").unwrap();
    let write = |n: &str, t: &str| {
        let p = dir.path().join(n);
        std::fs::write(&p, t).unwrap();
        p
    };
    let open =
        |cfg: KmsConfig| KmsKeySource::open(KmsClient::new(cfg).unwrap(), "acme/tls", true, 2048);

    // ferry pins the wrong CA: the server certificate is refused.
    let mut cfg = k.client_config();
    cfg.ca = write("other-ca.pem", &other.cert_pem());
    let e = open(cfg).err().unwrap();
    let (kind, kms, key) = kms_failure(&e);
    assert_eq!(
        (kind, kms, key.as_str()),
        (KmsFailure::TlsRefused, k.address(), "acme/tls")
    );
    assert!(e.to_string().contains("not signed by the CA"), "{e}");

    // A client certificate from a CA the KMS does not trust.
    let stranger = other.client("stranger").unwrap();
    let mut cfg = k.client_config();
    cfg.identity = ClientIdentity::Pem {
        cert: write("s.pem", &stranger.cert_pem),
        key: write("s.key", &stranger.key_pem),
    };
    let e = open(cfg).err().unwrap();
    assert_eq!(kms_failure(&e).0, KmsFailure::TlsRefused);
    assert!(
        e.to_string().contains("refused ferry's client certificate"),
        "{e}"
    );

    // An expired client certificate from the right CA.
    let old = ca.expired_client("ferry-agent").unwrap();
    let mut cfg = k.client_config();
    cfg.identity = ClientIdentity::Pem {
        cert: write("o.pem", &old.cert_pem),
        key: write("o.key", &old.key_pem),
    };
    let e = open(cfg).err().unwrap();
    assert_eq!(kms_failure(&e).0, KmsFailure::TlsRefused);
    assert!(e.to_string().contains("expired"), "{e}");

    wait_for(&k, "refused handshakes", |s| s.handshake_failures >= 2);
    assert!(
        k.objects().is_empty(),
        "nothing was created by refused clients"
    );
    // The right certificate still works.
    open(k.client_config()).unwrap();
}

#[test]
fn pkcs12_client_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let k = mock();
    let p12 = dir.path().join("ferry-client.p12");
    let pw = dir.path().join("p12.password");
    std::fs::write(&pw, "veeam-p12-password\n").unwrap();
    // As seed 003 makes it: openssl pkcs12 -export ... -certfile ca.
    let o = std::process::Command::new("openssl")
        .args(["pkcs12", "-export", "-in"])
        .arg(k.client_cert_path())
        .arg("-inkey")
        .arg(k.client_key_path())
        .arg("-certfile")
        .arg(k.ca_path())
        .arg("-out")
        .arg(&p12)
        .args(["-passout", "pass:veeam-p12-password"])
        .output()
        .expect("openssl is installed by .ci/run");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut cfg = k.client_config();
    cfg.identity = ClientIdentity::Pkcs12 {
        bundle: p12.clone(),
        password_file: Some(pw),
    };
    let c = KmsClient::new(cfg.clone()).unwrap();
    assert!(!c.query().unwrap().operations.is_empty());
    // A wrong password is a configuration error naming the bundle.
    let bad = dir.path().join("bad.password");
    std::fs::write(&bad, "nope").unwrap();
    cfg.identity = ClientIdentity::Pkcs12 {
        bundle: p12.clone(),
        password_file: Some(bad),
    };
    let e = KmsClient::new(cfg).err().unwrap();
    assert!(matches!(e, KmsError::Tls { .. }), "{e}");
    assert!(e.to_string().contains("ferry-client.p12"), "{e}");
}
