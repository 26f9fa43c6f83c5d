//! The orchestrator (`ferry orchestrator plan|run`): reads the vCenter
//! inventory, asks every agent what it is (`GET /v1/info`), runs the transport
//! selector over all of them to place each VM of each job on one agent,
//! dispatches the VMs respecting slots, retries on another valid agent when one
//! is down or refuses, polls the agents' jobs, records the history in SQLite,
//! applies retention through the agents, and runs the key sync system job on a
//! schedule (default every 24 h).
//!
//! Never holds key material: agents own the tenant KMS credentials and do every
//! key operation; the orchestrator holds agent tokens and records key ids and
//! versions only.
//!
//! Files: [`config`] (its TOML format), [`inventory`] (the inventory seam),
//! [`client`] (the agent API seam and its HTTPS client), [`plan`] (pure
//! placement), [`scheduler`] (pure capacity over time: the slot ledger and
//! the jobs' wait policies), [`dispatch`] (pure fair queuing across tenants,
//! snapshot caps per host and datastore, back-off after busy answers), [`schedule`] (pure schedules and VM selection), [`run`]
//! (dispatch, polling, history, key sync, scheduler), [`vcenter`] (the live
//! inventory over the SOAP client). Documented for operators in
//! docs/orchestrator.md.

pub mod client;
pub mod config;
pub mod dispatch;
pub mod inventory;
pub mod plan;
pub mod run;
pub mod schedule;
pub mod scheduler;
pub mod vcenter;

pub use config::OrchestratorConfig;
pub use inventory::{ConfigInventory, FileInventory, Inventory, InventoryVm, StaticInventory};
pub use run::{Orchestrator, OrchestratorError, RunSummary};
