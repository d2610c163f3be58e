//! Server settings and their defaults.

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use forgesyte_loader::signature::TrustedKeys;
use forgesyte_loader::{Isolation, LoaderConfig};

use crate::admin::AdminToken;

/// Default listen address (`--bind`, `FORGESYTE_BIND`).
pub const DEFAULT_BIND: &str = "127.0.0.1:8000";

/// Default plugins directory (`--plugins`, `FORGESYTE_PLUGINS_DIR`).
pub const DEFAULT_PLUGINS_DIR: &str = "./plugins";

/// Default time limit of one tool call (`--call-timeout`,
/// `FORGESYTE_CALL_TIMEOUT`); a manifest's `limits.call_timeout_s` wins.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Default request body limit in bytes (`--body-limit`, `FORGESYTE_BODY_LIMIT`): 32 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 32 * 1024 * 1024;

/// Default largest answer of a plugin runner, in bytes (`--max-response`):
/// the loader's own default.
pub const DEFAULT_MAX_RESPONSE: u64 = 64 * 1024 * 1024;

/// Default time a plugin runner has to start, and again to construct its
/// plugin (`--init-timeout`, `FORGESYTE_INIT_TIMEOUT`); a manifest's
/// `limits.init_timeout_s` wins. The loader's own default.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Default address-space limit of a plugin runner, in MiB (`--memory-limit`,
/// `FORGESYTE_MEMORY_LIMIT`; 0: none); a manifest's `limits.memory_mb`
/// wins, and a plugin that declares `requires_gpu` gets none unless its
/// manifest sets one. The loader's own default.
pub const DEFAULT_MEMORY_LIMIT_MIB: u64 = 512;

/// Default bound on waiting for in-flight requests at shutdown
/// (`--shutdown-grace`, `FORGESYTE_SHUTDOWN_GRACE`).
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Default time a client has to send a request's complete headers, from
/// the connection's opening or a later request's first byte
/// (`--header-read-timeout`, `FORGESYTE_HEADER_READ_TIMEOUT`).
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time a request's body may take to arrive, each wait for more of
/// it counted on its own (`--body-read-timeout`,
/// `FORGESYTE_BODY_READ_TIMEOUT`).
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Default bytes a second a client must average reading a large response
/// once the idle timeout's grace is over (`--answer-min-rate`,
/// `FORGESYTE_ANSWER_MIN_RATE`): 16 KiB, as for request bodies.
pub const DEFAULT_ANSWER_MIN_RATE: u64 = 16 * 1024;

/// Default bytes a second a request body must average once the body read
/// timeout's grace is over (`--body-min-rate`, `FORGESYTE_BODY_MIN_RATE`):
/// 16 KiB (128 kbit/s, slower than nearly any client's uplink): a 5 MiB
/// upload may take 30 s + 320 s.
pub const DEFAULT_BODY_MIN_RATE: u64 = 16 * 1024;
/// Default `--stream-idle-timeout`: a stream with no message from its
/// client and no answer to it for this long is closed.
pub const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default time an idle keep-alive connection stays open after a response
/// (`--idle-timeout`, `FORGESYTE_IDLE_TIMEOUT`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Default cap on connections served at once (`--max-connections`,
/// `FORGESYTE_MAX_CONNECTIONS`); never more than half the soft
/// file-descriptor limit is applied, the rest being for plugin runners.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// Default bound on one plugin's tool calls in progress, waiting or
/// running (`--max-calls-per-plugin`, `FORGESYTE_MAX_CALLS_PER_PLUGIN`);
/// beyond it a call answers 503 with `Retry-After`.
pub const DEFAULT_MAX_CALLS_PER_PLUGIN: usize = 64;

/// Default hosting of plugins whose manifest names no `isolation`
/// (`--isolation`, `FORGESYTE_ISOLATION`): in the server process.
pub const DEFAULT_ISOLATION: Isolation = Isolation::InProcess;

/// Everything `forgesyte serve` can be told.
///
/// Build one from [`ServerConfig::default`] and change the fields you need.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Directory whose subdirectories hold one plugin each.
    pub plugins_dir: PathBuf,
    /// Address to listen on (`host:port`; port 0 picks a free one).
    pub bind: String,
    /// Extra directories searched for plugin libraries and `lib:` dependencies.
    pub lib_paths: Vec<PathBuf>,
    /// Time limit of one tool call when the manifest sets none.
    pub call_timeout: Duration,
    /// Time a plugin runner (isolated native or Python) has to start, and
    /// again to construct its plugin, when the manifest sets no
    /// `limits.init_timeout_s` (`--init-timeout`).
    pub init_timeout: Duration,
    /// Address-space limit (`RLIMIT_AS`) of a plugin runner in MiB, when
    /// the manifest sets no `limits.memory_mb`; 0: none (`--memory-limit`).
    /// A plugin that declares `requires_gpu` gets none unless its manifest
    /// sets one.
    pub memory_limit_mib: u64,
    /// Largest accepted request body, in bytes.
    pub body_limit: usize,
    /// Memory the request bodies of tool calls in progress and the frames of
    /// open streams may hold in all (`--body-memory`,
    /// `FORGESYTE_BODY_MEMORY`; stream frames still arriving may also use a
    /// reserve of one body at the limit beside it); `None`: eight bodies at
    /// the limit, at least 256 MiB.
    pub body_memory: Option<usize>,
    /// The largest answer a plugin runner may send, in bytes, and the most
    /// a manifest's `limits.max_response_mb` may raise it to
    /// (`--max-response`, `FORGESYTE_MAX_RESPONSE`; default 64 MiB).
    pub max_response: u64,
    /// Memory the answers of tool calls may hold in all while they wait to
    /// be sent (`--answer-memory`, `FORGESYTE_ANSWER_MEMORY`); `None`:
    /// eight answers of `max_response`, at least 256 MiB.
    pub answer_memory: Option<usize>,
    /// How long shutdown waits for in-flight requests.
    pub shutdown_grace: Duration,
    /// Time a client has to send a request's complete headers, from the
    /// connection's opening or the first byte of a later request.
    pub header_read_timeout: Duration,
    /// Time an idle keep-alive connection stays open after a response.
    pub idle_timeout: Duration,
    /// Names the server is reached by besides its own address (a proxy's
    /// public name; lowercase, no port): see `crate::origin`.
    pub public_hosts: Vec<String>,
    /// Longest wait for the next piece of a request's body (a client that
    /// stops sending mid-body is answered 408).
    pub body_read_timeout: Duration,
    /// Bytes a second a request body must average after a grace of the
    /// body read timeout (one more second per `body_min_rate` bytes that
    /// arrive); a slower body is answered 408. Zero: no minimum.
    pub body_min_rate: u64,
    /// Bytes a second a client must average reading a response the socket
    /// could not take at once, after a grace of the idle timeout (one more
    /// second per `answer_min_rate` bytes it read); a slower client's
    /// connection is closed, and the answer's room in `answer_memory`
    /// comes back. Zero: no minimum (a client that reads nothing at all is
    /// still let go at the idle timeout).
    pub answer_min_rate: u64,
    /// A WebSocket stream with no frame or text message from its client
    /// (pings do not count) and no answer to it for this long is closed
    /// (1000); zero: never.
    pub stream_idle_timeout: Duration,
    /// Connections served at once; at most half the soft file-descriptor
    /// limit is applied. A few more are served the probe routes only.
    pub max_connections: usize,
    /// The bearer token of the admin routes (`POST .../reload`); `None`
    /// disables them (`FORGESYTE_ADMIN_TOKEN`, `--admin-token-file`).
    pub admin_token: Option<AdminToken>,
    /// One plugin's tool calls in progress (waiting or running) at most;
    /// beyond it a call answers 503 (`TooManyCalls`) with `Retry-After`.
    pub max_calls_per_plugin: usize,
    /// Construct every in-process plugin once in a throw-away runner
    /// process before loading it into the server (`--preflight`), so a
    /// plugin that would crash the server on load is FAILED instead.
    pub preflight: bool,
    /// How plugins whose manifest names no `isolation` are hosted
    /// (`--isolation`).
    pub default_isolation: Isolation,
    /// The runner executable of isolated plugins (`--runner`); `None`: the
    /// loader's own default (`forgesyte-runner`).
    pub runner: Option<PathBuf>,
    /// Arguments put before the runner's own: the hidden subcommand when
    /// the runner is a host binary (the `forgesyte` binary sets
    /// `["__runner"]` when it is its own runner).
    pub runner_args: Vec<OsString>,
    /// The `forgesyte` executable that runs the dependency probes in child
    /// processes, behind its hidden subcommands (the `forgesyte` binary
    /// sets itself): the GPU probe ([`crate::GPU_PROBE_SUBCOMMAND`]), so the
    /// CUDA driver library, its threads and its crashes stay out of the
    /// server, and the `dlopen` last resort of a `lib:` dependency
    /// ([`crate::LIB_PROBE_SUBCOMMAND`]), so no library's initialisers run
    /// in it. `None`: both in this process.
    pub probe_program: Option<PathBuf>,
    /// The interpreter of Python plugins whose manifest names none
    /// (`--python`, `FORGESYTE_PYTHON`); `None`: `python3` on `PATH`.
    pub python: Option<PathBuf>,
    /// Also load the installed Python plugins: the entry points of group
    /// `forgesyte.plugins` that [`python`](Self::python) sees
    /// (`--python-entry-points`, `FORGESYTE_PYTHON_ENTRY_POINTS`).
    pub python_entry_points: bool,
    /// The plugins directory may be missing (`serve` sets it when
    /// installed plugins are on and no directory was named): see
    /// `LoaderConfig::plugins_dir_optional`.
    pub plugins_dir_optional: bool,
    /// Confine the runners of isolated and Python plugins: Landlock, a
    /// network namespace of their own, a scrubbed environment
    /// (`--confine on|off`, `FORGESYTE_CONFINE`; on by default).
    pub confine: bool,
    /// Refuse every plugin that would run unconfined: in-process ones, all
    /// of them with `confine` off, and those whose runner could not enforce
    /// every part of its sandbox (`--require-confinement`,
    /// `FORGESYTE_REQUIRE_CONFINEMENT`).
    pub require_confinement: bool,
    /// This server runs no GPU plugins (`--no-gpu`, `FORGESYTE_NO_GPU`):
    /// no GPU probe; a plugin that requires a GPU is UNAVAILABLE and does
    /// not count for readiness.
    pub no_gpu: bool,
    /// Whose manifests may widen their runner's sandbox
    /// (`--sandbox-widening`, `FORGESYTE_SANDBOX_WIDENING`; `signed` by
    /// default).
    pub sandbox_widening: forgesyte_loader::sandbox::SandboxWidening,
    /// The unprivileged user isolated and Python runners run as when the
    /// server runs as root (`--runner-user`, `FORGESYTE_RUNNER_USER`).
    pub runner_user: Option<forgesyte_loader::sandbox::RunAs>,
    /// Rescan the plugins directory when files under it change (`serve
    /// --watch`, `FORGESYTE_WATCH`), debounced; for plugin development.
    pub watch: bool,
    /// Directory of the minisign public keys (`*.pub`) plugin signatures
    /// are checked against (`--trusted-keys`, `FORGESYTE_TRUSTED_KEYS`).
    pub trusted_keys_dir: Option<PathBuf>,
    /// Refuse every plugin not `signed` by a trusted key
    /// (`--require-signed`, `FORGESYTE_REQUIRE_SIGNED`).
    pub require_signed: bool,
}

impl ServerConfig {
    /// The keys of [`trusted_keys_dir`](Self::trusted_keys_dir) (none
    /// when it is unset).
    ///
    /// # Errors
    ///
    /// The directory or one of its `*.pub` files cannot be read or parsed.
    pub fn trusted_keys(&self) -> Result<TrustedKeys, String> {
        match &self.trusted_keys_dir {
            Some(dir) => TrustedKeys::load(dir),
            None => Ok(TrustedKeys::default()),
        }
    }

    /// Why [`runner`](Self::runner) cannot be started, when it cannot be:
    /// `serve` and `check` refuse such a configuration (exit code 2) rather
    /// than fail every isolated plugin with a reason about its library. A
    /// name without `/` is looked for on `PATH` as the loader's spawn does
    /// (`execvp`: a relative entry from the working directory, an empty one
    /// is the working directory); a path is taken as it is. Under
    /// [`runner_user`](Self::runner_user) the file and the directories
    /// above it must let that user execute and search them (by their mode
    /// bits; ACLs are not read).
    pub fn runner_problem(&self) -> Option<String> {
        use std::os::unix::ffi::OsStrExt;

        let runner = self.runner.as_deref()?;
        let shown = runner.display();
        let user = self.runner_user;
        let cwd = std::env::current_dir().unwrap_or_default();
        if !runner.as_os_str().as_bytes().contains(&b'/') {
            // What it finds is a file that user may execute.
            return on_path(runner, std::env::var_os("PATH"), &cwd, user)
                .is_none()
                .then(|| format!("--runner {shown}: no executable of that name on PATH"));
        }
        let path = cwd.join(runner);
        match std::fs::metadata(&path) {
            Err(e) => Some(format!("--runner {shown}: {e}")),
            Ok(meta) if !meta.is_file() => Some(format!("--runner {shown}: not a file")),
            Ok(_) if executable_by(&path, user) => None,
            Ok(_) => Some(match user {
                Some(user) => format!(
                    "--runner {shown}: not executable by the runner user (uid {}, gid {}): \
                     the file, or a directory above it, does not let that user in",
                    user.uid, user.gid
                ),
                None => format!("--runner {shown}: not executable"),
            }),
        }
    }

    /// The loader settings these server settings imply.
    pub fn loader_config(&self) -> LoaderConfig {
        LoaderConfig {
            lib_paths: self.lib_paths.clone(),
            preflight: self.preflight,
            default_isolation: self.default_isolation,
            runner: self.runner.clone(),
            runner_args: self.runner_args.clone(),
            python: self.python.clone(),
            python_entry_points: self.python_entry_points,
            plugins_dir_optional: self.plugins_dir_optional,
            confine: self.confine,
            require_confinement: self.require_confinement,
            no_gpu: self.no_gpu,
            sandbox_widening: self.sandbox_widening,
            runner_user: self.runner_user,
            // A trust store that became unreadable since startup checked
            // it trusts nothing (fail closed).
            trusted_keys: self.trusted_keys().unwrap_or_else(|e| {
                tracing::error!("{e}: no key is trusted");
                // Read again by the next rescan.
                self.trusted_keys_dir
                    .as_deref()
                    .map(|dir| TrustedKeys::unreadable(dir, e))
                    .unwrap_or_default()
            }),
            require_signed: self.require_signed,
            // Files change under a watching server by design.
            copy_libraries: self.watch,
            call_timeout: self.call_timeout,
            // The same limit for a plugin in a runner: its process is killed
            // at it (it was the loader's 60 s whatever `--call-timeout` said).
            process: forgesyte_loader::process::ProcessLimits {
                init_timeout: self.init_timeout,
                call_timeout: self.call_timeout,
                memory_limit_mib: self.memory_limit_mib,
                max_response_bytes: self.max_response,
            },
            ..LoaderConfig::default()
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            plugins_dir: PathBuf::from(DEFAULT_PLUGINS_DIR),
            bind: DEFAULT_BIND.to_owned(),
            lib_paths: Vec::new(),
            call_timeout: DEFAULT_CALL_TIMEOUT,
            init_timeout: DEFAULT_INIT_TIMEOUT,
            memory_limit_mib: DEFAULT_MEMORY_LIMIT_MIB,
            body_limit: DEFAULT_BODY_LIMIT,
            body_memory: None,
            max_response: DEFAULT_MAX_RESPONSE,
            answer_memory: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            body_min_rate: DEFAULT_BODY_MIN_RATE,
            answer_min_rate: DEFAULT_ANSWER_MIN_RATE,
            stream_idle_timeout: DEFAULT_STREAM_IDLE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            public_hosts: Vec::new(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            admin_token: None,
            max_calls_per_plugin: DEFAULT_MAX_CALLS_PER_PLUGIN,
            preflight: false,
            default_isolation: DEFAULT_ISOLATION,
            runner: None,
            runner_args: Vec::new(),
            probe_program: None,
            python: None,
            python_entry_points: false,
            plugins_dir_optional: false,
            confine: true,
            require_confinement: false,
            no_gpu: false,
            sandbox_widening: forgesyte_loader::sandbox::SandboxWidening::default(),
            runner_user: None,
            watch: false,
            trusted_keys_dir: None,
            require_signed: false,
        }
    }
}

/// The first file named `name` in the directories of `path_var` that
/// [`executable_by`] `user`, as `execvp` looks: a relative entry is taken
/// from `cwd`, an empty one is `cwd` itself.
fn on_path(
    name: &std::path::Path,
    path_var: Option<OsString>,
    cwd: &std::path::Path,
    user: Option<forgesyte_loader::sandbox::RunAs>,
) -> Option<PathBuf> {
    let path_var = path_var?;
    std::env::split_paths(&path_var)
        .map(|dir| cwd.join(dir).join(name))
        .find(|candidate| candidate.is_file() && executable_by(candidate, user))
}

/// Whether `path` (a file, absolute) may be executed by `user`: its
/// execute bit for that user and the search bit of every directory above
/// it (root: any execute bit, any directory). `None`: by this process, as
/// the kernel decides (`access`, groups and ACLs included).
fn executable_by(path: &std::path::Path, user: Option<forgesyte_loader::sandbox::RunAs>) -> bool {
    use std::os::unix::fs::MetadataExt;

    let Some(user) = user else {
        return rustix::fs::access(path, rustix::fs::Access::EXEC_OK).is_ok();
    };
    let allows = |meta: &std::fs::Metadata| {
        let mode = meta.mode();
        if user.uid == 0 {
            return meta.is_dir() || mode & 0o111 != 0;
        }
        let shift = if meta.uid() == user.uid {
            6
        } else if meta.gid() == user.gid {
            3
        } else {
            0
        };
        (mode >> shift) & 1 != 0
    };
    // The directories of the path as given (a link's own directory must
    // be searched too), and those of where its links lead.
    let directories_allow = |p: &std::path::Path| {
        p.ancestors()
            .skip(1)
            .all(|dir| std::fs::metadata(dir).is_ok_and(|meta| allows(&meta)))
    };
    std::fs::canonicalize(path).is_ok_and(|real| {
        directories_allow(path)
            && directories_allow(&real)
            && std::fs::metadata(&real).is_ok_and(|meta| allows(&meta))
    })
}

/// A switch given a value (`--confine off`, `FORGESYTE_WATCH=1`,
/// `?verbose=off`): the words clap's boolish parser takes (`on`/`off`,
/// `true`/`false`, `yes`/`no`, `1`/`0`, `y`/`n`, `t`/`f`, in any case),
/// refused with a message that names them (clap's said only "value was
/// not a boolean").
///
/// # Errors
///
/// Any other word, named, with the words taken.
pub fn parse_switch(text: &str) -> Result<bool, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "on" | "true" | "yes" | "1" | "y" | "t" => Ok(true),
        "off" | "false" | "no" | "0" | "n" | "f" => Ok(false),
        _ => Err(format!(
            "'{text}' is neither on nor off: give on or off (true/false, yes/no and 1/0 work too)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runner_name_is_found_on_path_as_execvp_finds_it() {
        use std::os::unix::fs::PermissionsExt;
        let cwd = tempfile::tempdir().unwrap();
        std::fs::create_dir(cwd.path().join("bin")).unwrap();
        for file in ["bin/relative", "here"] {
            let path = cwd.path().join(file);
            std::fs::write(&path, "").unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let find = |name: &str, path_var: &str| {
            on_path(
                std::path::Path::new(name),
                Some(path_var.into()),
                cwd.path(),
                None,
            )
        };
        // A relative entry, and an empty one (the working directory).
        assert_eq!(
            find("relative", "/nowhere:bin"),
            Some(cwd.path().join("bin/relative"))
        );
        assert_eq!(find("here", "/nowhere:"), Some(cwd.path().join("here")));
        assert_eq!(find("here", "/nowhere:bin"), None);
        assert_eq!(
            on_path(std::path::Path::new("here"), None, cwd.path(), None),
            None
        );
    }

    #[test]
    fn a_runner_user_must_be_let_in_by_the_file_and_its_directories() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = tempfile::tempdir().unwrap();
        let runner = dir.path().join("runner");
        std::fs::write(&runner, "").unwrap();
        let meta = std::fs::metadata(&runner).unwrap();
        // Neither the file's owner nor its group: the "other" bits.
        let stranger = forgesyte_loader::sandbox::RunAs {
            uid: meta.uid().wrapping_add(4242),
            gid: meta.gid().wrapping_add(4242),
        };
        let owner = forgesyte_loader::sandbox::RunAs {
            uid: meta.uid(),
            gid: meta.gid(),
        };
        let root = forgesyte_loader::sandbox::RunAs { uid: 0, gid: 0 };
        let set = |path: &std::path::Path, mode: u32| {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        set(dir.path(), 0o711);
        set(&runner, 0o700);
        assert!(executable_by(&runner, Some(owner)));
        assert!(!executable_by(&runner, Some(stranger)));
        set(&runner, 0o701);
        assert!(executable_by(&runner, Some(stranger)));
        // A directory above it that the user may not search.
        set(dir.path(), 0o700);
        assert!(!executable_by(&runner, Some(stranger)));
        assert!(executable_by(&runner, Some(root)));
        set(&runner, 0o600);
        assert!(!executable_by(&runner, Some(root)));
        // A link in a directory the user may not search, to a runner it
        // may run: the kernel searches the link's directory too.
        let open = tempfile::tempdir().unwrap();
        set(open.path(), 0o711);
        let target = open.path().join("runner");
        std::fs::write(&target, "").unwrap();
        set(&target, 0o755);
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(executable_by(&target, Some(stranger)));
        assert!(!executable_by(&link, Some(stranger)));
        set(dir.path(), 0o711);
        assert!(executable_by(&link, Some(stranger)));
    }

    #[test]
    fn a_runner_that_cannot_be_started_is_named_with_why() {
        let dir = tempfile::tempdir().unwrap();
        let not_executable = dir.path().join("runner.txt");
        std::fs::write(&not_executable, "").unwrap();
        let problem = |runner: &std::path::Path| {
            let config = ServerConfig {
                runner: Some(runner.to_path_buf()),
                ..ServerConfig::default()
            };
            config.runner_problem()
        };
        let missing = problem(&dir.path().join("nonexistent")).unwrap();
        assert!(
            missing.starts_with("--runner ") && missing.contains("No such file"),
            "{missing}"
        );
        assert!(problem(dir.path()).unwrap().ends_with(": not a file"));
        assert!(
            problem(&not_executable)
                .unwrap()
                .ends_with(": not executable")
        );
        let unknown = problem(std::path::Path::new("forgesyte-no-such-runner")).unwrap();
        assert!(
            unknown.ends_with("no executable of that name on PATH"),
            "{unknown}"
        );
        // This test's own executable, and a name found on PATH, are fine.
        assert_eq!(problem(&std::env::current_exe().unwrap()), None);
        assert_eq!(problem(std::path::Path::new("sh")), None);
        assert_eq!(ServerConfig::default().runner_problem(), None);
    }

    #[test]
    fn defaults_are_the_documented_ones() {
        let config = ServerConfig::default();
        assert_eq!(config.bind, "127.0.0.1:8000");
        assert_eq!(config.plugins_dir, PathBuf::from("./plugins"));
        assert_eq!(config.call_timeout, Duration::from_secs(60));
        assert_eq!(config.body_limit, 33_554_432);
        assert_eq!(config.header_read_timeout, Duration::from_secs(10));
        assert_eq!(config.body_read_timeout, Duration::from_secs(30));
        assert_eq!(config.body_min_rate, 16_384);
        assert_eq!(config.idle_timeout, Duration::from_secs(60));
        assert_eq!(config.max_connections, 10_000);
        assert_eq!(config.max_calls_per_plugin, 64);
        assert!(config.lib_paths.is_empty());
        assert_eq!(config.admin_token, None);
        assert!(!config.preflight);
        assert_eq!(config.default_isolation, Isolation::InProcess);
        assert_eq!(config.runner, None);
        assert!(!config.python_entry_points);
        assert!(!config.watch);
        // The runners' limits are the loader's own defaults.
        let loader = forgesyte_loader::process::ProcessLimits::default();
        assert_eq!(config.init_timeout, loader.init_timeout);
        assert_eq!(config.memory_limit_mib, loader.memory_limit_mib);
        assert_eq!(config.max_response, loader.max_response_bytes);
    }

    #[test]
    fn loader_settings_are_passed_on() {
        let config = ServerConfig {
            lib_paths: vec!["/opt/lib".into()],
            preflight: true,
            default_isolation: Isolation::Process,
            runner: Some("/usr/libexec/forgesyte".into()),
            runner_args: vec!["__runner".into()],
            python: Some("/opt/py/bin/python3".into()),
            python_entry_points: true,
            max_response: 3 << 20,
            init_timeout: Duration::from_secs(90),
            memory_limit_mib: 0,
            ..ServerConfig::default()
        };
        let loader = config.loader_config();
        assert_eq!(loader.process.max_response_bytes, 3 << 20);
        assert_eq!(loader.process.init_timeout, Duration::from_secs(90));
        assert_eq!(loader.process.memory_limit_mib, 0);
        assert_eq!(loader.lib_paths, [PathBuf::from("/opt/lib")]);
        assert!(loader.preflight);
        assert_eq!(loader.default_isolation, Isolation::Process);
        assert_eq!(loader.runner, Some(PathBuf::from("/usr/libexec/forgesyte")));
        assert_eq!(loader.runner_args, ["__runner"]);
        assert_eq!(loader.python, Some(PathBuf::from("/opt/py/bin/python3")));
        assert!(loader.python_entry_points);
    }
}
