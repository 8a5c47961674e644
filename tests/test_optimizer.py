"""optimizer.py: SGD with coupled L2 weight decay equals torch.optim.SGD (detectron2's optimizer), the
decayed variable set is detectron2's, and the "decoupled" option keeps Keras' form."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf import config as config_lib
from maskrcnn_tf import presets
from maskrcnn_tf.optimizer import SGDCoupledDecay, WarmupSchedule, build_optimizer, normalization_variables
from tests.torch_oracle import import_torch

torch = import_torch()


def _small_model():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.GroupNormalization(groups=2, name="norm")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, name="dense")(x)
    return keras.Model(inputs, outputs)


def _config(**train):
    cfg = config_lib.replace(presets.tiny(), **{f"train.{k}": v for k, v in train.items()})
    return config_lib.replace(cfg, **{"data.train_batch_size": 16, "train.reference_batch_size": 16})


@pytest.mark.parametrize("momentum", [0.9, 0.0])
def test_equals_torch_sgd_with_weight_decay_over_steps_with_a_changing_rate(momentum):
    # The oracle: torch.optim.SGD(momentum, dampening=0, nesterov=False, weight_decay) is what
    # detectron2's build_optimizer returns. Rates change every step (warmup) and drop once (decay), where
    # Keras' SGD (rate inside the velocity) and torch (rate times the buffer) part ways.
    rng = np.random.default_rng(0)
    shapes = [(3, 4), (4,), (5,)]
    initial = [rng.normal(size=s).astype(np.float32) for s in shapes]
    gradients = [[rng.normal(size=s).astype(np.float32) for s in shapes] for _ in range(6)]
    rates = [0.01, 0.04, 0.07, 0.1, 0.1, 0.01]
    wd = 0.05  # large, so that a missing or misplaced decay term shows far above float32 rounding

    variables = [tf.Variable(w) for w in initial]
    step_rate = tf.Variable(rates[0])
    optimizer = SGDCoupledDecay(learning_rate=lambda: step_rate.read_value(), momentum=momentum, weight_decay=wd)
    optimizer.exclude_from_weight_decay(var_list=[variables[2]])  # a "norm" variable: no decay

    params = [torch.nn.Parameter(torch.tensor(w)) for w in initial]
    reference = torch.optim.SGD([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}],
                                lr=rates[0], momentum=momentum, dampening=0.0, nesterov=False, weight_decay=wd)
    for rate, step_gradients in zip(rates, gradients):
        step_rate.assign(rate)
        optimizer.apply_gradients(zip([tf.constant(g) for g in step_gradients], variables))
        for group in reference.param_groups:
            group["lr"] = rate
        for p, g in zip(params, step_gradients):
            p.grad = torch.tensor(g)
        reference.step()
        for v, p in zip(variables, params):
            # float32 on both sides, the same operations: agreement to a few ulps.
            np.testing.assert_allclose(v.numpy(), p.detach().numpy(), rtol=1e-6, atol=1e-7)
    # A wrong implementation would be far off: the decay alone moved the weights this much.
    no_decay = [w.copy() for w in initial]
    assert not np.allclose(variables[0].numpy(), no_decay[0] - sum(r * g[0] for r, g in zip(rates, gradients)),
                           atol=1e-3)


def test_build_optimizer_decays_kernels_and_biases_but_not_normalization_layers():
    # detectron2 config/defaults.py: SOLVER.WEIGHT_DECAY_NORM = 0.0, SOLVER.WEIGHT_DECAY_BIAS = None
    # ("following WEIGHT_DECAY"). Zero gradients, no momentum history: one step moves a decayed
    # weight by exactly -lr * wd * w and leaves the others alone.
    model = _small_model()
    cfg = _config(weight_decay=0.1, warmup_steps=0, base_learning_rate=0.5)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, SGDCoupledDecay)
    for v in model.trainable_variables:  # non-zero weights everywhere, biases included
        v.assign(tf.random.normal(v.shape, seed=1) + 2.0)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    norm_paths = {v.path for v in normalization_variables(model)}
    assert norm_paths == {v.path for v in model.trainable_variables if v.path.startswith(("norm/", "bn/"))}
    assert len(norm_paths) == 4  # GroupNorm gamma, beta; BatchNorm gamma, beta
    for v in model.trainable_variables:
        expected = before[v.path] if v.path in norm_paths else before[v.path] * (1 - 0.5 * 0.1)
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)


def test_decoupled_option_is_keras_sgd_without_bias_decay():
    model = _small_model()
    cfg = _config(weight_decay=0.1, warmup_steps=0, base_learning_rate=0.5, weight_decay_type="decoupled")
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, keras.optimizers.SGD) and type(optimizer).__name__ == "SGDDecoupledDecay"
    for v in model.trainable_variables:
        v.assign(tf.random.normal(v.shape, seed=2) + 2.0)
    before = {v.path: v.numpy() for v in model.trainable_variables}
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    for v in model.trainable_variables:
        decayed = v.path.endswith("kernel")  # kernels only: biases and norm layers are excluded
        expected = before[v.path] * (1 - 0.5 * 0.1) if decayed else before[v.path]
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)


def test_unknown_weight_decay_type_is_a_config_error():
    with pytest.raises(ValueError, match="train.weight_decay_type='l1'.*coupled | decoupled"):
        config_lib.validate(_config(weight_decay_type="l1"))


def test_schedule_is_detectron2_warmup_multistep():
    # detectron2 WarmupParamScheduler(linear) x MultiStepParamScheduler, by hand: at iteration i < W the
    # factor is f * (1 - i / W) + i / W; then gamma ** (milestones passed).
    schedule = WarmupSchedule(0.02, 900, 100, 0.001, "step", (2 / 3, 8 / 9), 0.1)
    for step, expected in [(0, 0.02 * 0.001), (50, 0.02 * (0.001 * 0.5 + 0.5)), (100, 0.02), (599, 0.02),
                           (600, 0.002), (799, 0.002), (800, 0.0002)]:
        assert float(schedule(step)) == pytest.approx(expected, rel=1e-6), step


def test_a_run_written_before_weight_decay_type_resumes_with_the_decoupled_optimizer():
    # Its checkpoints hold Keras SGD's momentum (sgd/...); the coupled optimizer would not match them.
    saved = config_lib.to_dict(presets.tiny())
    del saved["train"]["weight_decay_type"]
    assert config_lib.from_dict(saved).train.weight_decay_type == "decoupled"
    assert config_lib.from_dict(config_lib.to_dict(presets.tiny())).train.weight_decay_type == "coupled"
