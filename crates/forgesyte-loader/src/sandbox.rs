//! Confinement of plugin runners (isolated native and Python plugins).
//!
//! Owns three things: what a manifest asks of its sandbox ([`SandboxSpec`]:
//! `network`, `filesystem`, `env`), the plan the host hands a runner
//! ([`Confinement`], passed as `--confine JSON`), and its application in the
//! native runner ([`apply`]: Landlock through the `landlock` crate, a network
//! namespace through `unshare`, a seccomp filter for what neither rules:
//! `sandbox/seccomp.rs`). The Python runner applies the same plan
//! itself (`confine` in `python/runner/confine.py`), so both runtimes get one policy.
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

use forgesyte_errors::ManifestError;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod seccomp;
pub use seccomp::{SYSCALLS_IPC, SYSCALLS_NO_SOCKETS};

/// What a manifest asks of its runner's sandbox.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SandboxSpec {
    /// `network`: the runner keeps the host's network (default: none).
    pub network: bool,
    /// `filesystem.read`: more paths it may read (relative to the plugin
    /// directory, or absolute).
    pub read: Vec<String>,
    /// `filesystem.write`: more paths it may write.
    pub write: Vec<String>,
    /// `env`: names of the server's environment variables it may see.
    pub env: Vec<String>,
}

/// Whose manifests may widen their sandbox (`--sandbox-widening`): a
/// manifest comes with the plugin, so what it asks for is the plugin
/// author's wish, granted by the operator's policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SandboxWidening {
    /// Every plugin's manifest.
    Allow,
    /// Only the manifests of plugins signed by a trusted key (their
    /// manifest is among the signed files): the default.
    #[default]
    Signed,
    /// No manifest: every runner gets the default sandbox or is refused.
    Deny,
}

impl SandboxWidening {
    /// Whether a plugin whose signature is (`signed`) or is not `signed`
    /// by a trusted key gets what its manifest asks.
    pub fn grants(self, signed: bool) -> bool {
        match self {
            SandboxWidening::Allow => true,
            SandboxWidening::Signed => signed,
            SandboxWidening::Deny => false,
        }
    }

    /// To whom the policy grants widening, and how to change it: the end
    /// of the reason of a plugin it refuses.
    pub fn grants_whom(self) -> &'static str {
        match self {
            SandboxWidening::Allow => "to every plugin",
            SandboxWidening::Signed => {
                "only to plugins signed by a trusted key (--sandbox-widening signed): sign it, or start the server with --sandbox-widening allow"
            }
            SandboxWidening::Deny => {
                "to no plugin (--sandbox-widening deny): start the server with --sandbox-widening signed or allow"
            }
        }
    }
}

impl std::str::FromStr for SandboxWidening {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "allow" => Ok(SandboxWidening::Allow),
            "signed" => Ok(SandboxWidening::Signed),
            "deny" => Ok(SandboxWidening::Deny),
            other => Err(format!("{other:?}: expected allow, signed or deny")),
        }
    }
}

/// Parses `network`, `filesystem` and `env` of a manifest object.
///
/// # Errors
///
/// A field of the wrong type, naming it.
pub fn parse_spec(obj: &Map<String, Value>) -> Result<SandboxSpec, ManifestError> {
    let wrong = |field: &str, expected: &str| ManifestError::InvalidField {
        field: field.into(),
        message: format!("expected {expected}"),
    };
    let strings = |value: Option<&Value>, field: &str| -> Result<Vec<String>, ManifestError> {
        match value {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) if !s.is_empty() && !s.contains('\0') => Ok(s.clone()),
                    _ => Err(wrong(field, "a list of non-empty strings")),
                })
                .collect(),
            Some(_) => Err(wrong(field, "a list of strings")),
        }
    };
    let network = match obj.get("network") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(wrong("network", "true or false")),
    };
    let (read, write) = match obj.get("filesystem") {
        None | Some(Value::Null) => (Vec::new(), Vec::new()),
        Some(Value::Object(fs)) => {
            if let Some(key) = fs.keys().find(|k| *k != "read" && *k != "write") {
                return Err(wrong(
                    &format!("filesystem.{key}"),
                    "only 'read' and 'write'",
                ));
            }
            (
                strings(fs.get("read"), "filesystem.read")?,
                strings(fs.get("write"), "filesystem.write")?,
            )
        }
        Some(_) => return Err(wrong("filesystem", "an object with 'read' and 'write'")),
    };
    let env = strings(obj.get("env"), "env")?;
    Ok(SandboxSpec {
        network,
        read,
        write,
        env,
    })
}

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
        let out = |written: &Path, real: Option<&PathBuf>| {
            if inside_by_text(written, dir) {
                return !self.inside(written, real, dir);
            }
            real.is_some_and(|real| {
                real.as_path() != written
                    && writable
                        .iter()
                        .any(|w| written != w.as_path() && inside_by_text(written, w))
            })
        };
        let reads = self
            .reads
            .iter()
            .filter(|(p, real)| out(&dir.join(p), real.as_ref()))
            .map(|(p, _)| format!("reading {p}"));
        let writes = input
            .spec
            .write
            .iter()
            .zip(&self.writes)
            .filter(|(p, real)| out(&dir.join(p), real.as_ref()))
            .map(|(p, _)| format!("writing {p}"));
        let models = self
            .models
            .iter()
            .filter(|(m, real)| out(m, real.as_ref()))
            .map(|(m, _)| format!("reading {}", m.display()));
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

/// The unprivileged user runners run as (`--runner-user`), when the server
/// runs as root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RunAs {
    /// Its user id.
    pub uid: u32,
    /// Its primary group id (its only group: supplementary groups are
    /// dropped).
    pub gid: u32,
}

impl RunAs {
    /// Makes `command` start as this user and group. (The standard library
    /// drops the supplementary groups too when a root process changes its
    /// user.)
    pub(crate) fn set_on(self, command: &mut std::process::Command) {
        use std::os::unix::process::CommandExt;
        command.uid(self.uid).gid(self.gid);
    }
}

/// The scratch directory of `plugin`: `DIR/forgesyte-scratch-UID/PLUGIN`
/// under the system's temporary directory, created private (0700) and owned
/// by the user its runner runs as (`owner`, else this process's user). The
/// plugin's name is made safe as one path component.
///
/// # Errors
///
/// When it cannot be created, or is not a private directory of that user's.
pub fn scratch_dir(plugin: &str, owner: Option<RunAs>) -> std::io::Result<PathBuf> {
    scratch_dir_in(&std::env::temp_dir(), plugin, owner)
}

/// [`scratch_dir`] under `tmp`.
///
/// The temporary directory is everyone's: another local user may have made
/// either level first, or put a symbolic link there. So each level is
/// opened without following links, must be a directory owned by this
/// process's user or the runner's, and gets its owner and mode through its
/// handle, never by path (a `chown` by path followed a planted link: a
/// server running as root handed the link's target, `/etc`, to the runner).
fn scratch_dir_in(tmp: &Path, plugin: &str, owner: Option<RunAs>) -> std::io::Result<PathBuf> {
    use rustix::fs::{CWD, Mode, OFlags};
    let me = rustix::process::geteuid().as_raw();
    let uid = owner.map_or(me, |o| o.uid);
    let name: String = plugin
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = if name.is_empty() || name.chars().all(|c| c == '.') {
        "_".to_owned()
    } else {
        name
    };
    let root = tmp.join(format!("forgesyte-scratch-{uid}"));
    let dir = root.join(&name);
    // One level: made if missing, opened without following a link, checked
    // and handed to the runner's user through the handle.
    let level = |at: std::os::fd::BorrowedFd<'_>,
                 component: &Path,
                 shown: &Path|
     -> std::io::Result<rustix::fd::OwnedFd> {
        match rustix::fs::mkdirat(at, component, Mode::RWXU) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = rustix::fs::openat(
            at,
            component,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| {
            std::io::Error::other(format!(
                "{} is not a directory ({e}); a link there is not followed",
                shown.display()
            ))
        })?;
        let stat = rustix::fs::fstat(&fd)?;
        if stat.st_uid != me && stat.st_uid != uid {
            return Err(std::io::Error::other(format!(
                "{} belongs to another user (uid {}); remove it",
                shown.display(),
                stat.st_uid
            )));
        }
        if stat.st_uid != uid {
            let gid = owner.map(|o| rustix::fs::Gid::from_raw(o.gid));
            rustix::fs::fchown(&fd, Some(rustix::fs::Uid::from_raw(uid)), gid)?;
        }
        rustix::fs::fchmod(&fd, Mode::RWXU)?;
        Ok(fd)
    };
    use std::os::fd::AsFd;
    let root_fd = level(CWD, &root, &root)?;
    level(root_fd.as_fd(), Path::new(&name), &dir)?;
    Ok(dir)
}

/// Applies `plan` to this process (the native runner, before it opens the
/// plugin's library): a network namespace of its own unless the plan keeps
/// the network, then Landlock, capabilities dropped, not dumpable, and the
/// seccomp filter. The environment is the host's to set (it
/// starts the native runner with the plan's environment). Returns what was
/// enforced, part by part.
#[allow(unsafe_code)]
pub fn apply(plan: &Confinement) -> BTreeMap<String, String> {
    let mut report = BTreeMap::new();
    report.insert("env".to_owned(), "scrubbed".to_owned());
    // SAFETY: `NEWNET` leaves the file descriptor table alone (the hazard
    // `unshare_unsafe` names is `FILES`); it runs before the runner starts
    // any thread.
    let namespace = (!plan.network)
        .then(|| unsafe { rustix::thread::unshare_unsafe(rustix::thread::UnshareFlags::NEWNET) });
    let mut left_out = Vec::new();
    let filesystem = match landlock(plan, &mut left_out) {
        Ok(text) => text,
        Err(e) => format!("unconfined: {e}"),
    };
    report.insert("filesystem".to_owned(), filesystem);
    if !left_out.is_empty() {
        report.insert("unreachable".to_owned(), left_out.join("; "));
    }
    if scope() {
        report.insert("scopes".to_owned(), SCOPES.to_owned());
    }
    report.insert("capabilities".to_owned(), drop_capabilities());
    report.insert("memory".to_owned(), not_dumpable());
    // Last: nothing above makes a socket, and the runner reads its
    // shared-memory socket (already open) only later.
    let syscalls = seccomp::install(plan.network);
    let filtered = !syscalls.starts_with("unconfined");
    report.insert("syscalls".to_owned(), syscalls);
    let network = match namespace {
        None => "allowed".to_owned(),
        Some(Ok(())) => "isolated: a network namespace of its own".to_owned(),
        // Landlock's TCP rights alone are no isolation (TCP Fast Open's
        // `sendto`, a `listen` without `bind`, UDP): no socket at all is.
        Some(Err(_)) if filtered => NETWORK_NO_SOCKETS.to_owned(),
        Some(Err(e)) => format!("unconfined: no network namespace ({e})"),
    };
    report.insert("network".to_owned(), network);
    report
}

/// What the hello's `network` says of a runner without the network that
/// could not make a network namespace (a runner of another user: that needs
/// `CAP_SYS_ADMIN`) but whose seccomp filter refuses every new socket (the
/// Python runner says the same).
pub const NETWORK_NO_SOCKETS: &str =
    "isolated: no network namespace (it may not make one), and no new socket (the seccomp filter)";

/// What the hello's `memory` says of a runner that made itself not
/// dumpable (the Python runner says the same).
pub const MEMORY_PRIVATE: &str = "not dumpable: its /proc files (its memory, its open files) \
     are root's, closed to the other processes of a runner user that is not root";

/// Makes this process not dumpable: its `/proc/PID` files belong to root,
/// so the other processes of a runner user that is not root cannot open
/// its memory, its descriptors (the memory files that carry frames) or its
/// environment there, whatever Landlock can or cannot rule. No core dump
/// is written when it crashes.
fn not_dumpable() -> String {
    use rustix::process::{DumpableBehavior, set_dumpable_behavior};
    match set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        Ok(()) => MEMORY_PRIVATE.to_owned(),
        Err(e) => format!("unconfined: cannot make it not dumpable ({e})"),
    }
}

/// What the hello's `capabilities` says of a runner that held some and
/// dropped them all (the Python runner says the same).
pub const CAPABILITIES_DROPPED: &str =
    "dropped: all of them (a root runner keeps uid 0, not root's privileges)";
/// ... and of a runner that held none to drop.
pub const CAPABILITIES_NONE: &str = "none held";

/// Drops every capability of this process, last step of its confinement
/// (the network namespace needed `CAP_SYS_ADMIN`): the bounding set (while
/// `CAP_SETPCAP` still allows it), the ambient set, then the effective,
/// permitted and inheritable sets. A root runner without `--runner-user`
/// then keeps uid 0 but cannot load a kernel module, `setns` into another
/// process's namespaces through `/proc`, trace a process, mount, or read
/// files it does not own.
fn drop_capabilities() -> String {
    use rustix::io::Errno;
    use rustix::thread::{
        CapabilitySet, CapabilitySets, capabilities, clear_ambient_capability_set,
        remove_capability_from_bounding_set, set_capabilities,
    };
    let held = match capabilities(None) {
        Ok(held) => held,
        Err(e) => return format!("unconfined: cannot read them ({e})"),
    };
    let none = CapabilitySet::empty();
    let held_any = held.effective != none || held.permitted != none || held.inheritable != none;
    if held.effective.contains(CapabilitySet::SETPCAP) {
        // One by one up to the first the kernel does not know.
        for bit in 0..u64::BITS {
            match remove_capability_from_bounding_set(CapabilitySet::from_bits_retain(1 << bit)) {
                Ok(()) => {}
                Err(Errno::INVAL) => break,
                Err(e) => {
                    return format!("unconfined: cannot drop them from the bounding set ({e})");
                }
            }
        }
    }
    // No ambient set on kernels before 4.3: nothing to clear there.
    let _ = clear_ambient_capability_set();
    let empty = CapabilitySets {
        effective: none,
        permitted: none,
        inheritable: none,
    };
    match set_capabilities(None, empty) {
        Ok(()) if held_any => CAPABILITIES_DROPPED.to_owned(),
        Ok(()) => CAPABILITIES_NONE.to_owned(),
        Err(e) => format!("unconfined: cannot drop them ({e})"),
    }
}

/// What the hello's `scopes` says where Landlock scopes a runner (the
/// Python runner says the same).
pub const SCOPES: &str = "abstract Unix sockets and signals: its own processes only";

/// Landlock scopes (ABI 6), a layer of their own after [`landlock`]'s so an
/// older kernel's lack of them leaves that status as it was: this runner may
/// connect to abstract Unix sockets and signal processes only inside its own
/// Landlock domain, not another runner's (nor the host's). Whether they are
/// enforced.
fn scope() -> bool {
    use landlock::{Ruleset, RulesetAttr, RulesetStatus, Scope};
    Ruleset::default()
        .scope(Scope::AbstractUnixSocket | Scope::Signal)
        .and_then(|ruleset| ruleset.create())
        .and_then(|created| created.restrict_self())
        .is_ok_and(|status| status.ruleset == RulesetStatus::FullyEnforced)
}

/// The Landlock part of [`apply`]: what is enforced, and whether TCP is
/// denied.
fn landlock(
    plan: &Confinement,
    left_out: &mut Vec<String>,
) -> Result<String, landlock::RulesetError> {
    use landlock::{
        ABI, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
    };
    let abi = ABI::V5;
    let mut ruleset = Ruleset::default().handle_access(AccessFs::from_all(abi))?;
    if !plan.network {
        ruleset = ruleset.handle_access(AccessNet::from_all(abi))?;
    }
    let device = AccessFs::ReadFile | AccessFs::WriteFile | AccessFs::Truncate | AccessFs::IoctlDev;
    let status = ruleset
        .create()?
        .add_rules(rules_without_links(
            &plan.read,
            AccessFs::from_read(abi),
            abi,
            left_out,
        ))?
        .add_rules(rules_without_links(
            &plan.write,
            AccessFs::from_all(abi),
            abi,
            left_out,
        ))?
        .add_rules(rules_without_links(&plan.devices, device, abi, left_out))?
        .restrict_self()?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "confined: Landlock, fully enforced",
        RulesetStatus::PartiallyEnforced => {
            "confined: Landlock, partly enforced (an older kernel ABI)"
        }
        RulesetStatus::NotEnforced => "unconfined: this kernel does not enforce Landlock",
    }
    .to_owned())
}

/// Landlock rules allowing `access` beneath each of `paths` (a plan's,
/// which the host resolved: no link in them), each opened without following
/// a link (`openat2`, `RESOLVE_NO_SYMLINKS`): a path that became a link
/// since its plan was made (a plugin may make links where it may write)
/// allows nothing, not what the link leads to. A path that is not there
/// allows nothing either. A file gets the rights that apply to files.
/// A path left out for another reason than not being there (a link now, a
/// container refusing `openat2`, no permission) is added to `left_out`,
/// which the hello reports as `unreachable`: the plugin that then fails
/// with a bare permission error has its cause in its health.
fn rules_without_links<'a>(
    paths: &'a [PathBuf],
    access: landlock::BitFlags<landlock::AccessFs>,
    abi: landlock::ABI,
    left_out: &'a mut Vec<String>,
) -> impl Iterator<Item = Result<landlock::PathBeneath<std::os::fd::OwnedFd>, landlock::RulesetError>> + 'a
{
    use rustix::fs::{CWD, FileType, Mode, OFlags, ResolveFlags};
    paths.iter().filter_map(move |path| {
        let fd = match rustix::fs::openat2(
            CWD,
            path,
            OFlags::PATH | OFlags::CLOEXEC,
            Mode::empty(),
            ResolveFlags::NO_SYMLINKS,
        ) {
            Ok(fd) => fd,
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::NOTDIR) => return None,
            Err(e) => {
                left_out.push(unreachable_path(path, e));
                return None;
            }
        };
        let is_dir = rustix::fs::fstat(&fd)
            .is_ok_and(|st| FileType::from_raw_mode(st.st_mode) == FileType::Directory);
        let access = if is_dir {
            access
        } else {
            access & landlock::AccessFs::from_file(abi)
        };
        Some(Ok(landlock::PathBeneath::new(fd, access)))
    })
}

/// How the hello's `unreachable` names a plan path a runner could not open
/// (the Python runner's `_unreachable` says the same).
fn unreachable_path(path: &Path, e: rustix::io::Errno) -> String {
    let why = if e == rustix::io::Errno::LOOP {
        "a link now, which is not followed".to_owned()
    } else {
        std::io::Error::from(e).to_string()
    };
    format!("{}: {why}", path.display())
}

#[cfg(test)]
mod tests;
