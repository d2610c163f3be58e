//! [`par_map`]: the pipeline's parallel primitive, and
//! [`par_map_pipeline`], the same in three stages, the middle one on one
//! thread.

use std::any::Any;
use std::panic::AssertUnwindSafe;

use rayon::prelude::*;

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

/// How much heap [`par_map_pipeline`] reserves per item, spread over its
/// threads: a constructed in-process plugin (its instance, tool list and
/// handle) keeps 8 to 16 KiB on the heap of the thread that built it. With
/// 16 KiB per item one thread of a 1,000-plugin pass still grew past its
/// reservation (366 `mprotect`s); with 24 KiB neither did.
const HEAP_PER_ITEM: usize = 24 * 1024;

/// The most [`reserve_heap`] grows one thread's heap by.
const MAX_HEAP_RESERVE: usize = 32 * 1024 * 1024;

/// Grows this thread's malloc heap by about `bytes` up front, and frees it
/// again (the pages are never touched, so they cost no memory).
///
/// glibc gives each thread's arena a heap that it makes writable page by
/// page as it grows, one `mprotect` each time, and every `mprotect` holds
/// the process's memory-map lock for writing. While the pool constructs
/// plugins beside the opening thread, those `mprotect`s (about 2,000 per
/// thread in a 1,000-plugin pass) stopped the opening thread's `dlopen`
/// at every page fault of its own (measured in BENCHMARKS.md, "Stop 25").
/// A heap that shrinks stays writable (glibc remembers how far it made it
/// writable), so growing it once here, in blocks just under malloc's
/// `mmap` threshold, leaves the pass's allocations nothing to `mprotect`.
/// With another allocator this is a few allocations that do nothing.
/// Hand-written: no crate reserves an arena's heap.
fn reserve_heap(bytes: usize) {
    /// Under glibc's default `mmap` threshold (128 KiB): taken from the heap.
    const BLOCK: usize = 120 * 1024;
    let blocks: Vec<Vec<u8>> = (0..bytes.min(MAX_HEAP_RESERVE).div_ceil(BLOCK))
        .map(|_| Vec::with_capacity(BLOCK))
        .collect();
    drop(std::hint::black_box(blocks));
}

/// What a stage of [`par_map_pipeline`] made of an item.
pub(super) enum Stage<R, S> {
    /// Its result: the item goes no further.
    Done(R),
    /// What the next stage goes on with.
    Next(S),
}

/// [`par_map`] in three stages: `first` and `last` run on a pool of up to
/// `workers` threads, `serial` between them on the calling thread, one item
/// at a time, in the order `first` hands them over, while the pool goes on
/// with other items' `first` and `last` (a `last` is queued behind the
/// `first`s not yet started). With no worker (or one item) the three run
/// in turn on the calling thread, item after item.
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
/// input, a panic in any stage caught for its item alone.
pub(super) fn par_map_pipeline<T: Sync, R: Send, S: Send, U: Send>(
    workers: usize,
    items: &[T],
    first: impl Fn(&T) -> Stage<R, S> + Sync,
    serial: impl Fn(&T, S) -> Stage<R, U>,
    last: impl Fn(&T, U) -> R + Sync,
) -> Vec<(&T, Result<R, String>)> {
    use std::sync::mpsc::channel;

    if items.is_empty() {
        return Vec::new();
    }
    let mut results: Vec<Option<Result<R, String>>> = items.iter().map(|_| None).collect();
    // No pool (no worker, one item, or none to be had): the three stages
    // in turn on this thread, one item at a time.
    let workers = if items.len() > 1 {
        workers.min(items.len())
    } else {
        0
    };
    let pool = (workers > 0)
        .then(|| load_pool(workers, items.len() * HEAP_PER_ITEM / workers))
        .flatten();
    match pool {
        Some(pool) => {
            // Unbounded: a bound made every item's hand-over a wake-up
            // (about 8% of a 1,000-plugin pass). What waits here is small,
            // but for a signed or pinned library's bytes, which have a
            // budget of their own (`verified.rs`).
            let (to_serial, for_serial) = channel::<(usize, S)>();
            let (to_results, finished) = channel::<(usize, Result<R, String>)>();
            let (first, last) = (&first, &last);
            pool.in_place_scope(|scope| {
                for (i, item) in items.iter().enumerate() {
                    let (to_serial, to_results) = (to_serial.clone(), to_results.clone());
                    scope.spawn(move |_| {
                        // The receivers live until every task has ended.
                        let _ = match catch_panic(|| first(item)) {
                            Ok(Stage::Next(s)) => to_serial.send((i, s)).map_err(drop),
                            Ok(Stage::Done(r)) => to_results.send((i, Ok(r))).map_err(drop),
                            Err(panic) => to_results.send((i, Err(panic))).map_err(drop),
                        };
                    });
                }
                drop(to_serial);
                // Ends once every `first` has ended (their senders dropped).
                for (i, s) in for_serial {
                    match catch_panic(|| serial(&items[i], s)) {
                        Ok(Stage::Next(u)) => {
                            let to_results = to_results.clone();
                            scope.spawn(move |_| {
                                let _ = to_results.send((i, catch_panic(|| last(&items[i], u))));
                            });
                        }
                        Ok(Stage::Done(r)) => results[i] = Some(Ok(r)),
                        Err(panic) => results[i] = Some(Err(panic)),
                    }
                }
            });
            drop(to_results);
            for (i, result) in finished {
                results[i] = Some(result);
            }
        }
        None => {
            for (i, item) in items.iter().enumerate() {
                results[i] = Some(catch_panic(|| match first(item) {
                    Stage::Done(r) => r,
                    Stage::Next(s) => match serial(item, s) {
                        Stage::Done(r) => r,
                        Stage::Next(u) => last(item, u),
                    },
                }));
            }
        }
    }
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

/// Runs `f`, turning a panic into its message.
fn catch_panic<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // The loader's own state is not borrowed across `f` (locks are taken and
    // released inside it), so nothing is left half-updated by an unwind.
    std::panic::catch_unwind(AssertUnwindSafe(f)).map_err(|payload| panic_message(&*payload))
}

/// The message of a panic payload (`panic!` with a literal or a format).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".to_owned())
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
                |&n, u| {
                    if n == 11 {
                        panic!("last {n}");
                    }
                    u * 2
                },
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
