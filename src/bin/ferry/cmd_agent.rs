//! `ferry agent`: run the agent HTTP API of this backup proxy until SIGTERM or
//! Ctrl-C, then shut down gracefully (running jobs cancelled, cleaned up and
//! recorded). `--openapi` prints the API document instead.

use crate::render::Output;
use anyhow::Context;
use clap::Args;
use ferry::agent::{Agent, JobRunner};
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Args)]
pub struct AgentArgs {
    /// Configuration file with an [agent] section (docs/configuration.md).
    #[arg(
        long,
        short = 'c',
        env = "FERRY_CONFIG",
        required_unless_present = "openapi"
    )]
    config: Option<PathBuf>,
    /// Print the OpenAPI document of the agent API (JSON) and exit.
    #[arg(long)]
    openapi: bool,
}

/// The job runner of the agent: VM backups through vCenter, restores to files,
/// the orphan sweep and key sync, all from the config file.
fn runner(cfg: &ferry::config::Config) -> anyhow::Result<Arc<dyn JobRunner>> {
    let r =
        ferry::job::runner::VmJobRunner::from_config(cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
    if cfg.vcenter.is_none() {
        tracing::warn!(
            "no [vcenter] section: this agent restores and syncs keys but refuses backups"
        );
    }
    Ok(Arc::new(r))
}

pub fn run(a: AgentArgs, out: &Output) -> anyhow::Result<u8> {
    if a.openapi {
        println!("{}", ferry::agent::openapi::json());
        return Ok(crate::exit::OK);
    }
    let path = a.config.context("--config is required")?;
    let cfg = ferry::config::Config::load(&path)?;
    let agent = Agent::from_config(&cfg)?;
    let runner = runner(&cfg)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("ferry-agent")
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        // Handlers first: a SIGTERM right after "serving" must shut down cleanly.
        let signals = Signals::install()?;
        let running = agent.start(runner).await?;
        let url = running.url();
        out.result(&serde_json::json!({"event": "serving", "url": url}), || {
            format!("ferry agent serving on {url}")
        });
        signals.wait().await;
        let report = running.shutdown().await?;
        if report.still_running.is_empty() {
            // VixDiskLib_Exit once nothing uses VDDK (a no-op without [vddk]).
            if let Err(e) = ferry::transport::vddk::Vddk::shutdown() {
                tracing::warn!(error = %e, "VDDK not shut down");
            }
        }
        out.result(
            &serde_json::json!({"event": "stopped", "still_running": report.still_running}),
            || {
                if report.still_running.is_empty() {
                    "ferry agent stopped".to_string()
                } else {
                    format!(
                        "ferry agent stopped; jobs still cleaning up (swept at next start): {}",
                        report.still_running.join(", ")
                    )
                }
            },
        );
        Ok(crate::exit::OK)
    })
}

/// SIGTERM (systemd stop) and SIGINT (Ctrl-C) handlers, installed before the
/// service announces itself.
pub struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    /// Install the handlers (inside the runtime).
    pub fn install() -> anyhow::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    /// Wait for either signal.
    pub async fn wait(mut self) {
        tokio::select! {
            _ = self.term.recv() => tracing::info!("SIGTERM received"),
            _ = self.int.recv() => tracing::info!("SIGINT received"),
        }
    }
}
