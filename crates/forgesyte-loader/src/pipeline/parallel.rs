//! [`par_map`]: the pipeline's one parallel primitive.

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
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(one).collect();
    }
    match rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("forgesyte-load-{i}"))
        .build()
    {
        Ok(pool) => pool.install(|| items.par_iter().map(one).collect()),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the load threads; loading on one thread");
            items.iter().map(one).collect()
        }
    }
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
