//! The mock vCenter: a vim25 SOAP server over HTTPS that models what the seeds
//! describe (VMs encrypted under different key providers, proxy VMs encrypted under
//! one, hot-add refused across providers), with real snapshot/delta/consolidation
//! semantics on sparse files, changed block tracking, NBD tickets for the mock ESXi
//! host and a test admin API. See `docs/mocks.md`.
//!
//! Files, one job each:
//! - [`scenario`]: the TOML world description.
//! - [`inventory`]: the model and vSphere's rules.
//! - [`disk`] (+ [`extents`]): layer chains, snapshots, consolidation, CBT.
//! - [`codec`]: SOAP parsing and vim25 XML writing; [`vim`]: vim25 shapes and faults.
//! - [`handlers`], [`propcoll`], [`updates`], [`session`], [`tasks`]: the SOAP methods.
//! - [`tickets`]: NBD tickets and the [`ferry::nbd_server::ExportProvider`].
//! - [`admin`]: admin endpoints and the in-process [`Admin`] handle; [`faults`]:
//!   fault injection.
//! - [`server`]: HTTPS; [`world`]: shared state and operations.
//! - [`vddk`]: what ESXi/vCenter do for the mock VDDK (`/mockvddk/`, audit log).
//! - [`guest`]: VMware Tools and quiescing in the guests, the snapshot audit.
//!
//! Start one in-process with [`VcenterMock::start`].

pub mod admin;
pub mod codec;
pub mod disk;
pub mod extents;
pub mod faults;
pub mod guest;
pub mod handlers;
pub mod ids;
pub mod inventory;
pub mod propcoll;
pub mod scenario;
pub mod server;
pub mod session;
pub mod tasks;
pub mod tickets;
pub mod updates;
pub mod vddk;
pub mod vim;
pub mod world;

pub use admin::Admin;
pub use faults::{DropConnections, FailTasks, Latency};
pub use scenario::Scenario;
pub use vddk::{AuditEntry, VddkFault};
pub use world::{AdminError, StateDump, MUTATING_METHODS};

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why the mock could not start.
#[derive(Debug, thiserror::Error)]
pub enum VcenterError {
    /// The scenario is invalid.
    #[error(transparent)]
    Scenario(#[from] scenario::ScenarioError),
    /// Building the inventory (directories, disk files) failed.
    #[error("building the mock vCenter inventory: {0}")]
    Build(#[from] inventory::BuildError),
    /// Certificates.
    #[error("mock vCenter TLS: {0}")]
    Tls(String),
    /// Binding or starting the server.
    #[error("mock vCenter: {0}")]
    Io(#[from] std::io::Error),
}

/// How to start a mock vCenter.
#[derive(Clone)]
pub struct VcenterOptions {
    /// The world.
    pub scenario: Scenario,
    /// State directory (datastores, device directories, `ca-cert.pem`). `None`: a
    /// temporary directory removed when the mock stops.
    pub state_dir: Option<PathBuf>,
    /// Address to listen on (default 127.0.0.1).
    pub bind: IpAddr,
    /// Port (0: any free port).
    pub port: u16,
    /// Admin token (default: random).
    pub admin_token: Option<String>,
    /// CA that signs the server certificate (default: a new one). Share one CA with
    /// the other mocks so clients trust a single file.
    pub ca: Option<Arc<crate::pki::Ca>>,
    /// Names in the server certificate (default `localhost`, `127.0.0.1`).
    pub server_names: Vec<String>,
    /// Sessions expire after this long without calls (default 30 minutes).
    pub session_idle: Duration,
    /// NBD tickets expire after this long unused (default 30 minutes).
    pub ticket_ttl: Duration,
    /// Most areas per QueryChangedDiskAreas answer (default 1024).
    pub qcda_max_areas: usize,
    /// How long RemoveSnapshot waits for NBD readers to close (default 5 s).
    pub remove_wait: Duration,
    /// SHA-1 thumbprint of the ESXi NBD certificate returned with tickets.
    pub nbd_thumbprint: Option<String>,
}

impl VcenterOptions {
    /// Defaults for `scenario`.
    pub fn new(scenario: Scenario) -> VcenterOptions {
        VcenterOptions {
            scenario,
            state_dir: None,
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 0,
            admin_token: None,
            ca: None,
            server_names: vec!["localhost".into(), "127.0.0.1".into()],
            session_idle: Duration::from_secs(30 * 60),
            ticket_ttl: tickets::TICKET_TTL,
            qcda_max_areas: 1024,
            remove_wait: Duration::from_secs(5),
            nbd_thumbprint: None,
        }
    }

    /// Defaults for the scenario file at `path`.
    pub fn from_file(path: &Path) -> Result<VcenterOptions, VcenterError> {
        Ok(Self::new(Scenario::load(path)?))
    }
}

/// SHA-1 thumbprint (`AA:BB:...`, as vSphere prints them) of the first certificate
/// in `pem`.
pub fn sha1_thumbprint(pem: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use sha1::Digest;
    let der = rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()?
        .ok()?;
    let d = sha1::Sha1::digest(der.as_ref());
    Some(
        d.iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// A running mock vCenter (stops when dropped).
pub struct VcenterMock {
    world: Arc<world::World>,
    addr: SocketAddr,
    admin_token: String,
    ca_pem: String,
    ca_path: PathBuf,
    thumbprint: String,
    state_dir: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl VcenterMock {
    /// Build the scenario's world (generating disk contents) and serve it over HTTPS
    /// on a dedicated runtime thread. Works from sync and async code alike.
    pub fn start(opts: VcenterOptions) -> Result<VcenterMock, VcenterError> {
        let (tmp, state_dir) = match &opts.state_dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (None, d.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("ferry-vcenter-")
                    .tempdir()?;
                let p = t.path().to_path_buf();
                (Some(t), p)
            }
        };
        let inv = inventory::Inventory::build(&opts.scenario, &state_dir)?;
        let ca = match &opts.ca {
            Some(c) => c.clone(),
            None => Arc::new(
                crate::pki::Ca::new("ferry mock vCenter CA")
                    .map_err(|e| VcenterError::Tls(e.to_string()))?,
            ),
        };
        let names: Vec<&str> = opts.server_names.iter().map(String::as_str).collect();
        let issued = ca
            .server(&names)
            .map_err(|e| VcenterError::Tls(e.to_string()))?;
        let ca_pem = ca.cert_pem();
        let thumbprint = sha1_thumbprint(&issued.cert_pem).unwrap_or_default();
        let ca_path = state_dir.join("ca-cert.pem");
        crate::pki::write(&state_dir, "ca-cert.pem", &ca_pem, false)
            .map_err(|e| VcenterError::Tls(e.to_string()))?;
        let tls =
            server::tls_config(&issued.cert_pem, &issued.key_pem).map_err(VcenterError::Tls)?;
        let cfg = world::WorldConfig {
            user: opts.scenario.auth.user.clone(),
            password: opts.scenario.auth.password.clone(),
            qcda_max_areas: opts.qcda_max_areas.max(1),
            remove_wait: opts.remove_wait,
        };
        let world = Arc::new(world::World::new(
            inv,
            cfg,
            opts.session_idle,
            opts.ticket_ttl,
            state_dir.clone(),
        ));
        *world::lock(&world.nbd_thumbprint) = opts.nbd_thumbprint.clone();
        let admin_token = opts.admin_token.clone().unwrap_or_else(|| ids::token(16));

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("mock-vcenter")
            .enable_all()
            .build()?;
        let listener = rt.block_on(server::TlsListener::bind(
            SocketAddr::new(opts.bind, opts.port),
            tls,
        ))?;
        let addr = axum::serve::Listener::local_addr(&listener)?.peer;
        let state = server::AppState {
            world: world.clone(),
            admin_token: Arc::new(admin_token.clone()),
            rt: rt.handle().clone(),
        };
        let app = server::router(state);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mock-vcenter".into())
            .spawn(move || {
                rt.block_on(async move {
                    let serve = axum::serve(
                        listener,
                        app.into_make_service_with_connect_info::<server::ConnInfo>(),
                    );
                    tokio::select! {
                        r = serve => if let Err(e) = r { tracing::error!("mock vCenter server: {e}") },
                        _ = rx => {}
                    }
                });
                rt.shutdown_timeout(Duration::from_secs(2));
            })?;
        tracing::info!(%addr, scenario = %opts.scenario.name, "mock vCenter listening");
        Ok(VcenterMock {
            world,
            addr,
            admin_token,
            ca_pem,
            ca_path,
            thumbprint,
            state_dir,
            shutdown: Some(tx),
            thread: Some(thread),
            _tmp: tmp,
        })
    }

    /// The SDK URL (`https://127.0.0.1:<port>/sdk`), ferry's `[vcenter] url`.
    pub fn url(&self) -> String {
        format!("https://{}/sdk", self.addr)
    }

    /// Listening address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Login user.
    pub fn user(&self) -> &str {
        &self.world.cfg.user
    }

    /// Login password.
    pub fn password(&self) -> &str {
        &self.world.cfg.password
    }

    /// Admin bearer token.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// CA certificate (PEM) the server certificate chains to.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Path of the CA certificate file (ferry's `[vcenter] ca`).
    pub fn ca_path(&self) -> &Path {
        &self.ca_path
    }

    /// SHA-1 thumbprint of the server's own (leaf) certificate, `AA:BB:...`: what a
    /// VDDK client puts in `VixDiskLibConnectParams.thumbPrint`.
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    /// State directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Hot-add device directory of proxy VM `name` (ferry's `hotadd_device_dir`).
    pub fn device_dir(&self, name: &str) -> Option<PathBuf> {
        let inv = world::lock(&self.world.inv);
        inv.vm_by_name(name)
            .and_then(|i| inv.vms[i].device_dir.clone())
    }

    /// The in-process admin handle.
    pub fn admin(&self) -> Admin {
        Admin::new(self.world.clone())
    }

    /// Resolves NBD tickets to snapshot disks, for the mock ESXi NBD server.
    pub fn export_provider(&self) -> Arc<dyn ferry::nbd_server::ExportProvider> {
        Arc::new(tickets::TicketProvider::new(self.world.clone()))
    }

    /// Stop serving (also done on drop).
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

impl Drop for VcenterMock {
    fn drop(&mut self) {
        self.shutdown_now();
    }
}
