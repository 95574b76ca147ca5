//! Replay protection of client assertions: each jti is held for as long as its assertion is accepted.

use std::time::Duration;

/// The jtis of accepted assertions, each with the time its assertion stops being accepted.
pub struct SeenJtis {
    /// Key → Unix time (seconds) from which the assertion is refused anyway.
    seen: moka::sync::Cache<String, f64>,
}

impl SeenJtis {
    /// A set that frees an entry `retention` after it was added; that must outlast every assertion.
    pub fn new(retention: Duration) -> Self {
        Self {
            seen: moka::sync::Cache::builder().time_to_live(retention).build(),
        }
    }

    /// Records `key` as used until `until` (Unix seconds); false if it was used and is still held at `now`.
    ///
    /// The entry's own `until`, not the cache's eviction, decides: eviction runs on another clock and
    /// only frees memory.
    pub fn first_use(&self, key: String, until: f64, now: f64) -> bool {
        // One atomic insert-if-absent-or-lapsed: two racing requests with the same jti cannot both pass.
        self.seen
            .entry(key)
            .or_insert_with_if(|| until, |&held| held <= now)
            .is_fresh()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_held_until_its_time_then_free_again() {
        let seen = SeenJtis::new(Duration::from_secs(600));
        assert!(seen.first_use("a".into(), 100.0, 10.0));
        assert!(!seen.first_use("a".into(), 200.0, 99.9));
        assert!(seen.first_use("b".into(), 100.0, 99.9));
        assert!(seen.first_use("a".into(), 200.0, 100.0));
        assert!(!seen.first_use("a".into(), 300.0, 150.0));
    }
}
