"""Batched greedy non-maximum suppression with static output shapes, XLA compilable.

Textbook greedy NMS per image: visit boxes by descending score; keep a box unless a box kept before it
has IoU > iou_threshold with it (strictly greater, as torchvision / NonMaxSuppressionV3); stop at
max_output_size kept boxes.

Why not `tf.image.non_max_suppression_padded`: its batched path suppresses at IoU >= threshold, guesses
the coordinate order from the first box of the batch (a -1 padding row there flips every box), and
counts a box as selected only if one of its coordinates is > 0 (boxes touching the top-left corner
with non-positive coordinates vanish). `combined_non_max_suppression` has no XLA kernel. So this module
implements the tile-based scheme (as TF's padded NMS / Model Garden) with textbook semantics:
- boxes are sorted once by score (`top_k` over all N: ties go to the lower index) and processed in
  tiles of `TILE_SIZE` inside a `tf.while_loop` that stops when every image has max_output_size boxes;
- a tile is first suppressed by the boxes kept so far, held in a fixed [B, K, 4] buffer (cost per tile
  K x T IoUs, independent of N, so ~10k RPN candidates stay cheap). A tile's kept boxes enter the
  buffer by a gather (slot k <- the tile's (k - num_kept)-th kept box, found with top_k over the
  kept positions) and a select, not a one-hot matmul / einsum: a copy is exact whatever the
  accelerator's matmul precision (TF32 on Ampere+ GPUs keeps a 10-bit mantissa, a TPU's default
  float32 matmul one bfloat16 pass; on boxes shifted per class by up to ~80 x 1k px that is an
  error of tens to hundreds of pixels, which would change what is suppressed), and a NaN / inf of
  a dropped box is never read into the buffer;
- within the tile, greedy suppression is the unique fixed point of "keep i unless a kept j < i
  overlaps it"; iterating that map from "all alive" fixes at least one more box per step in order, so
  it converges to exactly the greedy result, usually in a few steps (the length of the longest chain).

Decisions beyond docs/design.md:
- Only candidates take part: valid boxes (y2 > y1 and x2 > x1, so -1 padding and degenerate boxes are
  dropped) with score > score_threshold (strictly, as TF's NMS ops).
- Output: indices into N sorted by descending score; padding slots hold index 0 and are beyond
  num_valid. Class-aware NMS is the caller's job (offset boxes per class, as detectron2's batched_nms).
- N must be static; IoU is computed in float32.
"""

import math

import tensorflow as tf

from maskrcnn_tf.ops import boxes as box_ops

# Boxes suppressed in parallel per loop step: large enough to amortise the loop overhead, small enough
# that the [B, T, T] self-suppression IoU stays small.
TILE_SIZE = 512


def _self_suppression(tile_boxes, alive, iou_threshold):
    """Greedy NMS inside one score-sorted tile.

    Args:
      tile_boxes: float32 [B, T, 4] sorted by descending score.
      alive: bool [B, T], candidates not suppressed by earlier tiles.
      iou_threshold: python float.
    Returns:
      bool [B, T], the boxes greedy NMS keeps.
    """
    tile = tile_boxes.shape[1]
    order = tf.range(tile)
    earlier = order[:, tf.newaxis] < order[tf.newaxis, :]  # [T, T], entry (j, i): j before i
    overlaps = tf.logical_and(box_ops.pairwise_iou(tile_boxes, tile_boxes) > iou_threshold, earlier)  # [B, T, T]

    def step(kept, _):
        suppressed = tf.reduce_any(tf.logical_and(kept[:, :, tf.newaxis], overlaps), axis=1)  # [B, T]
        new_kept = tf.logical_and(alive, tf.logical_not(suppressed))
        return new_kept, tf.reduce_any(tf.not_equal(new_kept, kept))

    kept, _ = tf.while_loop(lambda _, changed: changed, step, [alive, tf.constant(True)])
    return kept


def _slot_sources(tile_kept, num_kept, max_output_size):
    """For each buffer slot k, the tile position of the box that goes there (if any).

    Args:
      tile_kept: bool [B, T], the tile's kept boxes.
      num_kept: int32 [B], slots already filled.
      max_output_size: python int K.
    Returns:
      int32 [B, K] in [0, T): the position of the tile's (k - num_kept)-th kept box; for slots this
      tile does not fill (see `_appended_slots`) some position, which the caller must not use.
    """
    tile = tile_kept.shape[1]
    # A tile fills at most min(T, K) slots. Kept positions first, in order (distinct keys T..1 by
    # position; dropped boxes have key 0 and come after them).
    fillable = min(tile, max_output_size)
    reversed_position = tf.range(tile, 0, -1)[tf.newaxis, :]  # [1, T]
    _, kept_position = tf.math.top_k(tf.where(tile_kept, reversed_position, 0), k=fillable)  # [B, J]
    rank = tf.range(max_output_size)[tf.newaxis, :] - num_kept[:, tf.newaxis]  # [B, K], rank in the tile
    return tf.gather(kept_position, tf.clip_by_value(rank, 0, fillable - 1), batch_dims=1)  # [B, K]


def _appended_slots(num_kept, num_tile_kept, max_output_size):
    """bool [B, K]: the slots num_kept .. num_kept + num_tile_kept - 1 that a tile fills."""
    slot = tf.range(max_output_size)[tf.newaxis, :]  # [1, K]
    return (slot >= num_kept[:, tf.newaxis]) & (slot < (num_kept + num_tile_kept)[:, tf.newaxis])


def batched_nms(boxes, scores, max_output_size, iou_threshold, score_threshold=float("-inf")):
    """Greedy NMS of every image of a batch, padded to a fixed number of outputs.

    Args:
      boxes: float [B, N, 4] `[y1, x1, y2, x2]` (N static); invalid boxes are never kept.
      scores: float [B, N].
      max_output_size: python int K, output slots per image.
      iou_threshold: python float, a box is suppressed by a kept box with IoU > iou_threshold.
      score_threshold: python float, only boxes with score > score_threshold are considered.
    Returns:
      indices: int32 [B, K] into N, kept boxes by descending score; slots >= num_valid hold 0.
      num_valid: int32 [B], number of kept boxes (<= K).
    """
    boxes = tf.cast(boxes, tf.float32)
    scores = tf.cast(scores, tf.float32)
    num_boxes = boxes.shape[1]
    if num_boxes is None:
        raise ValueError("batched_nms needs a static number of boxes (boxes.shape[1])")
    max_output_size = int(max_output_size)
    batch_size = tf.shape(boxes)[0]

    # Pad the box axis to whole tiles, and to at least K so that the final top_k always has K entries.
    tile = min(TILE_SIZE, max(num_boxes, max_output_size))
    num_tiles = math.ceil(max(num_boxes, max_output_size) / tile)
    num_padded = num_tiles * tile
    padding = num_padded - num_boxes
    candidate = tf.logical_and(box_ops.is_valid_box(boxes), scores > score_threshold)  # [B, N]
    sort_key = tf.where(candidate, scores, float("-inf"))
    sort_key = tf.pad(sort_key, [[0, 0], [0, padding]], constant_values=float("-inf"))  # [B, Np]
    _, order = tf.math.top_k(sort_key, k=num_padded)  # [B, Np], descending, ties -> lower index
    padded_boxes = tf.pad(boxes, [[0, 0], [0, padding], [0, 0]])  # [B, Np, 4]
    padded_candidate = tf.pad(candidate, [[0, 0], [0, padding]])  # [B, Np]
    tiled_boxes = tf.reshape(
        tf.gather(padded_boxes, order, batch_dims=1), [batch_size, num_tiles, tile, 4]
    )  # [B, num_tiles, T, 4]
    tiled_candidate = tf.reshape(
        tf.gather(padded_candidate, order, batch_dims=1), [batch_size, num_tiles, tile]
    )  # [B, num_tiles, T]

    def cond(tile_index, _kept, _kept_boxes, num_kept):
        return tf.logical_and(tile_index < num_tiles, tf.reduce_min(num_kept) < max_output_size)

    def body(tile_index, kept, kept_boxes, num_kept):
        tile_boxes = tf.gather(tiled_boxes, tile_index, axis=1)  # [B, T, 4]
        alive = tf.gather(tiled_candidate, tile_index, axis=1)  # [B, T]
        # Suppression by boxes kept in earlier tiles (empty buffer slots are zero boxes: IoU 0).
        cross_iou = box_ops.pairwise_iou(kept_boxes, tile_boxes)  # [B, K, T]
        alive = tf.logical_and(alive, tf.logical_not(tf.reduce_any(cross_iou > iou_threshold, axis=1)))
        tile_kept = _self_suppression(tile_boxes, alive, iou_threshold)  # [B, T]
        # Append the tile's kept boxes to the buffer, slots num_kept, num_kept + 1, ...; slots past K
        # fall off. A gather and a select (copies), never arithmetic on the boxes.
        tile_kept_int = tf.cast(tile_kept, tf.int32)
        num_tile_kept = tf.reduce_sum(tile_kept_int, axis=1)  # [B]
        kept_boxes = tf.where(
            _appended_slots(num_kept, num_tile_kept, max_output_size)[:, :, tf.newaxis],
            tf.gather(tile_boxes, _slot_sources(tile_kept, num_kept, max_output_size), batch_dims=1),
            kept_boxes,
        )  # [B, K, 4]
        is_this_tile = tf.equal(tf.range(num_tiles), tile_index)[tf.newaxis, :, tf.newaxis]  # [1, num_tiles, 1]
        kept = tf.logical_or(kept, tf.logical_and(is_this_tile, tile_kept[:, tf.newaxis, :]))  # [B, num_tiles, T]
        return tile_index + 1, kept, kept_boxes, num_kept + num_tile_kept

    initial = (
        tf.constant(0),
        tf.zeros([batch_size, num_tiles, tile], tf.bool),
        tf.zeros([batch_size, max_output_size, 4], tf.float32),
        tf.zeros([batch_size], tf.int32),
    )
    _, kept, _, _ = tf.while_loop(cond, body, initial)
    kept = tf.reshape(kept, [batch_size, num_padded])  # [B, Np], in sorted order

    # First K kept positions in sorted order: key = reversed position for kept boxes, 0 otherwise.
    position_key = tf.range(num_padded, 0, -1)[tf.newaxis, :]  # [1, Np]
    slot_key, position = tf.math.top_k(tf.where(kept, position_key, 0), k=max_output_size)  # [B, K]
    valid = slot_key > 0
    indices = tf.gather(order, position, batch_dims=1)  # [B, K]
    indices = tf.where(valid, indices, tf.zeros_like(indices))
    num_valid = tf.reduce_sum(tf.cast(valid, tf.int32), axis=1)  # [B]
    return indices, num_valid
