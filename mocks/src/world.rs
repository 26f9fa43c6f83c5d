//! The whole simulated service-provider world in one process: the mock vCenter
//! on a scenario, the mock ESXi NBD-SSL service, one tenant per key provider
//! (its own mock KMS holding its key pair, and its repository), one ferry agent per proxy VM of the
//! scenario (HotAdd proxies per tenant, an unencrypted shared NBD-SSL proxy), and
//! an orchestrator configured with one backup job per tenant. `ferry-sim demo`,
//! `ferry-sim up` and the end-to-end tests start it.
//!
//! Owns: writing every configuration file the way an operator would (agents'
//! `agent.toml`, the orchestrator's TOML, tokens, PKI), starting the agents on
//! its own runtime with ferry's real job runner, and opening the orchestrator
//! over HTTPS. Must not: reach into ferry's internals — everything goes through
//! the same configs, HTTP API and library calls a deployment uses.

use crate::esxi::{MockEsxi, ServerTls};
use crate::kms::{KmsMock, KmsOptions};
use crate::pki::Ca;
use crate::vcenter::{Scenario, VcenterMock, VcenterOptions};
use ferry::agent::{Agent, RunningAgent};
use ferry::orchestrator::{ConfigInventory, Orchestrator, OrchestratorConfig};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Errors while building the world.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// A file could not be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A component failed to start.
    #[error("{component}: {message}")]
    Start {
        /// Which component.
        component: String,
        /// What happened.
        message: String,
    },
}

fn start_err(component: impl Into<String>, e: impl std::fmt::Display) -> WorldError {
    WorldError::Start {
        component: component.into(),
        message: e.to_string(),
    }
}

fn write(path: &Path, text: &str) -> Result<(), WorldError> {
    if let Some(p) = path.parent() {
        std::fs::create_dir_all(p).map_err(|source| WorldError::Io {
            path: p.to_path_buf(),
            source,
        })?;
    }
    std::fs::write(path, text).map_err(|source| WorldError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// How the world is built.
#[derive(Clone, Debug)]
pub struct WorldOptions {
    /// The vCenter scenario (inventory, key providers, proxies).
    pub scenario: Scenario,
    /// Everything (disks, repositories, configs, state) lives here.
    pub dir: PathBuf,
    /// Slots of each agent.
    pub agent_slots: u32,
    /// Pipeline workers per job (`None`: one per core).
    pub workers: Option<usize>,
    /// How often vCenter tasks and agent jobs are polled.
    pub poll: Duration,
    /// Listen address of the agents (`127.0.0.1:0`: any free port).
    pub agent_listen: String,
    /// The jobs' `lesser_mode` (when a VM may use a lesser mode instead of
    /// waiting for its best proxy): `never` by default.
    pub lesser_mode: String,
    /// Carry every agent's disks through this VDDK library (the mock
    /// `libvixDiskLib.so` of crate `ferry-mock-vddk`) instead of ferry's native
    /// paths: each agent gets its own copy as `<agent>/vddk/lib64/libvixDiskLib.so.8`
    /// (one library per proxy VM, as on real proxies) and a VDDK config file naming
    /// its proxy VM and a call log (`<agent>/vddk/calls.jsonl`).
    pub vddk_library: Option<PathBuf>,
    /// Extra TOML appended to every generated `[[job]]` (keys such as
    /// `quiesce = "prefer"`, then sub-tables such as `[[job.quiesce_override]]`).
    pub job_extra: String,
    /// Key-loss protection for every tenant: the provider's recovery public key
    /// (PEM) written as `recovery_public_key` into each agent's `[[tenant]]`.
    pub recovery_public_key: Option<PathBuf>,
}

impl WorldOptions {
    /// Defaults for `scenario` in `dir`.
    pub fn new(scenario: Scenario, dir: &Path) -> WorldOptions {
        WorldOptions {
            scenario,
            dir: dir.to_path_buf(),
            agent_slots: 4,
            workers: None,
            poll: Duration::from_millis(100),
            agent_listen: "127.0.0.1:0".into(),
            lesser_mode: "never".into(),
            vddk_library: None,
            job_extra: String::new(),
            recovery_public_key: None,
        }
    }
}

/// One tenant: a key provider of the scenario, its own mock KMS holding its key
/// pair, and its repository.
#[derive(Clone, Debug)]
pub struct SimTenant {
    /// Tenant name (`tenant-a` for key provider `KMS-A`).
    pub name: String,
    /// Its vSphere key provider.
    pub key_provider: String,
    /// Repository directory (shared by the agents serving the tenant).
    pub repository: PathBuf,
    /// The tenant's section of an agent config (repository, `[tenant.kms]` with
    /// the agents' client certificate for the tenant's KMS).
    pub section: ferry::config::TenantSection,
    /// The scenario's VMs encrypted under this provider.
    pub vms: Vec<String>,
}

impl SimTenant {
    /// The tenant's key source (its KMS key, following rotations), as an agent
    /// opens it at job start.
    pub fn key_source(&self) -> Result<Box<dyn ferry::keys::KeySource>, ferry::keys::KeyError> {
        ferry::keys::tenant::open_key_source(&self.section)
    }
}

/// One running agent.
pub struct SimAgent {
    /// Agent id (= the proxy VM's name).
    pub id: String,
    /// The proxy VM's key provider in the scenario.
    pub key_provider: Option<String>,
    /// Modes it offers.
    pub modes: Vec<String>,
    /// Tenants it serves.
    pub tenants: Vec<String>,
    /// Base URL.
    pub url: String,
    /// Its configuration file.
    pub config: PathBuf,
    /// The mock VDDK's call log of this agent, when disks go through VDDK.
    pub vddk_calls: Option<PathBuf>,
    running: Option<RunningAgent>,
}

/// The running world.
pub struct World {
    /// Root directory.
    pub dir: PathBuf,
    /// The mock vCenter.
    pub vcenter: VcenterMock,
    /// The mock ESXi NBD-SSL service.
    pub esxi: MockEsxi,
    /// Each tenant's mock KMS, in the order of `tenants`.
    pub kms: Vec<KmsMock>,
    /// Tenants.
    pub tenants: Vec<SimTenant>,
    /// Agents.
    pub agents: Vec<SimAgent>,
    /// The orchestrator's configuration file.
    pub orchestrator_config: PathBuf,
    /// CA of every TLS endpoint of the world (agents, ESXi, vCenter).
    pub ca: PathBuf,
    /// The agents' bearer token file.
    pub token_file: PathBuf,
    rt: tokio::runtime::Runtime,
}

/// Tenant name for a key provider id: `KMS-A` → `tenant-a`.
pub fn tenant_name(provider: &str) -> String {
    let p = provider.to_ascii_lowercase();
    let tail = p.strip_prefix("kms-").unwrap_or(&p);
    let safe: String = tail
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    format!("tenant-{safe}")
}

impl World {
    /// Build and start everything; returns when every agent serves.
    pub fn start(opts: WorldOptions) -> Result<World, WorldError> {
        let dir = opts.dir.clone();
        std::fs::create_dir_all(&dir).map_err(|source| WorldError::Io {
            path: dir.clone(),
            source,
        })?;
        let dir = dir.canonicalize().map_err(|source| WorldError::Io {
            path: dir.clone(),
            source,
        })?;
        // One CA for every endpoint, so each client trusts one file.
        let ca = Arc::new(Ca::new("ferry-sim CA").map_err(|e| start_err("PKI", e))?);
        let pki = dir.join("pki");
        ca.write_layout(&pki, &["localhost", "127.0.0.1"], "ferry-orchestrator")
            .map_err(|e| start_err("PKI", e))?;
        let ca_path = pki.join("ca-cert.pem");

        let mut vopts = VcenterOptions::new(opts.scenario.clone());
        vopts.state_dir = Some(dir.join("vcenter"));
        vopts.ca = Some(ca.clone());
        let vcenter = VcenterMock::start(vopts).map_err(|e| start_err("mock vCenter", e))?;
        let tls = ServerTls::from_dir(&pki, false).map_err(|e| start_err("mock ESXi TLS", e))?;
        let esxi = MockEsxi::start(vcenter.export_provider(), &tls)
            .map_err(|e| start_err("mock ESXi", e))?;

        let vc_password = dir.join("secrets/vcenter.password");
        write(&vc_password, &format!("{}\n", vcenter.password()))?;
        let token = {
            let mut b = [0u8; 24];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut b);
            b.iter().map(|x| format!("{x:02x}")).collect::<String>()
        };
        let token_file = dir.join("secrets/agent.token");
        write(&token_file, &format!("{token}\n"))?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600));
            let _ = std::fs::set_permissions(&vc_password, std::fs::Permissions::from_mode(0o600));
        }

        // Tenants: one per key provider, each with its own KMS (own PKI, as a
        // tenant brings it), key pair and repository.
        let mut tenants = Vec::new();
        let mut kmses = Vec::new();
        for kp in &opts.scenario.key_providers {
            let name = tenant_name(&kp.id);
            let kms = KmsMock::start(KmsOptions {
                state_dir: Some(dir.join("kms").join(&name)),
                ..Default::default()
            })
            .map_err(|e| start_err(format!("mock KMS of {name}"), e))?;
            let repository = dir.join("repos").join(&name);
            let section = ferry::config::TenantSection {
                name: name.clone(),
                repository: repository.clone(),
                key_provider: Some(kp.id.clone()),
                kms: Some(ferry::config::KmsSection {
                    address: kms.address(),
                    server_name: None,
                    ca: kms.ca_path(),
                    client_cert: Some(kms.client_cert_path()),
                    client_key: Some(kms.client_key_path()),
                    pkcs12: None,
                    pkcs12_password_file: None,
                    key_name: format!("ferry/{name}/repo1"),
                    create_key: true,
                    key_bits: 2048,
                    timeout_secs: 30,
                }),
                pem: None,
                recovery_public_key: opts.recovery_public_key.clone(),
                compression: None,
                // Restores through the agents' API land under the world's
                // `restores` directory.
                restore_dirs: vec![dir.join("restores")],
            };
            // The key pair on the tenant's KMS and the repository bound to it,
            // created up front as `ferry repo init --kms ... --kms-create` would.
            if ferry::repo::Repository::open(&repository).is_err() {
                let keys = ferry::keys::tenant::open_key_source(&section)
                    .map_err(|e| start_err(format!("key of {name}"), e))?;
                ferry::repo::Repository::init(
                    &repository,
                    ferry::repo::format::DEFAULT_CHUNK_SIZE,
                    &name,
                    keys.as_ref(),
                )
                .map_err(|e| start_err(format!("repository of {name}"), e))?;
            }
            tenants.push(SimTenant {
                repository,
                section,
                vms: opts
                    .scenario
                    .vms
                    .iter()
                    .filter(|v| v.key_provider.as_deref() == Some(kp.id.as_str()))
                    .map(|v| v.name.clone())
                    .collect(),
                key_provider: kp.id.clone(),
                name,
            });
            kmses.push(kms);
        }

        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("ferry-sim")
            .enable_all()
            .build()
            .map_err(|e| start_err("runtime", e))?;

        // Agents: one per proxy VM. An encrypted proxy serves the tenant of its own
        // key provider (HotAdd, NBD-SSL as fallback); an unencrypted one serves
        // every tenant over NBD-SSL.
        let mut agents = Vec::new();
        for p in &opts.scenario.proxies {
            let (modes, served): (Vec<&str>, Vec<&SimTenant>) = match &p.key_provider {
                Some(kp) => (
                    vec!["hotadd", "nbdssl"],
                    tenants.iter().filter(|t| &t.key_provider == kp).collect(),
                ),
                None => (vec!["nbdssl"], tenants.iter().collect()),
            };
            let adir = dir.join("agents").join(&p.name);
            let mut t = format!(
                "# ferry agent on proxy VM {name} (written by ferry-sim)\n\
                 [agent]\nid = {name:?}\nlisten = {listen:?}\n\
                 tls_cert = {cert:?}\ntls_key = {key:?}\ntoken_file = {token:?}\n\
                 state_dir = \"state\"\nslots = {slots}\nmodes = [{modes}]\n",
                name = p.name,
                listen = opts.agent_listen,
                cert = pki.join("server-cert.pem"),
                key = pki.join("server-key.pem"),
                token = token_file,
                slots = opts.agent_slots,
                modes = modes
                    .iter()
                    .map(|m| format!("{m:?}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
            if let Some(d) = vcenter.device_dir(&p.name) {
                t.push_str(&format!("hotadd_device_dir = {d:?}\n"));
            }
            t.push_str(&format!(
                "\n[vcenter]\nurl = {url:?}\nuser = {user:?}\npassword_file = {pw:?}\n\
                 ca = {ca:?}\nproxy_vm = {name:?}\n\
                 \n[nbd]\ntls_certificates = {pki:?}\nport = {port}\nconnections = 2\n\
                 \n[policy]\nfailover_to_network = true\nallow_cleartext_nbd = false\n\
                 \n[pipeline]\nmemory_mib = 64\n",
                url = vcenter.url(),
                user = vcenter.user(),
                pw = vc_password,
                ca = vcenter.ca_path(),
                name = p.name,
                pki = pki,
                port = esxi.port(),
            ));
            if let Some(w) = opts.workers {
                t.push_str(&format!("workers = {w}\n"));
            }
            let vddk_calls = match &opts.vddk_library {
                Some(lib) => {
                    let vdir = adir.join("vddk");
                    std::fs::create_dir_all(vdir.join("lib64"))
                        .map_err(|e| start_err("VDDK directory", e))?;
                    std::fs::copy(lib, vdir.join("lib64/libvixDiskLib.so.8")).map_err(|e| {
                        start_err(
                            format!(
                                "{} (build it with cargo build -p ferry-mock-vddk)",
                                lib.display()
                            ),
                            e,
                        )
                    })?;
                    let calls = vdir.join("calls.jsonl");
                    let moref = vcenter
                        .admin()
                        .state()
                        .vm(&p.name)
                        .map(|v| v.moref.clone())
                        .ok_or_else(|| {
                            start_err(format!("proxy VM {}", p.name), "not in vCenter")
                        })?;
                    write(
                        &vdir.join("vixDiskLib.config"),
                        &format!(
                            "# VDDK configuration of proxy {name} (written by ferry-sim)\n\
                             tmpDirectory = {tmp:?}\nmock.proxyVmMoref = {moref:?}\nmock.callLog = {calls:?}\n",
                            name = p.name,
                            tmp = vdir,
                        ),
                    )?;
                    t.push_str(&format!(
                        "\n[vddk]\nlibdir = {vdir:?}\nconfig_file = {cfgf:?}\n",
                        cfgf = vdir.join("vixDiskLib.config")
                    ));
                    Some(calls)
                }
                None => None,
            };
            for ten in &served {
                let k = ten.section.kms.as_ref().expect("sim tenants use a KMS");
                t.push_str(&format!(
                    "\n[[tenant]]\nname = {name:?}\nrepository = {repo:?}\nkey_provider = {kp:?}\n\
                     restore_dirs = [{restore_dirs}]\n{recovery}\
                     [tenant.kms]\naddress = {addr:?}\nca = {ca:?}\nclient_cert = {cert:?}\n\
                     client_key = {key:?}\nkey_name = {key_name:?}\n",
                    name = ten.name,
                    repo = ten.repository,
                    kp = ten.key_provider,
                    restore_dirs = ten
                        .section
                        .restore_dirs
                        .iter()
                        .map(|d| format!("{d:?}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    recovery = match &opts.recovery_public_key {
                        Some(p) => format!("recovery_public_key = {p:?}\n"),
                        None => String::new(),
                    },
                    addr = k.address,
                    ca = k.ca,
                    cert = k.client_cert.as_ref().expect("PEM client certificate"),
                    key = k.client_key.as_ref().expect("PEM client key"),
                    key_name = k.key_name,
                ));
            }
            let cfg_path = adir.join("agent.toml");
            write(&cfg_path, &t)?;
            let cfg = ferry::config::Config::load(&cfg_path)
                .map_err(|e| start_err(format!("agent {}", p.name), e))?;
            let runner = ferry::job::runner::VmJobRunner::from_config(&cfg)
                .map_err(|e| start_err(format!("agent {}", p.name), e))?
                .with_task_poll(opts.poll);
            let agent =
                Agent::from_config(&cfg).map_err(|e| start_err(format!("agent {}", p.name), e))?;
            let running = rt
                .block_on(agent.start(Arc::new(runner)))
                .map_err(|e| start_err(format!("agent {}", p.name), e))?;
            agents.push(SimAgent {
                id: p.name.clone(),
                key_provider: p.key_provider.clone(),
                modes: modes.iter().map(|m| m.to_string()).collect(),
                tenants: served.iter().map(|t| t.name.clone()).collect(),
                url: running.url(),
                config: cfg_path,
                vddk_calls,
                running: Some(running),
            });
        }

        // The orchestrator: the vCenter, every tenant with the agents that serve
        // it, one job per tenant selecting its VMs.
        let odir = dir.join("orchestrator");
        let mut t = format!(
            "# ferry orchestrator of the simulated provider (written by ferry-sim)\n\
             [orchestrator]\nstate_dir = \"state\"\npoll_interval = \"{poll}ms\"\n\
             schedule_tick = \"1s\"\nrequest_timeout = \"30s\"\n\
             \n[key_sync]\nenabled = true\nevery = \"24h\"\n\
             \n[[vcenter]]\nname = \"vc-sim\"\nurl = {url:?}\nuser = {user:?}\n\
             password_file = {pw:?}\nca = {ca:?}\n",
            poll = opts.poll.as_millis().max(1),
            url = vcenter.url(),
            user = vcenter.user(),
            pw = vc_password,
            ca = vcenter.ca_path(),
        );
        for ten in &tenants {
            let ids: Vec<String> = agents
                .iter()
                .filter(|a| a.tenants.contains(&ten.name))
                .map(|a| format!("{:?}", a.id))
                .collect();
            t.push_str(&format!(
                "\n[[tenant]]\nname = {:?}\nkey_provider = {:?}\nagents = [{}]\n",
                ten.name,
                ten.key_provider,
                ids.join(", ")
            ));
        }
        for a in &agents {
            t.push_str(&format!(
                "\n[[agent]]\nid = {:?}\nurl = {:?}\ntoken_file = {:?}\nca = {:?}\n",
                a.id, a.url, token_file, ca_path
            ));
        }
        for ten in &tenants {
            if ten.vms.is_empty() {
                continue;
            }
            let vms: Vec<String> = ten.vms.iter().map(|v| format!("{v:?}")).collect();
            t.push_str(&format!(
                "\n[[job]]\nname = \"{name}-backup\"\ntenant = {name:?}\nvcenter = \"vc-sim\"\n\
                 folders = [\"/{dc}/vm\"]\nvms = [{vms}]\nretention = {{ keep_last = 7 }}\n\
                 policy = {{ failover_to_network = true, allow_cleartext_nbd = false }}\n\
                 lesser_mode = {lesser:?}\n{extra}",
                extra = opts.job_extra,
                name = ten.name,
                lesser = opts.lesser_mode,
                dc = opts.scenario.datacenter.name,
                vms = vms.join(", ")
            ));
        }
        let orchestrator_config = odir.join("orchestrator.toml");
        write(&orchestrator_config, &t)?;

        Ok(World {
            dir,
            vcenter,
            esxi,
            kms: kmses,
            tenants,
            agents,
            orchestrator_config,
            ca: ca_path,
            token_file,
            rt,
        })
    }

    /// The world's runtime (agents run on it; use it to drive the orchestrator).
    pub fn runtime(&self) -> &tokio::runtime::Runtime {
        &self.rt
    }

    /// The agents' bearer token.
    pub fn token(&self) -> String {
        std::fs::read_to_string(&self.token_file)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    }

    /// Open the orchestrator (takes its state lock; one at a time).
    pub fn orchestrator(&self) -> Result<Arc<Orchestrator>, WorldError> {
        let cfg = OrchestratorConfig::load(&self.orchestrator_config)
            .map_err(|e| start_err("orchestrator", e))?;
        let inv = Arc::new(ConfigInventory {
            vsphere: Some(Arc::new(
                ferry::orchestrator::vcenter::VsphereInventory::new(),
            )),
        });
        let (o, _) = self
            .rt
            .block_on(Orchestrator::open(cfg, inv))
            .map_err(|e| start_err("orchestrator", e))?;
        Ok(Arc::new(o))
    }

    /// An HTTPS client of agent `id` (token and CA of the world).
    pub fn agent_client(
        &self,
        id: &str,
    ) -> Result<ferry::orchestrator::client::HttpAgent, WorldError> {
        let a = self
            .agents
            .iter()
            .find(|a| a.id == id)
            .ok_or_else(|| start_err("agent", format!("no agent {id}")))?;
        let cfg = ferry::orchestrator::config::AgentConfig {
            id: a.id.clone(),
            url: a.url.clone(),
            token_file: self.token_file.clone(),
            ca: Some(self.ca.clone()),
            client_cert: None,
            client_key: None,
            insecure_http: false,
        };
        ferry::orchestrator::client::HttpAgent::new(&cfg, Duration::from_secs(30))
            .map_err(|e| start_err(format!("agent {id}"), e))
    }

    /// The tenant named `name`.
    pub fn tenant(&self, name: &str) -> Option<&SimTenant> {
        self.tenants.iter().find(|t| t.name == name)
    }

    /// Stop agent `id` gracefully (to run it as a process from its config file
    /// instead, say). False when no such agent runs here.
    pub fn stop_agent(&mut self, id: &str) -> bool {
        let Some(a) = self.agents.iter_mut().find(|a| a.id == id) else {
            return false;
        };
        match a.running.take() {
            Some(r) => {
                if let Err(e) = self.rt.block_on(r.shutdown()) {
                    tracing::warn!(agent = %id, error = %e, "agent shutdown");
                }
                true
            }
            None => false,
        }
    }

    /// VM `name` as the selector sees it, read from the mock vCenter with ferry's
    /// SOAP client (what the orchestrator sends in a backup request).
    pub fn vm_info(&self, name: &str) -> Result<ferry::transport::select::VmInfo, WorldError> {
        let cfg = ferry::vsphere::ClientConfig::new(
            &self.vcenter.url(),
            self.vcenter.user(),
            zeroize::Zeroizing::new(self.vcenter.password().to_string()),
            ferry::vsphere::ServerTrust::Ca(self.vcenter.ca_path().to_path_buf()),
        );
        self.rt.block_on(async {
            let c = ferry::vsphere::Client::connect(cfg)
                .await
                .map_err(|e| start_err("vCenter client", e))?;
            let vm = c.vm_by_name(name).await;
            c.logout().await;
            Ok(ferry::job::vm::vm_info(
                &vm.map_err(|e| start_err("vCenter client", e))?,
            ))
        })
    }

    /// Stop every agent gracefully (running jobs cancelled and cleaned up).
    pub fn stop_agents(&mut self) {
        for a in &mut self.agents {
            if let Some(r) = a.running.take() {
                if let Err(e) = self.rt.block_on(r.shutdown()) {
                    tracing::warn!(agent = %a.id, error = %e, "agent shutdown");
                }
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.stop_agents();
    }
}
