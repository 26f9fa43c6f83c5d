//! The VM backup job through VDDK: ferry's real loader and bindings drive the
//! mock `libvixDiskLib` (crate `ferry-mock-vddk`) against the mock vCenter. The
//! transport is the selector's, carried by VDDK and confirmed by
//! GetTransportMode; a HotAdd VDDK refuses across key providers is recorded and
//! the job takes the selector's next decision (NBD-SSL) or fails before writing
//! anything; nothing is left on vCenter; points restore bit for bit.

mod common;

use common::vsphere::{self, client, mock_vddk, proxy, request, rt, vddk_calls};
use common::World;
use ferry::job::vm::{self, VmJobError};
use ferry::transport::select::{Mode, Policy};
use ferry_mocks::vcenter::{Latency, VcenterMock};
use std::time::Duration;

fn policy(failover: bool) -> Policy {
    Policy {
        failover_to_network: failover,
        allow_cleartext_nbd: false,
        preferred: None,
    }
}

/// Nothing left on vCenter: no snapshot, no hot-added disk, no open VDDK handle.
fn nothing_left(vc: &VcenterMock) {
    let st = vc.admin().state();
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
    assert_eq!(st.attached_count(), 0, "{st:?}");
    assert_eq!(vc.admin().vddk_open_handles(), 0);
}

/// The modes the mock VDDK was asked for (ConnectEx) and opened disks in (Open).
fn modes_used(calls: &[serde_json::Value]) -> (Vec<String>, Vec<String>) {
    let asked = calls
        .iter()
        .filter(|c| c["fn"] == "VixDiskLib_ConnectEx")
        .map(|c| c["modes"].as_str().unwrap_or("").to_string())
        .collect();
    let opened = calls
        .iter()
        .filter(|c| c["fn"] == "VixDiskLib_Open" && c["result"] == 0)
        .map(|c| c["mode"].as_str().unwrap_or("").to_string())
        .collect();
    (asked, opened)
}

#[test]
fn hotadd_and_nbdssl_through_vddk_carry_exactly_the_selectors_mode() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let (settings, log) = mock_vddk(&vc, w.dir.path(), "proxy-a");
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);

    // tenant-a-web (KMS-A) on proxy-a (KMS-A): HotAdd, through VDDK.
    let mut req = request("px-a-1", "tenant-a-web", policy(true), 0, None);
    req.vddk = Some(settings.clone());
    let out = vsphere::backup(&rt, &c, &me, &w, &req).unwrap();
    assert_eq!(out.disks.len(), 2);
    for d in &out.disks {
        assert_eq!(d.mode, Mode::HotAdd, "{d:?}");
        assert!(d.reason.starts_with("hotadd via px-a"), "{}", d.reason);
        assert!(
            d.reason
                .contains("carried by VDDK 8 (hotadd confirmed by GetTransportMode)"),
            "{}",
            d.reason
        );
    }
    assert!(out.report.disks.iter().all(|r| r.transport == "hotadd"));
    nothing_left(&vc);
    vsphere::restore_matches(&w, &vc, "tenant-a-web", &out);

    // tenant-b-db (KMS-B) cannot be hot-added by proxy-a: NBD-SSL, through VDDK,
    // decided by the selector before the snapshot.
    let mut req = request("px-a-2", "tenant-b-db", policy(true), 0, None);
    req.vddk = Some(settings);
    let out = vsphere::backup(&rt, &c, &me, &w, &req).unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
        assert!(d.reason.contains("hotadd not used"), "{}", d.reason);
    }
    nothing_left(&vc);
    vsphere::restore_matches(&w, &vc, "tenant-b-db", &out);

    // The library was handed exactly one mode per connection, never a list, and
    // opened every disk in it.
    let calls = vddk_calls(&log);
    let (asked, opened) = modes_used(&calls);
    assert_eq!(asked, ["hotadd", "hotadd", "nbdssl"], "{calls:#?}");
    assert_eq!(opened, asked);
    for f in [
        "VixDiskLib_InitEx",
        "VixDiskLib_PrepareForAccess",
        "VixDiskLib_EndAccess",
        "VixDiskLib_GetInfo",
        "VixDiskLib_GetTransportMode",
        "VixDiskLib_Close",
        "VixDiskLib_Disconnect",
    ] {
        assert!(calls.iter().any(|c| c["fn"] == f), "{f} never called");
    }
    assert_eq!(
        calls
            .iter()
            .filter(|c| c["fn"] == "VixDiskLib_InitEx")
            .count(),
        1,
        "InitEx once per process and library"
    );
    // vCenter's own audit: the hot-adds were under the same key provider.
    for a in vc.admin().vddk_audit() {
        if a.op == "hotadd" {
            assert_eq!(a.proxy_key_provider, a.disk_key_provider, "{a:?}");
        }
        assert!(!(a.mode == "nbd" && a.encrypted && a.vix == 0), "{a:?}");
    }
    rt.block_on(c.logout());
}

/// Run a backup of tenant-a-web through VDDK on proxy-a while proxy-a is
/// re-keyed under KMS-B between the selector's decision and the VDDK open
/// (during the snapshot), as when a proxy VM is re-encrypted mid-job.
fn with_proxy_rekeyed_mid_job(
    failover: bool,
) -> (
    World,
    VcenterMock,
    Result<vm::VmBackupOutcome, VmJobError>,
    std::path::PathBuf,
) {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let (settings, log) = mock_vddk(&vc, w.dir.path(), "proxy-a");
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);
    let mut req = request("px-a-9", "tenant-a-web", policy(failover), 0, None);
    req.vddk = Some(settings);
    req.enable_cbt = false;
    vc.admin().set_latency(Latency {
        ms: 600,
        method: Some("CreateSnapshot_Task".into()),
    });
    let admin = vc.admin();
    let rekey = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(250));
        admin.set_key_provider("proxy-a", Some("KMS-B")).unwrap();
    });
    let out = vsphere::backup(&rt, &c, &me, &w, &req);
    rekey.join().unwrap();
    vc.admin().clear_faults();
    rt.block_on(c.logout());
    (w, vc, out, log)
}

#[test]
fn a_hotadd_vddk_refuses_across_key_providers_fails_over_to_nbdssl_when_policy_allows() {
    let (w, vc, out, log) = with_proxy_rekeyed_mid_job(true);
    let out = out.unwrap();
    for d in &out.disks {
        assert_eq!(d.mode, Mode::NbdSsl, "{d:?}");
        assert!(
            d.reason.contains("HotAdd then refused by VDDK")
                && d.reason.contains("failed over to NBD-SSL"),
            "{}",
            d.reason
        );
    }
    assert!(out.report.disks.iter().all(|r| r.transport == "nbdssl"));
    // The library was asked for hotadd, refused it, then asked for nbdssl.
    let (asked, opened) = modes_used(&vddk_calls(&log));
    assert!(
        asked.starts_with(&["hotadd".to_string(), "nbdssl".to_string()]),
        "{asked:?}"
    );
    assert!(opened.iter().all(|m| m == "nbdssl"), "{opened:?}");
    let refused: Vec<_> = vc
        .admin()
        .vddk_audit()
        .into_iter()
        .filter(|a| a.op == "refused")
        .collect();
    assert!(!refused.is_empty());
    assert!(refused.iter().all(|a| a.mode == "hotadd"), "{refused:?}");
    nothing_left(&vc);
    vsphere::restore_matches(&w, &vc, "tenant-a-web", &out);
}

#[test]
fn a_hotadd_vddk_refuses_fails_the_job_before_writing_anything_when_policy_forbids_failover() {
    let (w, vc, out, _log) = with_proxy_rekeyed_mid_job(false);
    let err = out.unwrap_err();
    let text = err.to_string();
    assert!(
        matches!(err, VmJobError::Source { .. }) && text.contains("hotadd"),
        "{text}"
    );
    assert!(
        text.contains("crypto") || text.contains("key provider"),
        "{text}"
    );
    assert!(w.repo().list_points().unwrap().is_empty(), "no point");
    nothing_left(&vc);
}

/// A VDDK directory that cannot serve: missing, only an unsupported version, or
/// a library without VDDK's symbols. Each fails the job with a typed error naming
/// the problem, before any snapshot, leaving nothing.
#[test]
fn a_missing_or_unusable_vddk_fails_before_any_snapshot_with_a_clear_error() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let lib64 = |name: &str| {
        let d = w.path(name);
        std::fs::create_dir_all(d.join("lib64")).unwrap();
        d
    };
    let empty = lib64("no-vddk-here");
    let old = lib64("vddk-6");
    std::fs::copy(
        vsphere::mock_vddk_library(),
        old.join("lib64/libvixDiskLib.so.6"),
    )
    .unwrap();
    let not_vddk = lib64("not-vddk");
    let some_lib = [
        "/lib/x86_64-linux-gnu/libz.so.1",
        "/usr/lib/x86_64-linux-gnu/libz.so.1",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("libz is on every Debian machine");
    std::fs::copy(some_lib, not_vddk.join("lib64/libvixDiskLib.so.8")).unwrap();
    for (dir, want) in [
        (&empty, "not found under"),
        (&old, "unsupported VDDK version 6"),
        (&not_vddk, "VixDiskLib_InitEx"),
    ] {
        let mut req = request("px-a-5", "tenant-a-web", policy(false), 0, None);
        req.vddk = Some(ferry::job::vm::VddkSettings {
            libdir: dir.clone(),
            config_file: None,
            nfc_port: 902,
        });
        let err = vsphere::backup(&rt, &c, &me, &w, &req).unwrap_err();
        assert!(matches!(err, VmJobError::Vddk(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains(&dir.display().to_string()) && text.contains(want),
            "{want}: {text}"
        );
        nothing_left(&vc);
        assert!(w.repo().list_points().unwrap().is_empty());
    }
    rt.block_on(c.logout());
}

#[test]
fn a_session_that_expires_mid_job_is_renewed_and_vddk_joins_the_new_one() {
    let w = World::new();
    let vc = vsphere::vcenter("small");
    let rt = rt();
    let c = rt.block_on(client(&vc));
    let (settings, log) = mock_vddk(&vc, w.dir.path(), "proxy-a");
    let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd]);
    let mut req = request("px-a-6", "tenant-a-web", policy(false), 0, None);
    req.vddk = Some(settings);
    req.enable_cbt = false;
    // vCenter drops every session while the snapshot is being taken; ferry's SOAP
    // client logs in again on its next call, and VDDK is handed the session ferry
    // holds at each open, never a stale cookie (and never the password).
    vc.admin().set_latency(Latency {
        ms: 600,
        method: Some("CreateSnapshot_Task".into()),
    });
    let admin = vc.admin();
    let expire = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(250));
        assert!(admin.expire_sessions() > 0);
    });
    let out = vsphere::backup(&rt, &c, &me, &w, &req);
    expire.join().unwrap();
    vc.admin().clear_faults();
    let out = out.unwrap();
    assert_eq!(c.logins(), 2, "ferry logged in again");
    assert!(out.disks.iter().all(|d| d.mode == Mode::HotAdd));
    let calls = vddk_calls(&log);
    assert!(
        calls
            .iter()
            .filter(|c| c["fn"] == "VixDiskLib_Open")
            .all(|c| c["result"] == 0),
        "{calls:#?}"
    );
    nothing_left(&vc);
    vsphere::restore_matches(&w, &vc, "tenant-a-web", &out);
    rt.block_on(c.logout());
}

/// VDDK may open a disk in another mode than the one asked for (VMware documents
/// a fallback to NBD-SSL when an advanced mode is unavailable): ferry closes such
/// a disk and refuses it, then takes the selector's next decision when the policy
/// allows it, else fails before writing anything. The selector's mode is the only
/// one that ever carries data.
#[test]
fn a_disk_vddk_opens_in_another_mode_is_closed_and_refused() {
    for failover in [true, false] {
        let w = World::new();
        let vc = vsphere::vcenter("small");
        let rt = rt();
        let c = rt.block_on(client(&vc));
        let (settings, log) = mock_vddk(&vc, w.dir.path(), "proxy-a");
        let me = proxy(&vc, "px-a", Some("proxy-a"), &[Mode::HotAdd, Mode::NbdSsl]);
        let mut req = request("px-a-8", "tenant-a-web", policy(failover), 0, None);
        req.vddk = Some(settings);
        req.enable_cbt = false;
        // The first open of Hard disk 1 "falls back" to nbdssl inside VDDK.
        vc.admin().vddk_fault(ferry_mocks::vcenter::VddkFault {
            disk: Some("2000".into()),
            count: 1,
            open_as: Some("nbdssl".into()),
            ..Default::default()
        });
        let out = vsphere::backup(&rt, &c, &me, &w, &req);
        let calls = vddk_calls(&log);
        // The silently re-moded handle was closed right after GetTransportMode.
        let opened: Vec<&serde_json::Value> = calls
            .iter()
            .filter(|c| c["fn"] == "VixDiskLib_Open" && c["result"] == 0)
            .collect();
        assert_eq!(opened[0]["mode"], "nbdssl", "{calls:#?}");
        if failover {
            let out = out.unwrap();
            let d0 = &out.disks[0];
            assert_eq!(d0.mode, Mode::NbdSsl);
            assert!(
                d0.reason.contains("HotAdd then refused by VDDK") && d0.reason.contains("nbdssl"),
                "{}",
                d0.reason
            );
            // The other disk was not affected.
            assert_eq!(out.disks[1].mode, Mode::HotAdd);
            vsphere::restore_matches(&w, &vc, "tenant-a-web", &out);
        } else {
            let text = out.unwrap_err().to_string();
            assert!(text.contains("hotadd") && text.contains("nbdssl"), "{text}");
            assert!(w.repo().list_points().unwrap().is_empty(), "no point");
        }
        nothing_left(&vc);
        rt.block_on(c.logout());
    }
}
