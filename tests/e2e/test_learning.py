"""Learning: the tiny model over-fits two synthetic images, so every stage really learns (slow). Both head
architectures meet the same bar at the same step count: today's (no norm, 2-FC box head) and torchvision
v2's (BatchNorm in the FPN and heads, training with batch statistics; 2-conv RPN; convs + 1 FC box head).

Deterministic: weights seeded by tests/conftest.py, sampling by train.seed (stateless draws keyed by the
step, ops/sampling.py), one fixed batch. The thresholds sit well inside what other seeds give too
(measured over train.seed 0, 1, 2 below), so a different CPU's float rounding cannot tip them."""
import numpy as np
import pytest
import tensorflow as tf

from maskrcnn_tf.model import build_model
from maskrcnn_tf.ops import masks as mask_ops
from maskrcnn_tf.optimizer import build_optimizer
from tests.e2e.synthetic import TWO_IMAGES, make_batch, tiny_test_config
from tests.numpy_reference import box_iou, mask_iou

STEPS = 400
ARCHITECTURES = {
    "v1_heads": {},
    # The tiny stand-in of torchvision_maskrcnn_r50_fpn_v2's heads (tests/test_v2_architecture.py).
    "v2_heads": {"model.fpn_norm": "batch_norm", "model.rpn_num_convs": 2, "model.heads.box_num_convs": 2,
                 "model.heads.box_conv_dim": 16, "model.heads.box_norm": "batch_norm", "model.heads.num_fcs": 1,
                 "model.heads.mask_norm": "batch_norm"},
}


@pytest.mark.slow
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_overfits_two_images_and_then_finds_every_instance(architecture):
    # lr 0.03 at batch 2 (base 0.24 at the reference batch 16), short warmup, no decay: measured
    # total loss 1.9 -> ~0.3 in 400 steps (about 45 s on 2 cores).
    # Gradient norm clipped at 10: at this high learning rate an early loss spike occasionally stalled a
    # run (seen once in CI: 1.8 -> 1.56 after 400 steps); clipping only cuts such spikes.
    cfg = tiny_test_config(**{"train.base_learning_rate": 0.24, "train.warmup_steps": 20,
                              "train.total_steps": STEPS, "train.decay_fractions": (),
                              "train.clip_grad_norm": 10.0, "data.train_batch_size": 2, "train.seed": 0,
                              **ARCHITECTURES[architecture]})
    model = build_model(cfg)
    model.compile(optimizer=build_optimizer(cfg, model))
    data, full_masks = make_batch(cfg, TWO_IMAGES)
    history = model.fit(tf.data.Dataset.from_tensors(data).repeat(), steps_per_epoch=STEPS // 10,
                        epochs=10, verbose=0).history["total_loss"]
    # Epoch means (40 steps each): last/first 0.24 with seed 0, 0.18 and 0.22 with seeds 1 and 2 (0.17-0.25
    # over 6 unseeded runs before); v2 heads 0.30, 0.29, 0.25 (seeds 0, 1, 2; AMD EPYC Zen 4). A stalled
    # run stays near 0.9.
    print(f"{architecture}: epoch-mean total loss last/first {history[-1] / history[0]:.3f}")
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
            ious = [box_iou(gt_box[None], box[None])[0, 0] if c == cls else 0.0 for box, c in zip(boxes, classes)]
            best = int(np.argmax(ious))
            found.append(best)
            # Seeds 0, 1, 2: every instance found with score >= 0.97, box IoU >= 0.73, mask IoU >= 0.70; v2
            # heads: score >= 0.94, box IoU >= 0.80, mask IoU >= 0.84.
            assert scores[best] >= 0.7 and ious[best] >= 0.6, (b, i, scores[best], ious)
            predicted, truth = pasted[best] >= 0.5, full_masks[b][i] > 0
            overlap = mask_iou(predicted, truth)
            print(f"image {b} instance {i}: score {scores[best]:.3f}, box IoU {ious[best]:.3f}, mask IoU {overlap:.3f}")
            assert overlap >= 0.6, (b, i, overlap)
        # Every instance outranks every other detection (what AP rewards), by a wide margin. Seeds 0, 1, 2:
        # the best other detection scores 0.30, 0.09, 0.50 (the CI failure this replaces: 0.54 against a
        # fixed 0.5 line, unseeded); v2 heads 0.06, 0.15, 0.06.
        others = np.delete(scores, found)
        print(f"image {b}: best other detection {others.max() if others.size else 0.0:.3f}")
        assert len(set(found)) == len(instances), (found, scores, classes)
        assert others.size == 0 or others.max() < min(0.75, scores[found].min()), (scores, classes, found)
