//! `image-stats`: a ForgeSyte example plugin that describes an image.
//!
//! Tool `analyze` takes `{"image_base64": "<PNG or JPEG, base64>"}` (a
//! `data:image/...;base64,` prefix is accepted) and returns its size, colour
//! type, mean brightness (0–255) and a 16-bin luminance histogram. The
//! argument is declared binary (`contentEncoding: base64`), so a host of
//! ABI 3 hands the image as a byte slice (sent as base64 in JSON, as a
//! multipart part or as an `application/octet-stream` body, decoded once by
//! the host): the plugin reads it in place ([`Plugin::call`]). Tool
//! `ping` does nothing and answers `{"pong": true}`: it measures the host's
//! own overhead.
//!
//! Built with `forgesyte-plugin-sdk`; this crate knows nothing of the host.
//! Bad input (not base64, not an image) is a [`ToolError`] of type
//! `InvalidInput`, never a panic.

use base64::Engine as _;
use forgesyte_plugin_sdk::{BoxError, Call, Output, Plugin, PluginConfig, ToolError, ToolSpec};
use image::DynamicImage;
use serde::Deserialize;
use serde_json::{Value, json};

/// Number of bins of the luminance histogram.
pub const HISTOGRAM_BINS: usize = 16;

/// The plugin. Stateless: every call stands alone.
#[derive(Debug, Default)]
pub struct ImageStats;

impl Plugin for ImageStats {
    fn new(_config: PluginConfig) -> Result<Self, BoxError> {
        Ok(ImageStats)
    }

    fn tools(&self) -> Vec<ToolSpec> {
        vec![
            ToolSpec::new("analyze")
                .title("Image statistics")
                .description(
                    "Width, height, colour type, mean brightness (0-255, Rec. 709 luma as the \
                     image crate computes it, an integer per pixel) and a 16-bin luminance \
                     histogram of a base64 PNG or JPEG image of at most 16384 pixels a side and \
                     64 MiB of pixels",
                )
                .inputs(json!({
                    "type": "object",
                    "properties": {"image_base64": {"type": "string", "contentEncoding": "base64"}},
                    "required": ["image_base64"],
                }))
                .outputs(json!({
                    "type": "object",
                    "properties": {
                        "width": {"type": "integer"},
                        "height": {"type": "integer"},
                        "color_type": {"type": "string"},
                        "channels": {"type": "integer"},
                        "mean_brightness": {"type": "number"},
                        "histogram": {"type": "array", "items": {"type": "integer"},
                                      "minItems": HISTOGRAM_BINS, "maxItems": HISTOGRAM_BINS},
                    },
                })),
            ToolSpec::new("ping")
                .title("Ping")
                .description("Does nothing; answers {\"pong\": true}")
                .outputs(json!({"type": "object", "properties": {"pong": {"type": "boolean"}}})),
        ]
    }

    /// `analyze` reads the image in place when the host passes it as bytes
    /// (ABI 3); every other call goes through [`Plugin::run`].
    fn call(&self, call: Call<'_>) -> Result<Output, ToolError> {
        match (call.tool(), call.binary("image_base64")) {
            ("analyze", Some(bytes)) => Ok(Output::json(analyze(&load_image(bytes)?))),
            (tool, _) => self.run(tool, call.into_json_args()?).map(Output::json),
        }
    }

    fn run(&self, tool: &str, args: Value) -> Result<Value, ToolError> {
        match tool {
            "analyze" => {
                let args: AnalyzeArgs = forgesyte_plugin_sdk::parse_args(args)?;
                Ok(analyze(&decode_image(&args.image_base64)?))
            }
            "ping" => Ok(json!({ "pong": true })),
            other => Err(ToolError::new("UnknownTool", format!("no tool '{other}'"))),
        }
    }
}

forgesyte_plugin_sdk::export_plugin!(ImageStats);

#[derive(Deserialize)]
struct AnalyzeArgs {
    image_base64: String,
}

/// Decodes base64 (standard alphabet, optional `data:` URL prefix) and then
/// a PNG or JPEG image.
pub fn decode_image(encoded: &str) -> Result<DynamicImage, ToolError> {
    let encoded = encoded.trim();
    let encoded = match encoded.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => encoded,
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|e| ToolError::invalid_input(format!("image_base64 is not base64: {e}")))?;
    load_image(&bytes)
}

/// The most a decoded image may take (its pixels, as the decoder holds
/// them): a few hundred bytes of PNG or JPEG can declare 20,000 × 20,000
/// pixels, and this plugin runs inside the server by default.
pub const MAX_DECODED_BYTES: u64 = 64 * 1024 * 1024;
/// The widest and tallest image decoded.
pub const MAX_SIDE: u32 = 16_384;

/// Decodes a PNG or JPEG image from its bytes (no copy of them), within
/// [`MAX_DECODED_BYTES`] and [`MAX_SIDE`]: a larger one is refused from its
/// header, before its pixels are decoded.
pub fn load_image(bytes: &[u8]) -> Result<DynamicImage, ToolError> {
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_DECODED_BYTES);
    limits.max_image_width = Some(MAX_SIDE);
    limits.max_image_height = Some(MAX_SIDE);
    let mut reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ToolError::invalid_input(format!("not a PNG or JPEG image: {e}")))?;
    reader.limits(limits);
    reader.decode().map_err(|e| match e {
        image::ImageError::Limits(e) => ToolError::invalid_input(format!(
            "the image is larger than this plugin decodes (at most {MAX_SIDE} pixels a side \
             and {} MiB of pixels): {e}",
            MAX_DECODED_BYTES >> 20
        )),
        e => ToolError::invalid_input(format!("not a PNG or JPEG image: {e}")),
    })
}

/// The statistics `analyze` returns.
pub fn analyze(img: &DynamicImage) -> Value {
    let luma = img.to_luma8();
    let mut histogram = [0u64; HISTOGRAM_BINS];
    let mut sum = 0u64;
    for pixel in luma.pixels() {
        let value = pixel.0[0];
        sum += u64::from(value);
        histogram[usize::from(value) * HISTOGRAM_BINS / 256] += 1;
    }
    let pixels = u64::from(luma.width()) * u64::from(luma.height());
    let mean = if pixels == 0 {
        0.0
    } else {
        sum as f64 / pixels as f64
    };
    json!({
        "width": img.width(),
        "height": img.height(),
        "color_type": format!("{:?}", img.color()),
        "channels": img.color().channel_count(),
        "mean_brightness": mean,
        "histogram": histogram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageFormat, Luma, Rgb, RgbImage};
    use std::io::Cursor;

    fn encode(img: DynamicImage, format: ImageFormat) -> String {
        let mut bytes = Vec::new();
        img.write_to(&mut Cursor::new(&mut bytes), format).unwrap();
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn run(tool: &str, args: Value) -> Result<Value, ToolError> {
        let plugin = ImageStats::new(PluginConfig::new("/plugins/image-stats")).unwrap();
        let ids: Vec<String> = plugin.tools().into_iter().map(|t| t.id).collect();
        assert!(ids.iter().any(|id| id == tool), "{tool} not in {ids:?}");
        plugin.run(tool, args)
    }

    /// An image wider than the plugin decodes is refused from its header,
    /// an input error (a few hundred bytes can declare 20,000 × 20,000).
    #[test]
    fn a_huge_image_is_refused_before_its_pixels_are_decoded() {
        let img = image::GrayImage::new(MAX_SIDE + 1, 1);
        let b64 = encode(DynamicImage::ImageLuma8(img), ImageFormat::Png);
        let err = run("analyze", json!({ "image_base64": b64 })).unwrap_err();
        assert!(
            err.to_string().contains("larger than this plugin decodes"),
            "{err}"
        );
    }

    #[test]
    fn analyzes_a_png() {
        // Left half black, right half white: mean 127.5, two full bins.
        let img = RgbImage::from_fn(4, 2, |x, _| {
            if x < 2 {
                Rgb([0, 0, 0])
            } else {
                Rgb([255, 255, 255])
            }
        });
        let b64 = encode(DynamicImage::ImageRgb8(img), ImageFormat::Png);
        let out = run("analyze", json!({ "image_base64": b64 })).unwrap();
        assert_eq!(out["width"], 4);
        assert_eq!(out["height"], 2);
        assert_eq!(out["color_type"], "Rgb8");
        assert_eq!(out["channels"], 3);
        assert_eq!(out["mean_brightness"], 127.5);
        let mut expected = [0u64; HISTOGRAM_BINS];
        expected[0] = 4;
        expected[15] = 4;
        assert_eq!(out["histogram"], json!(expected));
    }

    #[test]
    fn analyzes_a_jpeg_with_a_data_url_prefix() {
        let img = image::GrayImage::from_pixel(16, 8, Luma([200]));
        let b64 = encode(DynamicImage::ImageLuma8(img), ImageFormat::Jpeg);
        let out = run(
            "analyze",
            json!({ "image_base64": format!("data:image/jpeg;base64,{b64}") }),
        )
        .unwrap();
        assert_eq!(
            (out["width"].as_u64(), out["height"].as_u64()),
            (Some(16), Some(8))
        );
        let mean = out["mean_brightness"].as_f64().unwrap();
        assert!((mean - 200.0).abs() < 3.0, "lossy, but close: {mean}");
        let total: u64 = out["histogram"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_u64().unwrap())
            .sum();
        assert_eq!(total, 16 * 8);
    }

    #[test]
    fn bad_input_is_invalid_input_not_a_panic() {
        for args in [
            json!({}),
            json!({ "image_base64": 7 }),
            json!({ "image_base64": "%%% not base64 %%%" }),
            json!({ "image_base64": base64::engine::general_purpose::STANDARD.encode(b"hello") }),
            json!({ "image_base64": "" }),
        ] {
            let err = run("analyze", args.clone()).unwrap_err();
            assert_eq!(err.error_type, "InvalidInput", "{args}: {err}");
        }
        let err = run("analyze", json!({ "image_base64": "aGVsbG8=" })).unwrap_err();
        assert!(err.message.contains("not a PNG or JPEG"), "{err}");
    }

    #[test]
    fn analyzes_an_image_passed_as_bytes() {
        let img = image::GrayImage::from_pixel(3, 5, Luma([10]));
        let mut png = Vec::new();
        DynamicImage::ImageLuma8(img)
            .write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let plugin = ImageStats::new(PluginConfig::new("/plugins/image-stats")).unwrap();
        let call =
            Call::new("analyze", json!({"image_base64": null})).with_binary("/image_base64", &png);
        let out = plugin.call(call).unwrap();
        assert!(out.binary.is_empty());
        assert_eq!(
            (out.json["width"].as_u64(), out.json["height"].as_u64()),
            (Some(3), Some(5))
        );
        assert_eq!(out.json["mean_brightness"], 10.0);
        let bad = Call::new("analyze", json!({})).with_binary("/image_base64", b"nope");
        assert_eq!(plugin.call(bad).unwrap_err().error_type, "InvalidInput");
        // Without bytes (a JSON-only host), the base64 string as before.
        let b64 = base64::engine::general_purpose::STANDARD.encode(&png);
        let out = plugin
            .call(Call::new("analyze", json!({"image_base64": b64})))
            .unwrap();
        assert_eq!(out.json["width"], 3);
    }

    #[test]
    fn ping_pongs() {
        assert_eq!(run("ping", json!({})).unwrap(), json!({ "pong": true }));
    }
}
