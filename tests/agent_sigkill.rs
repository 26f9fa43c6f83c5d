//! An agent killed with SIGKILL in the middle of a HotAdd backup, then restarted:
//! the job is recorded as failed ("interrupted"), the orphan sweep removes the
//! snapshot and detaches the hot-added disk it left on vCenter, and the tenant's
//! repository still verifies (no half-written restore point). Twice: on ferry's
//! native HotAdd path (the mock vCenter keeps every task running 1.5 s so the
//! kill lands while the disk is attached), and with the agent's disks carried
//! by VDDK (the mock VDDK delays every read so the kill lands mid-disk; the
//! sweep's `VixDiskLib_Cleanup` detaches the disk and releases its handle).
//!
//! The agent runs as a real `ferry agent` process on the config file the
//! simulated world wrote for proxy `proxy-a`.

mod agent_support;
mod common;

use agent_support::AgentProcess;
use ferry::agent::api::BackupRequest;
use ferry_mocks::vcenter::Scenario;
use ferry_mocks::world::{World, WorldOptions};
use std::path::Path;
use std::time::{Duration, Instant};

/// Poll the mock vCenter's state every 20 ms until `ready`, for at most two
/// minutes (then fail with `what` and the state): the moment to kill the agent.
fn wait_for(
    admin: &ferry_mocks::vcenter::Admin,
    what: &str,
    ready: impl Fn(&ferry_mocks::vcenter::StateDump) -> bool,
) {
    let t = Instant::now();
    loop {
        let st = admin.state();
        if ready(&st) {
            return;
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{what}: {st:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn http(world: &World) -> reqwest::Client {
    let tls = ferry::tls::client_config(&world.ca, None).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured((*tls).clone())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[test]
fn sigkill_mid_hotadd_then_restart_cleans_up_and_the_repository_verifies() {
    sigkill_mid_backup_then_restart(false);
}

#[test]
fn sigkill_mid_vddk_read_then_restart_cleans_up_and_the_repository_verifies() {
    sigkill_mid_backup_then_restart(true);
}

fn sigkill_mid_backup_then_restart(vddk: bool) {
    let dir = tempfile::tempdir().unwrap();
    let scenario =
        Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mocks/scenarios/small.toml"))
            .unwrap();
    let mut opts = WorldOptions::new(scenario, dir.path());
    if vddk {
        opts.vddk_library = Some(common::vsphere::mock_vddk_library());
    }
    let mut world = World::start(opts).unwrap();
    let config = world
        .agents
        .iter()
        .find(|a| a.id == "proxy-a")
        .unwrap()
        .config
        .clone();
    assert!(world.stop_agent("proxy-a"));
    let vm = world.vm_info("tenant-a-web").unwrap();
    let admin = world.vcenter.admin();
    if vddk {
        admin.vddk_fault(ferry_mocks::vcenter::VddkFault {
            count: 100,
            delay_ms: 50,
            ..Default::default()
        });
    } else {
        admin.set_task_delay(1500);
    }

    let agent = AgentProcess::start(&config);
    let url = agent.url.clone();
    let client = http(&world);
    let token = world.token();
    let rt = world.runtime();
    let req = serde_json::json!({"tenant": "tenant-a", "vm": vm});
    // The request type the orchestrator sends accepts it.
    let _: BackupRequest = serde_json::from_value(req.clone()).unwrap();
    let job: serde_json::Value = rt.block_on(async {
        let r = client
            .post(format!("{url}/v1/backups"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&req).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{text}");
        serde_json::from_str(&text).unwrap()
    });
    let id = job["id"].as_str().unwrap().to_string();

    // Kill the agent while a snapshot exists and a disk is hot-added to proxy-a
    // (with VDDK: open, and some reads through).
    wait_for(&admin, "the disk was never hot-added", |st| {
        st.attached_count() > 0
            && st.snapshot_count() > 0
            && (!vddk || admin.vddk_open_handles() > 0)
    });
    if vddk {
        std::thread::sleep(Duration::from_millis(300));
    }
    agent.signal(libc::SIGKILL);
    drop(agent);
    let st = admin.state();
    assert!(st.snapshot_count() > 0 && st.attached_count() > 0, "{st:?}");
    assert_eq!(admin.vddk_open_handles() > 0, vddk);

    // Restart on the same state directory: recovery and the orphan sweep run
    // before the API serves.
    admin.clear_faults();
    admin.set_task_delay(0);
    let mut agent = AgentProcess::start(&config);
    let url = agent.url.clone();
    let st = admin.state();
    assert_eq!(st.snapshot_count(), 0, "snapshot left behind: {st:?}");
    assert_eq!(st.attached_count(), 0, "hot-added disk left behind: {st:?}");
    assert_eq!(admin.vddk_open_handles(), 0, "VDDK handle left open");
    assert_eq!(
        admin.vddk_audit().iter().any(|e| e.op == "cleanup"),
        vddk,
        "VixDiskLib_Cleanup ran"
    );
    let rec: serde_json::Value = rt.block_on(async {
        let r = client
            .get(format!("{url}/v1/jobs/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    });
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(rec["error"]["code"], "interrupted", "{rec:#}");
    let cleanup = rec["cleanup"].as_str().unwrap_or_default();
    assert!(cleanup.contains("removed"), "{rec:#}");

    // The repository holds only whole restore points.
    let t = world.tenant("tenant-a").unwrap();
    let repo = ferry::repo::Repository::open(&t.repository).unwrap();
    let keys = t.key_source().unwrap();
    let rep = ferry::repo::verify::verify(
        &repo,
        keys.as_ref(),
        &[],
        2,
        false,
        &ferry::progress::Progress::default(),
    )
    .unwrap();
    assert!(rep.ok(), "{:?}", rep.points);

    agent.signal(libc::SIGTERM);
    assert!(agent.child.wait().unwrap().success());
}

/// POST `body` to `path` of the agent at `url`; the created job's id.
fn post_job(
    world: &World,
    client: &reqwest::Client,
    url: &str,
    path: &str,
    body: &serde_json::Value,
) -> String {
    let token = world.token();
    world.runtime().block_on(async {
        let r = client
            .post(format!("{url}{path}"))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body).unwrap())
            .send()
            .await
            .unwrap();
        let status = r.status();
        let text = r.text().await.unwrap();
        assert!(status.is_success(), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        v["id"].as_str().unwrap().to_string()
    })
}

/// The agent's record of job `id`.
fn job(world: &World, client: &reqwest::Client, url: &str, id: &str) -> serde_json::Value {
    let token = world.token();
    world.runtime().block_on(async {
        let r = client
            .get(format!("{url}/v1/jobs/{id}"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        serde_json::from_str(&r.text().await.unwrap()).unwrap()
    })
}

/// An agent killed with SIGKILL while a restore into a VM has a new, half-written
/// disk on the target VM that is hot-added to the proxy: after the restart the
/// sweep detaches it from the proxy and removes it from the VM and its datastore,
/// and the job is recorded as interrupted with what the sweep did. Nothing is left
/// behind: no extra disk on the VM, no `ferry-restore-*` file on any datastore,
/// nothing attached to the proxy.
#[test]
fn sigkill_mid_restore_into_a_vm_then_restart_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let scenario =
        Scenario::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("mocks/scenarios/small.toml"))
            .unwrap();
    let mut world = World::start(WorldOptions::new(scenario, dir.path())).unwrap();
    let config = world
        .agents
        .iter()
        .find(|a| a.id == "proxy-a")
        .unwrap()
        .config
        .clone();
    assert!(world.stop_agent("proxy-a"));
    let admin = world.vcenter.admin();
    let agent = AgentProcess::start(&config);
    let url = agent.url.clone();
    let client = http(&world);

    // A point to restore.
    let vm = world.vm_info("tenant-a-web").unwrap();
    let id = post_job(
        &world,
        &client,
        &url,
        "/v1/backups",
        &serde_json::json!({"tenant": "tenant-a", "vm": vm}),
    );
    let t = Instant::now();
    loop {
        let rec = job(&world, &client, &url, &id);
        match rec["state"].as_str() {
            Some("succeeded") => break,
            Some("queued" | "running") => {}
            _ => panic!("backup: {rec:#}"),
        }
        assert!(t.elapsed() < Duration::from_secs(120), "{rec:#}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = admin.state();
    let target = st.vm("tenant-a-web").unwrap();
    let (moref, own_disks) = (target.moref.clone(), target.disks.len());

    // Restore it into new disks of the VM, slowly enough to kill it mid-way.
    admin.set_task_delay(1500);
    let id = post_job(
        &world,
        &client,
        &url,
        "/v1/restores",
        &serde_json::json!({
            "tenant": "tenant-a",
            "point": "latest:tenant-a-web",
            "target": {"kind": "vm", "moref": moref},
        }),
    );
    let restore_disks = |st: &ferry_mocks::vcenter::StateDump| {
        st.vm("tenant-a-web")
            .unwrap()
            .disks
            .iter()
            .filter(|d| d.file_name.contains("/ferry-restore-"))
            .count()
    };
    wait_for(&admin, "the new disk was never hot-added", |st| {
        restore_disks(st) > 0 && st.attached_count() > 0
    });
    agent.signal(libc::SIGKILL);
    drop(agent);
    let st = admin.state();
    assert!(restore_disks(&st) > 0 && st.attached_count() > 0, "{st:?}");
    let restore_files = || {
        common::files_under(world.vcenter.state_dir())
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("ferry-restore-"))
            })
            .collect::<Vec<_>>()
    };
    assert!(!restore_files().is_empty(), "the half-written disk's files");

    // Restart: the sweep runs before the API serves.
    admin.set_task_delay(0);
    let mut agent = AgentProcess::start(&config);
    let url = agent.url.clone();
    let st = admin.state();
    assert_eq!(st.attached_count(), 0, "left attached to the proxy: {st:?}");
    assert_eq!(restore_disks(&st), 0, "left on the VM: {st:?}");
    assert_eq!(st.vm("tenant-a-web").unwrap().disks.len(), own_disks);
    assert_eq!(st.snapshot_count(), 0, "{st:?}");
    assert!(restore_files().is_empty(), "{:?}", restore_files());
    let rec = job(&world, &client, &url, &id);
    assert_eq!(rec["state"], "failed", "{rec:#}");
    assert_eq!(rec["error"]["code"], "interrupted", "{rec:#}");
    let cleanup = rec["cleanup"].as_str().unwrap_or_default();
    assert!(
        cleanup.contains("half-written new disk(s)") && cleanup.contains("removed from VM"),
        "{rec:#}"
    );

    agent.signal(libc::SIGTERM);
    assert!(agent.child.wait().unwrap().success());
}
