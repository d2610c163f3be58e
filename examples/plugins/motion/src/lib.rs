//! `motion`: a ForgeSyte example plugin that detects motion between two
//! frames.
//!
//! Tool `detect` takes two base64 PNG or JPEG frames of the same size,
//! `{"frame_a_base64": "...", "frame_b_base64": "...", "threshold": 25,
//! "min_changed_fraction": 0.01}` (the last two optional), compares their
//! luminance pixel by pixel, and returns the fraction of pixels whose
//! luminance changed by more than `threshold`, the bounding box of those
//! pixels, and `motion: true` when the fraction reaches
//! `min_changed_fraction`. Tool `ping` answers `{"pong": true}`.
//!
//! The defaults of `threshold` and `min_changed_fraction` come from the
//! manifest's `"config"` object when present; a bad value there fails the
//! construction (the host then reports `InitError: …`).
//!
//! Built with `forgesyte-plugin-sdk`; this crate knows nothing of the host.

use base64::Engine as _;
use forgesyte_plugin_sdk::{BoxError, Plugin, PluginConfig, ToolError, ToolSpec};
use image::{DynamicImage, GrayImage};
use serde::Deserialize;
use serde_json::{Value, json};

/// Default per-pixel luminance change (0–255) that counts as changed.
pub const DEFAULT_THRESHOLD: u8 = 25;
/// Default fraction of changed pixels that counts as motion.
pub const DEFAULT_MIN_CHANGED_FRACTION: f64 = 0.01;

/// The plugin, holding its defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct Motion {
    defaults: Settings,
}

/// Detection settings; any of them may be given per call.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default = "default_threshold")]
    threshold: u8,
    #[serde(default = "default_min_changed_fraction")]
    min_changed_fraction: f64,
}

fn default_threshold() -> u8 {
    DEFAULT_THRESHOLD
}

fn default_min_changed_fraction() -> f64 {
    DEFAULT_MIN_CHANGED_FRACTION
}

impl Settings {
    fn validate(self) -> Result<Self, String> {
        if (0.0..=1.0).contains(&self.min_changed_fraction) {
            Ok(self)
        } else {
            Err(format!(
                "min_changed_fraction must be between 0 and 1, got {}",
                self.min_changed_fraction
            ))
        }
    }
}

impl Plugin for Motion {
    fn new(config: PluginConfig) -> Result<Self, BoxError> {
        let defaults = match config.manifest.get("config") {
            None | Some(Value::Null) => Settings {
                threshold: DEFAULT_THRESHOLD,
                min_changed_fraction: DEFAULT_MIN_CHANGED_FRACTION,
            },
            Some(raw) => serde_json::from_value::<Settings>(raw.clone())
                .map_err(|e| format!("invalid manifest config: {e}"))?
                .validate()
                .map_err(|e| format!("invalid manifest config: {e}"))?,
        };
        Ok(Motion { defaults })
    }

    fn tools(&self) -> Vec<ToolSpec> {
        let frame = json!({"type": "string", "contentEncoding": "base64"});
        vec![
            ToolSpec::new("detect")
                .title("Motion detection")
                .description(
                    "Compares two frames of the same size and reports the fraction of \
                     changed pixels, their bounding box and whether that is motion",
                )
                .inputs(json!({
                    "type": "object",
                    "properties": {
                        "frame_a_base64": frame,
                        "frame_b_base64": frame,
                        "threshold": {"type": "integer", "minimum": 0, "maximum": 255,
                                      "default": self.defaults.threshold},
                        "min_changed_fraction": {"type": "number", "minimum": 0, "maximum": 1,
                                                 "default": self.defaults.min_changed_fraction},
                    },
                    "required": ["frame_a_base64", "frame_b_base64"],
                }))
                .outputs(json!({
                    "type": "object",
                    "properties": {
                        "motion": {"type": "boolean"},
                        "changed_fraction": {"type": "number"},
                        "changed_pixels": {"type": "integer"},
                        "total_pixels": {"type": "integer"},
                        "bbox": {"type": ["object", "null"], "properties": {
                            "x": {"type": "integer"}, "y": {"type": "integer"},
                            "width": {"type": "integer"}, "height": {"type": "integer"}}},
                        "threshold": {"type": "integer"},
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                    },
                })),
            ToolSpec::new("ping")
                .title("Ping")
                .description("Does nothing; answers {\"pong\": true}")
                .outputs(json!({"type": "object", "properties": {"pong": {"type": "boolean"}}})),
        ]
    }

    fn run(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
        match tool {
            "detect" => self.detect(args),
            "ping" => Ok(json!({ "pong": true })),
            other => Err(ToolError::new("UnknownTool", format!("no tool '{other}'"))),
        }
    }
}

forgesyte_plugin_sdk::export_plugin!(Motion);

#[derive(Deserialize)]
struct DetectArgs {
    frame_a_base64: String,
    frame_b_base64: String,
    threshold: Option<u8>,
    min_changed_fraction: Option<f64>,
}

impl Motion {
    fn detect(&self, args: Value) -> Result<Value, ToolError> {
        let args: DetectArgs = forgesyte_plugin_sdk::parse_args(args)?;
        let settings = Settings {
            threshold: args.threshold.unwrap_or(self.defaults.threshold),
            min_changed_fraction: args
                .min_changed_fraction
                .unwrap_or(self.defaults.min_changed_fraction),
        }
        .validate()
        .map_err(ToolError::invalid_input)?;
        let a = decode_image(&args.frame_a_base64, "frame_a_base64")?.to_luma8();
        let b = decode_image(&args.frame_b_base64, "frame_b_base64")?.to_luma8();
        if a.dimensions() != b.dimensions() {
            return Err(ToolError::invalid_input(format!(
                "frames differ in size: {}x{} and {}x{}",
                a.width(),
                a.height(),
                b.width(),
                b.height()
            )));
        }
        Ok(compare(&a, &b, settings))
    }
}

/// Decodes base64 (optional `data:` URL prefix) and then a PNG or JPEG.
fn decode_image(encoded: &str, field: &str) -> Result<DynamicImage, ToolError> {
    let encoded = encoded.trim();
    let encoded = match encoded.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => encoded,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| ToolError::invalid_input(format!("{field} is not base64: {e}")))?;
    // A few hundred bytes can declare 20,000 × 20,000 pixels: refused
    // from the header, before the pixels are decoded.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| {
            ToolError::invalid_input(format!("{field} is not a PNG or JPEG image: {e}"))
        })?;
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => ToolError::invalid_input(format!(
            "{field} is larger than this plugin decodes (at most {MAX_SIDE} pixels a side and \
             {} MiB of pixels): {e}",
            MAX_DECODED_BYTES >> 20
        )),
        e => ToolError::invalid_input(format!("{field} is not a PNG or JPEG image: {e}")),
    })
}

/// The most a decoded frame may take (its pixels, as the decoder holds them).
const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;
/// The widest and tallest frame decoded.
const MAX_SIDE: u32 = 16_384;

/// The `detect` result for two frames of the same size.
fn compare(a: &GrayImage, b: &GrayImage, settings: Settings) -> Value {
    let mut changed = 0u64;
    // (min x, min y, max x, max y) of the changed pixels.
    let mut bounds: Option<(u32, u32, u32, u32)> = None;
    for (x, y, pa) in a.enumerate_pixels() {
        let pb = b.get_pixel(x, y);
        if pa.0[0].abs_diff(pb.0[0]) > settings.threshold {
            changed += 1;
            bounds = Some(match bounds {
                None => (x, y, x, y),
                Some((x0, y0, x1, y1)) => (x0.min(x), y0.min(y), x1.max(x), y1.max(y)),
            });
        }
    }
    let total = u64::from(a.width()) * u64::from(a.height());
    let fraction = if total == 0 {
        0.0
    } else {
        changed as f64 / total as f64
    };
    let bbox = bounds.map(
        |(x0, y0, x1, y1)| json!({"x": x0, "y": y0, "width": x1 - x0 + 1, "height": y1 - y0 + 1}),
    );
    json!({
        "motion": changed > 0 && fraction >= settings.min_changed_fraction,
        "changed_fraction": fraction,
        "changed_pixels": changed,
        "total_pixels": total,
        "threshold": settings.threshold,
        "width": a.width(),
        "height": a.height(),
        "bbox": bbox,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma};
    use std::io::Cursor;

    fn png(img: GrayImage) -> String {
        let mut bytes = Vec::new();
        DynamicImage::ImageLuma8(img)
            .write_to(&mut Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn plugin(manifest: Value) -> Result<Motion, BoxError> {
        Motion::new(PluginConfig::new("/plugins/motion").with_manifest(manifest))
    }

    fn detect(args: Value) -> Result<Value, ToolError> {
        plugin(Value::Null).unwrap().run("detect", args)
    }

    /// A 10x10 black frame, with the given pixels white.
    fn frame(white: &[(u32, u32)]) -> String {
        let mut img = GrayImage::from_pixel(10, 10, Luma([0]));
        for &(x, y) in white {
            img.put_pixel(x, y, Luma([255]));
        }
        png(img)
    }

    #[test]
    fn finds_the_changed_region() {
        let out = detect(json!({
            "frame_a_base64": frame(&[]),
            "frame_b_base64": frame(&[(2, 3), (5, 7), (4, 4)]),
        }))
        .unwrap();
        assert_eq!(out["motion"], true);
        assert_eq!(out["changed_pixels"], 3);
        assert_eq!(out["total_pixels"], 100);
        assert_eq!(out["changed_fraction"], 0.03);
        assert_eq!(
            out["bbox"],
            json!({"x": 2, "y": 3, "width": 4, "height": 5})
        );
    }

    #[test]
    fn identical_frames_and_small_changes_are_not_motion() {
        let still = frame(&[(1, 1)]);
        let out = detect(json!({"frame_a_base64": still, "frame_b_base64": still})).unwrap();
        assert_eq!(out["motion"], false);
        assert_eq!(out["changed_pixels"], 0);
        assert_eq!(out["bbox"], Value::Null);

        // One pixel of 100 changed, but 5% is asked for.
        let out = detect(json!({
            "frame_a_base64": frame(&[]),
            "frame_b_base64": frame(&[(9, 9)]),
            "min_changed_fraction": 0.05,
        }))
        .unwrap();
        assert_eq!(
            (out["motion"].as_bool(), out["changed_pixels"].as_u64()),
            (Some(false), Some(1))
        );

        // A change below the threshold does not count.
        let dim = png(GrayImage::from_pixel(10, 10, Luma([20])));
        let out = detect(json!({"frame_a_base64": frame(&[]), "frame_b_base64": dim})).unwrap();
        assert_eq!(out["changed_pixels"], 0);
    }

    #[test]
    fn defaults_come_from_the_manifest() {
        let strict = plugin(json!({"config": {"threshold": 10}})).unwrap();
        let dim = png(GrayImage::from_pixel(10, 10, Luma([20])));
        let out = strict
            .run(
                "detect",
                json!({"frame_a_base64": frame(&[]), "frame_b_base64": dim}),
            )
            .unwrap();
        assert_eq!(
            (out["changed_pixels"].as_u64(), out["threshold"].as_u64()),
            (Some(100), Some(10))
        );

        for bad in [
            json!({"config": {"threshold": 300}}),
            json!({"config": {"min_changed_fraction": 2.0}}),
            json!({"config": {"treshold": 3}}),
        ] {
            let err = plugin(bad.clone()).unwrap_err().to_string();
            assert!(err.starts_with("invalid manifest config"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_input_is_invalid_input() {
        let a = frame(&[]);
        let small = png(GrayImage::from_pixel(4, 4, Luma([0])));
        for args in [
            json!({"frame_a_base64": a}),
            json!({"frame_a_base64": a, "frame_b_base64": "***"}),
            json!({"frame_a_base64": a, "frame_b_base64": "aGVsbG8="}),
            json!({"frame_a_base64": a, "frame_b_base64": small}),
            json!({"frame_a_base64": a, "frame_b_base64": a, "threshold": -1}),
            json!({"frame_a_base64": a, "frame_b_base64": a, "min_changed_fraction": 1.5}),
        ] {
            let err = detect(args.clone()).unwrap_err();
            assert_eq!(err.error_type, "InvalidInput", "{args}: {err}");
        }
        let err = detect(json!({"frame_a_base64": a, "frame_b_base64": small})).unwrap_err();
        assert_eq!(err.message, "frames differ in size: 10x10 and 4x4");
        // The argument that does not fit is named.
        let err = detect(json!({"frame_a_base64": a, "frame_b_base64": a, "threshold": 300}))
            .unwrap_err();
        assert_eq!(
            err.message,
            "threshold: invalid value: integer `300`, expected u8"
        );
    }

    #[test]
    fn ping_pongs() {
        let plugin = plugin(Value::Null).unwrap();
        assert!(plugin.tools().iter().any(|t| t.id == "ping"));
        assert_eq!(
            plugin.run("ping", json!({})).unwrap(),
            json!({"pong": true})
        );
    }
}
