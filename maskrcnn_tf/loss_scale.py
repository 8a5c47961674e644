"""StepCountingLossScaleOptimizer: Keras' dynamic loss scaling (mixed_float16) that counts skipped steps.

Keras' LossScaleOptimizer skips the update of a step whose scaled gradients overflow (inf/NaN), halves
the loss scale, and leaves `iterations` where it was, while fit still counts the batch. train() keys
everything on `iterations` (loss.log, checkpoints, the learning-rate schedule, the end of the run), so
a skipped step made a 20-step run end at "global step 19", log a "step: 0" line and save "ckpt-0".

Decision: a skipped step counts. `iterations` advances on every step, updated or not, as PyTorch's
GradScaler recipe does (scheduler.step() runs after a skipped optimizer step): global step = batches
trained on, the run ends at exactly train.total_steps, and steps_per_loop > 1 keeps its multiples.
The weights, momenta and everything else of the skipped step stay untouched; only the loss scale
halves (Keras' rule). The first steps of a run typically skip while the scale falls from 2**15 to
what the gradients allow; `skipped_steps` counts them (a checkpointed variable).
"""

import keras


class StepCountingLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """keras.optimizers.LossScaleOptimizer whose skipped (overflowing) steps still advance `iterations`.

    Give it name="loss_scale_optimizer" (training.py does) to keep the checkpoint keys of its variables."""

    def build(self, var_list):
        super().build(var_list)
        if getattr(self, "skipped_steps", None) is None:
            # Like `iterations`: one count for all replicas.
            self.skipped_steps = self.add_variable(shape=(), dtype="int64", initializer="zeros",
                                                   aggregation="only_first_replica", name="skipped_steps")

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.inner_optimizer.iterations.assign_add(1)
        self.skipped_steps.assign_add(1)
