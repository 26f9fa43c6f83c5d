//! `ferry export`: serve one disk of a restore point read-only over NBD (instant
//! access) until Ctrl-C / SIGTERM.

use crate::args::*;
use crate::exit;
use crate::render::{human_bytes, Output};
use clap::Args;
use ferry::export::PointExportProvider;
use ferry::nbd_server::{Bind, ExportBackend, NbdServer, ServerConfig, ServerThread};
use ferry::progress::Progress;
use ferry::repo::Repository;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(Args)]
#[command(
    after_help = "Clients: qemu-img, nbdcopy, nbdinfo, nbd-client, a hypervisor's NBD driver. \
The export is read-only; it is named <point>-disk<N> and is also the default export.\n\
Examples:\n  ferry export -r /repo --point latest:vm1 --listen 127.0.0.1:10809\n  \
qemu-img convert -O qcow2 nbd://127.0.0.1:10809/ vm1.qcow2\n  \
ferry export -r /repo --point latest:vm1 --socket /run/ferry/vm1.sock --tls-certificates /etc/ferry/nbd"
)]
pub struct ExportArgs {
    #[command(flatten)]
    pub repo: RepoArg,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// Restore point id, or "latest:<name>".
    #[arg(long)]
    pub point: String,
    /// Disk number.
    #[arg(long, default_value_t = 0)]
    pub disk: u32,
    /// Listen on HOST:PORT (TCP; port 0 picks a free port). Default 127.0.0.1:10809.
    #[arg(long, conflicts_with = "socket")]
    pub listen: Option<String>,
    /// Listen on this Unix socket instead of TCP.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Require TLS. DIR holds server-cert.pem and server-key.pem (the qemu-nbd /
    /// nbdkit / libnbd layout); clients verify the server against their ca-cert.pem.
    #[arg(long, value_name = "DIR")]
    pub tls_certificates: Option<PathBuf>,
    /// With --tls-certificates: clients must present a certificate signed by
    /// DIR/ca-cert.pem.
    #[arg(long, requires = "tls_certificates")]
    pub tls_verify_peer: bool,
    /// Memory for decoded chunks, in MiB.
    #[arg(long, default_value_t = 64)]
    pub cache_mib: u64,
    /// Connections served at once.
    #[arg(long, default_value_t = 16)]
    pub max_connections: usize,
}

/// `ferry export`.
pub fn export(a: ExportArgs, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    let repo = Repository::open(&a.repo.repo)?;
    let ks = a.keys.unwrap_source()?;
    let point = resolve_point(&repo, &a.point)?;
    let tls = match &a.tls_certificates {
        Some(dir) => Some(ferry::nbd_server::tls::server_config_from_dir(
            dir,
            a.tls_verify_peer,
        )?),
        None => None,
    };
    drop(repo);
    let exported = Arc::new(open_point_disk(
        &a.repo.repo,
        &*ks,
        &point,
        a.disk,
        a.cache_mib,
    )?);
    drop(ks);
    let provider = Arc::new(PointExportProvider::new(exported.clone()));
    let name = provider.name().to_string();
    let server = NbdServer::new(
        provider,
        ServerConfig {
            tls,
            max_connections: a.max_connections,
            ..ServerConfig::default()
        },
    );
    let bind = match (&a.socket, &a.listen) {
        (Some(p), _) => Bind::Unix(p.clone()),
        (None, Some(l)) => Bind::Tcp(l.clone()),
        (None, None) => Bind::Tcp("127.0.0.1:10809".into()),
    };
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let thread = ServerThread::start(server, &bind, 2, (cores * 2).max(8))
        .map_err(|e| anyhow::anyhow!("cannot listen on {bind:?}: {e}"))?;
    let uri = thread
        .local_addr()
        .uri(&name, a.tls_certificates.as_deref());
    let size = exported.size();
    let info = serde_json::json!({
        "uri": uri,
        "export": name,
        "point_id": point,
        "disk": a.disk,
        "size": size,
        "tls": a.tls_certificates.is_some(),
        "read_only": true,
    });
    // Printed as soon as clients can connect.
    out.result(&info, || {
        format!(
            "serving restore point {point} disk {} ({}) read-only at\n  {uri}\nCtrl-C or SIGTERM stops.",
            a.disk,
            human_bytes(size)
        )
    });
    let _ = std::io::stdout().flush();
    while !progress.cancelled() {
        std::thread::sleep(Duration::from_millis(200));
    }
    thread.stop()?;
    let st = exported.stats();
    tracing::info!(
        chunks_decoded = st.chunks_decoded,
        cache_hits = st.cache_hits,
        "export stopped"
    );
    Ok(exit::OK)
}
