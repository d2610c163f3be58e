//! The command line of `forgesyte`: its subcommands and options (clap),
//! the parsers of option values, and how the options become a
//! [`ServerConfig`]. What each command does lives in `main.rs`; the config
//! file's layering over these options in `config_file`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use forgesyte_loader::Isolation;
use forgesyte_loader::sandbox::RunAs;
use forgesyte_server::{
    DEFAULT_ANSWER_MIN_RATE, DEFAULT_BIND, DEFAULT_BODY_LIMIT, DEFAULT_BODY_MIN_RATE,
    DEFAULT_BODY_READ_TIMEOUT, DEFAULT_CALL_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT, DEFAULT_INIT_TIMEOUT, DEFAULT_ISOLATION, DEFAULT_MAX_CALLS_PER_PLUGIN,
    DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_RESPONSE, DEFAULT_MEMORY_LIMIT_MIB, DEFAULT_PLUGINS_DIR,
    DEFAULT_SHUTDOWN_GRACE, DEFAULT_STREAM_IDLE_TIMEOUT, ServerConfig,
};

use crate::scaffold;

/// The hidden subcommand under which `forgesyte` is the plugin runner.
pub(crate) const RUNNER_SUBCOMMAND: &str = "__runner";

#[derive(Debug, Parser)]
#[command(name = "forgesyte", version, about = "ForgeSyte plugin host")]
pub(crate) struct Cli {
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
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
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
    /// native plugin's library, a Python plugin's *.py and *.so tree). A load of
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
pub(crate) struct ConfigArgs {
    /// Print the effective configuration of `serve` given these options,
    /// the environment and the config file.
    #[arg(long, required = true)]
    pub(crate) print: bool,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
}

#[derive(Debug, Args)]
pub(crate) struct KeygenArgs {
    /// Directory the key files are written to (created if missing).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: PathBuf,
    /// File name of the keys: NAME.key and NAME.pub (one file name, no
    /// path: the same rule as a plugin's name).
    #[arg(long, value_name = "NAME", default_value = "forgesyte", value_parser = scaffold::python_name)]
    pub(crate) name: String,
    /// Store the secret key without a password (for automation; keep
    /// the file private).
    #[arg(long)]
    pub(crate) unencrypted: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SignArgs {
    /// The plugin directory (holding manifest.json).
    #[arg(value_name = "DIR")]
    pub(crate) dir: PathBuf,
    /// The secret key (from `forgesyte keygen`; an encrypted one needs
    /// FORGESYTE_KEY_PASSWORD).
    #[arg(long, value_name = "KEY")]
    pub(crate) key: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct LockArgs {
    /// The server's TOML config file: its `plugins` (the directory) applies
    /// when no directory is given; the file's other keys are left to
    /// `serve`.
    #[arg(long, value_name = "FILE", env = "FORGESYTE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Directory holding one subdirectory per plugin.
    #[arg(value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    pub(crate) dir: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct NewArgs {
    #[command(flatten)]
    pub(crate) kind: NewKind,
    /// The server's TOML config file: its `plugins` (the directory) applies
    /// when `--dir` is not given; the file's other keys are left to
    /// `serve`.
    #[arg(long, value_name = "FILE", env = "FORGESYTE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// The plugins directory the plugin's own directory is created in.
    #[arg(id = "dir", long = "dir", value_name = "PARENT", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    pub(crate) parent: PathBuf,
    /// The address `serve` listens on, for the `curl` command printed: as
    /// `serve` takes it (flag, `FORGESYTE_BIND`, the config file's `bind`,
    /// 127.0.0.1:8000). One given here or in `FORGESYTE_BIND` that `serve`
    /// would refuse is not `new`'s error: the curl then calls
    /// 127.0.0.1:8000, and `new` says so (a config file with an invalid
    /// value is refused, exit 2, as by every command).
    #[arg(long, value_name = "ADDR", env = "FORGESYTE_BIND", default_value = DEFAULT_BIND)]
    pub(crate) bind: String,
    /// The `forgesyte-plugin-sdk` crate a Rust plugin depends on, by path
    /// (default: the one of the workspace this forgesyte was built in).
    #[arg(long, value_name = "DIR", conflicts_with = "new_python")]
    pub(crate) sdk: Option<PathBuf>,
}

/// The language of `forgesyte new`: exactly one.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub(crate) struct NewKind {
    /// A Python plugin: manifest.json and plugin.py (`class Plugin` with a
    /// `tools` dict and `run_tool`, one tool `hello`).
    // Ids of their own: a config file's `python` (serve's interpreter) is
    // no plugin name.
    #[arg(id = "new_python", long = "python", value_name = "NAME", value_parser = scaffold::python_name)]
    pub(crate) python: Option<String>,
    /// A Rust plugin: a Cargo project building a cdylib with
    /// forgesyte-plugin-sdk (one tool `hello`), and its manifest.json.
    #[arg(id = "new_rust", long = "rust", value_name = "NAME", value_parser = scaffold::rust_name)]
    pub(crate) rust: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// A TOML file of options, keyed by their long names (`bind =
    /// "0.0.0.0:8000"`, `max-connections = 10000`); a flag or an
    /// environment variable beats the file, the file beats the default.
    #[arg(long, value_name = "FILE", env = "FORGESYTE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Directory holding one subdirectory per plugin.
    #[arg(long, value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    pub(crate) plugins: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "FORGESYTE_BIND", default_value = DEFAULT_BIND, value_parser = parse_bind)]
    pub(crate) bind: String,
    #[command(flatten)]
    pub(crate) loader: LoaderArgs,
    /// Time limit of one tool call, in seconds, when the plugin's manifest sets none.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_CALL_TIMEOUT", default_value_t = Seconds(DEFAULT_CALL_TIMEOUT), value_parser = parse_seconds_arg)]
    pub(crate) call_timeout: Seconds,
    /// Largest accepted request body, in bytes.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_LIMIT", default_value_t = DEFAULT_BODY_LIMIT, value_parser = parse_bytes)]
    pub(crate) body_limit: usize,
    /// Memory the request bodies of tool calls in progress and the frames of
    /// open streams may hold in all, in bytes (default: eight bodies at the
    /// limit, at least 256 MiB; stream frames still arriving may also use a
    /// reserve of one body at the limit beside it); beyond it a call
    /// answers 503 `ServerBusy`.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_MEMORY", value_parser = parse_bytes)]
    pub(crate) body_memory: Option<usize>,
    /// Memory the answers of tool calls may hold in all while they wait to
    /// be sent, in bytes (default: eight answers of `--max-response`, at
    /// least 256 MiB); beyond it an answer is dropped and the call answers
    /// 503 `ServerBusy`.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_ANSWER_MEMORY", value_parser = parse_bytes)]
    pub(crate) answer_memory: Option<usize>,
    /// Attachments of at least this many bytes travel to and from plugin
    /// runners through shared memory (sealed memfds) instead of the pipe; 0
    /// keeps them all in the pipe.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_SHM_THRESHOLD", default_value_t = forgesyte_loader::process::shm_threshold(), value_parser = parse_bytes_or_zero)]
    pub(crate) shm_threshold: u64,
    /// Keep what plugin runners write to stderr out of every answer: a
    /// crashed plugin's reason and failure journal say how many of its
    /// last stderr lines were withheld, and the server's log has them. For
    /// servers whose read routes any client reaches: otherwise a plugin
    /// that prints its callers' data shows it to every client.
    #[arg(long, value_name = "on|off", env = "FORGESYTE_WITHHOLD_STDERR", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) withhold_stderr: bool,
    /// How long shutdown waits for in-flight requests, in seconds.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_SHUTDOWN_GRACE", default_value_t = Seconds(DEFAULT_SHUTDOWN_GRACE), value_parser = parse_seconds_arg)]
    pub(crate) shutdown_grace: Seconds,
    /// Time a client has to send a request's complete headers, in seconds
    /// (from the connection's opening, or a later request's first byte).
    #[arg(long, value_name = "SECS", env = "FORGESYTE_HEADER_READ_TIMEOUT", default_value_t = Seconds(DEFAULT_HEADER_READ_TIMEOUT), value_parser = parse_seconds_arg)]
    pub(crate) header_read_timeout: Seconds,
    /// Longest wait for the next piece of a request's body, in seconds (a
    /// client that stops sending mid-body is answered 408).
    #[arg(long, value_name = "SECS", env = "FORGESYTE_BODY_READ_TIMEOUT", default_value_t = Seconds(DEFAULT_BODY_READ_TIMEOUT), value_parser = parse_seconds_arg)]
    pub(crate) body_read_timeout: Seconds,
    /// Bytes a second a request body must average, after a grace of the
    /// body read timeout plus a second per this many bytes received (a
    /// slower client is answered 408); 0: no minimum.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_MIN_RATE", default_value_t = DEFAULT_BODY_MIN_RATE, value_parser = parse_rate)]
    pub(crate) body_min_rate: u64,
    /// Bytes a second a client must average reading a response the socket
    /// could not take at once, after a grace of the idle timeout plus a
    /// second per this many bytes read (a slower client's connection is
    /// closed, and its answer's room in --answer-memory comes back); 0: no
    /// minimum.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_ANSWER_MIN_RATE", default_value_t = DEFAULT_ANSWER_MIN_RATE, value_parser = parse_rate)]
    pub(crate) answer_min_rate: u64,
    /// A WebSocket stream with no frame or text message from its client
    /// (pings do not count) and no answer to it for this long is closed
    /// (code 1000), in seconds; 0: never.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_STREAM_IDLE_TIMEOUT", default_value_t = Seconds(DEFAULT_STREAM_IDLE_TIMEOUT), value_parser = parse_seconds_or_never)]
    pub(crate) stream_idle_timeout: Seconds,
    /// Time an idle keep-alive connection stays open after a response, and
    /// the longest a client may read nothing of an answer, in seconds.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_IDLE_TIMEOUT", default_value_t = Seconds(DEFAULT_IDLE_TIMEOUT), value_parser = parse_seconds_arg)]
    pub(crate) idle_timeout: Seconds,
    /// Connections served at once (at most half the file-descriptor limit
    /// is applied, which serve first raises to the hard one); beyond it a
    /// few more get the probes only, then new connections are closed at
    /// once.
    #[arg(long, value_name = "N", env = "FORGESYTE_MAX_CONNECTIONS", default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = parse_count)]
    pub(crate) max_connections: usize,
    /// Tool calls of one plugin in progress (waiting or running) at most;
    /// beyond it a call answers 503 with `Retry-After`.
    #[arg(long, value_name = "N", env = "FORGESYTE_MAX_CALLS_PER_PLUGIN", default_value_t = DEFAULT_MAX_CALLS_PER_PLUGIN, value_parser = parse_count)]
    pub(crate) max_calls_per_plugin: usize,
    /// File holding the bearer token of the admin routes (`POST
    /// /v1/plugins/reload`, ...). Without it (or `FORGESYTE_ADMIN_TOKEN`)
    /// those routes are disabled.
    #[arg(long, value_name = "PATH", env = "FORGESYTE_ADMIN_TOKEN_FILE")]
    pub(crate) admin_token_file: Option<PathBuf>,
    /// Rescan the plugins directory when files under it change (debounced),
    /// as SIGHUP does: for plugin development.
    #[arg(long, value_name = "on|off", env = "FORGESYTE_WATCH", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) watch: bool,
    /// Names the server is reached by besides its own address, such as a
    /// proxy's public name, without scheme or port (comma-separated, or
    /// repeat the option): requests for them are answered on a loopback
    /// address, and their pages may run tools and reload. Once given, a
    /// connection to any address answers only these names, IP addresses
    /// and localhost (against DNS rebinding).
    #[arg(long = "public-host", value_name = "NAMES", env = "FORGESYTE_PUBLIC_HOST", value_delimiter = ',', value_parser = parse_public_host)]
    pub(crate) public_hosts: Vec<String>,
}

/// A `--public-host` name: a host name or address, without scheme, port or
/// path, compared in lowercase and without a trailing dot.
/// An IPv6 address is kept in brackets, as `Host` and `Origin` write it;
/// a port is refused (neither rule compares it, and `name:8443` would
/// match no request).
fn parse_public_host(text: &str) -> Result<String, String> {
    let name = text.trim().trim_end_matches('.').to_ascii_lowercase();
    let unbracketed = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(&name);
    // As a browser writes it: compressed (`2001:0DB8:0::1` → `[2001:db8::1]`).
    if let Ok(address) = unbracketed.parse::<std::net::Ipv6Addr>() {
        return Ok(format!("[{address}]"));
    }
    if name.contains(':') && !name.contains("://") {
        return Err(format!(
            "'{text}' has a port: give the name alone (a page of that name on any port is the \
             server's own)"
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '-');
    if name.is_empty() || !name.chars().all(allowed) {
        return Err(format!(
            "'{text}' is not a host name (a name such as forgesyte.example.com, or an address)"
        ));
    }
    Ok(name)
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The server's TOML config file: its loader options and `plugins` (the
    /// directory) apply, as they would to `serve`; a flag or an environment
    /// variable beats the file.
    #[arg(long, value_name = "FILE", env = "FORGESYTE_CONFIG")]
    pub(crate) config: Option<PathBuf>,
    /// Directory holding one subdirectory per plugin.
    #[arg(value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    pub(crate) dir: PathBuf,
    /// Print the JSON array `GET /v1/plugins` would answer instead of text.
    #[arg(long)]
    pub(crate) json: bool,
    #[command(flatten)]
    pub(crate) loader: LoaderArgs,
}

/// How plugins are loaded: the same for `serve` and `check`.
#[derive(Debug, Args)]
pub(crate) struct LoaderArgs {
    /// Extra directories searched for plugin libraries and `lib:`
    /// dependencies (colon-separated, or repeat the option).
    #[arg(
        long = "lib-path",
        value_name = "DIRS",
        env = "FORGESYTE_LIB_PATH",
        value_delimiter = ':',
        // An empty element (`/a::/b`, a trailing `:`) is skipped, not refused.
        value_parser = clap::builder::TypedValueParser::map(
            clap::builder::OsStringValueParser::new(),
            PathBuf::from
        )
    )]
    pub(crate) lib_paths: Vec<PathBuf>,
    /// Construct every in-process plugin once in a throw-away runner
    /// process before loading it, so a plugin that would crash the server
    /// on load is FAILED instead (`check` does so unless given
    /// `--preflight=off`).
    #[arg(long, value_name = "on|off", env = "FORGESYTE_PREFLIGHT", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) preflight: bool,
    /// Where plugins whose manifest names no `isolation` run: in the server
    /// process (fastest) or each in a child process (survives crashes).
    #[arg(long, value_name = "in-process|process", env = "FORGESYTE_ISOLATION", default_value_t = IsolationArg(DEFAULT_ISOLATION), value_parser = parse_isolation)]
    pub(crate) isolation: IsolationArg,
    /// A dedicated runner executable for isolated plugins and preflight,
    /// such as `forgesyte-runner` (default: this `forgesyte` executable,
    /// which doubles as the runner).
    #[arg(long, value_name = "PATH", env = "FORGESYTE_RUNNER")]
    pub(crate) runner: Option<PathBuf>,
    /// The Python interpreter of Python plugins whose manifest names none
    /// (default: `python3` on `PATH`).
    #[arg(long, value_name = "PATH", env = "FORGESYTE_PYTHON")]
    pub(crate) python: Option<PathBuf>,
    /// Also load the installed Python plugins: every entry point of group
    /// `forgesyte.plugins` that the interpreter (`--python`, else `python3`
    /// on `PATH`) sees, after the plugins directory.
    #[arg(long, value_name = "on|off", env = "FORGESYTE_PYTHON_ENTRY_POINTS", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) python_entry_points: bool,
    /// Directory of trusted minisign public keys (`*.pub`) that plugin
    /// signatures are checked against.
    #[arg(long, value_name = "DIR", env = "FORGESYTE_TRUSTED_KEYS")]
    pub(crate) trusted_keys: Option<PathBuf>,
    /// Refuse (FAILED) every plugin whose signature is not `signed` by a
    /// trusted key, before any of its code is opened; by default
    /// signatures are only reported.
    #[arg(long, value_name = "on|off", env = "FORGESYTE_REQUIRE_SIGNED", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) require_signed: bool,
    /// Confine the runners of isolated and Python plugins: read-only access
    /// to what they need (Landlock), writes to their scratch directory only,
    /// no network unless the manifest says `"network": true`, and only the
    /// environment variables they declare (`on` or `off`).
    #[arg(long, value_name = "on|off", env = "FORGESYTE_CONFINE", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) confine: bool,
    /// Refuse (FAILED) every plugin that would run unconfined: in-process
    /// plugins, every plugin with `--confine off`, a plugin whose manifest
    /// names its own Python interpreter, and a plugin whose runner could
    /// not enforce every part of its sandbox (the runner then refuses
    /// before any of the plugin's code is opened or imported).
    #[arg(long, value_name = "on|off", env = "FORGESYTE_REQUIRE_CONFINEMENT", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) require_confinement: bool,
    /// This server runs no GPU plugins (a CPU pool beside a GPU one,
    /// serving the same plugins): a plugin that declares `requires_gpu` is
    /// UNAVAILABLE without any GPU probe (no CUDA driver is loaded) and
    /// does not count for readiness, as if it were `optional`, nor does one
    /// that needs such a plugin through its `plugin:` dependencies.
    #[arg(long, value_name = "on|off", env = "FORGESYTE_NO_GPU", num_args = 0..=1, require_equals = true, default_value = "off", default_missing_value = "on", action = clap::ArgAction::Set, value_parser = parse_switch, hide_possible_values = true)]
    pub(crate) no_gpu: bool,
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
    pub(crate) sandbox_widening: forgesyte_loader::sandbox::SandboxWidening,
    /// The unprivileged user (a name or a numeric uid) that isolated and
    /// Python runners run as when the server runs as root; ignored, with a
    /// warning, when it does not.
    #[arg(long, value_name = "USER", env = "FORGESYTE_RUNNER_USER", value_parser = parse_runner_user)]
    pub(crate) runner_user: Option<RunAs>,
    /// Time a plugin runner (isolated native or Python) has to start, and
    /// again to construct its plugin, and an in-process plugin's
    /// constructor has to return, in seconds, when the plugin's manifest
    /// sets no `limits.init_timeout_s` (a plugin that imports torch or
    /// loads weights at construction may need more).
    #[arg(long, value_name = "SECS", env = "FORGESYTE_INIT_TIMEOUT", default_value_t = Seconds(DEFAULT_INIT_TIMEOUT), value_parser = parse_seconds_arg)]
    pub(crate) init_timeout: Seconds,
    /// Address-space limit (`RLIMIT_AS`) of each plugin runner, in MiB,
    /// when the plugin's manifest sets no `limits.memory_mb`; 0: none. A
    /// plugin that declares `requires_gpu` gets none unless its manifest
    /// sets one (a GPU driver reserves far more address space than it
    /// uses).
    #[arg(long, value_name = "MIB", env = "FORGESYTE_MEMORY_LIMIT", default_value_t = DEFAULT_MEMORY_LIMIT_MIB, value_parser = parse_mib)]
    pub(crate) memory_limit: u64,
    /// The largest answer a plugin runner (isolated native or Python) may
    /// send, in bytes; a manifest's `limits.max_response_mb` may lower it
    /// for its plugin, never raise it.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_MAX_RESPONSE", default_value_t = DEFAULT_MAX_RESPONSE, value_parser = parse_bytes_u64)]
    pub(crate) max_response: u64,
}

/// A `--runner-user`: a user name, or a numeric uid, that exists.
pub(crate) fn parse_runner_user(text: &str) -> Result<RunAs, String> {
    use nix::unistd::{Uid, User};
    let text = text.trim();
    // -1 as an id means "leave it as it is" to setresuid(2): not a user.
    if text.parse::<u32>() == Ok(u32::MAX) {
        return Err(format!("{text} is no user id (-1 leaves the id as it is)"));
    }
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
        // A uid no user database names (common in containers): its group
        // is the same number.
        Ok(None) => match text.parse::<u32>() {
            Ok(0) => Err(format!("{text} is root, not an unprivileged user")),
            Ok(uid) => Ok(RunAs { uid, gid: uid }),
            Err(_) => Err(format!("no user {text}")),
        },
        Err(e) => Err(format!("cannot look up user {text}: {e}")),
    }
}

impl LoaderArgs {
    /// Puts the loader settings into `config`.
    pub(crate) fn apply(self, config: &mut ServerConfig) {
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
        config.require_confinement = self.require_confinement;
        config.no_gpu = self.no_gpu;
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
        config.init_timeout = self.init_timeout.0;
        config.memory_limit_mib = self.memory_limit;
        config.max_response = self.max_response;
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
        // The dependency probes run in children: this executable, behind
        // their hidden subcommands.
        config.probe_program = std::env::current_exe().ok();
    }
}

/// A duration given in seconds on the command line; shown in seconds in
/// `--help` (the defaults are the [`ServerConfig`] constants).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Seconds(pub(crate) Duration);

impl fmt::Display for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.as_secs_f64())
    }
}

/// An isolation mode on the command line (`in-process`, `process`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct IsolationArg(pub(crate) Isolation);

impl fmt::Display for IsolationArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The loader's own names (its serde form), whatever modes it adds.
        match serde_json::to_value(self.0) {
            Ok(serde_json::Value::String(name)) => f.write_str(&name),
            _ => write!(f, "{:?}", self.0),
        }
    }
}

pub(crate) fn parse_isolation(text: &str) -> Result<IsolationArg, String> {
    match text.trim() {
        "in-process" => Ok(IsolationArg(Isolation::InProcess)),
        "process" => Ok(IsolationArg(Isolation::Process)),
        other => Err(format!(
            "'{other}' is not an isolation mode (in-process, process)"
        )),
    }
}

/// The longest duration an option takes, in seconds (about 31 years): a
/// deadline this far out is still a point the clock can hold (std's
/// `Instant + Duration` panics past it, and every connection's header
/// timer and every in-process call's deadline is one).
const MAX_SECONDS: f64 = 1e9;

pub(crate) fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("'{text}' must be a positive number of seconds"));
    }
    // `1e400` and `inf` read as infinity: too long, not "not positive".
    if secs > MAX_SECONDS {
        return Err(format!(
            "'{text}' is more than the {MAX_SECONDS:.0} seconds (about 31 years) a duration may be"
        ));
    }
    // At least a millisecond, as a manifest's limits: a time limit of a
    // microsecond timed every call out ("after 0 ms").
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if d < Duration::from_millis(1) => {
            Err(format!("'{text}' is less than a millisecond (0.001)"))
        }
        Ok(d) => Ok(d),
        Err(e) => Err(format!("'{text}': {e}")),
    }
}

/// A number of MiB for a memory limit: 0 (none) to 1 TiB, as a manifest's
/// `limits.memory_mb`.
pub(crate) fn parse_mib(text: &str) -> Result<u64, String> {
    use forgesyte_loader::manifest::MAX_MIB;
    match text.trim().parse::<u64>() {
        Ok(n) if n <= MAX_MIB => Ok(n),
        _ => Err(format!(
            "'{text}' is not a whole number of MiB from 0 (no limit) to {MAX_MIB}"
        )),
    }
}

pub(crate) fn parse_seconds_arg(text: &str) -> Result<Seconds, String> {
    parse_seconds(text).map(Seconds)
}

/// Seconds, or `0` for "never" (`Duration::ZERO`).
pub(crate) fn parse_seconds_or_never(text: &str) -> Result<Seconds, String> {
    match text.trim().parse::<f64>() {
        Ok(0.0) => Ok(Seconds(Duration::ZERO)),
        Ok(secs) if secs.is_nan() || secs < 0.0 => Err(format!(
            "'{text}' must be a positive number of seconds, or 0 for never"
        )),
        _ => parse_seconds_arg(text),
    }
}

/// A listen address: `HOST:PORT` (`127.0.0.1:8000`, `[::]:8000`,
/// `localhost:8000`), checked when parsed, so that a bad one is refused
/// naming its flag, variable or config key (exit 2) instead of failing the
/// start.
pub(crate) fn parse_bind(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(text.to_owned());
    }
    let fits = text.rsplit_once(':').is_some_and(|(host, port)| {
        port.parse::<u16>().is_ok()
            && !host.is_empty()
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    });
    if fits {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "'{text}' is not an address to listen on: give HOST:PORT, such as 127.0.0.1:8000, \
             0.0.0.0:8000 or [::]:8000 (port 0 picks a free port)"
        ))
    }
}

/// A switch given a value (`--confine off`, `FORGESYTE_WATCH=1`): see
/// [`forgesyte_server::parse_switch`] (the probes read `?verbose=off` with
/// it too).
pub(crate) use forgesyte_server::parse_switch;

/// A number of bytes, 0 included.
pub(crate) fn parse_bytes_or_zero(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .map_err(|_| format!("'{text}' is not a number of bytes"))
}

pub(crate) fn parse_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("it must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a number of bytes")),
    }
}

/// A number of bytes at least 1, as a `u64`.
pub(crate) fn parse_bytes_u64(text: &str) -> Result<u64, String> {
    parse_bytes(text).map(|n| u64::try_from(n).unwrap_or(u64::MAX))
}

/// Bytes a second, `0` allowed ("no minimum").
pub(crate) fn parse_rate(text: &str) -> Result<u64, String> {
    text.trim()
        .parse::<u64>()
        .map_err(|_| format!("'{text}' is not a number of bytes a second"))
}

pub(crate) fn parse_count(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a positive whole number")),
    }
}

impl ServeArgs {
    /// The server settings these options give, all but the admin token
    /// (which needs the environment and a file; see [`crate::admin_env::admin_token`]).
    pub(crate) fn config(self) -> (ServerConfig, Option<PathBuf>) {
        let mut config = ServerConfig::default();
        config.plugins_dir = self.plugins;
        config.bind = self.bind;
        self.loader.apply(&mut config);
        config.call_timeout = self.call_timeout.0;
        config.body_limit = self.body_limit;
        config.body_memory = self.body_memory;
        config.answer_memory = self.answer_memory;
        config.shutdown_grace = self.shutdown_grace.0;
        config.header_read_timeout = self.header_read_timeout.0;
        config.idle_timeout = self.idle_timeout.0;
        config.body_read_timeout = self.body_read_timeout.0;
        config.body_min_rate = self.body_min_rate;
        config.answer_min_rate = self.answer_min_rate;
        config.stream_idle_timeout = self.stream_idle_timeout.0;
        config.max_connections = self.max_connections;
        config.max_calls_per_plugin = self.max_calls_per_plugin;
        config.watch = self.watch;
        config.public_hosts = self.public_hosts;
        (config, self.admin_token_file)
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn switches_take_the_usual_words_and_name_them_when_refused() {
        for on in ["on", "ON", "true", "Yes", "1", "y", "t", " on "] {
            assert_eq!(parse_switch(on), Ok(true), "{on}");
        }
        for off in ["off", "False", "no", "0", "n", "F"] {
            assert_eq!(parse_switch(off), Ok(false), "{off}");
        }
        let err = parse_switch("maybe").unwrap_err();
        assert!(
            err.contains("'maybe'") && err.contains("on or off"),
            "{err}"
        );
        // Through clap, as a flag given alone and as a value.
        let serve = |args: &[&str]| {
            Cli::try_parse_from([&["forgesyte", "serve", "--plugins", "p"], args].concat())
        };
        let Ok(cli) = serve(&["--watch", "--confine", "off"]) else {
            panic!("--watch --confine off refused");
        };
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        assert!(args.watch && !args.loader.confine);
        let err = serve(&["--confine", "maybe"])
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("neither on nor off"), "{err}");
    }

    #[test]
    fn a_listen_address_is_host_and_port() {
        for ok in [
            "127.0.0.1:8000",
            "0.0.0.0:0",
            "[::]:8000",
            "[::1]:65535",
            "localhost:8000",
            " forgesyte.svc:80 ",
            "my_service:8000",
        ] {
            assert_eq!(parse_bind(ok).as_deref(), Ok(ok.trim()), "{ok}");
        }
        for bad in [
            "8000",
            ":8000",
            "0.0.0.0",
            "127.0.0.1:99999",
            "http://localhost:8000",
            "",
            "host:port",
        ] {
            let why = parse_bind(bad).expect_err(bad);
            assert!(why.contains("HOST:PORT"), "{why}");
        }
        assert_eq!(parse_bytes_or_zero("0"), Ok(0));
        assert!(
            parse_bytes_or_zero("-1")
                .unwrap_err()
                .contains("number of bytes")
        );
    }

    #[test]
    fn public_host_names_are_names_or_addresses_without_a_port() {
        assert_eq!(
            parse_public_host(" Forgesyte.Example.com. "),
            Ok("forgesyte.example.com".into())
        );
        assert_eq!(parse_public_host("192.0.2.7"), Ok("192.0.2.7".into()));
        assert_eq!(parse_public_host("2001:db8::1"), Ok("[2001:db8::1]".into()));
        assert_eq!(
            parse_public_host("[2001:DB8::1]"),
            Ok("[2001:db8::1]".into())
        );
        assert_eq!(
            parse_public_host("2001:0DB8:0:0::1"),
            Ok("[2001:db8::1]".into())
        );
        for bad in [
            "forgesyte.example.com:8443",
            "[2001:db8::1]:8443",
            "https://forgesyte.example.com",
            "example.com/path",
            "",
            "a b",
        ] {
            let refused = parse_public_host(bad);
            assert!(refused.is_err(), "{bad}: {refused:?}");
        }
        assert!(parse_public_host("example.com:8443").is_err_and(|e| e.contains("port")),);
    }

    /// `serve` and `check` with no options give exactly the
    /// [`ServerConfig`] defaults (but the runner and the GPU probe, which
    /// are this executable).
    /// Set `FORGESYTE_*` variables change what is parsed, so this test
    /// expects none to be set.
    #[test]
    fn an_empty_command_line_gives_the_config_defaults() {
        let mut expected = ServerConfig::default();
        expected.runner = std::env::current_exe().ok();
        expected.runner_args = vec![RUNNER_SUBCOMMAND.into()];
        expected.probe_program = std::env::current_exe().ok();

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
        // A deadline this far out would overflow the clock; one this short
        // is zero.
        assert!(parse_seconds("1e19").is_err());
        assert!(parse_seconds("1e-10").is_err());
        assert_eq!(
            parse_seconds("0.0001"),
            Err("'0.0001' is less than a millisecond (0.001)".into())
        );
        assert_eq!(parse_seconds("0.001"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_seconds("1e9"), Ok(Duration::from_secs(1_000_000_000)));
        assert_eq!(parse_seconds_or_never("0"), Ok(Seconds(Duration::ZERO)));
        assert_eq!(
            parse_seconds_or_never("1.5"),
            Ok(Seconds(Duration::from_millis(1500)))
        );
        assert_eq!(
            parse_seconds_or_never("-1"),
            Err("'-1' must be a positive number of seconds, or 0 for never".into())
        );
        // Infinity is too long, not "not positive".
        for long in ["1e400", "inf"] {
            assert!(
                parse_seconds(long).is_err_and(|e| e.contains("is more than the")),
                "{long}"
            );
        }
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("0"), Err("it must be at least 1 byte".into()));
        assert!(parse_bytes("1MiB").is_err());
        assert_eq!(parse_count("50"), Ok(50));
        assert!(parse_count("0").is_err());
        assert!(parse_count("-3").is_err());
        assert_eq!(parse_mib("0"), Ok(0));
        assert_eq!(parse_mib("8192"), Ok(8192));
        for bad in ["1.5", "abc", "-5", "1048577"] {
            assert_eq!(
                parse_mib(bad),
                Err(format!(
                    "'{bad}' is not a whole number of MiB from 0 (no limit) to 1048576"
                )),
                "{bad}"
            );
        }
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
    fn usage_errors_exit_2() {
        let err = Cli::try_parse_from(["forgesyte", "serve", "--call-timeout", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["forgesyte", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn a_runner_user_is_a_name_or_a_uid_a_user_database_need_not_name() {
        let unnamed = parse_runner_user("4242424").unwrap();
        assert_eq!((unnamed.uid, unnamed.gid), (4_242_424, 4_242_424));
        assert!(parse_runner_user("0").unwrap_err().contains("is root"));
        assert!(parse_runner_user("root").unwrap_err().contains("is root"));
        assert_eq!(
            parse_runner_user("no-such-user-here").unwrap_err(),
            "no user no-such-user-here"
        );
        // setresuid's "unchanged": every runner failed to start with it.
        assert!(
            parse_runner_user("4294967295")
                .unwrap_err()
                .contains("no user id")
        );
        // Spaces around a number, as the numeric options take them.
        assert_eq!(parse_runner_user(" 4242424 ").unwrap().uid, 4_242_424);
    }
}
