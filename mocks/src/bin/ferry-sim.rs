//! `ferry-sim`: ferry's simulated world. `demo` runs the main job end to end on
//! embedded mocks with no setup; `vcenter` runs the mock vCenter standalone, `kms`
//! the mock KMS.

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
    init_logs();
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

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,ferry_mocks=info")),
        )
        .try_init();
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
    init_logs();
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
