//! The load figure's baseline: `dlopen` plus one `dlsym` per library, with
//! the loader's own flags. The only `unsafe` code of this crate.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::path::PathBuf;

use anyhow::Context;
use forgesyte_plugin_sdk::abi::ENTRY_SYMBOL_C;
use libloading::os::unix::{Library, RTLD_LOCAL, RTLD_NOW};

/// `RTLD_NODELETE`, as the loader passes it (glibc and musl).
const RTLD_NODELETE: i32 = 0x1000;

/// Opens every library and looks up its entry symbol (without calling it).
/// The libraries stay open as long as the returned handles live (and
/// mapped after that: `RTLD_NODELETE`).
pub(crate) fn open_all(paths: &[PathBuf]) -> anyhow::Result<Vec<Library>> {
    let mut libraries = Vec::with_capacity(paths.len());
    for path in paths {
        // SAFETY: opening runs the library's initialisers; these are copies
        // of the bench plugin, built by this benchmark with the plugin SDK.
        let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) }
            .with_context(|| format!("dlopen {}", path.display()))?;
        // SAFETY: only the symbol's address is read; nothing is called
        // through it.
        let symbol = unsafe { library.get::<*const c_void>(ENTRY_SYMBOL_C) }
            .with_context(|| format!("dlsym in {}", path.display()))?;
        std::hint::black_box(*symbol);
        libraries.push(library);
    }
    Ok(libraries)
}

/// What [`construct_all`] did: libraries opened, instances made, tools
/// listed (summed over the instances).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Constructed {
    pub(crate) instances: usize,
    pub(crate) tools: usize,
}

/// The second load baseline, the inherent work of any host through the raw
/// ABI, on one thread: per library `dlopen`, `dlsym` of the entry, the
/// entry call and its version check, `create` with the prepared config
/// JSON, and `tools` (the list parsed as tool specs). Instances are kept
/// (as a host keeps them) and never destroyed; buffers are freed.
///
/// `plugins` pairs each library with its config JSON (prepared before
/// timing: reading manifests is host work this baseline leaves out).
pub(crate) fn construct_all(
    plugins: &[(PathBuf, Vec<u8>)],
) -> anyhow::Result<(Vec<Library>, Constructed)> {
    use forgesyte_protocol::abi::{ABI_VERSION, EntryFn, FsBuffer, PluginBuffer, STATUS_OK};

    let mut libraries = Vec::with_capacity(plugins.len());
    let mut done = Constructed::default();
    for (path, config) in plugins {
        // SAFETY: as in `open_all`: copies of the bench plugin.
        let library = unsafe { Library::open(Some(path), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE) }
            .with_context(|| format!("dlopen {}", path.display()))?;
        // SAFETY: the SDK exports the entry with the `EntryFn` signature.
        let entry = unsafe { library.get::<EntryFn>(ENTRY_SYMBOL_C) }
            .with_context(|| format!("dlsym in {}", path.display()))?;
        let vtable_ptr = entry();
        if vtable_ptr.is_null() {
            anyhow::bail!("{}: the entry returned null", path.display());
        }
        // SAFETY: a pointer to a `static` vtable that lives as long as the
        // library, never unloaded (`RTLD_NODELETE`); `abi_version` is the
        // first field of every version's table, so it alone is read before
        // the version is known (a reference to the whole table would claim
        // fields an older table does not have).
        let abi_version = unsafe { (*vtable_ptr).abi_version };
        if abi_version != ABI_VERSION {
            anyhow::bail!(
                "{}: ABI {abi_version} (this benchmark speaks {ABI_VERSION})",
                path.display(),
            );
        }
        // SAFETY: as above, and the table is this version's, whole.
        let vtable = unsafe { &*vtable_ptr };
        let mut instance: *mut c_void = std::ptr::null_mut();
        let mut out = FsBuffer::empty();
        // SAFETY: `config` is readable for its length; `instance` and `out`
        // are live locals the plugin writes to.
        let status =
            unsafe { (vtable.create)(config.as_ptr(), config.len(), &mut instance, &mut out) };
        // SAFETY: `out` was written by this library's `create`, not freed.
        drop(unsafe { PluginBuffer::new(out, vtable) });
        if status != STATUS_OK || instance.is_null() {
            anyhow::bail!("{}: create returned status {status}", path.display());
        }
        let mut out = FsBuffer::empty();
        // SAFETY: `instance` is the live instance just created.
        let status = unsafe { (vtable.tools)(instance, &mut out) };
        // SAFETY: `out` was written by this library's `tools`, not freed.
        let list = unsafe { PluginBuffer::new(out, vtable) };
        if status != STATUS_OK {
            anyhow::bail!("{}: tools returned status {status}", path.display());
        }
        let tools: Vec<forgesyte_protocol::ToolSpec> = serde_json::from_slice(&list)
            .with_context(|| format!("{}: the tool list is not JSON", path.display()))?;
        done.instances += 1;
        done.tools += tools.len();
        libraries.push(library);
    }
    Ok((libraries, done))
}
