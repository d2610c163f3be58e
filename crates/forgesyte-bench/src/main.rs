//! `forgesyte-bench`: the ForgeSyte benchmark (see the library's docs and
//! `BENCHMARKS.md`).
//!
//! ```text
//! cargo run --release -p forgesyte-bench [-- --quick | --smoke] [--out FILE]
//! ```
//!
//! Exit status: 0 when every correctness check held (missed speed targets
//! are reported in the table, not as failures), 1 otherwise, 2 on usage
//! errors.
//!
//! Only the command line: the figures, their baselines and the report live
//! in the library, which must not know how it is invoked.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use forgesyte_bench::{Mode, Options, Part, Program, helpers};

#[derive(Debug, Parser)]
#[command(
    name = "forgesyte-bench",
    about = "Benchmark the ForgeSyte plugin host against baselines measured in the same run"
)]
struct Cli {
    #[command(subcommand)]
    helper: Option<Helper>,
    /// Shorter runs (about a minute and a half) with the same figures.
    #[arg(long, conflicts_with = "smoke")]
    quick: bool,
    /// A few plugins and about a second of load: checks that the benchmark
    /// works; its numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// Where to write the JSON report [default: WORK_DIR/results.json].
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Where plugin trees and logs go [default: target/bench, or
    /// target/bench-smoke with --smoke].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Use this `forgesyte` binary instead of building the release one.
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Use this plugin library (tools noop, fail, panic) instead of
    /// building the bench plugin.
    #[arg(long, value_name = "PATH")]
    plugin_lib: Option<PathBuf>,
    /// Keep the generated plugin trees.
    #[arg(long)]
    keep_trees: bool,
    /// Run only these parts of the benchmark (comma-separated); the
    /// report then holds only their figures and checks.
    #[arg(long, value_enum, value_delimiter = ',', value_name = "PART")]
    only: Vec<Part>,
}

/// The helper processes (not for people).
#[derive(Debug, Subcommand)]
enum Helper {
    #[command(name = "__serve", hide = true)]
    Serve {
        #[arg(long)]
        plugins: PathBuf,
        #[arg(long)]
        bind: String,
        #[arg(long)]
        python: Option<PathBuf>,
    },
    #[command(name = "__baseline", hide = true)]
    Baseline {
        #[arg(long)]
        list: PathBuf,
        #[arg(long)]
        health: PathBuf,
        #[arg(long)]
        bind: String,
    },
    #[command(name = "__frames_baseline", hide = true)]
    FramesBaseline {
        #[arg(long)]
        bind: String,
    },
    #[command(name = "__load", hide = true)]
    Load { dir: PathBuf },
    #[command(name = "__dlopen", hide = true)]
    Dlopen { dir: PathBuf },
    #[command(name = "__rawabi", hide = true)]
    Rawabi { dir: PathBuf },
    #[command(name = "__rss", hide = true)]
    Rss {
        dir: PathBuf,
        /// Also create every instance and list its tools (raw ABI).
        #[arg(long)]
        construct: bool,
    },
    /// Load on one route of a running server (for profiling it).
    #[command(name = "__drive", hide = true)]
    Drive {
        addr: std::net::SocketAddr,
        path: String,
        #[arg(long)]
        post: Option<String>,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
    },
}

fn main() -> ExitCode {
    // `__runner`: this executable is the native plugin runner of isolated
    // plugins (as `forgesyte` is). First, before anything can print: the
    // runner must own stdout.
    let mut args = std::env::args_os().skip(1).peekable();
    if args.next_if(|a| a == helpers::RUNNER).is_some() {
        return forgesyte_loader::process::runner_main(args);
    }
    let cli = Cli::parse();
    let outcome = match cli.helper {
        Some(helper) => run_helper(helper).map(|()| ExitCode::SUCCESS),
        None => bench(&cli),
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("forgesyte-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run_helper(helper: Helper) -> anyhow::Result<()> {
    let print = |value: serde_json::Value| println!("{value}");
    match helper {
        Helper::Serve {
            plugins,
            bind,
            python,
        } => helpers::serve(&plugins, &bind, python.as_deref()),
        Helper::Baseline { list, health, bind } => helpers::baseline(&list, &health, &bind),
        Helper::FramesBaseline { bind } => helpers::frames_baseline(&bind),
        Helper::Load { dir } => helpers::load(&dir).map(print),
        Helper::Dlopen { dir } => helpers::dlopen(&dir).map(print),
        Helper::Rawabi { dir } => helpers::rawabi(&dir).map(print),
        Helper::Rss { dir, construct } => helpers::rss(&dir, construct).map(print),
        Helper::Drive {
            addr,
            path,
            post,
            connections,
            seconds,
        } => helpers::drive(addr, &path, post.as_deref(), connections, seconds).map(print),
    }
}

fn bench(cli: &Cli) -> anyhow::Result<ExitCode> {
    let mode = if cli.smoke {
        Mode::Smoke
    } else if cli.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    if cfg!(debug_assertions) && mode != Mode::Smoke {
        eprintln!(
            "forgesyte-bench: warning: this is a debug build; the load generator and the \
             baseline are slow. Use `cargo run --release -p forgesyte-bench`."
        );
    }
    let release = mode != Mode::Smoke;
    let work_dir = cli.work_dir.clone().unwrap_or_else(|| {
        forgesyte_bench::target_dir().join(if release { "bench" } else { "bench-smoke" })
    });
    let results = cli
        .out
        .clone()
        .unwrap_or_else(|| work_dir.join("results.json"));
    let helper = std::env::current_exe().context("cannot find this executable")?;
    let plugin_library = match &cli.plugin_lib {
        Some(path) => path.clone(),
        None => {
            eprintln!("[forgesyte-bench] building the bench plugin");
            forgesyte_bench::build_plugin(release)?
        }
    };
    let server = match &cli.server_bin {
        Some(path) => Program::forgesyte(path),
        None if release => {
            eprintln!("[forgesyte-bench] building the release forgesyte binary");
            Program::forgesyte(forgesyte_bench::build_server()?)
        }
        None => Program::self_serve(&helper),
    };
    let options = Options {
        mode,
        work_dir,
        results: results.clone(),
        server,
        helper,
        plugin_library,
        keep_trees: cli.keep_trees,
        progress: true,
        only: cli.only.clone(),
    };
    let report = forgesyte_bench::run(&options)?;
    println!();
    print!("{}", report.table());
    for figure in report.not_measured() {
        if let Some(reason) = &figure.not_measured {
            println!("{}: not measured: {reason}", figure.title);
        }
    }
    println!();
    println!("{}", report.summary());
    println!("raw runs: {}", results.display());
    let failed = report.failed_checks();
    for check in &failed {
        println!("FAILED CHECK: {}: {}", check.name, check.detail);
    }
    // Correctness only (requests answered, counts reconciled); missed speed
    // targets are in the table. The plain closing line CI logs read.
    println!(
        "checks: {} passed, {} failed",
        report.checks.len() - failed.len(),
        failed.len()
    );
    Ok(if report.failed_checks().is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
