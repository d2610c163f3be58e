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
