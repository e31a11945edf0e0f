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
}
