//! `ferry-sim`: ferry's simulated world. `demo` runs the main job end to end on
//! embedded mocks with no setup.

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
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
