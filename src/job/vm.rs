//! Backup of one vSphere VM on this proxy, start to cleanup: read the VM from
//! vCenter, run the key-provider-aware selector *before* any snapshot, snapshot,
//! open each disk by HotAdd or NBD(-SSL), run the pipeline ([`super::backup`]),
//! commit, and always detach, remove the snapshot and log out — on success, error or
//! cancellation. Also the orphan sweep for what a crashed job left behind.
//!
//! Owns the order of control-plane steps, the fallback from a refused HotAdd to
//! NBD-SSL, and the vCenter side of incrementals: each disk's snapshot changeId is
//! recorded, and [`VsphereTracker`] answers the job's questions about changed and
//! allocated areas with QueryChangedDiskAreas (whether to use them is
//! [`super::incremental`]'s decision). Must not: decide transports itself (that is [`crate::transport::select`]),
//! know SOAP (that is [`crate::vsphere`]), or touch repository files directly.

use super::incremental::{ChangeTracker, ReadRequest, TrackerError};
use super::quiesce::{self, QuiescePolicy, QuiesceRequired};
use super::{BackupReport, BackupRequest, DiskInput, JobError};
use crate::keys::KeySource;
use crate::pipeline::PipelineConfig;
use crate::progress::Progress;
use crate::repo::manifest::{ReadMode, SnapshotRecord};
use crate::repo::Repository;
use crate::transport::hotadd::HotAddSource;
use crate::transport::nbd::NbdSource;
use crate::transport::select::{
    self, DiskInfo, HostReach, Mode, Outcome, Policy, ProxyInfo, Selection, VmInfo,
};
use crate::transport::{DiskSource, Extent, SourceError};
use crate::vsphere::{AttachedDisk, Client, MoRef, VirtualDisk, Vm, VsphereError};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Failures of a VM job. Each says which step failed.
#[derive(Debug, thiserror::Error)]
pub enum VmJobError {
    /// vCenter refused or failed.
    #[error(transparent)]
    Vsphere(#[from] VsphereError),
    /// The selector found no allowed transport for some disk: nothing was snapshotted.
    #[error("VM {vm} refused before any snapshot: {summary}")]
    Refused {
        /// VM name.
        vm: String,
        /// Why, disk by disk, candidate by candidate.
        summary: String,
    },
    /// A disk could not be opened by the chosen transport (and no fallback applied).
    #[error("disk {disk} of VM {vm}: {source}")]
    Source {
        /// VM name.
        vm: String,
        /// Disk label.
        disk: String,
        /// The error.
        source: SourceError,
    },
    /// Backup pipeline or repository.
    #[error(transparent)]
    Job(#[from] JobError),
    /// VMware's VDDK could not be loaded, initialised or used for the VM.
    #[error("VDDK: {0}")]
    Vddk(#[from] crate::transport::vddk::VddkError),
    /// An application-consistent snapshot was required and the guest could not
    /// be quiesced.
    #[error(transparent)]
    Quiesce(#[from] QuiesceRequired),
    /// Bad request or configuration.
    #[error("{0}")]
    Invalid(String),
}

impl VmJobError {
    /// Whether the job was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, VmJobError::Job(j) if j.is_cancelled())
    }
}

/// How this proxy reaches ESXi hosts' NBD service.
#[derive(Clone, Debug)]
pub struct NbdSettings {
    /// Directory with `ca-cert.pem` (and optional client pair) for NBD-SSL.
    pub tls_certificates: Option<PathBuf>,
    /// Port of the hosts' NBD service.
    pub port: u16,
    /// Connections per export.
    pub connections: usize,
}

/// How this proxy reaches disks through VMware's VDDK (`[vddk]`), instead of
/// ferry's native HotAdd (ReconfigVM) and NBD client. VDDK carries exactly the
/// mode the selector chose for each disk, never another.
#[derive(Clone, Debug)]
pub struct VddkSettings {
    /// The VDDK directory.
    pub libdir: PathBuf,
    /// VDDK's own configuration file.
    pub config_file: Option<PathBuf>,
    /// ESXi's NFC port (NBD / NBD-SSL through VDDK).
    pub nfc_port: u16,
}

impl From<&crate::config::VddkSection> for VddkSettings {
    fn from(v: &crate::config::VddkSection) -> Self {
        VddkSettings {
            libdir: v.libdir.clone(),
            config_file: v.config_file.clone(),
            nfc_port: v.nfc_port,
        }
    }
}

/// VDDK for one VM job: the initialised library, the connection parameters
/// from ferry's own vCenter session (cookie, and the SHA-1 thumbprint of the
/// certificate ferry verified), and PrepareForAccess held until the job ends.
/// Also used by restores into a VM ([`super::vm_restore`]).
pub(super) struct VddkJob {
    pub(super) vddk: Arc<crate::transport::vddk::Vddk>,
    pub(super) spec: crate::transport::vddk::ConnectSpec,
    access: Option<crate::transport::vddk::AccessGuard>,
}

impl VddkJob {
    /// Load and initialise VDDK, describe vCenter and the VM to it, and announce
    /// the access (before the snapshot, as VDDK asks).
    pub(super) async fn start(
        client: &Client,
        vm: &Vm,
        s: &VddkSettings,
    ) -> Result<VddkJob, VmJobError> {
        use crate::transport::vddk::AccessGuard;
        let vddk = init_vddk(s).await?;
        let spec = connect_spec(client, &vm.moref.value, s)
            .map_err(|e| VmJobError::Invalid(e.to_string()))?;
        let (v, sp) = (vddk.clone(), spec.clone());
        let access = tokio::task::spawn_blocking(move || AccessGuard::prepare(&v, &sp))
            .await
            .map_err(|e| VmJobError::Invalid(format!("VDDK access thread failed: {e}")))??;
        tracing::info!(library = %vddk.library_path().display(), version = %vddk.version(), "disks go through VDDK");
        Ok(VddkJob {
            vddk,
            spec,
            access: Some(access),
        })
    }

    /// Open `disk` of snapshot `snap` through VDDK in exactly `mode`, read-only,
    /// on the session `client` holds now (it may have logged in again).
    async fn open(
        &self,
        client: &Client,
        snap: &MoRef,
        disk: &VirtualDisk,
        mode: Mode,
    ) -> Result<Box<dyn DiskSource>, SourceError> {
        use crate::transport::vddk::{Connection, VddkSource};
        let mut spec = self.spec.clone();
        if let Some(c) = client.session_cookie() {
            spec.session_cookie = c.to_string();
        }
        spec.snapshot_moref = Some(snap.value.clone());
        spec.mode = mode;
        spec.read_only = true;
        let vddk = self.vddk.clone();
        let path = disk.file_name.clone();
        tokio::task::spawn_blocking(move || {
            let conn = Connection::connect(&vddk, &spec).map_err(|e| SourceError::Open {
                path: path.clone(),
                err: std::io::Error::other(e),
            })?;
            let src = VddkSource::open(&conn, &path)?;
            Ok(Box::new(src) as Box<dyn DiskSource>)
        })
        .await
        .map_err(|e| SourceError::Open {
            path: disk.file_name.clone(),
            err: std::io::Error::other(format!("VDDK open thread failed: {e}")),
        })?
    }

    /// EndAccess (after the snapshot is gone).
    pub(super) async fn end(mut self) {
        if let Some(a) = self.access.take() {
            match tokio::task::spawn_blocking(move || a.end()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "VDDK EndAccess failed"),
                Err(e) => tracing::warn!(error = %e, "VDDK EndAccess thread failed"),
            }
        }
    }
}

/// Load and initialise VDDK from `s` (once per directory and process).
pub(super) async fn init_vddk(
    s: &VddkSettings,
) -> Result<Arc<crate::transport::vddk::Vddk>, VmJobError> {
    let (libdir, cfg) = (s.libdir.clone(), s.config_file.clone());
    Ok(tokio::task::spawn_blocking(move || {
        crate::transport::vddk::Vddk::init(&libdir, cfg.as_deref())
    })
    .await
    .map_err(|e| VmJobError::Invalid(format!("VDDK init thread failed: {e}")))??)
}

/// VDDK's connection parameters for `vm_moref` from ferry's own vCenter session:
/// the session cookie (no password is handed over) and the SHA-1 thumbprint of
/// the certificate ferry verified.
pub(super) fn connect_spec(
    client: &Client,
    vm_moref: &str,
    s: &VddkSettings,
) -> Result<crate::transport::vddk::ConnectSpec, &'static str> {
    use crate::transport::vddk::{session, ConnectSpec};
    let der = client
        .server_certificate()
        .ok_or("vCenter's certificate is not known to this session, so VDDK cannot pin it")?;
    let cookie = client
        .session_cookie()
        .ok_or("no vCenter session cookie to hand to VDDK (not logged in?)")?;
    let (host, port) = client.host_port();
    let mut spec = ConnectSpec::new(
        host,
        session::thumbprint_from_der(&der),
        cookie.to_string(),
        vm_moref.to_string(),
        None,
        Mode::NbdSsl,
    );
    spec.port = port;
    spec.nfc_host_port = s.nfc_port;
    Ok(spec)
}

/// Whether `e` is VDDK refusing to open a disk in the mode asked for (a refused
/// HotAdd, for example across key providers): the job then takes the selector's
/// next decision, as for a hot-add vCenter refuses. Library or session trouble
/// is not a refusal of the mode.
pub(super) fn vddk_refused_mode(e: &SourceError) -> bool {
    use crate::transport::vddk::VddkError;
    match crate::transport::vddk::vddk_error(e) {
        Some(VddkError::ModeMismatch { .. }) => true,
        Some(VddkError::Vix { call, code, .. }) => {
            call.contains("Open")
                && !matches!(
                    crate::transport::vddk::ffi::vix_error_code(*code),
                    3014 | 13003 | 4 | 4000 | 18000
                )
        }
        _ => false,
    }
}

/// This proxy, as the job sees it.
#[derive(Clone, Debug)]
pub struct ThisProxy {
    /// Proxy id (the agent id).
    pub id: String,
    /// Name of the proxy's own VM, when it is one (required for HotAdd).
    pub vm_name: Option<String>,
    /// Where hot-added disks appear.
    pub device_dir: Option<PathBuf>,
    /// Modes enabled here.
    pub modes: Vec<Mode>,
    /// Free slots (one per disk).
    pub free_slots: u32,
}

/// A VM backup request.
#[derive(Clone, Debug)]
pub struct VmBackupRequest {
    /// Job id (names the snapshot `ferry-<job id>`).
    pub job_id: String,
    /// VM name in vCenter.
    pub vm: String,
    /// Transport policy.
    pub policy: Policy,
    /// NBD settings.
    pub nbd: NbdSettings,
    /// Enable CBT on the VM when it is off.
    pub enable_cbt: bool,
    /// Read every disk in full even when changed-block tracking could give an
    /// incremental (the changeIds are still recorded for the next backup).
    pub full: bool,
    /// Whether the snapshot is quiesced (application-consistent) and what
    /// happens when the guest cannot be quiesced.
    pub quiesce: QuiescePolicy,
    /// Data-plane settings.
    pub pipeline: PipelineConfig,
    /// Repository lock wait.
    pub lock_wait: Duration,
    /// How long to wait for a hot-added disk to appear.
    pub hotadd_wait: Duration,
    /// The orchestrator's placement per disk key: mode and reason, used as the
    /// disk's reason where this agent's own selector picks the same mode.
    pub placement: std::collections::BTreeMap<i32, (Mode, String)>,
    /// Carry every disk through VDDK instead of the native paths.
    pub vddk: Option<VddkSettings>,
}

/// What happened to one disk.
#[derive(Clone, Debug, Serialize)]
pub struct DiskOutcome {
    /// Disk number in the restore point.
    pub disk: u32,
    /// Device key in vCenter.
    pub device_key: i32,
    /// Label.
    pub label: String,
    /// Mode used.
    pub mode: Mode,
    /// Why (selector decision, and any fallback).
    pub reason: String,
    /// How the disk was read: `cbt` (only the areas changed since the previous
    /// restore point) or `full`.
    pub read: ReadMode,
    /// Why: the base point and changeId of an incremental, or why a full read
    /// was needed (first backup, CBT reset, disk resized, ...).
    pub read_reason: String,
    /// Bytes read from the snapshot disk.
    pub bytes_read: u64,
    /// Bytes CBT reported changed (incremental reads only).
    pub changed_bytes: Option<u64>,
}

/// Result of a VM backup.
#[derive(Clone, Debug, Serialize)]
pub struct VmBackupOutcome {
    /// The selector's plan (with every candidate's verdict).
    pub selection: Selection,
    /// Per-disk mode and reason actually used.
    pub disks: Vec<DiskOutcome>,
    /// How the snapshot was taken (as the point records it).
    pub snapshot: SnapshotRecord,
    /// The committed point.
    pub report: BackupReport,
}

/// Selector inputs for `vm` from what vCenter reports.
pub fn vm_info(vm: &Vm) -> VmInfo {
    let vm_provider = vm.key_id.as_ref().and_then(|k| k.provider_id.clone());
    VmInfo {
        name: vm.name.clone(),
        moref: vm.moref.value.clone(),
        host: vm
            .host
            .as_ref()
            .map(|h| h.value.clone())
            .unwrap_or_default(),
        encrypted: vm.key_id.is_some(),
        key_provider: vm_provider,
        disks: vm
            .disks
            .iter()
            .map(|d| DiskInfo {
                key: d.key,
                label: d.label.clone(),
                datastore: d
                    .datastore
                    .as_ref()
                    .map(|m| m.value.clone())
                    .unwrap_or_default(),
                encrypted: d.key_id.is_some(),
                key_provider: d.key_id.as_ref().and_then(|k| k.provider_id.clone()),
            })
            .collect(),
    }
}

/// This proxy as a selector candidate: its VM's host, the datastores that host sees
/// and its own key provider come from vCenter.
pub async fn proxy_info(
    client: &Client,
    me: &ThisProxy,
) -> Result<(ProxyInfo, Option<Vm>), VmJobError> {
    let mut info = ProxyInfo {
        id: me.id.clone(),
        is_vm: false,
        host: None,
        reachable_hosts: HostReach::Any,
        datastores: Vec::new(),
        key_provider: None,
        modes: me.modes.clone(),
        free_slots: me.free_slots,
    };
    let Some(name) = &me.vm_name else {
        return Ok((info, None));
    };
    let pvm = client.vm_by_name(name).await?;
    info.is_vm = true;
    info.key_provider = pvm.key_id.as_ref().and_then(|k| k.provider_id.clone());
    if let Some(h) = &pvm.host {
        info.host = Some(h.value.clone());
        let hosts = client.hosts().await?;
        if let Some(host) = hosts.iter().find(|x| x.moref == *h) {
            info.datastores = host.datastores.iter().map(|d| d.value.clone()).collect();
        }
    }
    Ok((info, Some(pvm)))
}

/// Plan `vm` on this proxy without changing anything (`--dry-run`).
pub async fn plan(
    client: &Client,
    me: &ThisProxy,
    vm: &str,
    policy: &Policy,
) -> Result<Selection, VmJobError> {
    let vm = client.vm_by_name(vm).await?;
    let (proxy, _) = proxy_info(client, me).await?;
    Ok(select::select(&vm_info(&vm), &[proxy], policy))
}

/// Back up one VM. Cleanup (detach, snapshot removal) runs whatever happens inside;
/// cancel through `progress`.
pub async fn backup_vm(
    client: &Client,
    me: &ThisProxy,
    repo: Arc<Repository>,
    keys: Arc<dyn KeySource>,
    req: &VmBackupRequest,
    progress: Arc<Progress>,
) -> Result<VmBackupOutcome, VmJobError> {
    let span = tracing::info_span!("vm_backup", job = %req.job_id, vm = %req.vm);
    let _g = span.enter();
    let mut vm = client.vm_by_name(&req.vm).await?;
    let (proxy, proxy_vm) = proxy_info(client, me).await?;
    let selection = select::select(&vm_info(&vm), &[proxy], &req.policy);
    if let Some(summary) = selection.refusal_summary() {
        tracing::warn!(%summary, "VM refused before snapshot");
        return Err(VmJobError::Refused {
            vm: vm.name.clone(),
            summary,
        });
    }
    for d in &selection.disks {
        let placed = req
            .placement
            .get(&d.disk_key)
            .map(|(m, r)| (*m, r.as_str()));
        tracing::info!(disk = d.disk_key, label = %d.label, decision = %d.placed_or(placed, d.reason_summary()), "transport chosen");
    }
    if req.enable_cbt && vm.change_tracking != Some(true) {
        client.enable_cbt(&vm).await?;
        vm = client.vm(&vm.moref).await?;
    }
    if progress.cancelled() {
        return Err(JobError::Pipeline(crate::pipeline::PipelineError::Cancelled).into());
    }
    let vddk = match &req.vddk {
        Some(settings) => Some(VddkJob::start(client, &vm, settings).await?),
        None => None,
    };
    let snap_name = crate::vsphere::snapshot_name(&req.job_id);
    let (snap, consistency) = match take_snapshot(client, &vm, &snap_name, req).await {
        Ok(s) => s,
        Err(e) => {
            if let Some(v) = vddk {
                v.end().await;
            }
            return Err(e);
        }
    };
    let mut attached: Vec<AttachedDisk> = Vec::new();
    let result = with_snapshot(
        client,
        &vm,
        proxy_vm.as_ref(),
        me,
        &snap,
        &selection,
        repo,
        keys,
        req,
        &consistency,
        progress,
        &mut attached,
        vddk.as_ref(),
    )
    .await;
    // Cleanup, always: detach every hot-added disk, then remove the snapshot.
    let mut cleanup_err = None;
    for a in attached.iter().rev() {
        if let Err(e) = client.detach_disk(a).await {
            tracing::error!(error = %e, file = %a.file_name, "detaching a hot-added disk failed; the orphan sweep will retry");
            cleanup_err.get_or_insert(e);
        }
    }
    if let Err(e) = client.remove_snapshot(&snap).await {
        tracing::error!(error = %e, snapshot = %snap_name, "removing the snapshot failed; the orphan sweep will retry");
        cleanup_err.get_or_insert(e);
    }
    if let Some(v) = vddk {
        v.end().await;
    }
    let (mut disks, report) = result?;
    for d in &mut disks {
        if let Some(r) = report.disks.iter().find(|r| r.disk == d.disk) {
            d.read = r.read;
            d.read_reason = r.read_reason.clone();
            d.bytes_read = r.bytes_read;
            d.changed_bytes = r.changed_bytes;
            tracing::info!(disk = d.device_key, label = %d.label, read = %d.read, reason = %d.read_reason, bytes_read = d.bytes_read, "disk backed up");
        }
    }
    if let Some(e) = cleanup_err {
        // The point is committed and good; the leftover is reported, not hidden.
        tracing::warn!(error = %e, "backup committed but cleanup failed");
    }
    Ok(VmBackupOutcome {
        selection,
        disks,
        snapshot: consistency,
        report,
    })
}

/// Take the job's snapshot as the quiesce policy says: quiesced first unless the
/// policy is off; when the guest cannot be quiesced, crash-consistent instead
/// (`prefer`) or fail (`require`), never leaving a snapshot of the failed
/// attempt behind. Returns the snapshot and what the point records about it.
async fn take_snapshot(
    client: &Client,
    vm: &Vm,
    snap_name: &str,
    req: &VmBackupRequest,
) -> Result<(MoRef, SnapshotRecord), VmJobError> {
    let description = format!(
        "{} {}",
        crate::vsphere::SNAPSHOT_DESCRIPTION_PREFIX,
        req.job_id
    );
    let policy = req.quiesce;
    let failure = match client
        .create_snapshot(vm, snap_name, &description, policy.asks_quiesce())
        .await
    {
        Ok(snap) => match quiesce::decide(policy, &vm.name, Ok(())) {
            quiesce::Decision::Keep(record) => {
                tracing::info!(consistency = %record.consistency, policy = %policy, "snapshot taken");
                return Ok((snap, record));
            }
            // Unreachable for a snapshot that was taken; keep it rather than fail.
            quiesce::Decision::FallBack(record) => return Ok((snap, record)),
            quiesce::Decision::Fail(e) => {
                let _ = client.remove_snapshot(&snap).await;
                return Err(e.into());
            }
        },
        Err(e) if policy.asks_quiesce() => match quiesce::quiesce_failure(&e) {
            Some(f) => f,
            None => return Err(e.into()),
        },
        Err(e) => return Err(e.into()),
    };
    // vSphere rolls a failed quiesced snapshot back; make sure nothing of the
    // attempt is left (a second snapshot of the same name would follow).
    remove_leftover(client, vm, snap_name).await;
    match quiesce::decide(policy, &vm.name, Err(&failure)) {
        quiesce::Decision::Fail(e) => {
            tracing::error!(policy = %policy, fault = %failure, "the guest could not be quiesced and the policy requires it; no backup");
            Err(e.into())
        }
        quiesce::Decision::FallBack(record) | quiesce::Decision::Keep(record) => {
            tracing::warn!(policy = %policy, fault = %failure, "the guest could not be quiesced; taking a crash-consistent snapshot as the policy allows");
            let snap = client
                .create_snapshot(vm, snap_name, &description, false)
                .await?;
            Ok((snap, record))
        }
    }
}

/// Remove any snapshot named `snap_name` on `vm` (what a failed snapshot
/// attempt could have left); failures are logged, the orphan sweep retries.
async fn remove_leftover(client: &Client, vm: &Vm, snap_name: &str) {
    let fresh = match client.vm(&vm.moref).await {
        Ok(v) => v,
        Err(e) => {
            tracing::warn!(error = %e, "could not re-read the VM after a failed quiesced snapshot");
            return;
        }
    };
    for s in crate::vsphere::snapshot::find_snapshots(&fresh.snapshots, snap_name) {
        tracing::warn!(snapshot = %s.snapshot.value, "the failed quiesced snapshot left a snapshot; removing it");
        if let Err(e) = client.remove_snapshot(&s.snapshot).await {
            tracing::error!(error = %e, "removing the failed attempt's snapshot failed; the orphan sweep will retry");
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn with_snapshot(
    client: &Client,
    vm: &Vm,
    proxy_vm: Option<&Vm>,
    me: &ThisProxy,
    snap: &MoRef,
    selection: &Selection,
    repo: Arc<Repository>,
    keys: Arc<dyn KeySource>,
    req: &VmBackupRequest,
    consistency: &SnapshotRecord,
    progress: Arc<Progress>,
    attached: &mut Vec<AttachedDisk>,
    vddk: Option<&VddkJob>,
) -> Result<(Vec<DiskOutcome>, BackupReport), VmJobError> {
    let snap_disks = client.snapshot_disks(snap).await?;
    let host = vm.host.clone().ok_or_else(|| {
        VmJobError::Invalid(format!("vCenter reports no host for VM {}", vm.name))
    })?;
    let mut inputs = Vec::new();
    let mut outcomes = Vec::new();
    let mut disks: Vec<&VirtualDisk> = snap_disks.iter().collect();
    disks.sort_by_key(|d| d.key);
    for (n, disk) in disks.into_iter().enumerate() {
        let decision = selection
            .disks
            .iter()
            .find(|d| d.disk_key == disk.key)
            .ok_or_else(|| {
                VmJobError::Invalid(format!(
                    "disk {} ({}) appeared after selection",
                    disk.key, disk.label
                ))
            })?;
        let Outcome::Assigned { mode, .. } = &decision.outcome else {
            unreachable!("refused selections return before the snapshot");
        };
        let mut mode = *mode;
        let mut reason = decision.placed_or(
            req.placement.get(&disk.key).map(|(m, r)| (*m, r.as_str())),
            decision.reason_summary(),
        );
        let label = format!("{} (key {})", disk.label, disk.key);
        let source: Box<dyn DiskSource> = loop {
            if mode == Mode::Nbd && (vm.key_id.is_some() || disk.key_id.is_some()) {
                // The selector never picks it; this is the last line of defence.
                return Err(VmJobError::Invalid(format!(
                    "refusing clear-text NBD for encrypted VM {}",
                    vm.name
                )));
            }
            if let Some(v) = vddk {
                match v.open(client, snap, disk, mode).await {
                    Ok(s) => {
                        reason = format!(
                            "{reason}; carried by VDDK {} ({mode} confirmed by GetTransportMode)",
                            v.vddk.version()
                        );
                        break s;
                    }
                    Err(e)
                        if mode == Mode::HotAdd
                            && vddk_refused_mode(&e)
                            && req.policy.failover_to_network
                            && me.modes.contains(&Mode::NbdSsl) =>
                    {
                        tracing::warn!(disk = disk.key, error = %e, "HotAdd refused by VDDK; continuing by NBD-SSL as policy allows");
                        reason = format!(
                            "{reason}; HotAdd then refused by VDDK ({e}), failed over to NBD-SSL"
                        );
                        mode = Mode::NbdSsl;
                        continue;
                    }
                    Err(source) => {
                        return Err(VmJobError::Source {
                            vm: vm.name.clone(),
                            disk: label.clone(),
                            source,
                        })
                    }
                }
            }
            match mode {
                Mode::HotAdd => {
                    let pvm = proxy_vm.ok_or_else(|| {
                        VmJobError::Invalid(
                            "HotAdd chosen but this proxy has no VM configured".into(),
                        )
                    })?;
                    match hotadd(client, pvm, me, disk, req, attached).await {
                        Ok(s) => break s,
                        Err(e)
                            if e.is_crypto()
                                && req.policy.failover_to_network
                                && me.modes.contains(&Mode::NbdSsl) =>
                        {
                            tracing::warn!(disk = disk.key, error = %e, "HotAdd refused by vCenter; continuing by NBD-SSL as policy allows");
                            reason = format!("{reason}; HotAdd then refused by vCenter ({e}), failed over to NBD-SSL");
                            mode = Mode::NbdSsl;
                        }
                        Err(HotAddError::Source(source)) => {
                            return Err(VmJobError::Source {
                                vm: vm.name.clone(),
                                disk: label.clone(),
                                source,
                            })
                        }
                        Err(e) => return Err(e.into()),
                    }
                }
                Mode::NbdSsl | Mode::Nbd => {
                    let s = nbd(client, &host, vm, snap, disk, mode, &req.nbd)
                        .await
                        .map_err(|e| match e {
                            NbdOpenError::Vsphere(v) => VmJobError::Vsphere(v),
                            NbdOpenError::Source(source) => VmJobError::Source {
                                vm: vm.name.clone(),
                                disk: label.clone(),
                                source,
                            },
                            NbdOpenError::Invalid(m) => VmJobError::Invalid(m),
                        })?;
                    break s;
                }
            }
        };
        outcomes.push(DiskOutcome {
            disk: n as u32,
            device_key: disk.key,
            label: label.clone(),
            mode,
            reason: reason.clone(),
            read: ReadMode::Full,
            read_reason: String::new(),
            bytes_read: 0,
            changed_bytes: None,
        });
        inputs.push(DiskInput {
            source,
            label,
            transport_reason: reason,
            change_id: disk.change_id.clone(),
            read: read_request(client, vm, snap, disk, req),
        });
    }
    let breq = BackupRequest {
        source_name: vm.name.clone(),
        identity: vm_identity(client, vm),
        disks: inputs,
        pipeline: req.pipeline,
        lock_wait: req.lock_wait,
        snapshot: Some(consistency.clone()),
    };
    let report =
        tokio::task::spawn_blocking(move || super::backup(&repo, keys.as_ref(), breq, &progress))
            .await
            .map_err(|e| VmJobError::Invalid(format!("backup thread failed: {e}")))??;
    Ok((outcomes, report))
}

/// The VM's identity for its chain: `<vCenter instance UUID>/<VM instance
/// UUID>` (stable across renames and vMotion within the vCenter; a VM deleted
/// and recreated under the same name gets a new one). `None` when vCenter
/// reports either as empty: the chain then follows the name.
pub fn vm_identity(client: &Client, vm: &Vm) -> Option<String> {
    let vc = client.about().instance_uuid.trim();
    let id = vm.instance_uuid.as_deref().map(str::trim).unwrap_or("");
    (!vc.is_empty() && !id.is_empty()).then(|| format!("{vc}/{id}"))
}

/// How the job may read `disk`: with a [`VsphereTracker`] when the VM has CBT on,
/// in full (and why) otherwise.
fn read_request(
    client: &Client,
    vm: &Vm,
    snap: &MoRef,
    disk: &VirtualDisk,
    req: &VmBackupRequest,
) -> ReadRequest {
    if vm.change_tracking != Some(true) {
        return ReadRequest::full(if req.enable_cbt {
            "changed block tracking is off on the VM and could not be turned on"
        } else {
            "changed block tracking is off on the VM (enable it for incrementals)"
        });
    }
    ReadRequest {
        tracker: Some(Box::new(VsphereTracker {
            client: client.clone(),
            runtime: tokio::runtime::Handle::current(),
            vm: vm.moref.clone(),
            snapshot: snap.clone(),
            device_key: disk.key,
            capacity: disk.capacity_bytes,
        })),
        full_reason: req.full.then(|| "a full backup was requested".to_string()),
    }
}

/// Changed and allocated areas of one snapshot disk from vCenter
/// (QueryChangedDiskAreas, paged up to the capacity). Called from the backup's
/// blocking thread; the SOAP calls run on the job's runtime.
pub struct VsphereTracker {
    client: Client,
    runtime: tokio::runtime::Handle,
    vm: MoRef,
    snapshot: MoRef,
    device_key: i32,
    capacity: u64,
}

impl VsphereTracker {
    fn query(&self, change_id: &str) -> Result<Vec<Extent>, TrackerError> {
        let areas = self
            .runtime
            .block_on(self.client.changed_areas(
                &self.vm,
                &self.snapshot,
                self.device_key,
                self.capacity,
                change_id,
            ))
            .map_err(|e| {
                if e.is_cbt_reset() {
                    TrackerError::UnknownChangeId(e.to_string())
                } else {
                    TrackerError::Failed(e.to_string())
                }
            })?;
        Ok(areas
            .into_iter()
            .map(|a| Extent {
                offset: a.start,
                len: a.length,
            })
            .collect())
    }
}

impl ChangeTracker for VsphereTracker {
    fn changed_since(&self, change_id: &str) -> Result<Vec<Extent>, TrackerError> {
        self.query(change_id)
    }
    fn allocated(&self) -> Result<Vec<Extent>, TrackerError> {
        self.query(crate::vsphere::cbt::ALL_ALLOCATED)
    }
}

async fn hotadd(
    client: &Client,
    pvm: &Vm,
    me: &ThisProxy,
    disk: &VirtualDisk,
    req: &VmBackupRequest,
    attached: &mut Vec<AttachedDisk>,
) -> Result<Box<dyn DiskSource>, HotAddError> {
    let dir = me
        .device_dir
        .clone()
        .ok_or_else(|| HotAddError::Invalid("HotAdd needs [agent] hotadd_device_dir".into()))?;
    let a = client
        .attach_disk(&pvm.moref, disk)
        .await
        .map_err(HotAddError::Vsphere)?;
    let name = a.device_name();
    attached.push(a);
    let name = name.ok_or_else(|| {
        HotAddError::Invalid("vCenter reported the hot-added disk without a backing uuid".into())
    })?;
    let size = disk.capacity_bytes;
    let wait = req.hotadd_wait;
    let src = tokio::task::spawn_blocking(move || HotAddSource::open(&dir, &name, size, wait))
        .await
        .map_err(|e| HotAddError::Invalid(format!("hot-add wait failed: {e}")))?
        .map_err(HotAddError::Source)?;
    Ok(Box::new(src))
}

#[derive(Debug, thiserror::Error)]
enum HotAddError {
    #[error(transparent)]
    Vsphere(VsphereError),
    #[error(transparent)]
    Source(SourceError),
    #[error("{0}")]
    Invalid(String),
}

impl HotAddError {
    fn is_crypto(&self) -> bool {
        matches!(self, HotAddError::Vsphere(v) if v.is_crypto())
    }
}

impl From<HotAddError> for VmJobError {
    fn from(e: HotAddError) -> Self {
        match e {
            HotAddError::Vsphere(v) => VmJobError::Vsphere(v),
            HotAddError::Source(source) => VmJobError::Source {
                vm: "?".into(),
                disk: "?".into(),
                source,
            },
            HotAddError::Invalid(m) => VmJobError::Invalid(m),
        }
    }
}

enum NbdOpenError {
    Vsphere(VsphereError),
    Source(SourceError),
    Invalid(String),
}

async fn nbd(
    client: &Client,
    host: &MoRef,
    vm: &Vm,
    snap: &MoRef,
    disk: &VirtualDisk,
    mode: Mode,
    s: &NbdSettings,
) -> Result<Box<dyn DiskSource>, NbdOpenError> {
    let ticket = client
        .nbd_ticket(host, &vm.moref, snap, disk.key)
        .await
        .map_err(NbdOpenError::Vsphere)?;
    let uri = match mode {
        Mode::NbdSsl => {
            let dir = s.tls_certificates.as_ref().ok_or_else(|| {
                NbdOpenError::Invalid(
                    "NBD-SSL needs [nbd] tls_certificates (a directory with ca-cert.pem)".into(),
                )
            })?;
            format!(
                "{}?tls-certificates={}",
                ticket.nbds_url(s.port),
                dir.display()
            )
        }
        Mode::Nbd => {
            if vm.key_id.is_some() || disk.key_id.is_some() {
                // The selector never picks it; this is the last line of defence.
                return Err(NbdOpenError::Invalid(format!(
                    "refusing clear-text NBD for encrypted VM {}",
                    vm.name
                )));
            }
            ticket.nbds_url(s.port).replacen("nbds://", "nbd://", 1)
        }
        Mode::HotAdd => unreachable!("nbd() is called for network modes"),
    };
    let conns = s.connections;
    // The export name is the ticket, a credential: logs and errors name the disk.
    let label = format!(
        "{}://{}:{}/<ticket for {} disk {}>",
        if mode == Mode::NbdSsl { "nbds" } else { "nbd" },
        ticket.host_name,
        s.port,
        vm.name,
        disk.key
    );
    let src = tokio::task::spawn_blocking(move || NbdSource::connect_labeled(&uri, &label, conns))
        .await
        .map_err(|e| NbdOpenError::Invalid(format!("NBD connect thread failed: {e}")))?
        .map_err(NbdOpenError::Source)?;
    Ok(Box::new(src))
}

/// What an orphan sweep found and did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SweepReport {
    /// Hot-added disks detached from this proxy VM (file names).
    pub detached: Vec<String>,
    /// ferry snapshots removed (VM name, snapshot name).
    pub snapshots_removed: Vec<(String, String)>,
    /// Failures, for the log and the operator.
    pub errors: Vec<String>,
    /// What `VixDiskLib_Cleanup` cleaned up (VDDK's leftover hot-adds).
    pub vddk_cleaned: u32,
}

/// Job ids of this proxy start with its id, so snapshot names tell which proxy's
/// job made them: `ferry-<proxy id>-<n>`.
pub fn job_id_prefix(proxy_id: &str) -> String {
    format!("{proxy_id}-")
}

/// Remove what this proxy's crashed jobs left behind, at agent start before any job
/// runs: every disk ferry hot-added to this proxy VM, and this proxy's `ferry-*`
/// snapshots (other proxies' running jobs are left alone) whose job id is not in
/// `running`.
pub async fn sweep_orphans(
    client: &Client,
    me: &ThisProxy,
    running: &[String],
    vddk: Option<&VddkSettings>,
) -> Result<SweepReport, VmJobError> {
    let mut rep = SweepReport::default();
    if let (Some(s), true) = (vddk, running.is_empty()) {
        // VDDK's own leftovers first (disks it hot-added for a killed job).
        let v = init_vddk(s).await?;
        let spec = crate::transport::vddk::CleanupSpec::from(
            &connect_spec(client, "", s).map_err(|e| VmJobError::Invalid(e.to_string()))?,
        );
        match tokio::task::spawn_blocking(move || crate::transport::vddk::cleanup(&v, &spec)).await
        {
            Ok(Ok((cleaned, remaining))) => {
                tracing::info!(cleaned, remaining, "VDDK cleanup");
                rep.vddk_cleaned = cleaned;
                if remaining > 0 {
                    rep.errors.push(format!(
                        "VDDK cleanup left {remaining} item(s) it could not clean"
                    ));
                }
            }
            Ok(Err(e)) => rep.errors.push(format!("VDDK cleanup: {e}")),
            Err(e) => rep.errors.push(format!("VDDK cleanup thread: {e}")),
        }
    }
    let keep: Vec<String> = running
        .iter()
        .map(|j| crate::vsphere::snapshot_name(j))
        .collect();
    let mine = crate::vsphere::snapshot_name(&job_id_prefix(&me.id));
    if let (Some(name), true) = (&me.vm_name, running.is_empty()) {
        let pvm = client.vm_by_name(name).await?;
        for d in crate::vsphere::hotadd::ferry_attached(&pvm) {
            match client.detach_disk(&d).await {
                Ok(()) => rep.detached.push(d.file_name.clone()),
                Err(e) => rep.errors.push(format!("detach {}: {e}", d.file_name)),
            }
        }
    }
    for s in client.ferry_snapshots().await? {
        if !s.name.starts_with(&mine) || keep.contains(&s.name) {
            continue;
        }
        match client.remove_snapshot(&s.snapshot).await {
            Ok(()) => rep
                .snapshots_removed
                .push((s.vm_name.clone(), s.name.clone())),
            Err(e) => rep
                .errors
                .push(format!("remove snapshot {} of {}: {e}", s.name, s.vm_name)),
        }
    }
    tracing::info!(
        detached = rep.detached.len(),
        snapshots = rep.snapshots_removed.len(),
        errors = rep.errors.len(),
        "orphan sweep done"
    );
    Ok(rep)
}
