//! Dispatch and polling against scripted agents (the `AgentApi` seam): an agent
//! that dies between `/v1/info` and the dispatch, one that is busy (429), one
//! whose own selector refuses a VM, one that rejects the request (400), and one
//! that stops answering while the job runs.

use ferry::agent::api::{
    BackupRequest, Info, Job, KeySourceKind, KeySyncResponse, PolicySpec, Slots, TenantView,
};
use ferry::orchestrator::client::{AgentApi, ClientError};
use ferry::orchestrator::inventory::BoxFuture;
use ferry::orchestrator::{InventoryVm, Orchestrator, OrchestratorConfig, StaticInventory};
use ferry::state::{ItemState, JobKind, JobState, RunState, StateStore};
use ferry::transport::select::{DiskInfo, Mode, Policy, VmInfo};
use std::collections::VecDeque;
use std::path::Path;
use std::sync::{Arc, Mutex};

struct Fake {
    id: String,
    info: Info,
    /// Answers to the next dispatches (then: accept).
    dispatch: Mutex<VecDeque<ClientError>>,
    /// VM names this agent refuses with vm_refused.
    refuse: Vec<String>,
    /// Polls fail when set.
    polls_fail: bool,
    accepted: Mutex<Vec<String>>,
    attempts: Mutex<Vec<String>>,
}

fn job(id: &str, state: JobState, vm: &str) -> Job {
    Job {
        id: id.into(),
        kind: JobKind::Backup,
        state,
        tenant: "t".into(),
        subject: vm.into(),
        created_at: "2026-01-01T00:00:00.000Z".into(),
        started_at: None,
        finished_at: None,
        bytes_done: if state == JobState::Succeeded {
            4096
        } else {
            0
        },
        bytes_total: 4096,
        rate_bytes_per_sec: 0.0,
        eta_secs: None,
        cancel_requested: false,
        disks: vec![],
        error: None,
        cleanup: None,
        point_id: None,
        notes: vec![],
    }
}

impl Fake {
    fn new(id: &str, kp: Option<&str>, modes: &[Mode], slots: u32) -> Fake {
        Fake {
            id: id.into(),
            info: Info {
                id: id.into(),
                version: "t".into(),
                is_vm: true,
                host: None,
                key_provider: kp.map(String::from),
                datastores: vec!["ds".into()],
                reachable_hosts: None,
                modes: modes.to_vec(),
                data_path: "native".into(),
                slots: Slots {
                    total: slots,
                    used: 0,
                    free: slots,
                },
                tenants: vec![TenantView {
                    name: "t".into(),
                    key_provider: None,
                    key_source: KeySourceKind::Kms,
                    kms: None,
                }],
                policy: PolicySpec::from(&Policy::default()),
            },
            dispatch: Mutex::default(),
            refuse: vec![],
            polls_fail: false,
            accepted: Mutex::default(),
            attempts: Mutex::default(),
        }
    }
    fn err(&self, status: u16, code: &str) -> ClientError {
        ClientError::Api {
            agent: self.id.clone(),
            status,
            code: code.into(),
            message: format!("scripted {code}"),
        }
    }
}

impl AgentApi for Fake {
    fn id(&self) -> &str {
        &self.id
    }
    fn info(&self) -> BoxFuture<'_, Result<Info, ClientError>> {
        let i = self.info.clone();
        Box::pin(async move { Ok(i) })
    }
    fn start_backup<'a>(
        &'a self,
        req: &'a BackupRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            self.attempts.lock().unwrap().push(req.vm.name.clone());
            if let Some(e) = self.dispatch.lock().unwrap().pop_front() {
                return Err(e);
            }
            if self.refuse.contains(&req.vm.name) {
                return Err(self.err(422, "vm_refused"));
            }
            self.accepted.lock().unwrap().push(req.vm.name.clone());
            Ok(job(
                &format!("{}-{}", self.id, req.vm.name),
                JobState::Queued,
                &req.vm.name,
            ))
        })
    }
    fn job<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move {
            if self.polls_fail {
                return Err(ClientError::Unreachable {
                    agent: self.id.clone(),
                    message: "connection refused".into(),
                });
            }
            Ok(job(id, JobState::Succeeded, id))
        })
    }
    fn sync_keys(&self) -> BoxFuture<'_, Result<KeySyncResponse, ClientError>> {
        Box::pin(async move { Ok(KeySyncResponse { results: vec![] }) })
    }
    fn start_restore<'a>(
        &'a self,
        _req: &'a ferry::agent::api::RestoreRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move { Err(self.err(501, "not_scripted")) })
    }
    fn start_verify<'a>(
        &'a self,
        _req: &'a ferry::agent::api::VerifyRequest,
    ) -> BoxFuture<'a, Result<Job, ClientError>> {
        Box::pin(async move { Err(self.err(501, "not_scripted")) })
    }
}

fn vm(name: &str) -> InventoryVm {
    InventoryVm {
        folder: "/dc/vm".into(),
        vm: VmInfo {
            name: name.into(),
            moref: format!("vm-{name}"),
            host: "esx-1".into(),
            encrypted: true,
            key_provider: Some("KMS-A".into()),
            disks: vec![DiskInfo {
                key: 2000,
                label: "Hard disk 1".into(),
                datastore: "ds".into(),
                encrypted: true,
                key_provider: None,
            }],
        },
    }
}

fn orchestrator(dir: &Path, agents: Vec<Arc<Fake>>, vms: &[&str]) -> Orchestrator {
    let mut t = String::from(
        "[orchestrator]\nstate_dir = \"state\"\npoll_interval = \"10ms\"\nmax_poll_failures = 3\ndispatch_attempts = 2\n\n[[vcenter]]\nname = \"v\"\ninventory_file = \"unused.json\"\n\n[[tenant]]\nname = \"t\"\nkey_provider = \"KMS-A\"\nagents = [",
    );
    t.push_str(
        &agents
            .iter()
            .map(|a| format!("{:?}", a.id))
            .collect::<Vec<_>>()
            .join(", "),
    );
    t.push_str("]\n");
    for a in &agents {
        t.push_str(&format!(
            "\n[[agent]]\nid = {:?}\nurl = \"http://127.0.0.1:1\"\ninsecure_http = true\ntoken_file = \"t\"\n",
            a.id
        ));
    }
    t.push_str("\n[[job]]\nname = \"j\"\ntenant = \"t\"\nvcenter = \"v\"\nvms = [\"*\"]\n");
    let cfg = OrchestratorConfig::parse(&t, &dir.join("o.toml")).unwrap();
    let (store, _) = StateStore::open(&dir.join("state/orchestrator.sqlite")).unwrap();
    let inv = StaticInventory(vms.iter().map(|n| vm(n)).collect());
    Orchestrator::new(
        cfg,
        Arc::new(inv),
        agents.into_iter().map(|a| a as Arc<dyn AgentApi>).collect(),
        Arc::new(store),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_dying_after_info_sends_vms_to_the_next_valid_agent() {
    let dir = tempfile::tempdir().unwrap();
    let hot = Arc::new(Fake::new("proxy-a", Some("KMS-A"), &[Mode::HotAdd], 4));
    hot.dispatch
        .lock()
        .unwrap()
        .push_back(ClientError::Unreachable {
            agent: "proxy-a".into(),
            message: "connection reset".into(),
        });
    let shared = Arc::new(Fake::new("shared", None, &[Mode::NbdSsl], 8));
    let o = orchestrator(
        dir.path(),
        vec![hot.clone(), shared.clone()],
        &["v1", "v2", "v3"],
    );
    let job = o.config().jobs[0].clone();
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    assert_eq!(
        *hot.attempts.lock().unwrap(),
        ["v1"],
        "a dead agent is not retried in the round"
    );
    assert_eq!(*shared.accepted.lock().unwrap(), ["v1", "v2", "v3"]);
    assert_eq!(r.items[0].attempts, 2);
    assert_eq!(r.items[0].detail["tried"], serde_json::json!(["proxy-a"]));
    assert!(r.items.iter().all(|i| i.agent.as_deref() == Some("shared")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_and_refusing_agents() {
    let dir = tempfile::tempdir().unwrap();
    let mut hot = Fake::new("proxy-a", Some("KMS-A"), &[Mode::HotAdd], 4);
    hot.refuse = vec!["v2".into()];
    let hot = Arc::new(hot);
    let busy = hot.err(429, "no_free_slots");
    hot.dispatch.lock().unwrap().push_back(busy);
    let shared = Arc::new(Fake::new("shared", None, &[Mode::NbdSsl], 8));
    let o = orchestrator(
        dir.path(),
        vec![hot.clone(), shared.clone()],
        &["v1", "v2", "v3"],
    );
    let job = o.config().jobs[0].clone();
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    // v1: proxy-a answers busy (429) -> back in the queue, no attempt used, and
    // proxy-a counts as full for the round, so v2 and v3 wait for it too (the
    // default wait policy: never spill to the shared proxy). Next round proxy-a
    // takes v1 and v3; it refuses v2 (its own selector), which goes to shared.
    assert_eq!(r.items[0].attempts, 1);
    assert_eq!(r.items[0].agent.as_deref(), Some("proxy-a"));
    assert!(
        r.items[0].detail["waited_ms"].as_u64().unwrap() > 0,
        "{}",
        r.items[0].detail
    );
    let agents: Vec<Option<&str>> = r.items.iter().map(|i| i.agent.as_deref()).collect();
    assert_eq!(agents, [Some("proxy-a"), Some("shared"), Some("proxy-a")]);
    assert_eq!(r.items[1].attempts, 2);
    assert_eq!(r.items[1].detail["tried"], serde_json::json!(["proxy-a"]));
    assert_eq!(*hot.attempts.lock().unwrap(), ["v1", "v1", "v2", "v3"]);
    assert_eq!(*shared.accepted.lock().unwrap(), ["v2"]);

    // Next run: the same, without the busy answer.
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.state, RunState::Succeeded, "{}", r.render());
    let agents: Vec<Option<&str>> = r.items.iter().map(|i| i.agent.as_deref()).collect();
    assert_eq!(agents, [Some("proxy-a"), Some("shared"), Some("proxy-a")]);
    assert_eq!(r.items[0].detail["waited_ms"], 0);
    assert_eq!(
        *hot.attempts.lock().unwrap(),
        ["v1", "v1", "v2", "v3", "v1", "v2", "v3"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_request_fails_without_retry_and_attempts_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Fake::new("a", Some("KMS-A"), &[Mode::HotAdd], 4));
    let bad = a.err(400, "invalid_request");
    a.dispatch.lock().unwrap().push_back(bad);
    let b = Arc::new(Fake::new("b", Some("KMS-A"), &[Mode::HotAdd], 4));
    let o = orchestrator(dir.path(), vec![a.clone(), b.clone()], &["v1", "v2"]);
    let job = o.config().jobs[0].clone();
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.state, RunState::Failed);
    // v1 went to "a" (all else equal, the lower id) and was rejected as invalid:
    // another agent would reject it too, so no retry.
    assert_eq!(r.items[0].state, ItemState::Failed);
    assert_eq!(r.items[0].attempts, 1);
    assert!(r.items[0]
        .error
        .as_deref()
        .unwrap()
        .contains("invalid_request"));
    assert!(b.attempts.lock().unwrap().iter().all(|v| v != "v1"));
    // v2 is unaffected.
    assert_eq!(r.items[1].state, ItemState::Succeeded, "{}", r.render());
    // Every agent is shutting down: two attempts (dispatch_attempts), then give up.
    let dir2 = tempfile::tempdir().unwrap();
    let b = Arc::new(Fake::new("b", Some("KMS-A"), &[Mode::HotAdd], 4));
    let c = Arc::new(Fake::new("c", Some("KMS-A"), &[Mode::HotAdd], 4));
    let d = Arc::new(Fake::new("d", Some("KMS-A"), &[Mode::HotAdd], 4));
    for f in [&b, &c, &d] {
        let e = f.err(503, "shutting_down");
        f.dispatch.lock().unwrap().push_back(e);
    }
    let o = orchestrator(dir2.path(), vec![b.clone(), c.clone(), d.clone()], &["v1"]);
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.items[0].state, ItemState::Failed);
    assert_eq!(r.items[0].attempts, 2, "dispatch_attempts = 2");
    assert!(
        r.items[0]
            .error
            .as_deref()
            .unwrap()
            .contains("gave up after 2"),
        "{:?}",
        r.items[0].error
    );
    assert!(d.attempts.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_silent_while_the_job_runs_is_given_up_with_a_pointer_to_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Fake::new("a", Some("KMS-A"), &[Mode::HotAdd], 4);
    a.polls_fail = true;
    let o = orchestrator(dir.path(), vec![Arc::new(a)], &["v1"]);
    let job = o.config().jobs[0].clone();
    let r = o.run_job(&job).await.unwrap();
    assert_eq!(r.state, RunState::Failed);
    let e = r.items[0].error.as_deref().unwrap();
    assert!(e.contains("may still finish") && e.contains("a-v1"), "{e}");
}
