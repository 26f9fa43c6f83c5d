//! A set of `u64` positions stored as merged half-open ranges: which blocks of a disk
//! layer are allocated, which blocks a guest changed since a CBT point.
//!
//! Pure data structure, no I/O. Ranges never overlap and never touch (adjacent
//! ranges are merged), so iteration yields the coarsest description of the set.

use std::collections::BTreeMap;

/// Merged, sorted, non-adjacent half-open ranges `[start, end)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RangeSet {
    /// start -> end
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    /// The empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// True when nothing is in the set.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of positions in the set.
    pub fn count(&self) -> u64 {
        self.map.iter().map(|(s, e)| e - s).sum()
    }

    /// Number of stored ranges.
    pub fn ranges(&self) -> usize {
        self.map.len()
    }

    /// Add `[start, end)`. Empty ranges are ignored.
    pub fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut s = start;
        let mut e = end;
        // A range starting at or before `start` that reaches it absorbs us.
        if let Some((&ps, &pe)) = self.map.range(..=s).next_back() {
            if pe >= s {
                s = ps;
                e = e.max(pe);
            }
        }
        // Every range starting inside [s, e] is merged.
        let inside: Vec<(u64, u64)> = self.map.range(s..=e).map(|(a, b)| (*a, *b)).collect();
        for (a, b) in inside {
            self.map.remove(&a);
            e = e.max(b);
        }
        self.map.insert(s, e);
    }

    /// Add every range of `other`.
    pub fn union_with(&mut self, other: &RangeSet) {
        for (s, e) in other.iter() {
            self.insert(s, e);
        }
    }

    /// True when `x` is in the set.
    pub fn contains(&self, x: u64) -> bool {
        self.map
            .range(..=x)
            .next_back()
            .is_some_and(|(_, &e)| e > x)
    }

    /// All ranges in order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.map.iter().map(|(s, e)| (*s, *e))
    }

    /// The ranges that intersect `[lo, hi)`, clipped to it, in order.
    pub fn within(&self, lo: u64, hi: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        if lo >= hi {
            return out;
        }
        let first = match self.map.range(..=lo).next_back() {
            Some((&s, &e)) if e > lo => s,
            _ => lo,
        };
        for (&s, &e) in self.map.range(first..hi) {
            let cs = s.max(lo);
            let ce = e.min(hi);
            if cs < ce {
                out.push((cs, ce));
            }
        }
        out
    }

    /// Remove everything at or after `from` (used when a disk shrinks its tracked area).
    pub fn truncate(&mut self, from: u64) {
        let tail: Vec<u64> = self.map.range(from..).map(|(s, _)| *s).collect();
        for s in tail {
            self.map.remove(&s);
        }
        if let Some((&s, e)) = self.map.range_mut(..from).next_back() {
            if *e > from {
                *e = from;
            }
            if s >= *e {
                self.map.remove(&s);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    fn model_ranges(m: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &x in m {
            match out.last_mut() {
                Some((_, e)) if *e == x => *e = x + 1,
                _ => out.push((x, x + 1)),
            }
        }
        out
    }

    #[test]
    fn merges_adjacent_and_overlapping() {
        let mut r = RangeSet::new();
        r.insert(10, 20);
        r.insert(20, 30);
        r.insert(5, 6);
        r.insert(6, 11);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 30)]);
        r.insert(40, 50);
        assert_eq!(r.within(0, 100), vec![(5, 30), (40, 50)]);
        assert_eq!(r.within(25, 45), vec![(25, 30), (40, 45)]);
        assert!(r.contains(5) && r.contains(29) && !r.contains(30) && !r.contains(4));
        r.truncate(42);
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![(5, 30), (40, 42)]);
        assert_eq!(r.count(), 27);
    }

    proptest! {
        #[test]
        fn matches_a_set_model(ops in proptest::collection::vec((0u64..200, 0u64..20), 0..40),
                               lo in 0u64..220, span in 0u64..220, cut in 0u64..230) {
            let mut r = RangeSet::new();
            let mut m = BTreeSet::new();
            for (s, l) in ops {
                r.insert(s, s + l);
                m.extend(s..s + l);
            }
            prop_assert_eq!(r.iter().collect::<Vec<_>>(), model_ranges(&m));
            prop_assert_eq!(r.count(), m.len() as u64);
            for x in 0..230 {
                prop_assert_eq!(r.contains(x), m.contains(&x));
            }
            let hi = lo + span;
            let clipped: BTreeSet<u64> = m.range(lo..hi).copied().collect();
            prop_assert_eq!(r.within(lo, hi), model_ranges(&clipped));
            let mut u = RangeSet::new();
            u.union_with(&r);
            prop_assert_eq!(&u, &r);
            r.truncate(cut);
            let kept: BTreeSet<u64> = m.range(..cut).copied().collect();
            prop_assert_eq!(r.iter().collect::<Vec<_>>(), model_ranges(&kept));
        }
    }
}
