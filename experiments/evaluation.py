"""Deterministic evaluation episodes with per-step policy latency, shared by training and `experiments.evaluate`."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from envs.dmc import STATE_KEY
from envs.vec import make_env_fn
from envs.wrappers import ABSENT_KEY
from experiments.tb import attention_on_image
from perceiver_policy.introspection import modality_path as modality_path_of
from perceiver_policy.modalities import ACTION_MASK_KEY, ON_IMAGE_KINDS, is_input_key
from perceiver_policy.probes import MIN_EPISODES, state_probe
from perceiver_policy.streaming import encoder_of
from perceiver_policy.streaming import streaming as stream_tokens


@dataclass
class EvalResult:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    frames: np.ndarray | None = None
    """(T, H, W, 3) uint8 of the first episode when a video was asked for."""
    probe: dict[str, float] | None = None
    """R² per state sensor of a linear probe from the policy's features (with probe_state=True)."""
    stream: dict[str, float] | None = None
    """Streaming inference's token cache hit rate and window overlap (Perceiver policies, streaming=True)."""
    reliance: dict[str, dict[str, float]] | None = None
    """Per modality (reliance=True): how much the deterministic action, the value and (SAC) the critic's greedy
    action change when it is withheld, blanked and resampled (`RelianceProbe.summary`)."""
    actor_regret: float | None = None
    """(reliance=True) `RelianceProbe.actor_regret`: how far the actor's action falls below its critic's greedy
    one, over mean |Q|."""
    modality_path: dict[str, dict[str, float]] | None = None
    """Per modality of a Perceiver (modality_path=True): `perceiver_policy.introspection.modality_path` on the
    evaluation's own observations."""
    probe_data: dict | None = None
    """With keep_probe_data: what the state probes were fit on - {'features': {features: [(T_i, F) per episode]},
    'states': [(T_i, S)], 'layout': the env's state layout, 'parts': its sensed / unsensed parts or None}."""

    def summary(self) -> dict[str, float]:
        latency = np.asarray(self.latencies_ms) if self.latencies_ms else np.zeros(1)
        return {
            "episodes": len(self.returns),
            "return_mean": float(np.mean(self.returns)),
            "return_std": float(np.std(self.returns)),
            "length_mean": float(np.mean(self.lengths)),
            "latency_p50_ms": float(np.percentile(latency, 50)),
            "latency_p95_ms": float(np.percentile(latency, 95)),
        }


def perceiver_encoder(model):
    """The Perceiver encoder of a model's policy, or None for other policies."""
    return encoder_of(model.policy)


def is_recurrent(model) -> bool:
    return hasattr(model.policy, "lstm_actor")


def feature_module(model):
    """The module whose output the policy's heads read: the policy's encoder (Perceiver latents, or the conv
    encoder's features of `agents.DrQSACPolicy`), or the SB3 actor's features extractor; None for a recurrent
    policy (its features are the LSTM state `predict` returns)."""
    policy = model.policy
    encoder = getattr(policy, "encoder", None)
    if encoder is not None:
        return encoder
    if is_recurrent(model):
        return None
    actor = getattr(policy, "actor", None)  # SB3 SAC
    if actor is not None and hasattr(actor, "features_extractor"):
        return actor.features_extractor
    return policy.pi_features_extractor


PROBE_FEATURES = ("encoder", "actor")
"""What a state probe reads: ``encoder``, what the policy's heads read (`feature_module`); ``actor``, the input
of the actor's action layer (`action_layer`), the last representation the action is a linear function of. A
state the encoder carries and the actor's layer does not is lost in the actor's readout. The encoder probe's R²
are keyed by sensor, the others' by '<features>/<sensor>' (`evaluate_policy`'s `probe_features`)."""
OVERLAY_KINDS = (*ON_IMAGE_KINDS, "keypoint_image")
"""Pixel token kinds `--attention-overlay` draws: heat on patches and conv cells, discs where keypoints sit."""


def check_probe_features(wanted: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`wanted` (one of `PROBE_FEATURES` or several) as a tuple, checked."""
    names = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    unknown = [name for name in names if name not in PROBE_FEATURES]
    if unknown or not names:
        raise ValueError(f"unknown probe features {', '.join(map(repr, unknown)) or '(none)'}; valid choices: "
                         f"{list(PROBE_FEATURES)}")  # fmt: skip
    return tuple(dict.fromkeys(names))


def has_action_layer(model) -> bool:
    try:
        action_layer(model)
    except ValueError:
        return False
    return True


def action_layer(model):
    """The actor's last layer (its input: what the action's mean is linear in): DrQ's actor MLP's last Linear,
    the Perceiver SAC actor's head, SB3 SAC's `mu`, or `action_net` of a PPO / A2C policy (LSTM included)."""
    policy = model.policy
    actor = getattr(policy, "actor", None)
    if actor is not None:
        for name in ("trunk", "mu", "head"):  # DrQActor, SB3's SAC Actor, PerceiverSACActor
            layer = getattr(actor, name, None)
            if layer is not None:
                if isinstance(layer, nn.Sequential):  # DrQ's MLP; SB3's clipped gSDE mean: its last Linear
                    return [m for m in layer if isinstance(m, nn.Linear)][-1]
                return layer  # a Linear, or the multi-task actor's per-slot heads
    if hasattr(policy, "action_net"):
        return policy.action_net
    raise ValueError(f"probe features 'actor': no action layer found in {type(policy).__name__}; valid "
                     "choice for this policy: 'encoder'")  # fmt: skip


class FeatureTap:
    """Keeps the features behind the latest `predict` call, (F,) numpy, for state probes: the output of
    `feature_module` (`where='encoder'`) or the input of `action_layer` (`where='actor'`)."""

    def __init__(self, model, where: str = "encoder"):
        (where,) = check_probe_features(where)
        self.latest: np.ndarray | None = None
        self._handle = None
        if where == "actor":
            self._handle = action_layer(model).register_forward_hook(self._store_input)
        elif (module := feature_module(model)) is not None:
            self._handle = module.register_forward_hook(self._store)

    def _store(self, module, inputs, output) -> None:
        self.latest = output.detach().float().reshape(output.shape[0], -1)[0].cpu().numpy()

    def _store_input(self, module, inputs, output) -> None:
        self._store(module, (), inputs[0])

    def after_predict(self, recurrent_state) -> np.ndarray:
        if self._handle is None:  # LSTM: hidden and cell state of the actor after reading this observation
            return np.concatenate([np.asarray(part).ravel() for part in recurrent_state])
        return self.latest

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()


PATH_OBSERVATIONS = 256
"""At most this many of an evaluation's observations, evenly spaced over its steps, enter the modality path."""


class EncoderInputTap:
    """Keeps what a Perceiver encoder read in the latest `predict` (a batch of 1), for `modality_path`: the
    observations after the policy's preprocessing, exactly as the encoder reads them. `keep` stores every
    `stride`-th of them, doubling the stride (and dropping every other one kept) whenever 2 x PATH_OBSERVATIONS
    are stored: evenly spaced over an evaluation of any length, in bounded memory."""

    def __init__(self, encoder):
        self.latest: dict | None = None
        self.kept: list[dict] = []
        self.stride, self.seen = 1, 0
        self._handle = encoder.register_forward_pre_hook(self._store)

    def _store(self, module, args) -> None:
        self.latest = {k: v.detach()[:1].clone() for k, v in args[0].items()}

    def keep(self) -> None:
        if self.latest is not None and self.seen % self.stride == 0:
            self.kept.append(self.latest)
            if len(self.kept) >= 2 * PATH_OBSERVATIONS:
                self.kept, self.stride = self.kept[::2], 2 * self.stride
        self.seen += 1

    def batch(self) -> dict:
        import torch

        rows = self.kept[:: max(1, math.ceil(len(self.kept) / PATH_OBSERVATIONS))]
        return {key: torch.cat([row[key] for row in rows]) for key in rows[0]}

    def close(self) -> None:
        self._handle.remove()


def check_blank_modalities(spaces: dict, names: tuple[str, ...]) -> None:
    """`names` must be observation keys the policy reads (not the absent flags nor the privileged state)."""
    valid = [key for key in spaces if is_input_key(key)]
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(f"unknown modality {unknown} for --blank-modality; valid choices: {valid}")


@contextlib.contextmanager
def missing_modalities(model, names: tuple[str, ...]):
    """Evaluate as if these modalities were absent (the encoder reads the rest)."""
    if not names:
        yield
        return
    encoder = perceiver_encoder(model)
    if encoder is None:
        raise ValueError("--missing-modality needs a Perceiver policy (this model has none)")
    unknown = [n for n in names if n not in encoder.names]
    if unknown:
        raise ValueError(
            f"unknown modality {unknown} for --missing-modality; valid choices: {list(encoder.names)}"
        )
    previous = set(encoder.disabled_modalities)
    encoder.disabled_modalities = previous | set(names)
    try:
        yield
    finally:
        encoder.disabled_modalities = previous


GREEDY_GRID = 11
"""Candidate actions of the reliance probe's greedy action: this many evenly spaced values per action dimension
(-1, -0.8, ..., 1) while the grid has at most GREEDY_CANDIDATES points (up to 2 dimensions), else
GREEDY_CANDIDATES uniform draws from a fixed seed."""
GREEDY_CANDIDATES = 256


def greedy_actions(action_dim: int) -> np.ndarray:
    """(N, action_dim) float32 candidate actions in [-1, 1] for the critic's greedy action (`GREEDY_GRID`)."""
    if GREEDY_GRID**action_dim <= GREEDY_CANDIDATES:
        axes = [np.linspace(-1.0, 1.0, GREEDY_GRID)] * action_dim
        return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, action_dim).astype(np.float32)
    return np.random.default_rng(0).uniform(-1.0, 1.0, (GREEDY_CANDIDATES, action_dim)).astype(np.float32)


def has_q_critic(model) -> bool:
    """Whether the policy has a Q(obs, action) critic (SAC's), as opposed to a value head (PPO / A2C)."""
    return getattr(model.policy, "critic", None) is not None


def min_q_over_actions(critic, obs: dict, actions):
    """min over the twin critics of Q(obs, a) for one observation (batch 1) and N actions (N, A) -> (N,). The
    observation is encoded once and its features read with every action, for every critic of the toolkit (DrQ's
    MLP and query critics, the SB3-recipe Perceiver's query critic, SB3's `ContinuousCritic`); any other critic is
    called on the observation repeated N times."""
    import torch

    from perceiver_policy.sac_policy import PerceiverSACCritic

    n = actions.shape[0]

    def repeat(x):
        return x.expand(n, *x.shape[1:])

    if isinstance(critic, PerceiverSACCritic):
        qs = critic.q_values(critic._encoder[0](obs), actions, obs)
    elif hasattr(critic, "q_heads") and hasattr(critic, "encoder"):  # DrQCritic, QueryCritic
        qs = critic.q_heads(critic.readout(critic.encoder(obs)), actions)
    elif hasattr(critic, "q_networks") and hasattr(critic, "extract_features"):  # SB3's ContinuousCritic
        features = repeat(critic.extract_features(obs, critic.features_extractor))
        qs = [q(torch.cat([features, actions], dim=1)) for q in critic.q_networks]
    else:
        qs = critic({k: repeat(v) for k, v in obs.items()}, actions)
    return torch.cat(list(qs), dim=1).min(dim=1).values


RESAMPLE_POOL = 256
"""How many probed observations of the evaluation the reliance probe keeps (reservoir sampling, fixed seed) as
donors for its resampled modalities."""


class RelianceProbe:
    """Causal reliance on each modality, on the evaluation's own states: at every step, the policy's deterministic
    action and value with one modality withheld beside those with every modality (the episode follows the
    full-observation action). Withheld = the Perceiver's mask tokens when it has them (`missing_tokens='mask'`),
    else the key blanked (zeros: black frames, zero readings), for any policy. Reported per modality:
    ``action``, mean |a_withheld - a| over steps and action dimensions (actions in [-1, 1]); ``value``, mean
    |V_withheld - V| / mean |V|, where V is the critic's min Q at the full-observation action (SAC) or the value
    head (PPO / A2C); NaN for recurrent policies, whose value depends on the LSTM state; ``greedy`` (SAC), mean
    |g_withheld - g| of the critic's greedy action g = argmax_a min-Q(obs, a) over `greedy_actions` (fixed
    candidate actions; the critic's features are computed once per pass), NaN for policies without a Q critic:
    the action the critic prefers can ignore a modality that its value reads, and an actor trained on that critic
    then ignores it too.

    Blanking puts the policy on inputs it never trained on (black frames), and a network's answer there need not
    say what it reads from real inputs. ``action_resampled``, ``value_resampled`` and ``greedy_resampled`` measure
    the same changes with the modality *resampled* instead (`resample`): replaced by the same key of a probed
    observation from an earlier episode of this evaluation (a donor drawn from `RESAMPLE_POOL` kept by reservoir
    sampling, fixed seed; the interchange intervention of causal analysis), which keeps every input on the
    observations the policy meets. They need two episodes or more (NaN with one): the first only fills the pool.

    `actor_regret()` (SAC): mean over probed states of max over the candidates of min-Q minus min-Q at the actor's
    action, over mean |Q|: near 0 when the actor acts as its critic prefers, whatever the critic reads.
    `every`: probe every k-th step from the first (each probed step costs 1 + 2 x len(keys) extra policy passes,
    twice that with resampling from the second episode on; the value and the greedy action share one critic
    pass)."""

    def __init__(self, model, keys: list[str], every: int = 1, resample: bool = True):
        if not isinstance(every, int) or isinstance(every, bool) or every <= 0:
            raise ValueError(f"the reliance probe's step interval must be a positive integer, got {every!r}")
        self.model, self.keys, self.every, self.resample = model, keys, every, resample
        self.steps = 0  # steps seen, probed or not
        self.episode = -1  # counted from the episode_start flags
        encoder = perceiver_encoder(model)
        self.masks = encoder is not None and encoder.mask_tokens is not None
        self.encoder = encoder
        self.changes = {
            measure: {k: [] for k in keys}
            for measure in (
                "action",
                "value",
                "greedy",
                "action_resampled",
                "value_resampled",
                "greedy_resampled",
            )
        }
        self.values: list[float] = []
        self.regrets: list[float] = []
        self.pool: list[tuple[int, dict]] = []  # (episode, the probed keys of one observation)
        self.offered = 0  # observations offered to the pool
        self.rng = np.random.default_rng(0)
        self.candidates = greedy_actions(model.action_space.shape[0]) if has_q_critic(model) else None

    def critic_readings(self, obs: dict, action: np.ndarray) -> tuple[float, np.ndarray | None, float]:
        """The value at `action`, the critic's greedy action over the candidates (scaled to [-1, 1]; None without
        a Q critic) and how much more the greedy candidate is worth than `action` (NaN without a Q critic), from
        one encoder pass."""
        import torch

        policy = self.model.policy
        nan = float("nan")
        if is_recurrent(self.model):
            return nan, None, nan
        spaces = self.model.observation_space.spaces
        with torch.no_grad():
            tensors, _ = policy.obs_to_tensor({k: v for k, v in obs.items() if k in spaces})
            if self.candidates is None:
                return float(policy.predict_values(tensors).squeeze()), None, nan
            scaled = policy.scale_action(np.asarray(action, dtype=np.float32)).reshape(1, -1)
            actions = torch.as_tensor(np.concatenate([self.candidates, scaled]), device=policy.device)
            q = min_q_over_actions(policy.critic, tensors, actions)  # the candidates', then the action's
            best = int(q[:-1].argmax())
            greedy = self.candidates[best]
            regret = float(q[best] - q[-1])
            # a multi-task body's padded action entries never reach Q: they are no part of its preference
            greedy = greedy * obs[ACTION_MASK_KEY] if ACTION_MASK_KEY in obs else greedy
            return float(q[-1]), greedy, regret

    def withheld(self, obs: dict, key: str):
        if self.masks:
            return obs, missing_modalities(self.model, (key,))
        return {**obs, key: np.zeros_like(obs[key])}, contextlib.nullcontext()

    def donor(self) -> dict | None:
        """The keys of a probed observation from an earlier episode (None while there is none)."""
        earlier = [kept for episode, kept in self.pool if episode < self.episode]
        return earlier[int(self.rng.integers(len(earlier)))] if earlier else None

    def offer(self, obs: dict) -> None:
        """Reservoir sampling: every probed observation is in the pool with probability RESAMPLE_POOL / offered."""
        kept = (self.episode, {k: np.array(obs[k], copy=True) for k in self.keys})
        self.offered += 1
        if len(self.pool) < RESAMPLE_POOL:
            self.pool.append(kept)
        else:
            slot = int(self.rng.integers(self.offered))
            if slot < RESAMPLE_POOL:
                self.pool[slot] = kept

    def record(
        self, suffix: str, key: str, action, other, value: float, other_value: float, greedy, other_greedy
    ):
        self.changes[f"action{suffix}"][key].append(
            float(np.abs(np.asarray(other) - np.asarray(action)).mean())
        )
        self.changes[f"value{suffix}"][key].append(abs(other_value - value))
        if greedy is not None:
            self.changes[f"greedy{suffix}"][key].append(float(np.abs(other_greedy - greedy).mean()))

    def step(self, obs: dict, action: np.ndarray, state, episode_start) -> None:
        if episode_start is not None and bool(np.asarray(episode_start).any()):
            self.episode += 1
        self.steps += 1
        if (self.steps - 1) % self.every:
            return
        value, greedy, regret = self.critic_readings(obs, action)
        self.values.append(abs(value))
        self.regrets.append(regret)
        donor = self.donor() if self.resample else None
        for key in self.keys:
            withheld, context = self.withheld(obs, key)
            with context:
                other, _ = self.model.predict(
                    withheld, state=state, episode_start=episode_start, deterministic=True
                )
                other_value, other_greedy, _ = self.critic_readings(withheld, action)
            self.record("", key, action, other, value, other_value, greedy, other_greedy)
            if donor is not None:
                resampled = {**obs, key: donor[key]}
                other, _ = self.model.predict(
                    resampled, state=state, episode_start=episode_start, deterministic=True
                )
                other_value, other_greedy, _ = self.critic_readings(resampled, action)
                self.record("_resampled", key, action, other, value, other_value, greedy, other_greedy)
        if self.resample:
            self.offer(obs)

    def summary(self) -> dict[str, dict[str, float]]:
        scale = max(float(np.mean(self.values)), 1e-8) if self.values else float("nan")

        def mean(changes: list[float], divide: float = 1.0) -> float:
            return float(np.mean(changes)) / divide if changes else float("nan")

        return {
            key: {
                measure: mean(self.changes[measure][key], scale if measure.startswith("value") else 1.0)
                for measure in self.changes
            }
            for key in self.keys
        }

    def actor_regret(self) -> float:
        """Mean over probed states of (min-Q of the critic's greedy candidate - min-Q at the actor's action) /
        mean |Q|; NaN without a Q critic (PPO / A2C, recurrent policies)."""
        regrets = [r for r in self.regrets if np.isfinite(r)]
        if not regrets or not self.values:
            return float("nan")
        return float(np.mean(regrets)) / max(float(np.mean(self.values)), 1e-8)


def evaluate_policy(
    model,
    task: str,
    env_kwargs: dict,
    episodes: int,
    seed: int = 10_000,
    video: bool = False,
    missing: tuple[str, ...] = (),
    blank: tuple[str, ...] = (),
    probe_state: bool = False,
    probe_features: str | tuple[str, ...] = "encoder",
    attention_overlay: bool = False,
    streaming: bool = False,
    reliance: bool = False,
    reliance_every: int = 1,
    keep_probe_data: bool = False,
    modality_path: bool = False,
    deterministic: bool = True,
) -> EvalResult:
    """Run `episodes` episodes of `task` one by one, timing every `model.predict` call.

    `deterministic=False`: actions sampled from the policy's distribution (SB3's `predict(deterministic=False)`)
    instead of its mean or mode, from torch's generator seeded with `seed` inside `torch.random.fork_rng`: the
    same seed gives the same episodes, and the caller's generator (a training run's) is left as it was.

    `probe_state`: also fit a linear probe from the policy's features to the privileged state (the env gives it
    for this; the policy never sees it unless it was trained with it) and report R² per sensor; `probe_features`
    (`PROBE_FEATURES`, one or several): which of the policy's features are probed, each by its own fit.
    `attention_overlay` (with `video`): the video shows the policy's own stacked frames with the latents'
    cross-attention on each patch or conv cell blended over them (keypoint tokens: a disc where each keypoint
    sits, growing with its attention), instead of the camera render.
    `streaming`: a Perceiver embeds only the newest frame / step of each window (perceiver_policy.streaming;
    the same actions as the full forward, bit for bit).
    `missing`: the Perceiver encoder drops these modalities' tokens (only a Perceiver can). `blank`: these
    observation keys reach the policy as zeros (a dead sensor: black frames, zero readings), for any policy.
    `reliance`: `RelianceProbe` on every `reliance_every`-th step (result.reliance).
    `keep_probe_data` (with `probe_state`): result.probe_data keeps the probes' features and states.
    `modality_path` (Perceiver policies): where each modality reaches the latents and where it is lost
    (`perceiver_policy.introspection.modality_path`) on up to PATH_OBSERVATIONS of the evaluation's observations
    (result.modality_path)."""
    if probe_state and episodes < MIN_EPISODES:
        raise ValueError(f"a state probe needs at least {MIN_EPISODES} evaluation episodes, got {episodes}")
    spaces = getattr(model.observation_space, "spaces", {})
    check_blank_modalities(spaces, tuple(blank))
    env_kwargs = {**env_kwargs, "privileged_state": probe_state or STATE_KEY in spaces}
    encoder = perceiver_encoder(model)
    if attention_overlay and (encoder is None or "pixels" not in encoder.names):
        raise ValueError("--attention-overlay needs a Perceiver policy that reads pixels")
    if attention_overlay and encoder.adapters["pixels"].spec.kind not in OVERLAY_KINDS:
        raise ValueError(
            f"--attention-overlay draws attention on image tokens; this policy's pixel tokens are "
            f"{encoder.adapters['pixels'].spec.kind!r} (no place on the image), valid kinds: {list(OVERLAY_KINDS)}"
            " (pixel_tokenizer 'patch', 'conv' or 'keypoints'); --video shows its episodes without the overlay"
        )
    overlay = video and attention_overlay
    if modality_path and encoder is None:
        raise ValueError(
            "--modality-path traces a Perceiver's cross-attention; this policy has none (policy "
            f"{type(model.policy).__name__}): use --reliance, which probes any policy"
        )
    if modality_path and streaming:
        raise ValueError("--modality-path reads whole observations; it cannot be combined with --streaming")
    # the taps before the env: a bad `probe_features` fails before the env starts
    taps = (
        {where: FeatureTap(model, where) for where in check_probe_features(probe_features)}
        if probe_state
        else {}
    )
    try:
        env = make_env_fn(task, **env_kwargs)(render_mode="rgb_array" if video and not overlay else None)
    except BaseException:
        for tap in taps.values():
            tap.close()
        raise
    result = EvalResult()
    frames = []
    features, states = {where: [] for where in taps}, []
    wants_flags = ABSENT_KEY in spaces
    keys = [k for k in spaces if is_input_key(k)]
    probe = RelianceProbe(model, keys, every=reliance_every) if reliance else None
    inputs = EncoderInputTap(encoder) if modality_path else None
    no_flags = np.zeros(spaces[ABSENT_KEY].n, dtype=np.int8) if wants_flags else None
    try:
        with (
            missing_modalities(model, tuple(missing)),
            stream_tokens(model.policy, streaming) as stream,
            seeded_sampling(seed, not deterministic),
        ):
            for episode in range(episodes):
                obs, _ = env.reset(seed=seed + episode)
                done, total, length = False, 0.0, 0
                recurrent_state, episode_start = (
                    None,
                    np.ones(1, dtype=bool),
                )  # an LSTM's state, reset per episode
                episode_features, episode_states = {where: [] for where in taps}, []
                while not done:
                    if wants_flags:  # trained with ModalityDropout: evaluate with every modality present
                        obs[ABSENT_KEY] = no_flags
                    if STATE_KEY not in spaces:
                        state = obs.pop(STATE_KEY, None)
                    for name in blank:
                        obs[name] = np.zeros_like(obs[name])
                    if overlay and episode == 0:
                        encoder.capture_attention = True
                    before = recurrent_state
                    start = time.perf_counter()
                    action, recurrent_state = model.predict(
                        obs, state=recurrent_state, episode_start=episode_start, deterministic=deterministic
                    )
                    result.latencies_ms.append(1000 * (time.perf_counter() - start))
                    if overlay and episode == 0:
                        encoder.capture_attention = False
                        frames.append(attention_on_image(encoder, encoder.last_capture, obs["pixels"]))
                    if taps:  # before the reliance probe's withheld passes overwrite the taps
                        for where, tap in taps.items():
                            episode_features[where].append(tap.after_predict(recurrent_state))
                        episode_states.append(obs[STATE_KEY] if STATE_KEY in obs else state)
                    if inputs is not None:  # before the reliance probe's withheld passes
                        inputs.keep()
                    if probe is not None:
                        probe.step(obs, action, before, episode_start)
                    episode_start = np.zeros(1, dtype=bool)
                    obs, reward, terminated, truncated, _ = env.step(action)
                    if video and not overlay and episode == 0:
                        frames.append(env.render())
                    total += reward
                    length += 1
                    done = terminated or truncated
                result.returns.append(total)
                result.lengths.append(length)
                for where in taps:
                    features[where].append(np.stack(episode_features[where]) if episode_states else None)
                states.append(np.stack(episode_states) if episode_states else None)
        if stream is not None:
            result.stream = stream.stats()
        if probe is not None:
            result.reliance = probe.summary()
            result.actor_regret = probe.actor_regret()
        if inputs is not None:
            inputs.close()
            batch = inputs.batch()
            with missing_modalities(model, tuple(missing)):
                result.modality_path = {
                    key: modality_path_of(encoder, batch, key) for key in encoder.names if key not in missing
                }
        if taps:
            layout, parts = env.unwrapped.state_layout, getattr(env.unwrapped, "state_parts", None)
            result.probe = {}
            for where in taps:
                r2 = state_probe(features[where], states, layout, parts=parts)
                prefix = "" if where == "encoder" else f"{where}/"
                result.probe.update({prefix + name: value for name, value in r2.items()})
            if keep_probe_data:
                result.probe_data = {"features": features, "states": states, "layout": layout, "parts": parts}
    finally:
        env.close()
        for tap in taps.values():
            tap.close()
        if inputs is not None:
            inputs.close()
    if frames:
        result.frames = np.stack(frames)
    return result


@contextlib.contextmanager
def seeded_sampling(seed: int, sampling: bool):
    """While `sampling`: torch's CPU and CUDA generators seeded with `seed`, restored on exit (`fork_rng`)."""
    if not sampling:
        yield
        return
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


def evaluate_tasks(
    model, task: str, env_kwargs: dict, episodes: int, tasks: list[str] | None = None, **kwargs
) -> tuple[EvalResult, dict]:
    """`evaluate_policy` over the tasks of a multi-task run (`tasks`, default all of ``env_kwargs["tasks"]``),
    `episodes` each; for one task, just that task. Returns the pooled result (equal episodes per task: its mean return is the mean over
    tasks; the video is the first task's; reliance averaged over tasks) and {task: summary} (multi-task only)."""
    if not env_kwargs.get("tasks"):
        return evaluate_policy(model, task, env_kwargs, episodes, **kwargs), {}
    tasks = tasks or env_kwargs["tasks"]
    pooled, per_task = EvalResult(), {}
    reliances, paths, regrets = [], [], []
    for index, name in enumerate(tasks):
        options = dict(kwargs, video=kwargs.get("video", False) and index == 0)
        result = evaluate_policy(model, name, env_kwargs, episodes, **options)
        per_task[name] = result.summary()
        pooled.returns += result.returns
        pooled.lengths += result.lengths
        pooled.latencies_ms += result.latencies_ms
        if result.frames is not None:
            pooled.frames = result.frames
        if result.reliance is not None:
            reliances.append(result.reliance)
            regrets.append(result.actor_regret)
        if result.modality_path is not None:
            paths.append(result.modality_path)
    pooled.reliance, pooled.modality_path = mean_per_key(reliances), mean_per_key(paths)
    pooled.actor_regret = float(np.mean(regrets)) if regrets else None
    return pooled, per_task


def mean_per_key(results: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]] | None:
    """{key: {measure: mean over the results}} of per-task {key: {measure: value}}, or None for none."""
    if not results:
        return None
    return {
        key: {part: float(np.mean([r[key][part] for r in results])) for part in results[0][key]}
        for key in results[0]
    }


def write_mp4(path, frames: np.ndarray, fps: int = 30):
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 (imageio + the ffmpeg binary shipped by imageio-ffmpeg)."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path
