//! `forgesyte`: serve plugins over HTTP, or check a plugins directory.
//!
//! ```text
//! forgesyte serve [--plugins DIR] [--bind ADDR] [--lib-path DIRS] [--call-timeout SECS] [--body-limit BYTES]
//! forgesyte check [DIR] [--json] [--lib-path DIRS]
//! ```
//!
//! Every option also reads an environment variable (`FORGESYTE_*`); logs go
//! to stderr, filtered by `RUST_LOG` (default `info` for `serve`, `off` for
//! `check`). Exit codes: 0 success, 1 failure (for `check`: a plugin is not
//! available), 2 usage error.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use forgesyte_server::{
    DEFAULT_BIND, DEFAULT_PLUGINS_DIR, Server, ServerConfig, check, shutdown_signal,
};
use tracing_subscriber::EnvFilter;

/// How long the runtime waits, after the server stopped, for tool calls
/// still running on blocking threads (a timed-out in-process call may never end).
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(1);

#[derive(Debug, Parser)]
#[command(name = "forgesyte", version, about = "ForgeSyte plugin host")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load the plugins and serve the HTTP API (loading continues in the
    /// background while the server already answers).
    Serve(ServeArgs),
    /// Load the plugins without serving and report each one's state; exit 0
    /// only when every plugin is available.
    Check(CheckArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Directory holding one subdirectory per plugin.
    #[arg(long, value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    plugins: PathBuf,
    /// Address to listen on (port 0 picks a free port).
    #[arg(long, value_name = "ADDR", env = "FORGESYTE_BIND", default_value = DEFAULT_BIND)]
    bind: String,
    #[command(flatten)]
    lib: LibPathArgs,
    /// Time limit of one tool call, in seconds, when the plugin's manifest sets none.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_CALL_TIMEOUT", default_value = "60", value_parser = parse_seconds)]
    call_timeout: Duration,
    /// Largest accepted request body, in bytes.
    #[arg(long, value_name = "BYTES", env = "FORGESYTE_BODY_LIMIT", default_value = "33554432", value_parser = parse_bytes)]
    body_limit: usize,
    /// How long shutdown waits for in-flight requests, in seconds.
    #[arg(long, value_name = "SECS", env = "FORGESYTE_SHUTDOWN_GRACE", default_value = "10", value_parser = parse_seconds)]
    shutdown_grace: Duration,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// Directory holding one subdirectory per plugin.
    #[arg(value_name = "DIR", env = "FORGESYTE_PLUGINS_DIR", default_value = DEFAULT_PLUGINS_DIR)]
    dir: PathBuf,
    /// Print the JSON array `GET /v1/plugins` would answer instead of text.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    lib: LibPathArgs,
}

#[derive(Debug, Args)]
struct LibPathArgs {
    /// Extra directories searched for plugin libraries and `lib:`
    /// dependencies (colon-separated, or repeat the option).
    #[arg(
        long = "lib-path",
        value_name = "DIRS",
        env = "FORGESYTE_LIB_PATH",
        value_delimiter = ':'
    )]
    lib_paths: Vec<PathBuf>,
}

impl LibPathArgs {
    fn dirs(self) -> Vec<PathBuf> {
        self.lib_paths
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .collect()
    }
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    if !secs.is_finite() || secs <= 0.0 {
        return Err(format!("'{text}' must be a positive number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("'{text}': {e}"))
}

fn parse_bytes(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("the body limit must be at least 1 byte".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("'{text}' is not a number of bytes")),
    }
}

fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            init_logging("info");
            match serve(args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!("{e:#}");
                    eprintln!("forgesyte: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check(args) => {
            init_logging("off");
            run_check(args)
        }
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let mut config = ServerConfig::default();
    config.plugins_dir = args.plugins;
    config.bind = args.bind;
    config.lib_paths = args.lib.dirs();
    config.call_timeout = args.call_timeout;
    config.body_limit = args.body_limit;
    config.shutdown_grace = args.shutdown_grace;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(async {
        let shutdown = shutdown_signal();
        let server = Server::bind(config).await?;
        // The one line tests and scripts parse; stdout, flushed at once.
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(
            stdout,
            "forgesyte listening on http://{}",
            server.local_addr()
        );
        let _ = stdout.flush();
        drop(stdout);
        server.run(shutdown).await
    });
    // Blocking threads may still run timed-out tool calls: do not wait for them.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    result.map_err(anyhow::Error::from)
}

fn run_check(args: CheckArgs) -> ExitCode {
    let json = args.json;
    match check(&args.dir, &args.lib.dirs()) {
        Ok(report) => {
            let text = if json {
                report.to_json() + "\n"
            } else {
                report.to_text()
            };
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
            ExitCode::from(report.exit_code())
        }
        Err(e) => {
            eprintln!("forgesyte check: {e}");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn seconds_and_bytes_are_validated() {
        assert_eq!(parse_seconds("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_seconds("60"), Ok(Duration::from_secs(60)));
        assert!(parse_seconds("0").is_err());
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("soon").is_err());
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert!(parse_bytes("0").is_err());
        assert!(parse_bytes("1MiB").is_err());
    }

    #[test]
    fn lib_path_takes_colon_lists_and_repeats() {
        let cli = Cli::try_parse_from([
            "forgesyte",
            "check",
            "dir",
            "--lib-path",
            "/a:/b",
            "--lib-path",
            "/c",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else {
            panic!("expected check");
        };
        assert_eq!(
            args.lib.dirs(),
            [
                PathBuf::from("/a"),
                PathBuf::from("/b"),
                PathBuf::from("/c")
            ]
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        let err = Cli::try_parse_from(["forgesyte", "serve", "--call-timeout", "0"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        let err = Cli::try_parse_from(["forgesyte", "frobnicate"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
