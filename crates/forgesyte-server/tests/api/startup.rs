//! Startup and shutdown in-process: [`Server::bind_with`] over a loader
//! whose importer is written here, so a plugin's construction can be held
//! back (a slow plugin) and its instance's drop observed.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use forgesyte_deps::fake::FakeWorld;
use forgesyte_errors::{ImportError, InitError, ToolError};
use forgesyte_loader::{Importer, Loader, LoaderConfig, PluginInstance, PluginLibrary, ToolInfo};
use forgesyte_registry::Registry;
use forgesyte_server::{AdminToken, Server, ServerConfig};
use parking_lot::{Condvar, Mutex};
use serde_json::json;

use crate::support::{Reply, TOKEN, http, http_with};

/// Opens every library; constructing one waits until the gate opens.
#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    opened: Condvar,
    dropped: AtomicBool,
}

impl Gate {
    fn open(&self) {
        *self.open.lock() = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = self.open.lock();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !*open {
            if self.opened.wait_until(&mut open, deadline).timed_out() {
                return;
            }
        }
    }
}

#[derive(Debug)]
struct GatedImporter(Arc<Gate>);

impl Importer for GatedImporter {
    fn open(&self, _path: &Path) -> Result<Arc<dyn PluginLibrary>, ImportError> {
        Ok(Arc::new(GatedLibrary(Arc::clone(&self.0))))
    }
}

#[derive(Debug)]
struct GatedLibrary(Arc<Gate>);

impl PluginLibrary for GatedLibrary {
    fn instantiate(&self, _config: &[u8]) -> Result<Box<dyn PluginInstance>, InitError> {
        self.0.wait();
        Ok(Box::new(SleepyInstance {
            gate: Arc::clone(&self.0),
            tools: vec![ToolInfo {
                id: "sleep".into(),
                title: "Sleep".into(),
                description: "sleeps `ms`".into(),
                input_schema: json!({}),
                output_schema: json!({}),
            }],
        }))
    }
}

#[derive(Debug)]
struct SleepyInstance {
    gate: Arc<Gate>,
    tools: Vec<ToolInfo>,
}

impl PluginInstance for SleepyInstance {
    fn tools(&self) -> &[ToolInfo] {
        &self.tools
    }

    fn call(&self, _tool: &str, args: &[u8]) -> Result<Vec<u8>, ToolError> {
        let args: serde_json::Value = serde_json::from_slice(args).unwrap_or_default();
        let ms = args["ms"].as_u64().unwrap_or(0);
        std::thread::sleep(Duration::from_millis(ms));
        Ok(serde_json::to_vec(&json!({ "slept_ms": ms })).unwrap_or_default())
    }
}

impl Drop for SleepyInstance {
    fn drop(&mut self) {
        self.gate.dropped.store(true, Ordering::SeqCst);
    }
}

fn gated_loader(gate: &Arc<Gate>) -> Arc<Loader> {
    gated_loader_of(gate, &["slowpoke"])
}

/// Plugins `names`, each a [`SleepyInstance`] behind `gate`.
fn gated_loader_of(gate: &Arc<Gate>, names: &[&str]) -> Arc<Loader> {
    let world = FakeWorld::new();
    for name in names {
        world.fs.add_file(
            format!("/plugins/{name}/manifest.json"),
            format!(r#"{{"name": "{name}", "version": "0.3.0", "entrypoint": "libslow.so"}}"#)
                .into_bytes(),
        );
        world
            .fs
            .add_file(format!("/plugins/{name}/libslow.so"), b"fake".to_vec());
    }
    Arc::new(Loader::with_seams(
        Registry::new(),
        Arc::new(world.checker()),
        Arc::new(world.fs.clone()),
        Arc::new(GatedImporter(Arc::clone(gate))),
        LoaderConfig {
            threads: 1,
            ..LoaderConfig::default()
        },
    ))
}

fn config(call_timeout: Duration) -> ServerConfig {
    let mut config = ServerConfig::default();
    config.bind = "127.0.0.1:0".into();
    config.plugins_dir = "/plugins".into();
    config.call_timeout = call_timeout;
    config.shutdown_grace = Duration::from_secs(5);
    config.admin_token = AdminToken::new(TOKEN);
    config
}

async fn get(addr: std::net::SocketAddr, target: &'static str) -> Reply {
    tokio::task::spawn_blocking(move || http(addr, "GET", target, b""))
        .await
        .unwrap()
}

/// A bound server running on the test's runtime until [`Running::stop`].
struct Running {
    addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), forgesyte_server::ServeError>>,
}

impl Running {
    fn start(server: Server) -> Running {
        let addr = server.local_addr();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Running { addr, stop, task }
    }

    /// Waits (at most 10 s) for `/v1/health` to say `ok`: the load pass is
    /// over and every plugin is available.
    async fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(self.addr, "/v1/health").await.json()["status"] != "ok" {
            assert!(Instant::now() < deadline);
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops it and waits (at most 10 s) for its clean end.
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("shutdown is bounded")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_while_a_slow_plugin_loads_and_shows_it_loaded() {
    let gate = Arc::new(Gate::default());
    let server = Server::bind_with(config(Duration::from_secs(5)), gated_loader(&gate))
        .await
        .unwrap();
    let running = Running::start(server);
    let addr = running.addr;

    // Registered but not constructed: LOADED, and the server says loading.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = get(addr, "/v1/plugins/slowpoke/health").await;
        if reply.status == 200 {
            assert_eq!(reply.json()["state"], "LOADED");
            break;
        }
        assert_eq!(reply.status, 404);
        assert!(Instant::now() < deadline, "never registered");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let health = get(addr, "/v1/health").await.json();
    assert_eq!(health["status"], "loading");
    assert_eq!(health["plugins_loaded"], 0);
    let run = tokio::task::spawn_blocking(move || {
        http(addr, "POST", "/v1/plugins/slowpoke/tools/sleep/run", b"{}")
    })
    .await
    .unwrap();
    assert_eq!(run.status, 503, "{}", run.text());
    assert_eq!(run.json()["state"], "LOADED");

    // Live, but not ready: the load pass runs and the plugin is LOADED.
    let live = get(addr, "/livez").await;
    assert_eq!(live.status, 200, "{}", live.text());
    let ready = get(addr, "/readyz?verbose").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let ready = ready.json();
    assert_eq!(ready["status"], "not ready");
    assert_eq!(ready["detail"], "Not ready: load-pass, plugin:slowpoke");
    assert_eq!(
        ready["checks"],
        json!([
            {"name": "load-pass", "ok": false, "detail": "the startup load pass is running"},
            {"name": "plugin:slowpoke", "ok": false, "detail": "LOADED"},
        ])
    );
    // No reload while the startup pass runs.
    let auth = format!("Bearer {TOKEN}");
    let reload = tokio::task::spawn_blocking(move || {
        http_with(
            addr,
            "POST",
            "/v1/plugins/reload",
            &[("Authorization", auth.as_str())],
            b"",
        )
    })
    .await
    .unwrap();
    assert_eq!(reload.status, 409, "{}", reload.text());
    assert_eq!(reload.header("retry-after"), Some("1"));
    assert!(
        reload
            .detail()
            .starts_with("The startup load pass is running"),
        "{}",
        reload.text()
    );

    // Released: INITIALIZED, and the server is ok and ready.
    gate.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health = get(addr, "/v1/health").await.json();
        if health["status"] == "ok" {
            assert_eq!(health["plugins_loaded"], 1);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never finished loading: {health}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let status = get(addr, "/v1/plugins/slowpoke/health").await.json();
    assert_eq!(status["state"], "INITIALIZED");
    let ready = get(addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(ready.json(), json!({"status": "ok"}));

    // Shutdown drops the instance.
    assert!(!gate.dropped.load(Ordering::SeqCst));
    running.stop().await;
    assert!(
        gate.dropped.load(Ordering::SeqCst),
        "instances dropped at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_past_the_server_timeout_is_504_and_fails_the_plugin() {
    let gate = Arc::new(Gate::default());
    gate.open();
    let server = Server::bind_with(config(Duration::from_millis(200)), gated_loader(&gate))
        .await
        .unwrap();
    let running = Running::start(server);
    let addr = running.addr;
    running.wait_ok().await;
    let post = |body: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            http(addr, "POST", "/v1/plugins/slowpoke/tools/sleep/run", body)
        })
    };
    let quick = post(br#"{"args": {"ms": 1}}"#).await.unwrap();
    assert_eq!(quick.status, 200, "{}", quick.text());

    // Answered at the time-out, long before the call would end.
    let started = Instant::now();
    let slow = post(br#"{"args": {"ms": 6000}}"#).await.unwrap();
    assert_eq!(slow.status, 504, "{}", slow.text());
    assert!(
        started.elapsed() < Duration::from_millis(4000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(slow.json()["error_type"], "Timeout");
    let status = get(addr, "/v1/plugins/slowpoke/health").await.json();
    assert_eq!(status["state"], "FAILED");
    let reason = status["reason"].as_str().unwrap();
    assert!(reason.contains("sleep"), "{reason}");
    let after = post(b"{}").await.unwrap();
    assert_eq!(after.status, 503);

    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_calls_to_one_slow_plugin_is_refused_beyond_its_limit_while_others_answer() {
    const LIMIT: usize = 4;
    let gate = Arc::new(Gate::default());
    gate.open();
    let mut config = config(Duration::from_secs(20));
    config.max_calls_per_plugin = LIMIT;
    let server = Server::bind_with(config, gated_loader_of(&gate, &["slowpoke", "quick"]))
        .await
        .unwrap();
    let running = Running::start(server);
    let addr = running.addr;
    running.wait_ok().await;
    let post = |plugin: &'static str, body: &'static [u8]| {
        tokio::task::spawn_blocking(move || {
            http(
                addr,
                "POST",
                &format!("/v1/plugins/{plugin}/tools/sleep/run"),
                body,
            )
        })
    };

    // The limit's worth of slow calls in progress...
    let slow: Vec<_> = (0..LIMIT)
        .map(|_| post("slowpoke", br#"{"args": {"ms": 6000}}"#))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/v1/plugins/slowpoke/health").await.json()["in_flight"] != LIMIT {
        assert!(Instant::now() < deadline, "the slow calls never all ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and the flood beyond it answers 503 at once (well before the slow
    // calls end), without running.
    for _ in 0..10 {
        let started = Instant::now();
        let refused = post("slowpoke", br#"{"args": {"ms": 1500}}"#)
            .await
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_millis(3000),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(refused.status, 503, "{}", refused.text());
        assert_eq!(refused.header("retry-after"), Some("1"));
        assert_eq!(refused.json()["error_type"], "TooManyCalls");
    }
    // The other plugin and the health routes answer meanwhile.
    let started = Instant::now();
    let quick = post("quick", br#"{"args": {"ms": 1}}"#).await.unwrap();
    assert_eq!(quick.status, 200, "{}", quick.text());
    for probe in ["/livez", "/v1/health", "/v1/plugins/slowpoke/health"] {
        assert_eq!(get(addr, probe).await.status, 200, "{probe}");
    }
    assert!(
        started.elapsed() < Duration::from_millis(3000),
        "{:?}",
        started.elapsed()
    );

    // The slow calls finish; the plugin is fine and takes calls again.
    for call in slow {
        let reply = call.await.unwrap();
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
    let status = get(addr, "/v1/plugins/slowpoke/health").await.json();
    assert_eq!(status["state"], "INITIALIZED", "{status}");
    let again = post("slowpoke", br#"{"args": {"ms": 1}}"#).await.unwrap();
    assert_eq!(again.status, 200, "{}", again.text());

    running.stop().await;
}
