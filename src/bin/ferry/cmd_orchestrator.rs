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
    /// Console accounts (docs/console.md): provider admins and per-tenant
    /// viewers and operators, stored with argon2id hashes in the state database.
    #[command(subcommand)]
    Account(AccountCmd),
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

/// `ferry orchestrator account ...`.
#[derive(Subcommand)]
pub enum AccountCmd {
    /// Create an account, or replace its password, role and tenant. The
    /// password is read from --password-file, else FERRY_CONSOLE_PASSWORD,
    /// else one line of standard input (at least 12 characters).
    Set {
        /// Orchestrator configuration file.
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
        /// Account name (letters, digits, '.', '_', '@', '-').
        name: String,
        /// viewer (sees), operator (backs up and restores) or admin (the
        /// provider's: everything, audit log).
        #[arg(long)]
        role: ferry::console::auth::Role,
        /// Confine the account to this tenant (required for tenant users;
        /// absent: the provider, every tenant).
        #[arg(long)]
        tenant: Option<String>,
        /// File whose first line is the password.
        #[arg(long)]
        password_file: Option<PathBuf>,
    },
    /// List accounts (never their hashes).
    List {
        /// Orchestrator configuration file.
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
    },
    /// Remove an account; its sessions end at their next request.
    Remove {
        /// Orchestrator configuration file.
        #[arg(long, short = 'c', env = "FERRY_ORCHESTRATOR_CONFIG")]
        config: PathBuf,
        /// Account name.
        name: String,
    },
}

fn read_password(file: Option<&std::path::Path>) -> anyhow::Result<zeroize::Zeroizing<String>> {
    let raw = if let Some(f) = file {
        zeroize::Zeroizing::new(
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?,
        )
    } else if let Ok(p) = std::env::var("FERRY_CONSOLE_PASSWORD") {
        zeroize::Zeroizing::new(p)
    } else {
        let mut line = zeroize::Zeroizing::new(String::new());
        std::io::stdin()
            .read_line(&mut line)
            .context("reading the password from standard input")?;
        line
    };
    Ok(zeroize::Zeroizing::new(
        raw.lines().next().unwrap_or("").to_string(),
    ))
}

fn account(cmd: AccountCmd, out: &Output) -> anyhow::Result<u8> {
    let config = match &cmd {
        AccountCmd::Set { config, .. }
        | AccountCmd::List { config }
        | AccountCmd::Remove { config, .. } => config.clone(),
    };
    let cfg = OrchestratorConfig::load(&config)?;
    std::fs::create_dir_all(&cfg.orchestrator.state_dir)
        .with_context(|| format!("creating {}", cfg.orchestrator.state_dir.display()))?;
    let path = cfg
        .orchestrator
        .state_dir
        .join(ferry::orchestrator::run::STATE_FILE);
    let store = ferry::state::StateStore::open_no_recovery(&path)?;
    match cmd {
        AccountCmd::Set {
            name,
            role,
            tenant,
            password_file,
            ..
        } => {
            if let Some(t) = &tenant {
                if cfg.tenant(t).is_none() {
                    anyhow::bail!(
                        "no [[tenant]] named {t:?} in {} (defined: {})",
                        config.display(),
                        cfg.tenants
                            .iter()
                            .map(|t| t.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            let password = read_password(password_file.as_deref())?;
            ferry::console::auth::check_account(&name, role, tenant.as_deref(), &password)
                .map_err(anyhow::Error::msg)?;
            let hash =
                ferry::console::auth::hash_password(&password).map_err(anyhow::Error::msg)?;
            store.put_account(&ferry::state::AccountRecord {
                name: name.clone(),
                password_hash: hash,
                role: role.as_str().into(),
                tenant: tenant.clone(),
                created_at: 0,
                updated_at: 0,
            })?;
            let v = serde_json::json!({"account": name, "role": role, "tenant": tenant});
            out.result(&v, || {
                format!(
                    "account {name} set: {role} of {}",
                    tenant.as_deref().unwrap_or("the provider (every tenant)")
                )
            });
            Ok(crate::exit::OK)
        }
        AccountCmd::List { .. } => {
            let list: Vec<serde_json::Value> = store
                .list_accounts()?
                .into_iter()
                .map(|a| {
                    serde_json::json!({"account": a.name, "role": a.role, "tenant": a.tenant,
                        "updated_at": ferry::state::rfc3339_ms(a.updated_at)})
                })
                .collect();
            out.result(&list, || {
                if list.is_empty() {
                    return "no console accounts (add one with `ferry orchestrator account set`)"
                        .into();
                }
                list.iter()
                    .map(|a| {
                        format!(
                            "{:<24} {:<9} {}",
                            a["account"].as_str().unwrap_or(""),
                            a["role"].as_str().unwrap_or(""),
                            a["tenant"].as_str().unwrap_or("(provider)")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            Ok(crate::exit::OK)
        }
        AccountCmd::Remove { name, .. } => {
            if store.remove_account(&name)? {
                out.result(&serde_json::json!({"removed": name}), || {
                    format!("account {name} removed")
                });
                Ok(crate::exit::OK)
            } else {
                anyhow::bail!("no console account {name:?}")
            }
        }
    }
}

/// The inventory: `inventory_file` vCenters read their file, `url` vCenters are
/// read live with the SOAP client.
fn inventory(_cfg: &OrchestratorConfig) -> Arc<dyn Inventory> {
    Arc::new(ConfigInventory {
        vsphere: Some(Arc::new(
            ferry::orchestrator::vcenter::VsphereInventory::new(),
        )),
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
                o.inventory().close().await;
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
                    o.inventory().close().await;
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
                let console = match o.config().console.clone() {
                    Some(c) => {
                        let h = ferry::console::start(o.clone(), &c).await?;
                        eprintln!("console: {}", h.url());
                        Some(h)
                    }
                    None => None,
                };
                let inventory = o.inventory().clone();
                o.run_scheduled(signals.wait()).await?;
                inventory.close().await;
                if let Some(h) = console {
                    h.stop().await;
                }
                Ok(crate::exit::OK)
            })
        }
        OrchestratorCmd::Account(cmd) => account(cmd, out),
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
