//! Processes the benchmark starts: servers under test, the baseline server
//! and one-shot helpers; their resident memory.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

use crate::config::Program;

/// How long a server may take to print its listening line.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(60);

/// A running server process, killed when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    child: Child,
    addr: SocketAddr,
    /// When the process was spawned.
    pub(crate) spawned: Instant,
}

impl Server {
    /// Starts `program ARGS...` with stderr to `log` and waits until it
    /// prints `... listening on http://ADDR` on stdout.
    pub(crate) fn start(program: &Program, args: &[&str], log: &Path) -> anyhow::Result<Server> {
        let stderr =
            File::create(log).with_context(|| format!("cannot create {}", log.display()))?;
        let mut command = Command::new(&program.program);
        command
            .args(&program.args)
            .args(args)
            // Servers run as deployed: default logging (info), and no
            // symbolised backtrace per panic (tens of milliseconds each).
            .env_remove("RUST_LOG")
            .env_remove("RUST_BACKTRACE")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let spawned = Instant::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {}", program.program.display()))?;
        let stdout = child.stdout.take().context("no stdout pipe")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let first = reader.read_line(&mut line).map(|_| line);
            let _ = tx.send(first);
            // Keep draining so the child never blocks on a full pipe.
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        let mut server = Server {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            spawned,
        };
        let line = match rx.recv_timeout(LISTEN_TIMEOUT) {
            Ok(Ok(line)) => line,
            Ok(Err(e)) => return Err(e).context("reading the server's stdout"),
            Err(_) => bail!(
                "{} printed no listening line within {LISTEN_TIMEOUT:?} (log: {})",
                program.program.display(),
                log.display()
            ),
        };
        server.addr = parse_listening(&line).ok_or_else(|| {
            anyhow!(
                "unexpected first line from {}: {line:?} (log: {})",
                program.program.display(),
                log.display()
            )
        })?;
        Ok(server)
    }

    /// The address the server listens on.
    pub(crate) fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory of the process now, in KiB.
    pub(crate) fn rss_kib(&self) -> anyhow::Result<u64> {
        rss_kib(&format!("/proc/{}/status", self.pid()))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The address in `... listening on http://ADDR`.
pub(crate) fn parse_listening(line: &str) -> Option<SocketAddr> {
    let (_, rest) = line.split_once("listening on http://")?;
    rest.trim().trim_end_matches('/').parse().ok()
}

/// `VmRSS` of a `/proc/*/status` file, in KiB.
pub(crate) fn rss_kib(status_file: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(status_file)
        .with_context(|| format!("cannot read {status_file}"))?;
    parse_vm_rss(&status).with_context(|| format!("no VmRSS line in {status_file}"))
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Runs a helper (`bench __NAME ARGS...`) to completion and parses the JSON
/// line it prints last.
pub(crate) fn helper(bench: &Path, args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let output = Command::new(bench)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start helper {}", bench.display()))?;
    if !output.status.success() {
        bail!(
            "helper {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .with_context(|| format!("helper {args:?} printed nothing"))?;
    serde_json::from_str(line).with_context(|| format!("helper {args:?} printed {line:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines_and_rss_are_parsed() {
        assert_eq!(
            parse_listening("forgesyte listening on http://127.0.0.1:4242\n"),
            Some(SocketAddr::from(([127, 0, 0, 1], 4242)))
        );
        assert_eq!(parse_listening("hello"), None);
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t   12345 kB\nVmData: 1 kB\n"),
            Some(12345)
        );
        assert_eq!(parse_vm_rss("Name: x\n"), None);
        assert!(rss_kib("/proc/self/status").unwrap() > 0);
    }
}
