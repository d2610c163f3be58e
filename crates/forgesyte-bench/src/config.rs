//! What a benchmark run is asked to do ([`Options`]) and how long and how
//! big each of its parts is in each [`Mode`] (the crate-private `Plan`).

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// How thorough a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// The real benchmark: 1,000 plugins to load, 100 to serve, 5-second
    /// throughput runs repeated 3 times, a 60-second mixed run, 20 Python
    /// plugins (about 5 minutes).
    Full,
    /// The same figures with shorter runs (about a minute and a half).
    Quick,
    /// A few plugins and about a second of load: checks that every part of
    /// the benchmark works. Its numbers mean nothing.
    Smoke,
}

impl Mode {
    /// The mode's name, as the command line spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Full => "full",
            Mode::Quick => "quick",
            Mode::Smoke => "smoke",
        }
    }
}

/// A program and its first arguments: how to start a server under test.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Program {
    /// The executable.
    pub program: PathBuf,
    /// Arguments before the ones the benchmark adds (`--plugins`, `--bind`).
    pub args: Vec<String>,
}

impl Program {
    /// The real server: `forgesyte serve`.
    pub fn forgesyte(binary: impl Into<PathBuf>) -> Self {
        Program {
            program: binary.into(),
            args: vec!["serve".into()],
        }
    }

    /// The benchmark executable's own `__serve` helper: the server library
    /// (`forgesyte_server::Server`) in a process of its own, for smoke runs
    /// where no release `forgesyte` binary is built.
    pub fn self_serve(bench: impl Into<PathBuf>) -> Self {
        Program {
            program: bench.into(),
            args: vec!["__serve".into()],
        }
    }
}

/// Everything [`crate::run`] needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// How thorough the run is.
    pub mode: Mode,
    /// Where plugin trees and server logs go (created; trees are replaced).
    pub work_dir: PathBuf,
    /// Where the JSON report of the raw runs is written.
    pub results: PathBuf,
    /// How to start the server under test (it gets `--plugins DIR --bind
    /// 127.0.0.1:0`, and `--python PATH` for Python plugins, appended and
    /// must print `... listening on http://ADDR`). Its program must also be
    /// a native plugin runner behind `__runner` (`forgesyte` is, and so is
    /// the benchmark executable).
    pub server: Program,
    /// The benchmark executable, for its helper processes (`__baseline`,
    /// `__load`, `__dlopen`, `__rss`).
    pub helper: PathBuf,
    /// The plugin library copied into every plugin directory; it must offer
    /// the tools `noop`, `fail` and `panic` (the bench plugin does).
    pub plugin_library: PathBuf,
    /// Keep the generated plugin trees (the 1,000-plugin one is large).
    pub keep_trees: bool,
    /// Print progress lines on stderr.
    pub progress: bool,
    /// Run only these parts (empty: every part).
    pub only: Vec<Part>,
}

impl Options {
    /// Whether `part` runs in this run.
    pub(crate) fn runs(&self, part: Part) -> bool {
        self.only.is_empty() || self.only.contains(&part)
    }
}

/// The parts of a run, each one or more figures (`--only PART,...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Part {
    /// Loading the 1,000-plugin tree (`load`, `load_abi`).
    Load,
    /// Start to serving 100 plugins.
    Startup,
    /// The HTTP throughput figures (list, health, tool call, metrics).
    Http,
    /// The per-call overhead of the in-process call path.
    Calls,
    /// Server RSS with 100 plugins.
    Memory,
    /// The mixed run (readers and callers together).
    Mixed,
    /// The Python figures (start-up, HTTP against the reference, round trip).
    Python,
    /// The frames figures (64 KB to 8 MB payloads).
    Frames,
    /// The WebSocket stream figures.
    Streams,
}

/// Sizes and durations of one mode.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Plan {
    /// Plugin directories loaded by the load figure.
    pub(crate) load_plugins: usize,
    /// Repeats of the load figure (each a fresh process, measured and baseline).
    pub(crate) load_repeats: usize,
    /// Plugins served by the HTTP, startup, memory and mixed figures.
    pub(crate) serve_plugins: usize,
    /// Repeats of the startup figure.
    pub(crate) startup_repeats: usize,
    /// Connections of the throughput runs.
    pub(crate) connections: usize,
    /// Unmeasured start of each throughput run.
    #[serde(serialize_with = "secs")]
    pub(crate) warmup: Duration,
    /// Measured part of each throughput run.
    #[serde(serialize_with = "secs")]
    pub(crate) duration: Duration,
    /// Repeats of each throughput run (medians reported).
    pub(crate) repeats: usize,
    /// Calls timed one by one for the call-overhead figure, per repeat.
    pub(crate) calls: usize,
    /// Repeats of the memory figure.
    pub(crate) memory_repeats: usize,
    /// Readers of the mixed run.
    pub(crate) mixed_readers: usize,
    /// Connections calling `noop`, and calling `fail`, in the mixed run.
    pub(crate) mixed_callers: usize,
    /// Length of the mixed run.
    #[serde(serialize_with = "secs")]
    pub(crate) mixed: Duration,
    /// Python plugins of the Python start-up figure.
    pub(crate) python_plugins: usize,
    /// Repeats of the Python start-up figure (each a fresh server and a
    /// fresh baseline process).
    pub(crate) python_startup_repeats: usize,
    /// Sequential calls timed one by one for the Python round-trip figure,
    /// per repeat (its HTTP figure uses `connections`, `warmup`,
    /// `duration` and `repeats`).
    pub(crate) python_calls: usize,
    /// Payload sizes of the frames figures, in bytes.
    pub(crate) frame_sizes: Vec<usize>,
    /// Timed requests per frames figure (four times as many for 64 KB).
    pub(crate) frame_requests: usize,
    /// Frames sent per no-op stream figure.
    pub(crate) stream_frames: usize,
    /// Frames sent to image-stats in its stream figure.
    pub(crate) stream_image_frames: usize,
    /// Width and height of the stream's JPEG frames (1080p but in smoke
    /// mode, where encoding one in a debug build would take seconds).
    pub(crate) stream_frame: (u32, u32),
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Plan {
    pub(crate) fn for_mode(mode: Mode) -> Plan {
        match mode {
            Mode::Full => Plan {
                load_plugins: 1000,
                load_repeats: 5,
                serve_plugins: 100,
                startup_repeats: 7,
                connections: 32,
                warmup: Duration::from_secs(1),
                duration: Duration::from_secs(5),
                repeats: 3,
                calls: 200_000,
                memory_repeats: 3,
                mixed_readers: 32,
                mixed_callers: 4,
                mixed: Duration::from_secs(60),
                python_plugins: 20,
                python_startup_repeats: 7,
                python_calls: 20_000,
                frame_sizes: vec![64 << 10, 1 << 20, 8 << 20],
                frame_requests: 20,
                stream_frames: 3000,
                stream_image_frames: 300,
                stream_frame: (1920, 1080),
            },
            Mode::Quick => Plan {
                load_plugins: 1000,
                load_repeats: 3,
                serve_plugins: 100,
                startup_repeats: 5,
                connections: 32,
                warmup: Duration::from_millis(500),
                duration: Duration::from_secs(2),
                repeats: 3,
                calls: 50_000,
                memory_repeats: 1,
                mixed_readers: 32,
                mixed_callers: 4,
                mixed: Duration::from_secs(5),
                python_plugins: 20,
                python_startup_repeats: 5,
                python_calls: 5_000,
                frame_sizes: vec![64 << 10, 8 << 20],
                frame_requests: 8,
                stream_frames: 1000,
                stream_image_frames: 60,
                stream_frame: (1920, 1080),
            },
            Mode::Smoke => Plan {
                load_plugins: 12,
                load_repeats: 1,
                serve_plugins: 8,
                startup_repeats: 1,
                connections: 4,
                warmup: Duration::from_millis(50),
                duration: Duration::from_millis(250),
                repeats: 1,
                calls: 2_000,
                memory_repeats: 1,
                mixed_readers: 4,
                mixed_callers: 1,
                mixed: Duration::from_secs(1),
                python_plugins: 3,
                python_startup_repeats: 1,
                python_calls: 300,
                frame_sizes: vec![64 << 10],
                frame_requests: 2,
                stream_frames: 20,
                stream_image_frames: 5,
                stream_frame: (320, 180),
            },
        }
    }
}
