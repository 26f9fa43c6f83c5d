//! `ferry keys`: KMS checks and tenant key management.

use crate::args::*;
use crate::exit;
use crate::render::{self, Output};
use anyhow::Context;
use clap::Subcommand;
use ferry::keys::KeySource;
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
