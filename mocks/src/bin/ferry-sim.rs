//! `ferry-sim`: ferry's simulated world. `demo` runs the main job end to end on
//! the whole simulated provider with no setup; `up` keeps that world running for
//! hands-on use; `vcenter` runs the mock vCenter standalone; `gen-disk` and
//! `mutate` make and change test images.

use clap::{Parser, Subcommand};
use ferry_mocks::demo::{self, DemoOptions};
use std::path::PathBuf;
use std::process::ExitCode;

/// ferry's simulator: runs ferry end to end against its own mocks.
#[derive(Parser)]
#[command(name = "ferry-sim", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The main job on the whole simulated provider, no setup: mock vCenter, mock
    /// ESXi NBD-SSL, a HotAdd agent per tenant plus a shared NBD-SSL agent, the
    /// orchestrator; full + incremental backup of every VM, one restore checked
    /// bit for bit, verify; prints VM/disk -> proxy, mode, reason, bytes, rate.
    Demo {
        /// Scenario file (default: the built-in whitepaper world, docs/mocks.md).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Cap every disk at this many MiB (quicker runs).
        #[arg(long)]
        disk_mib_max: Option<u64>,
        /// Fraction of every disk the guests change between the two backups.
        #[arg(long, default_value_t = 0.01)]
        change: f64,
        /// Keep the world's directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Start the whole simulated provider and keep it running: prints every
    /// endpoint and example `curl`/`ferry` commands; Ctrl-C stops it.
    Up {
        /// Scenario file (default: the built-in whitepaper world).
        #[arg(long)]
        scenario: Option<PathBuf>,
        /// Cap every disk at this many MiB.
        #[arg(long)]
        disk_mib_max: Option<u64>,
        /// The world's directory (configs, repositories, state); kept at exit.
        /// Default: a temporary directory, removed at exit.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Write a deterministic disk image (sparse where the profile has zeros).
    GenDisk {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
        /// Size in MiB.
        #[arg(long)]
        size_mib: u64,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Percentage of zero (hole) regions.
        #[arg(long, default_value_t = 20)]
        zero_pct: u8,
        /// Percentage of compressible regions; the rest is random.
        #[arg(long, default_value_t = 40)]
        compressible_pct: u8,
    },
    /// Run the mock vCenter (vim25 SOAP over HTTPS) on a scenario until interrupted.
    Vcenter {
        /// Scenario file (TOML; see docs/mocks.md and mocks/scenarios/).
        #[arg(long)]
        scenario: PathBuf,
        /// HTTPS port (0 picks a free one).
        #[arg(long, default_value_t = 8989)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// State directory (datastores, hot-add device directories, ca-cert.pem);
        /// a temporary directory, removed at exit, when absent.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Admin API token (random when absent).
        #[arg(long)]
        admin_token: Option<String>,
        /// Print the connection details as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Overwrite a fraction of an image with random blocks, as a guest would.
    Mutate {
        /// Image file.
        #[arg(long)]
        image: PathBuf,
        /// Fraction to change (0.01 = 1%).
        #[arg(long, default_value_t = 0.01)]
        fraction: f64,
        /// Block size in KiB.
        #[arg(long, default_value_t = 64)]
        block_kib: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn run_vcenter(
    scenario: PathBuf,
    port: u16,
    bind: std::net::IpAddr,
    dir: Option<PathBuf>,
    admin_token: Option<String>,
    json: bool,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferry_mocks::vcenter::{VcenterMock, VcenterOptions};
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ferry_mocks=info")),
        )
        .try_init();
    let mut opts = VcenterOptions::from_file(&scenario)?;
    opts.port = port;
    opts.bind = bind;
    opts.state_dir = dir;
    opts.admin_token = admin_token;
    let mock = VcenterMock::start(opts)
        .with_context(|| format!("starting the mock vCenter on {bind}:{port}"))?;
    let state = mock.admin().state();
    let proxies: Vec<(String, String)> = state
        .vms
        .iter()
        .filter_map(|v| Some((v.name.clone(), v.device_dir.clone()?)))
        .collect();
    if json {
        let v = serde_json::json!({
            "url": mock.url(),
            "user": mock.user(),
            "password": mock.password(),
            "admin_token": mock.admin_token(),
            "admin_url": format!("https://{}/admin/", mock.addr()),
            "ca": mock.ca_path(),
            "state_dir": mock.state_dir(),
            "vms": state.vms.len(),
            "device_dirs": proxies.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        });
        println!("{v}");
    } else {
        println!(
            "mock vCenter ({} VMs and proxies, scenario {:?})",
            state.vms.len(),
            state.scenario
        );
        println!("url:         {}", mock.url());
        println!("user:        {}", mock.user());
        println!("password:    {}", mock.password());
        println!("admin token: {}", mock.admin_token());
        println!("admin api:   https://{}/admin/", mock.addr());
        println!("ca:          {}", mock.ca_path().display());
        println!("state dir:   {}", mock.state_dir().display());
        for (name, dir) in &proxies {
            println!("proxy {name}: hot-add devices in {dir}");
        }
        println!("press Ctrl-C to stop");
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    mock.stop();
    Ok(())
}

fn exit(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logs(default: &str) {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .try_init();
}

fn demo_options(
    scenario: Option<PathBuf>,
    disk_mib_max: Option<u64>,
) -> anyhow::Result<DemoOptions> {
    let mut o = DemoOptions::builtin()?;
    if let Some(p) = scenario {
        o.scenario = ferry_mocks::vcenter::Scenario::load(&p)?;
    }
    o.disk_mib_max = disk_mib_max;
    Ok(o)
}

/// A scratch directory: `keep` (created) or a temporary one removed at exit.
fn workdir(keep: Option<PathBuf>) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf)> {
    match keep {
        Some(p) => {
            std::fs::create_dir_all(&p)?;
            Ok((None, p))
        }
        None => {
            let t = tempfile::Builder::new().prefix("ferry-sim-").tempdir()?;
            let p = t.path().to_path_buf();
            Ok((Some(t), p))
        }
    }
}

fn run_demo(
    scenario: Option<PathBuf>,
    disk_mib_max: Option<u64>,
    change: f64,
    keep: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0.0..=1.0).contains(&change),
        "--change must be between 0 and 1"
    );
    init_logs("warn");
    let mut opts = demo_options(scenario, disk_mib_max)?;
    opts.change = change;
    let (_tmp, work) = workdir(keep)?;
    let report = demo::run(&work, &opts, &mut |m| eprintln!("ferry-sim: {m}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", demo::render(&report));
    }
    Ok(())
}

fn run_up(
    scenario: Option<PathBuf>,
    disk_mib_max: Option<u64>,
    dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    use ferry_mocks::world::{World, WorldOptions};
    init_logs("warn,ferry=info,ferry_mocks=info");
    let opts = demo_options(scenario, disk_mib_max)?;
    let mut sc = opts.scenario.clone();
    if let Some(max) = opts.disk_mib_max {
        for vm in &mut sc.vms {
            for d in &mut vm.disks {
                d.size_mib = d.size_mib.min(max);
            }
        }
    }
    let (_tmp, work) = workdir(dir)?;
    let world = World::start(WorldOptions::new(sc, &work))?;
    let vc = &world.vcenter;
    println!(
        "ferry-sim: the simulated provider is up (directory {})",
        world.dir.display()
    );
    println!();
    println!(
        "mock vCenter   {}  user {}  password file {}",
        vc.url(),
        vc.user(),
        world.dir.join("secrets/vcenter.password").display()
    );
    println!(
        "               admin API https://{}/admin/  token {}",
        vc.addr(),
        vc.admin_token()
    );
    println!(
        "mock ESXi NBD  127.0.0.1:{} (TLS required)",
        world.esxi.port()
    );
    println!("CA (all TLS)   {}", world.ca.display());
    println!("agent token    {}", world.token_file.display());
    for a in &world.agents {
        println!(
            "agent {:<12} {}  modes {}  key provider {}  tenants {}  config {}",
            a.id,
            a.url,
            a.modes.join("+"),
            a.key_provider.as_deref().unwrap_or("-"),
            a.tenants.join(","),
            a.config.display()
        );
    }
    for t in &world.tenants {
        println!(
            "tenant {:<11} key provider {}  repository {}  {} VMs",
            t.name,
            t.key_provider,
            t.repository.display(),
            t.vms.len()
        );
    }
    println!("orchestrator   {}", world.orchestrator_config.display());
    let first = world
        .agents
        .first()
        .map(|a| a.url.clone())
        .unwrap_or_default();
    println!();
    println!("try:");
    println!(
        "  curl --cacert {} -H \"Authorization: Bearer $(cat {})\" {first}/v1/info",
        world.ca.display(),
        world.token_file.display()
    );
    println!(
        "  ferry orchestrator plan -c {} --explain",
        world.orchestrator_config.display()
    );
    println!(
        "  ferry orchestrator run -c {} --once",
        world.orchestrator_config.display()
    );
    println!(
        "  ferry orchestrator history -c {}",
        world.orchestrator_config.display()
    );
    if let Some(a) = world.agents.first() {
        println!("  ferry vsphere ls --config {}", a.config.display());
    }
    println!();
    println!("press Ctrl-C to stop");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    world.runtime().block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r,
            _ = term.recv() => Ok(()),
        }
    })?;
    eprintln!("ferry-sim: stopping");
    drop(world);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Vcenter {
            scenario,
            port,
            bind,
            dir,
            admin_token,
            json,
        } => match run_vcenter(scenario, port, bind, dir, admin_token, json) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::GenDisk {
            out,
            size_mib,
            seed,
            zero_pct,
            compressible_pct,
        } => {
            if zero_pct as u16 + compressible_pct as u16 > 100 {
                eprintln!("error: --zero-pct + --compressible-pct must not exceed 100");
                return ExitCode::from(2);
            }
            let spec = ferry_mocks::diskgen::DiskSpec {
                size: size_mib << 20,
                seed,
                zero_pct,
                compressible_pct,
                region: 1 << 20,
            };
            match ferry_mocks::diskgen::generate(&out, &spec) {
                Ok(n) => {
                    println!(
                        "wrote {} ({} MiB, {} MiB of data)",
                        out.display(),
                        size_mib,
                        n >> 20
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {}: {e}", out.display());
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Mutate {
            image,
            fraction,
            block_kib,
            seed,
        } => match ferry_mocks::diskgen::mutate(&image, seed, fraction, block_kib << 10) {
            Ok(ch) => {
                println!(
                    "changed {} blocks of {block_kib} KiB in {}",
                    ch.len(),
                    image.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {}: {e}", image.display());
                ExitCode::FAILURE
            }
        },
        Cmd::Demo {
            scenario,
            disk_mib_max,
            change,
            keep,
            json,
        } => exit(run_demo(scenario, disk_mib_max, change, keep, json)),
        Cmd::Up {
            scenario,
            disk_mib_max,
            dir,
        } => exit(run_up(scenario, disk_mib_max, dir)),
    }
}
