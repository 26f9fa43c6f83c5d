//! When jobs and the key sync are due, and which VMs a job selects. Pure: the
//! clock and the last run come in as arguments.

use super::config::{parse_daily, JobConfig, Schedule};
use super::inventory::InventoryVm;
use crate::glob::glob;

const DAY_MS: i64 = 86_400_000;

/// Whether a job with `schedule`, last started at `last_ms` (Unix ms), is due
/// at `now_ms`. A job without a schedule is never due (it runs with `--once`).
pub fn is_due(schedule: Option<&Schedule>, last_ms: Option<i64>, now_ms: i64) -> bool {
    match next_due(schedule, last_ms, now_ms) {
        Some(t) => t <= now_ms,
        None => false,
    }
}

/// When the job is next due (Unix ms); `None` without a schedule. A job that
/// never ran is due now.
pub fn next_due(schedule: Option<&Schedule>, last_ms: Option<i64>, now_ms: i64) -> Option<i64> {
    let schedule = schedule?;
    match schedule {
        Schedule::Every(d) => Some(match last_ms {
            None => now_ms,
            Some(l) => l.saturating_add(d.as_millis() as i64),
        }),
        Schedule::Daily(hhmm) => {
            let minute = parse_daily(hhmm).ok()? as i64;
            let today = now_ms.div_euclid(DAY_MS) * DAY_MS + minute * 60_000;
            // The most recent slot at or before now.
            let slot = if today <= now_ms {
                today
            } else {
                today - DAY_MS
            };
            Some(match last_ms {
                Some(l) if l >= slot => slot + DAY_MS,
                _ => slot,
            })
        }
    }
}

/// Whether `folder` is `under` or inside it (path components, `/`-separated).
pub fn in_folder(folder: &str, under: &str) -> bool {
    let f = folder.trim_end_matches('/');
    let u = under.trim_end_matches('/');
    f == u || (f.starts_with(u) && f[u.len()..].starts_with('/'))
}

/// The VMs of `inventory` that `job` selects, in inventory order: name matches
/// a `vms` glob (or `vms` is empty), folder is under a `folders` entry (or
/// `folders` is empty), and no `exclude` glob matches.
pub fn select_vms(job: &JobConfig, inventory: &[InventoryVm]) -> Vec<InventoryVm> {
    inventory
        .iter()
        .filter(|v| job.vms.is_empty() || job.vms.iter().any(|g| glob(g, &v.vm.name)))
        .filter(|v| job.folders.is_empty() || job.folders.iter().any(|f| in_folder(&v.folder, f)))
        .filter(|v| !job.exclude.iter().any(|g| glob(g, &v.vm.name)))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const H: i64 = 3_600_000;

    #[test]
    fn every_interval() {
        let s = Schedule::Every(Duration::from_secs(6 * 3600));
        assert!(is_due(Some(&s), None, 1000), "never ran: due");
        assert!(!is_due(Some(&s), Some(0), 6 * H - 1));
        assert!(is_due(Some(&s), Some(0), 6 * H));
        assert_eq!(next_due(Some(&s), Some(H), 2 * H), Some(7 * H));
        assert!(!is_due(None, None, 0), "no schedule: only --once");
    }

    #[test]
    fn daily_at_utc_time() {
        let s = Schedule::Daily("02:30".into());
        let day = 20_000 * DAY_MS;
        let slot = day + 2 * H + 30 * 60_000;
        // Before today's slot, last run yesterday after its slot: not due.
        assert!(!is_due(Some(&s), Some(slot - DAY_MS + 1), slot - 1));
        // At the slot: due.
        assert!(is_due(Some(&s), Some(slot - DAY_MS + 1), slot));
        // Ran at the slot: not due again until tomorrow's.
        assert!(!is_due(Some(&s), Some(slot + 5), slot + 10 * H));
        assert_eq!(
            next_due(Some(&s), Some(slot + 5), slot + 10 * H),
            Some(slot + DAY_MS)
        );
        // Missed yesterday (agent down, orchestrator stopped): due at once.
        assert!(is_due(Some(&s), Some(slot - 3 * DAY_MS), slot - 1));
        // Never ran: due at the most recent slot, i.e. now.
        assert!(is_due(Some(&s), None, day + H));
    }

    #[test]
    fn folders() {
        assert!(in_folder("/DC1/vm/tenant-a", "/DC1/vm/tenant-a"));
        assert!(in_folder("/DC1/vm/tenant-a/web", "/DC1/vm/tenant-a/"));
        assert!(!in_folder("/DC1/vm/tenant-ab", "/DC1/vm/tenant-a"));
        assert!(!in_folder("/DC1/vm", "/DC1/vm/tenant-a"));
    }
}
