//! ferry's vSphere control plane: a vim25 SOAP client for vCenter (reqwest on
//! ferry's own rustls configuration + quick-xml), giving the backup job everything it
//! asks of vCenter. See `docs/vsphere.md` (methods, privileges, certificate pinning,
//! troubleshooting, and the shapes ferry and its mock share).
//!
//! Layout, one job per file:
//! - [`xml`]: hardened XML → bounded element tree (size/depth/count caps, no DTD).
//! - [`soap`]: envelope writing, response/fault unwrapping (pure).
//! - [`types`]: typed vim25 values and their decoders (pure).
//! - [`error`]: [`VsphereError`] and the fault → error mapping (pure).
//! - [`client`]: session: TLS, login, cookie, re-login, retries, timeouts.
//! - [`collector`]: property collector with container views and paging.
//! - [`inventory`]: VMs, hosts, clusters, datastores.
//! - [`updates`]: a property filter watched with `WaitForUpdatesEx` (the
//!   orchestrator's incremental inventory).
//! - [`tasks`]: waiting for tasks.
//! - [`snapshot`]: create/remove/read snapshots, leftover `ferry-*` snapshots.
//! - [`cbt`]: enable CBT, QueryChangedDiskAreas with paging.
//! - [`hotadd`]: attach/detach a snapshot disk (or, writable, a restore's new
//!   disk) to the proxy VM.
//! - [`newdisk`]: create a restore's new disk on a VM, destroy it after a failure.
//! - [`ticket`]: NBD tickets (read a snapshot disk, write a VM's new disk).
//!
//! A backup job uses, in order: [`Client::connect`], [`Client::vm_by_name`] (config,
//! disks, key provider, CBT), [`Client::enable_cbt`] if needed,
//! [`Client::create_snapshot`], [`Client::snapshot_disks`], then per disk
//! [`Client::changed_areas`] and either [`Client::attach_disk`] /
//! [`Client::detach_disk`] or [`Client::nbd_ticket`], and always
//! [`Client::remove_snapshot`] and [`Client::logout`]. [`Client::ferry_snapshots`]
//! lists what crashed jobs left behind. A restore into a VM uses
//! [`Client::create_disk`], then [`Client::attach_disk_for_write`] /
//! [`Client::detach_disk`] or [`Client::nbd_write_ticket`], and on failure
//! [`Client::destroy_disk`].

pub mod cbt;
pub mod client;
pub mod collector;
pub mod error;
pub mod hotadd;
pub mod inventory;
pub mod newdisk;
pub mod snapshot;
pub mod soap;
pub mod tasks;
pub mod ticket;
pub mod types;
pub mod updates;
pub mod xml;

#[cfg(test)]
mod tests;

pub use client::{Client, ClientConfig, Replay, ServerTrust};
pub use error::VsphereError;
pub use hotadd::AttachedDisk;
pub use newdisk::NewDiskSpec;
pub use snapshot::{snapshot_name, LeftoverSnapshot, SNAPSHOT_DESCRIPTION_PREFIX, SNAPSHOT_PREFIX};
pub use types::{
    Cluster, CryptoKeyId, Datastore, DiskArea, DiskChangeInfo, Host, MoRef, NbdTicket,
    SnapshotNode, TaskInfo, TaskState, VirtualDisk, Vm,
};
