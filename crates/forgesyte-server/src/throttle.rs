//! Warnings a client can make the server write in a loop (a web page's
//! refused requests, admin requests without a token): the first in a
//! period is a warning, the rest debug lines, so no client fills the log
//! (a flood of refused admin requests wrote 42 MB a second). One throttle
//! per kind of refusal ([`Keyed`]: per plugin too); each user says what
//! it covers.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

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

/// A [`Throttle`] per key (a plugin's name): at most one warning per
/// `period` for each. At most [`Keyed::KEYS`] keys are remembered; past
/// them, a new key waits for an old one's period to end.
pub(crate) struct Keyed {
    period: Duration,
    last: std::sync::Mutex<BTreeMap<String, Instant>>,
}

impl Keyed {
    /// The most keys remembered at once.
    pub(crate) const KEYS: usize = 1024;

    /// One warning per `period` for each key.
    pub(crate) const fn new(period: Duration) -> Self {
        Keyed {
            period,
            last: std::sync::Mutex::new(BTreeMap::new()),
        }
    }

    /// Whether this one of `key` is logged as a warning: the first in its
    /// period.
    pub(crate) fn warn_now(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(at) = last.get_mut(key) {
            if now.duration_since(*at) < self.period {
                return false;
            }
            *at = now;
            return true;
        }
        if last.len() >= Self::KEYS {
            last.retain(|_, at| now.duration_since(*at) < self.period);
            if last.len() >= Self::KEYS {
                return false;
            }
        }
        last.insert(key.to_owned(), now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::{Keyed, Throttle};

    #[test]
    fn one_warning_per_period_and_key() {
        let keyed = Keyed::new(std::time::Duration::from_secs(60));
        assert!(keyed.warn_now("a"));
        assert!(!keyed.warn_now("a"));
        assert!(keyed.warn_now("b"), "another key has its own period");
        for i in 0..Keyed::KEYS {
            let _ = keyed.warn_now(&i.to_string());
        }
        assert!(!keyed.warn_now("new"), "no room past the keys remembered");
        let every = Keyed::new(std::time::Duration::ZERO);
        assert!(every.warn_now("a") && every.warn_now("a"));
    }

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
