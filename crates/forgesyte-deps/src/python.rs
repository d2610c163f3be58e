//! The Python-package seam and its real implementation: one run of the
//! plugin's interpreter answers for many packages, without importing any.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use forgesyte_errors::shorten;

/// What an interpreter answered for one query of [`PythonProbe::find`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PythonAnswer {
    /// Not found: no such module or distribution.
    Missing,
    /// Found (a package query; for a version query, a module of that name
    /// but no installed distribution to read its version from).
    Found,
    /// The installed distribution's version as its metadata gives it (a
    /// `=NAME` query).
    Version(String),
}

/// Asks a Python interpreter which packages it could import.
pub trait PythonProbe: Send + Sync + Debug {
    /// For each of `packages`, in order, whether `interpreter` can import
    /// it, found **without importing it**: the top-level package (`torch`
    /// for `torch.cuda`) is looked up with `importlib.util.find_spec`, as
    /// the seed did; a name with `-` (a distribution's, `opencv-python`) by
    /// its installed metadata. A query `=NAME` asks for the version of the
    /// installed distribution `NAME` instead (from its metadata, also
    /// without importing anything).
    ///
    /// `Err` when the interpreter could not answer (it does not start,
    /// fails, times out, or answers nonsense); the message begins with the
    /// interpreter's path (`/usr/bin/python3: timed out after 10 s`). An
    /// empty `packages` answers `Ok(vec![])`.
    fn find(&self, interpreter: &Path, packages: &[String]) -> Result<Vec<PythonAnswer>, String>;
}

/// The script the interpreter runs: package names in `sys.argv[1:]`, one
/// JSON list out, a boolean per name; per `=NAME` version query the
/// version (cut to 200 bytes), else whether a module of that name is
/// found (`true`: a module, but no distribution to read a version from). The working directory's entry (`''`) is
/// dropped from `sys.path` so nothing is found by accident where it runs.
///
/// A name is found as a module (a dotted one through namespace packages,
/// whose parts are looked up without importing anything: `google.protobuf`
/// is not found because `google.auth` is installed; under a regular
/// package its first part stands for it, as finding a submodule would
/// import the package), else as an installed distribution by its metadata
/// (`opencv-python`, whose module is `cv2`; `Pillow`, `PyYAML`: names
/// normalised as `pip` does), also without importing anything.
const FIND_SCRIPT: &str = r#"import sys, json, importlib.util, importlib.machinery
if sys.path and sys.path[0] == "":
    del sys.path[0]
def module_found(name):
    parts = name.split(".")
    spec = importlib.util.find_spec(parts[0])
    for part in parts[1:]:
        if spec is None:
            return False
        if spec.origin is not None or not spec.submodule_search_locations:
            return True
        spec = importlib.machinery.PathFinder.find_spec(part, list(spec.submodule_search_locations))
    return spec is not None
def found(name):
    try:
        if "-" not in name and module_found(name):
            return True
        from importlib import metadata
        metadata.distribution(name)
        return True
    except Exception:
        return False
def answer(query):
    if not query.startswith("="):
        return found(query)
    try:
        from importlib import metadata
        version = metadata.version(query[1:])
        if version:
            cut = version.encode("utf-8")[:200].decode("utf-8", "ignore")
            return version if cut == version else cut + "..."
    except Exception:
        pass
    try:
        return "-" not in query and module_found(query[1:])
    except Exception:
        return False
sys.stdout.write("\x1eforgesyte-answer\x1e" + json.dumps([answer(q) for q in sys.argv[1:]]))
"#;

/// The oldest Python the host's scripts and its Python runner run on.
pub const MIN_PYTHON: (u32, u32) = (3, 8);

/// The lines that begin every piece of Python code the host hands an
/// interpreter (`-c`: the dependency check, the entry-point discovery, the
/// runner and its zygote). First the working directory leaves `sys.path`:
/// `-c` puts it first (`''`), before the standard library, so a
/// `json.py` or `contextvars.py` in the server's working directory was
/// imported by the runner's own imports, unconfined and before any
/// signature check (from a review); no `-P` (Python 3.11) or `-I` (which
/// drops `PYTHONPATH` too) on the oldest supported Python. Then an
/// interpreter older than [`MIN_PYTHON`] (Python 2 reads this much too)
/// exits at once with code 78 and one sentence on stderr, `ForgeSyte needs
/// Python 3.8 or newer; /usr/bin/python2 is Python 2.7`, instead of
/// failing somewhere in the code that follows.
pub fn python_version_gate() -> String {
    let (major, minor) = MIN_PYTHON;
    format!(
        "import sys\n\
         if sys.path and sys.path[0] == '':\n    del sys.path[0]\n\
         if sys.version_info < ({major}, {minor}):\n    \
         sys.stderr.write('ForgeSyte needs Python {major}.{minor} or newer; '\n        \
         '%s is Python %d.%d\\n' % ((sys.executable or 'this interpreter',) + tuple(sys.version_info[:2])))\n    \
         sys.exit(78)\n"
    )
}

/// What the host's Python scripts print just before their JSON answer, so
/// that whatever else reaches stdout (a `.pth` file or `sitecustomize`
/// printing as the interpreter starts, an `atexit` hook as it ends) is told
/// apart from it. In the scripts' Python source it is written
/// `"\x1eforgesyte-answer\x1e"`.
pub const ANSWER_MARKER: &str = "\x1eforgesyte-answer\x1e";

/// The JSON answer that a host script run by `who` printed after the last
/// [`ANSWER_MARKER`] in `out`; output before the marker or after the
/// answer is ignored.
///
/// # Errors
///
/// No marker, or no JSON of type `T` after it: `WHO: unexpected output …`
/// quoting the output.
pub fn script_answer<T: serde::de::DeserializeOwned>(
    who: &std::path::Path,
    out: &[u8],
) -> Result<T, String> {
    let text = String::from_utf8_lossy(out);
    // Quoted in an error: the answer when there is one (never the marker),
    // else the whole output.
    let unexpected = |why: &str, quoted: &str| {
        format!(
            "{}: unexpected output{why} {:?}",
            who.display(),
            shorten(quoted.trim(), QUOTE_LIMIT)
        )
    };
    // No marker at all: whatever ran is no Python running the script (a
    // `--python` that names another program, a wrapper that ignores its
    // arguments), and the message says so first.
    let at = text.rfind(ANSWER_MARKER).ok_or_else(|| {
        unexpected(
            " (it did not answer as a Python 3 interpreter does: is it one?)",
            &text,
        )
    })?;
    let answer = &text[at + ANSWER_MARKER.len()..];
    serde_json::Deserializer::from_str(answer)
        .into_iter::<T>()
        .next()
        .ok_or_else(|| unexpected(" (no answer)", answer))?
        .map_err(|e| unexpected(&format!(" ({e})"), answer))
}

/// The longest stdout or stderr read from the interpreter.
const OUTPUT_LIMIT: u64 = 4 << 20;

/// The longest stderr line quoted in an error.
const QUOTE_LIMIT: usize = 200;

/// Runs the interpreter (through [`run_python`]): `INTERPRETER -sB -c SCRIPT
/// pkg1 pkg2 …`, working directory `/`, stdin closed, stdout and stderr
/// captured, the process environment inherited (so `PYTHONPATH` and
/// virtual environments work).
///
/// The run is killed after the timeout (10 s by default) and the call
/// returns: a hung interpreter never hangs the load pass.
#[derive(Debug, Clone, Copy)]
pub struct SystemPython {
    timeout: Duration,
    run_as: Option<(u32, u32)>,
}

impl SystemPython {
    /// The default timeout for one interpreter run.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

    /// A probe with the default timeout.
    pub fn new() -> Self {
        SystemPython {
            timeout: Self::DEFAULT_TIMEOUT,
            run_as: None,
        }
    }

    /// This probe, running interpreters as user `uid` and group `gid` (the
    /// host's runner user): the interpreter a plugin's manifest names is
    /// the plugin's own code, and never runs with the host's privileges.
    pub fn as_user(self, uid: u32, gid: u32) -> Self {
        SystemPython {
            run_as: Some((uid, gid)),
            ..self
        }
    }

    /// A probe whose runs are killed after `timeout`.
    pub fn with_timeout(timeout: Duration) -> Self {
        SystemPython {
            timeout,
            run_as: None,
        }
    }

    /// The timeout for one run.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }
}

impl Default for SystemPython {
    fn default() -> Self {
        SystemPython::new()
    }
}

impl PythonProbe for SystemPython {
    fn find(&self, interpreter: &Path, packages: &[String]) -> Result<Vec<PythonAnswer>, String> {
        if packages.is_empty() {
            return Ok(Vec::new());
        }
        let who = interpreter.display();
        // No user site directory (`pip install --user`): the runners never
        // see one (a confined runner's HOME is its scratch directory), so a
        // package found only there would pass the check and fail to import.
        let code = format!("{}{FIND_SCRIPT}", python_version_gate());
        let mut args = vec![OsStr::new("-sB"), OsStr::new("-c"), OsStr::new(&code)];
        args.extend(packages.iter().map(OsStr::new));
        let out = run_python_as(interpreter, &args, self.timeout, self.run_as)?;
        let values = script_answer::<Vec<serde_json::Value>>(interpreter, &out)?;
        let found = values
            .iter()
            .map(|value| match value {
                serde_json::Value::Bool(false) => Some(PythonAnswer::Missing),
                serde_json::Value::Bool(true) => Some(PythonAnswer::Found),
                serde_json::Value::String(version) if version.len() <= MAX_VERSION => {
                    Some(PythonAnswer::Version(version.clone()))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                let text = serde_json::Value::from(values).to_string();
                format!("{who}: unexpected answer {:?}", shorten(&text, QUOTE_LIMIT))
            })?;
        if found.len() != packages.len() {
            return Err(format!(
                "{who}: answered {} results for {} packages",
                found.len(),
                packages.len()
            ));
        }
        Ok(found)
    }
}

/// The longest version string taken from an interpreter's answer.
const MAX_VERSION: usize = 256;

/// `search_path` (`PYTHONPATH`: entries separated by `:`) with each
/// relative entry made absolute against `cwd`; an empty entry between two,
/// Python's "the working directory", becomes `cwd` itself, and an empty
/// value or last entry, which Python ignores, is left out (it put the
/// server's working directory on the check's path).
fn absolute_search_path(search_path: &OsStr, cwd: &Path) -> std::ffi::OsString {
    use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
    let mut out = Vec::with_capacity(search_path.len());
    // As Python reads it: an empty value is no entry at all, and neither is
    // an empty last entry (`lib:`); an empty one between two is the working
    // directory.
    let bytes = search_path.as_bytes();
    let bytes = bytes.strip_suffix(b":").unwrap_or(bytes);
    if bytes.is_empty() {
        return std::ffi::OsString::new();
    }
    for (i, entry) in bytes.split(|&b| b == b':').enumerate() {
        if i > 0 {
            out.push(b':');
        }
        let entry = Path::new(OsStr::from_bytes(entry));
        if entry.is_absolute() {
            out.extend_from_slice(entry.as_os_str().as_bytes());
        } else {
            out.extend_from_slice(cwd.join(entry).as_os_str().as_bytes());
        }
    }
    std::ffi::OsString::from_vec(out)
}

/// Runs `interpreter ARGS…` to the end and returns what it wrote to
/// stdout: working directory `/`, stdin closed, stdout and stderr captured
/// (at most 4 MiB each), the environment inherited (so `PYTHONPATH` and
/// virtual environments work), in a process group of its own that is
/// killed with it after `timeout`, so a hung interpreter (or what it
/// started) never hangs the caller. `Err` begins with the interpreter's
/// path and says what happened (cannot start, exit status and the last
/// line of stderr, timeout).
pub fn run_python(
    interpreter: &Path,
    args: &[&OsStr],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    run_python_as(interpreter, args, timeout, None)
}

/// [`run_python`] as user and group `run_as` when given (a host running
/// as root drops to its runner user).
pub fn run_python_as(
    interpreter: &Path,
    args: &[&OsStr],
    timeout: Duration,
    run_as: Option<(u32, u32)>,
) -> Result<Vec<u8>, String> {
    use std::os::unix::process::CommandExt as _;
    let who = interpreter.display();
    // It runs in `/`: a relative path means one from here.
    let program = std::path::absolute(interpreter).unwrap_or_else(|_| interpreter.to_path_buf());
    let mut command = Command::new(program);
    if let Some((uid, gid)) = run_as {
        command.uid(uid).gid(gid);
    }
    // Python reads `PYTHONPATH`'s relative entries from its working
    // directory: the caller's, not `/`.
    if let (Some(path), Ok(cwd)) = (std::env::var_os("PYTHONPATH"), std::env::current_dir()) {
        command.env("PYTHONPATH", absolute_search_path(&path, &cwd));
    }
    command.args(args).current_dir("/");
    run_captured(command, &who.to_string(), timeout)
}

/// Runs `command` as [`run_python_as`] runs an interpreter (stdin closed,
/// stdout and stderr captured, a process group of its own killed with it
/// after `timeout`) and returns its stdout; `Err` begins with `who`.
pub(crate) fn run_captured(
    mut command: Command,
    who: &str,
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    use std::os::unix::process::CommandExt as _;
    let deadline = Instant::now() + timeout;
    command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    crate::restore_open_file_limit(&mut command);
    let mut child = command
        .spawn()
        .map_err(|e| format!("{who}: cannot start: {e}"))?;
    let mut pipes = [
        Captured::of(child.stdout.take()),
        Captured::of(child.stderr.take()),
    ];
    let status = match drain_until_exit(&mut child, &mut pipes, deadline) {
        Ok(Some(status)) => status,
        Ok(None) => {
            kill_group(&mut child);
            return Err(format!("{who}: timed out after {timeout:?} (killed)"));
        }
        Err(e) => {
            kill_group(&mut child);
            return Err(format!("{who}: cannot wait for it: {e}"));
        }
    };
    // The child has exited and its group is killed: its pipes close,
    // unless a grandchild of a session of its own holds them (a `.pth`
    // file's daemon). What the child wrote is in by then: after
    // [`AFTER_EXIT`] the reads end with what they have, and the pipes are
    // closed here (the daemon keeps no thread or descriptor of ours).
    // (Past the deadline too: a child that exited just before it has its
    // output read.)
    let after_exit = Instant::now() + AFTER_EXIT;
    while drain(&mut pipes, after_exit) {}
    let [out, err] = pipes.map(|pipe| pipe.bytes);
    if !status.success() {
        let detail = match last_line(&err) {
            Some(line) => format!(": {line}"),
            None => String::new(),
        };
        let how = match (
            status.code(),
            std::os::unix::process::ExitStatusExt::signal(&status),
        ) {
            (Some(code), _) => format!("exited with status {code}"),
            (None, Some(signal)) => format!("was killed by signal {signal}"),
            (None, None) => "was killed by a signal".to_string(),
        };
        return Err(format!("{who}: {how}{detail}"));
    }
    out.ok_or_else(|| format!("{who}: its output could not be read in time"))
}

/// Kills the child's process group and the child, and reaps it.
fn kill_group(child: &mut Child) {
    kill_only_group(child);
    let _ = child.kill();
    let _ = child.wait();
}

/// Where the child stands, without reaping it: `Some(false)` running,
/// `Some(true)` ended but not reaped (its pid, and so its process group's
/// id, stays reserved), `None` reaped already (or no pid to ask about).
fn look(child: &Child) -> Option<bool> {
    use rustix::process::{Pid, WaitId, WaitIdOptions, waitid};
    let pid = i32::try_from(child.id()).ok().and_then(Pid::from_raw)?;
    let options = WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT;
    // ECHILD: reaped already.
    waitid(WaitId::Pid(pid), options)
        .ok()
        .map(|status| status.is_some())
}

/// Whether the child has ended (reaped or not).
fn ended(child: &Child) -> bool {
    look(child) != Some(false)
}

/// `SIGKILL` to the child's process group, unless the child was reaped
/// (whose pid may name another process's group by now). Reaps nothing.
fn kill_only_group(child: &Child) {
    if look(child).is_some()
        && let Some(pgid) = i32::try_from(child.id())
            .ok()
            .and_then(rustix::process::Pid::from_raw)
    {
        let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
    }
}

/// How long, once an interpreter has exited, its pipes are read for what
/// is left in them before the reads end with what they have: a process
/// it left behind in a session of its own (a `.pth` file's daemon) may
/// hold them open for good (discovery waited its whole 15 s for it, and
/// failed with a complete answer in hand).
const AFTER_EXIT: Duration = Duration::from_millis(500);

/// One of the child's output pipes, read on the caller's thread: the
/// bytes so far (at most [`OUTPUT_LIMIT`]), and the pipe while it is open.
struct Captured {
    pipe: Option<std::os::fd::OwnedFd>,
    /// `None` when there was no pipe.
    bytes: Option<Vec<u8>>,
}

impl Captured {
    fn of(pipe: Option<impl Into<std::os::fd::OwnedFd>>) -> Captured {
        let pipe = pipe.map(Into::into);
        let bytes = pipe.as_ref().map(|_| Vec::new());
        Captured { pipe, bytes }
    }

    /// Reads what is there (the pipe was ready); closed at its end, on an
    /// error, or past [`OUTPUT_LIMIT`].
    fn read_ready(&mut self) {
        let (Some(pipe), Some(bytes)) = (&self.pipe, &mut self.bytes) else {
            return;
        };
        let mut chunk = [0u8; 8192];
        match rustix::io::read(pipe, &mut chunk) {
            // Interrupted: read again at the next poll.
            Err(rustix::io::Errno::INTR) => {}
            Ok(0) | Err(_) => self.pipe = None,
            Ok(n) => {
                let room = usize::try_from(OUTPUT_LIMIT)
                    .unwrap_or(usize::MAX)
                    .saturating_sub(bytes.len());
                bytes.extend_from_slice(&chunk[..n.min(room)]);
                if n >= room {
                    self.pipe = None;
                }
            }
        }
    }
}

/// Waits on the pipes still open, at most until `until` (and at most
/// 20 ms: the caller looks at its child in between), and reads what is
/// ready. `false` once every pipe is closed or `until` has passed.
fn drain(pipes: &mut [Captured; 2], until: Instant) -> bool {
    use rustix::event::{PollFd, PollFlags, Timespec, poll};
    let now = Instant::now();
    if now >= until || pipes.iter().all(|p| p.pipe.is_none()) {
        return false;
    }
    let wait = (until - now).min(Duration::from_millis(20));
    let timeout = Timespec::try_from(wait).unwrap_or(Timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    });
    let ready: Vec<bool> = {
        let mut fds: Vec<PollFd<'_>> = pipes
            .iter()
            .filter_map(|p| p.pipe.as_ref())
            .map(|fd| PollFd::new(fd, PollFlags::IN))
            .collect();
        match poll(&mut fds, Some(&timeout)) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            // Nothing to wait on (cannot be): the reads end here.
            Err(_) => return false,
        }
        fds.iter().map(|fd| !fd.revents().is_empty()).collect()
    };
    let mut ready = ready.into_iter();
    for pipe in pipes.iter_mut().filter(|p| p.pipe.is_some()) {
        if ready.next() == Some(true) {
            pipe.read_ready();
        }
    }
    true
}

/// Reads the pipes while the child runs, until it exits (its status) or
/// `deadline` (`Ok(None)`, still running): a child that fills a pipe
/// is never left blocked on it.
fn drain_until_exit(
    child: &mut Child,
    pipes: &mut [Captured; 2],
    deadline: Instant,
) -> std::io::Result<Option<ExitStatus>> {
    loop {
        if ended(child) {
            // What it left running in its group (a daemon holding its
            // stdout would hold the answer back to the deadline) goes
            // first, while its pid still names the group; then it is reaped.
            kill_only_group(child);
            return child.wait().map(Some);
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        if !drain(pipes, deadline) {
            // Both pipes closed: only the child to wait for.
            std::thread::sleep(
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(5)),
            );
        }
    }
}

/// The last non-blank line of stderr, shortened.
fn last_line(err: &Option<Vec<u8>>) -> Option<String> {
    let text = String::from_utf8_lossy(err.as_deref()?).into_owned();
    text.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .map(|l| shorten(l, QUOTE_LIMIT))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gate lets this machine's Python 3 through, and stops an
    /// interpreter older than its minimum (here the tuple compared made one
    /// no Python has reached) with exit code 78 and a sentence naming both
    /// versions.
    #[test]
    fn the_version_gate_stops_an_older_python_with_its_version() {
        let run = |code: String| {
            std::process::Command::new("python3")
                .args(["-c", &code])
                .output()
                .expect("python3 runs")
        };
        let passed = run(format!("{}print('past the gate')", python_version_gate()));
        assert!(passed.status.success(), "{passed:?}");
        assert_eq!(String::from_utf8_lossy(&passed.stdout), "past the gate\n");
        let (major, minor) = MIN_PYTHON;
        let future = python_version_gate().replace(&format!("({major}, {minor})"), "(99, 0)");
        assert_ne!(
            future,
            python_version_gate(),
            "the minimum is written as a tuple"
        );
        let stopped = run(format!("{future}print('past the gate')"));
        assert_eq!(stopped.status.code(), Some(78), "{stopped:?}");
        assert!(stopped.stdout.is_empty(), "{stopped:?}");
        let said = String::from_utf8_lossy(&stopped.stderr);
        assert!(
            said.starts_with("ForgeSyte needs Python 3.8 or newer; ")
                && said.contains(" is Python 3."),
            "{said}"
        );
    }

    /// The working directory is not on `sys.path` after the gate: a module
    /// there named as one of the standard library's is not imported by
    /// the code that follows.
    #[test]
    fn after_the_gate_the_working_directory_shadows_no_module() {
        let dir = std::env::temp_dir().join(format!("fs-gate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch directory");
        std::fs::write(dir.join("json.py"), "raise SystemExit('the shadow ran')\n")
            .expect("a shadow module");
        let output = std::process::Command::new("python3")
            .current_dir(&dir)
            .args([
                "-su",
                "-c",
                &format!(
                    "{}import json\nprint(json.dumps(sys.path[0]))",
                    python_version_gate()
                ),
            ])
            .output()
            .expect("python3 runs");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(output.status.success(), "{output:?}");
        assert_ne!(String::from_utf8_lossy(&output.stdout).trim(), "\"\"");
    }

    #[test]
    fn empty_question_needs_no_interpreter() {
        assert_eq!(
            SystemPython::new().find(Path::new("/nonexistent/python"), &[]),
            Ok(vec![])
        );
    }

    #[test]
    fn relative_search_path_entries_are_made_absolute() {
        let cwd = Path::new("/work/here");
        // Python takes an empty last entry for none, an empty one between
        // two for the working directory.
        assert_eq!(
            absolute_search_path(OsStr::new("../pp:/abs/site::lib:"), cwd),
            OsStr::new("/work/here/../pp:/abs/site:/work/here/:/work/here/lib")
        );
        assert_eq!(absolute_search_path(OsStr::new(""), cwd), OsStr::new(""));
        assert_eq!(absolute_search_path(OsStr::new(":"), cwd), OsStr::new(""));
        assert_eq!(
            absolute_search_path(OsStr::new("/a"), cwd),
            OsStr::new("/a")
        );
    }

    #[test]
    fn last_line_is_the_last_non_blank_one() {
        let err = Some(b"Traceback\n  File x\nValueError: boom\n\n".to_vec());
        assert_eq!(last_line(&err).as_deref(), Some("ValueError: boom"));
        assert_eq!(last_line(&Some(b"\n  \n".to_vec())), None);
        assert_eq!(last_line(&None), None);
    }

    /// Writes an executable shell script into `dir`.
    #[cfg(unix)]
    fn script(dir: &Path, name: &str, body: &str) -> std::path::PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    /// `start()`, retried while another test thread's fork still holds a
    /// freshly written script open (`ETXTBSY`): that fork ends at its own
    /// `exec`, so the wait is short.
    fn when_not_busy<T>(mut start: impl FnMut() -> Result<T, String>) -> Result<T, String> {
        let mut tries = 0;
        loop {
            match start() {
                Err(e) if e.contains("Text file busy") && tries < 20 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                answer => return answer,
            }
        }
    }

    /// `find` of a test script, [`when_not_busy`].
    fn find(
        probe: SystemPython,
        interpreter: &Path,
        packages: &[&str],
    ) -> Result<Vec<bool>, String> {
        let packages: Vec<String> = packages.iter().map(|p| p.to_string()).collect();
        when_not_busy(|| probe.find(interpreter, &packages))
            .map(|found| found.iter().map(present).collect())
    }

    /// A module query's answer as a boolean.
    fn present(answer: &PythonAnswer) -> bool {
        *answer != PythonAnswer::Missing
    }

    #[test]
    fn a_missing_interpreter_is_named() {
        let err = find(
            SystemPython::new(),
            Path::new("/nonexistent/python3"),
            &["json"],
        )
        .unwrap_err();
        assert!(
            err.starts_with("/nonexistent/python3: cannot start: "),
            "{err}"
        );
    }

    /// An interpreter that leaves a daemon of its own session behind,
    /// holding its stdout (a `.pth` file that starts one), is answered
    /// once it has exited, not at the timeout.
    #[cfg(unix)]
    #[test]
    fn a_daemon_holding_the_output_does_not_hold_the_answer_back() {
        let dir = tempfile::tempdir().unwrap();
        let python = script(dir.path(), "py", "exec python3 \"$@\"");
        let started = Instant::now();
        let out = when_not_busy(|| {
            run_python(
                &python,
                &[
                    OsStr::new("-c"),
                    OsStr::new(
                        "import subprocess, sys\n\
                         subprocess.Popen(['sleep', '8'], start_new_session=True)\n\
                         sys.stdout.write('the answer')\n",
                    ),
                ],
                Duration::from_secs(15),
            )
        })
        .unwrap();
        assert_eq!(out, b"the answer");
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
    }

    /// Once the answer is in, the pipes a daemon still holds are closed on
    /// this side: the daemon's next write finds no reader. (Two threads
    /// and two descriptors stayed blocked in reads for as long as the
    /// daemon lived, at each discovery and probe.)
    #[cfg(unix)]
    #[test]
    fn the_pipes_a_daemon_holds_are_let_go_once_the_answer_is_in() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("no-reader");
        let daemon = format!(
            "import sys, time\n\
             time.sleep(1.5)\n\
             try:\n\
             \x20   sys.stdout.write('late'); sys.stdout.flush()\n\
             except BrokenPipeError:\n\
             \x20   open({marker:?}, 'w').close()\n",
            marker = marker.display().to_string()
        );
        let code = format!(
            "import subprocess, sys\n\
             subprocess.Popen([sys.executable, '-c', {daemon:?}], start_new_session=True)\n\
             sys.stdout.write('the answer')\n"
        );
        let python = script(dir.path(), "py", "exec python3 \"$@\"");
        let out = when_not_busy(|| {
            run_python(
                &python,
                &[OsStr::new("-c"), OsStr::new(&code)],
                Duration::from_secs(15),
            )
        })
        .unwrap();
        assert_eq!(out, b"the answer");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !marker.exists() {
            assert!(
                Instant::now() < deadline,
                "the daemon's write still found a reader"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    #[cfg(unix)]
    #[test]
    fn failures_name_the_interpreter_and_what_happened() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let fails = script(
            d,
            "fails",
            "echo first >&2; echo 'SyntaxError: bad' >&2; exit 3",
        );
        assert_eq!(
            find(SystemPython::new(), &fails, &["json"]),
            Err(format!(
                "{}: exited with status 3: SyntaxError: bad",
                fails.display()
            ))
        );
        let silent = script(d, "silent", "exit 1");
        assert_eq!(
            find(SystemPython::new(), &silent, &["json"]),
            Err(format!("{}: exited with status 1", silent.display()))
        );
        let chatty = script(d, "chatty", "echo hello");
        assert_eq!(
            find(SystemPython::new(), &chatty, &["json"]),
            Err(format!(
                "{}: unexpected output (it did not answer as a Python 3 interpreter does: is it \
                 one?) \"hello\"",
                chatty.display()
            ))
        );
        let short = script(d, "short", "printf '\\036forgesyte-answer\\036[true]'");
        assert_eq!(
            find(SystemPython::new(), &short, &["a", "b"]),
            Err(format!(
                "{}: answered 1 results for 2 packages",
                short.display()
            ))
        );
        // The arguments: -sB -c SCRIPT then the packages, in order.
        let echo = script(
            d,
            "echo",
            r#"[ "$1" = -sB ] && [ "$2" = -c ] && [ "$(pwd)" = / ] || exit 9; shift 3; [ "$*" = "a b.c" ] || exit 8; printf '\036forgesyte-answer\036[true, false]'"#,
        );
        assert_eq!(
            find(SystemPython::new(), &echo, &["a", "b.c"]),
            Ok(vec![true, false])
        );
        // What else reaches stdout (a `.pth` file printing as the
        // interpreter starts, an `atexit` hook as it ends) is not the answer.
        let noisy = script(
            d,
            "noisy",
            r#"echo '[false, false]'; printf '\036forgesyte-answer\036[true, false]'; echo ' bye [1]'"#,
        );
        assert_eq!(
            find(SystemPython::new(), &noisy, &["a", "b.c"]),
            Ok(vec![true, false])
        );
        // An answer that is no answer is quoted without the marker.
        let odd = script(
            d,
            "odd",
            r#"echo 'noise'; printf '\036forgesyte-answer\036{"oops": 1}'"#,
        );
        assert_eq!(
            find(SystemPython::new(), &odd, &["a"]),
            Err(format!(
                "{}: unexpected output (invalid type: map, expected a sequence at line 1 column 0) \"{{\\\"oops\\\": 1}}\"",
                odd.display()
            ))
        );
    }

    /// A name with `-` is a distribution's: found by its metadata (here a
    /// `.dist-info` on `PYTHONPATH`), never as a module.
    #[cfg(unix)]
    #[test]
    fn a_distribution_name_is_found_by_its_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let site = dir.path().join("site");
        let info = site.join("fake_dist-1.0.dist-info");
        std::fs::create_dir_all(&info).unwrap();
        std::fs::write(
            info.join("METADATA"),
            "Metadata-Version: 2.1\nName: fake-dist\nVersion: 1.0\n",
        )
        .unwrap();
        let python = script(
            dir.path(),
            "python",
            &format!("PYTHONPATH={} exec python3 \"$@\"", site.display()),
        );
        assert_eq!(
            find(
                SystemPython::new(),
                &python,
                &["fake-dist", "other-dist", "json"]
            ),
            Ok(vec![true, false, true])
        );
        // Spelt without `-` (`Pillow`, `PyYAML` are distributions whose
        // modules are named otherwise): found by metadata too. Under a
        // namespace package (`google.*`) each part is looked for: one
        // distribution's part says nothing of another's.
        std::fs::create_dir_all(site.join("nsp").join("auth")).unwrap();
        std::fs::write(site.join("nsp").join("auth").join("__init__.py"), "").unwrap();
        assert_eq!(
            find(
                SystemPython::new(),
                &python,
                &[
                    "fake_dist",
                    "nsp",
                    "nsp.auth",
                    "nsp.protobuf",
                    "json.decoder"
                ]
            ),
            Ok(vec![true, true, true, false, true])
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_hung_interpreter_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        // Not `exec`: the `sleep` grandchild keeps the pipes open after the
        // shell is killed, and must not hold the call up either.
        let hangs = script(
            dir.path(),
            "hangs",
            "sleep 3; printf '\\036forgesyte-answer\\036[true]'",
        );
        let started = Instant::now();
        let err = find(
            SystemPython::with_timeout(Duration::from_millis(300)),
            &hangs,
            &["json"],
        )
        .unwrap_err();
        assert_eq!(
            err,
            format!("{}: timed out after 300ms (killed)", hangs.display())
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
    }

    /// An interpreter that answers and exits, leaving a process of its own
    /// that holds its stdout (a daemon from a `.pth` file, a wrapper's
    /// background job): the answer stands, at once, and that process goes
    /// with the interpreter's group.
    #[cfg(unix)]
    #[test]
    fn a_process_left_behind_neither_holds_the_answer_back_nor_outlives_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("daemon.pid");
        let leaves = script(
            dir.path(),
            "leaves",
            &format!(
                "sleep 30 & echo $! > {}; printf '\\036forgesyte-answer\\036[true]'",
                pid_file.display()
            ),
        );
        let started = Instant::now();
        assert_eq!(
            find(
                SystemPython::with_timeout(Duration::from_secs(5)),
                &leaves,
                &["json"]
            ),
            Ok(vec![true])
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let daemon = std::fs::read_to_string(&pid_file).unwrap();
        let proc_dir = format!("/proc/{}", daemon.trim());
        let deadline = Instant::now() + Duration::from_secs(2);
        while std::fs::read_to_string(format!("{proc_dir}/stat"))
            .is_ok_and(|stat| !stat.contains(") Z "))
        {
            assert!(
                Instant::now() < deadline,
                "the daemon {proc_dir} outlived the check"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn defaults() {
        assert_eq!(SystemPython::default().timeout(), Duration::from_secs(10));
        assert_eq!(
            SystemPython::with_timeout(Duration::from_secs(1)).timeout(),
            Duration::from_secs(1)
        );
    }
}
