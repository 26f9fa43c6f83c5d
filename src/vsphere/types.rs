//! Typed vim25 values ferry reads (managed object references, VMs, virtual disks,
//! key ids, snapshots, hosts, clusters, datastores, tasks, changed disk areas, NBD
//! tickets) and their decoders from the parsed XML tree.
//!
//! Pure: decoding never does I/O. Unknown elements are ignored (vCenter adds fields
//! with every release); a known field with an unusable value is a [`DecodeError`]
//! naming it. Numbers are parsed, never used as allocation sizes.

use super::xml::Element;
use serde::Serialize;

/// A decoded field was present but unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {detail}")]
pub struct DecodeError {
    /// The field (vim25 property path or element name).
    pub field: String,
    /// What was wrong with it.
    pub detail: String,
}

fn derr(field: &str, detail: impl Into<String>) -> DecodeError {
    DecodeError {
        field: field.to_string(),
        detail: detail.into(),
    }
}

/// A managed object reference (`<obj type="VirtualMachine">vm-42</obj>`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MoRef {
    /// Managed object type, e.g. `VirtualMachine`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Its id, e.g. `vm-42`.
    pub value: String,
}

impl MoRef {
    /// A reference of type `kind` with id `value`.
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.to_string(),
            value: value.to_string(),
        }
    }

    /// Decode an element carrying a `type` attribute and the id as text.
    pub fn decode(e: &Element) -> Result<MoRef, DecodeError> {
        let kind = e
            .type_attr
            .as_deref()
            .ok_or_else(|| derr(&e.name, "managed object reference without a type attribute"))?;
        let value = e.text.trim();
        if value.is_empty() || kind.is_empty() {
            return Err(derr(&e.name, "empty managed object reference"));
        }
        Ok(MoRef::new(kind, value))
    }
}

impl std::fmt::Display for MoRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

fn text<'a>(e: &'a Element, name: &str) -> Option<&'a str> {
    e.child_text(name).map(str::trim)
}

fn num<T: std::str::FromStr>(e: &Element, name: &str) -> Result<Option<T>, DecodeError> {
    match text(e, name) {
        None => Ok(None),
        Some(s) => s
            .parse::<T>()
            .map(Some)
            .map_err(|_| derr(name, format!("not a number: {:?}", truncate(s)))),
    }
}

fn boolean(e: &Element, name: &str) -> Result<Option<bool>, DecodeError> {
    match text(e, name) {
        None => Ok(None),
        Some(s) => parse_bool(s)
            .map(Some)
            .ok_or_else(|| derr(name, format!("not a boolean: {:?}", truncate(s)))),
    }
}

/// xsd:boolean.
pub fn parse_bool(s: &str) -> Option<bool> {
    match s.trim() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(40).collect()
}

fn moref_opt(e: &Element, name: &str) -> Result<Option<MoRef>, DecodeError> {
    e.child(name).map(MoRef::decode).transpose()
}

/// Decode a list of references: the children of an `ArrayOfManagedObjectReference`
/// value, or repeated elements named `name` inside a data object.
pub fn morefs(e: &Element) -> Result<Vec<MoRef>, DecodeError> {
    e.children.iter().map(MoRef::decode).collect()
}

/// `AboutInfo`, the part ferry reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct About {
    /// e.g. `VMware vCenter Server`.
    pub name: String,
    /// e.g. `VMware vCenter Server 8.0.2 build-22617221`.
    pub full_name: String,
    /// Product version.
    pub version: String,
    /// Build number.
    pub build: String,
    /// `VirtualCenter` or `HostAgent`.
    pub api_type: String,
    /// vim25 API version, used in `SOAPAction`.
    pub api_version: String,
    /// vCenter instance UUID.
    pub instance_uuid: String,
}

/// The `ServiceContent` references ferry uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceContent {
    /// Inventory root folder.
    pub root_folder: MoRef,
    /// The property collector.
    pub property_collector: MoRef,
    /// The view manager (container views).
    pub view_manager: MoRef,
    /// The session manager (login, tickets).
    pub session_manager: MoRef,
    /// Product and API version.
    pub about: About,
}

impl ServiceContent {
    /// Decode `RetrieveServiceContentResponse/returnval`.
    pub fn decode(rv: &Element) -> Result<ServiceContent, DecodeError> {
        let need = |n: &str| -> Result<MoRef, DecodeError> {
            moref_opt(rv, n)?.ok_or_else(|| derr(n, "missing from ServiceContent"))
        };
        let about = rv.child("about");
        let a = |n: &str| {
            about
                .and_then(|x| text(x, n))
                .unwrap_or_default()
                .to_string()
        };
        Ok(ServiceContent {
            root_folder: need("rootFolder")?,
            property_collector: need("propertyCollector")?,
            view_manager: need("viewManager")?,
            session_manager: need("sessionManager")?,
            about: About {
                name: a("name"),
                full_name: a("fullName"),
                version: a("version"),
                build: a("build"),
                api_type: a("apiType"),
                api_version: a("apiVersion"),
                instance_uuid: a("instanceUuid"),
            },
        })
    }
}

/// `CryptoKeyId`: an encryption key and its key provider (vSphere KMS cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct CryptoKeyId {
    /// Key id on the KMS.
    pub key_id: String,
    /// `providerId.id`: the key provider; `None` for a native key provider
    /// reported without one.
    pub provider_id: Option<String>,
}

impl CryptoKeyId {
    /// Decode a `CryptoKeyId` element.
    pub fn decode(e: &Element) -> Result<CryptoKeyId, DecodeError> {
        let key_id = text(e, "keyId").ok_or_else(|| derr("keyId.keyId", "missing"))?;
        Ok(CryptoKeyId {
            key_id: key_id.to_string(),
            provider_id: e
                .child("providerId")
                .and_then(|p| text(p, "id"))
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        })
    }
}

/// A virtual disk of a VM (or of a snapshot's configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualDisk {
    /// Device key, unique within the VM (QueryChangedDiskAreas' `deviceKey`).
    pub key: i32,
    /// `deviceInfo.label`, e.g. `Hard disk 1`.
    pub label: String,
    /// Controller device key.
    pub controller_key: Option<i32>,
    /// Unit number on the controller.
    pub unit_number: Option<i32>,
    /// Capacity in bytes (`capacityInBytes`, else `capacityInKB` × 1024).
    pub capacity_bytes: u64,
    /// Backing type, e.g. `VirtualDiskFlatVer2BackingInfo`.
    pub backing_type: String,
    /// `backing.fileName`, e.g. `[ds1] web01/web01.vmdk` (for a snapshot's
    /// configuration, the delta-chain file frozen at snapshot time).
    pub file_name: String,
    /// `backing.datastore`.
    pub datastore: Option<MoRef>,
    /// `backing.uuid` (HotAdd device name, without dashes).
    pub uuid: Option<String>,
    /// `backing.changeId` (CBT), when change tracking is on.
    pub change_id: Option<String>,
    /// `backing.diskMode`.
    pub disk_mode: Option<String>,
    /// `backing.keyId`: the disk's encryption key, when encrypted.
    pub key_id: Option<CryptoKeyId>,
}

/// Any virtual device, as far as slot assignment needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceSummary {
    /// Device key.
    pub key: i32,
    /// xsi:type, e.g. `ParaVirtualSCSIController`, `VirtualDisk`.
    pub kind: String,
    /// `deviceInfo.label`.
    pub label: String,
    /// Controller it sits on.
    pub controller_key: Option<i32>,
    /// Unit number on that controller.
    pub unit_number: Option<i32>,
    /// Bus number (controllers).
    pub bus_number: Option<i32>,
    /// Unit number the SCSI controller itself occupies (usually 7).
    pub scsi_ctlr_unit: Option<i32>,
}

impl DeviceSummary {
    /// Is this a SCSI controller (HotAdd attaches to SCSI controllers only)?
    pub fn is_scsi_controller(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "ParaVirtualSCSIController"
                | "VirtualLsiLogicController"
                | "VirtualLsiLogicSASController"
                | "VirtualBusLogicController"
                | "VirtualSCSIController"
        )
    }
}

/// Decode the devices of an `ArrayOfVirtualDevice` (or repeated `device` elements):
/// every device summarised, and the virtual disks in full.
pub fn decode_devices(
    list: &Element,
) -> Result<(Vec<DeviceSummary>, Vec<VirtualDisk>), DecodeError> {
    let mut devs = Vec::new();
    let mut disks = Vec::new();
    for d in &list.children {
        let key: i32 = num(d, "key")?.ok_or_else(|| derr("device.key", "missing"))?;
        let label = d
            .path(&["deviceInfo", "label"])
            .map(|l| l.text.trim().to_string())
            .unwrap_or_default();
        let kind = d.type_name().to_string();
        let controller_key = num(d, "controllerKey")?;
        let unit_number = num(d, "unitNumber")?;
        devs.push(DeviceSummary {
            key,
            kind: kind.clone(),
            label: label.clone(),
            controller_key,
            unit_number,
            bus_number: num(d, "busNumber")?,
            scsi_ctlr_unit: num(d, "scsiCtlrUnitNumber")?,
        });
        if kind != "VirtualDisk" {
            continue;
        }
        let capacity_bytes = match num::<i64>(d, "capacityInBytes")? {
            Some(b) if b >= 0 => b as u64,
            Some(_) => return Err(derr("capacityInBytes", "negative")),
            None => match num::<i64>(d, "capacityInKB")? {
                Some(k) if k >= 0 => (k as u64)
                    .checked_mul(1024)
                    .ok_or_else(|| derr("capacityInKB", "too large"))?,
                _ => return Err(derr("capacityInKB", "missing or negative")),
            },
        };
        let b = d.child("backing");
        let bt = |n: &str| {
            b.and_then(|b| text(b, n))
                .filter(|s| !s.is_empty())
                .map(str::to_string)
        };
        disks.push(VirtualDisk {
            key,
            label,
            controller_key,
            unit_number,
            capacity_bytes,
            backing_type: b.map(|b| b.type_name().to_string()).unwrap_or_default(),
            file_name: bt("fileName").unwrap_or_default(),
            datastore: b.map(|b| moref_opt(b, "datastore")).transpose()?.flatten(),
            uuid: bt("uuid"),
            change_id: bt("changeId"),
            disk_mode: bt("diskMode"),
            key_id: b
                .and_then(|b| b.child("keyId"))
                .map(CryptoKeyId::decode)
                .transpose()?,
        });
    }
    Ok((devs, disks))
}

/// A lowest free (controller key, unit number) on a SCSI controller of `devices`,
/// skipping the controller's own unit (7). `None` when every slot is taken.
pub fn free_scsi_slot(devices: &[DeviceSummary]) -> Option<(i32, i32)> {
    let mut ctrls: Vec<&DeviceSummary> =
        devices.iter().filter(|d| d.is_scsi_controller()).collect();
    ctrls.sort_by_key(|c| (c.bus_number.unwrap_or(i32::MAX), c.key));
    for c in ctrls {
        let reserved = c.scsi_ctlr_unit.unwrap_or(7);
        for unit in 0..16 {
            if unit == reserved {
                continue;
            }
            let used = devices
                .iter()
                .any(|d| d.controller_key == Some(c.key) && d.unit_number == Some(unit));
            if !used {
                return Some((c.key, unit));
            }
        }
    }
    None
}

/// One node of a VM's snapshot tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotNode {
    /// The snapshot object.
    pub snapshot: MoRef,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Creation time as vCenter writes it (xsd:dateTime).
    pub create_time: String,
    /// Whether the guest was quiesced.
    pub quiesced: bool,
    /// Child snapshots.
    pub children: Vec<SnapshotNode>,
}

impl SnapshotNode {
    fn decode(e: &Element, depth: usize) -> Result<SnapshotNode, DecodeError> {
        // The XML parser caps depth already; this keeps recursion bounded on its own.
        if depth > 64 {
            return Err(derr("childSnapshotList", "snapshot tree too deep"));
        }
        Ok(SnapshotNode {
            snapshot: moref_opt(e, "snapshot")?
                .ok_or_else(|| derr("snapshot.snapshot", "missing"))?,
            name: text(e, "name").unwrap_or_default().to_string(),
            description: e.child_text("description").unwrap_or_default().to_string(),
            create_time: text(e, "createTime").unwrap_or_default().to_string(),
            quiesced: boolean(e, "quiesced")?.unwrap_or(false),
            children: e
                .children_named("childSnapshotList")
                .map(|c| SnapshotNode::decode(c, depth + 1))
                .collect::<Result<_, _>>()?,
        })
    }
}

/// Decode `VirtualMachineSnapshotInfo` into (root snapshots, current snapshot).
pub fn decode_snapshot_info(
    e: &Element,
) -> Result<(Vec<SnapshotNode>, Option<MoRef>), DecodeError> {
    let roots = e
        .children_named("rootSnapshotList")
        .map(|c| SnapshotNode::decode(c, 0))
        .collect::<Result<_, _>>()?;
    Ok((roots, moref_opt(e, "currentSnapshot")?))
}

/// A virtual machine as ferry needs it for a backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vm {
    /// The VM object.
    pub moref: MoRef,
    /// Display name.
    pub name: String,
    /// `config.instanceUuid`.
    pub instance_uuid: Option<String>,
    /// `config.template`.
    pub template: bool,
    /// `runtime.powerState`: poweredOn, poweredOff, suspended.
    pub power_state: Option<String>,
    /// Virtual disks (`config.hardware.device` of type VirtualDisk).
    pub disks: Vec<VirtualDisk>,
    /// Every device, for HotAdd slot assignment on proxy VMs.
    #[serde(skip)]
    pub devices: Vec<DeviceSummary>,
    /// `config.keyId`: the VM's encryption key, when the VM is encrypted.
    pub key_id: Option<CryptoKeyId>,
    /// `config.changeTrackingEnabled` (CBT); `None` when vCenter does not say.
    pub change_tracking: Option<bool>,
    /// `runtime.host`: the ESXi host running or registering the VM.
    pub host: Option<MoRef>,
    /// `datastore`: datastores the VM uses.
    pub datastores: Vec<MoRef>,
    /// `snapshot.rootSnapshotList`.
    pub snapshots: Vec<SnapshotNode>,
    /// `snapshot.currentSnapshot`.
    pub current_snapshot: Option<MoRef>,
    /// `parent`: the VM's folder (its path comes from [`super::inventory::folder_paths`]).
    pub parent: Option<MoRef>,
}

impl Vm {
    /// Is the VM or any of its disks encrypted?
    pub fn encrypted(&self) -> bool {
        self.key_id.is_some() || self.disks.iter().any(|d| d.key_id.is_some())
    }

    /// The key provider of the VM (`config.keyId.providerId.id`), else of its first
    /// encrypted disk.
    pub fn key_provider(&self) -> Option<&str> {
        self.key_id
            .as_ref()
            .and_then(|k| k.provider_id.as_deref())
            .or_else(|| {
                self.disks
                    .iter()
                    .find_map(|d| d.key_id.as_ref().and_then(|k| k.provider_id.as_deref()))
            })
    }

    /// Every snapshot, depth first.
    pub fn all_snapshots(&self) -> Vec<&SnapshotNode> {
        fn walk<'a>(n: &'a [SnapshotNode], out: &mut Vec<&'a SnapshotNode>) {
            for s in n {
                out.push(s);
                walk(&s.children, out);
            }
        }
        let mut out = Vec::new();
        walk(&self.snapshots, &mut out);
        out
    }

    /// The disk with device key `key`.
    pub fn disk(&self, key: i32) -> Option<&VirtualDisk> {
        self.disks.iter().find(|d| d.key == key)
    }
}

/// Property paths read for every VM (see docs/vsphere.md).
pub const VM_PATHS: &[&str] = &[
    "name",
    "config.instanceUuid",
    "config.template",
    "config.hardware.device",
    "config.keyId",
    "config.changeTrackingEnabled",
    "runtime.host",
    "runtime.powerState",
    "datastore",
    "snapshot",
    "parent",
];

/// Properties of one object as the property collector returned them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectContent {
    /// The object.
    pub obj: MoRef,
    /// `(path, val)` pairs.
    pub props: Vec<(String, Element)>,
    /// `(path, fault type)` of properties that could not be read.
    pub missing: Vec<(String, super::soap::Fault)>,
}

impl ObjectContent {
    /// Decode an `ObjectContent` element.
    pub fn decode(e: &Element) -> Result<ObjectContent, DecodeError> {
        let obj = moref_opt(e, "obj")?.ok_or_else(|| derr("objects.obj", "missing"))?;
        let mut props = Vec::new();
        for p in e.children_named("propSet") {
            let name = text(p, "name").ok_or_else(|| derr("propSet.name", "missing"))?;
            if let Some(v) = p.child("val") {
                props.push((name.to_string(), v.clone()));
            }
        }
        let missing = e
            .children_named("missingSet")
            .map(|m| {
                (
                    text(m, "path").unwrap_or_default().to_string(),
                    m.child("fault")
                        .map(super::soap::Fault::from_localized)
                        .unwrap_or(super::soap::Fault {
                            fault_type: "MethodFault".into(),
                            message: String::new(),
                            detail: None,
                        }),
                )
            })
            .collect();
        Ok(ObjectContent {
            obj,
            props,
            missing,
        })
    }

    /// The value of property `path`.
    pub fn prop(&self, path: &str) -> Option<&Element> {
        self.props.iter().find(|(n, _)| n == path).map(|(_, v)| v)
    }

    fn text(&self, path: &str) -> Option<String> {
        self.prop(path).map(|v| v.text.trim().to_string())
    }

    fn bool(&self, path: &str) -> Result<Option<bool>, DecodeError> {
        match self.prop(path) {
            None => Ok(None),
            Some(v) => parse_bool(&v.text)
                .map(Some)
                .ok_or_else(|| derr(path, "not a boolean")),
        }
    }
}

impl Vm {
    /// Decode a VM from its collected properties ([`VM_PATHS`]).
    pub fn decode(oc: &ObjectContent) -> Result<Vm, DecodeError> {
        let (devices, disks) = match oc.prop("config.hardware.device") {
            Some(v) => decode_devices(v)?,
            None => (Vec::new(), Vec::new()),
        };
        let (snapshots, current_snapshot) = match oc.prop("snapshot") {
            Some(v) => decode_snapshot_info(v)?,
            None => (Vec::new(), None),
        };
        Ok(Vm {
            moref: oc.obj.clone(),
            name: oc.text("name").unwrap_or_default(),
            instance_uuid: oc.text("config.instanceUuid").filter(|s| !s.is_empty()),
            template: oc.bool("config.template")?.unwrap_or(false),
            power_state: oc.text("runtime.powerState"),
            disks,
            devices,
            key_id: oc
                .prop("config.keyId")
                .map(CryptoKeyId::decode)
                .transpose()?,
            change_tracking: oc.bool("config.changeTrackingEnabled")?,
            host: oc.prop("runtime.host").map(MoRef::decode).transpose()?,
            datastores: oc
                .prop("datastore")
                .map(morefs)
                .transpose()?
                .unwrap_or_default(),
            snapshots,
            current_snapshot,
            parent: oc.prop("parent").and_then(|v| MoRef::decode(v).ok()),
        })
    }
}

/// An ESXi host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Host {
    /// The host object.
    pub moref: MoRef,
    /// Name (usually its FQDN).
    pub name: String,
    /// Datastores it mounts.
    pub datastores: Vec<MoRef>,
    /// Its parent (a ClusterComputeResource or ComputeResource).
    pub parent: Option<MoRef>,
}

/// Property paths read for hosts.
pub const HOST_PATHS: &[&str] = &["name", "datastore", "parent"];

impl Host {
    /// Decode from collected properties ([`HOST_PATHS`]).
    pub fn decode(oc: &ObjectContent) -> Result<Host, DecodeError> {
        Ok(Host {
            moref: oc.obj.clone(),
            name: oc.text("name").unwrap_or_default(),
            datastores: oc
                .prop("datastore")
                .map(morefs)
                .transpose()?
                .unwrap_or_default(),
            parent: oc.prop("parent").map(MoRef::decode).transpose()?,
        })
    }
}

/// A cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cluster {
    /// The cluster object.
    pub moref: MoRef,
    /// Name.
    pub name: String,
    /// Its hosts.
    pub hosts: Vec<MoRef>,
    /// Its datastores.
    pub datastores: Vec<MoRef>,
}

/// Property paths read for clusters.
pub const CLUSTER_PATHS: &[&str] = &["name", "host", "datastore"];

impl Cluster {
    /// Decode from collected properties ([`CLUSTER_PATHS`]).
    pub fn decode(oc: &ObjectContent) -> Result<Cluster, DecodeError> {
        Ok(Cluster {
            moref: oc.obj.clone(),
            name: oc.text("name").unwrap_or_default(),
            hosts: oc.prop("host").map(morefs).transpose()?.unwrap_or_default(),
            datastores: oc
                .prop("datastore")
                .map(morefs)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

/// A datastore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Datastore {
    /// The datastore object.
    pub moref: MoRef,
    /// Name (as in `[name] path/file.vmdk`).
    pub name: String,
    /// `summary.capacity`, bytes (when reported).
    pub capacity: Option<u64>,
    /// `summary.freeSpace`, bytes (when reported).
    pub free_space: Option<u64>,
    /// `summary.accessible` (absent: assumed accessible).
    pub accessible: Option<bool>,
}

/// Property paths read for datastores.
pub const DATASTORE_PATHS: &[&str] = &[
    "name",
    "summary.capacity",
    "summary.freeSpace",
    "summary.accessible",
];

impl Datastore {
    /// Decode from collected properties ([`DATASTORE_PATHS`]).
    pub fn decode(oc: &ObjectContent) -> Result<Datastore, DecodeError> {
        let num = |p: &str| oc.text(p).and_then(|v| v.trim().parse::<i64>().ok());
        Ok(Datastore {
            moref: oc.obj.clone(),
            name: oc.text("name").unwrap_or_default(),
            capacity: num("summary.capacity").map(|v| v.max(0) as u64),
            free_space: num("summary.freeSpace").map(|v| v.max(0) as u64),
            accessible: oc.text("summary.accessible").map(|v| v.trim() == "true"),
        })
    }
}

/// `TaskInfo.state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting to run.
    Queued,
    /// Running.
    Running,
    /// Finished successfully.
    Success,
    /// Finished with an error.
    Error,
}

/// The part of `TaskInfo` ferry reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskInfo {
    /// State.
    pub state: TaskState,
    /// `error` when state is error.
    pub error: Option<super::soap::Fault>,
    /// `result`, when it is a managed object reference (CreateSnapshot_Task's
    /// snapshot).
    pub result: Option<MoRef>,
    /// `progress` percent, when reported.
    pub progress: Option<i32>,
}

impl TaskInfo {
    /// Decode a `TaskInfo` element.
    pub fn decode(e: &Element) -> Result<TaskInfo, DecodeError> {
        let state = match text(e, "state") {
            Some("queued") => TaskState::Queued,
            Some("running") => TaskState::Running,
            Some("success") => TaskState::Success,
            Some("error") => TaskState::Error,
            Some(other) => {
                return Err(derr(
                    "info.state",
                    format!("unknown state {:?}", truncate(other)),
                ))
            }
            None => return Err(derr("info.state", "missing")),
        };
        let result = match e.child("result") {
            Some(r) if r.type_attr.is_some() => Some(MoRef::decode(r)?),
            _ => None,
        };
        Ok(TaskInfo {
            state,
            error: e.child("error").map(super::soap::Fault::from_localized),
            result,
            progress: num(e, "progress")?,
        })
    }
}

/// One changed (or allocated) byte range of a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiskArea {
    /// Offset in bytes.
    pub start: u64,
    /// Length in bytes.
    pub length: u64,
}

/// `DiskChangeInfo`: one page of QueryChangedDiskAreas.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskChangeInfo {
    /// Offset the page starts at.
    pub start_offset: u64,
    /// Bytes the page covers (next page starts at `start_offset + length`).
    pub length: u64,
    /// Changed areas inside the page, in order.
    pub changed_area: Vec<DiskArea>,
}

impl DiskChangeInfo {
    /// Decode `QueryChangedDiskAreasResponse/returnval`, checking that every area
    /// lies inside the page and areas are ordered and disjoint.
    pub fn decode(e: &Element) -> Result<DiskChangeInfo, DecodeError> {
        let u = |e: &Element, n: &str| -> Result<u64, DecodeError> {
            num::<i64>(e, n)?
                .filter(|v| *v >= 0)
                .map(|v| v as u64)
                .ok_or_else(|| derr(n, "missing or negative"))
        };
        let start_offset = u(e, "startOffset")?;
        let length = u(e, "length")?;
        let end = start_offset
            .checked_add(length)
            .filter(|e| *e <= i64::MAX as u64)
            .ok_or_else(|| derr("length", "startOffset + length overflows"))?;
        let mut areas = Vec::new();
        let mut prev_end = start_offset;
        for a in e.children_named("changedArea") {
            let start = u(a, "start")?;
            let len = u(a, "length")?;
            let a_end = start
                .checked_add(len)
                .ok_or_else(|| derr("changedArea", "start + length overflows"))?;
            if start < prev_end || a_end > end {
                return Err(derr(
                    "changedArea",
                    format!("area {start}+{len} outside the page {start_offset}+{length} or out of order"),
                ));
            }
            prev_end = a_end;
            if len > 0 {
                areas.push(DiskArea { start, length: len });
            }
        }
        Ok(DiskChangeInfo {
            start_offset,
            length,
            changed_area: areas,
        })
    }
}

/// An NBD ticket for one snapshot disk (see docs/vsphere.md and the contract).
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct NbdTicket {
    /// The NBD export name (opaque; a credential until it expires: never log it).
    pub export_name: String,
    /// Host whose NBD service serves the disk.
    pub host_name: String,
    /// SHA-1 of the NBD server certificate (informational).
    pub ssl_thumbprint: Option<String>,
}

impl std::fmt::Debug for NbdTicket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdTicket")
            .field("export_name", &"<redacted>")
            .field("host_name", &self.host_name)
            .field("ssl_thumbprint", &self.ssl_thumbprint)
            .finish()
    }
}

impl NbdTicket {
    /// Decode `SessionManagerGenericServiceTicket`.
    pub fn decode(e: &Element) -> Result<NbdTicket, DecodeError> {
        Ok(NbdTicket {
            export_name: text(e, "id")
                .filter(|s| !s.is_empty())
                .ok_or_else(|| derr("ticket.id", "missing"))?
                .to_string(),
            host_name: text(e, "hostName").unwrap_or_default().to_string(),
            ssl_thumbprint: text(e, "sslThumbprint")
                .filter(|s| !s.is_empty())
                .map(str::to_string),
        })
    }

    /// `nbds://host:port/export` for ferry's NBD client.
    pub fn nbds_url(&self, port: u16) -> String {
        let host = if self.host_name.contains(':') && !self.host_name.starts_with('[') {
            format!("[{}]", self.host_name)
        } else {
            self.host_name.clone()
        };
        format!("nbds://{host}:{port}/{}", self.export_name)
    }
}
