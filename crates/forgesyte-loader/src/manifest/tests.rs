//! Unit tests of manifest parsing: fields, defaults, runtimes and the
//! errors a bad manifest gets.

use super::*;
use proptest::prelude::*;
use serde_json::json;

fn check(json: &str, expect: Result<&str, &str>) {
    let got = parse(json.as_bytes(), Path::new("/p/x/manifest.json"), "x");
    match (got, expect) {
        (Ok(m), Ok(name)) => assert_eq!(m.name, name),
        (Err(e), Err(msg)) => assert_eq!(e.to_string(), msg),
        (got, expect) => panic!("got {got:?}, expected {expect:?}"),
    }
}

fn runtime_of(raw: Value, has_plugin_py: bool) -> (Runtime, PythonEntry) {
    let m = from_value_in(raw, "x", has_plugin_py).unwrap();
    (m.runtime, m.python_entry())
}

#[test]
fn the_runtime_is_declared_or_follows_the_entrypoint_or_plugin_py() {
    let module = |m: &str, c: Option<&str>| PythonEntry::Module {
        module: m.into(),
        class: c.map(Into::into),
    };
    let file = |f: &str| PythonEntry::File {
        file: f.into(),
        class: None,
    };
    assert_eq!(
        runtime_of(json!({"entrypoint": "forgesyte_ocr.plugin"}), false),
        (Runtime::Python, module("forgesyte_ocr.plugin", None))
    );
    assert_eq!(
        runtime_of(
            json!({"entrypoint": "forgesyte_ocr.plugin:OCRPlugin"}),
            false
        ),
        (
            Runtime::Python,
            module("forgesyte_ocr.plugin", Some("OCRPlugin"))
        )
    );
    // An attribute path after the colon, as entry points may name one.
    assert_eq!(
        runtime_of(
            json!({"entrypoint": "forgesyte_ocr.plugin:Outer.Plugin"}),
            false
        ),
        (
            Runtime::Python,
            module("forgesyte_ocr.plugin", Some("Outer.Plugin"))
        )
    );
    assert_eq!(
        runtime_of(json!({}), true),
        (Runtime::Python, file("plugin.py"))
    );
    assert_eq!(runtime_of(json!({}), false).0, Runtime::Native);
    // A *.py entry anywhere, with or without its class, is Python code
    // (it was read as a library's name unless it was `plugin.py`).
    for (entry, path, class) in [
        ("src/plugin.py", "src/plugin.py", None),
        ("./main.py:Main", "./main.py", Some("Main")),
        ("my-plugin.py", "my-plugin.py", None),
    ] {
        assert_eq!(
            runtime_of(json!({"entrypoint": entry}), false),
            (
                Runtime::Python,
                PythonEntry::File {
                    file: path.into(),
                    class: class.map(Into::into)
                }
            ),
            "{entry}"
        );
    }
    for native in ["libocr.so", "libocr.so.1", "ocr", "lib/libocr.so"] {
        assert_eq!(
            runtime_of(json!({"entrypoint": native}), true).0,
            Runtime::Native,
            "{native}"
        );
    }
    assert_eq!(
        runtime_of(json!({"runtime": "python", "entrypoint": "main.py"}), false),
        (Runtime::Python, file("main.py"))
    );
    assert_eq!(
        runtime_of(json!({"runtime": "native"}), true).0,
        Runtime::Native
    );
    // A file and the class in it: never read as a module path.
    let file_class = |f: &str, c: &str| PythonEntry::File {
        file: f.into(),
        class: Some(c.into()),
    };
    assert_eq!(
        runtime_of(json!({"entrypoint": "plugin.py:OCRPlugin"}), false),
        (Runtime::Python, file_class("plugin.py", "OCRPlugin"))
    );
    assert_eq!(
        runtime_of(
            json!({"runtime": "python", "entrypoint": "src/main.py:Plugin"}),
            false
        ),
        (Runtime::Python, file_class("src/main.py", "Plugin"))
    );
    assert_eq!(
        runtime_of(
            json!({"runtime": "python", "entrypoint": "main.py:"}),
            false
        ),
        (Runtime::Python, file("main.py"))
    );
    let err = from_value(json!({"runtime": "ruby"}), "x").unwrap_err();
    assert!(err.to_string().contains("runtime"), "{err}");
}

#[test]
fn bare_dependencies_are_python_packages_for_python_plugins() {
    let m = from_value_in(json!({"dependencies": ["torch", "lib:z"]}), "x", true).unwrap();
    let shown: Vec<String> = m
        .requirements
        .dependencies
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(shown, ["torch", "lib:z"]);
    assert!(matches!(
        m.requirements.dependencies[0],
        forgesyte_deps::Dependency::Py { .. }
    ));
    let m = from_value(json!({"dependencies": ["z"]}), "x").unwrap();
    assert!(matches!(
        m.requirements.dependencies[0],
        forgesyte_deps::Dependency::Lib(_)
    ));
}

#[test]
fn name_comes_from_id_then_name_then_dir() {
    check(r#"{"id": "ocr", "name": "OCR"}"#, Ok("ocr"));
    check(r#"{"name": "ocr2"}"#, Ok("ocr2"));
    check(r#"{}"#, Ok("x"));
}

#[test]
fn bad_json_names_the_position() {
    check(
        "{\n  \"name\": ,\n}",
        Err("invalid JSON in /p/x/manifest.json at line 2, column 11: expected value"),
    );
    check("   \n", Err("manifest /p/x/manifest.json is empty"));
    check(
        "\u{feff}{\"name\": \"x\"}",
        Err(
            "invalid JSON in /p/x/manifest.json at line 1, column 1: the file starts with a \
             UTF-8 byte order mark (BOM): save it as UTF-8 without one",
        ),
    );
    check(
        "[1]",
        Err("invalid field '(root)': expected a JSON object, found an array"),
    );
}

#[test]
fn wrong_types_name_the_field() {
    check(
        r#"{"name": 5}"#,
        Err("invalid field 'name': expected a string, found a number"),
    );
    check(
        r#"{"name": "a", "isolation": "vm"}"#,
        Err(r#"invalid field 'isolation': expected "in-process" or "process", found "vm""#),
    );
    check(
        r#"{"name": "a", "limits": {"call_timeout_s": -1}}"#,
        Err("invalid field 'limits.call_timeout_s': expected seconds in [0.001, 86400], found -1"),
    );
    // Less than a millisecond read as 0 ms: every call timed out at once.
    check(
        r#"{"name": "a", "limits": {"init_timeout_s": 1e-10}}"#,
        Err(
            "invalid field 'limits.init_timeout_s': expected seconds in [0.001, 86400], found 1e-10",
        ),
    );
    // The host's own object: a field it does not read is refused.
    check(
        r#"{"name": "a", "limits": {"call_timeout": 30}}"#,
        Err(
            "invalid field 'limits.call_timeout': not a limit the host reads (did you mean \
             \"call_timeout_s\"?); it reads call_timeout_s, init_timeout_s, memory_mb, \
             max_response_mb",
        ),
    );
    check(
        r#"{"name": "a", "limits": {"frobnicate": 1}}"#,
        Err(
            "invalid field 'limits.frobnicate': not a limit the host reads; it reads \
             call_timeout_s, init_timeout_s, memory_mb, max_response_mb",
        ),
    );
    // `library` is another name of `entrypoint`: two different ones are
    // refused (the entrypoint won in silence).
    check(
        r#"{"name": "a", "entrypoint": "liba.so", "library": "libb.so"}"#,
        Err(
            r#"invalid field 'library': names "libb.so", and "entrypoint" names "liba.so": give one ("library" is another name of "entrypoint")"#,
        ),
    );
    check(
        r#"{"name": "a", "entrypoint": "liba.so", "library": "liba.so"}"#,
        Ok("a"),
    );
    // The same file written two ways is one.
    check(
        r#"{"name": "a", "entrypoint": "liba.so", "library": "./liba.so"}"#,
        Ok("a"),
    );
    // A Python file's class after the colon must be a class's name: it
    // reached the runner, whose usage text was the plugin's reason.
    for class in ["1Bad", "Plugin:X", "Plugin.", "Plu gin"] {
        let text = json!({"name": "a", "entrypoint": format!("main.py:{class}")}).to_string();
        check(
            &text,
            Err(&format!(
                "invalid field 'entrypoint': what follows ':' in \"main.py:{class}\" must be a \
                 Python class name (Plugin, or Outer.Plugin), not {class:?}"
            )),
        );
    }
    check(
        r#"{"name": "a", "entrypoint": "main.py:Outer.Plugin"}"#,
        Ok("a"),
    );
}

/// A manifest refused for a field it gives twice says so: the value
/// refused is the last one, maybe not the one its author read. Refused
/// for another field, or for one inside an object given once, it does not.
#[test]
fn a_field_refused_and_given_twice_says_the_last_one_counts() {
    let refused = |text: &str| {
        parse(text.as_bytes(), Path::new("/p/a/manifest.json"), "a")
            .unwrap_err()
            .to_string()
    };
    let why = refused(r#"{"name": "a", "isolation": "process", "isolation": "bogus"}"#);
    assert!(
        why.starts_with("invalid field 'isolation': ")
            && why.ends_with(" (the file gives \"isolation\" twice: the last one counts)"),
        "{why}"
    );
    let why =
        refused(r#"{"name": "a", "limits": {"memory_mb": 64}, "limits": {"memory_mb": "lots"}}"#);
    assert!(
        why.starts_with("invalid field 'limits.memory_mb'")
            && why.ends_with("(the file gives \"limits\" twice: the last one counts)"),
        "{why}"
    );
    for text in [
        r#"{"name": "a", "description": "x", "description": "y", "isolation": "bogus"}"#,
        r#"{"name": "a", "limits_note": 1, "limits_note": 2, "limits": {"memory_mb": "x"}}"#,
        // A name the refused field's extends (`limit` of `limits`).
        r#"{"name": "a", "limit": 1, "limit": 2, "limits": {"memory_mb": "x"}}"#,
    ] {
        let why = refused(text);
        assert!(
            why.starts_with("invalid field") && !why.contains("twice"),
            "{why}"
        );
    }
}

/// A field given twice loads as Python's `json` reads it (the last one
/// counts) and is noted by its path; text that is no JSON keeps
/// serde_json's error.
#[test]
fn fields_given_twice_are_noted_and_the_last_one_counts() {
    let m = parse(
        br#"{"name": "a", "isolation": "bogus", "isolation": "process",
             "limits": {"memory_mb": 1, "memory_mb": 64},
             "tools": [{"id": "t", "id": "u"}], "config": {"k": {"x": 1, "x": 2}}}"#,
        Path::new("/p/a/manifest.json"),
        "a",
    )
    .unwrap();
    assert_eq!(m.isolation, Isolation::Process);
    assert_eq!(m.limits.memory_mb, Some(64));
    assert_eq!(m.raw["tools"][0]["id"], "u");
    assert_eq!(
        m.duplicate_fields.paths,
        ["isolation", "limits.memory_mb", "tools[0].id", "config.k.x"]
    );
    assert_eq!(m.duplicate_fields.more, 0);
    // Bounded, however many and however deep: the first paths kept (cut),
    // the rest counted (a MiB of repeated keys under a long key held a
    // copy of that key per repeat).
    let long = "k".repeat(500_000);
    let repeats = ",\"a\":0".repeat(1000);
    let text = format!(r#"{{"name": "x", "{long}": {{"a":0{repeats}}}}}"#);
    let (_, duplicates) = read_json(text.as_bytes()).unwrap();
    assert_eq!(duplicates.paths.len(), Duplicates::KEPT);
    assert_eq!(duplicates.more, 1000 - Duplicates::KEPT);
    assert!(
        duplicates
            .paths
            .iter()
            .all(|p| p.chars().count() == Duplicates::PATH_CHARS + 1)
    );
    let m = parse(
        br#"{"name": "a", "n": [1, {"b": [true, null, 2.5]}]}"#,
        Path::new("/m"),
        "a",
    )
    .unwrap();
    assert!(m.duplicate_fields.is_empty());
    assert_eq!(
        *m.raw,
        json!({"name": "a", "n": [1, {"b": [true, null, 2.5]}]})
    );
    for (text, error) in [
        (
            &br#"{"name": "a",}"#[..],
            "trailing comma at line 1 column 14",
        ),
        (
            br#"{"name": "a"} x"#,
            "trailing characters at line 1 column 15",
        ),
    ] {
        match read_json(text) {
            Err(e) => assert_eq!(e.to_string(), error),
            Ok(v) => panic!("{v:?}"),
        }
    }
    let deep = "[".repeat(200) + &"]".repeat(200);
    assert!(read_json(deep.as_bytes()).is_err());
}

#[test]
fn invalid_names_are_rejected() {
    check(
        r#"{"name": "../etc"}"#,
        Err(r#"invalid plugin name "../etc": must match [A-Za-z0-9][A-Za-z0-9._-]{0,63}"#),
    );
    assert!(!is_valid_name(&"a".repeat(65)));
    assert!(is_valid_name(&"a".repeat(64)));
    assert!(!is_valid_name("é"));
    assert!(!is_valid_name("-a"));
}

#[test]
fn entrypoint_must_stay_inside() {
    check(
        r#"{"name": "a", "entrypoint": "../b/liba.so"}"#,
        Err("field 'entrypoint' points outside the plugin directory: ../b/liba.so"),
    );
    check(
        r#"{"name": "a", "entrypoint": "/usr/lib/liba.so"}"#,
        Err("field 'entrypoint' points outside the plugin directory: /usr/lib/liba.so"),
    );
    check(r#"{"name": "a", "entrypoint": "lib/liba.so"}"#, Ok("a"));
}

#[test]
fn unknown_fields_are_kept_and_version_defaults() {
    let m = from_value(json!({"name": "a", "colour": "blue"}), "a").unwrap();
    assert_eq!(m.raw["colour"], "blue");
    assert_eq!(m.version, "unknown");
    assert_eq!(m.isolation, Isolation::InProcess);
}

#[test]
fn isolation_limits_and_preflight() {
    let m = from_value(
        json!({"name": "a", "isolation": "process", "preflight": true,
               "limits": {"memory_mb": 0, "max_response_mb": 2, "init_timeout_s": 0.5}}),
        "a",
    )
    .unwrap();
    assert_eq!(m.isolation, Isolation::Process);
    assert_eq!(m.declared_isolation, Some(Isolation::Process));
    assert!(m.preflight);
    assert_eq!(m.limits.memory_mb, Some(0));
    assert_eq!(m.limits.max_response_mb, Some(2));
    assert_eq!(m.limits.init_timeout, Some(Duration::from_millis(500)));
    let m = from_value(json!({"name": "a"}), "a").unwrap();
    assert_eq!(m.declared_isolation, None);
    assert!(!m.preflight);
    assert_eq!(m.limits, Limits::default());
    check(
        r#"{"name": "a", "limits": {"max_response_mb": 0}}"#,
        Err(
            "invalid field 'limits.max_response_mb': expected an integer number of MiB in [1, 1048576], found 0",
        ),
    );
    check(
        r#"{"name": "a", "limits": {"memory_mb": 1.5}}"#,
        Err(
            "invalid field 'limits.memory_mb': expected an integer number of MiB in [0, 1048576], found 1.5",
        ),
    );
    check(
        r#"{"name": "a", "preflight": "yes"}"#,
        Err("invalid field 'preflight': expected a boolean, found a string"),
    );
}

#[test]
fn a_pin_is_64_hex_digits_or_a_manifest_error_naming_the_field() {
    let pin = "AB".repeat(32);
    let m = from_value(json!({"name": "a", "sha256": pin}), "a").unwrap();
    assert_eq!(m.sha256, Some("ab".repeat(32)));
    assert_eq!(from_value(json!({"name": "a"}), "a").unwrap().sha256, None);
    check(
        r#"{"name": "a", "sha256": "3f2a"}"#,
        Err(
            r#"invalid field 'sha256': expected a SHA-256 digest (64 hexadecimal digits), found "3f2a""#,
        ),
    );
    check(
        r#"{"name": "a", "sha256": 5}"#,
        Err("invalid field 'sha256': expected a string, found a number"),
    );
}

#[test]
fn dir_names_become_valid_keys() {
    assert_eq!(key_from_dir_name("my plugin"), "my_plugin");
    assert_eq!(key_from_dir_name(".hidden"), "p.hidden");
    assert!(is_valid_name(&key_from_dir_name(&"é".repeat(100))));
}

/// The manifest's keys (top level and nested), and a few more.
const KEYS: &[&str] = &[
    "id",
    "name",
    "version",
    "description",
    "entrypoint",
    "library",
    "runtime",
    "python",
    "isolation",
    "optional",
    "preflight",
    "tools",
    "limits",
    "dependencies",
    "requires_gpu",
    "models",
    "call_timeout_s",
    "init_timeout_s",
    "memory_mb",
    "max_response_mb",
    "min_devices",
    "min_memory_mb",
    "min_compute_capability",
];

/// Strings a manifest holds, right and wrong: names, runtimes,
/// isolations, dependency specs, paths that escape, versions, anything.
fn text() -> impl Strategy<Value = String> + Clone {
    prop_oneof![
        prop::sample::select(
            &[
                "ocr",
                "../../etc",
                "/abs/lib.so",
                "lib.so",
                "a\0b",
                "",
                "native",
                "python",
                "process",
                "in-process",
                "lib:ssl",
                "bin:ffmpeg",
                "env:HOME",
                "py:numpy>=1",
                "foo:bar",
                "lib:",
                "pkg.mod:Class",
                "plugin.py:X",
                "8.6",
                "x.y",
                "1.2.3",
            ][..]
        )
        .prop_map(str::to_owned),
        ".{0,10}",
    ]
}

/// A JSON scalar, often one on the edge of a field's range.
fn leaf() -> impl Strategy<Value = Value> + Clone {
    prop_oneof![
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        1 => any::<i64>().prop_map(Value::from),
        1 => any::<u64>().prop_map(Value::from),
        1 => any::<f64>().prop_map(Value::from),
        2 => prop::sample::select(&[0.0, -1.0, 1e-300, 0.5, 86_400.0, 86_400.5, 1e300][..])
            .prop_map(Value::from),
        2 => prop::sample::select(&[0, 1, 2, 1024 * 1024, 1024 * 1024 + 1, u64::MAX][..])
            .prop_map(Value::from),
        3 => text().prop_map(Value::from),
    ]
}

/// JSON of any type; objects keyed mostly by the manifest's keys, so
/// that every field is seen with values of every type, nested ones too.
fn json_value() -> impl Strategy<Value = Value> + Clone {
    leaf().prop_recursive(3, 24, 6, |inner| {
        let key =
            prop_oneof![3 => prop::sample::select(KEYS).prop_map(str::to_owned), 1 => ".{0,5}"];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::vec((key, inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// A value shaped like one of a manifest's: a scalar, a list of
/// scalars, or an object of the nested keys (`limits`, `requires_gpu`,
/// `models`) with scalar values; or any JSON at all.
fn field_value() -> impl Strategy<Value = Value> {
    let nested = prop::sample::select(&KEYS[16..]).prop_map(str::to_owned);
    prop_oneof![
        3 => leaf(),
        1 => prop::collection::vec(leaf(), 0..3).prop_map(Value::Array),
        3 => prop::collection::vec((nested, leaf()), 0..3)
            .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        1 => json_value(),
    ]
}

/// A value of `key` that is right, or right in type with a value on
/// the edge of its range (the limits, the GPU's numbers).
fn plausible(key: &'static str) -> BoxedStrategy<Value> {
    let pick = |options: &'static [&'static str]| {
        prop::sample::select(options).prop_map(Value::from).boxed()
    };
    let object_of = |keys: &'static [&'static str]| {
        prop::collection::vec((prop::sample::select(keys), leaf()), 0..4)
            .prop_map(|kv| Value::Object(kv.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()))
            .boxed()
    };
    match key {
        "id" | "name" => pick(&["ocr", "a-b.c_1", "x"]),
        "version" => prop_oneof![pick(&["1.0.0"]), any::<u32>().prop_map(Value::from)].boxed(),
        "entrypoint" | "library" => pick(&["lib.so", "pkg.mod:Class", "plugin.py", "sub/lib.so"]),
        "runtime" => pick(&["native", "python"]),
        "python" => pick(&["python3", "/usr/bin/python3"]),
        "isolation" => pick(&["process", "in-process"]),
        "optional" | "preflight" => any::<bool>().prop_map(Value::from).boxed(),
        "tools" => Just(json!([])).boxed(),
        "limits" => object_of(&KEYS[16..20]),
        "requires_gpu" => {
            prop_oneof![any::<bool>().prop_map(Value::from), object_of(&KEYS[20..])].boxed()
        }
        "dependencies" => prop::collection::vec(text(), 0..3)
            .prop_map(|v| Value::Array(v.into_iter().map(Value::from).collect()))
            .boxed(),
        "models" => prop::collection::vec((text(), text()), 0..3)
            .prop_map(|kv| {
                Value::Object(kv.into_iter().map(|(k, v)| (k, Value::from(v))).collect())
            })
            .boxed(),
        _ => text().prop_map(Value::from).boxed(),
    }
}

/// A manifest object: each top-level key absent (most often), with a
/// plausible value, or with any value at all (names and types wrong
/// inside nested objects included).
fn manifest_object() -> impl Strategy<Value = Value> {
    let fields: Vec<_> = KEYS[..16]
        .iter()
        .map(|&key| {
            prop_oneof![
                8 => Just(None),
                4 => plausible(key).prop_map(move |v| Some((key, v))),
                1 => field_value().prop_map(move |v| Some((key, v))),
            ]
        })
        .collect();
    fields.prop_map(|fields| {
        Value::Object(
            fields
                .into_iter()
                .flatten()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
        )
    })
}

/// What a refused manifest must carry: a reason a person can act on.
fn refused_with_a_reason(e: &ManifestError) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(text.len() > 10, "{e:?}");
    if let ManifestError::InvalidField { field, .. } = e {
        prop_assert!(
            text.contains(field.as_str()),
            "{text} does not name {field}"
        );
    }
    Ok(())
}

proptest! {
    // 256 cases each (the default); each property runs in well under a
    // second.

    /// Arbitrary bytes: a manifest or a typed error with a reason.
    #[test]
    fn arbitrary_bytes_are_refused_with_a_reason(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        if let Err(e) = parse(&bytes, Path::new("/p/x/manifest.json"), "x") {
            refused_with_a_reason(&e)?;
        }
    }

    /// The manifest's keys with values of every type (nested objects
    /// included): validated, or refused naming the field.
    #[test]
    fn any_manifest_object_is_valid_or_refused_by_field(raw in manifest_object(), py in any::<bool>()) {
        match from_value_in(raw.clone(), "x", py) {
            Ok(m) => {
                prop_assert!(is_valid_name(&m.name), "{}", m.name);
                prop_assert_eq!(&*m.raw, &raw);
                if let Some(entry) = &m.entrypoint {
                    prop_assert!(check_relative("entrypoint", entry).is_ok());
                }
            }
            Err(e) => refused_with_a_reason(&e)?,
        }
    }

    /// The same objects as bytes, damaged or not: `parse` agrees with
    /// [`from_value_in`] on intact text and never panics on damaged text.
    /// (Intact text is compared with the value it reads back as: without
    /// `serde_json`'s `float_roundtrip`, a float may come back one unit
    /// in the last place off, and its error message shows it.)
    #[test]
    fn manifest_text_parses_as_its_value(raw in manifest_object(),
                                         cut in any::<prop::sample::Index>(),
                                         damage in any::<bool>()) {
        let mut bytes = serde_json::to_vec_pretty(&raw).unwrap();
        if damage {
            bytes.truncate(cut.index(bytes.len()));
        }
        let path = Path::new("/p/x/manifest.json");
        if let Err(e) = parse(&bytes, path, "x") {
            refused_with_a_reason(&e)?;
        }
        if !damage {
            prop_assert_eq!(
                parse(&bytes, path, "x").map(|m| m.name).map_err(|e| e.to_string()),
                from_value(serde_json::from_slice(&bytes).unwrap(), "x")
                    .map(|m| m.name)
                    .map_err(|e| e.to_string())
            );
        }
    }
}

/// A Python plugin's entry file is one its pin and signed list cover: a
/// `*.py` file outside `__pycache__` and dot-directories. Another (run as
/// source all the same) would be code no digest covers.
#[test]
fn a_python_entry_file_outside_the_covered_tree_is_refused() {
    let parse = |entry: &str| {
        from_value_in(
            json!({"runtime": "python", "entrypoint": entry}),
            "x",
            false,
        )
    };
    for entry in [
        "plugin.py",
        "src/plugin.py",
        "plugin.py:Plugin",
        "./main.py:Main",
    ] {
        let m = parse(entry);
        assert!(m.is_ok(), "{entry}: {m:?}");
    }
    for entry in [
        ".plugin.py:Plugin",
        "main",
        "lib/plugin.txt",
        ".hidden/plugin.py",
        "__pycache__/plugin.py",
    ] {
        let err = parse(entry)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("entry file must be a *.py file"),
            "{entry}: {err}"
        );
    }
}

/// `tools` is a list of tools or an object of id → tool (ForgeSyte's
/// published manifests write both); anything else is refused by name.
#[test]
fn tools_are_a_list_or_an_object() {
    for tools in [
        json!([{"id": "a"}]),
        json!({"a": {"description": "x"}}),
        json!(null),
    ] {
        let raw = json!({"name": "p", "tools": tools});
        assert!(from_value(raw, "p").is_ok(), "{tools}");
    }
    match from_value(json!({"name": "p", "tools": "a"}), "p") {
        Err(ManifestError::InvalidField { field, message }) => {
            assert_eq!(field, "tools");
            assert!(message.contains("an array or an object"), "{message}");
        }
        other => panic!("{other:?}"),
    }
}

/// Likely typos are said with the field meant: a top-level name close to
/// one the host reads, and any field of `limits` it does not read. A
/// plugin's own fields, far from every known name, are left alone, as are
/// ForgeSyte's published ones.
#[test]
fn likely_typos_of_fields_are_noted_with_the_field_meant() {
    let notes = unread_field_notes(&json!({
        "name": "x",
        "depedencies": ["lib:z"],
        "requires_gpus": true,
        "limits": {"memory_mb": 64},
        "dependency": ["py:x"],
        "isolated": true,
        "networking": true,
        "tool": [],
        "labels_file": "labels.txt",
        "author": "a",
        "capabilities": ["ocr"],
        "type": "vision"
    }));
    assert_eq!(
        notes,
        [
            r#"field "depedencies" is not one the host reads (did you mean "dependencies"?)"#,
            r#"field "requires_gpus" is not one the host reads (did you mean "requires_gpu"?)"#,
            r#"field "dependency" is not one the host reads (did you mean "dependencies"?)"#,
            r#"field "isolated" is not one the host reads (did you mean "isolation"?)"#,
            r#"field "networking" is not one the host reads (did you mean "network"?)"#,
            r#"field "tool" is not one the host reads (did you mean "tools"?)"#,
        ]
    );
    for own in [
        "timeout",
        "ids",
        "types",
        "id_map",
        "name_prefix",
        "env_vars",
        "models_dir",
        "description_long",
        "config_schema",
        "type_hint",
    ] {
        assert!(
            unread_field_notes(&json!({"name": "x", own: 1})).is_empty(),
            "{own}"
        );
    }
    assert_eq!(unread_field_notes(&json!({"verison": "1"})).len(), 1);
    assert!(unread_field_notes(&json!([1])).is_empty());
}
