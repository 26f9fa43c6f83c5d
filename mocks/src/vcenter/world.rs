//! The mock vCenter's shared state and the operations both faces use (SOAP handlers
//! and the admin API / Rust handle): tasks, snapshot removal with consolidation,
//! reconfiguration with hot-add devices, guest writes, NBD tickets, state dump.
//!
//! Owns locking discipline: one lock at a time (inventory, sessions, tasks, faults,
//! tickets are separate mutexes; disks lock themselves) and no file work under the
//! inventory lock except creating empty snapshot deltas.

use super::codec::{Fault, MoRef, Val};
use super::disk::ReaderKind;
use super::faults::FaultPlan;
use super::inventory::{IdGen, Inventory, ReconfigSpec};
use super::session::Sessions;
use super::tasks::{TaskState, Tasks};
use super::tickets::Tickets;
use super::vim;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Tunables of a running mock.
#[derive(Clone, Debug)]
pub struct WorldConfig {
    /// Login user.
    pub user: String,
    /// Login password.
    pub password: String,
    /// Most areas in one QueryChangedDiskAreas answer (the client pages for more).
    pub qcda_max_areas: usize,
    /// How long RemoveSnapshot waits for NBD readers of the snapshot to go away
    /// before failing with FileLocked.
    pub remove_wait: Duration,
}

/// Errors of admin operations (the admin API maps them to HTTP status codes).
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdminError {
    /// No such VM, disk or snapshot.
    #[error("not found: {0}")]
    NotFound(String),
    /// The request is not valid.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// vSphere's rules refuse it.
    #[error("{}: {}", .0.obj.ty, .0.message)]
    Fault(Fault),
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// All state of one mock vCenter.
pub struct World {
    /// Inventory.
    pub inv: Mutex<Inventory>,
    /// Sessions.
    pub sessions: Mutex<Sessions>,
    /// Tasks.
    pub tasks: Mutex<Tasks>,
    /// Fault plan.
    pub faults: Mutex<FaultPlan>,
    /// NBD tickets.
    pub tickets: Mutex<Tickets>,
    /// SHA-1 thumbprint of the ESXi NBD certificate, handed out with tickets.
    pub nbd_thumbprint: Mutex<Option<String>>,
    /// The mock VDDK's handles, audit log and faults (`/mockvddk/`).
    pub vddk: Mutex<super::vddk::VddkState>,
    /// Tunables.
    pub cfg: WorldConfig,
    /// Moref ids.
    pub ids: Arc<IdGen>,
    /// State directory.
    pub state_dir: PathBuf,
    /// The SOAP calls made with a session, oldest first (`Method Type:id`; the
    /// newest [`CALL_LOG_MAX`] only).
    pub calls: Mutex<std::collections::VecDeque<String>>,
    /// Every snapshot request the mock ran (quiesce asked, and what came of it),
    /// oldest first.
    pub snapshot_log: Mutex<Vec<super::guest::SnapshotAttempt>>,
}

/// How many SOAP calls [`World::calls`] keeps.
pub const CALL_LOG_MAX: usize = 20_000;

/// vim25 methods that change vCenter or ESXi state (the ones a dry run must never
/// call). Everything else the mock implements only reads.
pub const MUTATING_METHODS: &[&str] = &[
    "CreateSnapshot_Task",
    "RemoveSnapshot_Task",
    "ReconfigVM_Task",
    "PowerOnVM_Task",
    "PowerOffVM_Task",
    "AcquireGenericServiceTicket",
];

impl World {
    /// A world around an inventory.
    pub fn new(
        inv: Inventory,
        cfg: WorldConfig,
        session_idle: Duration,
        ticket_ttl: Duration,
        state_dir: PathBuf,
    ) -> World {
        let ids = inv.ids.clone();
        World {
            inv: Mutex::new(inv),
            sessions: Mutex::new(Sessions::new(session_idle)),
            tasks: Mutex::new(Tasks::default()),
            faults: Mutex::new(FaultPlan::default()),
            tickets: Mutex::new(Tickets::new(ticket_ttl)),
            nbd_thumbprint: Mutex::new(None),
            vddk: Mutex::new(Default::default()),
            cfg,
            ids,
            state_dir,
            calls: Mutex::new(Default::default()),
            snapshot_log: Mutex::new(Vec::new()),
        }
    }

    /// Set VMware Tools and quiesce behaviour of VM `vm` (name or moref id).
    pub fn set_guest(&self, vm: &str, guest: super::guest::GuestTools) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        inv.vms[vi].guest = guest;
        Ok(())
    }

    /// Record a SOAP call in [`World::calls`].
    pub fn log_call(&self, method: &str, this: &MoRef) {
        let mut log = lock(&self.calls);
        if log.len() >= CALL_LOG_MAX {
            log.pop_front();
        }
        log.push_back(format!("{method} {}:{}", this.ty, this.value));
    }

    /// Set a VM's `runtime.powerState` directly (`poweredOn`, `poweredOff`,
    /// `suspended`), as if the guest or another tool had changed it.
    pub fn set_power_state(&self, vm: &str, state: &str) -> Result<(), AdminError> {
        if !["poweredOn", "poweredOff", "suspended"].contains(&state) {
            return Err(AdminError::Invalid(format!(
                "power state {state:?} is not poweredOn, poweredOff or suspended"
            )));
        }
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        inv.vms[vi].power_state = state.to_string();
        Ok(())
    }

    /// Rename VM `vm` (a tenant's daily churn): its identity stays.
    pub fn rename_vm(&self, vm: &str, new_name: &str) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        if inv.vm_by_name(new_name).is_some_and(|other| other != vi) {
            return Err(AdminError::Invalid(format!(
                "a VM named {new_name:?} exists already"
            )));
        }
        inv.vms[vi].name = new_name.to_string();
        Ok(())
    }

    /// Move VM `vm` to the host named `host` (vMotion); its disks stay where they are.
    pub fn move_vm(&self, vm: &str, host: &str) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        let hi = inv
            .hosts
            .iter()
            .position(|h| h.name == host)
            .ok_or_else(|| AdminError::NotFound(format!("host {host:?}")))?;
        inv.vms[vi].host = hi;
        Ok(())
    }

    /// Create a workload VM (a tenant's new VM); returns its moref id.
    pub fn add_vm(&self, spec: &super::scenario::VmSpec) -> Result<String, AdminError> {
        lock(&self.inv).add_vm(spec).map_err(AdminError::Invalid)
    }

    /// Delete workload VM `vm` from the inventory (see `Inventory::remove_vm`).
    pub fn remove_vm(&self, vm: &str) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        inv.remove_vm(vi).map_err(AdminError::Invalid)
    }

    /// Give VM `vm` a new instance UUID: as if it had been deleted and a new VM
    /// created under the same name. Returns the new UUID.
    pub fn recreate_vm_identity(&self, vm: &str) -> Result<String, AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        let uuid = super::ids::uuid();
        inv.vms[vi].instance_uuid = uuid.clone();
        Ok(uuid)
    }

    /// Lock datastore file `file` (`[ds] folder/file.vmdk`) on behalf of `holder`
    /// (e.g. `host esx-02.lab`): hot-adding, deleting or opening it for write
    /// then fails with `FileLocked` naming the holder. `holder = None` releases it.
    pub fn set_file_lock(&self, file: &str, holder: Option<&str>) {
        let mut inv = lock(&self.inv);
        inv.file_locks.retain(|l| l.file != file);
        if let Some(h) = holder {
            inv.file_locks.push(super::inventory::FileLockEntry {
                file: file.to_string(),
                holder: h.to_string(),
            });
        }
    }

    /// Set (or with `None`, reset to half the capacity) a datastore's reported
    /// `summary.freeSpace`.
    pub fn set_datastore_free_space(
        &self,
        datastore: &str,
        bytes: Option<u64>,
    ) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let d = inv
            .datastores
            .iter_mut()
            .find(|d| d.name == datastore || d.id == datastore)
            .ok_or_else(|| AdminError::NotFound(format!("datastore {datastore:?}")))?;
        d.free_space = bytes;
        Ok(())
    }

    /// Start a task: registered as queued now, run on a blocking thread after any
    /// earlier task of the same VM (`op`), with injected latency or failure.
    pub fn spawn_task<F>(
        self: &Arc<Self>,
        rt: &tokio::runtime::Handle,
        t: TaskStart<'_>,
        work: F,
    ) -> MoRef
    where
        F: FnOnce(&Arc<World>) -> Result<Option<Val>, Fault> + Send + 'static,
    {
        let id = self.ids.next("task-");
        let entity_id = t.entity.value.clone();
        let task = lock(&self.tasks).create(id.clone(), t.method, t.entity, t.entity_name, t.user);
        let (injected, delay) = {
            let mut f = lock(&self.faults);
            (
                f.take_task_failure(t.method, &entity_id, t.entity_name),
                Duration::from_millis(f.task_ms),
            )
        };
        let op = t.op;
        let world = self.clone();
        rt.spawn_blocking(move || {
            let _serial = lock(&op);
            lock(&world.tasks).start(&id);
            if !delay.is_zero() {
                std::thread::sleep(delay);
            }
            let outcome = match injected {
                Some(f) => Err(f),
                None => work(&world),
            };
            if let Err(f) = &outcome {
                tracing::info!(task = %id, fault = f.obj.ty, "task failed: {}", f.message);
            }
            lock(&world.tasks).finish(&id, outcome);
        });
        task
    }

    /// RemoveSnapshot: lock the snapshots, wait for NBD readers to leave (up to
    /// `remove_wait`), consolidate each disk, forget the snapshots.
    pub fn remove_snapshot(&self, id: &str, remove_children: bool) -> Result<(), Fault> {
        let chosen = lock(&self.inv).begin_remove_snapshot(id, remove_children)?;
        let abort_all = |chosen: &[(String, Vec<super::inventory::SnapDisk>)]| {
            for (_, disks) in chosen {
                for d in disks {
                    d.disk.abort_remove(d.snap);
                }
            }
        };
        let deadline = Instant::now() + self.cfg.remove_wait;
        loop {
            let busy = chosen.iter().flat_map(|(_, ds)| ds).find(|d| {
                d.disk.readers(d.snap, ReaderKind::Nbd) + d.disk.readers(d.snap, ReaderKind::HotAdd)
                    > 0
            });
            match busy {
                None => break,
                Some(d) if Instant::now() >= deadline => {
                    let file = d.disk.frozen_file_name(d.snap).unwrap_or_default();
                    abort_all(&chosen);
                    return Err(vim::file_locked(
                        &file,
                        format!("Unable to access file {file} since it is locked: the snapshot's disk is still being read over NBD"),
                    ));
                }
                Some(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        for (i, (sid, disks)) in chosen.iter().enumerate() {
            for d in disks {
                if let Err(e) = d.disk.finish_remove(d.snap) {
                    abort_all(&chosen[i..]);
                    return Err(super::inventory::disk_fault(e));
                }
            }
            lock(&self.inv).forget_snapshot(sid);
        }
        lock(&self.tickets).forget_snapshots(chosen.iter().map(|(s, _)| s.as_str()));
        Ok(())
    }

    /// ReconfigVM: check the rules, create new disk files and hot-add devices,
    /// apply, then remove the device entries of detached disks and the files of
    /// destroyed ones, and rescan the live disks a proxy wrote through its device.
    pub fn reconfigure(&self, vi: usize, spec: &ReconfigSpec) -> Result<(), Fault> {
        let mut plan = lock(&self.inv).plan_reconfig(vi, spec)?;
        plan.prepare_devices()?;
        let done = lock(&self.inv).apply_reconfig(vi, plan);
        for p in done.gone {
            if let Err(e) = std::fs::remove_file(&p) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", p.display());
                }
            }
        }
        for d in done.rescan {
            d.rescan_live().map_err(super::inventory::disk_fault)?;
        }
        Ok(())
    }

    fn disk_of(
        &self,
        vm: &str,
        disk: &str,
    ) -> Result<(Arc<super::disk::Disk>, String), AdminError> {
        let inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        let d = inv.vms[vi]
            .disk_by_name(disk)
            .ok_or_else(|| AdminError::NotFound(format!("disk {disk:?} of VM {vm:?}")))?;
        Ok((d.disk.clone(), inv.vms[vi].name.clone()))
    }

    /// Write `data` at `offset` into a VM's disk as its guest would. Returns the
    /// changed range rounded to CBT blocks.
    pub fn guest_write(
        &self,
        vm: &str,
        disk: &str,
        offset: u64,
        data: &[u8],
    ) -> Result<(u64, u64), AdminError> {
        let (d, _) = self.disk_of(vm, disk)?;
        d.write(offset, data)
            .map_err(|e| AdminError::Invalid(e.to_string()))
    }

    /// Overwrite about `fraction` of a disk, in `block`-sized blocks at seeded random
    /// positions, with seeded random data. Returns the blocks written, sorted.
    pub fn guest_write_random(
        &self,
        vm: &str,
        disk: &str,
        fraction: f64,
        seed: u64,
        block: u64,
    ) -> Result<Vec<(u64, u64)>, AdminError> {
        use rand::{Rng, RngCore, SeedableRng};
        if !(0.0..=1.0).contains(&fraction) || block == 0 || block > 64 << 20 {
            return Err(AdminError::Invalid(
                "fraction must be 0..1 and block 1 byte to 64 MiB".into(),
            ));
        }
        let (d, _) = self.disk_of(vm, disk)?;
        let blocks = d.capacity() / block;
        let n = ((blocks as f64) * fraction).ceil() as u64;
        let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);
        let mut picked = std::collections::BTreeSet::new();
        while (picked.len() as u64) < n.min(blocks) {
            picked.insert(rng.gen_range(0..blocks));
        }
        let mut buf = vec![0u8; block as usize];
        let mut out = Vec::new();
        for b in picked {
            rng.fill_bytes(&mut buf);
            d.write(b * block, &buf)
                .map_err(|e| AdminError::Invalid(e.to_string()))?;
            out.push((b * block, block));
        }
        Ok(out)
    }

    /// Read a VM disk's live content or, with `snapshot` (moref id or name), a
    /// snapshot's frozen content.
    pub fn read_disk(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&str>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), AdminError> {
        let (d, snap) = {
            let inv = lock(&self.inv);
            let vi = inv
                .vm_lookup(vm)
                .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
            let v = &inv.vms[vi];
            let vd = v
                .disk_by_name(disk)
                .ok_or_else(|| AdminError::NotFound(format!("disk {disk:?} of VM {vm:?}")))?;
            let snap = match snapshot {
                None => None,
                Some(s) => {
                    let sn = v
                        .snapshots
                        .iter()
                        .find(|x| x.id == s || x.name == s)
                        .ok_or_else(|| {
                            AdminError::NotFound(format!("snapshot {s:?} of VM {vm:?}"))
                        })?;
                    Some(
                        sn.disks
                            .iter()
                            .find(|x| x.key == vd.key)
                            .map(|x| x.snap)
                            .ok_or_else(|| {
                                AdminError::NotFound(format!("disk {disk:?} in snapshot {s:?}"))
                            })?,
                    )
                }
            };
            (vd.disk.clone(), snap)
        };
        d.read(snap, offset, buf)
            .map_err(|e| AdminError::Invalid(e.to_string()))
    }

    /// BLAKE3 of a disk's live or snapshot content, and its size.
    pub fn digest(
        &self,
        vm: &str,
        disk: &str,
        snapshot: Option<&str>,
    ) -> Result<(String, u64), AdminError> {
        let size = {
            let inv = lock(&self.inv);
            let vi = inv
                .vm_lookup(vm)
                .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
            inv.vms[vi]
                .disk_by_name(disk)
                .ok_or_else(|| AdminError::NotFound(format!("disk {disk:?} of VM {vm:?}")))?
                .disk
                .capacity()
        };
        let mut h = blake3::Hasher::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            self.read_disk(vm, disk, snapshot, off, &mut buf[..n])?;
            h.update(&buf[..n]);
            off += n as u64;
        }
        Ok((h.finalize().to_hex().to_string(), size))
    }

    /// Grow a disk (refused while it has snapshots); resets its CBT.
    pub fn resize_disk(&self, vm: &str, disk: &str, capacity: u64) -> Result<(), AdminError> {
        let (d, _) = self.disk_of(vm, disk)?;
        d.resize(capacity)
            .map_err(|e| AdminError::Fault(super::inventory::disk_fault(e)))?;
        self.touch(vm);
        Ok(())
    }

    /// Reset a disk's CBT (every earlier changeId becomes invalid).
    pub fn reset_cbt(&self, vm: &str, disk: &str) -> Result<(), AdminError> {
        let (d, _) = self.disk_of(vm, disk)?;
        if !d.cbt_enabled() {
            return Err(AdminError::Invalid(format!(
                "CBT is off for disk {disk:?} of VM {vm:?}"
            )));
        }
        d.reset_cbt();
        self.touch(vm);
        Ok(())
    }

    fn touch(&self, vm: &str) {
        let mut inv = lock(&self.inv);
        if let Some(vi) = inv.vm_lookup(vm) {
            inv.vms[vi].modified = super::ids::now();
            inv.vms[vi].change_version += 1;
        }
    }

    /// Change a VM's (or proxy's) key provider; `None` decrypts it.
    pub fn set_key_provider(&self, vm: &str, provider: Option<&str>) -> Result<(), AdminError> {
        let mut inv = lock(&self.inv);
        let vi = inv
            .vm_lookup(vm)
            .ok_or_else(|| AdminError::NotFound(format!("VM {vm:?}")))?;
        inv.set_key_provider(vi, provider)
            .map_err(AdminError::Invalid)
    }

    /// Everything tests need to assert that nothing is left behind.
    pub fn state(&self) -> StateDump {
        let inv = lock(&self.inv);
        let mut open_nbd = 0;
        let vms = inv
            .vms
            .iter()
            .map(|v| {
                for s in &v.snapshots {
                    for d in &s.disks {
                        open_nbd += d.disk.readers(d.snap, ReaderKind::Nbd);
                    }
                }
                VmState {
                    name: v.name.clone(),
                    moref: v.id.clone(),
                    power_state: v.power_state.clone(),
                    host: inv.hosts[v.host].name.clone(),
                    proxy: v.proxy,
                    key_provider: v.crypto.as_ref().map(|c| c.provider.clone()),
                    cbt: v.cbt,
                    device_dir: v.device_dir.as_ref().map(|d| d.display().to_string()),
                    disks: v
                        .disks
                        .iter()
                        .map(|d| DiskState {
                            key: d.key,
                            label: d.label.clone(),
                            file_name: d.disk.live_file_name(),
                            capacity: d.disk.capacity(),
                            uuid: d.uuid.clone(),
                            change_id: d.disk.live_change_id(),
                            key_provider: d.crypto.as_ref().map(|c| c.provider.clone()),
                            datastore: inv.datastores[d.datastore].name.clone(),
                            storage_policy: d.storage_policy.clone(),
                        })
                        .collect(),
                    snapshots: v
                        .snapshots
                        .iter()
                        .map(|s| SnapshotState {
                            moref: s.id.clone(),
                            name: s.name.clone(),
                            description: s.description.clone(),
                            created: s.created.clone(),
                        })
                        .collect(),
                    attached: v
                        .attached
                        .iter()
                        .map(|a| AttachedState {
                            key: a.key,
                            writable: a.writable(),
                            file_name: a.file_name.clone(),
                            source_vm: a.source_vm.clone(),
                            source_snapshot: a.source_snapshot.clone(),
                            source_disk_key: a.source_disk_key,
                            device: a.entry.as_ref().map(|e| e.display().to_string()),
                        })
                        .collect(),
                }
            })
            .collect();
        drop(inv);
        let sessions = {
            let mut s = lock(&self.sessions);
            s.sweep();
            s.all()
                .map(|s| SessionState {
                    user: s.user.clone(),
                    key_prefix: s.key.chars().take(8).collect(),
                    views: s.views.len(),
                    pending_pages: s.pages.len(),
                    filters: s.filters.len(),
                })
                .collect()
        };
        let mut tasks = TaskCounts::default();
        for t in lock(&self.tasks).all() {
            match t.state {
                TaskState::Queued => tasks.queued += 1,
                TaskState::Running => tasks.running += 1,
                TaskState::Success => tasks.success += 1,
                TaskState::Error => tasks.error += 1,
            }
        }
        StateDump {
            scenario: lock(&self.inv).scenario.clone(),
            vms,
            sessions,
            tickets: lock(&self.tickets).live(),
            open_nbd_exports: open_nbd,
            tasks,
            faults: lock(&self.faults).clone(),
        }
    }
}

/// What a new task is about.
pub struct TaskStart<'a> {
    /// Method that creates it.
    pub method: &'a str,
    /// Entity it works on.
    pub entity: MoRef,
    /// The entity's name.
    pub entity_name: &'a str,
    /// Session user.
    pub user: &'a str,
    /// The entity's operation lock (tasks on one VM run one at a time).
    pub op: Arc<Mutex<()>>,
}

/// The state dump (`GET /admin/state`).
#[derive(Debug, Clone, Serialize)]
pub struct StateDump {
    /// Scenario name.
    pub scenario: String,
    /// VMs and proxies.
    pub vms: Vec<VmState>,
    /// Live sessions.
    pub sessions: Vec<SessionState>,
    /// Unexpired NBD tickets.
    pub tickets: usize,
    /// NBD exports currently open (readers of snapshot disks).
    pub open_nbd_exports: usize,
    /// Task counts by state.
    pub tasks: TaskCounts,
    /// Pending injected faults.
    pub faults: FaultPlan,
}

impl StateDump {
    /// The VM named `name`.
    pub fn vm(&self, name: &str) -> Option<&VmState> {
        self.vms.iter().find(|v| v.name == name)
    }
    /// Total snapshots across VMs.
    pub fn snapshot_count(&self) -> usize {
        self.vms.iter().map(|v| v.snapshots.len()).sum()
    }
    /// Total hot-added disks across VMs.
    pub fn attached_count(&self) -> usize {
        self.vms.iter().map(|v| v.attached.len()).sum()
    }
}

/// One VM in the dump.
#[derive(Debug, Clone, Serialize)]
pub struct VmState {
    /// Name.
    pub name: String,
    /// Moref id.
    pub moref: String,
    /// `runtime.powerState`.
    pub power_state: String,
    /// Host name.
    pub host: String,
    /// A scenario proxy.
    pub proxy: bool,
    /// Key provider, if encrypted.
    pub key_provider: Option<String>,
    /// CBT on.
    pub cbt: bool,
    /// Hot-add device directory (proxies).
    pub device_dir: Option<String>,
    /// Own disks.
    pub disks: Vec<DiskState>,
    /// Snapshots, oldest first.
    pub snapshots: Vec<SnapshotState>,
    /// Hot-added disks.
    pub attached: Vec<AttachedState>,
}

/// One disk in the dump.
#[derive(Debug, Clone, Serialize)]
pub struct DiskState {
    /// Device key.
    pub key: i32,
    /// Label.
    pub label: String,
    /// Live file name.
    pub file_name: String,
    /// Capacity.
    pub capacity: u64,
    /// Backing UUID.
    pub uuid: String,
    /// Live changeId (CBT on).
    pub change_id: Option<String>,
    /// Key provider, if encrypted.
    pub key_provider: Option<String>,
    /// Datastore name.
    pub datastore: String,
    /// Storage policy (profile id) it was created with.
    pub storage_policy: Option<String>,
}

/// One snapshot in the dump.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotState {
    /// Moref id.
    pub moref: String,
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Creation time.
    pub created: String,
}

/// One hot-added disk in the dump.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedState {
    /// Device key on the proxy.
    pub key: i32,
    /// Attached writable (another VM's live disk) rather than a snapshot's disk.
    pub writable: bool,
    /// Frozen (or live) file name.
    pub file_name: String,
    /// Source VM moref.
    pub source_vm: String,
    /// Source snapshot moref (empty for a live disk).
    pub source_snapshot: String,
    /// Source disk key.
    pub source_disk_key: i32,
    /// Device entry path.
    pub device: Option<String>,
}

/// One session in the dump.
#[derive(Debug, Clone, Serialize)]
pub struct SessionState {
    /// User.
    pub user: String,
    /// First characters of the session key.
    pub key_prefix: String,
    /// Container views not destroyed.
    pub views: usize,
    /// RetrievePropertiesEx tokens not fully read.
    pub pending_pages: usize,
    /// PropertyCollector filters not destroyed.
    pub filters: usize,
}

/// Task counts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct TaskCounts {
    /// Queued.
    pub queued: usize,
    /// Running.
    pub running: usize,
    /// Succeeded.
    pub success: usize,
    /// Failed.
    pub error: usize,
}
