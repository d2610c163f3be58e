//! How sizes read in the host's messages.

/// A size in KiB as a person reads it: `512 KiB`, `8 MiB`, `8.9 MiB` (a
/// limit rounded down to whole MiB would misstate it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kib(pub usize);

impl Kib {
    /// `bytes`, in whole KiB.
    pub fn of_bytes(bytes: u64) -> Kib {
        Kib(usize::try_from(bytes / 1024).unwrap_or(usize::MAX))
    }
}

impl std::fmt::Display for Kib {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            kib if kib < 1024 => write!(f, "{kib} KiB"),
            kib if kib % 1024 == 0 => write!(f, "{} MiB", kib / 1024),
            #[allow(clippy::cast_precision_loss)] // a tenth of a MiB is all it shows
            kib => write!(f, "{:.1} MiB", kib as f64 / 1024.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Kib;

    #[test]
    fn sizes_read_as_a_person_reads_them() {
        assert_eq!(Kib(512).to_string(), "512 KiB");
        assert_eq!(Kib(8 * 1024).to_string(), "8 MiB");
        assert_eq!(Kib(9113).to_string(), "8.9 MiB");
        assert_eq!(Kib::of_bytes(64 << 20).to_string(), "64 MiB");
        assert_eq!(Kib::of_bytes(2_000_000).to_string(), "1.9 MiB");
        assert_eq!(Kib::of_bytes(16_000_000).to_string(), "15.3 MiB");
    }
}
