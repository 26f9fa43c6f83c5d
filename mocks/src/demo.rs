//! `ferry-sim demo`: the main job on the whole simulated provider, no setup.
//! Starts the [`crate::world`] (mock vCenter on the whitepaper's scenario, mock
//! ESXi NBD-SSL, two tenants with their own mock KMS, a HotAdd proxy agent per tenant plus a shared
//! NBD-SSL agent, the orchestrator), runs a full backup of every VM through the
//! orchestrator, lets every guest write about 1% of its disks, runs the
//! incremental, restores one VM through its agent and checks it bit for bit,
//! verifies every tenant repository, and returns the table of VM/disk → proxy,
//! mode, reason, bytes and rate.
//!
//! Owns the demo's steps and its result rows. Must not: reach into ferry's
//! internals — everything goes through the orchestrator, the agents' HTTP API
//! and the admin API of the mocks, as an operator's tooling would.

use crate::vcenter::Scenario;
use crate::world::{World, WorldOptions};
use anyhow::Context;
use ferry::agent::api::{RestoreRequest, RestoreTargetSpec};
use ferry::orchestrator::client::AgentApi;
use ferry::orchestrator::RunSummary;
use ferry::state::RunState;
use std::path::Path;
use std::time::{Duration, Instant};

/// The built-in scenario: the whitepaper's provider (seed 004).
pub const WHITEPAPER: &str = include_str!("../scenarios/whitepaper.toml");

/// Demo parameters.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// The scenario (default: the built-in whitepaper world).
    pub scenario: Scenario,
    /// Cap every disk at this many MiB (tests use small disks); `None`: as the
    /// scenario says.
    pub disk_mib_max: Option<u64>,
    /// Fraction of every disk a guest changes between the two backups.
    pub change: f64,
    /// Seed of the guest writes.
    pub seed: u64,
    /// The jobs' `lesser_mode`: `never` (default: every VM waits for its best
    /// proxy, full HotAdd), `after=DURATION` or `when-idle`.
    pub lesser_mode: String,
    /// Carry every disk through this VDDK library (the mock `libvixDiskLib.so`)
    /// instead of ferry's native HotAdd and NBD paths.
    pub vddk_library: Option<std::path::PathBuf>,
}

impl DemoOptions {
    /// The built-in scenario with its own disk sizes, 1% changed.
    pub fn builtin() -> anyhow::Result<DemoOptions> {
        Ok(DemoOptions {
            scenario: Scenario::parse(WHITEPAPER, Path::new("whitepaper.toml"))
                .context("the built-in scenario")?,
            disk_mib_max: None,
            change: 0.01,
            seed: 7,
            lesser_mode: "never".into(),
            vddk_library: None,
        })
    }
}

/// One VM disk in the final table.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoRow {
    /// Tenant.
    pub tenant: String,
    /// VM.
    pub vm: String,
    /// vSphere device key.
    pub disk: i64,
    /// Agent (proxy) that moved it.
    pub proxy: String,
    /// Transport.
    pub mode: String,
    /// The selector's reason.
    pub reason: String,
    /// Seconds the VM waited for a free slot before the full backup started.
    pub full_wait: f64,
    /// Bytes read in the full backup.
    pub full_bytes: u64,
    /// Bytes per second in the full backup.
    pub full_rate: f64,
    /// Bytes read in the incremental.
    pub incr_bytes: u64,
    /// Bytes per second in the incremental.
    pub incr_rate: f64,
    /// How the incremental read the disk: `cbt` (changed areas only) or `full`.
    pub incr_read: String,
}

/// What the demo did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DemoReport {
    /// Per VM disk.
    pub rows: Vec<DemoRow>,
    /// Seconds of the full run and the incremental run.
    pub full_seconds: f64,
    /// Seconds of the incremental run.
    pub incr_seconds: f64,
    /// The restore check (`<vm>: n disk(s) bit-identical via <proxy>`).
    pub restore: String,
    /// Per tenant: points and chunks verified.
    pub verify: Vec<String>,
    /// Wall-clock seconds of the whole demo.
    pub seconds: f64,
    /// The jobs' `lesser_mode`.
    pub lesser_mode: String,
}

fn ensure_ok(run: &RunSummary) -> anyhow::Result<()> {
    anyhow::ensure!(
        run.state == RunState::Succeeded,
        "run {} of {} did not succeed:\n{}",
        run.run_id,
        run.job,
        run.render()
    );
    Ok(())
}

/// Run the demo in `work` (a scratch directory); `log` receives progress lines.
pub fn run(
    work: &Path,
    opts: &DemoOptions,
    log: &mut dyn FnMut(&str),
) -> anyhow::Result<DemoReport> {
    let started = Instant::now();
    let mut scenario = opts.scenario.clone();
    if let Some(max) = opts.disk_mib_max {
        for vm in &mut scenario.vms {
            for d in &mut vm.disks {
                d.size_mib = d.size_mib.min(max);
            }
        }
    }
    log(&format!(
        "starting the simulated provider: mock vCenter ({} VMs, {} proxy VMs, key providers {}), mock ESXi NBD-SSL, one agent per proxy, the orchestrator",
        scenario.vms.len(),
        scenario.proxies.len(),
        scenario
            .key_providers
            .iter()
            .map(|k| k.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let mut wo = WorldOptions::new(scenario, work);
    wo.poll = Duration::from_millis(100);
    wo.lesser_mode = opts.lesser_mode.clone();
    wo.vddk_library = opts.vddk_library.clone();
    let world = World::start(wo)?;
    for t in &world.tenants {
        if let Some(k) = &t.section.kms {
            log(&format!(
                "tenant {}: key provider {}, its own KMS at {} (KMIP over mutual TLS), key pair {:?}",
                t.name, t.key_provider, k.address, k.key_name
            ));
        }
    }
    for a in &world.agents {
        log(&format!(
            "agent {} at {}: modes {}, proxy VM key provider {}, tenants {}",
            a.id,
            a.url,
            a.modes.join("+"),
            a.key_provider.as_deref().unwrap_or("none (not encrypted)"),
            a.tenants.join(", ")
        ));
    }
    let orch = world.orchestrator()?;

    log("full backup of every VM (orchestrator run, key sync first)");
    let t = Instant::now();
    let full = world.runtime().block_on(orch.run_once(&[], true))?;
    let full_seconds = t.elapsed().as_secs_f64();
    full.iter().try_for_each(ensure_ok)?;

    // Every guest writes about `change` of each disk, as a running VM would.
    let admin = world.vcenter.admin();
    let mut changed = 0u64;
    for (i, vm) in world.tenants.iter().flat_map(|t| t.vms.iter()).enumerate() {
        for d in disk_keys(&full, vm) {
            let blocks = admin
                .write_random(
                    vm,
                    &d.to_string(),
                    opts.change,
                    opts.seed + i as u64,
                    64 << 10,
                )
                .map_err(|e| anyhow::anyhow!("guest write on {vm}: {e}"))?;
            changed += blocks.iter().map(|(_, l)| l).sum::<u64>();
        }
    }
    log(&format!(
        "guests wrote {:.1} MiB ({:.0}% of every disk)",
        changed as f64 / 1048576.0,
        opts.change * 100.0
    ));

    log("incremental backup of every VM");
    let t = Instant::now();
    let incr = world.runtime().block_on(orch.run_once(&[], false))?;
    let incr_seconds = t.elapsed().as_secs_f64();
    incr.iter().try_for_each(ensure_ok)?;

    let rows = table(&world, &full, &incr);

    // Restore the first VM through the agent that backed it up; compare with the
    // VM's disks (no guest wrote since the incremental).
    let first = rows.first().context("no VM was backed up")?;
    let (vm, proxy, tenant) = (first.vm.clone(), first.proxy.clone(), first.tenant.clone());
    let client = world.agent_client(&proxy)?;
    let target = work.join("restores").join(&vm);
    log(&format!(
        "restoring the latest point of {vm} through agent {proxy}"
    ));
    let job = world
        .runtime()
        .block_on(client.start_restore(&RestoreRequest {
            tenant: tenant.clone(),
            point: format!("latest:{vm}"),
            disks: None,
            target: RestoreTargetSpec::Directory {
                path: target.display().to_string(),
            },
        }))?;
    let done = world.runtime().block_on(async {
        loop {
            let j = client.job(&job.id).await?;
            if j.state.is_terminal() {
                return Ok::<_, anyhow::Error>(j);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })?;
    anyhow::ensure!(
        done.state == ferry::state::JobState::Succeeded,
        "restore of {vm} failed: {:?}",
        done.error
    );
    let keys: Vec<i64> = rows.iter().filter(|r| r.vm == vm).map(|r| r.disk).collect();
    for (n, key) in keys.iter().enumerate() {
        let file = ferry::job::runner::restore_path(&target, &vm, n as u32);
        let got = crate::diskgen::hash_file(&file)?.to_hex().to_string();
        let (want, _) = admin
            .digest(&vm, &key.to_string(), None)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(got == want, "{vm} disk {key}: restored image differs");
        std::fs::remove_file(&file)?;
    }
    let restore = format!(
        "{vm}: {} disk(s) bit-identical, restored through {proxy}",
        keys.len()
    );
    log(&restore);

    let mut verify = Vec::new();
    for t in &world.tenants {
        let repo = ferry::repo::Repository::open(&t.repository)?;
        let keys = t.key_source()?;
        let rep = ferry::repo::verify::verify(
            &repo,
            keys.as_ref(),
            &[],
            2,
            false,
            &ferry::progress::Progress::default(),
        )?;
        anyhow::ensure!(
            rep.ok(),
            "verify of {} found damage: {:?}",
            t.name,
            rep.points
        );
        let line = format!(
            "{}: {} restore points, {} chunks authenticated",
            t.name,
            rep.points.len(),
            rep.chunks_checked
        );
        log(&format!("verify {line}"));
        verify.push(line);
    }
    Ok(DemoReport {
        rows,
        full_seconds,
        incr_seconds,
        restore,
        verify,
        seconds: started.elapsed().as_secs_f64(),
        lesser_mode: opts.lesser_mode.clone(),
    })
}

/// Device keys of `vm`'s disks as a run reported them.
fn disk_keys(runs: &[RunSummary], vm: &str) -> Vec<i64> {
    runs.iter()
        .flat_map(|r| r.items.iter())
        .filter(|i| i.detail["vm"].as_str() == Some(vm))
        .flat_map(|i| {
            i.detail["result"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter_map(|d| d["disk_key"].as_i64())
        })
        .collect()
}

/// Seconds `vm` waited for a slot in `runs`.
fn waited(runs: &[RunSummary], vm: &str) -> f64 {
    runs.iter()
        .flat_map(|r| r.items.iter())
        .find(|i| i.detail["vm"].as_str() == Some(vm))
        .and_then(|i| i.detail["waited_ms"].as_u64())
        .unwrap_or(0) as f64
        / 1000.0
}

fn table(world: &World, full: &[RunSummary], incr: &[RunSummary]) -> Vec<DemoRow> {
    let find = |runs: &[RunSummary], vm: &str, key: i64| -> Option<serde_json::Value> {
        runs.iter()
            .flat_map(|r| r.items.iter())
            .filter(|i| i.detail["vm"].as_str() == Some(vm))
            .flat_map(|i| i.detail["result"].as_array().cloned().unwrap_or_default())
            .find(|d| d["disk_key"].as_i64() == Some(key))
    };
    let mut rows = Vec::new();
    for t in &world.tenants {
        for vm in &t.vms {
            for key in disk_keys(full, vm) {
                let Some(f) = find(full, vm, key) else {
                    continue;
                };
                let i = find(incr, vm, key).unwrap_or(serde_json::Value::Null);
                rows.push(DemoRow {
                    tenant: t.name.clone(),
                    vm: vm.clone(),
                    disk: key,
                    proxy: f["proxy"].as_str().unwrap_or("-").to_string(),
                    mode: f["mode"].as_str().unwrap_or("-").to_string(),
                    reason: f["reason"].as_str().unwrap_or("").to_string(),
                    full_wait: waited(full, vm),
                    full_bytes: f["bytes"].as_u64().unwrap_or(0),
                    full_rate: f["rate_bytes_per_sec"].as_f64().unwrap_or(0.0),
                    incr_bytes: i["bytes"].as_u64().unwrap_or(0),
                    incr_rate: i["rate_bytes_per_sec"].as_f64().unwrap_or(0.0),
                    incr_read: i["read"].as_str().unwrap_or("-").to_string(),
                });
            }
        }
    }
    rows
}

/// The report as the table `ferry-sim demo` prints.
pub fn render(r: &DemoReport) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    let mut s = format!(
        "{:<9} {:<14} {:>5}  {:<12} {:<7} {:>6} {:>9} {:>8} {:>9} {:>8} {:<5}  reason\n",
        "tenant",
        "vm",
        "disk",
        "proxy",
        "mode",
        "wait s",
        "full MiB",
        "MiB/s",
        "incr MiB",
        "MiB/s",
        "read"
    );
    for x in &r.rows {
        s.push_str(&format!(
            "{:<9} {:<14} {:>5}  {:<12} {:<7} {:>6.1} {:>9.1} {:>8.0} {:>9.1} {:>8.0} {:<5}  {}\n",
            x.tenant,
            x.vm,
            x.disk,
            x.proxy,
            x.mode,
            x.full_wait,
            mib(x.full_bytes),
            x.full_rate / 1048576.0,
            mib(x.incr_bytes),
            x.incr_rate / 1048576.0,
            x.incr_read,
            x.reason
        ));
    }
    let by = |m: &str| r.rows.iter().filter(|x| x.mode == m).count();
    s.push_str(&format!(
        "full backup of {} disks ({} hotadd, {} nbdssl, lesser_mode {}): {:.1}s; incremental: {:.1}s\nrestore: {}\n",
        r.rows.len(),
        by("hotadd"),
        by("nbdssl"),
        r.lesser_mode,
        r.full_seconds,
        r.incr_seconds,
        r.restore
    ));
    for v in &r.verify {
        s.push_str(&format!("verify: {v}\n"));
    }
    s.push_str(&format!("demo finished in {:.1}s\n", r.seconds));
    s
}
