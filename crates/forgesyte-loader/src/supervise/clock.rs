//! The supervisor's clock: what time it is, and running a restart once its
//! backoff has passed.
//!
//! [`SystemClock`] is the real one (a short-lived thread per pending
//! restart). Tests use [`FakeClock`], whose time moves only when the test
//! advances it and which runs due restarts on the test's own thread, so
//! backoff is checked to the millisecond without sleeping.

use std::fmt;
use std::time::{Duration, Instant, SystemTime};

/// Work to run once a delay has passed.
pub(crate) type Task = Box<dyn FnOnce() + Send>;

/// Asked while a task waits: `true` drops the task unrun.
pub(crate) type Cancelled = Box<dyn Fn() -> bool + Send>;

/// Time, and delayed work, for the supervisor.
pub(crate) trait Clock: Send + Sync + fmt::Debug {
    /// Monotonic now (backoff, restart window, healthy reset).
    fn now(&self) -> Instant;

    /// Wall-clock now (a plugin's `next_retry_at`).
    fn wall(&self) -> SystemTime;

    /// Runs `task` once `delay` has passed, unless `cancelled` says so
    /// first. `name` names the thread that waits, where there is one.
    ///
    /// # Errors
    ///
    /// The wait could not be started (the task is dropped unrun).
    fn run_after(
        &self,
        delay: Duration,
        name: String,
        cancelled: Cancelled,
        task: Task,
    ) -> std::io::Result<()>;
}

/// How often a waiting restart thread checks whether it was cancelled.
const CANCEL_POLL: Duration = Duration::from_millis(50);

/// The real clock: [`Instant::now`], [`SystemTime::now`], and a thread per
/// delayed task that sleeps in steps of at most 50 ms, so a cancelled task
/// ends its thread soon.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        SystemTime::now()
    }

    fn run_after(
        &self,
        delay: Duration,
        name: String,
        cancelled: Cancelled,
        task: Task,
    ) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let deadline = Instant::now() + delay;
                loop {
                    if cancelled() {
                        return;
                    }
                    let now = Instant::now();
                    if now >= deadline {
                        task();
                        return;
                    }
                    std::thread::sleep((deadline - now).min(CANCEL_POLL));
                }
            })
            .map(drop)
    }
}

#[cfg(test)]
pub(crate) use fake::FakeClock;

#[cfg(test)]
mod fake {
    use std::sync::Arc;
    use std::time::{Duration, Instant, SystemTime};

    use parking_lot::Mutex;

    use super::{Cancelled, Clock, Task};

    /// A clock that stands still until [`advance`](Self::advance)d, and runs
    /// due tasks on the thread that advances it.
    #[derive(Debug)]
    pub(crate) struct FakeClock {
        start: Instant,
        wall_start: SystemTime,
        state: Mutex<State>,
    }

    #[derive(Debug, Default)]
    struct State {
        /// Fake time since the clock was made.
        elapsed: Duration,
        /// Tasks waiting, in the order they were scheduled.
        waiting: Vec<Waiting>,
        /// Tasks that were due and cancelled.
        cancelled: usize,
    }

    struct Waiting {
        due: Duration,
        cancelled: Cancelled,
        task: Task,
    }

    impl std::fmt::Debug for Waiting {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("Waiting").field("due", &self.due).finish()
        }
    }

    impl FakeClock {
        pub(crate) fn new() -> Arc<Self> {
            Arc::new(FakeClock {
                start: Instant::now(),
                wall_start: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                state: Mutex::new(State::default()),
            })
        }

        /// Fake time since the clock was made.
        pub(crate) fn elapsed(&self) -> Duration {
            self.state.lock().elapsed
        }

        /// The wall-clock time `at` after the clock was made.
        pub(crate) fn wall_at(&self, at: Duration) -> SystemTime {
            self.wall_start + at
        }

        /// When the waiting tasks are due (time since the clock was made),
        /// earliest first.
        pub(crate) fn waiting(&self) -> Vec<Duration> {
            let mut due: Vec<Duration> = self.state.lock().waiting.iter().map(|w| w.due).collect();
            due.sort();
            due
        }

        /// How many tasks came due and were cancelled.
        pub(crate) fn cancelled(&self) -> usize {
            self.state.lock().cancelled
        }

        /// Moves time forward by `by`, running every task that comes due
        /// meanwhile at its due time, earliest first (tasks those tasks
        /// schedule included).
        pub(crate) fn advance(&self, by: Duration) {
            let target = self.elapsed() + by;
            loop {
                let next = {
                    let mut state = self.state.lock();
                    let earliest = state
                        .waiting
                        .iter()
                        .enumerate()
                        .filter(|(_, w)| w.due <= target)
                        .min_by_key(|(i, w)| (w.due, *i))
                        .map(|(i, _)| i);
                    match earliest {
                        Some(i) => {
                            let waiting = state.waiting.remove(i);
                            state.elapsed = state.elapsed.max(waiting.due);
                            waiting
                        }
                        None => {
                            state.elapsed = target;
                            return;
                        }
                    }
                };
                // Run without the lock: the task reads the clock and may
                // schedule more.
                if (next.cancelled)() {
                    self.state.lock().cancelled += 1;
                } else {
                    (next.task)();
                }
            }
        }
    }

    impl Clock for FakeClock {
        fn now(&self) -> Instant {
            self.start + self.elapsed()
        }

        fn wall(&self) -> SystemTime {
            self.wall_at(self.elapsed())
        }

        fn run_after(
            &self,
            delay: Duration,
            _name: String,
            cancelled: Cancelled,
            task: Task,
        ) -> std::io::Result<()> {
            let mut state = self.state.lock();
            let due = state.elapsed + delay;
            state.waiting.push(Waiting {
                due,
                cancelled,
                task,
            });
            Ok(())
        }
    }
}
