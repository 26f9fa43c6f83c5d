//! The mock KMS's KMIP 1.x request handler: one request message in (bytes), one
//! response message out (bytes), with every batch item answered. Decoding and
//! encoding are ferry's own TTLV codec ([`ferry::kmip::ttlv`]).
//!
//! Operations: DiscoverVersions, Query, CreateKeyPair (RSA 2048/3072/4096, Name,
//! Cryptographic Usage Mask, Public/Private Key links), Locate (Name, Object Type,
//! State, Cryptographic Algorithm/Length, Link; Maximum Items, Offset Items), Get
//! (public key as PKCS#1 or X.509 SubjectPublicKeyInfo, private key as PKCS#1 or
//! PKCS#8; key material only inside `KeyValue` unless the fault says otherwise),
//! GetAttributes, Activate, Revoke, Destroy, ReKeyKeyPair (new pair with the old
//! pair's names, Replacement/Replaced Object links, old pair deactivated), Decrypt
//! (RSA, OAEP, SHA-1), with the KMIP object states.
//!
//! Must never panic, whatever the bytes: every field is checked, failures become
//! KMIP result reasons with a message. Never logs key material.

use super::faults::Faults;
use super::store::{Object, State, Store, StoreError};
use ferry::kmip::tags::*;
use ferry::kmip::ttlv::{Ttlv, Value};
use rsa::pkcs1::{DecodeRsaPrivateKey, EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{EncodePrivateKey, EncodePublicKey};
use rsa::{RsaPrivateKey, RsaPublicKey};
use zeroize::Zeroizing;

/// Most batch items answered in one request.
pub const MAX_BATCH_ITEMS: usize = 32;

/// Protocol versions served, newest first.
pub const VERSIONS: [(i32, i32); 5] = [(1, 4), (1, 3), (1, 2), (1, 1), (1, 0)];

/// Vendor Identification in Query answers.
pub const VENDOR: &str = "ferry-mocks mock KMS";

/// What the handler works on.
pub struct Backend {
    /// The objects.
    pub store: Store,
    /// Faults and counters.
    pub faults: std::sync::Arc<Faults>,
}

/// A failed batch item.
#[derive(Debug)]
struct Failure {
    reason: u32,
    message: String,
}

fn fail(reason: u32, message: impl Into<String>) -> Failure {
    Failure {
        reason,
        message: message.into(),
    }
}

type OpResult = Result<Vec<Ttlv>, Failure>;

// ---------------------------------------------------------------- TTLV helpers

fn t(tag: u32, v: Value) -> Ttlv {
    Ttlv::new(tag, v)
}
fn s(tag: u32, c: Vec<Ttlv>) -> Ttlv {
    Ttlv::structure(tag, c)
}
fn text(tag: u32, x: &str) -> Ttlv {
    t(tag, Value::TextString(x.to_string()))
}
fn en(tag: u32, x: u32) -> Ttlv {
    t(tag, Value::Enumeration(x))
}
fn int(tag: u32, x: i32) -> Ttlv {
    t(tag, Value::Integer(x))
}
fn version(v: (i32, i32)) -> Ttlv {
    s(
        PROTOCOL_VERSION,
        vec![
            int(PROTOCOL_VERSION_MAJOR, v.0),
            int(PROTOCOL_VERSION_MINOR, v.1),
        ],
    )
}
fn attr(name: &str, index: usize, value: Value) -> Ttlv {
    let mut c = vec![text(ATTRIBUTE_NAME, name)];
    if index > 0 {
        c.push(int(ATTRIBUTE_INDEX, index as i32));
    }
    c.push(t(ATTRIBUTE_VALUE, value));
    s(ATTRIBUTE, c)
}

fn invalid(what: &str, e: impl std::fmt::Display) -> Failure {
    fail(REASON_INVALID_FIELD, format!("{what}: {e}"))
}

fn child_text<'a>(p: &'a Ttlv, tag: u32, what: &str) -> Result<Option<&'a str>, Failure> {
    p.child(tag)
        .map(|c| c.as_text().map_err(|e| invalid(what, e)))
        .transpose()
}

fn child_enum(p: &Ttlv, tag: u32, what: &str) -> Result<Option<u32>, Failure> {
    p.child(tag)
        .map(|c| c.as_enum().map_err(|e| invalid(what, e)))
        .transpose()
}

fn child_int(p: &Ttlv, tag: u32, what: &str) -> Result<Option<i32>, Failure> {
    p.child(tag)
        .map(|c| c.as_int().map_err(|e| invalid(what, e)))
        .transpose()
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn persist(e: StoreError) -> Failure {
    fail(REASON_GENERAL_FAILURE, e.to_string())
}

// ---------------------------------------------------------------- messages

struct Item {
    op: u32,
    batch_id: Option<Vec<u8>>,
    payload: Ttlv,
}

struct Request {
    version: (i32, i32),
    max_response: Option<usize>,
    items: Vec<Item>,
}

fn parse_request(root: &Ttlv) -> Result<Request, Failure> {
    let bad = |m: String| fail(REASON_INVALID_MESSAGE, m);
    if root.tag.0 != REQUEST_MESSAGE {
        return Err(bad(format!(
            "tag {} where a Request Message was expected",
            root.tag
        )));
    }
    let header = root
        .child(REQUEST_HEADER)
        .ok_or_else(|| bad("no Request Header".into()))?;
    let pv = header
        .child(PROTOCOL_VERSION)
        .ok_or_else(|| bad("no Protocol Version in the Request Header".into()))?;
    let major = child_int(pv, PROTOCOL_VERSION_MAJOR, "Protocol Version Major")?
        .ok_or_else(|| bad("no Protocol Version Major".into()))?;
    let minor = child_int(pv, PROTOCOL_VERSION_MINOR, "Protocol Version Minor")?
        .ok_or_else(|| bad("no Protocol Version Minor".into()))?;
    if major != 1 || !(0..=4).contains(&minor) {
        return Err(bad(format!(
            "KMIP {major}.{minor} is not served (this mock speaks 1.0 to 1.4)"
        )));
    }
    let max_response = child_int(header, MAXIMUM_RESPONSE_SIZE, "Maximum Response Size")?
        .map(|m| m.max(0) as usize);
    let mut items = Vec::new();
    for b in root.children(BATCH_ITEM) {
        if items.len() == MAX_BATCH_ITEMS {
            return Err(bad(format!(
                "more than {MAX_BATCH_ITEMS} batch items in one request"
            )));
        }
        let op = child_enum(b, OPERATION, "Operation")?
            .ok_or_else(|| bad("batch item without Operation".into()))?;
        let batch_id = match b.child(UNIQUE_BATCH_ITEM_ID) {
            Some(i) => Some(
                i.as_bytes()
                    .map_err(|e| invalid("Unique Batch Item ID", e))?
                    .to_vec(),
            ),
            None => None,
        };
        let payload = b
            .child(REQUEST_PAYLOAD)
            .cloned()
            .unwrap_or_else(|| s(REQUEST_PAYLOAD, vec![]));
        if !matches!(payload.value, Value::Structure(_)) {
            return Err(bad("Request Payload is not a structure".into()));
        }
        items.push(Item {
            op,
            batch_id,
            payload,
        });
    }
    if items.is_empty() {
        return Err(bad("no batch item".into()));
    }
    Ok(Request {
        version: (major, minor),
        max_response,
        items,
    })
}

fn response_item(op: Option<u32>, batch_id: Option<Vec<u8>>, r: OpResult) -> Ttlv {
    let mut c = Vec::new();
    if let Some(op) = op {
        c.push(en(OPERATION, op));
    }
    if let Some(id) = batch_id {
        c.push(t(UNIQUE_BATCH_ITEM_ID, Value::ByteString(id)));
    }
    match r {
        Ok(payload) => {
            c.push(en(RESULT_STATUS, STATUS_SUCCESS));
            c.push(s(RESPONSE_PAYLOAD, payload));
        }
        Err(f) => {
            c.push(en(RESULT_STATUS, STATUS_FAILED));
            c.push(en(RESULT_REASON, f.reason));
            c.push(text(RESULT_MESSAGE, &f.message));
        }
    }
    s(BATCH_ITEM, c)
}

fn response(v: (i32, i32), items: Vec<Ttlv>) -> Ttlv {
    let mut c = vec![s(
        RESPONSE_HEADER,
        vec![
            version(v),
            t(TIME_STAMP, Value::DateTime(now())),
            int(BATCH_COUNT, items.len() as i32),
        ],
    )];
    c.extend(items);
    s(RESPONSE_MESSAGE, c)
}

/// A lone "Invalid Message" answer (for requests refused before decoding, e.g.
/// too large).
pub fn refusal(message: &str) -> Vec<u8> {
    response(
        (1, 4),
        vec![response_item(
            None,
            None,
            Err(fail(REASON_INVALID_MESSAGE, message)),
        )],
    )
    .encode()
}

/// Answer one request message. Undecodable or malformed requests get an "Invalid
/// Message" answer; this never panics.
pub fn handle(b: &Backend, request: &[u8]) -> Vec<u8> {
    b.faults.count_request();
    let parsed = Ttlv::decode(request)
        .map_err(|e| fail(REASON_INVALID_MESSAGE, format!("undecodable TTLV: {e}")))
        .and_then(|root| parse_request(&root));
    let req = match parsed {
        Ok(r) => r,
        Err(f) => {
            tracing::debug!(reason = f.reason, message = %f.message, "mock KMS: invalid request");
            return response((1, 4), vec![response_item(None, None, Err(f))]).encode();
        }
    };
    let mut placeholder: Option<String> = None;
    let mut ops = Vec::new();
    let mut items = Vec::new();
    for it in req.items {
        b.faults.count_operation(operation_name(it.op));
        let r = dispatch(b, req.version, it.op, &it.payload, &mut placeholder);
        if let Err(f) = &r {
            tracing::debug!(op = operation_name(it.op), reason = reason_name(f.reason), message = %f.message, "mock KMS: operation failed");
        }
        ops.push((it.op, it.batch_id.clone()));
        items.push(response_item(Some(it.op), it.batch_id, r));
    }
    let out = response(req.version, items).encode();
    match req.max_response {
        Some(max) if out.len() > max => {
            let items = ops
                .into_iter()
                .map(|(op, id)| {
                    response_item(
                        Some(op),
                        id,
                        Err(fail(
                            REASON_RESPONSE_TOO_LARGE,
                            format!(
                                "the answer has {} bytes; Maximum Response Size is {max}",
                                out.len()
                            ),
                        )),
                    )
                })
                .collect();
            response(req.version, items).encode()
        }
        _ => out,
    }
}

fn dispatch(
    b: &Backend,
    v: (i32, i32),
    op: u32,
    p: &Ttlv,
    placeholder: &mut Option<String>,
) -> OpResult {
    match op {
        OP_DISCOVER_VERSIONS => discover_versions(p),
        OP_QUERY => query(b, p),
        OP_CREATE_KEY_PAIR => create_key_pair(b, p, placeholder),
        OP_REKEY_KEY_PAIR => rekey_key_pair(b, p, placeholder),
        OP_LOCATE => locate(b, v, p),
        OP_GET => get(b, p, placeholder),
        OP_GET_ATTRIBUTES => get_attributes(b, p, placeholder),
        OP_ACTIVATE => activate(b, p, placeholder),
        OP_REVOKE => revoke(b, p, placeholder),
        OP_DESTROY => destroy(b, p, placeholder),
        OP_DECRYPT => decrypt(b, p, placeholder),
        other => Err(fail(
            REASON_OPERATION_NOT_SUPPORTED,
            format!("operation {other:#x} is not served by this mock KMS"),
        )),
    }
}

const SERVED: [u32; 11] = [
    OP_CREATE_KEY_PAIR,
    OP_LOCATE,
    OP_GET,
    OP_GET_ATTRIBUTES,
    OP_ACTIVATE,
    OP_REVOKE,
    OP_DESTROY,
    OP_QUERY,
    OP_REKEY_KEY_PAIR,
    OP_DISCOVER_VERSIONS,
    OP_DECRYPT,
];

fn discover_versions(p: &Ttlv) -> OpResult {
    let mut asked = Vec::new();
    for v in p.children(PROTOCOL_VERSION) {
        let major = child_int(v, PROTOCOL_VERSION_MAJOR, "Protocol Version Major")?;
        let minor = child_int(v, PROTOCOL_VERSION_MINOR, "Protocol Version Minor")?;
        if let (Some(a), Some(b)) = (major, minor) {
            asked.push((a, b));
        }
    }
    let out: Vec<(i32, i32)> = if asked.is_empty() {
        VERSIONS.to_vec()
    } else {
        asked.into_iter().filter(|v| VERSIONS.contains(v)).collect()
    };
    Ok(out.into_iter().map(version).collect())
}

fn query(b: &Backend, p: &Ttlv) -> OpResult {
    let mut out = Vec::new();
    let funcs: Vec<u32> = p
        .children(QUERY_FUNCTION)
        .map(|f| f.as_enum().map_err(|e| invalid("Query Function", e)))
        .collect::<Result<_, _>>()?;
    if funcs.contains(&QUERY_OPERATIONS) {
        for op in SERVED {
            if op == OP_DECRYPT && b.faults.decrypt_unsupported() {
                continue;
            }
            out.push(en(OPERATION, op));
        }
    }
    if funcs.contains(&QUERY_OBJECTS) {
        out.push(en(OBJECT_TYPE, OBJ_PUBLIC_KEY));
        out.push(en(OBJECT_TYPE, OBJ_PRIVATE_KEY));
    }
    if funcs.contains(&QUERY_SERVER_INFORMATION) {
        out.push(text(VENDOR_IDENTIFICATION, VENDOR));
    }
    Ok(out)
}

// ---------------------------------------------------------------- attributes

/// (name, value) of the Attribute children of a Template-Attribute structure.
fn template_attributes(t: Option<&Ttlv>) -> Result<Vec<(String, Ttlv)>, Failure> {
    let Some(t) = t else { return Ok(vec![]) };
    t.children(ATTRIBUTE)
        .map(|a| {
            let name = child_text(a, ATTRIBUTE_NAME, "Attribute Name")?
                .ok_or_else(|| fail(REASON_INVALID_FIELD, "Attribute without Attribute Name"))?
                .to_string();
            let value = a.child(ATTRIBUTE_VALUE).cloned().ok_or_else(|| {
                fail(
                    REASON_INVALID_FIELD,
                    format!("Attribute {name:?} has no value"),
                )
            })?;
            Ok((name, value))
        })
        .collect()
}

/// What a CreateKeyPair template may set.
#[derive(Clone, Default)]
struct HalfSpec {
    names: Vec<String>,
    usage_mask: Option<i32>,
    length: Option<i32>,
    algorithm: Option<u32>,
}

fn apply_attributes(spec: &mut HalfSpec, attrs: &[(String, Ttlv)]) -> Result<(), Failure> {
    for (name, v) in attrs {
        match name.as_str() {
            "Cryptographic Algorithm" => {
                spec.algorithm = Some(v.as_enum().map_err(|e| invalid(name, e))?)
            }
            "Cryptographic Length" => spec.length = Some(v.as_int().map_err(|e| invalid(name, e))?),
            "Cryptographic Usage Mask" => {
                spec.usage_mask = Some(v.as_int().map_err(|e| invalid(name, e))?)
            }
            "Name" => {
                let n = child_text(v, NAME_VALUE, "Name Value")?
                    .ok_or_else(|| fail(REASON_INVALID_FIELD, "Name without Name Value"))?;
                if n.is_empty() {
                    return Err(fail(REASON_INVALID_FIELD, "empty Name"));
                }
                if !spec.names.iter().any(|x| x == n) {
                    spec.names.push(n.to_string());
                }
            }
            "Unique Identifier" | "Object Type" | "State" | "Initial Date" | "Link"
            | "Destroy Date" | "Digest" | "Last Change Date" | "Revocation Reason" => {
                return Err(fail(
                    REASON_INVALID_FIELD,
                    format!("attribute {name:?} is set by the server, not by the client"),
                ))
            }
            // Operation Policy Name, Object Group, Contact Information, x-... :
            // accepted and not kept.
            _ => {}
        }
    }
    Ok(())
}

fn attribute_values(o: &Object, fault_attrs: bool) -> Vec<(String, usize, Value)> {
    let mut out: Vec<(String, usize, Value)> = vec![
        (
            "Unique Identifier".into(),
            0,
            Value::TextString(o.id.clone()),
        ),
        ("Object Type".into(), 0, Value::Enumeration(o.object_type)),
        (
            "Cryptographic Algorithm".into(),
            0,
            Value::Enumeration(o.algorithm),
        ),
        ("Cryptographic Length".into(), 0, Value::Integer(o.length)),
        (
            "Cryptographic Usage Mask".into(),
            0,
            Value::Integer(o.usage_mask),
        ),
    ];
    for (i, n) in o.names.iter().enumerate() {
        out.push((
            "Name".into(),
            i,
            Value::Structure(vec![text(NAME_VALUE, n), en(NAME_TYPE, NAME_TEXT)]),
        ));
    }
    out.push(("State".into(), 0, Value::Enumeration(o.state)));
    out.push(("Initial Date".into(), 0, Value::DateTime(o.initial_date)));
    for (name, d) in [
        ("Activation Date", o.activation_date),
        ("Deactivation Date", o.deactivation_date),
        ("Destroy Date", o.destroy_date),
    ] {
        if let Some(d) = d {
            out.push((name.into(), 0, Value::DateTime(d)));
        }
    }
    if let Some((code, msg)) = &o.revocation {
        let mut c = vec![en(REVOCATION_REASON_CODE, *code)];
        if let Some(m) = msg {
            c.push(text(REVOCATION_MESSAGE, m));
        }
        out.push(("Revocation Reason".into(), 0, Value::Structure(c)));
    }
    for (i, (lt, id)) in o.links.iter().enumerate() {
        out.push((
            "Link".into(),
            i,
            Value::Structure(vec![en(LINK_TYPE, *lt), text(LINKED_OBJECT_IDENTIFIER, id)]),
        ));
    }
    if fault_attrs {
        out.retain(|(n, _, _)| n != "Unique Identifier");
    }
    out
}

// ---------------------------------------------------------------- objects

fn uid(p: &Ttlv, placeholder: &Option<String>, tag: u32) -> Result<String, Failure> {
    match child_text(p, tag, "Unique Identifier")? {
        Some(id) => Ok(id.to_string()),
        None => placeholder.clone().ok_or_else(|| {
            fail(
                REASON_MISSING_DATA,
                "no Unique Identifier and no ID placeholder from an earlier batch item",
            )
        }),
    }
}

fn find<'a>(b: &Backend, st: &'a State, id: &str) -> Result<&'a Object, Failure> {
    if b.faults.is_missing(id) {
        return Err(fail(
            REASON_ITEM_NOT_FOUND,
            format!("no object with Unique Identifier {id}"),
        ));
    }
    st.get(id).ok_or_else(|| {
        fail(
            REASON_ITEM_NOT_FOUND,
            format!("no object with Unique Identifier {id}"),
        )
    })
}

fn find_mut<'a>(b: &Backend, st: &'a mut State, id: &str) -> Result<&'a mut Object, Failure> {
    if b.faults.is_missing(id) {
        return Err(fail(
            REASON_ITEM_NOT_FOUND,
            format!("no object with Unique Identifier {id}"),
        ));
    }
    st.get_mut(id).ok_or_else(|| {
        fail(
            REASON_ITEM_NOT_FOUND,
            format!("no object with Unique Identifier {id}"),
        )
    })
}

fn destroyed(o: &Object) -> bool {
    o.state == STATE_DESTROYED || o.state == STATE_DESTROYED_COMPROMISED
}

const STATE_DESTROYED_COMPROMISED: u32 = 6;

fn gone(o: &Object) -> Failure {
    fail(
        REASON_ITEM_NOT_FOUND,
        format!(
            "object {} was destroyed: its key material no longer exists",
            o.id
        ),
    )
}

fn generate(bits: i32) -> Result<RsaPrivateKey, Failure> {
    if ![2048, 3072, 4096].contains(&bits) {
        return Err(fail(
            REASON_INVALID_FIELD,
            format!("Cryptographic Length {bits}: RSA keys of 2048, 3072 or 4096 bits only"),
        ));
    }
    RsaPrivateKey::new(&mut rand::rngs::OsRng, bits as usize).map_err(|e| {
        fail(
            REASON_CRYPTOGRAPHIC_FAILURE,
            format!("RSA key generation: {e}"),
        )
    })
}

/// The two objects of a new pair (ids assigned by `st`).
fn new_pair(
    st: &mut State,
    sk: &RsaPrivateKey,
    private: &HalfSpec,
    public: &HalfSpec,
    bits: i32,
    active: bool,
) -> Result<(Object, Object), Failure> {
    let pk = RsaPublicKey::from(sk);
    let sk_der = sk
        .to_pkcs1_der()
        .map_err(|e| fail(REASON_CRYPTOGRAPHIC_FAILURE, e.to_string()))?;
    let pk_der = pk
        .to_pkcs1_der()
        .map_err(|e| fail(REASON_CRYPTOGRAPHIC_FAILURE, e.to_string()))?;
    let now = now();
    let priv_id = st.next_id();
    let pub_id = st.next_id();
    let base =
        |id: &str, ty: u32, spec: &HalfSpec, mask: i32, material: String, link: (u32, &str)| {
            Object {
                id: id.to_string(),
                object_type: ty,
                state: if active {
                    STATE_ACTIVE
                } else {
                    STATE_PRE_ACTIVE
                },
                names: spec.names.clone(),
                algorithm: ALG_RSA,
                length: bits,
                usage_mask: spec.usage_mask.unwrap_or(mask),
                links: vec![(link.0, link.1.to_string())],
                initial_date: now,
                activation_date: active.then_some(now),
                deactivation_date: None,
                destroy_date: None,
                revocation: None,
                material: Some(material),
            }
        };
    let private_obj = base(
        &priv_id,
        OBJ_PRIVATE_KEY,
        private,
        USAGE_DECRYPT | USAGE_UNWRAP_KEY,
        hex::encode(sk_der.as_bytes()),
        (LINK_PUBLIC_KEY, &pub_id),
    );
    let public_obj = base(
        &pub_id,
        OBJ_PUBLIC_KEY,
        public,
        USAGE_ENCRYPT | USAGE_WRAP_KEY,
        hex::encode(pk_der.as_bytes()),
        (LINK_PRIVATE_KEY, &priv_id),
    );
    Ok((private_obj, public_obj))
}

fn create_key_pair(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let mut common = HalfSpec::default();
    apply_attributes(
        &mut common,
        &template_attributes(p.child(COMMON_TEMPLATE_ATTRIBUTE))?,
    )?;
    let mut private = common.clone();
    apply_attributes(
        &mut private,
        &template_attributes(p.child(PRIVATE_KEY_TEMPLATE_ATTRIBUTE))?,
    )?;
    let mut public = common.clone();
    apply_attributes(
        &mut public,
        &template_attributes(p.child(PUBLIC_KEY_TEMPLATE_ATTRIBUTE))?,
    )?;
    for spec in [&private, &public] {
        match spec.algorithm {
            Some(ALG_RSA) => {}
            None => {
                return Err(fail(
                    REASON_MISSING_DATA,
                    "CreateKeyPair needs Cryptographic Algorithm (RSA)",
                ))
            }
            Some(a) => {
                return Err(fail(
                    REASON_FEATURE_NOT_SUPPORTED,
                    format!("Cryptographic Algorithm {a}: this mock KMS makes RSA key pairs only"),
                ))
            }
        }
    }
    let bits = private.length.or(public.length).unwrap_or(2048);
    if private.length.unwrap_or(bits) != public.length.unwrap_or(bits) {
        return Err(fail(
            REASON_INVALID_FIELD,
            "the two halves must have the same Cryptographic Length",
        ));
    }
    let sk = generate(bits)?; // outside the lock: RSA generation takes a while
    let (sid, pid) = b.store.update(
        |st| {
            let (so, po) = new_pair(st, &sk, &private, &public, bits, false)?;
            let ids = (so.id.clone(), po.id.clone());
            st.insert(so);
            st.insert(po);
            Ok(ids)
        },
        persist,
    )?;
    tracing::info!(private = %sid, public = %pid, bits, names = ?private.names, "mock KMS: created key pair");
    *placeholder = Some(sid.clone());
    Ok(vec![
        text(PRIVATE_KEY_UNIQUE_IDENTIFIER, &sid),
        text(PUBLIC_KEY_UNIQUE_IDENTIFIER, &pid),
    ])
}

fn rekey_key_pair(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let old_id = uid(p, placeholder, PRIVATE_KEY_UNIQUE_IDENTIFIER)?;
    let offset = match p.child(OFFSET) {
        None => 0,
        Some(o) => match o.value {
            Value::Interval(i) => i,
            _ => return Err(fail(REASON_INVALID_FIELD, "Offset must be an Interval")),
        },
    };
    let mut over = HalfSpec::default();
    apply_attributes(
        &mut over,
        &template_attributes(p.child(COMMON_TEMPLATE_ATTRIBUTE))?,
    )?;
    if !over.names.is_empty() {
        return Err(fail(
            REASON_INVALID_FIELD,
            "ReKeyKeyPair moves the old names to the new pair; do not give a Name",
        ));
    }
    let bits = {
        let st = b.store.lock();
        let old = find(b, &st, &old_id)?;
        check_rekeyable(&st, old)?;
        over.length.unwrap_or(old.length)
    };
    let sk = generate(bits)?;
    let (sid, pid) = b.store.update(
        |st| {
            // Checked again: the state may have changed while the key was made.
            let old = find(b, st, &old_id)?.clone();
            check_rekeyable(st, &old)?;
            let old_pub_id = old.link(LINK_PUBLIC_KEY).unwrap_or("").to_string();
            let old_pub = find(b, st, &old_pub_id)?.clone();
            let active =
                offset == 0 && (old.state == STATE_ACTIVE || old.state == STATE_DEACTIVATED);
            let private = HalfSpec {
                names: old.names.clone(),
                usage_mask: Some(old.usage_mask),
                ..Default::default()
            };
            let public = HalfSpec {
                names: old_pub.names.clone(),
                usage_mask: Some(old_pub.usage_mask),
                ..Default::default()
            };
            let (mut so, mut po) = new_pair(st, &sk, &private, &public, bits, active)?;
            so.links.push((LINK_REPLACED, old.id.clone()));
            po.links.push((LINK_REPLACED, old_pub.id.clone()));
            let now = now();
            for (id, new_id) in [(&old.id, &so.id), (&old_pub.id, &po.id)] {
                let o = find_mut(b, st, id)?;
                o.names.clear();
                o.links.push((LINK_REPLACEMENT, new_id.clone()));
                if o.state == STATE_ACTIVE {
                    o.state = STATE_DEACTIVATED;
                    o.deactivation_date = Some(now);
                }
            }
            let ids = (so.id.clone(), po.id.clone());
            st.insert(so);
            st.insert(po);
            Ok(ids)
        },
        persist,
    )?;
    tracing::info!(old = %old_id, private = %sid, public = %pid, "mock KMS: re-keyed key pair");
    *placeholder = Some(sid.clone());
    Ok(vec![
        text(PRIVATE_KEY_UNIQUE_IDENTIFIER, &sid),
        text(PUBLIC_KEY_UNIQUE_IDENTIFIER, &pid),
    ])
}

fn check_rekeyable(st: &State, old: &Object) -> Result<(), Failure> {
    if old.object_type != OBJ_PRIVATE_KEY {
        return Err(fail(
            REASON_INVALID_FIELD,
            format!("object {} is not a private key", old.id),
        ));
    }
    if destroyed(old) || old.state == STATE_COMPROMISED {
        return Err(fail(
            REASON_ILLEGAL_OPERATION,
            format!(
                "object {} is {}: it cannot be re-keyed",
                old.id,
                state_name(old.state)
            ),
        ));
    }
    if let Some(r) = old.link(LINK_REPLACEMENT) {
        return Err(fail(
            REASON_ILLEGAL_OPERATION,
            format!(
                "object {} was already replaced by {r}; re-key the newest key",
                old.id
            ),
        ));
    }
    if old.link(LINK_PUBLIC_KEY).and_then(|p| st.get(p)).is_none() {
        return Err(fail(
            REASON_ILLEGAL_OPERATION,
            format!("private key {} has no public key", old.id),
        ));
    }
    Ok(())
}

fn locate(b: &Backend, v: (i32, i32), p: &Ttlv) -> OpResult {
    let filters = template_attributes(Some(p))?;
    let max = child_int(p, MAXIMUM_ITEMS, "Maximum Items")?;
    let offset = child_int(p, OFFSET_ITEMS, "Offset Items")?
        .unwrap_or(0)
        .max(0) as usize;
    // Check every filter once, before looking at objects.
    for (name, value) in &filters {
        match name.as_str() {
            "Name" => {
                child_text(value, NAME_VALUE, "Name Value")?;
            }
            "Object Type" | "State" | "Cryptographic Algorithm" => {
                value.as_enum().map_err(|e| invalid(name, e))?;
            }
            "Cryptographic Length" => {
                value.as_int().map_err(|e| invalid(name, e))?;
            }
            "Unique Identifier" => {
                value.as_text().map_err(|e| invalid(name, e))?;
            }
            "Link" => {
                child_enum(value, LINK_TYPE, "Link Type")?;
                child_text(value, LINKED_OBJECT_IDENTIFIER, "Linked Object Identifier")?;
            }
            other => {
                return Err(fail(
                    REASON_INVALID_FIELD,
                    format!("Locate cannot filter on {other:?} in this mock KMS"),
                ))
            }
        }
    }
    let matches = |o: &Object| -> bool {
        filters.iter().all(|(name, value)| match name.as_str() {
            "Name" => value
                .child(NAME_VALUE)
                .and_then(|n| n.as_text().ok())
                .is_some_and(|n| o.names.iter().any(|x| x == n)),
            "Object Type" => value.as_enum().ok() == Some(o.object_type),
            "State" => value.as_enum().ok() == Some(o.state),
            "Cryptographic Algorithm" => value.as_enum().ok() == Some(o.algorithm),
            "Cryptographic Length" => value.as_int().ok() == Some(o.length),
            "Unique Identifier" => value.as_text().ok() == Some(o.id.as_str()),
            "Link" => {
                let lt = value.child(LINK_TYPE).and_then(|x| x.as_enum().ok());
                let li = value
                    .child(LINKED_OBJECT_IDENTIFIER)
                    .and_then(|x| x.as_text().ok());
                o.links
                    .iter()
                    .any(|(t, i)| Some(*t) == lt && Some(i.as_str()) == li)
            }
            _ => false,
        })
    };
    let st = b.store.lock();
    let mut found: Vec<&Object> = st
        .objects
        .values()
        .filter(|o| !b.faults.is_missing(&o.id) && matches(o))
        .collect();
    // Most recent first (KMIP 2.0 makes this the rule; 1.x leaves it open).
    found.sort_by(|a, b| {
        b.initial_date
            .cmp(&a.initial_date)
            .then(b.id.len().cmp(&a.id.len()))
            .then(b.id.cmp(&a.id))
    });
    let total = found.len();
    let take = max.map(|m| m.max(0) as usize).unwrap_or(usize::MAX);
    let mut out = Vec::new();
    if v >= (1, 3) {
        out.push(int(LOCATED_ITEMS, total.min(i32::MAX as usize) as i32));
    }
    out.extend(
        found
            .into_iter()
            .skip(offset)
            .take(take)
            .map(|o| text(UNIQUE_IDENTIFIER, &o.id)),
    );
    Ok(out)
}

fn key_material(o: &Object, format: Option<u32>) -> Result<(u32, Zeroizing<Vec<u8>>), Failure> {
    let der = Zeroizing::new(
        hex::decode(o.material.as_deref().ok_or_else(|| gone(o))?)
            .map_err(|_| fail(REASON_GENERAL_FAILURE, "stored key material is damaged"))?,
    );
    let unsupported = |f: u32| {
        fail(
            REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED,
            format!(
                "Key Format Type {f}: {} keys are served as {}",
                if o.object_type == OBJ_PRIVATE_KEY {
                    "private"
                } else {
                    "public"
                },
                if o.object_type == OBJ_PRIVATE_KEY {
                    "PKCS#1 (3) or PKCS#8 (4)"
                } else {
                    "PKCS#1 (3) or X.509 (5)"
                }
            ),
        )
    };
    let crypto = |e: String| fail(REASON_GENERAL_FAILURE, e);
    if o.object_type == OBJ_PRIVATE_KEY {
        match format.unwrap_or(FMT_PKCS8) {
            FMT_PKCS1 => Ok((FMT_PKCS1, der)),
            FMT_PKCS8 => {
                let sk = RsaPrivateKey::from_pkcs1_der(&der).map_err(|e| crypto(e.to_string()))?;
                let p8 = sk.to_pkcs8_der().map_err(|e| crypto(e.to_string()))?;
                Ok((FMT_PKCS8, Zeroizing::new(p8.as_bytes().to_vec())))
            }
            f => Err(unsupported(f)),
        }
    } else {
        match format.unwrap_or(FMT_PKCS1) {
            FMT_PKCS1 => Ok((FMT_PKCS1, der)),
            FMT_X509 => {
                use rsa::pkcs1::DecodeRsaPublicKey;
                let pk = RsaPublicKey::from_pkcs1_der(&der).map_err(|e| crypto(e.to_string()))?;
                let spki = pk.to_public_key_der().map_err(|e| crypto(e.to_string()))?;
                Ok((FMT_X509, Zeroizing::new(spki.as_bytes().to_vec())))
            }
            f => Err(unsupported(f)),
        }
    }
}

fn get(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    let format = child_enum(p, KEY_FORMAT_TYPE, "Key Format Type")?;
    if p.child(KEY_WRAPPING_SPECIFICATION).is_some() {
        return Err(fail(
            REASON_FEATURE_NOT_SUPPORTED,
            "key wrapping on Get is not served by this mock KMS",
        ));
    }
    let st = b.store.lock();
    let o = find(b, &st, &id)?;
    if destroyed(o) {
        return Err(gone(o));
    }
    let (fmt, material) = key_material(o, format)?;
    let mut kv = vec![t(KEY_MATERIAL, Value::ByteString(material.to_vec()))];
    if b.faults.attributes_in_key_value() {
        // The old Cosmian behaviour of seed 003: metadata inside KeyValue.
        kv.extend(
            attribute_values(o, true)
                .into_iter()
                .map(|(n, i, v)| attr(&n, i, v)),
        );
    }
    let block = s(
        KEY_BLOCK,
        vec![
            en(KEY_FORMAT_TYPE, fmt),
            s(KEY_VALUE, kv),
            en(CRYPTOGRAPHIC_ALGORITHM, o.algorithm),
            int(CRYPTOGRAPHIC_LENGTH, o.length),
        ],
    );
    let obj_tag = if o.object_type == OBJ_PRIVATE_KEY {
        PRIVATE_KEY
    } else {
        PUBLIC_KEY
    };
    *placeholder = Some(id.clone());
    Ok(vec![
        en(OBJECT_TYPE, o.object_type),
        text(UNIQUE_IDENTIFIER, &id),
        s(obj_tag, vec![block]),
    ])
}

fn get_attributes(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    let wanted: Vec<&str> = p
        .children(ATTRIBUTE_NAME)
        .map(|n| n.as_text().map_err(|e| invalid("Attribute Name", e)))
        .collect::<Result<_, _>>()?;
    let st = b.store.lock();
    let o = find(b, &st, &id)?;
    let mut out = vec![text(UNIQUE_IDENTIFIER, &id)];
    for (n, i, v) in attribute_values(o, false) {
        if wanted.is_empty() || wanted.contains(&n.as_str()) {
            out.push(attr(&n, i, v));
        }
    }
    *placeholder = Some(id);
    Ok(out)
}

fn activate(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    b.store.update(
        |st| {
            let o = find_mut(b, st, &id)?;
            if o.state != STATE_PRE_ACTIVE {
                return Err(fail(
                    REASON_ILLEGAL_OPERATION,
                    format!(
                        "object {id} is {}; only Pre-Active objects can be activated",
                        state_name(o.state)
                    ),
                ));
            }
            o.state = STATE_ACTIVE;
            o.activation_date = Some(now());
            Ok(())
        },
        persist,
    )?;
    *placeholder = Some(id.clone());
    Ok(vec![text(UNIQUE_IDENTIFIER, &id)])
}

fn revoke(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    let reason = p
        .child(REVOCATION_REASON)
        .ok_or_else(|| fail(REASON_MISSING_DATA, "Revoke needs a Revocation Reason"))?;
    let code = child_enum(reason, REVOCATION_REASON_CODE, "Revocation Reason Code")?
        .ok_or_else(|| fail(REASON_MISSING_DATA, "Revocation Reason without a code"))?;
    let message = child_text(reason, REVOCATION_MESSAGE, "Revocation Message")?.map(str::to_string);
    b.store.update(
        |st| {
            let o = find_mut(b, st, &id)?;
            let compromise = code == REVOKE_KEY_COMPROMISE || code == 3;
            o.state = match (compromise, o.state) {
                (true, s) if s == STATE_DESTROYED || s == STATE_DESTROYED_COMPROMISED => {
                    STATE_DESTROYED_COMPROMISED
                }
                (true, _) => STATE_COMPROMISED,
                (false, STATE_ACTIVE) => {
                    o.deactivation_date = Some(now());
                    STATE_DEACTIVATED
                }
                (false, s) => {
                    return Err(fail(
                        REASON_ILLEGAL_OPERATION,
                        format!("object {id} is {}; only Active objects can be revoked for a reason other than compromise", state_name(s)),
                    ))
                }
            };
            o.revocation = Some((code, message.clone()));
            Ok(())
        },
        persist,
    )?;
    *placeholder = Some(id.clone());
    Ok(vec![text(UNIQUE_IDENTIFIER, &id)])
}

fn destroy(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    b.store.update(
        |st| {
            let o = find_mut(b, st, &id)?;
            o.state = match o.state {
                STATE_ACTIVE => {
                    return Err(fail(
                        REASON_ILLEGAL_OPERATION,
                        format!("object {id} is Active: revoke it before destroying it"),
                    ))
                }
                STATE_COMPROMISED => STATE_DESTROYED_COMPROMISED,
                s if s == STATE_DESTROYED || s == STATE_DESTROYED_COMPROMISED => {
                    return Err(gone(o))
                }
                _ => STATE_DESTROYED,
            };
            o.material = None;
            o.destroy_date = Some(now());
            Ok(())
        },
        persist,
    )?;
    tracing::info!(id = %id, "mock KMS: destroyed object");
    *placeholder = Some(id.clone());
    Ok(vec![text(UNIQUE_IDENTIFIER, &id)])
}

fn decrypt(b: &Backend, p: &Ttlv, placeholder: &mut Option<String>) -> OpResult {
    if b.faults.decrypt_unsupported() {
        return Err(fail(
            REASON_OPERATION_NOT_SUPPORTED,
            "Decrypt is not supported by this KMS (fault injected)",
        ));
    }
    let id = uid(p, placeholder, UNIQUE_IDENTIFIER)?;
    let data = p
        .child(DATA)
        .ok_or_else(|| fail(REASON_MISSING_DATA, "Decrypt needs Data"))?
        .as_bytes()
        .map_err(|e| invalid("Data", e))?;
    if let Some(cp) = p.child(CRYPTOGRAPHIC_PARAMETERS) {
        match child_enum(cp, CRYPTOGRAPHIC_ALGORITHM, "Cryptographic Algorithm")? {
            None | Some(ALG_RSA) => {}
            Some(a) => {
                return Err(fail(
                    REASON_INVALID_FIELD,
                    format!("Cryptographic Algorithm {a} does not match the RSA key"),
                ))
            }
        }
        match child_enum(cp, PADDING_METHOD, "Padding Method")? {
            None | Some(PAD_OAEP) => {}
            Some(m) => {
                return Err(fail(
                    REASON_FEATURE_NOT_SUPPORTED,
                    format!("Padding Method {m}: this mock KMS decrypts RSA-OAEP only"),
                ))
            }
        }
        match child_enum(cp, HASHING_ALGORITHM, "Hashing Algorithm")? {
            None | Some(HASH_SHA1) => {}
            Some(h) => {
                return Err(fail(
                    REASON_FEATURE_NOT_SUPPORTED,
                    format!("Hashing Algorithm {h}: this mock KMS decrypts OAEP with SHA-1 only"),
                ))
            }
        }
    }
    let st = b.store.lock();
    let o = find(b, &st, &id)?;
    if o.object_type != OBJ_PRIVATE_KEY {
        return Err(fail(
            REASON_INVALID_FIELD,
            format!("object {id} is not a private key"),
        ));
    }
    if destroyed(o) {
        return Err(gone(o));
    }
    if o.state == STATE_PRE_ACTIVE {
        return Err(fail(
            REASON_PERMISSION_DENIED,
            format!("object {id} is Pre-Active: activate it before use"),
        ));
    }
    if o.usage_mask & (USAGE_DECRYPT | USAGE_UNWRAP_KEY) == 0 {
        return Err(fail(
            REASON_PERMISSION_DENIED,
            format!("object {id}'s Cryptographic Usage Mask allows neither Decrypt nor Unwrap Key"),
        ));
    }
    let der = Zeroizing::new(
        hex::decode(o.material.as_deref().ok_or_else(|| gone(o))?)
            .map_err(|_| fail(REASON_GENERAL_FAILURE, "stored key material is damaged"))?,
    );
    drop(st);
    let sk = RsaPrivateKey::from_pkcs1_der(&der)
        .map_err(|e| fail(REASON_GENERAL_FAILURE, e.to_string()))?;
    let plain = Zeroizing::new(
        sk.decrypt(rsa::Oaep::new::<sha1::Sha1>(), data)
            .map_err(|_| {
                fail(
                    REASON_CRYPTOGRAPHIC_FAILURE,
                    "RSA-OAEP decryption failed (wrong key or damaged data)",
                )
            })?,
    );
    *placeholder = Some(id.clone());
    Ok(vec![
        text(UNIQUE_IDENTIFIER, &id),
        t(DATA, Value::ByteString(plain.to_vec())),
    ])
}
