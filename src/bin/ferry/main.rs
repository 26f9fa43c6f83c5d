//! The `ferry` command line: argument parsing, output rendering (tables, JSON,
//! progress bars) and exit codes. All work happens in the `ferry` library.
mod args;
mod cmd_agent;
mod cmd_bench;
mod cmd_data;
mod cmd_export;
mod cmd_files;
mod cmd_keys;
mod cmd_mount;
mod cmd_orchestrator;
mod cmd_repo;
mod cmd_vm;
mod cmd_vsphere;
mod exit;
mod render;

use clap::{Parser, Subcommand};
use ferry::progress::Progress;
use render::Output;
use std::process::ExitCode;
use std::sync::Arc;

/// ferry: backup proxy agent for VMware vSphere with per-tenant KMS keys.
#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about,
    long_about = None,
    propagate_version = true,
    after_help = "Exit codes: 0 ok, 1 failed, 2 usage, 3 damage found, 4 repository locked, 5 key problem, 6 no space, 130 cancelled.\nDocs: docs/operations.md"
)]
struct Cli {
    /// Print results as JSON on stdout (for scripts); logs stay on stderr.
    #[arg(long, global = true)]
    json: bool,
    /// More log output on stderr (-v info, -vv debug). RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Never draw progress bars.
    #[arg(long, global = true)]
    no_progress: bool,
    #[command(subcommand)]
    cmd: Cmd,
}
#[derive(Subcommand)]
enum Cmd {
    /// Repository administration.
    #[command(subcommand)]
    Repo(cmd_repo::RepoCmd),
    /// Back up disk images, block devices, NBD exports or a vSphere VM (--vm) into
    /// a new restore point.
    Backup(Box<cmd_data::BackupArgs>),
    /// Restore points.
    #[command(subcommand)]
    Points(cmd_data::PointsCmd),
    /// Restore one disk of a restore point to a new file or a block device, or
    /// (--vm) every disk into new disks of a vSphere VM.
    Restore(cmd_data::RestoreArgs),
    /// Serve one disk of a restore point read-only over NBD (instant access).
    Export(cmd_export::ExportArgs),
    /// List, find and copy out single files of a restore point (ext2/3/4, NTFS,
    /// FAT) without restoring the disk.
    #[command(
        subcommand,
        after_help = "Examples:\n  ferry files volumes -r /repo latest:vm1\n  ferry files ls -r /repo latest:vm1 --partition 2 /etc\n  ferry files find -r /repo latest:vm1 --partition 2 '*.conf' --under /etc\n  ferry files get -r /repo latest:vm1 --partition 2 /etc/nginx --out /tmp/restore\nExit codes: 0 ok, 1 wrong path/partition or unsupported file system, 3 damaged data (get restores the rest), 5 key problem.\nDocs: docs/files.md"
    )]
    Files(cmd_files::FilesCmd),
    /// Present a restore point's disks as read-only files (FUSE) for loop mounts.
    Mount(cmd_mount::MountArgs),
    /// Read and authenticate every chunk of every (or the given) restore point.
    Verify(cmd_data::VerifyArgs),
    /// Apply retention and garbage-collect unreferenced chunks.
    Prune(cmd_data::PruneArgs),
    /// Measure data-plane throughput on this machine.
    Bench(cmd_bench::BenchArgs),
    /// Key utilities.
    #[command(subcommand)]
    Keys(cmd_keys::KeysCmd),
    /// vCenter: list VMs and disks, snapshots, certificate thumbprints.
    #[command(subcommand)]
    Vsphere(cmd_vsphere::VsphereCmd),
    /// Run the agent HTTP API of this backup proxy (until SIGTERM).
    Agent(cmd_agent::AgentArgs),
    /// Place VMs on agents, dispatch backups, schedules and key sync.
    #[command(subcommand)]
    Orchestrator(cmd_orchestrator::OrchestratorCmd),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match cli.verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let progress = Arc::new(Progress::default());
    // Services (agent) handle SIGTERM/SIGINT themselves with a graceful shutdown.
    if !matches!(cli.cmd, Cmd::Agent(_) | Cmd::Orchestrator(_)) {
        let p = progress.clone();
        // First Ctrl-C / SIGTERM asks every stage to stop; cleanup still runs.
        let _ = ctrlc::set_handler(move || p.request_cancel());
    }
    let out = Output::new(cli.json, !cli.no_progress && !cli.json);
    match run(cli.cmd, &out, &progress) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            let code = exit::exit_code(&e);
            out.error(&e, code);
            ExitCode::from(code)
        }
    }
}

fn run(cmd: Cmd, out: &Output, progress: &Arc<Progress>) -> anyhow::Result<u8> {
    match cmd {
        Cmd::Repo(c) => cmd_repo::run(c, out),
        Cmd::Backup(a) => cmd_data::backup(*a, out, progress),
        Cmd::Points(c) => cmd_data::points(c, out),
        Cmd::Restore(a) => cmd_data::restore(a, out, progress),
        Cmd::Export(a) => cmd_export::export(a, out, progress),
        Cmd::Files(c) => cmd_files::run(c, out, progress),
        Cmd::Mount(a) => cmd_mount::mount(a, out, progress),
        Cmd::Verify(a) => cmd_data::verify(a, out, progress),
        Cmd::Prune(a) => cmd_data::prune(a, out),
        Cmd::Bench(a) => cmd_bench::bench(a, out, progress),
        Cmd::Keys(c) => cmd_keys::run(c, out),
        Cmd::Vsphere(c) => cmd_vsphere::run(c, out),
        Cmd::Agent(a) => cmd_agent::run(a, out),
        Cmd::Orchestrator(c) => cmd_orchestrator::run(c, out),
    }
}
