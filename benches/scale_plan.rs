//! Inventory and plan at provider scale (issue 21): for each world size (default
//! 500, 5,000 and 10,000 VMs; 50 tenants, 60 proxies, `ferry_mocks::provider`),
//! the first full read of the inventory, then the steady state the orchestrator
//! lives in — an incremental read (`WaitForUpdatesEx`, `orchestrator::vcenter`)
//! plus the plan of every tenant's job (`select_vms` + `plan_job`, the pure part of
//! `Orchestrator::plan`) — with no change and with churn (1% of the VMs renamed
//! or re-keyed between reads), and the orchestrator process's peak RSS.
//!
//! Three processes per size, so that the RSS is the orchestrator's own: this
//! binary starts itself as the **mock vCenter** (`SCALE_BENCH_ROLE=mock`: builds
//! the world, serves it, answers what each proxy's agent would answer on
//! `/v1/info`, applies churn on request over stdin) and as the **orchestrator**
//! (`SCALE_BENCH_ROLE=orchestrator`: config, inventory, plan; reports `VmHWM`
//! and `VmRSS` from /proc/self/status). No agent and no KMS is started: the
//! agents' answers come as JSON, as they would over HTTP, and the key providers
//! are names vCenter reports (the control plane is what is measured).
//!
//! A plain main (harness = false), not criterion: each size needs its own
//! processes and a world of up to 10,000 VMs built once.
//!
//! Run: `cargo bench --bench scale_plan` (env: `SCALE_BENCH_VMS`, sizes, default
//! `500,5000,10000`; `SCALE_BENCH_TENANTS`, default 50; `SCALE_BENCH_PROXIES`,
//! default 60; `SCALE_BENCH_ROUNDS`, steady rounds per kind, default 10). Record
//! the load average next to the figures: the machine is shared.

use ferry::agent::api::Info;
use ferry::orchestrator::inventory::Inventory;
use ferry::orchestrator::plan::{plan_job, reported_load, AgentStatus};
use ferry::orchestrator::schedule::select_vms;
use ferry::orchestrator::vcenter::{ReadKind, VsphereInventory};
use ferry::orchestrator::OrchestratorConfig;
use ferry_mocks::provider::{generate, ProviderSpec};
use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SEED: u64 = 21;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

fn spec(vms: usize) -> ProviderSpec {
    ProviderSpec::new(
        vms,
        env_num("SCALE_BENCH_TENANTS", 50),
        env_num("SCALE_BENCH_PROXIES", 60),
        SEED,
    )
}

/// What the mock process tells the orchestrator process.
#[derive(serde::Serialize, serde::Deserialize)]
struct Hello {
    url: String,
    ca: String,
    user: String,
    password: String,
    build_ms: u128,
    agents: BTreeMap<String, Info>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)
                .and_then(|r| r.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// The mock vCenter process: build, serve, answer churn requests.
fn mock(vms: usize) {
    let t0 = Instant::now();
    let p = generate(&spec(vms));
    let vc = VcenterMock::start(VcenterOptions::new(p.scenario.clone())).expect("mock vCenter");
    let build_ms = t0.elapsed().as_millis();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let agents = rt.block_on(async {
        let mut c = ferry::vsphere::ClientConfig::new(
            &vc.url(),
            vc.user(),
            zeroize::Zeroizing::new(vc.password().to_string()),
            ferry::vsphere::ServerTrust::Ca(vc.ca_path().to_path_buf()),
        );
        c.page_size = 1000;
        let client = ferry::vsphere::Client::connect(c).await.expect("login");
        let infos = p.agent_infos(&client).await.expect("agent infos");
        client.logout().await;
        infos
            .into_iter()
            .filter_map(|(k, v)| match v {
                AgentStatus::Up { info } => Some((k, *info)),
                AgentStatus::Down { .. } => None,
            })
            .collect()
    });
    let hello = Hello {
        url: vc.url(),
        ca: vc.ca_path().display().to_string(),
        user: vc.user().to_string(),
        password: vc.password().to_string(),
        build_ms,
        agents,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&hello).unwrap()).unwrap();
    out.flush().unwrap();
    drop(out);
    let admin = vc.admin();
    let base: Vec<String> = p.scenario.vms.iter().map(|v| v.name.clone()).collect();
    let mut names = base.clone();
    let kps: Vec<String> = p.tenants.iter().map(|t| t.key_provider.clone()).collect();
    let mut round = 0usize;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        // "churn N": rename N/2 VMs and re-key N/2 others (other VMs each round).
        if let Some(n) = line
            .strip_prefix("churn ")
            .and_then(|n| n.parse::<usize>().ok())
        {
            round += 1;
            for k in 0..n {
                let i = (round * 7919 + k * 104_729) % names.len();
                if k % 2 == 0 {
                    let new = format!("{}-r{round}", base[i]);
                    if admin.rename_vm(&names[i], &new).is_ok() {
                        names[i] = new;
                    }
                } else {
                    let _ = admin.set_key_provider(&names[i], Some(&kps[(i + round) % kps.len()]));
                }
            }
            println!("ok");
        } else {
            break;
        }
    }
    vc.stop();
}

struct Round {
    inv_ms: f64,
    plan_ms: f64,
    /// Of `plan_ms`: the jobs' VM selections.
    select_ms: f64,
    kind: ReadKind,
}

/// The orchestrator process.
fn orchestrator(vms: usize) {
    let rounds = env_num("SCALE_BENCH_ROUNDS", 10);
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .env("SCALE_BENCH_ROLE", "mock")
        .env("SCALE_BENCH_SIZE", vms.to_string())
        .arg("--bench")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the mock process");
    let mut mock_in = child.stdin.take().unwrap();
    let mut mock_out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    mock_out.read_line(&mut line).expect("mock hello");
    let hello: Hello = serde_json::from_str(line.trim()).expect("mock hello JSON");
    let base_hwm = status_kib("VmHWM:");

    let dir = tempfile::tempdir().unwrap();
    let p = generate(&spec(vms));
    let pw = dir.path().join("vc.password");
    std::fs::write(&pw, &hello.password).unwrap();
    let token = dir.path().join("agent.token");
    std::fs::write(&token, "x".repeat(32)).unwrap();
    let text = p.orchestrator_toml(
        &dir.path().join("state"),
        &hello.url,
        &pw,
        std::path::Path::new(&hello.ca),
        &token,
    );
    let cfg = OrchestratorConfig::parse(&text, &dir.path().join("orchestrator.toml"))
        .expect("generated orchestrator configuration");
    let agents: BTreeMap<String, AgentStatus> = hello
        .agents
        .into_iter()
        .map(|(k, info)| {
            (
                k,
                AgentStatus::Up {
                    info: Box::new(info),
                },
            )
        })
        .collect();
    let vc = cfg.vcenter("vc1").unwrap().clone();
    let inv = VsphereInventory::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let round = |planned: &mut usize| -> Round {
        let t = Instant::now();
        let list = rt.block_on(inv.vms(&vc)).expect("inventory");
        let inv_ms = ms(t.elapsed());
        let t = Instant::now();
        let mut load = reported_load(&agents);
        let mut n = 0;
        let mut select = Duration::ZERO;
        for job in &cfg.jobs {
            let ts = Instant::now();
            let sel = select_vms(job, &list);
            select += ts.elapsed();
            let plan = plan_job(&cfg, job, &sel, &agents, &mut load);
            n += plan.vms.len();
            std::hint::black_box(plan);
        }
        *planned = n;
        Round {
            inv_ms,
            plan_ms: ms(t.elapsed()),
            select_ms: ms(select),
            kind: inv.last_read("vc1").unwrap().kind,
        }
    };
    let mut planned = 0;
    let first = round(&mut planned);
    assert!(matches!(first.kind, ReadKind::Full { .. }));
    let mut steady = Vec::new();
    for _ in 0..rounds {
        let r = round(&mut planned);
        assert!(
            matches!(r.kind, ReadKind::Incremental { .. }),
            "{:?}",
            r.kind
        );
        steady.push(r);
    }
    let churn_n = (vms / 100).max(2);
    let mut churn = Vec::new();
    for _ in 0..rounds {
        writeln!(mock_in, "churn {churn_n}").unwrap();
        mock_in.flush().unwrap();
        let mut ok = String::new();
        mock_out.read_line(&mut ok).unwrap();
        let r = round(&mut planned);
        assert!(
            matches!(r.kind, ReadKind::Incremental { .. }),
            "{:?}",
            r.kind
        );
        churn.push(r);
    }
    let hwm = status_kib("VmHWM:");
    let rss = status_kib("VmRSS:");
    // What the mock vCenter itself takes to answer a WaitForUpdatesEx with no
    // change (it recomputes every filter's values: a real vCenter tracks changes
    // as they happen), measured on a watch of its own after the RSS was read.
    let server_ms = rt.block_on(async {
        let c =
            ferry::vsphere::Client::connect(VsphereInventory::client_config(&vc, 1000).unwrap())
                .await
                .unwrap();
        let mut w = c
            .create_watch(
                &["VirtualMachine"],
                &[&[(
                    "VirtualMachine",
                    ferry::orchestrator::vcenter::INVENTORY_VM_PATHS,
                )]],
            )
            .await
            .unwrap();
        c.wait_for_updates(&mut w, 1000).await.unwrap();
        let mut v = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let u = c.wait_for_updates(&mut w, 1000).await.unwrap();
            v.push(ms(t.elapsed()));
            assert!(u.is_empty());
        }
        c.logout().await;
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    });
    drop(mock_in);
    let _ = child.wait();
    let stat = |rs: &[Round], f: fn(&Round) -> f64| -> (f64, f64) {
        let mut v: Vec<f64> = rs.iter().map(f).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        (v[v.len() / 2], v[v.len() - 1])
    };
    let (si, _) = stat(&steady, |r| r.inv_ms);
    let (sp, _) = stat(&steady, |r| r.plan_ms);
    let (ss, _) = stat(&steady, |r| r.select_ms);
    let (st, stmax) = stat(&steady, |r| r.inv_ms + r.plan_ms);
    let (ci, _) = stat(&churn, |r| r.inv_ms);
    let (cp, _) = stat(&churn, |r| r.plan_ms);
    let (ct, ctmax) = stat(&churn, |r| r.inv_ms + r.plan_ms);
    println!(
        "RESULT {vms} {} {} {planned} {} {:.0} {:.0} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {:.1} {churn_n} {:.1} {:.1} {:.1} {:.1} {:.1}",
        p.tenants.len(),
        p.proxies.len(),
        hello.build_ms,
        first.inv_ms,
        first.plan_ms,
        si,
        sp,
        st,
        stmax,
        ci,
        cp,
        ct,
        ctmax,
        base_hwm as f64 / 1024.0,
        hwm as f64 / 1024.0,
        rss as f64 / 1024.0,
        server_ms,
        ss,
    );
}

fn main() {
    match std::env::var("SCALE_BENCH_ROLE").as_deref() {
        Ok("mock") => return mock(env_num("SCALE_BENCH_SIZE", 500)),
        Ok("orchestrator") => return orchestrator(env_num("SCALE_BENCH_SIZE", 500)),
        _ => {}
    }
    // `cargo bench` passes --bench; `cargo test --benches` runs it without: skip.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("SCALE_BENCH_VMS")
        .unwrap_or_else(|_| "500,5000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!("load average before: {}", load.trim());
    println!(
        "{:>6} {:>4} {:>4} {:>7} | {:>8} | {:>9} {:>8} | {:>22} | {:>22} | {:>9}",
        "VMs",
        "T",
        "P",
        "planned",
        "mock ms",
        "1st read",
        "1st plan",
        "steady inv+plan med/max",
        "churn inv+plan med/max",
        "RSS MiB"
    );
    let exe = std::env::current_exe().unwrap();
    for n in sizes {
        let out = Command::new(&exe)
            .env("SCALE_BENCH_ROLE", "orchestrator")
            .env("SCALE_BENCH_SIZE", n.to_string())
            .arg("--bench")
            .stderr(Stdio::inherit())
            .output()
            .expect("run the orchestrator process");
        let text = String::from_utf8_lossy(&out.stdout);
        let Some(r) = text.lines().find_map(|l| l.strip_prefix("RESULT ")) else {
            eprintln!("size {n}: no result ({})", out.status);
            continue;
        };
        let f: Vec<&str> = r.split(' ').collect();
        println!(
            "{:>6} {:>4} {:>4} {:>7} | {:>8} | {:>6} ms {:>5} ms | {:>5}+{:>5} = {:>5}/{:>5} ms | {:>5}+{:>5} = {:>5}/{:>5} ms | {:>4} (base {:>4}, now {:>4}) churn {}",
            f[0], f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], f[9], f[10], f[11], f[12], f[13], f[14], f[17], f[16], f[18], f[15]
        );
        println!(
            "       of steady: mock vCenter's own WaitForUpdatesEx (no change) {} ms; jobs' VM selections {} ms of the plan",
            f[19], f[20]
        );
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        println!("       load average after: {}", load.trim());
    }
}
