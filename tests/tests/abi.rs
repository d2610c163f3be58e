//! ABI 3 and ABI 1 through the real loader, in process, over the zoo's
//! libraries: binary arguments reach an ABI-3 library as the caller's bytes
//! and come back byte-exact as binary results (kept as bytes, or as base64
//! in the JSON); an ABI-1 library is still served, binary arguments going
//! in as base64 strings.

use base64::Engine as _;
use forgesyte_loader::CallContext;
use forgesyte_tests::zoo;
use serde_json::json;

use crate::zoo_load::load_zoo;

/// `len` bytes of a deterministic pseudo-random sequence (every byte value
/// occurs), so that a shifted or truncated copy cannot pass.
fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

const SIZES: [usize; 5] = [0, 1, 64 * 1024, 1024 * 1024, 8 * 1024 * 1024];

#[test]
fn binary_arguments_and_results_round_trip_byte_exact_through_abi_3() {
    let (loader, registry) = load_zoo();
    let good = loader.handle(zoo::GOOD_NAME).unwrap();
    assert!(good.takes_binary(), "the good library speaks ABI 3");
    let ctx = CallContext::default();
    for (i, size) in SIZES.into_iter().enumerate() {
        let data = payload(size, i as u64 + 7);
        let args = json!({"data": null});
        let out = good
            .call_output("echo_bytes", &args, &[("/data", &data)], &ctx)
            .unwrap();
        assert_eq!(out.result, json!({"data": null}), "size {size}");
        assert_eq!(out.binary.len(), 1, "size {size}");
        assert_eq!(out.binary[0].0, "/data");
        assert!(out.binary[0].1 == data[..], "size {size}: bytes differ");

        let noop = good
            .call_output("noop_bytes", &args, &[("/data", &data)], &ctx)
            .unwrap();
        assert_eq!(noop.result, json!({"len": size}));
        assert!(noop.binary.is_empty());

        // The JSON spelling: the binary result as base64 at its place.
        let json = good.call_in("echo_bytes", &args, &[("/data", &data)], &ctx);
        let expected = base64::engine::general_purpose::STANDARD.encode(&data);
        assert_eq!(json.unwrap(), json!({"data": expected}), "size {size}");
    }
    // A tool written against `run` still gets base64 strings.
    let echoed = good
        .call_with(
            "echo",
            &json!({"img": null, "n": 1}),
            &[("/img", b"\x00\xff")],
        )
        .unwrap();
    assert_eq!(echoed, json!({"img": "AP8=", "n": 1}));
    // A missing binary argument is the tool's error, not a fault.
    let err = good
        .call_output("noop_bytes", &json!({}), &[], &ctx)
        .unwrap_err();
    assert!(
        err.to_string().contains("`data` must be a binary argument"),
        "{err}"
    );
    let status = registry.get_status(zoo::GOOD_NAME).unwrap();
    assert_eq!(status.state.to_string(), "INITIALIZED");
    assert_eq!(status.error_count, 1);
}

#[test]
fn an_abi_1_library_is_served_with_binary_arguments_as_base64() {
    let (loader, _registry) = load_zoo();
    let old = loader.handle(zoo::ABI_V1_NAME).unwrap();
    assert!(!old.takes_binary(), "ABI 1 takes JSON only");
    for (i, size) in SIZES.into_iter().take(4).enumerate() {
        let data = payload(size, i as u64 + 1);
        let expected = base64::engine::general_purpose::STANDARD.encode(&data);
        let out = old
            .call_output(
                "echo",
                &json!({"data": null, "n": 2}),
                &[("/data", &data)],
                &CallContext::default(),
            )
            .unwrap();
        assert_eq!(out.result, json!({"data": expected, "n": 2}), "size {size}");
        assert!(out.binary.is_empty());
        let len = old
            .call_with("len", &json!({"data": null}), &[("/data", &data)])
            .unwrap();
        assert_eq!(len, json!({"b64_len": expected.len()}));
    }
}

/// Libraries loaded from their bytes (checked bytes, or a library opened
/// again) go through a memory file that the dynamic loader opens as
/// `/proc/self/fd/N`. The loader answers a `dlopen` whose path names an
/// object it already mapped with that object, without opening the file: a
/// memory file that got the number of an earlier one (since closed) would
/// run the earlier library's code. Each load here must be its own library.
#[test]
fn libraries_loaded_from_memory_files_one_after_another_are_each_their_own() {
    use forgesyte_loader::Importer;
    use forgesyte_loader::native::NativeImporter;

    let good = std::path::PathBuf::from(zoo::GOOD_LIBRARY);
    let old = std::path::Path::new(zoo::ABI_V1).join("libfixture_abi_v1.so");
    let config =
        serde_json::to_vec(&json!({"manifest": {}, "plugin_dir": "/", "models": {}})).unwrap();
    for round in 0..3 {
        for (path, abi_3) in [(&good, true), (&old, false)] {
            let bytes = std::fs::read(path).unwrap();
            let library = NativeImporter.open_bytes(path, &bytes).unwrap();
            let instance = library.instantiate(&config).unwrap();
            assert_eq!(
                instance.takes_binary(),
                abi_3,
                "round {round}: {} answered as another library",
                path.display()
            );
        }
    }
}
