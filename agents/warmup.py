"""Linear learning-rate warmup over the first updates, for every optimizer an algorithm steps.

Adam moves every weight by about the learning rate from its first step, however noisy its second-moment estimate
still is. Behind a LayerNorm that can be harmful: the loss does not depend on the scale of a normalised input,
so steps along the mean of many positive (ReLU) inputs can grow an input-independent part of the tokens, and
after the LayerNorm what the observation changes shrinks to nothing. Transformers are usually trained with a
warmup for this reason (Vaswani et al. 2017; Liu et al. 2020, "Understanding the Difficulty of Training
Transformers"). Measured here (docs/results.md, "Adam's first steps and a learning-rate warmup"): in the
state-regression benchmark a 100-step warmup lets the conv-token Perceiver learn the state without the
reference (R^2 0 -> 0.87 / 0.41), and does nothing for patch tokens or the reference-centred encoders. DrQ uses
no warmup, and none is the default (`lr_warmup=0`).
"""

from __future__ import annotations

from perceiver_policy.sac_policy import LR_SCALE


def warmup_factor(updates_done: int, warmup: int) -> float:
    """The learning rate's multiplier at the update after `updates_done`: (updates_done + 1) / warmup, at most 1."""
    if warmup <= 0:
        return 1.0
    return min(1.0, (updates_done + 1) / warmup)


def check_warmup(value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(
            f"lr_warmup must be a non-negative integer number of updates (0: no warmup), got {value!r}"
        )
    return value


class LearningRateWarmupMixin:
    """`lr_warmup` N > 0: the learning rate SB3's schedule gives is scaled by (n + 1) / N at update n (SB3's
    `_n_updates`, saved with the model, so `--resume` continues the ramp) until it reaches 1, for every optimizer
    `_update_learning_rate` sets (SAC: actor, critic and temperature; PPO / A2C: the policy's). SB3 sets the
    learning rate once per `train` call, so the ramp moves in steps of that call's updates (SAC: `gradient_steps`,
    PPO: `n_epochs`)."""

    def __init__(self, policy, env, lr_warmup: int = 0, **kwargs):
        self.lr_warmup = check_warmup(lr_warmup)
        super().__init__(policy, env, **kwargs)

    def _update_learning_rate(self, optimizers) -> None:
        """SB3 sets every parameter group to the schedule's rate; then the warmup factor, and each group's own
        multiple (`LR_SCALE`: the DrQ recipe's `encoder_lr_scale`)."""
        super()._update_learning_rate(optimizers)
        factor = warmup_factor(self._n_updates, self.lr_warmup)
        for optimizer in optimizers if isinstance(optimizers, list) else [optimizers]:
            for group in optimizer.param_groups:
                group["lr"] *= factor * group.get(LR_SCALE, 1.0)
        if factor != 1.0:
            self.logger.record(
                "train/learning_rate", self.lr_schedule(self._current_progress_remaining) * factor
            )
