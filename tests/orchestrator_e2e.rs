//! The orchestrator end to end over HTTPS against three in-process agents and the
//! whitepaper's world (seed 004): 10 VMs encrypted under KMS-A, 10 under KMS-B,
//! a HotAdd proxy per tenant encrypted under its tenant's KMS, and one shared
//! NBD-SSL proxy. Every encrypted disk goes HotAdd to its own tenant's proxy or
//! NBD-SSL through the shared one, never HotAdd across key providers, never clear
//! text. An agent that is down sends its VMs to another valid agent.
//!
//! The agents run the scripted test runner (tests/agent_support), which fails a
//! job the way vSphere would if a disk were hot-added across key providers.

mod agent_support;

use agent_support::*;
use ferry::orchestrator::inventory::InventoryFile;
use ferry::orchestrator::{ConfigInventory, InventoryVm, Orchestrator, OrchestratorConfig};
use ferry::state::{ItemState, RunKind, RunState};
use ferry::transport::select::{DiskInfo, Mode, Outcome, VmInfo};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const A: &str = "KMS-A";
const B: &str = "KMS-B";

struct World {
    _dir: tempfile::TempDir,
    root: PathBuf,
    runner: Arc<TestRunner>,
    agents: BTreeMap<String, AgentFixture>,
}

fn vm(name: &str, kp: Option<&str>, ds: &str, folder: &str, disks: usize) -> InventoryVm {
    InventoryVm {
        folder: folder.into(),
        vm: VmInfo {
            name: name.into(),
            moref: format!("vm-{name}"),
            host: "esx-1".into(),
            encrypted: kp.is_some(),
            key_provider: kp.map(String::from),
            disks: (0..disks)
                .map(|i| DiskInfo {
                    key: 2000 + i as i32,
                    label: format!("Hard disk {}", i + 1),
                    datastore: ds.into(),
                    encrypted: kp.is_some(),
                    key_provider: None,
                })
                .collect(),
        },
    }
}

/// The whitepaper's inventory, plus a KMS-B VM misfiled in tenant A's folder and
/// a template that job B excludes.
fn inventory() -> Vec<InventoryVm> {
    let mut v = Vec::new();
    for i in 1..=10 {
        v.push(vm(
            &format!("a{i:02}"),
            Some(A),
            "ds-a",
            "/DC1/vm/tenant-a",
            1 + i % 2,
        ));
    }
    for i in 1..=10 {
        v.push(vm(
            &format!("b{i:02}"),
            Some(B),
            "ds-b",
            "/DC1/vm/tenant-b",
            1,
        ));
    }
    v.push(vm("stray-b", Some(B), "ds-b", "/DC1/vm/tenant-a", 1));
    v.push(vm("b-template", Some(B), "ds-b", "/DC1/vm/tenant-b", 1));
    v
}

impl World {
    async fn start(gated: bool) -> World {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_path_buf();
        let runner = if gated {
            TestRunner::gated()
        } else {
            TestRunner::new()
        };
        let tenants = |names: &[&str]| -> Vec<(String, Option<String>)> {
            names
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Some(if *n == "tenant-a" { A } else { B }.to_string()),
                    )
                })
                .collect()
        };
        let specs = [
            AgentOpts {
                id: "proxy-a".into(),
                modes: vec!["hotadd"],
                key_provider: Some(A.into()),
                datastores: vec!["ds-a".into()],
                tenants: tenants(&["tenant-a"]),
                slots: 4,
                ..Default::default()
            },
            AgentOpts {
                id: "proxy-b".into(),
                modes: vec!["hotadd"],
                key_provider: Some(B.into()),
                datastores: vec!["ds-b".into()],
                tenants: tenants(&["tenant-b"]),
                slots: 4,
                ..Default::default()
            },
            AgentOpts {
                id: "shared-nbd".into(),
                modes: vec!["nbdssl", "nbd"],
                key_provider: None,
                datastores: vec![],
                tenants: tenants(&["tenant-a", "tenant-b"]),
                slots: 6,
                ..Default::default()
            },
        ];
        let mut agents = BTreeMap::new();
        for o in specs {
            let f = AgentFixture::start(&root.join(&o.id), &o, runner.clone()).await;
            agents.insert(o.id.clone(), f);
        }
        World {
            _dir: dir,
            root,
            runner,
            agents,
        }
    }

    /// Write the orchestrator config (and inventory file); `urls` overrides agent URLs.
    fn config(&self, failover: bool, urls: &BTreeMap<&str, String>) -> PathBuf {
        let d = self.root.join("orch");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("inventory.json"),
            serde_json::to_vec_pretty(&InventoryFile { vms: inventory() }).unwrap(),
        )
        .unwrap();
        std::fs::write(d.join("token"), format!("{TOKEN}\n")).unwrap();
        let mut t = String::from(
            "[orchestrator]\nstate_dir = \"state\"\npoll_interval = \"20ms\"\nschedule_tick = \"50ms\"\nrequest_timeout = \"10s\"\n\n[[vcenter]]\nname = \"lab\"\ninventory_file = \"inventory.json\"\n\n[[tenant]]\nname = \"tenant-a\"\nkey_provider = \"KMS-A\"\nagents = [\"proxy-a\", \"shared-nbd\"]\n\n[[tenant]]\nname = \"tenant-b\"\nkey_provider = \"KMS-B\"\nagents = [\"proxy-b\", \"shared-nbd\"]\n",
        );
        for (id, f) in &self.agents {
            let url = urls
                .get(id.as_str())
                .cloned()
                .unwrap_or_else(|| f.url.clone());
            t.push_str(&format!(
                "\n[[agent]]\nid = {id:?}\nurl = {url:?}\ntoken_file = \"token\"\nca = {:?}\n",
                f.pki.ca
            ));
        }
        t.push_str(&format!(
            "\n[[job]]\nname = \"tenant-a-nightly\"\ntenant = \"tenant-a\"\nvcenter = \"lab\"\nfolders = [\"/DC1/vm/tenant-a\"]\nschedule = {{ every = \"1h\" }}\nretention = {{ keep_last = 7 }}\npolicy = {{ failover_to_network = {failover}, allow_cleartext_nbd = true }}\n\n[[job]]\nname = \"tenant-b-nightly\"\ntenant = \"tenant-b\"\nvcenter = \"lab\"\nvms = [\"b*\"]\nexclude = [\"*-template\"]\nschedule = {{ daily = \"02:00\" }}\npolicy = {{ failover_to_network = {failover}, allow_cleartext_nbd = true }}\n"
        ));
        let p = d.join("orchestrator.toml");
        std::fs::write(&p, t).unwrap();
        p
    }

    async fn orchestrator(&self, path: &Path) -> Arc<Orchestrator> {
        let cfg = OrchestratorConfig::load(path).unwrap();
        let (o, _) = Orchestrator::open(cfg, Arc::new(ConfigInventory::default()))
            .await
            .unwrap();
        Arc::new(o)
    }

    fn provider_of(&self, agent: &str) -> Option<&'static str> {
        match agent {
            "proxy-a" => Some(A),
            "proxy-b" => Some(B),
            _ => None,
        }
    }

    /// What the agents were asked to do: every disk of every backup either
    /// HotAdd on a proxy of its own key provider or NBD-SSL; never clear text.
    fn check_runner_calls(&self) -> Vec<(String, String, Mode)> {
        let mut out = Vec::new();
        for c in self.runner.runs() {
            let ferry::agent::JobSpec::Backup(b) = &c.spec else {
                continue;
            };
            assert_eq!(c.proxy_key_provider.as_deref(), self.provider_of(&c.proxy));
            for d in &b.selection.disks {
                let Outcome::Assigned { proxy, mode } = &d.outcome else {
                    panic!("{}: unassigned disk reached the runner", b.vm.name);
                };
                assert_eq!(proxy, &c.proxy);
                assert!(d.encrypted, "every VM here is encrypted");
                match mode {
                    Mode::HotAdd => assert_eq!(
                        d.key_provider.as_deref(),
                        self.provider_of(proxy),
                        "{}: HotAdd across key providers",
                        b.vm.name
                    ),
                    Mode::NbdSsl => assert_eq!(proxy, "shared-nbd"),
                    Mode::Nbd => panic!("{}: clear-text NBD for an encrypted disk", b.vm.name),
                }
                out.push((b.vm.name.clone(), proxy.clone(), *mode));
            }
        }
        out
    }
}

fn decision(p: &serde_json::Value) -> (&str, Option<&str>) {
    (
        p["decision"]["kind"].as_str().unwrap(),
        p["decision"]["agent"].as_str(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_places_every_vm_by_key_provider_and_changes_nothing() {
    let w = World::start(false).await;
    let cfg = w.config(true, &BTreeMap::new());
    let o = w.orchestrator(&cfg).await;
    let report = o.plan(&[]).await.unwrap();
    let j = serde_json::to_value(&report).unwrap();
    for id in ["proxy-a", "proxy-b", "shared-nbd"] {
        assert_eq!(j["agents"][id]["status"], "up", "{id}");
    }
    let a = j["jobs"][0]["vms"].as_array().unwrap();
    assert_eq!(
        a.len(),
        11,
        "10 tenant-a VMs and the stray one in its folder"
    );
    // proxy-a has 4 slots: a01 (2 disks) and a02 (1) take 3; a03 (2 disks) waits
    // for proxy-a (never spread, never spilled to NBD-SSL under the default wait
    // policy) and says who holds its slots; a04 (1) takes proxy-a's last slot;
    // the rest wait for it too. The shared proxy takes no encrypted VM.
    let placed: Vec<(&str, Option<&str>)> = a.iter().map(decision).collect();
    assert_eq!(placed[0], ("dispatch", Some("proxy-a")));
    assert_eq!(placed[1], ("dispatch", Some("proxy-a")));
    assert_eq!(placed[2].0, "deferred", "{}", a[2]);
    let why = a[2]["decision"]["reason"].as_str().unwrap();
    assert!(
        why.contains("hotadd via proxy-a: busy until its earlier jobs finish (1 slot(s) free, this VM needs 2; slots taken by a01, a02)"),
        "{why}"
    );
    assert_eq!(placed[3], ("dispatch", Some("proxy-a")));
    for p in &a[4..10] {
        assert_eq!(decision(p).0, "deferred", "{p}");
    }
    let stray = &a[10];
    assert_eq!(stray["vm"], "stray-b");
    assert_eq!(decision(stray).0, "refused");
    assert!(stray["decision"]["reason"]
        .as_str()
        .unwrap()
        .contains("KMS-B"));
    let b = j["jobs"][1]["vms"].as_array().unwrap();
    assert_eq!(b.len(), 10, "template excluded");
    for p in &b[..4] {
        assert_eq!(decision(p), ("dispatch", Some("proxy-b")), "{p}");
        assert_eq!(p["selection"]["disks"][0]["outcome"]["mode"], "hotadd");
    }
    // HotAdd only ever with the same key provider.
    for job in j["jobs"].as_array().unwrap() {
        for p in job["vms"].as_array().unwrap() {
            if decision(p).0 != "dispatch" {
                continue;
            }
            for d in p["selection"]["disks"].as_array().unwrap() {
                let proxy = d["outcome"]["proxy"].as_str().unwrap();
                match d["outcome"]["mode"].as_str().unwrap() {
                    "hotadd" => assert_eq!(d["key_provider"].as_str(), w.provider_of(proxy)),
                    "nbdssl" => assert_eq!(proxy, "shared-nbd"),
                    other => panic!("mode {other} for {p}"),
                }
            }
        }
    }
    let text = report.render(false);
    assert!(
        text.contains("VM ") && text.contains("PROXY") && text.contains("MODE"),
        "{text}"
    );
    assert!(text.contains("stray-b: REFUSED"), "{text}");
    // Nothing happened anywhere.
    assert!(w.runner.runs().is_empty());
    for f in w.agents.values() {
        let (_, v) = f.get("/v1/jobs").await;
        assert!(v["jobs"].as_array().unwrap().is_empty());
    }
    assert!(o.store().list_runs(None, 10).unwrap().is_empty());

    // The same through the CLI, as JSON and as text.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["orchestrator", "plan", "--config"])
        .arg(&cfg)
        .arg("--json")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        cli["jobs"][0]["vms"][0]["decision"],
        j["jobs"][0]["vms"][0]["decision"]
    );
    assert_eq!(cli["jobs"][1]["vms"].as_array().unwrap().len(), 10);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["orchestrator", "plan", "--explain", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(
        text.contains("JOB tenant-b-nightly") && text.contains("[x] proxy-b"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_once_backs_up_everything_hotadd_to_own_proxy_or_nbdssl() {
    let w = World::start(false).await;
    let cfg = w.config(true, &BTreeMap::new());
    let o = w.orchestrator(&cfg).await;
    let runs = o.run_once(&[], true).await.unwrap();
    assert_eq!(runs.len(), 3);
    let ks = &runs[0];
    assert_eq!(ks.kind, RunKind::KeySync);
    assert_eq!(ks.state, RunState::Succeeded);
    assert_eq!(ks.items.len(), 3, "one item per agent");
    let a = &runs[1];
    assert_eq!(a.job, "tenant-a-nightly");
    assert_eq!(
        a.state,
        RunState::Failed,
        "the stray VM is refused: {}",
        a.render()
    );
    let refused: Vec<_> = a
        .items
        .iter()
        .filter(|i| i.state == ItemState::Refused)
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].item, "vm-stray-b");
    assert_eq!(
        a.items
            .iter()
            .filter(|i| i.state == ItemState::Succeeded)
            .count(),
        10,
        "{}",
        a.render()
    );
    let b = &runs[2];
    assert_eq!(b.state, RunState::Succeeded, "{}", b.render());
    assert_eq!(b.items.len(), 10);
    for i in a
        .items
        .iter()
        .chain(&b.items)
        .filter(|i| i.state == ItemState::Succeeded)
    {
        assert!(i.agent_job_id.is_some());
        assert!(i.bytes > 0);
        let result = i.detail["result"].as_array().unwrap();
        assert!(!result.is_empty());
        // The orchestrator's own selector decision is recorded too.
        let sel = i.detail["selector"].as_array().unwrap();
        assert_eq!(sel.len(), result.len());
        assert_eq!(sel[0]["proxy"].as_str(), i.agent.as_deref());
        let why = sel[0]["reason"].as_str().unwrap();
        let head = format!(
            "{} via {}: chosen",
            sel[0]["mode"].as_str().unwrap(),
            sel[0]["proxy"].as_str().unwrap()
        );
        assert!(why.starts_with(&head), "{sel:?}");
        // Every other agent of the tenant is named too.
        assert!(why.contains("shared-nbd (nbdssl): "), "{why}");
        for d in result {
            assert!(!d["reason"].as_str().unwrap().is_empty());
        }
    }
    // What the agents did.
    let disks = w.check_runner_calls();
    assert_eq!(
        disks.len(),
        15 + 10,
        "a01..a10 have 15 disks, b01..b10 have 10"
    );
    assert!(disks
        .iter()
        .any(|(_, p, m)| p == "proxy-a" && *m == Mode::HotAdd));
    assert!(disks
        .iter()
        .any(|(_, p, m)| p == "proxy-b" && *m == Mode::HotAdd));
    for c in w.runner.runs() {
        if let ferry::agent::JobSpec::Backup(b) = &c.spec {
            let want = (b.tenant == "tenant-a").then_some(7);
            assert_eq!(b.retention.as_ref().and_then(|r| r.keep_last), want);
        }
    }
    // History and key registry (ids and versions only) in the orchestrator's SQLite.
    let store = o.store();
    assert_eq!(store.list_runs(None, 10).unwrap().len(), 3);
    let keys = store.keys().unwrap();
    let tenants: Vec<&str> = keys.iter().map(|k| k.tenant.as_str()).collect();
    assert_eq!(tenants, ["tenant-a", "tenant-b"]);
    assert!(keys.iter().all(|k| k.version == 1 && !k.key_id.is_empty()));
    // A rotation on the KMS shows up in the next key sync.
    w.runner
        .key_versions
        .lock()
        .unwrap()
        .insert("tenant-b".into(), 2);
    let ks = o.sync_keys().await.unwrap();
    assert_eq!(ks.state, RunState::Succeeded);
    let k = store.keys().unwrap();
    assert_eq!(k[1].version, 2);
    assert_eq!(k[1].key_id, "tenant-b-key-v2");
    // The CLI history sees the runs.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ferry"))
        .args(["orchestrator", "history", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(h.as_array().unwrap().len(), 4);
    assert_eq!(h[0]["kind"], "key_sync");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_agent_sends_its_vms_to_another_valid_agent() {
    let mut w = World::start(false).await;
    // proxy-b is down: its port answers nothing.
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("https://{}", l.local_addr().unwrap())
    };
    w.agents.get_mut("proxy-b").unwrap().shutdown().await;
    let cfg = w.config(true, &BTreeMap::from([("proxy-b", dead)]));
    let o = w.orchestrator(&cfg).await;
    let plan = o.plan(&["tenant-b-nightly".into()]).await.unwrap();
    let text = plan.render(false);
    assert!(text.contains("proxy-b: DOWN"), "{text}");
    let runs = o
        .run_once(&["tenant-b-nightly".into()], false)
        .await
        .unwrap();
    assert_eq!(runs.len(), 1);
    let r = &runs[0];
    assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    assert!(r
        .items
        .iter()
        .all(|i| i.agent.as_deref() == Some("shared-nbd")));
    let disks = w.check_runner_calls();
    assert_eq!(disks.len(), 10);
    assert!(disks
        .iter()
        .all(|(_, p, m)| p == "shared-nbd" && *m == Mode::NbdSsl));

    // Without network failover nothing else may take them: they fail, naming
    // the down agent, and no snapshot is ever attempted.
    drop(o);
    let before = w.runner.runs().len();
    let cfg = w.config(
        false,
        &BTreeMap::from([("proxy-b", "https://127.0.0.1:9".to_string())]),
    );
    let o = w.orchestrator(&cfg).await;
    let runs = o
        .run_once(&["tenant-b-nightly".into()], false)
        .await
        .unwrap();
    let r = &runs[0];
    assert_eq!(r.state, RunState::Failed);
    for i in &r.items {
        assert_eq!(i.state, ItemState::Failed);
        assert!(
            i.error.as_deref().unwrap().contains("proxy-b: down"),
            "{:?}",
            i.error
        );
    }
    assert_eq!(w.runner.runs().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduler_runs_due_jobs_and_key_sync_and_records_a_stop() {
    let w = World::start(true).await;
    let cfg = w.config(true, &BTreeMap::new());
    let o = w.orchestrator(&cfg).await;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sched = tokio::spawn(o.clone().run_scheduled(async move {
        let _ = stop_rx.await;
    }));
    // Never ran: both jobs and the key sync are due at once; the gated runner
    // keeps the backups running.
    let store = o.store().clone();
    for _ in 0..1000 {
        let runs = store.list_runs(None, 10).unwrap();
        let ks_done = runs
            .iter()
            .any(|r| r.kind == RunKind::KeySync && r.state == RunState::Succeeded);
        if runs.len() == 3 && ks_done && w.runner.runs().len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let runs = store.list_runs(None, 10).unwrap();
    assert_eq!(runs.len(), 3, "{runs:?}");
    stop_tx.send(()).unwrap();
    sched.await.unwrap().unwrap();
    for r in store.list_runs(None, 10).unwrap() {
        match r.kind {
            RunKind::KeySync => assert_eq!(r.state, RunState::Succeeded),
            RunKind::Backup => {
                assert_eq!(r.state, RunState::Failed);
                assert!(r.error.unwrap().contains("orchestrator stopped"));
            }
        }
    }
    w.runner.gate.set(true);
}
