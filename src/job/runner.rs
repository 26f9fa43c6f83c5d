//! The agent's real [`JobRunner`]: VM backups through vCenter ([`super::vm`]),
//! restores of restore points to files or into new disks of a VM
//! ([`super::vm_restore`]), the orphan sweep at agent start and the key sync, each
//! from the agent's configuration file.
//!
//! Owns the translation between the agent's job model (specs, contexts, stable
//! error codes) and the job modules: per job it opens the tenant's key source
//! (which reaches the KMS before anything is written), the tenant's repository
//! (created on first use), a vCenter session (always logged out), and applies the
//! VM's retention after a successful backup. Must not: decide transports (the
//! selector in [`super::vm`] does, again, with vCenter's current view), keep
//! sessions or key sources between jobs (a rotated key must be seen at the next
//! job start), or return key material.

use super::vm::{self, NbdSettings, ThisProxy, VmBackupRequest, VmJobError};
use super::vm_restore::{self, VmRef, VmRestoreError, VmRestoreRequest};
use super::JobError;
use crate::agent::{
    DiskResult, FilesAnswer, FilesQuery, InterruptedJob, JobContext, JobRunner, JobSpec, KeyStatus,
    KeySyncOutcome, ProxyFacts, RestoreSpec, RestoreTarget, RunError, RunOutput, SweepReport,
    VerifySpec,
};
use crate::config::{Config, TenantSection, VcenterSection};
use crate::keys::{KeyError, KeySource};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::repo::format::DEFAULT_CHUNK_SIZE;
use crate::repo::{RepoError, Repository};
use crate::transport::select::Mode;
use crate::vsphere::{Client, ClientConfig, VsphereError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a backup waits for the repository lock (a prune may hold it).
const LOCK_WAIT: Duration = Duration::from_secs(600);
/// How long a hot-added disk may take to appear in the device directory.
const HOTADD_WAIT: Duration = Duration::from_secs(60);

/// Runs the agent's jobs from its configuration file.
pub struct VmJobRunner {
    vcenter: Option<VcenterSection>,
    nbd: NbdSettings,
    vddk: Option<vm::VddkSettings>,
    proxy_vm: Option<String>,
    device_dir: Option<PathBuf>,
    proxy_id: String,
    modes: Vec<Mode>,
    workers: Option<usize>,
    memory: u64,
    task_poll: Option<Duration>,
}

impl VmJobRunner {
    /// The runner for an agent configured by `cfg` (`[agent]`, `[vcenter]`,
    /// `[nbd]`, `[pipeline]`). Without `[vcenter]` the agent can restore to files
    /// and sync keys, and refuses backups with a clear error.
    pub fn from_config(cfg: &Config) -> Result<VmJobRunner, RunError> {
        let agent = cfg
            .agent
            .as_ref()
            .ok_or_else(|| RunError::Failed("the config has no [agent] section".into()))?;
        Ok(VmJobRunner {
            vcenter: cfg.vcenter.clone(),
            nbd: NbdSettings {
                tls_certificates: cfg.nbd.tls_certificates.clone(),
                port: cfg.nbd.port,
                connections: cfg.nbd.connections.max(1),
            },
            vddk: cfg.vddk.as_ref().map(vm::VddkSettings::from),
            proxy_vm: cfg.vcenter.as_ref().and_then(|v| v.proxy_vm.clone()),
            device_dir: agent.hotadd_device_dir.clone(),
            proxy_id: agent.id.clone(),
            modes: agent.modes.clone(),
            workers: cfg.pipeline.workers,
            memory: cfg.pipeline.memory_mib.unwrap_or(128) << 20,
            task_poll: None,
        })
    }

    /// Poll vCenter tasks this often (tests and the simulator use a short
    /// interval; vCenter's default of 2 s suits production).
    pub fn with_task_poll(mut self, every: Duration) -> VmJobRunner {
        self.task_poll = Some(every);
        self
    }

    fn client_config(&self) -> Result<ClientConfig, RunError> {
        let v = self.vcenter.as_ref().ok_or_else(|| {
            RunError::Unavailable(format!(
                "agent {} has no [vcenter] section: it can restore to directories and sync keys, but not back up VMs or restore into them",
                self.proxy_id
            ))
        })?;
        let mut c = ClientConfig::from_section(v).map_err(|e| RunError::Vsphere(e.to_string()))?;
        if let Some(p) = self.task_poll {
            c.task_poll = p;
        }
        Ok(c)
    }

    fn connect(&self, rt: &tokio::runtime::Handle) -> Result<Client, RunError> {
        let cfg = self.client_config()?;
        rt.block_on(Client::connect(cfg)).map_err(vsphere_err)
    }

    /// This proxy as a job of `ctx` sees it (the context's id, modes and slots).
    fn proxy_of(&self, ctx: &JobContext) -> ThisProxy {
        ThisProxy {
            id: ctx.proxy.id.clone(),
            vm_name: self.proxy_vm.clone(),
            device_dir: self.device_dir.clone(),
            modes: ctx.proxy.modes.clone(),
            free_slots: ctx.proxy.free_slots,
        }
    }

    /// The orphan sweep of [`JobRunner::sweep_orphans`] on a logged-in `client`.
    fn sweep_with(
        &self,
        client: &Client,
        rt: &tokio::runtime::Handle,
        interrupted: &[InterruptedJob],
    ) -> Result<SweepReport, RunError> {
        let me = self.this_proxy(0);
        // At agent start nothing of this proxy runs: every ferry leftover of it goes.
        let rep = rt
            .block_on(vm::sweep_orphans(client, &me, &[], self.vddk.as_ref()))
            .map_err(vm_err)?;
        let mut report = SweepReport::default();
        let mut claimed = vec![false; rep.snapshots_removed.len()];
        for j in interrupted {
            let snap =
                crate::vsphere::snapshot_name(&format!("{}{}", vm::job_id_prefix(&me.id), j.id));
            let mut did = Vec::new();
            for (i, (vm_name, s)) in rep.snapshots_removed.iter().enumerate() {
                if *s == snap {
                    claimed[i] = true;
                    did.push(format!("snapshot {s} of {vm_name} removed"));
                }
            }
            // A restore into a VM that a crash interrupted leaves new, half-written
            // disks on that VM (already detached from this proxy above): remove them,
            // as the job itself would have on failure.
            if let Some(JobSpec::Restore(RestoreSpec {
                target: RestoreTarget::Vm { moref, .. },
                ..
            })) = &j.spec
            {
                let job = format!("{}{}", vm::job_id_prefix(&me.id), j.id);
                match rt.block_on(vm_restore::remove_interrupted_disks(client, moref, &job)) {
                    Ok(files) if files.is_empty() => {
                        did.push(format!("no new disk of this job was left on VM {moref}"))
                    }
                    Ok(files) => did.push(format!(
                        "half-written new disk(s) {} removed from VM {moref}",
                        files.join(", ")
                    )),
                    Err(e) => {
                        tracing::error!(error = %e, job = %j.id, "orphan sweep could not remove an interrupted restore's disks");
                        did.push(format!(
                            "NOT cleaned: new disks of this job on VM {moref} ({e}); remove ferry-restore-{job}-disk*.vmdk by hand"
                        ))
                    }
                }
            }
            if did.is_empty() {
                did.push(match &j.spec {
                    // A verify only reads the repository (under a shared lock,
                    // which dies with the process): nothing to clean.
                    Some(JobSpec::Verify(_)) => "verify job: nothing to clean".into(),
                    _ => "no snapshot of this job was left".into(),
                });
            }
            report.jobs.push((j.id.clone(), did.join("; ")));
        }
        for (i, (vm_name, s)) in rep.snapshots_removed.iter().enumerate() {
            if !claimed[i] {
                report
                    .other
                    .push(format!("snapshot {s} of {vm_name} removed"));
            }
        }
        for d in &rep.detached {
            report
                .other
                .push(format!("hot-added disk {d} detached from this proxy"));
        }
        if rep.vddk_cleaned > 0 {
            report.other.push(format!(
                "VDDK cleanup: {} leftover(s) of VDDK (hot-added disks) cleaned",
                rep.vddk_cleaned
            ));
        }
        for e in &rep.errors {
            tracing::error!(error = %e, "orphan sweep could not clean a leftover");
            report.other.push(format!("NOT cleaned: {e}"));
        }
        Ok(report)
    }

    fn this_proxy(&self, free_slots: u32) -> ThisProxy {
        ThisProxy {
            id: self.proxy_id.clone(),
            vm_name: self.proxy_vm.clone(),
            device_dir: self.device_dir.clone(),
            modes: self.modes.clone(),
            free_slots,
        }
    }

    fn pipeline(&self, chunk_size: u32) -> PipelineConfig {
        PipelineConfig::new(self.workers, chunk_size, self.memory)
    }

    fn backup(
        &self,
        ctx: &JobContext,
        spec: &crate::agent::BackupSpec,
    ) -> Result<RunOutput, RunError> {
        // Key source first: a KMS that is down fails the job before any snapshot.
        let keys: Arc<dyn KeySource> = Arc::from(open_keys(&ctx.tenant)?);
        let repo = Arc::new(open_or_init_repo(&ctx.tenant, keys.as_ref())?);
        let client = self.connect(&ctx.runtime)?;
        let me = self.proxy_of(ctx);
        let req = VmBackupRequest {
            // Snapshot names carry the proxy id, so the sweep finds this proxy's.
            job_id: format!("{}{}", vm::job_id_prefix(&me.id), ctx.job_id),
            vm: spec.vm.name.clone(),
            policy: ctx.policy.clone(),
            nbd: self.nbd.clone(),
            enable_cbt: true,
            quiesce: spec.quiesce,
            pipeline: self.pipeline(repo.config.chunk_size),
            lock_wait: LOCK_WAIT,
            hotadd_wait: HOTADD_WAIT,
            full: spec.full,
            placement: spec.placed(),
            vddk: self.vddk.clone(),
        };
        let started = Instant::now();
        let keys_for_retention = keys.clone();
        let result = ctx.runtime.block_on(vm::backup_vm(
            &client,
            &me,
            repo.clone(),
            keys,
            &req,
            ctx.progress.clone(),
        ));
        ctx.runtime.block_on(client.logout());
        let out = result.map_err(vm_err)?;
        let seconds = started.elapsed().as_secs_f64();
        let total_read: u64 = out.disks.iter().map(|d| d.bytes_read).sum();
        let disks = out
            .disks
            .iter()
            .map(|d| {
                let bytes = d.bytes_read;
                DiskResult {
                    disk_key: d.device_key,
                    label: d.label.clone(),
                    proxy: me.id.clone(),
                    mode: Some(d.mode),
                    reason: d.reason.clone(),
                    bytes,
                    // Disks run one after another; the job's time is shared by bytes.
                    seconds: share(seconds, bytes, total_read, out.disks.len()),
                    error: None,
                    read: Some(d.read.to_string()),
                    read_reason: Some(d.read_reason.clone()),
                }
            })
            .collect();
        let mut notes = vec![snapshot_note(&out.snapshot)];
        if let Some(policy) = &spec.retention {
            notes.push(apply_retention(
                &repo,
                keys_for_retention.as_ref(),
                &out.report.chain,
                &spec.vm.name,
                policy,
            ));
        }
        Ok(RunOutput {
            disks,
            point_id: Some(out.report.point_id),
            notes,
        })
    }

    /// What [`Self::restore_into_vm`] would do, changing nothing (`ferry restore --vm
    /// --dry-run`): the point's disks (from its manifest header, read without keys
    /// and so not authenticated: sizes and labels only) planned into `target` on
    /// this proxy, disk by disk (new or overwritten, datastore and why, storage
    /// policy, proxy and transport and why), with every refusal the restore would
    /// make before its first change.
    pub fn plan_restore_into_vm(
        &self,
        ctx: &JobContext,
        point: &str,
        disks: Option<&[u32]>,
        target: VmRef,
        options: vm_restore::TargetOptions,
    ) -> Result<vm_restore::RestorePlan, RunError> {
        let repo = Repository::open(&ctx.tenant.repository).map_err(repo_err)?;
        let point_id = repo.resolve_point(point).map_err(repo_err)?;
        let (_, header, _) = repo.read_manifest(&point_id).map_err(repo_err)?;
        let wanted = vm_restore::wanted_disks(&header, disks).map_err(restore_vm_err)?;
        let client = self.connect(&ctx.runtime)?;
        let me = self.proxy_of(ctx);
        let req = self.vm_restore_request(ctx, &me, disks, target, options, repo.config.chunk_size);
        let result = ctx
            .runtime
            .block_on(vm_restore::plan(&client, &me, &req, &wanted));
        ctx.runtime.block_on(client.logout());
        result.map_err(restore_vm_err)
    }

    /// The library request of a restore into a VM by this agent.
    fn vm_restore_request(
        &self,
        ctx: &JobContext,
        me: &ThisProxy,
        disks: Option<&[u32]>,
        target: VmRef,
        options: vm_restore::TargetOptions,
        chunk_size: u32,
    ) -> VmRestoreRequest {
        VmRestoreRequest {
            // New disk files carry the proxy id and job id, like snapshot names.
            job_id: format!("{}{}", vm::job_id_prefix(&me.id), ctx.job_id),
            target,
            disks: disks.map(<[u32]>::to_vec),
            policy: ctx.policy.clone(),
            nbd: self.nbd.clone(),
            pipeline: self.pipeline(chunk_size),
            lock_wait: LOCK_WAIT,
            hotadd_wait: HOTADD_WAIT,
            required_key_provider: ctx.tenant.key_provider.clone(),
            // Through VDDK when the agent has [vddk], exactly as backups.
            vddk: self.vddk.clone(),
            options,
        }
    }

    /// Restore `point` (an id or `latest:<name>`) of the context's tenant into new
    /// disks of the VM `target`, one per restored disk (`disks`, or all), through
    /// this proxy: the agent's restores with a `vm` target and `ferry restore
    /// --vm`. The VM must exist; nothing on it changes unless the selector finds a
    /// transport for every disk (and the datastore, power state and `options`
    /// allow it), and a failed restore removes the disks it created.
    pub fn restore_into_vm(
        &self,
        ctx: &JobContext,
        point: &str,
        disks: Option<&[u32]>,
        target: VmRef,
        options: vm_restore::TargetOptions,
    ) -> Result<RunOutput, RunError> {
        let keys = open_unwrap_keys(&ctx.tenant)?;
        let repo = Repository::open(&ctx.tenant.repository).map_err(repo_err)?;
        let point_id = repo.resolve_point(point).map_err(repo_err)?;
        let keyring = super::try_keyring(&repo, keys.as_ref());
        let opened = repo
            .open_point(&point_id, keys.as_ref(), keyring.as_ref())
            .map_err(repo_err)?;
        drop(keys);
        // Checked again by the restore; here before anything talks to vCenter.
        vm_restore::wanted_disks(&opened.header, disks).map_err(restore_vm_err)?;
        let chunk_size = opened.body.chunk_size;
        let client = self.connect(&ctx.runtime)?;
        let me = self.proxy_of(ctx);
        let req = self.vm_restore_request(ctx, &me, disks, target, options, chunk_size);
        let result = ctx.runtime.block_on(vm_restore::restore_vm(
            &client,
            &me,
            Arc::new(repo),
            Arc::new(opened),
            &req,
            ctx.progress.clone(),
        ));
        ctx.runtime.block_on(client.logout());
        let out = result.map_err(restore_vm_err)?;
        let disks = out
            .disks
            .iter()
            .map(|d| DiskResult {
                disk_key: d.disk as i32,
                label: d.label.clone(),
                proxy: me.id.clone(),
                mode: Some(d.mode),
                reason: format!(
                    "{}; written into new disk {} ({}) of VM {}",
                    d.reason, d.new_disk_key, d.new_file, out.vm
                ),
                bytes: d.bytes_written,
                seconds: d.seconds,
                error: None,
                read: None,
                read_reason: None,
            })
            .collect();
        let notes = vec![format!(
            "restored {} disk(s) of {point_id} into new disks of VM {} ({}): {}",
            out.disks.len(),
            out.vm,
            out.moref,
            out.disks
                .iter()
                .map(|d| format!("disk {} -> {} (key {})", d.disk, d.new_file, d.new_disk_key))
                .collect::<Vec<_>>()
                .join(", ")
        )];
        Ok(RunOutput {
            disks,
            point_id: Some(point_id),
            notes,
        })
    }

    /// Verify the tenant's repository, or one point of it: every manifest,
    /// index and (with `read_data`) chunk, read-only, with the tenant's key
    /// source (unwrapping only, as restores).
    fn verify(&self, ctx: &JobContext, spec: &VerifySpec) -> Result<RunOutput, RunError> {
        let keys = open_unwrap_keys(&ctx.tenant)?;
        let repo = Repository::open(&ctx.tenant.repository).map_err(repo_err)?;
        let points = match &spec.point {
            Some(p) => vec![repo.resolve_point(p).map_err(repo_err)?],
            None => Vec::new(),
        };
        let workers = self
            .workers
            .unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            })
            .max(1);
        let rep = crate::repo::verify::verify_with(
            &repo,
            keys.as_ref(),
            &points,
            workers,
            false,
            spec.read_data,
            &ctx.progress,
        )
        .map_err(repo_err)?;
        if ctx.is_cancelled() {
            return Err(RunError::Cancelled);
        }
        let total = ctx
            .progress
            .total
            .load(std::sync::atomic::Ordering::Relaxed);
        ctx.progress
            .done
            .store(total, std::sync::atomic::Ordering::Relaxed);
        let read = ctx.progress.read.load(std::sync::atomic::Ordering::Relaxed);
        verify_outcome(&rep, spec.read_data, read, points.first().cloned())
    }

    fn restore(&self, ctx: &JobContext, spec: &RestoreSpec) -> Result<RunOutput, RunError> {
        let dir = match &spec.target {
            RestoreTarget::Directory { path } => path.clone(),
            RestoreTarget::Files {
                path,
                disk,
                partition,
                paths,
            } => {
                prepare_restore_dir(path)?;
                return super::files::restore(ctx, &spec.point, path, *disk, *partition, paths);
            }
            RestoreTarget::Vm {
                moref,
                datastore,
                storage_policy,
                overwrite,
            } => {
                return self.restore_into_vm(
                    ctx,
                    &spec.point,
                    spec.disks.as_deref(),
                    VmRef::Moref(moref.clone()),
                    vm_restore::TargetOptions {
                        datastore: datastore.clone(),
                        storage_policy: storage_policy.clone(),
                        overwrite: *overwrite,
                    },
                )
            }
        };
        let keys = open_unwrap_keys(&ctx.tenant)?;
        let repo = Repository::open(&ctx.tenant.repository).map_err(repo_err)?;
        let point_id = repo.resolve_point(&spec.point).map_err(repo_err)?;
        let keyring = super::try_keyring(&repo, keys.as_ref());
        let point = repo
            .open_point(&point_id, keys.as_ref(), keyring.as_ref())
            .map_err(repo_err)?;
        let disks: Vec<u32> = match &spec.disks {
            Some(d) => d.clone(),
            None => point.body.disks.iter().map(|d| d.disk).collect(),
        };
        for d in &disks {
            if !point.body.disks.iter().any(|x| x.disk == *d) {
                return Err(RunError::NotFound(format!(
                    "restore point {point_id} has no disk {d}"
                )));
            }
        }
        prepare_restore_dir(&dir)?;
        let source = point.header.source.clone();
        let mut out = Vec::new();
        for d in disks {
            if ctx.is_cancelled() {
                return Err(RunError::Cancelled);
            }
            let target = restore_path(&dir, &source, d);
            let started = Instant::now();
            let stats = super::restore_new_file(
                &repo,
                keys.as_ref(),
                &point_id,
                d,
                &target,
                self.pipeline(point.body.chunk_size),
                &ctx.progress,
            )
            .map_err(job_err)?;
            let label = point
                .header
                .disks
                .iter()
                .find(|x| x.disk == d)
                .map(|x| x.label.clone())
                .unwrap_or_default();
            out.push(DiskResult {
                disk_key: d as i32,
                label,
                proxy: ctx.proxy.id.clone(),
                mode: None,
                reason: format!("restored to {}", target.display()),
                bytes: stats.bytes_written,
                seconds: started.elapsed().as_secs_f64(),
                error: None,
                read: None,
                read_reason: None,
            });
        }
        Ok(RunOutput {
            disks: out,
            point_id: Some(point_id),
            notes: vec![],
        })
    }
}

/// The current runtime when called from the agent (a blocking thread of its
/// runtime); elsewhere (tools, tests) a private one, returned to keep it alive.
fn runtime_handle() -> Result<(Option<tokio::runtime::Runtime>, tokio::runtime::Handle), RunError> {
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        return Ok((None, h));
    }
    // Multi-thread: Handle::block_on drives I/O only on such a runtime.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .map_err(|e| RunError::Failed(format!("cannot start a runtime: {e}")))?;
    let h = rt.handle().clone();
    Ok((Some(rt), h))
}

/// Create a restore directory the agent resolved (`dir` is canonical: the
/// agent's `restore_dirs` check resolved every symlink) and make sure it
/// still resolves to itself once created: a symlink put in its way since
/// the check (by another restore's files, say) is refused instead of
/// followed out of the allowed directories.
pub fn prepare_restore_dir(dir: &Path) -> Result<(), RunError> {
    std::fs::create_dir_all(dir).map_err(|e| {
        RunError::Failed(format!(
            "cannot create restore directory {}: {e}",
            dir.display()
        ))
    })?;
    let now = std::fs::canonicalize(dir).map_err(|e| {
        RunError::Failed(format!(
            "cannot resolve restore directory {}: {e}",
            dir.display()
        ))
    })?;
    if now != dir {
        return Err(RunError::Failed(format!(
            "restore directory {} now resolves to {} (a symlink appeared in its path after the agent checked it); nothing was written",
            dir.display(),
            now.display()
        )));
    }
    Ok(())
}

/// Where disk `disk` of a point of `source` is restored inside `dir`.
pub fn restore_path(dir: &Path, source: &str, disk: u32) -> PathBuf {
    let safe: String = source
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{safe}-disk{disk}.img"))
}

/// A disk's share of the job's seconds, by bytes read (evenly when nothing was read).
fn share(seconds: f64, bytes: u64, total: u64, disks: usize) -> f64 {
    if total > 0 {
        seconds * bytes as f64 / total as f64
    } else {
        seconds / disks.max(1) as f64
    }
}

/// The tenant's key source at job start, following KMS rotations (the newest
/// Active version of the key name wraps new restore points).
fn open_keys(t: &TenantSection) -> Result<Box<dyn KeySource>, RunError> {
    crate::keys::tenant::open_key_source(t).map_err(|e| key_err(t, e))
}

/// For restores: each point names the key that wrapped it, so a KMS source only
/// needs to unwrap (no Active current key is required: a restore works after the
/// tenant revoked every version).
pub(super) fn open_unwrap_keys(t: &TenantSection) -> Result<Box<dyn KeySource>, RunError> {
    match &t.kms {
        Some(k) => crate::keys::tenant::kms_client(k)
            .map(|c| Box::new(crate::keys::KmsKeySource::unwrap_only(c)) as Box<dyn KeySource>)
            .map_err(|e| key_err(t, e)),
        None => open_keys(t),
    }
}

fn key_err(t: &TenantSection, e: KeyError) -> RunError {
    RunError::Key(format!(
        "tenant {} ({}): {e}",
        t.name,
        crate::keys::tenant::describe(t)
    ))
}

/// Open the tenant's repository; create it (with the tenant's key) when the
/// directory does not exist yet or is empty. Jobs of this process never race
/// each other into a half-created repository (operators of several agents
/// sharing one repository create it first with `ferry repo init`).
fn open_or_init_repo(t: &TenantSection, keys: &dyn KeySource) -> Result<Repository, RunError> {
    let mut repo = open_or_init(t, keys)?;
    apply_key_loss_protection(t, &repo, keys)?;
    if let Some(c) = t.compression {
        if repo.config.compression != c {
            let was = repo.config.compression;
            repo.set_compression(c).map_err(repo_err)?;
            tracing::info!(tenant = %t.name, compression = %c, %was, "repository codec for new chunks set from the tenant configuration");
        }
    }
    Ok(repo)
}

/// The tenant's `recovery_public_key`, when set, is the repository's key-loss
/// protection for the points this job makes: turned on (or changed) in the
/// keyring before the backup when it differs.
fn apply_key_loss_protection(
    t: &TenantSection,
    repo: &Repository,
    keys: &dyn KeySource,
) -> Result<(), RunError> {
    let Some(path) = &t.recovery_public_key else {
        return Ok(());
    };
    let bad = |e: String| {
        RunError::Key(format!(
            "tenant {}: recovery_public_key {}: {e}",
            t.name,
            path.display()
        ))
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let wanted = crate::keys::RecoveryKey::from_public_pem(
        &text,
        &path.display().to_string(),
        &crate::repo::now_rfc3339(),
    )
    .map_err(|e| bad(e.to_string()))?;
    let current = repo.keyring_header().map_err(repo_err)?.recovery;
    if current.as_ref().map(|c| &c.key_ref.fingerprint) == Some(&wanted.key_ref.fingerprint) {
        return Ok(());
    }
    repo.set_recovery(keys, Some(wanted.clone()))
        .map_err(|e| bad(e.to_string()))?;
    tracing::info!(tenant = %t.name, recovery = %wanted.describe(), "key-loss protection turned on for new restore points (tenant configuration)");
    Ok(())
}

fn open_or_init(t: &TenantSection, keys: &dyn KeySource) -> Result<Repository, RunError> {
    static INIT: std::sync::Mutex<()> = std::sync::Mutex::new(());
    if let Ok(r) = Repository::open(&t.repository) {
        return Ok(r);
    }
    let _g = INIT.lock().unwrap_or_else(|p| p.into_inner());
    match Repository::open(&t.repository) {
        Ok(r) => Ok(r),
        Err(RepoError::NotARepository(p)) => {
            let empty = std::fs::read_dir(&p)
                .map(|mut d| d.next().is_none())
                .unwrap_or(true);
            if !empty {
                return Err(RunError::Repository(format!(
                    "{} is not empty and not a ferry repository; fix [tenant] repository for tenant {}",
                    p.display(),
                    t.name
                )));
            }
            tracing::info!(tenant = %t.name, repository = %p.display(), "creating the tenant repository");
            Repository::init_with(
                &p,
                DEFAULT_CHUNK_SIZE,
                &t.name,
                keys,
                t.compression.unwrap_or_default(),
            )
            .map_err(repo_err)
        }
        Err(e) => Err(repo_err(e)),
    }
}

fn apply_retention(
    repo: &Repository,
    keys: &dyn KeySource,
    chain: &str,
    source: &str,
    policy: &crate::repo::retention::Policy,
) -> String {
    match crate::repo::gc::prune_chain(repo, policy, Some(chain), Some(keys), false, LOCK_WAIT) {
        Ok(r) => format!(
            "retention: {} point(s) of {source} removed, {} chunk(s) freed ({} bytes)",
            r.points_removed.len(),
            r.chunks_deleted,
            r.bytes_freed
        ),
        Err(e) => {
            tracing::warn!(vm = %source, error = %e, "retention not applied");
            format!("retention not applied (the backup is committed): {e}")
        }
    }
}

fn vsphere_err(e: VsphereError) -> RunError {
    RunError::Vsphere(e.to_string())
}

pub(super) fn repo_err(e: RepoError) -> RunError {
    match e {
        RepoError::Cancelled => RunError::Cancelled,
        RepoError::PointNotFound(_) | RepoError::DiskNotFound { .. } => {
            RunError::NotFound(e.to_string())
        }
        RepoError::Key(k) => RunError::Key(k.to_string()),
        e => RunError::Repository(e.to_string()),
    }
}

fn job_err(e: JobError) -> RunError {
    if e.is_cancelled() {
        return RunError::Cancelled;
    }
    match e {
        JobError::Repo(r) => repo_err(r),
        JobError::Key(k) => RunError::Key(k.to_string()),
        JobError::Pipeline(PipelineError::Source(s)) => RunError::Transport(s.to_string()),
        JobError::Pipeline(PipelineError::Repo(r)) => repo_err(r),
        e => RunError::Failed(e.to_string()),
    }
}

/// The job note that says how the point's snapshot was taken
/// (`snapshot: crash-consistent (policy prefer: quiesce failed ...)`).
pub fn snapshot_note(s: &crate::repo::manifest::SnapshotRecord) -> String {
    format!("snapshot: {}-consistent ({})", s.consistency, s.reason)
}

fn vm_err(e: VmJobError) -> RunError {
    if e.is_cancelled() {
        return RunError::Cancelled;
    }
    match e {
        VmJobError::Refused { .. } => RunError::Refused(e.to_string()),
        VmJobError::Vsphere(v) => match v {
            VsphereError::NotFound { .. } | VsphereError::ObjectNotFound { .. } => {
                RunError::NotFound(v.to_string())
            }
            v => RunError::Vsphere(v.to_string()),
        },
        VmJobError::Source { .. } => RunError::Transport(e.to_string()),
        VmJobError::Job(j) => job_err(j),
        VmJobError::Invalid(m) => RunError::Failed(m),
        VmJobError::Vddk(_) => RunError::Transport(e.to_string()),
        VmJobError::Quiesce(_) => RunError::Vsphere(e.to_string()),
    }
}

/// A failed restore into a VM as a run error: the cause decides the code, the
/// message keeps what the cleanup did.
fn restore_vm_err(e: VmRestoreError) -> RunError {
    if e.is_cancelled() {
        return RunError::Cancelled;
    }
    let msg = e.to_string();
    match e.cause() {
        VmRestoreError::Refused { .. } => RunError::Refused(msg),
        VmRestoreError::Vsphere(v)
            if matches!(
                **v,
                VsphereError::NotFound { .. } | VsphereError::ObjectNotFound { .. }
            ) =>
        {
            RunError::NotFound(msg)
        }
        VmRestoreError::Vsphere(_) => RunError::Vsphere(msg),
        VmRestoreError::NoSuchDisk { .. } => RunError::NotFound(msg),
        VmRestoreError::Target { .. } | VmRestoreError::Vddk(_) => RunError::Transport(msg),
        VmRestoreError::Job(j) => match job_err_ref(j) {
            Code::Transport => RunError::Transport(msg),
            Code::Repository => RunError::Repository(msg),
            Code::NotFound => RunError::NotFound(msg),
            Code::Key => RunError::Key(msg),
            Code::Failed => RunError::Failed(msg),
        },
        VmRestoreError::PoweredOn { .. } | VmRestoreError::Datastore { .. } => {
            RunError::Refused(msg)
        }
        VmRestoreError::FileLocked { .. } => RunError::Vsphere(msg),
        VmRestoreError::Invalid(_) | VmRestoreError::Failed { .. } => RunError::Failed(msg),
    }
}

enum Code {
    Transport,
    Repository,
    NotFound,
    Key,
    Failed,
}

/// Most problems a failed verify names in its error.
const VERIFY_PROBLEMS_SHOWN: usize = 5;

/// A verify job's result from its report: notes saying what was checked, or
/// `repository_error` naming the first problems when damage was found
/// (`key_error` when points could only not be opened for lack of a key).
pub fn verify_outcome(
    rep: &crate::repo::verify::VerifyReport,
    read_data: bool,
    bytes_read: u64,
    point_id: Option<String>,
) -> Result<RunOutput, RunError> {
    let n = rep.points.len();
    let ok = rep.points.iter().filter(|p| p.ok).count();
    let no_key = rep
        .points
        .iter()
        .filter(|p| !p.ok && p.key_unavailable)
        .count();
    let damaged = n - ok - no_key;
    let refs: u64 = rep.points.iter().map(|p| p.chunks_referenced).sum();
    let mut notes = vec![if n == 0 {
        "verified: the repository has no restore points".to_string()
    } else {
        format!(
            "verified {n} point(s): {ok} ok, {damaged} damaged, {no_key} not checked (no usable key)"
        )
    }];
    notes.push(if read_data {
        format!(
            "{} unique chunk(s) read and authenticated ({bytes_read} bytes read), {} damaged; {refs} chunk reference(s) in the indexes",
            rep.chunks_checked, rep.chunks_damaged
        )
    } else {
        format!("manifests and indexes only (read_data false): {refs} chunk reference(s), chunks not read")
    });
    let mut problems: Vec<String> = Vec::new();
    if let Some(k) = &rep.keyring {
        problems.push(format!("keyring: {}: {}", k.file, k.error));
    }
    for p in rep.points.iter().filter(|p| !p.ok) {
        for pr in &p.problems {
            problems.push(format!(
                "point {}: {}{}",
                p.point_id,
                if pr.file.is_empty() {
                    String::new()
                } else {
                    format!("{}: ", pr.file)
                },
                pr.error
            ));
        }
    }
    let first = |problems: &[String]| {
        let mut s = problems
            .iter()
            .take(VERIFY_PROBLEMS_SHOWN)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ");
        if problems.len() > VERIFY_PROBLEMS_SHOWN {
            s.push_str(&format!(
                "; and {} more",
                problems.len() - VERIFY_PROBLEMS_SHOWN
            ));
        }
        s
    };
    if rep.damaged() {
        tracing::error!(
            points = n,
            damaged,
            chunks_damaged = rep.chunks_damaged,
            "verify found damage"
        );
        return Err(RunError::Repository(format!(
            "damage found: {damaged} of {n} point(s) damaged{}, {} chunk(s) damaged: {}",
            if rep.keyring.is_some() {
                ", keyring damaged"
            } else {
                ""
            },
            rep.chunks_damaged,
            first(&problems)
        )));
    }
    if !rep.ok() {
        return Err(RunError::Key(format!(
            "{no_key} of {n} point(s) could not be checked: no usable key: {}",
            first(&problems)
        )));
    }
    Ok(RunOutput {
        disks: Vec::new(),
        point_id,
        notes,
    })
}

/// The code [`job_err`] would give, without consuming the error.
fn job_err_ref(e: &JobError) -> Code {
    let repo = |r: &RepoError| match r {
        RepoError::PointNotFound(_) | RepoError::DiskNotFound { .. } => Code::NotFound,
        RepoError::Key(_) => Code::Key,
        _ => Code::Repository,
    };
    match e {
        JobError::Repo(r) | JobError::Pipeline(PipelineError::Repo(r)) => repo(r),
        JobError::Key(_) => Code::Key,
        JobError::Pipeline(PipelineError::Source(_) | PipelineError::Target { .. }) => {
            Code::Transport
        }
        _ => Code::Failed,
    }
}

impl JobRunner for VmJobRunner {
    fn run(&self, ctx: &JobContext, spec: &JobSpec) -> Result<RunOutput, RunError> {
        match spec {
            JobSpec::Backup(b) => self.backup(ctx, b),
            JobSpec::Restore(r) => self.restore(ctx, r),
            JobSpec::Verify(v) => self.verify(ctx, v),
        }
    }

    fn sweep_orphans(&self, interrupted: &[InterruptedJob]) -> Result<SweepReport, RunError> {
        if self.vcenter.is_none() {
            return Ok(SweepReport {
                jobs: interrupted
                    .iter()
                    .map(|j| {
                        (
                            j.id.clone(),
                            "no [vcenter]: nothing to clean on vSphere".into(),
                        )
                    })
                    .collect(),
                other: vec![],
            });
        }
        let (_own, rt) = runtime_handle()?;
        let client = self.connect(&rt)?;
        let res = self.sweep_with(&client, &rt, interrupted);
        rt.block_on(client.logout());
        res
    }

    fn browse_files(
        &self,
        tenant: &TenantSection,
        query: &FilesQuery,
    ) -> Result<FilesAnswer, RunError> {
        super::files::browse(tenant, query)
    }

    fn discover_proxy(&self) -> Result<Option<ProxyFacts>, RunError> {
        if self.vcenter.is_none() || self.proxy_vm.is_none() {
            return Ok(None);
        }
        let (own, rt) = runtime_handle()?;
        let client = self.connect(&rt)?;
        let res = rt.block_on(vm::proxy_info(&client, &self.this_proxy(0)));
        rt.block_on(client.logout());
        drop(own);
        let (info, _) = res.map_err(vm_err)?;
        Ok(Some(ProxyFacts {
            host: info.host,
            datastores: info.datastores,
            key_provider: info.key_provider,
        }))
    }

    fn sync_keys(&self, tenants: &[TenantSection]) -> Vec<KeySyncOutcome> {
        use crate::keys::sync::{sync_tenant, KeyringSync, SyncError};
        tenants
            .iter()
            .map(|t| {
                let rep = sync_tenant(t).map_err(|e| match e {
                    SyncError::Key(k) => key_err(t, k),
                    SyncError::Repo(r) => repo_err(r),
                })?;
                match &rep.keyring {
                    KeyringSync::Rewrapped { from, .. } => tracing::info!(
                        tenant = %t.name, from = %from, to = %rep.current,
                        "key rotation: keyring re-wrapped with the current key"
                    ),
                    KeyringSync::Failed { why } => tracing::error!(
                        tenant = %t.name, %why,
                        "keyring could not be re-wrapped with the current key; backups will fail until fixed"
                    ),
                    _ => {}
                }
                if let KeyringSync::Failed { why } = &rep.keyring {
                    return Err(RunError::Key(format!(
                        "tenant {}: the keyring could not be re-wrapped with key {}: {why}",
                        t.name, rep.current
                    )));
                }
                Ok(KeyStatus {
                    tenant: t.name.clone(),
                    kms: rep.kms.clone(),
                    key_name: if rep.key_name.is_empty() {
                        "pem".into()
                    } else {
                        rep.key_name.clone()
                    },
                    key_id: rep.current.key_id.clone(),
                    version: rep.current.key_version as u64,
                })
            })
            .collect()
    }
}
