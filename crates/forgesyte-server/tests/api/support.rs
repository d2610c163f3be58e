//! Shared helpers: the fake host, a response type, a tiny blocking HTTP
//! client, the server process guard, plugin directories of real libraries,
//! and the hostile-name generator.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use forgesyte_deps::fake::FakeWorld;
use forgesyte_loader::fake::{FakeBehavior, FakeImporter};
use forgesyte_loader::{Loader, LoaderConfig};
use forgesyte_registry::Registry;
use forgesyte_server::{AdminToken, AppState, ServerConfig, app};
use serde_json::{Value, json};
use tower::ServiceExt;

// ------------------------------------------------------------------ replies

/// An HTTP response, from the router or from the wire.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    pub(crate) status: u16,
    /// Lower-case names.
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Reply {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; fails the test (with the body) when it is not JSON
    /// or not labelled `application/json`.
    pub(crate) fn json(&self) -> Value {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "status {} body {}",
            self.status,
            self.text()
        );
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `detail` of an error body.
    pub(crate) fn detail(&self) -> String {
        self.json()["detail"]
            .as_str()
            .unwrap_or_else(|| panic!("no detail in {}", self.text()))
            .to_owned()
    }
}

// ------------------------------------------------------------- fake host

/// Every fake plugin of [`fake_host`], sorted by name, with its state after
/// the load pass.
pub(crate) const FAKE_PLUGINS: &[(&str, &str)] = &[
    ("bad-init", "FAILED"),
    ("broken-json", "FAILED"),
    ("good", "INITIALIZED"),
    ("init-panic", "FAILED"),
    ("needs-gpu", "UNAVAILABLE"),
    ("needs-lib", "UNAVAILABLE"),
    ("other", "INITIALIZED"),
    ("wrong-abi", "FAILED"),
];

/// A host over fake plugins (the loader's `FakeImporter`) on a fake
/// filesystem with no GPU, loaded, and the router over it.
pub(crate) struct FakeHost {
    pub(crate) app: Router,
    pub(crate) state: AppState,
}

pub(crate) fn fake_host(config: ServerConfig) -> FakeHost {
    let world = FakeWorld::new();
    let importer = FakeImporter::new();
    let add = |dir: &str, manifest: Value, behavior: Option<FakeBehavior>| {
        let lib = format!("/plugins/{dir}/lib{dir}.so");
        let mut manifest = manifest;
        if let Some(obj) = manifest.as_object_mut() {
            obj.entry("entrypoint")
                .or_insert_with(|| json!(format!("lib{dir}.so")));
        }
        world.fs.add_file(
            format!("/plugins/{dir}/manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        );
        world.fs.add_file(&lib, b"fake library".to_vec());
        if let Some(behavior) = behavior {
            importer.set(lib, behavior);
        }
    };
    add(
        "good",
        json!({"name": "good", "version": "1.0.0", "description": "A good fake",
               "x-extra": {"kept": [1, 2, 3]}}),
        Some(FakeBehavior::Good),
    );
    add(
        "other",
        json!({"name": "other", "version": "2.0.0"}),
        Some(FakeBehavior::Good),
    );
    add(
        "bad-init",
        json!({"name": "bad-init", "version": "0.1.0"}),
        Some(FakeBehavior::InitError("model weights missing".into())),
    );
    add(
        "init-panic",
        json!({"name": "init-panic"}),
        Some(FakeBehavior::InitPanic("constructor exploded".into())),
    );
    add(
        "wrong-abi",
        json!({"name": "wrong-abi"}),
        Some(FakeBehavior::WrongAbi),
    );
    add(
        "needs-gpu",
        json!({"name": "needs-gpu", "requires_gpu": true}),
        Some(FakeBehavior::Good),
    );
    add(
        "needs-lib",
        json!({"name": "needs-lib", "dependencies": ["lib:nosuchlib"]}),
        Some(FakeBehavior::Good),
    );
    world
        .fs
        .add_file("/plugins/broken-json/manifest.json", b"{ not json".to_vec());
    let loader = Loader::with_seams(
        Registry::new(),
        Arc::new(world.checker()),
        Arc::new(world.fs.clone()),
        Arc::new(importer),
        LoaderConfig {
            threads: 1,
            ..LoaderConfig::default()
        },
    );
    let report = loader.load_all(Path::new("/plugins"));
    assert_eq!(report.plugins.len(), FAKE_PLUGINS.len(), "{report:#?}");
    let state = AppState::new(Arc::new(loader), &config);
    FakeHost {
        app: app(state.clone()),
        state,
    }
}

/// A request through the router (`oneshot`). A non-empty body is sent as
/// `application/json`.
pub(crate) async fn send(app: &Router, method: &str, uri: &str, body: impl Into<Vec<u8>>) -> Reply {
    send_with(app, method, uri, &[], body).await
}

/// [`send`] with extra request headers.
pub(crate) async fn send_with(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: impl Into<Vec<u8>>,
) -> Reply {
    let body = body.into();
    let mut request = Request::builder().method(method).uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    if !body.is_empty() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(Body::from(body)).unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let headers = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_owned(),
                v.to_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap()
        .to_vec();
    Reply {
        status,
        headers,
        body,
    }
}

pub(crate) async fn get(app: &Router, uri: &str) -> Reply {
    send(app, "GET", uri, Vec::new()).await
}

pub(crate) async fn run(app: &Router, plugin: &str, tool: &str, body: &str) -> Reply {
    send(
        app,
        "POST",
        &format!("/v1/plugins/{plugin}/tools/{tool}/run"),
        body.as_bytes().to_vec(),
    )
    .await
}

// ------------------------------------------------- a world that changes

/// The admin token of [`world`].
pub(crate) const TOKEN: &str = "0123456789abcdef-admin";

/// A fake world the test can change between passes, and the app over it.
pub(crate) struct World {
    pub(crate) fake: FakeWorld,
    importer: Arc<FakeImporter>,
    pub(crate) app: Router,
}

impl World {
    /// Adds (or replaces) plugin directory `dir` with its manifest and a
    /// library whose opening does `behavior`.
    pub(crate) fn put(&self, dir: &str, manifest: Value, behavior: FakeBehavior) {
        let lib = format!("/plugins/{dir}/lib{dir}.so");
        let mut manifest = manifest;
        manifest["entrypoint"] = json!(format!("lib{dir}.so"));
        self.fake.fs.add_file(
            format!("/plugins/{dir}/manifest.json"),
            serde_json::to_vec(&manifest).unwrap(),
        );
        self.fake.fs.add_file(&lib, b"fake library".to_vec());
        self.importer.set(lib, behavior);
    }

    pub(crate) async fn post(&self, uri: &str, auth: Option<&str>) -> Reply {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        send_with(&self.app, "POST", uri, &headers, Vec::new()).await
    }

    pub(crate) async fn admin(&self, uri: &str) -> Reply {
        self.post(uri, Some(&format!("Bearer {TOKEN}"))).await
    }

    pub(crate) async fn health(&self, name: &str) -> Value {
        let reply = get(&self.app, &format!("/v1/plugins/{name}/health")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        reply.json()
    }
}

/// Plugins `good` (fine), `fixme` (its constructor fails) and `needs-lib`
/// (a missing library), loaded; the admin routes enabled when `token`.
pub(crate) fn world(token: Option<&str>) -> World {
    let fake = FakeWorld::new();
    let importer = Arc::new(FakeImporter::new());
    let loader = Loader::with_seams(
        Registry::new(),
        Arc::new(fake.checker()),
        Arc::new(fake.fs.clone()),
        importer.clone(),
        LoaderConfig {
            threads: 1,
            ..LoaderConfig::default()
        },
    );
    let mut config = ServerConfig::default();
    config.admin_token = token.and_then(AdminToken::new);
    let loader = Arc::new(loader);
    let world = World {
        fake,
        importer,
        app: app(AppState::new(Arc::clone(&loader), &config)),
    };
    world.put(
        "good",
        json!({"name": "good", "version": "1.0.0"}),
        FakeBehavior::Good,
    );
    world.put(
        "fixme",
        json!({"name": "fixme", "version": "1.0.0"}),
        FakeBehavior::InitError("model weights missing".into()),
    );
    world.put(
        "needs-lib",
        json!({"name": "needs-lib", "dependencies": ["lib:libfixed.so.1"]}),
        FakeBehavior::Good,
    );
    let report = loader.load_all(Path::new("/plugins"));
    assert_eq!(report.plugins.len(), 3, "{report:#?}");
    world
}

// ------------------------------------------------------------- HTTP client

/// One HTTP/1.1 request on a fresh connection (`Connection: close`); the
/// target is sent exactly as given.
pub(crate) fn http(addr: SocketAddr, method: &str, target: &str, body: &[u8]) -> Reply {
    try_http(addr, method, target, body).unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

pub(crate) fn try_http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
) -> std::io::Result<Reply> {
    try_http_with(addr, method, target, &[], body)
}

/// POST `path`, an admin route, to the server at `addr` with `token` as
/// its bearer token.
pub(crate) fn admin_post(addr: SocketAddr, path: &str, token: &str) -> Reply {
    let bearer = format!("Bearer {token}");
    http_with(
        addr,
        "POST",
        path,
        &[("Authorization", bearer.as_str())],
        b"",
    )
}

/// [`http`] with extra request headers.
pub(crate) fn http_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Reply {
    try_http_with(addr, method, target, headers, body)
        .unwrap_or_else(|e| panic!("{method} {target}: {e}"))
}

pub(crate) fn try_http_with(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Reply> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!(
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    let typed = headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("content-type"));
    if !body.is_empty() && !typed {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    if let Err(write) = stream.write_all(&bytes) {
        // The server may answer (a 413 by the stated length) and close
        // before the whole body is written: its answer is read all the same.
        let mut raw = Vec::new();
        let _ = stream.read_to_end(&mut raw);
        if raw.is_empty() {
            return Err(write);
        }
        return parse_reply(&raw, method);
    }
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // The server may reset after answering (e.g. 413 with body unread).
        Err(e) if !raw.is_empty() => eprintln!("read after answer: {e}"),
        Err(e) => return Err(e),
    }
    parse_reply(&raw, method)
}

/// The reply of a request of `method` (a HEAD reply has no body, whatever
/// its `Content-Length` says).
fn parse_reply(raw: &[u8], method: &str) -> std::io::Result<Reply> {
    let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_owned());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = std::str::from_utf8(&raw[..split]).map_err(|_| bad("head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("no status line"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let rest = &raw[split + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked"));
    let body = if method == "HEAD" {
        Vec::new()
    } else if chunked {
        dechunk(rest).ok_or_else(|| bad("bad chunked body"))?
    } else {
        match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, len)) => {
                let len: usize = len.parse().map_err(|_| bad("bad content-length"))?;
                rest.get(..len).ok_or_else(|| bad("short body"))?.to_vec()
            }
            None => rest.to_vec(),
        }
    };
    Ok(Reply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut rest: &[u8]) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line_end = rest.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&rest[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        rest = &rest[line_end + 2..];
        if size == 0 {
            return Some(body);
        }
        body.extend_from_slice(rest.get(..size)?);
        rest = rest.get(size + 2..)?;
    }
}

// ------------------------------------------------------------ the binary

/// The address a `forgesyte serve` says it listens on: the first line of
/// its `stdout`, `forgesyte listening on http://ADDR`; `Err` with the line
/// read when it is not that.
pub(crate) fn listening_addr(stdout: impl std::io::Read) -> Result<SocketAddr, String> {
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    line.trim()
        .strip_prefix("forgesyte listening on http://")
        .and_then(|addr| addr.parse().ok())
        .ok_or(line)
}

/// A running `forgesyte serve`; killed when dropped (also when a test fails).
pub(crate) struct Forgesyte {
    child: Child,
    pub(crate) addr: SocketAddr,
    log: PathBuf,
    _logdir: tempfile::TempDir,
}

impl Forgesyte {
    /// Starts `forgesyte serve --bind 127.0.0.1:0 ARGS…` and waits for its
    /// listening line.
    pub(crate) fn start(args: &[&str]) -> Forgesyte {
        Forgesyte::start_with_env(args, &[])
    }

    /// [`Forgesyte::start`] with extra environment variables.
    pub(crate) fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Forgesyte {
        Forgesyte::start_in(None, args, env)
    }

    /// [`Forgesyte::start_with_env`] in working directory `cwd` (that of
    /// the tests when `None`).
    pub(crate) fn start_in(cwd: Option<&Path>, args: &[&str], env: &[(&str, &str)]) -> Forgesyte {
        let logdir = tempfile::tempdir().unwrap();
        let log = logdir.path().join("stderr.log");
        let mut command = forgesyte_command();
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let mut child = command
            .arg("serve")
            .args(["--bind", "127.0.0.1:0"])
            .args(args)
            // `env` may set another filter.
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            // Its own process group, as a shell job: a signal to the group
            // is what a terminal's Ctrl-C does.
            .process_group(0)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = tx.send(line);
            }
        });
        let mut server = Forgesyte {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            _logdir: logdir,
        };
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("no listening line ({e}); log:\n{}", server.log()));
        let addr = line
            .strip_prefix("forgesyte listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        server.addr = addr.parse().unwrap();
        server
    }

    /// Waits until the startup load pass has finished (bounded).
    pub(crate) fn wait_loaded(&self) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let health = self.get("/v1/health").json();
            if health["status"] != "loading" {
                return health;
            }
            assert!(Instant::now() < deadline, "still loading: {health}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn get(&self, target: &str) -> Reply {
        http(self.addr, "GET", target, b"")
    }

    pub(crate) fn run(&self, plugin: &str, tool: &str, body: &str) -> Reply {
        http(
            self.addr,
            "POST",
            &format!("/v1/plugins/{plugin}/tools/{tool}/run"),
            body.as_bytes(),
        )
    }

    /// The server's process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server wrote to stderr so far.
    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit.
    pub(crate) fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        self.wait_exit(Duration::from_secs(20))
    }

    pub(crate) fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Forgesyte {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A child process killed and reaped when dropped: a test that fails
/// before it stops its server leaves none running.
pub(crate) struct Reaped(pub(crate) std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Says why a test, or a part of one, did not run, on the real stderr:
/// libtest captures `eprintln!` of a passing test, so the reason was never
/// seen.
pub(crate) fn say_skipped(why: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// `forgesyte ARGS…` (with `env` added) run to its end: exit code (-1 if
/// killed by a signal), stdout, stderr.
pub(crate) fn run_forgesyte(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = forgesyte_command()
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// [`run_forgesyte`] that fails the test when the command has not ended
/// within `secs` seconds (it is killed): for commands that must not wait.
pub(crate) fn run_forgesyte_within(args: &[&str], secs: u64) -> (i32, String, String) {
    let mut child = forgesyte_command()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{args:?}: still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// A FIFO at `path` (`mkfifo`).
pub(crate) fn make_fifo(path: &Path) {
    let made = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(made.success(), "mkfifo {}", path.display());
}

/// The `forgesyte` binary with no `FORGESYTE_*` variable inherited.
/// `kill SIG -- TARGET` (a pid, or `-PGID` for a process group), which must
/// succeed.
pub(crate) fn signal(target: &str, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, "--", target])
        .status()
        .unwrap();
    assert!(status.success(), "kill {sig} {target} failed");
}

pub(crate) fn forgesyte_command() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_forgesyte"));
    for var in [
        "FORGESYTE_PLUGINS_DIR",
        "FORGESYTE_BIND",
        "FORGESYTE_LIB_PATH",
        "FORGESYTE_CALL_TIMEOUT",
        "FORGESYTE_BODY_LIMIT",
        "FORGESYTE_BODY_MEMORY",
        "FORGESYTE_SHUTDOWN_GRACE",
        "FORGESYTE_ADMIN_TOKEN",
        "FORGESYTE_ADMIN_TOKEN_FILE",
        "FORGESYTE_PREFLIGHT",
        "FORGESYTE_ISOLATION",
        "FORGESYTE_RUNNER",
        "FORGESYTE_PYTHON",
        "FORGESYTE_PYTHON_ENTRY_POINTS",
        "FORGESYTE_PYTHON_ZYGOTE",
        "FORGESYTE_LOG_FORMAT",
        "FORGESYTE_CONFIG",
        "FORGESYTE_WATCH",
        "FORGESYTE_TRUSTED_KEYS",
        "FORGESYTE_REQUIRE_SIGNED",
        "FORGESYTE_KEY_PASSWORD",
    ] {
        command.env_remove(var);
    }
    command
}

/// The plugin `name` in a JSON list of plugin statuses (`/v1/plugins`,
/// `check --json`); panics naming the list when it is not there.
pub(crate) fn plugin_named(list: &Value, name: &str) -> Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} not in {list:#}"))
        .clone()
}

/// The good fixture library's file name (what [`PluginsDir::good`]
/// copies into a plugin directory).
pub(crate) fn good_library_name() -> String {
    Path::new(forgesyte_tests::zoo::GOOD_LIBRARY)
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The pid of the runner process the server `server_pid` started for
/// `plugin` (its command line names `--plugin PLUGIN`, or a zygote forked
/// it), if one is running.
pub(crate) fn runner_pid(server_pid: u32, plugin: &str) -> Option<u32> {
    // Python runners are forked by a zygote (a child of the server): they
    // share its command line, and carry the plugin's name (at most 15
    // bytes) as their process name.
    let children = children_of(server_pid);
    let grandchildren = children.iter().flat_map(|&pid| children_of(pid));
    let comm = &plugin.as_bytes()[..plugin.len().min(15)];
    children
        .clone()
        .into_iter()
        .chain(grandchildren)
        .find(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
            let named = args
                .windows(2)
                .any(|w| w[0] == b"--plugin" && w[1] == plugin.as_bytes());
            let forked = std::fs::read(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.strip_suffix(b"\n").unwrap_or(&c) == comm);
            // A zombie (a runner a stopped zygote never reaped) runs nothing.
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']))
            });
            (named || (forked && !children.contains(pid))) && !zombie
        })
}

/// The children of process `pid` (of all its threads).
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|text| {
            text.split_whitespace()
                .filter_map(|pid| pid.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

// ------------------------------------------------- real plugin directories

/// A temporary plugins directory of real plugin libraries.
pub(crate) struct PluginsDir {
    dir: tempfile::TempDir,
}

impl PluginsDir {
    pub(crate) fn new() -> PluginsDir {
        PluginsDir {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub(crate) fn path(&self) -> &Path {
        self.dir.path()
    }

    pub(crate) fn path_str(&self) -> &str {
        self.dir.path().to_str().unwrap()
    }

    /// A plugin `name` on a copy of the zoo's good library (tools `echo`,
    /// `fail`, `panic`, `sleep`, `config`), with `extra` manifest fields.
    pub(crate) fn good(&self, name: &str, extra: Value) -> &PluginsDir {
        let mut fields = json!({"description": format!("good library as {name}")});
        if let (Some(base), Some(extra)) = (fields.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        self.library(name, forgesyte_tests::zoo::GOOD_LIBRARY, fields)
    }

    /// A plugin `name` on a copy of the zoo's `library` (a path, e.g.
    /// `zoo::FAULTY_LIBRARY`), its manifest `name`, `version` and
    /// `entrypoint` with `extra` fields over them.
    pub(crate) fn library(&self, name: &str, library: &str, extra: Value) -> &PluginsDir {
        let library = Path::new(library);
        let file = library.file_name().unwrap();
        let dir = self.dir.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::copy(library, dir.join(file)).unwrap();
        let mut manifest = json!({
            "name": name,
            "version": "1.0.0",
            "entrypoint": file.to_str().unwrap(),
        });
        if let (Some(base), Some(extra)) = (manifest.as_object_mut(), extra.as_object()) {
            base.extend(extra.clone());
        }
        std::fs::write(
            dir.join("manifest.json"),
            serde_json::to_vec_pretty(&manifest).unwrap(),
        )
        .unwrap();
        self
    }

    /// A plugin `name`: a copy of the Python fixture `fixture`
    /// (`tests/fixtures/python/FIXTURE`) under that name.
    pub(crate) fn python(&self, name: &str, fixture: &str) -> &PluginsDir {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/python")
            .join(fixture);
        let to = self.dir.path().join(name);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(&from).unwrap() {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
            }
        }
        let manifest = to.join("manifest.json");
        let mut value: Value =
            serde_json::from_str(&std::fs::read_to_string(&manifest).unwrap()).unwrap();
        value["name"] = json!(name);
        std::fs::write(&manifest, value.to_string()).unwrap();
        self
    }

    /// Adds `extra`'s fields to plugin `name`'s manifest (replacing those
    /// it has).
    pub(crate) fn manifest_fields(&self, name: &str, extra: Value) -> &PluginsDir {
        merge_manifest(&self.dir.path().join(name), &extra);
        self
    }

    /// A zoo fixture directory, linked in under its own directory name.
    pub(crate) fn zoo(&self, fixture_dir: &str) -> &PluginsDir {
        let source = Path::new(fixture_dir);
        let link = self.dir.path().join(source.file_name().unwrap());
        std::os::unix::fs::symlink(source, link).unwrap();
        self
    }
}

// ------------------------------------------------------- hostile names

/// A small deterministic generator (xorshift64*), so failures reproduce.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Percent-encodes every byte but the unreserved ones (RFC 3986), as an
/// HTTP client does for a path segment.
pub(crate) fn encode(segment: &str) -> String {
    let mut out = String::new();
    for &b in segment.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `n` path segments (already as they go on the wire): hand-written hostile
/// ones first, then random text of every kind, percent-encoded.
pub(crate) fn hostile_segments(seed: u64, n: usize) -> Vec<String> {
    let mut out: Vec<String> = [
        "..",
        ".",
        "...",
        "%2e%2e",
        "%2E%2E%2F%2E%2E%2Fetc%2Fpasswd",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%FF",
        "%FF%FE%FD",
        "%C0%AF",
        "%ED%A0%80",
        "%",
        "%%",
        "%zz",
        "%4",
        "%00",
        "good%00",
        "good%2F..",
        "GOOD",
        "good%20",
        "%20good",
        "good.",
        "a%2Fb",
        "~",
        "$",
        "!",
        "'",
        "(x)",
        "*",
        "+",
        ",",
        ";",
        "=",
        ":",
        "@",
        "&",
        "%E2%9C%93",
        "%F0%9F%98%80",
        "%E2%80%AE",
        "%EF%BB%BF",
        "%1B%5B31m",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    out.push("a".repeat(10 * 1024));
    out.push("%E2%9C%93".repeat(10 * 1024 / 9));
    out.push(encode(&"中".repeat(3000)));
    out.push("%FF".repeat(3000));
    const POOL: &[char] = &[
        'a', 'Z', '0', '9', '-', '_', '.', '~', ' ', '/', '\\', '?', '#', '%', '&', '=', '+', ':',
        ';', '@', '"', '\'', '<', '>', '{', '}', '|', '^', '`', '[', ']', '\0', '\n', '\r', '\t',
        '\u{1b}', '\u{7f}', 'é', 'ß', '✓', '中', '😀', '\u{202e}', '\u{200b}', '\u{feff}',
        '\u{fffd}',
    ];
    let mut rng = Rng::new(seed);
    while out.len() < n {
        let len = match rng.below(10) {
            0 => 0,
            1 => 64 + rng.below(8),
            _ => 1 + rng.below(24),
        };
        let text: String = (0..len).map(|_| POOL[rng.below(POOL.len())]).collect();
        let segment = match rng.below(8) {
            // Mostly encoded as a client would; sometimes a near miss of a
            // real name.
            0 => format!("good{}", encode(&text)),
            _ => encode(&text),
        };
        out.push(segment);
    }
    out.truncate(n);
    out
}

/// Checks an answer of a health route for a hostile name: 200 or 404,
/// never 500, always JSON; a 404 carries a `detail`.
pub(crate) fn assert_health_answer(reply: &Reply, what: &str) {
    assert!(
        reply.status == 200 || reply.status == 404,
        "{what}: status {} body {}",
        reply.status,
        reply.text()
    );
    let body = reply.json();
    if reply.status == 404 {
        assert!(body["detail"].is_string(), "{what}: {body}");
    } else {
        assert!(
            body["name"].is_string() || body.is_object(),
            "{what}: {body}"
        );
    }
}

/// Adds `extra`'s fields to `dir/manifest.json` (replacing those it has).
pub(crate) fn merge_manifest(dir: &Path, extra: &Value) {
    let path = dir.join("manifest.json");
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    if let (Some(base), Some(extra)) = (manifest.as_object_mut(), extra.as_object()) {
        base.extend(extra.clone());
    }
    std::fs::write(&path, manifest.to_string()).unwrap();
}

/// "Installs" a distribution into the site directory `site` as pip leaves
/// one, without pip: `DIST-VERSION.dist-info` holding its `METADATA` (name
/// `name`) and an `entry_points.txt` whose group `forgesyte.plugins` holds
/// `entry_points` (`NAME = module:Class` lines). The package itself is the
/// caller's to put there.
pub(crate) fn write_dist_info(
    site: &Path,
    dist: &str,
    name: &str,
    version: &str,
    entry_points: &str,
) {
    let info = site.join(format!("{dist}-{version}.dist-info"));
    std::fs::create_dir_all(&info).unwrap();
    std::fs::write(
        info.join("METADATA"),
        format!("Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"),
    )
    .unwrap();
    std::fs::write(
        info.join("entry_points.txt"),
        format!("[forgesyte.plugins]\n{entry_points}"),
    )
    .unwrap();
}

/// A wrapper interpreter at `path`: `python3` with `site` on its path
/// (`PYTHONPATH`, set by the wrapper itself, so a runner's scrubbed
/// environment keeps it).
pub(crate) fn site_python(path: &Path, site: &Path) {
    forgesyte_tests::write_script(
        path,
        &format!("PYTHONPATH={} exec python3 \"$@\"", site.display()),
    )
    .unwrap();
}

/// Each of `replies` (a result's size, its call's reply), sizes either side
/// of an answer limit, is answered whole (200) or refused as too large
/// (422 `ResultTooLarge`), never a fault; both sides were tried; and
/// `plugin` is still INITIALIZED, with no restart.
pub(crate) fn assert_whole_or_too_large(
    server: &Forgesyte,
    plugin: &str,
    replies: impl IntoIterator<Item = (usize, Reply)>,
) {
    let mut statuses = std::collections::BTreeSet::new();
    for (size, reply) in replies {
        match reply.status {
            200 => {}
            422 => assert_eq!(reply.json()["error_type"], "ResultTooLarge", "{size}"),
            other => panic!("{size}: {other} {:.300}", reply.text()),
        }
        statuses.insert(reply.status);
    }
    assert_eq!(statuses.into_iter().collect::<Vec<_>>(), [200, 422]);
    let health = server.get(&format!("/v1/plugins/{plugin}/health")).json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    assert_eq!(health["restart_count"], 0, "{health}");
}
