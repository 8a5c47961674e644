"""What a conversion counts and reports: the Stats counters, the summary JSON, and the checks that turn
a conversion which lost (almost) everything into an error or a loud warning.

Decisions:
- Counters have flat keys; per-reason ones are "<group>:<reason>" (images_skipped:missing_image_file,
  instances_dropped:degenerate_box, ...). A few example messages are kept per key, so a bad dataset's
  summary stays readable.
- Zero images written is an error (ConversionError) that names the likely cause; more than
  MISSING_IMAGES_WARNING_SHARE of the images missing is a warning on stderr with the first paths. A
  conversion that writes nothing must not look like a success: training on its empty records could
  only fail later, further from the cause.
"""

import collections
import sys
from typing import Dict, List, Optional, Sequence

MAX_EXAMPLES_PER_REASON = 5  # messages kept per reason in the summary, so a bad dataset stays readable
# Missing images above this share of those considered: warn loudly (a wrong --image_dir, a partial
# download). Below it, the summary's counts are enough.
MISSING_IMAGES_WARNING_SHARE = 0.01
MISSING_REASON = "missing_image_file"


class ConversionError(Exception):
    """An input problem that stops the whole run (missing/unreadable annotation file, bad arguments,
    nothing written)."""


class Stats:
    """Counters (flat keys; "images_skipped:<reason>" style for per-reason ones) and example messages."""

    def __init__(self):
        self.counts = collections.Counter()
        self.examples: Dict[str, List[str]] = {}

    def count(self, key: str, message: Optional[str] = None, n: int = 1):
        self.counts[key] += n
        if message is not None:
            kept = self.examples.setdefault(key, [])
            if len(kept) < MAX_EXAMPLES_PER_REASON:
                kept.append(message)

    def merge(self, other: "Stats"):
        self.counts.update(other.counts)
        for key, messages in other.examples.items():
            kept = self.examples.setdefault(key, [])
            kept.extend(messages[:MAX_EXAMPLES_PER_REASON - len(kept)])

    def by_reason(self, group: str) -> Dict[str, int]:
        return {k.split(":", 1)[1]: v for k, v in sorted(self.counts.items()) if k.startswith(group + ":")}


def make_summary(stats: Stats, finals: List[str], num_inputs: int, seconds: float, **extra) -> Dict:
    """The summary JSON: counts written / skipped by reason / dropped by reason, and a few examples."""
    c = stats.counts
    summary = dict(extra)
    summary.update({
        "images_considered": num_inputs,
        "images_written": c["images_written"],
        "images_skipped": stats.by_reason("images_skipped"),
        "images_size_mismatch": c["images_size_mismatch"],
        "instances_written": c["instances_written"],
        "crowd_instances": c["crowd_instances"],
        "boxes_clipped": c["boxes_clipped"],
        "instances_dropped": stats.by_reason("instances_dropped"),
        # Annotations of images that were not written (missing file, broken image, ...), by that reason.
        "instances_lost_with_skipped_images": stats.by_reason("instances_lost_with_skipped_images"),
        "shards": finals,
        "seconds": round(seconds, 3),
        "images_per_second": round(num_inputs / max(seconds, 1e-9), 2),
        "examples": {k: v for k, v in sorted(stats.examples.items())},
    })
    return summary


def check_images_written(summary: Dict, image_dir: str, listed_paths: Sequence[str], summary_path: str,
                         warn=None) -> None:
    """ConversionError when no image was written, naming the likely cause; a warning (stderr) when more
    than MISSING_IMAGES_WARNING_SHARE of the images considered are missing.

    listed_paths: the first few image paths the annotation file lists (relative to image_dir).
    """
    warn = warn or (lambda line: print(line, file=sys.stderr, flush=True))
    considered, skipped = summary["images_considered"], summary["images_skipped"]
    missing = skipped.get(MISSING_REASON, 0)
    examples = summary.get("examples", {}).get("images_skipped:" + MISSING_REASON, [])
    if summary["images_written"] == 0:
        if considered == 0:
            cause = "the annotation file lists no usable image"
        elif missing == considered:
            cause = (f"--image_dir points at {image_dir} but the annotation file lists files like "
                     f"{', '.join(repr(p) for p in listed_paths[:3])}, and none of them is there")
        elif skipped:
            reason, count = max(skipped.items(), key=lambda item: item[1])
            example = summary.get("examples", {}).get("images_skipped:" + reason, [""])[0]
            cause = f"{count} of {considered} images skipped as {reason}" + (f" (e.g. {example})" if example else "")
        else:
            cause = "no image has an instance left (--skip_empty)"
        raise ConversionError(f"no image written: {cause}; details in {summary_path}")
    if considered and missing > MISSING_IMAGES_WARNING_SHARE * considered:
        lost = summary.get("instances_lost_with_skipped_images", {}).get(MISSING_REASON)
        warn(f"WARNING: {missing} of {considered} images ({100 * missing / considered:.1f}%) are missing under "
             f"{image_dir}" + (f", and their {lost} annotations are lost" if lost is not None else "") +
             f"; first: {'; '.join(examples[:3])}")
