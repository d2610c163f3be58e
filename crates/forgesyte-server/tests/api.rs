//! Integration tests of the `forgesyte` server, in one binary:
//!
//! - `router`: the real [`forgesyte_server::app`] driven with
//!   `tower::ServiceExt::oneshot`, over the loader with fake plugins and a
//!   fake filesystem (the seed's health API GREEN suite, tool outcomes,
//!   malformed bodies, JSON 404/405, hostile names);
//! - `binary`: the real `forgesyte` binary on an ephemeral loopback port,
//!   over real plugin libraries of the fixture zoo, driven over HTTP
//!   (`serve`, `check`, timeouts, shutdown);
//! - `hygiene`: runner processes: Ctrl-C to the terminal's process group
//!   drains the server without touching its runners; runners die with a
//!   SIGKILLed server;
//! - `payloads`: binary payloads through ABI 3: arguments of sizes 0 to
//!   the body limit in every body form to ABI-3 (in process, isolated) and
//!   ABI-1 libraries, binary results as JSON base64, `multipart/mixed` or
//!   raw bytes by `Accept`, byte-exact;
//! - `python`: Python plugins beside native ones through the binary, and
//!   binary arguments (JSON base64, multipart, octet-stream) byte-exact in
//!   every runtime;
//! - `connections`: the header-read and idle timeouts, the connection cap
//!   and its probe reserve, `/livez` with many idle connections open;
//! - `concurrency`: readers and tool calls at once against the binary;
//! - `startup`: [`forgesyte_server::Server`] in-process over a loader whose
//!   plugin construction is held back (health, liveness and readiness while
//!   loading, timeouts, shutdown);
//! - `admin`: the reload routes (token matrix, plugins fixed between
//!   passes) and the failure journal, through the router over fakes;
//! - `probes`: `/livez` and `/readyz` (optional plugins, `?verbose`);
//! - `preflight`: real libraries whose build fingerprint was patched are
//!   refused without being opened;
//! - `installed`: installed Python plugins (entry points of group
//!   `forgesyte.plugins`) through `check` and `serve`;
//! - `integrity`: `forgesyte lock`, then changed plugins refused at load;
//! - `rescan`: hot reload through the binary (SIGHUP, the admin route,
//!   `--watch`): plugins added, removed with a call in flight, changed
//!   (Python, in-process native), and integrity pins on rescan;
//! - `trace`: request ids and `traceparent`s passed to plugins with their
//!   calls and named in their log lines;
//! - `prometheus`: `GET /metrics` scraped by a real Prometheus server,
//!   checked with PromQL;
//! - `signatures`: `forgesyte keygen` and `sign`, each signature status
//!   through `check` and `serve`, and `--require-signed`;
//! - `scaffold`: `forgesyte new --python` / `--rust` scaffolds, checked,
//!   built and served as the command prints;
//! - `sandbox`: confined runners (Python and isolated native) denied what
//!   they did not declare: files, network, environment;
//! - `secrets`: what no runner holds of the server or of another plugin:
//!   environment values (its own block, its zygote's, command lines), the
//!   server's inherited descriptors;
//! - `config`: the config file and `forgesyte config --print` (each layer
//!   beats the next: flag, env, file, default; bad files exit 2);
//! - `deploy`: the Dockerfile and `deploy/kubernetes/` checked against the
//!   binary (options, config keys, ports, probe and scrape paths);
//! - `events`: `GET /v1/events` (live changes, reload results, resuming
//!   with `Last-Event-ID`, `reset`, the load pass, shutdown with a stream
//!   open);
//! - `dashboard`: the dashboard page in headless Chromium (through
//!   chromedriver) against the binary;
//! - `handmade`: a library written against the C ABI by hand (`cc`), and
//!   what of the SDK's the server never calls in it;
//! - `examples`: the shipped Python examples served from their directories
//!   and, the packaged one, installed and found through its entry point;
//! - `stream`: WebSocket streams of frames (order, byte-exact answers in
//!   every runtime, drop accounting, backpressure, bounded memory with a
//!   client that reads nothing, crash, shutdown, refusals).

// Helpers outside #[test] functions may fail loudly too: this is test code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "api/support.rs"]
mod support;

#[path = "api/admin.rs"]
mod admin;
#[path = "api/binary.rs"]
mod binary;
#[path = "api/concurrency.rs"]
mod concurrency;
#[path = "api/config.rs"]
mod config;
#[path = "api/connections.rs"]
mod connections;
#[path = "api/dashboard.rs"]
mod dashboard;
#[path = "api/deploy.rs"]
mod deploy;
#[path = "api/events.rs"]
mod events;
#[path = "api/examples.rs"]
mod examples;
#[path = "api/handmade.rs"]
mod handmade;
#[path = "api/hygiene.rs"]
mod hygiene;
#[path = "api/installed.rs"]
mod installed;
#[path = "api/integrity.rs"]
mod integrity;
#[path = "api/payloads.rs"]
mod payloads;
#[path = "api/preflight.rs"]
mod preflight;
#[path = "api/probes.rs"]
mod probes;
#[path = "api/prometheus.rs"]
mod prometheus;
#[path = "api/python.rs"]
mod python;
#[path = "api/rescan.rs"]
mod rescan;
#[path = "api/router.rs"]
mod router;
#[path = "api/sandbox.rs"]
mod sandbox;
#[path = "api/scaffold.rs"]
mod scaffold;
#[path = "api/secrets.rs"]
mod secrets;
#[path = "api/signatures.rs"]
mod signatures;
#[path = "api/startup.rs"]
mod startup;
#[path = "api/starvation.rs"]
mod starvation;
#[path = "api/stream.rs"]
mod stream;
#[path = "api/trace.rs"]
mod trace;
