//! Test support for the agent and orchestrator tests: a scripted [`JobRunner`]
//! that behaves like vSphere where it matters (a hot-add across key providers is
//! a crypto fault, clear-text NBD of an encrypted disk is refused), can hold jobs
//! until released, and records what the agent asked of it; plus an in-process
//! agent fixture with a test PKI, a token and an HTTPS client.
//!
//! Not a job implementation: it moves no data. Tests only.
#![allow(dead_code)]

use ferry::agent::DiskResult;
use ferry::agent::{
    Agent, InterruptedJob, JobContext, JobRunner, JobSpec, KeyStatus, KeySyncOutcome, RunError,
    RunOutput, RunningAgent, SweepReport,
};
use ferry::config::{Config, TenantSection};
use ferry::transport::select::{Mode, Outcome};
use reqwest::StatusCode;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// One call of [`JobRunner::run`].
#[derive(Debug, Clone)]
pub struct RunCall {
    pub job_id: String,
    pub proxy: String,
    pub proxy_key_provider: Option<String>,
    pub spec: JobSpec,
}

/// Holds jobs until opened.
#[derive(Default)]
pub struct Gate {
    open: Mutex<bool>,
    cv: Condvar,
}

impl Gate {
    pub fn set(&self, open: bool) {
        *self.open.lock().unwrap() = open;
        self.cv.notify_all();
    }
    /// Wait until open or `cancelled()` says stop; true when opened.
    fn wait(&self, cancelled: impl Fn() -> bool) -> bool {
        let mut g = self.open.lock().unwrap();
        loop {
            if *g {
                return true;
            }
            if cancelled() {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }
}

/// The scripted runner.
pub struct TestRunner {
    pub gate: Gate,
    pub bytes_per_disk: u64,
    pub runs: Mutex<Vec<RunCall>>,
    pub sweeps: Mutex<Vec<Vec<InterruptedJob>>>,
    pub key_versions: Mutex<BTreeMap<String, u64>>,
    /// VM names whose backup fails with a vSphere error.
    pub fail_vms: Mutex<Vec<String>>,
}

impl TestRunner {
    /// Jobs finish at once.
    pub fn new() -> Arc<TestRunner> {
        let r = TestRunner {
            gate: Gate::default(),
            bytes_per_disk: 8 << 20,
            runs: Mutex::default(),
            sweeps: Mutex::default(),
            key_versions: Mutex::default(),
            fail_vms: Mutex::default(),
        };
        r.gate.set(true);
        Arc::new(r)
    }
    /// Jobs run until `gate.set(true)` or cancellation.
    pub fn gated() -> Arc<TestRunner> {
        let r = TestRunner::new();
        r.gate.set(false);
        r
    }
    pub fn runs(&self) -> Vec<RunCall> {
        self.runs.lock().unwrap().clone()
    }
}

impl JobRunner for TestRunner {
    fn run(&self, ctx: &JobContext, spec: &JobSpec) -> Result<RunOutput, RunError> {
        self.runs.lock().unwrap().push(RunCall {
            job_id: ctx.job_id.clone(),
            proxy: ctx.proxy.id.clone(),
            proxy_key_provider: ctx.proxy.key_provider.clone(),
            spec: spec.clone(),
        });
        let mut disks = Vec::new();
        match spec {
            JobSpec::Backup(b) => {
                if self.fail_vms.lock().unwrap().contains(&b.vm.name) {
                    return Err(RunError::Vsphere(format!(
                        "CreateSnapshot_Task on {} failed: injected fault",
                        b.vm.moref
                    )));
                }
                for d in &b.selection.disks {
                    let Outcome::Assigned { proxy, mode } = &d.outcome else {
                        return Err(RunError::Refused(format!("disk {} unassigned", d.disk_key)));
                    };
                    // What vSphere would do.
                    if *mode == Mode::HotAdd
                        && d.encrypted
                        && d.key_provider != ctx.proxy.key_provider
                    {
                        return Err(RunError::Vsphere(format!(
                            "ReconfigVM_Task: crypto fault: disk {} is encrypted under {:?}, proxy VM {} under {:?}",
                            d.disk_key, d.key_provider, ctx.proxy.id, ctx.proxy.key_provider
                        )));
                    }
                    if *mode == Mode::Nbd && d.encrypted {
                        return Err(RunError::Transport(format!(
                            "refusing clear-text NBD for encrypted disk {}",
                            d.disk_key
                        )));
                    }
                    let reason = d
                        .candidates
                        .iter()
                        .find(|c| c.accepted)
                        .map(|c| c.reason.to_string())
                        .unwrap_or_default();
                    disks.push(DiskResult {
                        disk_key: d.disk_key,
                        label: d.label.clone(),
                        proxy: proxy.clone(),
                        mode: Some(*mode),
                        reason,
                        bytes: self.bytes_per_disk,
                        seconds: 0.5,
                        error: None,
                        read: None,
                        read_reason: None,
                    });
                }
            }
            JobSpec::Restore(r) => {
                for n in r.disks.clone().unwrap_or_else(|| vec![0]) {
                    disks.push(DiskResult {
                        disk_key: n as i32,
                        label: format!("disk {n}"),
                        proxy: ctx.proxy.id.clone(),
                        mode: None,
                        reason: "restore to a directory".into(),
                        bytes: self.bytes_per_disk,
                        seconds: 0.5,
                        error: None,
                        read: None,
                        read_reason: None,
                    });
                }
            }
            JobSpec::Verify(_) => {}
        }
        let total = self.bytes_per_disk * disks.len() as u64;
        ctx.progress.total.store(total, Ordering::Relaxed);
        ctx.progress.done.store(total / 2, Ordering::Relaxed);
        if !self.gate.wait(|| ctx.is_cancelled()) {
            return Err(RunError::Cancelled);
        }
        ctx.progress.done.store(total, Ordering::Relaxed);
        Ok(RunOutput {
            disks,
            point_id: Some(format!("point-{}", ctx.job_id)),
            notes: vec!["test runner: no data moved".into()],
        })
    }

    fn sweep_orphans(&self, interrupted: &[InterruptedJob]) -> Result<SweepReport, RunError> {
        self.sweeps.lock().unwrap().push(interrupted.to_vec());
        Ok(SweepReport {
            jobs: interrupted
                .iter()
                .map(|j| (j.id.clone(), format!("removed snapshot ferry-{}", j.id)))
                .collect(),
            other: vec![],
        })
    }

    fn sync_keys(&self, tenants: &[TenantSection]) -> Vec<KeySyncOutcome> {
        let versions = self.key_versions.lock().unwrap();
        tenants
            .iter()
            .map(|t| {
                let v = versions.get(&t.name).copied().unwrap_or(1);
                if v == 0 {
                    return Err(RunError::Key(format!("KMS of {} is down", t.name)));
                }
                Ok(KeyStatus {
                    tenant: t.name.clone(),
                    kms: t
                        .kms
                        .as_ref()
                        .map(|k| k.address.clone())
                        .unwrap_or_else(|| "pem".into()),
                    key_name: t
                        .kms
                        .as_ref()
                        .map(|k| k.key_name.clone())
                        .unwrap_or_else(|| "pem".into()),
                    key_id: format!("{}-key-v{v}", t.name),
                    version: v,
                })
            })
            .collect()
    }
}

/// How to configure a test agent.
#[derive(Clone)]
pub struct AgentOpts {
    pub id: String,
    pub slots: u32,
    pub modes: Vec<&'static str>,
    /// The proxy VM's key provider.
    pub key_provider: Option<String>,
    pub datastores: Vec<String>,
    /// (tenant name, tenant key provider).
    pub tenants: Vec<(String, Option<String>)>,
    pub failover: bool,
    pub tls: bool,
    pub mtls: bool,
    pub shutdown_grace_secs: u64,
    /// Give each tenant `restore_dirs = ["restores/<tenant>"]` (relative to the
    /// agent's directory), where restores to a directory or files may go.
    pub restore_dirs: bool,
}

impl Default for AgentOpts {
    fn default() -> Self {
        AgentOpts {
            id: "proxy-a".into(),
            slots: 4,
            modes: vec!["hotadd", "nbdssl"],
            key_provider: Some("KMS-A".into()),
            datastores: vec!["ds-a".into()],
            tenants: vec![("tenant-a".into(), Some("KMS-A".into()))],
            failover: true,
            tls: true,
            mtls: false,
            shutdown_grace_secs: 10,
            restore_dirs: true,
        }
    }
}

/// Files of a test PKI (one CA per fixture).
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        ferry_mocks::fixtures::tls_certs(dir).unwrap();
        Pki {
            ca: dir.join("ca-cert.pem"),
            server_cert: dir.join("server-cert.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client-cert.pem"),
            client_key: dir.join("client-key.pem"),
        }
    }
}

pub const TOKEN: &str = "test-token-0123456789abcdef";

/// Write an agent config into `dir` and parse it.
pub fn agent_config(dir: &Path, o: &AgentOpts) -> (Config, Pki) {
    std::fs::create_dir_all(dir).unwrap();
    let pki = Pki::new(&dir.join("pki"));
    std::fs::write(dir.join("token"), format!("{TOKEN}\n")).unwrap();
    let modes: Vec<String> = o.modes.iter().map(|m| format!("{m:?}")).collect();
    let ds: Vec<String> = o.datastores.iter().map(|m| format!("{m:?}")).collect();
    let mut t = format!(
        "[agent]\nid = {:?}\nlisten = \"127.0.0.1:0\"\ntoken_file = \"token\"\nstate_dir = \"state\"\nslots = {}\nmodes = [{}]\ndatastores = [{}]\nshutdown_grace_secs = {}\n",
        o.id,
        o.slots,
        modes.join(", "),
        ds.join(", "),
        o.shutdown_grace_secs
    );
    if let Some(k) = &o.key_provider {
        t.push_str(&format!("key_provider = {k:?}\n"));
    }
    if o.tls {
        t.push_str(&format!(
            "tls_cert = {:?}\ntls_key = {:?}\n",
            pki.server_cert, pki.server_key
        ));
        if o.mtls {
            t.push_str(&format!("client_ca = {:?}\n", pki.ca));
        }
    } else {
        t.push_str("insecure_http = true\n");
    }
    t.push_str(&format!(
        "\n[policy]\nfailover_to_network = {}\nallow_cleartext_nbd = false\n",
        o.failover
    ));
    for (name, kp) in &o.tenants {
        t.push_str(&format!(
            "\n[[tenant]]\nname = {name:?}\nrepository = \"repos/{name}\"\n"
        ));
        if let Some(kp) = kp {
            t.push_str(&format!("key_provider = {kp:?}\n"));
        }
        if o.restore_dirs {
            t.push_str(&format!("restore_dirs = [\"restores/{name}\"]\n"));
        }
        t.push_str(&format!(
            "[tenant.kms]\naddress = \"kms.{name}.example:5696\"\nca = \"kms/{name}/ca.pem\"\nclient_cert = \"kms/{name}/SECRET-client.pem\"\nclient_key = \"kms/{name}/SECRET-client.key\"\nkey_name = \"ferry/{name}\"\n"
        ));
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, t).unwrap();
    (Config::load(&path).unwrap(), pki)
}

/// An HTTPS (or HTTP) client trusting the test CA, with the client certificate
/// when `client` is set.
pub fn client(pki: &Pki, client: bool) -> reqwest::Client {
    let tls = ferry::tls::client_config(
        &pki.ca,
        client.then_some((pki.client_cert.as_path(), pki.client_key.as_path())),
    )
    .unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// A running in-process agent.
pub struct AgentFixture {
    pub dir: PathBuf,
    pub agent: Option<RunningAgent>,
    pub url: String,
    pub runner: Arc<TestRunner>,
    pub client: reqwest::Client,
    pub pki: Pki,
    pub config: Config,
}

impl AgentFixture {
    pub async fn start(dir: &Path, o: &AgentOpts, runner: Arc<TestRunner>) -> AgentFixture {
        let (config, pki) = agent_config(dir, o);
        let agent = Agent::from_config(&config).unwrap();
        let running = agent.start(runner.clone()).await.unwrap();
        let url = running.url();
        let client = client(&pki, o.mtls);
        AgentFixture {
            dir: dir.to_path_buf(),
            agent: Some(running),
            url,
            runner,
            client,
            pki,
            config,
        }
    }

    pub async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (StatusCode, reqwest::header::HeaderMap, Value) {
        let mut rb = self.client.request(method, format!("{}{path}", self.url));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb
                .header("content-type", "application/json")
                .body(serde_json::to_vec(b).unwrap());
        }
        let r = rb.send().await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, headers, v)
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        let (s, _, v) = self
            .request(reqwest::Method::GET, path, Some(TOKEN), None)
            .await;
        (s, v)
    }

    pub async fn post(&self, path: &str, body: &Value) -> (StatusCode, Value) {
        let (s, _, v) = self
            .request(reqwest::Method::POST, path, Some(TOKEN), Some(body))
            .await;
        (s, v)
    }

    /// Poll a job until `pred` holds (10 s at most: state changes, not speed).
    pub async fn wait_job(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..1000 {
            let (s, v) = self.get(&format!("/v1/jobs/{id}")).await;
            assert_eq!(s, StatusCode::OK, "{v}");
            if pred(&v) {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("job {id} never reached the expected state");
    }

    pub async fn wait_done(&self, id: &str) -> Value {
        self.wait_job(id, |v| {
            matches!(
                v["state"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            )
        })
        .await
    }

    pub async fn shutdown(&mut self) {
        if let Some(a) = self.agent.take() {
            a.shutdown().await.unwrap();
        }
    }
}

/// A backup request body for a VM with `disks` disks under `provider`.
pub fn backup_body(
    tenant: &str,
    vm: &str,
    provider: Option<&str>,
    disks: usize,
    ds: &str,
) -> Value {
    let disks: Vec<Value> = (0..disks)
        .map(|i| {
            serde_json::json!({"key": 2000 + i as i32, "label": format!("Hard disk {}", i + 1),
                               "datastore": ds, "encrypted": provider.is_some()})
        })
        .collect();
    let mut vm = serde_json::json!({"name": vm, "moref": format!("vm-{vm}"), "host": "esx-1",
                                    "encrypted": provider.is_some(), "disks": disks});
    if let Some(p) = provider {
        vm["key_provider"] = p.into();
    }
    serde_json::json!({"tenant": tenant, "vm": vm})
}

/// A `ferry agent` process; killed when dropped (a failing test leaves none), its
/// stdout kept open so the agent's last line can be read.
pub struct AgentProcess {
    pub child: std::process::Child,
    pub lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// Its base URL, from its "serving on" line.
    pub url: String,
}

impl AgentProcess {
    /// Start `ferry agent --config <config>` and wait until it serves.
    pub fn start(config: &Path) -> AgentProcess {
        use std::io::BufRead;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
            .args(["agent", "--config"])
            .arg(config)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().unwrap().unwrap();
        let url = first
            .strip_prefix("ferry agent serving on ")
            .unwrap_or_else(|| panic!("{first}"))
            .to_string();
        AgentProcess { child, lines, url }
    }

    /// Send `signal` (libc::SIGTERM, SIGKILL...).
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
