//! Workspace-level tests live in `tests/`; this library holds what other
//! crates' tests share: the fixture zoo and the runner conformance suite.

pub mod conformance;

/// The fixture zoo: plugin directories built by `build.rs` (see
/// `tests/fixtures/`), one per way a plugin can load or fail.
pub mod zoo {
    include!(concat!(env!("OUT_DIR"), "/zoo.rs"));
}

/// Writes an executable shell script `#!/bin/sh` + `body` at `path`, then
/// starts it (as a no-op: `WARM_UP` set) until no other thread's fork still
/// holds it open for writing (`ETXTBSY`, retried for up to 10 s): after one
/// clean start, none can, and the test may exec it for real.
///
/// # Errors
///
/// When the file cannot be written or made executable, or it cannot be run
/// for another reason than `ETXTBSY` (or past the 10 s).
pub fn write_script(path: &std::path::Path, body: &str) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    use std::time::{Duration, Instant};
    std::fs::write(
        path,
        format!("#!/bin/sh\n[ -n \"$WARM_UP\" ] && exit 0\n{body}\n"),
    )?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match std::process::Command::new(path)
            .env("WARM_UP", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(_) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(26) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e),
        }
    }
}
