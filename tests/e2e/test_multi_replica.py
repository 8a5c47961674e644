"""Several replicas on the 2 logical CPUs of tests/conftest.py, as 8 GPUs or a TPU would run the step:
clipping after the cross-replica sum, different RoI samples per replica, and logged losses that are the
global batch's on every replica. Mirrored + jit_compile and a float16 overflow on one replica are
benchmarks/device_check.py's checks, run on CPU replicas by tests/test_device_check.py."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.model import LOSS_NAMES, _sum_over_replicas, build_model
from maskrcnn_tf.optimizer import build_optimizer
from tests.conftest import two_replica_strategy
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config
from tests.e2e.test_model import exhaustive_sampling_config


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def _per_replica_batches(strategy, data):
    """A distributed batch giving replica r image r of `data` (numpy dict with 2 images)."""
    def value_fn(context):
        r = context.replica_id_in_sync_group
        return {k: tf.constant(v[r:r + 1]) for k, v in data.items()}
    return strategy.experimental_distribute_values_from_function(value_fn)


def _local(strategy, value):
    return [np.asarray(v) for v in strategy.experimental_local_results(value)]


def test_clipping_sees_the_summed_unscaled_gradient():
    # Each replica's own gradient is below the clip norm, the sum over replicas is above it: clipping
    # after the sum scales the applied update to exactly clip_norm (SGD, lr 1, no momentum or decay:
    # the update is the clipped gradient). Clipping each replica before the sum would move 2x as far.
    strategy = two_replica_strategy()
    with strategy.scope():
        cfg = tiny_test_config(**{"train.clip_grad_norm": 1.0, "train.momentum": 0.0, "train.weight_decay": 0.0,
                                  "train.warmup_steps": 0, "train.base_learning_rate": 1.0,
                                  "data.train_batch_size": 1})
        variable = keras.Variable(np.zeros([2], np.float32))
        optimizer = build_optimizer(cfg, keras.Sequential([]))
        optimizer.build([variable])
    rate = float(np.asarray(optimizer.learning_rate))

    @tf.function
    def step():
        def replica_step():
            gradient = tf.constant([0.6, 0.0])  # norm 0.6 per replica, 1.2 summed
            optimizer.apply_gradients([(_sum_over_replicas([gradient])[0], variable)])
        strategy.run(replica_step)

    step()
    np.testing.assert_allclose(variable.numpy(), [-1.0 * rate, 0.0], rtol=1e-6)


def test_replicas_draw_different_samples_reproducibly():
    # Before: without train.seed the samplers used TF's stateful RNG, which a TPU's cores may share.
    strategy = two_replica_strategy()
    for seed in (None, 3):
        cfg = tiny_test_config(**{"train.seed": seed})
        with strategy.scope():
            model = build_model(cfg)
        assert model.sampling_seed is not None  # drawn when train.seed is unset
        data, _ = make_batch(cfg, TWO_IMAGES)
        boxes = tf.constant(data["gt_boxes"][:1])
        classes = tf.constant(data["gt_classes"][:1])
        # Many near-duplicates of the gt boxes: the sampler must choose among them at random.
        rng = np.random.default_rng(0)
        proposals = np.repeat(data["gt_boxes"][:1, :2], 40, axis=1) + rng.uniform(-3, 3, (1, 80, 4))
        proposals = tf.constant(proposals.astype(np.float32))
        valid = tf.ones([1, 80], tf.bool)

        @tf.function
        def sample():
            def fn():
                _, roi_seed = model._sampling_seeds()
                return model.roi_sampler(proposals, valid, boxes, classes, seed=roi_seed)["rois"]
            return strategy.run(fn)

        first = _local(strategy, sample())
        assert not np.array_equal(first[0], first[1]), f"replicas drew the same RoIs (train.seed={seed})"
        again = _local(strategy, sample())  # same step, same seed: the same draw
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


def test_logged_losses_are_the_global_batch_losses_on_every_replica():
    # Each replica computes its share of the global loss. Before, each reported its share x replicas, so a
    # TPUStrategy (Keras reports the first replica) logged replica 0's images only, and the NaN check saw
    # only them. Now every replica reports the sum of the shares: the one-device loss of both images.
    strategy = two_replica_strategy()
    cfg = exhaustive_sampling_config(**{"data.train_batch_size": 2, "train.seed": 0})
    data, _ = make_batch(cfg, TWO_IMAGES)
    single = build_model(cfg)
    initial = single.get_weights()
    expected = {k: float(v) for k, v in single.compute_losses({k: tf.constant(v) for k, v in data.items()}).items()}
    with strategy.scope():
        model = build_model(cfg)
        model.set_weights(initial)
    outputs = tf.function(lambda batch: strategy.run(model.test_step, args=(batch,)))(
        _per_replica_batches(strategy, data))
    for name in LOSS_NAMES:
        per_replica = [float(v) for v in _local(strategy, outputs[name])]
        assert per_replica[0] == pytest.approx(per_replica[1], rel=1e-6), name
        assert per_replica[0] == pytest.approx(expected[name], rel=1e-4, abs=1e-6), name
