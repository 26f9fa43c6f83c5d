//! `ferry vsphere`: operator commands on vCenter: list VMs with their disks,
//! encryption, key provider and CBT state; create and remove snapshots; read a
//! server's certificate thumbprint for pinning. All vCenter work is in
//! `ferry::vsphere`; this file parses arguments and renders results.

use crate::exit;
use crate::render::{human_bytes, Output};
use anyhow::Context;
use clap::{Args, Subcommand};
use ferry::vsphere::{Client, ClientConfig, ServerTrust, Vm};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum VsphereCmd {
    /// List VMs: disks (key, size, file, changeId), encryption and key provider, CBT.
    Ls {
        #[command(flatten)]
        conn: VcenterArgs,
        /// Only VMs whose name matches this glob (`*` and `?`), e.g. 'web*'.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Create or remove VM snapshots.
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Print the SHA-256 (and SHA-1) fingerprint of a server's TLS certificate, to
    /// pin it as `[vcenter] thumbprint`. Trusts nothing and sends nothing: compare
    /// the value with the vCenter console before using it.
    Thumbprint {
        /// Server URL (https://vcenter.example.com/sdk) or HOST[:PORT].
        #[arg(long)]
        url: String,
        /// Seconds to wait for the TLS handshake.
        #[arg(long, default_value_t = 10)]
        timeout_secs: u64,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// Take a snapshot of a VM (never with memory).
    Create {
        #[command(flatten)]
        conn: VcenterArgs,
        /// VM name (exact).
        #[arg(long)]
        vm: String,
        /// Snapshot name. Snapshots named ferry-* are treated as ferry's by the
        /// orphan sweep, which removes them when no job owns them.
        #[arg(long)]
        name: Option<String>,
        /// Snapshot description.
        #[arg(
            long,
            default_value = "ferry backup (manual, ferry vsphere snapshot create)"
        )]
        description: String,
        /// Quiesce the guest file systems through VMware Tools.
        #[arg(long)]
        quiesce: bool,
    },
    /// Remove a snapshot of a VM by name (children are kept, disks consolidated).
    Remove {
        #[command(flatten)]
        conn: VcenterArgs,
        /// VM name (exact).
        #[arg(long)]
        vm: String,
        /// Snapshot name (must be unique on that VM).
        #[arg(long)]
        snapshot: String,
    },
}

/// How to reach vCenter: the `[vcenter]` section of a config file, flags, or both
/// (flags win).
#[derive(Args, Clone)]
pub struct VcenterArgs {
    /// ferry config file; its [vcenter] section gives the connection.
    #[arg(long, env = "FERRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// vCenter SDK URL, e.g. https://vcenter.example.com/sdk.
    #[arg(long)]
    pub vcenter_url: Option<String>,
    /// vCenter user, e.g. backup@vsphere.local.
    #[arg(long)]
    pub vcenter_user: Option<String>,
    /// File holding the vCenter password (first line).
    #[arg(long)]
    pub vcenter_password_file: Option<PathBuf>,
    /// CA certificate (PEM) the vCenter certificate must chain to.
    #[arg(long, conflicts_with = "vcenter_thumbprint")]
    pub vcenter_ca: Option<PathBuf>,
    /// SHA-256 thumbprint of the vCenter certificate (see `ferry vsphere thumbprint`).
    #[arg(long)]
    pub vcenter_thumbprint: Option<String>,
    /// Seconds for connect and each request (default: config, else 30).
    #[arg(long)]
    pub vcenter_timeout: Option<u64>,
}

impl VcenterArgs {
    /// The client configuration from the config file and flags.
    pub fn client_config(&self) -> anyhow::Result<ClientConfig> {
        let section = match &self.config {
            Some(p) => {
                let c = ferry::config::Config::load(p)?;
                c.vcenter.clone()
            }
            None => None,
        };
        let url = self
            .vcenter_url
            .clone()
            .or_else(|| section.as_ref().map(|s| s.url.clone()))
            .context(
                "no vCenter: give --config FILE (with a [vcenter] section) or --vcenter-url",
            )?;
        let user = self
            .vcenter_user
            .clone()
            .or_else(|| section.as_ref().map(|s| s.user.clone()))
            .context("no vCenter user: --vcenter-user or [vcenter] user")?;
        let password_file = self
            .vcenter_password_file
            .clone()
            .or_else(|| section.as_ref().map(|s| s.password_file.clone()))
            .context("no vCenter password: --vcenter-password-file or [vcenter] password_file")?;
        let trust = if let Some(ca) = &self.vcenter_ca {
            ServerTrust::Ca(ca.clone())
        } else if let Some(t) = &self.vcenter_thumbprint {
            ServerTrust::Thumbprint(ferry::tls::parse_sha256_thumbprint(t)?)
        } else {
            match section.as_ref().map(|s| (&s.ca, &s.thumbprint)) {
                Some((Some(ca), _)) => ServerTrust::Ca(ca.clone()),
                Some((None, Some(t))) => ServerTrust::Thumbprint(ferry::tls::parse_sha256_thumbprint(t)?),
                _ => anyhow::bail!(
                    "no way to trust the vCenter certificate: give --vcenter-ca or --vcenter-thumbprint \
                     (or [vcenter] ca / thumbprint); `ferry vsphere thumbprint --url {url}` shows the thumbprint"
                ),
            }
        };
        let password = ferry::config::read_secret_file(&password_file)?;
        let mut cfg = ClientConfig::new(&url, &user, password, trust);
        let secs = self
            .vcenter_timeout
            .or_else(|| section.as_ref().map(|s| s.timeout_secs))
            .unwrap_or(30);
        cfg.timeout = Duration::from_secs(secs.max(1));
        Ok(cfg)
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// Run `f` with a logged-in client, logging out afterwards whatever happened.
fn with_client<T>(
    conn: &VcenterArgs,
    f: impl AsyncFnOnce(&Client) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let cfg = conn.client_config()?;
    runtime()?.block_on(async {
        let c = Client::connect(cfg).await?;
        let r = f(&c).await;
        c.logout().await;
        r
    })
}

/// Run a `ferry vsphere` command.
pub fn run(cmd: VsphereCmd, out: &Output) -> anyhow::Result<u8> {
    match cmd {
        VsphereCmd::Ls { conn, vm } => {
            let vms = with_client(&conn, async |c: &Client| {
                Ok(match &vm {
                    Some(g) => c.vms_matching(g).await?,
                    None => c.vms().await?,
                })
            })?;
            let json: Vec<serde_json::Value> = vms.iter().map(vm_json).collect();
            out.result(&json, || vm_table(&vms));
            Ok(exit::OK)
        }
        VsphereCmd::Snapshot(SnapshotCmd::Create {
            conn,
            vm,
            name,
            description,
            quiesce,
        }) => {
            let name = name.unwrap_or_else(|| {
                format!(
                    "{}manual-{}",
                    ferry::vsphere::SNAPSHOT_PREFIX,
                    time::OffsetDateTime::now_utc().unix_timestamp()
                )
            });
            let (v, snap) = with_client(&conn, async |c: &Client| {
                let v = c.vm_by_name(&vm).await?;
                let s = c.create_snapshot(&v, &name, &description, quiesce).await?;
                Ok((v, s))
            })?;
            out.result(
                &serde_json::json!({"vm": v.name, "vm_ref": v.moref, "snapshot": snap, "name": name, "quiesced": quiesce}),
                || format!("snapshot {name:?} ({}) of VM {} created", snap.value, v.name),
            );
            Ok(exit::OK)
        }
        VsphereCmd::Snapshot(SnapshotCmd::Remove { conn, vm, snapshot }) => {
            let (v, snap) = with_client(&conn, async |c: &Client| {
                let v = c.vm_by_name(&vm).await?;
                let found = ferry::vsphere::snapshot::find_snapshots(&v.snapshots, &snapshot);
                let snap = match found.as_slice() {
                    [one] => one.snapshot.clone(),
                    [] => anyhow::bail!(
                        "VM {}: no snapshot named {snapshot:?} (snapshots: {})",
                        v.name,
                        list_names(&v)
                    ),
                    many => anyhow::bail!(
                        "VM {}: {} snapshots are named {snapshot:?} ({}); remove them in the vSphere client",
                        v.name,
                        many.len(),
                        many.iter().map(|s| s.snapshot.value.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                };
                c.remove_snapshot(&snap).await?;
                Ok((v, snap))
            })?;
            out.result(
                &serde_json::json!({"vm": v.name, "vm_ref": v.moref, "snapshot": snap, "name": snapshot, "removed": true}),
                || format!("snapshot {snapshot:?} ({}) of VM {} removed", snap.value, v.name),
            );
            Ok(exit::OK)
        }
        VsphereCmd::Thumbprint { url, timeout_secs } => {
            let (host, port) = host_port(&url)?;
            let cert = runtime()?.block_on(ferry::tls::fetch_server_certificate(
                &host,
                port,
                Duration::from_secs(timeout_secs.max(1)),
            ))?;
            out.result(
                &serde_json::json!({"host": host, "port": port, "sha256": cert.sha256, "sha1": cert.sha1, "handshake_error": cert.handshake_error}),
                || match &cert.handshake_error {
                    None => format!(
                        "certificate of {host}:{port}\n  SHA-256  {}\n  SHA-1    {}\n\
                         Compare it with the certificate shown on the vCenter console before trusting it, then pin it:\n  \
                         [vcenter]\n  thumbprint = \"{}\"",
                        cert.sha256, cert.sha1, cert.sha256
                    ),
                    Some(e) => format!(
                        "certificate of {host}:{port}\n  SHA-256  {}\n  SHA-1    {}\n\
                         WARNING: the TLS handshake with this server failed after it sent the certificate, \
                         so ferry cannot use it even pinned: {e}",
                        cert.sha256, cert.sha1
                    ),
                },
            );
            Ok(exit::OK)
        }
    }
}

fn list_names(v: &Vm) -> String {
    let all = v.all_snapshots();
    if all.is_empty() {
        "none".into()
    } else {
        all.iter()
            .map(|s| format!("{:?}", s.name))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// `https://host:port/path`, `host:port` or `host` → (host, port); 443 by default.
fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let with_scheme = if url.contains("://") {
        url.to_string()
    } else {
        format!("https://{url}")
    };
    let u = reqwest::Url::parse(&with_scheme)
        .with_context(|| format!("{url:?} is not a URL or HOST[:PORT]"))?;
    let host = u
        .host_str()
        .with_context(|| format!("{url:?} has no host"))?
        .trim_matches(['[', ']'])
        .to_string();
    Ok((host, u.port_or_known_default().unwrap_or(443)))
}

fn encryption(v: &Vm) -> &'static str {
    if v.key_id.is_some() {
        "vm+disks"
    } else if v.disks.iter().any(|d| d.key_id.is_some()) {
        "disks"
    } else {
        "no"
    }
}

fn cbt(v: &Vm) -> &'static str {
    match v.change_tracking {
        Some(true) => "on",
        Some(false) => "off",
        None => "-",
    }
}

fn vm_json(v: &Vm) -> serde_json::Value {
    let mut j = serde_json::to_value(v).unwrap_or_default();
    if let Some(o) = j.as_object_mut() {
        o.insert("encrypted".into(), v.encrypted().into());
        o.insert("key_provider".into(), v.key_provider().into());
    }
    j
}

fn vm_table(vms: &[Vm]) -> String {
    if vms.is_empty() {
        return "no VMs".into();
    }
    let mut s = format!(
        "{:<28} {:<10} {:<10} {:>5} {:>10} {:<9} {:<16} {:<4} snapshots\n",
        "VM", "ref", "power", "disks", "size", "encrypted", "key provider", "CBT"
    );
    for v in vms {
        let size: u64 = v.disks.iter().map(|d| d.capacity_bytes).sum();
        s.push_str(&format!(
            "{:<28} {:<10} {:<10} {:>5} {:>10} {:<9} {:<16} {:<4} {}\n",
            v.name,
            v.moref.value,
            v.power_state.as_deref().unwrap_or("-"),
            v.disks.len(),
            human_bytes(size),
            encryption(v),
            v.key_provider().unwrap_or("-"),
            cbt(v),
            v.all_snapshots().len()
        ));
        for d in &v.disks {
            s.push_str(&format!(
                "  disk {:<6} {:<14} {:>10}  {}{}{}\n",
                d.key,
                d.label,
                human_bytes(d.capacity_bytes),
                d.file_name,
                d.key_id
                    .as_ref()
                    .map(|k| format!(
                        "  key {} ({})",
                        k.key_id,
                        k.provider_id.as_deref().unwrap_or("?")
                    ))
                    .unwrap_or_default(),
                d.change_id
                    .as_ref()
                    .map(|c| format!("  changeId {c}"))
                    .unwrap_or_default()
            ));
        }
    }
    s.trim_end().to_string()
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("https://vc.example.com/sdk").unwrap(),
            ("vc.example.com".into(), 443)
        );
        assert_eq!(
            host_port("https://127.0.0.1:8989/sdk").unwrap(),
            ("127.0.0.1".into(), 8989)
        );
        assert_eq!(
            host_port("vc.example.com:9443").unwrap(),
            ("vc.example.com".into(), 9443)
        );
        assert_eq!(
            host_port("https://[::1]:8443/sdk").unwrap(),
            ("::1".into(), 8443)
        );
        assert!(host_port("https://").is_err());
    }
}
