//! Criterion benchmark of a tool call to a process-isolated plugin: the
//! bench plugin's `noop` tool in its own runner, with arguments of 64 KiB,
//! 1 MiB and 8 MiB (a JSON string), against the same call in-process as the
//! baseline measured in the same run.
//!
//! ```text
//! cargo build --release -p forgesyte-loader --bin forgesyte-runner
//! cargo bench -p forgesyte-bench --bench isolated
//! ```
//!
//! The runner is `FORGESYTE_BENCH_RUNNER`, else `forgesyte-runner` beside
//! the bench executable (the release build above).
// Benchmark set-up is test code: a failure should stop it loudly.
#![allow(clippy::expect_used)]

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use forgesyte_deps::DependencyChecker;
use forgesyte_loader::{Isolation, Loader, LoaderConfig, PluginHandle};
use forgesyte_registry::Registry;
use serde_json::json;

fn handle(tree: &Path, isolation: Isolation, runner: &Path) -> (Loader, PluginHandle) {
    let library = forgesyte_bench::build_plugin(true).expect("build the bench plugin");
    forgesyte_bench::lay_out_plugins(tree, 1, &library).expect("lay out plugins");
    let mut config = LoaderConfig {
        default_isolation: isolation,
        runner: Some(runner.to_path_buf()),
        ..LoaderConfig::default()
    };
    config.process.max_response_bytes = 64 << 20;
    let loader = Loader::new(
        Registry::new(),
        Arc::new(DependencyChecker::system(Vec::new())),
        config,
    );
    loader.load_all(tree);
    let handle = loader.handle("bench-0000").expect("bench-0000 loaded");
    (loader, handle)
}

fn isolated_benches(c: &mut Criterion) {
    let runner = std::env::var_os("FORGESYTE_BENCH_RUNNER")
        .map(PathBuf::from)
        .or_else(forgesyte_loader::process::find_runner)
        .expect("a runner: cargo build --release -p forgesyte-loader --bin forgesyte-runner");
    let tmp = tempfile::tempdir().expect("temporary directory");
    let (_iso_loader, isolated) = handle(&tmp.path().join("iso"), Isolation::Process, &runner);
    let (_in_loader, in_process) = handle(&tmp.path().join("in"), Isolation::InProcess, &runner);
    let mut group = c.benchmark_group("call_args");
    group
        .sample_size(20)
        .measurement_time(Duration::from_secs(4))
        .warm_up_time(Duration::from_secs(1));
    for (label, size) in [("64KiB", 64 << 10), ("1MiB", 1 << 20), ("8MiB", 8 << 20)] {
        let args = json!({"data": "A".repeat(size)});
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("isolated/{label}"), |b| {
            b.iter(|| black_box(isolated.call("noop", &args).expect("call")));
        });
        group.bench_function(format!("in_process/{label}"), |b| {
            b.iter(|| black_box(in_process.call("noop", &args).expect("call")));
        });
    }
    group.finish();
}

criterion_group!(benches, isolated_benches);
criterion_main!(benches);
