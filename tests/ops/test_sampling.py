"""Tests of maskrcnn_tf.ops.sampling: counts, validity, randomness, static shapes and XLA."""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.ops.sampling import balanced_sample, balanced_sample_mask, sampling_seed


def _labels(num_pos, num_neg, num_ignore, batch=1, seed=0):
    """[batch, M] int32 labels with the given counts per image, shuffled."""
    rng = np.random.default_rng(seed)
    row = np.array([1] * num_pos + [0] * num_neg + [-1] * num_ignore, np.int32)
    return np.stack([rng.permutation(row) for _ in range(batch)])


def _check_consistent(labels, indices, is_positive, is_valid):
    """Invariants any correct sample satisfies; returns (#positives, #negatives) per image."""
    counts = []
    for b in range(labels.shape[0]):
        picked = indices[b][is_valid[b]]
        assert len(np.unique(picked)) == len(picked)  # no row twice
        np.testing.assert_array_equal(labels[b][picked], np.where(is_positive[b][is_valid[b]], 1, 0))
        assert not np.any(is_positive[b] & ~is_valid[b])
        assert np.all((indices[b] >= 0) & (indices[b] < labels.shape[1]))
        counts.append((int(is_positive[b].sum()), int((is_valid[b] & ~is_positive[b]).sum())))
    return counts


def _sample(labels, num_samples, fraction, seed):
    outputs = balanced_sample(tf.constant(labels), num_samples, fraction, seed=seed)
    assert [o.shape.as_list() for o in outputs] == [[labels.shape[0], num_samples]] * 3
    assert outputs[0].dtype == tf.int32 and outputs[1].dtype == tf.bool and outputs[2].dtype == tf.bool
    return [o.numpy() for o in outputs]


@pytest.mark.parametrize(
    "num_pos, num_neg, num_ignore, num_samples, fraction, expected",
    [
        (100, 300, 50, 64, 0.25, (16, 48)),  # enough of both: 64 * 0.25 = 16 positives
        (100, 300, 50, 64, 0.5, (32, 32)),
        (5, 300, 50, 64, 0.25, (5, 59)),  # few positives: all 5 taken, filled with negatives
        (3, 10, 200, 64, 0.5, (3, 10)),  # few of both: everything usable, 51 invalid slots
        (40, 10, 0, 32, 0.5, (16, 10)),  # few negatives: positives still capped at 16 (detectron2)
        (0, 0, 30, 16, 0.5, (0, 0)),  # only ignore rows: nothing valid
        (4, 6, 10, 64, 0.25, (4, 6)),  # fewer rows (20) than slots (64)
    ],
)
def test_counts(num_pos, num_neg, num_ignore, num_samples, fraction, expected):
    labels = _labels(num_pos, num_neg, num_ignore, batch=2)
    indices, is_positive, is_valid = _sample(labels, num_samples, fraction, seed=7)
    assert _check_consistent(labels, indices, is_positive, is_valid) == [expected, expected]


def test_seeds_give_different_valid_subsets_and_same_seed_repeats():
    labels = _labels(50, 200, 20)
    draws = {seed: _sample(labels, 32, 0.25, seed) for seed in (1, 2)}
    for indices, is_positive, is_valid in draws.values():
        assert _check_consistent(labels, indices, is_positive, is_valid) == [(8, 24)]
    assert set(draws[1][0][0]) != set(draws[2][0][0])
    np.testing.assert_array_equal(_sample(labels, 32, 0.25, 1)[0], draws[1][0])
    np.testing.assert_array_equal(_sample(labels, 32, 0.25, tf.constant([1, 0]))[0], draws[1][0])
    # Without a seed, the stateful generator gives a new subset per call.
    assert set(_sample(labels, 32, 0.25, None)[0][0]) != set(_sample(labels, 32, 0.25, None)[0][0])


def test_selection_is_uniform():
    # 1000 images with the same labels: 20 positives of which 5 are taken per image, so each positive
    # should be picked with probability 5/20 = 0.25 (binomial std sqrt(.25 * .75 / 1000) = 0.014).
    labels = np.tile(_labels(20, 60, 20), [1000, 1])
    indices, is_positive, is_valid = _sample(labels, 20, 0.25, seed=3)
    picked = np.zeros(labels.shape, bool)
    np.put_along_axis(picked, indices, is_positive, axis=1)
    pos_rows = labels[0] == 1
    np.testing.assert_allclose(picked[:, pos_rows].mean(axis=0), 0.25, atol=0.06)


def test_mask_marks_exactly_the_sampled_rows():
    labels = _labels(3, 100, 40, batch=2)
    mask = balanced_sample_mask(tf.constant(labels), 32, 0.5, seed=4).numpy()
    assert mask.shape == labels.shape and mask.dtype == bool
    for b in range(2):
        assert (mask[b] & (labels[b] == 1)).sum() == 3  # all 3 positives
        assert (mask[b] & (labels[b] == 0)).sum() == 29  # filled to 32 with negatives
        assert not np.any(mask[b] & (labels[b] == -1))
    indices, _, is_valid = _sample(labels, 32, 0.5, seed=4)
    expected = np.zeros(labels.shape, bool)
    np.put_along_axis(expected, indices, is_valid, axis=1)
    np.testing.assert_array_equal(mask, expected)  # same rule, same rows


def test_mask_with_invalid_slots_marks_nothing_extra():
    labels = _labels(2, 3, 15, batch=1)  # 5 usable rows, 16 slots: 11 invalid slots point at any row
    mask = balanced_sample_mask(tf.constant(labels), 16, 0.5, seed=5).numpy()
    np.testing.assert_array_equal(mask, labels >= 0)


def test_static_shapes_under_tf_function():
    fn = tf.function(lambda labels: balanced_sample(labels, 24, 0.25, seed=1))
    concrete = fn.get_concrete_function(tf.TensorSpec([None, 300], tf.int32))
    assert [o.shape.as_list() for o in concrete.structured_outputs] == [[None, 24]] * 3
    mask_fn = tf.function(lambda labels: balanced_sample_mask(labels, 24, 0.25))
    mask_concrete = mask_fn.get_concrete_function(tf.TensorSpec([None, 300], tf.int32))
    assert mask_concrete.structured_outputs.shape.as_list() == [None, 300]


def test_runs_under_xla():
    labels = _labels(30, 100, 20, batch=2)

    @tf.function(jit_compile=True)
    def fn(labels):
        # Both random sources in one compiled function: stateful (seed None) and stateless (int seed).
        return [(balanced_sample(labels, 32, 0.25, seed=seed), balanced_sample_mask(labels, 32, 0.25, seed=seed))
                for seed in (None, 11)]

    for (indices, is_positive, is_valid), mask in fn(tf.constant(labels)):
        counts = _check_consistent(labels, indices.numpy(), is_positive.numpy(), is_valid.numpy())
        assert counts == [(8, 24), (8, 24)]
        assert mask.numpy().sum(axis=1).tolist() == [32, 32]
        assert not np.any(mask.numpy() & (labels == -1))


def test_sampling_seed_keys_draws_by_seed_step_and_salt():
    # train.seed's per-step seeds: the same (seed, step, salt) repeats the draw exactly (a resumed run
    # samples what the uninterrupted one did); changing any of them gives another draw.
    labels = tf.constant(_labels(200, 800, 0, batch=2))

    def draw(seed, step, salt):
        return balanced_sample(labels, 64, 0.25, seed=sampling_seed(seed, step, salt))[0].numpy()

    reference = draw(3, 10, 1)
    np.testing.assert_array_equal(reference, draw(3, 10, 1))
    np.testing.assert_array_equal(reference, draw(3, tf.constant(10, tf.int64), 1))  # optimizer.iterations
    for other in (draw(4, 10, 1), draw(3, 11, 1), draw(3, 10, 2)):
        # 16 positives of 200 and 48 negatives of 800: two independent draws share few rows.
        assert len(np.intersect1d(reference[0], other[0])) < 32


def test_sampling_seed_works_under_xla():
    labels = tf.constant(_labels(50, 200, 10, batch=2))
    fn = tf.function(lambda step: balanced_sample(labels, 32, 0.25, seed=sampling_seed(5, step, 0))[0],
                     jit_compile=True)
    np.testing.assert_array_equal(fn(tf.constant(7, tf.int64)).numpy(), fn(tf.constant(7, tf.int64)).numpy())
    assert not np.array_equal(fn(tf.constant(7, tf.int64)).numpy(), fn(tf.constant(8, tf.int64)).numpy())
