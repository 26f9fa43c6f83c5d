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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
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
