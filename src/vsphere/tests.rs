//! Decoding tests on vim25 samples written from the WSDL / govmomi types (the parts
//! vcsim cannot produce: encryption, CBT, crypto task faults, NBD tickets), and
//! property tests of the hardened parser and the decoders.

use super::collector::decode_result;
use super::error::{from_cbt_fault, from_task_fault, Ctx};
use super::soap::{parse_response, ResponseError};
use super::types::*;
use super::xml::{parse, Element, Limits, XmlError};
use proptest::prelude::*;

const VM: &str = include_str!("testdata/vm_encrypted.xml");
const SNAP: &str = include_str!("testdata/snapshot_config.xml");
const QCDA: &str = include_str!("testdata/qcda.xml");
const QCDA_FAULT: &str = include_str!("testdata/qcda_filefault.xml");
const TASK_CRYPTO: &str = include_str!("testdata/task_crypto_error.xml");
const TASK_OK: &str = include_str!("testdata/task_snapshot_success.xml");
const TICKET: &str = include_str!("testdata/ticket.xml");
const SAMPLES: &[&str] = &[VM, SNAP, QCDA, QCDA_FAULT, TASK_CRYPTO, TASK_OK, TICKET];

const CTX: Ctx<'static> = Ctx {
    vcenter: "https://vc.example/sdk",
    doing: "test",
};

fn objects(x: &str) -> Vec<ObjectContent> {
    let r = parse_response(x.as_bytes(), "RetrievePropertiesEx", &Limits::default()).unwrap();
    decode_result(&r).unwrap().0
}

#[test]
fn encrypted_vm_with_cbt_and_snapshots_decodes() {
    let objs = objects(VM);
    assert_eq!(objs.len(), 2);
    let vm = Vm::decode(&objs[0]).unwrap();
    assert_eq!(vm.moref, MoRef::new("VirtualMachine", "vm-1042"));
    assert_eq!(vm.name, "web01 & friends");
    assert_eq!(
        vm.instance_uuid.as_deref(),
        Some("5012a8c4-1f2e-3d4c-5b6a-798877665544")
    );
    assert_eq!(vm.change_tracking, Some(true));
    assert_eq!(vm.power_state.as_deref(), Some("poweredOn"));
    assert_eq!(vm.host, Some(MoRef::new("HostSystem", "host-21")));
    assert_eq!(vm.datastores, vec![MoRef::new("Datastore", "datastore-31")]);
    let k = vm.key_id.as_ref().unwrap();
    assert_eq!(k.key_id, "7d3c1a52-aa01-4b7e-9f00-1e2d3c4b5a69");
    assert_eq!(k.provider_id.as_deref(), Some("kms-tenant-a"));
    assert!(vm.encrypted());
    assert_eq!(vm.key_provider(), Some("kms-tenant-a"));
    assert_eq!(vm.disks.len(), 2);
    let d = &vm.disks[0];
    assert_eq!((d.key, d.label.as_str()), (2000, "Hard disk 1"));
    assert_eq!(d.capacity_bytes, 42949672960);
    assert_eq!(d.file_name, "[ds-tenant-a] web01/web01.vmdk");
    assert_eq!(d.datastore, Some(MoRef::new("Datastore", "datastore-31")));
    assert_eq!(
        d.uuid.as_deref(),
        Some("6000C29a-8b7e-21f3-4c5d-0e1f2a3b4c5d")
    );
    assert_eq!(
        d.change_id.as_deref(),
        Some("52 0f 1e 2d 3c 4b 5a 69-78 87 96 a5 b4 c3 d2 e1/12")
    );
    assert_eq!(
        d.key_id.as_ref().unwrap().provider_id.as_deref(),
        Some("kms-tenant-a")
    );
    assert_eq!((d.controller_key, d.unit_number), (Some(1000), Some(0)));
    // capacityInKB only: bytes derived.
    assert_eq!(vm.disks[1].capacity_bytes, 1048576 * 1024);
    // Snapshot tree: a user snapshot with ferry's child; current is ferry's.
    assert_eq!(vm.snapshots.len(), 1);
    assert_eq!(vm.snapshots[0].name, "before upgrade");
    let child = &vm.snapshots[0].children[0];
    assert_eq!(child.name, "ferry-job-0042");
    assert!(child.quiesced);
    assert_eq!(vm.current_snapshot, Some(child.snapshot.clone()));
    assert_eq!(vm.all_snapshots().len(), 2);
    assert_eq!(
        super::snapshot::find_snapshots(&vm.snapshots, "ferry-job-0042").len(),
        1
    );
    // HotAdd slot on this VM: unit 0 and 1 are taken on controller 1000.
    assert_eq!(free_scsi_slot(&vm.devices), Some((1000, 2)));

    let plain = Vm::decode(&objs[1]).unwrap();
    assert!(!plain.encrypted());
    assert_eq!(plain.key_provider(), None);
    assert_eq!(plain.change_tracking, None);
    assert_eq!(
        plain.disks[0].backing_type,
        "VirtualDiskSeSparseBackingInfo"
    );
}

#[test]
fn snapshot_config_gives_the_frozen_file_and_change_id() {
    let objs = objects(SNAP);
    let (_, disks) = decode_devices(objs[0].prop("config.hardware.device").unwrap()).unwrap();
    assert_eq!(disks.len(), 1);
    assert_eq!(disks[0].file_name, "[ds-tenant-a] web01/web01-000001.vmdk");
    assert_eq!(
        disks[0].change_id.as_deref(),
        Some("52 0f 1e 2d 3c 4b 5a 69-78 87 96 a5 b4 c3 d2 e1/13")
    );
    assert!(disks[0].key_id.is_some());
}

#[test]
fn changed_disk_areas_decode_and_cbt_reset_is_typed() {
    let r = parse_response(QCDA.as_bytes(), "QueryChangedDiskAreas", &Limits::default()).unwrap();
    let info = DiskChangeInfo::decode(r.child("returnval").unwrap()).unwrap();
    assert_eq!((info.start_offset, info.length), (0, 17179869184));
    assert_eq!(info.changed_area.len(), 3);
    assert_eq!(
        info.changed_area[1],
        DiskArea {
            start: 1048576,
            length: 2097152
        }
    );
    match parse_response(
        QCDA_FAULT.as_bytes(),
        "QueryChangedDiskAreas",
        &Limits::default(),
    ) {
        Err(ResponseError::Fault(f)) => {
            assert_eq!(f.fault_type, "FileFault");
            let e = from_cbt_fault(&f, "52 0f/12", &CTX);
            assert!(e.is_cbt_reset(), "{e}");
            assert!(e.to_string().contains("full read"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn disk_change_info_outside_its_page_is_refused() {
    let bad = [
        "<r><startOffset>0</startOffset><length>100</length><changedArea><start>90</start><length>20</length></changedArea></r>",
        "<r><startOffset>0</startOffset><length>100</length><changedArea><start>50</start><length>10</length></changedArea><changedArea><start>40</start><length>5</length></changedArea></r>",
        "<r><startOffset>-1</startOffset><length>100</length></r>",
        "<r><startOffset>9223372036854775807</startOffset><length>9223372036854775807</length></r>",
        "<r><length>1</length></r>",
    ];
    for x in bad {
        let e = parse(x.as_bytes(), &Limits::default()).unwrap();
        assert!(DiskChangeInfo::decode(&e).is_err(), "{x}");
    }
}

#[test]
fn crypto_task_error_maps_to_crypto() {
    let objs = objects(TASK_CRYPTO);
    let info = TaskInfo::decode(objs[0].prop("info").unwrap()).unwrap();
    assert_eq!(info.state, TaskState::Error);
    let f = info.error.unwrap();
    assert_eq!(f.fault_type, "GenericVmConfigFault");
    let e = from_task_fault(&f, "task-5501", &CTX);
    assert!(e.is_crypto(), "{e}");
    assert!(e.to_string().contains("kms-tenant-b"), "{e}");
}

#[test]
fn successful_snapshot_task_returns_the_snapshot() {
    let objs = objects(TASK_OK);
    let info = TaskInfo::decode(objs[0].prop("info").unwrap()).unwrap();
    assert_eq!(info.state, TaskState::Success);
    assert_eq!(
        info.result,
        Some(MoRef::new("VirtualMachineSnapshot", "snapshot-88"))
    );
    assert_eq!(info.progress, Some(100));
}

#[test]
fn nbd_ticket_decodes_and_hides_its_id_in_debug() {
    let r = parse_response(
        TICKET.as_bytes(),
        "AcquireGenericServiceTicket",
        &Limits::default(),
    )
    .unwrap();
    let t = NbdTicket::decode(r.child("returnval").unwrap()).unwrap();
    assert_eq!(t.host_name, "esx-21.example.com");
    assert_eq!(
        t.nbds_url(10809),
        "nbds://esx-21.example.com:10809/cst-VCT-52b1f0a8-7c3d"
    );
    assert!(!format!("{t:?}").contains("cst-VCT"));
}

// ---- hostile documents ----------------------------------------------------------

#[test]
fn billion_laughs_is_refused_before_any_expansion() {
    let lol = r#"<?xml version="1.0"?>
<!DOCTYPE lolz [
 <!ENTITY lol "lol">
 <!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
 <!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">
 <!ENTITY lol9 "&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;&lol3;">
]>
<Envelope><Body><LoginResponse><returnval><key>&lol9;</key></returnval></LoginResponse></Body></Envelope>"#;
    assert_eq!(
        parse(lol.as_bytes(), &Limits::default()),
        Err(XmlError::Doctype)
    );
    // Without the DTD the reference is just undeclared.
    let no_dtd = "<Envelope><Body><x>&lol9;</x></Body></Envelope>";
    assert_eq!(
        parse(no_dtd.as_bytes(), &Limits::default()),
        Err(XmlError::UnknownEntity("lol9".into()))
    );
    // External entities: same.
    let xxe = r#"<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>"#;
    assert_eq!(
        parse(xxe.as_bytes(), &Limits::default()),
        Err(XmlError::Doctype)
    );
}

#[test]
fn predefined_entities_and_character_references_work() {
    let e = parse(
        "<a t='x'>&lt;&gt;&amp;&apos;&quot;&#65;&#x42;<![CDATA[<c>]]></a>".as_bytes(),
        &Limits::default(),
    )
    .unwrap();
    assert_eq!(e.text, "<>&'\"AB<c>");
    assert!(parse(b"<a>&#0;</a>", &Limits::default()).is_err());
    assert!(parse(b"<a>&#xFFFFFFFF;</a>", &Limits::default()).is_err());
}

#[test]
fn limits_are_enforced() {
    let small = Limits {
        max_bytes: 1000,
        max_depth: 8,
        max_elements: 20,
    };
    let big = format!("<a>{}</a>", "x".repeat(2000));
    assert_eq!(
        parse(big.as_bytes(), &small),
        Err(XmlError::TooLarge { limit: 1000 })
    );
    let deep = format!("{}{}", "<a>".repeat(9), "</a>".repeat(9));
    assert_eq!(
        parse(deep.as_bytes(), &small),
        Err(XmlError::TooDeep { limit: 8 })
    );
    let wide = format!("<a>{}</a>", "<b/>".repeat(25));
    assert_eq!(
        parse(wide.as_bytes(), &small),
        Err(XmlError::TooManyElements { limit: 20 })
    );
    // Deep nesting far beyond the cap fails fast and does not overflow the stack.
    let very_deep = format!("{}{}", "<a>".repeat(200_000), "</a>".repeat(200_000));
    assert_eq!(
        parse(very_deep.as_bytes(), &Limits::default()),
        Err(XmlError::TooDeep { limit: 64 })
    );
}

#[test]
fn malformed_documents_are_typed_errors() {
    for (x, what) in [
        (&b""[..], "empty"),
        (b"   ", "blank"),
        (b"<a>", "truncated"),
        (b"<a><b></a>", "mismatched"),
        (b"<a/><b/>", "two roots"),
        (b"<a/>trailing", "trailing"),
        (b"\xff\xfe<a/>", "not utf-8"),
        (b"<a x:type='q'/>", "unbound prefix"),
        (b"</a>", "unmatched end"),
        (b"text", "no root"),
    ] {
        assert!(parse(x, &Limits::default()).is_err(), "{what}");
    }
}

#[test]
fn xsi_type_is_found_whatever_the_prefix() {
    let x = r#"<r xmlns:XMLSchema-instance="http://www.w3.org/2001/XMLSchema-instance"><val XMLSchema-instance:type="xsd:string" type="HostSystem">h</val><v2 xmlns:q="http://www.w3.org/2001/XMLSchema-instance" q:type="VirtualDisk"/></r>"#;
    let e = parse(x.as_bytes(), &Limits::default()).unwrap();
    let v = e.child("val").unwrap();
    assert_eq!(v.xsi_type.as_deref(), Some("string"));
    assert_eq!(v.type_attr.as_deref(), Some("HostSystem"));
    assert_eq!(
        e.child("v2").unwrap().xsi_type.as_deref(),
        Some("VirtualDisk")
    );
}

// ---- property tests -------------------------------------------------------------

fn arb_tree() -> impl Strategy<Value = Element> {
    let name = prop::sample::select(vec![
        "returnval",
        "objects",
        "obj",
        "propSet",
        "name",
        "val",
        "key",
        "backing",
        "fileName",
        "keyId",
        "providerId",
        "id",
        "changeId",
        "capacityInKB",
        "capacityInBytes",
        "deviceInfo",
        "label",
        "snapshot",
        "rootSnapshotList",
        "childSnapshotList",
        "state",
        "error",
        "fault",
        "result",
        "startOffset",
        "length",
        "changedArea",
        "start",
        "token",
        "missingSet",
        "path",
        "VirtualDevice",
        "controllerKey",
        "unitNumber",
    ]);
    let leaf = (
        name.clone(),
        "[ -~]{0,12}",
        prop::option::of("[A-Za-z]{1,10}"),
        prop::option::of("[A-Za-z]{1,10}"),
    )
        .prop_map(|(n, t, x, ty)| Element {
            name: n.to_string(),
            xsi_type: x,
            type_attr: ty,
            text: t,
            children: vec![],
        });
    leaf.prop_recursive(6, 200, 8, move |inner| {
        (
            name.clone(),
            prop::option::of("[A-Za-z]{1,10}"),
            prop::option::of("[A-Za-z]{1,10}"),
            prop::collection::vec(inner, 1..8),
        )
            .prop_map(|(n, x, ty, c)| Element {
                name: n.to_string(),
                xsi_type: x,
                type_attr: ty,
                text: String::new(),
                children: c,
            })
    })
}

fn write_tree(e: &Element, out: &mut String) {
    out.push('<');
    out.push_str(&e.name);
    if let Some(x) = &e.xsi_type {
        out.push_str(&format!(" xsi:type=\"{}\"", super::soap::escape(x)));
    }
    if let Some(t) = &e.type_attr {
        out.push_str(&format!(" type=\"{}\"", super::soap::escape(t)));
    }
    out.push('>');
    out.push_str(&super::soap::escape(&e.text));
    for c in &e.children {
        write_tree(c, out);
    }
    out.push_str("</");
    out.push_str(&e.name);
    out.push('>');
}

fn document(e: &Element) -> String {
    let mut s = String::from("<Envelope xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><Body><RetrievePropertiesExResponse>");
    write_tree(e, &mut s);
    s.push_str("</RetrievePropertiesExResponse></Body></Envelope>");
    s
}

/// Run every decoder over `e` and its descendants; they may refuse, never panic.
fn decode_everything(e: &Element) {
    let _ = decode_result(e);
    let _ = MoRef::decode(e);
    let _ = ServiceContent::decode(e);
    let _ = CryptoKeyId::decode(e);
    let _ = decode_devices(e);
    let _ = decode_snapshot_info(e);
    let _ = TaskInfo::decode(e);
    let _ = DiskChangeInfo::decode(e);
    let _ = NbdTicket::decode(e);
    if let Ok(oc) = ObjectContent::decode(e) {
        let _ = Vm::decode(&oc);
        let _ = Host::decode(&oc);
        let _ = Cluster::decode(&oc);
        let _ = Datastore::decode(&oc);
    }
    for c in &e.children {
        decode_everything(c);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = parse(&bytes, &Limits::default());
        let _ = parse_response(&bytes, "RetrievePropertiesEx", &Limits::default());
    }

    #[test]
    fn arbitrary_xmlish_text_never_panics(s in "[<>/a-z&;#x0-9 =\"'!\\[\\]?:-]{0,400}") {
        let _ = parse(s.as_bytes(), &Limits::default());
    }

    #[test]
    fn truncated_samples_are_errors_never_panics(i in 0usize..7, cut in any::<prop::sample::Index>()) {
        let doc = SAMPLES[i].trim_end();
        let at = cut.index(doc.len());
        let truncated = &doc.as_bytes()[..at];
        // A strictly truncated document is never accepted as a complete one.
        prop_assert!(parse(truncated, &Limits::default()).is_err());
    }

    #[test]
    fn mutated_samples_never_panic(i in 0usize..7, edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut doc = SAMPLES[i].as_bytes().to_vec();
        for (at, b) in edits {
            let k = at.index(doc.len());
            doc[k] = b;
        }
        if let Ok(r) = parse_response(&doc, "RetrievePropertiesEx", &Limits::default()) {
            decode_everything(&r);
        }
        if let Ok(e) = parse(&doc, &Limits::default()) {
            decode_everything(&e);
        }
    }

    #[test]
    fn trees_round_trip_and_decoders_never_panic(t in arb_tree()) {
        let doc = document(&t);
        let r = parse_response(doc.as_bytes(), "RetrievePropertiesEx", &Limits::default()).unwrap();
        let mut want = t.clone();
        fn normalise(e: &mut Element) {
            if !e.children.is_empty() { e.text.clear(); }
            for c in &mut e.children { normalise(c); }
        }
        normalise(&mut want);
        prop_assert_eq!(&r.children[0], &want);
        decode_everything(&r);
    }
}
