//! Shared libraries a plugin library ships beside it, found through
//! `$ORIGIN` in its run path, and whether the dynamic loader would give it
//! another library of the same name instead.
//!
//! The dynamic loader (glibc's, musl's) shares loaded libraries by name: a
//! library whose `DT_NEEDED` says `libhelper.so` gets whatever library of
//! that name the process has loaded already, before its run path is looked
//! at. Two in-process plugins each shipping a `libhelper.so` of their own
//! would both run the first one loaded. [`check`] finds that before the
//! second plugin is opened; the same file, or a copy with the same bytes,
//! is no conflict.
//!
//! Knows ELF dynamic sections and the dynamic loader's look-up by name;
//! nothing of plugins beyond the library's path.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use forgesyte_errors::ImportError;
use libloading::os::unix::{Library, RTLD_NOW};
use object::ReadRef;
use object::elf::{
    DT_NEEDED, DT_NULL, DT_RPATH, DT_RUNPATH, DT_STRSZ, DT_STRTAB, PT_DYNAMIC, PT_LOAD,
};
use object::read::elf::{Dyn as _, ProgramHeader as _};

/// `RTLD_NOLOAD` (glibc and musl): only look for an object already loaded.
const RTLD_NOLOAD: i32 = 0x4;
/// `dlinfo`'s request for the object's `struct link_map` (glibc and musl).
const RTLD_DI_LINKMAP: c_int = 2;
/// Dynamic entries read at most: a corrupt section cannot make the check
/// read more.
const MAX_DYNAMIC_ENTRIES: usize = 4096;
/// The longest string table read (run paths and library names).
const MAX_STRTAB: u64 = 1 << 20;

/// The start of `struct link_map` (`<link.h>`), the same in glibc and musl:
/// only `l_name` is read.
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const c_char,
}

unsafe extern "C" {
    fn dlinfo(handle: *mut c_void, request: c_int, info: *mut c_void) -> c_int;
}

/// A library's `DT_NEEDED` names and the entries of its run path
/// (`DT_RUNPATH`, else `DT_RPATH`) that name `$ORIGIN`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct OriginPath {
    needed: Vec<String>,
    dirs: Vec<String>,
}

/// Reads the dynamic section of the ELF file in `data` (its program
/// headers `segments`): `None` when its run path names no `$ORIGIN` (the
/// common case: one look at the dynamic entries), or when the section
/// cannot be read (`dlopen` then says what is wrong).
pub(super) fn read<'data, R: ReadRef<'data>>(
    data: R,
    endian: object::Endianness,
    segments: &[object::elf::ProgramHeader64<object::Endianness>],
) -> Option<OriginPath> {
    let dynamic = segments.iter().find(|s| s.p_type(endian) == PT_DYNAMIC)?;
    let (offset, size) = dynamic.file_range(endian);
    let entries = data
        .read_slice_at::<object::elf::Dyn64<object::Endianness>>(
            offset,
            usize::try_from(size / 16).ok()?.min(MAX_DYNAMIC_ENTRIES),
        )
        .ok()?;
    let (mut strtab, mut strsz, mut runpath, mut rpath) = (None, None, None, None);
    let mut needed = Vec::new();
    for entry in entries {
        let value = entry.d_val(endian);
        // Tags past u32 (processor- and OS-specific ranges) matter not here.
        let Some(tag) = entry.tag32(endian) else {
            continue;
        };
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(value),
            DT_STRTAB => strtab = Some(value),
            DT_STRSZ => strsz = Some(value),
            DT_RUNPATH => runpath = Some(value),
            DT_RPATH => rpath = Some(value),
            _ => {}
        }
    }
    // glibc ignores DT_RPATH when there is a DT_RUNPATH.
    let path_at = runpath.or(rpath)?;
    // The string table's address, made a file offset through the loadable
    // segment that holds it.
    let strtab = strtab?;
    let file_offset = segments.iter().find_map(|s| {
        let (vaddr, filesz) = (s.p_vaddr(endian), s.p_filesz(endian));
        (s.p_type(endian) == PT_LOAD && strtab >= vaddr && strtab - vaddr < filesz)
            .then(|| s.p_offset(endian) + (strtab - vaddr))
    })?;
    let strings = data
        .read_bytes_at(file_offset, strsz?.min(MAX_STRTAB))
        .ok()?;
    let string = |at: u64| -> Option<String> {
        let rest = strings.get(usize::try_from(at).ok()?..)?;
        let end = rest.iter().position(|&b| b == 0)?;
        String::from_utf8(rest[..end].to_vec()).ok()
    };
    let dirs: Vec<String> = string(path_at)?
        .split(':')
        .filter(|dir| dir.contains("$ORIGIN") || dir.contains("${ORIGIN}"))
        .map(str::to_owned)
        .collect();
    if dirs.is_empty() {
        return None;
    }
    Some(OriginPath {
        needed: needed
            .into_iter()
            .filter_map(string)
            .filter(|name| !name.contains('/'))
            .collect(),
        dirs,
    })
}

/// Fails when a library that the library at `path` ships (a `DT_NEEDED`
/// name its `$ORIGIN` run path finds) has the name of another library
/// already loaded in this process: the dynamic loader would hand it that
/// one. The same file, or one with the same bytes, passes.
pub(super) fn check(path: &Path, origin_path: &OriginPath) -> Result<(), ImportError> {
    let Some(origin) = path.parent() else {
        return Ok(());
    };
    let origin = origin.to_string_lossy();
    for name in &origin_path.needed {
        let shipped = origin_path.dirs.iter().find_map(|dir| {
            let dir = dir
                .replace("${ORIGIN}", &origin)
                .replace("$ORIGIN", &origin);
            let candidate = Path::new(&dir).join(name);
            candidate.is_file().then_some(candidate)
        });
        let Some(shipped) = shipped else { continue };
        let Some(loaded) = loaded_as(name) else {
            continue;
        };
        if !same_bytes(&shipped, &loaded) {
            return Err(ImportError::SharedLibraryShadowed {
                path: path.to_path_buf(),
                name: name.clone(),
                shipped,
                loaded,
            });
        }
    }
    Ok(())
}

/// The file of the library loaded under `name` in this process, if any.
fn loaded_as(name: &str) -> Option<PathBuf> {
    // SAFETY: with RTLD_NOLOAD nothing is opened or run: the handle of a
    // library already loaded under this name, or an error.
    let library = unsafe { Library::open(Some(name), RTLD_NOW | RTLD_NOLOAD) }.ok()?;
    let handle = library.into_raw();
    let mut map: *const LinkMap = std::ptr::null();
    // SAFETY: `handle` is a live handle from `dlopen`; RTLD_DI_LINKMAP
    // writes one pointer, to the object's link map, into `map`. The map and
    // its `l_name` stay valid while the handle holds the object, that is
    // until `from_raw(handle)` below is dropped.
    let file = unsafe {
        if dlinfo(handle, RTLD_DI_LINKMAP, (&raw mut map).cast()) == 0
            && !map.is_null()
            && !(*map).l_name.is_null()
        {
            let name = CStr::from_ptr((*map).l_name);
            Some(PathBuf::from(std::ffi::OsStr::from_bytes(name.to_bytes())))
        } else {
            None
        }
    };
    // SAFETY: the handle `into_raw` gave up, closed once: it drops the
    // reference RTLD_NOLOAD took.
    drop(unsafe { Library::from_raw(handle) });
    file.filter(|file| !file.as_os_str().is_empty())
}

/// Whether two files are one library: the same file, or the same bytes.
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (Ok(ma), Ok(mb)) = (std::fs::metadata(a), std::fs::metadata(b)) else {
        return false;
    };
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return true;
    }
    ma.len() == mb.len() && matches!((std::fs::read(a), std::fs::read(b)), (Ok(x), Ok(y)) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::native::NativeLibrary;
    use std::process::Command;

    /// The helper's name: one of this test's own, so no other library of
    /// the test process has it.
    const HELPER: &str = "libfs_origin_test_helper.so";

    /// Builds `dir/HELPER` (returning `value`) with `cc`, and beside it a
    /// library `dir/lib{name}.so` that needs it, found through `$ORIGIN`.
    fn ship(dir: &Path, name: &str, value: i32) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let cc = |args: &[&str], source: &str| {
            let file = dir.join(format!("{}.c", args[0]));
            std::fs::write(&file, source).unwrap();
            let status = Command::new("cc")
                .args(["-shared", "-fPIC", "-o"])
                .arg(dir.join(args[0]))
                .arg(&file)
                .args(&args[1..])
                .status()
                .expect("cc is needed to build this test's libraries");
            assert!(status.success(), "cc {args:?}");
        };
        cc(
            &[HELPER, &format!("-Wl,-soname,{HELPER}")],
            &format!("int fs_origin_helper(void) {{ return {value}; }}\n"),
        );
        let library = format!("lib{name}.so");
        cc(
            &[
                &library,
                &format!("-L{}", dir.display()),
                &format!("-l:{HELPER}"),
                "-Wl,-rpath,$ORIGIN",
                "-Wl,--enable-new-dtags",
            ],
            "int fs_origin_helper(void);\nint plugin_value(void) { return fs_origin_helper(); }\n",
        );
        dir.join(library)
    }

    fn origin_path(library: &Path) -> Option<OriginPath> {
        let file = std::fs::File::open(library).unwrap();
        let len = file.metadata().unwrap().len();
        crate::native::check_elf(file, len, library)
            .unwrap()
            .origin_path
    }

    /// Two plugins shipping different libraries of one name: the second is
    /// refused before it is opened, naming both files; a plugin shipping a
    /// copy with the same bytes as the loaded one is not.
    #[test]
    fn a_shipped_library_whose_name_is_loaded_already_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ship(&tmp.path().join("first"), "first", 1);
        let second = ship(&tmp.path().join("second"), "second", 2);
        let third = tmp.path().join("third");
        std::fs::create_dir(&third).unwrap();
        std::fs::copy(tmp.path().join("first").join(HELPER), third.join(HELPER)).unwrap();
        std::fs::copy(&first, third.join("libthird.so")).unwrap();
        let third = third.join("libthird.so");

        let found = origin_path(&second).expect("an $ORIGIN run path");
        assert_eq!(found.dirs, ["$ORIGIN"]);
        assert!(found.needed.iter().any(|n| n == HELPER), "{found:?}");
        // Nothing of that name is loaded yet.
        check(&first, &origin_path(&first).unwrap()).unwrap();

        // SAFETY: the test's own library, whose initialisers do nothing.
        let loaded = unsafe { Library::open(Some(&first), RTLD_NOW) }.unwrap();
        let err = check(&second, &found).unwrap_err();
        let ImportError::SharedLibraryShadowed {
            name,
            shipped,
            loaded: other,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(name, HELPER);
        assert_eq!(shipped, &tmp.path().join("second").join(HELPER));
        assert_eq!(
            other.canonicalize().unwrap(),
            tmp.path()
                .join("first")
                .join(HELPER)
                .canonicalize()
                .unwrap()
        );
        assert!(
            err.to_string().contains("\"isolation\": \"process\""),
            "{err}"
        );

        // The loader refuses it before `dlopen` (which would have found the
        // library but no entry symbol).
        let opened = NativeLibrary::open(&second).map(|_| ());
        assert!(
            matches!(opened, Err(ImportError::SharedLibraryShadowed { .. })),
            "{opened:?}"
        );
        // The same bytes under another path pass the check (and then fail
        // as what they are: no plugin).
        check(&third, &origin_path(&third).unwrap()).unwrap();
        let opened = NativeLibrary::open(&third).map(|_| ());
        assert!(
            matches!(opened, Err(ImportError::MissingEntrySymbol { .. })),
            "{opened:?}"
        );
        drop(loaded);
    }

    /// A library without `$ORIGIN` in its run path costs one look at its
    /// dynamic entries and is not checked.
    #[test]
    fn a_library_without_an_origin_run_path_has_nothing_to_check() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        std::fs::write(dir.join("plain.c"), "int plain(void) { return 0; }\n").unwrap();
        let status = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(dir.join("libplain.so"))
            .arg(dir.join("plain.c"))
            .arg("-Wl,-rpath,/opt/elsewhere")
            .status()
            .expect("cc is needed to build this test's libraries");
        assert!(status.success());
        assert_eq!(origin_path(&dir.join("libplain.so")), None);
    }
}
