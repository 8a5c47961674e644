"""loss.log: one line per logged step in the MindSpore original's format, written by the training
monitor and read back on resume and by tests.

A line: `epoch: 1 step: 7393 ,rpn_loss: 0.10626, rcnn_loss: 0.81592, ...` (the original's spelling,
order and 5 decimals; the epoch is the 1-based epoch the step belongs to).

Each line holds the mean of every loss over its logging interval (the monitor resets the model's loss
trackers at each line).
"""

import re
from typing import Dict, Optional, Tuple

import tensorflow as tf

from maskrcnn_tf import run_dir

# Order and spelling of the MindSpore original's loss.log line.
LOSS_LOG_NAMES = ("rpn_loss", "rcnn_loss", "rpn_cls_loss", "rpn_reg_loss", "rcnn_cls_loss", "rcnn_reg_loss",
                  "rcnn_mask_loss", "total_loss")
_FLOAT = r"(-?(?:\d+\.\d+|nan|inf))"
LOSS_LINE_PATTERN = re.compile(
    r"^epoch: (\d+) step: (\d+) ," + ", ".join(rf"{name}: {_FLOAT}" for name in LOSS_LOG_NAMES) + r"$")

def format_loss_line(epoch: int, step: int, losses: Dict[str, float]) -> str:
    """One loss.log line: `epoch: 1 step: 7393 ,rpn_loss: 0.10626, rcnn_loss: 0.81592, ...` (5 decimals)."""
    return f"epoch: {epoch} step: {step} ," + ", ".join(f"{n}: {losses[n]:.5f}" for n in LOSS_LOG_NAMES)


def parse_loss_line(line: str) -> Optional[Tuple[int, int, Dict[str, float]]]:
    """(epoch, step, {loss name: value}) of a loss.log line, or None when it does not match the format."""
    match = LOSS_LINE_PATTERN.match(line.strip())
    if not match:
        return None
    values = [float(v) for v in match.groups()[2:]]
    return int(match.group(1)), int(match.group(2)), dict(zip(LOSS_LOG_NAMES, values))


def truncate_loss_log(path: str, last_step: int) -> None:
    """Drops loss.log lines of steps after `last_step` (trained by an interrupted run, then lost)."""
    if not tf.io.gfile.exists(path):
        return
    with tf.io.gfile.GFile(path, "r") as f:
        lines = f.readlines()
    kept = [line for line in lines if (parse_loss_line(line) or (0, 0, None))[1] <= last_step]
    if len(kept) != len(lines):
        run_dir.write_text(path, "".join(kept))
