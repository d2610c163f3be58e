//! Where tool calls run: a few hot threads for fast calls, tokio's blocking
//! pool for the rest.
//!
//! Plugin code never runs on the async runtime. Handing every call to
//! `spawn_blocking` costs a thread wake-up per call: under load the blocking
//! pool grows to one thread per concurrent call, and nearly every call wakes
//! a parked one (measured: about half the server's CPU in the scheduler for
//! no-op tools, `BENCHMARKS.md`). So calls go first to a queue served by
//! one *lane* thread per core, which stay busy without parking while work
//! keeps coming: a lane that finished a call stays awake for [`SPIN`],
//! yielding its CPU, before it sleeps, and a call that comes meanwhile
//! costs no wake-up. A lane stuck in a slow call must not hold up the calls
//! queued behind it: a call that no lane has started within [`ESCALATE_AFTER`]
//! is handed to tokio's blocking pool too (it stays queued: a lane that
//! wakes late still takes it if no blocking thread has yet), and
//! when every lane is busy with a call older than that, new calls skip the
//! queue. A call that finds the queue empty and a lane asleep that no other
//! call woke wakes that lane for itself and needs no such timer: nothing
//! stands before it but free lanes. Each call runs exactly once, whoever
//! takes it first.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Starts `work` (an admin operation: a rescan, a reload, a retry, the
/// plugins' stop) on a thread of its own, at once; the future is what it
/// returns. An error when no thread
/// could be started (the host out of processes or threads: a cgroup's
/// `pids.max`), `work` and what it holds (an admin claim) dropped then, or
/// when `work` panicked. Tokio's `spawn_blocking` panics when it cannot
/// start a thread, and the admin claim its closure held was never given
/// back: every later rescan and reload was refused 409, and the retries of
/// plugins the host had been short for stopped, until a restart.
pub(crate) fn on_a_thread<T: Send + 'static>(
    name: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> impl std::future::Future<Output = std::io::Result<T>> + Send {
    let (done, result) = tokio::sync::oneshot::channel();
    // Not started: the closure, and `work` with it, is dropped here.
    let started = std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || {
            let _ = done.send(work());
        });
    async move {
        started?;
        result
            .await
            .map_err(|_| std::io::Error::other("it panicked"))
    }
}

/// How long a queued call may wait for a lane before it moves to the
/// blocking pool; also how long a lane's current call may run before the
/// lane counts as stuck.
pub(crate) const ESCALATE_AFTER: Duration = Duration::from_millis(2);

/// Calls queued per lane at most; beyond that new calls skip the queue.
const QUEUE_PER_LANE: usize = 8;

/// How long a lane that has just finished a call yields its CPU, looking
/// for the next one, before it sleeps: under steady traffic the next call
/// finds it awake, and costs no wake-up of a sleeping thread (on a VM whose
/// idle CPUs halt, tens of microseconds each).
const SPIN: Duration = Duration::from_micros(100);

type Task = Box<dyn FnOnce() + Send>;

/// One call: taken (and run) exactly once.
struct Job {
    task: Mutex<Option<Task>>,
}

impl Job {
    fn take(&self) -> Option<Task> {
        self.task
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// Where [`CallPool::run`] put a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Queued {
    /// Queued first, with a lane free for it: one awake (`wake: false`),
    /// or a sleeping one woken for it.
    First { wake: bool },
    /// Queued behind other calls or busy lanes (`wake`: a sleeping lane
    /// was woken): escalated if no lane starts it within [`ESCALATE_AFTER`].
    Waiting { wake: bool },
    /// Not queued: the blocking pool runs it.
    No,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub(crate) struct CallPool {
    /// Dropped with the last clone: then the lanes end.
    owner: Arc<Owner>,
}

/// Tells the lanes to end when the last [`CallPool`] is dropped. (They
/// used to end when they alone held `Inner`, judged by its strong count,
/// which a lane read while the pool was still starting its siblings: under
/// load the first lane saw too few holders and ended, and the others
/// followed, so every call went to the blocking pool.)
struct Owner(Arc<Inner>);

impl Drop for Owner {
    fn drop(&mut self) {
        // Under the queue's lock, so no lane is between its look at
        // `closed` and its wait.
        let _queue = self.0.queue.lock().unwrap_or_else(PoisonError::into_inner);
        self.0.closed.store(true, Ordering::Release);
        self.0.ready.notify_all();
    }
}

impl std::fmt::Debug for CallPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallPool")
            .field("lanes", &self.inner().busy_since.len())
            .finish_non_exhaustive()
    }
}

/// The calls waiting for a lane, and the lanes waiting for a call.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Arc<Job>>,
    /// Lanes asleep on `ready`.
    waiting: usize,
    /// Of those, how many a call already woke for itself (see
    /// [`CallPool::run`]); a lane's wake-up, whatever woke it, serves one.
    claimed: usize,
    /// Lanes awake without a call, yielding their CPU for up to [`SPIN`]:
    /// each looks at `jobs` again before it sleeps, so a call queued while
    /// one does is taken without a wake-up.
    spinning: usize,
}

struct Inner {
    queue: Mutex<Queue>,
    ready: Condvar,
    /// Per lane: when its current call started (µs since `epoch`), 0 = idle.
    busy_since: Vec<AtomicU64>,
    epoch: Instant,
    /// Every [`CallPool`] is gone: the lanes end.
    closed: AtomicBool,
    /// [`SPIN`], but in tests.
    spin: Duration,
    /// Calls queued for a lane awake ([`Queued::First`] without a wake-up),
    /// for tests.
    #[cfg(test)]
    taken: std::sync::atomic::AtomicUsize,
}

impl Inner {
    fn now_us(&self) -> u64 {
        // +1: 0 means idle.
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX) + 1
    }

    /// Whether some lane is idle or busy with a call younger than
    /// [`ESCALATE_AFTER`].
    fn has_live_lane(&self) -> bool {
        let now = self.now_us();
        let limit = u64::try_from(ESCALATE_AFTER.as_micros()).unwrap_or(u64::MAX);
        self.busy_since.iter().any(|since| {
            let since = since.load(Ordering::Acquire);
            since == 0 || now.saturating_sub(since) < limit
        })
    }

    fn lane(self: Arc<Self>, index: usize) {
        // Until when it looks for its next call awake.
        let mut awake_until = None;
        loop {
            let job = {
                let mut queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if let Some(job) = queue.jobs.pop_front() {
                        break job;
                    }
                    if self.closed.load(Ordering::Acquire) {
                        return;
                    }
                    if awake_until.is_some_and(|until| Instant::now() < until) {
                        queue.spinning += 1;
                        drop(queue);
                        std::thread::yield_now();
                        queue = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
                        queue.spinning -= 1;
                        continue;
                    }
                    queue.waiting += 1;
                    queue = self
                        .ready
                        .wait_timeout(queue, Duration::from_secs(1))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    queue.waiting -= 1;
                    queue.claimed = queue.claimed.saturating_sub(1);
                }
            };
            if let Some(task) = job.take() {
                self.busy_since[index].store(self.now_us(), Ordering::Release);
                task();
                self.busy_since[index].store(0, Ordering::Release);
                awake_until = Some(Instant::now() + self.spin);
            }
        }
    }
}

impl CallPool {
    /// A pool with one lane thread per core (at least 1).
    pub(crate) fn new() -> Self {
        Self::spinning_for(SPIN)
    }

    /// [`CallPool::new`] whose lanes stay awake `spin` after a call.
    fn spinning_for(spin: Duration) -> Self {
        let lanes = std::thread::available_parallelism().map_or(1, usize::from);
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            busy_since: (0..lanes).map(|_| AtomicU64::new(0)).collect(),
            epoch: Instant::now(),
            closed: AtomicBool::new(false),
            spin,
            #[cfg(test)]
            taken: std::sync::atomic::AtomicUsize::new(0),
        });
        for index in 0..lanes {
            let inner = Arc::clone(&inner);
            let spawned = std::thread::Builder::new()
                .name(format!("forgesyte-call-{index}"))
                .spawn(move || inner.lane(index));
            if let Err(e) = spawned {
                // Without lanes every call escalates: slower, still correct.
                tracing::warn!(error = %e, "cannot start a tool-call lane");
            }
        }
        CallPool {
            owner: Arc::new(Owner(inner)),
        }
    }

    fn inner(&self) -> &Arc<Inner> {
        &self.owner.0
    }

    /// How many lanes are alive (their threads not ended): the holders of
    /// `Inner` besides the owner.
    #[cfg(test)]
    fn live_lanes(&self) -> usize {
        Arc::strong_count(self.inner()) - 1
    }

    /// Runs `f` off the async runtime and returns its result; `None` if it
    /// panicked (plugin panics are caught by the SDK; this is the host's own
    /// code failing).
    pub(crate) async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task: Task = Box::new(move || {
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
            let _ = tx.send(result.ok());
        });
        let job = Arc::new(Job {
            task: Mutex::new(Some(task)),
        });
        let queued = {
            let mut queue = self
                .inner()
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if queue.jobs.is_empty() && queue.spinning > 0 {
                // A lane awake and free: it takes this call at its next
                // look (nothing is queued before it).
                queue.jobs.push_back(Arc::clone(&job));
                Queued::First { wake: false }
            } else if queue.jobs.is_empty() && queue.waiting > queue.claimed {
                // A lane asleep, none woken for another call: woken now,
                // it takes this call first (nothing is queued before it),
                // unless another lane, free too, takes it sooner. Either
                // way no lane in a call stands before it, and it needs no
                // escalation timer.
                queue.claimed += 1;
                queue.jobs.push_back(Arc::clone(&job));
                Queued::First { wake: true }
            } else if queue.jobs.len() < QUEUE_PER_LANE * self.inner().busy_since.len()
                && self.inner().has_live_lane()
            {
                queue.jobs.push_back(Arc::clone(&job));
                // A lane is woken only if one sleeps that no other call
                // woke already.
                let wake = queue.waiting > queue.claimed;
                queue.claimed += usize::from(wake);
                Queued::Waiting { wake }
            } else {
                Queued::No
            }
        };
        if let Queued::First { wake } = queued {
            if wake {
                self.inner().ready.notify_one();
            } else {
                #[cfg(test)]
                self.inner().taken.fetch_add(1, Ordering::Relaxed);
            }
            return rx.await.ok().flatten();
        }
        if let Queued::Waiting { wake } = queued {
            if wake {
                self.inner().ready.notify_one();
            }
            let mut rx = rx;
            tokio::select! {
                result = &mut rx => return result.ok().flatten(),
                () = tokio::time::sleep(ESCALATE_AFTER) => {}
            }
            // No lane got to it in time: the blocking pool runs it too,
            // whoever starts first (a lane that wakes late still takes it
            // from the queue while the blocking threads are all busy).
            // With no thread to be had, the lanes alone (`spawn_blocking`
            // panics then: caught, the call stays queued for them).
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                tokio::task::spawn_blocking(move || {
                    if let Some(task) = job.take() {
                        task();
                    }
                })
            }));
            return rx.await.ok().flatten();
        }
        if let Some(task) = job.take() {
            // No thread to be had: `spawn_blocking` panics, and the call,
            // dropped with it, answers as one no thread took.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
                tokio::task::spawn_blocking(task)
            }));
        }
        rx.await.ok().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Admin work runs on a thread of its own and hands back its result;
    /// work that panics is an error, and what it held (an admin claim) is
    /// given back, not kept for ever.
    #[tokio::test]
    async fn admin_work_answers_and_a_panic_gives_back_what_it_held() {
        struct Claim(Arc<AtomicBool>);
        impl Drop for Claim {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let name = on_a_thread("forgesyte-test", || {
            std::thread::current().name().map(str::to_owned)
        })
        .await
        .unwrap();
        assert_eq!(name.as_deref(), Some("forgesyte-test"));
        let released = Arc::new(AtomicBool::new(false));
        let claim = Claim(Arc::clone(&released));
        let outcome = on_a_thread("forgesyte-test", move || {
            let _held = claim;
            panic!("a bug in the work");
        })
        .await;
        assert!(outcome.is_err());
        assert!(released.load(Ordering::SeqCst));
    }

    /// Every lane lives as long as the pool (the first used to end while
    /// the pool was still starting the others, now and then under load),
    /// and ends with its last clone.
    #[test]
    fn the_lanes_live_until_the_last_clone_is_dropped() {
        let lanes = std::thread::available_parallelism().map_or(1, usize::from);
        let pool = CallPool::new();
        let copy = pool.clone();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(copy.live_lanes(), lanes);
        drop(copy);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.live_lanes(), lanes);
        let inner = Arc::clone(pool.inner());
        drop(pool);
        let deadline = Instant::now() + Duration::from_secs(10);
        // Only this test's own reference is left once every lane ended.
        while Arc::strong_count(&inner) > 1 {
            assert!(Instant::now() < deadline, "the lanes never ended");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_call_runs_exactly_once() {
        let pool = CallPool::new();
        let count = Arc::new(AtomicU64::new(0));
        let calls: Vec<_> = (0..500)
            .map(|i| {
                let (pool, count) = (pool.clone(), Arc::clone(&count));
                tokio::spawn(async move {
                    pool.run(move || {
                        count.fetch_add(1, Ordering::SeqCst);
                        i * 2
                    })
                    .await
                })
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            assert_eq!(call.await.unwrap(), Some(i * 2));
        }
        assert_eq!(count.load(Ordering::SeqCst), 500);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn slow_calls_on_every_lane_do_not_hold_up_fast_ones() {
        let pool = CallPool::new();
        let lanes = pool.inner().busy_since.len();
        // Occupy every lane (and more) with calls that block for a second.
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let slow: Vec<_> = (0..lanes + 2)
            .map(|_| {
                let (pool, gate) = (pool.clone(), Arc::clone(&gate));
                tokio::spawn(async move {
                    pool.run(move || {
                        let (lock, cvar) = &*gate;
                        let open = lock.lock().unwrap_or_else(PoisonError::into_inner);
                        let _unused = cvar
                            .wait_timeout_while(open, Duration::from_secs(10), |open| !*open)
                            .unwrap_or_else(PoisonError::into_inner);
                    })
                    .await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Fast calls still finish promptly, on the blocking pool.
        let started = Instant::now();
        for i in 0..20 {
            assert_eq!(pool.run(move || i + 1).await, Some(i + 1));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "fast calls waited for the slow ones: {:?}",
            started.elapsed()
        );
        let (lock, cvar) = &*gate;
        *lock.lock().unwrap() = true;
        cvar.notify_all();
        for call in slow {
            assert_eq!(call.await.unwrap(), Some(()));
        }
    }

    /// Waits until every lane sleeps (so none is awake either) and none
    /// counts as woken for a call; fails after 10 s, saying `when`.
    async fn all_asleep(pool: &CallPool, when: &str) {
        let lanes = pool.inner().busy_since.len();
        let asleep = || {
            let queue = pool.inner().queue.lock().unwrap();
            (queue.waiting, queue.claimed)
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while asleep() != (lanes, 0) {
            assert!(Instant::now() < deadline, "{when}: {:?}", asleep());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A call that finds a lane asleep runs on it (it is queued without a
    /// timer, and nothing escalates it to the blocking pool), one call
    /// after another; and the count of lanes woken for calls goes back to
    /// zero once they are asleep again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_that_find_a_lane_asleep_run_on_it() {
        let pool = CallPool::new();
        all_asleep(&pool, "before the calls").await;
        for _ in 0..50 {
            let thread = pool
                .run(|| std::thread::current().name().map(str::to_owned))
                .await
                .flatten();
            assert!(
                thread
                    .as_deref()
                    .is_some_and(|t| t.starts_with("forgesyte-call-")),
                "ran on {thread:?}"
            );
        }
        all_asleep(&pool, "after the calls").await;
    }

    /// A lane that has just finished a call stays awake for a while: a
    /// call that comes then is queued for it, with no wake-up and no
    /// escalation timer, and runs; once the while is over, it sleeps.
    #[tokio::test]
    async fn a_call_soon_after_another_finds_its_lane_awake() {
        let pool = CallPool::spinning_for(Duration::from_secs(2));
        // Its lanes started (a call before would go to the blocking pool).
        all_asleep(&pool, "before the calls").await;
        let spinning = || pool.inner().queue.lock().unwrap().spinning;
        assert_eq!(pool.run(|| 1).await, Some(1));
        let deadline = Instant::now() + Duration::from_secs(1);
        while spinning() == 0 {
            assert!(Instant::now() < deadline, "no lane stayed awake");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.run(|| 2).await, Some(2));
        assert_eq!(pool.inner().taken.load(Ordering::Relaxed), 1);
        // Awake for its while only.
        let pool = CallPool::spinning_for(Duration::from_millis(20));
        assert_eq!(pool.run(|| 3).await, Some(3));
        all_asleep(&pool, "after the awake while").await;
    }

    #[tokio::test]
    async fn a_panicking_task_is_none_not_a_crash() {
        let pool = CallPool::new();
        let result: Option<()> = pool.run(|| panic!("host bug")).await;
        assert_eq!(result, None);
        assert_eq!(pool.run(|| 7).await, Some(7));
    }
}
