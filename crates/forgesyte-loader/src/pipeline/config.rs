//! [`LoaderConfig`]: the loader's settings.

use std::path::PathBuf;
use std::time::Duration;

use crate::manifest::{self, Isolation};
use crate::process::ProcessLimits;
use crate::signature::TrustedKeys;
use crate::supervise::SupervisionPolicy;

/// Loader settings.
#[derive(Debug, Clone)]
pub struct LoaderConfig {
    /// Directories searched for a plugin library named by a bare file name
    /// when it is not in the plugin's own directory.
    pub lib_paths: Vec<PathBuf>,
    /// Cap on `manifest.json` size.
    pub max_manifest_bytes: u64,
    /// Threads of a load pass, its calling thread included (at least 1;
    /// default: the cores this process may use). With more than one, a
    /// wave's checks and constructions run on a pool of one fewer while
    /// the calling thread opens its in-process libraries (a wave of runner
    /// processes gets a waiting thread per runner, up to a bound), and
    /// manifests are read on a pool of this many; with one, all of it runs
    /// on the calling thread.
    pub threads: usize,
    /// Where a plugin runs when its manifest has no `isolation`
    /// (default in-process).
    pub default_isolation: Isolation,
    /// The runner binary for isolated plugins and preflight; `None`:
    /// [`find_runner`](crate::process::find_runner) (`forgesyte-runner`
    /// next to the executable, never on `PATH`). A host binary that serves
    /// [`runner_main`](crate::process::runner_main) itself can name its own
    /// path.
    pub runner: Option<PathBuf>,
    /// Arguments put before the runner's own, e.g. `["__runner"]` when
    /// [`runner`](Self::runner) is the host binary itself serving
    /// [`runner_main`](crate::process::runner_main) behind a hidden
    /// subcommand.
    pub runner_args: Vec<std::ffi::OsString>,
    /// Limits of isolated plugins; a manifest's `limits` override them.
    pub process: ProcessLimits,
    /// The time limit the host puts on an in-process plugin's calls when
    /// its manifest sets none (`--call-timeout`; default 60 s): a removed
    /// plugin's calls in flight are waited for that long (and a second)
    /// before its name is freed for another plugin.
    pub call_timeout: Duration,
    /// When and how often crashed isolated plugins are restarted.
    pub supervision: SupervisionPolicy,
    /// Construct every in-process plugin once in a throw-away runner before
    /// loading it (a manifest's `"preflight": true` asks the same for one
    /// plugin): a constructor that crashes leaves the plugin FAILED instead
    /// of taking the host down.
    pub preflight: bool,
    /// The interpreter of Python plugins whose manifest names none
    /// (`--python`, `FORGESYTE_PYTHON`); `None`: `python3` on `PATH`.
    pub python: Option<PathBuf>,
    /// Also load the installed Python plugins: the entry points of group
    /// `forgesyte.plugins` that [`python`](Self::python) (else `python3` on
    /// `PATH`) sees ([`crate::entry_points`]), after the plugin directories
    /// (`--python-entry-points`, `FORGESYTE_PYTHON_ENTRY_POINTS`).
    pub python_entry_points: bool,
    /// The plugins directory may be missing: it is the default one, not
    /// named, and installed plugins are loaded
    /// ([`python_entry_points`](Self::python_entry_points)). Its absence is
    /// then said at INFO at each pass, not as a WARN.
    pub plugins_dir_optional: bool,
    /// Confine the runners of isolated and Python plugins (Landlock, a
    /// network namespace, a scrubbed environment; see [`crate::sandbox`]).
    /// On by default (`--confine off` turns it off).
    pub confine: bool,
    /// Refuse (FAILED, `ImportError: confinement is required …`) every
    /// plugin that would run unconfined: in the server's process, with
    /// `confine` off, or in a runner that could not enforce every part of
    /// its sandbox (which then refuses before any plugin code is opened or
    /// imported) (`--require-confinement`, `FORGESYTE_REQUIRE_CONFINEMENT`).
    pub require_confinement: bool,
    /// This host runs no GPU plugins (`--no-gpu`): a plugin that declares
    /// `requires_gpu` does not count for readiness, as if it were
    /// `optional` (its GPU check is the checker's: the server gives it a
    /// GPU probe that reports none, [`forgesyte_deps::NoGpu`]).
    pub no_gpu: bool,
    /// The user isolated and Python runners run as (`--runner-user`; only
    /// a root host can drop to it); `None`: the host's own.
    pub runner_user: Option<crate::sandbox::RunAs>,
    /// The public keys plugin signatures are checked against
    /// (`--trusted-keys`, `FORGESYTE_TRUSTED_KEYS`; see
    /// [`crate::signature`]). Empty: every signed plugin is `invalid`.
    pub trusted_keys: TrustedKeys,
    /// Refuse (FAILED) every plugin whose signature is not `signed`,
    /// before anything of it is opened or started (`--require-signed`,
    /// `FORGESYTE_REQUIRE_SIGNED`). Off: signatures are only reported.
    pub require_signed: bool,
    /// Whose manifests may widen their runner's sandbox
    /// (`--sandbox-widening`; signed plugins only by default). Only
    /// consulted when runners are confined.
    pub sandbox_widening: crate::sandbox::SandboxWidening,
    /// Load every in-process library from a sealed memory file of its
    /// bytes, its first load too (a reload always does): a library written
    /// over in place (`cp` onto it, a truncation) then changes nothing
    /// that is mapped, where the file mapped at its path took the host
    /// down with `SIGBUS` at the next call, or as its old instance was
    /// dropped. The server sets it with `--watch`, where files change
    /// under a running server by design; it costs a copy of each library
    /// and its `$ORIGIN`.
    pub copy_libraries: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            lib_paths: Vec::new(),
            max_manifest_bytes: manifest::DEFAULT_MAX_MANIFEST_BYTES,
            threads: std::thread::available_parallelism().map_or(1, usize::from),
            default_isolation: Isolation::InProcess,
            runner: None,
            runner_args: Vec::new(),
            process: ProcessLimits::default(),
            call_timeout: Duration::from_secs(60),
            supervision: SupervisionPolicy::default(),
            preflight: false,
            python: None,
            python_entry_points: false,
            plugins_dir_optional: false,
            confine: true,
            require_confinement: false,
            no_gpu: false,
            runner_user: None,
            trusted_keys: TrustedKeys::default(),
            require_signed: false,
            sandbox_widening: crate::sandbox::SandboxWidening::default(),
            copy_libraries: false,
        }
    }
}
