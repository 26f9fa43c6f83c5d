//! NBD access tickets (the contract's use of `AcquireGenericServiceTicket`): parse
//! and check `nbd://<host>/<vm>/<snapshot>/<disk key>` requests, hand out opaque
//! export names that expire after an idle time, and resolve them for the ESXi NBD
//! server through [`ferry::nbd_server::ExportProvider`].
//!
//! Owns the ticket table and the provider; the NBD serving loop lives elsewhere.

use super::codec::{Fault, Obj, Val};
use super::disk::ReaderKind;
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
    /// Snapshot moref id.
    pub snapshot: String,
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
        self.map.retain(|_, t| !gone.contains(&t.snapshot.as_str()));
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

/// The parts of an `nbd://<host>/<vm>/<snapshot>/<disk key>` ticket URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TicketUrl {
    /// Host moref id.
    pub host: String,
    /// VM moref id.
    pub vm: String,
    /// Snapshot moref id.
    pub snapshot: String,
    /// Disk device key.
    pub disk_key: i32,
}

/// Parse a ticket URL.
pub fn parse_url(url: &str) -> Result<TicketUrl, String> {
    let rest = url
        .strip_prefix("nbd://")
        .ok_or_else(|| format!("ticket url {url:?} must start with nbd://"))?;
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() != 4 || parts.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "ticket url {url:?} must be nbd://<host>/<vm>/<snapshot>/<disk key>"
        ));
    }
    let disk_key = parts[3]
        .parse()
        .map_err(|_| format!("disk key {:?} in {url:?} is not a number", parts[3]))?;
    Ok(TicketUrl {
        host: parts[0].into(),
        vm: parts[1].into(),
        snapshot: parts[2].into(),
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
    let s = vm
        .snapshots
        .iter()
        .find(|s| s.id == u.snapshot)
        .ok_or_else(|| bad(format!("VM {} has no snapshot {:?}", vm.name, u.snapshot)))?;
    if !s.disks.iter().any(|d| d.key == u.disk_key) {
        return Err(bad(format!(
            "snapshot {} of VM {} has no disk {}",
            s.id, vm.name, u.disk_key
        )));
    }
    Ok(inv.hosts[hi].address.clone())
}

/// AcquireGenericServiceTicket for an NBD URL.
pub fn acquire(world: &World, method: &str, url: &str) -> Result<Val, Fault> {
    if method != "httpGet" {
        return Err(vim::invalid_argument(
            Some("spec.method"),
            format!("NBD tickets are requested with method httpGet, not {method:?}"),
        ));
    }
    let u = parse_url(url).map_err(|m| vim::invalid_argument(Some("spec.url"), m))?;
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
        let s = inv.vms[vi]
            .snapshots
            .iter()
            .find(|s| s.id == t.snapshot)
            .ok_or_else(|| refused(format!("snapshot {} was removed", t.snapshot)))?;
        let d = s
            .disks
            .iter()
            .find(|d| d.key == t.disk_key)
            .ok_or_else(|| refused(format!("no disk {} in {}", t.disk_key, t.snapshot)))?;
        let frozen = d
            .disk
            .open_frozen(d.snap, ReaderKind::Nbd)
            .map_err(|e| refused(e.to_string()))?;
        Ok(Arc::new(frozen))
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
                snapshot: "snapshot-40".into(),
                disk_key: 2000
            }
        );
        for bad in [
            "http://h/v/s/1",
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
                snapshot: "s".into(),
                disk_key: 1,
                last_used: Instant::now() - Duration::from_millis(5),
            },
        );
        assert!(t.take("x").is_err());
        assert_eq!(t.live(), 0);
    }
}
