"""Deterministic evaluation episodes with per-step policy latency, shared by training and `experiments.evaluate`."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import numpy as np

from envs.vec import make_env_fn
from envs.wrappers import ABSENT_KEY


@dataclass
class EvalResult:
    returns: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    frames: np.ndarray | None = None
    """(T, H, W, 3) uint8 of the first episode when a video was asked for."""

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
    return getattr(model.policy, "encoder", None)


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


def evaluate_policy(
    model,
    task: str,
    env_kwargs: dict,
    episodes: int,
    seed: int = 10_000,
    video: bool = False,
    missing: tuple[str, ...] = (),
) -> EvalResult:
    """Run `episodes` deterministic episodes of `task` one by one, timing every `model.predict` call."""
    env = make_env_fn(task, **env_kwargs)(render_mode="rgb_array" if video else None)
    result = EvalResult()
    frames = []
    spaces = getattr(model.observation_space, "spaces", {})
    wants_flags = ABSENT_KEY in spaces
    no_flags = np.zeros(spaces[ABSENT_KEY].n, dtype=np.int8) if wants_flags else None
    try:
        with missing_modalities(model, tuple(missing)):
            for episode in range(episodes):
                obs, _ = env.reset(seed=seed + episode)
                done, total, length = False, 0.0, 0
                while not done:
                    if wants_flags:  # trained with ModalityDropout: evaluate with every modality present
                        obs[ABSENT_KEY] = no_flags
                    start = time.perf_counter()
                    action, _ = model.predict(obs, deterministic=True)
                    result.latencies_ms.append(1000 * (time.perf_counter() - start))
                    obs, reward, terminated, truncated, _ = env.step(action)
                    if video and episode == 0:
                        frames.append(env.render())
                    total += reward
                    length += 1
                    done = terminated or truncated
                result.returns.append(total)
                result.lengths.append(length)
    finally:
        env.close()
    if frames:
        result.frames = np.stack(frames)
    return result


def write_mp4(path, frames: np.ndarray, fps: int = 30):
    """Encode (T, H, W, 3) uint8 frames as H.264 mp4 (imageio + the ffmpeg binary shipped by imageio-ffmpeg)."""
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(frame)
    return path
