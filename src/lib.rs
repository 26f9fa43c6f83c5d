//! ferry: a backup proxy agent for VMware vSphere for multi-tenant service providers.
//!
//! The library holds everything the `ferry` binary does; the binary only parses
//! arguments, renders output and maps errors to exit codes. Module map:
//!
//! - [`keys`]: data keys, key wrapping and the [`keys::KeySource`] trait.
//! - [`repo`]: the repository format (see `docs/format.md`), chunk store, indexes,
//!   manifests, keyring, locking, verify and prune.
//! - [`transport`]: where disk blocks come from ([`transport::DiskSource`]).
//! - [`pipeline`]: the multithreaded data plane (read → hash/compress/encrypt → write
//!   and back).
//! - [`job`]: one backup or restore, start to cleanup.
//! - [`kmip`]: the KMIP TTLV codec (the KMS client builds on it).
//! - [`nbd_server`]: serving disks over NBD (`ferry export`, the mock ESXi host).
//! - [`export`]: instant access, a restore point disk as an NBD export backend.
//! - [`files`]: file-level restore: partition tables and file systems (ext2/3/4,
//!   NTFS, FAT) read from a restore point's disk without restoring it.
//! - [`glob`]: shell-style name patterns.
//! - [`mount`]: a restore point's disks as read-only files over FUSE (`ferry mount`).
//! - [`config`]: the TOML configuration file.
//! - [`progress`]: lock-free progress counters that front ends render.
//! - [`bench`]: the `ferry bench` measurements.
//! - [`tls`]: rustls client configuration (pinned CA or thumbprint, client certificates).
//! - [`vsphere`]: the vim25 SOAP client for vCenter (session, inventory, snapshots,
//!   CBT, HotAdd, NBD tickets).
//! - [`agent`]: the HTTP/JSON API of one backup proxy (`ferry agent`) and the
//!   [`agent::JobRunner`] seam the VM backup job plugs into.
//! - [`orchestrator`]: places VMs on agents, dispatches, polls, schedules and
//!   runs the key sync (`ferry orchestrator`), over the agents' HTTP API.
//! - [`console`]: the web console `ferry orchestrator run` serves (pages, accounts,
//!   sessions, tenant isolation).
//! - [`state`]: SQLite state of the agent and the orchestrator (jobs, key registry,
//!   run history) with crash recovery.

pub mod agent;
pub mod bench;
pub mod config;
pub mod console;
pub mod export;
pub mod files;
pub mod glob;
pub mod job;
pub mod keys;
pub mod kmip;
pub mod mount;
pub mod nbd_server;
pub mod orchestrator;
pub mod pipeline;
pub mod progress;
pub mod repo;
pub mod state;
pub mod tls;
pub mod transport;
pub mod vsphere;
