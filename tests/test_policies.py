import pickle
import pydoc
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import A2C, PPO

import agents
import envs
from agents.augment import shifted_windows
from perceiver_policy import PerceiverActorCriticPolicy, PerceiverSACPolicy

TINY = {"num_latents": 8, "latent_dim": 32, "patch_size": 8, "fourier_bands": 4}


def pixel_env(n_envs=2, **kwargs):
    return envs.make_vec_env(
        "cartpole-balance", n_envs=n_envs, seed=0, image_size=32, action_repeat=4, **kwargs
    )


def state_env(n_envs=2):
    return envs.make_vec_env(
        "cartpole-balance", n_envs=n_envs, seed=0, modalities=("proprio", "action_history")
    )


@pytest.mark.parametrize("make_env", [pixel_env, state_env], ids=["pixels", "states"])
@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "sac"])
def test_learn_a_few_hundred_steps(make_env, algorithm):
    venv = make_env()
    extra = (
        {"learning_starts": 64, "batch_size": 32, "buffer_size": 2000}
        if algorithm == "sac"
        else {"n_steps": 32}
    )
    model = agents.make_agent(algorithm, venv, perceiver=TINY, device="cpu", seed=0, **extra)
    before = [p.detach().clone() for p in model.policy.parameters()]
    model.learn(256)
    assert model.num_timesteps >= 256
    changed = [not torch.equal(a, b) for a, b in zip(before, model.policy.parameters())]
    assert sum(changed) > len(changed) // 2
    venv.close()


@pytest.mark.parametrize("algo_cls", [PPO, A2C, agents.PerceiverPPO])
def test_sb3_algorithms_unchanged_and_save_load_round_trip(tmp_path, algo_cls):
    venv = pixel_env()
    extra = {} if algo_cls is A2C else {"batch_size": 32}  # = n_steps * n_envs: no truncated minibatch
    model = algo_cls(
        PerceiverActorCriticPolicy, venv, n_steps=16, device="cpu", policy_kwargs={"perceiver": TINY}, **extra
    )
    model.learn(64)
    obs = venv.reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = algo_cls.load(tmp_path / "model.zip", device="cpu")
    np.testing.assert_array_equal(actions, loaded.predict(obs, deterministic=True)[0])
    single = {k: v[0] for k, v in obs.items()}
    single_action, _ = loaded.predict(single, deterministic=True)
    assert single_action.shape == (1,)
    np.testing.assert_allclose(single_action, actions[0], atol=1e-6)
    venv.close()


def test_sac_save_load_round_trip(tmp_path):
    venv = pixel_env()
    model = agents.make_agent(
        "sac", venv, perceiver=TINY, device="cpu", learning_starts=32, batch_size=16, buffer_size=500
    )
    model.learn(64)
    obs = venv.reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "sac.zip")
    loaded = agents.PerceiverSAC.load(tmp_path / "sac.zip", device="cpu")
    np.testing.assert_array_equal(actions, loaded.predict(obs, deterministic=True)[0])
    venv.close()


def test_checkpoint_with_pre_rename_layer_norm_names_still_loads():
    venv = pixel_env()
    model = agents.make_agent("sac", venv, perceiver=TINY, device="cpu", buffer_size=100)
    old_names = {  # the cross-attention layer-norm names of checkpoints saved before the shared base class
        "encoder.cross_attention.query_norm.": "encoder.cross_attention.latent_norm.",
        "encoder.cross_attention.context_norm.": "encoder.cross_attention.token_norm.",
        "decoder.attend.context_norm.": "decoder.attend.latent_norm.",
    }
    legacy = {}
    for key, value in model.policy.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        legacy[key] = value
    assert sum("latent_norm" in k or "token_norm" in k for k in legacy) == 10
    fresh = agents.make_agent("sac", venv, perceiver=TINY, device="cpu", buffer_size=100, seed=1)
    fresh.policy.load_state_dict(legacy)  # strict: every current parameter found, nothing left over
    obs = venv.reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], fresh.predict(obs, deterministic=True)[0]
    )
    venv.close()


def test_policy_importable_by_dotted_path():
    assert pydoc.locate("perceiver_policy.PerceiverActorCriticPolicy") is PerceiverActorCriticPolicy
    assert pydoc.locate("perceiver_policy.PerceiverSACPolicy") is PerceiverSACPolicy


def test_ortho_init_does_not_touch_the_perceiver():
    venv = state_env(1)
    torch.manual_seed(0)
    a = PPO(
        PerceiverActorCriticPolicy, venv, device="cpu", policy_kwargs={"perceiver": TINY, "ortho_init": True}
    )
    torch.manual_seed(0)
    b = PPO(
        PerceiverActorCriticPolicy, venv, device="cpu", policy_kwargs={"perceiver": TINY, "ortho_init": False}
    )
    for (name, pa), pb in zip(
        a.policy.features_extractor.named_parameters(), b.policy.features_extractor.parameters()
    ):
        assert torch.equal(pa, pb), name
    # the Perceiver's truncated-normal init: |w| <= 2 / sqrt(fan_in)
    weight = a.policy.encoder.cross_attention.kv.weight
    assert weight.abs().max() <= 2 * weight.shape[1] ** -0.5 + 1e-6
    # while the heads did get SB3's orthogonal init (small action head)
    assert not torch.equal(a.policy.action_net.weight, b.policy.action_net.weight)
    venv.close()


def test_state_dependent_log_std():
    venv = state_env(1)
    model = PPO(
        PerceiverActorCriticPolicy,
        venv,
        device="cpu",
        policy_kwargs={"perceiver": TINY, "log_std_mode": "state"},
    )
    assert not hasattr(model.policy, "log_std")
    obs = model.policy.obs_to_tensor(venv.reset())[0]
    dist = model.policy.get_distribution(obs)
    assert dist.distribution.stddev.shape == (1, 1)
    venv.close()


def test_pixels_scaled_once():
    venv = pixel_env(1)
    model = PPO(
        PerceiverActorCriticPolicy,
        venv,
        device="cpu",
        policy_kwargs={"perceiver": TINY, "normalize_images": True},
    )
    assert model.policy.normalize_images is False  # the image adapter scales; SB3 must not scale again
    obs = model.policy.obs_to_tensor(venv.reset())[0]
    assert obs["pixels"].dtype == torch.uint8
    venv.close()


class Chain(gym.Env):
    """A small Discrete-action env with a Dict observation: move right to get reward."""

    observation_space = spaces.Dict(
        {"position": spaces.Box(0, 1, (1,), np.float32), "history": spaces.Box(0, 1, (3, 2), np.float32)}
    )
    action_space = spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.x = 0
        return self._obs(), {}

    def _obs(self):
        return {"position": np.array([self.x / 5], np.float32), "history": np.zeros((3, 2), np.float32)}

    def step(self, action):
        self.x = min(max(self.x + (1 if action == 1 else -1), 0), 5)
        return self._obs(), float(self.x == 5), self.x == 5, False, {}


def test_discrete_actions_work():
    model = agents.make_agent("ppo", Chain(), perceiver=TINY, device="cpu", n_steps=32, batch_size=32)
    model.learn(64)
    action, _ = model.predict(Chain().reset(seed=0)[0])
    assert action in (0, 1)


@pytest.mark.parametrize(
    "obs_space,act_space,match",
    [
        (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (1,)), "needs a gymnasium Dict observation space"),
        (
            Chain.observation_space,
            spaces.MultiBinary(3),
            "supports Box and Discrete action spaces, got MultiBinary",
        ),
    ],
)
def test_unsupported_spaces_name_the_space(obs_space, act_space, match):
    with pytest.raises(ValueError, match=match):
        PerceiverActorCriticPolicy(obs_space, act_space, lambda _: 3e-4, perceiver=TINY)


def test_sac_policy_rejects_discrete_actions():
    with pytest.raises(ValueError, match="needs a Box action space, got Discrete"):
        PerceiverSACPolicy(Chain.observation_space, spaces.Discrete(2), lambda _: 3e-4, perceiver=TINY)


def test_factory_errors():
    venv = state_env(1)
    with pytest.raises(ValueError, match="unknown algorithm 'dqn'.*ppo"):
        agents.make_agent("dqn", venv)
    with pytest.raises(ValueError, match="unknown PerceiverConfig fields \\['latents'\\]"):
        agents.make_agent("ppo", venv, perceiver={"latents": 4}, device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            agents.make_agent("ppo", venv, device="cuda")
    venv.close()


def test_sac_critic_trains_encoder_and_actor_sees_detached_latents():
    venv = pixel_env()
    model = agents.make_agent(
        "sac", venv, perceiver=TINY, device="cpu", learning_starts=32, batch_size=16, buffer_size=500
    )
    model.learn(40)  # fill a little
    policy = model.policy
    encoder_ids = {id(p) for p in policy.encoder.parameters()}
    actor_ids = {id(p) for group in policy.actor.optimizer.param_groups for p in group["params"]}
    critic_ids = {id(p) for group in policy.critic.optimizer.param_groups for p in group["params"]}
    assert not encoder_ids & actor_ids and encoder_ids <= critic_ids
    # freeze the critic's optimizer: an update that changes the encoder can only come from the critic loss
    before = [p.detach().clone() for p in policy.encoder.parameters()]
    lr = policy.critic.optimizer.param_groups[0]["lr"]
    for group in policy.critic.optimizer.param_groups:
        group["lr"] = 0.0
    model.lr_schedule = lambda _: 0.0
    model.train(gradient_steps=2, batch_size=8)
    assert all(torch.equal(a, b) for a, b in zip(before, policy.encoder.parameters()))
    model.lr_schedule = lambda _: lr
    model.train(gradient_steps=1, batch_size=8)
    assert not all(torch.equal(a, b) for a, b in zip(before, policy.encoder.parameters()))
    venv.close()


def test_default_precision_follows_the_measured_crossover():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert agents.default_dtype(cuda, {}) == "float32"  # the default 32 latents: bf16 measured slower
    assert agents.default_dtype(cuda, {"num_latents": agents.BF16_MIN_LATENTS - 1}) == "float32"
    assert agents.default_dtype(cuda, {"num_latents": agents.BF16_MIN_LATENTS}) == "bfloat16"
    assert agents.default_dtype(cpu, {"num_latents": 512}) == "float32"
    venv = state_env(1)
    with warnings.catch_warnings():  # hosts without native bf16 warn that it is emulated
        warnings.simplefilter("ignore")
        explicit = agents.make_agent(
            "ppo", venv, perceiver={**TINY, "dtype": "bfloat16"}, device="cpu", n_steps=16
        )
    assert explicit.policy.perceiver_config.dtype == "bfloat16"  # a named precision is never overridden
    venv.close()


def test_bf16_on_a_cpu_that_emulates_it_warns(monkeypatch):
    from agents.factory import computes_in_bf16

    assert computes_in_bf16({"dtype": "bfloat16"}, None) and computes_in_bf16(
        None, {"conv_dtype": "bfloat16"}
    )
    assert not computes_in_bf16({"dtype": "float32"}, {"conv_dtype": "float32"}) and not computes_in_bf16(
        None, None
    )
    monkeypatch.setattr(agents.factory, "cpu_has_native_bf16", lambda: False)
    venv = state_env(1)
    with pytest.warns(UserWarning, match="bfloat16 on a CPU without native bf16"):
        agents.make_agent("ppo", venv, perceiver={**TINY, "dtype": "bfloat16"}, device="cpu", n_steps=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # float32: no warning
        agents.make_agent("ppo", venv, perceiver=TINY, device="cpu", n_steps=16)
    venv.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_rollouts_bf16_and_device_buffers():
    venv = pixel_env()
    model = agents.make_agent("ppo", venv, perceiver={**TINY, "dtype": "bfloat16"}, device="cuda", n_steps=16)
    assert model.policy.perceiver_config.dtype == "bfloat16"
    model.learn(64)
    assert model.rollout_buffer.observations["pixels"].device.type == "cuda"
    assert model.rollout_buffer.observations["pixels"].dtype == torch.uint8
    sac = agents.make_agent(
        "sac", venv, perceiver=TINY, device="cuda", learning_starts=16, batch_size=8, buffer_size=200
    )
    sac.learn(48)
    assert sac.replay_buffer.frames.device.type == "cuda"
    pixels, offsets = torch.randint(0, 256, (4, 9, 32, 32), dtype=torch.uint8), torch.randint(0, 9, (2, 4))
    on_gpu = shifted_windows(pixels.cuda(), offsets.cuda(), 4).cpu()
    assert torch.equal(on_gpu, shifted_windows(pixels, offsets, 4))
    restored = pickle.loads(pickle.dumps(sac.replay_buffer))  # saved from the GPU, loadable anywhere
    assert restored.frames.device.type == "cpu" and torch.equal(
        restored.frames, sac.replay_buffer.frames.cpu()
    )
    restored.set_device("cuda")
    assert restored.frames.device.type == "cuda" and restored.sample(4).actions.device.type == "cuda"
    venv.close()


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_sb3_baseline_policy_type(algorithm):
    venv = state_env(1)
    extra = (
        {"learning_starts": 16, "batch_size": 16, "buffer_size": 200}
        if algorithm == "sac"
        else {"n_steps": 32}
    )
    model = agents.make_agent(algorithm, venv, device="cpu", policy_type="sb3", **extra)
    assert type(model) is agents.algorithm_class(algorithm, "sb3")
    assert type(model.policy) is model.policy_aliases["MultiInputPolicy"]
    model.learn(64)
    with pytest.raises(ValueError, match="unknown policy_type 'keras'"):
        agents.make_agent(algorithm, venv, device="cpu", policy_type="keras")
    venv.close()


def test_ppo_with_env_side_modality_dropout():
    venv = pixel_env(modality_dropout=0.3)
    model = agents.make_agent("ppo", venv, perceiver=TINY, device="cpu", n_steps=16)
    model.learn(64)
    stored = np.asarray(model.rollout_buffer.observations[envs.ABSENT_KEY]).reshape(
        -1, 3
    )  # SB3 flattens after use
    assert stored.shape == (16 * 2, 3) and stored.any()  # the flags the update sees are the rollout's
    venv.close()


def test_sac_with_env_side_modality_dropout():
    venv = pixel_env(modality_dropout=0.3)
    model = agents.make_agent(
        "sac", venv, perceiver=TINY, device="cpu", learning_starts=32, batch_size=16, buffer_size=500
    )
    model.learn(96)
    buffer = model.replay_buffer
    flags = buffer.observations[envs.ABSENT_KEY][: buffer.pos]  # replayed with the transitions they came with
    assert flags.shape == (48, 2, 3) and 0 < flags.mean() < 1
    assert (buffer.next_observations[envs.ABSENT_KEY][: buffer.pos] != flags).any()  # drawn anew every step
    venv.close()


def test_sb3_sac_with_the_perceiver_policy_learns_saves_and_loads(tmp_path):
    """SB3's own SAC (as rl-zoo3 builds it): the target critic reads the shared encoder's latents."""
    from stable_baselines3 import SAC

    venv = pixel_env()
    model = SAC(
        PerceiverSACPolicy,
        venv,
        learning_starts=32,
        batch_size=16,
        buffer_size=500,
        device="cpu",
        policy_kwargs={"perceiver": TINY},
    )
    encoder_before = [p.detach().clone() for p in model.policy.encoder.parameters()]
    target_before = [p.detach().clone() for p in model.policy.critic_target.parameters()]
    model.learn(96)
    assert any(not torch.equal(a, b) for a, b in zip(encoder_before, model.policy.encoder.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(target_before, model.policy.critic_target.parameters()))
    obs = venv.reset()
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "sac.zip")
    loaded = SAC.load(tmp_path / "sac.zip", device="cpu")
    np.testing.assert_array_equal(actions, loaded.predict(obs, deterministic=True)[0])
    venv.close()


@pytest.mark.parametrize("size,patch", [(64, 8), (84, 12), (96, 12)])
def test_default_config_chooses_a_patch_size_for_the_image(size, patch):
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, image_size=size, frame_stack=1)
    model = PPO(PerceiverActorCriticPolicy, venv, n_steps=8, batch_size=8, device="cpu")
    spec = next(s for s in model.policy.encoder.specs if s.name == "pixels")
    assert spec.stride == patch and spec.num_tokens == (size // patch) ** 2
    model.learn(8)
    with pytest.raises(ValueError, match=f"patch_size 10 does not divide image size {size}"):
        PPO(PerceiverActorCriticPolicy, venv, policy_kwargs={"perceiver": {"patch_size": 10}})
    venv.close()


def test_sac_logs_the_gradient_reaching_each_encoder_stage_and_the_actors_spread():
    venv = pixel_env()
    model = agents.make_agent(
        "sac", venv, perceiver=TINY, device="cpu", learning_starts=32, batch_size=16, buffer_size=500
    )
    model.learn(64)
    logged = model.logger.name_to_value
    for group in ("adapter_pixels", "adapter_proprio", "latents", "cross_attention", "self_attention"):
        assert logged[f"perceiver/grad_norm/{group}"] > 0, group
    assert logged["train/actor_action_spread"] > 0.0  # a fresh actor acts differently in different states
    venv.close()


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda o: {k: v for k, v in o.items() if k != "proprio"}, r"missing \['proprio'\], unexpected \[\]"),
        (lambda o: {**o, "lidar": np.zeros((2, 3))}, r"missing \[\], unexpected \['lidar'\]"),
        (
            lambda o: {**o, "proprio": np.zeros((2, 4), np.float32)},
            r"'proprio': expected shape \(5,\).*got \(2, 4\)",
        ),
        (lambda o: {**o, "pixels": o["pixels"] / 255.0}, r"'pixels': expected uint8 .*got float64"),
        (lambda o: {**o, "proprio": o["proprio"].astype(np.int64)}, r"'proprio': expected a float array"),
        (
            lambda o: {**o, "proprio": np.where(np.arange(5) == 2, np.nan, o["proprio"]).astype(np.float32)},
            r"observation 'proprio' holds NaN or inf values",
        ),
        (
            lambda o: {**o, "action_history": np.full_like(o["action_history"], np.inf)},
            r"observation 'action_history' holds NaN or inf values",
        ),
    ],
    ids=["missing", "extra", "shape", "float-pixels", "int-proprio", "nan-proprio", "inf-history"],
)
@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_predict_names_a_malformed_observation(algorithm, change, message):
    venv = pixel_env()
    extra = {"buffer_size": 100} if algorithm == "sac" else {"n_steps": 16}
    model = agents.make_agent(algorithm, venv, perceiver=TINY, device="cpu", **extra)
    obs = venv.reset()
    model.predict(obs)  # the env's own observation passes
    with pytest.raises(ValueError, match=message):
        model.predict(change(obs))
    venv.close()


def test_nonfinite_observations_and_rewards_are_named_or_sanitised():
    from stable_baselines3.common.vec_env import VecEnvWrapper

    class Poison(VecEnvWrapper):
        def reset(self):
            return self.venv.reset()

        def step_wait(self):
            obs, rewards, dones, infos = self.venv.step_wait()
            obs["proprio"][1, 0] = np.nan
            rewards[0] = np.inf
            return obs, rewards, dones, infos

    strict = envs.NonFiniteGuard(Poison(state_env()))
    strict.reset()
    with pytest.raises(
        ValueError, match=r"non-finite observation 'proprio' from env\(s\) \[1\].*--sanitize-nonfinite"
    ):
        strict.step(np.zeros((2, 1), np.float32))
    lenient = envs.NonFiniteGuard(Poison(state_env()), sanitize=True)
    lenient.reset()
    obs, rewards, _, _ = lenient.step(np.zeros((2, 1), np.float32))
    assert np.isfinite(obs["proprio"]).all() and obs["proprio"][1, 0] == 0 and rewards[0] == 0
    assert lenient.nonfinite_count == 2


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_perceiver_policies_use_fused_adam_unless_told_otherwise(algorithm):
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio",))
    small = {"num_latents": 8, "latent_dim": 32}
    model = agents.make_agent(algorithm, venv, device="cpu", perceiver=small)
    optimizers = (
        [model.policy.optimizer] if algorithm == "ppo" else [model.actor.optimizer, model.critic.optimizer]
    )
    assert all(o.defaults["fused"] is True for o in optimizers)
    if algorithm == "ppo":
        assert model.policy.optimizer.defaults["eps"] == 1e-5  # SB3's ActorCriticPolicy default kept
        own = agents.make_agent("ppo", venv, device="cpu", perceiver=small,
                                policy_kwargs={"optimizer_kwargs": {"foreach": True}})  # fmt: skip
        assert own.policy.optimizer.defaults["foreach"] is True and not own.policy.optimizer.defaults["fused"]


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_reference_centring_under_sb3s_recipe_and_ppo(tmp_path, algorithm):
    """`center_features='reference'` outside the DrQ recipe: the latents are those of the observation minus those
    of the first one read, per-sample withheld modalities stay withheld from their own rows only, and the
    reference survives save / load."""
    venv = pixel_env(modality_dropout=0.3)  # per-sample absent_modalities flags in every observation
    extra = (
        {"learning_starts": 32, "batch_size": 16, "buffer_size": 500}
        if algorithm == "sac"
        else {"n_steps": 16}
    )
    kwargs = {"center_features": "reference"}
    model = agents.make_agent(
        algorithm, venv, perceiver=TINY, policy_kwargs=kwargs, device="cpu", seed=0, **extra
    )
    encoder = model.policy.encoder
    assert encoder.reference and not bool(encoder.reference_initialised)
    model.learn(96)
    assert bool(encoder.reference_initialised)
    reference = {name: getattr(encoder, f"reference_{name}").clone() for name in encoder.names}
    obs = venv.reset()
    tensors = model.policy.obs_to_tensor(obs)[0]
    assert tensors[envs.ABSENT_KEY].any()
    encoder.eval()
    with torch.no_grad():
        expected = encoder._encode(tensors) - encoder._encode(reference)
        torch.testing.assert_close(encoder(tensors), expected, atol=1e-5, rtol=0)
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = type(model).load(tmp_path / "model.zip", device="cpu")
    assert loaded.policy.center_features == "reference"
    for name in encoder.names:
        assert torch.equal(getattr(loaded.policy.encoder, f"reference_{name}"), reference[name])
    np.testing.assert_array_equal(actions, loaded.predict(obs, deterministic=True)[0])
    with pytest.raises(ValueError, match=r"center_features 'running' \(a running mean\) belongs to the DrQ"):
        agents.make_agent(
            algorithm, venv, perceiver=TINY, policy_kwargs={"center_features": "running"}, device="cpu"
        )
    venv.close()
