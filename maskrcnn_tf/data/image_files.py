"""Image files for the converters: JPEG/PNG sniffing and validation, safe relative paths, box clipping.

Decisions:
- Images are copied byte for byte. Only JPEG and PNG are accepted (schema "image/format"); the true size
  comes from the file header (JPEG SOF / PNG IHDR), which is also what tf.io.decode_image returns (EXIF
  orientation is ignored by both). A file is validated by a cheap decode (JPEG at 1/8 scale, which still
  walks all entropy-coded data) and, because libjpeg only warns on truncated files while TensorFlow's
  decoder fails, by requiring the end-of-image marker after the start of scan (PNG: the IEND chunk).
- A file that cannot be used raises BadImage(reason); the reason is the converter summary's key:
  missing_image_file, unreadable_image_file, empty_image_file, unsupported_image_format,
  undecodable_image.
- OpenCV is imported where it is used: the rest of the package does not need it.
"""

import dataclasses
import os
import struct
from typing import Tuple

import numpy as np

JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers carrying the image size (SOF0..SOF15 except DHT C4, JPG C8, DAC CC).
JPEG_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_SOS = 0xDA
# Markers without a length field: TEM, RST0..7, SOI, EOI.
JPEG_STANDALONE_MARKERS = frozenset([0x01] + list(range(0xD0, 0xDA)))


class BadImage(Exception):
    """An image file that cannot be used; `reason` is the summary key."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class ImageFile:
    encoded: bytes  # the file's bytes, unchanged
    image_format: str  # "jpeg" | "png"
    height: int
    width: int


def _jpeg_size_and_scan(data: bytes) -> Tuple[int, int, int]:
    """Walks JPEG marker segments -> (height, width, offset of the first start-of-scan)."""
    pos, size = 2, None
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"no marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in JPEG_STANDALONE_MARKERS:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        if marker in JPEG_SOF_MARKERS and pos + 9 <= len(data):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            size = (height, width)
        if marker == JPEG_SOS:
            if size is None:
                raise ValueError("start of scan before any frame header")
            return size[0], size[1], pos
        pos += 2 + length
    raise ValueError("no start of scan (truncated header)")


def read_image_file(path: str) -> ImageFile:
    """Reads and validates one JPEG/PNG file; raises BadImage(reason) when it cannot be used."""
    import cv2

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadImage("missing_image_file", f"{path}: no such file") from None
    except OSError as e:
        raise BadImage("unreadable_image_file", f"{path}: {e}") from None
    if not data:
        raise BadImage("empty_image_file", f"{path}: empty file")
    try:
        if data.startswith(JPEG_SOI):
            image_format = "jpeg"
            height, width, scan = _jpeg_size_and_scan(data)
            # Inside entropy-coded data 0xFF is stuffed (FF 00), so FF D9 after the scan start is the EOI.
            if data.find(JPEG_EOI, scan) < 0:
                raise ValueError("truncated: no end-of-image marker")
            flags = cv2.IMREAD_REDUCED_GRAYSCALE_8
        elif data.startswith(PNG_SIGNATURE):
            image_format = "png"
            if data[12:16] != b"IHDR" or b"IEND" not in data[-12:]:
                raise ValueError("truncated or malformed PNG")
            width, height = struct.unpack(">II", data[16:24])
            flags = cv2.IMREAD_UNCHANGED
        else:
            raise BadImage("unsupported_image_format", f"{path}: not a JPEG or PNG file")
        if height <= 0 or width <= 0:
            raise ValueError(f"header size {height}x{width}")
        if cv2.imdecode(np.frombuffer(data, np.uint8), flags) is None:
            raise ValueError("OpenCV cannot decode it")
    except (ValueError, struct.error, cv2.error) as e:
        raise BadImage("undecodable_image", f"{path}: {e}") from None
    return ImageFile(data, image_format, int(height), int(width))


def is_safe_relative_path(name: str) -> bool:
    """True for a relative path that stays inside its root: not absolute, no '..' component."""
    if not name or os.path.isabs(name) or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return False
    return ".." not in name.replace("\\", "/").split("/")


def clip_box(x1: float, y1: float, x2: float, y2: float, height: int, width: int):
    """Clips a pixel box (continuous coordinates) to [0, width] x [0, height] -> (box, changed)."""
    clipped = (min(max(x1, 0.0), width), min(max(y1, 0.0), height),
               min(max(x2, 0.0), width), min(max(y2, 0.0), height))
    return clipped, clipped != (x1, y1, x2, y2)
