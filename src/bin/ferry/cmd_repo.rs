//! `ferry repo`: create a repository, show it, and the disaster-recovery key check.

use crate::args::*;
use crate::exit;
use crate::render::{self, human_bytes, Output};
use clap::Subcommand;
use ferry::repo::Repository;

#[derive(Subcommand)]
pub enum RepoCmd {
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
        /// Codec for chunks: lz4 (fastest), zstd[:LEVEL] (denser; level 1-19,
        /// default 1), auto[:LEVEL] (zstd, skipping chunks that do not compress).
        /// `ferry bench --image` compares them on your own data.
        #[arg(long, default_value = "lz4")]
        compression: ferry::repo::codec::Codec,
        #[command(flatten)]
        immutable: ImmutableArgs,
    },
    /// Immutable restore points (S3 Object Lock) for new points: each new
    /// point's objects stay unchangeable and undeletable for at least N days
    /// (`--immutable-days 0` turns it off for new points; existing points keep
    /// their retention). Needs a bucket with Object Lock enabled.
    SetImmutability {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        immutable: ImmutableArgs,
    },
    /// Show repository configuration and size.
    Info {
        #[command(flatten)]
        repo: RepoArg,
    },
    /// Change the codec of new chunks (lz4, zstd[:LEVEL], auto[:LEVEL]); chunks
    /// already stored keep theirs and dedupe as before. Needs no keys.
    SetCompression {
        #[command(flatten)]
        repo: RepoArg,
        /// The codec.
        compression: ferry::repo::codec::Codec,
    },
    /// Backup copies (3-2-1): copy restore points to another repository, e.g. a
    /// local directory to s3://BUCKET/PREFIX. The target is an empty location
    /// (it becomes a replica: same repository id, keyring and tenant keys) or an
    /// earlier copy; only what it lacks is sent, each point is committed there
    /// manifest last, and an interrupted copy resumes where it stopped. Needs no
    /// keys. Exit 0 when every point asked for is at the target.
    Copy {
        #[command(flatten)]
        repo: RepoArg,
        /// The target repository (directory or s3://BUCKET/PREFIX; S3 settings
        /// from the environment, docs/operations.md).
        #[arg(long)]
        to: std::path::PathBuf,
        /// Points to copy (ids or latest:NAME); default every point.
        #[arg(long = "point")]
        points: Vec<String>,
        /// Seconds to wait for either repository's lock.
        #[arg(long, default_value_t = 60)]
        lock_wait: u64,
        /// The target's own immutability (S3 Object Lock), set before the copy
        /// (`--immutable-days N`, N > 0): copied points are retained by the
        /// target's setting from the time of the copy, never by the source's
        /// dates. Without it the target keeps its setting (a new replica:
        /// none).
        #[command(flatten)]
        immutable: ImmutableArgs,
    },
    /// Disaster recovery: for every restore point, every way the given keys open
    /// it (its own tenant key, the keyring under the newest tenant key, the
    /// provider's recovery key), and, only for points no path opens, the keys to
    /// obtain (KMS, key id, fingerprint). Changes nothing.
    Import {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
    },
    /// Key-loss protection: also wrap every new restore point's data key with
    /// the provider's recovery public key, so the provider can restore when the
    /// tenant's KMS or key is lost. Affects new points only; each point's
    /// manifest records whether it was protected. Needs the tenant key (the
    /// setting lives in the keyring, authenticated by that key).
    Recovery {
        #[command(subcommand)]
        cmd: RecoveryCmd,
    },
}

/// `--immutable-days N [--immutable-mode governance|compliance]`.
#[derive(clap::Args)]
pub struct ImmutableArgs {
    /// Keep every new restore point immutable for at least N days (S3 Object
    /// Lock; dates are rounded up to 7-day generations). Needs a bucket with
    /// Object Lock enabled.
    #[arg(long, value_name = "N")]
    immutable_days: Option<u32>,
    /// Object Lock mode: governance (an identity with
    /// s3:BypassGovernanceRetention can still lift it) or compliance (nobody
    /// can, not even the bucket owner, until the date passes).
    #[arg(long, default_value = "governance")]
    immutable_mode: ferry::repo::backend::RetentionMode,
}

impl ImmutableArgs {
    fn setting(&self) -> Option<ferry::repo::format::Immutability> {
        self.immutable_days
            .filter(|d| *d > 0)
            .map(|days| ferry::repo::format::Immutability {
                days,
                mode: self.immutable_mode,
            })
    }
}

fn describe_immutability(i: Option<ferry::repo::format::Immutability>) -> String {
    match i {
        Some(i) => format!(
            "new points immutable for at least {} day(s), {} mode (S3 Object Lock)",
            i.days, i.mode
        ),
        None => "off (points can be deleted by prune or by anyone with delete rights)".into(),
    }
}

#[derive(Subcommand)]
pub enum RecoveryCmd {
    /// Turn protection on (or change the recovery key) for new points.
    Enable {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
        /// The provider's recovery public key (PEM, RSA 2048-4096). Keep the
        /// private half offline, apart from every tenant KMS.
        #[arg(long)]
        recovery_public_key: std::path::PathBuf,
    },
    /// Turn protection off for new points (earlier points stay protected).
    Disable {
        #[command(flatten)]
        repo: RepoArg,
        #[command(flatten)]
        keys: KeyArgs,
    },
}

/// Run a `ferry repo` command.
pub fn run(cmd: RepoCmd, out: &Output) -> anyhow::Result<u8> {
    match cmd {
        RepoCmd::Init {
            repo,
            keys,
            chunk_size,
            tenant,
            compression,
            immutable,
        } => {
            let ks = keys.source()?;
            let cs =
                u32::try_from(chunk_size).map_err(|_| anyhow::anyhow!("chunk size too large"))?;
            let r = Repository::init_in(
                ferry::repo::backend::connect(&repo.repo)?,
                cs,
                &tenant,
                &*ks,
                compression,
                immutable.setting(),
            )?;
            out.result(
            &serde_json::json!({"repository": repo.repo, "repo_id": r.config.repo_id, "chunk_size": cs, "tenant": tenant, "key": ks.current_key()?}),
            || format!("initialised repository {} (tenant {tenant}, chunk size {}, compression {compression}, key {})", repo.repo.display(), human_bytes(cs as u64), ks.current_key().map(|k| k.to_string()).unwrap_or_default()),
        );
            Ok(exit::OK)
        }
        RepoCmd::Import { repo, keys } => {
            let r = Repository::open(&repo.repo)?;
            let ks = keys.unwrap_source()?;
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
        RepoCmd::Recovery { cmd } => recovery(cmd, out),
        RepoCmd::SetCompression { repo, compression } => {
            let mut r = Repository::open(&repo.repo)?;
            let before = r.config.compression;
            r.set_compression(compression)?;
            out.result(
                &serde_json::json!({"repository": repo.repo, "compression": compression.to_string(), "was": before.to_string()}),
                || format!("new chunks of {} are compressed with {compression} (was {before}); stored chunks keep their codec", repo.repo.display()),
            );
            Ok(exit::OK)
        }
        RepoCmd::SetImmutability { repo, immutable } => {
            let mut r = Repository::open(&repo.repo)?;
            r.set_immutability(immutable.setting())?;
            out.result(
                &serde_json::json!({"repository": repo.repo, "immutability": r.config.immutability}),
                || format!("{}: {}", repo.repo.display(), describe_immutability(r.config.immutability)),
            );
            Ok(exit::OK)
        }
        RepoCmd::Copy {
            repo,
            to,
            points,
            lock_wait,
            immutable,
        } => {
            let src = Repository::open(&repo.repo)?;
            let dst = ferry::repo::backend::connect(&to)?;
            let started = std::time::Instant::now();
            let r = ferry::repo::copy::copy_points(
                &src,
                dst,
                &points,
                immutable.setting(),
                std::time::Duration::from_secs(lock_wait),
                &ferry::progress::Progress::default(),
            )?;
            out.result(&r, || {
                format!(
                    "copied {} point(s) to {} in {:.1}s{}: {} chunk(s) sent ({}), {} already there; {} point(s) were there already{}{}",
                    r.points_copied.len(),
                    to.display(),
                    started.elapsed().as_secs_f64(),
                    if r.target_created { " (new replica)" } else { "" },
                    r.chunks_copied,
                    human_bytes(r.chunk_bytes_copied),
                    r.chunks_present,
                    r.points_present.len(),
                    if r.keyring_updated { "; keyring updated" } else { "" },
                    match &r.immutable {
                        Some(i) => format!(
                            "; immutable at the target until {} ({})",
                            ferry::repo::backend::format_unix(i.until),
                            i.mode
                        ),
                        None => String::new(),
                    },
                )
            });
            Ok(exit::OK)
        }
        RepoCmd::Info { repo } => {
            let r = Repository::open(&repo.repo)?;
            let points = r.point_ids()?.len();
            let protection = protection(&r)?;
            let (chunks, bytes) = r.chunk_usage()?;
            let backend = r.backend().describe();
            // Chunks verify --repair took out of use that no backup stored again.
            let pending = r.chunks_to_rewrite()?.len();
            out.result(
            &serde_json::json!({"config": r.config, "backend": r.backend().kind(), "location": backend, "compression": r.config.compression.to_string(), "points": points, "chunks": chunks, "chunk_bytes": bytes, "chunks_to_store_again": pending, "key_loss_protection": protection}),
            || {
                let mut s = format!(
                "repository {}\n  stored in   {backend}\n  id          {}\n  tenant      {}\n  chunk size  {}\n  compression {}\n  created     {}\n  points      {points}\n  chunks      {chunks} ({})",
                repo.repo.display(), r.config.repo_id, r.config.tenant, human_bytes(r.config.chunk_size as u64), r.config.compression, r.config.created, human_bytes(bytes)
                );
                s.push_str(&format!("\n  key loss    {}", protection.describe()));
                s.push_str(&format!("\n  immutable   {}", describe_immutability(r.config.immutability)));
                if pending > 0 {
                    s.push_str(&format!("\n  repair      {pending} damaged chunk(s) wait for a backup of the same data to store them again (verify --repair moved them to damaged/)"));
                }
                s
            },
        );
            Ok(exit::OK)
        }
    }
}

/// What `repo info` says about key-loss protection, from public headers only
/// (the keyring's setting and each manifest's record; no key needed).
#[derive(serde::Serialize)]
struct Protection {
    /// The keyring's setting for new points.
    recovery_key: Option<ferry::keys::KeyRef>,
    since: Option<String>,
    /// Points whose data key the recovery key also wraps.
    points_protected: usize,
    points: usize,
}

impl Protection {
    fn describe(&self) -> String {
        let now = match (&self.recovery_key, &self.since) {
            (Some(k), Some(since)) => format!(
                "protection on for new points since {since}: recovery key {} ({})",
                &k.fingerprint[..16],
                k.kms
            ),
            _ => "protection off: without the tenant's key (its KMS) the provider cannot open new points".to_string(),
        };
        format!(
            "{now}\n              {} of {} point(s) also open with the provider's recovery key; the others need the tenant's key",
            self.points_protected, self.points
        )
    }
}

fn protection(r: &Repository) -> anyhow::Result<Protection> {
    let setting = r.keyring_header().ok().and_then(|h| h.recovery);
    let headers: Vec<_> = r
        .list_points()?
        .into_iter()
        .filter_map(|p| p.header.ok())
        .collect();
    Ok(Protection {
        recovery_key: setting.as_ref().map(|s| s.key_ref.clone()),
        since: setting.map(|s| s.since),
        points_protected: headers
            .iter()
            .filter(|h| h.recovery_wrapped_key.is_some())
            .count(),
        points: headers.len(),
    })
}

fn recovery(cmd: RecoveryCmd, out: &Output) -> anyhow::Result<u8> {
    let (repo, keys, key) = match cmd {
        RecoveryCmd::Enable {
            repo,
            keys,
            recovery_public_key,
        } => {
            let text = std::fs::read_to_string(&recovery_public_key).map_err(|e| {
                anyhow::anyhow!("cannot read {}: {e}", recovery_public_key.display())
            })?;
            let k = ferry::keys::RecoveryKey::from_public_pem(
                &text,
                &recovery_public_key.display().to_string(),
                &ferry::repo::now_rfc3339(),
            )?;
            (repo, keys, Some(k))
        }
        RecoveryCmd::Disable { repo, keys } => (repo, keys, None),
    };
    let r = Repository::open(&repo.repo)?;
    let ks = keys.source()?;
    let _lock = r.lock_for_writing("key-loss protection", std::time::Duration::from_secs(30))?;
    let kr = r.set_recovery(&*ks, key)?;
    let setting = kr.header.recovery;
    out.result(
        &serde_json::json!({"repository": repo.repo, "recovery": setting, "keyring_generation": kr.header.generation}),
        || match &setting {
            Some(k) => format!(
                "key-loss protection on for new restore points of {}: {}. Keep its private key offline; restore with --recovery-private-key when the tenant's key is lost",
                repo.repo.display(),
                k.describe()
            ),
            None => format!(
                "key-loss protection off for new restore points of {}: earlier protected points stay openable with the recovery key",
                repo.repo.display()
            ),
        },
    );
    Ok(exit::OK)
}
