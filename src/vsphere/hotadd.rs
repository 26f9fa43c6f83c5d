//! HotAdd through vCenter: attach an existing snapshot disk to ferry's proxy VM
//! (`ReconfigVM_Task`, device add, **no** `fileOperation`: the file exists,
//! `independent_nonpersistent`: nothing is written into it) and detach it again
//! (device remove, **never** `fileOperation = destroy`). Restores attach the new
//! disk they created writable instead (`independent_persistent`). Slot choice (a
//! free unit on a SCSI controller of the proxy) is pure and serialised per client.
//! A refusal because the proxy is encrypted under another key provider is
//! [`VsphereError::Crypto`].

use super::client::{Client, Replay};
use super::error::{from_fault, VsphereError};
use super::soap::{self, Body};
use super::types::{free_scsi_slot, MoRef, VirtualDisk, Vm};
use serde::Serialize;

/// A snapshot disk attached to the proxy VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttachedDisk {
    /// The proxy VM.
    pub proxy: MoRef,
    /// Device key on the proxy.
    pub key: i32,
    /// Controller key on the proxy.
    pub controller_key: i32,
    /// Unit number on that controller.
    pub unit_number: i32,
    /// The attached file (the snapshot's disk).
    pub file_name: String,
    /// Capacity in bytes.
    pub capacity_bytes: u64,
    /// Backing uuid as the proxy sees it (the HotAdd device name, dashes removed and
    /// lower-cased, appears under the proxy's `/dev/disk/by-id`).
    pub uuid: Option<String>,
    /// Attached writable (`independent_persistent`, a restore's new disk) rather
    /// than read-only (`independent_nonpersistent`, a snapshot's disk).
    pub writable: bool,
}

/// Disk mode of a read-only HotAdd (snapshot disks for backups).
pub const READ_ONLY_MODE: &str = "independent_nonpersistent";
/// Disk mode of a writable HotAdd (a restore's new disk).
pub const WRITABLE_MODE: &str = "independent_persistent";

impl AttachedDisk {
    /// The name the disk gets under the proxy's device directory: the backing uuid
    /// without dashes or spaces, lower case.
    pub fn device_name(&self) -> Option<String> {
        self.uuid.as_ref().map(|u| {
            u.chars()
                .filter(|c| c.is_ascii_hexdigit())
                .collect::<String>()
                .to_ascii_lowercase()
        })
    }
}

fn write_disk(
    b: &mut Body,
    key: i32,
    controller_key: i32,
    unit: i32,
    capacity: u64,
    file_name: &str,
    mode: &str,
) {
    // VirtualDevice then VirtualDisk fields, WSDL order.
    b.open_typed("device", "VirtualDisk").leaf("key", key);
    b.open_typed("backing", "VirtualDiskFlatVer2BackingInfo")
        .leaf("fileName", file_name)
        .leaf("diskMode", mode)
        .close("backing");
    b.leaf("controllerKey", controller_key)
        .leaf("unitNumber", unit)
        .leaf("capacityInKB", capacity / 1024)
        .leaf("capacityInBytes", capacity)
        .close("device");
}

/// The `deviceChange` entry adding `file_name` at (controller, unit).
pub fn add_disk_change(
    b: &mut Body,
    controller_key: i32,
    unit: i32,
    capacity: u64,
    file_name: &str,
) {
    add_disk_change_mode(b, controller_key, unit, capacity, file_name, READ_ONLY_MODE);
}

/// [`add_disk_change`] with disk mode `mode` ([`READ_ONLY_MODE`] or
/// [`WRITABLE_MODE`]).
pub fn add_disk_change_mode(
    b: &mut Body,
    controller_key: i32,
    unit: i32,
    capacity: u64,
    file_name: &str,
    mode: &str,
) {
    b.open_typed("deviceChange", "VirtualDeviceConfigSpec")
        .leaf("operation", "add");
    write_disk(b, -100, controller_key, unit, capacity, file_name, mode);
    b.close("deviceChange");
}

/// The `deviceChange` entry removing the attached disk (the file stays).
pub fn remove_disk_change(b: &mut Body, d: &AttachedDisk) {
    b.open_typed("deviceChange", "VirtualDeviceConfigSpec")
        .leaf("operation", "remove");
    write_disk(
        b,
        d.key,
        d.controller_key,
        d.unit_number,
        d.capacity_bytes,
        &d.file_name,
        if d.writable {
            WRITABLE_MODE
        } else {
            READ_ONLY_MODE
        },
    );
    b.close("deviceChange");
}

impl Client {
    /// `ReconfigVM_Task` on `vm` with a `VirtualMachineConfigSpec` whose fields
    /// `spec` writes, then wait for the task.
    pub async fn reconfigure(
        &self,
        vm: &MoRef,
        doing: &str,
        spec: impl FnOnce(&mut Body),
    ) -> Result<(), VsphereError> {
        let body = soap::envelope("ReconfigVM_Task", vm, |b| {
            b.open("spec");
            spec(b);
            b.close("spec");
        });
        let resp = self
            .invoke("ReconfigVM_Task", &body, Replay::Unsafe, doing)
            .await?
            .map_err(|f| from_fault(&f, &self.ctx(doing)))?;
        let task = self.task_ref(&resp, doing)?;
        self.wait_task(&task, doing).await?;
        Ok(())
    }

    /// Attach `disk` (a disk of a snapshot, from [`Client::snapshot_disks`]) to the
    /// proxy VM `proxy`, read-only for the source (independent-nonpersistent).
    pub async fn attach_disk(
        &self,
        proxy: &MoRef,
        disk: &VirtualDisk,
    ) -> Result<AttachedDisk, VsphereError> {
        self.attach(proxy, disk, false).await
    }

    /// Attach `disk` (a new disk a restore created on another VM, from
    /// [`Client::create_disk`]) to the proxy VM `proxy` writable
    /// (independent-persistent), so the restore writes it as a local device. The
    /// same key-provider rules apply as for snapshot disks.
    pub async fn attach_disk_for_write(
        &self,
        proxy: &MoRef,
        disk: &VirtualDisk,
    ) -> Result<AttachedDisk, VsphereError> {
        self.attach(proxy, disk, true).await
    }

    async fn attach(
        &self,
        proxy: &MoRef,
        disk: &VirtualDisk,
        writable: bool,
    ) -> Result<AttachedDisk, VsphereError> {
        let lock = self.hotadd_lock(proxy);
        let _serial = lock.lock().await;
        let doing = format!(
            "hot-adding {} to proxy VM {}{}",
            disk.file_name,
            proxy.value,
            if writable { " for writing" } else { "" }
        );
        let mode = if writable {
            WRITABLE_MODE
        } else {
            READ_ONLY_MODE
        };
        let p = self.vm(proxy).await?;
        let (ctrl, unit) =
            free_scsi_slot(&p.devices).ok_or_else(|| VsphereError::InvalidState {
                vcenter: self.url().to_string(),
                doing: doing.clone(),
                fault_type: "NoFreeScsiSlot".into(),
                message: format!(
                    "proxy VM {} has no free unit on its SCSI controllers; add a controller",
                    p.name
                ),
            })?;
        self.reconfigure(proxy, &doing, |b| {
            add_disk_change_mode(b, ctrl, unit, disk.capacity_bytes, &disk.file_name, mode)
        })
        .await?;
        let after = self.vm(proxy).await?;
        let d = find_attached(&after, ctrl, unit, &disk.file_name).ok_or_else(|| {
            self.malformed(
                &doing,
                "ReconfigVM_Task succeeded but the disk is not on the proxy VM",
            )
        })?;
        tracing::info!(proxy = %p.name, file = %disk.file_name, key = d.key, writable, "disk hot-added");
        Ok(AttachedDisk {
            proxy: proxy.clone(),
            key: d.key,
            controller_key: ctrl,
            unit_number: unit,
            file_name: d.file_name.clone(),
            capacity_bytes: d.capacity_bytes,
            uuid: d.uuid.clone(),
            writable,
        })
    }

    /// Detach a disk attached by [`Client::attach_disk`]; the file is kept.
    pub async fn detach_disk(&self, d: &AttachedDisk) -> Result<(), VsphereError> {
        let lock = self.hotadd_lock(&d.proxy);
        let _serial = lock.lock().await;
        let doing = format!(
            "removing hot-added disk {} (key {}) from proxy VM {}",
            d.file_name, d.key, d.proxy.value
        );
        self.reconfigure(&d.proxy, &doing, |b| remove_disk_change(b, d))
            .await?;
        tracing::info!(proxy = %d.proxy.value, file = %d.file_name, "hot-added disk removed");
        Ok(())
    }
}

/// The disk now at (controller, unit) with backing `file_name` on `proxy`.
pub fn find_attached<'a>(
    proxy: &'a Vm,
    ctrl: i32,
    unit: i32,
    file_name: &str,
) -> Option<&'a VirtualDisk> {
    proxy.disks.iter().find(|d| {
        d.controller_key == Some(ctrl) && d.unit_number == Some(unit) && d.file_name == file_name
    })
}

/// Disks ferry hot-added to `proxy` (and that are still there): ferry attaches
/// snapshot disks as `independent_nonpersistent`, which a proxy's own disks never
/// are, and restore disks as `independent_persistent` with a file named
/// `ferry-restore-*`. The orphan sweep detaches these after a crash.
pub fn ferry_attached(proxy: &Vm) -> Vec<AttachedDisk> {
    proxy
        .disks
        .iter()
        .filter(|d| {
            d.disk_mode.as_deref() == Some(READ_ONLY_MODE)
                || (d.disk_mode.as_deref() == Some(WRITABLE_MODE)
                    && super::newdisk::is_restore_disk(&d.file_name))
        })
        .filter_map(|d| {
            Some(AttachedDisk {
                proxy: proxy.moref.clone(),
                key: d.key,
                controller_key: d.controller_key?,
                unit_number: d.unit_number?,
                file_name: d.file_name.clone(),
                capacity_bytes: d.capacity_bytes,
                uuid: d.uuid.clone(),
                writable: d.disk_mode.as_deref() == Some(WRITABLE_MODE),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::xml::{parse, Limits};

    #[test]
    fn add_spec_has_no_file_operation_and_follows_wsdl_order() {
        let body = soap::envelope(
            "ReconfigVM_Task",
            &MoRef::new("VirtualMachine", "vm-9"),
            |b| {
                b.open("spec");
                add_disk_change(b, 1000, 1, 4 << 30, "[ds1] web01/web01-000001.vmdk");
                b.close("spec");
            },
        );
        assert!(!body.contains("fileOperation"));
        let root = parse(body.as_bytes(), &Limits::default()).unwrap();
        let dc = root
            .path(&["Body", "ReconfigVM_Task", "spec", "deviceChange"])
            .unwrap();
        assert_eq!(dc.xsi_type.as_deref(), Some("VirtualDeviceConfigSpec"));
        assert_eq!(dc.child_text("operation"), Some("add"));
        let dev = dc.child("device").unwrap();
        let order: Vec<_> = dev.children.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            order,
            [
                "key",
                "backing",
                "controllerKey",
                "unitNumber",
                "capacityInKB",
                "capacityInBytes"
            ]
        );
        assert_eq!(
            dev.path(&["backing", "diskMode"]).unwrap().text,
            "independent_nonpersistent"
        );
        assert_eq!(
            dev.path(&["backing", "fileName"]).unwrap().text,
            "[ds1] web01/web01-000001.vmdk"
        );
        assert!(dev.child_text("key").unwrap().starts_with('-'));
    }

    #[test]
    fn remove_spec_never_destroys_the_file() {
        let d = AttachedDisk {
            proxy: MoRef::new("VirtualMachine", "vm-9"),
            key: 2001,
            controller_key: 1000,
            unit_number: 1,
            file_name: "[ds1] a.vmdk".into(),
            capacity_bytes: 1 << 20,
            uuid: Some("6000C29a-3b4C".into()),
            writable: false,
        };
        let mut b = Body::default();
        remove_disk_change(&mut b, &d);
        assert!(b.as_str().contains("<operation>remove</operation>"));
        assert!(!b.as_str().contains("fileOperation"));
        assert!(b.as_str().contains("<key>2001</key>"));
        assert_eq!(d.device_name().as_deref(), Some("6000c29a3b4c"));
    }
}
