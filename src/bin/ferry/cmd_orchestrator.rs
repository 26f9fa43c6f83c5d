//! `ferry orchestrator`: plan (changes nothing), run (once or on schedule), and
//! the run history.

use crate::render::Output;
use anyhow::Context;
use clap::Subcommand;
use ferry::orchestrator::{ConfigInventory, Inventory, Orchestrator, OrchestratorConfig};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Subcommand)]
pub enum OrchestratorCmd {
    /// Read the inventory, ask every agent for /v1/info, run the transport
    /// selector and print which agent and mode each VM disk would get, and why.
    /// Changes nothing.
    Plan {
        /// Orchestrator configuration file (docs/orchestrator.md).
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
        /// Only this job (repeatable).
        #[arg(long = "job")]
        jobs: Vec<String>,
        /// Also print every candidate proxy and mode with its reason.
        #[arg(long)]
        explain: bool,
    },
    /// Dispatch backups to the agents and record the history: with --once, every
    /// job (or those named) and the key sync now, then exit (status 1 if any VM
    /// failed); without, run on the configured schedules until SIGTERM.
    Run {
        /// Orchestrator configuration file.
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
        /// Run every job once now, whatever its schedule, and exit.
        #[arg(long)]
        once: bool,
        /// With --once: only this job (repeatable).
        #[arg(long = "job", requires = "once")]
        jobs: Vec<String>,
        /// With --once: skip the key sync.
        #[arg(long, requires = "once")]
        no_key_sync: bool,
    },
    /// Show the recorded runs, newest first.
    History {
        /// Orchestrator configuration file.
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
        /// Only this job (or key-sync).
        #[arg(long)]
        job: Option<String>,
        /// How many runs.
        #[arg(long, default_value_t = 10)]
        limit: u32,
    },
}

/// The inventory: `inventory_file` vCenters read their file, `url` vCenters are
/// read live with the SOAP client.
fn inventory(_cfg: &OrchestratorConfig) -> Arc<dyn Inventory> {
    Arc::new(ConfigInventory {
        vsphere: Some(Arc::new(ferry::orchestrator::vcenter::VsphereInventory)),
    })
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-orchestrator")
        .build()
        .context("starting the async runtime")
}

pub fn run(cmd: OrchestratorCmd, out: &Output) -> anyhow::Result<u8> {
    match cmd {
        OrchestratorCmd::Plan {
            config,
            jobs,
            explain,
        } => {
            let cfg = OrchestratorConfig::load(&config)?;
            let inv = inventory(&cfg);
            runtime()?.block_on(async move {
                let o = Orchestrator::open_reader(cfg, inv).await?;
                let report = o.plan(&jobs).await?;
                out.result(&report, || report.render(explain));
                Ok(crate::exit::OK)
            })
        }
        OrchestratorCmd::Run {
            config,
            once,
            jobs,
            no_key_sync,
        } => {
            let cfg = OrchestratorConfig::load(&config)?;
            let inv = inventory(&cfg);
            runtime()?.block_on(async move {
                let (o, recovered) = Orchestrator::open(cfg, inv).await?;
                for r in &recovered.runs {
                    tracing::warn!(run = %r.id, job = %r.job, "a previous orchestrator stopped during this run; marked failed");
                }
                let o = Arc::new(o);
                if once {
                    let runs = o.run_once(&jobs, !no_key_sync).await?;
                    let ok = runs
                        .iter()
                        .all(|r| r.state == ferry::state::RunState::Succeeded);
                    out.result(&runs, || {
                        runs.iter().map(|r| r.render()).collect::<Vec<_>>().join("\n")
                    });
                    return Ok(if ok {
                        crate::exit::OK
                    } else {
                        crate::exit::FAILED
                    });
                }
                let signals = crate::cmd_agent::Signals::install()?;
                o.run_scheduled(signals.wait()).await?;
                Ok(crate::exit::OK)
            })
        }
        OrchestratorCmd::History { config, job, limit } => {
            let cfg = OrchestratorConfig::load(&config)?;
            let inv = inventory(&cfg);
            runtime()?.block_on(async move {
                let o = Orchestrator::open_reader(cfg, inv).await?;
                let store = o.store().clone();
                let runs =
                    tokio::task::spawn_blocking(move || store.list_runs(job.as_deref(), limit))
                        .await??;
                let mut summaries = Vec::new();
                for r in runs {
                    summaries.push(o.summary(&r.id).await?);
                }
                out.result(&summaries, || {
                    if summaries.is_empty() {
                        "no runs recorded".to_string()
                    } else {
                        summaries
                            .iter()
                            .map(|r| r.render())
                            .collect::<Vec<_>>()
                            .join("\n")
                    }
                });
                Ok(crate::exit::OK)
            })
        }
    }
}
