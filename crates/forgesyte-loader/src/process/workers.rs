//! The native runner's call threads: long-lived threads that each run one
//! request at a time, handed their next one through a channel of their own.
//!
//! Starting a thread per request (a 4 MiB stack mapped and unmapped, a
//! `clone`) cost more than a no-op call's whole round trip; waking an idle
//! thread costs one futex. A request that finds no idle thread starts a
//! new one, so the pool grows to the peak number of requests in flight and
//! never refuses or queues one (a call that never returns keeps its thread,
//! as it kept the thread started for it before). Threads are never retired:
//! the runner's process ends with the host's stream, and an idle thread is
//! a stack that is mapped but no longer touched.
//!
//! It knows nothing of the protocol: a job is any closure.

use std::io;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, sync_channel};

use parking_lot::Mutex;

/// One request's work.
pub(crate) type Job = Box<dyn FnOnce() + Send + 'static>;

/// The idle threads, each waiting on its own channel.
pub(crate) struct Workers {
    name: &'static str,
    stack_bytes: usize,
    idle: Arc<Mutex<Vec<SyncSender<Job>>>>,
}

impl Workers {
    /// Threads named `name`, each with a stack of `stack_bytes`.
    pub(crate) fn new(name: &'static str, stack_bytes: usize) -> Self {
        Self {
            name,
            stack_bytes,
            idle: Arc::default(),
        }
    }

    /// Runs `job` on an idle thread, else on a new one; the error is the
    /// one of starting a thread (the job is dropped, not run).
    pub(crate) fn run(&self, job: Job) -> io::Result<()> {
        let mut job = job;
        loop {
            let Some(thread) = self.idle.lock().pop() else {
                break;
            };
            // Sends fail only for a thread that is gone (a job of its
            // panicked): try the next one.
            match thread.send(job) {
                Ok(()) => return Ok(()),
                Err(std::sync::mpsc::SendError(back)) => job = back,
            }
        }
        let idle = Arc::clone(&self.idle);
        std::thread::Builder::new()
            .name(self.name.to_owned())
            .stack_size(self.stack_bytes)
            .spawn(move || work(&idle, job))
            .map(drop)
    }

    /// How many threads wait for a job now.
    #[cfg(test)]
    fn idle(&self) -> usize {
        self.idle.lock().len()
    }
}

/// A thread's life: its first job, then each job it is handed once idle.
fn work(idle: &Mutex<Vec<SyncSender<Job>>>, first: Job) {
    // Room for one: a thread is handed a job only while it is listed idle,
    // and it is listed once per job.
    let (tx, rx) = sync_channel::<Job>(1);
    let mut job = first;
    loop {
        job();
        idle.lock().push(tx.clone());
        match rx.recv() {
            Ok(next) => job = next,
            // Unreachable while `tx` lives here; ends the thread if not.
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;
    use std::sync::mpsc::channel;
    use std::thread::ThreadId;
    use std::time::Duration;

    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    fn on_thread(workers: &Workers) -> ThreadId {
        let (tx, rx) = channel();
        workers
            .run(Box::new(move || {
                let _ = tx.send(std::thread::current().id());
            }))
            .expect("a thread starts");
        rx.recv_timeout(WAIT).expect("the job ran")
    }

    /// Waits until `n` threads are idle (a thread lists itself just after
    /// its job's last statement).
    fn wait_idle(workers: &Workers, n: usize) {
        let deadline = std::time::Instant::now() + WAIT;
        while workers.idle() < n {
            assert!(std::time::Instant::now() < deadline, "{n} idle threads");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn jobs_one_after_another_reuse_one_thread() {
        let workers = Workers::new("test-call", 64 * 1024);
        let first = on_thread(&workers);
        assert_ne!(first, std::thread::current().id());
        for _ in 0..20 {
            wait_idle(&workers, 1);
            assert_eq!(on_thread(&workers), first);
        }
        // The last job answered before its thread listed itself idle again.
        wait_idle(&workers, 1);
        assert_eq!(workers.idle(), 1);
    }

    #[test]
    fn jobs_in_flight_together_get_a_thread_each() {
        let workers = Workers::new("test-call", 64 * 1024);
        let all = Arc::new(Barrier::new(4));
        let (tx, rx) = channel();
        for _ in 0..3 {
            let (all, tx) = (Arc::clone(&all), tx.clone());
            workers
                .run(Box::new(move || {
                    // Each waits for the other two: one thread for all three
                    // would never get past the first.
                    all.wait();
                    let _ = tx.send(std::thread::current().id());
                }))
                .expect("a thread starts");
        }
        all.wait();
        let ids: std::collections::HashSet<ThreadId> = (0..3)
            .map(|_| rx.recv_timeout(WAIT).expect("each job ran"))
            .collect();
        assert_eq!(ids.len(), 3);
        wait_idle(&workers, 3);
        // The three are reused: no fourth thread for the next job.
        assert!(ids.contains(&on_thread(&workers)));
    }

    #[test]
    fn a_thread_whose_job_panicked_is_not_handed_another() {
        let workers = Workers::new("test-call", 64 * 1024);
        let (tx, rx) = channel();
        workers
            .run(Box::new(move || {
                let _ = tx.send(());
                panic!("a job's own bug");
            }))
            .expect("a thread starts");
        rx.recv_timeout(WAIT).expect("the job ran");
        // The next job still runs (on a new thread).
        let _ = on_thread(&workers);
    }
}
