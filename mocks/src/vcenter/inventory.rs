//! The inventory model: datacenter, clusters, hosts, datastores, key providers, VMs
//! and proxy VMs, their disks, snapshots and hot-added disks, and the vSphere rules
//! that govern changes to them (snapshot create/remove, CBT, hot-add across key
//! providers and datastores, new disks created and destroyed by ReconfigVM, guest
//! writes, key provider changes).
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

/// Disk mode of a read-only hot-add (a snapshot's disk).
pub const READ_ONLY_MODE: &str = "independent_nonpersistent";
/// Disk mode of a writable hot-add (another VM's live disk).
pub const WRITABLE_MODE: &str = "independent_persistent";
/// Largest disk ReconfigVM creates (vSphere's 62 TiB).
pub const MAX_NEW_DISK: u64 = 62 << 40;

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
    /// Reported `summary.freeSpace` when set (admin); default half the capacity.
    pub free_space: Option<u64>,
}

impl Datastore {
    /// `summary.freeSpace` as reported.
    pub fn free_space(&self) -> u64 {
        self.free_space.unwrap_or(self.capacity / 2)
    }
}

/// A lock on a datastore file held by something other than vCenter's own work
/// (another ESXi host running a VM registered twice, a stuck backup appliance, a
/// host's NFC service): hot-adding, destroying or opening the file for write
/// fails with `FileLocked` until it is released (admin).
#[derive(Debug, Clone)]
pub struct FileLockEntry {
    /// Datastore path, `[ds] folder/file.vmdk`.
    pub file: String,
    /// Who holds it, as vSphere's message names it (e.g. `host esx-02.lab`).
    pub holder: String,
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
    /// Storage policy (SPBM profile id) it was created with, if any.
    pub storage_policy: Option<String>,
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

/// What a hot-added disk reads and writes.
#[derive(Debug)]
pub enum AttachSource {
    /// A snapshot's frozen disk, read-only (keeps the snapshot open, which blocks
    /// its removal while attached).
    Frozen(Frozen),
    /// Another VM's live disk (one without snapshots, e.g. a restore's new disk),
    /// attached writable: the device entry is its file; the allocation is
    /// rescanned at detach.
    Live(Arc<Disk>),
}

/// A disk hot-added to this VM (a snapshot disk read-only, or another VM's live
/// disk writable).
#[derive(Debug)]
pub struct Attached {
    /// Device key on this VM.
    pub key: i32,
    /// Unit number.
    pub unit: i32,
    /// Datastore path of the frozen (or live) file.
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
    /// Source snapshot moref id (empty for a live disk).
    pub source_snapshot: String,
    /// Source disk device key.
    pub source_disk_key: i32,
    /// Device directory entry (symlink).
    pub entry: Option<PathBuf>,
    /// Flattened copy behind the entry, when the frozen chain has several layers.
    pub materialized: Option<PathBuf>,
    /// The frozen snapshot (kept open) or the live disk.
    pub source: AttachSource,
}

impl Attached {
    /// Attached writable (`independent_persistent`: a live disk).
    pub fn writable(&self) -> bool {
        matches!(self.source, AttachSource::Live(_))
    }
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
    /// VMware Tools in the guest (quiesced snapshots).
    pub guest: super::guest::GuestTools,
    /// `runtime.powerState`: `poweredOn` (the default), `poweredOff`, `suspended`.
    pub power_state: String,
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
    /// Files locked by something outside the mock's own work (admin).
    pub file_locks: Vec<FileLockEntry>,
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

/// The number of a `<prefix>-<n>` moref id.
fn id_number(id: &str) -> Option<u64> {
    id.rsplit('-').next()?.parse().ok()
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
                free_space: None,
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
            file_locks: Vec::new(),
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
            let home = ds.as_deref().and_then(ds_index);
            if let Some(dir) = &device_dir {
                mkdir(dir)?;
                clean_stale_entries(dir)?;
            }
            let vm = inv.new_vm(name, host_idx, home, kp.as_deref(), cbt, disks, device_dir)?;
            inv.vms.push(vm);
        }
        // The scenario's VMs come first, in order (names are unique).
        for (vi, v) in sc.vms.iter().enumerate() {
            inv.vms[vi].guest = super::guest::GuestTools {
                tools: v.tools,
                quiesce: v.quiesce,
            };
        }
        Ok(inv)
    }

    /// A new VM (not yet in `vms`): its disks are created in their datastores'
    /// directories now. `home`: the home datastore's index (default: the first
    /// datastore the host sees).
    #[allow(clippy::too_many_arguments)]
    fn new_vm(
        &self,
        name: &str,
        host_idx: usize,
        home: Option<usize>,
        kp: Option<&str>,
        cbt: bool,
        disks: &[DiskSpecToml],
        device_dir: Option<PathBuf>,
    ) -> Result<Vm, BuildError> {
        let home = home.unwrap_or_else(|| {
            self.hosts[host_idx]
                .datastores
                .first()
                .copied()
                .unwrap_or(0)
        });
        let crypto = kp.map(CryptoKey::new);
        let mut vm_disks = Vec::new();
        for (i, d) in disks.iter().enumerate() {
            let ds = d
                .datastore
                .as_deref()
                .and_then(|n| self.datastores.iter().position(|x| x.name == n))
                .unwrap_or(home);
            let loc = DiskLocation {
                datastore_dir: self.datastores[ds].dir.clone(),
                datastore: self.datastores[ds].name.clone(),
                folder: name.to_string(),
                stem: if i == 0 {
                    name.to_string()
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
                storage_policy: None,
                disk: Arc::new(disk),
            });
        }
        Ok(Vm {
            id: self.ids.next("vm-"),
            name: name.to_string(),
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
            power_state: "poweredOn".into(),
            guest: Default::default(),
            next_snapshot_num: 1,
        })
    }

    /// Add a workload VM as `spec` describes it (the provider's daily churn: a
    /// tenant creates a VM); returns its moref id. Its disks are created now.
    pub fn add_vm(&mut self, spec: &super::scenario::VmSpec) -> Result<String, String> {
        if self.vm_by_name(&spec.name).is_some() {
            return Err(format!("a VM named {:?} exists already", spec.name));
        }
        let host = self
            .hosts
            .iter()
            .position(|h| h.name == spec.host)
            .ok_or_else(|| format!("no host {:?}", spec.host))?;
        let home = match &spec.datastore {
            Some(d) => Some(
                self.datastores
                    .iter()
                    .position(|x| &x.name == d)
                    .ok_or_else(|| format!("no datastore {d:?}"))?,
            ),
            None => None,
        };
        if let Some(kp) = &spec.key_provider {
            if !self.key_providers.contains(kp) {
                return Err(format!("no key provider {kp:?}"));
            }
        }
        let mut vm = self
            .new_vm(
                &spec.name,
                host,
                home,
                spec.key_provider.as_deref(),
                spec.cbt,
                &spec.disks,
                None,
            )
            .map_err(|e| e.to_string())?;
        vm.guest = super::guest::GuestTools {
            tools: spec.tools,
            quiesce: spec.quiesce,
        };
        let id = vm.id.clone();
        self.vms.push(vm);
        Ok(id)
    }

    /// Remove a workload VM from the inventory (a tenant deletes it); its disk
    /// files stay. Refused for proxies and for VMs with snapshots or hot-added
    /// disks (a backup is using them). Later VMs' indices shift by one: only for
    /// worlds where no task runs (inventory tests).
    pub fn remove_vm(&mut self, vi: usize) -> Result<(), String> {
        let vm = self.vms.get(vi).ok_or("no such VM")?;
        if vm.proxy {
            return Err(format!("{} is a proxy VM", vm.name));
        }
        if !vm.snapshots.is_empty() || self.vms.iter().any(|p| !p.attached.is_empty()) {
            return Err(format!(
                "{}: snapshots or hot-added disks exist; remove them first",
                vm.name
            ));
        }
        self.vms.remove(vi);
        Ok(())
    }

    /// VM index by moref id. Ids are handed out in increasing order (`vm-<n>`) and
    /// VMs only ever appended, so `vms` is sorted by that number: a binary search,
    /// checked, with a scan as the fallback (10,000-VM worlds look VMs up by id for
    /// every property read).
    pub fn vm_index(&self, id: &str) -> Option<usize> {
        if let Some(n) = id_number(id) {
            if let Ok(i) = self
                .vms
                .binary_search_by_key(&Some(n), |v| id_number(&v.id))
            {
                if self.vms[i].id == id {
                    return Some(i);
                }
            }
        }
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

    /// Who holds a lock on datastore file `file`, if anything does.
    pub fn file_lock_holder(&self, file: &str) -> Option<&str> {
        self.file_locks
            .iter()
            .find(|l| l.file == file)
            .map(|l| l.holder.as_str())
    }

    /// `FileLocked` for `file` when something holds a lock on it: `doing` says
    /// what was refused.
    pub fn check_file_lock(&self, file: &str, doing: &str) -> Result<(), Fault> {
        match self.file_lock_holder(file) {
            None => Ok(()),
            Some(by) => Err(vim::file_locked(
                file,
                format!("Unable to access file {file} since it is locked by {by}: {doing}"),
            )),
        }
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
        // A guest that cannot be quiesced fails the task before anything is
        // frozen: nothing of the snapshot is left, as in vSphere.
        if let Some(f) = quiesce
            .then(|| self.vms[vi].guest.quiesce_fault())
            .flatten()
        {
            return Err(f);
        }
        for d in &self.vms[vi].disks {
            if let Some(by) = self.live_attached_by(&d.disk) {
                return Err(vim::file_locked(
                    &d.disk.live_file_name(),
                    format!(
                        "Unable to access file {} since it is locked: it is hot-added to VM {by} for writing",
                        d.disk.live_file_name()
                    ),
                ));
            }
        }
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

    /// The VM (name) that has `disk` hot-added writable, if any.
    pub fn live_attached_by(&self, disk: &Arc<Disk>) -> Option<&str> {
        self.vms.iter().find_map(|v| {
            v.attached
                .iter()
                .any(|a| matches!(&a.source, AttachSource::Live(d) if Arc::ptr_eq(d, disk)))
                .then_some(v.name.as_str())
        })
    }

    /// Find the disk behind datastore file `file_name`: a snapshot's frozen disk,
    /// or, when `live_ok`, a VM's live disk.
    fn source_of_file(&self, file_name: &str, live_ok: bool) -> Result<FileSource, Fault> {
        for (vi, vm) in self.vms.iter().enumerate() {
            for (di, d) in vm.disks.iter().enumerate() {
                match d.disk.find_file(file_name) {
                    None => continue,
                    Some(FileRole::Live) if live_ok => return Ok(FileSource::Live(vi, di)),
                    Some(FileRole::Live) => {
                        return Err(vim::file_locked(
                            file_name,
                            format!(
                                "Unable to access file {file_name} since it is locked: it is the running disk of VM {}; hot-add a snapshot's disk instead (independent_nonpersistent), or attach it independent_persistent to write it",
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
                            return Ok(FileSource::Snapshot(vi, si, sdi));
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
    /// Nothing changes yet; [`ReconfigPlan::prepare_devices`] does the file work
    /// (device entries, new disk files) and [`Inventory::apply_reconfig`] applies
    /// the plan.
    pub fn plan_reconfig(&self, vi: usize, spec: &ReconfigSpec) -> Result<ReconfigPlan, Fault> {
        let vm = &self.vms[vi];
        let mut plan = ReconfigPlan {
            cbt: spec.cbt,
            adds: Vec::new(),
            removes: Vec::new(),
            creates: Vec::new(),
            destroys: Vec::new(),
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
                            "the mock vCenter only removes hot-added disks, or its own disks with fileOperation destroy; device {key} is one of {}'s own disks",
                            vm.name
                        )));
                    } else {
                        return Err(vim::invalid_device(
                            i,
                            format!("The device '{key}' does not exist on VM {}", vm.name),
                        ));
                    }
                }
                DeviceChange::Destroy { key } => {
                    let Some(d) = vm.disk(*key) else {
                        if vm.attached.iter().any(|a| a.key == *key) {
                            return Err(vim::not_supported(format!(
                                "fileOperation destroy of hot-added device {key} would delete another VM's disk file; remove it without fileOperation"
                            )));
                        }
                        return Err(vim::invalid_device(
                            i,
                            format!("The device '{key}' does not exist on VM {}", vm.name),
                        ));
                    };
                    if plan.destroys.contains(key) {
                        return Err(vim::invalid_device(
                            i,
                            format!("device {key} is removed twice"),
                        ));
                    }
                    if !d.disk.snapshot_ids().is_empty() {
                        return Err(vim::invalid_state(format!(
                            "disk {} of VM {} has snapshots; remove them before destroying the disk",
                            d.label, vm.name
                        )));
                    }
                    if let Some(by) = self.live_attached_by(&d.disk) {
                        return Err(vim::file_locked(
                            &d.disk.live_file_name(),
                            format!(
                                "Unable to access file {} since it is locked: it is hot-added to VM {by}; detach it first",
                                d.disk.live_file_name()
                            ),
                        ));
                    }
                    self.check_file_lock(
                        &d.disk.live_file_name(),
                        &format!("cannot delete disk {} of VM {}", d.label, vm.name),
                    )?;
                    plan.destroys.push(*key);
                }
                DeviceChange::Create(c) => {
                    let p = self.plan_create(vi, i, c, &mut units, &mut keys, &plan.creates)?;
                    plan.creates.push(p);
                }
                DeviceChange::Add(a) => {
                    let live_ok = a.disk_mode == WRITABLE_MODE;
                    let (src_vm, snap_id, sd) = match self.source_of_file(&a.file_name, live_ok)? {
                        FileSource::Snapshot(svi, si, sdi) => {
                            let src_vm = &self.vms[svi];
                            let snap = &src_vm.snapshots[si];
                            (
                                src_vm,
                                Some(snap.id.clone()),
                                DiskRef::Snap(&snap.disks[sdi]),
                            )
                        }
                        FileSource::Live(svi, di) => {
                            let src_vm = &self.vms[svi];
                            (src_vm, None, DiskRef::Live(&src_vm.disks[di]))
                        }
                    };
                    let (sd_key, sd_datastore, sd_crypto, sd_uuid) = match sd {
                        DiskRef::Snap(d) => (d.key, d.datastore, &d.crypto, &d.uuid),
                        DiskRef::Live(d) => (d.key, d.datastore, &d.crypto, &d.uuid),
                    };
                    if snap_id.is_some() && a.disk_mode != READ_ONLY_MODE {
                        return Err(vim::invalid_device(
                            i,
                            format!(
                                "diskMode {:?} would write into snapshot file {}; hot-add it as {READ_ONLY_MODE}",
                                a.disk_mode, a.file_name
                            ),
                        ));
                    }
                    if let DiskRef::Live(d) = sd {
                        if src_vm.id == vm.id {
                            return Err(vim::invalid_device(
                                i,
                                format!("{} is already a disk of VM {}", a.file_name, vm.name),
                            ));
                        }
                        if !d.disk.snapshot_ids().is_empty() {
                            return Err(vim::invalid_state(format!(
                                "disk {} of VM {} has snapshots; the mock vCenter attaches a live disk for writing only when it has none",
                                a.file_name, src_vm.name
                            )));
                        }
                        if let Some(by) = self.live_attached_by(&d.disk) {
                            return Err(vim::file_locked(
                                &a.file_name,
                                format!("Unable to access file {} since it is locked: it is attached to VM {by}", a.file_name),
                            ));
                        }
                    }
                    self.check_file_lock(
                        &a.file_name,
                        &format!("cannot add it to VM {}", vm.name),
                    )?;
                    let host = &self.hosts[vm.host];
                    if !host.datastores.contains(&sd_datastore) {
                        let ds = &self.datastores[sd_datastore];
                        return Err(vim::invalid_datastore(
                            &ds.id,
                            &ds.name,
                            format!(
                                "Datastore {} is not accessible from host {}, where VM {} runs: cannot add disk {}",
                                ds.name, host.name, vm.name, a.file_name
                            ),
                        ));
                    }
                    check_crypto_for_vm(vm, &a.file_name, sd_crypto.as_ref())?;
                    if a.controller_key != SCSI_KEY {
                        return Err(vim::invalid_device(
                            i,
                            format!(
                                "controllerKey {} is not a SCSI controller of VM {} (use {SCSI_KEY})",
                                a.controller_key, vm.name
                            ),
                        ));
                    }
                    let (unit, key) = assign_slot(vm, i, a.unit, a.key, &mut units, &mut keys)?;
                    if vm.attached.iter().any(|x| &x.uuid == sd_uuid)
                        || plan.adds.iter().any(|p: &PlannedAdd| &p.uuid == sd_uuid)
                    {
                        return Err(vim::invalid_device(
                            i,
                            format!("a disk with uuid {sd_uuid} (another snapshot of the same disk) is already attached to VM {}", vm.name),
                        ));
                    }
                    let (source, capacity, single_file) = match sd {
                        DiskRef::Snap(d) => {
                            if d.disk.readers(d.snap, ReaderKind::HotAdd) > 0 {
                                return Err(vim::file_locked(
                                    &a.file_name,
                                    format!("Unable to access file {} since it is locked: it is attached to another VM", a.file_name),
                                ));
                            }
                            let frozen = d
                                .disk
                                .open_frozen(d.snap, ReaderKind::HotAdd)
                                .map_err(disk_fault)?;
                            let cap = frozen.capacity();
                            let single = frozen.single_file().map(Path::to_path_buf);
                            (AttachSource::Frozen(frozen), cap, single)
                        }
                        DiskRef::Live(d) => (
                            AttachSource::Live(d.disk.clone()),
                            d.disk.capacity(),
                            Some(d.disk.live_path()),
                        ),
                    };
                    let entry = vm
                        .device_dir
                        .as_ref()
                        .map(|d| d.join(ids::device_entry_name(sd_uuid)));
                    let materialize = match (&entry, &single_file) {
                        (Some(_), None) => Some(self.hotadd_dir.join(format!(
                            "{}-{}-{}.img",
                            vm.name,
                            key,
                            ids::device_entry_name(sd_uuid)
                        ))),
                        _ => None,
                    };
                    plan.adds.push(PlannedAdd {
                        key,
                        unit,
                        file_name: a.file_name.clone(),
                        capacity,
                        uuid: sd_uuid.clone(),
                        datastore: sd_datastore,
                        crypto: sd_crypto.clone(),
                        source_vm: src_vm.id.clone(),
                        source_snapshot: snap_id.unwrap_or_default(),
                        source_disk_key: sd_key,
                        entry,
                        materialize,
                        single_file,
                        source,
                    });
                }
            }
        }
        Ok(plan)
    }

    /// Check a new disk (`fileOperation = create`) for VM `vi` and decide its file,
    /// slot, label and encryption.
    fn plan_create(
        &self,
        vi: usize,
        i: usize,
        c: &CreateDisk,
        units: &mut Vec<i32>,
        keys: &mut Vec<i32>,
        earlier: &[PlannedCreate],
    ) -> Result<PlannedCreate, Fault> {
        let vm = &self.vms[vi];
        if c.controller_key != SCSI_KEY {
            return Err(vim::invalid_device(
                i,
                format!(
                    "controllerKey {} is not a SCSI controller of VM {} (use {SCSI_KEY})",
                    c.controller_key, vm.name
                ),
            ));
        }
        if c.capacity == 0 || c.capacity > MAX_NEW_DISK {
            return Err(vim::invalid_device(
                i,
                format!(
                    "capacity {} bytes is not between 1 byte and {MAX_NEW_DISK} bytes",
                    c.capacity
                ),
            ));
        }
        if c.disk_mode != "persistent" && c.disk_mode != WRITABLE_MODE {
            return Err(vim::invalid_device(
                i,
                format!(
                    "diskMode {:?} is not supported for a new disk by the mock vCenter (persistent, {WRITABLE_MODE})",
                    c.disk_mode
                ),
            ));
        }
        let (ds_name, path) = parse_datastore_path(&c.file_name).ok_or_else(|| {
            vim::invalid_device(
                i,
                format!(
                    "backing.fileName {:?} is not a datastore path ([ds] folder/file.vmdk or [ds])",
                    c.file_name
                ),
            )
        })?;
        let ds = self
            .datastores
            .iter()
            .position(|d| d.name == ds_name)
            .ok_or_else(|| {
                vim::file_not_found(&c.file_name, format!("Datastore {ds_name} was not found"))
            })?;
        let host = &self.hosts[vm.host];
        if !host.datastores.contains(&ds) {
            let d = &self.datastores[ds];
            return Err(vim::invalid_datastore(
                &d.id,
                &d.name,
                format!(
                    "Datastore {} is not accessible from host {}, where VM {} runs: cannot create disk {}",
                    d.name, host.name, vm.name, c.file_name
                ),
            ));
        }
        let dir = &self.datastores[ds].dir;
        let taken = |folder: &str, stem: &str| {
            dir.join(folder).join(format!("{stem}.vmdk")).exists()
                || earlier
                    .iter()
                    .any(|p| p.loc.folder == folder && p.loc.stem == stem && p.datastore == ds)
        };
        let (folder, stem) = match path {
            None => {
                let folder = vm.name.clone();
                let stem = (1..)
                    .map(|n| format!("{}_{n}", vm.name))
                    .find(|stem| !taken(&folder, stem))
                    .expect("an unused name exists");
                (folder, stem)
            }
            Some((folder, stem)) => {
                if taken(folder, stem) {
                    return Err(vim::file_already_exists(
                        &c.file_name,
                        format!("Cannot complete the operation because the file or folder {} already exists", c.file_name),
                    ));
                }
                (folder.to_string(), stem.to_string())
            }
        };
        let crypto = match &c.crypto {
            None => None,
            Some((key_id, provider)) => {
                let provider = provider
                    .clone()
                    .or_else(|| vm.crypto.as_ref().map(|k| k.provider.clone()))
                    .unwrap_or_default();
                let key = CryptoKey {
                    key_id: if key_id.is_empty() {
                        ids::uuid()
                    } else {
                        key_id.clone()
                    },
                    provider,
                };
                check_crypto_for_vm(vm, &c.file_name, Some(&key))?;
                Some(key)
            }
        };
        let (unit, key) = assign_slot(vm, i, c.unit, c.key, units, keys)?;
        let label_n = vm.disks.len() + earlier.len() + 1;
        let loc = DiskLocation {
            datastore_dir: dir.clone(),
            datastore: ds_name.to_string(),
            folder,
            stem,
        };
        Ok(PlannedCreate {
            key,
            unit,
            label: format!("Hard disk {label_n}"),
            datastore: ds,
            loc,
            capacity: c.capacity,
            crypto,
            uuid: ids::disk_uuid(),
            cbt: vm.cbt,
            profile: c.profile.clone(),
            disk: None,
        })
    }

    /// Apply a checked plan to VM `vi` (device entries and new disk files must
    /// already exist, see [`ReconfigPlan::prepare_devices`]). Returns the file work
    /// left to do without the inventory lock.
    pub fn apply_reconfig(&mut self, vi: usize, plan: ReconfigPlan) -> Applied {
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
        let mut done = Applied::default();
        for key in plan.removes {
            if let Some(i) = vm.attached.iter().position(|a| a.key == key) {
                let a = vm.attached.remove(i);
                done.gone.extend(a.entry.clone());
                done.gone.extend(a.materialized.clone());
                if let AttachSource::Live(d) = a.source {
                    done.rescan.push(d);
                }
            }
        }
        for key in plan.destroys {
            if let Some(i) = vm.disks.iter().position(|d| d.key == key) {
                let d = vm.disks.remove(i);
                done.gone.extend(d.disk.files());
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
                source: p.source,
            });
        }
        for p in plan.creates {
            let Some(disk) = p.disk else {
                continue;
            };
            if p.cbt {
                disk.enable_cbt();
            }
            vm.disks.push(VmDisk {
                key: p.key,
                unit: p.unit,
                label: p.label,
                datastore: p.datastore,
                crypto: p.crypto,
                uuid: p.uuid,
                storage_policy: p.profile,
                disk,
            });
        }
        vm.touch();
        done
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

/// The disk behind a datastore file.
enum FileSource {
    /// (vm, snapshot, snapshot disk) indices.
    Snapshot(usize, usize, usize),
    /// (vm, disk) indices of a live disk.
    Live(usize, usize),
}

enum DiskRef<'a> {
    Snap(&'a SnapDisk),
    Live(&'a VmDisk),
}

/// vSphere's rule for disks of encrypted VMs: an encrypted disk only on a VM
/// encrypted with the same key provider.
fn check_crypto_for_vm(vm: &Vm, file: &str, disk: Option<&CryptoKey>) -> Result<(), Fault> {
    let Some(dk) = disk else {
        return Ok(());
    };
    match &vm.crypto {
        None => Err(vim::crypto_fault(format!(
            "Cryptographic error: disk {file} is encrypted with key provider {}, but VM {} is not encrypted; an encrypted disk can only be added to a VM encrypted with the same key provider",
            dk.provider, vm.name
        ))),
        Some(vk) if vk.provider != dk.provider => Err(vim::crypto_fault(format!(
            "Cryptographic error: the key providers differ: disk {file} is encrypted with key provider {}, VM {} with key provider {}",
            dk.provider, vm.name, vk.provider
        ))),
        Some(_) => Ok(()),
    }
}

/// A unit on controller 1000 (the requested one if free, else the first free) and
/// a device key (the requested one if unused, else the next) for `deviceChange[i]`.
fn assign_slot(
    vm: &Vm,
    i: usize,
    unit: Option<i32>,
    key: i32,
    units: &mut Vec<i32>,
    keys: &mut Vec<i32>,
) -> Result<(i32, i32), Fault> {
    let unit = match unit {
        Some(u) => {
            if !(0..16).contains(&u) || u == SCSI_CONTROLLER_UNIT || units.contains(&u) {
                return Err(vim::invalid_device(
                    i,
                    format!(
                        "unit number {u} is not free on controller {SCSI_KEY} of VM {}",
                        vm.name
                    ),
                ));
            }
            u
        }
        None => (0..16)
            .find(|u| *u != SCSI_CONTROLLER_UNIT && !units.contains(u))
            .ok_or_else(|| {
                vim::invalid_device(
                    i,
                    format!("no free unit on controller {SCSI_KEY} of VM {}", vm.name),
                )
            })?,
    };
    units.push(unit);
    let key = if key < 0 {
        vim::next_disk_key(keys)
    } else if keys.contains(&key) {
        return Err(vim::invalid_device(
            i,
            format!("device key {key} is already used on VM {}", vm.name),
        ));
    } else {
        key
    };
    keys.push(key);
    Ok((unit, key))
}

/// `[ds]` → `(ds, None)`; `[ds] folder/stem.vmdk` → `(ds, Some((folder, stem)))`.
/// One folder level; names of ASCII letters, digits, space, `-`, `_`, `.` (not
/// `.`/`..`). Anything else is `None`.
pub fn parse_datastore_path(path: &str) -> Option<(&str, Option<(&str, &str)>)> {
    let rest = path.strip_prefix('[')?;
    let (ds, rest) = rest.split_once(']')?;
    if ds.is_empty() || ds.contains(['/', '[']) {
        return None;
    }
    let rest = rest.trim();
    if rest.is_empty() {
        return Some((ds, None));
    }
    let (folder, file) = rest.split_once('/')?;
    let stem = file.strip_suffix(".vmdk")?;
    let ok = |n: &str| {
        !n.is_empty()
            && n != "."
            && n != ".."
            && n.chars()
                .all(|c| c.is_ascii_alphanumeric() || " -_.".contains(c))
    };
    (ok(folder) && ok(stem)).then_some((ds, Some((folder, stem))))
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

/// A new disk, as parsed from a ReconfigVM spec (`fileOperation = create`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateDisk {
    /// Requested key (negative: vCenter assigns one).
    pub key: i32,
    /// Controller key.
    pub controller_key: i32,
    /// Unit number (absent: first free).
    pub unit: Option<i32>,
    /// `[ds]` (vCenter names the file) or `[ds] folder/file.vmdk`.
    pub file_name: String,
    /// Capacity in bytes.
    pub capacity: u64,
    /// Backing disk mode.
    pub disk_mode: String,
    /// `backing.crypto` = CryptoSpecEncrypt: (key id, key provider).
    pub crypto: Option<(String, Option<String>)>,
    /// `profile` = VirtualMachineDefinedProfileSpec: the storage policy id.
    pub profile: Option<String>,
}

/// One `deviceChange` entry the mock understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceChange {
    /// Add an existing disk.
    Add(AddDisk),
    /// Create a new disk file and add it.
    Create(CreateDisk),
    /// Remove the device with this key (file kept).
    Remove {
        /// Device key.
        key: i32,
    },
    /// Remove one of the VM's own disks and delete its files.
    Destroy {
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
    /// The file holding all of the content, when there is one.
    single_file: Option<PathBuf>,
    source: AttachSource,
}

/// A new disk that passed the rules.
#[derive(Debug)]
pub struct PlannedCreate {
    key: i32,
    unit: i32,
    label: String,
    datastore: usize,
    loc: DiskLocation,
    capacity: u64,
    crypto: Option<CryptoKey>,
    uuid: String,
    cbt: bool,
    profile: Option<String>,
    /// Created by [`ReconfigPlan::prepare_devices`].
    disk: Option<Arc<Disk>>,
}

/// A checked ReconfigVM.
#[derive(Debug)]
pub struct ReconfigPlan {
    cbt: Option<bool>,
    adds: Vec<PlannedAdd>,
    removes: Vec<i32>,
    creates: Vec<PlannedCreate>,
    destroys: Vec<i32>,
}

/// File work left after [`Inventory::apply_reconfig`], to do without the lock.
#[derive(Debug, Default)]
pub struct Applied {
    /// Device entries, flattened copies and destroyed disks' files to delete.
    pub gone: Vec<PathBuf>,
    /// Live disks detached from a writable hot-add: rescan their allocation.
    pub rescan: Vec<Arc<Disk>>,
}

impl ReconfigPlan {
    /// Create the new disks' files and the device-directory entries of the
    /// planned hot-adds (file work; run it without the inventory lock). On failure
    /// nothing is left behind.
    pub fn prepare_devices(&mut self) -> Result<(), Fault> {
        let mut made: Vec<PathBuf> = Vec::new();
        let result = (|| {
            for c in &mut self.creates {
                let disk = Disk::create(c.loc.clone(), c.capacity, None).map_err(disk_fault)?;
                made.extend(disk.files());
                c.disk = Some(Arc::new(disk));
            }
            for a in &self.adds {
                let Some(entry) = &a.entry else { continue };
                let target = match (&a.materialize, &a.source, &a.single_file) {
                    (Some(m), AttachSource::Frozen(frozen), _) => {
                        frozen.materialize(m).map_err(disk_fault)?;
                        made.push(m.clone());
                        m.clone()
                    }
                    (None, _, Some(f)) => f.clone(),
                    _ => continue,
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
            for c in &mut self.creates {
                c.disk = None;
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
        let mut plan = inv.plan_reconfig(pi, &add(file))?;
        plan.prepare_devices()?;
        inv.apply_reconfig(pi, plan);
        Ok(())
    }

    fn reconfig(
        inv: &mut Inventory,
        vm: &str,
        changes: Vec<DeviceChange>,
    ) -> Result<Applied, Fault> {
        let vi = inv.vm_by_name(vm).unwrap();
        let mut plan = inv.plan_reconfig(vi, &ReconfigSpec { cbt: None, changes })?;
        plan.prepare_devices()?;
        Ok(inv.apply_reconfig(vi, plan))
    }

    fn create(file: &str, crypto: Option<(&str, &str)>) -> DeviceChange {
        DeviceChange::Create(CreateDisk {
            key: -1,
            controller_key: SCSI_KEY,
            unit: None,
            file_name: file.into(),
            capacity: (1 << 20) + 4096,
            disk_mode: "persistent".into(),
            crypto: crypto.map(|(k, p)| (k.to_string(), Some(p.to_string()))),
            profile: None,
        })
    }

    #[test]
    fn new_disks_follow_the_vms_key_provider_and_are_destroyed_with_their_files() {
        let (_t, mut inv) = world();
        // a1 is KMS-A on ds-a (h1 sees ds-a and ds-shared).
        let e = reconfig(
            &mut inv,
            "a1",
            vec![create("[ds-a] a1/r.vmdk", Some(("", "KMS-B")))],
        )
        .unwrap_err();
        assert_eq!(e.obj.ty, "GenericVmConfigFault");
        assert!(e.message.contains("key providers differ"), "{}", e.message);
        let e = reconfig(
            &mut inv,
            "u1",
            vec![create("[ds-shared] u1/r.vmdk", Some(("", "KMS-A")))],
        )
        .unwrap_err();
        assert!(e.message.contains("not encrypted"), "{}", e.message);
        let e = reconfig(&mut inv, "a1", vec![create("[ds-local2] a1/r.vmdk", None)]).unwrap_err();
        assert_eq!(e.obj.ty, "InvalidDatastore");
        let e = reconfig(&mut inv, "a1", vec![create("[ds-a] ../r.vmdk", None)]).unwrap_err();
        assert_eq!(e.obj.ty, "InvalidDeviceSpec");
        // Nothing was created by the refusals.
        let ai = inv.vm_by_name("a1").unwrap();
        assert_eq!(inv.vms[ai].disks.len(), 1);
        // Under the VM's provider, with the VM's key id: created, sparse, zeroes.
        reconfig(
            &mut inv,
            "a1",
            vec![create("[ds-a] a1/r.vmdk", Some(("vm-key", "KMS-A")))],
        )
        .unwrap();
        let d = &inv.vms[ai].disks[1];
        assert_eq!(
            (d.key, d.label.as_str()),
            (FIRST_DISK_KEY + 1, "Hard disk 2")
        );
        assert_eq!(d.crypto.as_ref().unwrap().provider, "KMS-A");
        assert_eq!(d.crypto.as_ref().unwrap().key_id, "vm-key");
        assert_eq!(d.disk.live_file_name(), "[ds-a] a1/r.vmdk");
        assert_eq!(d.disk.capacity(), (1 << 20) + 4096);
        let file = d.disk.live_path();
        assert!(file.exists());
        let mut b = vec![1u8; 4096];
        d.disk.read(None, 1 << 20, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        // The same name again: FileAlreadyExists. "[ds]": vCenter names it.
        let e = reconfig(&mut inv, "a1", vec![create("[ds-a] a1/r.vmdk", None)]).unwrap_err();
        assert_eq!(e.obj.ty, "FileAlreadyExists");
        reconfig(&mut inv, "a1", vec![create("[ds-shared]", None)]).unwrap();
        assert_eq!(
            inv.vms[ai].disks[2].disk.live_file_name(),
            "[ds-shared] a1/a1_1.vmdk"
        );
        assert!(
            inv.vms[ai].disks[2].crypto.is_none(),
            "no crypto spec: unencrypted"
        );
        // Destroy: the device and its file go; a snapshotted disk cannot.
        let done = reconfig(
            &mut inv,
            "a1",
            vec![DeviceChange::Destroy {
                key: FIRST_DISK_KEY + 1,
            }],
        )
        .unwrap();
        assert_eq!(done.gone, vec![file.clone()]);
        for g in done.gone {
            std::fs::remove_file(g).unwrap();
        }
        assert_eq!(inv.vms[ai].disks.len(), 2);
        inv.create_snapshot(ai, "s", "d", false).unwrap();
        let e = reconfig(
            &mut inv,
            "a1",
            vec![DeviceChange::Destroy {
                key: FIRST_DISK_KEY,
            }],
        )
        .unwrap_err();
        assert_eq!(e.obj.ty, "InvalidState");
    }

    #[test]
    fn a_live_disk_is_hot_added_writable_within_one_key_provider_and_rescanned_at_detach() {
        let (_t, mut inv) = world();
        reconfig(
            &mut inv,
            "a1",
            vec![create("[ds-a] a1/r.vmdk", Some(("k", "KMS-A")))],
        )
        .unwrap();
        let ai = inv.vm_by_name("a1").unwrap();
        let key = inv.vms[ai].disks[1].key;
        let disk = inv.vms[ai].disks[1].disk.clone();
        let file = disk.live_file_name();
        let live = |mode: &str| {
            vec![DeviceChange::Add(AddDisk {
                key: -1,
                controller_key: SCSI_KEY,
                unit: None,
                file_name: file.clone(),
                disk_mode: mode.into(),
            })]
        };
        // Read-only mode on a live disk: locked, as before.
        assert_eq!(
            reconfig(&mut inv, "pa", live(READ_ONLY_MODE))
                .unwrap_err()
                .obj
                .ty,
            "FileLocked"
        );
        // The unencrypted proxy may not take a KMS-A disk.
        assert_eq!(
            reconfig(&mut inv, "pn", live(WRITABLE_MODE))
                .unwrap_err()
                .obj
                .ty,
            "GenericVmConfigFault"
        );
        reconfig(&mut inv, "pa", live(WRITABLE_MODE)).unwrap();
        let pi = inv.vm_by_name("pa").unwrap();
        let a = &inv.vms[pi].attached[0];
        assert!(a.writable());
        let entry = a.entry.clone().unwrap();
        let akey = a.key;
        // Locked while attached: no second attach, no destroy, no snapshot.
        assert_eq!(
            reconfig(&mut inv, "pa", live(WRITABLE_MODE))
                .unwrap_err()
                .obj
                .ty,
            "FileLocked"
        );
        assert_eq!(
            reconfig(&mut inv, "a1", vec![DeviceChange::Destroy { key }])
                .unwrap_err()
                .obj
                .ty,
            "FileLocked"
        );
        assert_eq!(
            inv.create_snapshot(ai, "s", "d", false).unwrap_err().obj.ty,
            "FileLocked"
        );
        // The proxy writes through the device entry; at detach the mock sees it.
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&entry)
            .unwrap();
        f.write_all_at(&[7u8; 100], 70_000).unwrap();
        drop(f);
        let done = reconfig(&mut inv, "pa", vec![DeviceChange::Remove { key: akey }]).unwrap();
        assert_eq!(done.gone, vec![entry]);
        assert_eq!(done.rescan.len(), 1);
        assert_eq!(done.rescan[0].rescan_live().unwrap(), 1, "one 64 KiB block");
        assert_eq!(disk.allocated(None).unwrap(), vec![(65536, 65536)]);
        let mut b = vec![0u8; 100];
        disk.read(None, 70_000, &mut b).unwrap();
        assert_eq!(b, vec![7u8; 100]);
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
        let gone = inv.apply_reconfig(pi, plan).gone;
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
