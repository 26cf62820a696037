"""A weighted modality sampler: each training sample (SAC: replay sample; PPO / A2C: rollout sample,
`agents.on_policy.ModalityMixMixin`) is trained with a subset of the modalities.

Multimodal networks lean on the modality that cuts the loss fastest and under-train the others (modality
imbalance). The sampler sets each modality subset's share of every training batch: a sample drawn for
``pixels+action_history`` has its other modalities withheld (masked, or removed, per
`PerceiverConfig.missing_tokens`): for SAC in the critic's online pass, the target pass and the actor's pass alike
(the same flags on obs and next_obs); for PPO / A2C in every update pass, with the old log-probabilities
recomputed under the same masks. Evaluation and acting always see every modality.

Spec: ``"all=0.5 pixels+action_history=0.3 proprio+action_history=0.2"`` (weights normalised; ``all`` is every
modality). Modes:
- ``fixed``: those weights throughout;
- ``curriculum``: stages by frames, ``"0: all=1; 50000: all=0.5 pixels+action_history=0.5"``, linearly
  interpolated between stages (the first stage holds before its frame, the last after);
- ``active``: weights follow each subset's critic error: L_s, an exponential average (decay 0.99) of the
  mean squared TD error (SAC; value error for PPO / A2C) of the samples drawn for subset s, and
  w_s = eps / S + (1 - eps) L_s / sum L (eps 0.2, so each subset keeps at least eps / S). A subset whose critic
  error stays high (the under-trained one) is drawn more. The spec's weights are the starting point.
- ``reliance``: weights follow which modality the policy leans on, measured causally at each evaluation
  (`experiments.callbacks.EvalCallback`): the evaluation episodes are replayed with each modality that some
  subset withholds masked (the same starts; a modality no subset withholds has an untrained mask token and no
  share to move, so it is neither measured nor counted), and d_i = clip((R - R_-i) / |R|, 0, 1) is the share of
  return lost without modality i. With p_i = d_i / sum d over those n modalities (the reliance shares) and W_s
  the modalities subset s withholds, each withholding subset's gap g_s = sum_{i in W_s} p_i - |W_s| / n (how
  much more of the policy's reliance it withholds than balanced reliance would) sets
  w_s = w0_s exp(RELIANCE_GAIN g_s), renormalised so the withholding subsets keep their spec share together;
  subsets that withhold nothing (``all``) keep their spec weight. Balanced reliance (or no loss from any
  modality) keeps the spec's weights; a policy leaning on one modality is trained more often without it. Return
  drops, not action changes: on study 2 a seed whose actions changed equally for every
  modality (0.32 / 0.29 / 0.33) lost 58 % of its return without the cart sensor and none without the camera.
"""

from __future__ import annotations

import re

import numpy as np
import torch

from perceiver_policy.model import PerceiverEncoder

MIX_MODES = ("fixed", "curriculum", "active", "reliance")
ALL = "all"
ACTIVE_DECAY = 0.99
ACTIVE_FLOOR = 0.2
RELIANCE_GAIN = 2.0


def parse_mix(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """'all=0.5 pixels+proprio=0.5' -> {subset: weight} (normalised); names the bad subset or weight."""
    mix: dict[str, float] = {}
    for pair in text.split():
        subset, sep, weight = pair.partition("=")
        if not sep:
            raise ValueError(f"modality_mix entries are SUBSET=WEIGHT, got {pair!r}")
        members = names if subset == ALL else tuple(subset.split("+"))
        unknown = sorted(set(members) - set(names))
        if unknown or not members:
            raise ValueError(
                f"modality_mix subset {subset!r} names {unknown}, not a modality of this run; valid: {ALL!r} or "
                f"'+'-joined names among {list(names)}"
            )
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"modality_mix weight of {subset!r} must be a number, got {weight!r}") from None
        if not value > 0 or not np.isfinite(value):
            raise ValueError(f"modality_mix weight of {subset!r} must be > 0, got {weight!r}")
        mix[subset] = value
    if not mix:
        raise ValueError("modality_mix is empty; e.g. 'all=0.5 pixels+action_history=0.5'")
    total = sum(mix.values())
    return {subset: value / total for subset, value in mix.items()}


def parse_schedule(text: str, names: tuple[str, ...], mode: str) -> list[tuple[int, dict[str, float]]]:
    """[(frame, mix)] sorted by frame; one stage at frame 0 unless mode is 'curriculum'."""
    if mode not in MIX_MODES:
        raise ValueError(f"unknown modality_mix_mode {mode!r}; valid choices: {list(MIX_MODES)}")
    if mode != "curriculum":
        if ";" in text or re.match(r"^\s*\d+\s*:", text):
            raise ValueError(f"stages ('FRAMES: ...; ...') need modality_mix_mode 'curriculum', got {mode!r}")
        return [(0, parse_mix(text, names))]
    stages = []
    for stage in text.split(";"):
        frames, sep, mix = stage.partition(":")
        if not sep or not frames.strip().isdigit():
            raise ValueError(
                f"curriculum stages are 'FRAMES: SUBSET=WEIGHT ...' separated by ';', got {stage!r}"
            )
        stages.append((int(frames), parse_mix(mix, names)))
    return sorted(stages, key=lambda s: s[0])


class ModalityMixer:
    """Draws a modality subset per replay sample; `flags(...)` gives the (B, n_modalities) absent flags."""

    def __init__(self, text: str, mode: str, names: tuple[str, ...], frames_per_step: int = 1):
        self.names, self.mode, self.frames_per_step = tuple(names), mode, frames_per_step
        self.schedule = parse_schedule(text, self.names, mode)
        self.subsets = list(dict.fromkeys(s for _, mix in self.schedule for s in mix))
        members = [self.names if s == ALL else tuple(s.split("+")) for s in self.subsets]
        # (S, n): True where subset s withholds modality i
        self.withheld = torch.tensor([[name not in m for name in self.names] for m in members])
        start = self.schedule[0][1]
        self.td_error = [1.0] * len(self.subsets)  # active: equal until measured
        self.start_weights = np.array([start.get(s, 0.0) for s in self.subsets])  # the spec's (first stage)
        self._weights = self.start_weights.copy()
        self.losses: list[list[float]] = [[] for _ in self.subsets]

    def weights(self, num_timesteps: int) -> np.ndarray:
        """Each subset's share of the next batch (sums to 1)."""
        if self.mode in ("active", "reliance"):
            return self._weights
        frame = num_timesteps * self.frames_per_step
        stages = self.schedule
        if frame <= stages[0][0] or len(stages) == 1:
            mix = stages[0][1]
        elif frame >= stages[-1][0]:
            mix = stages[-1][1]
        else:
            i = next(i for i in range(1, len(stages)) if frame < stages[i][0])
            (f0, m0), (f1, m1) = stages[i - 1], stages[i]
            t = (frame - f0) / (f1 - f0)
            mix = {s: (1 - t) * m0.get(s, 0.0) + t * m1.get(s, 0.0) for s in self.subsets}
        return np.array([mix.get(s, 0.0) for s in self.subsets])

    def draw(self, batch: int, num_timesteps: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(subset index (B,), absent flags (B, n) bool) for one replay batch."""
        weights = torch.as_tensor(self.weights(num_timesteps), dtype=torch.float32)
        index = torch.multinomial(weights, batch, replacement=True)
        return index.to(device), self.withheld[index].to(device)

    def record(self, index: torch.Tensor, td_error: torch.Tensor) -> None:
        """Per-sample squared TD errors (B,) of one update, grouped by subset (for the logs and `active`)."""
        index, td_error = index.cpu(), td_error.detach().float().cpu()
        for s in range(len(self.subsets)):
            chosen = td_error[index == s]
            if len(chosen):
                value = float(chosen.mean())
                self.losses[s].append(value)
                self.td_error[s] = ACTIVE_DECAY * self.td_error[s] + (1 - ACTIVE_DECAY) * value
        if self.mode == "active":
            errors = np.asarray(self.td_error)
            self._weights = ACTIVE_FLOOR / len(errors) + (1 - ACTIVE_FLOOR) * errors / errors.sum()

    @property
    def withholdable_names(self) -> tuple[str, ...]:
        """The modalities some subset withholds: the only ones whose mask tokens are trained and whose share of
        the batch the sampler can move (``reliance`` mode measures and uses these alone)."""
        return tuple(name for name, column in zip(self.names, self.withheld.any(dim=0).tolist()) if column)

    def follow_reliance(self, drops: dict[str, float]) -> None:
        """``reliance`` mode: new weights from each modality's share of return lost when it is withheld
        ({name: (R - R_-i) / |R|}, the rule in the module docstring). No loss from any modality keeps the spec's."""
        unknown = sorted(set(drops) - set(self.names))
        if unknown:
            raise ValueError(
                f"reliance drops name {unknown}, not modalities of this sampler: {list(self.names)}"
            )
        names = self.withholdable_names
        lost = np.array([min(max(float(drops.get(name, 0.0)), 0.0), 1.0) for name in names])
        start = self.start_weights
        withheld = self.withheld.numpy()[:, self.withheld.any(dim=0).numpy()]  # the columns of `names`
        withholding = withheld.any(axis=1)
        if lost.sum() <= 0 or not withholding.any():
            self._weights = start
            return
        shares = lost / lost.sum()
        gap = withheld @ shares - withheld.sum(axis=1) / len(names)
        moved = start * np.exp(RELIANCE_GAIN * gap)
        weights = start.copy()
        weights[withholding] = moved[withholding] * start[withholding].sum() / moved[withholding].sum()
        self._weights = weights

    def state(self) -> dict:
        """What a checkpoint keeps so that --resume continues the sampler where it was (active / reliance)."""
        return {"weights": [float(w) for w in self._weights], "td_error": [float(e) for e in self.td_error]}

    def load_state(self, state: dict) -> None:
        """Restores `state()`; a clear error when it was written for other subsets."""
        if len(state.get("weights", [])) != len(self.subsets) or len(state.get("td_error", [])) != len(
            self.subsets
        ):
            raise ValueError(
                f"the checkpoint's modality sampler state {state!r} does not match this sampler's subsets "
                f"{self.subsets}"
            )
        self._weights = np.asarray(state["weights"], dtype=np.float64)
        self.td_error = [float(e) for e in state["td_error"]]

    def log(self, logger, num_timesteps: int) -> None:
        """perceiver/modality_mix/<subset> (weights) and perceiver/modality_mix_critic_loss/<subset>."""
        for s, (subset, weight) in enumerate(zip(self.subsets, self.weights(num_timesteps))):
            logger.record(f"perceiver/modality_mix/{subset}", float(weight))
            if self.losses[s]:
                logger.record(f"perceiver/modality_mix_critic_loss/{subset}", float(np.mean(self.losses[s])))
            self.losses[s] = []


class ModalityMixSettings:
    """The sampler's settings on an SB3 algorithm (``modality_mix``, ``modality_mix_mode``, ``frames_per_step``,
    saved with the model) and its `ModalityMixer` (``mixer``, None when off), built by `_setup_mixer`.

    :param modality_mix: a sampler spec, e.g. ``"all=0.5 pixels+action_history=0.3 proprio+action_history=0.2"``.
    :param modality_mix_mode: 'fixed', 'curriculum' (stages by frames), 'active' (weights follow the critic error)
        or 'reliance' (weights follow the return lost without each modality, at each evaluation).
    :param frames_per_step: env frames per agent step (the action repeat), for curriculum stages given in frames.
    """

    def __init__(
        self,
        policy,
        env,
        modality_mix: str | None = None,
        modality_mix_mode: str = "fixed",
        frames_per_step: int = 1,
        **kwargs,
    ):
        self.modality_mix, self.modality_mix_mode = modality_mix, modality_mix_mode
        self.frames_per_step = frames_per_step
        self.mixer: ModalityMixer | None = None
        super().__init__(policy, env, **kwargs)

    def _setup_mixer(self, encoder, encoder_name: str) -> None:
        """The mixer over `encoder`'s modalities; a clear error when the encoder cannot withhold modalities."""
        if not self.modality_mix:
            return
        if not isinstance(encoder, PerceiverEncoder):
            raise ValueError(
                f"modality_mix withholds modalities inside the Perceiver; encoder {encoder_name!r} cannot (use "
                "policy_type 'perceiver')"
            )
        self.mixer = ModalityMixer(
            self.modality_mix, self.modality_mix_mode, encoder.names, self.frames_per_step
        )

    def _log_mixer(self) -> None:
        """The mixer's weights and per-subset critic errors into the logger (nothing when off)."""
        if self.mixer is not None:
            self.mixer.log(self.logger, self.num_timesteps)


def with_flags(obs: dict[str, torch.Tensor], flags: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """obs with the mixer's absent flags OR-ed into its own (env-side dropout); where that would withhold every
    modality of a sample, the mixer's flags alone."""
    if key in obs:
        combined = obs[key].bool() | flags
        flags = torch.where(combined.all(dim=1, keepdim=True), flags, combined)
    return {**obs, key: flags}
