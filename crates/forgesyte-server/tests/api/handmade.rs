//! A plugin library written against the C ABI by hand (built with `cc`,
//! not with the SDK): the server loads it as it is, and never calls what
//! only the SDK exports by name in it.

use serde_json::json;

use crate::support::{Forgesyte, PluginsDir};

/// An ABI-1 table whose functions all do nothing (`create` reports success
/// and returns no instance: the construction fails), and a *data* symbol
/// named like the SDK's optional log-sink setter.
const LIBRARY: &str = r#"
#include <stdint.h>
#include <stddef.h>
static int32_t nothing(void) { return 0; }
struct table {
    uint32_t abi_version; const char *sdk_version; const char *rustc_version;
    void *create, *tools, *call, *destroy, *free_buffer;
};
static const struct table TABLE = {
    1, "handmade", "cc",
    (void *)nothing, (void *)nothing, (void *)nothing, (void *)nothing, (void *)nothing,
};
const struct table *forgesyte_plugin_entry(void) { return &TABLE; }
const char forgesyte_plugin_host_log[] = "not a function";
"#;

/// The server calls the log-sink setter only in a library the SDK built
/// (its fingerprint section says so): here the symbol is data, and
/// calling it crashed the server as it loaded the plugin.
#[test]
fn a_symbol_named_like_the_sdks_log_sink_is_not_called_in_a_handmade_library() {
    let plugins = PluginsDir::new();
    let dir = plugins.path().join("handmade");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lib.c"), LIBRARY).unwrap();
    let built = std::process::Command::new("cc")
        .current_dir(&dir)
        .args(["-shared", "-fPIC", "-o", "libhandmade.so", "lib.c"])
        .status()
        .expect("cc, to build a library by hand");
    assert!(built.success());
    std::fs::write(
        dir.join("manifest.json"),
        json!({"name": "handmade", "version": "1.0.0", "entrypoint": "libhandmade.so"}).to_string(),
    )
    .unwrap();
    plugins.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/handmade/health");
    assert_eq!(health.status, 200, "{}\n{}", health.text(), server.log());
    let health = health.json();
    // Its construction fails (no instance), the server lives on.
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r.contains("returned no instance")),
        "{health}"
    );
    assert_eq!(server.run("alpha", "echo", r#"{"args": {}}"#).status, 200);
    assert_eq!(server.get("/v1/health").status, 200);
}
