//! `forgesyte new`: the files of a working plugin, Python or Rust, and the
//! commands that build, check and serve it.
//!
//! The templates are the files under `scaffold/` beside this one, compiled
//! into the binary; `{{name}}`-style placeholders are filled in here.
//!
//! A Rust plugin depends on `forgesyte-plugin-sdk`, which is not published
//! on crates.io: the scaffold names it by path — the SDK of the workspace
//! this `forgesyte` was built in (found above the running executable, else
//! at the source path it was compiled from), or `--sdk DIR` — and only when
//! no checkout is found by version (`"0.1"`), with a note that the build
//! needs a path.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use forgesyte_loader::manifest::is_valid_name;

/// The language of a scaffold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lang {
    /// `manifest.json` + `plugin.py` (the seed's layout).
    Python,
    /// A Cargo project building a `cdylib` with the SDK.
    Rust,
}

/// Where the Rust scaffold gets the SDK from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Sdk {
    /// A path dependency on this SDK crate directory.
    Path(PathBuf),
    /// A version requirement (the SDK is not published yet).
    Version(&'static str),
}

/// The version requirement used when no SDK checkout is found.
pub(crate) const SDK_VERSION: &str = "0.1";

/// Why no scaffold was written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ScaffoldError {
    /// The target exists and is not an empty directory (`what` it is).
    #[error(
        "{} already exists and is {what}; nothing was written (choose another NAME or \
         --dir, or remove it)",
        .path.display()
    )]
    Exists {
        /// The target.
        path: PathBuf,
        /// What it is: a link, a file, a directory that is not empty.
        what: &'static str,
    },
    /// Another plugin of the directory has that name already: the new one
    /// would load as a duplicate, and calls by name would reach the other.
    #[error(
        "a plugin named '{name}' is already in {}; nothing was written (choose another NAME \
         or --dir)",
        .by.display()
    )]
    NameTaken {
        /// The name asked for.
        name: String,
        /// The directory of the plugin that has it.
        by: PathBuf,
    },
    /// Writing failed.
    #[error("cannot write {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The directory in `parent` of a plugin whose manifest names it `name`
/// (read as the load pass reads the name: the manifest's `id`, else its
/// `name`),
/// if any. Directories that cannot be read are passed over.
fn named_already(parent: &Path, name: &str) -> Option<PathBuf> {
    use forgesyte_deps::FileSystem as _;
    const MANIFEST_BYTES: u64 = 1 << 20;
    let entries = std::fs::read_dir(parent).ok()?;
    entries.flatten().map(|e| e.path()).find(|dir| {
        // Read as the loader reads a manifest: a regular file only (a FIFO
        // there would wait for a writer for ever), and bounded.
        forgesyte_deps::RealFs
            .read(
                &dir.join(forgesyte_loader::manifest::MANIFEST_FILE),
                MANIFEST_BYTES,
            )
            .is_ok_and(|text| {
                // The name it is served under: `id`, else `name` (a
                // directory's own name is the `Exists` check's).
                serde_json::from_slice::<serde_json::Value>(&text).is_ok_and(|m| {
                    m.get("id")
                        .or_else(|| m.get("name"))
                        .and_then(|n| n.as_str())
                        == Some(name)
                })
            })
    })
}

/// What was written, and what to run next.
#[derive(Debug)]
pub(crate) struct Created {
    /// The message for the terminal: the files made (in `PARENT/NAME`) and
    /// the exact commands that build, check, serve and call the plugin.
    pub(crate) message: String,
}

/// `NAME` for `--python`: the manifest's name rule,
/// `[A-Za-z0-9][A-Za-z0-9._-]{0,63}`.
pub(crate) fn python_name(name: &str) -> Result<String, String> {
    // The operator's lock file lives beside the plugins, under this name.
    if name == forgesyte_loader::integrity::LOCK_FILE {
        return Err(format!(
            "'{name}' cannot name a plugin: it is the name of the plugins directory's lock file"
        ));
    }
    if is_valid_name(name) {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "'{name}' is not a plugin name: use 1 to 64 letters, digits, '.', '_' or '-', \
             starting with a letter or digit"
        ))
    }
}

/// `NAME` for `--rust`: also a Cargo package and Rust crate name (a letter
/// first, no '.', not a keyword).
pub(crate) fn rust_name(name: &str) -> Result<String, String> {
    python_name(name)?;
    if !name.starts_with(|c: char| c.is_ascii_alphabetic()) || name.contains('.') {
        return Err(format!(
            "'{name}' cannot name a Rust plugin (a Cargo package): start with a letter \
             and use only letters, digits, '_' and '-'"
        ));
    }
    let crate_name = name.replace('-', "_");
    if RESERVED.contains(&crate_name.as_str()) || crate_name == "Self" {
        return Err(format!(
            "'{name}' cannot name a Rust plugin: '{crate_name}' is a Rust keyword or a \
             standard crate"
        ));
    }
    if TAKEN.contains(&crate_name.as_str()) {
        return Err(format!(
            "'{name}' cannot name a Rust plugin: the plugin depends on a package of that \
             name (the SDK, or one of its dependencies), and Cargo would not build it"
        ));
    }
    Ok(name.to_owned())
}

/// Packages a scaffolded plugin depends on (as crate names): a plugin of
/// the same name collides with them in Cargo's lock file, or depends on
/// itself.
const TAKEN: &[&str] = &[
    "forgesyte_plugin_sdk",
    "forgesyte_protocol",
    "serde",
    "serde_core",
    "serde_derive",
    "serde_json",
];

/// Keywords and standard crates: not a crate's name.
const RESERVED: &[&str] = &[
    "abstract",
    "alloc",
    "as",
    "async",
    "await",
    "become",
    "box",
    "break",
    "const",
    "continue",
    "core",
    "crate",
    "do",
    "dyn",
    "else",
    "enum",
    "extern",
    "false",
    "final",
    "fn",
    "for",
    "gen",
    "if",
    "impl",
    "in",
    "let",
    "loop",
    "macro",
    "match",
    "mod",
    "move",
    "mut",
    "override",
    "priv",
    "proc_macro",
    "pub",
    "ref",
    "return",
    "self",
    "static",
    "std",
    "struct",
    "super",
    "test",
    "trait",
    "true",
    "try",
    "type",
    "typeof",
    "unsafe",
    "unsized",
    "use",
    "virtual",
    "where",
    "while",
    "yield",
];

/// The SDK crate of the workspace this binary belongs to: above the
/// running executable (`WORKSPACE/target/debug/forgesyte`), else where it
/// was compiled from; `None` when neither holds it.
pub(crate) fn find_sdk() -> Option<PathBuf> {
    let exe = std::env::current_exe()
        .ok()
        .and_then(|e| e.canonicalize().ok());
    let above_exe = exe
        .iter()
        .flat_map(|e| e.ancestors().skip(1))
        .map(|dir| dir.join("crates").join("forgesyte-plugin-sdk"))
        .collect::<Vec<_>>();
    let compiled_from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../forgesyte-plugin-sdk");
    above_exe
        .into_iter()
        .chain(std::iter::once(compiled_from))
        .find(|dir| is_sdk(dir))
        .and_then(|dir| dir.canonicalize().ok())
}

/// Whether `dir` holds the SDK crate.
pub(crate) fn is_sdk(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml"))
        .is_ok_and(|text| text.contains("name = \"forgesyte-plugin-sdk\""))
}

/// Writes the scaffold of plugin `name` into `parent/name` (which must not
/// exist, or be an empty directory).
pub(crate) fn create(
    lang: Lang,
    name: &str,
    parent: &Path,
    sdk: &Sdk,
    bind: &str,
    config: Option<&Path>,
) -> Result<Created, ScaffoldError> {
    let dir = parent.join(name);
    // A link of that name is never followed (its target may be anywhere)
    // nor removed.
    if dir
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return Err(ScaffoldError::Exists {
            path: dir,
            what: "a link (never followed)",
        });
    }
    let existed = match std::fs::read_dir(&dir) {
        Ok(mut entries) => match entries.next() {
            None => true,
            Some(_) => {
                return Err(ScaffoldError::Exists {
                    path: dir,
                    what: "a directory that is not empty",
                });
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        // A file of that name.
        Err(_) if dir.symlink_metadata().is_ok() => {
            return Err(ScaffoldError::Exists {
                path: dir,
                what: "not a directory",
            });
        }
        Err(source) => return Err(ScaffoldError::Io { path: dir, source }),
    };
    if let Some(by) = named_already(parent, name) {
        return Err(ScaffoldError::NameTaken {
            name: name.to_owned(),
            by,
        });
    }
    let files = render(lang, name, sdk, bind, config);
    let written = write_all(&dir, &files);
    if let Err(e) = written {
        // Leave nothing half-made behind.
        if existed {
            for (file, _) in &files {
                let _ = std::fs::remove_file(dir.join(file));
            }
            let _ = std::fs::remove_dir(dir.join("src"));
        } else {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Err(e);
    }
    Ok(Created {
        message: message(lang, name, parent, &files, sdk, bind, config, &program()),
    })
}

fn write_all(dir: &Path, files: &[(&'static str, String)]) -> Result<(), ScaffoldError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ScaffoldError::Io { path, source }
    };
    for (file, text) in files {
        let path = dir.join(file);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        // Never over anything: a file that appeared meanwhile is an error.
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io(&path))?;
        out.write_all(text.as_bytes()).map_err(io(&path))?;
    }
    Ok(())
}

/// The files of a scaffold (relative paths) and their text; its README's
/// commands serve on `bind` and read `config`, as the printed ones do (the
/// file by its absolute path: the README's commands run from the plugin's
/// directory).
pub(crate) fn render(
    lang: Lang,
    name: &str,
    sdk: &Sdk,
    bind: &str,
    config: Option<&Path>,
) -> Vec<(&'static str, String)> {
    let config_flag = config_flag(
        config.map(|file| std::path::absolute(file).unwrap_or_else(|_| file.to_path_buf())),
    );
    let fill = |template: &str| {
        template
            .replace("{{name}}", name)
            .replace("{{config_flag}}", &config_flag)
            .replace("{{run_url}}", &run_url(bind, name))
            .replace("{{url}}", &server_url(bind))
            .replace("{{bind_flag}}", &bind_flag(bind))
            .replace("{{library}}", &library_file(name))
            .replace("{{type}}", &type_name(name))
            .replace("{{sdk_dependency}}", &sdk_dependency(sdk))
    };
    match lang {
        Lang::Python => vec![
            (
                "manifest.json",
                fill(include_str!("scaffold/python/manifest.json.tmpl")),
            ),
            (
                "plugin.py",
                fill(include_str!("scaffold/python/plugin.py.tmpl")),
            ),
            (
                "README.md",
                fill(include_str!("scaffold/python/README.md.tmpl")),
            ),
        ],
        Lang::Rust => vec![
            (
                "Cargo.toml",
                fill(include_str!("scaffold/rust/Cargo.toml.tmpl")),
            ),
            (
                "src/lib.rs",
                fill(include_str!("scaffold/rust/lib.rs.tmpl")),
            ),
            (
                "manifest.json",
                fill(include_str!("scaffold/rust/manifest.json.tmpl")),
            ),
            (
                "README.md",
                fill(include_str!("scaffold/rust/README.md.tmpl")),
            ),
            (
                ".gitignore",
                fill(include_str!("scaffold/rust/gitignore.tmpl")),
            ),
        ],
    }
}

/// The library Cargo builds for package `name`: `lib` + the crate name
/// (`-` → `_`) + `.so`.
pub(crate) fn library_file(name: &str) -> String {
    format!("lib{}.so", name.replace(['-', '.'], "_"))
}

/// The plugin type's name: `image-stats` → `ImageStatsPlugin`, `ocr` →
/// `OcrPlugin`. Always suffixed: a bare `Value`, `Result`, `String` or
/// `Self` would clash with the template's imports, the prelude or a
/// keyword.
pub(crate) fn type_name(name: &str) -> String {
    let camel: String = name
        .split(['-', '_', '.'])
        .filter(|part| !part.is_empty())
        .map(|part| {
            let mut chars = part.chars();
            chars.next().map_or_else(String::new, |first| {
                first.to_ascii_uppercase().to_string() + chars.as_str()
            })
        })
        .collect();
    // A Rust NAME starts with a letter (`rust_name`).
    format!("{camel}Plugin")
}

/// The `[dependencies]` line of the SDK.
fn sdk_dependency(sdk: &Sdk) -> String {
    match sdk {
        Sdk::Path(path) => format!(
            "forgesyte-plugin-sdk = {{ path = {} }}",
            toml_string(&path.display().to_string())
        ),
        Sdk::Version(version) => format!(
            "# Not on crates.io yet: replace the version with\n\
             # `{{ path = \"/path/to/forgesyte/crates/forgesyte-plugin-sdk\" }}`.\n\
             forgesyte-plugin-sdk = \"{version}\""
        ),
    }
}

/// A TOML basic string.
fn toml_string(text: &str) -> String {
    let mut out = String::from("\"");
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `path` as a shell word (quoted when it needs to be).
fn shell(path: &Path) -> String {
    let text = path.display().to_string();
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+:,@%=".contains(c));
    if plain {
        text
    } else {
        format!("'{}'", text.replace('\'', "'\\''"))
    }
}

/// ` --config FILE` for a `check` or `serve` line, when `new` was given a
/// config file: the one `check` and `serve` need too (its interpreter,
/// library path, keys, isolation).
fn config_flag(file: Option<impl AsRef<Path>>) -> String {
    file.map(|file| format!(" --config {}", shell(file.as_ref())))
        .unwrap_or_default()
}

/// The URL a client on this host reaches a server listening on `bind` at
/// (`serve --bind`): an unspecified address (`0.0.0.0`, `[::]`) is called
/// on loopback, and port 0 (a free port, which the server logs) is shown
/// as `PORT`.
pub(crate) fn server_url(bind: &str) -> String {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let (host, port) = match bind.parse::<SocketAddr>() {
        Ok(addr) => {
            let ip = match addr.ip() {
                IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            let host = match ip {
                IpAddr::V4(ip) => ip.to_string(),
                IpAddr::V6(ip) => format!("[{ip}]"),
            };
            (host, addr.port().to_string())
        }
        Err(_) => match bind.rsplit_once(':') {
            Some((host, port)) => (host.to_owned(), port.to_owned()),
            None => (bind.to_owned(), "8000".to_owned()),
        },
    };
    let port = if port == "0" { "PORT".to_owned() } else { port };
    format!("http://{host}:{port}")
}

/// The URL of the scaffold's `hello` tool as a shell word: quoted when it
/// needs to be (`http://[::1]:9001/…` is a glob to zsh, and to bash with
/// `failglob`).
fn run_url(bind: &str, name: &str) -> String {
    let url = format!("{}/v1/plugins/{name}/tools/hello/run", server_url(bind));
    shell(Path::new(&url))
}

/// ` --bind ADDR` for a `serve` line, unless `bind` is the default: the
/// `serve` and `curl` lines work as printed, wherever `bind` came from.
fn bind_flag(bind: &str) -> String {
    if bind == forgesyte_server::DEFAULT_BIND {
        String::new()
    } else {
        // Quoted for a shell where needed: `[::]:9001` is a glob to zsh.
        format!(" --bind {}", shell(Path::new(bind)))
    }
}

/// How the printed commands name this program: `forgesyte` when that name
/// on `PATH` is this executable, else this executable's path (a binary run
/// from `target/release`, say, whose printed commands failed as pasted).
fn program() -> String {
    // The unit tests' executable is no `forgesyte`: they check the
    // messages as an installed binary prints them (the API tests run the
    // real binary with and without it on PATH).
    if cfg!(test) {
        return "forgesyte".to_owned();
    }
    let Ok(me) = std::env::current_exe().and_then(std::fs::canonicalize) else {
        return "forgesyte".to_owned();
    };
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("forgesyte"))
        // The first the shell would run: a file that is executable.
        .find(|candidate| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::metadata(candidate)
                .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        })
        .and_then(|found| std::fs::canonicalize(found).ok());
    if on_path.as_ref() == Some(&me) {
        "forgesyte".to_owned()
    } else {
        shell(&me)
    }
}

#[allow(clippy::too_many_arguments)]
fn message(
    lang: Lang,
    name: &str,
    parent: &Path,
    files: &[(&'static str, String)],
    sdk: &Sdk,
    bind: &str,
    config: Option<&Path>,
    program: &str,
) -> String {
    let dir = &parent.join(name);
    let run_url = run_url(bind, name);
    let bind_flag = bind_flag(bind);
    let config = config_flag(config);
    let mut out = String::new();
    let what = match lang {
        Lang::Python => "Python",
        Lang::Rust => "Rust",
    };
    let _ = writeln!(out, "Created the {what} plugin '{name}' in {}:", shell(dir));
    for (file, _) in files {
        let _ = writeln!(out, "  {}", shell(&dir.join(file)));
    }
    let curl = format!(
        "curl -s -X POST {run_url} \
         -H 'Content-Type: application/json' -d '{{\"args\": {{\"name\": \"ForgeSyte\"}}}}'"
    );
    match lang {
        Lang::Python => {
            let _ = writeln!(out, "\nCheck it, serve it, call its tool:");
            let _ = writeln!(out, "  {program} check{config} {}", shell(parent));
            let _ = writeln!(
                out,
                "  {program} serve{config} --plugins {}{bind_flag}",
                shell(parent)
            );
            let _ = writeln!(out, "  {curl}");
            let _ = writeln!(
                out,
                "\nWith --watch, serve loads plugin.py again each time you save it."
            );
        }
        Lang::Rust => {
            match sdk {
                Sdk::Path(path) => {
                    let _ = writeln!(
                        out,
                        "\nIt depends on the SDK at {} (by path).",
                        path.display()
                    );
                }
                Sdk::Version(version) => {
                    let _ = writeln!(
                        out,
                        "\nNo checkout of forgesyte-plugin-sdk was found, so Cargo.toml asks \
                         for version \"{version}\", which is not on crates.io yet: point it \
                         at a checkout (`path = \".../crates/forgesyte-plugin-sdk\"`), or \
                         remove {} and run `forgesyte new --rust {name} --sdk DIR` again.",
                        shell(dir)
                    );
                }
            }
            let target = dir.join("target").join("debug");
            let _ = writeln!(out, "\nBuild it, check it, serve it, call its tool:");
            let _ = writeln!(
                out,
                "  cargo build --manifest-path {}",
                shell(&dir.join("Cargo.toml"))
            );
            // `--lib-path` is a list split at ':': a directory whose path
            // holds one cannot be named there, so the library is copied:
            // by `install`, which puts a new file in place, where `cp`
            // writes into the one a running server has mapped (and so
            // crashes it at its next call into the plugin).
            let library = target.join(library_file(name));
            let lib_path = if target.to_string_lossy().contains(':') {
                let _ = writeln!(out, "  install {} {}", shell(&library), shell(dir));
                String::new()
            } else {
                format!(" --lib-path {}", shell(&target))
            };
            let _ = writeln!(out, "  {program} check{config} {}{lib_path}", shell(parent));
            let _ = writeln!(
                out,
                "  {program} serve{config} --plugins {}{lib_path}{bind_flag}",
                shell(parent)
            );
            let _ = writeln!(out, "  {curl}");
            if !lib_path.is_empty() {
                let _ = writeln!(
                    out,
                    "\n(Or put {} into {} with `install` and leave out --lib-path; not with \
                     `cp`, which writes into the library a running server has mapped.)",
                    shell(&library),
                    shell(dir)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_URL: &str = "http://127.0.0.1:8000";
    const DEFAULT_BIND: &str = forgesyte_server::DEFAULT_BIND;

    #[test]
    fn the_url_is_the_one_a_client_here_calls_the_server_at() {
        for (bind, url) in [
            ("127.0.0.1:8000", DEFAULT_URL),
            ("0.0.0.0:9000", "http://127.0.0.1:9000"),
            ("[::]:8080", "http://[::1]:8080"),
            ("[::1]:81", "http://[::1]:81"),
            ("10.0.0.7:80", "http://10.0.0.7:80"),
            ("localhost:47203", "http://localhost:47203"),
            ("127.0.0.1:0", "http://127.0.0.1:PORT"),
        ] {
            assert_eq!(server_url(bind), url, "{bind}");
        }
    }

    #[test]
    fn names_follow_the_manifest_rule_and_cargos() {
        assert!(python_name("ocr").is_ok());
        assert!(python_name("my.plugin-2").is_ok());
        assert!(python_name("9lives").is_ok());
        for bad in [
            "",
            "-x",
            ".x",
            "a b",
            "a/b",
            "ü",
            &"x".repeat(65),
            "forgesyte.lock",
        ] {
            assert!(python_name(bad).is_err(), "{bad:?}");
        }
        assert!(rust_name("image-stats").is_ok());
        assert!(rust_name("ocr_2").is_ok());
        for bad in [
            "9lives",
            "my.plugin",
            "fn",
            "std",
            "self",
            "test",
            "a b",
            "forgesyte-plugin-sdk",
            "serde_json",
        ] {
            assert!(rust_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn types_and_libraries() {
        assert_eq!(type_name("image-stats"), "ImageStatsPlugin");
        assert_eq!(type_name("ocr"), "OcrPlugin");
        assert_eq!(type_name("plugin"), "PluginPlugin");
        assert_eq!(type_name("a_b-c"), "ABCPlugin");
        // Names that would clash with the template's imports or the prelude.
        for (name, ty) in [
            ("value", "ValuePlugin"),
            ("result", "ResultPlugin"),
            ("string", "StringPlugin"),
        ] {
            assert_eq!(type_name(name), ty);
        }
        assert!(rust_name("Self").is_err());
        assert_eq!(library_file("image-stats"), "libimage_stats.so");
    }

    #[test]
    fn quoting() {
        assert_eq!(toml_string(r#"/a "b"\c"#), r#""/a \"b\"\\c""#);
        assert_eq!(shell(Path::new("./plugins/x")), "./plugins/x");
        assert_eq!(shell(Path::new("/my dir/it's")), r#"'/my dir/it'\''s'"#);
    }

    #[test]
    fn templates_are_filled_and_valid() {
        for lang in [Lang::Python, Lang::Rust] {
            for (file, text) in render(
                lang,
                "image-stats",
                &Sdk::Path("/sdk".into()),
                forgesyte_server::DEFAULT_BIND,
                None,
            ) {
                assert!(!text.contains("{{"), "{file}: {text}");
                if file.ends_with(".json") {
                    let manifest: serde_json::Value = serde_json::from_str(&text).unwrap();
                    let parsed = forgesyte_loader::manifest::from_value(manifest, "x").unwrap();
                    assert_eq!(parsed.name, "image-stats");
                    let runtime = match lang {
                        Lang::Python => forgesyte_loader::Runtime::Python,
                        Lang::Rust => forgesyte_loader::Runtime::Native,
                    };
                    assert_eq!(parsed.runtime, runtime);
                }
            }
        }
        let rust = render(
            Lang::Rust,
            "image-stats",
            &Sdk::Path("/sdk".into()),
            DEFAULT_BIND,
            None,
        );
        let cargo = &rust.iter().find(|(f, _)| *f == "Cargo.toml").unwrap().1;
        assert!(cargo.contains("forgesyte-plugin-sdk = { path = \"/sdk\" }"));
        assert!(cargo.contains("name = \"image-stats\""));
        let lib = &rust.iter().find(|(f, _)| *f == "src/lib.rs").unwrap().1;
        assert!(lib.contains("export_plugin!(ImageStatsPlugin)"));
        let manifest = &rust.iter().find(|(f, _)| *f == "manifest.json").unwrap().1;
        assert!(manifest.contains("\"entrypoint\": \"libimage_stats.so\""));
        let versioned = render(
            Lang::Rust,
            "x",
            &Sdk::Version(SDK_VERSION),
            DEFAULT_BIND,
            None,
        );
        assert!(versioned[0].1.contains("forgesyte-plugin-sdk = \"0.1\""));
    }

    /// A name another plugin of the directory has (in its manifest, under
    /// another directory name) is refused: the new plugin would load as
    /// a duplicate, and the printed call would reach the other one.
    #[test]
    fn a_name_another_plugin_has_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let sdk = Sdk::Version(SDK_VERSION);
        let other = tmp.path().join("packaged");
        std::fs::create_dir(&other).unwrap();
        std::fs::write(other.join("manifest.json"), r#"{"name": "text-stats"}"#).unwrap();
        // Served under its `id`, not its `name`.
        let by_id = tmp.path().join("published");
        std::fs::create_dir(&by_id).unwrap();
        std::fs::write(
            by_id.join("manifest.json"),
            r#"{"id": "ocr", "name": "free"}"#,
        )
        .unwrap();
        let err = create(Lang::Python, "ocr", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap_err();
        assert!(matches!(err, ScaffoldError::NameTaken { .. }), "{err}");
        create(Lang::Python, "free", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap();
        for lang in [Lang::Python, Lang::Rust] {
            let err = create(lang, "text-stats", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap_err();
            assert!(matches!(err, ScaffoldError::NameTaken { .. }), "{err}");
            assert!(
                err.to_string().contains(&format!(
                    "a plugin named 'text-stats' is already in {}",
                    other.display()
                )),
                "{err}"
            );
            assert!(!tmp.path().join("text-stats").exists());
        }
        create(
            Lang::Python,
            "text-stats-2",
            tmp.path(),
            &sdk,
            DEFAULT_BIND,
            None,
        )
        .unwrap();
        // A sibling whose manifest is a FIFO is passed over, not waited on.
        let fifo = tmp.path().join("fifo");
        std::fs::create_dir(&fifo).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(fifo.join("manifest.json"))
            .status()
            .expect("mkfifo");
        assert!(made.success());
        let (tx, rx) = std::sync::mpsc::channel();
        let parent = tmp.path().to_path_buf();
        std::thread::spawn(move || {
            let sdk = Sdk::Version(SDK_VERSION);
            let _ = tx.send(
                create(
                    Lang::Python,
                    "after-fifo",
                    &parent,
                    &sdk,
                    DEFAULT_BIND,
                    None,
                )
                .is_ok(),
            );
        });
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(true),
            "new waited on a FIFO's writer"
        );
    }

    /// The config file `new` was given is in the commands it prints: the
    /// plugin is checked and served with what `new` read.
    #[test]
    fn the_printed_commands_keep_the_config_file() {
        let tmp = tempfile::tempdir().unwrap();
        let sdk = Sdk::Version(SDK_VERSION);
        let config = tmp.path().join("my forgesyte.toml");
        for (lang, name) in [(Lang::Python, "with-config"), (Lang::Rust, "with_config")] {
            let created =
                create(lang, name, tmp.path(), &sdk, DEFAULT_BIND, Some(&config)).unwrap();
            let quoted = shell(&config);
            let readme = std::fs::read_to_string(tmp.path().join(name).join("README.md")).unwrap();
            for command in ["forgesyte check", "forgesyte serve"] {
                assert!(
                    created
                        .message
                        .contains(&format!("{command} --config {quoted} ")),
                    "{}",
                    created.message
                );
                // The README's too, by the file's absolute path.
                assert!(
                    readme.contains(&format!("{command} --config {quoted} ")),
                    "{readme}"
                );
            }
            // A relative path, absolute in the README (its commands run
            // from the plugin's directory).
            let relative = Path::new("conf/forgesyte.toml");
            let absolute = std::env::current_dir().unwrap().join(relative);
            let files = render(lang, name, &sdk, DEFAULT_BIND, Some(relative));
            let (_, readme) = files.iter().find(|(f, _)| *f == "README.md").unwrap();
            assert!(
                readme.contains(&format!("forgesyte check --config {} ", shell(&absolute))),
                "{readme}"
            );
        }
    }

    #[test]
    fn existing_directories_are_never_written_into() {
        let tmp = tempfile::tempdir().unwrap();
        let sdk = Sdk::Version(SDK_VERSION);
        // An empty directory is fine.
        std::fs::create_dir(tmp.path().join("empty")).unwrap();
        create(Lang::Python, "empty", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap();
        for file in ["manifest.json", "plugin.py", "README.md"] {
            assert!(tmp.path().join("empty").join(file).is_file(), "{file}");
        }
        let err = create(Lang::Python, "empty", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap_err();
        assert!(matches!(err, ScaffoldError::Exists { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("already exists and is a directory that is not empty"),
            "{err}"
        );
        std::fs::write(tmp.path().join("file"), "x").unwrap();
        let err = create(Lang::Rust, "file", tmp.path(), &sdk, DEFAULT_BIND, None).unwrap_err();
        assert!(matches!(err, ScaffoldError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("is not a directory"), "{err}");
        assert_eq!(
            std::fs::read_to_string(tmp.path().join("file")).unwrap(),
            "x"
        );
        // A link of that name: to an empty directory elsewhere (never
        // written through), or to nothing (never removed).
        std::fs::create_dir(tmp.path().join("elsewhere")).unwrap();
        std::os::unix::fs::symlink(tmp.path().join("elsewhere"), tmp.path().join("linked"))
            .unwrap();
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), tmp.path().join("dangling"))
            .unwrap();
        for name in ["linked", "dangling"] {
            let err = create(Lang::Python, name, tmp.path(), &sdk, DEFAULT_BIND, None).unwrap_err();
            assert!(matches!(err, ScaffoldError::Exists { .. }), "{name}: {err}");
            assert!(err.to_string().contains("is a link"), "{name}: {err}");
            assert!(
                tmp.path().join(name).symlink_metadata().is_ok(),
                "{name} removed"
            );
        }
        assert_eq!(
            std::fs::read_dir(tmp.path().join("elsewhere"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn the_messages_name_the_exact_commands() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("my plugins");
        let created = create(
            Lang::Rust,
            "ocr",
            &parent,
            &Sdk::Path("/sdk".into()),
            DEFAULT_BIND,
            None,
        )
        .unwrap();
        let q = |p: &Path| shell(p);
        let dir = parent.join("ocr");
        let target = dir.join("target/debug");
        for line in [
            format!("cargo build --manifest-path {}", q(&dir.join("Cargo.toml"))),
            format!("forgesyte check {} --lib-path {}", q(&parent), q(&target)),
            format!(
                "forgesyte serve --plugins {} --lib-path {}",
                q(&parent),
                q(&target)
            ),
            "curl -s -X POST http://127.0.0.1:8000/v1/plugins/ocr/tools/hello/run".to_owned(),
        ] {
            assert!(
                created.message.contains(&line),
                "{line}\n{}",
                created.message
            );
        }
        assert!(dir.join("src/lib.rs").is_file());
        assert!(dir.join(".gitignore").is_file());
        // A parent whose path holds ':' (which --lib-path splits at): the
        // library is copied instead.
        let parent = tmp.path().join("a:b");
        let created = create(
            Lang::Rust,
            "ocr",
            &parent,
            &Sdk::Path("/sdk".into()),
            DEFAULT_BIND,
            None,
        )
        .unwrap();
        let dir = parent.join("ocr");
        assert!(
            !created.message.contains("--lib-path"),
            "{}",
            created.message
        );
        for line in [
            format!(
                "install {} {}",
                q(&dir.join("target/debug/libocr.so")),
                q(&dir)
            ),
            format!("forgesyte check {}\n", q(&parent)),
        ] {
            assert!(
                created.message.contains(&line),
                "{line}\n{}",
                created.message
            );
        }
    }

    /// The README a scaffold writes serves and calls where the printed
    /// commands do (it said 127.0.0.1:8000 whatever `--bind` was).
    #[test]
    fn the_readme_serves_on_the_address_given() {
        for lang in [Lang::Python, Lang::Rust] {
            let files = render(lang, "ocr", &Sdk::Path("/sdk".into()), "0.0.0.0:9123", None);
            let (_, readme) = files.iter().find(|(f, _)| *f == "README.md").unwrap();
            assert!(readme.contains("--bind 0.0.0.0:9123"), "{readme}");
            assert!(
                readme.contains(
                    "curl -s -X POST http://127.0.0.1:9123/v1/plugins/ocr/tools/hello/run"
                ),
                "{readme}"
            );
            assert!(!readme.contains("8000"), "{readme}");
            let files = render(lang, "ocr", &Sdk::Path("/sdk".into()), "[::]:9001", None);
            let (_, readme) = files.iter().find(|(f, _)| *f == "README.md").unwrap();
            assert!(readme.contains("--bind '[::]:9001'"), "{readme}");
            assert!(
                readme
                    .contains("curl -s -X POST 'http://[::1]:9001/v1/plugins/ocr/tools/hello/run'"),
                "{readme}"
            );
            let files = render(lang, "ocr", &Sdk::Path("/sdk".into()), DEFAULT_BIND, None);
            let (_, readme) = files.iter().find(|(f, _)| *f == "README.md").unwrap();
            assert!(!readme.contains("--bind"), "{readme}");
            assert!(
                readme.contains("http://127.0.0.1:8000/v1/plugins/ocr"),
                "{readme}"
            );
        }
    }

    #[test]
    fn the_sdk_of_this_workspace_is_found() {
        let sdk = find_sdk().expect("tests run inside the workspace");
        assert!(
            sdk.ends_with("crates/forgesyte-plugin-sdk"),
            "{}",
            sdk.display()
        );
        assert!(is_sdk(&sdk));
        assert!(!is_sdk(Path::new("/")));
    }
}
