//! The helper processes the benchmark starts from its own executable
//! (hidden subcommands `__serve`, `__baseline`, `__load`, `__dlopen`,
//! `__rawabi`, `__rss`, `__frames_baseline`; and `__runner`, the native plugin runner, handled first in
//! `main`). Each measurement that must start from a fresh process (the
//! dynamic loader never forgets a library) runs in one; each prints one
//! JSON line on stdout.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::body::Bytes;
use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::{dl, proc, tree};

/// The hidden subcommand under which this executable is the native plugin
/// runner (`forgesyte_loader::process::runner_main`), as `forgesyte` is.
pub const RUNNER: &str = "__runner";

/// `__serve --plugins DIR --bind ADDR [--python PATH]`: the server library
/// in a process of its own (`forgesyte serve` without its logging), for
/// smoke runs. Its isolated plugins run in this executable's `__runner`.
///
/// # Errors
///
/// When the address cannot be bound or serving fails.
pub fn serve(plugins: &Path, bind: &str, python: Option<&Path>) -> anyhow::Result<()> {
    let mut config = forgesyte_server::ServerConfig::default();
    config.plugins_dir = plugins.to_path_buf();
    config.bind = bind.to_owned();
    config.python = python.map(Path::to_path_buf);
    config.runner = std::env::current_exe().ok();
    config.runner_args = vec![RUNNER.into()];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let shutdown = forgesyte_server::shutdown_signal();
        let server = forgesyte_server::Server::bind(config).await?;
        println!("forgesyte listening on http://{}", server.local_addr());
        server.run(shutdown).await?;
        Ok(())
    })
}

/// The baseline app: the same routes as the server's list and health
/// endpoints, answering fixed bytes.
pub fn baseline_app(list_body: Bytes, health_body: Bytes) -> Router {
    let json = |body: Bytes| -> Response {
        let mut response = body.into_response();
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    };
    Router::new()
        .route(
            "/v1/plugins",
            get(move || {
                let body = list_body.clone();
                async move { json(body) }
            }),
        )
        .route(
            "/v1/plugins/{name}/health",
            get(move || {
                let body = health_body.clone();
                async move { json(body) }
            }),
        )
}

/// `__baseline --list FILE --health FILE --bind ADDR`: axum answering the
/// same bytes as the server, from memory.
///
/// # Errors
///
/// When a body file cannot be read or the address cannot be bound.
pub fn baseline(list: &Path, health: &Path, bind: &str) -> anyhow::Result<()> {
    let list_body = Bytes::from(std::fs::read(list).context("reading the list body")?);
    let health_body = Bytes::from(std::fs::read(health).context("reading the health body")?);
    serve_baseline(baseline_app(list_body, health_body), bind)
}

/// `__frames_baseline --bind ADDR`: the frames figures' baseline, an axum
/// handler that receives any POST body (no size limit) into one buffer
/// and answers its length as JSON.
///
/// The buffer is reserved from `Content-Length` and each chunk copied in
/// as it arrives, as the server receives a body: the inherent work of
/// holding a body for a plugin, and no more. (axum's `Bytes` extractor,
/// used here before, kept every chunk and copied all 8 MB again at the end,
/// out of cache: 1.1–1.4× slower, which flattered every frames ratio.)
///
/// # Errors
///
/// When the address cannot be bound.
pub fn frames_baseline(bind: &str) -> anyhow::Result<()> {
    use futures_util::StreamExt as _;
    let app = Router::new()
        .route(
            "/{*path}",
            axum::routing::post(|headers: HeaderMap, body: Body| async move {
                let announced = headers
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
                    .unwrap_or(0);
                let mut buffer = Vec::with_capacity(announced.min(1 << 30));
                let mut chunks = body.into_data_stream();
                while let Some(chunk) = chunks.next().await {
                    match chunk {
                        Ok(chunk) => buffer.extend_from_slice(&chunk),
                        Err(e) => {
                            return axum::Json(json!({ "ok": false, "error": e.to_string() }));
                        }
                    }
                }
                axum::Json(json!({ "ok": true, "length": buffer.len() }))
            }),
        )
        .layer(axum::extract::DefaultBodyLimit::disable());
    serve_baseline(app, bind)
}

/// Serves a baseline `app` on `bind` with `axum::serve`, after printing
/// the line the benchmark waits for.
fn serve_baseline(app: Router, bind: &str) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(bind).await?;
        println!("baseline listening on http://{}", listener.local_addr()?);
        axum::serve(listener, app).await?;
        Ok(())
    })
}

/// `__load DIR`: one load pass over DIR with the server's loader, timed.
///
/// # Errors
///
/// Never, in practice; the report says what loaded.
pub fn load(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let loader = Arc::new(forgesyte_server::build_loader(&[]));
    let started = Instant::now();
    let report = loader.load_all(dir);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "ms": ms,
        "plugins": report.plugins.len(),
        "loaded": report.loaded(),
        "failed": report.failed(),
        "unavailable": report.unavailable(),
    }))
}

/// `__dlopen DIR`: `dlopen` + `dlsym` of every library of the tree, timed
/// (listing the tree is not).
///
/// # Errors
///
/// When a library cannot be opened or lacks the entry symbol.
pub fn dlopen(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let paths: Vec<PathBuf> = tree::libraries(dir)?;
    let started = Instant::now();
    let libraries = dl::open_all(&paths)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({ "ms": ms, "libraries": libraries.len() }))
}

/// `__rawabi DIR`: the second load baseline, timed: per library of the
/// tree, `dlopen`, the entry, `create` and the tool list through the raw ABI
/// (`dl::construct_all`), on one thread. Listing the tree and preparing
/// each config JSON (the manifest, the plugin directory) are not timed.
///
/// # Errors
///
/// When a library cannot be opened, constructed or listed.
pub fn rawabi(dir: &Path) -> anyhow::Result<serde_json::Value> {
    let plugins = raw_abi_plugins(dir)?;
    let started = Instant::now();
    let (libraries, done) = dl::construct_all(&plugins)?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    Ok(json!({
        "ms": ms,
        "libraries": libraries.len(),
        "instances": done.instances,
        "tools": done.tools,
    }))
}

/// Every library of the tree with the config JSON a host gives its
/// `create` (read and prepared before anything is measured).
fn raw_abi_plugins(dir: &Path) -> anyhow::Result<Vec<(PathBuf, Vec<u8>)>> {
    let paths: Vec<PathBuf> = tree::libraries(dir)?;
    let mut plugins = Vec::with_capacity(paths.len());
    for path in paths {
        let plugin_dir = path.parent().context("a library outside a directory")?;
        let manifest: serde_json::Value =
            serde_json::from_slice(&std::fs::read(plugin_dir.join("manifest.json"))?)?;
        let config = json!({
            "manifest": manifest,
            "plugin_dir": plugin_dir,
            "models": {},
        });
        plugins.push((path, serde_json::to_vec(&config)?));
    }
    Ok(plugins)
}

/// `__rss DIR`: resident memory before and after opening every library
/// of the tree (`dlopen` + `dlsym`), in KiB; with `construct`, before and
/// after the raw-ABI work of the second load baseline (`dlopen`, entry,
/// `create`, `tools`: see `dl::construct_all`), the instances kept.
///
/// # Errors
///
/// When a library cannot be opened or constructed, or `/proc/self/status`
/// cannot be read.
pub fn rss(dir: &Path, construct: bool) -> anyhow::Result<serde_json::Value> {
    // Read and prepared first: only the opening (and making) is measured.
    let (paths, plugins) = if construct {
        (Vec::new(), raw_abi_plugins(dir)?)
    } else {
        (tree::libraries(dir)?, Vec::new())
    };
    let before = proc::rss_kib("/proc/self/status")?;
    let libraries = if construct {
        dl::construct_all(&plugins)?.0
    } else {
        dl::open_all(&paths)?
    };
    let after = proc::rss_kib("/proc/self/status")?;
    let per_library = if libraries.is_empty() {
        0.0
    } else {
        after.saturating_sub(before) as f64 / libraries.len() as f64
    };
    Ok(json!({
        "before_kib": before,
        "after_kib": after,
        "libraries": libraries.len(),
        "per_library_kib": per_library,
    }))
}

/// `__drive ADDR PATH [--post BODY] [--connections N] [--seconds S]`: load
/// on one route of a running server, for profiling it (`perf record -p`).
///
/// # Errors
///
/// When the path is not a valid URI or the async runtime cannot start.
pub fn drive(
    addr: std::net::SocketAddr,
    path: &str,
    post: Option<&str>,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<serde_json::Value> {
    let req = match post {
        Some(body) => crate::http::Req::post_json("drive", path, body)?,
        None => crate::http::Req::get("drive", path)?,
    };
    let workload = crate::http::repeat(req);
    let spec = crate::http::Spec {
        connections,
        warmup: std::time::Duration::ZERO,
        duration: std::time::Duration::from_secs_f64(seconds),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(crate::http::run(addr, spec, workload))?;
    Ok(serde_json::to_value(result)?)
}
