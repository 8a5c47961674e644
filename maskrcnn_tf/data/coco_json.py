"""A COCO instances JSON read in one streaming pass, into an index whose size does not follow the file's.

`json.load` of COCO train2017's 448 MB instances file holds every polygon as Python objects: several GB
of RSS, before any worker starts (and fork-shared objects are copied page by page as soon as their
reference counts change). The converter needs, per image, only that image's annotations, one image at a
time. So:

- `index_coco_json(path)` reads the file in CHUNK_BYTES pieces and parses one top-level value, one image
  entry or one annotation at a time (json's C scanner, `raw_decode`). It keeps the small values
  ("categories", "info", ...), each image entry trimmed to the keys the converter reads (IMAGE_KEYS),
  and for each annotation only its image id, its category id and where its text is in the file
  (byte offset, length). Annotations with a missing image_id or that are not objects are kept apart
  (with their repr) so that the converter can count them. Peak memory: one chunk, the images, ~30 bytes
  per annotation.
- `read_annotations(path, offsets, lengths)` reads and parses a list of annotation spans again where
  they are needed (in the worker that writes that image), with pread on a per-process file handle.
- The file must be UTF-8 (RFC 8259), with or without a byte order mark; anything the json module
  rejects raises ValueError with json's message. Duplicate top-level keys: the last one wins, as in
  json.load. The file must not change between indexing and the last read.
"""

import array
import codecs
import dataclasses
import json
import os
import re
from typing import Any, Dict, List, Sequence

import numpy as np

CHUNK_BYTES = 1 << 20  # text read per step: the index's memory is ~2 chunks + ~30 bytes per annotation
MAX_KEPT_REPRS = 5  # examples of malformed annotations kept for the summary
IMAGE_KEYS = ("id", "file_name", "height", "width")
_WHITESPACE = re.compile(r"[ \t\n\r]*")
_UTF8_BOM = codecs.BOM_UTF8
_decoder = json.JSONDecoder()
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
# Sentinel in the int64 image-id column for an annotation whose image_id is not a JSON integer.
_NON_INT_ID = INT64_MIN


@dataclasses.dataclass
class CocoIndex:
    """What the converter keeps of a COCO instances file.

    images: the "images" entries in file order (dicts trimmed to IMAGE_KEYS; other values as they are).
    categories: the "categories" value (None when absent); other_keys: names of the other top-level keys.
    annotation_image_ids: int64 [A] image_id of each well-formed annotation (_NON_INT_ID when it is not
      an integer; then non_int_image_ids[i] holds it); annotation_offsets int64 [A] and
      annotation_lengths int64 [A]: its bytes in the file; used_category_ids: every category_id seen.
    num_malformed_annotations: annotations that are not objects or have no image_id;
      malformed_annotations: repr()[:200] of the first MAX_KEPT_REPRS of them.
    annotations_present: the file has an "annotations" key; annotations_is_list: and it is a list.
    """

    images: List[Any]
    categories: Any
    annotation_image_ids: np.ndarray
    annotation_offsets: np.ndarray
    annotation_lengths: np.ndarray
    non_int_image_ids: Dict[int, Any]
    used_category_ids: set
    num_malformed_annotations: int
    malformed_annotations: List[str]
    annotations_present: bool
    annotations_is_list: bool
    has_images_list: bool
    has_categories_list: bool


class _Stream:
    """Characters of a UTF-8 file, read in chunks, with the byte offset of any character position."""

    def __init__(self, f, chunk_bytes: int):
        self._file, self._chunk_bytes = f, chunk_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")()
        self.text = ""  # buffered characters; position 0 is byte self._base of the file
        self._base = 0
        self._cursor_char = self._cursor_byte = 0  # a known (char, byte) pair for non-ASCII buffers
        self.eof = False
        head = f.read(len(_UTF8_BOM))
        if head == _UTF8_BOM:
            self._base = len(_UTF8_BOM)
        else:
            self._feed(head)
        if head[:1] == b"\x00" or head[1:2] == b"\x00":
            raise ValueError("not UTF-8 (UTF-16/32 JSON is not supported; re-save it as UTF-8)")

    def _feed(self, data: bytes) -> None:
        self.text += self._utf8.decode(data, final=not data)

    def more(self) -> bool:
        """Appends one chunk; False at the end of the file."""
        if self.eof:
            return False
        data = self._file.read(self._chunk_bytes)
        self.eof = not data
        self._feed(data)
        return not self.eof

    def drop(self, pos: int) -> int:
        """Forgets the characters before pos; returns the new index of pos (0)."""
        self._base = self.byte_offset(pos)
        self.text = self.text[pos:]
        self._cursor_char = self._cursor_byte = 0
        return 0

    def byte_offset(self, pos: int) -> int:
        if self.text.isascii():  # O(1) in CPython: one byte per character
            return self._base + pos
        if pos < self._cursor_char:
            self._cursor_char = self._cursor_byte = 0
        self._cursor_byte += len(self.text[self._cursor_char:pos].encode("utf-8"))
        self._cursor_char = pos
        return self._base + self._cursor_byte

    def skip_ws(self, pos: int) -> int:
        while True:
            pos = _WHITESPACE.match(self.text, pos).end()
            if pos < len(self.text) or not self.more():
                return pos

    def peek(self, pos: int) -> str:
        pos = self.skip_ws(pos)
        return self.text[pos:pos + 1]

    def expect(self, pos: int, chars: str) -> int:
        """Skips whitespace, checks that the next character is one of chars; returns its position."""
        pos = self.skip_ws(pos)
        if self.text[pos:pos + 1] not in tuple(chars):
            found = repr(self.text[pos:pos + 1]) if pos < len(self.text) else "end of file"
            raise ValueError(f"expected {' or '.join(repr(c) for c in chars)} at byte {self.byte_offset(pos)}, "
                             f"found {found}")
        return pos

    def value(self, pos: int):
        """Parses one JSON value at pos (after whitespace) -> (value, start, end), reading more as needed."""
        pos = self.skip_ws(pos)
        while True:
            try:
                value, end = _decoder.raw_decode(self.text, pos)
            except json.JSONDecodeError as e:
                if self.more():  # the value may continue in the next chunk
                    continue
                raise ValueError(f"{e.msg} at byte {self.byte_offset(e.pos)}") from None
            # A number at the end of the buffer may continue in the next chunk.
            if end == len(self.text) and not self.eof and self.more():
                continue
            return value, pos, end


def _trim_image(entry):
    return {k: entry[k] for k in IMAGE_KEYS if k in entry} if isinstance(entry, dict) else entry


def index_coco_json(path: str, chunk_bytes: int = CHUNK_BYTES) -> CocoIndex:
    """Streams a COCO instances JSON into a CocoIndex (module docstring). ValueError for invalid JSON
    (json's message), a top level that is not an object, or a non-UTF-8 file."""
    images: List[Any] = []
    ids, offsets, lengths = array.array("q"), array.array("q"), array.array("q")
    non_int: Dict[int, Any] = {}
    used, malformed = set(), [0, []]
    categories = None
    seen = {"annotations": False, "annotations_list": False, "images_list": False, "categories_list": False}

    def on_annotation(ann, start, end):
        if isinstance(ann, dict):
            try:
                used.add(ann.get("category_id"))
            except TypeError:  # an unhashable category_id (a list): not a usable id anyway
                pass
        if not isinstance(ann, dict) or "image_id" not in ann:
            malformed[0] += 1
            if len(malformed[1]) < MAX_KEPT_REPRS:
                malformed[1].append(repr(ann)[:200])
            return
        image_id = ann["image_id"]
        if type(image_id) is int and INT64_MIN < image_id <= INT64_MAX:
            ids.append(image_id)
        else:
            non_int[len(ids)] = image_id
            ids.append(_NON_INT_ID)
        offsets.append(stream.byte_offset(start))
        lengths.append(stream.byte_offset(end) - offsets[-1])

    with open(path, "rb") as f:
        stream = _Stream(f, chunk_bytes)
        pos = stream.skip_ws(0)
        if stream.text[pos:pos + 1] != "{":
            stream.value(pos)  # invalid JSON: json's own message
            raise TopLevelNotObject()
        pos = stream.skip_ws(pos + 1)
        if stream.text[pos:pos + 1] == "}":
            pos += 1
        else:
            while True:
                key, _, pos = stream.value(pos)
                if not isinstance(key, str):
                    raise ValueError(f"object key is not a string at byte {stream.byte_offset(pos)}")
                pos = stream.expect(pos, ":") + 1
                if key in ("images", "annotations") and stream.peek(pos) == "[":
                    if key == "images":
                        images = []
                        seen["images_list"] = True
                    else:
                        ids, offsets, lengths = array.array("q"), array.array("q"), array.array("q")
                        non_int, malformed = {}, [0, []]
                        seen["annotations"] = seen["annotations_list"] = True
                    pos = stream.expect(pos, "[") + 1
                    if stream.peek(pos) == "]":
                        pos = stream.expect(pos, "]") + 1
                    else:
                        while True:
                            element, start, pos = stream.value(pos)
                            if key == "images":
                                images.append(_trim_image(element))
                            else:
                                on_annotation(element, start, pos)
                            pos = stream.expect(pos, ",]")
                            closing = stream.text[pos] == "]"
                            pos += 1
                            if pos > chunk_bytes:  # keep the buffer about one chunk long
                                pos = stream.drop(pos)
                            if closing:
                                break
                else:
                    value, _, pos = stream.value(pos)
                    if key == "images":
                        images, seen["images_list"] = value, isinstance(value, list)
                    elif key == "categories":
                        categories, seen["categories_list"] = value, isinstance(value, list)
                    elif key == "annotations":
                        seen["annotations"], seen["annotations_list"] = True, isinstance(value, list)
                pos = stream.expect(pos, ",}")
                closing = stream.text[pos] == "}"
                pos += 1
                if closing:
                    break
        pos = stream.skip_ws(pos)
        if pos < len(stream.text):
            raise ValueError(f"extra data after the top-level object at byte {stream.byte_offset(pos)}")
    return CocoIndex(
        images=images if seen["images_list"] else None, categories=categories,
        annotation_image_ids=np.frombuffer(ids, np.int64) if len(ids) else np.zeros([0], np.int64),
        annotation_offsets=np.frombuffer(offsets, np.int64) if len(offsets) else np.zeros([0], np.int64),
        annotation_lengths=np.frombuffer(lengths, np.int64) if len(lengths) else np.zeros([0], np.int64),
        non_int_image_ids=non_int, used_category_ids=used, num_malformed_annotations=malformed[0],
        malformed_annotations=malformed[1],
        annotations_present=seen["annotations"], annotations_is_list=seen["annotations_list"],
        has_images_list=seen["images_list"], has_categories_list=seen["categories_list"])


class TopLevelNotObject(ValueError):
    def __init__(self):
        super().__init__("top level is not a JSON object")


def read_annotations(path: str, offsets: Sequence[int], lengths: Sequence[int]) -> List[Any]:
    """Parses the annotations stored at the given byte spans of path (CocoIndex offsets/lengths)."""
    if not len(offsets):
        return []
    fd = os.open(path, os.O_RDONLY)
    try:
        return [json.loads(os.pread(fd, int(n), int(o))) for o, n in zip(offsets, lengths)]
    finally:
        os.close(fd)
