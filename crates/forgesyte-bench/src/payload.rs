//! The bytes the frames and stream figures send: opaque payloads, real PNG
//! and JPEG images made here (with the `image` crate, already the example
//! plugin's decoder), and the three request encodings of a binary argument
//! (JSON base64, `multipart/form-data`, `application/octet-stream`).
//!
//! It knows nothing of servers or of how the bytes are timed.

use std::io::Cursor;

use anyhow::Context;
use axum::body::Bytes;
use base64::Engine as _;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

/// The boundary of the multipart bodies: long and fixed, so a body is the
/// same in every run; random payload bytes contain it with probability
/// about 2⁻²⁵⁶ per position.
pub(crate) const BOUNDARY: &str = "forgesyte-bench-4f1c9e2b7a6d53e8c0b1a9f7d6e5c4b3";

/// How a binary argument travels in a run request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Encoding {
    /// `{"args": {NAME: "<base64>"}}`.
    Json,
    /// One file part named NAME.
    Multipart,
    /// The raw bytes (the tool's one binary argument).
    Octet,
}

impl Encoding {
    pub(crate) const ALL: [Encoding; 3] = [Encoding::Json, Encoding::Multipart, Encoding::Octet];

    /// Short name, used in figure ids.
    pub(crate) fn id(self) -> &'static str {
        match self {
            Encoding::Json => "json",
            Encoding::Multipart => "multipart",
            Encoding::Octet => "octet",
        }
    }

    /// For people.
    pub(crate) fn title(self) -> &'static str {
        match self {
            Encoding::Json => "JSON base64",
            Encoding::Multipart => "multipart",
            Encoding::Octet => "octet-stream",
        }
    }

    /// The request's `Content-Type`.
    pub(crate) fn content_type(self) -> String {
        match self {
            Encoding::Json => "application/json".into(),
            Encoding::Multipart => format!("multipart/form-data; boundary={BOUNDARY}"),
            Encoding::Octet => "application/octet-stream".into(),
        }
    }

    /// The body carrying `data` as the binary argument `name`.
    pub(crate) fn body(self, name: &str, data: &[u8]) -> Bytes {
        match self {
            Encoding::Json => {
                let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                let mut body = Vec::with_capacity(b64.len() + name.len() + 20);
                body.extend_from_slice(b"{\"args\":{\"");
                body.extend_from_slice(name.as_bytes());
                body.extend_from_slice(b"\":\"");
                body.extend_from_slice(b64.as_bytes());
                body.extend_from_slice(b"\"}}");
                Bytes::from(body)
            }
            Encoding::Multipart => {
                let head = format!(
                    "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; \
                     filename=\"{name}.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                );
                let tail = format!("\r\n--{BOUNDARY}--\r\n");
                let mut body = Vec::with_capacity(head.len() + data.len() + tail.len());
                body.extend_from_slice(head.as_bytes());
                body.extend_from_slice(data);
                body.extend_from_slice(tail.as_bytes());
                Bytes::from(body)
            }
            Encoding::Octet => Bytes::copy_from_slice(data),
        }
    }
}

/// `len` opaque bytes (xorshift64*, seeded: the same bytes every run).
pub(crate) fn opaque(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A real PNG of about `len` bytes: an RGB image of noise (which PNG cannot
/// compress), sized so that its pixels are `len` bytes, stored with the
/// fastest compression.
pub(crate) fn png_of_about(len: usize) -> anyhow::Result<Vec<u8>> {
    let pixels = (len / 3).max(1);
    let width = ((pixels as f64 * 4.0 / 3.0).sqrt() as u32).max(1);
    let height = (u32::try_from(pixels).unwrap_or(u32::MAX) / width).max(1);
    let rgb = opaque(width as usize * height as usize * 3, u64::from(width));
    let mut out = Vec::with_capacity(len + 1024);
    PngEncoder::new_with_quality(&mut out, CompressionType::Fast, FilterType::NoFilter)
        .write_image(&rgb, width, height, ExtendedColorType::Rgb8)
        .context("encoding the PNG")?;
    Ok(out)
}

/// A camera-like JPEG frame: smooth gradients with grain, `width` ×
/// `height`, at the highest quality (90, 80, ... 30) whose file is at most
/// `about` bytes (the lowest tried when none is). 1920 × 1080 near 300 KB
/// is the 1080p frame.
pub(crate) fn jpeg_frame(
    width: u32,
    height: u32,
    about: usize,
    seed: u64,
) -> anyhow::Result<Vec<u8>> {
    let grain = opaque(width as usize * height as usize, seed);
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        for x in 0..width {
            let g = i32::from(grain[(y * width + x) as usize] % 16) - 8;
            let fx = (x * 255 / width.max(1)) as i32;
            let fy = (y * 255 / height.max(1)) as i32;
            let wave = (((x / 7 + y / 5) % 64) as i32) - 32;
            for v in [fx + g, fy + wave + g, (fx + fy) / 2 - wave + g] {
                rgb.push(v.clamp(0, 255) as u8);
            }
        }
    }
    let mut best = Vec::new();
    for quality in [90, 80, 70, 60, 50, 40, 30] {
        let mut out = Cursor::new(Vec::new());
        JpegEncoder::new_with_quality(&mut out, quality)
            .write_image(&rgb, width, height, ExtendedColorType::Rgb8)
            .context("encoding the JPEG")?;
        best = out.into_inner();
        if best.len() <= about {
            break;
        }
    }
    Ok(best)
}

/// `n` bytes, for people (`64 KB`, `1 MB`, `8 MB`).
pub(crate) fn size_title(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{} MB", n >> 20)
    } else {
        format!("{} KB", n >> 10)
    }
}

/// `n` bytes, for figure ids (`64k`, `1m`, `8m`).
pub(crate) fn size_id(n: usize) -> String {
    if n >= 1 << 20 {
        format!("{}m", n >> 20)
    } else {
        format!("{}k", n >> 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opaque_bytes_are_reproducible_and_sized() {
        assert_eq!(opaque(0, 1), Vec::<u8>::new());
        assert_eq!(opaque(13, 7).len(), 13);
        assert_eq!(opaque(100, 7), opaque(100, 7));
        assert_ne!(opaque(100, 7), opaque(100, 8));
    }

    #[test]
    fn bodies_carry_the_bytes() {
        let data = opaque(1000, 3);
        let json: serde_json::Value =
            serde_json::from_slice(&Encoding::Json.body("frame", &data)).unwrap();
        let b64 = json["args"]["frame"].as_str().unwrap();
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
            data
        );
        assert_eq!(&Encoding::Octet.body("frame", &data)[..], &data[..]);
        let multipart = Encoding::Multipart.body("frame", &data);
        let start = multipart.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(&multipart[start..start + data.len()], &data[..]);
        assert!(multipart.ends_with(format!("\r\n--{BOUNDARY}--\r\n").as_bytes()));
        assert!(Encoding::Multipart.content_type().ends_with(BOUNDARY));
    }

    #[test]
    fn images_are_real_and_about_the_size_asked() {
        let png = png_of_about(64 << 10).unwrap();
        assert!(
            png.len() > 60 << 10 && png.len() < 70 << 10,
            "{}",
            png.len()
        );
        let decoded = image::load_from_memory(&png).unwrap();
        assert!(decoded.width() > 100);
        let jpeg = jpeg_frame(320, 180, 20 << 10, 1).unwrap();
        assert!(jpeg.len() <= 20 << 10, "{}", jpeg.len());
        let decoded = image::load_from_memory(&jpeg).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (320, 180));
        assert_eq!(size_title(8 << 20), "8 MB");
        assert_eq!(size_id(64 << 10), "64k");
    }
}
