//! Failures that repeat for every request while they last (the store down,
//! the PBX refusing connections) are logged once, then once per interval
//! with how many there were: the log a person reads in an incident stays
//! readable, and the metrics keep the full count.

use std::sync::atomic::{AtomicU64, Ordering};

/// One kind of repeated failure; a `static` per call site.
#[derive(Debug)]
pub struct Repeated {
    /// When the next line may be written (Unix ms); 0 before the first.
    next_ms: AtomicU64,
    /// Failures not logged since the last line.
    skipped: AtomicU64,
}

/// At most one line per kind in this many milliseconds.
const INTERVAL_MS: u64 = 10_000;

impl Repeated {
    pub const fn new() -> Self {
        Self { next_ms: AtomicU64::new(0), skipped: AtomicU64::new(0) }
    }

    /// `Some(skipped)` when this failure is to be logged, with how many of
    /// its kind were not since the last line; `None` to count it silently.
    pub fn due(&self, now_ms: u64) -> Option<u64> {
        let next = self.next_ms.load(Ordering::Relaxed);
        let claimed = now_ms >= next
            && self
                .next_ms
                .compare_exchange(next, now_ms + INTERVAL_MS, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok();
        if claimed {
            Some(self.skipped.swap(0, Ordering::AcqRel))
        } else {
            self.skipped.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

impl Default for Repeated {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_at_once_then_one_line_per_interval_with_a_count() {
        let r = Repeated::new();
        assert_eq!(r.due(1_000), Some(0), "the first failure is logged at once");
        for t in 1_001..1_500 {
            assert_eq!(r.due(t), None);
        }
        assert_eq!(r.due(1_000 + INTERVAL_MS), Some(499), "then a count");
        assert_eq!(r.due(1_000 + INTERVAL_MS + 1), None);
        assert_eq!(r.due(1_000 + 3 * INTERVAL_MS), Some(1));
    }
}
