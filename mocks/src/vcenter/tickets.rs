//! NBD access tickets (the contract's use of `AcquireGenericServiceTicket`): parse
//! and check `httpGet nbd://<host>/<vm>/<snapshot>/<disk key>` (read a snapshot's
//! disk) and `httpPut nbd://<host>/<vm>/<disk key>` (write a VM's live disk, as a
//! restore into a new disk does) requests, hand out opaque export names that expire
//! after an idle time, and resolve them for the ESXi NBD server through
//! [`ferry::nbd_server::ExportProvider`]: read tickets as read-only exports of the
//! frozen content, write tickets as writable exports of the live disk.
//!
//! Owns the ticket table and the provider; the NBD serving loop lives elsewhere.

use super::codec::{Fault, Obj, Val};
use super::disk::{Disk, ReaderKind};
use super::ids;
use super::inventory::Inventory;
use super::vim;
use super::world::{lock, World};
use ferry::nbd_server::{ExportBackend, ExportProvider, ExportRefused};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Default idle lifetime of a ticket (the contract: 30 minutes).
pub const TICKET_TTL: Duration = Duration::from_secs(30 * 60);

/// One ticket.
#[derive(Clone, Debug)]
pub struct Ticket {
    /// Export name.
    pub id: String,
    /// VM moref id.
    pub vm: String,
    /// Snapshot moref id; `None` for a write ticket of the live disk.
    pub snapshot: Option<String>,
    /// Disk device key.
    pub disk_key: i32,
    last_used: Instant,
}

/// The ticket table.
#[derive(Debug)]
pub struct Tickets {
    map: HashMap<String, Ticket>,
    ttl: Duration,
}

impl Tickets {
    /// Tickets live `ttl` after their last use.
    pub fn new(ttl: Duration) -> Tickets {
        Tickets {
            map: HashMap::new(),
            ttl,
        }
    }

    /// Number of unexpired tickets.
    pub fn live(&self) -> usize {
        self.map
            .values()
            .filter(|t| t.last_used.elapsed() <= self.ttl)
            .count()
    }

    /// Expire every ticket now (fault injection).
    pub fn expire_all(&mut self) -> usize {
        let n = self.map.len();
        self.map.clear();
        n
    }

    /// Drop tickets of removed snapshots.
    pub fn forget_snapshots<'a>(&mut self, ids: impl Iterator<Item = &'a str>) {
        let gone: Vec<&str> = ids.collect();
        self.map
            .retain(|_, t| t.snapshot.as_deref().is_none_or(|s| !gone.contains(&s)));
    }

    fn take(&mut self, id: &str) -> Result<Ticket, String> {
        self.map.retain(|_, t| t.last_used.elapsed() <= self.ttl);
        let t = self
            .map
            .get_mut(id)
            .ok_or_else(|| format!("unknown or expired NBD ticket {:?}", short(id)))?;
        t.last_used = Instant::now();
        Ok(t.clone())
    }
}

fn short(id: &str) -> String {
    id.chars().take(12).collect::<String>() + if id.len() > 12 { "..." } else { "" }
}

/// The parts of an `nbd://<host>/<vm>/<snapshot>/<disk key>` (read) or
/// `nbd://<host>/<vm>/<disk key>` (write) ticket URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketUrl {
    /// Host moref id.
    pub host: String,
    /// VM moref id.
    pub vm: String,
    /// Snapshot moref id; `None`: the VM's live disk.
    pub snapshot: Option<String>,
    /// Disk device key.
    pub disk_key: i32,
}

/// Parse a ticket URL.
pub fn parse_url(url: &str) -> Result<TicketUrl, String> {
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| format!("ticket url {url:?} must start with nbd://"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if !(3..=4).contains(&parts.len()) || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "ticket url {url:?} must be nbd://<host>/<vm>/<snapshot>/<disk key> (read) or nbd://<host>/<vm>/<disk key> (write)"
        ));
    }
    let last = parts[parts.len() - 1];
    let disk_key = last
        .parse()
        .map_err(|_| format!("disk key {last:?} in {url:?} is not a number"))?;
    Ok(TicketUrl {
        host: parts[0].into(),
        vm: parts[1].into(),
        snapshot: (parts.len() == 4).then(|| parts[2].to_string()),
        disk_key,
    })
}

/// Check a ticket request against the inventory; returns the host's NBD address.
pub fn check(inv: &Inventory, u: &TicketUrl) -> Result<String, Fault> {
    let bad = |m: String| vim::invalid_argument(Some("spec.url"), m);
    let hi = inv
        .host_index(&u.host)
        .ok_or_else(|| bad(format!("no host {:?}", u.host)))?;
    let vi = inv
        .vm_index(&u.vm)
        .ok_or_else(|| bad(format!("no VM {:?}", u.vm)))?;
    let vm = &inv.vms[vi];
    if vm.host != hi {
        return Err(bad(format!(
            "VM {} runs on host {}, not {}",
            vm.name, inv.hosts[vm.host].id, u.host
        )));
    }
    match &u.snapshot {
        Some(snap) => {
            let s = vm
                .snapshots
                .iter()
                .find(|s| &s.id == snap)
                .ok_or_else(|| bad(format!("VM {} has no snapshot {snap:?}", vm.name)))?;
            if !s.disks.iter().any(|d| d.key == u.disk_key) {
                return Err(bad(format!(
                    "snapshot {} of VM {} has no disk {}",
                    s.id, vm.name, u.disk_key
                )));
            }
        }
        None => {
            let d = vm
                .disk(u.disk_key)
                .ok_or_else(|| bad(format!("VM {} has no disk {}", vm.name, u.disk_key)))?;
            if let Some(by) = inv.live_attached_by(&d.disk) {
                return Err(vim::file_locked(
                    &d.disk.live_file_name(),
                    format!(
                        "Unable to access file {} since it is locked: it is hot-added to VM {by}",
                        d.disk.live_file_name()
                    ),
                ));
            }
            inv.check_file_lock(
                &d.disk.live_file_name(),
                &format!("cannot open disk {} of VM {} for write", d.label, vm.name),
            )?;
        }
    }
    Ok(inv.hosts[hi].address.clone())
}

/// AcquireGenericServiceTicket for an NBD URL: `httpGet` with a snapshot (read),
/// `httpPut` without one (write the live disk).
pub fn acquire(world: &World, method: &str, url: &str) -> Result<Val, Fault> {
    let u = parse_url(url).map_err(|m| vim::invalid_argument(Some("spec.url"), m))?;
    match (method, &u.snapshot) {
        ("httpGet", Some(_)) | ("httpPut", None) => {}
        ("httpGet", None) => {
            return Err(vim::invalid_argument(
                Some("spec.url"),
                "a read ticket (httpGet) names a snapshot: nbd://<host>/<vm>/<snapshot>/<disk key>",
            ))
        }
        ("httpPut", Some(_)) => {
            return Err(vim::invalid_argument(
                Some("spec.method"),
                "snapshot disks are read-only: write tickets (httpPut) name a live disk, nbd://<host>/<vm>/<disk key>",
            ))
        }
        _ => {
            return Err(vim::invalid_argument(
                Some("spec.method"),
                format!("NBD tickets are requested with method httpGet (read) or httpPut (write), not {method:?}"),
            ))
        }
    }
    let host_name = check(&lock(&world.inv), &u)?;
    let id = ids::token(20);
    lock(&world.tickets).map.insert(
        id.clone(),
        Ticket {
            id: id.clone(),
            vm: u.vm,
            snapshot: u.snapshot,
            disk_key: u.disk_key,
            last_used: Instant::now(),
        },
    );
    let thumb = lock(&world.nbd_thumbprint).clone();
    Ok(Val::Obj(
        Obj::new("SessionManagerGenericServiceTicket")
            .f("id", Val::s(id))
            .f("hostName", Val::s(host_name))
            .opt("sslThumbprint", thumb.map(Val::Str)),
    ))
}

/// Resolves NBD export names (tickets) to snapshot disks for the mock ESXi host.
#[derive(Clone)]
pub struct TicketProvider {
    world: Arc<World>,
}

impl TicketProvider {
    /// A provider over a mock vCenter's world.
    pub fn new(world: Arc<World>) -> TicketProvider {
        TicketProvider { world }
    }
}

impl ExportProvider for TicketProvider {
    fn open(&self, name: &str) -> Result<Arc<dyn ExportBackend>, ExportRefused> {
        let t = lock(&self.world.tickets)
            .take(name)
            .map_err(ExportRefused)?;
        let inv = lock(&self.world.inv);
        let refused = |m: String| ExportRefused(m);
        let vi = inv
            .vm_index(&t.vm)
            .ok_or_else(|| refused(format!("VM {} is gone", t.vm)))?;
        let Some(snapshot) = &t.snapshot else {
            let d = inv.vms[vi].disk(t.disk_key).ok_or_else(|| {
                refused(format!("VM {} has no disk {} (any more)", t.vm, t.disk_key))
            })?;
            if let Some(by) = inv.live_attached_by(&d.disk) {
                return Err(refused(format!(
                    "disk {} of VM {} is hot-added to VM {by}",
                    t.disk_key, t.vm
                )));
            }
            return Ok(Arc::new(LiveDisk(d.disk.clone())));
        };
        let s = inv.vms[vi]
            .snapshots
            .iter()
            .find(|s| &s.id == snapshot)
            .ok_or_else(|| refused(format!("snapshot {snapshot} was removed")))?;
        let d = s
            .disks
            .iter()
            .find(|d| d.key == t.disk_key)
            .ok_or_else(|| refused(format!("no disk {} in {snapshot}", t.disk_key)))?;
        let frozen = d
            .disk
            .open_frozen(d.snap, ReaderKind::Nbd)
            .map_err(|e| refused(e.to_string()))?;
        Ok(Arc::new(frozen))
    }
}

/// A VM's live disk as a writable NBD export (a write ticket): reads and writes go
/// through the disk's layer chain (copy-on-write and CBT as for guest writes).
struct LiveDisk(Arc<Disk>);

impl ExportBackend for LiveDisk {
    fn size(&self) -> u64 {
        self.0.capacity()
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.0
            .read(None, offset, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
    fn block_status(&self, offset: u64, len: u64) -> std::io::Result<Vec<(u64, u32)>> {
        let end = offset.saturating_add(len).min(self.0.capacity());
        let alloc = self
            .0
            .allocated(None)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let mut out: Vec<(u64, u32)> = Vec::new();
        let mut at = offset;
        for (o, l) in alloc {
            if o + l <= at {
                continue;
            }
            if o >= end {
                break;
            }
            if o > at {
                out.push((o - at, 3));
            }
            let e = (o + l).min(end);
            out.push((e - at.max(o), 0));
            at = e;
        }
        if at < end {
            out.push((end - at, 3));
        }
        if out.is_empty() {
            out.push((len.max(1), 0));
        }
        Ok(out)
    }
    fn writable(&self) -> bool {
        true
    }
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0
            .write(offset, data)
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("nbd://host-9/vm-12/snapshot-40/2000").unwrap(),
            TicketUrl {
                host: "host-9".into(),
                vm: "vm-12".into(),
                snapshot: Some("snapshot-40".into()),
                disk_key: 2000
            }
        );
        assert_eq!(
            parse_url("nbd://host-9/vm-12/2003").unwrap(),
            TicketUrl {
                host: "host-9".into(),
                vm: "vm-12".into(),
                snapshot: None,
                disk_key: 2003
            }
        );
        for bad in [
            "http://h/v/s/1",
            "nbd://h/v",
            "nbd://h/v/s",
            "nbd://h/v/s/x",
            "nbd://h//s/1",
            "nbd://h/v/s/1/extra",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn expiry() {
        let mut t = Tickets::new(Duration::ZERO);
        t.map.insert(
            "x".into(),
            Ticket {
                id: "x".into(),
                vm: "vm".into(),
                snapshot: Some("s".into()),
                disk_key: 1,
                last_used: Instant::now() - Duration::from_millis(5),
            },
        );
        assert!(t.take("x").is_err());
        assert_eq!(t.live(), 0);
    }
}
