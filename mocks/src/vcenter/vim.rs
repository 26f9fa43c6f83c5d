//! vim25 shapes: the faults the mock raises and the properties of every managed
//! object it serves (ServiceContent, folders, datacenter, clusters, hosts,
//! datastores, VMs with `config.hardware.device`, snapshots, container views...).
//!
//! Type and field names follow vim25 8.0.3 exactly (checked against pyvmomi's type
//! tables, which reject unknown fields). Pure functions of the inventory; no I/O
//! besides asking disks for their current file names and changeIds.

use super::codec::{Fault, MoRef, Obj, Val};
use super::inventory::{
    CryptoKey, Inventory, Vm, FIRST_DISK_KEY, ROOT_FOLDER, SCSI_CONTROLLER_UNIT, SCSI_KEY,
};
use super::session::Session;

/// The API version served.
pub const API_VERSION: &str = "8.0.3.0";

/// `/sdk/vimServiceVersions.xml`, which pyvmomi reads to pick its API version.
pub fn service_versions_xml() -> String {
    let prior = [
        "8.0.2.0", "8.0.1.0", "8.0.0.2", "8.0.0.1", "8.0.0.0", "7.0.3.0", "7.0.2.0", "7.0.1.0",
        "7.0.0.0", "6.7.3", "6.7.2", "6.7.1", "6.7", "6.5", "6.0", "5.5",
    ];
    let mut s = String::from(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<namespaces version=\"1.0\">\n <namespace>\n  <name>urn:vim25</name>\n",
    );
    s.push_str(&format!(
        "  <version>{API_VERSION}</version>\n  <priorVersions>\n"
    ));
    for p in prior {
        s.push_str(&format!("   <version>{p}</version>\n"));
    }
    s.push_str("  </priorVersions>\n </namespace>\n</namespaces>\n");
    s
}

// ---- faults ---------------------------------------------------------------------

/// `NotAuthenticated`: no session, or it expired.
pub fn not_authenticated() -> Fault {
    Fault::new(
        "NotAuthenticated",
        "The session is not authenticated (log in first, or log in again: the session may have expired).",
    )
}

/// `InvalidLogin`.
pub fn invalid_login() -> Fault {
    Fault::new(
        "InvalidLogin",
        "Cannot complete login due to an incorrect user name or password.",
    )
}

/// `ManagedObjectNotFound`.
pub fn not_found(r: &MoRef) -> Fault {
    Fault::new(
        "ManagedObjectNotFound",
        format!(
            "The object '{}:{}' has already been deleted or has not been completely created",
            r.ty, r.value
        ),
    )
    .f("obj", Val::Ref(r.clone()))
}

/// `InvalidProperty`.
pub fn invalid_property(name: &str) -> Fault {
    Fault::new("InvalidProperty", format!("Invalid property: {name}")).f("name", Val::s(name))
}

/// `InvalidArgument`, optionally naming the argument.
pub fn invalid_argument(prop: Option<&str>, msg: impl Into<String>) -> Fault {
    let f = Fault::new("InvalidArgument", msg);
    match prop {
        Some(p) => f.f("invalidProperty", Val::s(p)),
        None => f,
    }
}

/// `InvalidRequest` (malformed SOAP).
pub fn invalid_request(msg: impl Into<String>) -> Fault {
    Fault::new("InvalidRequest", msg)
}

/// `MethodNotFound`.
pub fn method_not_found(r: &MoRef, method: &str) -> Fault {
    Fault::new(
        "MethodNotFound",
        format!("{}:{} does not implement: {method}", r.ty, r.value),
    )
    .f("receiver", Val::Ref(r.clone()))
    .f("method", Val::s(method))
}

/// `FileFault` (e.g. CBT off, unknown changeId).
pub fn file_fault(file: &str, msg: impl Into<String>) -> Fault {
    Fault::new("FileFault", msg).f("file", Val::s(file))
}

/// `FileLocked`.
pub fn file_locked(file: &str, msg: impl Into<String>) -> Fault {
    Fault::new("FileLocked", msg).f("file", Val::s(file))
}

/// `FileAlreadyExists`.
pub fn file_already_exists(file: &str, msg: impl Into<String>) -> Fault {
    Fault::new("FileAlreadyExists", msg).f("file", Val::s(file))
}

/// `FileNotFound`.
pub fn file_not_found(file: &str, msg: impl Into<String>) -> Fault {
    Fault::new("FileNotFound", msg).f("file", Val::s(file))
}

/// The crypto fault of a refused hot-add: `GenericVmConfigFault` whose reason and
/// message say the key providers differ (seed 004's "Cryptographic Error").
pub fn crypto_fault(msg: impl Into<String>) -> Fault {
    let msg = msg.into();
    Fault::new("GenericVmConfigFault", msg.clone()).f("reason", Val::s(msg))
}

/// `InvalidDatastore`.
pub fn invalid_datastore(id: &str, name: &str, msg: impl Into<String>) -> Fault {
    Fault::new("InvalidDatastore", msg)
        .f("datastore", Val::r("Datastore", id))
        .f("name", Val::s(name))
}

/// `InvalidDeviceSpec` for `deviceChange[index]`.
pub fn invalid_device(index: usize, msg: impl Into<String>) -> Fault {
    Fault::new("InvalidDeviceSpec", msg).f("deviceIndex", Val::Int(index as i32))
}

/// `NotSupported`.
pub fn not_supported(msg: impl Into<String>) -> Fault {
    Fault::new("NotSupported", msg)
}

/// `InvalidPowerState` (the VM is already in, or not in, the power state the
/// operation needs).
pub fn invalid_power_state(existing: &str, msg: impl Into<String>) -> Fault {
    Fault::new("InvalidPowerState", msg).f(
        "existingState",
        Val::Enum("VirtualMachinePowerState", existing.to_string()),
    )
}

/// `InvalidState`.
pub fn invalid_state(msg: impl Into<String>) -> Fault {
    Fault::new("InvalidState", msg)
}

/// `SystemError`.
pub fn system_error(msg: impl Into<String>) -> Fault {
    let msg = msg.into();
    Fault::new("SystemError", msg.clone()).f("reason", Val::s(msg))
}

/// A fault chosen by name for fault injection (unknown names become SystemError).
pub fn injected(kind: &str, msg: &str) -> Fault {
    match kind {
        "FileLocked" => file_locked("[injected]", msg),
        "GenericVmConfigFault" => crypto_fault(msg),
        "InvalidState" => invalid_state(msg),
        "NotAuthenticated" => Fault::new("NotAuthenticated", msg),
        "TaskInProgress" => Fault::new("TaskInProgress", msg),
        "ToolsUnavailable" => Fault::new("ToolsUnavailable", msg),
        "ApplicationQuiesceFault" => Fault::new("ApplicationQuiesceFault", msg),
        "FilesystemQuiesceFault" => Fault::new("FilesystemQuiesceFault", msg),
        _ => system_error(msg),
    }
}

// ---- service objects ------------------------------------------------------------

/// Well-known singleton ids.
pub const PROPERTY_COLLECTOR: &str = "propertyCollector";
/// ViewManager id.
pub const VIEW_MANAGER: &str = "ViewManager";
/// SessionManager id.
pub const SESSION_MANAGER: &str = "SessionManager";
/// TaskManager id.
pub const TASK_MANAGER: &str = "TaskManager";
/// ServiceInstance id.
pub const SERVICE_INSTANCE: &str = "ServiceInstance";

/// `AboutInfo`.
pub fn about(inv: &Inventory) -> Obj {
    Obj::new("AboutInfo")
        .f("name", Val::s("VMware vCenter Server"))
        .f(
            "fullName",
            Val::s("VMware vCenter Server 8.0.3 build-24322831 (ferry mock vCenter)"),
        )
        .f("vendor", Val::s("VMware, Inc."))
        .f("version", Val::s("8.0.3"))
        .f("build", Val::s("24322831"))
        .f("localeVersion", Val::s("INTL"))
        .f("localeBuild", Val::s("000"))
        .f("osType", Val::s("linux-x64"))
        .f("productLineId", Val::s("vpx"))
        .f("apiType", Val::s("VirtualCenter"))
        .f("apiVersion", Val::s(API_VERSION))
        .f("instanceUuid", Val::s(&inv.instance_uuid))
        .f("licenseProductName", Val::s("VMware VirtualCenter Server"))
        .f("licenseProductVersion", Val::s("8.0"))
}

/// `ServiceContent`.
pub fn service_content(inv: &Inventory) -> Obj {
    Obj::new("ServiceContent")
        .f("rootFolder", Val::r("Folder", ROOT_FOLDER))
        .f(
            "propertyCollector",
            Val::r("PropertyCollector", PROPERTY_COLLECTOR),
        )
        .f("viewManager", Val::r("ViewManager", VIEW_MANAGER))
        .f("about", Val::Obj(about(inv)))
        .f("sessionManager", Val::r("SessionManager", SESSION_MANAGER))
        .f("taskManager", Val::r("TaskManager", TASK_MANAGER))
}

// ---- inventory objects ----------------------------------------------------------

fn status() -> Val {
    Val::Enum("ManagedEntityStatus", "green".into())
}

fn strings(items: &[&str]) -> Val {
    Val::Arr("string", items.iter().map(|s| Val::s(*s)).collect())
}

fn crypto(k: &CryptoKey) -> Val {
    Val::Obj(Obj::new("CryptoKeyId").f("keyId", Val::s(&k.key_id)).f(
        "providerId",
        Val::Obj(Obj::new("KeyProviderId").f("id", Val::s(&k.provider))),
    ))
}

/// Properties of a managed object as `(name, value if set)`, every property the
/// mock knows for that type; `None` when the object does not exist.
pub type Props = Vec<(&'static str, Option<Val>)>;

/// Folder properties.
pub fn folder_props(inv: &Inventory, id: &str) -> Option<Props> {
    let dc = &inv.dc;
    let (name, parent, children, child_type): (&str, Option<Val>, Val, Val) = if id == ROOT_FOLDER {
        (
            "Datacenters",
            None,
            Val::refs("Datacenter", [dc.id.clone()]),
            strings(&["Folder", "Datacenter"]),
        )
    } else if id == dc.vm_folder {
        (
            "vm",
            Some(Val::r("Datacenter", &dc.id)),
            Val::refs("VirtualMachine", inv.vms.iter().map(|v| v.id.clone())),
            strings(&["Folder", "VirtualMachine", "VirtualApp"]),
        )
    } else if id == dc.host_folder {
        (
            "host",
            Some(Val::r("Datacenter", &dc.id)),
            Val::refs(
                "ClusterComputeResource",
                inv.clusters.iter().map(|c| c.id.clone()),
            ),
            strings(&["Folder", "ComputeResource"]),
        )
    } else if id == dc.datastore_folder {
        (
            "datastore",
            Some(Val::r("Datacenter", &dc.id)),
            Val::refs("Datastore", inv.datastores.iter().map(|d| d.id.clone())),
            strings(&["Folder", "Datastore", "StoragePod"]),
        )
    } else if id == dc.network_folder {
        (
            "network",
            Some(Val::r("Datacenter", &dc.id)),
            Val::Arr("ManagedObjectReference", Vec::new()),
            strings(&["Folder", "Network"]),
        )
    } else {
        return None;
    };
    Some(vec![
        ("name", Some(Val::s(name))),
        ("parent", parent),
        ("childEntity", Some(children)),
        ("childType", Some(child_type)),
        ("overallStatus", Some(status())),
        ("configStatus", Some(status())),
    ])
}

/// Datacenter properties.
pub fn datacenter_props(inv: &Inventory, id: &str) -> Option<Props> {
    let dc = &inv.dc;
    (id == dc.id).then(|| {
        vec![
            ("name", Some(Val::s(&dc.name))),
            ("parent", Some(Val::r("Folder", ROOT_FOLDER))),
            ("vmFolder", Some(Val::r("Folder", &dc.vm_folder))),
            ("hostFolder", Some(Val::r("Folder", &dc.host_folder))),
            (
                "datastoreFolder",
                Some(Val::r("Folder", &dc.datastore_folder)),
            ),
            ("networkFolder", Some(Val::r("Folder", &dc.network_folder))),
            (
                "datastore",
                Some(Val::refs(
                    "Datastore",
                    inv.datastores.iter().map(|d| d.id.clone()),
                )),
            ),
            ("overallStatus", Some(status())),
            ("configStatus", Some(status())),
        ]
    })
}

/// Cluster properties.
pub fn cluster_props(inv: &Inventory, id: &str) -> Option<Props> {
    let c = inv.clusters.iter().find(|c| c.id == id)?;
    let mut ds: Vec<usize> = c
        .hosts
        .iter()
        .flat_map(|h| inv.hosts[*h].datastores.iter().copied())
        .collect();
    ds.sort_unstable();
    ds.dedup();
    Some(vec![
        ("name", Some(Val::s(&c.name))),
        ("parent", Some(Val::r("Folder", &inv.dc.host_folder))),
        (
            "host",
            Some(Val::refs(
                "HostSystem",
                c.hosts.iter().map(|h| inv.hosts[*h].id.clone()),
            )),
        ),
        (
            "datastore",
            Some(Val::refs(
                "Datastore",
                ds.iter().map(|d| inv.datastores[*d].id.clone()),
            )),
        ),
        ("overallStatus", Some(status())),
        ("configStatus", Some(status())),
    ])
}

/// Host properties.
pub fn host_props(inv: &Inventory, id: &str) -> Option<Props> {
    let hi = inv.host_index(id)?;
    let h = &inv.hosts[hi];
    Some(vec![
        ("name", Some(Val::s(&h.name))),
        (
            "parent",
            Some(Val::r(
                "ClusterComputeResource",
                &inv.clusters[h.cluster].id,
            )),
        ),
        (
            "datastore",
            Some(Val::refs(
                "Datastore",
                h.datastores.iter().map(|d| inv.datastores[*d].id.clone()),
            )),
        ),
        (
            "vm",
            Some(Val::refs(
                "VirtualMachine",
                inv.vms
                    .iter()
                    .filter(|v| v.host == hi)
                    .map(|v| v.id.clone()),
            )),
        ),
        ("overallStatus", Some(status())),
        ("configStatus", Some(status())),
    ])
}

/// Datastore properties.
pub fn datastore_props(inv: &Inventory, id: &str) -> Option<Props> {
    let di = inv.datastores.iter().position(|d| d.id == id)?;
    let d = &inv.datastores[di];
    let mounts: Vec<Val> = inv
        .hosts
        .iter()
        .filter(|h| h.datastores.contains(&di))
        .map(|h| {
            Val::Obj(
                Obj::new("DatastoreHostMount")
                    .f("key", Val::r("HostSystem", &h.id))
                    .f(
                        "mountInfo",
                        Val::Obj(
                            Obj::new("HostMountInfo")
                                .f("path", Val::s(format!("/vmfs/volumes/{}", d.name)))
                                .f("accessMode", Val::s("readWrite"))
                                .f("mounted", Val::Bool(true))
                                .f("accessible", Val::Bool(true)),
                        ),
                    ),
            )
        })
        .collect();
    let vms = inv
        .vms
        .iter()
        .filter(|v| v.datastore == di || v.disks.iter().any(|x| x.datastore == di))
        .map(|v| v.id.clone());
    let summary = Obj::new("DatastoreSummary")
        .f("datastore", Val::r("Datastore", &d.id))
        .f("name", Val::s(&d.name))
        .f("url", Val::s(format!("ds:///vmfs/volumes/{}/", d.id)))
        .f("capacity", Val::Long(d.capacity as i64))
        .f("freeSpace", Val::Long(d.free_space() as i64))
        .f("accessible", Val::Bool(true))
        .f("multipleHostAccess", Val::Bool(mounts.len() > 1))
        .f("type", Val::s("VMFS"));
    Some(vec![
        ("name", Some(Val::s(&d.name))),
        ("parent", Some(Val::r("Folder", &inv.dc.datastore_folder))),
        ("summary", Some(Val::Obj(summary))),
        ("host", Some(Val::Arr("DatastoreHostMount", mounts))),
        ("vm", Some(Val::refs("VirtualMachine", vms))),
        ("overallStatus", Some(status())),
        ("configStatus", Some(status())),
    ])
}

/// One disk as it appears in `config.hardware.device`.
struct DiskView<'a> {
    key: i32,
    unit: i32,
    label: &'a str,
    capacity: u64,
    file_name: String,
    datastore_id: &'a str,
    mode: &'a str,
    uuid: &'a str,
    change_id: Option<String>,
    crypto: Option<&'a CryptoKey>,
}

fn disk_device(d: &DiskView<'_>) -> Val {
    let backing = Obj::new("VirtualDiskFlatVer2BackingInfo")
        .f("fileName", Val::s(&d.file_name))
        .f("datastore", Val::r("Datastore", d.datastore_id))
        .f("diskMode", Val::s(d.mode))
        .f("split", Val::Bool(false))
        .f("writeThrough", Val::Bool(false))
        .f("thinProvisioned", Val::Bool(true))
        .f("uuid", Val::s(d.uuid))
        .opt("changeId", d.change_id.clone().map(Val::Str))
        .f("digestEnabled", Val::Bool(false))
        .opt("keyId", d.crypto.map(crypto));
    Val::Obj(
        Obj::new("VirtualDisk")
            .f("key", Val::Int(d.key))
            .f(
                "deviceInfo",
                Val::Obj(
                    Obj::new("Description")
                        .f("label", Val::s(d.label))
                        .f("summary", Val::s(format!("{} KB", d.capacity / 1024))),
                ),
            )
            .f("backing", Val::Obj(backing))
            .f("controllerKey", Val::Int(SCSI_KEY))
            .f("unitNumber", Val::Int(d.unit))
            .f("capacityInKB", Val::Long((d.capacity / 1024) as i64))
            .f("capacityInBytes", Val::Long(d.capacity as i64)),
    )
}

fn controller(disk_keys: Vec<i32>) -> Val {
    Val::Obj(
        Obj::new("ParaVirtualSCSIController")
            .f("key", Val::Int(SCSI_KEY))
            .f(
                "deviceInfo",
                Val::Obj(
                    Obj::new("Description")
                        .f("label", Val::s("SCSI controller 0"))
                        .f("summary", Val::s("VMware paravirtual SCSI")),
                ),
            )
            .f("busNumber", Val::Int(0))
            .f(
                "device",
                Val::Arr("int", disk_keys.into_iter().map(Val::Int).collect()),
            )
            .f("hotAddRemove", Val::Bool(true))
            .f(
                "sharedBus",
                Val::Enum("VirtualSCSISharing", "noSharing".into()),
            )
            .f("scsiCtlrUnitNumber", Val::Int(SCSI_CONTROLLER_UNIT)),
    )
}

struct ConfigView<'a> {
    vm: &'a Vm,
    inv: &'a Inventory,
    crypto: Option<&'a CryptoKey>,
    cbt: bool,
    disks: Vec<DiskView<'a>>,
    modified: &'a str,
    change_version: String,
}

fn config_info(c: ConfigView<'_>) -> Val {
    let ds = &c.inv.datastores[c.vm.datastore].name;
    let dir = format!("[{ds}] {}", c.vm.name);
    let mut devices = vec![controller(c.disks.iter().map(|d| d.key).collect())];
    devices.extend(c.disks.iter().map(disk_device));
    Val::Obj(
        Obj::new("VirtualMachineConfigInfo")
            .f("changeVersion", Val::s(c.change_version))
            .f("modified", Val::Time(c.modified.to_string()))
            .f("name", Val::s(&c.vm.name))
            .f("guestFullName", Val::s("Other 5.x or later Linux (64-bit)"))
            .f("version", Val::s("vmx-21"))
            .f("uuid", Val::s(&c.vm.uuid))
            .f("instanceUuid", Val::s(&c.vm.instance_uuid))
            .f("template", Val::Bool(false))
            .f("guestId", Val::s("other5xLinux64Guest"))
            .f("alternateGuestName", Val::s(""))
            .f(
                "files",
                Val::Obj(
                    Obj::new("VirtualMachineFileInfo")
                        .f("vmPathName", Val::s(format!("{dir}/{}.vmx", c.vm.name)))
                        .f("snapshotDirectory", Val::s(&dir))
                        .f("suspendDirectory", Val::s(&dir))
                        .f("logDirectory", Val::s(&dir)),
                ),
            )
            .f("flags", Val::Obj(Obj::new("VirtualMachineFlagInfo")))
            .f(
                "defaultPowerOps",
                Val::Obj(Obj::new("VirtualMachineDefaultPowerOpInfo")),
            )
            .f(
                "hardware",
                Val::Obj(
                    Obj::new("VirtualHardware")
                        .f("numCPU", Val::Int(2))
                        .f("numCoresPerSocket", Val::Int(1))
                        .f("memoryMB", Val::Int(4096))
                        .f("device", Val::Arr("VirtualDevice", devices)),
                ),
            )
            .f("changeTrackingEnabled", Val::Bool(c.cbt))
            .f("firmware", Val::s("efi"))
            .opt("keyId", c.crypto.map(crypto)),
    )
}

fn vm_config(inv: &Inventory, vm: &Vm) -> Val {
    let mut disks: Vec<DiskView<'_>> = vm
        .disks
        .iter()
        .map(|d| DiskView {
            key: d.key,
            unit: d.unit,
            label: &d.label,
            capacity: d.disk.capacity(),
            file_name: d.disk.live_file_name(),
            datastore_id: &inv.datastores[d.datastore].id,
            mode: "persistent",
            uuid: &d.uuid,
            change_id: d.disk.live_change_id(),
            crypto: d.crypto.as_ref(),
        })
        .collect();
    for (i, a) in vm.attached.iter().enumerate() {
        disks.push(DiskView {
            key: a.key,
            unit: a.unit,
            label: HOTADD_LABELS[i.min(HOTADD_LABELS.len() - 1)],
            capacity: a.capacity,
            file_name: a.file_name.clone(),
            datastore_id: &inv.datastores[a.datastore].id,
            mode: if a.writable() {
                super::inventory::WRITABLE_MODE
            } else {
                super::inventory::READ_ONLY_MODE
            },
            uuid: &a.uuid,
            change_id: None,
            crypto: a.crypto.as_ref(),
        });
    }
    config_info(ConfigView {
        vm,
        inv,
        crypto: vm.crypto.as_ref(),
        cbt: vm.cbt,
        disks,
        modified: &vm.modified,
        change_version: vm.change_version.to_string(),
    })
}

const HOTADD_LABELS: [&str; 8] = [
    "Hot-added disk 1",
    "Hot-added disk 2",
    "Hot-added disk 3",
    "Hot-added disk 4",
    "Hot-added disk 5",
    "Hot-added disk 6",
    "Hot-added disk 7",
    "Hot-added disk",
];

fn snapshot_tree(vm: &Vm, from: usize) -> Val {
    let s = &vm.snapshots[from];
    let children = if from + 1 < vm.snapshots.len() {
        vec![snapshot_tree(vm, from + 1)]
    } else {
        Vec::new()
    };
    Val::Obj(
        Obj::new("VirtualMachineSnapshotTree")
            .f("snapshot", Val::r("VirtualMachineSnapshot", &s.id))
            .f("vm", Val::r("VirtualMachine", &vm.id))
            .f("name", Val::s(&s.name))
            .f("description", Val::s(&s.description))
            .f("id", Val::Int(s.num))
            .f("createTime", Val::Time(s.created.clone()))
            .f(
                "state",
                Val::Enum("VirtualMachinePowerState", "poweredOn".into()),
            )
            .f("quiesced", Val::Bool(s.quiesced))
            .f(
                "childSnapshotList",
                Val::Arr("VirtualMachineSnapshotTree", children),
            )
            .f("replaySupported", Val::Bool(false)),
    )
}

/// VirtualMachine properties.
pub fn vm_props(inv: &Inventory, id: &str) -> Option<Props> {
    let vm = &inv.vms[inv.vm_index(id)?];
    let mut ds = vec![vm.datastore];
    ds.extend(vm.disks.iter().map(|d| d.datastore));
    ds.sort_unstable();
    ds.dedup();
    let snapshot = (!vm.snapshots.is_empty()).then(|| {
        Val::Obj(
            Obj::new("VirtualMachineSnapshotInfo")
                .opt(
                    "currentSnapshot",
                    vm.snapshots
                        .last()
                        .map(|s| Val::r("VirtualMachineSnapshot", &s.id)),
                )
                .f(
                    "rootSnapshotList",
                    Val::Arr("VirtualMachineSnapshotTree", vec![snapshot_tree(vm, 0)]),
                ),
        )
    });
    let runtime = Obj::new("VirtualMachineRuntimeInfo")
        .f("host", Val::r("HostSystem", &inv.hosts[vm.host].id))
        .f(
            "connectionState",
            Val::Enum("VirtualMachineConnectionState", "connected".into()),
        )
        .f(
            "powerState",
            Val::Enum("VirtualMachinePowerState", vm.power_state.clone()),
        )
        .f(
            "faultToleranceState",
            Val::Enum("VirtualMachineFaultToleranceState", "notConfigured".into()),
        )
        .f("toolsInstallerMounted", Val::Bool(false))
        .f("numMksConnections", Val::Int(0))
        .f(
            "recordReplayState",
            Val::Enum("VirtualMachineRecordReplayState", "inactive".into()),
        )
        .f("onlineStandby", Val::Bool(false))
        .f("consolidationNeeded", Val::Bool(false))
        .opt(
            "cryptoState",
            vm.crypto.as_ref().map(|_| Val::s("unlocked")),
        );
    Some(vec![
        ("name", Some(Val::s(&vm.name))),
        ("parent", Some(Val::r("Folder", &inv.dc.vm_folder))),
        ("config", Some(vm_config(inv, vm))),
        ("runtime", Some(Val::Obj(runtime))),
        ("guest", Some(vm.guest.guest_info())),
        ("snapshot", snapshot),
        (
            "rootSnapshot",
            Some(Val::refs(
                "VirtualMachineSnapshot",
                vm.snapshots.first().map(|s| s.id.clone()),
            )),
        ),
        (
            "datastore",
            Some(Val::refs(
                "Datastore",
                ds.iter().map(|d| inv.datastores[*d].id.clone()),
            )),
        ),
        ("overallStatus", Some(status())),
        ("configStatus", Some(status())),
    ])
}

/// VirtualMachineSnapshot properties (`config` is the VM's configuration at
/// snapshot time, with the snapshot's frozen disk files and changeIds).
pub fn snapshot_props(inv: &Inventory, id: &str) -> Option<Props> {
    let (vi, si) = inv.snapshot_index(id)?;
    let vm = &inv.vms[vi];
    let s = &vm.snapshots[si];
    let disks: Vec<DiskView<'_>> = s
        .disks
        .iter()
        .map(|d| DiskView {
            key: d.key,
            unit: d.unit,
            label: &d.label,
            capacity: d.disk.snapshot_capacity(d.snap).unwrap_or(0),
            file_name: d.disk.frozen_file_name(d.snap).unwrap_or_default(),
            datastore_id: &inv.datastores[d.datastore].id,
            mode: "persistent",
            uuid: &d.uuid,
            change_id: d.disk.snapshot_change_id(d.snap).ok().flatten(),
            crypto: d.crypto.as_ref(),
        })
        .collect();
    let config = config_info(ConfigView {
        vm,
        inv,
        crypto: s.vm_crypto.as_ref(),
        cbt: s.cbt,
        disks,
        modified: &s.created,
        change_version: format!("snapshot-{}", s.num),
    });
    Some(vec![
        ("config", Some(config)),
        (
            "childSnapshot",
            Some(Val::refs(
                "VirtualMachineSnapshot",
                vm.snapshots.get(si + 1).map(|c| c.id.clone()),
            )),
        ),
        ("vm", Some(Val::r("VirtualMachine", &vm.id))),
    ])
}

/// SessionManager properties for the calling session.
pub fn session_manager_props(session: Option<&Session>) -> Props {
    vec![
        (
            "currentSession",
            session.map(|s| Val::Obj(s.user_session())),
        ),
        ("defaultLocale", Some(Val::s("en"))),
    ]
}

/// The first unused disk key at or above [`FIRST_DISK_KEY`] among `keys`.
pub fn next_disk_key(keys: &[i32]) -> i32 {
    keys.iter()
        .copied()
        .filter(|k| *k >= FIRST_DISK_KEY)
        .max()
        .map_or(FIRST_DISK_KEY, |k| k + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_document_names_our_version_first() {
        let x = service_versions_xml();
        let root = super::super::codec::parse(x.as_bytes()).unwrap();
        let ns = root.child("namespace").unwrap();
        assert_eq!(ns.text_of("version"), Some(API_VERSION));
        assert_eq!(next_disk_key(&[2000, 2003, 1000]), 2004);
        assert_eq!(next_disk_key(&[]), FIRST_DISK_KEY);
    }
}
