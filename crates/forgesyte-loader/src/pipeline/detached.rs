//! Work that may never return, run where nobody waits for it forever: an
//! in-process plugin's constructor is plugin code on a thread of this
//! process, which nothing can stop. A load pass hands such work to a
//! [`Crew`] of threads it never joins, and waits for each piece at most
//! its [`Detached::limit`] from its start (see `par_map_pipeline`): one
//! constructor that hangs is that plugin's failure, the rest of the pass
//! goes on, and the thread stays behind, still in the plugin's code (a
//! constructor that returns late has its instance dropped there).
//!
//! Hand-written: rayon's pools and scopes, like `std::thread::scope`, join
//! every job before they return, which is exactly what must not happen.

use std::sync::mpsc::{Receiver, Sender, channel};
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

/// The most threads a crew starts: as many constructors as hang hold one
/// each, and a pass of thousands must not start thousands.
const MAX_THREADS: usize = 64;

/// Work for a crew thread.
pub(super) type Job<R> = Box<dyn FnOnce() -> R + Send>;

/// The jobs waiting for a crew thread, shared by its threads.
type Queue<R> = Arc<Mutex<Receiver<(usize, Job<R>)>>>;

/// What a crew thread says of the work it took, by the work's index.
pub(super) enum Event<R> {
    /// It started at this instant.
    Started(usize, Instant),
    /// It ended: its result, or the message of its panic.
    Done(usize, Result<R, String>),
}

/// Threads that run [`Job`]s from one queue and report [`Event`]s. Started
/// on demand, up to a number; [`Crew::add_thread`] starts one more, for
/// a thread held by work that did not end in time. The threads end when the
/// crew is dropped and their current work (if it ever does) ends.
pub(super) struct Crew<R> {
    jobs: Sender<(usize, Job<R>)>,
    queue: Queue<R>,
    events: Sender<Event<R>>,
    /// Threads started, and how many to start before work waits for one.
    started: usize,
    wanted: usize,
    /// What each thread reserves of its malloc heap before it takes work.
    heap_reserve: usize,
}

impl<R: Send + 'static> Crew<R> {
    /// A crew of up to `wanted` threads (at least 1), none started yet,
    /// reporting to `events`; each thread reserves `heap_reserve` bytes of
    /// heap first (`parallel::reserve_heap`).
    pub(super) fn new(wanted: usize, heap_reserve: usize, events: Sender<Event<R>>) -> Self {
        let (jobs, queue) = channel();
        Crew {
            jobs,
            queue: Arc::new(Mutex::new(queue)),
            events,
            started: 0,
            wanted: wanted.max(1),
            heap_reserve,
        }
    }

    /// Queues `job` as item `index`, starting a thread for it when fewer
    /// than wanted run.
    pub(super) fn submit(&mut self, index: usize, job: Job<R>) {
        if self.started < self.wanted {
            // Without a thread (said in the log) the job waits in the queue
            // for one: never on the calling thread, which it could hold for
            // good.
            self.add_thread();
        }
        // The crew holds the receiver too, so the send cannot fail.
        let _ = self.jobs.send((index, job));
    }

    /// Starts one more thread; false when none can be started, or
    /// [`MAX_THREADS`] are.
    pub(super) fn add_thread(&mut self) -> bool {
        if self.started >= MAX_THREADS {
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
                false
            }
        }
    }
}

/// A crew thread: takes jobs until the crew is gone.
fn serve<R: Send + 'static>(
    queue: &Mutex<Receiver<(usize, Job<R>)>>,
    events: &Sender<Event<R>>,
    heap_reserve: usize,
) {
    reserve_heap(heap_reserve);
    loop {
        // The lock is held only while waiting for a job: a thread in a job
        // that never ends holds nothing the others need.
        let next = queue.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((index, job)) = next else {
            return;
        };
        let _ = events.send(Event::Started(index, Instant::now()));
        // Nobody listening any more (the pass gave up on it and ended): the
        // result, an instance constructed late, is dropped here.
        let _ = events.send(Event::Done(index, catch_panic(job)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_that_never_ends_holds_up_only_itself() {
        let (events, received) = channel();
        let mut crew = Crew::<u32>::new(1, 0, events);
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let stuck = Arc::clone(&gate);
        crew.submit(
            0,
            Box::new(move || {
                drop(stuck.lock());
                0
            }),
        );
        crew.submit(1, Box::new(|| 1));
        // Item 0 starts and hangs; item 1 waits for a thread until one more
        // is added for it.
        let Ok(Event::Started(0, _)) = received.recv_timeout(Duration::from_secs(10)) else {
            panic!("item 0 did not start");
        };
        assert!(received.recv_timeout(Duration::from_millis(100)).is_err());
        assert!(crew.add_thread());
        let mut seen = Vec::new();
        while seen.len() < 2 {
            match received.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::Started(i, _)) => seen.push(format!("started {i}")),
                Ok(Event::Done(i, result)) => seen.push(format!("done {i} {result:?}")),
                Err(e) => panic!("{e}: {seen:?}"),
            }
        }
        assert_eq!(seen, ["started 1", "done 1 Ok(1)"]);
        drop(held);
        let Ok(Event::Done(0, Ok(0))) = received.recv_timeout(Duration::from_secs(10)) else {
            panic!("item 0 never ended");
        };
    }

    #[test]
    fn a_panic_is_the_items_alone() {
        let (events, received) = channel();
        let mut crew = Crew::<u32>::new(2, 0, events);
        crew.submit(3, Box::new(|| panic!("boom")));
        crew.submit(4, Box::new(|| 4));
        let mut done: Vec<(usize, Result<u32, String>)> = Vec::new();
        while done.len() < 2 {
            match received.recv_timeout(Duration::from_secs(10)) {
                Ok(Event::Done(i, r)) => done.push((i, r)),
                Ok(Event::Started(..)) => {}
                Err(e) => panic!("{e}: {done:?}"),
            }
        }
        done.sort_by_key(|(i, _)| *i);
        assert_eq!(done, [(3, Err("boom".to_owned())), (4, Ok(4))]);
    }
}
