//! The `_lastUpdated` window of an export's searches, rendered into a search in one way only.
//!
//! A job's window is what the client asked for (`_since`, and Bulk Data 3.0.0's `_until`) cut at the job's
//! transaction time, so that nothing changed after the snapshot is exported. A time slice is the same window
//! narrowed to a `(lo, hi]` [`Range`]; the planner's probes and searches all render through [`Window::apply`].

use url::Url;

use crate::export::model::Job;
use crate::export::ranges::{format_ms, parse_ms, Range};

/// `_lastUpdated` bounds: after `since` (exclusive), before `until` (exclusive), up to `up_to` (inclusive).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Exclusive lower bound (`_since`, or a time slice's start).
    since: Option<String>,
    /// The client's exclusive upper bound (`_until`), where it is earlier than `up_to`.
    until: Option<String>,
    /// Inclusive upper bound: the transaction time, or a time slice's end.
    up_to: String,
}

impl Window {
    /// A job's window: after `since`, before the client's `until` where that is earlier than the
    /// transaction time, and never past the transaction time (`snapshot`).
    pub fn new(since: Option<&str>, until: Option<&str>, snapshot: &str) -> Window {
        let earlier = |until: &&str| match (parse_ms(until), parse_ms(snapshot)) {
            (Some(until), Some(snapshot)) => until <= snapshot,
            _ => true,
        };
        Window {
            since: since.map(str::to_owned),
            until: until.filter(earlier).map(str::to_owned),
            up_to: snapshot.to_owned(),
        }
    }

    /// The window of `job`'s searches: its `_since` and `_until`, cut at its transaction time.
    pub fn of(job: &Job) -> Window {
        let spec = &job.spec;
        Window::new(
            spec.since.as_deref(),
            spec.until.as_deref(),
            &job.transaction_time,
        )
    }

    /// Everything up to the transaction time: the population a job lists (patients), whatever its `_since`.
    pub fn snapshot(snapshot: &str) -> Window {
        Window::new(None, None, snapshot)
    }

    /// The window narrowed to a time slice `(lo, hi]` (a range the planner found inside this window).
    pub fn narrow(&self, range: Range) -> Window {
        Window {
            since: Some(format_ms(range.lo)),
            until: self.until.clone(),
            up_to: format_ms(range.hi),
        }
    }

    /// `_since` as given, if any.
    pub fn since(&self) -> Option<&str> {
        self.since.as_deref()
    }

    /// The latest instant (Unix ms) inside the window, if the bounds parse.
    pub fn last_ms(&self) -> Option<i64> {
        let up_to = parse_ms(&self.up_to)?;
        Some(match self.until.as_deref().map(parse_ms) {
            Some(Some(until)) => up_to.min(until - 1),
            _ => up_to,
        })
    }

    /// Adds the window's `_lastUpdated` parameters to `url`: `gt{since}`, `lt{until}`, `le{up_to}`.
    pub fn apply(&self, url: &mut Url) {
        let mut q = url.query_pairs_mut();
        if let Some(since) = &self.since {
            q.append_pair("_lastUpdated", &format!("gt{since}"));
        }
        if let Some(until) = &self.until {
            q.append_pair("_lastUpdated", &format!("lt{until}"));
        }
        q.append_pair("_lastUpdated", &format!("le{}", self.up_to));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(window: &Window) -> Vec<String> {
        let mut url = Url::parse("http://u/Patient").unwrap();
        window.apply(&mut url);
        url.query_pairs().map(|(_, v)| v.into_owned()).collect()
    }

    const TT: &str = "2026-01-01T00:00:00.000Z";

    #[test]
    fn a_job_window_is_cut_at_the_transaction_time() {
        assert_eq!(rendered(&Window::new(None, None, TT)), [format!("le{TT}")]);
        let since = "2025-01-01T00:00:00Z";
        assert_eq!(
            rendered(&Window::new(Some(since), None, TT)),
            [format!("gt{since}"), format!("le{TT}")]
        );
        let until = "2025-06-01T00:00:00Z";
        assert_eq!(
            rendered(&Window::new(Some(since), Some(until), TT)),
            [
                format!("gt{since}"),
                format!("lt{until}"),
                format!("le{TT}")
            ]
        );
        // A client bound after the snapshot adds nothing: the snapshot is the earlier one.
        let later = "2027-01-01T00:00:00Z";
        assert_eq!(
            rendered(&Window::new(None, Some(later), TT)),
            [format!("le{TT}")]
        );
        assert_eq!(rendered(&Window::snapshot(TT)), [format!("le{TT}")]);
    }

    #[test]
    fn a_time_slice_narrows_the_window_and_keeps_the_client_bound() {
        let until = "2025-06-01T00:00:00Z";
        let window = Window::new(None, Some(until), TT);
        let slice = window.narrow(Range { lo: 0, hi: 1000 });
        assert_eq!(
            rendered(&slice),
            [
                "gt1970-01-01T00:00:00.000Z".to_owned(),
                format!("lt{until}"),
                "le1970-01-01T00:00:01.000Z".to_owned()
            ]
        );
        assert_eq!(window.last_ms(), parse_ms(until).map(|u| u - 1));
        assert_eq!(Window::snapshot(TT).last_ms(), parse_ms(TT));
    }
}
