"""COCO run-length masks -> PNG bytes, without ever building the full-size mask.

The COCO converter writes one full-image PNG per instance (schema.py, Model Garden's format). Done the
obvious way (pycocotools decode -> [H, W] array -> cv2.imencode) that dominated the converter's time on
real COCO images (benchmarks/README.md): decode writes H*W bytes in Fortran order, the encoder
transposes them, filters every
row and deflates ~300 KB of mostly zeros, all for an instance that covers ~2% of the image.

Decisions:
- Output: an 8-bit grayscale PNG holding 0/1, which OpenCV, PIL and TF decode to exactly pycocotools'
  annToMask (the tests check it). A 1-bit (bilevel) gray PNG would be 8x smaller to deflate, but TF
  and OpenCV expand 1-bit gray to 0/255, and Model Garden's decoder casts the PNG to float without
  thresholding before its bilinear crop, so 0/255 masks would change its training targets. A 1-bit
  palette PNG (palette 0 -> 0, 1 -> 1) does decode to 0/1 in TF, but TF decoded it slower than the
  8-bit one (palette expansion) and OpenCV reads it as 3 channels. Both measured and rejected.
- Work is proportional to the instance's box, not the image: the RLE counts (column-major runs) are
  parsed (rle_counts), the box's columns x rows block is filled from them with NumPy, and only the
  rows the mask touches are deflated (zlib level 1, Z_RLE; smaller than OpenCV's default output and
  faster for TF to decode, since every row is unfiltered).
  Runs of all-zero rows above and below come from a per-(width, 2^k rows) cache of deflate segments
  (independent raw-deflate streams ending in a sync flush are byte aligned and never refer back to
  earlier data, so they concatenate into one valid stream); the Adler-32 of zero bytes is computed in
  closed form.
- Counts are validated (non-negative, summing to height * width): pycocotools' decoder trusts them
  and writes past its buffer when they do not.
"""

import struct
import zlib
from typing import Dict, List, Tuple

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# zlib stream header: deflate, 32 KB window, "fastest" level hint; (0x78 * 256 + 0x01) % 31 == 0.
_ZLIB_HEADER = b"\x78\x01"
# A final, empty, fixed-Huffman deflate block: ends the stream after sync-flushed segments.
_DEFLATE_FINAL_EMPTY_BLOCK = b"\x03\x00"
_ADLER_MOD = 65521
_COMPRESS_LEVEL = 1
# COCO's compressed RLE: 5 data bits per character, offset 48; bit 0x20 = more characters follow,
# bit 0x10 of the last character = negative value (pycocotools rleFrString).
_RLE_CHAR_OFFSET = 48
_RLE_MORE = 0x20
_RLE_SIGN = 0x10
_RLE_DATA = 0x1F
_RLE_BITS = 5
_MAX_RLE_SHIFT = 55  # 12 characters, 60 bits: more than any real count needs

_zero_rows_cache: Dict[Tuple[int, int], bytes] = {}


def rle_counts(compressed) -> np.ndarray:
    """COCO compressed RLE string (bytes or str, pycocotools' "counts") -> int64 [m] run lengths,
    alternating 0-runs and 1-runs in column-major order, starting with 0s. ValueError if malformed.

    A plain Python loop: a mask's string is a few hundred characters, where NumPy's per-call overhead
    made a vectorised parser slower."""
    if isinstance(compressed, str):
        compressed = compressed.encode("ascii")
    counts: List[int] = []
    value = shift = 0
    for char in compressed:
        char -= _RLE_CHAR_OFFSET
        if not 0 <= char < 2 * _RLE_MORE or shift > _MAX_RLE_SHIFT:
            raise ValueError("malformed compressed RLE string")
        value |= (char & _RLE_DATA) << shift
        shift += _RLE_BITS
        if not char & _RLE_MORE:
            if char & _RLE_SIGN:
                value |= -1 << shift
            if len(counts) > 2:  # from the third on, stored as a difference to the count two before
                value += counts[-2]
            counts.append(value)
            value = shift = 0
    if shift or not counts:
        raise ValueError("malformed compressed RLE string (truncated)")
    return np.array(counts, np.int64)


def check_counts(counts: np.ndarray, height: int, width: int) -> None:
    """ValueError unless counts are non-negative and cover exactly height * width pixels."""
    if counts.size and (counts.min() < 0 or int(counts.sum()) != height * width):
        raise ValueError(f"RLE counts cover {int(counts.sum())} pixels, not {height}x{width}")
    if not counts.size and height * width:
        raise ValueError("empty RLE counts")


def counts_to_mask(counts: np.ndarray, height: int, width: int) -> np.ndarray:
    """Run lengths (checked) -> uint8 [height, width] 0/1 mask (Fortran-ordered, as pycocotools')."""
    values = (np.arange(counts.size) % 2).astype(np.uint8)  # [m] 0, 1, 0, ...
    return np.repeat(values, counts).reshape(width, height).T  # [H, W]


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))


def _zero_rows_deflate(width: int, rows: int) -> bytes:
    """Byte-aligned raw-deflate segments that inflate to `rows` all-zero PNG scanlines of `width`."""
    segments, bit = [], 0
    while rows:
        if rows & 1:
            key = (width, bit)
            segment = _zero_rows_cache.get(key)
            if segment is None:
                compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
                segment = compressor.compress(bytes((width + 1) << bit)) + compressor.flush(zlib.Z_SYNC_FLUSH)
                _zero_rows_cache[key] = segment
            segments.append(segment)
        rows >>= 1
        bit += 1
    return b"".join(segments)


def _adler32_of_zeros(adler: int, n: int) -> int:
    """Adler-32 after n more zero bytes: s1 is unchanged, s2 grows by n * s1."""
    s1, s2 = adler & 0xFFFF, adler >> 16
    return (((s2 + n * s1) % _ADLER_MOD) << 16) | s1


def _mask_block(counts: np.ndarray, height: int):
    """The part of the mask that holds its 1s: (uint8 [x1 - x0, y1 - y0] block, transposed, x0, y0).
    None when the mask is empty."""
    ends = np.cumsum(counts)  # [m]
    starts, stops = ends[0:-1:2], ends[1::2]  # [r] each 1-run covers [start, stop) column-major
    nonempty = stops > starts
    starts, stops = starts[nonempty], stops[nonempty]
    if starts.size == 0:
        return None
    first_col, last_col = starts // height, (stops - 1) // height  # [r]
    x0, x1 = int(first_col[0]), int(last_col[-1]) + 1
    if np.array_equal(first_col, last_col):  # no run wraps into the next column: crop the rows too
        y_start, y_stop = starts - first_col * height, stops - first_col * height  # [r]
        y0, y1 = int(y_start.min()), int(y_stop.max())
        base = (first_col - x0) * (y1 - y0) - y0  # [r]
        starts, stops = base + y_start, base + y_stop
    else:  # a run wraps around a column end: keep whole columns
        y0, y1 = 0, height
        starts, stops = starts - x0 * height, stops - x0 * height
    size = (x1 - x0) * (y1 - y0)
    # Boundaries 0, s1, e1, s2, e2, ..., size -> alternating 0/1 segment lengths (zero lengths are fine).
    bounds = np.empty(2 * starts.size + 2, np.int64)  # [2r + 2]
    bounds[0], bounds[-1] = 0, size
    bounds[1:-1:2], bounds[2:-1:2] = starts, stops
    values = np.zeros(2 * starts.size + 1, np.uint8)  # [2r + 1]
    values[1::2] = 1
    block = np.repeat(values, np.diff(bounds)).reshape(x1 - x0, y1 - y0)  # [bw, bh]
    return block, x0, y0


def encode_png_from_counts(counts: np.ndarray, height: int, width: int) -> bytes:
    """Run lengths (rle_counts / uncompressed COCO RLE, already checked) of a height x width mask ->
    PNG bytes of the 0/1 mask (8-bit grayscale). Cost ~ the mask's box, not the image."""
    row_bytes = width + 1  # each PNG scanline starts with its filter type (0 = none)
    found = _mask_block(counts, height)
    parts, adler = [_ZLIB_HEADER], 1
    y0 = y1 = height
    if found is not None:
        block, x0, y0 = found
        y1 = y0 + block.shape[1]
        rows = np.zeros((y1 - y0, row_bytes), np.uint8)  # [bh, W + 1]
        rows[:, 1 + x0:1 + x0 + block.shape[0]] = block.T
        compressor = zlib.compressobj(_COMPRESS_LEVEL, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_RLE)
        middle = compressor.compress(rows) + compressor.flush(zlib.Z_SYNC_FLUSH)  # rows: C-contiguous buffer
    if y0:
        parts.append(_zero_rows_deflate(width, y0))
        adler = _adler32_of_zeros(adler, y0 * row_bytes)
    if y1 > y0:
        parts.append(middle)
        adler = zlib.adler32(rows, adler)
    if height > y1:
        parts.append(_zero_rows_deflate(width, height - y1))
        adler = _adler32_of_zeros(adler, (height - y1) * row_bytes)
    parts += [_DEFLATE_FINAL_EMPTY_BLOCK, struct.pack(">I", adler)]
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit gray, no interlace
    return PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")
