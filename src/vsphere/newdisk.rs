//! New virtual disks for restores into a VM: `ReconfigVM_Task` on the target VM with
//! `deviceChange { operation = add, fileOperation = create }` (a thin disk of the
//! restored disk's capacity, at a file name ferry chooses on one of the VM's
//! datastores, on a free SCSI unit), encrypted under the VM's own key when the VM is
//! encrypted; and the removal of such a disk with `fileOperation = destroy` when a
//! restore fails.
//!
//! # Encryption
//! vSphere encrypts a VM's disks under the VM's key encryption key: the disk's
//! `backing.keyId` is normally the VM's `config.keyId` (same key id, same key
//! provider). The new disk asks for exactly that with the device change's backing
//! spec, `backing = VirtualDeviceConfigSpecBackingSpec { crypto = CryptoSpecEncrypt
//! { cryptoKeyId = <the VM's config.keyId> } }`, so the disk lands under the VM's key
//! provider and never under vCenter's default provider. An unencrypted VM gets an
//! unencrypted disk (vSphere refuses encrypted disks on unencrypted VMs).
//!
//! Must not destroy a disk it did not create: [`Client::destroy_disk`] is only for
//! what [`Client::create_disk`] returned. Must not decide where a restore goes (the
//! job does).

use super::client::Client;
use super::error::VsphereError;
use super::soap::Body;
use super::types::{free_scsi_slot, CryptoKeyId, MoRef, VirtualDisk};

/// File names of disks ferry creates for restores start with this (after the
/// folder), so the orphan sweep and operators can tell them apart.
pub const RESTORE_DISK_PREFIX: &str = "ferry-restore-";

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewDiskSpec {
    /// Full datastore path of the new file, `[ds] folder/ferry-restore-….vmdk`.
    pub file_name: String,
    /// The datastore (`backing.datastore`).
    pub datastore: MoRef,
    /// Capacity in bytes (rounded up to whole KiB for `capacityInKB`).
    pub capacity_bytes: u64,
    /// Encrypt under this key (the VM's `config.keyId`); `None`: unencrypted.
    pub encrypt_with: Option<CryptoKeyId>,
    /// Storage policy (SPBM profile id) for the new disk: the device change's
    /// `profile = VirtualMachineDefinedProfileSpec { profileId }`; `None`: the
    /// datastore's default policy.
    pub storage_policy: Option<String>,
}

/// `[ds] folder/ferry-restore-<job>-disk<n>.vmdk` for disk `n` of restore job
/// `job`, next to the VM's own files (`folder` is the VM's folder on `datastore`).
/// Characters other than ASCII letters, digits, `-`, `_` and `.` become `_`.
pub fn restore_file_name(datastore: &str, folder: &str, job: &str, n: u32) -> String {
    format!(
        "[{datastore}] {folder}/{RESTORE_DISK_PREFIX}{}-disk{n}.vmdk",
        file_safe(job)
    )
}

/// `job` with every character a file name should not carry replaced by `_`.
fn file_safe(job: &str) -> String {
    job.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Whether `file_name` (a datastore path) is a disk that the restore job `job`
/// created ([`restore_file_name`] with that job id and any disk number).
pub fn is_restore_disk_of(file_name: &str, job: &str) -> bool {
    let Some(f) = file_name.rsplit('/').next() else {
        return false;
    };
    let head = format!("{RESTORE_DISK_PREFIX}{}-disk", file_safe(job));
    f.strip_prefix(&head)
        .and_then(|r| r.strip_suffix(".vmdk"))
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `(datastore name, folder)` of a datastore path `[ds] folder/file.vmdk`.
pub fn split_datastore_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('[')?;
    let (ds, rest) = rest.split_once(']')?;
    let rest = rest.trim_start();
    let (folder, _) = rest.rsplit_once('/')?;
    (!ds.is_empty() && !folder.is_empty()).then_some((ds, folder))
}

/// Whether `file_name` (a datastore path) is a disk ferry created for a restore.
pub fn is_restore_disk(file_name: &str) -> bool {
    file_name
        .rsplit('/')
        .next()
        .is_some_and(|f| f.starts_with(RESTORE_DISK_PREFIX))
}

/// The `deviceChange` entry creating the disk at (controller, unit); WSDL order.
pub fn create_disk_change(b: &mut Body, controller_key: i32, unit: i32, spec: &NewDiskSpec) {
    b.open_typed("deviceChange", "VirtualDeviceConfigSpec")
        .leaf("operation", "add")
        .leaf("fileOperation", "create");
    b.open_typed("device", "VirtualDisk").leaf("key", -200);
    b.open_typed("backing", "VirtualDiskFlatVer2BackingInfo")
        .leaf("fileName", &spec.file_name)
        .moref("datastore", &spec.datastore)
        .leaf("diskMode", "persistent")
        .leaf("thinProvisioned", true)
        .close("backing");
    b.leaf("controllerKey", controller_key)
        .leaf("unitNumber", unit)
        .leaf("capacityInKB", spec.capacity_bytes.div_ceil(1024))
        .leaf("capacityInBytes", spec.capacity_bytes)
        .close("device");
    // VirtualDeviceConfigSpec order: operation, fileOperation, device, profile,
    // backing.
    if let Some(p) = &spec.storage_policy {
        b.open_typed("profile", "VirtualMachineDefinedProfileSpec")
            .leaf("profileId", p)
            .close("profile");
    }
    if let Some(k) = &spec.encrypt_with {
        b.open_typed("backing", "VirtualDeviceConfigSpecBackingSpec")
            .open_typed("crypto", "CryptoSpecEncrypt")
            .open("cryptoKeyId")
            .leaf("keyId", &k.key_id);
        if let Some(p) = &k.provider_id {
            b.open("providerId").leaf("id", p).close("providerId");
        }
        b.close("cryptoKeyId").close("crypto").close("backing");
    }
    b.close("deviceChange");
}

/// The `deviceChange` entry removing `disk` and destroying its file.
pub fn destroy_disk_change(b: &mut Body, disk: &VirtualDisk) {
    b.open_typed("deviceChange", "VirtualDeviceConfigSpec")
        .leaf("operation", "remove")
        .leaf("fileOperation", "destroy");
    b.open_typed("device", "VirtualDisk").leaf("key", disk.key);
    b.open_typed("backing", "VirtualDiskFlatVer2BackingInfo")
        .leaf("fileName", &disk.file_name)
        .leaf(
            "diskMode",
            disk.disk_mode.as_deref().unwrap_or("persistent"),
        )
        .close("backing");
    if let Some(c) = disk.controller_key {
        b.leaf("controllerKey", c);
    }
    if let Some(u) = disk.unit_number {
        b.leaf("unitNumber", u);
    }
    b.leaf("capacityInKB", disk.capacity_bytes.div_ceil(1024))
        .close("device")
        .close("deviceChange");
}

impl Client {
    /// Create a new disk on `vm` as `spec` says, on the lowest free SCSI unit, and
    /// return it as vCenter reports it afterwards (device key, file name, backing
    /// uuid, key id). Device changes of one VM are serialised per client.
    pub async fn create_disk(
        &self,
        vm: &MoRef,
        spec: &NewDiskSpec,
    ) -> Result<VirtualDisk, VsphereError> {
        let lock = self.hotadd_lock(vm);
        let _serial = lock.lock().await;
        let doing = format!(
            "creating disk {} ({} bytes{}) on VM {}",
            spec.file_name,
            spec.capacity_bytes,
            if spec.encrypt_with.is_some() {
                ", encrypted under the VM's key"
            } else {
                ""
            },
            vm.value
        );
        let v = self.vm(vm).await?;
        let (ctrl, unit) =
            free_scsi_slot(&v.devices).ok_or_else(|| VsphereError::InvalidState {
                vcenter: self.url().to_string(),
                doing: doing.clone(),
                fault_type: "NoFreeScsiSlot".into(),
                message: format!(
                    "VM {} has no free unit on its SCSI controllers; add a controller",
                    v.name
                ),
            })?;
        self.reconfigure(vm, &doing, |b| create_disk_change(b, ctrl, unit, spec))
            .await?;
        let after = self.vm(vm).await?;
        let d = after
            .disks
            .iter()
            .find(|d| {
                d.controller_key == Some(ctrl)
                    && d.unit_number == Some(unit)
                    && !v.disks.iter().any(|o| o.key == d.key)
            })
            .cloned()
            .ok_or_else(|| {
                self.malformed(
                    &doing,
                    "ReconfigVM_Task succeeded but the new disk is not on the VM",
                )
            })?;
        tracing::info!(vm = %v.name, file = %d.file_name, key = d.key, encrypted = d.key_id.is_some(), "disk created for a restore");
        Ok(d)
    }

    /// Remove `disk` (created by [`Client::create_disk`]) from `vm` and destroy its
    /// file.
    pub async fn destroy_disk(&self, vm: &MoRef, disk: &VirtualDisk) -> Result<(), VsphereError> {
        let lock = self.hotadd_lock(vm);
        let _serial = lock.lock().await;
        let doing = format!(
            "removing and destroying disk {} (key {}) of VM {}",
            disk.file_name, disk.key, vm.value
        );
        self.reconfigure(vm, &doing, |b| destroy_disk_change(b, disk))
            .await?;
        tracing::info!(vm = %vm.value, file = %disk.file_name, "restore disk removed and destroyed");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::soap;
    use crate::vsphere::xml::{parse, Limits};

    #[test]
    fn a_jobs_restore_disks_are_told_from_every_other_disk() {
        let mine = restore_file_name("ds-a", "web01", "px-a-7", 0);
        assert!(is_restore_disk_of(&mine, "px-a-7"));
        assert!(is_restore_disk_of(
            &restore_file_name("ds-a", "web01", "px-a-7", 12),
            "px-a-7"
        ));
        assert!(is_restore_disk_of(
            &restore_file_name("ds", "f", "px a/7", 1),
            "px a/7"
        ));
        for other in [
            restore_file_name("ds-a", "web01", "px-a-77", 0),
            restore_file_name("ds-a", "web01", "px-b-7", 0),
            "[ds-a] web01/web01.vmdk".to_string(),
            "[ds-a] web01/ferry-restore-px-a-7-disk.vmdk".to_string(),
            "[ds-a] web01/ferry-restore-px-a-7-disk0-flat.vmdk".to_string(),
            "[ds-a] web01/ferry-restore-px-a-7-diskx.vmdk".to_string(),
        ] {
            assert!(!is_restore_disk_of(&other, "px-a-7"), "{other}");
        }
    }

    fn spec(encrypt: bool) -> NewDiskSpec {
        NewDiskSpec {
            file_name: restore_file_name("ds-a", "web01", "px-a-17", 1),
            datastore: MoRef::new("Datastore", "datastore-12"),
            capacity_bytes: (8 << 30) + 512,
            encrypt_with: encrypt.then(|| CryptoKeyId {
                key_id: "4a1c-key".into(),
                provider_id: Some("KMS-A".into()),
            }),
            storage_policy: None,
        }
    }

    #[test]
    fn create_spec_follows_the_wsdl_and_encrypts_under_the_vms_key() {
        let body = soap::envelope(
            "ReconfigVM_Task",
            &MoRef::new("VirtualMachine", "vm-9"),
            |b| {
                b.open("spec");
                create_disk_change(b, 1000, 3, &spec(true));
                b.close("spec");
            },
        );
        let root = parse(body.as_bytes(), &Limits::default()).unwrap();
        let dc = root
            .path(&["Body", "ReconfigVM_Task", "spec", "deviceChange"])
            .unwrap();
        let order: Vec<_> = dc.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["operation", "fileOperation", "device", "backing"]);
        assert_eq!(dc.child_text("fileOperation"), Some("create"));
        let dev = dc.child("device").unwrap();
        assert_eq!(
            dev.path(&["backing", "fileName"]).unwrap().text,
            "[ds-a] web01/ferry-restore-px-a-17-disk1.vmdk"
        );
        assert_eq!(
            dev.path(&["backing", "diskMode"]).unwrap().text,
            "persistent"
        );
        let border: Vec<_> = dev
            .child("backing")
            .unwrap()
            .children
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            border,
            ["fileName", "datastore", "diskMode", "thinProvisioned"]
        );
        assert_eq!(dev.child_text("capacityInKB"), Some("8388609"));
        assert_eq!(dev.child_text("capacityInBytes"), Some("8589935104"));
        let crypto = dc.path(&["backing", "crypto"]).unwrap();
        assert_eq!(crypto.xsi_type.as_deref(), Some("CryptoSpecEncrypt"));
        assert_eq!(
            crypto.path(&["cryptoKeyId", "keyId"]).unwrap().text,
            "4a1c-key"
        );
        assert_eq!(
            crypto
                .path(&["cryptoKeyId", "providerId", "id"])
                .unwrap()
                .text,
            "KMS-A"
        );
        // Unencrypted VM: no crypto spec at all.
        let mut b = Body::default();
        create_disk_change(&mut b, 1000, 3, &spec(false));
        assert!(!b.as_str().contains("crypto"));
        assert!(
            !b.as_str().contains("profile"),
            "no policy: no profile spec"
        );
    }

    #[test]
    fn a_storage_policy_goes_into_a_defined_profile_spec_before_the_backing_spec() {
        let mut sp = spec(true);
        sp.storage_policy = Some("aa6d5a82-1c88-45da-85d3-3d74b91a5bad".into());
        let body = soap::envelope(
            "ReconfigVM_Task",
            &MoRef::new("VirtualMachine", "vm-9"),
            |b| {
                b.open("spec");
                create_disk_change(b, 1000, 3, &sp);
                b.close("spec");
            },
        );
        let root = parse(body.as_bytes(), &Limits::default()).unwrap();
        let dc = root
            .path(&["Body", "ReconfigVM_Task", "spec", "deviceChange"])
            .unwrap();
        let order: Vec<_> = dc.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            order,
            ["operation", "fileOperation", "device", "profile", "backing"]
        );
        let p = dc.child("profile").unwrap();
        assert_eq!(
            p.xsi_type.as_deref(),
            Some("VirtualMachineDefinedProfileSpec")
        );
        assert_eq!(
            p.child_text("profileId"),
            Some("aa6d5a82-1c88-45da-85d3-3d74b91a5bad")
        );
    }

    #[test]
    fn destroy_spec_names_the_disk_and_destroys_its_file() {
        let d = VirtualDisk {
            key: 2003,
            label: "Hard disk 4".into(),
            controller_key: Some(1000),
            unit_number: Some(3),
            capacity_bytes: 1 << 20,
            backing_type: "VirtualDiskFlatVer2BackingInfo".into(),
            file_name: "[ds-a] web01/ferry-restore-px-a-17-disk1.vmdk".into(),
            datastore: None,
            uuid: None,
            change_id: None,
            disk_mode: Some("persistent".into()),
            key_id: None,
        };
        let mut b = Body::default();
        destroy_disk_change(&mut b, &d);
        let s = b.as_str();
        assert!(s.contains("<operation>remove</operation><fileOperation>destroy</fileOperation>"));
        assert!(s.contains("<key>2003</key>"));
    }

    #[test]
    fn names_and_paths() {
        assert_eq!(
            restore_file_name("ds", "vm 1", "job/../x y", 0),
            "[ds] vm 1/ferry-restore-job_.._x_y-disk0.vmdk"
        );
        assert_eq!(
            split_datastore_path("[ds-a] web01/web01_1.vmdk"),
            Some(("ds-a", "web01"))
        );
        assert_eq!(split_datastore_path("web01.vmdk"), None);
        assert_eq!(split_datastore_path("[ds] x.vmdk"), None);
        assert!(is_restore_disk("[ds] web/ferry-restore-j-disk0.vmdk"));
        assert!(!is_restore_disk("[ds] ferry-restore-x/web.vmdk"));
    }
}
