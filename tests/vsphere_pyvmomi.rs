//! The mock vCenter answers a restore into a VM the way a real vCenter would, as
//! judged by pyvmomi, VMware's own vim25 binding (from the venv .ci/run creates):
//! tests/pyvmomi/restore_into_vm.py makes the calls ferry makes (power state,
//! datastore summary and mounts, ReconfigVM_Task adding a disk on a chosen
//! datastore under a storage policy and the VM's key, removal with
//! fileOperation=destroy, FileLocked on a hot-add and a write ticket of a locked
//! file, InvalidPowerState) and pyvmomi deserializes every object and fault.

mod common;

use ferry_mocks::vcenter::{Scenario, VcenterMock, VcenterOptions};
use std::path::Path;
use std::process::Command;

const POLICY: &str = "aa6d5a82-1c88-45da-85d3-3d74b91a5bad";

#[test]
fn pyvmomi_drives_a_restore_into_a_vm_against_the_mock_vcenter() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        eprintln!(
            "\n\n*** SKIPPED: {} is missing; .ci/run creates it (python3 -m venv .venv && .venv/bin/pip install pyvmomi). This test MUST run in CI. ***\n",
            python.display()
        );
        return;
    }
    let sc = Scenario::parse(common::vsphere::RESTORE_SCENARIO, Path::new("restore.toml")).unwrap();
    let vc = VcenterMock::start(VcenterOptions::new(sc)).unwrap();
    let admin = vc.admin();
    admin.set_power_state("a-web", "poweredOff").unwrap();
    let st = admin.state();
    let web_disk = &st.vm("a-web").unwrap().disks[0];
    admin.set_file_lock(&web_disk.file_name, Some("host esx-02.lab"));
    let args = serde_json::json!({
        "port": vc.addr().port(),
        "user": vc.user(),
        "password": vc.password(),
        "ca": vc.ca_path(),
        "target": "a-app",
        "powered_off": "a-web",
        "proxy": "proxy-a",
        "datastore": "ds-b",
        "policy": POLICY,
        "locked_file": web_disk.file_name,
        "locked_key": web_disk.key,
    });
    let out = Command::new(&python)
        .arg(root.join("tests/pyvmomi/restore_into_vm.py"))
        .arg(args.to_string())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "pyvmomi script failed:\n{stderr}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    // Reads.
    assert_eq!(r["power"]["a-app"], "poweredOn", "{r:#}");
    assert_eq!(r["power"]["a-web"], "poweredOff", "{r:#}");
    assert_eq!(
        r["host_datastores"],
        serde_json::json!(["ds-a", "ds-b", "ds-shared"])
    );
    let ds = &r["datastore"];
    assert_eq!(ds["name"], "ds-b");
    assert!(ds["free_space"].as_u64().unwrap() > 0 && ds["accessible"] == true);
    assert!(ds["free_space"].as_u64() <= ds["capacity"].as_u64());
    assert_eq!(ds["mounted_on"], serde_json::json!(["esx-01.lab"]));
    assert_eq!(r["vm_key_provider"], "KMS-A");

    // The new disk, where and how it was asked for; the mock recorded the policy.
    assert_eq!(r["create"], "success", "{r:#}");
    let nd = &r["new_disk"];
    assert_eq!(nd["datastore"], "ds-b", "{r:#}");
    assert_eq!(nd["capacity"], 1 << 20);
    assert_eq!(nd["encrypted_under"], "KMS-A");
    // The script then removed it with fileOperation=destroy, as the sweep does.
    assert_eq!(r["destroy"], "success", "{r:#}");
    assert_eq!(r["left"], serde_json::json!([]));

    // FileLocked as pyvmomi types it, naming the file and the holder.
    for which in ["hotadd_locked", "ticket_locked"] {
        let f = &r[which];
        assert_eq!(f["type"], "FileLocked", "{which}: {r:#}");
        assert_eq!(f["file"], web_disk.file_name.as_str(), "{which}");
        assert!(
            f["msg"].as_str().unwrap().contains("esx-02.lab"),
            "{which}: {f}"
        );
    }
    assert_eq!(r["hotadd_locked"]["is_file_locked"], true);

    // Power tasks.
    assert_eq!(r["power_off_again"]["type"], "InvalidPowerState", "{r:#}");
    assert_eq!(r["power_off_again"]["is_invalid_power_state"], true);
    assert_eq!(r["power_on"], "success");
    assert_eq!(r["power_after_on"], "poweredOn");
    assert_eq!(r["power_off"], "success");
    assert_eq!(admin.state().vm("a-web").unwrap().power_state, "poweredOff");

    // Nothing left: no ferry-restore file anywhere, nothing attached.
    let st = admin.state();
    assert_eq!(st.attached_count(), 0, "{st:?}");
    assert!(common::files_under(vc.state_dir())
        .iter()
        .all(|p| !p.to_string_lossy().contains("ferry-restore-")));
}

/// The storage policy pyvmomi sends is recorded on the disk the mock creates.
#[test]
fn pyvmomi_storage_policy_is_recorded_on_the_new_disk() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = root.join(".venv/bin/python");
    if !python.exists() {
        eprintln!(
            "\n\n*** SKIPPED: {} is missing; .ci/run creates it. This test MUST run in CI. ***\n",
            python.display()
        );
        return;
    }
    let sc = Scenario::parse(common::vsphere::RESTORE_SCENARIO, Path::new("restore.toml")).unwrap();
    let vc = VcenterMock::start(VcenterOptions::new(sc)).unwrap();
    let script = format!(
        r#"
import json, ssl, time
from pyVim.connect import SmartConnect, Disconnect
from pyVmomi import vim
si = SmartConnect(host="127.0.0.1", port={port}, user={user:?}, pwd={pwd:?},
                  sslContext=ssl.create_default_context(cafile={ca:?}))
c = si.RetrieveContent()
vm = [v for v in c.viewManager.CreateContainerView(c.rootFolder, [vim.VirtualMachine], True).view if v.name == "a-app"][0]
ch = vim.vm.device.VirtualDeviceSpec(operation="add", fileOperation="create",
    device=vim.vm.device.VirtualDisk(key=-1, controllerKey=1000, capacityInKB=64,
        backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName="[ds-shared]", diskMode="persistent")),
    profile=[vim.vm.DefinedProfileSpec(profileId={policy:?})],
    backing=vim.vm.device.VirtualDeviceSpec.BackingSpec(crypto=vim.encryption.CryptoSpecEncrypt(cryptoKeyId=vm.config.keyId)))
t = vm.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[ch]))
while t.info.state not in ("success", "error"):
    time.sleep(0.05)
print(json.dumps({{"state": str(t.info.state)}}))
Disconnect(si)
"#,
        port = vc.addr().port(),
        user = vc.user(),
        pwd = vc.password(),
        ca = vc.ca_path().display().to_string(),
        policy = POLICY,
    );
    let out = Command::new(&python)
        .arg("-c")
        .arg(script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["state"], "success");
    let st = vc.admin().state();
    let app = st.vm("a-app").unwrap();
    let d = app
        .disks
        .iter()
        .find(|d| d.datastore == "ds-shared")
        .unwrap();
    assert_eq!(d.storage_policy.as_deref(), Some(POLICY));
    assert_eq!(app.disks[0].storage_policy, None);
}
