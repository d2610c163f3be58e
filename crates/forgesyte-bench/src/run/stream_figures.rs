//! The stream figures: ~300 KB 1080p-like JPEG frames over the WebSocket
//! stream route (policy `block`, so nothing drops) to the no-op tool in
//! process, isolated and in Python (frames per second), and to
//! `image-stats`, against the frame rate its own time per frame allows.
//! On a server without the route (404 before the upgrade) every stream
//! figure is "not measured", never a failure.

use axum::body::Bytes;
use serde_json::{Value, json};

use super::Bench;
use super::frames::{FramesSetup, Runtime};
use crate::payload;
use crate::report::{Figure, Target, median};
use crate::stream::{self, NotAvailable, StreamRun};

/// Frames waiting in the server per stream (policy `block`).
const QUEUE: usize = 8;

/// Unmeasured frames sent first on each stream's own connection.
const WARMUP_FRAMES: usize = 10;

impl Bench<'_> {
    /// Every stream figure (see the module documentation).
    pub(super) fn streams(&mut self, setup: &FramesSetup) -> anyhow::Result<()> {
        let (width, height) = self.plan.stream_frame;
        // About 300 KB at 1080p, scaled down with the frame in smoke mode.
        let about = (300 << 10) * (width as usize * height as usize) / (1920 * 1080);
        let frame = Bytes::from(payload::jpeg_frame(width, height, about, 7)?);
        self.progress(&format!(
            "stream: {width}x{height} JPEG frames of {} bytes, {} per no-op stream, {} to image-stats",
            frame.len(),
            self.plan.stream_frames,
            self.plan.stream_image_frames
        ));
        let mut problems = Vec::new();
        let mut measured = 0;
        for runtime in Runtime::ALL {
            let id = format!("stream_{}", runtime.id());
            let title = format!(
                "stream of {} KB {width}x{height} JPEG frames → {}",
                frame.len() >> 10,
                runtime.title().replace(" (PNG)", "")
            );
            let target = match runtime {
                Runtime::InProcess => Target::AtLeast(1000.0),
                Runtime::Isolated => Target::AtLeast(500.0),
                Runtime::Python | Runtime::PythonView => Target::Report,
                Runtime::ImageStats => Target::RatioAtLeast(0.8),
            };
            let not_measured = |why: String| {
                Figure::not_measured(
                    &id,
                    title.clone(),
                    "frames/s",
                    None,
                    target,
                    why,
                    Value::Null,
                )
            };
            // Each runtime asks the route itself: a refusal (422, 503) can
            // be one plugin's, not the route's.
            if let Some(why) = setup.missing(runtime).map(str::to_owned) {
                self.report.figures.push(not_measured(why));
                continue;
            }
            let frames = if runtime == Runtime::ImageStats {
                self.plan.stream_image_frames
            } else {
                self.plan.stream_frames
            };
            let (plugin, tool, _) = runtime.target();
            let path =
                format!("/v1/plugins/{plugin}/tools/{tool}/stream?policy=block&queue={QUEUE}");
            let addr = setup.server.addr();
            let run = self.runtime.block_on(async {
                match stream::run(addr, &path, None, frame.clone(), WARMUP_FRAMES).await? {
                    Ok(_) => stream::run(addr, &path, None, frame.clone(), frames).await,
                    Err(not) => Ok(Err(not)),
                }
            });
            let run: StreamRun = match run {
                Ok(Ok(run)) => run,
                Ok(Err(NotAvailable(why))) => {
                    let why = format!("not available: {why}");
                    self.report.figures.push(not_measured(why));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("{id}: {e:#}"));
                    self.report
                        .figures
                        .push(not_measured(format!("the stream failed: {e:#}")));
                    continue;
                }
            };
            measured += 1;
            if run.ok != frames || run.dropped != 0 || !run.in_order {
                problems.push(format!(
                    "{id}: {} of {frames} answered ok, {} dropped, in order: {}; {:?}",
                    run.ok, run.dropped, run.in_order, run.errors
                ));
            }
            let own_ms = median(&run.processing_ms);
            let raw = json!({ "frame_bytes": frame.len(), "queue": QUEUE, "run": run, "median_processing_ms": own_ms });
            let figure = if runtime == Runtime::ImageStats {
                Figure::ratio(
                    &id,
                    format!("{title} ({own_ms:.2} ms per frame)"),
                    "frames/s",
                    run.frames_per_second,
                    (1000.0 / own_ms, "its own time per frame"),
                    target,
                    raw,
                )
            } else {
                Figure::absolute(&id, title, "frames/s", run.frames_per_second, target, raw)
            };
            self.report.figures.push(figure);
        }
        if measured > 0 || !problems.is_empty() {
            self.report.check(
                "stream: every frame answered ok, in order, none dropped",
                problems.is_empty(),
                if problems.is_empty() {
                    format!("{measured} streams")
                } else {
                    problems.join("; ")
                },
            );
        }
        Ok(())
    }
}
