"""py-image-stats: an example ForgeSyte Python plugin in the seed's layout.

What it shows:

- The seed's contract: ``plugin.py`` next to ``manifest.json`` defines
  ``class Plugin``, constructed with no arguments, with a ``tools`` dict
  (tool name -> handler, description, input_schema, output_schema) and
  ``run_tool(tool_name, args)``.
- Binary arguments: ``analyze`` declares ``image`` as
  ``{"type": "string", "format": "binary"}``, so the host's runner hands the
  tool ``bytes`` whether the client sent base64 in JSON or an attachment.
- Errors: malformed input raises ``ValueError`` with a clear message; the
  host reports it as a tool error (HTTP 422) and the plugin stays loaded.
- Real work with the standard library only: a PNG decoder (chunks, CRCs,
  zlib, the five scanline filters, every colour type and bit depth of
  non-interlaced images) and a JPEG frame-header reader.

Tools:

- ``analyze`` ``{"image": <bytes>}`` ->
  ``{"format", "width", "height", "channels", "color_type", "bit_depth",
  "mean_brightness", "histogram", "note"}``. Brightness is the luminance
  ``0.299 R + 0.587 G + 0.114 B`` (0-255, alpha ignored); the histogram has
  16 bins of 16 luminance levels each. For JPEG only the frame header is
  read (no pixel decoding), so ``mean_brightness`` and ``histogram`` are
  ``null`` and ``note`` says why; the same holds for interlaced PNGs.
- ``info`` ``{}`` -> the plugin's name, version and supported formats.
"""

import base64
import binascii
import struct
import zlib
from collections import Counter

__version__ = "0.1.0"

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8"

HISTOGRAM_BINS = 16
# Luminance is computed in thousandths with integer weights, so means and
# histogram bins are exact (no 31.999... landing in the wrong bin).
LUMA_WEIGHTS = (299, 587, 114)
LUMA_SCALE = 1000
LUMA_BIN_WIDTH = 256 * LUMA_SCALE // HISTOGRAM_BINS  # 16 levels per bin

# Decompression-bomb guard: an image whose pixel data inflates to more
# than this is refused before inflating (a tool error), whatever its pixel
# count: 8 KB of 1-bit PNG can declare 64 Mi pixels. Rows are inflated,
# unfiltered and counted one at a time, so the plugin holds two rows, not
# the image; the bound is on time (the filters are undone in Python, about
# 4 s for 16 MiB of Paeth-filtered rows) and keeps a call well inside the
# default 60 s call limit even with a few at once.
MAX_IMAGE_BYTES = 16 * 1024 * 1024

# PNG colour type -> (name, samples per pixel, allowed bit depths).
PNG_COLOR_TYPES = {
    0: ("gray", 1, (1, 2, 4, 8, 16)),
    2: ("rgb", 3, (8, 16)),
    3: ("palette", 1, (1, 2, 4, 8)),
    4: ("gray_alpha", 2, (8, 16)),
    6: ("rgba", 4, (8, 16)),
}

# JPEG start-of-frame markers (all but DHT 0xC4, JPG 0xC8 and DAC 0xCC).
JPEG_SOF_MARKERS = {
    0xC0: "baseline",
    0xC1: "extended sequential",
    0xC2: "progressive",
    0xC3: "lossless",
    0xC5: "differential sequential",
    0xC6: "differential progressive",
    0xC7: "differential lossless",
    0xC9: "extended sequential, arithmetic",
    0xCA: "progressive, arithmetic",
    0xCB: "lossless, arithmetic",
    0xCD: "differential sequential, arithmetic",
    0xCE: "differential progressive, arithmetic",
    0xCF: "differential lossless, arithmetic",
}
# Markers without a length field: TEM and RST0-RST7.
JPEG_STANDALONE = {0x01} | set(range(0xD0, 0xD8))
JPEG_COLOR_TYPES = {1: "gray", 3: "ycbcr", 4: "cmyk"}


ANALYZE_OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {
        "format": {"type": "string", "enum": ["png", "jpeg"]},
        "width": {"type": "integer"},
        "height": {"type": "integer"},
        "channels": {"type": "integer"},
        "color_type": {"type": "string"},
        "bit_depth": {"type": "integer"},
        "mean_brightness": {"type": ["number", "null"], "minimum": 0, "maximum": 255},
        "histogram": {
            "type": ["array", "null"],
            "items": {"type": "integer"},
            "minItems": HISTOGRAM_BINS,
            "maxItems": HISTOGRAM_BINS,
        },
        "note": {"type": ["string", "null"]},
    },
}


# ---------------------------------------------------------------------------
# The plugin
# ---------------------------------------------------------------------------


class Plugin:
    """Image statistics for PNG and JPEG images (the seed's contract)."""

    name = "py-image-stats"
    version = __version__

    def __init__(self):
        self.tools = {
            "analyze": {
                "handler": self.analyze,
                "title": "Image statistics",
                "description": (
                    "Format, size, channels, mean brightness (0-255) and a 16-bin "
                    "luminance histogram of a PNG image; size and channels only "
                    "for JPEG."
                ),
                "input_schema": {
                    "type": "object",
                    "properties": {
                        "image": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG or JPEG file bytes (base64 in JSON)",
                        }
                    },
                    "required": ["image"],
                },
                "output_schema": ANALYZE_OUTPUT_SCHEMA,
            },
            "info": {
                "handler": self.info,
                "title": "Plugin information",
                "description": "The plugin's name, version and supported formats.",
                "input_schema": {"type": "object"},
                "output_schema": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "version": {"type": "string"},
                        "formats": {"type": "array", "items": {"type": "string"}},
                    },
                },
            },
        }

    def run_tool(self, tool_name, args):
        """Runs one tool: ``args`` is the JSON object of the call."""
        tool = self.tools.get(tool_name)
        if tool is None:
            raise ValueError("Unknown tool: %s" % tool_name)
        if not isinstance(args, dict):
            raise ValueError("arguments must be a JSON object")
        return tool["handler"](args)

    # -- tools ------------------------------------------------------------

    def analyze(self, args):
        """Statistics of the image in ``args["image"]``."""
        if "image" not in args:
            raise ValueError("missing required argument 'image'")
        return analyze_image(_as_bytes(args["image"]))

    def info(self, args):
        return {
            "name": self.name,
            "version": self.version,
            "formats": ["png", "jpeg"],
            "png": {
                "color_types": sorted(name for name, _, _ in PNG_COLOR_TYPES.values()),
                "bit_depths": [1, 2, 4, 8, 16],
                "filters": ["none", "sub", "up", "average", "paeth"],
                "interlaced": "size only",
            },
            "jpeg": {"pixels": False, "processes": sorted(set(JPEG_SOF_MARKERS.values()))},
            "histogram_bins": HISTOGRAM_BINS,
        }


def _as_bytes(value):
    """The image as bytes. Under the host it already is (the schema says
    ``format: binary``); a base64 string is accepted for direct callers."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError("argument 'image' is not valid base64: %s" % e)
    raise ValueError("argument 'image' must be bytes, not %s" % type(value).__name__)


def analyze_image(data):
    """Statistics of a PNG or JPEG file given as bytes."""
    if data.startswith(PNG_SIGNATURE):
        return analyze_png(data)
    if data.startswith(JPEG_SOI):
        return analyze_jpeg(data)
    if not data:
        raise ValueError("the image is empty")
    raise ValueError(
        "not a PNG or JPEG image (the file starts with %s)" % data[:8].hex(" ")
    )


def _result(fmt, width, height, channels, color_type, bit_depth, counts=None, note=None):
    """The ``analyze`` result; ``counts`` maps luminance (thousandths) to a
    pixel count, or is None when the pixels were not decoded."""
    mean = histogram = None
    if counts is not None:
        total = sum(counts.values())
        luma_sum = sum(luma * n for luma, n in counts.items())
        mean = round(luma_sum / (LUMA_SCALE * total), 3) if total else 0.0
        histogram = [0] * HISTOGRAM_BINS
        for luma, n in counts.items():
            histogram[min(luma // LUMA_BIN_WIDTH, HISTOGRAM_BINS - 1)] += n
    return {
        "format": fmt,
        "width": width,
        "height": height,
        "channels": channels,
        "color_type": color_type,
        "bit_depth": bit_depth,
        "mean_brightness": mean,
        "histogram": histogram,
        "note": note,
    }


# ---------------------------------------------------------------------------
# PNG
# ---------------------------------------------------------------------------


def read_png_chunks(data):
    """Yields (type, payload) for each chunk, checking lengths and CRCs."""
    pos = len(PNG_SIGNATURE)
    while pos < len(data):
        if pos + 8 > len(data):
            raise ValueError("truncated PNG: incomplete chunk header at byte %d" % pos)
        length, ctype = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 8 + length
        if end + 4 > len(data):
            raise ValueError(
                "truncated PNG: chunk %r at byte %d needs %d bytes, %d left"
                % (ctype.decode("latin-1"), pos, length + 12, len(data) - pos)
            )
        payload = data[pos + 8:end]
        (crc,) = struct.unpack(">I", data[end:end + 4])
        if zlib.crc32(ctype + payload) & 0xFFFFFFFF != crc:
            raise ValueError("corrupt PNG: CRC mismatch in chunk %r" % ctype.decode("latin-1"))
        yield ctype, payload
        if ctype == b"IEND":
            return
        pos = end + 4
    raise ValueError("truncated PNG: no IEND chunk")


def analyze_png(data):
    header = None
    palette = None
    idat = []
    for ctype, payload in read_png_chunks(data):
        if header is None and ctype != b"IHDR":
            raise ValueError("corrupt PNG: the first chunk is %r, not IHDR" % ctype.decode("latin-1"))
        if ctype == b"IHDR":
            header = parse_ihdr(payload)
        elif ctype == b"PLTE":
            if len(payload) % 3 or not 3 <= len(payload) <= 768:
                raise ValueError("corrupt PNG: PLTE of %d bytes" % len(payload))
            palette = [tuple(payload[i:i + 3]) for i in range(0, len(payload), 3)]
        elif ctype == b"IDAT":
            idat.append(payload)
    if header is None:
        raise ValueError("corrupt PNG: no IHDR chunk")
    width, height, depth, ctype_id, interlace = header
    color_type, channels, _ = PNG_COLOR_TYPES[ctype_id]
    if ctype_id == 3:
        channels = 3  # palette entries are RGB
        if palette is None:
            raise ValueError("corrupt PNG: palette image without a PLTE chunk")
    if not idat:
        raise ValueError("corrupt PNG: no IDAT chunk")
    if interlace:
        return _result("png", width, height, channels, color_type, depth,
                       note="Adam7-interlaced PNG: size only, pixels not decoded")
    samples = PNG_COLOR_TYPES[ctype_id][1]
    bits_per_pixel = samples * depth
    stride = (width * bits_per_pixel + 7) // 8
    if height * (stride + 1) > MAX_IMAGE_BYTES:
        raise ValueError(
            "PNG of %dx%d pixels (%d bits each) decodes to %d bytes, over this plugin's limit of %d"
            % (width, height, bits_per_pixel, height * (stride + 1), MAX_IMAGE_BYTES))
    lines = scanlines(b"".join(idat), height, stride + 1)
    rows = unfilter(lines, stride, max(1, bits_per_pixel // 8))
    counts = luminance_counts(rows, width, depth, ctype_id, palette)
    return _result("png", width, height, channels, color_type, depth, counts)


def parse_ihdr(payload):
    """(width, height, bit depth, colour type, interlace) from IHDR."""
    if len(payload) != 13:
        raise ValueError("corrupt PNG: IHDR of %d bytes, not 13" % len(payload))
    width, height, depth, ctype, compression, filtering, interlace = struct.unpack(">IIBBBBB", payload)
    if width == 0 or height == 0:
        raise ValueError("corrupt PNG: image size %dx%d" % (width, height))
    if ctype not in PNG_COLOR_TYPES:
        raise ValueError("corrupt PNG: unknown colour type %d" % ctype)
    name, _, depths = PNG_COLOR_TYPES[ctype]
    if depth not in depths:
        raise ValueError("corrupt PNG: bit depth %d is not allowed for colour type %s" % (depth, name))
    if compression != 0 or filtering != 0:
        raise ValueError("corrupt PNG: unknown compression (%d) or filter method (%d)" % (compression, filtering))
    if interlace not in (0, 1):
        raise ValueError("corrupt PNG: unknown interlace method %d" % interlace)
    return width, height, depth, ctype, interlace


def scanlines(compressed, height, row_bytes):
    """The zlib stream's ``height`` scanlines of ``row_bytes`` (filter byte
    and data), one at a time: never more than a row is inflated ahead."""
    inflater = zlib.decompressobj()
    pending = b""
    data = compressed
    for y in range(height):
        while len(pending) < row_bytes:
            try:
                chunk = inflater.decompress(data, row_bytes - len(pending))
            except zlib.error as e:
                raise ValueError("corrupt PNG: image data does not decompress: %s" % e)
            data = inflater.unconsumed_tail
            if not chunk:
                raise ValueError(
                    "truncated PNG: image data holds %d bytes, %d expected"
                    % (y * row_bytes + len(pending), height * row_bytes)
                )
            pending += chunk
        yield pending[:row_bytes]
        pending = pending[row_bytes:]


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def unfilter(lines, stride, bpp):
    """Undoes the per-scanline filters of ``lines`` (each a filter byte and
    ``stride`` bytes); yields the rows (``bytearray``s of ``stride``
    bytes), keeping only the previous one. ``bpp`` is the filter's byte
    distance: bytes per complete pixel, at least 1."""
    prev = bytearray(stride)
    for y, raw in enumerate(lines):
        ftype = raw[0]
        line = bytearray(raw[1:])
        if ftype == 0:  # None
            pass
        elif ftype == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 0xFF
        elif ftype == 2:  # Up
            for i in range(stride):
                line[i] = (line[i] + prev[i]) & 0xFF
        elif ftype == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 0xFF
        elif ftype == 4:  # Paeth
            for i in range(stride):
                if i >= bpp:
                    line[i] = (line[i] + _paeth(line[i - bpp], prev[i], prev[i - bpp])) & 0xFF
                else:
                    line[i] = (line[i] + prev[i]) & 0xFF  # paeth(0, b, 0) == b
        else:
            raise ValueError("corrupt PNG: unknown filter type %d on row %d" % (ftype, y))
        yield line
        prev = line


def _count_bits(line, width, depth, colours):
    """Counts into ``colours`` the sub-byte samples (1, 2 or 4 bits, most
    significant first) of a row: by byte value first (C-speed), then each
    distinct byte's samples; the last byte's padding bits are left out."""
    per_byte = 8 // depth
    mask = (1 << depth) - 1
    shifts = [8 - depth * (k + 1) for k in range(per_byte)]
    full = width // per_byte
    for byte, n in Counter(line[:full]).items():
        for s in shifts:
            colours[(byte >> s) & mask] += n
    for s in shifts[:width - full * per_byte]:
        colours[(line[full] >> s) & mask] += 1


def luminance_counts(rows, width, depth, ctype, palette):
    """Counter: luminance in thousandths -> number of pixels.

    Pixels are first counted by colour (C-speed ``Counter`` over slices),
    then each distinct colour's luminance is computed once. 16-bit samples
    are reduced to their high byte; 1/2/4-bit grays are scaled to 0-255."""
    samples = PNG_COLOR_TYPES[ctype][1]
    colours = Counter()
    if depth < 8:
        for line in rows:
            _count_bits(line, width, depth, colours)
    else:
        step = samples * (depth // 8)  # bytes per pixel; index 0 is the high byte
        for line in rows:
            if ctype in (2, 6):  # RGB, RGBA: skip alpha
                colours.update(zip(line[0::step], line[depth // 8::step], line[2 * (depth // 8)::step]))
            else:  # gray, gray+alpha, palette: the first sample
                colours.update(line[0::step])
    counts = Counter()
    r_w, g_w, b_w = LUMA_WEIGHTS
    for colour, n in colours.items():
        if ctype == 3:
            if colour >= len(palette):
                raise ValueError("corrupt PNG: palette index %d, the palette has %d entries" % (colour, len(palette)))
            r, g, b = palette[colour]
            luma = r_w * r + g_w * g + b_w * b
        elif ctype in (2, 6):
            r, g, b = colour
            luma = r_w * r + g_w * g + b_w * b
        else:
            level = colour * 255 // ((1 << depth) - 1) if depth < 8 else colour
            luma = LUMA_SCALE * level
        counts[luma] += n
    return counts


# ---------------------------------------------------------------------------
# JPEG
# ---------------------------------------------------------------------------


def analyze_jpeg(data):
    """Size and components from the JPEG's frame (SOFn) header."""
    pos = 2
    n = len(data)
    while pos < n:
        if data[pos] != 0xFF:
            raise ValueError("corrupt JPEG: expected a marker at byte %d, found 0x%02x" % (pos, data[pos]))
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            break
        marker = data[pos]
        pos += 1
        if marker in JPEG_STANDALONE:
            continue
        if marker in (0xD9, 0xDA):  # EOI, SOS: past the headers
            raise ValueError("corrupt JPEG: no frame header (SOFn) before %s"
                             % ("the image data" if marker == 0xDA else "the end of the image"))
        if pos + 2 > n:
            break
        (length,) = struct.unpack(">H", data[pos:pos + 2])
        if length < 2 or pos + length > n:
            raise ValueError("truncated JPEG: segment 0x%02x at byte %d claims %d bytes" % (marker, pos - 2, length))
        if marker in JPEG_SOF_MARKERS:
            if length < 8:
                raise ValueError("corrupt JPEG: frame header of %d bytes" % length)
            precision, height, width, components = struct.unpack(">BHHB", data[pos + 2:pos + 8])
            if width == 0 or height == 0:
                raise ValueError(
                    "unsupported JPEG: frame size %dx%d (a height set later by DNL is not supported)"
                    % (width, height))
            if components == 0:
                raise ValueError("corrupt JPEG: frame header with no components")
            process = JPEG_SOF_MARKERS[marker]
            return _result(
                "jpeg", width, height, components,
                JPEG_COLOR_TYPES.get(components, "%d components" % components), precision,
                note="JPEG (%s): frame header only; pixels are not decoded, so there is "
                     "no brightness or histogram" % process)
        pos += length
    raise ValueError("truncated JPEG: no frame header (SOFn)")
