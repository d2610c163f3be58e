//! The build fingerprint: a record every plugin library carries in its own
//! ELF section, [`SECTION`] (`.forgesyte_abi`), so a host can check the ABI
//! version and the build (SDK version, compiler, target) **from the file,
//! without opening it**: no initialiser of the library runs before the host
//! has decided the library is safe to load.
//!
//! The SDK's `export_plugin!` emits the record as a `static` in that section
//! and reads it once from the entry function, so the linker keeps it even
//! with `--gc-sections` (a cdylib's default) and fat LTO. A library exports
//! exactly one entry, hence carries exactly one record.
//!
//! # Layout (record format 1)
//!
//! [`RECORD_LEN`] (512) bytes, alignment 1:
//!
//! | bytes | content |
//! |---|---|
//! | `0..12` | [`MAGIC`], `FORGESYTE-FP` |
//! | `12..16` | [`RECORD_FORMAT`] as a little-endian `u32` (now 1) |
//! | `16..512` | a UTF-8 JSON object, padded with NUL bytes |
//!
//! The JSON object has the keys `abi_version` (number, the
//! [`crate::abi::ABI_VERSION`] of the SDK that built the library),
//! `sdk_version`, `rustc_version` (`rustc --version` of the compiler that
//! built the SDK) and `target` (the target triple). Readers ignore keys they
//! do not know; new keys do not change [`RECORD_FORMAT`], only an
//! incompatible change of the layout above does.
//!
//! # What a host should make of it
//!
//! The ABI version decides: one the host does not speak (ForgeSyte's
//! speaks [`crate::abi::SUPPORTED_ABI_VERSIONS`], 1 and 3) means the vtable
//! cannot be read, so the library must not be opened. A different target means the
//! machine code or the C library cannot match the host's. The SDK and
//! compiler versions are informational: nothing of Rust's own ABI crosses
//! the boundary (only C structures and JSON), so host and plugin need not
//! share a compiler.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::abi::ABI_VERSION;

/// Name of the ELF section that holds the record.
pub const SECTION: &str = ".forgesyte_abi";

/// The first bytes of a record.
pub const MAGIC: [u8; 12] = *b"FORGESYTE-FP";

/// The version of the record layout described in the [module
/// documentation](self).
pub const RECORD_FORMAT: u32 = 1;

/// Size of a record in bytes.
pub const RECORD_LEN: usize = 512;

/// Where the JSON object starts in a record.
const JSON_OFFSET: usize = MAGIC.len() + 4;

/// A fingerprint record as it lies in the section.
pub type Record = [u8; RECORD_LEN];

/// The version of this crate, which the SDK shares (they are released
/// together): what a host states as its own `sdk_version`.
pub const CRATE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The compiler that built this crate (`rustc --version`), as `build.rs`
/// found it, or `unknown`.
pub const BUILD_RUSTC_VERSION: &str = env!("FORGESYTE_BUILD_RUSTC_VERSION");
/// [`BUILD_RUSTC_VERSION`], NUL-terminated (for a vtable's `rustc_version`).
pub const BUILD_RUSTC_VERSION_NUL: &str = concat!(env!("FORGESYTE_BUILD_RUSTC_VERSION"), "\0");
/// The target triple this crate was built for, as `build.rs` found it: the
/// host's own target, which a library's must equal.
pub const BUILD_TARGET: &str = env!("FORGESYTE_BUILD_TARGET");

/// A library's build fingerprint, parsed from its record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Fingerprint {
    /// The plugin ABI version the library speaks.
    pub abi_version: u32,
    /// The SDK version that built it.
    pub sdk_version: String,
    /// The compiler that built the SDK (`rustc --version`), or `unknown`.
    pub rustc_version: String,
    /// The target triple it was built for.
    pub target: String,
}

impl Fingerprint {
    /// The fingerprint of this build (for a host: its own values, to
    /// compare a library's against).
    pub fn current() -> Self {
        Fingerprint {
            abi_version: ABI_VERSION,
            sdk_version: CRATE_VERSION.to_owned(),
            rustc_version: BUILD_RUSTC_VERSION.to_owned(),
            target: BUILD_TARGET.to_owned(),
        }
    }

    /// Parses the record at the start of `section` (the contents of the
    /// [`SECTION`] of a library). Never panics, whatever the bytes.
    pub fn parse(section: &[u8]) -> Result<Self, FingerprintError> {
        let Some(record) = section.get(..RECORD_LEN) else {
            return Err(FingerprintError::TooShort { len: section.len() });
        };
        if record[..MAGIC.len()] != MAGIC {
            return Err(FingerprintError::BadMagic);
        }
        let mut format = [0u8; 4];
        format.copy_from_slice(&record[MAGIC.len()..JSON_OFFSET]);
        let format = u32::from_le_bytes(format);
        if format != RECORD_FORMAT {
            return Err(FingerprintError::UnknownFormat { format });
        }
        let json = &record[JSON_OFFSET..];
        let end = json.iter().position(|&b| b == 0).unwrap_or(json.len());
        if json[end..].iter().any(|&b| b != 0) {
            return Err(FingerprintError::Malformed {
                detail: "bytes after the JSON padding".into(),
            });
        }
        serde_json::from_slice(&json[..end]).map_err(|e| FingerprintError::Malformed {
            detail: e.to_string(),
        })
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ABI {}, SDK {}, {}, target {}",
            self.abi_version, self.sdk_version, self.rustc_version, self.target
        )
    }
}

/// Why a fingerprint record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FingerprintError {
    /// The section is shorter than a record.
    TooShort {
        /// Its length in bytes.
        len: usize,
    },
    /// The record does not start with [`MAGIC`].
    BadMagic,
    /// A record format this crate does not know (a newer one's).
    UnknownFormat {
        /// The format the record states.
        format: u32,
    },
    /// The JSON part is not the expected object.
    Malformed {
        /// What is wrong.
        detail: String,
    },
}

impl fmt::Display for FingerprintError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FingerprintError::TooShort { len } => write!(
                f,
                "fingerprint section holds {len} bytes, a record needs {RECORD_LEN}"
            ),
            FingerprintError::BadMagic => f.write_str("fingerprint record has no magic bytes"),
            FingerprintError::UnknownFormat { format } => write!(
                f,
                "fingerprint record format {format} is unknown (this host reads {RECORD_FORMAT})"
            ),
            FingerprintError::Malformed { detail } => {
                write!(f, "fingerprint record is malformed: {detail}")
            }
        }
    }
}

impl std::error::Error for FingerprintError {}

/// Builds a record at compile time. Panics (a compile error, when used in a
/// `const`) if the strings do not fit.
pub const fn build_record(abi_version: u32, sdk: &str, rustc: &str, target: &str) -> Record {
    let mut out = [0u8; RECORD_LEN];
    let mut at = put(&mut out, 0, &MAGIC);
    at = put(&mut out, at, &RECORD_FORMAT.to_le_bytes());
    at = put(&mut out, at, b"{\"abi_version\":");
    at = put_u32(&mut out, at, abi_version);
    at = put(&mut out, at, b",\"sdk_version\":");
    at = put_json_str(&mut out, at, sdk.as_bytes());
    at = put(&mut out, at, b",\"rustc_version\":");
    at = put_json_str(&mut out, at, rustc.as_bytes());
    at = put(&mut out, at, b",\"target\":");
    at = put_json_str(&mut out, at, target.as_bytes());
    put(&mut out, at, b"}");
    out
}

/// Copies `bytes` to `out[at..]`; returns the new end.
const fn put(out: &mut Record, at: usize, bytes: &[u8]) -> usize {
    assert!(
        at + bytes.len() <= RECORD_LEN,
        "fingerprint record overflow"
    );
    let mut i = 0;
    while i < bytes.len() {
        out[at + i] = bytes[i];
        i += 1;
    }
    at + bytes.len()
}

/// Writes `n` in decimal.
const fn put_u32(out: &mut Record, at: usize, n: u32) -> usize {
    let mut digits = [0u8; 10];
    let mut len = 0;
    let mut rest = n;
    loop {
        digits[9 - len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let mut i = 0;
    let mut pos = at;
    while i < len {
        pos = put(out, pos, &[digits[10 - len + i]]);
        i += 1;
    }
    pos
}

/// Writes `s` as a JSON string; control characters are dropped (a
/// compiler's version line has none), `"` and `\` escaped.
const fn put_json_str(out: &mut Record, at: usize, s: &[u8]) -> usize {
    let mut pos = put(out, at, b"\"");
    let mut i = 0;
    while i < s.len() {
        let b = s[i];
        if b == b'"' || b == b'\\' {
            pos = put(out, pos, &[b'\\', b]);
        } else if b >= 0x20 && b != 0x7f {
            pos = put(out, pos, &[b]);
        }
        i += 1;
    }
    put(out, pos, b"\"")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn json_part(record: &Record) -> &str {
        let json = &record[JSON_OFFSET..];
        let end = json.iter().position(|&b| b == 0).unwrap();
        std::str::from_utf8(&json[..end]).unwrap()
    }

    const RECORD: Record = build_record(
        ABI_VERSION,
        CRATE_VERSION,
        BUILD_RUSTC_VERSION,
        BUILD_TARGET,
    );

    #[test]
    fn this_builds_record_parses_to_the_current_fingerprint() {
        let fp = Fingerprint::parse(&RECORD).unwrap();
        assert_eq!(fp, Fingerprint::current());
        assert_eq!(fp.abi_version, ABI_VERSION);
        assert_eq!(fp.sdk_version, env!("CARGO_PKG_VERSION"));
        // Cargo always sets RUSTC for build scripts: "unknown" is a broken
        // detection.
        assert!(
            fp.rustc_version.starts_with("rustc "),
            "{}",
            fp.rustc_version
        );
        assert!(fp.target.contains('-'), "{}", fp.target);
        assert_eq!(&RECORD[..12], b"FORGESYTE-FP");
        assert_eq!(&RECORD[12..16], &1u32.to_le_bytes());
        // Trailing records (several in one section) are ignored.
        let mut two = RECORD.to_vec();
        two.extend_from_slice(&[0xff; 40]);
        assert_eq!(Fingerprint::parse(&two).unwrap(), fp);
    }

    #[test]
    fn records_are_json_with_escaping_and_exact_numbers() {
        for n in [0, 7, 10, 999, u32::MAX] {
            let record = build_record(n, "1", "r", "t");
            assert_eq!(Fingerprint::parse(&record).unwrap().abi_version, n);
        }
        let record = build_record(1, "0.1.0", "rustc \"quoted\" \\ x\n", "x86_64");
        assert_eq!(
            json_part(&record),
            r#"{"abi_version":1,"sdk_version":"0.1.0","rustc_version":"rustc \"quoted\" \\ x","target":"x86_64"}"#
        );
        let fp = Fingerprint::parse(&record).unwrap();
        assert_eq!(fp.rustc_version, r#"rustc "quoted" \ x"#);
        assert_eq!(
            fp.to_string(),
            r#"ABI 1, SDK 0.1.0, rustc "quoted" \ x, target x86_64"#
        );
    }

    #[test]
    fn foreign_and_damaged_records_are_errors_never_panics() {
        assert_eq!(
            Fingerprint::parse(&RECORD[..100]),
            Err(FingerprintError::TooShort { len: 100 })
        );
        assert_eq!(
            Fingerprint::parse(&[0; RECORD_LEN]),
            Err(FingerprintError::BadMagic)
        );
        let mut future = RECORD;
        future[12..16].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(
            Fingerprint::parse(&future),
            Err(FingerprintError::UnknownFormat { format: 2 })
        );
        let mut cut = RECORD;
        cut[JSON_OFFSET + 5] = 0;
        assert!(matches!(
            Fingerprint::parse(&cut),
            Err(FingerprintError::Malformed { .. })
        ));
        let mut junk = RECORD;
        junk[RECORD_LEN - 1] = b'x';
        assert!(matches!(
            Fingerprint::parse(&junk),
            Err(FingerprintError::Malformed { .. })
        ));
        let mut missing = [0u8; RECORD_LEN];
        let at = put(&mut missing, 0, &MAGIC);
        let at = put(&mut missing, at, &RECORD_FORMAT.to_le_bytes());
        put(&mut missing, at, br#"{"abi_version":1}"#);
        let err = Fingerprint::parse(&missing).unwrap_err();
        assert!(err.to_string().contains("sdk_version"), "{err}");
        // Unknown keys are fine: a newer SDK may add some.
        let mut newer = [0u8; RECORD_LEN];
        let at = put(&mut newer, 0, &MAGIC);
        let at = put(&mut newer, at, &RECORD_FORMAT.to_le_bytes());
        put(
            &mut newer,
            at,
            br#"{"abi_version":3,"sdk_version":"9","rustc_version":"r","target":"t","new":[1]}"#,
        );
        assert_eq!(Fingerprint::parse(&newer).unwrap().abi_version, 3);
        // Arbitrary bytes after a valid header.
        for fill in [0x01u8, 0x7f, 0xff, b'{'] {
            let mut record = [fill; RECORD_LEN];
            record[..12].copy_from_slice(&MAGIC);
            record[12..16].copy_from_slice(&1u32.to_le_bytes());
            assert!(Fingerprint::parse(&record).is_err());
        }
    }

    proptest! {
        // 256 cases (the default), well under a second.
        /// A section's bytes, anything or a real record with bytes flipped
        /// and cut: a fingerprint or an error that says what is wrong.
        #[test]
        fn damaged_records_are_errors_with_a_reason(
            random in prop::collection::vec(any::<u8>(), 0..600),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            cut in 0usize..=RECORD_LEN + 8,
            real in any::<bool>(),
        ) {
            let mut bytes = if real { RECORD.to_vec() } else { random };
            if !bytes.is_empty() {
                for (at, byte) in flips {
                    let i = at.index(bytes.len());
                    bytes[i] = byte;
                }
            }
            bytes.truncate(cut);
            if let Err(e) = Fingerprint::parse(&bytes) {
                prop_assert!(e.to_string().len() > 10, "{e:?}");
            }
        }
    }
}
