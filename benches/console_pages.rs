//! What the console's pages cost with many VMs (issue 19: "the pages hold up
//! with 500 VMs"). For each world size (default 50 and 500 VMs, the
//! whitepaper's provider scaled by `ferry_mocks::scale`), starts the world and
//! its console (`SimConsole`, snapshot refresh 2 s), logs in as `admin`,
//! checks that the pages are the real ones (the overview lists every VM,
//! `/api/plan` has a row for every VM), warms up, then per page measures
//! requests with a cold snapshot (the first request after the cached read of
//! the world expired: the request pays for the plan, the inventory and the
//! agents' /v1/info) and warm (served from the cached read), and the
//! response size. Then where a cold snapshot's time goes: the agents'
//! /v1/info, one inventory read (SOAP), the orchestrator's plan (of it: the
//! jobs' VM selections and the selector) and the console's whole read, each
//! timed alone.
//!
//! A plain main (harness = false), not criterion: a cold sample needs the
//! cache to expire first (2 s of sleep per sample), which criterion's
//! repetition would turn into many minutes per world.
//!
//! Run: `cargo bench --bench console_pages` (env: `CONSOLE_BENCH_VMS`, world
//! sizes, default `50,500`; `CONSOLE_BENCH_SAMPLES`, requests per page and
//! kind, default 20). About 4 minutes per world size, mostly waiting for
//! the snapshot to expire.

use ferry::console::views::Snapshot;
use ferry::orchestrator::plan::{plan_job, reported_load};
use ferry::orchestrator::schedule::select_vms;
use ferry_mocks::console::{ConsoleClient, SimConsole};
use ferry_mocks::world::{World, WorldOptions};
use std::time::{Duration, Instant};

/// `SimConsole`'s snapshot refresh.
const REFRESH: Duration = Duration::from_secs(2);
const SEED: u64 = 19;

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

/// A logged-in client that times its page reads.
struct Client(ConsoleClient);

impl Client {
    /// Logged in as `name`.
    fn login(base: &str, name: &str, password: &str) -> Client {
        Client(ConsoleClient::login(base, name, password).unwrap_or_else(|e| panic!("{e}")))
    }

    /// GET `path`: (seconds to the whole body, body).
    fn get(&self, path: &str) -> (f64, String) {
        let t = Instant::now();
        let body = self.0.get(path).unwrap_or_else(|e| panic!("{e}"));
        (t.elapsed().as_secs_f64(), body)
    }
}

/// Median and p95 (nearest rank) of `v`, in ms.
fn stats(v: &mut [f64]) -> (f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] * 1e3;
    (rank(0.5), rank(0.95))
}

/// The median in ms of `n` runs of `f` on the world's runtime.
fn time_on<F, Fut>(world: &World, n: usize, f: F) -> f64
where
    F: Fn() -> Fut,
    Fut: std::future::Future,
{
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            world.runtime().block_on(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    stats(&mut v).0
}

/// The median in ms of `n` runs of `f`.
fn time_cpu(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    stats(&mut v).0
}

struct Row {
    vms: usize,
    page: String,
    cold: (f64, f64),
    warm: (f64, f64),
    bytes: usize,
}

fn bench(n: usize, samples: usize, rows: &mut Vec<Row>, notes: &mut Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let scenario = ferry_mocks::scale::scenario(n, SEED);
    let world = World::start(WorldOptions::new(scenario.clone(), dir.path())).unwrap();
    ferry_mocks::scale::select_plain_vms(&world, &scenario).unwrap();
    let console = SimConsole::start(&world, 0).unwrap();
    let admin = console.account("admin").unwrap();
    let c = Client::login(&console.url(), &admin.name, &admin.password);
    eprintln!(
        "{n} VMs: world and console up in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    // The pages are the real ones: every VM listed, planned.
    let names: Vec<String> = scenario.vms.iter().map(|v| v.name.clone()).collect();
    let disks: usize = scenario.vms.iter().map(|v| v.disks.len()).sum();
    let (_, ov) = c.get("/api/overview");
    let ov: serde_json::Value = serde_json::from_str(&ov).unwrap();
    let listed: std::collections::HashMap<&str, &str> = ov["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v["moref"].as_str().unwrap()))
        .collect();
    for name in &names {
        assert!(listed.contains_key(name.as_str()), "overview lists {name}");
    }
    let (_, html) = c.get("/");
    let html_rows = html.matches("<tr data-moref=").count();
    assert!(
        html_rows >= n,
        "the overview page has {html_rows} VM rows, want {n}"
    );
    let (_, plan) = c.get("/api/plan");
    let plan: Vec<serde_json::Value> = serde_json::from_str(&plan).unwrap();
    assert!(
        plan.len() >= n,
        "/api/plan has {} rows, want {n}",
        plan.len()
    );
    let planned: std::collections::HashSet<&str> =
        plan.iter().map(|r| r["vm"].as_str().unwrap()).collect();
    for name in &names {
        assert!(planned.contains(name.as_str()), "/api/plan plans {name}");
    }
    let mut decisions: std::collections::BTreeMap<String, usize> = Default::default();
    for r in &plan {
        let k = format!(
            "{} refused={}",
            r["decision"].as_str().unwrap_or("?"),
            r["refused"]
        );
        *decisions.entry(k).or_default() += 1;
    }
    let one = listed[names[0].as_str()].to_string();
    notes.push(format!(
        "{n} VMs ({disks} disks, {} encrypted): overview {} VM rows, /api/plan {} rows {decisions:?}; /vms/{one} is {}",
        scenario.vms.iter().filter(|v| v.key_provider.is_some()).count(),
        html_rows,
        plan.len(),
        names[0]
    ));

    let pages = [
        "/".to_string(),
        "/plan".to_string(),
        "/api/plan".to_string(),
        format!("/vms/{one}"),
        "/agents".to_string(),
    ];
    for p in &pages {
        for _ in 0..3 {
            c.get(p);
        }
    }
    for p in &pages {
        let mut cold = Vec::with_capacity(samples);
        let mut warm = Vec::with_capacity(samples);
        let mut bytes = 0;
        for _ in 0..samples {
            std::thread::sleep(REFRESH + Duration::from_millis(150));
            let (s, body) = c.get(p);
            cold.push(s);
            bytes = body.len();
            // The read just taken serves this one.
            let (s, _) = c.get(p);
            warm.push(s);
        }
        rows.push(Row {
            vms: n,
            page: if p.starts_with("/vms/") {
                "/vms/{moref}".into()
            } else {
                p.clone()
            },
            cold: stats(&mut cold),
            warm: stats(&mut warm),
            bytes,
        });
        eprintln!("{n} VMs: {p} done");
    }

    // Where a cold snapshot goes, each part alone (the console idle).
    let o = console.orchestrator.clone();
    let vc = o.config().vcenters[0].clone();
    let k = samples.clamp(3, 10);
    let info = time_on(&world, k, || o.agent_statuses());
    let inv = time_on(&world, k, || o.inventory().vms(&vc));
    let plan = time_on(&world, k, || o.plan(&[]));
    let read = time_on(&world, k, || Snapshot::read(&o));
    // The same as a task of the world's runtime, where the console runs it.
    let read_spawned = time_on(&world, k, || {
        let o = o.clone();
        let h = world
            .runtime()
            .spawn(async move { drop(Snapshot::read(&o).await) });
        async move { h.await.unwrap() }
    });
    // The same after the idle time a cold page follows.
    let read_idle = time_on(&world, k, || {
        std::thread::sleep(REFRESH + Duration::from_millis(150));
        Snapshot::read(&o)
    }) - (REFRESH + Duration::from_millis(150)).as_secs_f64() * 1e3;
    // The plan's own work on one inventory read: the jobs' selections (VM
    // name globs), then the selector for every VM.
    let inventory = world.runtime().block_on(o.inventory().vms(&vc)).unwrap();
    let agents = world.runtime().block_on(o.agent_statuses());
    let cfg = o.config();
    let select = time_cpu(k, || {
        for job in &cfg.jobs {
            std::hint::black_box(select_vms(job, &inventory));
        }
    });
    let selector = time_cpu(k, || {
        let mut load = reported_load(&agents);
        for job in &cfg.jobs {
            let vms = select_vms(job, &inventory);
            std::hint::black_box(plan_job(cfg, job, &vms, &agents, &mut load));
        }
    }) - select;
    notes.push(format!(
        "{n} VMs, a cold snapshot's parts (median of {k}): agents' /v1/info {info:.1} ms, \
         one inventory read (SOAP, {} jobs + 1 per snapshot) {inv:.1} ms, plan (info + inventory per job + selection) {plan:.1} ms, \
         whole Snapshot::read {read:.1} ms back to back ({read_spawned:.1} ms as a task of the world's runtime), {read_idle:.1} ms after {:.1} s idle; of the plan: the jobs' VM selections (globs) {select:.1} ms, \
         the selector for every VM {selector:.1} ms",
        o.config().jobs.len(),
        (REFRESH + Duration::from_millis(150)).as_secs_f64()
    ));
    drop(c);
    drop(console);
    drop(world);
}

fn main() {
    let sizes = env_list("CONSOLE_BENCH_VMS", "50,500");
    let samples = env_list("CONSOLE_BENCH_SAMPLES", "20")
        .first()
        .copied()
        .unwrap_or(20)
        .max(1);
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for n in sizes {
        bench(n, samples, &mut rows, &mut notes);
    }
    println!(
        "\nconsole pages, {samples} requests per page and kind (cold: first request after the 2 s snapshot expired)\n"
    );
    println!(
        "| VMs | page | cold median ms | cold p95 ms | warm median ms | warm p95 ms | bytes |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {} |",
            r.vms, r.page, r.cold.0, r.cold.1, r.warm.0, r.warm.1, r.bytes
        );
    }
    println!();
    for n in &notes {
        println!("{n}");
    }
}
