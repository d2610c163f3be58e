//! A plugin library written against the C ABI by hand (built with `cc`,
//! not with the SDK): the server loads it as it is, and never calls what
//! only the SDK exports by name in it.

use serde_json::json;

use crate::support::{Forgesyte, PluginsDir};

/// An ABI-1 plugin with one tool, `ping` (answers `"pong"`), and *data*
/// symbols named like the SDK's optional log-sink and call-context setters.
const LIBRARY: &str = r#"
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
typedef struct { uint8_t *ptr; size_t len; size_t cap; } buffer;
static int token;
static buffer copy(const char *text) {
    size_t n = strlen(text);
    buffer b = { malloc(n), n, n };
    memcpy(b.ptr, text, n);
    return b;
}
static int32_t create(const uint8_t *config, size_t config_len, void **instance, buffer *out) {
    (void)config; (void)config_len;
    *instance = &token;
    out->ptr = NULL; out->len = 0; out->cap = 0;
    return 0;
}
static int32_t tools(const void *instance, buffer *out) {
    (void)instance;
    *out = copy("[{\"id\":\"ping\",\"title\":\"Ping\",\"description\":\"Answers pong\"}]");
    return 0;
}
static int32_t call(const void *instance, const uint8_t *tool, size_t tool_len,
                    const uint8_t *args, size_t args_len, buffer *out) {
    (void)instance; (void)tool; (void)tool_len; (void)args; (void)args_len;
    *out = copy("\"pong\"");
    return 0;
}
static void destroy(void *instance) { (void)instance; }
static void free_buffer(buffer b) { free(b.ptr); }
struct table {
    uint32_t abi_version; const char *sdk_version; const char *rustc_version;
    void *create, *tools, *call, *destroy, *free_buffer;
};
static const struct table TABLE = {
    1, "handmade", "cc",
    (void *)create, (void *)tools, (void *)call, (void *)destroy, (void *)free_buffer,
};
const struct table *forgesyte_plugin_entry(void) { return &TABLE; }
const char forgesyte_plugin_host_log[] = "not a function";
const char forgesyte_plugin_call_context[] = "not a function";
"#;

/// The server calls the SDK's optional setters (log sink, call context)
/// only in a library the SDK built (its fingerprint section says so):
/// here the symbols are data, and calling them crashed the server, the
/// log sink's as it loaded the plugin, the call context's at its first
/// call (every call has a context: its request id).
#[test]
fn symbols_named_like_the_sdks_setters_are_not_called_in_a_handmade_library() {
    let plugins = PluginsDir::new();
    build(&plugins, "handmade", LIBRARY);
    plugins.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/handmade/health");
    assert_eq!(health.status, 200, "{}\n{}", health.text(), server.log());
    let health = health.json();
    assert_eq!(health["state"], "INITIALIZED", "{health}");
    let ping = server.run("handmade", "ping", r#"{"args": {}}"#);
    assert_eq!(ping.status, 200, "{}\n{}", ping.text(), server.log());
    assert_eq!(ping.json()["result"], "pong");
    assert_eq!(server.run("alpha", "echo", r#"{"args": {}}"#).status, 200);
    assert_eq!(server.get("/v1/health").status, 200);
}

/// Builds C source `source` into plugin `name`'s library, with its
/// manifest, in `plugins`.
fn build(plugins: &PluginsDir, name: &str, source: &str) {
    let dir = plugins.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("lib.c"), source).unwrap();
    let built = std::process::Command::new("cc")
        .current_dir(&dir)
        .args(["-shared", "-fPIC", "-o", "libhandmade.so", "lib.c"])
        .status()
        .expect("cc, to build a library by hand");
    assert!(built.success());
    std::fs::write(
        dir.join("manifest.json"),
        json!({"name": name, "version": "1.0.0", "entrypoint": "libhandmade.so"}).to_string(),
    )
    .unwrap();
}

/// A library whose entry returns a misaligned table is refused by name
/// before the host reads the table (in process, such a read is undefined
/// behaviour); the server and the other plugins are untouched.
#[test]
fn a_misaligned_table_is_refused() {
    let plugins = PluginsDir::new();
    let source = LIBRARY.replace(
        "return &TABLE;",
        "return (const struct table *)((const char *)&TABLE + 1);",
    );
    assert_ne!(source, LIBRARY);
    build(&plugins, "crooked", &source);
    plugins.good("alpha", json!({}));
    let server = Forgesyte::start(&["--plugins", plugins.path_str()]);
    server.wait_loaded();
    let health = server.get("/v1/plugins/crooked/health").json();
    assert_eq!(health["state"], "FAILED", "{health}");
    assert!(
        health["reason"]
            .as_str()
            .is_some_and(|r| r.contains("misaligned vtable")),
        "{health}"
    );
    assert_eq!(server.run("alpha", "echo", r#"{"args": {}}"#).status, 200);
    assert_eq!(server.get("/v1/health").status, 200);
}
