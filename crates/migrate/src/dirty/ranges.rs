//! Sets of half-open address ranges.

/// A set of addresses kept as sorted, disjoint, non-adjacent `[start, end)`
/// ranges.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    ranges: Vec<(u64, u64)>,
}

impl RangeSet {
    /// An empty set.
    pub(crate) fn new() -> Self {
        RangeSet::default()
    }

    /// Builds a set from ranges in any order; empty ranges are dropped,
    /// overlapping and adjacent ones merged.
    pub(crate) fn from_unsorted(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut v: Vec<(u64, u64)> = ranges.into_iter().filter(|(s, e)| s < e).collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (s, e) in v {
            match out.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => out.push((s, e)),
            }
        }
        RangeSet { ranges: out }
    }

    /// The ranges, sorted.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.ranges.iter().copied()
    }

    /// Adds `[start, end)`.
    pub(crate) fn insert(&mut self, start: u64, end: u64) {
        if start >= end {
            return;
        }
        let mut v = std::mem::take(&mut self.ranges);
        v.push((start, end));
        *self = RangeSet::from_unsorted(v);
    }

    /// Removes `[start, end)`.
    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        *self = self.subtract(&RangeSet::from_unsorted([(start, end)]));
    }

    /// All addresses in either set.
    pub(crate) fn union(&self, other: &RangeSet) -> RangeSet {
        RangeSet::from_unsorted(self.iter().chain(other.iter()))
    }

    /// The addresses in both sets.
    pub(crate) fn intersect(&self, other: &RangeSet) -> RangeSet {
        let (a, b) = (&self.ranges, &other.ranges);
        let (mut i, mut j) = (0, 0);
        let mut out = Vec::new();
        while i < a.len() && j < b.len() {
            let s = a[i].0.max(b[j].0);
            let e = a[i].1.min(b[j].1);
            if s < e {
                out.push((s, e));
            }
            if a[i].1 < b[j].1 {
                i += 1;
            } else {
                j += 1;
            }
        }
        RangeSet { ranges: out }
    }

    /// The addresses in this set and not in `other`.
    pub(crate) fn subtract(&self, other: &RangeSet) -> RangeSet {
        let mut out = Vec::new();
        let b = &other.ranges;
        let mut j = 0;
        for &(s, e) in &self.ranges {
            let mut cur = s;
            while j < b.len() && b[j].1 <= cur {
                j += 1;
            }
            let mut k = j;
            while cur < e {
                match b.get(k) {
                    Some(&(bs, be)) if bs < e => {
                        if bs > cur {
                            out.push((cur, bs));
                        }
                        cur = cur.max(be);
                        k += 1;
                    }
                    _ => {
                        out.push((cur, e));
                        cur = e;
                    }
                }
            }
        }
        RangeSet { ranges: out }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[(u64, u64)]) -> RangeSet {
        RangeSet::from_unsorted(v.iter().copied())
    }

    #[test]
    fn normalizes() {
        let s = set(&[(10, 20), (0, 5), (5, 7), (15, 25), (30, 30)]);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![(0, 7), (10, 25)]);
        assert_eq!(RangeSet::new().iter().count(), 0);
    }

    #[test]
    fn set_operations() {
        let a = set(&[(0, 10), (20, 30), (40, 50)]);
        let b = set(&[(5, 25), (45, 60)]);
        assert_eq!(
            a.union(&b).iter().collect::<Vec<_>>(),
            vec![(0, 30), (40, 60)]
        );
        assert_eq!(
            a.intersect(&b).iter().collect::<Vec<_>>(),
            vec![(5, 10), (20, 25), (45, 50)]
        );
        assert_eq!(
            a.subtract(&b).iter().collect::<Vec<_>>(),
            vec![(0, 5), (25, 30), (40, 45)]
        );
        assert_eq!(
            b.subtract(&a).iter().collect::<Vec<_>>(),
            vec![(10, 20), (50, 60)]
        );
        let c = set(&[(0, 100)]);
        let holes = set(&[(10, 20), (30, 40), (90, 120)]);
        assert_eq!(
            c.subtract(&holes).iter().collect::<Vec<_>>(),
            vec![(0, 10), (20, 30), (40, 90)]
        );
        let mut d = c.clone();
        d.remove(0, 50);
        d.insert(200, 300);
        d.insert(100, 200);
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![(50, 300)]);
    }

    /// Property tests against a model: the set of the addresses themselves.
    mod props {
        use std::collections::BTreeSet;

        use proptest::prelude::*;

        use super::*;

        /// Addresses are `base + 0..SPAN`, with the base at zero, in the
        /// middle, or at the top of the address space.
        const SPAN: u64 = 160;

        fn base() -> impl Strategy<Value = u64> {
            prop_oneof![Just(0), Just(1 << 47), Just(u64::MAX - SPAN)]
        }

        fn ranges(base: u64) -> impl Strategy<Value = Vec<(u64, u64)>> {
            prop::collection::vec((0..=SPAN, 0..=SPAN), 0..8)
                .prop_map(move |v| v.into_iter().map(|(s, e)| (base + s, base + e)).collect())
        }

        fn model(ranges: &[(u64, u64)]) -> BTreeSet<u64> {
            ranges.iter().flat_map(|&(s, e)| s..e).collect()
        }

        fn points(set: &RangeSet) -> BTreeSet<u64> {
            set.iter().flat_map(|(s, e)| s..e).collect()
        }

        /// Sorted, disjoint, non-adjacent, non-empty ranges.
        fn check_normal(set: &RangeSet) -> Result<(), TestCaseError> {
            let v: Vec<_> = set.iter().collect();
            for &(s, e) in &v {
                prop_assert!(s < e, "empty range in {v:?}");
            }
            for w in v.windows(2) {
                prop_assert!(w[0].1 < w[1].0, "unsorted, overlapping or adjacent: {v:?}");
            }
            Ok(())
        }

        type Ranges = Vec<(u64, u64)>;

        fn two_sets() -> impl Strategy<Value = (Ranges, Ranges)> {
            base().prop_flat_map(|b| (ranges(b), ranges(b)))
        }

        proptest! {
            #[test]
            fn from_unsorted_holds_the_same_addresses(v in base().prop_flat_map(ranges)) {
                let set = RangeSet::from_unsorted(v.iter().copied());
                check_normal(&set)?;
                prop_assert_eq!(points(&set), model(&v));
            }

            #[test]
            fn set_operations_match_the_model((a, b) in two_sets()) {
                let (sa, sb) = (RangeSet::from_unsorted(a.clone()), RangeSet::from_unsorted(b.clone()));
                let (ma, mb) = (model(&a), model(&b));
                for (got, want) in [
                    (sa.union(&sb), &ma | &mb),
                    (sa.intersect(&sb), &ma & &mb),
                    (sa.subtract(&sb), &ma - &mb),
                    (sb.subtract(&sa), &mb - &ma),
                ] {
                    check_normal(&got)?;
                    prop_assert_eq!(points(&got), want);
                }
            }

            #[test]
            fn inserts_and_removes_match_the_model(
                (ops, removes) in base().prop_flat_map(|b| (ranges(b), prop::collection::vec(any::<bool>(), 8)))
            ) {
                let mut set = RangeSet::new();
                let mut want = BTreeSet::new();
                for (&(s, e), &remove) in ops.iter().zip(&removes) {
                    if remove {
                        set.remove(s, e);
                        for p in s..e {
                            want.remove(&p);
                        }
                    } else {
                        set.insert(s, e);
                        want.extend(s..e);
                    }
                    check_normal(&set)?;
                    prop_assert_eq!(points(&set), want.clone());
                }
            }
        }
    }
}
