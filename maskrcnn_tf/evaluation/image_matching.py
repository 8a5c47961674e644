"""Which annotation-JSON image each evaluation record is: by id AND file name, or by file name alone.

`match_images(record_ids, record_names, json_images, match_by)` is pure Python (unit-tested without
TensorFlow); `read_record_names(pattern)` scans the records for it, parsing only image/source_id and
image/filename (no image is decoded). evaluation/run.py calls both before any inference.

Why: records and a COCO JSON can agree on ids and still describe different images. TXT records are
numbered by line (1..N) while a Roboflow export of the same images numbers them 0..N-1; a training JSON
given for validation records shares ids 1..N with them. Matching by id alone then scores every image
against another image's ground truth and exits 0.

Decisions:
- `id_and_file_name` (default): a record matches the JSON image with its id whose `file_name` has the
  same basename as the record's image/filename (basename: the part after the last "/" or "\\", so a
  TXT record "sub/a.jpg" matches a JSON "a.jpg"; case counts). Any disagreement is a ValueError: the
  first mismatching record (smallest id), both names, and how many records disagree. When the file
  names alone match the records one to one, the message says so and names `--match_by=file_name`.
- `file_name`: each record is mapped to the JSON image whose `file_name` has its basename; where the
  JSON has that basename several times, the record's full stored name must equal one of them. The
  result maps record ids to the JSON's ids, and evaluation writes detections with the JSON's ids
  (exports from Roboflow, CVAT or Label Studio renumber images). A record with no JSON image, with
  several, or two records on one JSON image is an error as above.
- Missing names: a record without a stored file name (image/filename is optional in the TFRecord
  format) or a JSON image without `file_name` cannot be checked by name. Under `id_and_file_name` such
  pairs are matched by id alone and the result carries a one-line warning with the counts (nothing is
  silently unchecked; every other pair is still checked); under `file_name` they are an error.
- Two records with the same image id are an error in both modes (the image would count twice, and a
  batch's source_id could not say which record it is).
"""

from __future__ import annotations

import collections
import dataclasses
import posixpath
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ID_AND_FILE_NAME = "id_and_file_name"
FILE_NAME = "file_name"
MATCH_BY = (ID_AND_FILE_NAME, FILE_NAME)
# Names of the JSON images listed in a mismatch message at most (plus "...").
_SHOWN = 3
# Records parsed at once by read_record_names.
_SCAN_BATCH = 256


def basename(name: str) -> str:
    """The part of a stored file name after its last '/' or '\\' (records may come from Windows)."""
    return name.replace("\\", "/").rsplit("/", 1)[-1]


def _normalized(name: str) -> str:
    return posixpath.normpath(name.replace("\\", "/"))


@dataclasses.dataclass(frozen=True)
class ImageMatch:
    """The JSON image id of every record id.

    Attributes:
      match_by: "id_and_file_name" or "file_name".
      json_id_of: {record image id: JSON image id} for every record (the identity unless by file name).
      notes: one-line remarks for the log (unchecked names, how many ids were renumbered).
    """
    match_by: str
    json_id_of: Dict[int, int]
    notes: Tuple[str, ...] = ()

    @property
    def json_ids(self) -> List[int]:
        """Sorted JSON image ids of the records."""
        return sorted(self.json_id_of.values())

    @property
    def renumbered(self) -> int:
        """How many records have another id in the JSON."""
        return sum(r != j for r, j in self.json_id_of.items())

    def to_json_ids(self, record_ids: np.ndarray) -> np.ndarray:
        """int64 array of the same shape: each record id replaced by its JSON id.

        Raises ValueError for an id that was not among the scanned records."""
        record_ids = np.asarray(record_ids, np.int64)
        try:
            return np.array([self.json_id_of[int(i)] for i in record_ids.ravel()], np.int64).reshape(
                record_ids.shape)
        except KeyError as e:
            raise ValueError(f"record image id {e.args[0]} was not in the records scanned before "
                             "evaluation (did the files change?)") from None


def _describe(name: Optional[str]) -> str:
    return repr(name) if name else "(no file name)"


def _image_name(image: dict) -> Optional[str]:
    name = image.get("file_name")
    return name if isinstance(name, str) and name else None


def _duplicate_ids(record_ids: Sequence[int], record_names: Sequence[str]) -> None:
    names_of = collections.defaultdict(list)
    for i, name in zip(record_ids, record_names):
        names_of[i].append(name)
    repeated = sorted(i for i, names in names_of.items() if len(names) > 1)
    if repeated:
        first = repeated[0]
        names = ", ".join(_describe(n) for n in names_of[first][:_SHOWN])
        raise ValueError(f"the records hold image id {first} {len(names_of[first])} times ({names}); "
                         f"{len(repeated)} id(s) repeat. Each image must be one record with its own id (does "
                         "the file pattern mix two conversions, e.g. two TXT lists both numbered from line 1?)")


def _by_file_name(record_ids, record_names, json_images) -> Tuple[Dict[int, int], List[Tuple[int, str]]]:
    """Maps records to JSON ids by file name -> (mapping of the records that matched, [(record id, why
    it did not match)] sorted by record id)."""
    by_base = collections.defaultdict(list)
    for image in json_images:
        name = _image_name(image)
        if name is not None:
            by_base[basename(name)].append(image)
    mapping, problems, taken = {}, [], {}
    for rid, rname in sorted(zip(record_ids, record_names)):
        if not rname:
            problems.append((rid, f"record image id {rid} has no stored file name (image/filename is empty), "
                                  "so it cannot be matched by file name"))
            continue
        candidates = by_base.get(basename(rname), [])
        if len(candidates) > 1:
            candidates = [c for c in candidates if _normalized(c["file_name"]) == _normalized(rname)] or candidates
        if not candidates:
            problems.append((rid, f"record image id {rid} is {rname!r}, and no image of the JSON has the file "
                                  f"name {basename(rname)!r}"))
        elif len(candidates) > 1:
            shown = ", ".join(f"{c['file_name']!r} (id {c['id']})" for c in candidates[:_SHOWN])
            problems.append((rid, f"record image id {rid} is {rname!r}, and the JSON has {len(candidates)} "
                                  f"images of that name: {shown}"))
        else:
            json_id = int(candidates[0]["id"])
            if json_id in taken:
                problems.append((rid, f"records {taken[json_id]} and {rid} are both {basename(rname)!r}, "
                                      f"the JSON's image {json_id}"))
            else:
                taken[json_id] = rid
                mapping[rid] = json_id
    return mapping, problems


def match_images(record_ids: Sequence[int], record_names: Sequence[str], json_images: Sequence[dict],
                 match_by: str = ID_AND_FILE_NAME) -> ImageMatch:
    """Matches evaluation records to the images of a COCO JSON.

    Args:
      record_ids: image/source_id of every record (ints).
      record_names: image/filename of every record, in the same order ("" when the record has none).
      json_images: the JSON's "images" entries (dicts with "id" and, normally, "file_name").
      match_by: "id_and_file_name" (ids must agree and so must the names' basenames) or "file_name" (the
        JSON's id is taken from the image of the same file name).
    Returns:
      An ImageMatch: every record id -> its JSON image id.
    Raises:
      ValueError: one line naming the first mismatching record (smallest id), both names and how many
        records disagree (and `--match_by=file_name` where that would match them); repeated record ids;
        an unknown match_by.
    """
    if match_by not in MATCH_BY:
        raise ValueError(f"match_by must be one of {', '.join(MATCH_BY)}; got {match_by!r}")
    record_ids = [int(i) for i in record_ids]
    record_names = [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n or "") for n in record_names]
    if len(record_ids) != len(record_names):
        raise ValueError(f"{len(record_ids)} record ids but {len(record_names)} record names")
    _duplicate_ids(record_ids, record_names)
    total = len(record_ids)

    if match_by == FILE_NAME:
        mapping, problems = _by_file_name(record_ids, record_names, json_images)
        if problems:
            raise ValueError(f"matching by file name: {problems[0][1]} ({len(problems)} of {total} records "
                             "cannot be matched by file name)")
        renumbered = sum(r != j for r, j in mapping.items())
        notes = (f"matched {total} records to the val JSON by file name; {renumbered} of them have another "
                 "id there (results are written with the JSON's ids)",)
        return ImageMatch(FILE_NAME, mapping, notes)

    by_id = {}
    for image in json_images:
        by_id.setdefault(int(image["id"]), image)
    mismatches, unnamed_records, unnamed_json = [], 0, 0
    for rid, rname in sorted(zip(record_ids, record_names)):
        image = by_id.get(rid)
        if image is None:
            mismatches.append(f"record image id {rid} ({_describe(rname)}) is not in the annotation file")
            continue
        jname = _image_name(image)
        if not rname or jname is None:
            unnamed_records += not rname
            unnamed_json += jname is None
            continue
        if basename(rname) != basename(jname):
            mismatches.append(f"record image id {rid} is {rname!r} but the JSON's image {rid} is {jname!r}")
    if mismatches:
        message = f"{mismatches[0]} ({len(mismatches)} of {total} records disagree in id or file name)"
        mapping, problems = _by_file_name(record_ids, record_names, json_images)
        if not problems:
            renumbered = sum(r != j for r, j in mapping.items())
            message += (f"; the file names match the JSON's one to one under other ids ({renumbered} renumbered: "
                        "Roboflow/CVAT/Label Studio exports, TXT line numbers): rerun with --match_by=file_name")
        else:
            message += "; is this the annotation file of these images (the right split)?"
        raise ValueError(message)
    notes = ()
    if unnamed_records or unnamed_json:
        parts = ([f"{unnamed_records} records have no stored file name"] if unnamed_records else []) + \
                ([f"{unnamed_json} of their JSON images have no file_name"] if unnamed_json else [])
        notes = (f"WARNING: {' and '.join(parts)}: those images are matched by id only, their file names "
                 "unchecked",)
    return ImageMatch(ID_AND_FILE_NAME, {i: i for i in record_ids}, notes)


def read_record_names(eval_file_pattern) -> Tuple[np.ndarray, List[str]]:
    """(int64 [num_records] image/source_id, [image/filename]) of every record; only those two features
    are parsed, no image is decoded (the files are still read once).

    Raises ValueError when no file matches, the files hold no record, or a source_id is not an integer.
    """
    import tensorflow as tf

    from maskrcnn_tf.data import pipeline, schema

    pipeline.count_records(eval_file_pattern)  # ValueError naming the pattern when nothing matches
    patterns = [eval_file_pattern] if isinstance(eval_file_pattern, str) else list(eval_file_pattern)
    files = sorted({f for p in patterns for f in tf.io.gfile.glob(p)})
    features = {schema.SOURCE_ID: tf.io.FixedLenFeature([], tf.string, default_value=""),
                schema.FILENAME: tf.io.FixedLenFeature([], tf.string, default_value="")}
    dataset = (tf.data.TFRecordDataset(files, num_parallel_reads=tf.data.AUTOTUNE)
               .batch(_SCAN_BATCH)
               .map(lambda serialized: tf.io.parse_example(serialized, features)))
    ids, names = [], []
    for chunk in dataset.as_numpy_iterator():
        ids.extend(i.decode() for i in chunk[schema.SOURCE_ID])
        names.extend(n.decode("utf-8", "replace") for n in chunk[schema.FILENAME])
    if not ids:
        raise ValueError(f"eval data: the files matching {eval_file_pattern!r} hold no records")
    bad = [i for i in ids if not i.lstrip("-").isdigit()]
    if bad:
        raise ValueError(f"eval data: image/source_id must be the integer COCO image id; got {bad[:3]} in "
                         f"{eval_file_pattern!r}")
    return np.array([int(i) for i in ids], np.int64), names
