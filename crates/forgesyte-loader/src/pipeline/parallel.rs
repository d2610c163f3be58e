//! [`par_map`]: the pipeline's parallel primitive, and
//! [`par_map_pipeline`], the same in three stages, the middle one on one
//! thread, the last on a crew of threads (`detached`) waited for at most
//! each job's limit.

use std::time::Duration;

use rayon::prelude::*;

use super::detached::{Crew, Detached, Event, GaveUp, Watch, collect};
use super::threads::{catch_panic, reserve_heap};

/// Maps `f` over `items` on a local rayon pool of up to `threads` threads.
///
/// Every result comes back paired with its own input, in input order, so an
/// outcome cannot be attributed to another item. A panic in `f` is caught
/// for that item alone and comes back as `Err` with the panic message; the
/// other items are unaffected.
pub(super) fn par_map<'a, T: Sync, R: Send>(
    threads: usize,
    items: &'a [T],
    f: impl Fn(&T) -> R + Sync,
) -> Vec<(&'a T, Result<R, String>)> {
    let one = |item: &'a T| (item, catch_panic(|| f(item)));
    // The calling thread only waits: a pool of one thread is no faster.
    let threads = threads.min(items.len());
    match (threads > 1).then(|| load_pool(threads, 0)).flatten() {
        Some(pool) => pool.install(|| items.par_iter().map(one).collect()),
        None => items.iter().map(one).collect(),
    }
}

/// A pass's pool of `threads` threads; `None` when no pool can be started
/// (said in the log): the work then runs on the calling thread. Each
/// thread first grows its malloc heap by `heap_reserve` bytes (see
/// [`reserve_heap`]).
fn load_pool(threads: usize, heap_reserve: usize) -> Option<rayon::ThreadPool> {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("forgesyte-load-{i}"))
        .start_handler(move |_| reserve_heap(heap_reserve))
        .build()
        .map_err(|e| {
            tracing::warn!(error = %e, "cannot start the load threads; loading on one thread");
        })
        .ok()
}

/// How often [`par_map_pipeline`]'s calling thread, waiting for its next
/// `serial` item, passes the detached jobs' results on and watches their
/// limits.
const POLL: Duration = Duration::from_millis(20);

/// How much heap [`par_map_pipeline`] reserves per item, spread over its
/// threads: a constructed in-process plugin (its instance, tool list and
/// handle) keeps 8 to 16 KiB on the heap of the thread that built it. With
/// 16 KiB per item one thread of a 1,000-plugin pass still grew past its
/// reservation (366 `mprotect`s); with 24 KiB neither did.
const HEAP_PER_ITEM: usize = 24 * 1024;

/// What a stage of [`par_map_pipeline`] made of an item.
pub(super) enum Stage<R, S> {
    /// Its result: the item goes no further.
    Done(R),
    /// What the next stage goes on with.
    Next(S),
}

/// [`par_map`] in three stages: `first` runs on a pool of up to `workers`
/// threads, `serial` on the calling thread, one item at a time, in the
/// order `first` hands them over, while the pool goes on with other items'
/// `first`; `last`, called on the calling thread too, packs the rest of an
/// item's work into a [`Detached`] job that a [`Crew`] runs, which starts
/// with `workers` threads (at least 1). With no worker (or one item)
/// `first` and `serial` run in turn on the calling thread, item after item.
///
/// The calling thread waits for each detached job at most its limit from
/// its start: a job still running then gets `gave_up(item,
/// GaveUp::Ran(limit))` as its result, and its thread is left to it; one
/// that can never get a thread, `gave_up(item, GaveUp::NoThread(why))`
/// (see `detached::Watch`, which also grows the crew). Construction of
/// in-process plugins is such work: a constructor that never returned held
/// the whole pass, every other plugin of it unloaded and the server never
/// ready.
///
/// The calling thread is busy with `serial` the whole time, so CPU work
/// wants one worker fewer than cores: a worker more spins for work
/// (rayon's idle rounds) on the core the calling thread needs, and being
/// on that core makes each `mprotect` of the dynamic loader's a TLB
/// shoot-down (a 1,000-plugin pass took 6% longer with 2 workers than with
/// 1 on two cores, BENCHMARKS.md "Stop 42").
///
/// For work under a process-wide lock (the dynamic loader's): on one
/// thread it rarely waits for that lock, and the rest of the work overlaps
/// it instead of queueing for it (measured in BENCHMARKS.md, "Stop 23").
/// Results come back as [`par_map`]'s do: in input order, each with its
/// input, a panic in any stage caught for its item alone. Every result but
/// a panic goes through `done`, on the calling thread, as soon as it has
/// come (between `serial`'s items, and every [`POLL`] while `serial` waits
/// for `first`s): what a caller publishes there is not held for the pass's
/// slowest item. The detached jobs are watched there too (their limits,
/// the crew's growth: `detached::Watch`), so a job past its limit is given
/// up on while `serial` still has items to do, not once it is done.
pub(super) fn par_map_pipeline<T: Sync, R: Send + 'static, S: Send, U: Send>(
    workers: usize,
    items: &[T],
    first: impl Fn(&T) -> Stage<R, S> + Sync,
    serial: impl Fn(&T, S) -> Stage<R, U>,
    last: impl Fn(&T, U) -> Detached<R>,
    done: impl Fn(&T, R) -> R,
    gave_up: impl Fn(&T, GaveUp) -> R,
) -> Vec<(&T, Result<R, String>)> {
    use std::sync::mpsc::channel;

    if items.is_empty() {
        return Vec::new();
    }
    let mut results: Vec<Option<Result<R, String>>> = items.iter().map(|_| None).collect();
    // No pool (no worker, one item, or none to be had): the first two
    // stages in turn on this thread, one item at a time.
    let workers = if items.len() > 1 {
        workers.min(items.len())
    } else {
        0
    };
    let heap_reserve = items.len() * HEAP_PER_ITEM / workers.max(1);
    let pool = (workers > 0)
        .then(|| load_pool(workers, heap_reserve))
        .flatten();
    // Unbounded: a bound made every item's hand-over a wake-up (about 8% of
    // a 1,000-plugin pass). What waits here is small, but for a signed or
    // pinned library's bytes, which have a budget of their own
    // (`verified.rs`).
    let (to_results, events) = channel::<Event<R>>();
    // Started with the first detached job: a pass of runner processes only
    // starts no thread for it.
    let mut crew: Option<Crew<R>> = None;
    let mut watch = Watch::new(items.len());
    let done = |i: usize, r: R| done(&items[i], r);
    let give_up = |i: usize, why: GaveUp| gave_up(&items[i], why);
    // What has come on `events` while `serial` runs (results through
    // `done`), and the detached jobs past their limit given up on, their
    // crew grown, as `collect` does: a constructor that hangs is given up
    // on at its limit, not once every library is opened and every runner
    // started.
    let drain = |results: &mut Vec<Option<Result<R, String>>>,
                 watch: &mut Watch,
                 crew: &mut Option<Crew<R>>| {
        while let Ok(event) = events.try_recv() {
            watch.take(event, results, &done);
        }
        let now = std::time::Instant::now();
        watch.check(now, results, crew.as_mut(), (&done, &give_up));
    };
    let detach = |i: usize,
                  u: U,
                  results: &mut Vec<Option<Result<R, String>>>,
                  watch: &mut Watch,
                  crew: &mut Option<Crew<R>>| {
        match catch_panic(|| last(&items[i], u)) {
            Ok(job) => {
                crew.get_or_insert_with(|| {
                    Crew::new(workers, items.len(), heap_reserve, to_results.clone())
                })
                .submit(i, job.work);
                watch.submitted(i, job.limit);
            }
            Err(panic) => results[i] = Some(Err(panic)),
        }
    };
    match pool {
        Some(pool) => {
            let (to_serial, for_serial) = channel::<(usize, S)>();
            let first = &first;
            pool.in_place_scope(|scope| {
                for (i, item) in items.iter().enumerate() {
                    let (to_serial, to_results) = (to_serial.clone(), to_results.clone());
                    scope.spawn(move |_| {
                        // The receivers live until every task has ended.
                        let _ = match catch_panic(|| first(item)) {
                            Ok(Stage::Next(s)) => to_serial.send((i, s)).map_err(drop),
                            Ok(Stage::Done(r)) => {
                                to_results.send(Event::Done(i, Ok(r))).map_err(drop)
                            }
                            Err(panic) => to_results.send(Event::Done(i, Err(panic))).map_err(drop),
                        };
                    });
                }
                drop(to_serial);
                // Ends once every `first` has ended (their senders dropped).
                loop {
                    match for_serial.recv_timeout(POLL) {
                        Ok((i, s)) => match catch_panic(|| serial(&items[i], s)) {
                            Ok(Stage::Next(u)) => {
                                detach(i, u, &mut results, &mut watch, &mut crew);
                            }
                            Ok(Stage::Done(r)) => results[i] = Some(Ok(done(i, r))),
                            Err(panic) => results[i] = Some(Err(panic)),
                        },
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                    drain(&mut results, &mut watch, &mut crew);
                }
            });
        }
        None => {
            for (i, item) in items.iter().enumerate() {
                let staged = catch_panic(|| match first(item) {
                    Stage::Done(r) => Stage::Done(r),
                    Stage::Next(s) => serial(item, s),
                });
                match staged {
                    Ok(Stage::Next(u)) => detach(i, u, &mut results, &mut watch, &mut crew),
                    Ok(Stage::Done(r)) => results[i] = Some(Ok(done(i, r))),
                    Err(panic) => results[i] = Some(Err(panic)),
                }
                drain(&mut results, &mut watch, &mut crew);
            }
        }
    }
    drop(to_results);
    collect(
        &events,
        &mut results,
        &mut watch,
        crew.as_mut(),
        done,
        give_up,
    );
    items
        .iter()
        .zip(results)
        .map(|(item, result)| {
            (
                item,
                result.unwrap_or_else(|| Err("the load pass lost it".to_owned())),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_runs_its_middle_stage_on_the_calling_thread_and_keeps_results_with_inputs() {
        let items: Vec<u32> = (0..60).collect();
        for threads in [0, 1, 2, 7] {
            let serial_threads = parking_lot::Mutex::new(std::collections::HashSet::new());
            let results = par_map_pipeline(
                threads,
                &items,
                |&n| match n {
                    4 => panic!("first {n}"),
                    n if n % 3 == 0 => Stage::Done(n),
                    n => Stage::Next(n * 10),
                },
                |&n, s| {
                    serial_threads.lock().insert(std::thread::current().id());
                    match n {
                        8 => panic!("serial {n}"),
                        n if n % 5 == 0 => Stage::Done(s),
                        _ => Stage::Next(s + n),
                    }
                },
                |&n, u| Detached {
                    work: Box::new(move || {
                        if n == 11 {
                            panic!("last {n}");
                        }
                        u * 2
                    }),
                    limit: Duration::from_secs(60),
                },
                |_, r| r,
                |&n, why| panic!("item {n} was given up on: {why:?}"),
            );
            let inputs: Vec<u32> = results.iter().map(|(n, _)| **n).collect();
            assert_eq!(inputs, items, "threads {threads}");
            for (&n, result) in results {
                let expected = match n {
                    4 => Err("first 4".to_owned()),
                    8 => Err("serial 8".to_owned()),
                    11 => Err("last 11".to_owned()),
                    n if n % 3 == 0 => Ok(n),
                    n if n % 5 == 0 => Ok(n * 10),
                    n => Ok(n * 22),
                };
                assert_eq!(result, expected, "threads {threads}, item {n}");
            }
            assert_eq!(
                serial_threads.into_inner(),
                std::collections::HashSet::from([std::thread::current().id()]),
                "threads {threads}: the middle stage runs on the calling thread"
            );
        }
    }

    /// A last stage that never ends is its item's `overdue` result after
    /// its limit; the items queued behind it on the crew still run, and
    /// the pass returns.
    #[test]
    fn a_last_stage_that_never_ends_is_overdue_and_holds_up_nothing_else() {
        let items: Vec<u32> = (0..8).collect();
        for threads in [0, 1, 3] {
            let started = std::time::Instant::now();
            let results = par_map_pipeline(
                threads,
                &items,
                |&n| Stage::<u32, u32>::Next(n),
                |_, s| Stage::Next(s),
                |&n, u| Detached {
                    work: Box::new(move || {
                        if n == 2 {
                            // Never ends while the test runs.
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                        u + 100
                    }),
                    limit: Duration::from_millis(200),
                },
                |_, r| r,
                |&n, why| {
                    assert_eq!(why, GaveUp::Ran(Duration::from_millis(200)));
                    n + 1000
                },
            );
            let got: Vec<u32> = results.into_iter().map(|(_, r)| r.unwrap()).collect();
            assert_eq!(
                got,
                [100, 101, 1002, 103, 104, 105, 106, 107],
                "threads {threads}"
            );
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "threads {threads}"
            );
        }
    }

    /// Every result goes through `done` as soon as it has come: those of
    /// detached jobs while another item's `first` still runs (they waited
    /// for the slowest item of the pass), and a detached job's given up on
    /// at its limit.
    #[test]
    fn results_are_done_as_they_come_not_when_the_slowest_item_ends() {
        let items: Vec<u32> = (0..6).collect();
        // A pool with a thread to spare beside the slow `first` (a wave
        // gets one per runner).
        for threads in [2, 4] {
            let started = std::time::Instant::now();
            let done_at = parking_lot::Mutex::new(std::collections::BTreeMap::new());
            let results = par_map_pipeline(
                threads,
                &items,
                |&n| {
                    if n == 0 {
                        // A runner that takes its time to construct.
                        std::thread::sleep(Duration::from_millis(1500));
                        return Stage::<u32, u32>::Done(n);
                    }
                    Stage::Next(n)
                },
                |_, s| Stage::Next(s),
                |&n, u| Detached {
                    work: Box::new(move || {
                        if n == 5 {
                            std::thread::sleep(Duration::from_secs(3600));
                        }
                        u + 100
                    }),
                    limit: Duration::from_millis(300),
                },
                |&n, r| {
                    done_at.lock().insert(n, started.elapsed());
                    r + 1
                },
                |&n, _| n + 1000,
            );
            let got: Vec<u32> = results.into_iter().map(|(_, r)| r.unwrap()).collect();
            assert_eq!(got, [1, 102, 103, 104, 105, 1006], "threads {threads}");
            let done_at = done_at.into_inner();
            // Item 5, past its limit, is given up on then too, not once
            // `serial` is done with (`first` of item 0 holds that back).
            for n in 1..=5 {
                assert!(
                    done_at[&n] < Duration::from_millis(1200),
                    "threads {threads}: item {n} done at {:?}",
                    done_at[&n]
                );
            }
        }
    }

    #[test]
    fn par_map_keeps_each_result_with_its_input_and_catches_panics() {
        let items: Vec<u32> = (0..40).collect();
        for threads in [1, 2, 7] {
            let results = par_map(threads, &items, |&n| {
                match n {
                    3 => panic!("literal"),
                    17 => panic!("formatted {n}"),
                    30 => std::panic::panic_any(5u8),
                    _ => {}
                }
                n * 2
            });
            let inputs: Vec<u32> = results.iter().map(|(n, _)| **n).collect();
            assert_eq!(inputs, items, "threads {threads}");
            for (n, result) in results {
                let expected = match n {
                    3 => Err("literal".to_owned()),
                    17 => Err("formatted 17".to_owned()),
                    30 => Err("panic with a non-string payload".to_owned()),
                    n => Ok(n * 2),
                };
                assert_eq!(result, expected, "threads {threads}, item {n}");
            }
        }
    }
}
