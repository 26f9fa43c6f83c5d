//! Restore of a restore point into new disks of an existing vSphere VM (on the
//! datastore of its first disk, or one chosen with [`TargetOptions::datastore`]
//! that the VM's host mounts and that has room, under an optional storage policy),
//! or with [`TargetOptions::overwrite`] over the disks of a **powered-off** VM
//! (never a running one's: refused before any change), start to cleanup. A disk
//! file vCenter reports locked comes back as [`VmRestoreError::FileLocked`] naming
//! the file and the VM; [`plan`] is the dry run (the same reads and refusals, no
//! change). The steps: read the target VM from vCenter, run the key-provider-aware selector for
//! the disks to be created (the same rules as backups: HotAdd only through a proxy
//! VM encrypted under the target VM's key provider, else NBD-SSL when policy allows,
//! never clear-text NBD for an encrypted VM) and refuse *before changing anything*
//! when no transport is allowed; then per disk create a new disk on the VM
//! (encrypted under the VM's key when the VM is encrypted), write it — HotAdd: attach
//! it writable to this proxy VM and write the device, then detach; NBD(-SSL): write
//! through a write ticket — and record mode, reason and bytes. A HotAdd that vCenter
//! refuses with a crypto fault fails over to NBD-SSL when policy allows. A VM not
//! encrypted under the tenant's key provider (when the tenant names one) is refused
//! before anything changes. On any failure or cancellation every disk this job
//! created is detached and destroyed, so no half-written disk is left on the VM,
//! and the error says what cleanup did.
//!
//! With VDDK settings the writes go through VMware's VDDK instead, exactly as
//! backups do: VDDK is loaded and PrepareForAccess announced for the target VM
//! before anything changes, and each new disk is opened writable in exactly the
//! selector's mode. VDDK opens a disk for write by HotAdd only with a snapshot
//! ("With SAN/HotAdd, opening for write requires a pre-existing snapshot"), so a
//! HotAdd disk is written under a `ferry-<job id>` snapshot of the target VM taken
//! after the new disk exists: the new disk's base is written through the snapshot,
//! then the snapshot is removed, which consolidates the (empty) delta of the new
//! disk into it. ferry removes rather than reverts: reverting a VM to a snapshot
//! taken without memory powers it off and discards what its guest wrote to its
//! other disks meanwhile, which a restore into new disks of a running VM must not
//! do. A HotAdd VDDK refuses fails over to NBD-SSL through VDDK when policy allows
//! (without a snapshot: NFC writes the live disk).
//!
//! Owns the order of control-plane steps of a VM restore and its cleanup. Must not:
//! decide transports itself (that is [`crate::transport::select`]), know SOAP (that
//! is [`crate::vsphere`]), touch disks it did not create, or open the restore point
//! (the caller hands it over opened, with its keys).

use super::vm::{
    proxy_info, vddk_refused_mode, NbdSettings, ThisProxy, VddkJob, VddkSettings, VmJobError,
};
use super::JobError;
use crate::pipeline::restore::{restore_disk, KeyTable};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::progress::Progress;
use crate::repo::lock::LockMode;
use crate::repo::manifest::{DiskSummary, ManifestHeader};
use crate::repo::{OpenPoint, Repository};
use crate::transport::hotadd::HotAddTarget;
use crate::transport::nbd::NbdTarget;
use crate::transport::select::{self, DiskInfo, Mode, Outcome, Policy, Selection, VmInfo};
use crate::transport::{DiskTarget, SourceError};
use crate::vsphere::newdisk::{restore_file_name, split_datastore_path};
use crate::vsphere::{AttachedDisk, Client, MoRef, NewDiskSpec, VirtualDisk, Vm, VsphereError};
use serde::Serialize;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Failures of a restore into a VM. Each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmRestoreError {
    /// vCenter refused or failed (boxed: it is large).
    #[error(transparent)]
    Vsphere(Box<VsphereError>),
    /// The selector found no allowed transport for some disk: nothing was changed.
    #[error("restore into VM {vm} refused before any change: {summary}")]
    Refused {
        /// VM name.
        vm: String,
        /// Why, disk by disk, candidate by candidate.
        summary: String,
    },
    /// The new disk could not be opened for writing by the chosen transport (and
    /// no fallback applied).
    #[error("new disk for disk {disk} of VM {vm}: {source}")]
    Target {
        /// VM name.
        vm: String,
        /// Which disk (number and label in the point).
        disk: String,
        /// The error.
        source: SourceError,
    },
    /// Restore pipeline or repository.
    #[error(transparent)]
    Job(#[from] JobError),
    /// VMware's VDDK could not be loaded, initialised or used for the VM.
    #[error("VDDK: {0}")]
    Vddk(#[from] crate::transport::vddk::VddkError),
    /// The restore point has no disk with this number.
    #[error("restore point {point} has no disk {disk}")]
    NoSuchDisk {
        /// Point id.
        point: String,
        /// The disk number asked for.
        disk: u32,
    },
    /// `--overwrite` into a VM that is not powered off: ferry never writes over
    /// the disks of a running (or suspended) VM. Nothing was changed.
    #[error("restore into VM {vm} refused before any change: it is {power_state}, and ferry never overwrites the disks of a VM that is not powered off; power the VM off and retry, or restore into new disks of it (without --overwrite) or into another VM")]
    PoweredOn {
        /// VM name.
        vm: String,
        /// `runtime.powerState` as vCenter reported it (`poweredOn`, `suspended`, or
        /// `unknown`).
        power_state: String,
    },
    /// The datastore for the new disks cannot take them. Nothing was changed.
    #[error("restore into VM {vm} refused before any change: datastore {datastore}: {problem}")]
    Datastore {
        /// VM name.
        vm: String,
        /// Datastore name.
        datastore: String,
        /// What is wrong and what to do.
        problem: String,
    },
    /// vCenter or the ESXi host refused a disk file because something else holds
    /// a lock on it (`FileLocked`).
    #[error("disk file {file} of VM {vm} is locked ({message}); another ESXi host, a running VM that has the file open, or another backup or consolidation holds it. Find the holder (`vmkfstools -D` on the file shows the lock owner's MAC), power off or unregister the VM that has it open or wait for the other job to end, then retry")]
    FileLocked {
        /// VM name.
        vm: String,
        /// The datastore path of the file.
        file: String,
        /// vCenter's message (with what ferry was doing).
        message: String,
    },
    /// Bad request, configuration or an answer of vCenter that ferry will not
    /// write into.
    #[error("{0}")]
    Invalid(String),
    /// A failure after disks were created; `cleanup` says what was removed (or what
    /// is left for the operator).
    #[error("{cause}; {cleanup}")]
    Failed {
        /// The failure.
        cause: Box<VmRestoreError>,
        /// What the cleanup did.
        cleanup: String,
    },
}

impl VmRestoreError {
    /// Whether the restore was cancelled.
    pub fn is_cancelled(&self) -> bool {
        match self {
            VmRestoreError::Job(j) => j.is_cancelled(),
            VmRestoreError::Failed { cause, .. } => cause.is_cancelled(),
            _ => false,
        }
    }

    /// The failure itself, without the cleanup note.
    pub fn cause(&self) -> &VmRestoreError {
        match self {
            VmRestoreError::Failed { cause, .. } => cause.cause(),
            e => e,
        }
    }
}

impl From<VsphereError> for VmRestoreError {
    fn from(e: VsphereError) -> Self {
        VmRestoreError::Vsphere(Box::new(e))
    }
}

impl From<VmJobError> for VmRestoreError {
    fn from(e: VmJobError) -> Self {
        match e {
            VmJobError::Vsphere(v) => v.into(),
            VmJobError::Job(j) => VmRestoreError::Job(j),
            VmJobError::Vddk(v) => VmRestoreError::Vddk(v),
            e => VmRestoreError::Invalid(e.to_string()),
        }
    }
}

/// The VM to restore into.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmRef {
    /// By name (the CLI).
    Name(String),
    /// By managed object reference id, e.g. `vm-42` (the agent API).
    Moref(String),
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmRef::Name(n) => write!(f, "{n}"),
            VmRef::Moref(m) => write!(f, "{m}"),
        }
    }
}

/// A restore into a VM.
#[derive(Clone, Debug)]
pub struct VmRestoreRequest {
    /// Job id (names the new disk files `ferry-restore-<job id>-disk<n>.vmdk`).
    pub job_id: String,
    /// Target VM.
    pub target: VmRef,
    /// Disk numbers of the point to restore (all when `None`), one new disk each.
    pub disks: Option<Vec<u32>>,
    /// Transport policy.
    pub policy: Policy,
    /// NBD settings.
    pub nbd: NbdSettings,
    /// Data-plane settings.
    pub pipeline: PipelineConfig,
    /// Repository lock wait (a prune may hold it).
    pub lock_wait: Duration,
    /// How long to wait for a hot-added disk to appear.
    pub hotadd_wait: Duration,
    /// The tenant's key provider, when configured: the target VM must be
    /// encrypted under it (a tenant's data never lands in another tenant's VM or
    /// in an unencrypted one).
    pub required_key_provider: Option<String>,
    /// Carry every write through VDDK instead of the native paths (HotAdd then
    /// writes under a snapshot of the target VM, see the module documentation).
    pub vddk: Option<VddkSettings>,
    /// Where the disks go and whether existing disks are overwritten.
    pub options: TargetOptions,
}

/// Where a restore into a VM puts the disks (`ferry restore --vm` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TargetOptions {
    /// Datastore for the new disks (by name); `None`: the datastore of the VM's
    /// first disk. Must be mounted on the VM's host and have room for them.
    pub datastore: Option<String>,
    /// Storage policy (SPBM profile id) for the new disks; `None`: the
    /// datastore's default policy.
    pub storage_policy: Option<String>,
    /// Write disk N of the point over the VM's disk N (in device key order)
    /// instead of into new disks: only into a powered-off VM without snapshots.
    pub overwrite: bool,
}

impl TargetOptions {
    /// Check the options themselves (no vCenter needed).
    pub fn validate(&self) -> Result<(), VmRestoreError> {
        if let Some(d) = &self.datastore {
            if d.trim().is_empty() || d.contains(['[', ']', '/']) {
                return Err(VmRestoreError::Invalid(format!(
                    "--datastore {d:?}: give the datastore's name as vCenter shows it (no brackets or path)"
                )));
            }
        }
        if let Some(p) = &self.storage_policy {
            let p = p.trim();
            if p.is_empty() || p.len() > 128 || p.chars().any(|c| c.is_control()) {
                return Err(VmRestoreError::Invalid(format!(
                    "--storage-policy {p:?}: give the policy's profile id (`govc storage.policy.ls -i` lists them)"
                )));
            }
        }
        if self.overwrite && (self.datastore.is_some() || self.storage_policy.is_some()) {
            return Err(VmRestoreError::Invalid(
                "--overwrite writes over the VM's existing disks where they are: --datastore and --storage-policy apply to new disks only".into(),
            ));
        }
        Ok(())
    }
}

/// Why `vm` may not receive data of a tenant whose key provider is `required`
/// (pure): it must be encrypted under exactly that provider.
pub fn key_provider_mismatch(vm: &Vm, required: Option<&str>) -> Option<String> {
    let want = required.map(str::trim).filter(|p| !p.is_empty())?;
    let have = vm.key_id.as_ref().and_then(|k| k.provider_id.as_deref());
    match have {
        Some(p) if p == want => None,
        Some(p) => Some(format!(
            "VM {} is encrypted under key provider {p}, but the restore point belongs to the tenant of key provider {want}; restore into a VM of that provider",
            vm.name
        )),
        None => Some(format!(
            "VM {} is not encrypted (or its key provider is unknown), but the restore point belongs to the tenant of key provider {want}; restore into a VM encrypted under {want}",
            vm.name
        )),
    }
}

/// What happened to one disk.
#[derive(Clone, Debug, Serialize)]
pub struct RestoredDisk {
    /// Disk number in the restore point.
    pub disk: u32,
    /// Its label in the restore point.
    pub label: String,
    /// Device key of the new disk on the VM.
    pub new_disk_key: i32,
    /// Datastore path of the new disk.
    pub new_file: String,
    /// Mode used.
    pub mode: Mode,
    /// Why (selector decision, and any fallback).
    pub reason: String,
    /// Bytes written (zero chunks of the new, zero-filled disk are skipped).
    pub bytes_written: u64,
    /// Seconds spent on this disk (creation, transport, data).
    pub seconds: f64,
}

/// Result of a restore into a VM.
#[derive(Clone, Debug, Serialize)]
pub struct VmRestoreOutcome {
    /// The VM's name.
    pub vm: String,
    /// Its managed object reference id.
    pub moref: String,
    /// The selector's plan for the new disks.
    pub selection: Selection,
    /// One entry per disk, in disk order.
    pub disks: Vec<RestoredDisk>,
}

/// Where the new disks go: the datastore and folder of the VM's first disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Datastore object.
    pub datastore: MoRef,
    /// Datastore name.
    pub datastore_name: String,
    /// The VM's folder on it.
    pub folder: String,
    /// Why this datastore.
    pub reason: String,
}

/// The datastore and folder of the VM's first disk that has both (pure).
pub fn placement(vm: &Vm) -> Option<Placement> {
    let mut disks: Vec<&VirtualDisk> = vm.disks.iter().collect();
    disks.sort_by_key(|d| d.key);
    disks.into_iter().find_map(|d| {
        let ds = d.datastore.clone()?;
        let (name, folder) = split_datastore_path(&d.file_name)?;
        Some(Placement {
            datastore: ds,
            datastore_name: name.to_string(),
            folder: folder.to_string(),
            reason: format!(
                "default: the datastore of the VM's first disk ({})",
                d.file_name
            ),
        })
    })
}

/// Selector inputs for restoring `disks` into new disks of `vm` on `datastore`
/// (pure): the VM as it is, with one disk per restored disk, encrypted exactly when
/// the VM is (the new disk is created under the VM's key), keyed by disk number.
pub fn restore_vm_info(vm: &Vm, disks: &[DiskSummary], datastore: &MoRef) -> VmInfo {
    let provider = vm.key_id.as_ref().and_then(|k| k.provider_id.clone());
    VmInfo {
        name: vm.name.clone(),
        moref: vm.moref.value.clone(),
        host: vm
            .host
            .as_ref()
            .map(|h| h.value.clone())
            .unwrap_or_default(),
        encrypted: vm.key_id.is_some(),
        key_provider: provider.clone(),
        disks: disks
            .iter()
            .map(|d| DiskInfo {
                key: d.disk as i32,
                label: format!("new disk for disk {} ({})", d.disk, d.label),
                datastore: datastore.value.clone(),
                encrypted: vm.key_id.is_some(),
                key_provider: provider.clone(),
            })
            .collect(),
    }
}

/// The disks of the point with `header` to restore: `wanted` (sorted) or all.
pub fn wanted_disks(
    header: &ManifestHeader,
    wanted: Option<&[u32]>,
) -> Result<Vec<DiskSummary>, VmRestoreError> {
    let all = &header.disks;
    let mut out = match wanted {
        None => all.clone(),
        Some(w) => w
            .iter()
            .map(|n| {
                all.iter().find(|d| d.disk == *n).cloned().ok_or_else(|| {
                    VmRestoreError::NoSuchDisk {
                        point: header.point_id.clone(),
                        disk: *n,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    out.sort_by_key(|d| d.disk);
    out.dedup_by_key(|d| d.disk);
    if out.is_empty() {
        return Err(VmRestoreError::Invalid(format!(
            "restore point {} has no disks to restore",
            header.point_id
        )));
    }
    Ok(out)
}

/// What the job created and still has to clean up on failure.
#[derive(Default)]
struct Created {
    /// New disks on the target VM.
    disks: Vec<VirtualDisk>,
    /// Of those, attached to this proxy right now.
    attached: Vec<AttachedDisk>,
    /// The snapshot of the target VM a VDDK HotAdd writes under, while it exists.
    snapshot: Option<MoRef>,
    /// Existing disks of the (powered-off) VM this job began to write over.
    overwritten: Vec<String>,
}

/// What a restore into a VM would do, disk by disk (`--dry-run`), and what it
/// refuses. Nothing is changed to produce it.
#[derive(Clone, Debug, Serialize)]
pub struct RestorePlan {
    /// Target VM name.
    pub vm: String,
    /// Its moref id.
    pub moref: String,
    /// `runtime.powerState` (`None`: not reported).
    pub power_state: Option<String>,
    /// One entry per restored disk, in disk order.
    pub disks: Vec<PlannedDisk>,
    /// Why the restore would be refused (empty: it would run).
    pub refusals: Vec<String>,
    /// The selector's full decision (every candidate, for `--json`).
    pub selection: Selection,
}

impl RestorePlan {
    /// Whether the restore would run.
    pub fn is_runnable(&self) -> bool {
        self.refusals.is_empty()
    }

    /// The plan for an operator: one block per disk, then the refusals.
    pub fn render(&self) -> String {
        let mut s = format!(
            "restore into VM {} ({}), power state {}\n",
            self.vm,
            self.moref,
            self.power_state.as_deref().unwrap_or("unknown")
        );
        for d in &self.disks {
            s.push_str(&format!(
                "disk {} {} ({} bytes) -> {} {}\n  datastore: {} ({})\n  storage policy: {}\n  transport: {}\n",
                d.disk,
                d.label,
                d.size,
                match d.action {
                    DiskAction::New => "NEW disk",
                    DiskAction::Overwrite => "OVERWRITE",
                },
                d.target_file,
                d.datastore,
                d.datastore_reason,
                d.storage_policy
                    .as_deref()
                    .unwrap_or("(none: the datastore's default)"),
                match (&d.proxy, d.mode) {
                    (Some(p), Some(m)) => {
                        format!("{m} through proxy {p} (why: {})", d.transport_reason)
                    }
                    _ => format!("REFUSED: {}", d.transport_reason),
                }
            ));
        }
        if self.refusals.is_empty() {
            s.push_str("would run");
        } else {
            s.push_str("REFUSED:");
            for r in &self.refusals {
                s.push_str(&format!("\n  - {r}"));
            }
        }
        s
    }
}

/// New disk or an existing one written over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskAction {
    /// A new disk is created on the VM.
    New,
    /// The VM's existing disk is written over (`--overwrite`, powered-off VM).
    Overwrite,
}

/// One disk of a [`RestorePlan`].
#[derive(Clone, Debug, Serialize)]
pub struct PlannedDisk {
    /// Disk number in the restore point.
    pub disk: u32,
    /// Its label in the point.
    pub label: String,
    /// Its size, bytes.
    pub size: u64,
    /// New disk or overwrite.
    pub action: DiskAction,
    /// Datastore path written: the new file's, or the overwritten disk's.
    pub target_file: String,
    /// Datastore name.
    pub datastore: String,
    /// Why that datastore (flag or default).
    pub datastore_reason: String,
    /// Storage policy (profile id) for a new disk.
    pub storage_policy: Option<String>,
    /// Proxy chosen by the selector (`None`: refused).
    pub proxy: Option<String>,
    /// Transport chosen by the selector (`None`: refused).
    pub mode: Option<Mode>,
    /// The selector's reason (or refusal).
    pub transport_reason: String,
}

/// Plan `disks` into `req.target` on this proxy without changing anything
/// (`--dry-run`): the same reads, checks and selector as [`restore_vm`] before
/// its first change, with every refusal collected instead of returned.
pub async fn plan(
    client: &Client,
    me: &ThisProxy,
    req: &VmRestoreRequest,
    disks: &[DiskSummary],
) -> Result<RestorePlan, VmRestoreError> {
    let p = prepare(client, me, req, disks).await?;
    let mut refusals: Vec<String> = p.refusals.iter().map(|e| e.to_string()).collect();
    if let Some(summary) = p.selection.refusal_summary() {
        refusals.push(
            VmRestoreError::Refused {
                vm: p.vm.name.clone(),
                summary,
            }
            .to_string(),
        );
    }
    let planned = disks
        .iter()
        .zip(&p.targets)
        .map(|(d, t)| {
            let decision = p
                .selection
                .disks
                .iter()
                .find(|x| x.disk_key == d.disk as i32);
            let (proxy, mode) = match decision.map(|x| &x.outcome) {
                Some(Outcome::Assigned { proxy, mode }) => (Some(proxy.clone()), Some(*mode)),
                _ => (None, None),
            };
            let (action, target_file, datastore, datastore_reason, storage_policy) = match t {
                DiskTargetPlan::New => (
                    DiskAction::New,
                    restore_file_name(
                        &p.place.datastore_name,
                        &p.place.folder,
                        &req.job_id,
                        d.disk,
                    ),
                    p.place.datastore_name.clone(),
                    p.place.reason.clone(),
                    req.options.storage_policy.clone(),
                ),
                DiskTargetPlan::Overwrite(v) => (
                    DiskAction::Overwrite,
                    v.file_name.clone(),
                    split_datastore_path(&v.file_name)
                        .map(|(ds, _)| ds.to_string())
                        .unwrap_or_default(),
                    format!("--overwrite: where the VM's {} is", v.label),
                    None,
                ),
            };
            PlannedDisk {
                disk: d.disk,
                label: d.label.clone(),
                size: d.size,
                action,
                target_file,
                datastore,
                datastore_reason,
                storage_policy,
                proxy,
                mode,
                transport_reason: decision
                    .map(|x| x.reason_summary())
                    .unwrap_or_else(|| "not planned".into()),
            }
        })
        .collect();
    Ok(RestorePlan {
        vm: p.vm.name.clone(),
        moref: p.vm.moref.value.clone(),
        power_state: p.vm.power_state.clone(),
        disks: planned,
        refusals,
        selection: p.selection,
    })
}

/// Per restored disk: a new disk, or the VM's existing disk written over.
#[derive(Clone, Debug)]
enum DiskTargetPlan {
    New,
    Overwrite(Box<VirtualDisk>),
}

/// What a restore reads before its first change, shared by [`plan`] and
/// [`restore_vm`].
struct Prepared {
    vm: Vm,
    place: Placement,
    proxy_vm: Option<Vm>,
    selection: Selection,
    /// One per restored disk, in the same order.
    targets: Vec<DiskTargetPlan>,
    /// Refusals found before any change (the restore returns the first).
    refusals: Vec<VmRestoreError>,
}

/// The target VM (refused when it is a template or outside
/// `required_key_provider`), where new disks go (checked: datastore visible
/// from the VM's host, with room), which disks are overwritten (only in a
/// powered-off VM), this proxy, and the selector's plan for `disks`.
async fn prepare(
    client: &Client,
    me: &ThisProxy,
    req: &VmRestoreRequest,
    disks: &[DiskSummary],
) -> Result<Prepared, VmRestoreError> {
    req.options.validate()?;
    let vm = target_vm(client, &req.target).await?;
    if let Some(summary) = key_provider_mismatch(&vm, req.required_key_provider.as_deref()) {
        tracing::warn!(%summary, "restore refused before any change");
        return Err(VmRestoreError::Refused {
            vm: vm.name.clone(),
            summary,
        });
    }
    let mut refusals = Vec::new();
    let default_place = placement(&vm);
    let (targets, new_bytes) = if req.options.overwrite {
        if let Some(e) = power_refusal(&vm) {
            refusals.push(e);
        }
        if !vm.snapshots.is_empty() || vm.current_snapshot.is_some() {
            refusals.push(VmRestoreError::Invalid(format!(
                "restore into VM {} refused before any change: the VM has snapshots, and overwriting its disks would write under them; delete or consolidate its snapshots first, or restore into new disks (without --overwrite)",
                vm.name
            )));
        }
        let (t, mut problems) = overwrite_targets(&vm, disks);
        refusals.append(&mut problems);
        (t, 0)
    } else {
        (
            vec![DiskTargetPlan::New; disks.len()],
            disks.iter().map(|d| d.size).sum::<u64>(),
        )
    };
    let place = match &req.options.datastore {
        Some(name) if !req.options.overwrite => {
            match chosen_datastore(client, &vm, name, new_bytes, default_place.as_ref()).await? {
                Ok(p) => p,
                Err(e) => {
                    refusals.push(e);
                    // The plan still shows where the disks would have gone.
                    Placement {
                        datastore: MoRef::new("Datastore", "?"),
                        datastore_name: name.clone(),
                        folder: default_place
                            .as_ref()
                            .map(|p| p.folder.clone())
                            .unwrap_or_else(|| vm.name.clone()),
                        reason: "from --datastore (refused, see below)".into(),
                    }
                }
            }
        }
        _ => {
            let p = default_place.clone().ok_or_else(|| no_placement(&vm))?;
            if new_bytes > 0 {
                if let Some(e) = room_refusal(client, &vm, &p, new_bytes).await? {
                    refusals.push(e);
                }
            }
            p
        }
    };
    let (mut proxy, proxy_vm) = proxy_info(client, me).await?;
    proxy.free_slots = slots_for(proxy.free_slots, disks.len());
    let mut info = restore_vm_info(&vm, disks, &place.datastore);
    for (d, t) in info.disks.iter_mut().zip(&targets) {
        if let DiskTargetPlan::Overwrite(v) = t {
            d.label = format!("{} (overwritten with disk {})", v.label, d.key);
            d.datastore = v
                .datastore
                .as_ref()
                .map(|m| m.value.clone())
                .unwrap_or_default();
            d.encrypted = vm.key_id.is_some() || v.key_id.is_some();
            d.key_provider = v
                .key_id
                .as_ref()
                .and_then(|k| k.provider_id.clone())
                .or_else(|| d.key_provider.clone());
        }
    }
    let selection = select::select(&info, &[proxy], &req.policy);
    Ok(Prepared {
        vm,
        place,
        proxy_vm,
        selection,
        targets,
        refusals,
    })
}

/// Why `vm`'s disks may not be overwritten now (pure): only a powered-off VM's.
pub fn power_refusal(vm: &Vm) -> Option<VmRestoreError> {
    match vm.power_state.as_deref() {
        Some("poweredOff") => None,
        other => Some(VmRestoreError::PoweredOn {
            vm: vm.name.clone(),
            power_state: other.unwrap_or("unknown").to_string(),
        }),
    }
}

/// The VM's disk that disk N of the point overwrites: its N-th disk in device
/// key order (the order backups number them), big enough (pure). Problems are
/// refusals.
fn overwrite_targets(vm: &Vm, disks: &[DiskSummary]) -> (Vec<DiskTargetPlan>, Vec<VmRestoreError>) {
    let mut own: Vec<&VirtualDisk> = vm.disks.iter().collect();
    own.sort_by_key(|d| d.key);
    let mut problems = Vec::new();
    let targets = disks
        .iter()
        .map(|d| match own.get(d.disk as usize) {
            Some(v) if v.capacity_bytes >= d.size => {
                DiskTargetPlan::Overwrite(Box::new((*v).clone()))
            }
            Some(v) => {
                problems.push(VmRestoreError::Invalid(format!(
                    "restore into VM {} refused before any change: its {} ({}) has {} bytes, disk {} of the point needs {}; grow the VM's disk or restore into new disks (without --overwrite)",
                    vm.name, v.label, v.file_name, v.capacity_bytes, d.disk, d.size
                )));
                DiskTargetPlan::Overwrite(Box::new((*v).clone()))
            }
            None => {
                problems.push(VmRestoreError::Invalid(format!(
                    "restore into VM {} refused before any change: it has {} disk(s), so there is no disk to overwrite with disk {} of the point; restore that disk into a new disk (without --overwrite)",
                    vm.name,
                    own.len(),
                    d.disk
                )));
                DiskTargetPlan::New
            }
        })
        .collect();
    (targets, problems)
}

/// The datastore named by `--datastore`: it must exist, be mounted on the VM's
/// host, be accessible and have room for `bytes` of new disks. The outer error
/// is vCenter failing; the inner one a refusal.
async fn chosen_datastore(
    client: &Client,
    vm: &Vm,
    name: &str,
    bytes: u64,
    default: Option<&Placement>,
) -> Result<Result<Placement, VmRestoreError>, VmRestoreError> {
    let all = client.datastores().await?;
    let refuse = |problem: String| {
        Ok(Err(VmRestoreError::Datastore {
            vm: vm.name.clone(),
            datastore: name.to_string(),
            problem,
        }))
    };
    let visible = visible_datastores(client, vm).await?;
    let names_of = |refs: &[MoRef]| {
        let mut n: Vec<&str> = all
            .iter()
            .filter(|d| refs.contains(&d.moref))
            .map(|d| d.name.as_str())
            .collect();
        n.sort_unstable();
        n.join(", ")
    };
    let Some(ds) = all.iter().find(|d| d.name == name) else {
        return refuse(format!(
            "vCenter has no datastore of that name; the VM's host mounts: {}",
            names_of(&visible)
        ));
    };
    if !visible.contains(&ds.moref) {
        return refuse(format!(
            "not mounted on host {} where the VM runs, so the VM could not use a disk on it; choose one of: {}",
            vm.host.as_ref().map(|h| h.value.as_str()).unwrap_or("?"),
            names_of(&visible)
        ));
    }
    if ds.accessible == Some(false) {
        return refuse(
            "vCenter reports it inaccessible; fix the datastore or choose another".into(),
        );
    }
    if let Some(e) = room(vm, &ds.name, ds.free_space, bytes) {
        return Ok(Err(e));
    }
    Ok(Ok(Placement {
        datastore: ds.moref.clone(),
        datastore_name: ds.name.clone(),
        // The VM's own folder name, as vSphere names a VM's files.
        folder: default
            .map(|p| p.folder.clone())
            .unwrap_or_else(|| vm.name.clone()),
        reason: "from --datastore".into(),
    }))
}

/// The datastores the VM's host mounts (all of vCenter's when the host is not
/// reported).
async fn visible_datastores(client: &Client, vm: &Vm) -> Result<Vec<MoRef>, VmRestoreError> {
    let hosts = client.hosts().await?;
    Ok(
        match vm
            .host
            .as_ref()
            .and_then(|h| hosts.iter().find(|x| &x.moref == h))
        {
            Some(h) => h.datastores.clone(),
            None => client
                .datastores()
                .await?
                .into_iter()
                .map(|d| d.moref)
                .collect(),
        },
    )
}

/// A refusal when the default datastore `p` lacks room for `bytes`.
async fn room_refusal(
    client: &Client,
    vm: &Vm,
    p: &Placement,
    bytes: u64,
) -> Result<Option<VmRestoreError>, VmRestoreError> {
    let free = client
        .datastores()
        .await?
        .into_iter()
        .find(|d| d.moref == p.datastore)
        .and_then(|d| d.free_space);
    Ok(room(vm, &p.datastore_name, free, bytes))
}

/// Whether `bytes` of new (thin) disks fit into the reported free space (pure):
/// ferry asks for the full size, so a restore never fills a datastore up.
fn room(vm: &Vm, datastore: &str, free: Option<u64>, bytes: u64) -> Option<VmRestoreError> {
    match free {
        Some(free) if free < bytes => Some(VmRestoreError::Datastore {
            vm: vm.name.clone(),
            datastore: datastore.to_string(),
            problem: format!(
                "{free} bytes free, the new disks need {bytes}; free space on it or choose another datastore with --datastore"
            ),
        }),
        _ => None,
    }
}

/// Disks are restored one after another, so one reserved slot serves them all.
fn slots_for(free: u32, disks: usize) -> u32 {
    if free == 0 {
        0
    } else {
        free.max(disks as u32)
    }
}

fn no_placement(vm: &Vm) -> VmRestoreError {
    VmRestoreError::Invalid(format!(
        "VM {} has no disk whose datastore and folder ferry can place the new disks next to",
        vm.name
    ))
}

async fn target_vm(client: &Client, target: &VmRef) -> Result<Vm, VmRestoreError> {
    let vm = match target {
        VmRef::Name(n) => client.vm_by_name(n).await?,
        VmRef::Moref(m) => client.vm(&MoRef::new("VirtualMachine", m)).await?,
    };
    if vm.template {
        return Err(VmRestoreError::Invalid(format!(
            "VM {} is a template; restore into a VM",
            vm.name
        )));
    }
    Ok(vm)
}

/// Restore `disks` of the opened `point` (from `repo`) into new disks of the target
/// VM. Cleanup (detach, and on failure destroy) runs whatever happens inside; cancel
/// through `progress`.
pub async fn restore_vm(
    client: &Client,
    me: &ThisProxy,
    repo: Arc<Repository>,
    point: Arc<OpenPoint>,
    req: &VmRestoreRequest,
    progress: Arc<Progress>,
) -> Result<VmRestoreOutcome, VmRestoreError> {
    let span = tracing::info_span!("vm_restore", job = %req.job_id, vm = %req.target, point = %point.header.point_id);
    let _g = span.enter();
    let disks = wanted_disks(&point.header, req.disks.as_deref())?;
    let Prepared {
        vm,
        place,
        proxy_vm,
        selection,
        targets,
        refusals,
    } = prepare(client, me, req, &disks).await?;
    if let Some(e) = refusals.into_iter().next() {
        tracing::warn!(error = %e, "restore refused before any change");
        return Err(e);
    }
    if let Some(summary) = selection.refusal_summary() {
        tracing::warn!(%summary, "restore refused before any change");
        return Err(VmRestoreError::Refused {
            vm: vm.name.clone(),
            summary,
        });
    }
    for d in &selection.disks {
        tracing::info!(disk = d.disk_key, decision = %d.reason_summary(), "transport chosen");
    }
    if progress.cancelled() {
        return Err(JobError::Pipeline(PipelineError::Cancelled).into());
    }
    // A prune must not delete chunks while they are read.
    let lock = {
        let (repo, wait) = (repo.clone(), req.lock_wait);
        tokio::task::spawn_blocking(move || repo.lock(LockMode::Shared, "restore", wait))
            .await
            .map_err(|e| VmRestoreError::Invalid(format!("repository lock thread failed: {e}")))?
            .map_err(JobError::from)?
    };
    // VDDK is loaded and the access announced before anything changes, so a
    // missing or broken library leaves nothing to clean up.
    let vddk = match &req.vddk {
        Some(settings) => Some(VddkJob::start(client, &vm, settings).await?),
        None => None,
    };
    Progress::add(&progress.total, disks.iter().map(|d| d.size).sum());
    let mut created = Created::default();
    let ctx = Ctx {
        client,
        vm: &vm,
        proxy_vm: proxy_vm.as_ref(),
        me,
        place: &place,
        targets: &targets,
        selection: &selection,
        repo,
        point,
        req,
        progress,
        vddk: vddk.as_ref(),
    };
    let result = ctx.restore_all(&disks, &mut created).await;
    drop(lock);
    let result = match result {
        Ok(out) => Ok(out),
        Err(cause) => {
            let cleanup = cleanup(client, &vm, &mut created).await;
            tracing::error!(error = %cause, %cleanup, "restore into VM failed");
            Err(VmRestoreError::Failed {
                cause: Box::new(cause),
                cleanup,
            })
        }
    };
    // EndAccess once every VDDK handle is closed and the snapshot is gone.
    if let Some(v) = vddk {
        v.end().await;
    }
    match result {
        // Every hot-added disk was detached (every VDDK handle closed, every
        // snapshot removed) right after it was written.
        Ok(out) => Ok(VmRestoreOutcome {
            vm: vm.name.clone(),
            moref: vm.moref.value.clone(),
            selection,
            disks: out,
        }),
        Err(e) => Err(e),
    }
}

/// Destroy the disks the restore job `job_id` (with this proxy's prefix, as in the
/// disks' file names) created on the VM `moref` and never finished: the agent's
/// orphan sweep calls this for restore jobs a crash interrupted, after detaching
/// them from this proxy. Returns the removed disks' file names; a VM that no
/// longer exists has nothing to remove.
pub async fn remove_interrupted_disks(
    client: &Client,
    moref: &str,
    job_id: &str,
) -> Result<Vec<String>, VsphereError> {
    let vm = match client.vm(&MoRef::new("VirtualMachine", moref)).await {
        Ok(vm) => vm,
        Err(VsphereError::ObjectNotFound { .. } | VsphereError::NotFound { .. }) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let mut removed = Vec::new();
    for d in vm
        .disks
        .iter()
        .filter(|d| crate::vsphere::newdisk::is_restore_disk_of(&d.file_name, job_id))
    {
        client.destroy_disk(&vm.moref, d).await?;
        tracing::info!(vm = %vm.name, file = %d.file_name, "removed a restore disk an interrupted job left");
        removed.push(d.file_name.clone());
    }
    Ok(removed)
}

/// Detach every disk still attached to this proxy, remove the job's snapshot of
/// the VM (a disk with snapshots cannot be destroyed), then destroy every disk the
/// job created on the VM. Returns what happened, for the error message.
async fn cleanup(client: &Client, vm: &Vm, created: &mut Created) -> String {
    let mut left = Vec::new();
    for a in created.attached.drain(..).rev() {
        if let Err(e) = client.detach_disk(&a).await {
            tracing::error!(error = %e, file = %a.file_name, "detaching a restore disk from this proxy failed; the orphan sweep will retry");
            left.push(format!(
                "{} is still attached to the proxy VM ({e})",
                a.file_name
            ));
        }
    }
    if let Some(snap) = created.snapshot.take() {
        if let Err(e) = client.remove_snapshot(&snap).await {
            tracing::error!(error = %e, snapshot = %snap.value, "removing the restore's snapshot failed; the orphan sweep will retry");
            left.push(format!(
                "snapshot {} of VM {} is still there ({e})",
                snap.value, vm.name
            ));
        }
    }
    let mut removed = Vec::new();
    for d in created.disks.drain(..).rev() {
        match client.destroy_disk(&vm.moref, &d).await {
            Ok(()) => removed.push(d.file_name.clone()),
            Err(e) => {
                tracing::error!(error = %e, file = %d.file_name, "destroying a half-written restore disk failed");
                left.push(format!(
                    "{} (key {}) is still on VM {}: remove it by hand ({e})",
                    d.file_name, d.key, vm.name
                ));
            }
        }
    }
    if !created.overwritten.is_empty() {
        left.push(format!(
            "the VM's own disk(s) {} were partly overwritten and hold neither their old content nor the restore point's: run the restore again before powering VM {} on",
            created.overwritten.join(", "),
            vm.name
        ));
    }
    match (removed.is_empty(), left.is_empty()) {
        (true, true) => "nothing was created on the VM".to_string(),
        (false, true) => format!(
            "the new disk(s) {} were removed from VM {}; nothing is left behind",
            removed.join(", "),
            vm.name
        ),
        (_, false) => {
            let mut s = String::from("cleanup INCOMPLETE: ");
            if !removed.is_empty() {
                s.push_str(&format!("removed {}; ", removed.join(", ")));
            }
            s.push_str(&left.join("; "));
            s
        }
    }
}

/// Everything the per-disk steps need.
struct Ctx<'a> {
    client: &'a Client,
    vm: &'a Vm,
    proxy_vm: Option<&'a Vm>,
    me: &'a ThisProxy,
    place: &'a Placement,
    /// One per restored disk, in disk order.
    targets: &'a [DiskTargetPlan],
    selection: &'a Selection,
    repo: Arc<Repository>,
    point: Arc<OpenPoint>,
    req: &'a VmRestoreRequest,
    progress: Arc<Progress>,
    /// VDDK for the target VM, when the writes go through it.
    vddk: Option<&'a VddkJob>,
}

impl Ctx<'_> {
    async fn restore_all(
        &self,
        disks: &[DiskSummary],
        created: &mut Created,
    ) -> Result<Vec<RestoredDisk>, VmRestoreError> {
        let mut out = Vec::new();
        for (d, t) in disks.iter().zip(self.targets) {
            if self.progress.cancelled() {
                return Err(JobError::Pipeline(PipelineError::Cancelled).into());
            }
            out.push(self.restore_one(d, t, created).await?);
        }
        Ok(out)
    }

    async fn restore_one(
        &self,
        d: &DiskSummary,
        t: &DiskTargetPlan,
        created: &mut Created,
    ) -> Result<RestoredDisk, VmRestoreError> {
        let started = Instant::now();
        let dspan = tracing::info_span!("disk", disk = d.disk, label = %d.label);
        let _dg = dspan.enter();
        let decision = self
            .selection
            .disks
            .iter()
            .find(|x| x.disk_key == d.disk as i32)
            .ok_or_else(|| {
                VmRestoreError::Invalid(format!("disk {} is missing from the plan", d.disk))
            })?;
        let Outcome::Assigned { mode, .. } = &decision.outcome else {
            unreachable!("refused selections return before any change");
        };
        let mut mode = *mode;
        let mut reason = decision.reason_summary();
        let what = format!("{} ({})", d.disk, d.label);
        // A new disk reads as zeros, so zero chunks need no write; a disk written
        // over does not.
        let (new_disk, zero_filled) = match t {
            DiskTargetPlan::New => {
                let spec = NewDiskSpec {
                    file_name: restore_file_name(
                        &self.place.datastore_name,
                        &self.place.folder,
                        &self.req.job_id,
                        d.disk,
                    ),
                    datastore: self.place.datastore.clone(),
                    capacity_bytes: d.size,
                    encrypt_with: self.vm.key_id.clone(),
                    storage_policy: self.req.options.storage_policy.clone(),
                };
                let new_disk = self
                    .client
                    .create_disk(&self.vm.moref, &spec)
                    .await
                    .map_err(|e| self.locked(e, &spec.file_name))?;
                created.disks.push(new_disk.clone());
                self.check_new_disk(&new_disk, d.size)?;
                (new_disk, true)
            }
            DiskTargetPlan::Overwrite(v) => {
                tracing::warn!(file = %v.file_name, vm = %self.vm.name, "overwriting an existing disk of the powered-off VM");
                created
                    .overwritten
                    .push(format!("{} ({})", v.file_name, v.label));
                ((**v).clone(), false)
            }
        };
        let target: Box<dyn DiskTarget> = if let Some(v) = self.vddk {
            self.vddk_target(v, &new_disk, &mut mode, &mut reason, &what, created)
                .await?
        } else {
            loop {
                match mode {
                    Mode::HotAdd => match self.hotadd(&new_disk, zero_filled, created).await {
                        Ok(t) => break t,
                        Err(e)
                            if e.is_crypto()
                                && self.req.policy.failover_to_network
                                && self.me.modes.contains(&Mode::NbdSsl) =>
                        {
                            tracing::warn!(error = %e, "HotAdd of the new disk refused by vCenter; continuing by NBD-SSL as policy allows");
                            reason = format!(
                            "{reason}; HotAdd then refused by vCenter ({e}), failed over to NBD-SSL"
                        );
                            mode = Mode::NbdSsl;
                        }
                        Err(HotAddError::Vsphere(v)) => {
                            return Err(self.locked(v, &new_disk.file_name))
                        }
                        Err(HotAddError::Target(source)) => {
                            return Err(VmRestoreError::Target {
                                vm: self.vm.name.clone(),
                                disk: what,
                                source,
                            })
                        }
                        Err(HotAddError::Invalid(m)) => return Err(VmRestoreError::Invalid(m)),
                    },
                    Mode::NbdSsl | Mode::Nbd => {
                        break self.nbd(&new_disk, mode, zero_filled).await.map_err(
                            |e| match e {
                                NbdOpenError::Vsphere(v) => self.locked(v, &new_disk.file_name),
                                NbdOpenError::Target(source) => VmRestoreError::Target {
                                    vm: self.vm.name.clone(),
                                    disk: what.clone(),
                                    source,
                                },
                                NbdOpenError::Invalid(m) => VmRestoreError::Invalid(m),
                            },
                        )?
                    }
                }
            }
        };
        tracing::info!(mode = %mode, new_disk = new_disk.key, file = %new_disk.file_name, "writing the new disk");
        let stats = {
            let (repo, point, progress) =
                (self.repo.clone(), self.point.clone(), self.progress.clone());
            let (n, pipeline) = (d.disk, self.req.pipeline);
            tokio::task::spawn_blocking(move || -> Result<_, JobError> {
                let index = repo.open_index(&point, n)?;
                let table = KeyTable::new(point.keys.iter());
                let stats = restore_disk(
                    repo.as_ref(),
                    index,
                    &table,
                    &point.id_key,
                    target.as_ref(),
                    pipeline.with_min_workers(repo.backend().min_workers()),
                    &progress,
                );
                // Closed here, whatever happened: a VDDK handle (and the disk VDDK
                // hot-added for it) is gone before the snapshot is removed.
                drop(target);
                Ok(stats?)
            })
            .await
            .map_err(|e| VmRestoreError::Invalid(format!("restore thread failed: {e}")))??
        };
        // Written and flushed: a hot-added disk leaves this proxy now (it stays in
        // the cleanup list until the detach succeeded).
        if let Some(a) = created.attached.last().cloned() {
            self.client.detach_disk(&a).await?;
            created.attached.pop();
        }
        // VDDK HotAdd wrote the new disk's base under a snapshot: removing it
        // consolidates, and the new disk is the VM's again (it stays in the cleanup
        // list until the removal succeeded).
        if let Some(snap) = created.snapshot.clone() {
            self.client.remove_snapshot(&snap).await?;
            created.snapshot = None;
        }
        tracing::info!(
            bytes = stats.bytes_written,
            zero_chunks = stats.chunks_zero,
            "disk restored"
        );
        Ok(RestoredDisk {
            disk: d.disk,
            label: d.label.clone(),
            new_disk_key: new_disk.key,
            new_file: new_disk.file_name.clone(),
            mode,
            reason,
            bytes_written: stats.bytes_written,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Open the new disk `disk` through VDDK, writable, in exactly `mode` (the
    /// selector's; NBD-SSL after a HotAdd VDDK refused, when policy allows, with
    /// the reason extended). HotAdd writes the disk's base under a snapshot of the
    /// VM taken now, recorded in `created` until it is removed; NBD-SSL writes the
    /// live disk, without a snapshot.
    async fn vddk_target(
        &self,
        v: &VddkJob,
        disk: &VirtualDisk,
        mode: &mut Mode,
        reason: &mut String,
        what: &str,
        created: &mut Created,
    ) -> Result<Box<dyn DiskTarget>, VmRestoreError> {
        loop {
            if *mode == Mode::Nbd && (self.vm.key_id.is_some() || disk.key_id.is_some()) {
                // The selector never picks it; this is the last line of defence.
                return Err(VmRestoreError::Invalid(format!(
                    "refusing clear-text NBD for encrypted VM {}",
                    self.vm.name
                )));
            }
            let (path, snap) = match *mode {
                Mode::HotAdd => {
                    let snap = self.snapshot_for_hotadd(created).await?;
                    let path = self
                        .client
                        .snapshot_disks(&snap)
                        .await?
                        .into_iter()
                        .find(|x| x.key == disk.key)
                        .map(|x| x.file_name)
                        .ok_or_else(|| {
                            VmRestoreError::Invalid(format!(
                                "snapshot {} of VM {} has no disk {} ({})",
                                snap.value, self.vm.name, disk.key, disk.file_name
                            ))
                        })?;
                    (path, Some(snap))
                }
                Mode::NbdSsl | Mode::Nbd => (disk.file_name.clone(), None),
            };
            // Only a disk this job created reads as zeros.
            let zero_filled = created.disks.iter().any(|x| x.key == disk.key);
            match open_vddk_target(self.client, v, path, snap.as_ref(), *mode, zero_filled).await {
                Ok(t) => {
                    *reason = format!(
                        "{reason}; carried by VDDK {} ({mode} confirmed by GetTransportMode, opened for write{})",
                        v.vddk.version(),
                        match &snap {
                            Some(s) => format!(" under snapshot {}", s.value),
                            None => String::new(),
                        }
                    );
                    return Ok(t);
                }
                Err(e)
                    if *mode == Mode::HotAdd
                        && vddk_refused_mode(&e)
                        && self.req.policy.failover_to_network
                        && self.me.modes.contains(&Mode::NbdSsl) =>
                {
                    tracing::warn!(error = %e, "HotAdd of the new disk refused by VDDK; continuing by NBD-SSL as policy allows");
                    *reason = format!(
                        "{reason}; HotAdd then refused by VDDK ({e}), failed over to NBD-SSL"
                    );
                    // NBD-SSL writes the live disk: no snapshot.
                    if let Some(s) = created.snapshot.clone() {
                        self.client.remove_snapshot(&s).await?;
                        created.snapshot = None;
                    }
                    *mode = Mode::NbdSsl;
                }
                Err(source) => {
                    return Err(VmRestoreError::Target {
                        vm: self.vm.name.clone(),
                        disk: what.to_string(),
                        source,
                    })
                }
            }
        }
    }

    /// Snapshot the target VM for a VDDK HotAdd write (`ferry-<job id>`, the name
    /// the orphan sweep removes after a crash), recorded in `created`.
    async fn snapshot_for_hotadd(&self, created: &mut Created) -> Result<MoRef, VmRestoreError> {
        if let Some(s) = &created.snapshot {
            return Ok(s.clone());
        }
        let name = crate::vsphere::snapshot_name(&self.req.job_id);
        let snap = self
            .client
            .create_snapshot(
                self.vm,
                &name,
                &format!(
                    "{} {} (restore: new disks written by HotAdd through VDDK)",
                    crate::vsphere::SNAPSHOT_DESCRIPTION_PREFIX,
                    self.req.job_id
                ),
                false,
            )
            .await?;
        created.snapshot = Some(snap.clone());
        Ok(snap)
    }

    /// `e`, as [`VmRestoreError::FileLocked`] naming `file` and the VM when vCenter
    /// or the host said the file is locked.
    fn locked(&self, e: VsphereError, file: &str) -> VmRestoreError {
        match e {
            VsphereError::FileLocked { doing, message, .. } => VmRestoreError::FileLocked {
                vm: self.vm.name.clone(),
                file: file.to_string(),
                message: format!("{doing}: {message}"),
            },
            e => e.into(),
        }
    }

    /// ferry writes only into a disk that is what it asked for: big enough, and
    /// encrypted under the VM's key provider when the VM is encrypted.
    fn check_new_disk(&self, d: &VirtualDisk, size: u64) -> Result<(), VmRestoreError> {
        if d.capacity_bytes < size {
            return Err(VmRestoreError::Invalid(format!(
                "vCenter created {} with {} bytes, the disk needs {size}",
                d.file_name, d.capacity_bytes
            )));
        }
        if let Some(vk) = &self.vm.key_id {
            let same = d.key_id.as_ref().is_some_and(|k| {
                vk.provider_id.is_none()
                    || k.provider_id.is_none()
                    || k.provider_id == vk.provider_id
            });
            if !same {
                return Err(VmRestoreError::Invalid(format!(
                    "vCenter created {} {} although VM {} is encrypted under key provider {}; refusing to write decrypted data into it",
                    d.file_name,
                    match &d.key_id {
                        None => "unencrypted".to_string(),
                        Some(k) => format!(
                            "under key provider {}",
                            k.provider_id.as_deref().unwrap_or("?")
                        ),
                    },
                    self.vm.name,
                    vk.provider_id.as_deref().unwrap_or("?")
                )));
            }
        }
        Ok(())
    }

    async fn hotadd(
        &self,
        disk: &VirtualDisk,
        zero_filled: bool,
        created: &mut Created,
    ) -> Result<Box<dyn DiskTarget>, HotAddError> {
        let pvm = self.proxy_vm.ok_or_else(|| {
            HotAddError::Invalid("HotAdd chosen but this proxy has no VM configured".into())
        })?;
        let dir =
            self.me.device_dir.clone().ok_or_else(|| {
                HotAddError::Invalid("HotAdd needs [agent] hotadd_device_dir".into())
            })?;
        let a = self
            .client
            .attach_disk_for_write(&pvm.moref, disk)
            .await
            .map_err(HotAddError::Vsphere)?;
        let name = a.device_name();
        created.attached.push(a);
        let name = name.ok_or_else(|| {
            HotAddError::Invalid(
                "vCenter reported the hot-added disk without a backing uuid".into(),
            )
        })?;
        let size = disk.capacity_bytes;
        let wait = self.req.hotadd_wait;
        let t = tokio::task::spawn_blocking(move || {
            HotAddTarget::open(&dir, &name, size, wait, zero_filled)
        })
        .await
        .map_err(|e| HotAddError::Invalid(format!("hot-add wait failed: {e}")))?
        .map_err(HotAddError::Target)?;
        Ok(Box::new(t))
    }

    async fn nbd(
        &self,
        disk: &VirtualDisk,
        mode: Mode,
        zero_filled: bool,
    ) -> Result<Box<dyn DiskTarget>, NbdOpenError> {
        let host = self.vm.host.as_ref().ok_or_else(|| {
            NbdOpenError::Invalid(format!("vCenter reports no host for VM {}", self.vm.name))
        })?;
        if mode == Mode::Nbd && (self.vm.key_id.is_some() || disk.key_id.is_some()) {
            // The selector never picks it; this is the last line of defence.
            return Err(NbdOpenError::Invalid(format!(
                "refusing clear-text NBD for encrypted VM {}",
                self.vm.name
            )));
        }
        let s = &self.req.nbd;
        let ticket = self
            .client
            .nbd_write_ticket(host, &self.vm.moref, disk.key)
            .await
            .map_err(NbdOpenError::Vsphere)?;
        let label = format!(
            "{mode} {}:{} (write ticket for disk {} of VM {})",
            ticket.host_name, s.port, disk.key, self.vm.name
        );
        let uri = match mode {
            Mode::NbdSsl => {
                let dir = s.tls_certificates.as_ref().ok_or_else(|| {
                    NbdOpenError::Invalid(
                        "NBD-SSL needs [nbd] tls_certificates (a directory with ca-cert.pem)"
                            .into(),
                    )
                })?;
                format!(
                    "{}?tls-certificates={}",
                    ticket.nbds_url(s.port),
                    dir.display()
                )
            }
            Mode::Nbd => ticket.nbds_url(s.port).replacen("nbds://", "nbd://", 1),
            Mode::HotAdd => unreachable!("nbd() is called for network modes"),
        };
        let conns = s.connections;
        let t = tokio::task::spawn_blocking(move || {
            NbdTarget::connect(&uri, &label, conns, zero_filled)
        })
        .await
        .map_err(|e| NbdOpenError::Invalid(format!("NBD connect thread failed: {e}")))?
        .map_err(NbdOpenError::Target)?;
        Ok(Box::new(t))
    }
}

/// Connect VDDK to the target VM on the session `client` holds now (it may have
/// logged in again), read-write, in exactly `mode` (under `snap` for HotAdd), and
/// open `path` for writing; the disk is new, so zero chunks need no write.
async fn open_vddk_target(
    client: &Client,
    v: &VddkJob,
    path: String,
    snap: Option<&MoRef>,
    mode: Mode,
    zero_filled: bool,
) -> Result<Box<dyn DiskTarget>, SourceError> {
    use crate::transport::vddk::{Connection, VddkTarget};
    let mut spec = v.spec.clone();
    if let Some(c) = client.session_cookie() {
        spec.session_cookie = c.to_string();
    }
    spec.snapshot_moref = snap.map(|s| s.value.clone());
    spec.mode = mode;
    spec.read_only = false;
    let vddk = v.vddk.clone();
    let p = path.clone();
    tokio::task::spawn_blocking(move || {
        let conn = Connection::connect(&vddk, &spec).map_err(|e| SourceError::Open {
            path: p.clone(),
            err: std::io::Error::other(e),
        })?;
        let t = VddkTarget::open(&conn, &p, zero_filled)?;
        Ok(Box::new(t) as Box<dyn DiskTarget>)
    })
    .await
    .map_err(|e| SourceError::Open {
        path,
        err: std::io::Error::other(format!("VDDK open thread failed: {e}")),
    })?
}

#[derive(Debug, thiserror::Error)]
enum HotAddError {
    #[error(transparent)]
    Vsphere(VsphereError),
    #[error(transparent)]
    Target(SourceError),
    #[error("{0}")]
    Invalid(String),
}

impl HotAddError {
    fn is_crypto(&self) -> bool {
        matches!(self, HotAddError::Vsphere(v) if v.is_crypto())
    }
}

enum NbdOpenError {
    Vsphere(VsphereError),
    Target(SourceError),
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vsphere::CryptoKeyId;

    fn vm(encrypted: bool) -> Vm {
        let disk = |key: i32, file: &str, ds: Option<&str>| VirtualDisk {
            key,
            label: format!("Hard disk {}", key - 1999),
            controller_key: Some(1000),
            unit_number: Some(key - 2000),
            capacity_bytes: 1 << 30,
            backing_type: "VirtualDiskFlatVer2BackingInfo".into(),
            file_name: file.into(),
            datastore: ds.map(|d| MoRef::new("Datastore", d)),
            uuid: None,
            change_id: None,
            disk_mode: Some("persistent".into()),
            key_id: None,
        };
        Vm {
            moref: MoRef::new("VirtualMachine", "vm-42"),
            name: "web01".into(),
            instance_uuid: None,
            template: false,
            power_state: Some("poweredOn".into()),
            // Listed out of key order; the first disk by key decides.
            disks: vec![
                disk(2001, "[ds-b] web01/web01_1.vmdk", Some("datastore-2")),
                disk(2000, "[ds-a] web01/web01.vmdk", Some("datastore-1")),
            ],
            devices: vec![],
            key_id: encrypted.then(|| CryptoKeyId {
                key_id: "k".into(),
                provider_id: Some("KMS-A".into()),
            }),
            change_tracking: None,
            host: Some(MoRef::new("HostSystem", "host-7")),
            datastores: vec![],
            snapshots: vec![],
            current_snapshot: None,
            parent: None,
        }
    }

    fn summaries() -> Vec<DiskSummary> {
        vec![
            DiskSummary {
                disk: 0,
                size: 1 << 20,
                label: "Hard disk 1 (key 2000)".into(),
            },
            DiskSummary {
                disk: 1,
                size: 2 << 20,
                label: "Hard disk 2 (key 2001)".into(),
            },
        ]
    }

    #[test]
    fn new_disks_go_next_to_the_first_disk_and_carry_the_vms_key_provider() {
        let v = vm(true);
        let p = placement(&v).unwrap();
        assert_eq!(
            p,
            Placement {
                datastore: MoRef::new("Datastore", "datastore-1"),
                datastore_name: "ds-a".into(),
                folder: "web01".into(),
                reason: "default: the datastore of the VM's first disk ([ds-a] web01/web01.vmdk)"
                    .into(),
            }
        );
        let info = restore_vm_info(&v, &summaries(), &p.datastore);
        assert_eq!(
            (info.host.as_str(), info.moref.as_str()),
            ("host-7", "vm-42")
        );
        assert!(info.encrypted);
        assert_eq!(info.disks.len(), 2);
        for (i, d) in info.disks.iter().enumerate() {
            assert_eq!(d.key, i as i32);
            assert_eq!(d.datastore, "datastore-1");
            assert!(d.encrypted);
            assert_eq!(d.key_provider.as_deref(), Some("KMS-A"));
        }
        let plain = restore_vm_info(&vm(false), &summaries(), &p.datastore);
        assert!(!plain.encrypted && plain.disks.iter().all(|d| !d.encrypted));
        let mut nodisk = vm(false);
        nodisk.disks.clear();
        assert!(placement(&nodisk).is_none());
    }

    #[test]
    fn only_a_powered_off_vms_disks_are_overwritten_and_only_by_disks_that_fit() {
        let mut v = vm(false);
        for (state, refused) in [
            (Some("poweredOn"), true),
            (Some("suspended"), true),
            (None, true),
            (Some("poweredOff"), false),
        ] {
            v.power_state = state.map(str::to_string);
            let e = power_refusal(&v);
            assert_eq!(e.is_some(), refused, "{state:?}");
            if let Some(e) = e {
                let m = e.to_string();
                assert!(
                    m.contains("web01") && m.contains(state.unwrap_or("unknown")),
                    "{m}"
                );
                assert!(
                    m.contains("power the VM off") && m.contains("new disks"),
                    "{m}"
                );
            }
        }
        // Disk N of the point goes over the VM's disk N in key order.
        let (t, problems) = overwrite_targets(&v, &summaries());
        assert!(problems.is_empty());
        let files: Vec<_> = t
            .iter()
            .map(|x| match x {
                DiskTargetPlan::Overwrite(d) => d.file_name.clone(),
                DiskTargetPlan::New => String::new(),
            })
            .collect();
        assert_eq!(
            files,
            ["[ds-a] web01/web01.vmdk", "[ds-b] web01/web01_1.vmdk"]
        );
        let mut big = summaries();
        big[1].size = 2 << 30;
        big.push(DiskSummary {
            disk: 2,
            size: 1,
            label: "Hard disk 3".into(),
        });
        let (_, problems) = overwrite_targets(&v, &big);
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].to_string().contains("needs 2147483648"));
        assert!(problems[1].to_string().contains("no disk to overwrite"));
    }

    #[test]
    fn room_and_options_are_checked_before_anything_changes() {
        let v = vm(false);
        assert!(room(&v, "ds-a", Some(10), 10).is_none());
        assert!(room(&v, "ds-a", None, u64::MAX).is_none(), "not reported");
        let e = room(&v, "ds-a", Some(9), 10).unwrap().to_string();
        assert!(
            e.contains("ds-a") && e.contains("9 bytes free") && e.contains("need 10"),
            "{e}"
        );
        assert!(TargetOptions::default().validate().is_ok());
        for bad in [
            TargetOptions {
                datastore: Some("[ds-a] web01".into()),
                ..Default::default()
            },
            TargetOptions {
                datastore: Some(" ".into()),
                ..Default::default()
            },
            TargetOptions {
                storage_policy: Some("".into()),
                ..Default::default()
            },
            TargetOptions {
                storage_policy: Some("a\nb".into()),
                ..Default::default()
            },
            TargetOptions {
                datastore: Some("ds-a".into()),
                overwrite: true,
                ..Default::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_tenants_data_only_goes_into_vms_of_its_key_provider() {
        assert_eq!(key_provider_mismatch(&vm(true), Some("KMS-A")), None);
        assert_eq!(
            key_provider_mismatch(&vm(false), None),
            None,
            "no tenant provider configured"
        );
        let other = key_provider_mismatch(&vm(true), Some("KMS-B")).unwrap();
        assert!(
            other.contains("KMS-A") && other.contains("KMS-B"),
            "{other}"
        );
        let plain = key_provider_mismatch(&vm(false), Some("KMS-A")).unwrap();
        assert!(plain.contains("not encrypted"), "{plain}");
    }

    #[test]
    fn the_selector_applies_the_backup_rules_to_the_new_disks() {
        use crate::transport::select::{HostReach, ProxyInfo};
        let v = vm(true);
        let info = restore_vm_info(&v, &summaries(), &MoRef::new("Datastore", "datastore-1"));
        let proxy = |kp: Option<&str>, modes: Vec<Mode>| ProxyInfo {
            id: "px".into(),
            is_vm: true,
            host: Some("host-7".into()),
            reachable_hosts: HostReach::Any,
            datastores: vec!["datastore-1".into()],
            key_provider: kp.map(str::to_string),
            modes,
            free_slots: slots_for(1, 2),
        };
        let policy = Policy::default();
        // Same key provider: HotAdd for both disks with one reserved slot.
        let s = select::select(
            &info,
            &[proxy(Some("KMS-A"), vec![Mode::HotAdd, Mode::NbdSsl])],
            &policy,
        );
        assert!(s.is_runnable());
        assert!(s.disks.iter().all(|d| matches!(
            d.outcome,
            Outcome::Assigned {
                mode: Mode::HotAdd,
                ..
            }
        )));
        // Another provider: never HotAdd; NBD-SSL when failover is allowed...
        let s = select::select(
            &info,
            &[proxy(Some("KMS-B"), vec![Mode::HotAdd, Mode::NbdSsl])],
            &policy,
        );
        assert!(s.disks.iter().all(|d| matches!(
            d.outcome,
            Outcome::Assigned {
                mode: Mode::NbdSsl,
                ..
            }
        )));
        // ...refused when it is not, and never clear text.
        let off = Policy {
            failover_to_network: false,
            allow_cleartext_nbd: true,
            preferred: None,
        };
        let s = select::select(
            &info,
            &[proxy(
                Some("KMS-B"),
                vec![Mode::HotAdd, Mode::NbdSsl, Mode::Nbd],
            )],
            &off,
        );
        assert!(!s.is_runnable());
        assert!(s.refusal_summary().unwrap().contains("KMS-B"));
        let nbd_only = Policy {
            failover_to_network: true,
            allow_cleartext_nbd: true,
            preferred: Some(Mode::Nbd),
        };
        let s = select::select(
            &info,
            &[proxy(None, vec![Mode::Nbd, Mode::NbdSsl])],
            &nbd_only,
        );
        assert!(s.disks.iter().all(|d| matches!(
            d.outcome,
            Outcome::Assigned {
                mode: Mode::NbdSsl,
                ..
            }
        )));
        assert_eq!(slots_for(0, 2), 0, "no slot, no restore");
    }
}
