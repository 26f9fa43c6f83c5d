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

/// Run a `ferry repo` command.
pub fn run(cmd: RepoCmd, out: &Output) -> anyhow::Result<u8> {
    match cmd {
        RepoCmd::Init {
            repo,
            keys,
            chunk_size,
            tenant,
        } => {
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
        RepoCmd::Info { repo } => {
            let r = Repository::open(&repo.repo)?;
            let points = r.point_ids()?.len();
            let (chunks, bytes) = render::dir_usage(&r.root().join("chunks"));
            // Chunks verify --repair took out of use that no backup stored again.
            let pending = r.chunks_to_rewrite()?.len();
            out.result(
            &serde_json::json!({"config": r.config, "points": points, "chunks": chunks, "chunk_bytes": bytes, "chunks_to_store_again": pending}),
            || {
                let mut s = format!(
                "repository {}\n  id          {}\n  tenant      {}\n  chunk size  {}\n  created     {}\n  points      {points}\n  chunks      {chunks} ({})",
                repo.repo.display(), r.config.repo_id, r.config.tenant, human_bytes(r.config.chunk_size as u64), r.config.created, human_bytes(bytes)
                );
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
