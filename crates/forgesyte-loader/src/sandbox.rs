//! Confinement of plugin runners (isolated native and Python plugins).
//!
//! Owns the plan the host hands a runner ([`Confinement`], passed as
//! `--confine JSON`, made by [`Confinement::plan_checked`] from a
//! [`PlanInput`]) and the reading of a runner's report of it
//! ([`unconfined`]). Its submodules own the rest: what a manifest asks of
//! its sandbox (`sandbox/spec.rs`: [`SandboxSpec`], `network`,
//! `filesystem`, `env`, and [`SandboxWidening`]), the runner's user and
//! scratch directory (`sandbox/scratch.rs`: [`RunAs`], [`scratch_dir`]),
//! and the plan's application in the native runner (`sandbox/apply.rs`:
//! [`apply()`], Landlock through the `landlock` crate, a network namespace
//! through `unshare`, and a seccomp filter for what neither rules:
//! `sandbox/seccomp.rs`), each re-exported here. The Python runner applies
//! the same plan itself (`confine` in `python/runner/confine.py`), so both
//! runtimes get one policy.
//!
//! The plan allows reading the plugin directory, its declared models and
//! library directories, the system's shared libraries and a few system files
//! (see [`SYSTEM_READ`]); writing its scratch directory only; its devices
//! (`/dev/null` and the like, GPU devices when it needs a GPU). Everything
//! else is denied: `/etc/shadow`, other plugins' directories, `/tmp`, the
//! server's home. A runner that cannot apply a part says so in its hello
//! (`unconfined: why`), and the plugin still runs.
//!
//! Knows nothing of HTTP, the registry or supervision.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

mod apply;
mod remove_tree;
mod scratch;
mod seccomp;
mod spec;

pub use self::apply::{
    CAPABILITIES_DROPPED, CAPABILITIES_NONE, MEMORY_PRIVATE, NETWORK_NO_SOCKETS, SCOPES, apply,
};
pub use self::scratch::{RunAs, first_scratch_dir, remove_scratch_dir, scratch_dir};
pub use self::spec::{SandboxSpec, SandboxWidening, parse_spec};
pub use seccomp::{SYSCALLS_IPC, SYSCALLS_NO_SOCKETS};

/// What every confined runner may read: the system's shared libraries and
/// programs, the dynamic loader's cache, time zones, certificates, name
/// resolution files, and `/proc` and `/sys` (CPU counts, its own status).
pub const SYSTEM_READ: &[&str] = &[
    "/usr",
    "/lib",
    "/lib64",
    "/lib32",
    "/bin",
    "/sbin",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/localtime",
    "/etc/timezone",
    // Not all of `/etc/ssl`: `/etc/ssl/private` holds the host's TLS keys,
    // which a root runner (no capabilities, but root's files) could read.
    "/etc/ssl/certs",
    "/etc/ssl/openssl.cnf",
    "/etc/ca-certificates",
    "/etc/alternatives",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/mime.types",
    "/proc",
    "/sys",
];

/// Devices every confined runner may read and write.
const DEVICES: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/full",
    "/dev/random",
    "/dev/urandom",
];

/// GPU devices, for plugins that need a GPU: the driver's control and
/// memory devices, the capability devices MIG instances are reached
/// through (`/dev/nvidia-caps`, and the IMEX channels of multi-node
/// memory), and the render nodes (video decode, EGL).
const GPU_DEVICES: &[&str] = &[
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
    "/dev/nvidia-caps",
    "/dev/nvidia-caps-imex-channels",
    "/dev/dri",
];

/// Environment variables every runner keeps (the runtime's own needs),
/// besides those the manifest declares and `LC_*`.
pub const RUNTIME_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "TZ",
    "PYTHONPATH",
    "PYTHONHOME",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONHASHSEED",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "MALLOC_ARENA_MAX",
    forgesyte_protocol::wire::PROTOCOL_ENV,
];

/// The sandbox plan a runner applies to itself before any plugin code runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confinement {
    /// Paths it may read (and execute).
    pub read: Vec<PathBuf>,
    /// Paths it may write (its scratch directory, and what the manifest
    /// adds).
    pub write: Vec<PathBuf>,
    /// Devices it may read and write.
    pub devices: Vec<PathBuf>,
    /// Whether it keeps the network.
    pub network: bool,
    /// Its whole environment: the host starts the runner with exactly
    /// these variables, or hands a zygote's runner their values through its
    /// spawn (never through the zygote's memory). Only their names go on
    /// the runner's command line ([`Self::to_arg`]), which any local user
    /// may read in `/proc`.
    #[serde(skip)]
    pub env: BTreeMap<String, String>,
    /// Whether the runner must refuse to load the plugin when any part of
    /// the plan could not be enforced (`--require-confinement`): it then
    /// answers `import_failed` (kind `NotConfined`) before any of the
    /// plugin's code is opened or imported.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
}

/// The parts every confined runner reports (the Python runner's too); a
/// runner that leaves one out ignored that part of its plan.
pub const REPORTED_PARTS: [&str; 6] = [
    "env",
    "network",
    "filesystem",
    "capabilities",
    "memory",
    "syscalls",
];

/// What of a runner's confinement `report` (its hello's `confinement`)
/// is not enforced, in one line (`part: unconfined: why; ...`, a part of
/// [`REPORTED_PARTS`] left out: `part: not reported`), parts in the order
/// of their names; `None` when every part is. No report at all is unconfined as a whole.
pub fn unconfined(report: Option<&BTreeMap<String, String>>) -> Option<String> {
    let Some(report) = report else {
        return Some("it reported no confinement".to_owned());
    };
    let missing = REPORTED_PARTS
        .iter()
        .filter(|part| !report.contains_key(**part))
        .map(|part| format!("{part}: not reported"));
    let mut parts: Vec<String> = report
        .iter()
        .filter(|(_, value)| value.starts_with("unconfined"))
        .map(|(part, value)| format!("{part}: {value}"))
        .chain(missing)
        .collect();
    parts.sort();
    (!parts.is_empty()).then(|| parts.join("; "))
}

/// What a runner handed a plan says of its confinement, as the host
/// shows it: `report` with every part of [`REPORTED_PARTS`] it left out
/// (all of them when it sent no report) said `unconfined: not reported by
/// the runner`, and the names of those parts. So a runner that ignored its
/// plan (another `--runner`) never reads as `null`, which means a plugin
/// started with no plan at all (in process, or `--confine off`).
pub fn against_plan(
    report: Option<BTreeMap<String, String>>,
) -> (BTreeMap<String, String>, Vec<&'static str>) {
    let mut report = report.unwrap_or_default();
    let mut missing = Vec::new();
    for part in REPORTED_PARTS {
        if !report.contains_key(part) {
            report.insert(part.to_owned(), NOT_REPORTED.to_owned());
            missing.push(part);
        }
    }
    (report, missing)
}

/// How [`against_plan`] shows a part a runner did not report.
pub const NOT_REPORTED: &str = "unconfined: not reported by the runner";

/// What [`Confinement::plan`] needs of a plugin.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput<'a> {
    /// The plugin directory.
    pub plugin_dir: &'a Path,
    /// Its scratch directory (created already).
    pub scratch: &'a Path,
    /// What its manifest asks.
    pub spec: &'a SandboxSpec,
    /// Its declared models, resolved.
    pub models: &'a [PathBuf],
    /// Library directories the host searches (`--lib-path`).
    pub lib_paths: &'a [PathBuf],
    /// Environment variables its `env:` dependencies name.
    pub env_deps: &'a [String],
    /// Whether it needs a GPU.
    pub gpu: bool,
}

impl PlanInput<'_> {
    /// What the plugin asks beyond the default sandbox, in words (`the
    /// network`, `the environment variables A, B`, `reading P, Q`,
    /// `writing R`); empty when nothing. Its `env:` dependencies and its
    /// `models` outside its directory count too: both widen its sandbox as
    /// `env` and `filesystem.read` do. Variables every runner keeps
    /// (`PATH`, `LC_*` ...) and reads inside its own directory do not. A
    /// path is judged by where it resolves (a link inside the directory to
    /// `/` is outside), which is also the path the plan gives the runners;
    /// one that does not resolve (missing, or a link that leads nowhere
    /// yet) is judged by its text, and the plan leaves it out: it allows
    /// nothing, whatever appears there later. [`Confinement::plan_checked`]
    /// gives this and the plan from one look at the filesystem.
    pub fn widening(&self) -> Vec<String> {
        self.resolve().widening(self)
    }

    /// The manifest's paths, each with where it resolves now (`None`: it
    /// does not).
    fn resolve(&self) -> Resolved {
        let resolve = |path: &Path| std::fs::canonicalize(path).ok();
        // (An absolute path replaces the directory it is joined to.)
        let joined = |p: &String| self.plugin_dir.join(p);
        Resolved {
            dir: resolve(self.plugin_dir),
            reads: self
                .spec
                .read
                .iter()
                .map(|p| (p.clone(), resolve(&joined(p))))
                .collect(),
            writes: self
                .spec
                .write
                .iter()
                .map(|p| resolve(&joined(p)))
                .collect(),
            models: self
                .models
                .iter()
                .map(|m| (m.clone(), resolve(m)))
                .collect(),
        }
    }
}

/// A plugin's manifest paths as one look at the filesystem found them: the
/// plan and the widening check are made from the same answers, so a link
/// that changes in between cannot make them disagree.
struct Resolved {
    /// The plugin directory, resolved.
    dir: Option<PathBuf>,
    /// `filesystem.read` as written, and where each resolves.
    reads: Vec<(String, Option<PathBuf>)>,
    /// Where each `filesystem.write` resolves.
    writes: Vec<Option<PathBuf>>,
    /// Each model path, and where it resolves.
    models: Vec<(PathBuf, Option<PathBuf>)>,
}

/// What a plugin's manifest asks beyond the default sandbox
/// ([`Confinement::plan_checked`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Asks {
    /// Each widening, in words ([`PlanInput::widening`]): granted to whom
    /// the server's policy says.
    pub widening: Vec<String>,
    /// The manifest's paths written inside the plugin's directory that
    /// lead out of it through a link (`data/settings.cfg` → `/etc/shadow`),
    /// and those written under one of its write grants that resolve
    /// elsewhere (a link the runner may have made there:
    /// `/var/cache/ocr/models` → `/`): granted only by
    /// `--sandbox-widening allow`. A signature covers the
    /// manifest's text, never where a link in the directory leads, which
    /// anyone who can write there may change after signing.
    pub links_out: Vec<String>,
}

impl Resolved {
    /// See [`Asks::links_out`].
    fn links_out(&self, input: &PlanInput<'_>) -> Vec<String> {
        let dir = input.plugin_dir;
        // Where the runner may write, and so make links: its directory's
        // paths are judged above; any other path written under one of its
        // write grants that resolves elsewhere leads through a link it may
        // have made (`/var/cache/ocr/models` → `/`).
        let writable: Vec<PathBuf> = input.spec.write.iter().map(|p| dir.join(p)).collect();
        // How a path leads out, in words; `None` when it does not.
        let out = |written: &Path, real: Option<&PathBuf>| -> Option<&'static str> {
            if inside_by_text(written, dir) {
                return (!self.inside(written, real, dir))
                    .then_some("a link leads it out of the plugin's directory");
            }
            real.is_some_and(|real| {
                real.as_path() != written
                    && writable
                        .iter()
                        .any(|w| written != w.as_path() && inside_by_text(written, w))
            })
            .then_some("a link under a path the plugin may write leads it elsewhere")
        };
        let reads = self.reads.iter().filter_map(|(p, real)| {
            out(&dir.join(p), real.as_ref()).map(|how| format!("reading {p} ({how})"))
        });
        let writes = input
            .spec
            .write
            .iter()
            .zip(&self.writes)
            .filter_map(|(p, real)| {
                out(&dir.join(p), real.as_ref()).map(|how| format!("writing {p} ({how})"))
            });
        let models = self.models.iter().filter_map(|(m, real)| {
            out(m, real.as_ref()).map(|how| format!("reading {} ({how})", m.display()))
        });
        reads.chain(writes).chain(models).collect()
    }

    /// Whether `path` (resolved to `real`, or not) is inside the plugin
    /// directory.
    fn inside(&self, path: &Path, real: Option<&PathBuf>, dir: &Path) -> bool {
        match (real, &self.dir) {
            (Some(real), Some(real_dir)) => real.starts_with(real_dir),
            _ => inside_by_text(path, dir),
        }
    }

    /// See [`PlanInput::widening`].
    fn widening(&self, input: &PlanInput<'_>) -> Vec<String> {
        let dir = input.plugin_dir;
        let mut asks = Vec::new();
        if input.spec.network {
            asks.push("the network".to_owned());
        }
        let mut env: Vec<&str> = input
            .spec
            .env
            .iter()
            .chain(input.env_deps)
            .map(String::as_str)
            .filter(|name| !kept_anyway(name))
            .collect();
        env.sort_unstable();
        env.dedup();
        if !env.is_empty() {
            asks.push(format!("the environment variables {}", env.join(", ")));
        }
        let reads: Vec<String> = self
            .reads
            .iter()
            .filter(|(p, real)| !self.inside(&dir.join(p), real.as_ref(), dir))
            .map(|(p, _)| p.clone())
            .chain(
                self.models
                    .iter()
                    .filter(|(m, real)| !self.inside(m, real.as_ref(), dir))
                    .map(|(m, _)| m.display().to_string()),
            )
            .collect();
        if !reads.is_empty() {
            asks.push(format!("reading {}", reads.join(", ")));
        }
        if !input.spec.write.is_empty() {
            asks.push(format!("writing {}", input.spec.write.join(", ")));
        }
        asks
    }
}

/// This process's environment: the variables whose name and value are
/// UTF-8 (the others cannot be written in a plan).
pub(crate) fn host_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

/// The variables of this process's environment that every runner keeps
/// (the runtime's own: `PATH`, `LC_*` ...): what a Python zygote of
/// confined runners starts with.
pub(crate) fn runtime_env() -> impl Iterator<Item = (String, String)> {
    host_env().filter(|(name, _)| kept_anyway(name))
}

/// Whether every runner keeps the variable `name` (the runtime's own).
fn kept_anyway(name: &str) -> bool {
    RUNTIME_ENV.contains(&name) || name.starts_with("LC_")
}

/// Whether `path` is `dir` or under it, read without the filesystem: a
/// `..` anywhere after `dir` counts as outside.
fn inside_by_text(path: &Path, dir: &Path) -> bool {
    path.strip_prefix(dir).is_ok_and(|rest| {
        rest.components().all(|c| {
            matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    })
}

impl Confinement {
    /// The plan for one plugin, its environment taken from `host_env` (the
    /// server's). See [`Confinement::plan_checked`].
    pub fn plan(
        input: PlanInput<'_>,
        host_env: impl IntoIterator<Item = (String, String)>,
    ) -> Confinement {
        Self::plan_checked(input, host_env).0
    }

    /// The plan for one plugin, and what it asks beyond the default
    /// sandbox ([`PlanInput::widening`]), from one look at the filesystem.
    /// Every path of the plan is where it resolves now, with no link left
    /// in it: the runners open each without following links (a path a
    /// plugin turned into a link since, in a directory it may write, allows
    /// nothing), at every start, restarts included. A manifest path that
    /// does not resolve is left out (it allows nothing until the plugin is
    /// loaded again); the host's own paths (system, devices, `--lib-path`)
    /// that do not are kept as written, for a device that appears later.
    pub fn plan_checked(
        input: PlanInput<'_>,
        host_env: impl IntoIterator<Item = (String, String)>,
    ) -> (Confinement, Asks) {
        let resolved = input.resolve();
        let asks = Asks {
            widening: resolved.widening(&input),
            links_out: resolved.links_out(&input),
        };
        let host = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let mut read: Vec<PathBuf> = SYSTEM_READ.iter().map(|p| host(Path::new(p))).collect();
        read.push(
            resolved
                .dir
                .clone()
                .unwrap_or_else(|| input.plugin_dir.to_path_buf()),
        );
        read.extend(resolved.models.iter().filter_map(|(_, real)| real.clone()));
        read.extend(input.lib_paths.iter().map(|p| host(p)));
        read.extend(resolved.reads.iter().filter_map(|(_, real)| real.clone()));
        let mut write = vec![host(input.scratch)];
        write.extend(resolved.writes.iter().flatten().cloned());
        let mut devices: Vec<PathBuf> = DEVICES.iter().map(|p| host(Path::new(p))).collect();
        if input.gpu {
            devices.extend(GPU_DEVICES.iter().map(|p| host(Path::new(p))));
            devices.extend((0..16).map(|i| host(Path::new(&format!("/dev/nvidia{i}")))));
        }
        let keep = |name: &str| {
            kept_anyway(name)
                || input.spec.env.iter().any(|n| n == name)
                || input.env_deps.iter().any(|n| n == name)
        };
        let mut env: BTreeMap<String, String> =
            host_env.into_iter().filter(|(k, _)| keep(k)).collect();
        let scratch = input.scratch.to_string_lossy().into_owned();
        env.insert("TMPDIR".into(), scratch.clone());
        env.insert("HOME".into(), scratch);
        let plan = Confinement {
            read,
            write,
            devices,
            network: input.spec.network,
            env,
            required: false,
        };
        (plan, asks)
    }

    /// The plan as the runner's `--confine` argument: its environment as
    /// the list of the variables' names, not their values.
    ///
    /// A path that is not UTF-8 cannot be written in JSON: it is left out,
    /// and so allows nothing (the whole plan failed to serialise, and the
    /// runner refused a plan of `null`: every plugin of the server failed
    /// over one odd `--lib-path` entry). Written lossily it could name
    /// another path, and allow that.
    pub fn to_arg(&self) -> String {
        let utf8 = |paths: &[PathBuf]| -> Vec<String> {
            paths
                .iter()
                .filter_map(|p| match p.to_str() {
                    Some(text) => Some(text.to_owned()),
                    None => {
                        tracing::warn!(path = %p.display(), "a path that is not UTF-8 is left out of a runner's sandbox: it allows nothing");
                        None
                    }
                })
                .collect()
        };
        let mut plan = serde_json::json!({
            "read": utf8(&self.read),
            "write": utf8(&self.write),
            "devices": utf8(&self.devices),
            "network": self.network,
            "env": self.env.keys().collect::<Vec<_>>(),
        });
        if self.required {
            plan["required"] = true.into();
        }
        plan.to_string()
    }
}

#[cfg(test)]
mod tests;
