//! `ferry backup --vm NAME`: back up one vSphere VM from the command line, the way
//! an agent job does (selector before any snapshot, HotAdd or NBD-SSL per disk, CBT
//! incrementals, cleanup always), and print per disk the transport and how it was
//! read (`cbt` or `full`) with the reason. Builds the job's inputs from flags and
//! the config file; all work is in `ferry::job::vm`. Must not hold job logic.

use crate::cmd_data::BackupArgs;
use crate::cmd_vsphere::VcenterArgs;
use crate::exit;
use crate::render::{self, human_bytes, Output};
use anyhow::Context;
use clap::Args;
use ferry::job::quiesce::QuiescePolicy;
use ferry::job::vm::{self, NbdSettings, ThisProxy, VmBackupOutcome, VmBackupRequest};
use ferry::progress::Progress;
use ferry::repo::Repository;
use ferry::transport::select::{self, Mode, Selection};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The VM side of `ferry backup`.
#[derive(Args, Clone)]
pub struct VmArgs {
    /// Back up this vSphere VM (exact name) through vCenter instead of images; its
    /// points are named after the VM.
    #[arg(long, conflicts_with_all = ["images", "nbd", "name"])]
    pub vm: Option<String>,
    #[command(flatten)]
    pub conn: VcenterArgs,
    /// This proxy's id: snapshots are named ferry-<id>-<n>, which the agent's orphan
    /// sweep of that id removes if left behind (default: [agent] id, else "cli").
    #[arg(long, requires = "vm")]
    pub proxy_id: Option<String>,
    /// Name of the VM this command runs in, for HotAdd (default: [vcenter] proxy_vm).
    #[arg(long, requires = "vm")]
    pub proxy_vm: Option<String>,
    /// Where hot-added disks appear (default: [agent] hotadd_device_dir).
    #[arg(long, requires = "vm")]
    pub hotadd_device_dir: Option<PathBuf>,
    /// Transport modes allowed here (repeat: hotadd, nbdssl, nbd; default: [agent]
    /// modes, else hotadd and nbdssl).
    #[arg(long = "mode", value_parser = parse_mode, requires = "vm")]
    pub modes: Vec<Mode>,
    /// Port of the ESXi hosts' NBD service (default: [nbd] port, else 10809).
    #[arg(long, requires = "vm")]
    pub nbd_port: Option<u16>,
    /// Directory with ca-cert.pem for NBD-SSL (default: [nbd] tls_certificates).
    #[arg(long, requires = "vm")]
    pub nbd_tls_certificates: Option<PathBuf>,
    /// Carry the disks through VMware's VDDK from this directory (the one holding
    /// lib64/libvixDiskLib.so.8 or .so.7; default: [vddk] libdir, else ferry's
    /// native HotAdd and NBD paths).
    #[arg(long, requires = "vm")]
    pub vddk_libdir: Option<PathBuf>,
    /// Turn changed block tracking on for the VM when it is off (incrementals
    /// start with the backup after this one).
    #[arg(long, requires = "vm")]
    pub enable_cbt: bool,
    /// Read every disk in full even when CBT could give an incremental.
    #[arg(long, requires = "vm")]
    pub full: bool,
    /// Require an application-consistent snapshot: quiesce the guest through
    /// VMware Tools and fail when it cannot be quiesced (same as
    /// --quiesce-policy require).
    #[arg(long, requires = "vm", conflicts_with = "quiesce_policy")]
    pub quiesce: bool,
    /// Snapshot consistency: off (crash-consistent, the default), prefer
    /// (quiesced; crash-consistent when the guest cannot be quiesced, recorded in
    /// the point) or require (quiesced, or the backup fails).
    #[arg(long, requires = "vm", value_name = "POLICY", value_parser = parse_quiesce)]
    pub quiesce_policy: Option<QuiescePolicy>,
    /// Never fall back from HotAdd to the network (NBD-SSL).
    #[arg(long, requires = "vm")]
    pub no_failover: bool,
    /// Print the transport selection (per disk: proxy, mode and why, with every
    /// candidate) and change nothing: no snapshot, no repository or key access.
    /// Exits 1 when the VM would be refused.
    #[arg(long, requires = "vm")]
    pub dry_run: bool,
}

fn parse_quiesce(s: &str) -> Result<QuiescePolicy, String> {
    s.parse()
}

fn parse_mode(s: &str) -> Result<Mode, String> {
    Mode::ALL
        .into_iter()
        .find(|m| m.as_str() == s.to_ascii_lowercase())
        .ok_or_else(|| format!("unknown mode {s:?} (hotadd, nbdssl, nbd)"))
}

/// Run `ferry backup --vm`.
pub fn backup(a: BackupArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let v = &a.vm;
    let name = v.vm.clone().context("--vm is required here")?;
    let cfg = match &v.conn.config {
        Some(p) => ferry::config::Config::load(p)?,
        None => ferry::config::Config::default(),
    };
    let agent = cfg.agent.as_ref();
    let proxy_id = v
        .proxy_id
        .clone()
        .or_else(|| agent.map(|s| s.id.clone()))
        .unwrap_or_else(|| "cli".into());
    let me = ThisProxy {
        id: proxy_id.clone(),
        vm_name: v
            .proxy_vm
            .clone()
            .or_else(|| cfg.vcenter.as_ref().and_then(|s| s.proxy_vm.clone())),
        device_dir: v
            .hotadd_device_dir
            .clone()
            .or_else(|| agent.and_then(|s| s.hotadd_device_dir.clone())),
        modes: if v.modes.is_empty() {
            agent
                .map(|s| s.modes.clone())
                .unwrap_or_else(|| vec![Mode::HotAdd, Mode::NbdSsl])
        } else {
            v.modes.clone()
        },
        free_slots: 64,
    };
    let mut policy = cfg.policy.clone();
    if v.no_failover {
        policy.failover_to_network = false;
    }
    let vddk = match (&v.vddk_libdir, &cfg.vddk) {
        (Some(dir), section) => Some(ferry::job::vm::VddkSettings {
            libdir: dir.clone(),
            config_file: section.as_ref().and_then(|s| s.config_file.clone()),
            nfc_port: section.as_ref().map_or(902, |s| s.nfc_port),
        }),
        (None, section) => section.as_ref().map(ferry::job::vm::VddkSettings::from),
    };
    if v.dry_run {
        let client_cfg = v.conn.client_config()?;
        let sel = runtime()?.block_on(async {
            let c = ferry::vsphere::Client::connect(client_cfg).await?;
            let r = vm::plan(&c, &me, &name, &policy).await;
            c.logout().await;
            Ok::<_, anyhow::Error>(r?)
        })?;
        let layer =
            ferry::transport::vddk::loader::data_path(vddk.as_ref().map(|s| s.libdir.as_path()));
        return Ok(print_plan(out, &sel, &layer));
    }
    let repo = Arc::new(Repository::open(
        a.repo.as_deref().context("--repo is required")?,
    )?);
    let keys: Arc<dyn ferry::keys::KeySource> = Arc::from(a.keys.source()?);
    let started = time::OffsetDateTime::now_utc().unix_timestamp();
    let req = VmBackupRequest {
        job_id: format!("{}cli{started}", vm::job_id_prefix(&proxy_id)),
        vm: name,
        policy,
        nbd: NbdSettings {
            tls_certificates: v
                .nbd_tls_certificates
                .clone()
                .or_else(|| cfg.nbd.tls_certificates.clone()),
            port: v.nbd_port.unwrap_or(cfg.nbd.port),
            connections: a.nbd_connections,
        },
        enable_cbt: v.enable_cbt,
        full: v.full,
        quiesce: match (v.quiesce, v.quiesce_policy) {
            (true, _) => QuiescePolicy::Require,
            (false, p) => p.unwrap_or_default(),
        },
        pipeline: a.pipe.config(repo.config.chunk_size),
        lock_wait: Duration::from_secs(a.lock_wait),
        hotadd_wait: Duration::from_secs(60),
        placement: Default::default(),
        vddk,
    };
    let client_cfg = v.conn.client_config()?;
    let rt = runtime()?;
    let bar = out.progress_bar(progress.clone(), "backup");
    let res = rt.block_on(async {
        let c = ferry::vsphere::Client::connect(client_cfg).await?;
        let r = vm::backup_vm(&c, &me, repo, keys, &req, progress.clone()).await;
        c.logout().await;
        Ok::<_, anyhow::Error>(r?)
    });
    drop(bar);
    let o = res?;
    out.result(&o, || summary(&o));
    Ok(exit::OK)
}

/// The runtime for the vSphere client of one command.
pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// `--dry-run`: the selection table and the full explanation (or the selection as
/// JSON); exit 1 when the job would be refused, 0 when it would run.
pub fn print_plan(out: &Output, sel: &Selection, data_path: &str) -> u8 {
    out.result(sel, || {
        format!(
            "{}\n{}\ndata path: {data_path}\n(dry run: nothing was changed)",
            select::render_table(std::slice::from_ref(sel)),
            sel.explain()
        )
    });
    if sel.is_runnable() {
        exit::OK
    } else {
        exit::FAILED
    }
}

/// The point summary, then per disk: transport, read mode and the reasons.
pub fn summary(o: &VmBackupOutcome) -> String {
    let mut s = render::backup_summary(&o.report);
    s.push_str(&format!(
        "\nsnapshot: {}-consistent ({})",
        o.snapshot.consistency, o.snapshot.reason
    ));
    for d in &o.disks {
        let changed = d
            .changed_bytes
            .map(|b| format!(", {} changed", human_bytes(b)))
            .unwrap_or_default();
        s.push_str(&format!(
            "\ndisk {} {}: {} read {} ({} read{changed}): {}\n  transport: {}",
            d.disk,
            d.label,
            d.mode,
            d.read,
            human_bytes(d.bytes_read),
            d.read_reason,
            d.reason
        ));
    }
    s
}
