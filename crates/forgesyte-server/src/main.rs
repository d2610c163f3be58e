//! `forgesyte`: serve plugins over HTTP, or check a plugins directory.
//!
//! ```text
//! forgesyte serve [--plugins DIR] [--bind ADDR] [--call-timeout SECS] [--body-limit BYTES]
//!                 [--shutdown-grace SECS] [--header-read-timeout SECS] [--idle-timeout SECS]
//!                 [--max-connections N] [--max-calls-per-plugin N] [--admin-token-file PATH]
//!                 [LOADER OPTIONS]
//! forgesyte check [DIR] [--json] [LOADER OPTIONS]
//! forgesyte new (--python NAME | --rust NAME) [--dir PARENT] [--sdk DIR]
//! forgesyte lock [DIR]
//! forgesyte config --print [--config FILE] [SERVE OPTIONS]
//!
//! LOADER OPTIONS: [--lib-path DIRS] [--preflight] [--isolation in-process|process] [--runner PATH]
//!                 [--python PATH] [--python-entry-points] [--confine on|off]
//!                 [--sandbox-widening signed|allow|deny]
//!                 [--runner-user USER]
//! ```
//!
//! `new` writes a working plugin into `PARENT/NAME` (default
//! `./plugins/NAME`) and prints the commands that build, check and serve
//! it (see `scaffold`).
//!
//! `lock` writes `DIR/forgesyte.lock`, the SHA-256 of every plugin's code
//! by plugin directory (`forgesyte_loader::integrity`); later loads of
//! `DIR` refuse a listed plugin whose code changed.
//!
//! `forgesyte __runner --library PATH [--memory-limit-mb N] [--plugin NAME]`
//! is the plugin runner of process isolation (a hidden subcommand, started by
//! the loader, not by people).
//!
//! `serve` also reads a TOML config file (`--config FILE`,
//! `FORGESYTE_CONFIG`) whose keys are its long option names; a flag beats
//! its environment variable, which beats the file, which beats the default
//! (`config_file`). `config --print` shows the effective values and where
//! each came from.
//!
//! Every option also reads an environment variable (`FORGESYTE_*`); the
//! admin token itself is read from `FORGESYTE_ADMIN_TOKEN` only (never a
//! command-line argument, which other users can see in `ps`). Logs go to
//! stderr, filtered by `RUST_LOG` (default `info` for `serve`, `off` for
//! `check`). Exit codes: 0 success, 1 failure (for `check`: a plugin is not
//! available), 2 usage error.
//!
//! This binary owns the command line, the process's set-up (logging, the
//! environment, signals) and the hidden runner and probe subcommands. It
//! wires the library's parts together and must not hold HTTP handling or
//! loader logic of its own: those live in `forgesyte_server` and
//! `forgesyte_loader`, where the tests reach them.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{CommandFactory, FromArgMatches};
use forgesyte_server::{
    CheckError, CheckReport, DEFAULT_BIND, Server, ServerConfig, build_loader_from, shutdown_signal,
};
use tracing_subscriber::EnvFilter;

use crate::admin_env::{admin_token, admin_token_env, take_admin_token_env};
use crate::cli::{CheckArgs, Cli, Command, LogFormat, NewArgs, RUNNER_SUBCOMMAND, ServeArgs};

use forgesyte_server::say;

mod admin_env;
mod cli;
mod config_file;
mod log_fields;
mod scaffold;

/// How long the runtime waits, after the server stopped, for tool calls
/// still running on blocking threads (a timed-out in-process call may never end).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

fn init_logging(default: &str, format: LogFormat) {
    // A `RUST_LOG` that does not parse is said (once logging is up), not
    // silently replaced by the default. One set but empty is unset (as an
    // empty filter it silenced every line, errors included).
    let set = std::env::var("RUST_LOG")
        .ok()
        .filter(|v| !v.trim().is_empty());
    let (filter, refused) = match set {
        None => (EnvFilter::new(default), None),
        Some(value) => match EnvFilter::try_new(&value) {
            Ok(filter) => (filter, None),
            Err(e) => (EnvFilter::new(default), Some((value, e))),
        },
    };
    init_subscriber(filter, format);
    if let Some((value, e)) = refused {
        let why = format!(
            "RUST_LOG={value:?} is not a log filter ({e}): logging at the default level, {default}"
        );
        // A command that logs nothing by default (`check`) says it on
        // stderr: its WARN went nowhere.
        if default == "off" {
            say!("forgesyte: {why}");
        } else {
            tracing::warn!("{why}");
        }
    }
}

fn init_subscriber(filter: EnvFilter, format: LogFormat) {
    // A log line that cannot be written (stderr's pipe closed: a log
    // shipper gone, journald restarting) is lost, never reported: the
    // report is an `eprintln!`, which panics on the same closed pipe and
    // took the server down.
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    match format {
        LogFormat::Text => {
            use tracing_subscriber::field::MakeExt as _;
            logs.with_ansi(std::io::stderr().is_terminal())
                .fmt_fields(log_fields::EscapedFields.delimited(" "))
                .init();
        }
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
}

fn main() -> ExitCode {
    // Before anything writes a file: a write past the file-size limit is
    // an error (`EFBIG`), not the end of the process (runners too).
    if let Err(e) = forgesyte_loader::process::shrug_off_file_size_signal() {
        say!("forgesyte: cannot handle SIGXFSZ: {e}");
    }
    take_admin_token_env();
    // `forgesyte` doubles as the plugin runner of process isolation and
    // preflight: the loader starts it as `forgesyte __runner --library PATH
    // …`. This comes first: the runner must own stdout before anything can
    // print.
    let mut args = std::env::args_os().skip(1).peekable();
    if args.next_if(|a| a == RUNNER_SUBCOMMAND).is_some() {
        return forgesyte_loader::process::runner_main(args);
    }
    // The probes' children: the answer, as JSON, and nothing else on
    // stdout (a driver's or a library's own noise goes to stderr or
    // nowhere).
    if args
        .next_if(|a| a == forgesyte_server::GPU_PROBE_SUBCOMMAND)
        .is_some()
    {
        let out = keep_stdout_for_report();
        answer_json(out, &forgesyte_deps::probe_here());
    }
    if args
        .next_if(|a| a == forgesyte_server::LIB_PROBE_SUBCOMMAND)
        .is_some()
    {
        let out = keep_stdout_for_report();
        let candidates: Vec<String> = args.filter_map(|a| a.into_string().ok()).collect();
        answer_json(out, &forgesyte_deps::dlopen_first(&candidates));
    }
    // Before any thread: what this process inherited open (beyond stdio)
    // is no plugin runner's to inherit.
    if let Err(e) = forgesyte_loader::process::close_inherited_on_exec() {
        say!("forgesyte: cannot mark inherited descriptors close-on-exec: {e}");
    }
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let layered = match config_file::layer(Cli::command(), argv.clone(), "serve") {
        Ok(layered) => layered,
        Err(config_file::ConfigError::Usage(e)) => {
            if let Some(hint) = directory_hint(&e, &argv) {
                say!("forgesyte: {hint}");
                return ExitCode::from(2);
            }
            e.exit()
        }
        Err(e) => {
            say!("forgesyte: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::from_arg_matches(&layered.matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // The signing key's password is `keygen`'s and `sign`'s only: gone from
    // every other command before it starts a thread or a child (a runner,
    // a zygote, a probe).
    if !matches!(cli.command, Command::Keygen(_) | Command::Sign(_)) {
        admin_env::drop_env_secret(admin_env::KEY_PASSWORD_ENV);
    }
    match cli.command {
        Command::Serve(args) => {
            init_logging("info", cli.log_format);
            // In-process plugins' SDK log lines become records of the log
            // (JSON ones under --log-format json), not bare stderr lines.
            forgesyte_loader::plugin_log::route_in_process_logs();
            // Installed plugins alone may go without the default
            // directory (one named must be there).
            match serve(args, layered.given("plugins")) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    // Once where a person reads it: the text log's ERROR
                    // line is that, a JSON record (or no log) is not.
                    let read = matches!(cli.log_format, LogFormat::Text)
                        && tracing::enabled!(tracing::Level::ERROR);
                    if !read {
                        say!("forgesyte: {e:#}");
                    }
                    // A configuration refused before the start: as `check`.
                    if e.is::<RefusedConfig>() {
                        ExitCode::from(2)
                    } else {
                        ExitCode::FAILURE
                    }
                }
            }
        }
        Command::Check(args) => {
            init_logging("off", cli.log_format);
            // A directory named (flag, variable, file) must exist; the
            // default one may be missing beside installed plugins.
            // Only a flag or a variable turns `check`'s preflight off: a
            // config file written by `config --print` holds
            // `preflight = false` (serve's default) as a live line.
            let preflight_given = matches!(
                layered.source("preflight"),
                Some(config_file::Source::Flag | config_file::Source::Env(_))
            );
            run_check(args, layered.given("dir"), preflight_given)
        }
        Command::New(args) => run_new(args),
        Command::Lock(args) => run_lock(&args.dir),
        Command::Config(args) => print_config(&layered, args.serve),
        Command::Keygen(args) => ExitCode::from(forgesyte_server::signing::keygen(
            &args.out,
            &args.name,
            args.unencrypted,
        )),
        Command::Sign(args) => {
            ExitCode::from(forgesyte_server::signing::sign(&args.dir, &args.key))
        }
    }
}

/// `forgesyte config --print`: the layered configuration of `serve`, and
/// where the admin token comes from (never the token itself). A token
/// `serve` would refuse (empty, unreadable, more than one line) is named
/// on stderr with exit code 2, as `serve` would exit.
fn print_config(layered: &config_file::Layered, serve: ServeArgs) -> ExitCode {
    let Some(mut text) = layered.render() else {
        return ExitCode::from(2);
    };
    let (config, token_file) = serve.config();
    let token_file = token_file.as_deref();
    let mut refusals = refusals_beside_the_token(&config);
    // Not serve's refusal: what TOML cannot hold, printed as a comment.
    let unprintable = layered.not_utf8_keys();
    refusals.extend(CheckError::plugin_directory(&config.plugins_dir).map(|e| e.to_string()));
    if let Ok(threads) = blocking_threads() {
        text.push_str(&format!(
            "# blocking threads: {threads} ({BLOCKING_THREADS_ENV})\n"
        ));
    }
    let env = admin_token_env();
    let from_env = env.is_some();
    let token_refused = match admin_token(env, token_file) {
        Ok(Some(_)) if from_env => {
            text.push_str("# admin token: from env FORGESYTE_ADMIN_TOKEN (not shown)");
            if token_file.is_some() {
                text.push_str("; it wins over --admin-token-file");
            }
            text.push('\n');
            None
        }
        Ok(Some(_)) => {
            text.push_str("# admin token: from --admin-token-file (not shown)\n");
            None
        }
        Ok(None) => {
            text.push_str("# admin token: none (the admin routes are disabled)\n");
            None
        }
        Err(e) => Some(e),
    };
    let written = emit_stdout(&text, "the configuration");
    refusals.extend(token_refused.map(|e| format!("{e:#}")));
    for why in &refusals {
        say!("forgesyte: serve would refuse this configuration: {why}");
    }
    for key in &unprintable {
        say!(
            "forgesyte: config --print: {key} is not valid UTF-8, which TOML cannot hold: the \
             printout is no config file of this configuration (and no plugin loads under such \
             a path)"
        );
    }
    if refusals.is_empty() && unprintable.is_empty() && written {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// What `serve` checks before it starts, beside the admin token and the
/// plugins directory.
fn refusals_beside_the_token(config: &ServerConfig) -> Vec<String> {
    [
        config.trusted_keys().err().map(|e| e.to_string()),
        config.runner_problem(),
        blocking_threads().err().map(|e| format!("{e:#}")),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// What `serve` would refuse of the configuration that the environment and
/// `config_file` give it, for `check`, whose own options are the loader's
/// only: `check` passed `FORGESYTE_MAX_CONNECTIONS=0` or an unreadable
/// admin token file, which `serve` then refused. The plugins directory is
/// left out (`check` names its own).
fn serve_refusals_for_check(config_file: Option<&Path>) -> Vec<String> {
    let mut argv: Vec<std::ffi::OsString> = vec![
        std::env::args_os()
            .next()
            .unwrap_or_else(|| "forgesyte".into()),
        "config".into(),
        "--print".into(),
    ];
    if let Some(file) = config_file {
        argv.extend(["--config".into(), file.as_os_str().to_owned()]);
    }
    // The options `check` has are its own, checked with its own flags
    // beating their variables: their variables are not read again here
    // (`check --isolation process` with a bad FORGESYTE_ISOLATION passed).
    let command = Cli::command();
    let checks: Vec<String> = command
        .find_subcommand("check")
        .map(|check| {
            check
                .get_arguments()
                .map(|arg| arg.get_id().to_string())
                .collect()
        })
        .unwrap_or_default();
    let command = command
        .mut_arg("log_format", |arg| arg.env(None::<&str>))
        .mut_subcommand("config", |config| {
            checks.iter().fold(config, |config, id| {
                if config
                    .get_arguments()
                    .any(|arg| arg.get_id() == id.as_str())
                {
                    config.mut_arg(id, |arg| arg.env(None::<&str>))
                } else {
                    config
                }
            })
        });
    let layered = match config_file::layer(command, argv, "serve") {
        Ok(layered) => layered,
        Err(config_file::ConfigError::Usage(e)) => return vec![config_file::first_line(&e)],
        Err(e) => return vec![e.to_string()],
    };
    let serve = match Cli::from_arg_matches(&layered.matches) {
        Ok(Cli {
            command: Command::Config(args),
            ..
        }) => args.serve,
        Ok(_) => return Vec::new(),
        Err(e) => return vec![config_file::first_line(&e)],
    };
    // The loader's options (trusted keys, the runner) are `check`'s own,
    // checked already with its flags: what is left is the server's.
    // Not `serve.config()`: that applies the loader's options again, and
    // said the root warning twice.
    let token_file = serve.admin_token_file;
    let mut refusals: Vec<String> = blocking_threads()
        .err()
        .map(|e| format!("{e:#}"))
        .into_iter()
        .collect();
    if let Err(e) = admin_token(admin_token_env(), token_file.as_deref()) {
        refusals.push(format!("{e:#}"));
    }
    refusals
}

/// Writes `text` (`what`) to `out` and flushes it; `false`, said on
/// stderr, when it could not be written (a full disk, a closed stdout): a
/// script's `check --json > report.json` must not pass on an empty file.
fn emit(out: &mut dyn Write, text: &str, what: &str) -> bool {
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Ok(()) => true,
        Err(e) => {
            say!("forgesyte: cannot write {what}: {e}");
            false
        }
    }
}

/// [`emit`] to stdout. (A closed one, `cmd >&-`, is `/dev/null` by then:
/// Rust's runtime opens it on a closed standard descriptor at start, so
/// such a report is lost as one sent to `/dev/null` is.)
fn emit_stdout(text: &str, what: &str) -> bool {
    emit(&mut std::io::stdout().lock(), text, what)
}

/// Writes `answer` as JSON to `out` (the stdout kept aside before the
/// probe: what a driver or a library prints while it is opened went to
/// stderr) and ends the process at once, exit status 0 when it was
/// written: no `atexit` handler or destructor of what was opened runs, so
/// none can crash or hang the answer away.
#[allow(unsafe_code)]
fn answer_json(out: Option<std::fs::File>, answer: &impl serde::Serialize) -> ! {
    let written = match out {
        Some(mut file) => serde_json::to_writer(&mut file, answer)
            .map_err(std::io::Error::from)
            .and_then(|()| file.flush()),
        None => {
            let mut out = std::io::stdout().lock();
            serde_json::to_writer(&mut out, answer)
                .map_err(std::io::Error::from)
                .and_then(|()| out.flush())
        }
    };
    // SAFETY: `_exit` ends the process without running anything more; the
    // answer is written and flushed, and nothing else is owed.
    unsafe { libc::_exit(if written.is_ok() { 0 } else { 1 }) }
}

/// `forgesyte lock DIR`: hashes every plugin directory of DIR and writes
/// `DIR/forgesyte.lock` (JSON, through a temporary file renamed over it).
/// One line per plugin on stdout; a plugin that cannot be hashed is named
/// on stderr, keeps the pin it had (its stdout line says so) or is left out
/// of the lock file, and makes the exit code 1.
fn run_lock(dir: &Path) -> ExitCode {
    use forgesyte_loader::integrity;
    if let Some(e) = CheckError::of_dir(dir) {
        say!(
            "forgesyte lock: {}",
            forgesyte_server::controls::Escaped(&e.to_string())
        );
        return ExitCode::from(2);
    }
    let mut outcome = match integrity::lock_dir(&forgesyte_deps::RealFs, dir) {
        Ok(outcome) => outcome,
        Err(e) => {
            say!(
                "forgesyte lock: cannot list {}: {e}",
                forgesyte_server::controls::Escaped(&dir.display().to_string())
            );
            return ExitCode::from(2);
        }
    };
    // A plugin that could not be hashed keeps the pin it had: dropped, it
    // would load unpinned ("a plugin not listed loads as before").
    let earlier = integrity::read_lock(&forgesyte_deps::RealFs, dir)
        .ok()
        .flatten();
    let mut kept = Vec::new();
    for (name, _) in &outcome.skipped {
        if let Some(line) = earlier.as_ref().and_then(|l| l.plugins.get(name)) {
            outcome.lock.plugins.insert(name.clone(), line.clone());
            kept.push(name.clone());
        }
    }
    let path = dir.join(integrity::LOCK_FILE);
    let shown = |text: &str| forgesyte_server::controls::Escaped(text).to_string();
    let (shown_dir, shown_path) = (
        shown(&dir.display().to_string()),
        shown(&path.display().to_string()),
    );
    // Nothing to pin: no file (one that pins nothing beside plugins that
    // load unpinned says less than it seems to; a directory with no
    // plugin at all is likely not the one meant), and a lock file already
    // there is left as it is.
    if outcome.lock.plugins.is_empty() {
        for (name, why) in &outcome.skipped {
            say!("forgesyte lock: {} not locked: {}", shown(name), shown(why));
        }
        if outcome.skipped.is_empty() {
            say!(
                "forgesyte lock: no plugins in {shown_dir}: none of its subdirectories holds a \
                 manifest.json; {shown_path} not written"
            );
        } else {
            say!(
                "forgesyte lock: no plugin of {shown_dir} could be locked: {shown_path} not written"
            );
        }
        return ExitCode::FAILURE;
    }
    // Replaced, never written through: a link planted at the lock file's
    // name (or at a fixed temporary name) made `lock` write wherever it
    // pointed.
    let written = serde_json::to_vec_pretty(&outcome.lock)
        .map_err(std::io::Error::other)
        .and_then(|mut bytes| {
            bytes.push(b'\n');
            integrity::write_replacing(dir, integrity::LOCK_FILE, &bytes)
        });
    if let Err(e) = written {
        say!("forgesyte lock: cannot write {shown_path}: {e}");
        return ExitCode::FAILURE;
    }
    // Names escaped, as `check` prints them: a directory's name may hold a
    // terminal's control sequence, or a line break that forges a line.
    use std::fmt::Write as _;
    let mut report = String::new();
    for (name, line) in &outcome.lock.plugins {
        let of = line.of.as_deref().unwrap_or("");
        let kept = if kept.contains(name) {
            " [earlier pin, kept]"
        } else {
            ""
        };
        let _ = writeln!(
            report,
            "{}  {} ({}){kept}",
            line.sha256,
            shown(name),
            shown(of)
        );
    }
    let _ = writeln!(
        report,
        "Wrote {shown_path} ({} plugins)",
        outcome.lock.plugins.len()
    );
    let reported = emit_stdout(&report, "the report");
    for (name, why) in &outcome.skipped {
        let again = kept.contains(name);
        let (name, why) = (shown(name), shown(why));
        if again {
            say!("forgesyte lock: {name} not locked again (it keeps its earlier pin): {why}");
        } else {
            say!("forgesyte lock: {name} not locked: {why}");
        }
    }
    if !reported {
        ExitCode::from(2)
    } else if outcome.skipped.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn run_new(args: NewArgs) -> ExitCode {
    let (lang, name) = match (args.kind.python, args.kind.rust) {
        (Some(name), _) => (scaffold::Lang::Python, name),
        (None, Some(name)) => (scaffold::Lang::Rust, name),
        // clap requires exactly one.
        (None, None) => return ExitCode::from(2),
    };
    let sdk = match (lang, args.sdk) {
        (scaffold::Lang::Python, _) => scaffold::Sdk::Version(scaffold::SDK_VERSION),
        (scaffold::Lang::Rust, Some(dir)) => {
            match dir.canonicalize().ok().filter(|d| scaffold::is_sdk(d)) {
                Some(dir) => scaffold::Sdk::Path(dir),
                None => {
                    say!(
                        "forgesyte new: --sdk {}: not the forgesyte-plugin-sdk crate (no \
                         Cargo.toml there names the package forgesyte-plugin-sdk; give the \
                         directory crates/forgesyte-plugin-sdk of a forgesyte checkout)",
                        dir.display()
                    );
                    return ExitCode::from(2);
                }
            }
        }
        (scaffold::Lang::Rust, None) => scaffold::find_sdk().map_or(
            scaffold::Sdk::Version(scaffold::SDK_VERSION),
            scaffold::Sdk::Path,
        ),
    };
    let bind = match cli::parse_bind(&args.bind) {
        Ok(bind) => bind,
        Err(e) => {
            say!(
                "forgesyte new: --bind (or FORGESYTE_BIND, or the config file's bind): {e}; the \
                 curl below calls {DEFAULT_BIND}"
            );
            DEFAULT_BIND.to_owned()
        }
    };
    // Inside a plugin's own directory, the new plugin would be part of that
    // plugin's tree (its pinned `*.py` digest changed) and nothing would
    // serve it: the commands printed would be refused.
    if let Some(e) = CheckError::plugin_directory(&args.parent) {
        say!("forgesyte new: --dir: {e}");
        return ExitCode::from(2);
    }
    // A plugin is given its directory as JSON text: one under a path that
    // is not UTF-8 never loads (it was made, and its commands printed with
    // a lossy path that names another directory).
    if std::path::absolute(&args.parent)
        .unwrap_or_else(|_| args.parent.clone())
        .to_str()
        .is_none()
    {
        say!(
            "forgesyte new: --dir: {} is not valid UTF-8, and a plugin is given its directory as \
             JSON text: a plugin there could never load; choose another directory",
            args.parent.display()
        );
        return ExitCode::from(2);
    }
    match scaffold::create(
        lang,
        &name,
        &args.parent,
        &sdk,
        &bind,
        args.config.as_deref(),
    ) {
        Ok(created) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(created.message.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            say!("forgesyte new: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The environment variable bounding the threads that run blocking work:
/// slow tool calls (past the per-core lanes), rescans.
const BLOCKING_THREADS_ENV: &str = "FORGESYTE_BLOCKING_THREADS";

/// The bound on blocking threads: `FORGESYTE_BLOCKING_THREADS`, else
/// tokio's default, 512.
fn blocking_threads() -> anyhow::Result<usize> {
    // Not UTF-8: refused as any other value it cannot be (it was ignored).
    let value = std::env::var_os(BLOCKING_THREADS_ENV).map(|v| {
        v.into_string()
            .unwrap_or_else(|v| v.to_string_lossy().into_owned())
    });
    blocking_threads_from(value.as_deref())
}

/// The most blocking threads asked for that are taken (tokio adds its
/// workers to the bound, which must not overflow).
const MAX_BLOCKING_THREADS: usize = 100_000;

fn blocking_threads_from(value: Option<&str>) -> anyhow::Result<usize> {
    let Some(value) = value else {
        return Ok(512);
    };
    match value.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_BLOCKING_THREADS).contains(&n) => Ok(n),
        // A usage error, exit code 2 as every other option's.
        _ => Err(anyhow::Error::new(RefusedConfig(format!(
            "{BLOCKING_THREADS_ENV} must be a number from 1 to {MAX_BLOCKING_THREADS}, not {value:?}"
        )))),
    }
}

/// A configuration `serve` refuses to start with (exit code 2, as
/// `check`'s): a trusted key that cannot be used, a `--runner` that cannot
/// be started.
#[derive(Debug)]
struct RefusedConfig(String);

impl std::fmt::Display for RefusedConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RefusedConfig {}

fn serve(args: ServeArgs, dir_named: bool) -> anyhow::Result<()> {
    forgesyte_loader::process::set_shm_threshold(args.shm_threshold);
    forgesyte_loader::process::set_stderr_withheld(args.withhold_stderr);
    // Before any thread or child: the connection cap is half of it.
    match forgesyte_loader::process::raise_open_file_limit() {
        Ok(Some((from, to))) => tracing::info!(
            from,
            to,
            "Open-file limit raised from {from} to {to} (the hard limit); plugins get {from}"
        ),
        Ok(None) => {}
        Err(e) => tracing::warn!("cannot raise the open-file limit to the hard limit: {e}"),
    }
    let (mut config, admin_token_file) = args.config();
    config.plugins_dir_optional = config.python_entry_points && !dir_named;
    if let Some(why) = refusals_beside_the_token(&config).into_iter().next() {
        return Err(anyhow::Error::new(RefusedConfig(why)));
    }
    if let Some(e) = CheckError::plugin_directory(&config.plugins_dir) {
        return Err(anyhow::Error::new(RefusedConfig(e.to_string())));
    }
    if let Some(note) = forgesyte_server::stray_manifest(&config.plugins_dir) {
        tracing::warn!("{note}");
    }
    // An empty or unreadable token is a configuration refused, exit 2.
    config.admin_token = admin_token(admin_token_env(), admin_token_file.as_deref())
        .map_err(|e| anyhow::Error::new(RefusedConfig(format!("{e:#}"))))?;
    match &config.admin_token {
        Some(_) => tracing::info!("Admin routes enabled (bearer token)"),
        None => tracing::info!(
            "Admin routes disabled: set FORGESYTE_ADMIN_TOKEN or --admin-token-file to enable reload"
        ),
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking_threads()?)
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let server = Server::bind(config).await?;
        // The one line tests and scripts parse; stdout, flushed at once.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "forgesyte listening on http://{}",
            server.local_addr()
        );
        let _ = stdout.flush();
        drop(stdout);
        server.run(shutdown).await
    });
    // Blocking threads may still run timed-out tool calls: do not wait for them.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    // The runners have ended (`Server::run`): what the zygotes started goes.
    forgesyte_loader::process::end_zygotes();
    result.map_err(anyhow::Error::from)
}

/// The usage error of a plugins directory given the way another command
/// takes it (`serve` takes `--plugins DIR`; `check` and `lock` take
/// `DIR`), said plainly: clap's own tip suggests `-- --plugins`.
fn directory_hint(e: &clap::Error, argv: &[std::ffi::OsString]) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let Some(ContextValue::String(arg)) = e.get(ContextKind::InvalidArg) else {
        return None;
    };
    let command = argv
        .iter()
        .skip(1)
        .filter_map(|a| a.to_str())
        .find(|a| !a.starts_with('-'))?;
    match command {
        "check" | "lock" if arg == "--plugins" || arg.starts_with("--plugins=") => Some(format!(
            "`{command}` takes the plugins directory without --plugins: forgesyte {command} DIR"
        )),
        // `--watch off`: an on/off switch takes its value after `=` only.
        "serve" if !arg.starts_with('-') => Some(match switch_before(arg, argv) {
            Some(switch) => format!(
                "--{switch} takes its value after '=', not a space: --{switch}={arg} \
                 ('{arg}' alone is no argument of `serve`)"
            ),
            None => format!(
                "`serve` takes the plugins directory as --plugins DIR (not '{arg}' alone): \
                 forgesyte serve --plugins {arg}"
            ),
        }),
        _ => None,
    }
}

/// The long name of the on/off switch of `serve` (`--watch`, a value only
/// after `=`) written just before `arg` in `argv`, when `arg` is such a
/// value (`off`, not `./plugins`).
fn switch_before(arg: &str, argv: &[std::ffi::OsString]) -> Option<String> {
    cli::parse_switch(arg).ok()?;
    let command = Cli::command();
    let serve = command.find_subcommand("serve")?;
    argv.windows(2).find_map(|pair| {
        let flag = pair[0].to_str()?.strip_prefix("--")?;
        (pair[1].to_str() == Some(arg)
            && serve
                .get_arguments()
                .any(|a| a.get_long() == Some(flag) && a.is_require_equals_set()))
        .then(|| flag.to_owned())
    })
}

/// `forgesyte check`: what `forgesyte_server::check` does, keeping the
/// loader to ask it whether the installed Python plugins could be listed.
/// When they could not (`--python-entry-points` and no interpreter, or one
/// that fails or hangs), the reason ends the summary line (stderr with
/// `--json`) and the exit code is 1: there may be plugins it did not see.
fn run_check(args: CheckArgs, dir_named: bool, preflight_given: bool) -> ExitCode {
    let json = args.json;
    let mut config = ServerConfig::default();
    args.loader.apply(&mut config);
    // A check is never taken down by a plugin: unless told otherwise by a
    // flag or a variable (`--preflight=off` loads them into this process,
    // as `serve` does by default), every in-process plugin is constructed in a throw-away
    // runner first, and one whose constructor crashes is FAILED in the
    // report (the check itself died with it, no report at all).
    if !preflight_given {
        config.preflight = true;
    }
    if let Some(e) = config
        .trusted_keys()
        .err()
        .or_else(|| config.runner_problem())
    {
        say!(
            "forgesyte check: {}",
            forgesyte_server::controls::Escaped(&e.to_string())
        );
        return ExitCode::from(2);
    }
    let refusals = serve_refusals_for_check(args.config.as_deref());
    for why in &refusals {
        say!("forgesyte check: serve would refuse this configuration: {why}");
    }
    if !refusals.is_empty() {
        return ExitCode::from(2);
    }
    // Installed plugins alone need no plugins directory: the default one
    // may be missing then, as for `serve`. One named is checked (even when
    // named as `./plugins`).
    let entry_points_only = config.python_entry_points && !dir_named && !args.dir.exists();
    if let Some(e) = CheckError::of_dir(&args.dir).filter(|_| !entry_points_only) {
        say!(
            "forgesyte check: {}",
            forgesyte_server::controls::Escaped(&e.to_string())
        );
        return ExitCode::from(2);
    }
    if let Some(note) = forgesyte_server::stray_manifest(&args.dir) {
        say!("forgesyte check: {note}");
    }
    // The report is this command's stdout, nothing else: what a plugin
    // prints while it loads in this process (a constructor's `printf`)
    // goes to stderr (it made `check --json` unreadable).
    let mut report_out = keep_stdout_for_report();
    let loader = build_loader_from(&config);
    let report = CheckReport::from_loader(&loader, &args.dir);
    let not_discovered = loader
        .entry_points_error()
        .map(|reason| format!("entry points (forgesyte.plugins) not discovered: {reason}"));
    // Its runners end with it (as at this process's exit), and what the
    // zygotes started goes too.
    drop(loader);
    forgesyte_loader::process::end_zygotes();
    let text = if json {
        if let Some(line) = &not_discovered {
            say!("forgesyte check: {line}");
        }
        // The array is `GET /v1/plugins`'s: the notes go beside it.
        for (name, notes) in &report.notes {
            for note in notes {
                say!(
                    "forgesyte check: plugin {}: its manifest's {}",
                    forgesyte_server::controls::Escaped(name),
                    forgesyte_server::controls::Escaped(note)
                );
            }
        }
        report.to_json() + "\n"
    } else {
        let text = report.to_text();
        match &not_discovered {
            Some(line) => format!("{}; {line}\n", text.trim_end_matches('\n')),
            None => text,
        }
    };
    let written = match report_out.as_mut() {
        Some(out) => emit(out, &text, "the report"),
        None => emit_stdout(&text, "the report"),
    };
    if !written {
        return ExitCode::from(2);
    }
    if report.plugins.is_empty() && !entry_points_only {
        say!(
            "forgesyte check: no plugins in {}: none of its subdirectories holds a manifest.json",
            args.dir.display()
        );
    } else if report.plugins.is_empty() && not_discovered.is_none() {
        say!(
            "forgesyte check: no plugins: no installed package declares a forgesyte.plugins \
             entry point, and there is no plugins directory {}",
            args.dir.display()
        );
    }
    if not_discovered.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::from(report.exit_code())
    }
}

/// The process's stdout, kept for the report, with fd 1 made a copy of
/// stderr for everything else; `None` (stdout left as it is) when the
/// descriptors cannot be copied.
fn keep_stdout_for_report() -> Option<std::fs::File> {
    use std::os::fd::AsFd as _;
    let kept = rustix::io::fcntl_dupfd_cloexec(std::io::stdout().as_fd(), 3).ok()?;
    rustix::stdio::dup2_stdout(std::io::stderr().as_fd()).ok()?;
    Some(std::fs::File::from(kept))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocking_threads_are_bounded() {
        assert_eq!(blocking_threads_from(None).unwrap(), 512);
        assert_eq!(blocking_threads_from(Some(" 8 ")).unwrap(), 8);
        assert_eq!(
            blocking_threads_from(Some("100000")).unwrap(),
            MAX_BLOCKING_THREADS
        );
        for bad in ["0", "-1", "x", "100001", "18446744073709551615"] {
            let why = blocking_threads_from(Some(bad)).unwrap_err();
            // Refused as a configuration: exit code 2.
            assert!(why.is::<RefusedConfig>(), "{why}");
            assert!(why.to_string().contains("from 1 to 100000"), "{why}");
        }
    }
}
