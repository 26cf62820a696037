"""Streaming inference (perceiver_policy.streaming) acts exactly as the full forward, episode after episode."""

import numpy as np
import pytest
import torch

import agents
import envs
from envs.vec import make_env_fn
from perceiver_policy.streaming import streaming

TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4}
MODALITIES = ("pixels", "proprio", "action_history", "proprio_history")
ENV = {"image_size": 32, "action_repeat": 8, "action_history_len": 4, "proprio_history_len": 3}


def make_model(algorithm: str, **perceiver):
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=MODALITIES, seed=0, **ENV)
    extra = {"n_steps": 16} if algorithm == "ppo" else {"learning_starts": 16, "buffer_size": 100}
    return agents.make_agent(algorithm, venv, device="cpu", perceiver={**TINY, **perceiver}, **extra)


def stack(observations):
    return {key: np.stack([obs[key] for obs in observations]) for key in observations[0]}


@pytest.mark.parametrize(
    "algorithm,kinds,perceiver",
    [
        ("sac", ("image",), {}),
        ("ppo", ("image", "sequence"), {}),
        ("sac", ("image",), {"image_centering": "running"}),  # one mean frame for every frame of the stack
    ],
)
def test_streaming_equals_full_forward_over_episodes_with_staggered_resets(algorithm, kinds, perceiver):
    """Two envs stepped as one batch, the second started 5 steps later, so their resets fall on different
    steps; a stretch with the camera disabled (a missing modality) in the middle. Frame stacks stream bit for
    bit (a closed-loop episode would amplify any difference into another trajectory)."""
    model = make_model(algorithm, **perceiver)
    if perceiver:
        adapter = model.policy.encoder.adapters["pixels"]
        adapter.mean_frame.copy_(
            torch.rand(adapter.mean_frame.shape, generator=torch.Generator().manual_seed(0)) * 255
        )
    env_a, env_b = (make_env_fn("cartpole-balance", modalities=MODALITIES, **ENV)() for _ in range(2))
    obs_a, _ = env_a.reset(seed=1)
    rng = np.random.default_rng(0)
    encoder = model.policy.encoder
    steps = 160  # an episode is 1000 / 8 = 125 steps: env_a resets at 125, env_b at 130
    checked = 0
    with streaming(model.policy, kinds=kinds) as stream:
        obs_b = None
        for step in range(steps):
            if step == 5:
                obs_b, _ = env_b.reset(seed=2)
            current = [obs_a] if obs_b is None else [obs_a, obs_b]
            batch = stack(current)
            encoder.disabled_modalities = {"pixels"} if 40 <= step < 50 else set()
            encoder.token_cache = None
            expected, _ = model.predict(batch, deterministic=True)
            encoder.token_cache = stream
            actual, _ = model.predict(batch, deterministic=True)
            if kinds == ("image",):
                np.testing.assert_array_equal(actual, expected)
            else:
                np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
            checked += len(current)
            actions = rng.uniform(-1, 1, (len(current), 1)).astype(
                np.float32
            )  # explores more than `expected`
            stepped = []
            for env, action in zip([env_a, env_b], actions):
                obs, _, terminated, truncated, _ = env.step(action)
                if terminated or truncated:
                    obs, _ = env.reset()
                stepped.append(obs)
            obs_a = stepped[0]
            obs_b = stepped[1] if len(stepped) > 1 else None
        stats = stream.stats()
    encoder.disabled_modalities = set()
    assert encoder.token_cache is None  # the context restores the plain encoder
    assert checked == 2 * steps - 5
    assert 0.5 < stats["stream_cache_hit_rate"] < 1.0 and 0.5 < stats["stream_window_overlap"] < 1.0


@pytest.mark.parametrize("with_histories", [False, True])
def test_streaming_reuses_exactly_the_overlapping_tokens(with_histories):
    """S steps of one episode: every step after the first reuses F-1 frames of P patches (and T-1 steps of each
    history when histories stream); proprio's N sensor tokens are always embedded."""
    model = make_model("ppo")
    encoder = model.policy.encoder
    env = make_env_fn("cartpole-balance", modalities=MODALITIES, **ENV)()
    obs, _ = env.reset(seed=0)
    steps = 5
    kinds = ("image", "sequence") if with_histories else ("image",)
    with streaming(model.policy, kinds=kinds) as stream:
        for _ in range(steps):
            action, _ = model.predict(obs, deterministic=True)
            obs, *_ = env.step(action)
    tokens = encoder.num_tokens
    frames = 3
    windows = [frames] + ([ENV["action_history_len"], ENV["proprio_history_len"]] if with_histories else [])
    per_window_tokens = [tokens["pixels"] // frames] + [1] * (len(windows) - 1)
    reused = (steps - 1) * sum((w - 1) * p for w, p in zip(windows, per_window_tokens))
    assert stream.stats()["stream_cache_hit_rate"] == pytest.approx(reused / (steps * sum(tokens.values())))
    overlap = (steps - 1) * sum((w - 1) / w for w in windows)
    assert stream.stats()["stream_window_overlap"] == pytest.approx(overlap / (len(windows) * steps))


def test_streaming_applies_to_frame_stacks_by_default():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=("proprio", "action_history"), seed=0)
    model = agents.make_agent("ppo", venv, device="cpu", perceiver=TINY, n_steps=16)
    with streaming(model.policy) as stream:
        assert stream is None  # no frame stack: nothing to gain by default
    with streaming(model.policy, kinds=("sequence",)) as stream:
        assert stream is not None
    with pytest.raises(ValueError, match="cannot stream modality kinds \\['vector'\\]"):
        with streaming(model.policy, kinds=("vector",)):
            pass


def test_streaming_is_ignored_in_training_and_with_grad():
    model = make_model("ppo")
    policy, encoder = model.policy, model.policy.encoder
    obs, _ = policy.obs_to_tensor(model.env.reset())
    with streaming(policy) as stream:
        policy.set_training_mode(True)
        encoder(obs)
        policy.set_training_mode(False)
        encoder(obs)  # grad enabled: a training-style forward
        assert stream.total_tokens == 0
        with torch.no_grad():
            encoder(obs)
        assert stream.total_tokens == sum(encoder.num_tokens.values())


def test_streaming_a_policy_without_perceiver_changes_nothing():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=("proprio",), seed=0)
    model = agents.make_agent("ppo", venv, device="cpu", policy_type="sb3", n_steps=16)
    with streaming(model.policy) as stream:
        assert stream is None


def test_closed_loop_evaluation_is_identical_with_and_without_streaming():
    from experiments.evaluation import evaluate_policy

    model = make_model("sac")
    kwargs = {"modalities": MODALITIES, **ENV}
    streamed = evaluate_policy(model, "cartpole-swingup", kwargs, episodes=1, seed=5, streaming=True)
    full = evaluate_policy(model, "cartpole-swingup", kwargs, episodes=1, seed=5, streaming=False)
    assert streamed.returns == full.returns and streamed.stream["stream_cache_hit_rate"] > 0.5
    assert full.stream is None
