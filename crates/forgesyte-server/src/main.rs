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

use std::fmt;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use forgesyte_loader::Isolation;
use forgesyte_loader::sandbox::RunAs;
use forgesyte_server::{
    AdminToken, CheckError, CheckReport, DEFAULT_BIND, DEFAULT_BODY_LIMIT,
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_CALL_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_ISOLATION, DEFAULT_MAX_CALLS_PER_PLUGIN, DEFAULT_MAX_CONNECTIONS,
    DEFAULT_PLUGINS_DIR, DEFAULT_SHUTDOWN_GRACE, DEFAULT_STREAM_IDLE_TIMEOUT, Server, ServerConfig,
    build_loader_from, shutdown_signal,
};
use tracing_subscriber::EnvFilter;

mod config_file;
mod scaffold;

/// How long the runtime waits, after the server stopped, for tool calls
/// still running on blocking threads (a timed-out in-process call may never end).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(name = "forgesyte", version, about = "ForgeSyte plugin host")]
struct Cli {
    /// How log lines are written to stderr: `text` for people, `json` (one
    /// object per line, with the request's id and the span fields) for log
    /// shippers.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "FORGESYTE_LOG_FORMAT",
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the plugins and serve the HTTP API (loading continues in the
    /// background while the server already answers).
    Serve(ServeArgs),
    /// Load the plugins without serving and report each one's state; exit 0
    /// only when every plugin is available.
    Check(CheckArgs),
    /// Create a working plugin to start from (`--python NAME` or `--rust
    /// NAME`) in PARENT/NAME, and print the commands that build, check and
    /// serve it.
    New(NewArgs),
    /// Write DIR/forgesyte.lock: the SHA-256 of every plugin's code (a
    /// native plugin's library, a Python plugin's *.py tree). A load of
    /// DIR then refuses (FAILED, IntegrityError) a listed plugin whose
    /// code no longer matches.
    Lock(LockArgs),
    /// Show the configuration `serve` would run with: one `key = value`
    /// line per option (TOML, the config file's format), each with a
    /// comment naming where it came from (flag, env NAME, file PATH,
    /// default).
    Config(ConfigArgs),
    /// Generate a minisign key pair for signing plugins: OUT/NAME.key
    /// (mode 0600; encrypted with FORGESYTE_KEY_PASSWORD, or
    /// `--unencrypted`) and OUT/NAME.pub (for the server's trusted keys).
    Keygen(KeygenArgs),
    /// Sign a plugin directory: write DIR/forgesyte.sig.list (the SHA-256
    /// of every file the plugin loads) and its signature
    /// DIR/forgesyte.sig.list.minisig.
    Sign(SignArgs),
}

#[derive(Debug, Args)]
struct ConfigArgs {
    /// Print the effective configuration of `serve` given these options,
    /// the environment and the config file.
    #[arg(long, required = true)]
    print: bool,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Debug, Args)]
struct KeygenArgs {
    /// Directory the key files are written to (created if missing).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// File name of the keys: NAME.key and NAME.pub.
    #[arg(long, value_name = "NAME", default_value = "forgesyte")]
    name: String,
    /// Store the secret key without a password (for automation; keep
    /// the file private).
    #[arg(long)]
    unencrypted: bool,
}

#[derive(Debug, Args)]
struct SignArgs {
    /// The plugin directory (holding manifest.json).
    #[arg(value_name = "DIR")]
    dir: PathBuf,
    /// The secret key (from `forgesyte keygen`; an encrypted one needs
    /// FORGESYTE_KEY_PASSWORD).
    #[arg(long, value_name = "KEY")]
    key: PathBuf,
}

#[derive(Debug, Args)]
struct LockArgs {
    /// Directory holding one subdirectory per plugin.
    #[arg(value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    dir: PathBuf,
}

#[derive(Debug, Args)]
struct NewArgs {
    #[command(flatten)]
    kind: NewKind,
    /// The plugins directory the plugin's own directory is created in.
    #[arg(long = "dir", value_name = "PARENT", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    parent: PathBuf,
    /// The `forgesyte-plugin-sdk` crate a Rust plugin depends on, by path
    /// (default: the one of the workspace this forgesyte was built in).
    #[arg(long, value_name = "DIR", conflicts_with = "python")]
    sdk: Option<PathBuf>,
}

/// The language of `forgesyte new`: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
struct NewKind {
    /// A Python plugin: manifest.json and plugin.py (`class Plugin` with a
    /// `tools` dict and `run_tool`, one tool `hello`).
    #[arg(long, value_name = "NAME", value_parser = scaffold::python_name)]
    python: Option<String>,
    /// A Rust plugin: a Cargo project building a cdylib with
    /// forgesyte-plugin-sdk (one tool `hello`), and its manifest.json.
    #[arg(long, value_name = "NAME", value_parser = scaffold::rust_name)]
    rust: Option<String>,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// A TOML file of options, keyed by their long names (`bind =
    /// "0.0.0.0:8000"`, `max-connections = 10000`); a flag or an
    /// environment variable beats the file, the file beats the default.
    #[arg(long, value_name = "FILE", env = "FORGESYTE_CONFIG")]
    config: Option<PathBuf>,
    /// Directory holding one subdirectory per plugin.
    #[arg(long, value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    plugins: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "FORGESYTE_BIND", default_value = DEFAULT_BIND)]
    bind: String,
    #[command(flatten)]
    loader: LoaderArgs,
    /// Time limit of one tool call, in seconds, when the plugin's manifest sets none.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_CALL_TIMEOUT", default_value_t = Seconds(DEFAULT_CALL_TIMEOUT), value_parser = parse_seconds_arg)]
    call_timeout: Seconds,
    /// Largest accepted request body, in bytes.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT, value_parser = parse_bytes)]
    body_limit: usize,
    /// Memory the request bodies of tool calls in progress may hold in all,
    /// in bytes (default: eight bodies at the limit, at least 256 MiB);
    /// beyond it a call answers 503 `ServerBusy`.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_MEMORY", value_parser = parse_bytes)]
    body_memory: Option<usize>,
    /// Attachments of at least this many bytes travel to and from plugin
    /// runners through shared memory (sealed memfds) instead of the pipe; 0
    /// keeps them all in the pipe.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_SHM_THRESHOLD", default_value_t = forgesyte_loader::process::shm_threshold())]
    shm_threshold: u64,
    /// How long shutdown waits for in-flight requests, in seconds.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_SHUTDOWN_GRACE", default_value_t = Seconds(DEFAULT_SHUTDOWN_GRACE), value_parser = parse_seconds_arg)]
    shutdown_grace: Seconds,
    /// Time a client has to send a request's complete headers, in seconds
    /// (from the connection's opening, or a later request's first byte).
    #[arg(long, value_name = "SECS", env = "FORGESYTE_HEADER_READ_TIMEOUT", default_value_t = Seconds(DEFAULT_HEADER_READ_TIMEOUT), value_parser = parse_seconds_arg)]
    header_read_timeout: Seconds,
    /// Longest wait for the next piece of a request's body, in seconds (a
    /// client that stops sending mid-body is answered 408).
    #[arg(long, value_name = "SECS", env = "FORGESYTE_BODY_READ_TIMEOUT", default_value_t = Seconds(DEFAULT_BODY_READ_TIMEOUT), value_parser = parse_seconds_arg)]
    body_read_timeout: Seconds,
    /// A WebSocket stream with no message from its client and no answer to
    /// it for this long is closed (code 1000), in seconds; 0: never.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_STREAM_IDLE_TIMEOUT", default_value_t = Seconds(DEFAULT_STREAM_IDLE_TIMEOUT), value_parser = parse_seconds_or_never)]
    stream_idle_timeout: Seconds,
    /// Time an idle keep-alive connection stays open after a response, in seconds.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_IDLE_TIMEOUT", default_value_t = Seconds(DEFAULT_IDLE_TIMEOUT), value_parser = parse_seconds_arg)]
    idle_timeout: Seconds,
    /// Connections served at once (at most half the soft file-descriptor
    /// limit is applied); beyond it a few more get the probes only, then
    /// new connections are closed at once.
    #[arg(long, value_name = "N", env = "FORGESYTE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = parse_count)]
    max_connections: usize,
    /// Tool calls of one plugin in progress (waiting or running) at most;
    /// beyond it a call answers 503 with `Retry-After`.
    #[arg(long, value_name = "N", env = "FORGESYTE_MAX_CALLS_PER_PLUGIN", default_value_t = DEFAULT_MAX_CALLS_PER_PLUGIN, value_parser = parse_count)]
    max_calls_per_plugin: usize,
    /// File holding the bearer token of the admin routes (`POST
    /// /v1/plugins/reload`, ...). Without it (or `FORGESYTE_ADMIN_TOKEN`)
    /// those routes are disabled.
    #[arg(long, value_name = "PATH", env = "FORGESYTE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Rescan the plugins directory when files under it change (debounced),
    /// as SIGHUP does: for plugin development.
    #[arg(long, env = "FORGESYTE_WATCH", value_parser = clap::builder::BoolishValueParser::new())]
    watch: bool,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Directory holding one subdirectory per plugin.
    #[arg(value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    dir: PathBuf,
    /// Print the JSON array `GET /v1/plugins` would answer instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    loader: LoaderArgs,
}

/// How plugins are loaded: the same for `serve` and `check`.
#[derive(Debug, Args)]
struct LoaderArgs {
    /// Extra directories searched for plugin libraries and `lib:`
    /// dependencies (colon-separated, or repeat the option).
    #[arg(
        long = "lib-path",
        value_name = "DIRS",
        env = "FORGESYTE_LIB_PATH",
        value_delimiter = ':'
    )]
    lib_paths: Vec<PathBuf>,
    /// Construct every in-process plugin once in a throw-away runner
    /// process before loading it, so a plugin that would crash the server
    /// on load is FAILED instead.
    #[arg(long, env = "FORGESYTE_PREFLIGHT", value_parser = clap::builder::BoolishValueParser::new())]
    preflight: bool,
    /// Where plugins whose manifest names no `isolation` run: in the server
    /// process (fastest) or each in a child process (survives crashes).
    #[arg(long, value_name = "MODE", env = "FORGESYTE_ISOLATION", default_value_t = IsolationArg(DEFAULT_ISOLATION), value_parser = parse_isolation)]
    isolation: IsolationArg,
    /// A dedicated runner executable for isolated plugins and preflight,
    /// such as `forgesyte-runner` (default: this `forgesyte` executable,
    /// which doubles as the runner).
    #[arg(long, value_name = "PATH", env = "FORGESYTE_RUNNER")]
    runner: Option<PathBuf>,
    /// The Python interpreter of Python plugins whose manifest names none
    /// (default: `python3` on `PATH`).
    #[arg(long, value_name = "PATH", env = "FORGESYTE_PYTHON")]
    python: Option<PathBuf>,
    /// Also load the installed Python plugins: every entry point of group
    /// `forgesyte.plugins` that the interpreter (`--python`, else `python3`
    /// on `PATH`) sees, after the plugins directory.
    #[arg(long, env = "FORGESYTE_PYTHON_ENTRY_POINTS", value_parser = clap::builder::BoolishValueParser::new())]
    python_entry_points: bool,
    /// Directory of trusted minisign public keys (`*.pub`) that plugin
    /// signatures are checked against.
    #[arg(long, value_name = "DIR", env = "FORGESYTE_TRUSTED_KEYS")]
    trusted_keys: Option<PathBuf>,
    /// Refuse (FAILED) every plugin whose signature is not `signed` by a
    /// trusted key, before any of its code is opened; by default
    /// signatures are only reported.
    #[arg(long, env = "FORGESYTE_REQUIRE_SIGNED", value_parser = clap::builder::BoolishValueParser::new())]
    require_signed: bool,
    /// Confine the runners of isolated and Python plugins: read-only access
    /// to what they need (Landlock), writes to their scratch directory only,
    /// no network unless the manifest says `"network": true`, and only the
    /// environment variables they declare (`on` or `off`).
    #[arg(long, value_name = "on|off", env = "FORGESYTE_CONFINE", default_value = "on", action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    confine: bool,
    /// Whose manifests may widen their confined runner's sandbox (`network`,
    /// `env`, `filesystem`): `signed` (plugins signed by a trusted key, the
    /// default), `allow` (every plugin) or `deny` (none). A plugin whose
    /// manifest asks for more than it is granted is FAILED, naming what.
    #[arg(
        long,
        value_name = "signed|allow|deny",
        env = "FORGESYTE_SANDBOX_WIDENING",
        default_value = "signed"
    )]
    sandbox_widening: forgesyte_loader::sandbox::SandboxWidening,
    /// The unprivileged user (a name or a numeric uid) that isolated and
    /// Python runners run as when the server runs as root; ignored, with a
    /// warning, when it does not.
    #[arg(long, value_name = "USER", env = "FORGESYTE_RUNNER_USER", value_parser = parse_runner_user)]
    runner_user: Option<RunAs>,
}

/// A `--runner-user`: a user name, or a numeric uid, that exists.
fn parse_runner_user(text: &str) -> Result<RunAs, String> {
    use nix::unistd::{Uid, User};
    let found = match text.parse::<u32>() {
        Ok(uid) => User::from_uid(Uid::from_raw(uid)),
        Err(_) => User::from_name(text),
    };
    match found {
        Ok(Some(user)) if user.uid.is_root() => {
            Err(format!("{text} is root, not an unprivileged user"))
        }
        Ok(Some(user)) => Ok(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }),
        Ok(None) => Err(format!("no user {text}")),
        Err(e) => Err(format!("cannot look up user {text}: {e}")),
    }
}

impl LoaderArgs {
    /// Puts the loader settings into `config`.
    fn apply(self, config: &mut ServerConfig) {
        config.lib_paths = self
            .lib_paths
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        config.preflight = self.preflight;
        config.default_isolation = self.isolation.0;
        config.python = self.python.filter(|p| !p.as_os_str().is_empty());
        config.python_entry_points = self.python_entry_points;
        config.confine = self.confine;
        config.sandbox_widening = self.sandbox_widening;
        config.runner_user = match self.runner_user {
            Some(user) if !rustix::process::geteuid().is_root() => {
                tracing::warn!(
                    uid = user.uid,
                    "--runner-user is ignored: only a server running as root can run its runners as another user"
                );
                None
            }
            user => user,
        };
        if config.runner_user.is_none() && rustix::process::geteuid().is_root() {
            tracing::warn!(
                "the server runs as root, and so do its plugin runners: set --runner-user to an unprivileged user"
            );
        }
        config.trusted_keys_dir = self.trusted_keys.filter(|p| !p.as_os_str().is_empty());
        config.require_signed = self.require_signed;
        match self.runner.filter(|p| !p.as_os_str().is_empty()) {
            Some(runner) => {
                config.runner = Some(runner);
                config.runner_args = Vec::new();
            }
            // By default the runner is this very executable, behind its
            // hidden subcommand: always present, and always speaking the
            // host's protocol version.
            None => {
                config.runner = std::env::current_exe().ok();
                config.runner_args = vec![RUNNER_SUBCOMMAND.into()];
            }
        }
    }
}

/// A duration given in seconds on the command line; shown in seconds in
/// `--help` (the defaults are the [`ServerConfig`] constants).
#[derive(Debug, Clone, Copy, PartialEq)]
struct Seconds(Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

/// An isolation mode on the command line (`in-process`, `process`).
#[derive(Debug, Clone, Copy, PartialEq)]
struct IsolationArg(Isolation);

impl fmt::Display for IsolationArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The loader's own names (its serde form), whatever modes it adds.
        match serde_json::to_value(self.0) {
            Ok(serde_json::Value::String(name)) => f.write_str(&name),
            _ => write!(f, "{:?}", self.0),
        }
    }
}

fn parse_isolation(text: &str) -> Result<IsolationArg, String> {
    match text.trim() {
        "in-process" => Ok(IsolationArg(Isolation::InProcess)),
        "process" => Ok(IsolationArg(Isolation::Process)),
        other => Err(format!(
            "'{other}' is not an isolation mode (in-process, process)"
        )),
    }
}

/// The admin token: `FORGESYTE_ADMIN_TOKEN`, else the content of
/// `token_file`; `None` (routes disabled) when neither is set. A variable
/// or file that is set but empty is an error: it would silently disable
/// the routes the operator meant to enable.
fn admin_token(
    env_value: Option<std::ffi::OsString>,
    token_file: Option<&Path>,
) -> anyhow::Result<Option<AdminToken>> {
    let (text, source) = match (env_value, token_file) {
        (Some(value), _) => {
            let text = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("FORGESYTE_ADMIN_TOKEN is not valid UTF-8"))?;
            (text, "FORGESYTE_ADMIN_TOKEN".to_owned())
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the admin token file {}", path.display()))?;
            (text, path.display().to_string())
        }
        (None, None) => return Ok(None),
    };
    let token = AdminToken::new(&text)
        .with_context(|| format!("the admin token from {source} is empty"))?;
    if token.is_short() {
        tracing::warn!(
            "The admin token from {source} is shorter than 16 characters; use a long random one"
        );
    }
    Ok(Some(token))
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{text}' must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{text}': {e}"))
}

fn parse_seconds_arg(text: &str) -> Result<Seconds, String> {
    parse_seconds(text).map(Seconds)
}

/// Seconds, or `0` for "never" (`Duration::ZERO`).
fn parse_seconds_or_never(text: &str) -> Result<Seconds, String> {
    if text.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Seconds(Duration::ZERO));
    }
    parse_seconds_arg(text)
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("the body limit must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a number of bytes")),
    }
}

fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a positive whole number")),
    }
}

fn init_logging(default: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_current_span(true).init(),
    }
}

/// The hidden subcommand under which `forgesyte` is the plugin runner.
const RUNNER_SUBCOMMAND: &str = "__runner";

/// `FORGESYTE_ADMIN_TOKEN` as the process started: taken out of its
/// environment before anything else runs (see [`take_admin_token_env`]).
static ADMIN_TOKEN_ENV: std::sync::OnceLock<Option<std::ffi::OsString>> =
    std::sync::OnceLock::new();

/// Takes `FORGESYTE_ADMIN_TOKEN` out of this process's environment, so no
/// child inherits it: not a plugin runner, not the Python zygote whose
/// runners clear `os.environ` but keep the block they were started with
/// (`/proc/self/environ`), not a dependency probe. Call first in `main`.
#[allow(unsafe_code)]
fn take_admin_token_env() {
    let token = std::env::var_os("FORGESYTE_ADMIN_TOKEN");
    if token.is_some() {
        // `remove_var` leaves the bytes in the block the process started
        // with, which `/proc/PID/environ` shows to processes of this user.
        if let Err(e) = wipe_initial_env("FORGESYTE_ADMIN_TOKEN") {
            eprintln!(
                "forgesyte: cannot wipe the admin token from the process's environment block: {e}"
            );
        }
        // SAFETY: the first thing `main` does: no other thread exists yet
        // that could read the environment while it changes.
        unsafe { std::env::remove_var("FORGESYTE_ADMIN_TOKEN") };
    }
    let _ = ADMIN_TOKEN_ENV.set(token);
}

/// Overwrites with zeros the value of `name` in the environment block the
/// process was started with (`env_start`..`env_end` of `/proc/self/stat`).
#[allow(unsafe_code)]
fn wipe_initial_env(name: &str) -> std::io::Result<()> {
    // Bytes: the command's name (field 2) need not be UTF-8.
    let stat = std::fs::read("/proc/self/stat")?;
    // Fields after the command's closing parenthesis start at field 3;
    // `env_start` and `env_end` are fields 50 and 51.
    let rest = stat
        .iter()
        .rposition(|&b| b == b')')
        .map_or(&[][..], |at| &stat[at + 1..]);
    let fields: Vec<&str> = std::str::from_utf8(rest)
        .map(|text| text.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> std::io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no field {n} in /proc/self/stat")))
    };
    let (start, end) = (field(50)?, field(51)?);
    if end <= start {
        return Ok(());
    }
    // SAFETY: `env_start..env_end` is this process's own environment block,
    // on its initial stack: mapped, readable and writable for the process's
    // life. Only `main`'s first step runs (no other thread), and nothing
    // holds a reference into it (`getenv` pointers read zeros afterwards).
    let block = unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::with_exposed_provenance_mut::<u8>(start),
            end - start,
        )
    };
    let prefix = format!("{name}=");
    let mut at = 0;
    while at < block.len() {
        let stop = block[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(block.len(), |p| at + p);
        if block[at..stop].starts_with(prefix.as_bytes()) {
            block[at + prefix.len()..stop].fill(0);
        }
        at = stop + 1;
    }
    Ok(())
}

/// The admin token's variable as the process started with it.
fn admin_token_env() -> Option<std::ffi::OsString> {
    ADMIN_TOKEN_ENV.get().cloned().flatten()
}

fn main() -> ExitCode {
    take_admin_token_env();
    // `forgesyte` doubles as the plugin runner of process isolation and
    // preflight: the loader starts it as `forgesyte __runner --library PATH
    // …`. This comes first: the runner must own stdout before anything can
    // print.
    let mut args = std::env::args_os().skip(1).peekable();
    if args.next_if(|a| a == RUNNER_SUBCOMMAND).is_some() {
        return forgesyte_loader::process::runner_main(args);
    }
    let layered = match config_file::layer(Cli::command(), std::env::args_os().collect(), "serve") {
        Ok(layered) => layered,
        Err(config_file::ConfigError::Usage(e)) => e.exit(),
        Err(e) => {
            eprintln!("forgesyte: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = match Cli::from_arg_matches(&layered.matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cli.command {
        Command::Serve(args) => {
            init_logging("info", cli.log_format);
            match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("forgesyte: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => {
            init_logging("off", cli.log_format);
            run_check(args)
        }
        Command::New(args) => run_new(args),
        Command::Lock(args) => run_lock(&args.dir),
        Command::Config(_) => print_config(&layered),
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
/// whether the admin token is set (never the token itself).
fn print_config(layered: &config_file::Layered) -> ExitCode {
    let Some(mut text) = layered.render() else {
        return ExitCode::from(2);
    };
    if admin_token_env().is_some() {
        text.push_str("# admin token: from env FORGESYTE_ADMIN_TOKEN (not shown)\n");
    }
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    ExitCode::SUCCESS
}

/// `forgesyte lock DIR`: hashes every plugin directory of DIR and writes
/// `DIR/forgesyte.lock` (JSON, through a temporary file renamed over it).
/// One line per plugin on stdout; a plugin that cannot be hashed is named
/// on stderr, left out of the lock file, and makes the exit code 1.
fn run_lock(dir: &Path) -> ExitCode {
    use forgesyte_loader::integrity;
    if !dir.is_dir() {
        eprintln!(
            "forgesyte lock: {}",
            CheckError::NotADirectory {
                path: dir.to_path_buf()
            }
        );
        return ExitCode::from(2);
    }
    let outcome = match integrity::lock_dir(&forgesyte_deps::RealFs, dir) {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("forgesyte lock: cannot list {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    let path = dir.join(integrity::LOCK_FILE);
    let written = serde_json::to_vec_pretty(&outcome.lock)
        .map_err(std::io::Error::other)
        .and_then(|mut bytes| {
            bytes.push(b'\n');
            let tmp = dir.join(format!(".{}.tmp", integrity::LOCK_FILE));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &path)
        });
    if let Err(e) = written {
        eprintln!("forgesyte lock: cannot write {}: {e}", path.display());
        return ExitCode::FAILURE;
    }
    let mut stdout = std::io::stdout().lock();
    for (name, line) in &outcome.lock.plugins {
        let of = line.of.as_deref().unwrap_or("");
        let _ = writeln!(stdout, "{}  {name} ({of})", line.sha256);
    }
    let _ = writeln!(
        stdout,
        "Wrote {} ({} plugins)",
        path.display(),
        outcome.lock.plugins.len()
    );
    let _ = stdout.flush();
    for (name, why) in &outcome.skipped {
        eprintln!("forgesyte lock: {name} not locked: {why}");
    }
    if outcome.skipped.is_empty() {
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
                    eprintln!(
                        "forgesyte new: --sdk {}: not the forgesyte-plugin-sdk crate (its \
                         Cargo.toml was not found there)",
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
    match scaffold::create(lang, &name, &args.parent, &sdk) {
        Ok(created) => {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(created.message.as_bytes());
            let _ = stdout.flush();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("forgesyte new: {e}");
            ExitCode::FAILURE
        }
    }
}

impl ServeArgs {
    /// The server settings these options give, all but the admin token
    /// (which needs the environment and a file; see [`admin_token`]).
    fn config(self) -> (ServerConfig, Option<PathBuf>) {
        let mut config = ServerConfig::default();
        config.plugins_dir = self.plugins;
        config.bind = self.bind;
        self.loader.apply(&mut config);
        config.call_timeout = self.call_timeout.0;
        config.body_limit = self.body_limit;
        config.body_memory = self.body_memory;
        config.shutdown_grace = self.shutdown_grace.0;
        config.header_read_timeout = self.header_read_timeout.0;
        config.idle_timeout = self.idle_timeout.0;
        config.body_read_timeout = self.body_read_timeout.0;
        config.stream_idle_timeout = self.stream_idle_timeout.0;
        config.max_connections = self.max_connections;
        config.max_calls_per_plugin = self.max_calls_per_plugin;
        config.watch = self.watch;
        (config, self.admin_token_file)
    }
}

/// The environment variable bounding the threads that run blocking work:
/// slow tool calls (past the per-core lanes), rescans.
const BLOCKING_THREADS_ENV: &str = "FORGESYTE_BLOCKING_THREADS";

/// The bound on blocking threads: `FORGESYTE_BLOCKING_THREADS`, else
/// tokio's default, 512.
fn blocking_threads() -> anyhow::Result<usize> {
    match std::env::var(BLOCKING_THREADS_ENV) {
        Err(_) => Ok(512),
        Ok(value) => match value.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => anyhow::bail!("{BLOCKING_THREADS_ENV} must be a positive number, not {value:?}"),
        },
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    forgesyte_loader::process::set_shm_threshold(args.shm_threshold);
    let (mut config, admin_token_file) = args.config();
    config.trusted_keys().map_err(anyhow::Error::msg)?;
    config.admin_token = admin_token(admin_token_env(), admin_token_file.as_deref())?;
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
    result.map_err(anyhow::Error::from)
}

/// `forgesyte check`: what `forgesyte_server::check` does, keeping the
/// loader to ask it whether the installed Python plugins could be listed.
/// When they could not (`--python-entry-points` and no interpreter, or one
/// that fails or hangs), the reason ends the summary line (stderr with
/// `--json`) and the exit code is 1: there may be plugins it did not see.
fn run_check(args: CheckArgs) -> ExitCode {
    let json = args.json;
    let mut config = ServerConfig::default();
    args.loader.apply(&mut config);
    if let Err(e) = config.trusted_keys() {
        eprintln!("forgesyte check: {e}");
        return ExitCode::from(2);
    }
    // Installed plugins alone need no plugins directory: the default one
    // may be missing then, as for `serve`. One named is checked.
    let entry_points_only = config.python_entry_points
        && args.dir == Path::new(DEFAULT_PLUGINS_DIR)
        && !args.dir.exists();
    if !args.dir.is_dir() && !entry_points_only {
        eprintln!(
            "forgesyte check: {}",
            CheckError::NotADirectory { path: args.dir }
        );
        return ExitCode::from(2);
    }
    let loader = build_loader_from(&config);
    let report = CheckReport::from_loader(&loader, &args.dir);
    let not_discovered = loader
        .entry_points_error()
        .map(|reason| format!("entry points (forgesyte.plugins) not discovered: {reason}"));
    let text = if json {
        if let Some(line) = &not_discovered {
            eprintln!("forgesyte check: {line}");
        }
        report.to_json() + "\n"
    } else {
        let text = report.to_text();
        match &not_discovered {
            Some(line) => format!("{}; {line}\n", text.trim_end_matches('\n')),
            None => text,
        }
    };
    let mut stdout = std::io::stdout().lock();
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    if not_discovered.is_some() {
        ExitCode::FAILURE
    } else {
        ExitCode::from(report.exit_code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// `serve` and `check` with no options give exactly the
    /// [`ServerConfig`] defaults (but the runner, which is this executable).
    /// Set `FORGESYTE_*` variables change what is parsed, so this test
    /// expects none to be set.
    #[test]
    fn an_empty_command_line_gives_the_config_defaults() {
        let mut expected = ServerConfig::default();
        expected.runner = std::env::current_exe().ok();
        expected.runner_args = vec![RUNNER_SUBCOMMAND.into()];

        let cli = Cli::try_parse_from(["forgesyte", "serve"]).unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        let (config, admin_token_file) = args.config();
        assert_eq!(config, expected);
        assert_eq!(admin_token_file, None);

        let cli = Cli::try_parse_from(["forgesyte", "check"]).unwrap();
        let Command::Check(args) = cli.command else {
            panic!("expected check");
        };
        assert_eq!(args.dir, PathBuf::from(DEFAULT_PLUGINS_DIR));
        assert!(!args.json);
        let mut config = ServerConfig::default();
        args.loader.apply(&mut config);
        assert_eq!(config, expected);
    }

    #[test]
    fn defaults_are_shown_in_the_units_they_are_given_in() {
        assert_eq!(Seconds(Duration::from_secs(60)).to_string(), "60");
        assert_eq!(Seconds(Duration::from_millis(500)).to_string(), "0.5");
        for isolation in [Isolation::InProcess, Isolation::Process] {
            let shown = IsolationArg(isolation).to_string();
            assert_eq!(parse_isolation(&shown), Ok(IsolationArg(isolation)));
        }
        use clap::CommandFactory;
        let mut command = Cli::command();
        let help = command
            .find_subcommand_mut("serve")
            .unwrap()
            .render_long_help()
            .to_string();
        assert!(help.contains("[default: 60]"), "{help}");
        assert!(help.contains("[default: 33554432]"), "{help}");
        assert!(help.contains("[default: in-process]"), "{help}");
    }

    #[test]
    fn seconds_and_bytes_are_validated() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("60"), Ok(Duration::from_secs(60)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_seconds_or_never("0"), Ok(Seconds(Duration::ZERO)));
        assert_eq!(
            parse_seconds_or_never("1.5"),
            Ok(Seconds(Duration::from_millis(1500)))
        );
        assert!(parse_seconds_or_never("-1").is_err());
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1MiB").is_err());
        assert_eq!(parse_count("50"), Ok(50));
        assert!(parse_count("0").is_err());
        assert!(parse_count("-3").is_err());
    }

    #[test]
    fn lib_path_takes_colon_lists_and_repeats() {
        let cli = Cli::try_parse_from([
            "forgesyte",
            "check",
            "dir",
            "--lib-path",
            "/a:/b",
            "--lib-path",
            "/c",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("expected check");
        };
        let mut config = ServerConfig::default();
        args.loader.apply(&mut config);
        assert_eq!(
            config.lib_paths,
            [
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                PathBuf::from("/c")
            ]
        );
    }

    #[test]
    fn loader_options_reach_the_config() {
        let parse = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).unwrap();
            let Command::Serve(args) = cli.command else {
                panic!("expected serve");
            };
            let mut config = ServerConfig::default();
            args.loader.apply(&mut config);
            config
        };
        let config = parse(&["forgesyte", "serve"]);
        assert!(!config.preflight);
        assert!(!config.python_entry_points);
        assert_eq!(config.default_isolation, Isolation::InProcess);
        assert_eq!(config.runner, std::env::current_exe().ok());
        assert_eq!(config.runner_args, ["__runner"]);
        let config = parse(&[
            "forgesyte",
            "serve",
            "--preflight",
            "--isolation",
            "process",
            "--runner",
            "/opt/forgesyte-runner",
        ]);
        assert!(config.preflight);
        assert_eq!(config.default_isolation, Isolation::Process);
        assert_eq!(config.runner, Some(PathBuf::from("/opt/forgesyte-runner")));
        assert!(config.runner_args.is_empty());
        let err = Cli::try_parse_from(["forgesyte", "check", "--isolation", "thread"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("in-process, process"), "{err}");
    }

    #[test]
    fn lock_takes_the_plugins_directory() {
        let cli = Cli::try_parse_from(["forgesyte", "lock", "/srv/plugins"]).unwrap();
        let Command::Lock(args) = cli.command else {
            panic!("expected lock");
        };
        assert_eq!(args.dir, Path::new("/srv/plugins"));
        assert!(Cli::try_parse_from(["forgesyte", "lock", "a", "b"]).is_err());
    }

    #[test]
    fn python_entry_points_is_a_flag_of_serve_and_check() {
        for command in ["serve", "check"] {
            let cli = Cli::try_parse_from(["forgesyte", command, "--python-entry-points"]).unwrap();
            let loader = match cli.command {
                Command::Serve(args) => args.loader,
                Command::Check(args) => args.loader,
                Command::New(_)
                | Command::Lock(_)
                | Command::Config(_)
                | Command::Keygen(_)
                | Command::Sign(_) => {
                    panic!("expected {command}")
                }
            };
            let mut config = ServerConfig::default();
            loader.apply(&mut config);
            assert!(config.python_entry_points, "{command}");
            assert!(config.loader_config().python_entry_points, "{command}");
        }
    }

    #[test]
    fn new_takes_exactly_one_language_and_checks_the_name() {
        let cli = Cli::try_parse_from(["forgesyte", "new", "--python", "ocr"]).unwrap();
        let Command::New(args) = cli.command else {
            panic!("expected new");
        };
        assert_eq!(args.kind.python.as_deref(), Some("ocr"));
        assert_eq!(args.parent, PathBuf::from(DEFAULT_PLUGINS_DIR));
        let cli = Cli::try_parse_from(["forgesyte", "new", "--rust", "ocr", "--dir", "p"]).unwrap();
        let Command::New(args) = cli.command else {
            panic!("expected new");
        };
        assert_eq!(args.kind.rust.as_deref(), Some("ocr"));
        assert_eq!(args.parent, PathBuf::from("p"));
        for bad in [
            &["forgesyte", "new"][..],
            &["forgesyte", "new", "--python", "a", "--rust", "b"],
            &["forgesyte", "new", "--python", "no/slash"],
            &["forgesyte", "new", "--rust", "has.dot"],
            &["forgesyte", "new", "--python", "x", "--sdk", "/sdk"],
        ] {
            let err = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{bad:?}: {err}");
        }
    }

    #[test]
    fn the_admin_token_comes_from_the_env_or_a_file() {
        assert_eq!(admin_token(None, None).unwrap(), None);
        let from_env = admin_token(Some("from-the-environment".into()), None).unwrap();
        assert!(from_env.unwrap().matches(b"from-the-environment"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
        let from_file = admin_token(None, Some(&file)).unwrap().unwrap();
        assert!(from_file.matches(b"from-a-file-0123456789"));
        // The variable wins over the file.
        let both = admin_token(Some("env-wins".into()), Some(&file))
            .unwrap()
            .unwrap();
        assert!(both.matches(b"env-wins"));
        // Set but empty, or unreadable: an error, not silently disabled.
        assert!(admin_token(Some("  ".into()), None).is_err());
        std::fs::write(&file, "\n").unwrap();
        assert!(admin_token(None, Some(&file)).is_err());
        let missing = dir.path().join("missing");
        let err = admin_token(None, Some(&missing)).unwrap_err();
        assert!(format!("{err:#}").contains("admin token file"), "{err:#}");
    }

    #[test]
    fn usage_errors_exit_2() {
        let err = Cli::try_parse_from(["forgesyte", "serve", "--call-timeout", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["forgesyte", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
