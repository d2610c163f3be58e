//! Criterion benchmarks of the host's in-process paths: registry snapshots,
//! status serialisation, dependency checks and the tool-call overhead
//! through `PluginHandle::call`, with the fake importer and with the real
//! bench plugin library.
//!
//! ```text
//! cargo bench -p forgesyte-bench
//! ```
// Benchmark set-up is test code: a failure should stop it loudly.
#![allow(clippy::expect_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use forgesyte_deps::fake::FakeWorld;
use forgesyte_deps::{DependencyChecker, Requirements};
use forgesyte_loader::fake::{FakeBehavior, FakeImporter};
use forgesyte_loader::{Loader, LoaderConfig, PluginHandle};
use forgesyte_registry::{PluginInfo, Registry};
use serde_json::json;

/// A registry of `n` INITIALIZED plugins with a description and a version.
fn registry(n: usize) -> Registry {
    let registry = Registry::new();
    for i in 0..n {
        let name = forgesyte_bench::plugin_name(i);
        let info = PluginInfo {
            description: Some(format!("Benchmark plugin {i}")),
            version: Some("1.0.0".into()),
            source: Some(format!("/srv/plugins/{name}").into()),
        };
        registry.register(&name, info).expect("register");
        registry.mark_initialized(&name).expect("initialize");
    }
    registry
}

fn registry_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("registry");
    for n in [1, 100] {
        let registry = registry(n);
        group.bench_function(format!("snapshot/{n}"), |b| {
            b.iter(|| black_box(registry.snapshot()));
        });
        group.bench_function(format!("list_all/{n}"), |b| {
            b.iter(|| black_box(registry.list_all()));
        });
        group.bench_function(format!("get_status/{n}"), |b| {
            b.iter(|| black_box(registry.get_status("bench-0000")));
        });
        group.bench_function(format!("call_bookkeeping/{n}"), |b| {
            // What every tool call writes: RUNNING, then the count and the
            // way back to INITIALIZED in one write.
            b.iter(|| {
                registry.mark_running("bench-0000").expect("running");
                registry
                    .end_call("bench-0000", Duration::from_micros(1), true)
                    .expect("end");
            });
        });
    }
    group.finish();
}

fn status_benches(c: &mut Criterion) {
    let registry = registry(100);
    let mut group = c.benchmark_group("status");
    group.bench_function("serialise/100", |b| {
        b.iter(|| black_box(serde_json::to_vec(&registry.snapshot().statuses()).expect("json")));
    });
    let statuses = registry.list_all();
    group.bench_function("serialise_prebuilt/100", |b| {
        b.iter(|| black_box(serde_json::to_vec(&statuses).expect("json")));
    });
    group.finish();
}

fn deps_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("deps");
    let requirements = Requirements::from_manifest(&json!({
        "dependencies": ["lib:c", "bin:sh", "env:HOME"],
    }))
    .expect("requirements");
    let known = BTreeMap::new();
    let dir = Path::new("/srv/plugins/ocr");

    let world = FakeWorld::new();
    world.libraries.add("c");
    world.executables.add("sh");
    world.env.set("HOME", "/root");
    let fake = world.checker();
    group.bench_function("fake_world/cached", |b| {
        b.iter(|| black_box(fake.check(&requirements, dir, &known)));
    });
    group.bench_function("fake_world/fresh", |b| {
        b.iter(|| {
            fake.clear_cache();
            black_box(fake.check(&requirements, dir, &known))
        });
    });

    let lib_c =
        Requirements::from_manifest(&json!({ "dependencies": ["lib:c"] })).expect("requirements");
    let real = DependencyChecker::system(Vec::new());
    group.bench_function("real_lib_c/cached", |b| {
        b.iter(|| black_box(real.check(&lib_c, dir, &known)));
    });
    group.bench_function("real_lib_c/fresh", |b| {
        b.iter(|| {
            real.clear_cache();
            black_box(real.check(&lib_c, dir, &known))
        });
    });
    group.finish();
}

/// A loader over the fake world with `n` plugins whose library is the fake
/// importer's `Good` (tools `echo`, `fail`, `panic`).
fn fake_handle(n: usize) -> (Loader, PluginHandle) {
    let world = FakeWorld::new();
    world.fs.add_dir("/plugins");
    let importer = Arc::new(FakeImporter::new());
    for i in 0..n {
        let name = forgesyte_bench::plugin_name(i);
        let lib = format!("/plugins/{name}/lib.so");
        world
            .fs
            .add_file(
                format!("/plugins/{name}/manifest.json"),
                json!({"name": name, "version": "1.0.0", "entrypoint": "lib.so"}).to_string(),
            )
            .add_file(&lib, "ELF");
        importer.set(lib, FakeBehavior::Good);
    }
    let loader = Loader::with_seams(
        Registry::new(),
        Arc::new(world.checker()),
        Arc::new(world.fs.clone()),
        importer,
        LoaderConfig::default(),
    );
    loader.load_all("/plugins".as_ref());
    let handle = loader.handle("bench-0000").expect("bench-0000 loaded");
    (loader, handle)
}

/// A loader over `n` copies of the real bench plugin (built in release).
fn native_handle(n: usize, tree: &Path) -> (Loader, PluginHandle) {
    let library = forgesyte_bench::build_plugin(true).expect("build the bench plugin");
    forgesyte_bench::lay_out_plugins(tree, n, &library).expect("lay out plugins");
    let loader = forgesyte_server::build_loader(&[]);
    loader.load_all(tree);
    let handle = loader.handle("bench-0000").expect("bench-0000 loaded");
    (loader, handle)
}

fn call_benches(c: &mut Criterion) {
    let mut group = c.benchmark_group("call");
    let args = json!({});
    for n in [1, 100] {
        let (_loader, handle) = fake_handle(n);
        group.bench_function(format!("fake_importer/{n}"), |b| {
            b.iter(|| black_box(handle.call("echo", &args)));
        });
    }
    let tmp = tempfile::tempdir().expect("temporary directory");
    for n in [1, 100] {
        let (_loader, handle) = native_handle(n, &tmp.path().join(format!("tree-{n}")));
        group.bench_function(format!("native/{n}"), |b| {
            b.iter(|| black_box(handle.call("noop", &args)));
        });
    }
    group.finish();
}

criterion_group!(
    benches,
    registry_benches,
    status_benches,
    deps_benches,
    call_benches
);
criterion_main!(benches);
