//! Adaptive concurrency of the proxy's own (export) requests, so that clinical pass-through traffic comes first.
//!
//! Export searches share the upstream with the clinicians whose requests the proxy passes through, and an
//! upstream serves only so many requests at once: past that, requests queue, the clinicians' with them.
//! The limiter finds that point from the export's own answers. A search answered much slower than the
//! fastest recent answer to a search of the same kind queued upstream: the
//! concurrency it was sent at is the upstream's *saturation point*, and the limit falls at once to one
//! below it. Searches answered at idle speed while the limit binds raise it by one per round (additive
//! increase), and one answered at idle speed at or past the saturation point shows the upstream has more
//! room than that (the point is forgotten). Pass-through answers are watched the same way: one much
//! slower than the fastest recent answer of its kind, sent while export requests were in flight, queued
//! behind them, which places the saturation point at the requests then in flight (an export that never
//! fills the upstream by itself is seen to crowd it only that way). While pass-through requests are in flight, or were within
//! [`CLINICAL_QUIET`], the export stays one slot under the most it knows not to queue (two under the
//! saturation point; one under its limit while it knows no such point) and does not probe past it: a
//! clinical request then finds the upstream with room instead of behind a queue of export pages.
//! A kind of search is its type, whether it only counts, and the size of its answer to within a factor of
//! two: a server takes longer to answer a full page than the short last page of a search, and a count far
//! less than either, so only like answers tell queueing from work.
//! An upstream that serves one request at a time (saturation point 2: one export request and one clinical
//! request already queue) cannot be given a slot: whatever export request is in flight, a clinical request
//! waits for it. While pass-through traffic flows there, the export *rests* after each answer, leaving the
//! upstream idle [`SERIAL_REST`] times as long as the answer took, so most clinical requests find it idle;
//! the export then has at most a third of the upstream, and all of it again once the traffic is quiet.
//! `max_concurrent_requests` stays the ceiling; with `adaptive_concurrency = false` it is the fixed limit.
//! A request holds its slot until its body is read, except that the request for a search's next page,
//! sent while the page before it is still arriving, takes over that page's [`Slot`]: a search goes on in
//! the slot it has, rather than wait for a second one (at a limit of one, forever behind itself).
//!
//! It passes 700 lines only with its tests, which drive the one state machine through timed answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::METRICS;

/// How long after the last pass-through request the export still leaves it a slot and does not grow.
pub const CLINICAL_QUIET: Duration = Duration::from_secs(1);
/// How many times as long as its last answer took the export leaves a one-at-a-time upstream idle while
/// pass-through traffic flows.
const SERIAL_REST: u32 = 2;
/// An answer slower than this multiple of its kind's baseline (plus [`QUEUE_SLACK`]) queued upstream.
const QUEUE_RATIO: f64 = 1.5;
/// Absolute slack over the baseline, so that jitter of a fast upstream is not taken for queueing.
const QUEUE_SLACK: Duration = Duration::from_millis(2);
/// Answers per baseline window: the baseline is the fastest answer of the last two windows of its kind,
/// so it follows an upstream that became slower for good within two windows.
const WINDOW: u32 = 50;

/// The shared concurrency limit of export requests, and the count of pass-through requests in flight.
pub struct Limiter {
    adaptive: bool,
    max: usize,
    state: Mutex<State>,
    released: Notify,
    clinical_in_flight: AtomicUsize,
    /// When the last pass-through request started, in ms since `epoch` (0: never).
    clinical_last_ms: AtomicU64,
    epoch: Instant,
}

struct State {
    limit: f64,
    in_flight: usize,
    /// Answers recorded so far; a permit remembers the count when it was taken.
    answers: u64,
    /// `answers` at the last decrease: slower answers to requests sent before it are old news.
    decreased_at: u64,
    /// The lowest concurrency an answer queued at, until an answer at it or past it comes at idle speed.
    saturation: Option<usize>,
    /// Until when the export rests on a one-at-a-time upstream (see the module doc).
    rest_until: Option<Instant>,
    baselines: HashMap<String, Baseline>,
    /// The same for pass-through answers, by [`clinical_kind`].
    clinical_baselines: HashMap<String, Baseline>,
}

/// The fastest answers of a kind of request over the last two windows.
#[derive(Default)]
struct Baseline {
    current: Option<Duration>,
    previous: Option<Duration>,
    seen: u32,
}

impl Baseline {
    fn push(&mut self, latency: Duration) -> Duration {
        if self.seen == WINDOW {
            self.previous = self.current.take();
            self.seen = 0;
        }
        self.seen += 1;
        let current = self.current.map_or(latency, |c| c.min(latency));
        self.current = Some(current);
        self.previous.map_or(current, |p| p.min(current))
    }
}

/// What the limiter shows in /metrics and the export's progress log.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    /// Export requests allowed in flight now (the limit, less the clinical slot when it is kept).
    pub allowed: usize,
    /// The limit itself.
    pub limit: usize,
    /// Export requests in flight.
    pub in_flight: usize,
    /// Pass-through requests in flight.
    pub clinical_in_flight: usize,
}

impl std::fmt::Display for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} export requests allowed ({} in flight, {} pass-through in flight)",
            self.allowed, self.limit, self.in_flight, self.clinical_in_flight
        )
    }
}

impl Limiter {
    /// A limiter with `max` as its ceiling; not `adaptive`, `max` is a fixed limit.
    pub fn new(max: usize, adaptive: bool) -> Arc<Self> {
        let max = max.max(1);
        Arc::new(Self {
            adaptive,
            max,
            state: Mutex::new(State {
                // Start low and find the upstream's room, rather than flood it first and back off.
                limit: if adaptive { 1.0 } else { max as f64 },
                in_flight: 0,
                answers: 0,
                decreased_at: 0,
                saturation: None,
                rest_until: None,
                baselines: HashMap::new(),
                clinical_baselines: HashMap::new(),
            }),
            released: Notify::new(),
            clinical_in_flight: AtomicUsize::new(0),
            clinical_last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    /// Counts a pass-through request of `kind` ([`clinical_kind`]) as in flight until the guard is dropped
    /// at its response head; how long that took tells whether it queued behind export requests.
    pub fn clinical(self: &Arc<Self>, kind: String) -> ClinicalGuard {
        let n = self.clinical_in_flight.fetch_add(1, Ordering::Relaxed) + 1;
        METRICS.passthrough_in_flight.set(n as i64);
        self.clinical_last_ms
            .store(self.now_ms().max(1), Ordering::Relaxed);
        let export = self.state.lock().expect("limiter lock").in_flight;
        ClinicalGuard {
            limiter: self.clone(),
            kind,
            sent: Instant::now(),
            export,
            together: export + n,
        }
    }

    /// Takes in a pass-through answer's latency: one much slower than the fastest recent answer of its
    /// kind, sent while export requests were in flight, queued behind them, so the upstream serves fewer
    /// than the `together` requests then in flight, and the export steps back to leave it room.
    fn clinical_answered(&self, kind: &str, latency: Duration, export: usize, together: usize) {
        if !self.adaptive {
            return;
        }
        let mut state = self.state.lock().expect("limiter lock");
        let baseline = state
            .clinical_baselines
            .entry(kind.to_owned())
            .or_default()
            .push(latency);
        if export == 0 || latency <= baseline.mul_f64(QUEUE_RATIO) + QUEUE_SLACK {
            return;
        }
        if state.saturation.is_none_or(|point| together < point) {
            state.saturation = Some(together);
        }
        let below = together.saturating_sub(1).max(1) as f64;
        if below < state.limit {
            state.limit = below;
            state.decreased_at = state.answers;
            METRICS.export_limit_decreases.inc();
        }
        self.publish(&state);
    }

    /// Waits until one more export request may go out.
    pub async fn acquire(self: &Arc<Self>, kind: &str) -> ExportPermit {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(permit) = self.try_acquire(kind) {
                return permit;
            }
            // The clinical slot and a rest end by themselves, with no release to wake on.
            let wait = self
                .resting()
                .map_or(CLINICAL_QUIET, |r| r.min(CLINICAL_QUIET));
            tokio::select! {
                _ = released => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Takes over `slot`, the slot of the page before this one, while it is still held and the export is
    /// not over its limit (the limit fell since); otherwise waits like [`Limiter::acquire`].
    pub async fn acquire_after(self: &Arc<Self>, kind: &str, slot: &Slot) -> ExportPermit {
        {
            let state = self.state.lock().expect("limiter lock");
            if state.in_flight <= self.allowed(&state)
                && self.rest_left(&state).is_none()
                && slot.0.swap(false, Ordering::AcqRel)
            {
                return self.permit(&state, kind);
            }
        }
        slot.give_up();
        self.acquire(kind).await
    }

    fn try_acquire(self: &Arc<Self>, kind: &str) -> Option<ExportPermit> {
        let mut state = self.state.lock().expect("limiter lock");
        if state.in_flight >= self.allowed(&state) || self.rest_left(&state).is_some() {
            return None;
        }
        state.in_flight += 1;
        let permit = self.permit(&state, kind);
        self.publish(&state);
        Some(permit)
    }

    /// A permit for a request going out now, whose slot is already counted in `in_flight`.
    fn permit(self: &Arc<Self>, state: &State, kind: &str) -> ExportPermit {
        ExportPermit {
            kind: kind.to_owned(),
            sent: Instant::now(),
            head: None,
            concurrency: state.in_flight,
            allowed: self.allowed(state),
            answers_before: state.answers,
            slot: Slot(Arc::new(AtomicBool::new(true)), self.clone()),
        }
    }

    /// The limiter's state now.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.state.lock().expect("limiter lock");
        self.snapshot_of(&state)
    }

    fn snapshot_of(&self, state: &State) -> Snapshot {
        Snapshot {
            allowed: self.allowed(state),
            limit: state.limit as usize,
            in_flight: state.in_flight,
            clinical_in_flight: self.clinical_in_flight.load(Ordering::Relaxed),
        }
    }

    fn allowed(&self, state: &State) -> usize {
        let limit = state.limit as usize;
        if !(self.adaptive && self.clinical_active()) {
            return limit.max(1);
        }
        let spare = match state.saturation {
            Some(point) => point.saturating_sub(2),
            None => limit.saturating_sub(1),
        };
        limit.min(spare).max(1)
    }

    /// Whether the upstream serves one request at a time, as far as the limiter knows.
    fn serial(state: &State) -> bool {
        state.saturation.is_some_and(|point| point <= 2)
    }

    /// Whether the export rests after its answers now: adaptive, on a one-at-a-time upstream, while
    /// pass-through traffic flows.
    fn rests(&self, state: &State) -> bool {
        self.adaptive && Self::serial(state) && self.clinical_active()
    }

    /// What is left of the export's rest, if it rests now.
    fn rest_left(&self, state: &State) -> Option<Duration> {
        let until = state.rest_until?;
        if !self.rests(state) {
            return None;
        }
        until.checked_duration_since(Instant::now())
    }

    fn resting(&self) -> Option<Duration> {
        self.rest_left(&self.state.lock().expect("limiter lock"))
    }

    /// Takes in that an export answer kept the upstream busy for `busy`: on a one-at-a-time upstream
    /// with pass-through traffic, the export rests [`SERIAL_REST`] times that long.
    fn busy_for(&self, busy: Duration) {
        // Every export answer comes here: with no pass-through traffic, leave the lock alone.
        if !(self.adaptive && self.clinical_active()) {
            return;
        }
        let mut state = self.state.lock().expect("limiter lock");
        if self.rests(&state) {
            state.rest_until = Some(Instant::now() + busy * SERIAL_REST);
            METRICS.export_rests.inc();
        }
    }

    fn clinical_active(&self) -> bool {
        if self.clinical_in_flight.load(Ordering::Relaxed) > 0 {
            return true;
        }
        let last = self.clinical_last_ms.load(Ordering::Relaxed);
        last != 0 && self.now_ms().saturating_sub(last) < CLINICAL_QUIET.as_millis() as u64
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Takes in an answer's latency (until its response head) to a request sent at `concurrency`, when
    /// `allowed` were allowed in flight.
    fn answered(&self, kind: &str, latency: Duration, sent: Sent) {
        let Sent {
            concurrency,
            allowed,
            answers_before,
        } = sent;
        if !self.adaptive {
            return;
        }
        let mut state = self.state.lock().expect("limiter lock");
        state.answers += 1;
        let baseline = state
            .baselines
            .entry(kind.to_owned())
            .or_default()
            .push(latency);
        let queued = latency > baseline.mul_f64(QUEUE_RATIO) + QUEUE_SLACK;
        if queued {
            if answers_before >= state.decreased_at {
                state.saturation =
                    Some(state.saturation.map_or(concurrency, |p| p.min(concurrency)));
                let below = (concurrency.saturating_sub(1)).max(1) as f64;
                if below < state.limit {
                    state.limit = below;
                    state.decreased_at = state.answers;
                    METRICS.export_limit_decreases.inc();
                }
            }
            self.publish(&state);
            return;
        }
        if state.saturation.is_some_and(|point| concurrency >= point) {
            state.saturation = None;
        }
        if concurrency >= allowed {
            let mut ceiling = self.max as f64;
            if let (true, Some(point)) = (self.clinical_active(), state.saturation) {
                ceiling = ceiling.min(point.saturating_sub(1).max(1) as f64);
            }
            let grown = state.limit + 1.0 / state.limit.floor();
            if grown <= ceiling || state.limit < ceiling {
                state.limit = grown.min(ceiling);
            }
        }
        self.publish(&state);
    }

    fn release(&self) {
        let mut state = self.state.lock().expect("limiter lock");
        state.in_flight -= 1;
        self.publish(&state);
        drop(state);
        self.released.notify_waiters();
    }

    fn publish(&self, state: &State) {
        let s = self.snapshot_of(state);
        METRICS.export_limit.set(s.limit as i64);
        METRICS.export_allowed.set(s.allowed as i64);
        METRICS.export_in_flight.set(s.in_flight as i64);
    }
}

/// A pass-through request in flight, as the limiter counts it.
pub struct ClinicalGuard {
    limiter: Arc<Limiter>,
    kind: String,
    sent: Instant,
    /// Export requests in flight when it was sent, and all requests the proxy then had upstream.
    export: usize,
    together: usize,
}

impl Drop for ClinicalGuard {
    fn drop(&mut self) {
        let n = self
            .limiter
            .clinical_in_flight
            .fetch_sub(1, Ordering::Relaxed)
            - 1;
        METRICS.passthrough_in_flight.set(n as i64);
        self.limiter
            .clinical_answered(&self.kind, self.sent.elapsed(), self.export, self.together);
    }
}

/// The kind of a pass-through request for its baseline: the method and the path's shape, with what is
/// not a type, an operation or a keyword (ids, the base) as `*`, and whether it has a query.
pub fn clinical_kind(method: &str, path: &str, query: Option<&str>) -> String {
    let mut kind = method.to_owned();
    for segment in path.split('/').filter(|s| !s.is_empty()) {
        let named = segment.starts_with(['$', '_'])
            || segment.starts_with(|c: char| c.is_ascii_uppercase())
                && segment.chars().all(|c| c.is_ascii_alphanumeric());
        kind.push('/');
        kind.push_str(if named { segment } else { "*" });
    }
    if query.is_some_and(|q| !q.is_empty()) {
        kind.push('?');
    }
    kind
}

/// One export request's place under the limit, held until its body is read.
pub struct ExportPermit {
    kind: String,
    sent: Instant,
    head: Option<Duration>,
    concurrency: usize,
    allowed: usize,
    answers_before: u64,
    slot: Slot,
}

/// An export request's place in `in_flight`, which the request for the next page of the same search may
/// take over ([`Limiter::acquire_after`]); released once, by whichever of the two lets it go.
#[derive(Clone)]
pub struct Slot(Arc<AtomicBool>, Arc<Limiter>);

impl Slot {
    /// Releases the slot unless it was taken over or released already.
    fn give_up(&self) {
        if self.0.swap(false, Ordering::AcqRel) {
            self.1.release();
        }
    }
}

/// How a request went out: the export requests in flight with it, how many were allowed, and the
/// answers recorded before it.
#[derive(Clone, Copy)]
struct Sent {
    concurrency: usize,
    allowed: usize,
    answers_before: u64,
}

impl ExportPermit {
    /// The permit's slot, for the request of the page after this one to take over.
    pub fn slot(&self) -> Slot {
        self.slot.clone()
    }

    /// Records that the response head arrived: its latency is what the limit follows.
    pub fn answered(&mut self) {
        let latency = self.sent.elapsed();
        self.head = Some(latency);
        self.slot.1.busy_for(latency);
    }

    /// Records that the whole body (`bytes` long) was read: the answer is then complete and its kind known.
    pub fn read(&self, bytes: usize) {
        let Some(latency) = self.head else {
            return;
        };
        let sent = Sent {
            concurrency: self.concurrency,
            allowed: self.allowed,
            answers_before: self.answers_before,
        };
        let size_class = usize::BITS - bytes.leading_zeros();
        let kind = format!("{}~{size_class}", self.kind);
        self.slot.1.answered(&kind, latency, sent);
    }
}

impl Drop for ExportPermit {
    fn drop(&mut self) {
        self.slot.give_up();
    }
}

/// The kind of a search for the baselines: its type and whether it asks only for a count, since a
/// `_count=0` probe and a full page of the same type take very different times on any server.
pub fn kind_of(url: &url::Url) -> String {
    let resource = url
        .path_segments()
        .and_then(|mut s| s.next_back())
        .unwrap_or_default();
    let count_only = url
        .query_pairs()
        .any(|(k, v)| k == "_count" && v == "0" || k == "_summary" && v == "count");
    if count_only {
        format!("{resource}#count")
    } else {
        resource.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// What a request sent now would be sent at: at the allowed concurrency, every slot in use.
    fn at_allowed(l: &Limiter) -> Sent {
        let s = l.state.lock().unwrap();
        let allowed = l.allowed(&s);
        Sent {
            concurrency: allowed,
            allowed,
            answers_before: s.answers,
        }
    }

    fn answer_at_allowed(l: &Limiter, latency: Duration, n: usize) {
        for _ in 0..n {
            l.answered("Observation", latency, at_allowed(l));
        }
    }

    fn queued_at(l: &Limiter, concurrency: usize) {
        let s = at_allowed(l);
        l.answered(
            "Observation",
            ms(60),
            Sent {
                concurrency,
                allowed: concurrency,
                ..s
            },
        );
    }

    #[test]
    fn grows_by_one_per_round_while_answers_stay_at_idle_speed() {
        let l = Limiter::new(8, true);
        assert_eq!(l.snapshot().limit, 1);
        answer_at_allowed(&l, ms(10), 1);
        assert_eq!(l.snapshot().limit, 2);
        answer_at_allowed(&l, ms(10), 2);
        assert_eq!(l.snapshot().limit, 3);
        answer_at_allowed(&l, ms(10), 100);
        assert_eq!(l.snapshot().limit, 8, "the configured ceiling holds");
    }

    #[test]
    fn no_growth_while_the_limit_is_not_in_use() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 3);
        let limit = l.snapshot().limit;
        for _ in 0..20 {
            let s = at_allowed(&l);
            l.answered(
                "Observation",
                ms(10),
                Sent {
                    concurrency: 1,
                    ..s
                },
            );
        }
        assert_eq!(l.snapshot().limit, limit);
    }

    #[test]
    fn a_queued_answer_drops_the_limit_below_its_concurrency_once_per_round() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 100);
        let before = at_allowed(&l);
        // Three answers to requests sent together at concurrency 6 all queued: one decrease, to 5.
        for _ in 0..3 {
            l.answered(
                "Observation",
                ms(40),
                Sent {
                    concurrency: 6,
                    ..before
                },
            );
        }
        assert_eq!(l.snapshot().limit, 5);
        assert_eq!(l.state.lock().unwrap().saturation, Some(6));
        assert_eq!(
            l.state.lock().unwrap().decreased_at,
            before.answers_before + 1
        );
    }

    #[test]
    fn kinds_have_their_own_baselines() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 100);
        // A count probe far faster than pages does not make the pages look queued.
        l.answered("Observation#count", ms(1), at_allowed(&l));
        answer_at_allowed(&l, ms(11), 1);
        assert_eq!(l.snapshot().limit, 8);
    }

    #[test]
    fn pass_through_keeps_the_export_a_slot_under_what_does_not_queue() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 100);
        // The upstream serves 4 at once: an answer at 5 queued.
        queued_at(&l, 5);
        assert_eq!((l.snapshot().limit, l.snapshot().allowed), (4, 4));
        let guard = l.clinical("GET/*/Patient?".into());
        let s = l.snapshot();
        assert_eq!((s.allowed, s.clinical_in_flight), (3, 1));
        // While clinical traffic runs the export does not probe past the saturation point.
        answer_at_allowed(&l, ms(10), 50);
        assert_eq!((l.snapshot().limit, l.snapshot().allowed), (4, 3));
        drop(guard);
        assert_eq!(l.snapshot().clinical_in_flight, 0);
    }

    #[test]
    fn pass_through_from_the_start_lets_the_export_find_the_saturation_point() {
        let l = Limiter::new(16, true);
        let _guard = l.clinical("GET/*/Patient?".into());
        // Idle-speed answers while pass-through runs: allowed grows one under the limit.
        answer_at_allowed(&l, ms(10), 30);
        let s = l.snapshot();
        assert!(s.allowed >= 4 && s.allowed == s.limit - 1, "{s}");
        queued_at(&l, 5);
        assert_eq!(l.snapshot().allowed, 3);
    }

    #[test]
    fn an_idle_speed_answer_at_the_saturation_point_forgets_it() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 100);
        queued_at(&l, 5);
        answer_at_allowed(&l, ms(10), 20);
        let s = at_allowed(&l);
        l.answered(
            "Observation",
            ms(10),
            Sent {
                concurrency: 5,
                ..s
            },
        );
        assert_eq!(l.state.lock().unwrap().saturation, None);
    }

    #[test]
    fn a_pass_through_answer_queued_behind_the_export_makes_it_step_back() {
        let l = Limiter::new(8, true);
        answer_at_allowed(&l, ms(10), 100);
        let kind = || "GET/*/Patient?".to_owned();
        // Its idle speed, with no export in flight: nothing to blame.
        l.clinical_answered(&kind(), ms(10), 0, 1);
        l.clinical_answered(&kind(), ms(40), 0, 1);
        assert_eq!(l.snapshot().limit, 8);
        // Sent beside 4 export requests, it waited: the upstream serves fewer than 5.
        l.clinical_answered(&kind(), ms(30), 4, 5);
        let s = l.snapshot();
        assert_eq!((s.limit, l.state.lock().unwrap().saturation), (4, Some(5)));
        let _guard = l.clinical(kind());
        assert_eq!(l.snapshot().allowed, 3, "export + one clinical request fit");
    }

    #[test]
    fn clinical_kinds_keep_types_and_operations() {
        assert_eq!(
            clinical_kind("GET", "/fhir/Patient/123", None),
            "GET/*/Patient/*"
        );
        assert_eq!(
            clinical_kind("GET", "/fhir/Observation", Some("code=x")),
            "GET/*/Observation?"
        );
        assert_eq!(
            clinical_kind("POST", "/fhir/Patient/1/$everything", None),
            "POST/*/Patient/*/$everything"
        );
    }

    #[test]
    fn fixed_mode_is_the_configured_maximum() {
        let l = Limiter::new(4, false);
        let _guard = l.clinical("GET/*/Patient?".into());
        answer_at_allowed(&l, ms(100), 10);
        assert_eq!(l.snapshot().allowed, 4);
    }

    #[tokio::test]
    async fn acquire_waits_for_a_release() {
        let l = Limiter::new(1, false);
        let first = l.acquire("Patient").await;
        assert!(l.try_acquire("Patient").is_none());
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire("Patient").await.concurrency }
        });
        tokio::time::sleep(ms(20)).await;
        assert!(!waiter.is_finished());
        drop(first);
        assert_eq!(waiter.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn on_a_one_at_a_time_upstream_the_export_rests_while_pass_through_traffic_flows() {
        let l = Limiter::new(8, true);
        let kind = || "GET/*/Patient?".to_owned();
        l.clinical_answered(&kind(), ms(2), 0, 1);
        // A clinical request sent beside one export request waited: one request at a time.
        l.clinical_answered(&kind(), ms(60), 1, 2);
        assert_eq!(l.state.lock().unwrap().saturation, Some(2));
        let guard = l.clinical(kind());
        let mut page = l.acquire("Observation").await;
        tokio::time::sleep(ms(40)).await;
        page.answered();
        let rest = l.resting().expect("resting after the answer");
        assert!(
            rest > ms(60) && rest <= ms(200),
            "twice the answer's time: {rest:?}"
        );
        let slot = page.slot();
        let sent = Instant::now();
        let next = l.acquire_after("Observation", &slot).await;
        drop(page);
        assert!(
            sent.elapsed() >= ms(60),
            "the next page waited out the rest"
        );
        drop(next);
        // With the pass-through traffic quiet there is no rest, whatever the upstream.
        drop(guard);
        l.clinical_last_ms.store(0, Ordering::Relaxed);
        let mut page = l.acquire("Observation").await;
        page.answered();
        assert_eq!(l.resting(), None);
        drop(page);
        // Nor on an upstream that serves more than one request at once.
        let l = Limiter::new(8, true);
        l.clinical_answered(&kind(), ms(2), 0, 1);
        l.clinical_answered(&kind(), ms(60), 3, 4);
        let _guard = l.clinical(kind());
        let mut page = l.acquire("Observation").await;
        tokio::time::sleep(ms(10)).await;
        page.answered();
        assert_eq!(l.resting(), None);
    }

    #[tokio::test]
    async fn the_next_page_takes_over_the_slot_of_the_page_still_arriving() {
        let l = Limiter::new(1, true);
        let page = l.acquire("Patient").await;
        let next = tokio::time::timeout(ms(500), l.acquire_after("Patient", &page.slot()))
            .await
            .expect("the next page waited for a slot of its own");
        assert_eq!(l.snapshot().in_flight, 1);
        drop(page);
        assert_eq!(l.snapshot().in_flight, 1, "the slot was released twice");
        assert!(l.try_acquire("Patient").is_none());
        let again = l.acquire_after("Patient", &next.slot()).await;
        drop(next);
        drop(again);
        assert_eq!(l.snapshot().in_flight, 0);
    }

    #[tokio::test]
    async fn a_slot_released_already_is_not_taken_over() {
        let l = Limiter::new(1, false);
        let page = l.acquire("Patient").await;
        let slot = page.slot();
        drop(page);
        let other = l.acquire("Patient").await;
        let waiter = tokio::spawn({
            let l = l.clone();
            async move { l.acquire_after("Patient", &slot).await.concurrency }
        });
        tokio::time::sleep(ms(20)).await;
        assert!(!waiter.is_finished(), "a released slot was used twice");
        drop(other);
        assert_eq!(waiter.await.unwrap(), 1);
    }

    #[test]
    fn kinds_of_searches() {
        let u = |s: &str| url::Url::parse(s).unwrap();
        assert_eq!(
            kind_of(&u("http://h/fhir/Observation?patient=a&_count=1000")),
            "Observation"
        );
        assert_eq!(
            kind_of(&u("http://h/fhir/Condition?_count=0")),
            "Condition#count"
        );
    }
}
