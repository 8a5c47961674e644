"""Fixed-count balanced sampling of positive / negative rows (RPN anchors, RoIs).

Rule (detectron2 `subsample_labels`): take min(#positives, int(S * positive_fraction)) positives, fill
the rest of the S slots with negatives up to min(#negatives, S - #taken positives), all chosen uniformly
at random. Rows labelled -1 (ignore) are never taken.

Static shapes (XLA / TPU friendly, no boolean_mask or shuffles of dynamic size): every row gets a
uniform random score; one `top_k` over the positives' scores and one over the negatives' scores give
random candidates in random order, then a `top_k` over a "first usable candidate first" key packs the
first S usable candidates (positives, then negatives) into the S output slots. Slots left over when
there are too few candidates are marked invalid.

Decisions:
- Randomness: `seed=None` uses the stateful `tf.random.uniform` (fresh samples every call, also under
  XLA, where op seeds are ignored anyway). A seed (python int or int [2] tensor, e.g. `sampling_seed`
  of (train.seed, step)) uses `tf.random.stateless_uniform`: reproducible, and identical on every call
  with that seed. Training passes seeds only when train.seed is set (model.py); without it, every run
  samples differently (detectron2 also draws a fresh seed when SEED < 0).
- The labels' row count M must be static (it always is in this package); S is a python int.
- Output slot order: the sampled positives first, then the negatives, then invalid slots.
"""

import tensorflow as tf

# Random scores are in [0, 1); rows that are not candidates get this key and lose every top_k.
_NOT_A_CANDIDATE = -1.0


def _random_scores(shape, seed):
    if seed is None:
        return tf.random.uniform(shape, dtype=tf.float32)
    if isinstance(seed, int):
        seed = (seed, 0)
    return tf.random.stateless_uniform(shape, seed=tf.cast(seed, tf.int64), dtype=tf.float32)


def sampling_seed(seed, step, salt):
    """The stateless seed of one sampler at one training step: int64 [2].

    Args:
      seed: python int, the run's seed (train.seed).
      step: int scalar (python or tensor), the global step.
      salt: int scalar (python or tensor) that tells draws of one step apart (e.g. the replica).
    Different (seed, step, salt) give independent draws (TF's stateless fold-in hashes each input in).
    """
    base = tf.stack([tf.constant(seed, tf.int64), tf.cast(step, tf.int64)])  # [2]
    return tf.random.experimental.stateless_fold_in(base, salt)  # [2]


def balanced_sample(labels, num_samples, positive_fraction, seed=None):
    """Samples a fixed number of rows with at most a given fraction of positives.

    Args:
      labels: int32 [B, M] (1 positive, 0 negative, -1 ignore); M static.
      num_samples: python int S, the number of output slots per image.
      positive_fraction: python float in (0, 1], at most int(S * positive_fraction) positives.
      seed: None (stateful random) or python int / int32 [2] tensor (stateless, reproducible).
    Returns:
      indices: int32 [B, S], rows of `labels`; slots with is_valid False hold an arbitrary row index.
      is_positive: bool [B, S], the slot holds a sampled positive.
      is_valid: bool [B, S], the slot holds a sampled row (positive or negative).
    """
    num_rows = labels.shape[1]
    if num_rows is None:
        raise ValueError("balanced_sample needs a static number of rows (labels.shape[1])")
    max_positives = min(int(num_samples * positive_fraction), num_rows)
    max_negatives = min(num_samples, num_rows)

    scores = _random_scores(tf.shape(labels), seed)  # [B, M]
    not_candidate = tf.fill(tf.shape(scores), _NOT_A_CANDIDATE)
    positive_scores = tf.where(tf.equal(labels, 1), scores, not_candidate)
    negative_scores = tf.where(tf.equal(labels, 0), scores, not_candidate)
    # Random positives / negatives in random order, usable ones first.
    pos_scores, pos_index = tf.math.top_k(positive_scores, k=max_positives)  # [B, P]
    neg_scores, neg_index = tf.math.top_k(negative_scores, k=max_negatives)  # [B, Q]

    candidate_index = tf.concat([pos_index, neg_index], axis=1)  # [B, P + Q]
    candidate_usable = tf.concat([pos_scores >= 0.0, neg_scores >= 0.0], axis=1)  # [B, P + Q]
    candidate_positive = tf.concat(
        [tf.ones_like(pos_index, tf.bool), tf.zeros_like(neg_index, tf.bool)], axis=1
    )  # [B, P + Q]
    num_candidates = max_positives + max_negatives
    if num_candidates < num_samples:  # fewer rows than slots: pad with unusable candidates
        padding = [[0, 0], [0, num_samples - num_candidates]]
        candidate_index = tf.pad(candidate_index, padding)  # [B, S]
        candidate_usable = tf.pad(candidate_usable, padding)  # [B, S]
        candidate_positive = tf.pad(candidate_positive, padding)  # [B, S]
        num_candidates = num_samples

    # Key = reversed position for usable candidates, 0 otherwise: top_k keeps the first S usable
    # candidates in their order, i.e. the taken positives, then negatives up to S in total.
    position_key = tf.cast(tf.range(num_candidates, 0, -1), tf.float32)[tf.newaxis, :]  # [1, P + Q]
    order_key = tf.where(candidate_usable, position_key, tf.zeros_like(position_key))  # [B, P + Q]
    slot_key, slot = tf.math.top_k(order_key, k=num_samples)  # [B, S]
    indices = tf.gather(candidate_index, slot, batch_dims=1)  # [B, S]
    is_valid = slot_key > 0.0
    is_positive = tf.logical_and(tf.gather(candidate_positive, slot, batch_dims=1), is_valid)  # [B, S]
    return indices, is_positive, is_valid


def balanced_sample_mask(labels, num_samples, positive_fraction, seed=None):
    """Boolean mask of the rows `balanced_sample` picks (for the RPN loss over all anchors).

    Args:
      labels: int32 [B, M] (1 positive, 0 negative, -1 ignore); M static.
      num_samples, positive_fraction, seed: as in `balanced_sample`.
    Returns:
      bool [B, M], True for the sampled rows (at most S per image, never a -1 row).
    """
    indices, _, is_valid = balanced_sample(labels, num_samples, positive_fraction, seed)
    return indices_to_mask(indices, is_valid, tf.shape(labels))


def indices_to_mask(indices, is_valid, shape):
    """bool [B, M] mask of the rows that valid slots of `indices` int32 [B, S] name; shape = [B, M]."""
    batch_index = tf.broadcast_to(tf.range(shape[0])[:, tf.newaxis], tf.shape(indices))  # [B, S]
    scatter_index = tf.stack([batch_index, indices], axis=-1)  # [B, S, 2]
    # Invalid slots scatter 0, so they never mark their (arbitrary) row.
    counts = tf.scatter_nd(scatter_index, tf.cast(is_valid, tf.int32), shape)  # [B, M]
    return counts > 0
