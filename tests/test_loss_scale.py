"""StepCountingLossScaleOptimizer under a forced overflow: the skipped step counts, nothing else moves."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.conftest import two_replica_strategy
from maskrcnn_tf.loss_scale import StepCountingLossScaleOptimizer


@pytest.mark.parametrize("replicas", [1, 2])
def test_overflowing_step_is_skipped_but_counted(replicas):
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:replicas]
    if len(devices) < replicas:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    strategy = tf.distribute.MirroredStrategy(devices) if replicas == 1 else two_replica_strategy()
    with strategy.scope():
        weights = keras.Variable(np.array([1.0, 2.0], np.float32))
        optimizer = StepCountingLossScaleOptimizer(keras.optimizers.SGD(0.5, momentum=0.9), initial_scale=1024.0,
                                                   name="loss_scale_optimizer")
        optimizer.build([weights])

    @tf.function
    def step(scaled_gradient):
        # Each replica sends the same scaled gradient; the optimizer sums them over replicas.
        strategy.run(lambda: optimizer.apply_gradients([(scaled_gradient / replicas, weights)]))

    step(tf.constant([np.inf, 1.0], tf.float32))  # overflow: skipped
    assert int(optimizer.iterations.numpy()) == 1 and int(optimizer.skipped_steps.numpy()) == 1
    np.testing.assert_array_equal(weights.numpy(), [1.0, 2.0])  # untouched, momentum too
    assert float(optimizer.dynamic_scale.numpy()) == 512.0  # Keras' rule: halve the scale
    step(tf.constant([512.0, 1024.0], tf.float32))  # unscaled gradient (1, 2) at the new scale
    assert int(optimizer.iterations.numpy()) == 2 and int(optimizer.skipped_steps.numpy()) == 1
    # SGD with momentum from zero velocity: w -= lr * g.
    np.testing.assert_allclose(weights.numpy(), [1.0 - 0.5 * 1.0, 2.0 - 0.5 * 2.0], rtol=1e-6)
    # Checkpoint keys stay those of Keras' LossScaleOptimizer.
    assert {v.path for v in optimizer.variables} >= {"loss_scale_optimizer/dynamic_scale",
                                                    "loss_scale_optimizer/skipped_steps"}
