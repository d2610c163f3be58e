//! The seed's GREEN suites 1 and 2 (import/init failures and the dependency
//! checker), ported to Rust over the fakes: registry + loader + checker
//! working together, no real library or GPU needed.

use std::sync::Arc;

use forgesyte_deps::GpuDevice;
use forgesyte_deps::fake::FakeWorld;
use forgesyte_loader::fake::{FakeBehavior, FakeImporter};
use forgesyte_loader::{Loader, LoaderConfig};
use forgesyte_registry::{PluginLifecycleState as S, Registry};
use serde_json::json;

/// A fake plugins directory; `load` runs one pass and returns the registry.
struct World {
    world: FakeWorld,
    importer: Arc<FakeImporter>,
}

impl World {
    fn new() -> Self {
        World {
            world: FakeWorld::new(),
            importer: Arc::new(FakeImporter::new()),
        }
    }

    fn plugin(&self, name: &str, extra: serde_json::Value, behavior: FakeBehavior) -> &Self {
        let mut manifest = json!({"name": name, "version": "1.0.0", "entrypoint": "lib.so"});
        if let (Some(m), Some(e)) = (manifest.as_object_mut(), extra.as_object()) {
            m.extend(e.clone());
        }
        let lib = format!("/plugins/{name}/lib.so");
        self.world
            .fs
            .add_file(
                format!("/plugins/{name}/manifest.json"),
                manifest.to_string(),
            )
            .add_file(&lib, "ELF");
        self.importer.set(lib, behavior);
        self
    }

    fn load(&self) -> Registry {
        let registry = Registry::new();
        Loader::with_seams(
            registry.clone(),
            Arc::new(self.world.checker()),
            Arc::new(self.world.fs.clone()),
            self.importer.clone(),
            LoaderConfig::default(),
        )
        .load_all("/plugins".as_ref());
        registry
    }
}

fn reason(registry: &Registry, name: &str) -> String {
    registry
        .get_status(name)
        .and_then(|s| s.reason)
        .unwrap_or_default()
}

// ---- GREEN suite 1: import and init failures are caught ----

#[test]
fn broken_plugin_does_not_crash_the_host_and_stays_visible() {
    let w = World::new();
    w.plugin("broken_plugin", json!({}), FakeBehavior::NoEntry)
        .plugin("ok_plugin", json!({}), FakeBehavior::Good);
    let registry = w.load();
    assert_eq!(registry.get_state("broken_plugin"), Some(S::Failed));
    assert!(!registry.is_available("broken_plugin"));
    assert_eq!(registry.list_available(), vec!["ok_plugin".to_owned()]);
    let names: Vec<_> = registry.list_all().into_iter().map(|s| s.name).collect();
    assert_eq!(names, ["broken_plugin", "ok_plugin"]);
    assert!(reason(&registry, "broken_plugin").starts_with("ImportError: "));
}

#[test]
fn init_failure_is_failed_with_the_plugin_message() {
    let w = World::new();
    w.plugin(
        "bad_init",
        json!({}),
        FakeBehavior::InitError("cannot open camera".into()),
    )
    .plugin(
        "bad_init_panic",
        json!({}),
        FakeBehavior::InitPanic("index out of bounds".into()),
    );
    let registry = w.load();
    assert_eq!(registry.get_state("bad_init"), Some(S::Failed));
    assert_eq!(
        reason(&registry, "bad_init"),
        "InitError: cannot open camera"
    );
    assert!(reason(&registry, "bad_init_panic").contains("index out of bounds"));
    assert!(registry.list_available().is_empty());
}

#[test]
fn reasons_are_kept_verbatim() {
    let registry = Registry::new();
    registry.register("p", Default::default()).unwrap();
    let verbatim = "ImportError: ModuleNotFoundError: No module named 'torch' — ünïcode kept";
    registry.mark_failed("p", verbatim).unwrap();
    assert_eq!(reason(&registry, "p"), verbatim);
    let status = serde_json::to_value(registry.get_status("p").unwrap()).unwrap();
    assert_eq!(status["reason"], verbatim);
    assert_eq!(status["state"], "FAILED");
}

// ---- GREEN suite 2: missing dependencies make a plugin UNAVAILABLE ----

#[test]
fn gpu_plugin_without_gpu_is_unavailable_with_gpu_in_reason() {
    let w = World::new();
    w.plugin(
        "gpu_plugin",
        json!({"requires_gpu": true}),
        FakeBehavior::Good,
    );
    let registry = w.load();
    assert_eq!(registry.get_state("gpu_plugin"), Some(S::Unavailable));
    let reason = reason(&registry, "gpu_plugin");
    assert!(
        reason.contains("GPU") && reason.contains("CUDA"),
        "{reason}"
    );
}

#[test]
fn gpu_plugin_with_a_fitting_gpu_loads() {
    let w = World::new();
    w.world.gpu.set_devices(vec![GpuDevice {
        ordinal: 0,
        name: "Fake H100".into(),
        total_memory_mb: 81_559,
        compute_capability: (9, 0),
    }]);
    w.plugin(
        "gpu_plugin",
        json!({"requires_gpu": {"min_devices": 1, "min_memory_mb": 40000, "min_compute_capability": "8.0"}}),
        FakeBehavior::Good,
    )
    .plugin(
        "greedy",
        json!({"requires_gpu": {"min_devices": 2}}),
        FakeBehavior::Good,
    );
    let registry = w.load();
    assert_eq!(registry.get_state("gpu_plugin"), Some(S::Initialized));
    assert_eq!(registry.get_state("greedy"), Some(S::Unavailable));
}

#[test]
fn missing_package_is_named_and_every_dependency_is_checked() {
    let w = World::new();
    w.world.libraries.add("c");
    w.plugin(
        "needy",
        json!({"dependencies": ["tesseract", "lib:c", "bin:ffmpeg", "env:OCR_KEY"]}),
        FakeBehavior::Good,
    );
    let registry = w.load();
    assert_eq!(registry.get_state("needy"), Some(S::Unavailable));
    assert_eq!(
        reason(&registry, "needy"),
        "Missing dependencies: lib:tesseract, bin:ffmpeg, env:OCR_KEY"
    );
    // Once the world has them, a fresh pass loads it.
    w.world.libraries.add("tesseract");
    w.world.executables.add("ffmpeg");
    w.world.env.set("OCR_KEY", "x");
    assert_eq!(w.load().get_state("needy"), Some(S::Initialized));
}
