"""Learning: the tiny model over-fits two synthetic images, so every stage really learns (slow).

Deterministic: weights seeded by tests/conftest.py, sampling by train.seed (stateless draws keyed by the
step, ops/sampling.py), one fixed batch. The thresholds sit well inside what other seeds give too
(measured over train.seed 0, 1, 2 below), so a different CPU's float rounding cannot tip them."""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.model import build_model
from maskrcnn_tf.ops import boxes as box_ops
from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config

STEPS = 400


def _iou(a, b):
    return float(box_ops.pairwise_iou(tf.constant(a[None, None]), tf.constant(b[None, None]))[0, 0, 0])


@pytest.mark.slow
def test_overfits_two_images_and_then_finds_every_instance():
    # lr 0.03 at batch 2 (base 0.24 at the reference batch 16), short warmup, no decay: measured
    # total loss 1.9 -> ~0.3 in 400 steps (about 45 s on 2 cores).
    # Gradient norm clipped at 10: at this high learning rate an early loss spike occasionally stalled a
    # run (seen once in CI: 1.8 -> 1.56 after 400 steps); clipping only cuts such spikes.
    cfg = tiny_test_config(**{"train.base_learning_rate": 0.24, "train.warmup_steps": 20,
                              "train.total_steps": STEPS, "train.decay_fractions": (),
                              "train.clip_grad_norm": 10.0, "data.train_batch_size": 2, "train.seed": 0})
    model = build_model(cfg)
    model.compile(optimizer=build_optimizer(cfg, model))
    data, full_masks = make_batch(cfg, TWO_IMAGES)
    history = model.fit(tf.data.Dataset.from_tensors(data).repeat(), steps_per_epoch=STEPS // 10,
                        epochs=10, verbose=0).history["total_loss"]
    # Epoch means (40 steps each): last/first 0.24 with seed 0, 0.18 and 0.22 with seeds 1 and 2 (0.17-0.25
    # over 6 unseeded runs before); a stalled run stays near 0.9.
    assert history[-1] < history[0] / 3, history

    out = {k: v.numpy() for k, v in model(data, training=False).items()}
    height, width = cfg.model.image_size
    for b, instances in enumerate(TWO_IMAGES):
        n = out["num_detections"][b]
        scores, classes, boxes = (out["detection_scores"][b, :n], out["detection_classes"][b, :n],
                                  out["detection_boxes"][b, :n])
        pasted = mask_ops.paste_masks(out["detection_masks"][b:b + 1, :n], boxes[None], (height, width))[0].numpy()
        found = []
        for i, (cls, _) in enumerate(instances):
            gt_box = data["gt_boxes"][b, i]
            ious = [_iou(gt_box, box) if c == cls else 0.0 for box, c in zip(boxes, classes)]
            best = int(np.argmax(ious))
            found.append(best)
            # Seeds 0, 1, 2: every instance found with score >= 0.97, box IoU >= 0.73, mask IoU >= 0.70.
            assert scores[best] >= 0.7 and ious[best] >= 0.6, (b, i, scores[best], ious)
            predicted, truth = pasted[best] >= 0.5, full_masks[b][i] > 0
            mask_iou = (predicted & truth).sum() / (predicted | truth).sum()
            assert mask_iou >= 0.6, (b, i, mask_iou)
        # Every instance outranks every other detection (what AP rewards), by a wide margin. Seeds 0, 1, 2:
        # the best other detection scores 0.30, 0.09, 0.50 (the CI failure this replaces: 0.54 against a
        # fixed 0.5 line, unseeded).
        others = np.delete(scores, found)
        assert len(set(found)) == len(instances), (found, scores, classes)
        assert others.size == 0 or others.max() < min(0.75, scores[found].min()), (scores, classes, found)
