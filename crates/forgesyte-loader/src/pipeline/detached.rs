//! Work that may never return, run where nobody waits for it forever: an
//! in-process plugin's constructor is plugin code on a thread of this
//! process, which nothing can stop. A load pass hands such work to a
//! [`Crew`] of threads it never joins, and [`collect`] waits for each piece
//! at most its [`Detached::limit`] from its start: one constructor that
//! hangs is that plugin's failure, the rest of the pass goes on, and the
//! thread stays behind, still in the plugin's code (a constructor that
//! returns late has its instance dropped there). The limits are watched by
//! a [`Watch`], which the pass's own thread also runs between the items of
//! its serial stage, before [`collect`].
//!
//! How many threads: the pass's `workers`, one more for each job that has
//! run [`GROW_AFTER`] while others wait (so constructors that hang are
//! waited for together, not one limit after another), at most
//! [`MAX_LIVE`] running jobs not given up on, and [`MAX_THREADS`] threads
//! in all (the ones left in given-up jobs count). A job waits for a thread
//! without a deadline while one can come; when none can (every thread held
//! by a given-up job at the cap, or none can be started), the jobs still
//! waiting are given up at once and never run.
//!
//! Hand-written: rayon's pools and scopes, like `std::thread::scope`, join
//! every job before they return, which is exactly what must not happen.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::threads::{catch_panic, reserve_heap};

/// A piece of work that owns what it needs, and the time it may take
/// from its start.
pub(super) struct Detached<R> {
    /// The work.
    pub(super) work: Job<R>,
    /// How long it may run before it is given up on.
    pub(super) limit: Duration,
}

impl<R: 'static> Detached<R> {
    /// The same work, its result turned by `f` (on the crew's thread).
    pub(super) fn map<Q>(self, f: impl FnOnce(R) -> Q + Send + 'static) -> Detached<Q> {
        let work = self.work;
        Detached {
            work: Box::new(move || f(work())),
            limit: self.limit,
        }
    }
}

/// Work for a crew thread.
pub(super) type Job<R> = Box<dyn FnOnce() -> R + Send>;

/// Why a [`Watch`] gave up on a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum GaveUp {
    /// It ran this long (its limit) and has not returned; its thread is
    /// left to it.
    Ran(Duration),
    /// It never started, and never will: no thread could be had, for this
    /// reason.
    NoThread(String),
}

/// What a crew thread says of the work it took, by the work's index.
pub(super) enum Event<R> {
    /// It started at this instant.
    Started(usize, Instant),
    /// It ended: its result, or the message of its panic.
    Done(usize, Result<R, String>),
}

/// How long a job runs before the jobs waiting behind it get one more
/// thread.
pub(super) const GROW_AFTER: Duration = Duration::from_millis(50);

/// The most jobs that run at once, given-up ones not counted.
const MAX_LIVE: usize = 16;

/// The most threads a crew starts, the ones held by given-up jobs
/// counted: a pass of thousands of hanging constructors must not start
/// thousands.
const MAX_THREADS: usize = 64;

/// Where a job stands between its crew thread and the pass: queued, then
/// started or cancelled (once), and a started one then finished or given
/// up on (once): a job given up on drops its late result on its own
/// thread, never on the pass's.
#[derive(Debug, Default, Clone)]
struct Ticket(Arc<AtomicU8>);

impl Ticket {
    const QUEUED: u8 = 0;
    const STARTED: u8 = 1;
    const CANCELLED: u8 = 2;
    const FINISHED: u8 = 3;
    const GIVEN_UP: u8 = 4;

    /// Moves `from` → `to`; `false` when it was not at `from`.
    fn moved(&self, from: u8, to: u8) -> bool {
        self.0
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// The jobs waiting for a crew thread, shared by its threads.
type Queue<R> = Arc<Mutex<Receiver<(usize, Ticket, Job<R>)>>>;

/// Threads that run [`Job`]s from one queue and report [`Event`]s. The
/// threads end when the crew is dropped and their current work (if it ever
/// does) ends; a job cancelled before it started is skipped.
pub(super) struct Crew<R> {
    jobs: Sender<(usize, Ticket, Job<R>)>,
    queue: Queue<R>,
    events: Sender<Event<R>>,
    /// Threads started.
    started: usize,
    /// How many threads to start before jobs wait for one.
    wanted: usize,
    /// Why the last thread could not be started, if it could not.
    cannot_start: Option<String>,
    /// What each thread reserves of its malloc heap before it takes work.
    heap_reserve: usize,
    /// Each submitted job's ticket, by index.
    tickets: Vec<Option<Ticket>>,
}

impl<R: Send + 'static> Crew<R> {
    /// A crew of `wanted` threads (at least 1) to begin with, none started
    /// yet, for `items` jobs at most, reporting to `events`; each thread
    /// reserves `heap_reserve` bytes of heap first
    /// (`threads::reserve_heap`).
    pub(super) fn new(
        wanted: usize,
        items: usize,
        heap_reserve: usize,
        events: Sender<Event<R>>,
    ) -> Self {
        let (jobs, queue) = channel();
        Crew {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            events,
            started: 0,
            wanted: wanted.clamp(1, MAX_LIVE),
            cannot_start: None,
            heap_reserve,
            tickets: vec![None; items],
        }
    }

    /// Queues `job` as item `index`, starting a thread for it while fewer
    /// than wanted run. Never runs it on the calling thread, which it
    /// could hold for good.
    pub(super) fn submit(&mut self, index: usize, job: Job<R>) {
        if self.started < self.wanted {
            self.add_thread();
        }
        let ticket = Ticket::default();
        if let Some(slot) = self.tickets.get_mut(index) {
            *slot = Some(ticket.clone());
        }
        // The crew holds the receiver too, so the send cannot fail.
        let _ = self.jobs.send((index, ticket, job));
    }

    /// Cancels job `index` if it has not started: then it never runs.
    fn cancel(&self, index: usize) -> bool {
        self.move_ticket(index, Ticket::QUEUED, Ticket::CANCELLED)
    }

    /// Gives up on running job `index` unless it has just finished (its
    /// result is then on its way): what it returns later is dropped on
    /// its thread.
    fn give_up(&self, index: usize) -> bool {
        self.move_ticket(index, Ticket::STARTED, Ticket::GIVEN_UP)
    }

    fn move_ticket(&self, index: usize, from: u8, to: u8) -> bool {
        self.tickets
            .get(index)
            .and_then(Option::as_ref)
            .is_some_and(|ticket| ticket.moved(from, to))
    }

    /// Starts one more thread, unless [`MAX_THREADS`] are started or one
    /// could not be (then not tried again: said once in the log).
    fn add_thread(&mut self) -> bool {
        if self.started >= MAX_THREADS || self.cannot_start.is_some() {
            return false;
        }
        let (queue, events, reserve) = (
            Arc::clone(&self.queue),
            self.events.clone(),
            self.heap_reserve,
        );
        let spawned = std::thread::Builder::new()
            .name(format!("forgesyte-construct-{}", self.started))
            .spawn(move || serve(&queue, &events, reserve));
        match spawned {
            Ok(_) => {
                self.started += 1;
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a construction thread");
                self.cannot_start = Some(e.to_string());
                false
            }
        }
    }

    /// Why no job waiting can ever start, if none can: every thread is
    /// held by a job given up on (`given_up_running` of them) and no thread
    /// can be added.
    fn starved(&self, given_up_running: usize) -> Option<String> {
        if given_up_running < self.started {
            return None;
        }
        match &self.cannot_start {
            Some(why) => Some(format!("no construction thread could be started: {why}")),
            None if self.started >= MAX_THREADS => Some(format!(
                "all {MAX_THREADS} construction threads are held by constructors that have not \
                 returned"
            )),
            None => None,
        }
    }
}

/// A crew thread: takes jobs until the crew is gone.
fn serve<R: Send + 'static>(
    queue: &Mutex<Receiver<(usize, Ticket, Job<R>)>>,
    events: &Sender<Event<R>>,
    heap_reserve: usize,
) {
    reserve_heap(heap_reserve);
    loop {
        // The lock is held only while waiting for a job: a thread in a job
        // that never ends holds nothing the others need.
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((index, ticket, job)) = next else {
            return;
        };
        if !ticket.moved(Ticket::QUEUED, Ticket::STARTED) {
            continue; // given up on before it started
        }
        let _ = events.send(Event::Started(index, Instant::now()));
        let result = catch_panic(job);
        // Given up on meanwhile, or nobody listening any more (the pass
        // ended): the result, an instance constructed late, is dropped
        // here, its destructor on this thread, not the pass's.
        if ticket.moved(Ticket::STARTED, Ticket::FINISHED) {
            let _ = events.send(Event::Done(index, result));
        }
    }
}

/// Where a detached job stands, for a [`Watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// Queued, not started.
    Waiting,
    /// Running since then; `grown`: the crew got a thread for the queue
    /// behind it.
    Running { since: Instant, grown: bool },
    /// Given up on while it ran; not returned yet.
    GivenUp,
    /// Returned, or given up on before it started.
    Ended,
}

/// Where each detached job of a pass stands: what [`collect`] watches, and
/// what the pass's own thread watches between its opens (so that a job
/// past its limit is given up on, and the crew grows, while the pass is
/// still opening libraries or waiting for runners to start).
#[derive(Debug)]
pub(super) struct Watch {
    stages: Vec<Option<Stage>>,
    limits: Vec<Duration>,
    /// The jobs submitted and not ended, by index.
    watched: Vec<usize>,
}

impl Watch {
    /// A watch over `items` items, none submitted yet.
    pub(super) fn new(items: usize) -> Self {
        Watch {
            stages: vec![None; items],
            limits: vec![Duration::ZERO; items],
            watched: Vec::new(),
        }
    }

    /// Item `i` was submitted to the crew, to be given up on `limit` after
    /// its start.
    pub(super) fn submitted(&mut self, i: usize, limit: Duration) {
        if let (Some(stage), Some(slot)) = (self.stages.get_mut(i), self.limits.get_mut(i)) {
            *stage = Some(Stage::Waiting);
            *slot = limit;
            self.watched.push(i);
        }
    }

    /// Takes one event of the crew or the pass; `true` when it gave item
    /// `i` its result (through `done`, but for a panic). A result that
    /// comes after its item was given up on is dropped.
    pub(super) fn take<R>(
        &mut self,
        event: Event<R>,
        results: &mut [Option<Result<R, String>>],
        done: &impl Fn(usize, R) -> R,
    ) -> bool {
        match event {
            Event::Started(i, since) => {
                if let Some(stage @ Some(Stage::Waiting)) = self.stages.get_mut(i) {
                    *stage = Some(Stage::Running {
                        since,
                        grown: false,
                    });
                }
                false
            }
            Event::Done(i, result) => {
                if let Some(stage) = self.stages.get_mut(i) {
                    *stage = stage.map(|_| Stage::Ended);
                }
                match results.get_mut(i) {
                    Some(slot @ None) => {
                        *slot = Some(result.map(|r| done(i, r)));
                        true
                    }
                    _ => false,
                }
            }
        }
    }

    /// At `now`: gives up on the jobs past their limit (`gave_up(i,
    /// GaveUp::Ran(limit))`, then through `done`), grows the crew for the
    /// jobs waiting behind slow ones, and gives up on the waiting jobs no
    /// thread can ever take. Returns how many items it gave a result, and
    /// when the next job is due (its limit, or its growth step), if any.
    pub(super) fn check<R: Send + 'static>(
        &mut self,
        now: Instant,
        results: &mut [Option<Result<R, String>>],
        crew: Option<&mut Crew<R>>,
        (done, gave_up): (&impl Fn(usize, R) -> R, &impl Fn(usize, GaveUp) -> R),
    ) -> (usize, Option<Instant>) {
        let gave_up = |i: usize, why: GaveUp| done(i, gave_up(i, why));
        let stages = &mut self.stages;
        self.watched
            .retain(|&i| !matches!(stages[i], Some(Stage::Ended) | None));
        let mut ended = 0;
        let mut waiting = Vec::new();
        let (mut live, mut given_up, mut slow) = (0, 0, 0);
        let mut next: Option<Instant> = None;
        for &i in &self.watched {
            let limit = self.limits[i];
            match stages[i] {
                Some(Stage::Waiting) => waiting.push(i),
                Some(Stage::Running { since, grown }) => {
                    // A job that finished just now is not given up on: its
                    // result is on its way.
                    if now >= since + limit
                        && results[i].is_none()
                        && crew.as_deref().is_some_and(|crew| crew.give_up(i))
                    {
                        results[i] = Some(Ok(gave_up(i, GaveUp::Ran(limit))));
                        ended += 1;
                        stages[i] = Some(Stage::GivenUp);
                        given_up += 1;
                        continue;
                    }
                    live += 1;
                    next = next.into_iter().chain([since + limit]).min();
                    if grown {
                        slow += 1;
                    } else if now >= since + GROW_AFTER {
                        stages[i] = Some(Stage::Running { since, grown: true });
                        slow += 1;
                    } else {
                        next = next.into_iter().chain([since + GROW_AFTER]).min();
                    }
                }
                Some(Stage::GivenUp) => given_up += 1,
                Some(Stage::Ended) | None => {}
            }
        }
        if let Some(crew) = crew
            && !waiting.is_empty()
        {
            // Threads for the waiting: the wanted ones, and one for each
            // slow job, those left in given-up jobs aside; none for jobs a
            // free thread is about to take.
            let want = (crew.wanted + slow).min(MAX_LIVE);
            let free = crew.started.saturating_sub(live + given_up);
            let mut short = want
                .saturating_sub(live + free)
                .min(waiting.len().saturating_sub(free));
            while short > 0 && crew.add_thread() {
                short -= 1;
            }
            if let Some(why) = crew.starved(given_up) {
                for &i in &waiting {
                    if results[i].is_none() && crew.cancel(i) {
                        results[i] = Some(Ok(gave_up(i, GaveUp::NoThread(why.clone()))));
                        ended += 1;
                        stages[i] = Some(Stage::Ended);
                    }
                }
            }
        }
        (ended, next)
    }
}

/// Takes the pass's results from `events` until every item has one.
/// The jobs `watch` was told of were submitted to `crew`: such a job
/// still running its limit after its start gets `gave_up(i,
/// GaveUp::Ran(limit))`, and one that can never start `gave_up(i,
/// GaveUp::NoThread(why))`; what it returns later is dropped. Grows the
/// crew as the module says. Every result that is not a panic goes through
/// `done` as it comes, given-up ones too.
pub(super) fn collect<R: Send + 'static>(
    events: &Receiver<Event<R>>,
    results: &mut [Option<Result<R, String>>],
    watch: &mut Watch,
    mut crew: Option<&mut Crew<R>>,
    done: impl Fn(usize, R) -> R,
    gave_up: impl Fn(usize, GaveUp) -> R,
) {
    let mut open = results.iter().filter(|r| r.is_none()).count();
    while open > 0 {
        // What has come, first: the rest is worked out once per wait, not
        // once per event (a 1,000-plugin pass sends 2,000).
        while let Ok(event) = events.try_recv() {
            open -= usize::from(watch.take(event, results, &done));
        }
        if open == 0 {
            break;
        }
        let now = Instant::now();
        let (ended, next) = watch.check(now, results, crew.as_deref_mut(), (&done, &gave_up));
        open -= ended;
        if open == 0 {
            break;
        }
        let event = match next {
            Some(deadline) => events.recv_timeout(deadline.saturating_duration_since(now)),
            None => events.recv().map_err(|_| RecvTimeoutError::Disconnected),
        };
        match event {
            Ok(event) => open -= usize::from(watch.take(event, results, &done)),
            Err(RecvTimeoutError::Timeout) => {}
            // Every sender gone: nothing more can come.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `jobs` (limit, work) on a crew of `wanted` threads; the
    /// results in order, and how long it took.
    fn run(wanted: usize, jobs: Vec<(Duration, Job<u32>)>) -> (Vec<Result<u32, String>>, Duration) {
        let started = Instant::now();
        let (to_results, events) = channel();
        let mut crew = Crew::new(wanted, jobs.len(), 0, to_results);
        let mut watch = Watch::new(jobs.len());
        let mut results: Vec<Option<Result<u32, String>>> = jobs.iter().map(|_| None).collect();
        for (i, (limit, job)) in jobs.into_iter().enumerate() {
            crew.submit(i, job);
            watch.submitted(i, limit);
        }
        collect(
            &events,
            &mut results,
            &mut watch,
            Some(&mut crew),
            |_, r| r,
            |i, why| match why {
                GaveUp::Ran(_) => 1000 + u32::try_from(i).unwrap(),
                GaveUp::NoThread(_) => 2000 + u32::try_from(i).unwrap(),
            },
        );
        (
            results.into_iter().map(Option::unwrap).collect(),
            started.elapsed(),
        )
    }

    fn hangs() -> Job<u32> {
        Box::new(|| {
            std::thread::sleep(Duration::from_secs(3600));
            0
        })
    }

    /// Hung jobs on one wanted thread are waited for together, and the
    /// quick ones queued behind them all run (none given up for waiting).
    #[test]
    fn hung_jobs_are_waited_for_together_and_the_queue_behind_them_runs() {
        let limit = Duration::from_millis(600);
        let mut jobs: Vec<(Duration, Job<u32>)> = (0..6).map(|_| (limit, hangs())).collect();
        jobs.extend((6..9_u32).map(|i| (limit, Box::new(move || i) as Job<u32>)));
        let (results, took) = run(1, jobs);
        assert_eq!(
            results,
            [1000, 1001, 1002, 1003, 1004, 1005, 6, 7, 8].map(Ok),
            "{took:?}"
        );
        // One limit and a growth step per hung job, not one limit each.
        assert!(took < limit * 3, "{took:?}");
    }

    /// What a job given up on returns late is dropped on its own thread,
    /// never on the thread that watches (the pass's, which opens libraries):
    /// an instance's destructor is plugin code too.
    #[test]
    fn a_late_result_is_dropped_on_its_own_thread() {
        struct Late(Arc<Mutex<Option<String>>>);
        impl Drop for Late {
            fn drop(&mut self) {
                let name = std::thread::current().name().map(str::to_owned);
                *self.0.lock().unwrap() = name.or(Some("unnamed".to_owned()));
            }
        }
        let dropped_on = Arc::new(Mutex::new(None));
        let (to_results, events) = channel();
        let mut crew = Crew::<Option<Late>>::new(1, 1, 0, to_results);
        let late = Arc::clone(&dropped_on);
        crew.submit(
            0,
            Box::new(move || {
                std::thread::sleep(Duration::from_millis(400));
                Some(Late(late))
            }),
        );
        let mut watch = Watch::new(1);
        watch.submitted(0, Duration::from_millis(100));
        let mut results = vec![None];
        collect(
            &events,
            &mut results,
            &mut watch,
            Some(&mut crew),
            |_, r| r,
            |_, _| None,
        );
        assert!(matches!(results[0], Some(Ok(None))));
        // The watching thread takes what comes late, as the pass's next
        // wave would.
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped_on.lock().unwrap().is_none() {
            if let Ok(event) = events.try_recv() {
                watch.take(event, &mut results, &|_, r| r);
            }
            assert!(
                Instant::now() < deadline,
                "the late result was never dropped"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let on = dropped_on.lock().unwrap().clone().unwrap();
        assert!(on.starts_with("forgesyte-construct-"), "dropped on {on}");
    }

    /// A panic is its item's alone.
    #[test]
    fn a_panic_is_the_items_alone() {
        let limit = Duration::from_secs(30);
        let (results, _) = run(
            2,
            vec![
                (limit, Box::new(|| panic!("boom"))),
                (limit, Box::new(|| 4)),
            ],
        );
        assert_eq!(results, [Err("boom".to_owned()), Ok(4)]);
    }

    /// With every thread held by a given-up job and no thread to add, the
    /// jobs still waiting are given up at once and never run.
    #[test]
    fn jobs_no_thread_can_take_are_given_up_and_never_run() {
        let (to_results, events) = channel();
        let mut crew = Crew::<u32>::new(1, 3, 0, to_results);
        let ran = Arc::new(std::sync::atomic::AtomicBool::new(false));
        crew.submit(0, hangs());
        let flag = Arc::clone(&ran);
        crew.submit(
            1,
            Box::new(move || {
                flag.store(true, Ordering::SeqCst);
                1
            }),
        );
        // No thread can be added from here on.
        crew.cannot_start = Some("out of threads".to_owned());
        let mut watch = Watch::new(2);
        watch.submitted(0, Duration::from_millis(200));
        watch.submitted(1, Duration::from_millis(200));
        let mut results = vec![None, None];
        collect(
            &events,
            &mut results,
            &mut watch,
            Some(&mut crew),
            |_, r| r,
            |i, why| match (i, why) {
                (0, GaveUp::Ran(_)) => 100,
                (1, GaveUp::NoThread(why)) => {
                    assert!(why.contains("out of threads"), "{why}");
                    101
                }
                (i, why) => panic!("{i}: {why:?}"),
            },
        );
        assert_eq!(results, [Some(Ok(100)), Some(Ok(101))]);
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ran.load(Ordering::SeqCst), "a job given up on ran later");
    }
}
