//! Which chunk positions of a disk a partial read must read, from byte extents:
//! the areas changed-block tracking reports as changed since a change id, or the
//! allocated areas it reports for `*`.
//!
//! Owns the mapping from extents to chunk positions and nothing else: pure, no I/O,
//! no vCenter, no repository. Extents are normalised, never trusted: they may come
//! unsorted, overlapping, adjacent, empty, or reach past the end of the disk. The
//! result is the sorted, disjoint set of every chunk position that holds at least
//! one byte of some extent (clipped to the disk). Rounding is always outward: an
//! extra position costs one read, a missing one would lose a change.

use crate::transport::Extent;
use std::ops::Range;

/// A set of chunk positions, as sorted, disjoint, non-adjacent, non-empty ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChunkSet {
    ranges: Vec<Range<u64>>,
    positions: u64,
}

/// What normalising a list of extents found (for logs and manifests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExtentSummary {
    /// Extents given.
    pub extents: usize,
    /// Extents of length zero (ignored).
    pub empty: usize,
    /// Extents reaching past the end of the disk (clipped, or dropped when they
    /// start past it).
    pub beyond_disk: usize,
    /// Whether the extents were unsorted or overlapping (normalised).
    pub out_of_order: bool,
    /// Bytes of the disk the extents cover (their union, clipped to the disk).
    pub bytes: u64,
}

impl ChunkSet {
    /// The chunk positions of a disk of `disk_size` bytes cut into `chunk_size`-byte
    /// chunks (`chunk_size > 0`; the last chunk may be short) that overlap any of
    /// `extents`.
    pub fn from_extents(
        extents: &[Extent],
        disk_size: u64,
        chunk_size: u32,
    ) -> (ChunkSet, ExtentSummary) {
        let cs = u64::from(chunk_size.max(1));
        let mut sum = ExtentSummary {
            extents: extents.len(),
            ..Default::default()
        };
        // Clipped byte ranges, in the order given.
        let mut bytes: Vec<Range<u64>> = Vec::with_capacity(extents.len());
        let mut last_end: Option<u64> = None;
        for e in extents {
            if e.len == 0 {
                sum.empty += 1;
                continue;
            }
            let end = e.offset.saturating_add(e.len);
            if last_end.is_some_and(|l| e.offset < l) {
                sum.out_of_order = true;
            }
            last_end = Some(end);
            if end > disk_size {
                sum.beyond_disk += 1;
            }
            let end = end.min(disk_size);
            if e.offset < end {
                bytes.push(e.offset..end);
            }
        }
        if sum.out_of_order {
            bytes.sort_unstable_by_key(|r| r.start);
        }
        let bytes = merge(bytes);
        sum.bytes = bytes.iter().map(|r| r.end - r.start).sum();
        // Outward to whole chunks; adjacent chunk ranges merge.
        let chunks: Vec<Range<u64>> = bytes
            .iter()
            .map(|r| r.start / cs..r.end.div_ceil(cs))
            .collect();
        let ranges = merge(chunks);
        let positions = ranges.iter().map(|r| r.end - r.start).sum();
        (ChunkSet { ranges, positions }, sum)
    }

    /// Whether position `pos` is in the set.
    pub fn contains(&self, pos: u64) -> bool {
        let i = self.ranges.partition_point(|r| r.end <= pos);
        self.ranges.get(i).is_some_and(|r| r.start <= pos)
    }

    /// Number of positions in the set.
    pub fn len(&self) -> u64 {
        self.positions
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.positions == 0
    }

    /// The ranges, sorted, disjoint and non-adjacent.
    pub fn ranges(&self) -> &[Range<u64>] {
        &self.ranges
    }
}

/// Merge sorted (by start) ranges that overlap or touch.
fn merge(sorted: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::with_capacity(sorted.len());
    for r in sorted {
        match out.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // ranges of chunk positions, compared as such
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ext(v: &[(u64, u64)]) -> Vec<Extent> {
        v.iter()
            .map(|&(offset, len)| Extent { offset, len })
            .collect()
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn empty_set_reads_nothing() {
        let (s, sum) = ChunkSet::from_extents(&[], 64 * MIB, 1 << 20);
        assert!(s.is_empty());
        assert_eq!(s.len(), 0);
        assert!(!s.contains(0));
        assert_eq!(sum, ExtentSummary::default());
    }

    #[test]
    fn unaligned_extents_round_outward_to_whole_chunks() {
        // 64 KiB at 1.5 MiB: chunk 1 only. 4 KiB straddling 3 MiB: chunks 2 and 3.
        let (s, sum) = ChunkSet::from_extents(
            &ext(&[(MIB + MIB / 2, 64 << 10), (3 * MIB - 2048, 4096)]),
            16 * MIB,
            1 << 20,
        );
        assert_eq!(s.ranges(), &[1..4]);
        assert_eq!(s.len(), 3);
        assert!(!s.contains(0) && s.contains(1) && s.contains(2) && s.contains(3));
        assert!(!s.contains(4));
        assert_eq!(sum.bytes, (64 << 10) + 4096);
        assert!(!sum.out_of_order);
    }

    #[test]
    fn a_one_byte_extent_marks_its_chunk() {
        let (s, _) = ChunkSet::from_extents(&ext(&[(5 * MIB + 7, 1)]), 16 * MIB, 1 << 20);
        assert_eq!(s.ranges(), &[5..6]);
    }

    #[test]
    fn extents_beyond_the_disk_are_clipped_or_dropped() {
        // Disk of 2.5 MiB: chunks 0, 1 and a short chunk 2.
        let size = 2 * MIB + MIB / 2;
        let (s, sum) = ChunkSet::from_extents(
            &ext(&[(2 * MIB, 4 * MIB), (10 * MIB, MIB), (u64::MAX - 5, 100)]),
            size,
            1 << 20,
        );
        assert_eq!(s.ranges(), &[2..3]);
        assert_eq!(sum.beyond_disk, 3);
        assert_eq!(sum.bytes, MIB / 2);
    }

    #[test]
    fn unsorted_overlapping_and_adjacent_extents_are_normalised() {
        let (s, sum) = ChunkSet::from_extents(
            &ext(&[
                (8 * MIB, MIB),
                (MIB, 2 * MIB),
                (2 * MIB, MIB),
                (3 * MIB, 10),
                (9 * MIB, 0),
            ]),
            16 * MIB,
            1 << 20,
        );
        assert!(sum.out_of_order);
        assert_eq!(sum.empty, 1);
        assert_eq!(s.ranges(), &[1..4, 8..9]);
        assert_eq!(sum.bytes, 2 * MIB + 10 + MIB);
    }

    #[test]
    fn a_whole_disk_extent_is_every_position() {
        let (s, _) = ChunkSet::from_extents(&ext(&[(0, 5 * MIB + 1)]), 5 * MIB + 1, 1 << 20);
        assert_eq!(s.ranges(), &[0..6]);
        assert_eq!(s.len(), 6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Against a per-position model: a position is in the set exactly when
        /// some non-empty extent, clipped to the disk, shares a byte with it.
        #[test]
        fn matches_a_per_position_model(
            size in 0u64..20_000,
            cs_shift in 6u32..12,
            raw in proptest::collection::vec((0u64..24_000, 0u64..6_000), 0..24),
            huge in proptest::option::of(0u64..24_000),
        ) {
            let cs = 1u32 << cs_shift;
            let mut extents = ext(&raw);
            if let Some(at) = huge {
                extents.push(Extent { offset: at, len: u64::MAX });
            }
            let (s, sum) = ChunkSet::from_extents(&extents, size, cs);
            let n = size.div_ceil(u64::from(cs));
            let mut covered = vec![false; size as usize];
            for e in &extents {
                let end = e.offset.saturating_add(e.len).min(size);
                for b in e.offset..end.max(e.offset) {
                    covered[b as usize] = true;
                }
            }
            let mut count = 0;
            for pos in 0..n + 2 {
                let lo = pos * u64::from(cs);
                let hi = (lo + u64::from(cs)).min(size);
                let want = lo < size && (lo..hi).any(|b| covered[b as usize]);
                prop_assert_eq!(s.contains(pos), want, "position {}", pos);
                count += u64::from(want);
            }
            prop_assert_eq!(s.len(), count);
            prop_assert_eq!(sum.bytes, covered.iter().filter(|c| **c).count() as u64);
            // Canonical form: sorted, disjoint, non-adjacent, non-empty, inside the disk.
            for w in s.ranges().windows(2) {
                prop_assert!(w[0].end < w[1].start);
            }
            for r in s.ranges() {
                prop_assert!(r.start < r.end && r.end <= n);
            }
            // Order never matters.
            let mut rev = extents.clone();
            rev.reverse();
            prop_assert_eq!(ChunkSet::from_extents(&rev, size, cs).0, s);
        }
    }
}
