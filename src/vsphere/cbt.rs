//! Changed block tracking: enable it (`ReconfigVM_Task` with
//! `changeTrackingEnabled`), and ask which areas of a snapshot disk changed since a
//! change id (`QueryChangedDiskAreas`), following vCenter's pages up to the disk's
//! capacity. `changeId = "*"` asks for every allocated area. A changeId CBT no longer
//! knows is [`VsphereError::CbtReset`]: the caller reads the whole disk.

use super::client::{Client, Replay};
use super::error::{from_cbt_fault, VsphereError};
use super::soap;
use super::types::{DiskArea, DiskChangeInfo, MoRef, Vm};

/// changeId meaning "every allocated area".
pub const ALL_ALLOCATED: &str = "*";

/// Most QueryChangedDiskAreas pages followed for one disk.
pub const MAX_PAGES: usize = 1_000_000;

/// Body of `QueryChangedDiskAreas` (WSDL order: _this, snapshot, deviceKey,
/// startOffset, changeId).
pub fn query_body(
    vm: &MoRef,
    snapshot: &MoRef,
    device_key: i32,
    start: u64,
    change_id: &str,
) -> String {
    soap::envelope("QueryChangedDiskAreas", vm, |b| {
        b.moref("snapshot", snapshot)
            .leaf("deviceKey", device_key)
            .leaf("startOffset", start)
            .leaf("changeId", change_id);
    })
}

/// Fold one page into `acc` (areas clipped to `capacity`, adjacent areas merged) and
/// return where the next page starts. Errors when the page does not move forward.
pub fn fold_page(
    acc: &mut Vec<DiskArea>,
    asked: u64,
    page: &DiskChangeInfo,
    capacity: u64,
) -> Result<u64, String> {
    let next = page.start_offset.saturating_add(page.length);
    if next <= asked {
        return Err(format!(
            "page at {asked} does not advance (startOffset {}, length {})",
            page.start_offset, page.length
        ));
    }
    for a in &page.changed_area {
        if a.start >= capacity {
            break;
        }
        let end = a.start.saturating_add(a.length).min(capacity);
        match acc.last_mut() {
            Some(last) if last.start + last.length == a.start => last.length = end - last.start,
            Some(last) if last.start + last.length > a.start => {
                return Err(format!(
                    "area {}+{} overlaps the previous page",
                    a.start, a.length
                ))
            }
            _ => acc.push(DiskArea {
                start: a.start,
                length: end - a.start,
            }),
        }
    }
    Ok(next)
}

impl Client {
    /// Turn on changed block tracking for `vm` (takes effect at the next snapshot).
    pub async fn enable_cbt(&self, vm: &Vm) -> Result<(), VsphereError> {
        let doing = format!(
            "enabling changed block tracking on VM {} ({})",
            vm.name, vm.moref.value
        );
        self.reconfigure(&vm.moref, &doing, |b| {
            b.leaf("changeTrackingEnabled", "true");
        })
        .await
    }

    /// One page of changed areas of disk `device_key` in `snapshot` from `start`.
    pub async fn query_changed_disk_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        start: u64,
        change_id: &str,
    ) -> Result<DiskChangeInfo, VsphereError> {
        let doing = format!(
            "querying changed areas of disk {device_key} of VM {} in snapshot {} from offset {start}",
            vm.value, snapshot.value
        );
        let body = query_body(vm, snapshot, device_key, start, change_id);
        let resp = self
            .invoke("QueryChangedDiskAreas", &body, Replay::Safe, &doing)
            .await?
            .map_err(|f| from_cbt_fault(&f, change_id, &self.ctx(&doing)))?;
        let rv = resp
            .child("returnval")
            .ok_or_else(|| self.malformed(&doing, "no returnval"))?;
        DiskChangeInfo::decode(rv).map_err(|e| self.malformed(&doing, e))
    }

    /// Every changed (or, with [`ALL_ALLOCATED`], allocated) area of disk
    /// `device_key` of capacity `capacity` in `snapshot` since `change_id`, merged
    /// and ordered.
    pub async fn changed_areas(
        &self,
        vm: &MoRef,
        snapshot: &MoRef,
        device_key: i32,
        capacity: u64,
        change_id: &str,
    ) -> Result<Vec<DiskArea>, VsphereError> {
        let mut areas = Vec::new();
        let mut start = 0u64;
        let mut pages = 0usize;
        while start < capacity {
            pages += 1;
            let page = self
                .query_changed_disk_areas(vm, snapshot, device_key, start, change_id)
                .await?;
            let doing = || {
                format!(
                    "querying changed areas of disk {device_key} of VM {}",
                    vm.value
                )
            };
            if pages > MAX_PAGES {
                return Err(self.malformed(&doing(), format!("more than {MAX_PAGES} pages")));
            }
            start = fold_page(&mut areas, start, &page, capacity)
                .map_err(|e| self.malformed(&doing(), e))?;
        }
        Ok(areas)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(start: u64, len: u64, areas: &[(u64, u64)]) -> DiskChangeInfo {
        DiskChangeInfo {
            start_offset: start,
            length: len,
            changed_area: areas
                .iter()
                .map(|&(start, length)| DiskArea { start, length })
                .collect(),
        }
    }

    #[test]
    fn pages_fold_merge_and_clip() {
        let mut acc = Vec::new();
        assert_eq!(
            fold_page(&mut acc, 0, &page(0, 100, &[(0, 10), (90, 10)]), 250).unwrap(),
            100
        );
        assert_eq!(
            fold_page(&mut acc, 100, &page(100, 200, &[(100, 5), (240, 60)]), 250).unwrap(),
            300
        );
        assert_eq!(
            acc,
            vec![
                DiskArea {
                    start: 0,
                    length: 10
                },
                DiskArea {
                    start: 90,
                    length: 15
                },
                DiskArea {
                    start: 240,
                    length: 10
                }
            ]
        );
    }

    #[test]
    fn a_page_that_does_not_advance_is_an_error() {
        let mut acc = Vec::new();
        assert!(fold_page(&mut acc, 100, &page(0, 100, &[]), 1000).is_err());
        assert!(fold_page(&mut acc, 0, &page(0, 0, &[]), 1000).is_err());
    }

    #[test]
    fn query_body_follows_the_wsdl_order() {
        let b = query_body(
            &MoRef::new("VirtualMachine", "vm-1"),
            &MoRef::new("VirtualMachineSnapshot", "snapshot-2"),
            2000,
            4096,
            "52 a/7",
        );
        let i = |s: &str| b.find(s).unwrap();
        assert!(
            i("<_this") < i("<snapshot")
                && i("<snapshot") < i("<deviceKey>2000")
                && i("<deviceKey") < i("<startOffset>4096")
                && i("<startOffset") < i("<changeId>52 a/7")
        );
    }
}
