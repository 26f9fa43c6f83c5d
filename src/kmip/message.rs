//! KMIP request/response messages and the payloads of the operations ferry uses.
//! Pure: builds and parses [`Ttlv`] trees, no I/O. Results other than Success
//! become [`KmipError::Failed`] with the server's reason and message.

use super::tags::*;
use super::ttlv::{Ttlv, TtlvError, Value};

/// Protocol version.
pub type Version = (i32, i32);

/// KMIP 1.4, what ferry asks for first.
pub const KMIP_1_4: Version = (1, 4);

/// Errors of the message layer.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KmipError {
    /// Malformed TTLV or missing fields.
    #[error("malformed KMIP message: {0}")]
    Malformed(#[from] TtlvError),
    /// The server answered an operation with a failure.
    #[error("{operation} failed: {reason_name} ({reason:#x}){}", if .message.is_empty() { String::new() } else { format!(": {}", .message) })]
    Failed {
        /// Operation.
        operation: &'static str,
        /// Result reason.
        reason: u32,
        /// Its name.
        reason_name: &'static str,
        /// Result message from the server.
        message: String,
    },
    /// Anything else unexpected in a response.
    #[error("unexpected KMIP response: {0}")]
    Unexpected(String),
}

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
fn version(v: Version) -> Ttlv {
    s(
        PROTOCOL_VERSION,
        vec![
            int(PROTOCOL_VERSION_MAJOR, v.0),
            int(PROTOCOL_VERSION_MINOR, v.1),
        ],
    )
}

/// An attribute `{Attribute Name, Attribute Value}`.
pub fn attribute(name: &str, value: Value) -> Ttlv {
    s(
        ATTRIBUTE,
        vec![text(ATTRIBUTE_NAME, name), t(ATTRIBUTE_VALUE, value)],
    )
}

/// A Name attribute value.
pub fn name_value(name: &str) -> Value {
    Value::Structure(vec![text(NAME_VALUE, name), en(NAME_TYPE, NAME_TEXT)])
}

/// Wrap one operation's payload into a request message.
pub fn request(v: Version, op: u32, payload: Vec<Ttlv>) -> Ttlv {
    s(
        REQUEST_MESSAGE,
        vec![
            s(REQUEST_HEADER, vec![version(v), int(BATCH_COUNT, 1)]),
            s(
                BATCH_ITEM,
                vec![en(OPERATION, op), s(REQUEST_PAYLOAD, payload)],
            ),
        ],
    )
}

/// Parse a response to a single-item request for `op`; returns its payload (an
/// empty structure when the server sent none).
pub fn response_payload(resp: &Ttlv, op: u32) -> Result<Ttlv, KmipError> {
    if resp.tag.0 != RESPONSE_MESSAGE {
        return Err(KmipError::Unexpected(format!(
            "tag {} where a Response Message was expected",
            resp.tag
        )));
    }
    let item = resp.req(BATCH_ITEM)?;
    let status = item.req(RESULT_STATUS)?.as_enum()?;
    if status != STATUS_SUCCESS {
        let reason = item
            .child(RESULT_REASON)
            .map(|r| r.as_enum())
            .transpose()?
            .unwrap_or(0x100);
        let message = item
            .child(RESULT_MESSAGE)
            .and_then(|m| m.as_text().ok())
            .unwrap_or("")
            .to_string();
        return Err(KmipError::Failed {
            operation: operation_name(op),
            reason,
            reason_name: reason_name(reason),
            message,
        });
    }
    if let Some(o) = item.child(OPERATION) {
        let got = o.as_enum()?;
        if got != op {
            return Err(KmipError::Unexpected(format!(
                "answer for {} to a {} request",
                operation_name(got),
                operation_name(op)
            )));
        }
    }
    Ok(item
        .child(RESPONSE_PAYLOAD)
        .cloned()
        .unwrap_or_else(|| s(RESPONSE_PAYLOAD, vec![])))
}

/// DiscoverVersions payload offering `versions` (newest first).
pub fn discover_versions(versions: &[Version]) -> Vec<Ttlv> {
    versions.iter().map(|&v| version(v)).collect()
}

/// Versions in a DiscoverVersions response payload.
pub fn parse_versions(p: &Ttlv) -> Result<Vec<Version>, KmipError> {
    p.children(PROTOCOL_VERSION)
        .map(|v| {
            Ok((
                v.req(PROTOCOL_VERSION_MAJOR)?.as_int()?,
                v.req(PROTOCOL_VERSION_MINOR)?.as_int()?,
            ))
        })
        .collect()
}

/// Query payload.
pub fn query(functions: &[u32]) -> Vec<Ttlv> {
    functions.iter().map(|&f| en(QUERY_FUNCTION, f)).collect()
}

/// What a Query answer says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryInfo {
    /// Supported operations.
    pub operations: Vec<u32>,
    /// Supported object types.
    pub object_types: Vec<u32>,
    /// Vendor identification.
    pub vendor: Option<String>,
}

/// Parse a Query response payload.
pub fn parse_query(p: &Ttlv) -> Result<QueryInfo, KmipError> {
    Ok(QueryInfo {
        operations: p
            .children(OPERATION)
            .map(|o| o.as_enum())
            .collect::<Result<_, _>>()?,
        object_types: p
            .children(OBJECT_TYPE)
            .map(|o| o.as_enum())
            .collect::<Result<_, _>>()?,
        vendor: p
            .child(VENDOR_IDENTIFICATION)
            .and_then(|v| v.as_text().ok())
            .map(str::to_string),
    })
}

/// CreateKeyPair payload for an RSA pair named `name` (both halves carry the name;
/// Locate tells them apart by object type).
pub fn create_rsa_key_pair(name: &str, bits: i32) -> Vec<Ttlv> {
    vec![
        s(
            COMMON_TEMPLATE_ATTRIBUTE,
            vec![
                attribute("Cryptographic Algorithm", Value::Enumeration(ALG_RSA)),
                attribute("Cryptographic Length", Value::Integer(bits)),
            ],
        ),
        s(
            PRIVATE_KEY_TEMPLATE_ATTRIBUTE,
            vec![
                attribute("Name", name_value(name)),
                attribute(
                    "Cryptographic Usage Mask",
                    Value::Integer(USAGE_DECRYPT | USAGE_UNWRAP_KEY),
                ),
            ],
        ),
        s(
            PUBLIC_KEY_TEMPLATE_ATTRIBUTE,
            vec![
                attribute("Name", name_value(name)),
                attribute(
                    "Cryptographic Usage Mask",
                    Value::Integer(USAGE_ENCRYPT | USAGE_WRAP_KEY),
                ),
            ],
        ),
    ]
}

/// (private id, public id) from a CreateKeyPair or ReKeyKeyPair response.
pub fn parse_key_pair_ids(p: &Ttlv) -> Result<(String, String), KmipError> {
    Ok((
        p.req(PRIVATE_KEY_UNIQUE_IDENTIFIER)?.as_text()?.to_string(),
        p.req(PUBLIC_KEY_UNIQUE_IDENTIFIER)?.as_text()?.to_string(),
    ))
}

/// ReKeyKeyPair payload: replace the pair whose private key is `private_id` (the
/// server copies the other attributes and moves the names to the new pair).
pub fn rekey_key_pair(private_id: &str) -> Vec<Ttlv> {
    vec![text(PRIVATE_KEY_UNIQUE_IDENTIFIER, private_id)]
}

/// Locate payload: by name, object type and (optionally) state.
pub fn locate(name: &str, object_type: u32, state: Option<u32>) -> Vec<Ttlv> {
    let mut v = vec![
        attribute("Name", name_value(name)),
        attribute("Object Type", Value::Enumeration(object_type)),
    ];
    if let Some(st) = state {
        v.push(attribute("State", Value::Enumeration(st)));
    }
    v
}

/// Unique identifiers in a Locate response.
pub fn parse_ids(p: &Ttlv) -> Result<Vec<String>, KmipError> {
    p.children(UNIQUE_IDENTIFIER)
        .map(|u| Ok(u.as_text()?.to_string()))
        .collect()
}

/// Payload naming one object.
pub fn by_id(id: &str) -> Vec<Ttlv> {
    vec![text(UNIQUE_IDENTIFIER, id)]
}

/// Get payload (optionally asking for a key format).
pub fn get(id: &str, format: Option<u32>) -> Vec<Ttlv> {
    let mut v = by_id(id);
    if let Some(f) = format {
        v.push(en(KEY_FORMAT_TYPE, f));
    }
    v
}

/// Key material from a Get response. `Debug` hides the bytes.
pub struct KeyObject {
    /// Object type.
    pub object_type: u32,
    /// Key format.
    pub format: u32,
    /// DER bytes (PKCS#1, PKCS#8 or SubjectPublicKeyInfo per `format`); zeroized on drop.
    pub material: zeroize::Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for KeyObject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "KeyObject(type {}, format {}, <{} bytes>)",
            self.object_type,
            self.format,
            self.material.len()
        )
    }
}

/// Parse a Get response payload. `Attribute` elements inside `KeyValue` (sent by
/// some servers) are ignored.
pub fn parse_key(p: &Ttlv) -> Result<KeyObject, KmipError> {
    let object_type = p.req(OBJECT_TYPE)?.as_enum()?;
    let obj = p
        .child(PUBLIC_KEY)
        .or_else(|| p.child(PRIVATE_KEY))
        .ok_or_else(|| {
            KmipError::Unexpected("Get returned no Public Key or Private Key object".into())
        })?;
    let block = obj.req(KEY_BLOCK)?;
    let format = block.req(KEY_FORMAT_TYPE)?.as_enum()?;
    let value = block.req(KEY_VALUE)?;
    let material = match &value.value {
        Value::Structure(_) => value.req(KEY_MATERIAL)?.as_bytes()?.to_vec(),
        // KMIP 1.x allows a Key Value that is the raw byte string itself.
        Value::ByteString(b) => b.clone(),
        _ => {
            return Err(KmipError::Unexpected(
                "Key Value is neither a structure nor bytes".into(),
            ))
        }
    };
    Ok(KeyObject {
        object_type,
        format,
        material: zeroize::Zeroizing::new(material),
    })
}

/// GetAttributes payload.
pub fn get_attributes(id: &str, names: &[&str]) -> Vec<Ttlv> {
    let mut v = by_id(id);
    v.extend(names.iter().map(|n| text(ATTRIBUTE_NAME, n)));
    v
}

/// Attributes of a GetAttributes response: (name, value).
pub fn parse_attributes(p: &Ttlv) -> Result<Vec<(String, Ttlv)>, KmipError> {
    p.children(ATTRIBUTE)
        .map(|a| {
            Ok((
                a.req(ATTRIBUTE_NAME)?.as_text()?.to_string(),
                a.req(ATTRIBUTE_VALUE)?.clone(),
            ))
        })
        .collect()
}

/// The attributes ferry reads to follow a key pair through rotations, typed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectAttributes {
    /// Unique identifier of the object.
    pub id: String,
    /// Object Type.
    pub object_type: Option<u32>,
    /// State.
    pub state: Option<u32>,
    /// Name values (ReKeyKeyPair moves them to the replacement).
    pub names: Vec<String>,
    /// Links: (Link Type, Linked Object Identifier).
    pub links: Vec<(u32, String)>,
    /// Initial Date (Unix seconds).
    pub initial_date: Option<i64>,
    /// Cryptographic Length in bits.
    pub length: Option<i32>,
}

impl ObjectAttributes {
    /// The object a link of `link_type` points to.
    pub fn link(&self, link_type: u32) -> Option<&str> {
        self.links
            .iter()
            .find(|(t, _)| *t == link_type)
            .map(|(_, id)| id.as_str())
    }
}

/// Attribute names ferry asks for in [`ObjectAttributes`].
pub const OBJECT_ATTRIBUTE_NAMES: &[&str] = &[
    "Object Type",
    "State",
    "Name",
    "Link",
    "Initial Date",
    "Cryptographic Length",
];

/// Type the (name, value) pairs of a GetAttributes answer. Attributes ferry does not
/// use are ignored; a known attribute of the wrong type is an error.
pub fn object_attributes(
    id: &str,
    attrs: &[(String, Ttlv)],
) -> Result<ObjectAttributes, KmipError> {
    let mut o = ObjectAttributes {
        id: id.to_string(),
        ..Default::default()
    };
    for (name, v) in attrs {
        match name.as_str() {
            "Object Type" => o.object_type = Some(v.as_enum()?),
            "State" => o.state = Some(v.as_enum()?),
            "Name" => o.names.push(v.req(NAME_VALUE)?.as_text()?.to_string()),
            "Link" => o.links.push((
                v.req(LINK_TYPE)?.as_enum()?,
                v.req(LINKED_OBJECT_IDENTIFIER)?.as_text()?.to_string(),
            )),
            "Initial Date" => match v.value {
                Value::DateTime(t) => o.initial_date = Some(t),
                _ => {
                    return Err(KmipError::Unexpected(format!(
                        "Initial Date is a {}",
                        v.value.type_name()
                    )))
                }
            },
            "Cryptographic Length" => o.length = Some(v.as_int()?),
            _ => {}
        }
    }
    Ok(o)
}

/// Revoke payload.
pub fn revoke(id: &str, reason: u32, message: Option<&str>) -> Vec<Ttlv> {
    let mut r = vec![en(REVOCATION_REASON_CODE, reason)];
    if let Some(m) = message {
        r.push(text(REVOCATION_MESSAGE, m));
    }
    let mut v = by_id(id);
    v.push(s(REVOCATION_REASON, r));
    v
}

/// Decrypt payload: RSA, OAEP, SHA-1.
pub fn decrypt_rsa_oaep_sha1(id: &str, data: &[u8]) -> Vec<Ttlv> {
    let mut v = by_id(id);
    v.push(s(
        CRYPTOGRAPHIC_PARAMETERS,
        vec![
            en(PADDING_METHOD, PAD_OAEP),
            en(HASHING_ALGORITHM, HASH_SHA1),
            en(CRYPTOGRAPHIC_ALGORITHM, ALG_RSA),
        ],
    ));
    v.push(t(DATA, Value::ByteString(data.to_vec())));
    v
}

/// The Data of a Decrypt response (zeroized on drop).
pub fn parse_data(p: &Ttlv) -> Result<zeroize::Zeroizing<Vec<u8>>, KmipError> {
    Ok(zeroize::Zeroizing::new(p.req(DATA)?.as_bytes()?.to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(
        status: u32,
        reason: Option<u32>,
        msg: Option<&str>,
        payload: Vec<Ttlv>,
        op: u32,
    ) -> Ttlv {
        let mut item = vec![en(OPERATION, op), en(RESULT_STATUS, status)];
        if let Some(r) = reason {
            item.push(en(RESULT_REASON, r));
        }
        if let Some(m) = msg {
            item.push(text(RESULT_MESSAGE, m));
        }
        item.push(s(RESPONSE_PAYLOAD, payload));
        s(
            RESPONSE_MESSAGE,
            vec![
                s(
                    RESPONSE_HEADER,
                    vec![version(KMIP_1_4), int(BATCH_COUNT, 1)],
                ),
                s(BATCH_ITEM, item),
            ],
        )
    }

    #[test]
    fn failures_map_to_typed_errors() {
        let r = response(1, Some(1), Some("no such key"), vec![], OP_GET);
        let e = response_payload(&Ttlv::decode(&r.encode()).unwrap(), OP_GET).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Get failed: Item Not Found (0x1): no such key"
        );
        let ok = response(0, None, None, vec![text(UNIQUE_IDENTIFIER, "7")], OP_LOCATE);
        assert_eq!(
            parse_ids(&response_payload(&ok, OP_LOCATE).unwrap()).unwrap(),
            vec!["7".to_string()]
        );
        assert!(
            response_payload(&ok, OP_GET).is_err(),
            "answer for another operation"
        );
    }

    #[test]
    fn key_value_with_attributes_inside_is_accepted() {
        // Some servers put Attribute elements inside KeyValue (seed 003): ignore them.
        let kv = s(
            KEY_VALUE,
            vec![
                t(KEY_MATERIAL, Value::ByteString(vec![1, 2, 3])),
                attribute("State", Value::Enumeration(2)),
            ],
        );
        let p = s(
            RESPONSE_PAYLOAD,
            vec![
                en(OBJECT_TYPE, OBJ_PUBLIC_KEY),
                text(UNIQUE_IDENTIFIER, "1"),
                s(
                    PUBLIC_KEY,
                    vec![s(
                        KEY_BLOCK,
                        vec![
                            en(KEY_FORMAT_TYPE, FMT_PKCS1),
                            kv,
                            en(CRYPTOGRAPHIC_ALGORITHM, ALG_RSA),
                        ],
                    )],
                ),
            ],
        );
        let k = parse_key(&p).unwrap();
        assert_eq!(
            (k.object_type, k.format, &k.material[..]),
            (OBJ_PUBLIC_KEY, FMT_PKCS1, &[1u8, 2, 3][..])
        );
        assert!(!format!("{k:?}").contains("1, 2, 3"));
    }
}
