//! `_lastUpdated` ranges that split one type's search into slices fetched in parallel.
//!
//! A range is `(lo, hi]` in milliseconds: searched as `_lastUpdated=gt{lo}&_lastUpdated=le{hi}`. Ranges
//! built from one sorted list of boundaries partition `(first, last]`, so every resource falls in exactly
//! one of them: none is lost or exported twice at a boundary.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Half-open time range `(lo, hi]`, in Unix milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Range {
    /// Exclusive lower bound.
    pub lo: i64,
    /// Inclusive upper bound.
    pub hi: i64,
}

impl Range {
    /// Whether an instant (ms) belongs to the range.
    pub fn contains(&self, t: i64) -> bool {
        self.lo < t && t <= self.hi
    }

    /// Midpoint, or `None` when the range is too narrow to split at millisecond precision.
    fn midpoint(&self) -> Option<i64> {
        let mid = self.lo + (self.hi - self.lo) / 2;
        (mid > self.lo && mid < self.hi).then_some(mid)
    }
}

/// Unix milliseconds of a FHIR instant.
pub fn parse_ms(instant: &str) -> Option<i64> {
    DateTime::parse_from_rfc3339(instant)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// The FHIR instant (UTC, milliseconds) of Unix milliseconds.
pub fn format_ms(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Most `_count=0` probes spent per requested slice while looking for boundaries.
const PROBES_PER_SLICE: usize = 16;

/// Fewest pages a slice must hold to be worth its own search (and the probes that find its bounds).
const MIN_PAGES_PER_SLICE: u64 = 2;

/// How many of the `n` slices asked for a type of `total` resources is worth: none smaller than
/// `MIN_PAGES_PER_SLICE` pages, since every slice costs requests of its own and a small type gains
/// nothing from being fetched in parallel with itself.
pub fn worth_splitting(total: u64, page_size: u32, n: usize) -> usize {
    let pages_per_slice = MIN_PAGES_PER_SLICE * u64::from(page_size.max(1));
    n.min((total / pages_per_slice).max(1) as usize)
}

/// A split of one range (holding `total` resources) into at most `n` contiguous ranges of similar size,
/// as far as it got: a value, so that planning can store it and a restarted job resume it.
///
/// Pieces holding more than `total / n` are bisected in time (each bisection costs one count, i.e. one
/// upstream `_count=0` search) until small enough, unsplittable, or out of probes; the pieces are then
/// merged back, in order, into at most `n` ranges. Resources cluster in time, so equal time spans would
/// not give equal slices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    total: u64,
    n: usize,
    /// Contiguous, in order, each with the resources it holds.
    pieces: Vec<(Range, u64)>,
    probes: usize,
}

impl Split {
    /// A split of `whole`, holding `total` resources, into at most `n` ranges; nothing counted yet.
    pub fn new(whole: Range, total: u64, n: usize) -> Self {
        let n = n.max(1);
        Split {
            total,
            n,
            pieces: vec![(whole, total)],
            probes: PROBES_PER_SLICE * n,
        }
    }

    /// The piece to bisect next: the first one too large that can still be split.
    fn next_piece(&self) -> Option<usize> {
        if self.probes == 0 {
            return None;
        }
        let target = self.total.div_ceil(self.n as u64).max(1);
        self.pieces
            .iter()
            .position(|(r, size)| *size > target && r.midpoint().is_some())
    }

    /// The range to count next (the left half of the piece being bisected); `None` once the split is done.
    pub fn probe(&self) -> Option<Range> {
        let (range, _) = self.pieces[self.next_piece()?];
        let mid = range.midpoint()?;
        Some(Range {
            lo: range.lo,
            hi: mid,
        })
    }

    /// Takes `count`, the resources in the range [`Split::probe`] returned.
    pub fn record(&mut self, count: u64) {
        let Some(i) = self.next_piece() else {
            return;
        };
        let (range, size) = self.pieces[i];
        let Some(mid) = range.midpoint() else {
            return;
        };
        let left = Range {
            lo: range.lo,
            hi: mid,
        };
        let right = Range {
            lo: mid,
            hi: range.hi,
        };
        let left_size = count.min(size);
        self.pieces
            .splice(i..=i, [(left, left_size), (right, size - left_size)]);
        self.probes -= 1;
    }

    /// The ranges as split so far, merged back into at most `n`.
    pub fn ranges(&self) -> Vec<Range> {
        merge(&self.pieces, self.total, self.n)
    }
}

/// Joins adjacent pieces, in order, into at most `n` ranges, cutting where the running count passes
/// each `k * total / n`.
fn merge(pieces: &[(Range, u64)], total: u64, n: usize) -> Vec<Range> {
    let mut groups: Vec<Range> = Vec::new();
    let mut open: Option<Range> = None;
    let mut running = 0u64;
    for &(range, size) in pieces {
        let group = open.get_or_insert(range);
        group.hi = range.hi;
        running += size;
        let cut = total * (groups.len() as u64 + 1) / n as u64;
        if running >= cut && groups.len() + 1 < n {
            groups.extend(open.take());
        }
    }
    groups.extend(open);
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::future::Future;

    /// Runs a split to its end, counting with `count`.
    async fn split<F, Fut, E>(
        whole: Range,
        total: u64,
        n: usize,
        mut count: F,
    ) -> Result<Vec<Range>, E>
    where
        F: FnMut(Range) -> Fut,
        Fut: Future<Output = Result<u64, E>>,
    {
        let mut split = Split::new(whole, total, n);
        while let Some(probe) = split.probe() {
            split.record(count(probe).await?);
        }
        Ok(split.ranges())
    }

    #[test]
    fn small_types_are_not_split() {
        assert_eq!(worth_splitting(0, 1000, 4), 1);
        assert_eq!(worth_splitting(1999, 1000, 4), 1);
        assert_eq!(worth_splitting(2000, 1000, 4), 1);
        assert_eq!(worth_splitting(4000, 1000, 4), 2);
        assert_eq!(worth_splitting(1_000_000, 1000, 4), 4);
        assert_eq!(worth_splitting(680, 50, 4), 4);
        assert_eq!(worth_splitting(5, 0, 4), 2);
    }

    fn block_on<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn count_in(times: &[i64], r: Range) -> u64 {
        times.iter().filter(|t| r.contains(**t)).count() as u64
    }

    proptest! {
        /// Whatever the timestamps and however many slices, the slices partition the set exactly.
        #[test]
        fn slices_partition_the_resources(
            mut times in prop::collection::vec(0i64..5_000, 0..400),
            n in 1usize..12,
        ) {
            times.sort_unstable();
            let lo = times.first().map_or(0, |t| t - 1);
            let hi = times.last().copied().unwrap_or(0) + 3;
            let whole = Range { lo, hi };
            let total = count_in(&times, whole);
            let ranges = block_on(split(whole, total, n, |r| {
                let c = count_in(&times, r);
                async move { Ok::<_, ()>(c) }
            }))
            .unwrap();
            prop_assert!(ranges.len() <= n);
            // Contiguous and ordered: each range starts where the previous one ended.
            prop_assert_eq!(ranges[0].lo, whole.lo);
            prop_assert_eq!(ranges.last().unwrap().hi, whole.hi);
            for pair in ranges.windows(2) {
                prop_assert_eq!(pair[0].hi, pair[1].lo);
            }
            for t in &times {
                let holders = ranges.iter().filter(|r| r.contains(*t)).count();
                prop_assert_eq!(holders, 1, "timestamp {} is in {} slices", t, holders);
            }
            let sum: u64 = ranges.iter().map(|r| count_in(&times, *r)).sum();
            prop_assert_eq!(sum, times.len() as u64);
        }

        /// Random split points (duplicates included) also partition, as the gt/le bounds promise.
        #[test]
        fn any_sorted_boundaries_partition(
            times in prop::collection::vec(-1_000i64..1_000, 0..200),
            mut points in prop::collection::vec(-1_100i64..1_100, 2..20),
        ) {
            points.sort_unstable();
            let ranges: Vec<Range> = points.windows(2).map(|w| Range { lo: w[0], hi: w[1] }).collect();
            let (first, last) = (points[0], *points.last().unwrap());
            for t in &times {
                let holders = ranges.iter().filter(|r| r.contains(*t)).count();
                let inside = first < *t && *t <= last;
                prop_assert_eq!(holders, usize::from(inside));
            }
        }

        #[test]
        fn instants_round_trip(ms in 0i64..4_102_444_800_000) {
            prop_assert_eq!(parse_ms(&format_ms(ms)), Some(ms));
        }
    }

    #[test]
    fn clustered_data_splits_by_count_not_time() {
        let mut times: Vec<i64> = (0..90).map(|i| 1_000 + i).collect();
        times.extend([50_000, 60_000, 70_000]);
        let whole = Range { lo: 0, hi: 100_000 };
        let ranges = block_on(split(whole, times.len() as u64, 4, |r| {
            let c = count_in(&times, r);
            async move { Ok::<_, ()>(c) }
        }))
        .unwrap();
        let sizes: Vec<u64> = ranges.iter().map(|r| count_in(&times, *r)).collect();
        assert_eq!(sizes.iter().sum::<u64>(), 93);
        assert!(ranges.len() >= 3, "slices {ranges:?} hold {sizes:?}");
        assert!(
            sizes.iter().all(|s| *s <= 40),
            "slices {ranges:?} hold {sizes:?}"
        );
    }

    #[test]
    fn a_stored_split_resumes_where_it_stopped() {
        let times: Vec<i64> = (0..500).map(|i| i * 7 % 3_000).collect();
        let whole = Range { lo: -1, hi: 3_000 };
        let mut whole_split = Split::new(whole, 500, 4);
        let mut probes = Vec::new();
        while let Some(p) = whole_split.probe() {
            probes.push(p);
            whole_split.record(count_in(&times, p));
        }
        assert!(probes.len() > 2, "the split must take several probes");
        let mut resumed = Split::new(whole, 500, 4);
        for p in &probes[..2] {
            resumed.record(count_in(&times, *p));
        }
        let stored: Split = serde_json::from_slice(&serde_json::to_vec(&resumed).unwrap()).unwrap();
        let mut resumed = stored;
        let mut later = Vec::new();
        while let Some(p) = resumed.probe() {
            later.push(p);
            resumed.record(count_in(&times, p));
        }
        assert_eq!(later, probes[2..], "a resumed split repeats no probe");
        assert_eq!(resumed.ranges(), whole_split.ranges());
    }

    #[test]
    fn one_millisecond_cannot_be_split() {
        let ranges = block_on(split(Range { lo: 9, hi: 10 }, 5, 4, |_| async {
            Ok::<_, ()>(5)
        }))
        .unwrap();
        assert_eq!(ranges, [Range { lo: 9, hi: 10 }]);
    }
}
