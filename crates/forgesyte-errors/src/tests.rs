//! Unit tests of the error types: their messages (the seed's reasons),
//! sources and conversions.

use super::*;
use std::error::Error as _;

fn check(err: PluginError, kind: &str, reason: &str) {
    assert_eq!(err.kind(), kind);
    assert_eq!(err.reason(), reason);
    assert!(!err.to_string().contains('\n'), "Display must be one line");
}

#[test]
fn import_reason_has_prefix() {
    check(
        ImportError::AbiMismatch {
            path: "/p/libx.so".into(),
            host: 1,
            plugin: 7,
        }
        .into(),
        "ImportError",
        "ImportError: ABI version mismatch: host speaks 1, plugin /p/libx.so speaks 7",
    );
}

#[test]
fn init_reason_keeps_plugin_message() {
    check(
        InitError::Failed {
            message: "model weights corrupt".into(),
        }
        .into(),
        "InitError",
        "InitError: model weights corrupt",
    );
    check(
        InitError::Panicked {
            message: "boom".into(),
        }
        .into(),
        "InitError",
        "InitError: plugin panicked during construction: boom",
    );
}

#[test]
fn dependency_reason_is_the_seed_line() {
    let err = DependencyError::new(
        vec!["lib:foo".into(), "gpu".into()],
        Some("Plugin requires GPU/CUDA but no CUDA device is available".into()),
    );
    let err: PluginError = err.into();
    assert_eq!(err.kind(), "DependencyError");
    assert_eq!(
        err.reason(),
        "Missing dependencies: lib:foo, gpu; Plugin requires GPU/CUDA but no CUDA device is available"
    );
}

#[test]
fn manifest_error_names_position() {
    check(
        ManifestError::InvalidJson {
            path: "/p/manifest.json".into(),
            line: 3,
            column: 7,
            message: "expected value".into(),
        }
        .into(),
        "ManifestError",
        "ManifestError: invalid JSON in /p/manifest.json at line 3, column 7: expected value",
    );
}

#[test]
fn integrity_reasons_name_the_subject_and_both_digests() {
    check(
        IntegrityError::Mismatch {
            subject: "libfoo.so".into(),
            actual: "3f2a".into(),
            pinned_by: "the manifest".into(),
            expected: "9b1c".into(),
        }
        .into(),
        "IntegrityError",
        "IntegrityError: sha256 of libfoo.so is 3f2a, the manifest pins 9b1c",
    );
    check(
        IntegrityError::LockFile {
            path: "/p/forgesyte.lock".into(),
            detail: "not JSON".into(),
        }
        .into(),
        "IntegrityError",
        "IntegrityError: lock file /p/forgesyte.lock is invalid: not JSON",
    );
    check(
        IntegrityError::Unreadable {
            subject: "libfoo.so".into(),
            detail: "denied".into(),
        }
        .into(),
        "IntegrityError",
        "IntegrityError: cannot compute the sha256 of libfoo.so: denied",
    );
}

#[test]
fn io_source_chain_is_kept() {
    let err = ManifestError::Io {
        path: "/p/manifest.json".into(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied"),
    };
    assert!(err.source().is_some());
}

#[test]
fn timeout_and_crash_read_well() {
    check(
        TimeoutError {
            operation: "init".into(),
            after: Duration::from_secs(5),
            remedy: None,
            stuck_at: None,
        }
        .into(),
        "TimeoutError",
        "TimeoutError: timed out after 5 s during init",
    );
    check(
        InitError::TimedOut(TimeoutError {
            operation: "init".into(),
            after: Duration::from_millis(1500),
            remedy: Some("raise limits.init_timeout_s".into()),
            stuck_at: Some("/p/plugin.py:8 in __init__".into()),
        })
        .into(),
        "InitError",
        "InitError: timed out after 1.5 s during init, stuck at /p/plugin.py:8 in __init__; \
         raise limits.init_timeout_s",
    );
    check(
        CrashError {
            cause: CrashCause::Signal {
                name: "SIGSEGV".into(),
                number: 11,
            },
            stderr_tail: vec!["a".into(), "b".into()],
        }
        .into(),
        "CrashError",
        "CrashError: killed by signal SIGSEGV (11); stderr: a | b",
    );
}

#[test]
fn process_faults_read_well() {
    let crash = CrashError {
        cause: CrashCause::MemoryLimit { limit_mib: 512 },
        stderr_tail: vec!["memory allocation of 1048576 bytes failed".into()],
    };
    check(
        InitError::Crashed(crash.clone()).into(),
        "InitError",
        "InitError: plugin process died during construction: exceeded memory limit 512 MiB (an address-space limit: the manifest's \
         limits.memory_mb, else the server's --memory-limit); \
         stderr: memory allocation of 1048576 bytes failed",
    );
    check(
        InitError::TimedOut(TimeoutError {
            operation: "init".into(),
            after: Duration::from_secs(5),
            remedy: None,
            stuck_at: None,
        })
        .into(),
        "InitError",
        "InitError: timed out after 5 s during init",
    );
    check(
        ImportError::Crashed(CrashError {
            cause: CrashCause::Exit { code: 3 },
            stderr_tail: Vec::new(),
        })
        .into(),
        "ImportError",
        "ImportError: plugin process died while loading the plugin: exited with code 3",
    );
    check(
        ToolError::Crashed(crash).into(),
        "CrashError",
        "CrashError: exceeded memory limit 512 MiB (an address-space limit: the manifest's \
         limits.memory_mb, else the server's --memory-limit); stderr: memory allocation of 1048576 \
         bytes failed",
    );
    check(
        ToolError::TimedOut {
            after: Duration::from_millis(300),
        }
        .into(),
        "TimeoutError",
        "TimeoutError: timed out after 300 ms (the plugin process was killed)",
    );
    assert_eq!(
        CrashCause::Killed {
            reason: "timed out".into()
        }
        .to_string(),
        "killed by the host: timed out"
    );
}

/// Every error below `err` in its `source()` chain, nearest first.
fn chain<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> Vec<&'a (dyn std::error::Error + 'static)> {
    std::iter::successors(err.source(), |&e| e.source()).collect()
}

/// The first error of type `T` in `err`'s chain.
fn cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    chain(err).into_iter().find_map(|e| e.downcast_ref::<T>())
}

fn bad_json() -> serde_json::Error {
    match serde_json::from_str::<serde_json::Value>("{\n  \"name\": ,\n}") {
        Err(e) => e,
        Ok(v) => panic!("parsed {v}"),
    }
}

#[test]
fn manifest_json_keeps_the_parser_error_and_reads_as_invalid_json() {
    let e = bad_json();
    let text = ManifestError::InvalidJson {
        path: "/p/manifest.json".into(),
        line: e.line(),
        column: e.column(),
        message: "expected value".into(),
    };
    let typed = PluginError::from(ManifestError::Json {
        path: "/p/manifest.json".into(),
        source: e,
    });
    assert_eq!(typed.reason(), PluginError::from(text).reason());
    assert_eq!(
        typed.reason(),
        "ManifestError: invalid JSON in /p/manifest.json at line 2, column 11: expected value"
    );
    let parse = cause::<serde_json::Error>(&typed).map(|e| (e.line(), e.classify()));
    assert_eq!(parse, Some((2, serde_json::error::Category::Syntax)));
}

#[test]
fn import_io_keeps_the_io_error_and_reads_as_open() {
    let io = || std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
    let text = PluginError::from(ImportError::Open {
        path: "/p/libx.so".into(),
        detail: io().to_string(),
    });
    let typed = PluginError::from(ImportError::Io {
        path: "/p/libx.so".into(),
        source: io(),
    });
    assert_eq!(typed.reason(), text.reason());
    assert_eq!(
        typed.reason(),
        "ImportError: cannot open /p/libx.so: denied"
    );
    assert_eq!(typed.kind(), "ImportError");
    let kind = cause::<std::io::Error>(&typed).map(std::io::Error::kind);
    assert_eq!(kind, Some(std::io::ErrorKind::PermissionDenied));
    assert!(chain(&text).is_empty(), "text has no chain");
}

#[test]
fn invalid_json_answers_keep_the_parser_error_and_read_as_protocol() {
    let init = PluginError::from(InitError::InvalidJson {
        what: "tool list".into(),
        source: bad_json(),
    });
    let init_text = PluginError::from(InitError::Protocol {
        detail: format!("tool list is not valid JSON: {}", bad_json()),
    });
    assert_eq!(init.reason(), init_text.reason());
    assert!(init.reason().starts_with("InitError: invalid answer from plugin constructor: tool list is not valid JSON: expected value"));
    assert!(cause::<serde_json::Error>(&init).is_some());

    let tool = ToolError::InvalidJson {
        what: "result".into(),
        source: bad_json().into(),
    };
    let tool_text = ToolError::Protocol {
        detail: format!("result is not valid JSON: {}", bad_json()),
    };
    assert_eq!(
        (tool.kind(), tool.is_fault()),
        (tool_text.kind(), tool_text.is_fault())
    );
    assert_eq!(tool.to_string(), tool_text.to_string());
    // Clone and Eq survive; clones share one parser error.
    assert_eq!(tool.clone(), tool);
    let tool = PluginError::from(tool);
    assert_eq!(tool.reason(), PluginError::from(tool_text).reason());
    let links = chain(&tool);
    assert_eq!(links.len(), 2, "JsonError, then serde_json::Error");
    assert!(links[0].downcast_ref::<JsonError>().is_some());
    assert_eq!(
        links[1]
            .downcast_ref::<serde_json::Error>()
            .map(serde_json::Error::line),
        Some(2)
    );
}

#[test]
fn process_faults_have_their_crash_or_timeout_as_source() {
    let crash = CrashError {
        cause: CrashCause::Signal {
            name: "SIGKILL".into(),
            number: 9,
        },
        stderr_tail: vec!["bye".into()],
    };
    let timeout = TimeoutError {
        operation: "init".into(),
        after: Duration::from_secs(5),
        remedy: None,
        stuck_at: None,
    };
    let crashes: [PluginError; 3] = [
        ImportError::Crashed(crash.clone()).into(),
        InitError::Crashed(crash.clone()).into(),
        ToolError::Crashed(crash.clone()).into(),
    ];
    for err in &crashes {
        assert_eq!(cause::<CrashError>(err), Some(&crash), "{err:?}");
        assert_eq!(chain(err).len(), 1, "{err:?}");
    }
    let timeouts: [PluginError; 2] = [
        ImportError::TimedOut(timeout.clone()).into(),
        InitError::TimedOut(timeout.clone()).into(),
    ];
    for err in &timeouts {
        assert_eq!(cause::<TimeoutError>(err), Some(&timeout), "{err:?}");
        // Reads as the timeout itself, behind the class prefix.
        assert_eq!(err.reason(), format!("{}: {timeout}", err.kind()));
    }
}

#[test]
fn text_causes_have_no_source() {
    let text: [PluginError; 8] = [
        ImportError::NotALibrary {
            path: "/p".into(),
            detail: "invalid ELF header".into(),
        }
        .into(),
        ImportError::UnresolvedSymbol {
            path: "/p".into(),
            detail: "undefined symbol: f".into(),
        }
        .into(),
        ImportError::Open {
            path: "/p".into(),
            detail: "x".into(),
        }
        .into(),
        InitError::Failed {
            message: "x".into(),
        }
        .into(),
        InitError::Protocol { detail: "x".into() }.into(),
        ToolError::Failed {
            error_type: Some("ValueError".into()),
            message: "x".into(),
            traceback: Vec::new(),
        }
        .into(),
        ToolError::Protocol { detail: "x".into() }.into(),
        CrashError {
            cause: CrashCause::Killed { reason: "x".into() },
            stderr_tail: Vec::new(),
        }
        .into(),
    ];
    for err in &text {
        assert!(chain(err).is_empty(), "{err:?} has a source");
    }
}

#[test]
fn durations_format() {
    assert_eq!(fmt_duration(Duration::from_millis(250)), "250 ms");
    assert_eq!(fmt_duration(Duration::from_millis(1500)), "1.5 s");
    assert_eq!(fmt_duration(Duration::from_secs(60)), "60 s");
}

/// A Python error reads as the seed writes it, `f"InitError: {cls}: {exc}"`,
/// an empty message included (`InitError: SystemExit: `): the seed's
/// reasons, exactly.
#[test]
fn a_python_error_reads_as_the_seed_writes_it() {
    let init = PluginError::from(LoadError::Init(InitError::Python {
        error_type: "SystemExit".into(),
        message: String::new(),
        traceback: Vec::new(),
    }));
    assert_eq!(init.reason(), "InitError: SystemExit: ");
    let import = PluginError::from(LoadError::Import(ImportError::Python {
        error_type: "ValueError".into(),
        message: "boom".into(),
        traceback: Vec::new(),
    }));
    assert_eq!(import.reason(), "ImportError: ValueError: boom");
}
