import pickle

import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import DictReplayBuffer, DictRolloutBuffer

from agents import DeviceRolloutBuffer, FrameReplayBuffer
from agents.augment import random_shift, shifted_windows

OBS = spaces.Dict(
    {
        "pixels": spaces.Box(0, 255, (6, 4, 4), np.uint8),
        "proprio": spaces.Box(-np.inf, np.inf, (3,), np.float32),
    }
)
ACT = spaces.Box(-1, 1, (2,), np.float32)


def random_obs(rng, n_envs):
    return {
        "pixels": rng.integers(0, 256, (n_envs, 6, 4, 4), dtype=np.uint8),
        "proprio": rng.standard_normal((n_envs, 3)).astype(np.float32),
    }


def test_device_rollout_buffer_matches_sb3():
    rng = np.random.default_rng(0)
    n_steps, n_envs = 7, 3
    ours = DeviceRolloutBuffer(n_steps, OBS, ACT, device="cpu", gamma=0.97, gae_lambda=0.9, n_envs=n_envs)
    theirs = DictRolloutBuffer(n_steps, OBS, ACT, device="cpu", gamma=0.97, gae_lambda=0.9, n_envs=n_envs)
    for _ in range(n_steps):
        obs = random_obs(rng, n_envs)
        action = rng.standard_normal((n_envs, 2)).astype(np.float32)
        reward = rng.standard_normal(n_envs).astype(np.float32)
        start = rng.random(n_envs) < 0.3
        value = torch.as_tensor(rng.standard_normal((n_envs, 1)).astype(np.float32))
        log_prob = torch.as_tensor(rng.standard_normal(n_envs).astype(np.float32))
        ours.add(
            {k: torch.as_tensor(v) for k, v in obs.items()},
            torch.as_tensor(action),
            reward,
            start,
            value,
            log_prob,
        )
        theirs.add(obs, action, reward, start, value, log_prob)
    last_values = torch.as_tensor(rng.standard_normal((n_envs, 1)).astype(np.float32))
    dones = rng.random(n_envs) < 0.5
    ours.compute_returns_and_advantage(last_values, dones)
    theirs.compute_returns_and_advantage(last_values, dones)
    np.testing.assert_allclose(ours.advantages, theirs.advantages, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.returns, theirs.returns, rtol=1e-5, atol=1e-5)
    # one full batch holds the same transitions (order aside)
    a = next(ours.get(None))
    b = next(theirs.get(None))
    assert a.observations["pixels"].dtype == torch.uint8
    key_a = torch.argsort(a.returns)
    key_b = torch.argsort(b.returns)
    torch.testing.assert_close(a.returns[key_a], b.returns[key_b])
    torch.testing.assert_close(a.actions[key_a], b.actions[key_b])
    torch.testing.assert_close(
        a.observations["pixels"][key_a].float(), b.observations["pixels"][key_b].float()
    )
    torch.testing.assert_close(a.old_log_prob[key_a], b.old_log_prob[key_b])
    sizes = [len(batch.returns) for batch in ours.get(8)]
    assert sum(sizes) == n_steps * n_envs and max(sizes) == 8


class StackedEpisodes:
    """Generates frame-stacked observations like envs.DMCEnv: reset stacks repeat the first frame."""

    def __init__(self, n_envs, rng, frame_stack=2):
        self.rng, self.n_envs, self.k = rng, n_envs, frame_stack
        self.frames = [[self._frame()] * frame_stack for _ in range(n_envs)]

    def _frame(self):
        return self.rng.integers(0, 256, (3, 4, 4), dtype=np.uint8)

    def obs(self):
        return {
            "pixels": np.stack([np.concatenate(f[-self.k :]) for f in self.frames]),
            "proprio": self.rng.standard_normal((self.n_envs, 3)).astype(np.float32),
        }

    def step(self):
        for f in self.frames:
            f.append(self._frame())
        return self.obs()

    def reset(self, env):
        self.frames[env] = [self._frame()] * self.k


def test_frame_replay_returns_exactly_what_was_stored_across_episode_ends_and_timeouts():
    rng = np.random.default_rng(1)
    n_envs, steps = 2, 40
    buffer = FrameReplayBuffer(1000, OBS, ACT, device="cpu", n_envs=n_envs)
    source = StackedEpisodes(n_envs, rng)
    obs = source.obs()
    stored = []
    for t in range(steps):
        next_obs = source.step()
        action = rng.uniform(-1, 1, (n_envs, 2)).astype(np.float32)
        reward = rng.standard_normal(n_envs).astype(np.float32)
        done = np.array([t % 7 == 6, t % 11 == 10])
        timeout = np.array([t % 14 == 13, False])  # env 0: every other episode end is a time limit
        infos = [{"TimeLimit.truncated": bool(timeout[e])} for e in range(n_envs)]
        buffer.add(obs, next_obs, action, reward, done, infos)
        stored.append((obs, next_obs, action, reward, done & ~timeout))
        obs = {k: v.copy() for k, v in next_obs.items()}
        for env in np.flatnonzero(done):
            source.reset(env)
            fresh = source.obs()
            obs["pixels"][env] = fresh["pixels"][env]
            obs["proprio"][env] = fresh["proprio"][env]
    index = np.repeat(np.arange(steps), n_envs)
    envs_ = np.tile(np.arange(n_envs), steps)
    sample = buffer._get_samples(index, envs_)
    for i, (t, e) in enumerate(zip(index, envs_)):
        o, no, a, r, d = stored[t]
        np.testing.assert_array_equal(sample.observations["pixels"][i].numpy(), o["pixels"][e])
        np.testing.assert_array_equal(sample.next_observations["pixels"][i].numpy(), no["pixels"][e])
        np.testing.assert_array_equal(sample.observations["proprio"][i].numpy(), o["proprio"][e])
        np.testing.assert_array_equal(sample.actions[i].numpy(), a[e])
        assert float(sample.rewards[i]) == pytest.approx(float(r[e]))
        assert float(sample.dones[i]) == float(d[e])
    random_batch = buffer.sample(16)
    assert random_batch.observations["pixels"].shape == (16, 6, 4, 4)
    restored = pickle.loads(pickle.dumps(buffer))  # what a checkpoint holds
    restored.set_device("cpu")
    again = restored._get_samples(index, envs_)
    assert torch.equal(again.observations["pixels"], sample.observations["pixels"])
    assert torch.equal(again.next_observations["proprio"], sample.next_observations["proprio"])


def test_frame_replay_never_samples_overwritten_frames():
    rng = np.random.default_rng(2)
    buffer = FrameReplayBuffer(20, OBS, ACT, device="cpu", n_envs=1)
    source = StackedEpisodes(1, rng)
    obs = source.obs()
    history = {}
    for t in range(75):
        next_obs = source.step()
        done = np.array([t % 3 == 2])  # very short episodes: frames outrun transitions
        buffer.add(obs, next_obs, np.zeros((1, 2), np.float32), np.zeros(1), done, [{}])
        history[(t % 20)] = (obs["pixels"][0].copy(), next_obs["pixels"][0].copy())
        obs = next_obs
        if done[0]:
            source.reset(0)
            obs = source.obs()
    for _ in range(5):
        index = np.random.randint(0, 20, size=32)
        valid = buffer._valid(index, np.zeros(32, dtype=int))
        sample = buffer._get_samples(index[valid], np.zeros(int(valid.sum()), dtype=int))
        for i, t in enumerate(index[valid]):
            np.testing.assert_array_equal(sample.observations["pixels"][i].numpy(), history[t][0])
            np.testing.assert_array_equal(sample.next_observations["pixels"][i].numpy(), history[t][1])


def test_frame_replay_memory_is_a_fraction_of_sb3():
    space = spaces.Dict(
        {"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8), "proprio": spaces.Box(-1, 1, (5,), np.float32)}
    )
    ours = FrameReplayBuffer(10_000, space, ACT, device="cpu")
    theirs = DictReplayBuffer(10_000, space, ACT, device="cpu")
    theirs_bytes = sum(a.nbytes for a in theirs.observations.values()) + sum(
        a.nbytes for a in theirs.next_observations.values()
    )
    assert ours.nbytes() / theirs_bytes < 0.2


def test_frame_replay_rejects_non_stacked_inputs():
    buffer = FrameReplayBuffer(10, OBS, ACT, device="cpu")
    rng = np.random.default_rng(0)
    buffer.add(random_obs(rng, 1), random_obs(rng, 1), np.zeros((1, 2)), np.zeros(1), np.array([False]), [{}])
    with pytest.raises(ValueError, match="shifted by one frame"):
        buffer.add(
            random_obs(rng, 1), random_obs(rng, 1), np.zeros((1, 2)), np.zeros(1), np.array([False]), [{}]
        )
    with pytest.raises(ValueError, match="needs a Dict observation space with a 'pixels' key"):
        FrameReplayBuffer(10, spaces.Dict({"proprio": OBS["proprio"]}), ACT, device="cpu")


def test_random_shift_is_a_replicate_padded_crop():
    torch.manual_seed(0)
    x = torch.randint(0, 256, (5, 6, 16, 16), dtype=torch.uint8)
    y = random_shift(x, pad=4)
    assert y.shape == x.shape and y.dtype == torch.uint8
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="replicate")
    for b in range(5):  # each output is some 16x16 window of the padded image
        windows = padded[b].unfold(1, 16, 1).unfold(2, 16, 1)  # (C, 9, 9, 16, 16)
        match = (windows == y[b].float()[:, None, None]).all(-1).all(-1).all(0)
        assert match.any()
    assert torch.equal(random_shift(x, pad=0), x)


def test_shifted_windows_equal_clamped_index_gather():
    x = torch.randint(0, 256, (64, 9, 20, 24), dtype=torch.uint8)
    offsets = torch.randint(0, 9, (2, 64))
    offsets[:, :2] = torch.tensor([[0, 8], [8, 0]])  # both extreme corners
    rows = (torch.arange(20) + offsets[0, :, None] - 4).clamp(0, 19)  # (B, H): replicate padding = clamping
    cols = (torch.arange(24) + offsets[1, :, None] - 4).clamp(0, 23)  # (B, W)
    expected = x[
        torch.arange(64)[:, None, None, None],
        torch.arange(9)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
    assert torch.equal(shifted_windows(x, offsets, 4), expected)
    assert torch.equal(shifted_windows(x, torch.full((2, 64), 4), 4), x)  # centre window: no shift


@pytest.mark.parametrize("n_envs", [1, 3])
def test_frame_replay_sample_draws_only_valid_transitions_at_a_full_ring(n_envs):
    """Very short episodes make frames outrun transitions: the oldest stored transitions lose their frames.
    `sample` must draw only the valid ones, every time, and reach all of them."""
    rng = np.random.default_rng(3)
    buffer = FrameReplayBuffer(20, OBS, ACT, device="cpu", n_envs=n_envs, frame_margin=0.0)
    source = StackedEpisodes(n_envs, rng)
    obs, history = source.obs(), {}
    for t in range(75):
        next_obs = source.step()
        done = np.full(n_envs, t % 3 == 2)
        buffer.add(obs, next_obs, np.zeros((n_envs, 2), np.float32), np.zeros(n_envs), done, [{}] * n_envs)
        for e in range(n_envs):
            history[(t % 20, e)] = (obs["pixels"][e].copy(), next_obs["pixels"][e].copy())
        obs = next_obs
        if done[0]:
            for e in range(n_envs):
                source.reset(e)
            obs = source.obs()
    assert buffer.full
    every = np.array([(i, e) for i in range(20) for e in range(n_envs)])
    valid = buffer._valid(every[:, 0], every[:, 1])
    assert 0 < valid.sum() < len(every)  # the ring really holds overwritten transitions
    drawn, real = [], buffer._get_samples

    def record(index, env_index, env=None):
        drawn.extend(zip(index.tolist(), env_index.tolist()))
        return real(index, env_index)

    buffer._get_samples = record
    for _ in range(40):
        start = len(drawn)
        sample = buffer.sample(32)
        for i, (t, e) in enumerate(drawn[start:]):
            np.testing.assert_array_equal(sample.observations["pixels"][i].numpy(), history[(t, e)][0])
            np.testing.assert_array_equal(sample.next_observations["pixels"][i].numpy(), history[(t, e)][1])
    assert set(drawn) == {tuple(p) for p in every[valid]}


@pytest.mark.parametrize("kind", ["frames", "sb3"])
def test_replay_snapshot_round_trips_in_place_and_saves_only_the_filled_part(tmp_path, kind):
    from stable_baselines3.common.buffers import DictReplayBuffer

    from experiments.replay_snapshot import list_snapshots, load_replay_snapshot, save_replay_snapshot

    rng = np.random.default_rng(4)
    make = (lambda: FrameReplayBuffer(500, OBS, ACT, device="cpu", n_envs=2)) if kind == "frames" else (
        lambda: DictReplayBuffer(500, OBS, ACT, device="cpu", n_envs=2))  # fmt: skip
    buffer, source = make(), StackedEpisodes(2, rng)
    obs = source.obs()
    for t in range(30):
        next_obs = source.step()
        done = np.array([t % 7 == 6, False])
        buffer.add(
            obs, next_obs, rng.standard_normal((2, 2)).astype(np.float32), rng.random(2), done, [{}, {}]
        )
        obs = next_obs
        if done[0]:
            source.reset(0)
            obs = source.obs()
    snapshot = save_replay_snapshot(buffer, tmp_path, step=60)
    save_replay_snapshot(buffer, tmp_path, step=60)  # the same step again: one snapshot remains
    assert (
        list_snapshots(tmp_path) == [p for p in tmp_path.glob("replay_*")]
        and len(list_snapshots(tmp_path)) == 1
    )
    size = sum(f.stat().st_size for f in list_snapshots(tmp_path)[0].iterdir())
    from experiments.replay_snapshot import _state

    total = sum(
        v.numel() * v.element_size() if torch.is_tensor(v) else v.nbytes for v in _state(buffer)[0].values()
    )
    assert size < 0.2 * total  # 30 of 500 rows filled: only those are written
    fresh = make()
    arrays_before = id(fresh.observations["proprio"])
    assert load_replay_snapshot(fresh, list_snapshots(tmp_path)[0]) == 60
    assert id(fresh.observations["proprio"]) == arrays_before  # copied into the buffer it had, not replaced
    before, after = _state(buffer)[0], _state(fresh)[0]
    for key, value in before.items():  # every array, byte for byte
        assert np.array_equal(np.asarray(value), np.asarray(after[key])), key
    if kind == "frames":
        index, envs_ = np.arange(30), np.array([0, 1] * 15)
        a, b = buffer._get_samples(index, envs_), fresh._get_samples(index, envs_)
        assert torch.equal(a.observations["pixels"], b.observations["pixels"])
        assert torch.equal(a.next_observations["pixels"], b.next_observations["pixels"])
    assert fresh.pos == buffer.pos and snapshot.name.startswith("replay_")


def test_batched_collection_equals_sb3_collection_across_a_time_limit():
    """The same seed gives the same rollout through our batched path (DeviceRolloutBuffer, the CUDA default) as
    through SB3's (DictRolloutBuffer, the CPU default): observations, actions, rewards with the time-limit
    bootstrap, advantages and returns."""
    from stable_baselines3.common.buffers import DictRolloutBuffer
    from stable_baselines3.common.callbacks import BaseCallback

    import agents
    import envs

    class Null(BaseCallback):
        def _on_step(self):
            return True

    buffers = {}
    for name, buffer_class in (("ours", DeviceRolloutBuffer), ("sb3", DictRolloutBuffer)):
        venv = envs.make_vec_env("cartpole-balance", n_envs=2, seed=3, image_size=32, action_repeat=8)
        model = agents.make_agent("ppo", venv, device="cpu", seed=3, n_steps=130, batch_size=26,
                                  rollout_buffer_class=buffer_class, perceiver={"num_latents": 8, "latent_dim": 32})  # fmt: skip
        assert isinstance(model.rollout_buffer, buffer_class)
        # The two paths hand the policy the same observations in differently aligned memory (SB3 wraps numpy
        # arrays, ours copies into torch buffers), so a matmul may differ in its last bit, and the unstable
        # cart-pole plus pixel quantisation amplifies any difference over a 10 s episode. So the actions come
        # from one seeded sequence on a 1e-3 grid, the same in both paths, and the values from the policy: what
        # is compared is the collection, not the matmul.
        forward, draws = model.policy.forward, torch.Generator().manual_seed(7)

        def on_grid(obs, deterministic=False, forward=forward, draws=draws):
            actions, values, log_probs = forward(obs, deterministic)
            drawn = torch.randint(-1000, 1001, actions.shape, generator=draws).to(actions.dtype) / 1000
            return drawn, values, log_probs

        model.policy.forward = on_grid
        model._setup_learn(130 * 2, Null())
        callback = Null()
        callback.init_callback(model)
        model.collect_rollouts(model.env, callback, model.rollout_buffer, 130)  # an episode is 125 steps
        buffers[name] = model.rollout_buffer
        venv.close()
    ours, sb3 = buffers["ours"], buffers["sb3"]
    np.testing.assert_allclose(sb3.actions * 1000, np.round(sb3.actions * 1000), atol=1e-3)  # on the grid
    for key in sb3.observations:
        np.testing.assert_array_equal(ours.observations[key].numpy(), sb3.observations[key])
    np.testing.assert_allclose(ours.actions.numpy(), sb3.actions, atol=1e-6)
    np.testing.assert_allclose(ours.values, sb3.values, atol=1e-5)
    np.testing.assert_allclose(ours.advantages, sb3.advantages, atol=1e-4)
    np.testing.assert_allclose(ours.returns, sb3.returns, atol=1e-4)


def test_default_rollout_buffer_is_sb3s_on_cpu():
    from stable_baselines3.common.buffers import DictRolloutBuffer

    import agents
    import envs

    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio",))
    model = agents.make_agent(
        "ppo", venv, device="cpu", n_steps=16, perceiver={"num_latents": 8, "latent_dim": 32}
    )
    assert type(model.rollout_buffer) is DictRolloutBuffer


@pytest.mark.parametrize("collect_threads,expected", [(1, 1), (None, 2)])
def test_collection_runs_with_collect_threads_and_restores_torchs_setting(collect_threads, expected):
    from stable_baselines3.common.callbacks import BaseCallback

    import agents
    import envs

    seen = []

    class Record(BaseCallback):  # callbacks run inside the collection
        def _on_step(self):
            seen.append(torch.get_num_threads())
            return True

    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio",))
    model = agents.make_agent("ppo", venv, device="cpu", n_steps=16, batch_size=16, collect_threads=collect_threads,
                              perceiver={"num_latents": 8, "latent_dim": 32})  # fmt: skip
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        model.learn(32, callback=Record())
        assert set(seen) == {expected} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
