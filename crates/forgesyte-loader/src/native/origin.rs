//! Shared libraries a plugin library ships beside it, found through
//! `$ORIGIN` in its run path, and whether the dynamic loader would give it
//! another library of the same name instead.
//!
//! The dynamic loader (glibc's, musl's) shares loaded libraries by name: a
//! library whose `DT_NEEDED` says `libhelper.so` gets whatever library of
//! that name the process has loaded already, before its run path is looked
//! at. Two in-process plugins each shipping a `libhelper.so` of their own
//! would both run the first one loaded. [`check`] finds that before the
//! second plugin is opened, for what the library ships and what those
//! ship in turn; the same file, or a copy with the same bytes, is no
//! conflict. A library loaded from a memory file (signed, or
//! reloaded) is checked against its own directory too: its `$ORIGIN` then
//! finds nothing, so a library of the name loaded already is what it gets.
//!
//! Knows ELF dynamic sections and the dynamic loader's look-up by name;
//! nothing of plugins beyond the library's path.

use std::ffi::{CStr, c_char};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use forgesyte_errors::ImportError;
use libloading::os::unix::{Library, RTLD_NOW};
use object::ReadRef;
use object::elf::{
    DT_NEEDED, DT_NULL, DT_RPATH, DT_RUNPATH, DT_SONAME, DT_STRSZ, DT_STRTAB, PT_DYNAMIC, PT_LOAD,
};
use object::read::elf::{Dyn as _, ProgramHeader as _};

/// Dynamic entries read at most: a corrupt section cannot make the check
/// read more.
const MAX_DYNAMIC_ENTRIES: usize = 4096;
/// Library names read at most (distinct string offsets).
const MAX_NEEDED: usize = 256;
/// The longest string read from the string table (a run path, a name).
const MAX_STRING: u64 = 4096;
/// Libraries looked at per plugin library at most, the plugin's own and
/// those it ships, however deep.
const MAX_SHIPPED: usize = 64;
/// Files compared in pieces of this size.
const COMPARE_CHUNK: usize = 64 * 1024;

/// The start of `struct link_map` (`<link.h>`), the same in glibc and musl:
/// only `l_name` is read.
#[repr(C)]
struct LinkMap {
    l_addr: usize,
    l_name: *const c_char,
}

/// A library's `DT_NEEDED` names and the entries of its run path
/// (`DT_RUNPATH`, else `DT_RPATH`) that name `$ORIGIN`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct OriginPath {
    needed: Vec<String>,
    dirs: Vec<String>,
    /// Whether the run path is a `DT_RUNPATH`, which serves this library's
    /// own look-ups only; a `DT_RPATH` also serves those of the libraries
    /// it loads that have no `DT_RUNPATH` (glibc's rule).
    runpath: bool,
}

/// What a dynamic section says, as string-table offsets.
#[derive(Default)]
struct Dynamic {
    needed: Vec<u64>,
    run_path: Option<u64>,
    /// Whether `run_path` is a `DT_RUNPATH` (else a `DT_RPATH`).
    runpath: bool,
    soname: Option<u64>,
    /// The string table's file offset and size.
    strtab: Option<(u64, u64)>,
}

impl Dynamic {
    /// Reads the dynamic section of the ELF file in `data` (its program
    /// headers `segments`); `None` when there is none or it cannot be read.
    fn read<'data, R: ReadRef<'data>>(
        data: R,
        endian: object::Endianness,
        segments: &[object::elf::ProgramHeader64<object::Endianness>],
    ) -> Option<Self> {
        let dynamic = segments.iter().find(|s| s.p_type(endian) == PT_DYNAMIC)?;
        let (offset, size) = dynamic.file_range(endian);
        let entries = data
            .read_slice_at::<object::elf::Dyn64<object::Endianness>>(
                offset,
                usize::try_from(size / 16).ok()?.min(MAX_DYNAMIC_ENTRIES),
            )
            .ok()?;
        let mut found = Dynamic::default();
        let (mut strtab, mut strsz, mut runpath, mut rpath) = (None, None, None, None);
        for entry in entries {
            let value = entry.d_val(endian);
            // Tags past u32 (processor- and OS-specific ranges) matter not.
            let Some(tag) = entry.tag32(endian) else {
                continue;
            };
            match tag {
                DT_NULL => break,
                DT_NEEDED if found.needed.len() < MAX_NEEDED && !found.needed.contains(&value) => {
                    found.needed.push(value);
                }
                DT_STRTAB => strtab = Some(value),
                DT_STRSZ => strsz = Some(value),
                DT_RUNPATH => runpath = Some(value),
                DT_RPATH => rpath = Some(value),
                DT_SONAME => found.soname = Some(value),
                _ => {}
            }
        }
        // glibc ignores DT_RPATH when there is a DT_RUNPATH.
        found.runpath = runpath.is_some();
        found.run_path = runpath.or(rpath);
        // The string table's address, made a file offset through the
        // loadable segment that holds it.
        found.strtab = strtab.and_then(|strtab| {
            let at = segments.iter().find_map(|s| {
                let (vaddr, filesz) = (s.p_vaddr(endian), s.p_filesz(endian));
                (s.p_type(endian) == PT_LOAD && strtab >= vaddr && strtab - vaddr < filesz)
                    .then(|| s.p_offset(endian).checked_add(strtab - vaddr))
                    .flatten()
            })?;
            Some((at, strsz?))
        });
        Some(found)
    }

    /// The string at offset `at` of the string table: at most
    /// [`MAX_STRING`] bytes, UTF-8, inside the table.
    fn string<'data, R: ReadRef<'data>>(&self, data: R, at: u64) -> Option<String> {
        let (table, size) = self.strtab?;
        let start = table.checked_add(at).filter(|_| at < size)?;
        let end = start.saturating_add((size - at).min(MAX_STRING));
        let bytes = data.read_bytes_at_until(start..end, 0).ok()?;
        String::from_utf8(bytes.to_vec()).ok()
    }
}

/// Reads what [`check`] needs from the ELF file in `data` (its program
/// headers `segments`): `None` when its run path names no `$ORIGIN` (the
/// common case: one look at the dynamic entries), or when the section
/// cannot be read (`dlopen` then says what is wrong).
pub(super) fn read<'data, R: ReadRef<'data>>(
    data: R,
    endian: object::Endianness,
    segments: &[object::elf::ProgramHeader64<object::Endianness>],
) -> Option<OriginPath> {
    links(data, endian, segments, false)
}

/// [`read`], and with `always` also for a library whose run path names no
/// `$ORIGIN` (a shipped library's needs may be found through the `DT_RPATH`
/// of the library that loads it).
fn links<'data, R: ReadRef<'data>>(
    data: R,
    endian: object::Endianness,
    segments: &[object::elf::ProgramHeader64<object::Endianness>],
    always: bool,
) -> Option<OriginPath> {
    let dynamic = Dynamic::read(data, endian, segments)?;
    let dirs: Vec<String> = dynamic
        .run_path
        .and_then(|at| dynamic.string(data, at))
        .unwrap_or_default()
        .split(':')
        .filter(|dir| expand_origin(dir, "").is_some())
        .map(str::to_owned)
        .collect();
    if dirs.is_empty() && !always {
        return None;
    }
    Some(OriginPath {
        needed: dynamic
            .needed
            .iter()
            .filter_map(|&at| dynamic.string(data, at))
            .filter(|name| !name.contains('/'))
            .collect(),
        dirs,
        runpath: dynamic.runpath,
    })
}

/// Whether the ELF file in `bytes` has `$ORIGIN` in its run path: it then
/// finds libraries beside its file, which a copy of it in a memory file
/// would not.
pub(crate) fn names_origin(bytes: &[u8]) -> bool {
    use object::read::elf::FileHeader as _;
    let Ok(header) = object::elf::FileHeader64::<object::Endianness>::parse(bytes) else {
        return false;
    };
    let Ok(endian) = header.endian() else {
        return false;
    };
    header
        .program_headers(endian, bytes)
        .is_ok_and(|segments| read(bytes, endian, segments).is_some())
}

/// Hands `f` the ELF file at `path`: its data, byte order and program
/// headers; `None` when it cannot be read as a 64-bit ELF file.
fn parse_file<T>(
    path: &Path,
    f: impl FnOnce(
        &object::ReadCache<super::pread::PreadFile<'_>>,
        object::Endianness,
        &[object::elf::ProgramHeader64<object::Endianness>],
    ) -> Option<T>,
) -> Option<T> {
    use object::read::elf::FileHeader as _;
    let file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let data = object::ReadCache::new(super::pread::PreadFile::new(&file, len));
    let header = object::elf::FileHeader64::<object::Endianness>::parse(&data).ok()?;
    let endian = header.endian().ok()?;
    let segments = header.program_headers(endian, &data).ok()?;
    f(&data, endian, segments)
}

/// The `DT_SONAME` of the library file at `path`, if it has one.
fn soname(path: &Path) -> Option<String> {
    parse_file(path, |data, endian, segments| {
        let dynamic = Dynamic::read(data, endian, segments)?;
        dynamic.string(data, dynamic.soname?)
    })
}

/// `dir` (a run path entry) with `$ORIGIN` and `${ORIGIN}` replaced by
/// `origin`, as glibc expands them (`$ORIGIN` only as a whole token: not
/// in `$ORIGINS`); `None` when it names neither.
fn expand_origin(dir: &str, origin: &str) -> Option<String> {
    let mut out = String::with_capacity(dir.len() + origin.len());
    let mut rest = dir;
    let mut found = false;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let token = if tail.starts_with("${ORIGIN}") {
            Some("${ORIGIN}".len())
        } else if tail.starts_with("$ORIGIN")
            && !tail["$ORIGIN".len()..].starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        {
            Some("$ORIGIN".len())
        } else {
            None
        };
        match token {
            Some(len) => {
                out.push_str(origin);
                rest = &tail[len..];
                found = true;
            }
            None => {
                out.push('$');
                rest = &tail[1..];
            }
        }
    }
    out.push_str(rest);
    found.then_some(out)
}

/// Fails when a library that the library at `path` ships (a `DT_NEEDED`
/// name its `$ORIGIN` run path finds), or one that a shipped library ships
/// in turn, has the name of another library already loaded in this
/// process: the dynamic loader would hand it that one. The same file, or
/// one with the same bytes, passes (and what it needs was loaded with it).
///
/// The look-ups follow glibc's rules. Each shipped library is checked
/// once, through the first chain that reaches it (depth first; glibc
/// resolves breadth first, so a library two chains reach with different
/// inherited `DT_RPATH`s may be looked up otherwise); musl, which applies
/// every loader's run path whatever its kind, may find more.
pub(super) fn check(path: &Path, origin_path: &OriginPath) -> Result<(), ImportError> {
    let mut seen = vec![path.to_path_buf()];
    check_shipped(path, path, origin_path, &[], &mut seen)
}

/// [`check`] of what `library` ships (`origin_path`, read from it), for the
/// plugin library `plugin`. `inherited`: the `$ORIGIN` directories of the
/// `DT_RPATH`s of the libraries that loaded it, expanded, which glibc
/// searches too when `library` has no `DT_RUNPATH`. `seen`: the libraries
/// checked so far (each once, at most [`MAX_SHIPPED`], so a cycle of run
/// paths ends).
fn check_shipped(
    plugin: &Path,
    library: &Path,
    origin_path: &OriginPath,
    inherited: &[PathBuf],
    seen: &mut Vec<PathBuf>,
) -> Result<(), ImportError> {
    // A directory whose name is not UTF-8 cannot be spelled in a run path
    // read as UTF-8: its own entries expand to nothing to compare.
    let own: Vec<PathBuf> = library
        .parent()
        .and_then(Path::to_str)
        .map(|origin| {
            origin_path
                .dirs
                .iter()
                .filter_map(|dir| expand_origin(dir, origin).map(PathBuf::from))
                .collect()
        })
        .unwrap_or_default();
    // Where its own look-ups go (a `DT_RUNPATH` alone; a `DT_RPATH`, then
    // its loaders'), and what the libraries it loads inherit.
    let (search, passed_on): (Vec<PathBuf>, Vec<PathBuf>) = if origin_path.runpath {
        (own, inherited.to_vec())
    } else {
        let chain: Vec<PathBuf> = own.into_iter().chain(inherited.iter().cloned()).collect();
        (chain.clone(), chain)
    };
    for name in &origin_path.needed {
        let shipped = search.iter().find_map(|dir| {
            let candidate = dir.join(name);
            candidate.is_file().then_some(candidate)
        });
        let Some(shipped) = shipped else { continue };
        match loaded_as(name) {
            Some(loaded) if !same_bytes(&shipped, &loaded) => {
                return Err(ImportError::SharedLibraryShadowed {
                    path: plugin.to_path_buf(),
                    name: name.clone(),
                    shipped,
                    loaded,
                });
            }
            Some(_) => {}
            // Not loaded yet: the dynamic loader will open it, and then
            // what its own `$ORIGIN` run path finds.
            None => {
                if seen.contains(&shipped) {
                    continue;
                }
                if seen.len() >= MAX_SHIPPED {
                    if seen.len() == MAX_SHIPPED {
                        tracing::warn!(
                            library = %plugin.display(),
                            "{} and the libraries it ships are more than {MAX_SHIPPED}: the rest, from {} on, are not checked against the libraries loaded already",
                            plugin.display(),
                            shipped.display()
                        );
                        // Past the cap: said once.
                        seen.push(PathBuf::new());
                    }
                    continue;
                }
                seen.push(shipped.clone());
                if let Some(next) = parse_file(&shipped, |data, endian, segments| {
                    links(data, endian, segments, true)
                }) {
                    check_shipped(plugin, &shipped, &next, &passed_on, seen)?;
                }
            }
        }
    }
    Ok(())
}

/// The file of the library loaded under `name` in this process, if any.
fn loaded_as(name: &str) -> Option<PathBuf> {
    // SAFETY: with RTLD_NOLOAD nothing is mapped or run: the handle of a
    // library already loaded, or an error. (The dynamic loader may open a
    // file of that name on its search path to compare it with the loaded
    // ones: what it hands back is checked to answer to `name` below.)
    let library = unsafe { Library::open(Some(name), RTLD_NOW | libc::RTLD_NOLOAD) }.ok()?;
    let handle = library.into_raw();
    let mut map: *const LinkMap = std::ptr::null();
    // SAFETY: `handle` is a live handle from `dlopen`; RTLD_DI_LINKMAP
    // writes one pointer, to the object's link map, into `map`. The map and
    // its `l_name` stay valid while the handle holds the object, that is
    // until `from_raw(handle)` below is dropped.
    let file = unsafe {
        if libc::dlinfo(handle, libc::RTLD_DI_LINKMAP, (&raw mut map).cast()) == 0
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
    // What a plugin's own look-up by name would also find: a library loaded
    // under that file name, or with that soname. (One found through the
    // search path's file under another name is not: the plugin's run path
    // comes before the search path.)
    file.filter(|file| {
        !file.as_os_str().is_empty()
            && (file.file_name().is_some_and(|f| f == name)
                || soname(file).is_some_and(|soname| soname == name))
    })
}

/// Whether two files are one library: the same file, or the same bytes
/// (compared piece by piece, up to the first difference).
fn same_bytes(a: &Path, b: &Path) -> bool {
    use std::io::Read as _;
    let (Ok(mut fa), Ok(mut fb)) = (std::fs::File::open(a), std::fs::File::open(b)) else {
        return false;
    };
    let (Ok(ma), Ok(mb)) = (fa.metadata(), fb.metadata()) else {
        return false;
    };
    if (ma.dev(), ma.ino()) == (mb.dev(), mb.ino()) {
        return true;
    }
    if ma.len() != mb.len() {
        return false;
    }
    let (mut xa, mut xb) = (vec![0; COMPARE_CHUNK], vec![0; COMPARE_CHUNK]);
    loop {
        let n = match fa.read(&mut xa) {
            Ok(0) => return true,
            Ok(n) => n,
            Err(_) => return false,
        };
        if fb.read_exact(&mut xb[..n]).is_err() || xa[..n] != xb[..n] {
            return false;
        }
    }
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
        leaf(dir, HELPER, value);
        needing(dir, &format!("lib{name}.so"), HELPER, Some(true))
    }

    /// The C function a test library `name` defines, named after it.
    fn symbol(name: &str) -> String {
        name.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect()
    }

    /// Builds `dir/name`, a library of soname `name` whose function returns
    /// `value`.
    fn leaf(dir: &Path, name: &str, value: i32) {
        std::fs::create_dir_all(dir).unwrap();
        cc(
            dir,
            &[name, &format!("-Wl,-soname,{name}")],
            &format!("int {}(void) {{ return {value}; }}\n", symbol(name)),
        );
    }

    /// Builds `dir/library`, which needs `dir/needed` (built already) and
    /// calls it; `run_path`: `$ORIGIN` as its `DT_RUNPATH` (`Some(true)`),
    /// as its `DT_RPATH` (`Some(false)`), or no run path.
    fn needing(dir: &Path, library: &str, needed: &str, run_path: Option<bool>) -> PathBuf {
        let search = format!("-L{}", dir.display());
        let link = format!("-l:{needed}");
        let mut args = vec![library, &search, &link];
        if let Some(new_dtags) = run_path {
            args.push("-Wl,-rpath,$ORIGIN");
            args.push(if new_dtags {
                "-Wl,--enable-new-dtags"
            } else {
                "-Wl,--disable-new-dtags"
            });
        }
        cc(
            dir,
            &args,
            &format!(
                "int {n}(void);\nint {l}(void) {{ return {n}(); }}\n",
                n = symbol(needed),
                l = symbol(library)
            ),
        );
        dir.join(library)
    }

    /// Builds the shared library `dir/args[0]` from C `source` with `cc`,
    /// the rest of `args` on its command line.
    fn cc(dir: &Path, args: &[&str], source: &str) {
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
    }

    fn origin_path(library: &Path) -> Option<OriginPath> {
        let file = std::fs::File::open(library).unwrap();
        let len = file.metadata().unwrap().len();
        crate::native::check_elf(&file, len, library, true)
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
        // Loaded from its bytes (a signed library, a reload) its `$ORIGIN`
        // is a memory file that finds nothing: the library of that name
        // loaded already is what it would get. Refused the same way.
        let bytes = std::fs::read(&second).unwrap();
        let opened = NativeLibrary::open_bytes(&second, &bytes).map(|_| ());
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

    /// A library shipped by a shipped library: the plugin's library needs
    /// `libmid` beside it, which needs `libleaf` beside it. A `libleaf` of
    /// another plugin loaded already is found one level down.
    #[test]
    fn a_library_shipped_by_a_shipped_library_is_checked_too() {
        const LEAF: &str = "libfs_origin_test_leaf.so";
        const MID: &str = "libfs_origin_test_mid.so";
        let tmp = tempfile::tempdir().unwrap();
        let first_dir = tmp.path().join("first");
        leaf(&first_dir, LEAF, 1);
        let first = needing(&first_dir, "libfirst.so", LEAF, Some(true));
        let second_dir = tmp.path().join("second");
        leaf(&second_dir, LEAF, 2);
        needing(&second_dir, MID, LEAF, Some(true));
        needing(&second_dir, "libsecond.so", MID, Some(true));
        let second = second_dir.join("libsecond.so");
        let found = origin_path(&second).expect("an $ORIGIN run path");
        assert!(found.needed.iter().any(|n| n == MID), "{found:?}");
        assert!(!found.needed.iter().any(|n| n == LEAF), "{found:?}");
        // Nothing of these names is loaded: the chain passes.
        check(&second, &found).unwrap();

        // SAFETY: the test's own library, whose initialisers do nothing.
        let loaded = unsafe { Library::open(Some(&first), RTLD_NOW) }.unwrap();
        let err = check(&second, &found).unwrap_err();
        let ImportError::SharedLibraryShadowed {
            path,
            name,
            shipped,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(path, &second);
        assert_eq!(name, LEAF);
        assert_eq!(shipped, &second_dir.join(LEAF));
        drop(loaded);
    }

    /// glibc's `DT_RPATH` rule: a shipped library without a run path of
    /// its own finds what it needs through the old-style `DT_RPATH` of the
    /// plugin's library that loads it, so a clash there is found; under a
    /// `DT_RUNPATH` (which serves the plugin's library alone) it is not
    /// looked for.
    #[test]
    fn a_dt_rpath_serves_the_libraries_it_loads_too() {
        const LEAF: &str = "libfs_origin_test_rleaf.so";
        const MID: &str = "libfs_origin_test_rmid.so";
        let tmp = tempfile::tempdir().unwrap();
        // `dir/LEAF` returning `value`, `dir/MID` needing it (no run path),
        // and `dir/{name}` needing `MID` through `$ORIGIN` in a `DT_RPATH`
        // (`new_dtags`: in a `DT_RUNPATH`).
        let build = |dir: &Path, name: &str, value: i32, new_dtags: bool| {
            leaf(dir, LEAF, value);
            needing(dir, MID, LEAF, None);
            needing(dir, name, MID, Some(new_dtags))
        };
        let rpath = build(&tmp.path().join("rpath"), "librpath.so", 2, false);
        let runpath = build(&tmp.path().join("runpath"), "librunpath.so", 3, true);
        let rpath_found = origin_path(&rpath).expect("an $ORIGIN run path");
        assert!(!rpath_found.runpath, "{rpath_found:?}");
        let runpath_found = origin_path(&runpath).expect("an $ORIGIN run path");
        assert!(runpath_found.runpath, "{runpath_found:?}");
        check(&rpath, &rpath_found).unwrap();

        // Another LEAF loaded (by its path: what the two plugins' MID would
        // be handed).
        let other = tmp.path().join("other");
        leaf(&other, LEAF, 1);
        // SAFETY: the test's own library, whose initialisers do nothing.
        let loaded = unsafe { Library::open(Some(other.join(LEAF)), RTLD_NOW) }.unwrap();
        let err = check(&rpath, &rpath_found).unwrap_err();
        let ImportError::SharedLibraryShadowed { name, shipped, .. } = &err else {
            panic!("{err}");
        };
        assert_eq!(name, LEAF);
        assert_eq!(shipped, &tmp.path().join("rpath").join(LEAF));
        // MID has no run path and the plugin's is a DT_RUNPATH: glibc does
        // not look for LEAF beside it, and neither does the check.
        check(&runpath, &runpath_found).unwrap();
        drop(loaded);
    }

    /// A library with an `$ORIGIN` run path (built once), and where its
    /// dynamic section lies in the file.
    fn shipped_bytes() -> &'static (Vec<u8>, std::ops::Range<usize>) {
        static BUILT: std::sync::OnceLock<(Vec<u8>, std::ops::Range<usize>)> =
            std::sync::OnceLock::new();
        BUILT.get_or_init(|| {
            use object::read::elf::FileHeader as _;
            let tmp = tempfile::tempdir().unwrap();
            let bytes = std::fs::read(ship(tmp.path(), "fuzzed", 3)).unwrap();
            let header = object::elf::FileHeader64::<object::Endianness>::parse(&*bytes).unwrap();
            let endian = header.endian().unwrap();
            let dynamic = header
                .program_headers(endian, &*bytes)
                .unwrap()
                .iter()
                .find(|s| s.p_type(endian) == PT_DYNAMIC)
                .map(|s| s.file_range(endian))
                .unwrap();
            let start = usize::try_from(dynamic.0).unwrap();
            let end = start + usize::try_from(dynamic.1).unwrap();
            (bytes, start..end)
        })
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Damaged dynamic entries (tags, string offsets, the string
        /// table's address and size) and files cut short: the check reads
        /// what it can, inside the file, and never panics.
        #[test]
        fn a_damaged_dynamic_section_never_panics(
            flips in proptest::collection::vec(
                (proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
                1..8,
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
            truncate in proptest::prelude::any::<bool>(),
        ) {
            let (bytes, dynamic) = shipped_bytes();
            let mut bytes = bytes.clone();
            for (at, byte) in flips {
                bytes[dynamic.start + at.index(dynamic.len())] = byte;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            let tmp = tempfile::tempdir().unwrap();
            let library = tmp.path().join("libfuzzed.so");
            std::fs::write(&library, &bytes).unwrap();
            let file = std::fs::File::open(&library).unwrap();
            if let Ok(elf) = crate::native::check_elf(&file, bytes.len() as u64, &library, true)
                && let Some(origin_path) = elf.origin_path
            {
                // Nothing of these names is loaded: the check passes.
                proptest::prop_assert!(check(&library, &origin_path).is_ok());
            }
        }
    }

    #[test]
    fn origin_is_expanded_as_the_dynamic_loader_does() {
        assert_eq!(expand_origin("$ORIGIN", "/p"), Some("/p".into()));
        assert_eq!(
            expand_origin("$ORIGIN/../lib", "/p"),
            Some("/p/../lib".into())
        );
        assert_eq!(expand_origin("${ORIGIN}lib", "/p"), Some("/plib".into()));
        assert_eq!(expand_origin("/x/$ORIGIN:y", "/p"), Some("/x//p:y".into()));
        assert_eq!(expand_origin("$ORIGINS", "/p"), None);
        assert_eq!(expand_origin("$LIB/x", "/p"), None);
        assert_eq!(expand_origin("/usr/lib", "/p"), None);
    }

    /// A library without `$ORIGIN` in its run path costs one look at its
    /// dynamic entries and is not checked.
    #[test]
    fn a_library_without_an_origin_run_path_has_nothing_to_check() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        cc(
            dir,
            &["libplain.so", "-Wl,-rpath,/opt/elsewhere"],
            "int plain(void) { return 0; }\n",
        );
        assert_eq!(origin_path(&dir.join("libplain.so")), None);
        // The same answer from its bytes, and from those of one that has.
        assert!(!names_origin(
            &std::fs::read(dir.join("libplain.so")).unwrap()
        ));
        let shipping = ship(&dir.join("shipping"), "shipping", 4);
        assert!(names_origin(&std::fs::read(shipping).unwrap()));
        assert!(!names_origin(b"not an ELF file"));
    }
}
