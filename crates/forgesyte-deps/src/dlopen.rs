//! The last resort of library lookup: asking the dynamic loader itself.
//!
//! Opening a library runs its initialisers, which is why
//! [`SystemLibraries`](crate::SystemLibraries) only comes here when no file
//! search found the library. A library opened here is never closed again:
//! unloading code that may have registered destructors or thread-local
//! storage is how hosts crash at exit.
#![allow(unsafe_code)]

/// Whether the dynamic loader can open `name` (`RTLD_LAZY | RTLD_LOCAL`).
#[cfg(unix)]
pub(crate) fn can_open(name: &str) -> bool {
    use libloading::os::unix::{Library, RTLD_LAZY, RTLD_LOCAL};
    if name.is_empty() || name.contains('\0') {
        return false;
    }
    // SAFETY: opening a library runs its initialisers, which we cannot
    // vouch for; that is why this is the last resort after every file
    // search. RTLD_LAZY binds no symbol until it is used and RTLD_LOCAL
    // keeps the library's symbols out of the global namespace, so nothing
    // of ours is rebound. No symbol is looked up or called.
    match unsafe { Library::open(Some(name), RTLD_LAZY | RTLD_LOCAL) } {
        Ok(lib) => {
            // Keep it loaded for the life of the process (see module docs).
            let _handle = lib.into_raw();
            true
        }
        Err(e) => {
            tracing::debug!(library = name, error = %e, "dlopen failed");
            false
        }
    }
}

/// Without a Unix dynamic loader nothing can be opened this way.
#[cfg(not(unix))]
pub(crate) fn can_open(_name: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_libc_and_refuses_nonsense() {
        assert!(can_open("libc.so.6"));
        assert!(!can_open("libdefinitely_missing_xyz.so"));
        assert!(!can_open(""));
        assert!(!can_open("a\0b"));
    }
}
