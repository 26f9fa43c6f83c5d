//! Tests of the mock KMS's request handler without the network: operation
//! semantics and states on raw KMIP messages, and property tests that arbitrary
//! bytes, mutated requests and well-formed requests with arbitrary payloads never
//! make it panic and always get a decodable answer.

use super::faults::Faults;
use super::ops::{handle, Backend};
use super::store::Store;
use ferry::kmip::message::{self as m, KMIP_1_4};
use ferry::kmip::tags::*;
use ferry::kmip::ttlv::{Ttlv, Value};
use proptest::prelude::*;
use std::sync::Arc;

fn backend() -> Backend {
    Backend {
        store: Store::memory(),
        faults: Arc::new(Faults::default()),
    }
}

fn call(b: &Backend, op: u32, payload: Vec<Ttlv>) -> Result<Ttlv, m::KmipError> {
    let resp = handle(b, &m::request(KMIP_1_4, op, payload).encode());
    let root = Ttlv::decode(&resp).expect("the mock answers TTLV");
    m::response_payload(&root, op)
}

fn reason(r: Result<Ttlv, m::KmipError>) -> u32 {
    match r {
        Err(m::KmipError::Failed { reason, .. }) => reason,
        other => panic!("expected a KMIP failure, got {other:?}"),
    }
}

#[test]
fn key_pair_lifecycle_on_raw_messages() {
    let b = backend();
    let p = call(&b, OP_CREATE_KEY_PAIR, m::create_rsa_key_pair("t/k", 2048)).unwrap();
    let (sk, pk) = m::parse_key_pair_ids(&p).unwrap();
    let attrs = |id: &str| {
        let p = call(
            &b,
            OP_GET_ATTRIBUTES,
            m::get_attributes(id, m::OBJECT_ATTRIBUTE_NAMES),
        )
        .unwrap();
        m::object_attributes(id, &m::parse_attributes(&p).unwrap()).unwrap()
    };
    let a = attrs(&sk);
    assert_eq!(a.state, Some(STATE_PRE_ACTIVE));
    assert_eq!(a.link(LINK_PUBLIC_KEY), Some(pk.as_str()));
    assert_eq!(attrs(&pk).link(LINK_PRIVATE_KEY), Some(sk.as_str()));
    assert_eq!(a.names, vec!["t/k".to_string()]);
    // Pre-Active keys do not decrypt; Active ones cannot be destroyed.
    assert_eq!(
        reason(call(
            &b,
            OP_DECRYPT,
            m::decrypt_rsa_oaep_sha1(&sk, &[0; 256])
        )),
        REASON_PERMISSION_DENIED
    );
    call(&b, OP_ACTIVATE, m::by_id(&sk)).unwrap();
    assert_eq!(
        reason(call(&b, OP_ACTIVATE, m::by_id(&sk))),
        REASON_ILLEGAL_OPERATION
    );
    assert_eq!(
        reason(call(&b, OP_DESTROY, m::by_id(&sk))),
        REASON_ILLEGAL_OPERATION
    );
    // Unsupported formats are refused with the right reason.
    assert_eq!(
        reason(call(&b, OP_GET, m::get(&pk, Some(FMT_PKCS8)))),
        REASON_KEY_FORMAT_TYPE_NOT_SUPPORTED
    );
    call(&b, OP_REVOKE, m::revoke(&sk, REVOKE_CESSATION, None)).unwrap();
    assert_eq!(attrs(&sk).state, Some(STATE_DEACTIVATED));
    call(&b, OP_DESTROY, m::by_id(&sk)).unwrap();
    assert_eq!(attrs(&sk).state, Some(STATE_DESTROYED));
    assert_eq!(
        reason(call(&b, OP_GET, m::get(&sk, None))),
        REASON_ITEM_NOT_FOUND
    );
    assert_eq!(
        reason(call(&b, OP_GET, m::get("999", None))),
        REASON_ITEM_NOT_FOUND
    );
    // Destroyed objects stay locatable by state (their metadata is kept).
    let p = call(
        &b,
        OP_LOCATE,
        m::locate("t/k", OBJ_PRIVATE_KEY, Some(STATE_DESTROYED)),
    )
    .unwrap();
    assert_eq!(m::parse_ids(&p).unwrap(), vec![sk]);
}

#[test]
fn batches_share_the_id_placeholder_and_echo_batch_ids() {
    let b = backend();
    // CreateKeyPair then Activate with no id: the placeholder names the private key.
    let mut req = m::request(
        KMIP_1_4,
        OP_CREATE_KEY_PAIR,
        m::create_rsa_key_pair("b", 2048),
    );
    if let Value::Structure(items) = &mut req.value {
        items.push(Ttlv::structure(
            BATCH_ITEM,
            vec![
                Ttlv::new(OPERATION, Value::Enumeration(OP_ACTIVATE)),
                Ttlv::new(UNIQUE_BATCH_ITEM_ID, Value::ByteString(vec![7, 7])),
                Ttlv::structure(REQUEST_PAYLOAD, vec![]),
            ],
        ));
    }
    let resp = Ttlv::decode(&handle(&b, &req.encode())).unwrap();
    let items: Vec<&Ttlv> = resp.children(BATCH_ITEM).collect();
    assert_eq!(items.len(), 2);
    assert_eq!(
        items[1]
            .child(UNIQUE_BATCH_ITEM_ID)
            .unwrap()
            .as_bytes()
            .unwrap(),
        &[7, 7]
    );
    assert_eq!(
        items[1].child(RESULT_STATUS).unwrap().as_enum().unwrap(),
        STATUS_SUCCESS
    );
    let header = resp.child(RESPONSE_HEADER).unwrap();
    assert!(
        header.child(TIME_STAMP).is_some(),
        "PyKMIP needs a Time Stamp"
    );
    assert_eq!(header.child(BATCH_COUNT).unwrap().as_int().unwrap(), 2);
}

#[test]
fn rekey_moves_names_links_and_states() {
    let b = backend();
    let (sk, pk) = m::parse_key_pair_ids(
        &call(&b, OP_CREATE_KEY_PAIR, m::create_rsa_key_pair("r", 2048)).unwrap(),
    )
    .unwrap();
    call(&b, OP_ACTIVATE, m::by_id(&sk)).unwrap();
    call(&b, OP_ACTIVATE, m::by_id(&pk)).unwrap();
    let (sk2, pk2) =
        m::parse_key_pair_ids(&call(&b, OP_REKEY_KEY_PAIR, m::rekey_key_pair(&sk)).unwrap())
            .unwrap();
    let attrs = |id: &str| {
        let p = call(&b, OP_GET_ATTRIBUTES, m::get_attributes(id, &[])).unwrap();
        m::object_attributes(id, &m::parse_attributes(&p).unwrap()).unwrap()
    };
    let (o, n, op, np) = (attrs(&sk), attrs(&sk2), attrs(&pk), attrs(&pk2));
    assert_eq!(o.link(LINK_REPLACEMENT), Some(sk2.as_str()));
    assert_eq!(n.link(LINK_REPLACED), Some(sk.as_str()));
    assert_eq!(op.link(LINK_REPLACEMENT), Some(pk2.as_str()));
    assert_eq!(np.link(LINK_REPLACED), Some(pk.as_str()));
    assert_eq!(n.link(LINK_PUBLIC_KEY), Some(pk2.as_str()));
    assert_eq!(
        (o.state, n.state),
        (Some(STATE_DEACTIVATED), Some(STATE_ACTIVE))
    );
    assert_eq!(
        (op.state, np.state),
        (Some(STATE_DEACTIVATED), Some(STATE_ACTIVE))
    );
    assert!(o.names.is_empty() && op.names.is_empty());
    assert_eq!(n.names, vec!["r".to_string()]);
    // Only the newest version can be re-keyed.
    assert_eq!(
        reason(call(&b, OP_REKEY_KEY_PAIR, m::rekey_key_pair(&sk))),
        REASON_ILLEGAL_OPERATION
    );
    let p = call(&b, OP_LOCATE, m::locate("r", OBJ_PRIVATE_KEY, None)).unwrap();
    assert_eq!(m::parse_ids(&p).unwrap(), vec![sk2]);
}

#[test]
fn garbage_gets_an_invalid_message_answer() {
    let b = backend();
    for bad in [
        &b""[..],
        b"\x42\x00\x78\x01\x00\x00\x00\x00",
        b"\x42\x00\x7b\x01\x00\x00\x00\x00",
        b"hello world, not TTLV at all",
    ] {
        let resp = Ttlv::decode(&handle(&b, bad)).unwrap();
        let item = resp.child(BATCH_ITEM).unwrap();
        assert_eq!(
            item.child(RESULT_REASON).unwrap().as_enum().unwrap(),
            REASON_INVALID_MESSAGE
        );
    }
    // KMIP 2.x is refused with a message saying so.
    let req = m::request((2, 0), OP_QUERY, vec![]).encode();
    let resp = Ttlv::decode(&handle(&b, &req)).unwrap();
    let msg = resp
        .child(BATCH_ITEM)
        .and_then(|i| i.child(RESULT_MESSAGE))
        .and_then(|m| m.as_text().ok())
        .unwrap()
        .to_string();
    assert!(msg.contains("2.0"), "{msg}");
}

fn assert_answers(b: &Backend, bytes: &[u8]) {
    let resp = handle(b, bytes);
    let root = Ttlv::decode(&resp).expect("every answer decodes");
    assert_eq!(root.tag.0, RESPONSE_MESSAGE);
    assert!(root.child(BATCH_ITEM).is_some());
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        any::<i32>().prop_map(Value::Integer),
        any::<u32>().prop_map(Value::Enumeration),
        any::<i64>().prop_map(Value::DateTime),
        any::<u32>().prop_map(Value::Interval),
        any::<bool>().prop_map(Value::Boolean),
        "[a-z/ ]{0,12}".prop_map(Value::TextString),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::ByteString),
    ];
    leaf.prop_recursive(4, 24, 5, |inner| {
        proptest::collection::vec((arb_tag(), inner).prop_map(|(t, v)| Ttlv::new(t, v)), 0..5)
            .prop_map(Value::Structure)
    })
}

fn arb_tag() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(UNIQUE_IDENTIFIER),
        Just(ATTRIBUTE),
        Just(ATTRIBUTE_NAME),
        Just(ATTRIBUTE_VALUE),
        Just(NAME_VALUE),
        Just(KEY_FORMAT_TYPE),
        Just(DATA),
        Just(CRYPTOGRAPHIC_PARAMETERS),
        Just(PADDING_METHOD),
        Just(REVOCATION_REASON),
        Just(REVOCATION_REASON_CODE),
        Just(PRIVATE_KEY_UNIQUE_IDENTIFIER),
        Just(COMMON_TEMPLATE_ATTRIBUTE),
        Just(MAXIMUM_ITEMS),
        Just(QUERY_FUNCTION),
        Just(PROTOCOL_VERSION),
        (0x420000u32..0x420100),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let b = backend();
        assert_answers(&b, &bytes);
    }

    #[test]
    fn mutated_requests_never_panic(
        op in prop_oneof![Just(OP_LOCATE), Just(OP_GET), Just(OP_QUERY), Just(OP_DISCOVER_VERSIONS), Just(OP_REVOKE)],
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let b = backend();
        let payload = match op {
            OP_LOCATE => m::locate("x", OBJ_PRIVATE_KEY, Some(STATE_ACTIVE)),
            OP_GET => m::get("1", Some(FMT_PKCS1)),
            OP_QUERY => m::query(&[1, 2, 3]),
            OP_REVOKE => m::revoke("1", 2, Some("m")),
            _ => m::discover_versions(&[(1, 4)]),
        };
        let mut bytes = m::request(KMIP_1_4, op, payload).encode();
        for (at, x) in flips {
            let n = bytes.len();
            bytes[at % n] ^= x;
        }
        assert_answers(&b, &bytes);
    }

    #[test]
    fn well_formed_requests_with_arbitrary_payloads_never_panic(
        op in prop_oneof![
            Just(OP_CREATE_KEY_PAIR), Just(OP_LOCATE), Just(OP_GET), Just(OP_GET_ATTRIBUTES),
            Just(OP_ACTIVATE), Just(OP_REVOKE), Just(OP_DESTROY), Just(OP_QUERY),
            Just(OP_REKEY_KEY_PAIR), Just(OP_DISCOVER_VERSIONS), Just(OP_DECRYPT), any::<u32>(),
        ],
        payload in proptest::collection::vec((arb_tag(), arb_value()), 0..6),
    ) {
        // One backend for every case (RSA generation is slow), with a real pair so
        // that ids 1 and 2 exist; cases may change its states, which is fine.
        static SHARED: std::sync::OnceLock<Backend> = std::sync::OnceLock::new();
        let b = SHARED.get_or_init(|| {
            let b = backend();
            call(&b, OP_CREATE_KEY_PAIR, m::create_rsa_key_pair("p", 2048)).unwrap();
            b
        });
        let payload = payload.into_iter().map(|(t, v)| Ttlv::new(t, v)).collect();
        assert_answers(b, &m::request(KMIP_1_4, op, payload).encode());
    }
}
