//! The inventory model: datacenter, clusters, hosts, datastores, key providers, VMs
//! and proxy VMs, their disks, snapshots and hot-added disks, and the vSphere rules
//! that govern changes to them (snapshot create/remove, CBT, hot-add across key
//! providers and datastores, guest writes, key provider changes).
//!
//! Owns the state and the rules; must not speak SOAP or HTTP. Operations return
//! vim25 faults ([`Fault`]) because that is how vSphere reports rule violations.
//! Long file work (consolidation, materialising a hot-add device) is split into
//! phases so callers can run it without holding the inventory lock.

use super::codec::{Fault, MoRef};
use super::disk::{Disk, DiskError, DiskLocation, FileRole, Frozen, ReaderKind};
use super::ids;
use super::scenario::{DiskSpecToml, Scenario};
use super::vim;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The SCSI controller every mock VM has (key, bus 0).
pub const SCSI_KEY: i32 = 1000;
/// First virtual disk device key.
pub const FIRST_DISK_KEY: i32 = 2000;
/// The controller's own unit number (never usable by a disk).
pub const SCSI_CONTROLLER_UNIT: i32 = 7;

/// The root folder's id.
pub const ROOT_FOLDER: &str = "group-d1";

/// A VM or disk encryption key: `CryptoKeyId { keyId, providerId.id }`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CryptoKey {
    /// Key id (a UUID here).
    pub key_id: String,
    /// Key provider id (e.g. `KMS-A`).
    pub provider: String,
}

impl CryptoKey {
    fn new(provider: &str) -> CryptoKey {
        CryptoKey {
            key_id: ids::uuid(),
            provider: provider.to_string(),
        }
    }
}

/// The datacenter and its folders.
#[derive(Debug, Clone)]
pub struct Datacenter {
    /// Moref id.
    pub id: String,
    /// Name.
    pub name: String,
    /// VM folder id.
    pub vm_folder: String,
    /// Host folder id.
    pub host_folder: String,
    /// Datastore folder id.
    pub datastore_folder: String,
    /// Network folder id.
    pub network_folder: String,
}

/// A cluster.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// Moref id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Member hosts (indices).
    pub hosts: Vec<usize>,
}

/// An ESXi host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Moref id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Its cluster (index).
    pub cluster: usize,
    /// Datastores it sees (indices).
    pub datastores: Vec<usize>,
    /// NBD service address handed out in tickets.
    pub address: String,
}

/// A datastore.
#[derive(Debug, Clone)]
pub struct Datastore {
    /// Moref id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Directory on the mock's file system.
    pub dir: PathBuf,
    /// Reported capacity, bytes.
    pub capacity: u64,
}

/// A VM's virtual disk.
#[derive(Debug, Clone)]
pub struct VmDisk {
    /// Device key.
    pub key: i32,
    /// Unit number on the SCSI controller.
    pub unit: i32,
    /// `Hard disk N`.
    pub label: String,
    /// Datastore (index).
    pub datastore: usize,
    /// Disk encryption key, if encrypted.
    pub crypto: Option<CryptoKey>,
    /// Backing UUID (stable for the disk's life).
    pub uuid: String,
    /// The files.
    pub disk: Arc<Disk>,
}

/// A disk as a snapshot recorded it.
#[derive(Debug, Clone)]
pub struct SnapDisk {
    /// Device key.
    pub key: i32,
    /// Unit number.
    pub unit: i32,
    /// Label.
    pub label: String,
    /// Datastore (index).
    pub datastore: usize,
    /// Encryption at snapshot time.
    pub crypto: Option<CryptoKey>,
    /// Backing UUID.
    pub uuid: String,
    /// The disk.
    pub disk: Arc<Disk>,
    /// The disk-level snapshot id.
    pub snap: u64,
}

/// A VM snapshot (linear chain: each is the child of the previous one).
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Moref id (`snapshot-N`).
    pub id: String,
    /// Per-VM number (`VirtualMachineSnapshotTree.id`).
    pub num: i32,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Creation time (xsd:dateTime).
    pub created: String,
    /// Quiesced flag as requested.
    pub quiesced: bool,
    /// VM encryption at snapshot time.
    pub vm_crypto: Option<CryptoKey>,
    /// CBT flag at snapshot time.
    pub cbt: bool,
    /// Disks at snapshot time.
    pub disks: Vec<SnapDisk>,
}

/// A snapshot disk hot-added to this VM.
#[derive(Debug)]
pub struct Attached {
    /// Device key on this VM.
    pub key: i32,
    /// Unit number.
    pub unit: i32,
    /// Datastore path of the frozen file.
    pub file_name: String,
    /// Capacity.
    pub capacity: u64,
    /// Backing UUID (the source disk's).
    pub uuid: String,
    /// Datastore (index).
    pub datastore: usize,
    /// Encryption of the source disk.
    pub crypto: Option<CryptoKey>,
    /// Source VM moref id.
    pub source_vm: String,
    /// Source snapshot moref id.
    pub source_snapshot: String,
    /// Source disk device key.
    pub source_disk_key: i32,
    /// Device directory entry (symlink).
    pub entry: Option<PathBuf>,
    /// Flattened copy behind the entry, when the frozen chain has several layers.
    pub materialized: Option<PathBuf>,
    /// Keeps the snapshot open (blocks its removal) while attached.
    pub frozen: Frozen,
}

/// A virtual machine (workload or proxy).
#[derive(Debug)]
pub struct Vm {
    /// Moref id.
    pub id: String,
    /// Name.
    pub name: String,
    /// BIOS UUID.
    pub uuid: String,
    /// vCenter instance UUID.
    pub instance_uuid: String,
    /// Host (index).
    pub host: usize,
    /// Home datastore (index).
    pub datastore: usize,
    /// A backup proxy of the scenario.
    pub proxy: bool,
    /// Where hot-added disks appear (proxies).
    pub device_dir: Option<PathBuf>,
    /// VM encryption.
    pub crypto: Option<CryptoKey>,
    /// `config.changeTrackingEnabled`.
    pub cbt: bool,
    /// Own disks.
    pub disks: Vec<VmDisk>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<Snapshot>,
    /// Hot-added snapshot disks.
    pub attached: Vec<Attached>,
    /// `config.modified`.
    pub modified: String,
    /// `config.changeVersion` counter.
    pub change_version: u64,
    /// Serialises tasks on this VM, as vSphere does.
    pub op: Arc<Mutex<()>>,
    next_snapshot_num: i32,
}

impl Vm {
    fn touch(&mut self) {
        self.modified = ids::now();
        self.change_version += 1;
    }

    /// The disk with device key `key`.
    pub fn disk(&self, key: i32) -> Option<&VmDisk> {
        self.disks.iter().find(|d| d.key == key)
    }

    /// Disk by key (`"2000"`) or label (`"Hard disk 1"`).
    pub fn disk_by_name(&self, which: &str) -> Option<&VmDisk> {
        match which.parse::<i32>() {
            Ok(k) => self.disk(k),
            Err(_) => self.disks.iter().find(|d| d.label == which),
        }
    }

    fn used_units(&self) -> Vec<i32> {
        self.disks
            .iter()
            .map(|d| d.unit)
            .chain(self.attached.iter().map(|a| a.unit))
            .collect()
    }

    fn used_keys(&self) -> Vec<i32> {
        self.disks
            .iter()
            .map(|d| d.key)
            .chain(self.attached.iter().map(|a| a.key))
            .collect()
    }
}

/// Allocates moref ids (`vm-12`, `domain-c9`, `snapshot-40`...) from one counter.
#[derive(Debug)]
pub struct IdGen(AtomicU64);

impl IdGen {
    /// Next id: `prefix` followed by the number (`"vm-"` gives `vm-12`).
    pub fn next(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.0.fetch_add(1, Ordering::SeqCst))
    }
}

/// Everything vCenter knows about.
#[derive(Debug)]
pub struct Inventory {
    /// Scenario name.
    pub scenario: String,
    /// vCenter instance UUID.
    pub instance_uuid: String,
    /// The datacenter.
    pub dc: Datacenter,
    /// Clusters.
    pub clusters: Vec<Cluster>,
    /// Hosts.
    pub hosts: Vec<Host>,
    /// Datastores.
    pub datastores: Vec<Datastore>,
    /// Key provider ids.
    pub key_providers: Vec<String>,
    /// VMs and proxies (stable indices).
    pub vms: Vec<Vm>,
    /// Where flattened hot-add devices are written.
    hotadd_dir: PathBuf,
    /// Moref id generator.
    pub ids: Arc<IdGen>,
}

/// Failure to build the inventory from a scenario.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A directory or disk file could not be created.
    #[error("{0}")]
    Disk(#[from] DiskError),
    /// A directory could not be created or cleaned.
    #[error("{path}: {source}")]
    Io {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

fn resolve(state_dir: &Path, p: &Option<PathBuf>, default: PathBuf) -> PathBuf {
    match p {
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => state_dir.join(p),
        None => default,
    }
}

fn seed_of(name: &str, idx: usize) -> u64 {
    let h = blake3::hash(format!("{name}#{idx}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().unwrap_or_default())
}

impl Inventory {
    /// Build the world of `sc` under `state_dir` (datastore directories, disk files,
    /// device directories). Disk contents are generated now.
    pub fn build(sc: &Scenario, state_dir: &Path) -> Result<Inventory, BuildError> {
        let mkdir = |p: &Path| {
            std::fs::create_dir_all(p).map_err(|source| BuildError::Io {
                path: p.to_path_buf(),
                source,
            })
        };
        let ids = Arc::new(IdGen(AtomicU64::new(7)));
        let dc = Datacenter {
            id: "datacenter-2".into(),
            name: sc.datacenter.name.clone(),
            vm_folder: "group-v3".into(),
            host_folder: "group-h4".into(),
            datastore_folder: "group-s5".into(),
            network_folder: "group-n6".into(),
        };
        let datastores: Vec<Datastore> = sc
            .datastores
            .iter()
            .map(|d| Datastore {
                id: ids.next("datastore-"),
                name: d.name.clone(),
                dir: resolve(
                    state_dir,
                    &d.dir,
                    state_dir.join("datastores").join(&d.name),
                ),
                capacity: d.capacity_gib << 30,
            })
            .collect();
        for d in &datastores {
            mkdir(&d.dir)?;
        }
        let ds_names: Vec<String> = datastores.iter().map(|d| d.name.clone()).collect();
        let ds_index = |name: &str| ds_names.iter().position(|d| d == name);
        let mut clusters: Vec<Cluster> = sc
            .clusters
            .iter()
            .map(|c| Cluster {
                id: ids.next("domain-c"),
                name: c.name.clone(),
                hosts: Vec::new(),
            })
            .collect();
        let mut hosts = Vec::new();
        for (i, h) in sc.hosts.iter().enumerate() {
            let cluster = sc
                .clusters
                .iter()
                .position(|c| c.name == h.cluster)
                .unwrap_or(0);
            clusters[cluster].hosts.push(i);
            hosts.push(Host {
                id: ids.next("host-"),
                name: h.name.clone(),
                cluster,
                datastores: h.datastores.iter().filter_map(|d| ds_index(d)).collect(),
                address: h.address.clone(),
            });
        }
        // Flattened hot-add devices of an earlier run in the same state directory.
        let hotadd_dir = state_dir.join("hotadd");
        let _ = std::fs::remove_dir_all(&hotadd_dir);
        mkdir(&hotadd_dir)?;
        let mut inv = Inventory {
            scenario: sc.name.clone(),
            instance_uuid: ids::uuid(),
            dc,
            clusters,
            hosts,
            datastores,
            key_providers: sc.key_providers.iter().map(|k| k.id.clone()).collect(),
            vms: Vec::new(),
            hotadd_dir,
            ids,
        };
        let default_proxy_disk = vec![DiskSpecToml {
            size_mib: 16,
            datastore: None,
            encrypted: None,
            content: super::scenario::Content::Empty,
            data_pct: 0,
            seed: None,
        }];
        let entries = sc
            .vms
            .iter()
            .map(|v| {
                (
                    &v.name,
                    &v.host,
                    &v.datastore,
                    &v.key_provider,
                    v.cbt,
                    &v.disks,
                    None,
                )
            })
            .chain(sc.proxies.iter().map(|p| {
                (
                    &p.name,
                    &p.host,
                    &p.datastore,
                    &p.key_provider,
                    false,
                    if p.disks.is_empty() {
                        &default_proxy_disk
                    } else {
                        &p.disks
                    },
                    Some(resolve(
                        state_dir,
                        &p.device_dir,
                        state_dir.join("devices").join(&p.name),
                    )),
                )
            }));
        for (name, host, ds, kp, cbt, disks, device_dir) in entries {
            let host_idx = inv.hosts.iter().position(|h| &h.name == host).unwrap_or(0);
            let home = match ds {
                Some(d) => ds_index(d).unwrap_or(0),
                None => inv.hosts[host_idx].datastores.first().copied().unwrap_or(0),
            };
            let crypto = kp.as_deref().map(CryptoKey::new);
            let mut vm_disks = Vec::new();
            for (i, d) in disks.iter().enumerate() {
                let ds = d.datastore.as_deref().and_then(ds_index).unwrap_or(home);
                let loc = DiskLocation {
                    datastore_dir: inv.datastores[ds].dir.clone(),
                    datastore: inv.datastores[ds].name.clone(),
                    folder: name.clone(),
                    stem: if i == 0 {
                        name.clone()
                    } else {
                        format!("{name}_{i}")
                    },
                };
                let gen = d.generator(seed_of(name, i));
                let disk = Disk::create(loc, d.size_mib << 20, gen.as_ref())?;
                if cbt {
                    disk.enable_cbt();
                }
                let encrypted = d.encrypted.unwrap_or(crypto.is_some());
                vm_disks.push(VmDisk {
                    key: FIRST_DISK_KEY + i as i32,
                    unit: i as i32 + (i as i32 >= SCSI_CONTROLLER_UNIT) as i32,
                    label: format!("Hard disk {}", i + 1),
                    datastore: ds,
                    crypto: match (&crypto, encrypted) {
                        (Some(c), true) => Some(CryptoKey::new(&c.provider)),
                        _ => None,
                    },
                    uuid: ids::disk_uuid(),
                    disk: Arc::new(disk),
                });
            }
            if let Some(dir) = &device_dir {
                mkdir(dir)?;
                clean_stale_entries(dir)?;
            }
            let id = inv.ids.next("vm-");
            inv.vms.push(Vm {
                id,
                name: name.clone(),
                uuid: ids::uuid(),
                instance_uuid: ids::uuid(),
                host: host_idx,
                datastore: home,
                proxy: device_dir.is_some(),
                device_dir,
                crypto,
                cbt,
                disks: vm_disks,
                snapshots: Vec::new(),
                attached: Vec::new(),
                modified: ids::now(),
                change_version: 1,
                op: Arc::new(Mutex::new(())),
                next_snapshot_num: 1,
            });
        }
        Ok(inv)
    }

    /// VM index by moref id.
    pub fn vm_index(&self, id: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.id == id)
    }

    /// VM index by name.
    pub fn vm_by_name(&self, name: &str) -> Option<usize> {
        self.vms.iter().position(|v| v.name == name)
    }

    /// VM index by moref id or name.
    pub fn vm_lookup(&self, which: &str) -> Option<usize> {
        self.vm_index(which).or_else(|| self.vm_by_name(which))
    }

    /// `(vm index, snapshot index)` of snapshot moref id `id`.
    pub fn snapshot_index(&self, id: &str) -> Option<(usize, usize)> {
        self.vms.iter().enumerate().find_map(|(vi, v)| {
            v.snapshots
                .iter()
                .position(|s| s.id == id)
                .map(|si| (vi, si))
        })
    }

    /// Host index by moref id.
    pub fn host_index(&self, id: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.id == id)
    }

    /// Take a snapshot of every disk of VM `vi`. Returns the snapshot's moref id.
    pub fn create_snapshot(
        &mut self,
        vi: usize,
        name: &str,
        description: &str,
        quiesce: bool,
    ) -> Result<String, Fault> {
        let id = self.ids.next("snapshot-");
        let vm = &mut self.vms[vi];
        let mut disks: Vec<SnapDisk> = Vec::new();
        for d in &vm.disks {
            match d.disk.snapshot() {
                Ok(snap) => disks.push(SnapDisk {
                    key: d.key,
                    unit: d.unit,
                    label: d.label.clone(),
                    datastore: d.datastore,
                    crypto: d.crypto.clone(),
                    uuid: d.uuid.clone(),
                    disk: d.disk.clone(),
                    snap,
                }),
                Err(e) => {
                    // Undo the disks already frozen (their deltas are empty).
                    for s in &disks {
                        if s.disk.begin_remove(s.snap).is_ok() {
                            let _ = s.disk.finish_remove(s.snap);
                        }
                    }
                    return Err(disk_fault(e));
                }
            }
        }
        let num = vm.next_snapshot_num;
        vm.next_snapshot_num += 1;
        vm.snapshots.push(Snapshot {
            id: id.clone(),
            num,
            name: name.to_string(),
            description: description.to_string(),
            created: ids::now(),
            quiesced: quiesce,
            vm_crypto: vm.crypto.clone(),
            cbt: vm.cbt,
            disks,
        });
        vm.touch();
        Ok(id)
    }

    /// First phase of RemoveSnapshot: check and lock the snapshots to remove (`id`,
    /// and with `remove_children` every later one). Returns them newest first.
    pub fn begin_remove_snapshot(
        &mut self,
        id: &str,
        remove_children: bool,
    ) -> Result<Vec<(String, Vec<SnapDisk>)>, Fault> {
        let (vi, si) = self
            .snapshot_index(id)
            .ok_or_else(|| vim::not_found(&MoRef::new("VirtualMachineSnapshot", id)))?;
        let vm = &self.vms[vi];
        let last = if remove_children {
            vm.snapshots.len()
        } else {
            si + 1
        };
        let chosen: Vec<(String, Vec<SnapDisk>)> = vm.snapshots[si..last]
            .iter()
            .rev()
            .map(|s| (s.id.clone(), s.disks.clone()))
            .collect();
        let mut begun: Vec<&SnapDisk> = Vec::new();
        for (_, disks) in &chosen {
            for d in disks {
                if let Err(e) = d.disk.begin_remove(d.snap) {
                    for b in begun {
                        b.disk.abort_remove(b.snap);
                    }
                    return Err(disk_fault(e));
                }
                begun.push(d);
            }
        }
        Ok(chosen)
    }

    /// Last phase of RemoveSnapshot: forget snapshot `id` (its disks are consolidated).
    pub fn forget_snapshot(&mut self, id: &str) {
        if let Some((vi, si)) = self.snapshot_index(id) {
            self.vms[vi].snapshots.remove(si);
            self.vms[vi].touch();
        }
    }

    /// Find the snapshot disk behind datastore file `file_name`.
    fn source_of_file(&self, file_name: &str) -> Result<(usize, usize, usize), Fault> {
        for (vi, vm) in self.vms.iter().enumerate() {
            for d in &vm.disks {
                match d.disk.find_file(file_name) {
                    None => continue,
                    Some(FileRole::Live) => {
                        return Err(vim::file_locked(
                            file_name,
                            format!(
                                "Unable to access file {file_name} since it is locked: it is the running disk of VM {}; hot-add a snapshot's disk instead",
                                vm.name
                            ),
                        ))
                    }
                    Some(FileRole::Frozen(snap)) => {
                        let si = vm
                            .snapshots
                            .iter()
                            .position(|s| s.disks.iter().any(|sd| sd.key == d.key && sd.snap == snap));
                        if let Some(si) = si {
                            let sdi = vm.snapshots[si]
                                .disks
                                .iter()
                                .position(|sd| sd.key == d.key)
                                .unwrap_or(0);
                            return Ok((vi, si, sdi));
                        }
                    }
                }
            }
        }
        Err(vim::file_not_found(
            file_name,
            format!("File {file_name} was not found"),
        ))
    }

    /// Check a ReconfigVM spec against vSphere's rules and open what it attaches.
    /// Nothing changes yet; [`Inventory::apply_reconfig`] applies the plan.
    pub fn plan_reconfig(&self, vi: usize, spec: &ReconfigSpec) -> Result<ReconfigPlan, Fault> {
        let vm = &self.vms[vi];
        let mut plan = ReconfigPlan {
            cbt: spec.cbt,
            adds: Vec::new(),
            removes: Vec::new(),
        };
        let mut units = vm.used_units();
        let mut keys = vm.used_keys();
        for (i, ch) in spec.changes.iter().enumerate() {
            match ch {
                DeviceChange::Remove { key } => {
                    if vm.attached.iter().any(|a| a.key == *key) {
                        if plan.removes.contains(key) {
                            return Err(vim::invalid_device(
                                i,
                                format!("device {key} is removed twice"),
                            ));
                        }
                        plan.removes.push(*key);
                    } else if vm.disk(*key).is_some() {
                        return Err(vim::not_supported(format!(
                            "the mock vCenter only removes hot-added disks; device {key} is one of {}'s own disks",
                            vm.name
                        )));
                    } else {
                        return Err(vim::invalid_device(
                            i,
                            format!("The device '{key}' does not exist on VM {}", vm.name),
                        ));
                    }
                }
                DeviceChange::Add(a) => {
                    let (svi, si, sdi) = self.source_of_file(&a.file_name)?;
                    let src_vm = &self.vms[svi];
                    let snap = &src_vm.snapshots[si];
                    let sd = &snap.disks[sdi];
                    if a.disk_mode != "independent_nonpersistent" {
                        return Err(vim::invalid_device(
                            i,
                            format!(
                                "diskMode {:?} would write into snapshot file {}; hot-add it as independent_nonpersistent",
                                a.disk_mode, a.file_name
                            ),
                        ));
                    }
                    let host = &self.hosts[vm.host];
                    if !host.datastores.contains(&sd.datastore) {
                        let ds = &self.datastores[sd.datastore];
                        return Err(vim::invalid_datastore(
                            &ds.id,
                            &ds.name,
                            format!(
                                "Datastore {} is not accessible from host {}, where VM {} runs: cannot add disk {}",
                                ds.name, host.name, vm.name, a.file_name
                            ),
                        ));
                    }
                    if let Some(dk) = &sd.crypto {
                        match &vm.crypto {
                            None => {
                                return Err(vim::crypto_fault(format!(
                                    "Cryptographic error: disk {} is encrypted with key provider {}, but VM {} is not encrypted; an encrypted disk can only be added to a VM encrypted with the same key provider",
                                    a.file_name, dk.provider, vm.name
                                )))
                            }
                            Some(vk) if vk.provider != dk.provider => {
                                return Err(vim::crypto_fault(format!(
                                    "Cryptographic error: the key providers differ: disk {} is encrypted with key provider {}, VM {} with key provider {}",
                                    a.file_name, dk.provider, vm.name, vk.provider
                                )))
                            }
                            Some(_) => {}
                        }
                    }
                    if a.controller_key != SCSI_KEY {
                        return Err(vim::invalid_device(
                            i,
                            format!(
                                "controllerKey {} is not a SCSI controller of VM {} (use {SCSI_KEY})",
                                a.controller_key, vm.name
                            ),
                        ));
                    }
                    let unit = match a.unit {
                        Some(u) => {
                            if !(0..16).contains(&u)
                                || u == SCSI_CONTROLLER_UNIT
                                || units.contains(&u)
                            {
                                return Err(vim::invalid_device(
                                    i,
                                    format!("unit number {u} is not free on controller {SCSI_KEY} of VM {}", vm.name),
                                ));
                            }
                            u
                        }
                        None => (0..16)
                            .find(|u| *u != SCSI_CONTROLLER_UNIT && !units.contains(u))
                            .ok_or_else(|| {
                                vim::invalid_device(
                                    i,
                                    format!(
                                        "no free unit on controller {SCSI_KEY} of VM {}",
                                        vm.name
                                    ),
                                )
                            })?,
                    };
                    units.push(unit);
                    let key = if a.key < 0 {
                        vim::next_disk_key(&keys)
                    } else if keys.contains(&a.key) {
                        return Err(vim::invalid_device(
                            i,
                            format!("device key {} is already used on VM {}", a.key, vm.name),
                        ));
                    } else {
                        a.key
                    };
                    keys.push(key);
                    if vm.attached.iter().any(|x| x.uuid == sd.uuid)
                        || plan.adds.iter().any(|p: &PlannedAdd| p.uuid == sd.uuid)
                    {
                        return Err(vim::invalid_device(
                            i,
                            format!("a disk with uuid {} (another snapshot of the same disk) is already attached to VM {}", sd.uuid, vm.name),
                        ));
                    }
                    if sd.disk.readers(sd.snap, ReaderKind::HotAdd) > 0 {
                        return Err(vim::file_locked(
                            &a.file_name,
                            format!("Unable to access file {} since it is locked: it is attached to another VM", a.file_name),
                        ));
                    }
                    let frozen = sd
                        .disk
                        .open_frozen(sd.snap, ReaderKind::HotAdd)
                        .map_err(disk_fault)?;
                    let entry = vm
                        .device_dir
                        .as_ref()
                        .map(|d| d.join(ids::device_entry_name(&sd.uuid)));
                    let materialize = match (&entry, frozen.single_file()) {
                        (Some(_), None) => Some(self.hotadd_dir.join(format!(
                            "{}-{}-{}.img",
                            vm.name,
                            key,
                            ids::device_entry_name(&sd.uuid)
                        ))),
                        _ => None,
                    };
                    plan.adds.push(PlannedAdd {
                        key,
                        unit,
                        file_name: a.file_name.clone(),
                        capacity: frozen.capacity(),
                        uuid: sd.uuid.clone(),
                        datastore: sd.datastore,
                        crypto: sd.crypto.clone(),
                        source_vm: src_vm.id.clone(),
                        source_snapshot: snap.id.clone(),
                        source_disk_key: sd.key,
                        entry,
                        materialize,
                        frozen,
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Apply a checked plan to VM `vi` (device entries must already exist, see
    /// [`ReconfigPlan::prepare_devices`]). Returns the device entries to delete.
    pub fn apply_reconfig(&mut self, vi: usize, plan: ReconfigPlan) -> Vec<PathBuf> {
        let vm = &mut self.vms[vi];
        if let Some(on) = plan.cbt {
            vm.cbt = on;
            for d in &vm.disks {
                if on {
                    d.disk.enable_cbt();
                } else {
                    d.disk.disable_cbt();
                }
            }
        }
        let mut gone = Vec::new();
        for key in plan.removes {
            if let Some(i) = vm.attached.iter().position(|a| a.key == key) {
                let a = vm.attached.remove(i);
                gone.extend(a.entry.clone());
                gone.extend(a.materialized.clone());
            }
        }
        for p in plan.adds {
            vm.attached.push(Attached {
                key: p.key,
                unit: p.unit,
                file_name: p.file_name,
                capacity: p.capacity,
                uuid: p.uuid,
                datastore: p.datastore,
                crypto: p.crypto,
                source_vm: p.source_vm,
                source_snapshot: p.source_snapshot,
                source_disk_key: p.source_disk_key,
                entry: p.entry,
                materialized: p.materialize,
                frozen: p.frozen,
            });
        }
        vm.touch();
        gone
    }

    /// Change (or remove, with `None`) the key provider of VM `vi`: the VM and its
    /// encrypted disks get new keys from `provider`; `None` decrypts them. A VM that
    /// was not encrypted gets all its disks encrypted.
    pub fn set_key_provider(&mut self, vi: usize, provider: Option<&str>) -> Result<(), String> {
        if let Some(p) = provider {
            if !self.key_providers.iter().any(|k| k == p) {
                return Err(format!(
                    "unknown key provider {p:?} (known: {})",
                    self.key_providers.join(", ")
                ));
            }
        }
        let vm = &mut self.vms[vi];
        let was = vm.crypto.is_some();
        vm.crypto = provider.map(CryptoKey::new);
        for d in &mut vm.disks {
            d.crypto = match provider {
                Some(p) if d.crypto.is_some() || !was => Some(CryptoKey::new(p)),
                _ => None,
            };
        }
        vm.touch();
        Ok(())
    }
}

fn clean_stale_entries(dir: &Path) -> Result<(), BuildError> {
    let rd = std::fs::read_dir(dir).map_err(|source| BuildError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for e in rd.flatten() {
        if e.file_type().map(|t| t.is_symlink()).unwrap_or(false) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

/// A disk error as the vim25 fault vSphere would report.
pub fn disk_fault(e: DiskError) -> Fault {
    match &e {
        DiskError::Locked { file, .. } => vim::file_locked(file, e.to_string()),
        DiskError::CbtDisabled { file } | DiskError::UnknownChangeId { file, .. } => {
            vim::file_fault(file, e.to_string())
        }
        DiskError::NoSuchSnapshot { .. } => vim::invalid_argument(None, e.to_string()),
        DiskError::OutOfRange { .. } => vim::invalid_argument(Some("startOffset"), e.to_string()),
        DiskError::Invalid { .. } => vim::invalid_state(e.to_string()),
        DiskError::Io { .. } => vim::system_error(e.to_string()),
    }
}

/// A hot-add of an existing disk file, as parsed from a ReconfigVM spec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddDisk {
    /// Requested key (negative: vCenter assigns one).
    pub key: i32,
    /// Controller key.
    pub controller_key: i32,
    /// Unit number (absent: first free).
    pub unit: Option<i32>,
    /// Backing file name.
    pub file_name: String,
    /// Backing disk mode.
    pub disk_mode: String,
}

/// One `deviceChange` entry the mock understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// Add an existing disk.
    Add(AddDisk),
    /// Remove the device with this key (file kept).
    Remove {
        /// Device key.
        key: i32,
    },
}

/// The parts of a `VirtualMachineConfigSpec` the mock applies.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconfigSpec {
    /// `changeTrackingEnabled`.
    pub cbt: Option<bool>,
    /// `deviceChange`.
    pub changes: Vec<DeviceChange>,
}

/// A hot-add that passed the rules.
#[derive(Debug)]
pub struct PlannedAdd {
    key: i32,
    unit: i32,
    file_name: String,
    capacity: u64,
    uuid: String,
    datastore: usize,
    crypto: Option<CryptoKey>,
    source_vm: String,
    source_snapshot: String,
    source_disk_key: i32,
    entry: Option<PathBuf>,
    materialize: Option<PathBuf>,
    frozen: Frozen,
}

/// A checked ReconfigVM.
#[derive(Debug)]
pub struct ReconfigPlan {
    cbt: Option<bool>,
    adds: Vec<PlannedAdd>,
    removes: Vec<i32>,
}

impl ReconfigPlan {
    /// Create the device-directory entries of the planned hot-adds (file work; run it
    /// without the inventory lock). On failure nothing is left behind.
    pub fn prepare_devices(&self) -> Result<(), Fault> {
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for a in &self.adds {
                let Some(entry) = &a.entry else { continue };
                let target = match (&a.materialize, a.frozen.single_file()) {
                    (Some(m), _) => {
                        a.frozen.materialize(m).map_err(disk_fault)?;
                        made.push(m.clone());
                        m.clone()
                    }
                    (None, Some(f)) => f.to_path_buf(),
                    (None, None) => continue,
                };
                std::os::unix::fs::symlink(&target, entry).map_err(|e| {
                    vim::system_error(format!(
                        "cannot create hot-add device {}: {e}",
                        entry.display()
                    ))
                })?;
                made.push(entry.clone());
            }
            Ok(())
        })();
        if result.is_err() {
            for p in made {
                let _ = std::fs::remove_file(p);
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const SC: &str = r#"
[[cluster]]
name = "C1"
[[host]]
name = "h1"
cluster = "C1"
datastores = ["ds-a", "ds-shared"]
[[host]]
name = "h2"
cluster = "C1"
datastores = ["ds-local2", "ds-shared"]
[[datastore]]
name = "ds-a"
[[datastore]]
name = "ds-shared"
[[datastore]]
name = "ds-local2"
[[key_provider]]
id = "KMS-A"
[[key_provider]]
id = "KMS-B"
[[vm]]
name = "a1"
host = "h1"
key_provider = "KMS-A"
cbt = true
[[vm.disk]]
size_mib = 2
content = "random"
[[vm]]
name = "b1"
host = "h1"
datastore = "ds-shared"
key_provider = "KMS-B"
[[vm.disk]]
size_mib = 2
[[vm]]
name = "l2"
host = "h2"
datastore = "ds-local2"
[[vm.disk]]
size_mib = 2
[[vm]]
name = "u1"
host = "h1"
datastore = "ds-shared"
[[vm.disk]]
size_mib = 1
[[proxy]]
name = "pa"
host = "h1"
key_provider = "KMS-A"
[[proxy]]
name = "pn"
host = "h1"
"#;

    fn world() -> (tempfile::TempDir, Inventory) {
        let t = tempfile::tempdir().unwrap();
        let sc = Scenario::parse(SC, Path::new("t.toml")).unwrap();
        let inv = Inventory::build(&sc, t.path()).unwrap();
        (t, inv)
    }

    fn add(file: &str) -> ReconfigSpec {
        ReconfigSpec {
            cbt: None,
            changes: vec![DeviceChange::Add(AddDisk {
                key: -1,
                controller_key: SCSI_KEY,
                unit: None,
                file_name: file.into(),
                disk_mode: "independent_nonpersistent".into(),
            })],
        }
    }

    fn attach(inv: &mut Inventory, proxy: &str, file: &str) -> Result<(), Fault> {
        let pi = inv.vm_by_name(proxy).unwrap();
        let plan = inv.plan_reconfig(pi, &add(file))?;
        plan.prepare_devices()?;
        inv.apply_reconfig(pi, plan);
        Ok(())
    }

    #[test]
    fn hot_add_follows_key_provider_and_datastore_rules() {
        let (_t, mut inv) = world();
        let snaps: Vec<String> = ["a1", "b1", "l2"]
            .iter()
            .map(|n| {
                let vi = inv.vm_by_name(n).unwrap();
                inv.create_snapshot(vi, "ferry-1", "ferry backup", false)
                    .unwrap()
            })
            .collect();
        let file = |inv: &Inventory, s: &str| {
            let (vi, si) = inv.snapshot_index(s).unwrap();
            let d = &inv.vms[vi].snapshots[si].disks[0];
            d.disk.frozen_file_name(d.snap).unwrap()
        };
        let fa = file(&inv, &snaps[0]);
        let fb = file(&inv, &snaps[1]);
        let fl = file(&inv, &snaps[2]);
        // KMS-B disk into the KMS-A proxy: crypto fault naming both providers.
        let e = attach(&mut inv, "pa", &fb).unwrap_err();
        assert_eq!(e.obj.ty, "GenericVmConfigFault");
        assert!(
            e.message.contains("key providers differ")
                && e.message.contains("KMS-B")
                && e.message.contains("KMS-A"),
            "{}",
            e.message
        );
        // Encrypted disk into the unencrypted NBD proxy: crypto fault too.
        let e = attach(&mut inv, "pn", &fa).unwrap_err();
        assert_eq!(e.obj.ty, "GenericVmConfigFault");
        // A datastore the proxy's host does not see.
        let e = attach(&mut inv, "pn", &fl).unwrap_err();
        assert_eq!(e.obj.ty, "InvalidDatastore");
        // The live disk is locked.
        let live = inv.vms[inv.vm_by_name("a1").unwrap()].disks[0]
            .disk
            .live_file_name();
        assert_eq!(
            attach(&mut inv, "pa", &live).unwrap_err().obj.ty,
            "FileLocked"
        );
        assert_eq!(
            attach(&mut inv, "pa", "[ds-a] nope/nope.vmdk")
                .unwrap_err()
                .obj
                .ty,
            "FileNotFound"
        );
        // Same key provider: accepted; the device entry is the frozen content.
        attach(&mut inv, "pa", &fa).unwrap();
        let pi = inv.vm_by_name("pa").unwrap();
        let a = &inv.vms[pi].attached[0];
        assert_eq!(a.key, FIRST_DISK_KEY + 1);
        let entry = a.entry.clone().unwrap();
        let ai = inv.vm_by_name("a1").unwrap();
        let sd = &inv.vms[ai].snapshots[0].disks[0];
        let mut want = vec![0u8; 2 << 20];
        sd.disk.read(Some(sd.snap), 0, &mut want).unwrap();
        assert_eq!(std::fs::read(&entry).unwrap(), want);
        // Encrypted disk into the unencrypted proxy is refused even when free.
        assert_eq!(
            attach(&mut inv, "pn", &fa).unwrap_err().obj.ty,
            "GenericVmConfigFault"
        );
        // Removing the snapshot while attached: locked.
        assert_eq!(
            inv.begin_remove_snapshot(&snaps[0], false)
                .unwrap_err()
                .obj
                .ty,
            "FileLocked"
        );
        // An unencrypted disk goes anywhere its datastore is seen, but only once.
        let ui = inv.vm_by_name("u1").unwrap();
        let su = inv.create_snapshot(ui, "s", "d", false).unwrap();
        let fu = file(&inv, &su);
        attach(&mut inv, "pn", &fu).unwrap();
        assert_eq!(
            attach(&mut inv, "pa", &fu).unwrap_err().obj.ty,
            "FileLocked"
        );
        let plan = inv
            .plan_reconfig(
                pi,
                &ReconfigSpec {
                    cbt: None,
                    changes: vec![DeviceChange::Remove {
                        key: FIRST_DISK_KEY + 1,
                    }],
                },
            )
            .unwrap();
        let gone = inv.apply_reconfig(pi, plan);
        assert_eq!(gone, vec![entry.clone()]);
        for g in gone {
            std::fs::remove_file(g).unwrap();
        }
        assert!(inv.vms[pi].attached.is_empty());
        let chosen = inv.begin_remove_snapshot(&snaps[0], false).unwrap();
        for (id, disks) in chosen {
            for d in disks {
                d.disk.finish_remove(d.snap).unwrap();
            }
            inv.forget_snapshot(&id);
        }
        assert!(inv.vms[ai].snapshots.is_empty());
    }

    #[test]
    fn key_provider_changes_rekey_vm_and_disks() {
        let (_t, mut inv) = world();
        let vi = inv.vm_by_name("l2").unwrap();
        assert!(inv.vms[vi].crypto.is_none());
        inv.set_key_provider(vi, Some("KMS-B")).unwrap();
        assert_eq!(
            inv.vms[vi].disks[0].crypto.as_ref().unwrap().provider,
            "KMS-B"
        );
        inv.set_key_provider(vi, Some("KMS-A")).unwrap();
        assert_eq!(inv.vms[vi].crypto.as_ref().unwrap().provider, "KMS-A");
        assert_eq!(
            inv.vms[vi].disks[0].crypto.as_ref().unwrap().provider,
            "KMS-A"
        );
        assert!(inv.set_key_provider(vi, Some("KMS-Z")).is_err());
        inv.set_key_provider(vi, None).unwrap();
        assert!(inv.vms[vi].crypto.is_none() && inv.vms[vi].disks[0].crypto.is_none());
    }
}
