//! A process's resident memory and CPU time, read from `/proc/PID/statm`
//! and `/proc/PID/stat` (Linux).
//!
//! Knows nothing of plugins: it is handed a pid and answers `None` when the
//! process is gone or the files cannot be read or parsed.

/// What `/proc` says about one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct ProcessUsage {
    /// Resident set size, in bytes.
    pub(super) resident_bytes: u64,
    /// User plus system CPU time, in seconds.
    pub(super) cpu_seconds: f64,
}

/// The usage of process `pid`, if it can be read.
pub(super) fn usage(pid: u32) -> Option<ProcessUsage> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let pages = resident_pages(&statm)?;
    let ticks = cpu_ticks(&stat)?;
    let page_size = u64::try_from(rustix::param::page_size()).ok()?;
    let ticks_per_second = rustix::param::clock_ticks_per_second();
    if ticks_per_second == 0 {
        return None;
    }
    Some(ProcessUsage {
        resident_bytes: pages.saturating_mul(page_size),
        // Exact below 2^53 ticks (centuries of CPU time).
        #[allow(clippy::cast_precision_loss)]
        cpu_seconds: ticks as f64 / ticks_per_second as f64,
    })
}

/// The second field of `statm`: resident pages.
fn resident_pages(statm: &str) -> Option<u64> {
    statm.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// `utime + stime` (fields 14 and 15 of `stat`), in clock ticks. The
/// command name (field 2) is in parentheses and may contain spaces and
/// parentheses, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // rest starts at field 3 (state): utime is the 12th field after it.
    let mut fields = rest.split_ascii_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let stat = "4242 (a) b) (c) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 1 0 1 2 3";
        assert_eq!(cpu_ticks(stat), Some(300));
        assert_eq!(resident_pages("1000 37 5 1 0 20 0\n"), Some(37));
        assert_eq!(cpu_ticks("garbage"), None);
        assert_eq!(resident_pages(""), None);
    }

    #[test]
    fn reads_this_process() {
        let me = usage(std::process::id()).expect("/proc of this process");
        assert!(me.resident_bytes > 1024 * 1024, "{me:?}");
        assert!(me.cpu_seconds >= 0.0, "{me:?}");
        assert_eq!(usage(u32::MAX), None);
    }
}
