//! The `ferry` command line: argument parsing, output rendering (tables, JSON,
//! progress bars) and exit codes. All work happens in the `ferry` library.

mod render;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry::job::{self, BackupRequest, DiskInput, JobError};
use ferry::keys::{KeyError, KeySource, MultiKeySource, PemKeySource};
use ferry::pipeline::{PipelineConfig, PipelineError};
use ferry::progress::Progress;
use ferry::repo::retention::Policy;
use ferry::repo::{format, gc, verify, RepoError, Repository};
use ferry::transport::file::FileSource;
use render::{human_bytes, Output};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// ferry: backup proxy agent for VMware vSphere with per-tenant KMS keys.
#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Exit codes: 0 ok, 1 failed, 2 usage, 3 damage found, 4 repository locked, 5 key problem, 6 no space, 130 cancelled.\nDocs: docs/operations.md"
)]
struct Cli {
    /// Print results as JSON on stdout (for scripts); logs stay on stderr.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Repository administration.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Back up disk images or block devices into a new restore point.
    Backup(BackupArgs),
    /// Restore points.
    #[command(subcommand)]
    Points(PointsCmd),
    /// Restore one disk of a restore point to a new file or a block device.
    Restore(RestoreArgs),
    /// Read and authenticate every chunk of every (or the given) restore point.
    Verify(VerifyArgs),
    /// Apply retention and garbage-collect unreferenced chunks.
    Prune(PruneArgs),
    /// Measure data-plane throughput on this machine.
    Bench(BenchArgs),
    /// Key utilities.
    #[command(subcommand)]
    Keys(KeysCmd),
}

#[derive(Args, Clone)]
struct RepoArg {
    /// Repository directory.
    #[arg(long, short = 'r', env = "FERRY_REPO")]
    repo: PathBuf,
}

#[derive(Args, Clone)]
struct KeyArgs {
    /// Tenant public key (PEM: SPKI or PKCS#1). Wraps new data keys.
    #[arg(long, env = "FERRY_PUBLIC_KEY")]
    public_key: Option<PathBuf>,
    /// Tenant private key (PEM: PKCS#8 or PKCS#1). Read only to unwrap, then wiped.
    #[arg(long, env = "FERRY_PRIVATE_KEY")]
    private_key: Option<PathBuf>,
    /// More private keys for restore points wrapped by older or other tenant keys
    /// (rotated keys, keys exported from a KMS by hand). Repeatable.
    #[arg(long = "extra-private-key")]
    extra_private_keys: Vec<PathBuf>,
    #[command(flatten)]
    kms: KmsArgs,
}

/// The tenant's KMS (KMIP over mutual TLS). When given, it holds the tenant key.
#[derive(Args, Clone)]
struct KmsArgs {
    /// KMS address HOST:PORT (KMIP, usually port 5696).
    #[arg(long, env = "FERRY_KMS")]
    kms: Option<String>,
    /// CA certificate that signed the KMS server certificate (PEM).
    #[arg(long, env = "FERRY_KMS_CA")]
    kms_ca: Option<PathBuf>,
    /// Client certificate presented to the KMS (PEM).
    #[arg(long, env = "FERRY_KMS_CERT")]
    kms_cert: Option<PathBuf>,
    /// Client certificate's private key (PEM).
    #[arg(long, env = "FERRY_KMS_CLIENT_KEY")]
    kms_client_key: Option<PathBuf>,
    /// Name the server certificate must carry (default: the host of --kms).
    #[arg(long, env = "FERRY_KMS_SERVER_NAME")]
    kms_server_name: Option<String>,
    /// Name of the tenant key pair on the KMS, e.g. ferry/<tenant>/<repository>.
    #[arg(long, env = "FERRY_KMS_KEY")]
    kms_key: Option<String>,
    /// Create (and activate) the key pair when the KMS has none of that name.
    #[arg(long)]
    kms_create: bool,
    /// RSA size for --kms-create: 2048, 3072 or 4096.
    #[arg(long, default_value_t = 2048)]
    kms_bits: i32,
}

impl KmsArgs {
    fn client(&self) -> Result<Option<ferry::kmip::client::KmsClient>, KeyError> {
        let Some(addr) = &self.kms else {
            return Ok(None);
        };
        let need = |v: &Option<PathBuf>, flag: &str| {
            v.clone().ok_or_else(|| KeyError::Backend {
                kms: addr.clone(),
                detail: format!("{flag} is required with --kms"),
            })
        };
        let cfg = ferry::kmip::client::KmsConfig {
            address: addr.clone(),
            server_name: self.kms_server_name.clone(),
            ca: need(&self.kms_ca, "--kms-ca")?,
            client_cert: need(&self.kms_cert, "--kms-cert")?,
            client_key: need(&self.kms_client_key, "--kms-client-key")?,
            timeout: std::time::Duration::from_secs(30),
        };
        ferry::kmip::client::KmsClient::new(cfg)
            .map(Some)
            .map_err(|e| KeyError::Backend {
                kms: addr.clone(),
                detail: e.to_string(),
            })
    }

    fn source(&self) -> Result<Option<ferry::keys::KmsKeySource>, KeyError> {
        let Some(client) = self.client()? else {
            return Ok(None);
        };
        let name = self.kms_key.clone().ok_or_else(|| KeyError::Backend {
            kms: client.address().to_string(),
            detail: "--kms-key NAME is required with --kms".into(),
        })?;
        if ![2048, 3072, 4096].contains(&self.kms_bits) {
            return Err(KeyError::KeySize {
                key: name,
                bits: self.kms_bits as usize,
            });
        }
        ferry::keys::KmsKeySource::open(client, &name, self.kms_create, self.kms_bits).map(Some)
    }
}

impl KeyArgs {
    fn source(&self) -> Result<Box<dyn KeySource>, KeyError> {
        if let Some(k) = self.kms.source()? {
            if self.extra_private_keys.is_empty() {
                return Ok(Box::new(k));
            }
            let mut all: Vec<Box<dyn KeySource>> = vec![Box::new(k)];
            for p in &self.extra_private_keys {
                all.push(Box::new(PemKeySource::open(None, Some(p))?));
            }
            return Ok(Box::new(MultiKeySource::new(all)?));
        }
        let first = PemKeySource::open(self.public_key.as_deref(), self.private_key.as_deref())?;
        if self.extra_private_keys.is_empty() {
            return Ok(Box::new(first));
        }
        let mut all: Vec<Box<dyn KeySource>> = vec![Box::new(first)];
        for p in &self.extra_private_keys {
            all.push(Box::new(PemKeySource::open(None, Some(p))?));
        }
        Ok(Box::new(MultiKeySource::new(all)?))
    }
}

#[derive(Args, Clone)]
struct PipeArgs {
    /// Worker threads (default: number of cores).
    #[arg(long)]
    workers: Option<usize>,
    /// Memory budget for chunk buffers, in MiB.
    #[arg(long, default_value_t = 128)]
    memory_mib: u64,
}

impl PipeArgs {
    fn config(&self, chunk_size: u32) -> PipelineConfig {
        PipelineConfig::new(self.workers, chunk_size, self.memory_mib << 20)
    }
}

#[derive(Subcommand)]
enum RepoCmd {
    /// Create a repository for one tenant.
    Init {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
        /// Chunk size: power of two from 256K to 8M (suffix K or M).
        #[arg(long, default_value = "1M", value_parser = parse_size)]
        chunk_size: u64,
        /// Tenant name recorded in the repository.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Show repository configuration and size.
    Info {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Disaster recovery: check which tenant key every restore point needs and
    /// whether the configured keys open it on their own (no keyring). Lists the
    /// missing keys (KMS, key id, fingerprint) to obtain. Changes nothing.
    Import {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

#[derive(Args)]
struct BackupArgs {
    #[command(flatten)]
    repo: RepoArg,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    pipe: PipeArgs,
    /// Name of what is backed up (VM or image set). Points of one name form a chain
    /// and each backup deduplicates against the previous point of the same name.
    #[arg(long)]
    name: String,
    /// Raw disk image or block device; repeat for several disks (disk 0, 1, ...).
    #[arg(long = "image", required_unless_present = "nbd")]
    images: Vec<PathBuf>,
    /// NBD export to back up (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH);
    /// repeatable; numbered after the --image disks.
    #[arg(long = "nbd")]
    nbd: Vec<String>,
    /// NBD connections per export (reads in flight).
    #[arg(long, default_value_t = 4)]
    nbd_connections: usize,
    /// Seconds to wait for the repository lock.
    #[arg(long, default_value_t = 30)]
    lock_wait: u64,
}

#[derive(Subcommand)]
enum PointsCmd {
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
struct RestoreArgs {
    #[command(flatten)]
    repo: RepoArg,
    #[command(flatten)]
    keys: KeyArgs,
    #[command(flatten)]
    pipe: PipeArgs,
    /// Restore point id, or "latest:<name>".
    #[arg(long)]
    point: String,
    /// Disk number.
    #[arg(long, default_value_t = 0)]
    disk: u32,
    /// Target: a new file (written sparse) or an existing block device.
    #[arg(long)]
    target: PathBuf,
}

#[derive(Args)]
struct VerifyArgs {
    #[command(flatten)]
    repo: RepoArg,
    #[command(flatten)]
    keys: KeyArgs,
    /// Points to verify (default: all).
    #[arg(long = "point")]
    points: Vec<String>,
    /// Worker threads.
    #[arg(long)]
    workers: Option<usize>,
}

#[derive(Args)]
struct PruneArgs {
    #[command(flatten)]
    repo: RepoArg,
    /// Keep the newest N points of each name.
    #[arg(long)]
    keep_last: Option<u32>,
    /// Keep the newest point of each of the last N days.
    #[arg(long)]
    keep_daily: Option<u32>,
    /// Keep the newest point of each of the last N ISO weeks.
    #[arg(long)]
    keep_weekly: Option<u32>,
    /// Keep the newest point of each of the last N months.
    #[arg(long)]
    keep_monthly: Option<u32>,
    /// Show what would be removed; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Seconds to wait for running backups to finish.
    #[arg(long, default_value_t = 30)]
    lock_wait: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// Chunk size for the stage benchmarks.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    chunk_size: u64,
    /// Seconds per stage.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// Also back up and restore this image end to end in a scratch repository.
    #[arg(long)]
    image: Option<PathBuf>,
    /// Scratch directory for --image (default: system temp dir).
    #[arg(long)]
    scratch: Option<PathBuf>,
    /// Only read this source (an image/device path or an nbd[s]:// URI): every
    /// allocated byte, discarded; reports the transport's read speed.
    #[arg(long)]
    read: Option<String>,
    /// Readers (and NBD connections) for --read.
    #[arg(long, default_value_t = 4)]
    readers: usize,
    #[command(flatten)]
    pipe: PipeArgs,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Check the KMS: TLS and client certificate, protocol versions, supported
    /// operations (Query) and a Locate probe for the tenant key, as Veeam's Test
    /// Connection does. Changes nothing.
    Test {
        #[command(flatten)]
        kms: KmsArgs,
    },
    /// Make sure the tenant key pair exists on the KMS (create and activate it if
    /// absent) and show it.
    Create {
        #[command(flatten)]
        kms: KmsArgs,
    },
    /// Generate an RSA key pair as PEM files (for PEM key sources and tests).
    GeneratePem {
        /// Output directory.
        #[arg(long)]
        out_dir: PathBuf,
        /// File name stem: writes <name>.pub.pem and <name>.key.pem (0600).
        #[arg(long, default_value = "tenant")]
        name: String,
        /// Modulus size: 2048, 3072 or 4096.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.chars().last() {
        Some('K') | Some('k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') | Some('m') => (&s[..s.len() - 1], 1 << 20),
        Some('G') | Some('g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("invalid size {s:?} (examples: 1M, 256K, 4194304)"))
}

/// Exit codes, documented in docs/operations.md.
mod exit {
    pub const OK: u8 = 0;
    pub const FAILED: u8 = 1;
    pub const DAMAGED: u8 = 3;
    pub const LOCKED: u8 = 4;
    pub const KEY: u8 = 5;
    pub const NO_SPACE: u8 = 6;
    pub const CANCELLED: u8 = 130;
}

fn repo_exit(e: &RepoError) -> u8 {
    match e {
        RepoError::Damaged { .. } | RepoError::MissingDataKey { .. } => exit::DAMAGED,
        RepoError::Lock(ferry::repo::lock::LockError::Busy(_)) => exit::LOCKED,
        RepoError::Key(_) => exit::KEY,
        RepoError::NoSpace { .. } => exit::NO_SPACE,
        RepoError::Cancelled => exit::CANCELLED,
        _ => exit::FAILED,
    }
}

fn exit_code(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(r) = c.downcast_ref::<RepoError>() {
            return repo_exit(r);
        }
        if let Some(j) = c.downcast_ref::<JobError>() {
            return match j {
                JobError::Repo(r) => repo_exit(r),
                JobError::Pipeline(PipelineError::Repo(r)) => repo_exit(r),
                JobError::Pipeline(PipelineError::Cancelled) => exit::CANCELLED,
                JobError::Pipeline(PipelineError::UnknownChunkKey { .. }) => exit::DAMAGED,
                JobError::Key(_) => exit::KEY,
                _ => exit::FAILED,
            };
        }
        if c.downcast_ref::<KeyError>().is_some() {
            return exit::KEY;
        }
    }
    exit::FAILED
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let progress = Arc::new(Progress::default());
    {
        let p = progress.clone();
        // First Ctrl-C / SIGTERM asks every stage to stop; cleanup still runs.
        let _ = ctrlc::set_handler(move || p.request_cancel());
    }
    let out = Output::new(cli.json, !cli.no_progress && !cli.json);
    match run(cli.cmd, &out, &progress) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit_code(&e);
            out.error(&e, code);
            ExitCode::from(code)
        }
    }
}

fn run(cmd: Cmd, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    match cmd {
        Cmd::Repo(RepoCmd::Init {
            repo,
            keys,
            chunk_size,
            tenant,
        }) => {
            let ks = keys.source()?;
            let cs =
                u32::try_from(chunk_size).map_err(|_| anyhow::anyhow!("chunk size too large"))?;
            let r = Repository::init(&repo.repo, cs, &tenant, &*ks)?;
            out.result(
                &serde_json::json!({"repository": repo.repo, "repo_id": r.config.repo_id, "chunk_size": cs, "tenant": tenant, "key": ks.current_key()?}),
                || format!("initialised repository {} (tenant {tenant}, chunk size {}, key {})", repo.repo.display(), human_bytes(cs as u64), ks.current_key().map(|k| k.to_string()).unwrap_or_default()),
            );
            Ok(exit::OK)
        }
        Cmd::Repo(RepoCmd::Import { repo, keys }) => {
            let r = Repository::open(&repo.repo)?;
            let ks = keys.source()?;
            let rep = ferry::repo::keycheck::check(&r, &*ks)?;
            out.result(
                &serde_json::json!({"report": rep, "missing_keys": rep.missing_keys()}),
                || render::keycheck_summary(&rep),
            );
            use ferry::repo::keycheck::PointKeyStatus as S;
            Ok(
                if rep
                    .points
                    .iter()
                    .any(|p| matches!(p.status, S::Damaged { .. }))
                {
                    exit::DAMAGED
                } else if rep
                    .points
                    .iter()
                    .any(|p| matches!(p.status, S::KeyMissing { .. }))
                {
                    exit::KEY
                } else {
                    exit::OK
                },
            )
        }
        Cmd::Repo(RepoCmd::Info { repo }) => {
            let r = Repository::open(&repo.repo)?;
            let points = r.point_ids()?.len();
            let (chunks, bytes) = render::dir_usage(&r.root().join("chunks"));
            out.result(
                &serde_json::json!({"config": r.config, "points": points, "chunks": chunks, "chunk_bytes": bytes}),
                || format!(
                    "repository {}\n  id          {}\n  tenant      {}\n  chunk size  {}\n  created     {}\n  points      {points}\n  chunks      {chunks} ({})",
                    repo.repo.display(), r.config.repo_id, r.config.tenant, human_bytes(r.config.chunk_size as u64), r.config.created, human_bytes(bytes)
                ),
            );
            Ok(exit::OK)
        }
        Cmd::Backup(a) => {
            let repo = Repository::open(&a.repo.repo)?;
            let ks = a.keys.source()?;
            let mut disks = Vec::new();
            for img in &a.images {
                let src = FileSource::open(img)?;
                disks.push(DiskInput {
                    label: img.display().to_string(),
                    source: Box::new(src),
                    transport_reason: "file source given on the command line".into(),
                    change_id: None,
                });
            }
            for uri in &a.nbd {
                let src = ferry::transport::nbd::NbdSource::connect(uri, a.nbd_connections)?;
                disks.push(DiskInput {
                    label: uri.clone(),
                    source: Box::new(src),
                    transport_reason: "NBD export given on the command line".into(),
                    change_id: None,
                });
            }
            let req = BackupRequest {
                source_name: a.name.clone(),
                disks,
                pipeline: a.pipe.config(repo.config.chunk_size),
                lock_wait: Duration::from_secs(a.lock_wait),
            };
            let bar = out.progress_bar(progress.clone(), "backup");
            let res = job::backup(&repo, &*ks, req, progress);
            drop(bar);
            let rep = res?;
            out.result(&rep, || render::backup_summary(&rep));
            Ok(exit::OK)
        }
        Cmd::Points(PointsCmd::List { repo, name }) => {
            let r = Repository::open(&repo.repo)?;
            let list = r.list_points()?;
            let rows: Vec<serde_json::Value> = list
                .iter()
                .filter(|p| match (&name, &p.header) {
                    (Some(n), Ok(h)) => &h.source == n,
                    _ => true,
                })
                .map(|p| match &p.header {
                    Ok(h) => serde_json::json!({"point_id": p.id, "created": h.created, "name": h.source, "parent": h.parent, "disks": h.disks, "key": h.wrapped_key.key_ref}),
                    Err(e) => serde_json::json!({"point_id": p.id, "error": e.to_string()}),
                })
                .collect();
            let damaged = rows.iter().any(|r| r.get("error").is_some());
            out.result(&rows, || render::points_table(&rows));
            Ok(if damaged { exit::DAMAGED } else { exit::OK })
        }
        Cmd::Restore(a) => {
            let repo = Repository::open(&a.repo.repo)?;
            let ks = a.keys.source()?;
            let point = resolve_point(&repo, &a.point)?;
            let bar = out.progress_bar(progress.clone(), "restore");
            let res = job::restore(
                &repo,
                &*ks,
                &point,
                a.disk,
                &a.target,
                a.pipe.config(format::MAX_CHUNK_SIZE),
                progress,
            );
            drop(bar);
            let st = res?;
            let snap = progress.snapshot();
            out.result(
                &serde_json::json!({"point_id": point, "disk": a.disk, "target": a.target, "bytes_written": st.bytes_written, "chunks": st.chunks_total, "zero_chunks": st.chunks_zero, "seconds": snap.elapsed_secs}),
                || format!("restored {point} disk {} to {} ({} written, {} zero chunks skipped) in {:.1}s", a.disk, a.target.display(), human_bytes(st.bytes_written), st.chunks_zero, snap.elapsed_secs),
            );
            Ok(exit::OK)
        }
        Cmd::Verify(a) => {
            let repo = Repository::open(&a.repo.repo)?;
            let ks = a.keys.source()?;
            let workers = a.workers.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(2)
            });
            let bar = out.progress_bar(progress.clone(), "verify");
            let res = verify::verify(&repo, &*ks, &a.points, workers, progress);
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
        Cmd::Prune(a) => {
            let repo = Repository::open(&a.repo.repo)?;
            let policy = Policy {
                keep_last: a.keep_last,
                keep_daily: a.keep_daily,
                keep_weekly: a.keep_weekly,
                keep_monthly: a.keep_monthly,
            };
            let rep = gc::prune(&repo, &policy, a.dry_run, Duration::from_secs(a.lock_wait))?;
            out.result(&rep, || render::prune_summary(&rep));
            Ok(exit::OK)
        }
        Cmd::Bench(a) => bench(a, out, progress),
        Cmd::Keys(KeysCmd::Test { kms }) => {
            let client = kms
                .client()?
                .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required"))?;
            let versions = client.discover_versions()?;
            let q = client.query()?;
            let ops: Vec<&str> = q
                .operations
                .iter()
                .map(|&o| ferry::kmip::tags::operation_name(o))
                .filter(|n| *n != "operation")
                .collect();
            let probe = match &kms.kms_key {
                Some(n) => Some((
                    n.clone(),
                    client.locate(n, ferry::kmip::tags::OBJ_PUBLIC_KEY, None)?,
                )),
                None => None,
            };
            let decrypt = q.operations.contains(&ferry::kmip::tags::OP_DECRYPT);
            out.result(
                &serde_json::json!({"kms": client.address(), "versions": versions, "using": client.version(), "vendor": q.vendor, "operations": ops, "decrypt_listed": decrypt, "key": probe.as_ref().map(|(n, ids)| serde_json::json!({"name": n, "public_keys": ids}))}),
                || {
                    let mut s = format!(
                        "KMS {}: TLS and client certificate OK\n  vendor      {}\n  versions    {}\n  using       KMIP {}.{}\n  operations  {}\n",
                        client.address(),
                        q.vendor.as_deref().unwrap_or("?"),
                        versions.iter().map(|v| format!("{}.{}", v.0, v.1)).collect::<Vec<_>>().join(", "),
                        client.version().0,
                        client.version().1,
                        ops.join(", ")
                    );
                    if let Some((n, ids)) = &probe {
                        s.push_str(&format!("  key {n:?}: {}", if ids.is_empty() { "not found (ferry keys create makes it)".to_string() } else { format!("public key object(s) {}", ids.join(", ")) }));
                    }
                    s
                },
            );
            Ok(exit::OK)
        }
        Cmd::Keys(KeysCmd::Create { kms }) => {
            let mut kms = kms;
            kms.kms_create = true;
            let ks = kms
                .source()?
                .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required"))?;
            let k = ks.current_key()?;
            out.result(&k, || format!("tenant key {:?} ready: {k}", ks.key_name()));
            Ok(exit::OK)
        }
        Cmd::Keys(KeysCmd::GeneratePem {
            out_dir,
            name,
            bits,
        }) => {
            anyhow::ensure!(
                [2048, 3072, 4096].contains(&bits),
                "--bits must be 2048, 3072 or 4096"
            );
            std::fs::create_dir_all(&out_dir)
                .with_context(|| format!("creating {}", out_dir.display()))?;
            let (public, private) = render::generate_pem(&out_dir, &name, bits)?;
            out.result(
                &serde_json::json!({"public": public, "private": private}),
                || {
                    format!(
                        "wrote {} and {} (mode 0600)",
                        public.display(),
                        private.display()
                    )
                },
            );
            Ok(exit::OK)
        }
    }
}

fn resolve_point(repo: &Repository, spec: &str) -> anyhow::Result<String> {
    if let Some(name) = spec.strip_prefix("latest:") {
        return repo
            .latest_point_of(name)?
            .map(|h| h.point_id)
            .ok_or_else(|| anyhow::anyhow!("no restore point named {name:?}"));
    }
    Ok(spec.to_string())
}

fn bench(a: BenchArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let cs = a.chunk_size as usize;
    if let Some(what) = &a.read {
        let src: Box<dyn ferry::transport::DiskSource> = if what.starts_with("nbd") {
            Box::new(ferry::transport::nbd::NbdSource::connect(what, a.readers)?)
        } else {
            Box::new(FileSource::open(std::path::Path::new(what))?)
        };
        let r = ferry::bench::read_source(src.as_ref(), a.readers, cs)?;
        out.result(&r, || {
            format!(
                "read {} of {} from {} ({}) in {:.2}s: {:.1} MiB/s",
                human_bytes(r.bytes_read),
                human_bytes(r.size),
                r.source,
                r.transport,
                r.seconds,
                r.mib_per_sec
            )
        });
        return Ok(exit::OK);
    }
    let stages = ferry::bench::stages(cs, a.seconds);
    let mut e2e = None;
    if let Some(img) = &a.image {
        let scratch = tempfile::Builder::new()
            .prefix("ferry-bench-")
            .tempdir_in(a.scratch.clone().unwrap_or_else(std::env::temp_dir))?;
        let (public, private) = render::generate_pem(scratch.path(), "bench", 2048)?;
        let ks = PemKeySource::open(Some(&public), Some(&private))?;
        let repo_dir = scratch.path().join("repo");
        let repo = Repository::init(&repo_dir, cs as u32, "bench", &ks)?;
        let src = FileSource::open(img)?;
        let size = ferry::transport::DiskSource::size(&src);
        let t = std::time::Instant::now();
        let rep = job::backup(
            &repo,
            &ks,
            BackupRequest {
                source_name: "bench".into(),
                disks: vec![DiskInput {
                    source: Box::new(src),
                    label: img.display().to_string(),
                    transport_reason: "bench".into(),
                    change_id: None,
                }],
                pipeline: a.pipe.config(cs as u32),
                lock_wait: Duration::from_secs(5),
            },
            progress,
        )?;
        let backup_s = t.elapsed().as_secs_f64();
        let target = scratch.path().join("restored.img");
        let t = std::time::Instant::now();
        job::restore(
            &repo,
            &ks,
            &rep.point_id,
            0,
            &target,
            a.pipe.config(cs as u32),
            &Progress::default(),
        )?;
        let restore_s = t.elapsed().as_secs_f64();
        e2e = Some(serde_json::json!({
            "image": img, "size": size,
            "backup_seconds": backup_s, "backup_mib_s": size as f64 / backup_s / 1048576.0,
            "restore_seconds": restore_s, "restore_mib_s": size as f64 / restore_s / 1048576.0,
            "stored_bytes": rep.disks[0].bytes_new_stored,
        }));
    }
    let v = serde_json::json!({"chunk_size": cs, "stages": stages, "end_to_end": e2e});
    out.result(&v, || render::bench_summary(&v));
    Ok(exit::OK)
}
