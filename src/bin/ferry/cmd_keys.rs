//! `ferry keys`: KMS checks, the tenant key's versions, rotation sync, and the
//! disaster-recovery check of a private key exported by hand. ferry changes keys
//! on the KMS only in `create` (a missing key) and `rotate` (operator's request).

use crate::args::*;
use crate::exit;
use crate::render::{self, Output};
use anyhow::Context;
use clap::Subcommand;
use ferry::keys::sync::{KeySyncReport, KeyringSync};
use ferry::keys::{KeyLineage, KeySource, PemKeySource};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum KeysCmd {
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
    /// Show every version of the tenant key (--kms-key), or of every key whose name
    /// starts with --prefix: ids, states, rotation links, which one is current.
    /// Changes nothing.
    List {
        #[command(flatten)]
        kms: KmsArgs,
        /// List every key pair whose name starts with this (slower: reads every
        /// private key's name).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Rotation sync: find the newest Active version of the tenant key and, when
    /// the repository's keyring is still wrapped by an older one, re-wrap it with
    /// the newest. Reports what changed. With --config, every tenant of the file
    /// (or --tenant). Never changes keys on the KMS.
    Sync {
        #[command(flatten)]
        kms: KmsArgs,
        /// Repository whose keyring follows the key (optional).
        #[arg(long, short = 'r', env = "FERRY_REPO")]
        repo: Option<PathBuf>,
        /// Sync the tenants of this configuration file instead of the flags.
        #[arg(long, conflicts_with = "kms")]
        config: Option<PathBuf>,
        /// Only this tenant of --config.
        #[arg(long, requires = "config")]
        tenant: Option<String>,
    },
    /// Rotate the tenant key on the KMS, on the operator's request only:
    /// ReKeyKeyPair where the KMS supports it, else a new pair with the same name
    /// (activated; the old pair is revoked as superseded, so it still decrypts).
    /// Then run `ferry keys sync` (or any backup) to re-wrap the keyring.
    Rotate {
        #[command(flatten)]
        kms: KmsArgs,
        /// rekey (KMIP ReKeyKeyPair), new-pair, or auto (rekey when Query lists it).
        #[arg(long, default_value = "auto", value_parser = ["auto", "rekey", "new-pair"])]
        method: String,
    },
    /// Last-resort disaster recovery: check a private key exported from the KMS by
    /// hand (PEM) against the repository: which restore points it opens (each one is
    /// opened to prove it). Stores nothing: pass the file to restore, verify or
    /// repo import with --extra-private-key.
    Import {
        #[command(flatten)]
        repo: RepoArg,
        /// The exported private key (PEM: PKCS#8 or PKCS#1).
        #[arg(long)]
        private_key: PathBuf,
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

/// Run a `ferry keys` command.
pub fn run(cmd: KeysCmd, out: &Output) -> anyhow::Result<u8> {
    match cmd {
        KeysCmd::Test { kms } => {
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
        KeysCmd::Create { kms } => {
            let mut kms = kms;
            kms.kms_create = true;
            let ks = kms
                .source()?
                .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required"))?;
            let k = ks.current_key()?;
            out.result(&k, || format!("tenant key {:?} ready: {k}", ks.key_name()));
            Ok(exit::OK)
        }
        KeysCmd::List { kms, prefix } => list(kms, prefix, out),
        KeysCmd::Sync {
            kms,
            repo,
            config,
            tenant,
        } => sync(kms, repo, config, tenant, out),
        KeysCmd::Rotate { kms, method } => rotate(kms, &method, out),
        KeysCmd::Import { repo, private_key } => import(&repo.repo, &private_key, out),
        KeysCmd::GeneratePem {
            out_dir,
            name,
            bits,
        } => {
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

fn date(t: Option<i64>) -> String {
    t.and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "?".into())
}

fn lineage_table(l: &KeyLineage) -> String {
    let mut s = format!(
        "key {:?} on {} ({} version{})\n  {:<4} {:<12} {:<12} {:<24} {:<22} links\n",
        l.name,
        l.kms,
        l.pairs.len(),
        if l.pairs.len() == 1 { "" } else { "s" },
        "ver",
        "private id",
        "public id",
        "state",
        "created"
    );
    for p in &l.pairs {
        let mut links = Vec::new();
        if let Some(r) = &p.replaces {
            links.push(format!("replaces {r}"));
        }
        if let Some(r) = &p.replaced_by {
            links.push(format!("replaced by {r}"));
        }
        s.push_str(&format!(
            "{} {:<4} {:<12} {:<12} {:<24} {:<22} {}\n",
            if p.current { "*" } else { " " },
            format!("v{}", p.version),
            p.private_id,
            p.public_id.as_deref().unwrap_or("-"),
            p.state_name,
            date(p.initial_date),
            links.join(", ")
        ));
    }
    if l.current().is_none() {
        s.push_str("  no Active version: backups fail until one is activated on the KMS\n");
    }
    s
}

fn list(kms: KmsArgs, prefix: Option<String>, out: &Output) -> anyhow::Result<u8> {
    let client = kms
        .client()?
        .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required"))?;
    let names = match (&prefix, &kms.kms_key) {
        (Some(p), _) => ferry::keys::lineage::names_with_prefix(&client, p)?,
        (None, Some(n)) => vec![n.clone()],
        (None, None) => anyhow::bail!("give --kms-key NAME or --prefix PREFIX"),
    };
    let mut all = Vec::new();
    for n in &names {
        all.push(ferry::keys::lineage::resolve(&client, n)?);
    }
    out.result(&all, || {
        if all.is_empty() {
            return format!(
                "no key on {} whose name starts with {:?}",
                client.address(),
                prefix.as_deref().unwrap_or("")
            );
        }
        all.iter()
            .map(lineage_table)
            .collect::<Vec<_>>()
            .join("\n")
            .trim_end()
            .to_string()
    });
    Ok(if all.iter().any(|l| l.pairs.is_empty()) {
        exit::KEY
    } else {
        exit::OK
    })
}

fn sync_text(r: &KeySyncReport) -> String {
    let who = match &r.tenant {
        Some(t) => format!("tenant {t}: "),
        None => String::new(),
    };
    let key = if r.key_name.is_empty() {
        r.kms.clone()
    } else {
        format!("{:?} on {}", r.key_name, r.kms)
    };
    let mut s = match (&r.previous, r.rotated) {
        (Some(p), true) => format!(
            "{who}key {key} rotated: {} v{} -> {} v{} (new restore points use the new key)",
            p.key_id, p.key_version, r.current.key_id, r.current.key_version
        ),
        _ => format!(
            "{who}key {key}: current {} v{}, unchanged",
            r.current.key_id, r.current.key_version
        ),
    };
    s.push_str(&match &r.keyring {
        KeyringSync::UpToDate => "\n  keyring: already wrapped by the current key".to_string(),
        KeyringSync::Rewrapped { from, generation } => format!(
            "\n  keyring: re-wrapped with {} v{} (was {} v{}; generation {generation})",
            r.current.key_id, r.current.key_version, from.key_id, from.key_version
        ),
        KeyringSync::NoRepository => "\n  keyring: no repository".to_string(),
        KeyringSync::Failed { why } => format!(
            "\n  keyring: NOT re-wrapped: {why}\n  backups fail until the keyring opens; restores still work with each point's own key"
        ),
    });
    s
}

fn sync(
    kms: KmsArgs,
    repo: Option<PathBuf>,
    config: Option<PathBuf>,
    tenant: Option<String>,
    out: &Output,
) -> anyhow::Result<u8> {
    let reports: Vec<KeySyncReport> = match config {
        Some(path) => {
            let cfg = ferry::config::Config::load(&path)?;
            let tenants: Vec<&ferry::config::TenantSection> = match &tenant {
                Some(n) => vec![cfg.tenant(Some(n))?],
                None => cfg.tenants.iter().collect(),
            };
            anyhow::ensure!(!tenants.is_empty(), "{} defines no tenant", path.display());
            tenants
                .into_iter()
                .map(ferry::keys::sync::sync_tenant)
                .collect::<Result<_, _>>()?
        }
        None => {
            anyhow::ensure!(
                kms.kms_key.is_some(),
                "--kms-key NAME is required (the key to follow)"
            );
            let src = kms
                .source()?
                .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required (or --config)"))?;
            let no_repo = PathBuf::from("/nonexistent/ferry-no-repository");
            vec![ferry::keys::sync::sync_source(
                &src,
                Some(&src),
                repo.as_deref().unwrap_or(&no_repo),
            )?]
        }
    };
    out.result(&reports, || {
        reports.iter().map(sync_text).collect::<Vec<_>>().join("\n")
    });
    Ok(if reports.iter().all(|r| r.ok()) {
        exit::OK
    } else {
        exit::KEY
    })
}

fn rotate(kms: KmsArgs, method: &str, out: &Output) -> anyhow::Result<u8> {
    use ferry::kmip::tags::*;
    let mut src = kms
        .source()?
        .ok_or_else(|| anyhow::anyhow!("--kms HOST:PORT is required"))?;
    anyhow::ensure!(kms.kms_key.is_some(), "--kms-key NAME is required");
    let old = src.current_key()?;
    let client = src.client();
    let rekey = match method {
        "rekey" => true,
        "new-pair" => false,
        _ => client.query()?.operations.contains(&OP_REKEY_KEY_PAIR),
    };
    let (new_private, new_public) = if rekey {
        client.rekey_key_pair(&old.key_id)?
    } else {
        let bits = src
            .lineage()
            .and_then(|l| l.current())
            .and_then(|p| p.bits)
            .unwrap_or(kms.kms_bits);
        let (p, q) = client.create_rsa_key_pair(src.key_name(), bits)?;
        client.activate(&p)?;
        client.activate(&q)?;
        let old_public = src
            .lineage()
            .and_then(|l| l.current())
            .and_then(|c| c.public_id.clone());
        client.revoke(
            &old.key_id,
            REVOKE_SUPERSEDED,
            Some("rotated by ferry keys rotate"),
        )?;
        if let Some(op) = old_public {
            client.revoke(&op, REVOKE_SUPERSEDED, Some("rotated by ferry keys rotate"))?;
        }
        (p, q)
    };
    src.refresh()?;
    let new = src.current_key()?;
    anyhow::ensure!(
        new.key_id == new_private,
        "the KMS made key {new_private} but the newest Active version of {:?} is {}",
        src.key_name(),
        new.key_id
    );
    out.result(
        &serde_json::json!({"method": if rekey { "rekey" } else { "new-pair" }, "old": old, "new": new, "new_public_id": new_public}),
        || {
            format!(
                "key {:?} rotated ({}): {} v{} -> {} v{} (public {new_public}); run 'ferry keys sync' or a backup to re-wrap the keyring",
                src.key_name(),
                if rekey { "ReKeyKeyPair" } else { "new pair, old one revoked as superseded" },
                old.key_id,
                old.key_version,
                new.key_id,
                new.key_version
            )
        },
    );
    Ok(exit::OK)
}

fn import(
    repo: &std::path::Path,
    private_key: &std::path::Path,
    out: &Output,
) -> anyhow::Result<u8> {
    let r = ferry::repo::Repository::open(repo)?;
    let key = PemKeySource::open(None, Some(private_key))?;
    let fp = key.current_key()?.fingerprint;
    let mut opens = Vec::new();
    let mut damaged = Vec::new();
    let mut kms_ids = std::collections::BTreeSet::new();
    for p in r.list_points()? {
        let Ok(h) = p.header else { continue };
        // The tenant key that wrapped the point, or the provider's recovery key
        // that wrapped it too (key-loss protection).
        let (k, via) = match &h.recovery_wrapped_key {
            _ if h.wrapped_key.key_ref.fingerprint == fp => {
                (&h.wrapped_key.key_ref, ferry::repo::KeyPath::OwnKey)
            }
            Some(w) if w.key_ref.fingerprint == fp => {
                (&w.key_ref, ferry::repo::KeyPath::RecoveryKey)
            }
            _ => continue,
        };
        kms_ids.insert(format!(
            "{} key {} v{} on {}",
            k.source, k.key_id, k.key_version, k.kms
        ));
        match r.open_point_via(&h.point_id, &key, None, via) {
            Ok(_) => opens.push(h.point_id),
            Err(e) => damaged.push((h.point_id, e.to_string())),
        }
    }
    let keyring = r
        .keyring_header()
        .ok()
        .map(|h| h.wrapped_key.key_ref.fingerprint == fp)
        .unwrap_or(false);
    out.result(
        &serde_json::json!({"private_key": private_key, "fingerprint": fp, "is_key": kms_ids, "opens_points": opens, "opens_keyring": keyring, "failed": damaged}),
        || {
            if opens.is_empty() && !keyring {
                return format!(
                    "{} (fingerprint {}) opens no restore point of {} and not its keyring: it is not a key this repository needs (see 'ferry repo import')",
                    private_key.display(),
                    &fp[..16],
                    repo.display()
                );
            }
            let mut s = format!(
                "{} is {} (fingerprint {})\n  opens {} restore point(s): {}\n",
                private_key.display(),
                kms_ids.iter().cloned().collect::<Vec<_>>().join(", "),
                &fp[..16],
                opens.len(),
                opens.join(", ")
            );
            if keyring {
                s.push_str("  it also opens the keyring (every point decrypts through it)\n");
            }
            for (p, e) in &damaged {
                s.push_str(&format!("  point {p}: {e}\n"));
            }
            s.push_str(&format!(
                "nothing was stored: use it with --extra-private-key {} on restore, verify or repo import",
                private_key.display()
            ));
            s
        },
    );
    Ok(if opens.is_empty() && !keyring {
        exit::KEY
    } else if !damaged.is_empty() {
        exit::DAMAGED
    } else {
        exit::OK
    })
}
