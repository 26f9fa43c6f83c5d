//! `ferry-sim`: ferry's simulated world. `demo` runs the main job end to end on
//! embedded mocks with no setup; `vcenter` runs the mock vCenter standalone.

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
    /// Generate a disk, back it up (full + incremental), restore, verify, summarise.
    Demo {
        /// Disk size in MiB.
        #[arg(long, default_value_t = 1024)]
        disk_mib: u64,
        /// Generator seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep the scratch directory here instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
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
            disk_mib,
            seed,
            keep,
            json,
        } => {
            let tmp;
            let work = match keep {
                Some(p) => {
                    if let Err(e) = std::fs::create_dir_all(&p) {
                        eprintln!("error: {}: {e}", p.display());
                        return ExitCode::FAILURE;
                    }
                    p
                }
                None => match tempfile::Builder::new().prefix("ferry-sim-").tempdir() {
                    Ok(t) => {
                        tmp = t;
                        tmp.path().to_path_buf()
                    }
                    Err(e) => {
                        eprintln!("error: cannot create a scratch directory: {e}");
                        return ExitCode::FAILURE;
                    }
                },
            };
            let opts = DemoOptions {
                disk_size: disk_mib << 20,
                seed,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            match demo::run(&work, &opts, &mut |m| eprintln!("ferry-sim: {m}")) {
                Ok(rows) => {
                    if json {
                        println!(
                            "{}",
                            serde_json::to_string_pretty(&rows).unwrap_or_default()
                        );
                    } else {
                        println!(
                            "{:<14} {:<26} {:>10} {:>10} {:>8} {:>9}  check",
                            "step", "point", "read MiB", "wrote MiB", "seconds", "MiB/s"
                        );
                        for r in &rows {
                            println!(
                                "{:<14} {:<26} {:>10.1} {:>10.1} {:>8.2} {:>9.0}  {}",
                                r.step,
                                r.point,
                                r.read as f64 / 1048576.0,
                                r.stored as f64 / 1048576.0,
                                r.seconds,
                                r.rate_mib_s,
                                r.check
                            );
                        }
                        println!("demo finished in {:.1}s: every restore is bit-identical and the repository verifies", started.elapsed().as_secs_f64());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
