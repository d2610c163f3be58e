//! Warnings a client can make the server write in a loop (a web page's
//! refused requests, admin requests without a token): the first in a
//! period is a warning, the rest debug lines, so no client fills the log
//! (a flood of refused admin requests wrote 42 MB a second). One throttle
//! per kind of refusal; each user says what it covers.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// At most one warning per [`Throttle::period_s`] seconds.
pub(crate) struct Throttle {
    /// When the first was asked about (the monotonic clock: a wall clock
    /// set back silences nothing).
    start: OnceLock<Instant>,
    /// Seconds since `start` of the last warning, plus one: 0 is "never".
    last: AtomicU64,
    /// The period, in seconds.
    pub(crate) period_s: u64,
}

impl Throttle {
    /// A throttle of one warning per `period_s` seconds.
    pub(crate) const fn new(period_s: u64) -> Self {
        Throttle {
            start: OnceLock::new(),
            last: AtomicU64::new(0),
            period_s,
        }
    }

    /// Whether this one is logged as a warning: the first in its period.
    pub(crate) fn warn_now(&self) -> bool {
        let now = self.start.get_or_init(Instant::now).elapsed().as_secs() + 1;
        let last = self.last.load(Ordering::Relaxed);
        (last == 0 || now >= last.saturating_add(self.period_s))
            && self
                .last
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn one_warning_per_period() {
        let throttle = Throttle::new(10);
        assert!(throttle.warn_now());
        assert!(!throttle.warn_now());
        assert!(!throttle.warn_now());
        // A period of 0 s lets each through.
        let every = Throttle::new(0);
        assert!(every.warn_now() && every.warn_now());
    }
}
