"""Tests of the py-image-stats example plugin (standard library only).

Run from this directory: ``python3 -m unittest``.

PNGs are built in memory with ``zlib`` and ``struct``; the encoder below
applies each of the five scanline filters, so decoding them checks the
plugin's un-filtering. Expected means and histograms are worked out from
the pixel values, in the plugin's units: luminance 0.299 R + 0.587 G +
0.114 B, mean rounded to 3 decimals, 16 bins of 16 levels.
"""

import base64
import os
import struct
import sys
import unittest
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from plugin import Plugin, analyze_image  # noqa: E402

SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def chunk(ctype, payload):
    return (struct.pack(">I", len(payload)) + ctype + payload
            + struct.pack(">I", zlib.crc32(ctype + payload) & 0xFFFFFFFF))


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(ftype, line, prev, bpp):
    """Encodes one raw scanline with PNG filter ``ftype``."""
    out = bytearray()
    for i, x in enumerate(line):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        predictor = [0, a, b, (a + b) // 2, _paeth(a, b, c)][ftype]
        out.append((x - predictor) & 0xFF)
    return bytes([ftype]) + bytes(out)


def make_png(width, height, color_type, depth, lines, filters=0, palette=None,
             interlace=0, idat_parts=1):
    """A PNG from raw (unfiltered) scanlines. ``filters``: one filter type
    for every row, or a list with one per row."""
    bpp = max(1, SAMPLES[color_type] * depth // 8)
    stride = (width * SAMPLES[color_type] * depth + 7) // 8
    prev = bytes(stride)
    raw = b""
    for y, line in enumerate(lines):
        line = bytes(line)
        assert len(line) == stride, (len(line), stride)
        ftype = filters[y] if isinstance(filters, list) else filters
        raw += filter_row(ftype, line, prev, bpp)
        prev = line
    data = zlib.compress(raw)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color_type, 0, 0, interlace)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
    if palette is not None:
        out += chunk(b"PLTE", b"".join(bytes(p) for p in palette))
    size = -(-len(data) // idat_parts)
    for i in range(0, len(data), size):
        out += chunk(b"IDAT", data[i:i + size])
    return out + chunk(b"IEND", b"")


def expected(pixels_rgb):
    """(mean, histogram) for a list of (r, g, b) pixels, as the plugin
    computes them (luminance in thousandths, so exact)."""
    lumas = [299 * r + 587 * g + 114 * b for r, g, b in pixels_rgb]
    mean = round(sum(lumas) / (1000 * len(lumas)), 3)
    hist = [0] * 16
    for luma in lumas:
        hist[min(luma // 16000, 15)] += 1
    return mean, hist


def rgb_gradient(width, height):
    """A varied RGB image (so every filter changes the bytes) and its pixels."""
    pixels = [[((x * 37 + y * 11) % 256, (x * 5 + y * 53) % 256, (255 - x * 19 - y * 7) % 256)
               for x in range(width)] for y in range(height)]
    lines = [bytes(v for px in row for v in px) for row in pixels]
    return lines, [px for row in pixels for px in row]


class PngTests(unittest.TestCase):
    def test_solid_gray(self):
        png = make_png(4, 3, 0, 8, [bytes([100] * 4)] * 3)
        r = analyze_image(png)
        self.assertEqual(r["format"], "png")
        self.assertEqual((r["width"], r["height"], r["channels"]), (4, 3, 1))
        self.assertEqual(r["color_type"], "gray")
        self.assertEqual(r["mean_brightness"], 100.0)
        self.assertEqual(r["histogram"], [0] * 6 + [12] + [0] * 9)
        self.assertIsNone(r["note"])

    def test_solid_red(self):
        png = make_png(5, 2, 2, 8, [bytes([255, 0, 0] * 5)] * 2)
        r = analyze_image(png)
        self.assertEqual(r["channels"], 3)
        self.assertEqual(r["mean_brightness"], 76.245)  # 0.299 * 255
        self.assertEqual(r["histogram"], [0] * 4 + [10] + [0] * 11)

    def test_white_and_black(self):
        white = analyze_image(make_png(3, 3, 2, 8, [bytes([255] * 9)] * 3))
        self.assertEqual(white["mean_brightness"], 255.0)
        self.assertEqual(white["histogram"], [0] * 15 + [9])
        black = analyze_image(make_png(3, 3, 2, 8, [bytes(9)] * 3))
        self.assertEqual(black["mean_brightness"], 0.0)
        self.assertEqual(black["histogram"], [9] + [0] * 15)

    def test_gray_gradient_fills_every_bin(self):
        # 0, 17, 34, ..., 255: one pixel per bin and row.
        png = make_png(16, 2, 0, 8, [bytes(17 * x for x in range(16))] * 2)
        r = analyze_image(png)
        self.assertEqual(r["mean_brightness"], 127.5)
        self.assertEqual(r["histogram"], [2] * 16)

    def test_each_filter_type(self):
        lines, pixels = rgb_gradient(7, 5)
        mean, hist = expected(pixels)
        for ftype in range(5):
            with self.subTest(filter=ftype):
                r = analyze_image(make_png(7, 5, 2, 8, lines, filters=ftype))
                self.assertEqual((r["width"], r["height"]), (7, 5))
                self.assertEqual(r["mean_brightness"], mean)
                self.assertEqual(r["histogram"], hist)
                self.assertEqual(sum(r["histogram"]), 35)

    def test_mixed_filters_and_split_idat(self):
        lines, pixels = rgb_gradient(9, 10)
        mean, hist = expected(pixels)
        png = make_png(9, 10, 2, 8, lines, filters=[y % 5 for y in range(10)], idat_parts=3)
        r = analyze_image(png)
        self.assertEqual(r["mean_brightness"], mean)
        self.assertEqual(r["histogram"], hist)

    def test_rgba_ignores_alpha(self):
        # Pure blue, fully transparent, with the Paeth filter (bpp 4).
        png = make_png(2, 2, 6, 8, [bytes([0, 0, 255, 0] * 2)] * 2, filters=4)
        r = analyze_image(png)
        self.assertEqual((r["channels"], r["color_type"]), (4, "rgba"))
        self.assertEqual(r["mean_brightness"], 29.07)  # 0.114 * 255
        self.assertEqual(r["histogram"], [0, 4] + [0] * 14)

    def test_gray_alpha(self):
        png = make_png(2, 1, 4, 8, [bytes([10, 255, 250, 0])], filters=1)
        r = analyze_image(png)
        self.assertEqual((r["channels"], r["color_type"]), (2, "gray_alpha"))
        self.assertEqual(r["mean_brightness"], 130.0)
        self.assertEqual(r["histogram"], [1] + [0] * 14 + [1])

    def test_16_bit_uses_high_byte(self):
        line = struct.pack(">4H", 0x8000, 0x80FF, 0xFFFF, 0x0000)
        r = analyze_image(make_png(4, 1, 0, 16, [line], filters=3))
        self.assertEqual(r["bit_depth"], 16)
        self.assertEqual(r["mean_brightness"], round((128 + 128 + 255 + 0) / 4, 3))
        self.assertEqual(r["histogram"], [1] + [0] * 7 + [2] + [0] * 6 + [1])

    def test_1_bit_gray_with_row_padding(self):
        # 10 pixels: 1010101010 -> two bytes, the last 6 bits padding.
        r = analyze_image(make_png(10, 1, 0, 1, [bytes([0b10101010, 0b10111111])]))
        self.assertEqual(r["mean_brightness"], 127.5)
        self.assertEqual(r["histogram"], [5] + [0] * 14 + [5])

    def test_palette_2_bit(self):
        palette = [(0, 0, 0), (255, 255, 255), (255, 0, 0)]
        # Indices 0 1 2 1 | 2 2 0 0
        lines = [bytes([0b00011001]), bytes([0b10100000])]
        r = analyze_image(make_png(4, 2, 3, 2, lines, palette=palette, filters=2))
        self.assertEqual((r["channels"], r["color_type"]), (3, "palette"))
        mean, hist = expected([palette[i] for i in (0, 1, 2, 1, 2, 2, 0, 0)])
        self.assertEqual(r["mean_brightness"], mean)
        self.assertEqual(r["histogram"], hist)

    def test_interlaced_reports_size_only(self):
        # The pixel data of an interlaced image is not decoded, only sized.
        png = make_png(3, 3, 0, 8, [bytes(3)] * 3, interlace=1)
        r = analyze_image(png)
        self.assertEqual((r["width"], r["height"]), (3, 3))
        self.assertIsNone(r["mean_brightness"])
        self.assertIsNone(r["histogram"])
        self.assertIn("interlaced", r["note"])


class MalformedTests(unittest.TestCase):
    def assertRejected(self, data, fragment):
        with self.assertRaises(ValueError) as cm:
            analyze_image(data)
        self.assertIn(fragment, str(cm.exception))

    def test_not_an_image(self):
        self.assertRejected(b"GIF89a......", "not a PNG or JPEG")
        self.assertRejected(b"", "empty")

    def test_truncated(self):
        png = make_png(4, 4, 0, 8, [bytes(4)] * 4)
        self.assertRejected(png[:40], "truncated PNG")
        self.assertRejected(png[:-12], "no IEND")

    def test_a_decompression_bomb_is_refused_before_inflating(self):
        # 8 KB of 1-bit gray declaring 64 Mi pixels (8 MiB of rows would be
        # fine; the plugin's limit is on decoded bytes, 16 MiB).
        width = 8 * 32 * 1024 * 1024 - 8
        ihdr = struct.pack(">IIBBBBB", width, 1, 1, 0, 0, 0, 0)
        data = zlib.compress(bytes(width // 8 + 1))
        bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data)
                + chunk(b"IEND", b""))
        self.assertLess(len(bomb), 64 * 1024)
        self.assertRejected(bomb, "over this plugin's limit")

    def test_rows_short_of_the_declared_height_are_truncated(self):
        png = make_png(4, 4, 0, 8, [bytes(4)] * 4)
        ihdr = struct.pack(">IIBBBBB", 4, 5, 8, 0, 0, 0, 0)
        taller = png[:8] + chunk(b"IHDR", ihdr) + png[8 + 25:]
        self.assertRejected(taller, "truncated PNG: image data holds 20 bytes, 25 expected")

    def test_bad_crc(self):
        png = bytearray(make_png(2, 2, 0, 8, [bytes(2)] * 2))
        png[29] ^= 0xFF  # inside IHDR's CRC (8 + 8 + 13 = 29)
        self.assertRejected(bytes(png), "CRC mismatch")

    def test_bad_zlib(self):
        ihdr = struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"not zlib")
               + chunk(b"IEND", b""))
        self.assertRejected(png, "does not decompress")

    def test_short_image_data(self):
        ihdr = struct.pack(">IIBBBBB", 100, 100, 8, 0, 0, 0, 0)
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
               + chunk(b"IDAT", zlib.compress(b"\x00" * 50)) + chunk(b"IEND", b""))
        self.assertRejected(png, "10100 expected")

    def test_unknown_filter(self):
        ihdr = struct.pack(">IIBBBBB", 2, 1, 8, 0, 0, 0, 0)
        png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
               + chunk(b"IDAT", zlib.compress(b"\x05\x01\x02")) + chunk(b"IEND", b""))
        self.assertRejected(png, "unknown filter type 5")

    def test_bad_bit_depth(self):
        ihdr = struct.pack(">IIBBBBB", 2, 1, 4, 2, 0, 0, 0)
        png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")
        self.assertRejected(png, "bit depth 4")

    def test_palette_without_plte(self):
        png = make_png(2, 1, 3, 8, [bytes([0, 1])])
        self.assertRejected(png, "without a PLTE")

    def test_palette_index_out_of_range(self):
        png = make_png(2, 1, 3, 8, [bytes([0, 7])], palette=[(1, 2, 3)])
        self.assertRejected(png, "palette index 7")


def jpeg(sof_marker, width, height, components, fill=b""):
    """A JPEG's headers: SOI, APP0 (JFIF), SOFn, SOS, a byte of data, EOI."""
    app0 = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"
    comps = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    sof = struct.pack(">BHHB", 8, height, width, components) + comps
    sos = bytes([components]) + b"".join(bytes([i + 1, 0]) for i in range(components)) + b"\x00\x3f\x00"

    def segment(marker, payload):
        return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload

    return (b"\xff\xd8" + segment(0xE0, app0) + fill + segment(sof_marker, sof)
            + segment(0xDA, sos) + b"\x00" + b"\xff\xd9")


class JpegTests(unittest.TestCase):
    def test_baseline_header(self):
        r = analyze_image(jpeg(0xC0, 640, 480, 3))
        self.assertEqual(r["format"], "jpeg")
        self.assertEqual((r["width"], r["height"], r["channels"]), (640, 480, 3))
        self.assertIsNone(r["mean_brightness"])
        self.assertIsNone(r["histogram"])
        self.assertIn("baseline", r["note"])
        self.assertIn("not decoded", r["note"])

    def test_progressive_gray_after_fill_bytes(self):
        r = analyze_image(jpeg(0xC2, 17, 9, 1, fill=b"\xff\xff"))
        self.assertEqual((r["width"], r["height"], r["channels"]), (17, 9, 1))
        self.assertEqual(r["color_type"], "gray")
        self.assertIn("progressive", r["note"])

    def test_no_frame_header(self):
        data = b"\xff\xd8\xff\xda\x00\x02\x00\xff\xd9"
        with self.assertRaises(ValueError) as cm:
            analyze_image(data)
        self.assertIn("no frame header", str(cm.exception))

    def test_truncated_segment(self):
        with self.assertRaises(ValueError) as cm:
            analyze_image(jpeg(0xC0, 8, 8, 3)[:25])
        self.assertIn("truncated JPEG", str(cm.exception))


class PluginTests(unittest.TestCase):
    def setUp(self):
        self.plugin = Plugin()

    def test_tools_declare_binary_image(self):
        self.assertEqual(sorted(self.plugin.tools), ["analyze", "info"])
        image = self.plugin.tools["analyze"]["input_schema"]["properties"]["image"]
        self.assertEqual(image, dict(image, type="string", format="binary"))

    def test_run_tool_analyze(self):
        png = make_png(2, 2, 0, 8, [bytes([200, 200])] * 2)
        r = self.plugin.run_tool("analyze", {"image": png})
        self.assertEqual(r["mean_brightness"], 200.0)
        # Direct callers may pass base64 text.
        r2 = self.plugin.run_tool("analyze", {"image": base64.b64encode(png).decode()})
        self.assertEqual(r, r2)

    def test_run_tool_errors(self):
        with self.assertRaisesRegex(ValueError, "missing required argument 'image'"):
            self.plugin.run_tool("analyze", {})
        with self.assertRaisesRegex(ValueError, "Unknown tool"):
            self.plugin.run_tool("nope", {})
        with self.assertRaisesRegex(ValueError, "not valid base64"):
            self.plugin.run_tool("analyze", {"image": "***"})

    def test_info(self):
        r = self.plugin.run_tool("info", {})
        self.assertEqual(r["name"], "py-image-stats")
        self.assertEqual(r["version"], "0.1.0")
        self.assertEqual(r["formats"], ["png", "jpeg"])


if __name__ == "__main__":
    unittest.main()
