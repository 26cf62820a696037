import gymnasium as gym
import numpy as np
import pytest
from gymnasium.error import NameNotFound
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

import envs
from envs import DMCEnv

ALL = ("pixels", "proprio", "action_history")


def make(task="cartpole-swingup", **kwargs):
    kwargs.setdefault("image_size", 32)
    return gym.make(f"dmc/{task}-v0", **kwargs)


def test_every_suite_task_is_registered():
    from dm_control import suite

    for domain, task in suite.ALL_TASKS:
        assert f"dmc/{domain}-{task}-v0" in gym.registry
    assert "dmc/ball_in_cup-catch-v0" in gym.registry


def test_spaces_dtypes_and_shapes():
    env = make(frame_stack=3, action_history_len=5)
    space = env.observation_space
    assert set(space.spaces) == set(ALL)
    assert space["pixels"].shape == (9, 32, 32) and space["pixels"].dtype == np.uint8
    assert space["proprio"].dtype == np.float32 and space["proprio"].shape == (5,)
    assert space["action_history"].shape == (5, 1) and space["action_history"].dtype == np.float32
    assert env.action_space.dtype == np.float32
    obs, info = env.reset(seed=0)
    for key in ALL:
        assert obs[key].shape == space[key].shape and obs[key].dtype == space[key].dtype
        assert space[key].contains(obs[key]) or key == "proprio"
    assert info["env_steps"] == 0 and info["frames"] == 0
    env.close()


def test_only_requested_modalities():
    env = make(modalities=("proprio",))
    assert set(env.observation_space.spaces) == {"proprio"}
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"proprio"}
    env.close()


def test_proprio_layout_matches_dm_control_order():
    env = make("walker-walk", modalities=("proprio",))
    layout = env.unwrapped.proprio_layout
    assert list(layout) == ["orientations", "height", "velocity"]
    assert (
        layout["orientations"] == (0, 14) and layout["height"] == (14, 15) and layout["velocity"] == (15, 24)
    )
    assert env.observation_space["proprio"].layout == layout
    obs, _ = env.reset(seed=3)
    physics = env.unwrapped.physics
    np.testing.assert_allclose(obs["proprio"][14], physics.torso_height(), rtol=1e-6)
    env.close()


def test_action_history_after_steps_and_reset():
    env = make(modalities=("action_history",), action_history_len=3)
    obs, _ = env.reset(seed=0)
    assert np.all(obs["action_history"] == 0)
    actions = [np.array([0.5], np.float32), np.array([-0.25], np.float32), np.array([2.0], np.float32)]
    for action in actions:
        obs, *_ = env.step(action)
    # oldest first; the out-of-bounds action is recorded as applied (clipped)
    np.testing.assert_allclose(obs["action_history"][:, 0], [0.5, -0.25, 1.0])
    obs, _ = env.reset()
    assert np.all(obs["action_history"] == 0)
    env.close()


def test_action_repeat_sums_rewards_and_counts_frames():
    base = make(modalities=("proprio",), action_repeat=1)
    repeat = make(modalities=("proprio",), action_repeat=4)
    base.reset(seed=7)
    repeat.reset(seed=7)
    action = np.array([0.3], np.float32)
    total = sum(base.step(action)[1] for _ in range(4))
    obs_r, reward_r, _, _, info = repeat.step(action)
    assert reward_r == pytest.approx(total, rel=1e-6)
    assert info["env_steps"] == 1 and info["frames"] == 4
    base.close()
    repeat.close()


def test_time_limit_is_truncation_not_termination():
    env = make(modalities=("proprio",), action_repeat=8)
    env.reset(seed=0)
    steps, terminated, truncated = 0, False, False
    while not (terminated or truncated):
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        steps += 1
    assert truncated and not terminated
    assert steps == 125 and info["frames"] == 1000
    env.close()


@pytest.mark.parametrize("backend", ["fast", "dm_control"])
def test_seeded_reset_reproduces_pixels(backend):
    env_a = make(render_backend=backend)
    env_b = make(render_backend=backend)
    obs_a, _ = env_a.reset(seed=42)
    obs_b, _ = env_b.reset(seed=42)
    for key in ALL:
        np.testing.assert_array_equal(obs_a[key], obs_b[key])
    action = np.array([0.7], np.float32)
    for _ in range(3):
        obs_a, *_ = env_a.step(action)
        obs_b, *_ = env_b.step(action)
    np.testing.assert_array_equal(obs_a["pixels"], obs_b["pixels"])
    other, _ = env_a.reset(seed=43)
    assert not np.array_equal(other["proprio"], obs_b["proprio"])
    env_a.close()
    env_b.close()


def test_render_backends_show_the_same_camera():
    fast = make(render_backend="fast", frame_stack=1, image_size=48)
    slow = make(render_backend="dm_control", frame_stack=1, image_size=48)
    a, _ = fast.reset(seed=1)
    b, _ = slow.reset(seed=1)
    # Same camera and geometry; the fast path only drops shadows/reflections/skybox.
    diff = np.abs(a["pixels"].astype(int) - b["pixels"].astype(int)).mean()
    assert a["pixels"].std() > 5 and diff < 60
    frame = fast.render()
    assert frame.shape == (128, 128, 3) and frame.dtype == np.uint8
    fast.close()
    slow.close()


def test_frame_stack_shifts_frames():
    env = make(frame_stack=3)
    obs0, _ = env.reset(seed=0)
    frames = obs0["pixels"].reshape(3, 3, 32, 32)
    assert np.array_equal(frames[0], frames[1]) and np.array_equal(frames[1], frames[2])
    obs1, *_ = env.step(np.array([1.0], np.float32))
    np.testing.assert_array_equal(obs1["pixels"][:6], obs0["pixels"][3:])
    env.close()


@pytest.mark.parametrize("modalities", [("proprio",), ALL])
def test_gymnasium_and_sb3_checkers_pass(modalities):
    env = DMCEnv("cartpole", "balance", modalities=modalities, image_size=32)
    gym_check_env(env, skip_render_check=True)
    sb3_check_env(env, warn=False)
    env.close()


@pytest.mark.parametrize("vec_env_type,cls", [("dummy", DummyVecEnv), ("subproc", SubprocVecEnv)])
def test_make_vec_env(vec_env_type, cls):
    venv = envs.make_vec_env("cartpole-balance", n_envs=2, seed=0, vec_env_type=vec_env_type, image_size=32)
    assert isinstance(venv, cls) and venv.num_envs == 2
    obs = venv.reset()
    assert obs["pixels"].shape == (2, 9, 32, 32)
    obs, rewards, dones, infos = venv.step(np.zeros((2, 1), np.float32))
    assert rewards.shape == (2,) and infos[0]["frames"] == 1
    # different seeds per worker
    assert not np.array_equal(obs["proprio"][0], obs["proprio"][1])
    venv.close()


def test_unknown_task_through_gymnasium_make_names_close_match():
    with pytest.raises(NameNotFound, match="cheetah-run"):
        gym.make("dmc/cheetah-runn-v0")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"domain": "cheeta", "task": "run"}, "unknown domain.*known domains"),
        ({"domain": "cheetah", "task": "fly"}, "unknown task 'cheetah-fly'.*cheetah-run"),
        ({"modalities": ("pixels", "lidar")}, "unknown modalities.*lidar.*valid choices"),
        ({"image_size": 0}, "image_size must be a positive integer, got 0"),
        ({"frame_stack": -1}, "frame_stack must be a positive integer"),
        ({"action_repeat": 0}, "action_repeat must be a positive integer"),
        ({"action_history_len": 0}, "action_history_len must be a positive integer"),
        ({"render_backend": "vulkan"}, "unknown render_backend 'vulkan'.*fast"),
        ({"camera_id": 9}, "camera_id 9 out of range"),
    ],
)
def test_constructor_errors_name_the_value(kwargs, match):
    args = {"domain": "cheetah", "task": "run", "image_size": 32, **kwargs}
    with pytest.raises(ValueError, match=match):
        DMCEnv(**args)


def test_vec_env_errors():
    with pytest.raises(ValueError, match="start_method 'fork'"):
        envs.make_vec_env("cartpole-balance", start_method="fork")
    with pytest.raises(ValueError, match="vec_env_type 'threads'"):
        envs.make_vec_env("cartpole-balance", vec_env_type="threads")
    with pytest.raises(ValueError, match="unknown task 'cartpole-fly'"):
        envs.make_vec_env("cartpole-fly")


def test_missing_gl_backend_explains_the_fix(monkeypatch):
    import envs.rendering as rendering

    class Broken:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("eglInitialize failed")

    import mujoco

    monkeypatch.setattr(mujoco, "Renderer", Broken)
    with pytest.raises(ValueError, match="libegl1 libegl-mesa0 libgl1-mesa-dri.*MUJOCO_GL=egl"):
        DMCEnv("cartpole", "balance", image_size=32)
    assert rendering.RENDER_BACKENDS == ("fast", "dm_control")


@pytest.mark.parametrize("how", ["close", "garbage-collected"])
def test_freeing_one_renderer_leaves_another_renderers_frames_intact(how):
    """MuJoCo frees a renderer's GL objects in whichever context is current; an env closed or collected while
    another env's context was current used to delete that env's framebuffer (its frames changed for good)."""
    import gc

    first = DMCEnv("cartpole", "balance", image_size=32)
    first.reset(seed=0)
    frame = first._render_frame()
    second = DMCEnv("cartpole", "balance", image_size=32)
    second.reset(seed=1)
    first._render_frame()  # the first env's context is now the current one
    if how == "close":
        second.close()
    else:
        cycle = [second]
        cycle.append(cycle)
        del second, cycle
        gc.collect()
    np.testing.assert_array_equal(first._render_frame(), frame)
    first.close()


def test_modality_dropout_wrapper_flags_and_reproducibility():
    from envs import ABSENT_KEY, ModalityDropout

    env = ModalityDropout(DMCEnv("cartpole", "balance", image_size=32), probability=0.5)
    assert ABSENT_KEY in env.observation_space.spaces
    obs, _ = env.reset(seed=5)
    flags = [obs[ABSENT_KEY]]
    for _ in range(200):
        obs, *_ = env.step(env.action_space.sample())
        flags.append(obs[ABSENT_KEY])
    flags = np.stack(flags)
    assert flags.shape == (201, 3) and not flags.all(axis=1).any()  # never every modality
    assert 0.3 < flags.mean() < 0.55
    again, _ = env.reset(seed=5)
    np.testing.assert_array_equal(again[ABSENT_KEY], flags[0])
    with pytest.raises(ValueError, match="probability must be in \\(0, 1\\), got 1.5"):
        ModalityDropout(env.env, probability=1.5)
    env.close()
