//! The frames figures: one payload (64 KB, 1 MB, 8 MB) per request to a
//! no-op tool taking one binary argument, through JSON base64, multipart and
//! octet-stream, for the bench plugin in process, in an isolated runner and
//! a Python plugin; and real PNG bytes to the `image-stats` example plugin.
//! The baseline, in the same run and interleaved request by request: an
//! axum handler (`__frames_baseline`) that receives the same body over
//! loopback and answers its length. Host overhead = end-to-end time − the
//! call's `processing_time_ms`.
//!
//! The stream figures (`stream_figures`) reuse the tree and server laid out
//! here.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use serde_json::{Value, json};

use super::{Bench, ms, path_arg};
use crate::config::{Mode, Program};
use crate::http::{Client, Req};
use crate::payload::{self, Encoding};
use crate::proc::Server;
use crate::python::{self, Interpreter};
use crate::report::{Figure, Target, median};

/// A runtime the frames figures measure, and its plugin directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Runtime {
    InProcess,
    Isolated,
    Python,
    /// The same Python plugin's tool that opts in to a zero-copy
    /// `memoryview` (`"zero_copy": True`).
    PythonView,
    ImageStats,
}

impl Runtime {
    pub(super) const ALL: [Runtime; 5] = [
        Runtime::InProcess,
        Runtime::Isolated,
        Runtime::Python,
        Runtime::PythonView,
        Runtime::ImageStats,
    ];

    /// Short name, used in figure ids.
    pub(super) fn id(self) -> &'static str {
        match self {
            Runtime::InProcess => "inproc",
            Runtime::Isolated => "isolated",
            Runtime::Python => "python",
            Runtime::PythonView => "pythonview",
            Runtime::ImageStats => "imagestats",
        }
    }

    /// For people.
    pub(super) fn title(self) -> &'static str {
        match self {
            Runtime::InProcess => "no-op, in-process",
            Runtime::Isolated => "no-op, isolated native",
            Runtime::Python => "no-op, Python",
            Runtime::PythonView => "no-op, Python, zero-copy memoryview",
            Runtime::ImageStats => "image-stats (PNG), in-process",
        }
    }

    /// The plugin, its tool and the tool's binary argument.
    pub(super) fn target(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Runtime::InProcess => ("frames-native", "noop_frame", "frame"),
            Runtime::Isolated => ("frames-isolated", "noop_frame", "frame"),
            Runtime::Python => ("frames-py", "noop_frame", "frame"),
            Runtime::PythonView => ("frames-py", "noop_frame_view", "frame"),
            Runtime::ImageStats => ("image-stats", "analyze", "image_base64"),
        }
    }

    /// The target for the 8 MB octet-stream no-op figure.
    fn octet_target(self) -> Option<f64> {
        match self {
            Runtime::InProcess => Some(1.5),
            Runtime::Isolated => Some(2.0),
            Runtime::Python => Some(2.5),
            Runtime::PythonView | Runtime::ImageStats => None,
        }
    }
}

/// The frames server, its baseline and which runtimes it serves (the
/// others, with the reason they are missing).
pub(super) struct FramesSetup {
    pub(super) server: Server,
    baseline: Server,
    pub(super) missing: Vec<(Runtime, String)>,
}

impl FramesSetup {
    pub(super) fn missing(&self, runtime: Runtime) -> Option<&str> {
        self.missing
            .iter()
            .find(|(r, _)| *r == runtime)
            .map(|(_, why)| why.as_str())
    }
}

/// The `image-stats` example library next to the server binary (built by
/// [`crate::build_server`]), when it is there.
fn image_stats_library(server: &Program) -> Option<PathBuf> {
    let lib = format!(
        "{}forgesyte_image_stats{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    );
    server
        .program
        .parent()
        .map(|dir| dir.join(&lib))
        .filter(|p| p.is_file())
}

fn write_native(dir: &Path, name: &str, library: &Path, isolated: bool) -> anyhow::Result<()> {
    let plugin_dir = dir.join(name);
    std::fs::create_dir_all(&plugin_dir)?;
    let file_name = library
        .file_name()
        .context("the plugin library has no file name")?;
    let mut manifest =
        json!({ "name": name, "version": "1.0.0", "entrypoint": file_name.to_string_lossy() });
    if isolated {
        manifest["isolation"] = json!("process");
    }
    std::fs::write(plugin_dir.join("manifest.json"), manifest.to_string())?;
    std::fs::copy(library, plugin_dir.join(file_name))
        .with_context(|| format!("cannot copy {}", library.display()))?;
    Ok(())
}

/// One timed request: end-to-end and the call's own time, in ms.
#[derive(Debug, Clone, Copy)]
struct Sample {
    e2e_ms: f64,
    processing_ms: f64,
}

impl Bench<'_> {
    /// Lays out the frames tree and starts its server and the baseline.
    pub(super) fn frames_setup(&self) -> anyhow::Result<FramesSetup> {
        let dir = self.options.work_dir.join("plugins-frames");
        crate::tree::remove(&dir)?;
        std::fs::create_dir_all(&dir)?;
        let library = &self.options.plugin_library;
        write_native(&dir, "frames-native", library, false)?;
        write_native(&dir, "frames-isolated", library, true)?;
        let mut missing = Vec::new();
        let mut expect = 2;
        let interpreter = Interpreter::find();
        match &interpreter {
            Ok(_) => {
                let plugin_dir = dir.join("frames-py");
                std::fs::create_dir_all(&plugin_dir)?;
                let manifest =
                    json!({ "name": "frames-py", "version": "1.0.0", "runtime": "python" });
                std::fs::write(plugin_dir.join("manifest.json"), manifest.to_string())?;
                std::fs::write(plugin_dir.join("plugin.py"), python::PLUGIN_SOURCE)?;
                expect += 1;
            }
            Err(why) => {
                for runtime in [Runtime::Python, Runtime::PythonView] {
                    missing.push((runtime, format!("no Python interpreter: {why}")));
                }
            }
        }
        match image_stats_library(&self.options.server) {
            _ if self.options.mode == Mode::Smoke => {
                missing.push((Runtime::ImageStats, "smoke mode".into()));
            }
            Some(lib) => {
                write_native(&dir, "image-stats", &lib, false)?;
                expect += 1;
            }
            None => missing.push((
                Runtime::ImageStats,
                "the image-stats library is not next to the server binary \
                 (cargo build --release -p forgesyte-image-stats)"
                    .into(),
            )),
        }
        let python_args;
        let extra: &[&str] = match &interpreter {
            Ok(interpreter) => {
                python_args = ["--python", path_arg(&interpreter.path)?];
                &python_args
            }
            Err(_) => &[],
        };
        let (server, _) = self.start_server_with(&dir, expect, "frames", extra)?;
        let baseline_program = Program {
            program: self.options.helper.clone(),
            args: vec!["__frames_baseline".into()],
        };
        let baseline = Server::start(
            &baseline_program,
            &["--bind", "127.0.0.1:0"],
            &self.log("frames-baseline"),
        )?;
        Ok(FramesSetup {
            server,
            baseline,
            missing,
        })
    }

    /// Every frames figure (see the module documentation).
    pub(super) fn frames(&mut self, setup: &FramesSetup) -> anyhow::Result<()> {
        let sizes = self.plan.frame_sizes.clone();
        self.progress(&format!(
            "frames: {} payload sizes x 3 encodings x 4 runtimes, {} requests each (more for small ones)",
            sizes.len(),
            self.plan.frame_requests
        ));
        let mut failures = Vec::new();
        let mut requests = 0u64;
        for &size in &sizes {
            let opaque = payload::opaque(size, size as u64);
            let png = payload::png_of_about(size)?;
            // Small payloads are quick: more of them for a stable median.
            let n = if size <= 64 << 10 {
                self.plan.frame_requests * 4
            } else {
                self.plan.frame_requests
            };
            for runtime in Runtime::ALL {
                let data = if runtime == Runtime::ImageStats {
                    &png
                } else {
                    &opaque
                };
                for encoding in Encoding::ALL {
                    let id = format!(
                        "frames_{}_{}_{}",
                        runtime.id(),
                        encoding.id(),
                        payload::size_id(size)
                    );
                    let title = format!(
                        "frame {} {} → {}",
                        payload::size_title(size),
                        encoding.title(),
                        runtime.title()
                    );
                    let target = match runtime.octet_target() {
                        Some(r) if encoding == Encoding::Octet && size == 8 << 20 => {
                            Target::RatioAtMost(r)
                        }
                        _ => Target::Report,
                    };
                    if let Some(why) = setup.missing(runtime) {
                        self.report.figures.push(Figure::not_measured(
                            &id,
                            title,
                            "ms",
                            None,
                            target,
                            why.to_owned(),
                            Value::Null,
                        ));
                        continue;
                    }
                    let (plugin, tool, arg) = runtime.target();
                    let path = format!("/v1/plugins/{plugin}/tools/{tool}/run");
                    let body = encoding.body(arg, data);
                    let req = Req::post("frame", &path, &encoding.content_type(), body)?;
                    // The no-op tools answer the length they received.
                    let expect = (runtime != Runtime::ImageStats).then_some(data.len());
                    let (real, base) =
                        self.runtime
                            .block_on(measure(setup, &req, n, expect, &mut failures))?;
                    requests += 2 * n as u64;
                    let e2e = median(&real.iter().map(|s| s.e2e_ms).collect::<Vec<_>>());
                    let own = median(&real.iter().map(|s| s.processing_ms).collect::<Vec<_>>());
                    let overhead = median(
                        &real
                            .iter()
                            .map(|s| s.e2e_ms - s.processing_ms)
                            .collect::<Vec<_>>(),
                    );
                    let base_ms = median(&base);
                    self.report.figures.push(Figure::ratio(
                        &id,
                        format!("{title} (plugin {own:.2} ms, host overhead {overhead:.2} ms)"),
                        "ms",
                        e2e,
                        (base_ms, "axum, same body"),
                        target,
                        json!({
                            "bytes": data.len(),
                            "body_bytes": req_len(encoding, arg, data),
                            "requests": n,
                            "e2e_ms": real.iter().map(|s| s.e2e_ms).collect::<Vec<_>>(),
                            "processing_ms": real.iter().map(|s| s.processing_ms).collect::<Vec<_>>(),
                            "baseline_ms": base,
                            "median_overhead_ms": overhead,
                            "median_processing_ms": own,
                        }),
                    ));
                }
            }
        }
        self.report.check(
            "frames: every request answered 200 with ok: true",
            failures.is_empty() && requests > 0,
            if failures.is_empty() {
                format!("{requests} requests")
            } else {
                failures.join("; ")
            },
        );
        Ok(())
    }
}

fn req_len(encoding: Encoding, arg: &str, data: &[u8]) -> usize {
    match encoding {
        Encoding::Octet => data.len(),
        _ => encoding.body(arg, data).len(),
    }
}

/// One request to the baseline, timed (ms); an answer other than 200 is
/// a failure.
async fn send_timed(
    baseline: &mut Client,
    req: &Req,
    failures: &mut Vec<String>,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let (status, _body) = baseline.send(req).await?;
    let base_ms = ms(started.elapsed());
    if status != 200 {
        failures.push(format!("baseline answered {status}"));
    }
    Ok(base_ms)
}

/// `n` requests to the server and `n` of the same body to the baseline,
/// interleaved (each first in turn), after two unmeasured ones each, each on its keep-alive
/// connection. Failures (an answer other than 200 and `ok`, or a result
/// `len` other than `expect_len`) are collected (and not timed).
async fn measure(
    setup: &FramesSetup,
    req: &Req,
    n: usize,
    expect_len: Option<usize>,
    failures: &mut Vec<String>,
) -> anyhow::Result<(Vec<Sample>, Vec<f64>)> {
    let mut server = Client::connect(setup.server.addr()).await?;
    let mut baseline = Client::connect(setup.baseline.addr()).await?;
    let mut real = Vec::with_capacity(n);
    let mut base = Vec::with_capacity(n);
    for i in 0..n + 2 {
        // Each goes first in turn: the second of a pair finds the client's
        // caches warm from the first.
        let mut base_ms = None;
        if i % 2 == 0 {
            base_ms = Some(send_timed(&mut baseline, req, failures).await?);
        }
        let started = Instant::now();
        let (status, body2) = server.send(req).await?;
        let e2e_ms = ms(started.elapsed());
        let base_ms = match base_ms {
            Some(ms) => ms,
            None => send_timed(&mut baseline, req, failures).await?,
        };
        let answer: Value = serde_json::from_slice(&body2).unwrap_or(Value::Null);
        let wrong_len = expect_len.is_some_and(|len| answer["result"]["len"] != len);
        if status != 200 || answer["ok"] != true || wrong_len {
            if failures.len() < 5 {
                failures.push(format!(
                    "{} answered {status}: {}",
                    req.path(),
                    String::from_utf8_lossy(&body2[..body2.len().min(300)])
                ));
            }
            continue;
        }
        if i >= 2 {
            real.push(Sample {
                e2e_ms,
                processing_ms: answer["processing_time_ms"].as_f64().unwrap_or(f64::NAN),
            });
            base.push(base_ms);
        }
    }
    Ok((real, base))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtimes_name_their_plugin_and_only_no_ops_have_targets() {
        let ids: Vec<&str> = Runtime::ALL.iter().map(|r| r.id()).collect();
        assert_eq!(
            ids,
            ["inproc", "isolated", "python", "pythonview", "imagestats"]
        );
        assert_eq!(Runtime::Python.target().0, "frames-py");
        assert_eq!(Runtime::PythonView.target().1, "noop_frame_view");
        assert_eq!(Runtime::PythonView.octet_target(), None);
        assert_eq!(Runtime::ImageStats.target().2, "image_base64");
        assert_eq!(Runtime::InProcess.octet_target(), Some(1.5));
        assert_eq!(Runtime::ImageStats.octet_target(), None);
        assert_eq!(req_len(Encoding::Octet, "frame", &[1, 2, 3]), 3);
        assert!(req_len(Encoding::Json, "frame", &[1, 2, 3]) > 3);
    }
}
