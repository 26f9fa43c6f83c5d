//! The data commands: `backup`, `points list`, `restore`, `verify`, `prune`.

use crate::args::*;
use crate::exit;
use crate::render::{self, human_bytes, Output};
use anyhow::Context;
use clap::{Args, Subcommand};
use ferry::job::{self, BackupRequest, DiskInput};
use ferry::progress::Progress;
use ferry::repo::retention::Policy;
use ferry::repo::{format, gc, verify, Repository};
use ferry::transport::file::FileSource;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
pub struct BackupArgs {
    /// Repository directory (not needed by `--vm NAME --dry-run`).
    #[arg(
        long,
        short = 'r',
        env = "FERRY_REPO",
        required_unless_present = "dry_run"
    )]
    pub repo: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub pipe: PipeArgs,
    /// Name of what is backed up (VM or image set). Points of one name form a chain
    /// and each backup deduplicates against the previous point of the same name.
    #[arg(long, required_unless_present = "vm")]
    pub name: Option<String>,
    /// Raw disk image or block device; repeat for several disks (disk 0, 1, ...).
    #[arg(long = "image", required_unless_present_any = ["nbd", "vm"])]
    pub images: Vec<PathBuf>,
    /// NBD export to back up (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH);
    /// repeatable; numbered after the --image disks.
    #[arg(long = "nbd")]
    pub nbd: Vec<String>,
    /// NBD connections per export (reads in flight).
    #[arg(long, default_value_t = 4)]
    pub nbd_connections: usize,
    /// Seconds to wait for the repository lock.
    #[arg(long, default_value_t = 30)]
    pub lock_wait: u64,
    #[command(flatten)]
    pub vm: crate::cmd_vm::VmArgs,
}

#[derive(Subcommand)]
pub enum PointsCmd {
    /// List restore points (needs no keys).
    List {
        #[command(flatten)]
        repo: RepoArg,
        /// Only points of this name.
        #[arg(long)]
        name: Option<String>,
    },
}

#[derive(Args)]
pub struct RestoreArgs {
    /// Repository directory (with --vm, the config's tenant names it).
    #[arg(long, short = 'r', env = "FERRY_REPO", required_unless_present = "vm")]
    pub repo: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub pipe: PipeArgs,
    /// Restore point id, or "latest:<name>".
    #[arg(long)]
    pub point: String,
    /// Disk number (default 0; with --vm, every disk of the point).
    #[arg(long)]
    pub disk: Option<u32>,
    /// Target: a new file (written sparse) or an existing block device.
    #[arg(long, required_unless_present = "vm", conflicts_with = "vm")]
    pub target: Option<PathBuf>,
    /// Restore into NEW disks of this vSphere VM (one per restored disk), through
    /// this proxy as the agent would: the transport selector picks HotAdd or
    /// NBD-SSL; a failed restore removes the disks it created. Needs --config.
    #[arg(long, requires = "config")]
    pub vm: Option<String>,
    /// The agent's configuration file ([agent], [vcenter], [nbd], [policy],
    /// [[tenant]]) for --vm.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Tenant of the configuration whose repository and keys to use (needed when
    /// it has several).
    #[arg(long, requires = "vm")]
    pub tenant: Option<String>,
    /// With --vm: print per disk where it would go and how (new disk or
    /// overwrite, datastore and why, storage policy, proxy and transport and why)
    /// and every refusal, changing nothing: no disk is created, no ticket taken and
    /// no key used. Exits 1 when the restore would be refused.
    #[arg(long, requires = "vm")]
    pub dry_run: bool,
    /// With --vm: create the new disks on this datastore (by name) instead of the
    /// datastore of the VM's first disk. It must be mounted on the VM's host and
    /// report enough free space for the disks' full size.
    #[arg(long, requires = "vm", conflicts_with = "overwrite")]
    pub datastore: Option<String>,
    /// With --vm: storage policy for the new disks, by its profile id (the SPBM
    /// id `govc storage.policy.ls -i` shows; vCenter takes ids, not names).
    /// Default: the datastore's default policy.
    #[arg(long, requires = "vm", conflicts_with = "overwrite")]
    pub storage_policy: Option<String>,
    /// With --vm: write disk N of the point over the VM's disk N (device key
    /// order) instead of into new disks. Only into a POWERED-OFF VM without
    /// snapshots: a running VM's disks are never overwritten.
    #[arg(long, requires = "vm")]
    pub overwrite: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Points to verify (default: all).
    #[arg(long = "point")]
    pub points: Vec<String>,
    /// Worker threads.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Then move damaged and missing chunks to damaged/ (under the exclusive
    /// lock), so that no backup reuses them and the next backup of the same data
    /// stores them again, mending the points that reference them. Chunks this key
    /// source cannot open are never moved.
    #[arg(long)]
    pub repair: bool,
}

#[derive(Args)]
pub struct PruneArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    /// Keep the newest N points of each name.
    #[arg(long)]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the last N days.
    #[arg(long)]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks.
    #[arg(long)]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months.
    #[arg(long)]
    pub keep_monthly: Option<u32>,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Seconds to wait for running backups to finish.
    #[arg(long, default_value_t = 30)]
    pub lock_wait: u64,
    /// Optional: with the tenant key (both halves, or KMS / passphrase), the
    /// keyring also drops the data keys no remaining point references.
    #[command(flatten)]
    pub keys: KeyArgs,
}

/// `ferry backup`.
pub fn backup(a: BackupArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    if a.vm.vm.is_some() {
        return crate::cmd_vm::backup(a, out, progress);
    }
    let name = a.name.clone().context("--name is required")?;
    let repo = Repository::open(a.repo.as_deref().context("--repo is required")?)?;
    let ks = a.keys.source()?;
    let mut disks = Vec::new();
    for img in &a.images {
        let src = FileSource::open(img)?;
        disks.push(DiskInput {
            label: img.display().to_string(),
            source: Box::new(src),
            transport_reason: "file source given on the command line".into(),
            change_id: None,
            read: Default::default(),
        });
    }
    for uri in &a.nbd {
        let src = ferry::transport::nbd::NbdSource::connect(uri, a.nbd_connections)?;
        disks.push(DiskInput {
            label: uri.clone(),
            source: Box::new(src),
            transport_reason: "NBD export given on the command line".into(),
            change_id: None,
            read: Default::default(),
        });
    }
    let req = BackupRequest {
        source_name: name,
        identity: None,
        disks,
        pipeline: a.pipe.config(repo.config.chunk_size),
        lock_wait: Duration::from_secs(a.lock_wait),
        snapshot: None,
    };
    let bar = out.progress_bar(progress.clone(), "backup");
    let res = job::backup(&repo, &*ks, req, progress);
    drop(bar);
    let rep = res?;
    out.result(&rep, || render::backup_summary(&rep));
    Ok(exit::OK)
}

/// `ferry points`.
pub fn points(cmd: PointsCmd, out: &Output) -> anyhow::Result<u8> {
    let PointsCmd::List { repo, name } = cmd;
    let r = Repository::open(&repo.repo)?;
    let list = r.list_points()?;
    let rows: Vec<serde_json::Value> = list
            .iter()
            .filter(|p| match (&name, &p.header) {
                (Some(n), Ok(h)) => &h.source == n,
                _ => true,
            })
            .map(|p| match &p.header {
                Ok(h) => serde_json::json!({"point_id": p.id, "created": h.created, "name": h.source, "identity": h.identity, "parent": h.parent, "disks": h.disks, "key": h.wrapped_key.key_ref, "recovery_key": h.recovery_wrapped_key.as_ref().map(|w| &w.key_ref), "snapshot": h.snapshot, "immutable": h.immutable.map(|r| serde_json::json!({"mode": r.mode, "until": ferry::repo::backend::format_unix(r.until)}))}),
                Err(e) => serde_json::json!({"point_id": p.id, "error": e.to_string()}),
            })
            .collect();
    let damaged = rows.iter().any(|r| r.get("error").is_some());
    out.result(&rows, || render::points_table(&rows));
    Ok(if damaged { exit::DAMAGED } else { exit::OK })
}

/// `ferry restore`.
pub fn restore(a: RestoreArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    if let Some(vm) = a.vm.clone() {
        return restore_into_vm(a, vm, out, progress);
    }
    let (Some(repo_dir), Some(target)) = (&a.repo, &a.target) else {
        anyhow::bail!("--repo and --target are required (or --vm with --config)");
    };
    let disk = a.disk.unwrap_or(0);
    let repo = Repository::open(repo_dir)?;
    let ks = a.keys.unwrap_source()?;
    let point = resolve_point(&repo, &a.point)?;
    let bar = out.progress_bar(progress.clone(), "restore");
    let res = job::restore(
        &repo,
        &*ks,
        &point,
        disk,
        target,
        a.pipe.config(format::MAX_CHUNK_SIZE),
        progress,
    );
    drop(bar);
    let st = res?;
    let snap = progress.snapshot();
    out.result(
            &serde_json::json!({"point_id": point, "disk": disk, "target": target, "bytes_written": st.bytes_written, "chunks": st.chunks_total, "zero_chunks": st.chunks_zero, "seconds": snap.elapsed_secs}),
            || format!("restored {point} disk {disk} to {} ({} written, {} zero chunks skipped) in {:.1}s", target.display(), human_bytes(st.bytes_written), st.chunks_zero, snap.elapsed_secs),
        );
    Ok(exit::OK)
}

/// `ferry restore --vm NAME --config FILE`: the agent's restore into a VM, run in
/// this process with the agent's configuration (this proxy's VM, modes, vCenter,
/// NBD settings, policy and the tenant's repository and key source).
fn restore_into_vm(
    a: RestoreArgs,
    vm: String,
    out: &Output,
    progress: &Arc<Progress>,
) -> anyhow::Result<u8> {
    use ferry::agent::JobContext;
    use ferry::transport::select::{HostReach, ProxyInfo};
    let path = a
        .config
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("--vm needs --config FILE (the agent's configuration)"))?;
    let cfg = ferry::config::Config::load(path)?;
    let runner = ferry::job::runner::VmJobRunner::from_config(&cfg)?;
    let agent = cfg
        .agent
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("{} has no [agent] section", path.display()))?;
    let tenant = cfg.tenant(a.tenant.as_deref())?.clone();
    let rt = crate::cmd_vm::runtime()?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ctx = JobContext {
        job_id: format!("cli-{started}"),
        proxy: ProxyInfo {
            id: agent.id.clone(),
            is_vm: cfg.vcenter.as_ref().is_some_and(|v| v.proxy_vm.is_some()),
            host: None,
            reachable_hosts: HostReach::Any,
            datastores: Vec::new(),
            key_provider: None,
            modes: agent.modes.clone(),
            // Disks are restored one after another.
            free_slots: 1,
        },
        policy: cfg.policy.clone(),
        tenant,
        progress: progress.clone(),
        runtime: rt.handle().clone(),
    };
    let disks = a.disk.map(|d| vec![d]);
    let options = ferry::job::vm_restore::TargetOptions {
        datastore: a.datastore.clone(),
        storage_policy: a.storage_policy.clone(),
        overwrite: a.overwrite,
    };
    if a.dry_run {
        let plan = runner.plan_restore_into_vm(
            &ctx,
            &a.point,
            disks.as_deref(),
            ferry::job::vm_restore::VmRef::Name(vm.clone()),
            options,
        )?;
        let layer = ferry::transport::vddk::loader::data_path(
            cfg.vddk.as_ref().map(|s| s.libdir.as_path()),
        );
        out.result(&plan, || {
            format!(
                "{}\ndata path: {layer}\n\n{}\n(dry run: nothing was changed)",
                plan.render(),
                plan.selection.explain()
            )
        });
        return Ok(if plan.is_runnable() {
            exit::OK
        } else {
            exit::FAILED
        });
    }
    let bar = out.progress_bar(progress.clone(), "restore");
    let res = runner.restore_into_vm(
        &ctx,
        &a.point,
        disks.as_deref(),
        ferry::job::vm_restore::VmRef::Name(vm.clone()),
        options,
    );
    drop(bar);
    let o = res?;
    out.result(&o, || {
        let mut s = String::new();
        for n in &o.notes {
            s.push_str(n);
            s.push('\n');
        }
        for d in &o.disks {
            s.push_str(&format!(
                "  disk {} {}: {} written by {}; {}\n",
                d.disk_key,
                d.label,
                human_bytes(d.bytes),
                d.mode.map(|m| m.as_str()).unwrap_or("-"),
                d.reason
            ));
        }
        s.trim_end().to_string()
    });
    Ok(exit::OK)
}

/// `ferry verify`.
pub fn verify(a: VerifyArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let repo = Repository::open(&a.repo.repo)?;
    let ks = a.keys.unwrap_source()?;
    let workers = a.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let bar = out.progress_bar(progress.clone(), "verify");
    let res = verify::verify(&repo, &*ks, &a.points, workers, a.repair, progress);
    drop(bar);
    let rep = res?;
    out.result(&rep, || render::verify_summary(&rep));
    Ok(if rep.damaged() {
        exit::DAMAGED
    } else if !rep.ok() {
        exit::KEY
    } else {
        exit::OK
    })
}

/// `ferry prune`.
pub fn prune(a: PruneArgs, out: &Output) -> anyhow::Result<u8> {
    let repo = Repository::open(&a.repo.repo)?;
    let policy = Policy {
        keep_last: a.keep_last,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
    };
    // Keys are optional: given, the keyring drops data keys no point references.
    let keys = a.keys.any().then(|| a.keys.source()).transpose()?;
    let rep = gc::prune(
        &repo,
        &policy,
        keys.as_deref(),
        a.dry_run,
        Duration::from_secs(a.lock_wait),
    )?;
    out.result(&rep, || render::prune_summary(&rep));
    Ok(exit::OK)
}
