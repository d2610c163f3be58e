//! The admin token of `serve`: taken out of the process's environment
//! before anything else runs (so no child inherits it, not even in the
//! environment block the process started with), and read from that
//! variable or from `--admin-token-file`.

use std::path::Path;

use anyhow::Context;
use forgesyte_deps::ADMIN_TOKEN_VARIABLE;
use forgesyte_server::AdminToken;

/// The largest admin token file read.
const MAX_TOKEN_FILE_BYTES: u64 = 4096;

/// The admin token: `FORGESYTE_ADMIN_TOKEN`, else the content of
/// `token_file`; `None` (routes disabled) when neither is set. A variable
/// or file that is set but empty is an error: it would silently disable
/// the routes the operator meant to enable.
pub(crate) fn admin_token(
    env_value: Option<std::ffi::OsString>,
    token_file: Option<&Path>,
) -> anyhow::Result<Option<AdminToken>> {
    let (text, source) = match (env_value, token_file) {
        (Some(value), _) => {
            let text = value
                .into_string()
                .map_err(|_| anyhow::anyhow!("FORGESYTE_ADMIN_TOKEN is not valid UTF-8"))?;
            (text, "FORGESYTE_ADMIN_TOKEN".to_owned())
        }
        (None, Some(path)) => {
            // A regular file of one line: a FIFO waited for a writer, and
            // a link to /dev/zero was read without end, before the server
            // listened.
            use forgesyte_deps::FileSystem as _;
            let cannot = || format!("cannot read the admin token file {}", path.display());
            let bytes = forgesyte_deps::RealFs
                .read(path, MAX_TOKEN_FILE_BYTES)
                .with_context(cannot)?;
            if bytes.len() as u64 > MAX_TOKEN_FILE_BYTES {
                anyhow::bail!(
                    "{}: larger than {MAX_TOKEN_FILE_BYTES} bytes (it should hold the token, one \
                     line)",
                    cannot()
                );
            }
            let text = String::from_utf8(bytes)
                .map_err(|_| anyhow::anyhow!("{}: not UTF-8 text", cannot()))?;
            (text, path.display().to_string())
        }
        (None, None) => return Ok(None),
    };
    let token = AdminToken::new(&text)
        .with_context(|| format!("the admin token from {source} is empty"))?;
    // No client can send a line break (or another control character) in
    // an `Authorization` header: the routes would be enabled and locked.
    if text.trim().chars().any(|c| c.is_control() && c != '\t') {
        anyhow::bail!(
            "the admin token from {source} holds a control character (a line break?), which no \
             client can send in an Authorization header: make it one line of text"
        );
    }
    if token.is_short() {
        tracing::warn!(
            "The admin token from {source} is shorter than 16 characters; use a long random one"
        );
    } else if !token.is_strong() {
        tracing::info!(
            "The admin token from {source} is not long and varied enough to pass a lockout \
             (32 characters, 8 different ones): a client locked out for wrong tokens (every \
             local process is one client) is refused it too; `openssl rand -hex 32` makes one \
             that passes"
        );
    }
    Ok(Some(token))
}

/// `FORGESYTE_ADMIN_TOKEN` as the process started: taken out of its
/// environment before anything else runs (see [`take_admin_token_env`]).
static ADMIN_TOKEN_ENV: std::sync::OnceLock<Option<std::ffi::OsString>> =
    std::sync::OnceLock::new();

/// Takes `FORGESYTE_ADMIN_TOKEN` out of this process's environment, so no
/// child inherits it: not a plugin runner, not the Python zygote whose
/// runners clear `os.environ` but keep the block they were started with
/// (`/proc/self/environ`), not a dependency probe. Call first in `main`.
#[allow(unsafe_code)]
pub(crate) fn take_admin_token_env() {
    let token = std::env::var_os(ADMIN_TOKEN_VARIABLE);
    if token.is_some() {
        // `remove_var` leaves the bytes in the block the process started
        // with, which `/proc/PID/environ` shows to processes of this user.
        if let Err(e) = wipe_initial_env(ADMIN_TOKEN_VARIABLE) {
            forgesyte_server::say!(
                "forgesyte: cannot wipe the admin token from the process's environment block: {e}"
            );
        }
        // SAFETY: the first thing `main` does: no other thread exists yet
        // that could read the environment while it changes.
        unsafe { std::env::remove_var(ADMIN_TOKEN_VARIABLE) };
    }
    let _ = ADMIN_TOKEN_ENV.set(token);
}

/// The signing key's password (`keygen`, `sign`), which `serve` never
/// needs: gone from a serving process's environment, its starting block
/// included, before any runner (confined or not) could inherit it.
pub(crate) const KEY_PASSWORD_ENV: &str = forgesyte_deps::KEY_PASSWORD_VARIABLE;

/// Removes `name` from this process's environment and wipes its value in
/// the block the process started with. Call before any other thread
/// exists.
#[allow(unsafe_code)]
pub(crate) fn drop_env_secret(name: &str) {
    use std::os::unix::ffi::OsStringExt as _;
    let Some(value) = std::env::var_os(name) else {
        return;
    };
    // The one copy of the value this process made: zeroed before it is
    // freed, so the heap does not keep it (`black_box` keeps the writes).
    let mut copy = value.into_vec();
    copy.fill(0);
    std::hint::black_box(&copy);
    drop(copy);
    if let Err(e) = wipe_initial_env(name) {
        forgesyte_server::say!(
            "forgesyte: cannot wipe {name} from the process's environment block: {e}"
        );
    }
    // SAFETY: called before any thread of this process starts (the caller
    // promises), so nothing reads the environment while it changes.
    unsafe { std::env::remove_var(name) };
}

/// Overwrites with zeros the value of `name` in the environment block the
/// process was started with (`env_start`..`env_end` of `/proc/self/stat`).
#[allow(unsafe_code)]
fn wipe_initial_env(name: &str) -> std::io::Result<()> {
    // Bytes: the command's name (field 2) need not be UTF-8.
    let stat = std::fs::read("/proc/self/stat")?;
    // Fields after the command's closing parenthesis start at field 3;
    // `env_start` and `env_end` are fields 50 and 51.
    let rest = stat
        .iter()
        .rposition(|&b| b == b')')
        .map_or(&[][..], |at| &stat[at + 1..]);
    let fields: Vec<&str> = std::str::from_utf8(rest)
        .map(|text| text.split_whitespace().collect())
        .unwrap_or_default();
    let field = |n: usize| -> std::io::Result<usize> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("no field {n} in /proc/self/stat")))
    };
    let (start, end) = (field(50)?, field(51)?);
    if end <= start {
        return Ok(());
    }
    // SAFETY: `env_start..env_end` is this process's own environment block,
    // on its initial stack: mapped, readable and writable for the process's
    // life. Only `main`'s first step runs (no other thread), and nothing
    // holds a reference into it (`getenv` pointers read zeros afterwards).
    let block = unsafe {
        std::slice::from_raw_parts_mut(
            std::ptr::with_exposed_provenance_mut::<u8>(start),
            end - start,
        )
    };
    let prefix = format!("{name}=");
    let mut at = 0;
    while at < block.len() {
        let stop = block[at..]
            .iter()
            .position(|&b| b == 0)
            .map_or(block.len(), |p| at + p);
        if block[at..stop].starts_with(prefix.as_bytes()) {
            block[at + prefix.len()..stop].fill(0);
        }
        at = stop + 1;
    }
    Ok(())
}

/// The admin token's variable as the process started with it.
pub(crate) fn admin_token_env() -> Option<std::ffi::OsString> {
    ADMIN_TOKEN_ENV.get().cloned().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_token_comes_from_the_env_or_a_file() {
        assert_eq!(admin_token(None, None).unwrap(), None);
        let from_env = admin_token(Some("from-the-environment".into()), None).unwrap();
        assert!(from_env.unwrap().matches(b"from-the-environment"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-a-file-0123456789\n").unwrap();
        let from_file = admin_token(None, Some(&file)).unwrap().unwrap();
        assert!(from_file.matches(b"from-a-file-0123456789"));
        // The variable wins over the file.
        let both = admin_token(Some("env-wins".into()), Some(&file))
            .unwrap()
            .unwrap();
        assert!(both.matches(b"env-wins"));
        // Set but empty, or unreadable: an error, not silently disabled.
        assert!(admin_token(Some("  ".into()), None).is_err());
        std::fs::write(&file, "\n").unwrap();
        assert!(admin_token(None, Some(&file)).is_err());
        // A line inside it: a token no client can present.
        std::fs::write(&file, "first-line\nsecond-line\n").unwrap();
        let err = admin_token(None, Some(&file)).unwrap_err();
        assert!(format!("{err:#}").contains("control character"), "{err:#}");
        let missing = dir.path().join("missing");
        let err = admin_token(None, Some(&missing)).unwrap_err();
        assert!(format!("{err:#}").contains("admin token file"), "{err:#}");
    }
}
