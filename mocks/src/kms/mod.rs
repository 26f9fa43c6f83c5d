//! The mock KMS: KMIP 1.4 (and 1.0–1.3) over mutual TLS, holding tenant RSA key
//! pairs the way a real KMS does, for ferry's tests, `ferry-sim` and PyKMIP's
//! client. See `docs/mocks.md`.
//!
//! Files, one job each:
//! - [`server`]: TCP + TLS (client certificates required, ECDSA P-256 server
//!   certificate by default, TLS 1.2/1.3, session resumption), framing, down/slow.
//! - [`ops`]: the KMIP operations and object states (reusing ferry's TTLV codec).
//! - [`store`]: objects and their persistence (atomic state file).
//! - [`faults`]: fault injection and counters.
//!
//! Start one in-process with [`KmsMock::start`]; `ferry-sim kms` runs one
//! standalone. Mock only: the state file holds private keys in clear.

pub mod faults;
pub mod ops;
pub mod server;
pub mod store;
#[cfg(test)]
mod tests;

pub use faults::{Faults, KmsStats, MissingKeys};
pub use store::ObjectSummary;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Default KMIP port.
pub const KMIP_PORT: u16 = 5696;

/// Name of the state file inside the state directory.
pub const STATE_FILE: &str = "kms-state.json";

/// Why the mock could not start.
#[derive(Debug, thiserror::Error)]
pub enum KmsMockError {
    /// Certificates.
    #[error("mock KMS TLS: {0}")]
    Tls(String),
    /// The state file.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// Binding, directories, threads.
    #[error("mock KMS: {0}")]
    Io(#[from] std::io::Error),
}

/// How to start a mock KMS.
#[derive(Clone)]
pub struct KmsOptions {
    /// Address to listen on (default 127.0.0.1).
    pub bind: IpAddr,
    /// Port (0: any free port; `ferry-sim kms` defaults to 5696).
    pub port: u16,
    /// State directory: the state file and the certificates. `None`: a temporary
    /// directory removed when the mock stops (nothing survives a restart). When the
    /// directory already holds `ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
    /// `client-cert.pem` and `client-key.pem`, they are reused, so clients keep
    /// working across restarts.
    pub state_dir: Option<PathBuf>,
    /// CA that issues the server and client certificates when they are made (default:
    /// a new one). Share one with tests that need more client certificates.
    pub ca: Option<Arc<crate::pki::Ca>>,
    /// Names in the server certificate (default `localhost`, `127.0.0.1`).
    pub server_names: Vec<String>,
    /// Use this server certificate and key (PEM) instead of issuing an ECDSA P-256
    /// one, e.g. an RSA certificate.
    pub server_tls: Option<(String, String)>,
    /// Accept client certificates signed by this CA (PEM) instead of the
    /// certificate CA.
    pub client_ca_pem: Option<String>,
}

impl Default for KmsOptions {
    fn default() -> Self {
        KmsOptions {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            state_dir: None,
            ca: None,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            server_tls: None,
            client_ca_pem: None,
        }
    }
}

/// A running mock KMS (stops when dropped).
pub struct KmsMock {
    addr: SocketAddr,
    dir: PathBuf,
    backend: Arc<ops::Backend>,
    ca: Option<Arc<crate::pki::Ca>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

const CERT_FILES: [&str; 5] = [
    "ca-cert.pem",
    "server-cert.pem",
    "server-key.pem",
    "client-cert.pem",
    "client-key.pem",
];

impl KmsMock {
    /// Load or create the state and certificates and serve on a dedicated runtime
    /// thread. Works from sync and async code alike.
    pub fn start(opts: KmsOptions) -> Result<KmsMock, KmsMockError> {
        let (tmp, dir) = match &opts.state_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new().prefix("ferry-kms-").tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let tls_err = |e: crate::pki::PkiError| KmsMockError::Tls(e.to_string());
        let reuse = opts.server_tls.is_none() && CERT_FILES.iter().all(|f| dir.join(f).exists());
        let mut ca_used = None;
        if !reuse {
            let ca = match &opts.ca {
                Some(c) => c.clone(),
                None => Arc::new(crate::pki::Ca::new("ferry mock KMS CA").map_err(tls_err)?),
            };
            let names: Vec<&str> = opts.server_names.iter().map(String::as_str).collect();
            let (cert, key) = match &opts.server_tls {
                Some((c, k)) => (c.clone(), k.clone()),
                None => {
                    let s = ca.server(&names).map_err(tls_err)?;
                    (s.cert_pem, s.key_pem)
                }
            };
            let client = ca.client("ferry-agent").map_err(tls_err)?;
            crate::pki::write(&dir, "ca-cert.pem", &ca.cert_pem(), false).map_err(tls_err)?;
            crate::pki::write(&dir, "ca-key.pem", ca.key_pem(), true).map_err(tls_err)?;
            crate::pki::write(&dir, "server-cert.pem", &cert, false).map_err(tls_err)?;
            crate::pki::write(&dir, "server-key.pem", &key, true).map_err(tls_err)?;
            crate::pki::write(&dir, "client-cert.pem", &client.cert_pem, false).map_err(tls_err)?;
            crate::pki::write(&dir, "client-key.pem", &client.key_pem, true).map_err(tls_err)?;
            ca_used = Some(ca);
        }
        let read = |n: &str| std::fs::read_to_string(dir.join(n));
        let client_ca = match &opts.client_ca_pem {
            Some(p) => p.clone(),
            None => read("ca-cert.pem")?,
        };
        let tls = server::tls_config(
            &read("server-cert.pem")?,
            &read("server-key.pem")?,
            &client_ca,
        )
        .map_err(KmsMockError::Tls)?;
        let store = store::Store::open(&dir.join(STATE_FILE))?;
        let backend = Arc::new(ops::Backend {
            store,
            faults: Arc::new(Faults::default()),
        });
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(4)
            .thread_name("mock-kms")
            .enable_all()
            .build()?;
        let listener = rt.block_on(tokio::net::TcpListener::bind(SocketAddr::new(
            opts.bind, opts.port,
        )))?;
        let addr = listener.local_addr()?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let b = backend.clone();
        let thread = std::thread::Builder::new()
            .name("mock-kms".into())
            .spawn(move || {
                rt.block_on(server::serve(listener, tls, b, rx));
                rt.shutdown_timeout(Duration::from_secs(2));
            })?;
        tracing::info!(%addr, state = %dir.display(), "mock KMS listening");
        Ok(KmsMock {
            addr,
            dir,
            backend,
            ca: ca_used,
            shutdown: Some(tx),
            thread: Some(thread),
            _tmp: tmp,
        })
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `host:port` as ferry's `--kms` / `[tenant.kms] address` wants it.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// State directory.
    pub fn state_dir(&self) -> &Path {
        &self.dir
    }

    /// The state file (private keys in clear: mock only).
    pub fn state_path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// CA certificate the server certificate chains to (ferry's `--kms-ca`).
    pub fn ca_path(&self) -> PathBuf {
        self.dir.join("ca-cert.pem")
    }

    /// A client certificate the mock accepts (ferry's `--kms-cert`).
    pub fn client_cert_path(&self) -> PathBuf {
        self.dir.join("client-cert.pem")
    }

    /// Its private key (ferry's `--kms-client-key`).
    pub fn client_key_path(&self) -> PathBuf {
        self.dir.join("client-key.pem")
    }

    /// The CA that issued the certificates, when this start issued them.
    pub fn ca(&self) -> Option<Arc<crate::pki::Ca>> {
        self.ca.clone()
    }

    /// A ferry client configuration for this mock (server name `localhost`, 10 s
    /// timeout).
    pub fn client_config(&self) -> ferry::kmip::client::KmsConfig {
        let mut c = ferry::kmip::client::KmsConfig::pem(
            self.address(),
            self.ca_path(),
            self.client_cert_path(),
            self.client_key_path(),
        );
        c.server_name = Some("localhost".into());
        c.timeout = Duration::from_secs(10);
        c
    }

    /// Fault injection (shared with the running server).
    pub fn faults(&self) -> Arc<Faults> {
        self.backend.faults.clone()
    }

    /// Counters: connections, full and resumed handshakes, requests, operations.
    pub fn stats(&self) -> KmsStats {
        self.backend.faults.stats()
    }

    /// Every object, oldest first (no key material).
    pub fn objects(&self) -> Vec<ObjectSummary> {
        self.backend.store.summaries()
    }

    /// Answer one raw request in process, as the server would (tests, fuzzing).
    pub fn handle_raw(&self, request: &[u8]) -> Vec<u8> {
        ops::handle(&self.backend, request)
    }

    /// Stop serving (also done on drop). The state file stays.
    pub fn stop(mut self) {
        self.shutdown_now();
    }

    fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for KmsMock {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}
