//! `ferry-sim`: ferry's simulated world. `demo` runs the main job end to end on
//! the whole simulated provider with no setup; `up` keeps that world running for
//! hands-on use; `vcenter` runs the mock vCenter standalone, `kms` the mock KMS;
//! `gen-disk` and `mutate` make and change test images.

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
        /// When a VM may use a lesser mode instead of waiting for a free slot on
        /// its best proxy: `never` (full HotAdd), `after=DURATION` (`after=0s`:
        /// spill over at once, as before round 2) or `when-idle`.
        #[arg(long, default_value = "never", value_parser = parse_lesser_mode)]
        lesser_mode: String,
        /// Carry every disk through VDDK: the mock libvixDiskLib (crate
        /// ferry-mock-vddk; `cargo build --release -p ferry-mock-vddk` puts it
        /// next to this binary), or the library at PATH.
        #[arg(long, num_args = 0..=1, value_name = "PATH")]
        vddk: Option<Option<PathBuf>>,
        /// Keep the world's directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// One backup night over a generated world (the whitepaper's provider with
    /// N small VMs): every VM backed up once through the orchestrator; prints
    /// wall time, jobs per second, busy answers (429), the most backups at once
    /// per host and datastore, and how long agents sat idle while work for
    /// them was queued (docs/performance.md, "Dispatch at scale").
    Night {
        /// Generated VMs.
        #[arg(long, default_value_t = 200)]
        vms: usize,
        /// Scenario seed.
        #[arg(long, default_value_t = 7)]
        seed: u64,
        /// Slots of each agent.
        #[arg(long, default_value_t = 4)]
        slots: u32,
        /// The orchestrator's poll interval, ms.
        #[arg(long, default_value_t = 50)]
        poll_ms: u64,
        /// `[dispatch] max_snapshots_per_host` (0: no cap).
        #[arg(long, default_value_t = 4)]
        max_per_host: u32,
        /// `[dispatch] max_snapshots_per_datastore` (0: no cap).
        #[arg(long, default_value_t = 4)]
        max_per_datastore: u32,
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
        /// Also run the orchestrator in-process with its web console on
        /// http://127.0.0.1:PORT (0 picks a port); prints the accounts (admin,
        /// and an operator and a viewer per tenant) with their passwords.
        #[arg(long, value_name = "PORT")]
        console: Option<u16>,
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
    /// Run the mock KMS (KMIP 1.4 over mutual TLS) until interrupted.
    Kms {
        /// KMIP port (0 picks a free one).
        #[arg(long, default_value_t = ferry_mocks::kms::KMIP_PORT)]
        port: u16,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        bind: std::net::IpAddr,
        /// State directory: key pairs (kms-state.json, private keys in clear: mock
        /// only) and certificates, kept across restarts; a temporary directory,
        /// removed at exit, when absent.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Fault: answer every request this many milliseconds late.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fault: refuse Decrypt (clients must fetch private keys instead).
        #[arg(long)]
        no_decrypt: bool,
        /// Fault: put Attribute elements inside KeyValue in Get answers.
        #[arg(long)]
        attributes_in_key_value: bool,
        /// Fault: behave as if these objects did not exist (repeatable).
        #[arg(long = "hide-key", value_name = "ID")]
        hide_keys: Vec<String>,
        /// Fault: start down (connections are closed at once).
        #[arg(long)]
        down: bool,
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
    init_logs("warn,ferry_mocks=info");
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
    wait_for_signal()?;
    mock.stop();
    Ok(())
}

struct KmsFaultFlags {
    latency_ms: u64,
    no_decrypt: bool,
    attributes_in_key_value: bool,
    hide_keys: Vec<String>,
    down: bool,
}

fn wait_for_signal() -> anyhow::Result<()> {
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
    Ok(())
}

fn run_kms(
    port: u16,
    bind: std::net::IpAddr,
    dir: Option<PathBuf>,
    faults: KmsFaultFlags,
    json: bool,
) -> anyhow::Result<()> {
    use anyhow::Context;
    use ferry_mocks::kms::{KmsMock, KmsOptions, MissingKeys};
    init_logs("warn,ferry_mocks=info");
    let opts = KmsOptions {
        bind,
        port,
        state_dir: dir,
        ..Default::default()
    };
    let kms =
        KmsMock::start(opts).with_context(|| format!("starting the mock KMS on {bind}:{port}"))?;
    let f = kms.faults();
    f.set_latency(std::time::Duration::from_millis(faults.latency_ms));
    f.set_decrypt_unsupported(faults.no_decrypt);
    f.set_attributes_in_key_value(faults.attributes_in_key_value);
    f.set_down(faults.down);
    if !faults.hide_keys.is_empty() {
        f.set_missing(MissingKeys::Ids(faults.hide_keys.iter().cloned().collect()));
    }
    let objects = kms.objects().len();
    if json {
        let v = serde_json::json!({
            "address": kms.address(),
            "ca": kms.ca_path(),
            "client_cert": kms.client_cert_path(),
            "client_key": kms.client_key_path(),
            "server_name": "localhost",
            "state_file": kms.state_path(),
            "state_dir": kms.state_dir(),
            "objects": objects,
        });
        println!("{v}");
    } else {
        println!("mock KMS (KMIP 1.4 over mutual TLS, {objects} objects)");
        println!("address:     {}", kms.address());
        println!("ca:          {}", kms.ca_path().display());
        println!("client cert: {}", kms.client_cert_path().display());
        println!("client key:  {}", kms.client_key_path().display());
        println!(
            "state file:  {} (private keys in clear: mock only)",
            kms.state_path().display()
        );
        println!(
            "ferry flags: --kms {} --kms-ca {} --kms-cert {} --kms-client-key {} --kms-server-name localhost",
            kms.address(),
            kms.ca_path().display(),
            kms.client_cert_path().display(),
            kms.client_key_path().display()
        );
        println!("press Ctrl-C to stop");
    }
    wait_for_signal()?;
    kms.stop();
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
        // No colour codes into files and journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .try_init();
}

fn parse_lesser_mode(s: &str) -> Result<String, String> {
    s.parse::<ferry::orchestrator::scheduler::LesserMode>()
        .map(|m| m.to_string())
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

/// The mock VDDK library for `--vddk`: PATH, or `libvixDiskLib.so` next to
/// this binary.
fn vddk_library(arg: Option<Option<PathBuf>>) -> anyhow::Result<Option<PathBuf>> {
    let Some(arg) = arg else {
        return Ok(None);
    };
    let p = match arg {
        Some(p) => p,
        None => ferry_mocks::fixtures::mock_vddk_library().ok_or_else(|| {
            anyhow::anyhow!(
                "--vddk: no libvixDiskLib.so beside ferry-sim; build the mock VDDK first: cargo build --release -p ferry-mock-vddk"
            )
        })?,
    };
    anyhow::ensure!(
        p.exists(),
        "--vddk: {} does not exist; build the mock VDDK first: cargo build --release -p ferry-mock-vddk",
        p.display()
    );
    Ok(Some(p))
}

#[allow(clippy::too_many_arguments)]
fn run_demo(
    scenario: Option<PathBuf>,
    disk_mib_max: Option<u64>,
    change: f64,
    lesser_mode: String,
    vddk: Option<Option<PathBuf>>,
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
    opts.lesser_mode = lesser_mode;
    opts.vddk_library = vddk_library(vddk)?;
    let (_tmp, work) = workdir(keep)?;
    let report = demo::run(&work, &opts, &mut |m| eprintln!("ferry-sim: {m}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", demo::render(&report));
    }
    Ok(())
}

fn run_night(
    opts: ferry_mocks::night::NightOptions,
    keep: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<()> {
    init_logs("warn");
    let (_tmp, work) = workdir(keep)?;
    let report = ferry_mocks::night::run(&work, &opts, &mut |m| eprintln!("ferry-sim: {m}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", ferry_mocks::night::render(&report));
    }
    Ok(())
}

fn run_up(
    scenario: Option<PathBuf>,
    disk_mib_max: Option<u64>,
    dir: Option<PathBuf>,
    console: Option<u16>,
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
        if let Some(k) = &t.section.kms {
            println!(
                "  its KMS      {}  CA {}  client cert {}  key {:?}",
                k.address,
                k.ca.display(),
                k.client_cert
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                k.key_name
            );
        }
    }
    println!("orchestrator   {}", world.orchestrator_config.display());
    let console = match console {
        Some(port) => Some(ferry_mocks::console::SimConsole::start(&world, port)?),
        None => None,
    };
    if let Some(c) = &console {
        println!();
        println!(
            "console        {}  (the orchestrator runs inside ferry-sim)",
            c.url()
        );
        for a in &c.accounts {
            println!(
                "  account {:<22} password {}  {} of {}",
                a.name,
                a.password,
                a.role,
                a.tenant.as_deref().unwrap_or("the provider")
            );
        }
    }
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
    if console.is_none() {
        println!(
            "  ferry orchestrator run -c {} --once",
            world.orchestrator_config.display()
        );
    }
    println!(
        "  ferry orchestrator history -c {}",
        world.orchestrator_config.display()
    );
    if let Some(a) = world.agents.first() {
        println!("  ferry vsphere ls --config {}", a.config.display());
    }
    println!();
    println!("press Ctrl-C to stop");
    wait_for_signal()?;
    eprintln!("ferry-sim: stopping");
    drop(console);
    drop(world);
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Kms {
            port,
            bind,
            dir,
            latency_ms,
            no_decrypt,
            attributes_in_key_value,
            hide_keys,
            down,
            json,
        } => {
            let faults = KmsFaultFlags {
                latency_ms,
                no_decrypt,
                attributes_in_key_value,
                hide_keys,
                down,
            };
            match run_kms(port, bind, dir, faults, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
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
            lesser_mode,
            vddk,
            keep,
            json,
        } => exit(run_demo(
            scenario,
            disk_mib_max,
            change,
            lesser_mode,
            vddk,
            keep,
            json,
        )),
        Cmd::Up {
            scenario,
            disk_mib_max,
            dir,
            console,
        } => exit(run_up(scenario, disk_mib_max, dir, console)),
        Cmd::Night {
            vms,
            seed,
            slots,
            poll_ms,
            max_per_host,
            max_per_datastore,
            keep,
            json,
        } => exit(run_night(
            ferry_mocks::night::NightOptions {
                vms,
                seed,
                agent_slots: slots,
                poll: std::time::Duration::from_millis(poll_ms.max(1)),
                max_snapshots_per_host: max_per_host,
                max_snapshots_per_datastore: max_per_datastore,
                workers: 1,
            },
            keep,
            json,
        )),
    }
}
