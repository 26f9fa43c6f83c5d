//! The mock vCenter under bad conditions: injected task failures, dropped
//! connections (before and after the work is done), latency, session expiry,
//! malformed SOAP (always a SOAP fault, never a crash), and the admin API's token.

mod vcenter_common;

use ferry_mocks::vcenter::{DropConnections, FailTasks, Latency, VcenterMock, VcenterOptions};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};
use vcenter_common::{el, Soap};

fn start(tweak: impl FnOnce(&mut VcenterOptions)) -> VcenterMock {
    let mut o = VcenterOptions::from_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/small.toml"),
    )
    .unwrap();
    tweak(&mut o);
    VcenterMock::start(o).unwrap()
}

fn vm_id(mock: &VcenterMock, name: &str) -> String {
    mock.admin().state().vm(name).unwrap().moref.clone()
}

fn snapshot_args() -> String {
    el("name", "ferry-x") + &el("memory", "false") + &el("quiesce", "false")
}

#[test]
fn injected_task_failures_and_dropped_connections() {
    let mock = start(|_| {});
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    soap.login();
    let vm = vm_id(&mock, "plain-app");

    a.fail_tasks(FailTasks {
        count: 1,
        method: Some("CreateSnapshot_Task".into()),
        fault: Some("FileLocked".into()),
        message: Some("disk busy (test)".into()),
        entity: None,
    });
    let (ty, msg) = soap
        .task(
            "CreateSnapshot_Task",
            ("VirtualMachine", &vm),
            &snapshot_args(),
        )
        .unwrap_err();
    assert_eq!(
        (ty.as_str(), msg.as_str()),
        ("FileLocked", "disk busy (test)")
    );
    assert_eq!(
        a.state().snapshot_count(),
        0,
        "a failed task changes nothing"
    );
    let s = soap.snapshot(&vm, "ok");
    soap.remove(&s).unwrap();

    // Dropped before processing: the client gets no answer and nothing happened.
    a.drop_connections(DropConnections {
        count: 1,
        method: Some("CreateSnapshot_Task".into()),
        after: false,
    });
    let e = soap
        .call(
            "CreateSnapshot_Task",
            ("VirtualMachine", &vm),
            &snapshot_args(),
        )
        .unwrap_err();
    assert_eq!(e.ty, "transport", "{e:?}");
    assert_eq!(a.state().snapshot_count(), 0);
    // Dropped after processing: no answer, but the snapshot exists (an orphan the
    // client must find by name).
    a.drop_connections(DropConnections {
        count: 1,
        method: Some("CreateSnapshot_Task".into()),
        after: true,
    });
    let e = soap
        .call(
            "CreateSnapshot_Task",
            ("VirtualMachine", &vm),
            &snapshot_args(),
        )
        .unwrap_err();
    assert_eq!(e.ty, "transport");
    let deadline = Instant::now() + Duration::from_secs(30);
    while a.state().snapshot_count() == 0 {
        assert!(
            Instant::now() < deadline,
            "the dropped call's task never ran"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let orphan = a.state().vm("plain-app").unwrap().snapshots[0].clone();
    assert_eq!(orphan.name, "ferry-x");
    // The server is fine and the session still valid.
    soap.remove(&orphan.moref).unwrap();
    assert!(a.state().faults.drop_connections.is_empty());

    // Latency: a lower bound only.
    a.set_latency(Latency {
        ms: 150,
        method: Some("Fetch".into()),
    });
    let t = Instant::now();
    soap.fetch(("VirtualMachine", &vm), "name").unwrap();
    assert!(t.elapsed() >= Duration::from_millis(150));
    a.set_task_delay(200);
    let t = Instant::now();
    let s = soap.snapshot(&vm, "slow");
    assert!(t.elapsed() >= Duration::from_millis(200));
    a.clear_faults();
    soap.remove(&s).unwrap();
    assert_eq!(a.state().faults, Default::default());
}

#[test]
fn sessions_expire_and_calls_need_one() {
    let mock = start(|o| o.session_idle = Duration::from_millis(400));
    let a = mock.admin();
    let mut soap = Soap::new(&mock);
    let vm = vm_id(&mock, "plain-app");
    // Without a session only the service content and Login work.
    soap.call(
        "RetrieveServiceContent",
        ("ServiceInstance", "ServiceInstance"),
        "",
    )
    .unwrap();
    assert_eq!(
        soap.fetch(("VirtualMachine", &vm), "name").unwrap_err().ty,
        "NotAuthenticated"
    );
    let e = soap
        .call(
            "Login",
            ("SessionManager", "SessionManager"),
            &(el("userName", "administrator@vsphere.local") + &el("password", "nope")),
        )
        .unwrap_err();
    assert_eq!(e.ty, "InvalidLogin");
    soap.login();
    soap.fetch(("VirtualMachine", &vm), "name").unwrap();
    // Expired by the admin.
    assert_eq!(a.expire_sessions(), 1);
    assert_eq!(
        soap.fetch(("VirtualMachine", &vm), "name").unwrap_err().ty,
        "NotAuthenticated"
    );
    soap.login();
    // Expired by idleness (400 ms here).
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        soap.fetch(("VirtualMachine", &vm), "name").unwrap_err().ty,
        "NotAuthenticated"
    );
    soap.login();
    soap.call("Logout", ("SessionManager", "SessionManager"), "")
        .unwrap();
    assert!(a.state().sessions.is_empty());
    // Views and paging tokens live in the session and are reported.
    soap.login();
    let view = soap
        .call(
            "CreateContainerView",
            ("ViewManager", "ViewManager"),
            r#"<container type="Folder">group-d1</container><type>VirtualMachine</type><recursive>true</recursive>"#,
        )
        .unwrap()
        .child("returnval")
        .unwrap()
        .text
        .clone();
    assert_eq!(a.state().sessions[0].views, 1);
    soap.call("DestroyView", ("ContainerView", &view), "")
        .unwrap();
    assert_eq!(a.state().sessions[0].views, 0);
    assert_eq!(
        soap.call("DestroyView", ("ContainerView", &view), "")
            .unwrap_err()
            .ty,
        "ManagedObjectNotFound"
    );
}

#[test]
fn malformed_soap_gets_a_fault_and_the_server_stays_up() {
    let mock = start(|_| {});
    let soap = Soap::new(&mock);
    let valid = br#"<?xml version="1.0"?><soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><RetrieveServiceContent xmlns="urn:vim25"><_this type="ServiceInstance">ServiceInstance</_this></RetrieveServiceContent></soapenv:Body></soapenv:Envelope>"#.to_vec();
    let mut bodies: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"not xml".to_vec(),
        br#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]><Envelope><Body><x>&b;</x></Body></Envelope>"#.to_vec(),
        ("<a>".repeat(5000) + &"</a>".repeat(5000)).into_bytes(),
        br#"<Envelope><Body><Login><_this>SessionManager</_this></Login></Body></Envelope>"#.to_vec(),
        vec![0xff, 0xfe, 0x00, 0x3c],
    ];
    for cut in (0..valid.len()).step_by(7) {
        bodies.push(valid[..cut].to_vec());
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    for _ in 0..40 {
        let mut m = valid.clone();
        for _ in 0..rng.gen_range(1..6) {
            let i = rng.gen_range(0..m.len());
            m[i] = rng.gen();
        }
        bodies.push(m);
    }
    let mut faults = 0;
    for b in bodies {
        let (status, text) = soap.raw(b).unwrap();
        if status == 200 {
            continue; // a mutation that kept the request valid
        }
        assert_eq!(status, 500, "{text}");
        assert!(text.contains("<soapenv:Fault>"), "{text}");
        faults += 1;
    }
    assert!(faults > 40);
    let (status, text) = soap.raw(valid).unwrap();
    assert_eq!(status, 200);
    assert!(text.contains("RetrieveServiceContentResponse"));
    // Unknown methods are MethodNotFound, not a crash.
    let mut s = Soap::new(&mock);
    s.login();
    assert_eq!(
        s.call("MigrateVM_Task", ("VirtualMachine", "vm-1"), "")
            .unwrap_err()
            .ty,
        "MethodNotFound"
    );
}

#[test]
fn admin_api_over_https() {
    let mock = start(|_| {});
    let mut soap = Soap::new(&mock);
    soap.login();
    let (st, body) = soap.admin("state", None, Some("wrong"));
    assert_eq!(st, 401, "{body}");
    let (st, body) = soap.admin("state", None, None);
    assert_eq!(st, 200);
    assert_eq!(body["scenario"], "small");
    assert_eq!(body["vms"].as_array().unwrap().len(), 6);

    let (st, body) = soap.admin(
        "vms/plain-app/disks/2000/write",
        Some(serde_json::json!({"offset": 65536 + 3, "hex": "0102"})),
        None,
    );
    assert_eq!(st, 200, "{body}");
    assert_eq!(body["changed"], serde_json::json!([[65536, 65536]]));
    let mut b = [0u8; 2];
    mock.admin()
        .read("plain-app", "Hard disk 1", None, 65539, &mut b)
        .unwrap();
    assert_eq!(b, [1, 2]);
    let (st, body) = soap.admin(
        "vms/plain-app/disks/2000/write",
        Some(serde_json::json!({"random": {"fraction": 0.01, "seed": 3}})),
        None,
    );
    assert_eq!(st, 200);
    assert_eq!(
        body["changed"].as_array().unwrap().len(),
        3,
        "1% of 256 blocks, rounded up"
    );
    let (st, _) = soap.admin(
        "vms/plain-app/disks/2000/write",
        Some(serde_json::json!({"hex": "abc"})),
        None,
    );
    assert_eq!(st, 400);
    let (st, _) = soap.admin(
        "vms/nope/disks/2000/write",
        Some(serde_json::json!({"fill": 1, "len": 1})),
        None,
    );
    assert_eq!(st, 404);

    // Key provider change shows in vim25.
    let vm = vm_id(&mock, "plain-app");
    let (st, _) = soap.admin(
        "vms/plain-app/key-provider",
        Some(serde_json::json!({"provider": "KMS-B"})),
        None,
    );
    assert_eq!(st, 204);
    let kp = soap
        .fetch(("VirtualMachine", &vm), "config.keyId.providerId.id")
        .unwrap()
        .unwrap();
    assert_eq!(kp.text, "KMS-B");
    let (st, _) = soap.admin(
        "vms/plain-app/key-provider",
        Some(serde_json::json!({"provider": "KMS-Z"})),
        None,
    );
    assert_eq!(st, 400);
    let (st, _) = soap.admin(
        "vms/plain-app/key-provider",
        Some(serde_json::json!({"provider": null})),
        None,
    );
    assert_eq!(st, 204);
    assert!(soap
        .fetch(("VirtualMachine", &vm), "config.keyId")
        .unwrap()
        .is_none());

    // Resize conflicts with a snapshot (409 + fault type), then works.
    let s = soap.snapshot(&vm, "r");
    let (st, body) = soap.admin(
        "vms/plain-app/disks/2000/resize",
        Some(serde_json::json!({"capacity": 32 << 20})),
        None,
    );
    assert_eq!(st, 409);
    assert_eq!(body["fault"], "InvalidState");
    // Digest of the snapshot equals the in-process one.
    let (st, body) = soap.admin(
        &format!("vms/plain-app/disks/2000/digest?snapshot={s}"),
        None,
        None,
    );
    assert_eq!(st, 200);
    let (h, size) = mock.admin().digest("plain-app", "2000", Some(&s)).unwrap();
    assert_eq!(body["blake3"], h.as_str());
    assert_eq!(body["size"], size);
    soap.remove(&s).unwrap();
    let (st, _) = soap.admin(
        "vms/plain-app/disks/2000/resize",
        Some(serde_json::json!({"capacity": 32 << 20})),
        None,
    );
    assert_eq!(st, 204);
    let (st, _) = soap.admin(
        "vms/plain-app/disks/2000/reset-cbt",
        Some(serde_json::json!({})),
        None,
    );
    assert_eq!(st, 400, "CBT is off on plain-app");
    let (st, _) = soap.admin(
        "faults/fail-tasks",
        Some(serde_json::json!({"count": 2, "method": "ReconfigVM_Task"})),
        None,
    );
    assert_eq!(st, 204);
    let (_, body) = soap.admin("state", None, None);
    assert_eq!(body["faults"]["fail_tasks"][0]["count"], 2);
    let (st, _) = soap.admin("faults/clear", Some(serde_json::json!({})), None);
    assert_eq!(st, 204);
    let (st, body) = soap.admin("sessions/expire", Some(serde_json::json!({})), None);
    assert_eq!(st, 200);
    assert_eq!(body["expired"], 1);
}
