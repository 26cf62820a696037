"""Partial observation, the privileged state, state decoding, state probes and the LSTM baseline."""

import gymnasium as gym
import numpy as np
import pytest
import torch
from dm_control import suite
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import agents
import envs
from envs.proprio_modes import DOMAIN_MODES, PROPRIO_MODES, valid_modes
from perceiver_policy import PerceiverConfig, PerceiverEncoder
from perceiver_policy.probes import r2 as r2_score
from perceiver_policy.probes import ridge_fit, state_probe
from perceiver_policy.state_decoding import StateDecoder

STATES = ("proprio", "proprio_history", "action_history")
TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4, "patch_size": 8}


def first_tasks(domain):
    """Every distinct observation layout of a domain is one of its first task or a task with extra entries."""
    tasks = [t for d, t in suite.ALL_TASKS if d == domain]
    return tasks[:1] + [t for t in tasks[1:] if t in ("turn_easy", "run_pure_state", "swim")]


CASES = [
    (domain, task, mode)
    for domain in DOMAIN_MODES
    for task in first_tasks(domain)
    for mode in valid_modes(domain)
]


@pytest.mark.parametrize("domain,task,mode", CASES, ids=[f"{d}-{t}-{m}" for d, t, m in CASES])
def test_every_mode_of_every_listed_domain(domain, task, mode):
    env = gym.make(f"dmc/{domain}-{task}-v0", modalities=STATES, proprio=mode, privileged_state=True)
    gym_check_env(env.unwrapped, skip_render_check=True)
    sb3_check_env(env.unwrapped, warn=False)
    obs, _ = env.reset(seed=0)
    obs, *_ = env.step(env.action_space.sample())
    inner = env.unwrapped
    layout = env.observation_space["proprio"].layout
    # The layout tiles the kept vector, and the kept values are the full state's at the selected indices.
    spans = sorted(layout.values())
    assert spans[0][0] == 0 and spans[-1][1] == obs["proprio"].shape[0]
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    np.testing.assert_array_equal(obs["proprio"], obs["state"][inner._proprio_index])
    assert env.observation_space["state"].layout == inner.state_layout
    if mode == "positions":
        assert not any("velocit" in name or name.endswith("_vel") for name in layout)
    if mode == "full" or DOMAIN_MODES[domain].get(mode) == "full":
        np.testing.assert_array_equal(obs["proprio"], obs["state"])


def test_robot_mode_keeps_the_body_and_removes_the_world():
    cases = {
        "cartpole-swingup": [0, 3],  # cart x, cart ẋ of [x, cos, sin, ẋ, θ̇]
        "ball_in_cup-catch": [0, 1, 4, 5],  # cup x, z and their velocities
        "reacher-easy": [0, 1, 4, 5],  # joint angles and velocities, not to_target
        "finger-spin": [0, 1, 4, 5, 7, 8],  # finger angles and velocities, touch; not the spinner
    }
    for task, kept in cases.items():
        env = gym.make(envs.env_id(task), modalities=("proprio",), proprio="robot", privileged_state=True)
        obs, _ = env.reset(seed=1)
        for _ in range(3):
            obs, *_ = env.step(env.action_space.sample())
        np.testing.assert_array_equal(obs["proprio"], obs["state"][kept])
    for task in ("walker-walk", "cheetah-run", "hopper-hop"):  # the whole observation is the body
        env = gym.make(envs.env_id(task), modalities=("proprio",), proprio="robot")
        full = gym.make(envs.env_id(task), modalities=("proprio",))
        assert env.observation_space["proprio"].layout == full.observation_space["proprio"].layout


def test_mode_errors_name_the_valid_choices():
    with pytest.raises(
        ValueError, match=r"unknown proprio mode 'robt'; valid choices: \['full', 'robot', 'positions'\]"
    ):
        gym.make("dmc/cheetah-run-v0", proprio="robt")
    with pytest.raises(ValueError, match=r"not defined for quadruped-walk; valid choices: \['full'\]"):
        gym.make("dmc/quadruped-walk-v0", proprio="robot")
    assert PROPRIO_MODES == ("full", "robot", "positions")


def test_proprio_history_shifts_and_repeats_the_first_reading():
    env = gym.make(
        "dmc/cartpole-swingup-v0", modalities=("proprio", "proprio_history"), proprio_history_len=4
    )
    obs, _ = env.reset(seed=0)
    assert obs["proprio_history"].shape == (4, 5)
    np.testing.assert_array_equal(obs["proprio_history"], np.stack([obs["proprio"]] * 4))
    readings = [obs["proprio"]]
    for _ in range(5):
        obs, *_ = env.step(env.action_space.sample())
        readings.append(obs["proprio"])
    np.testing.assert_array_equal(obs["proprio_history"], np.stack(readings[-4:]))
    obs, _ = env.reset(seed=1)
    np.testing.assert_array_equal(obs["proprio_history"], np.stack([obs["proprio"]] * 4))


def test_privileged_state_only_when_asked():
    assert "state" not in gym.make("dmc/cartpole-swingup-v0", modalities=STATES).observation_space.spaces
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, modalities=STATES, privileged_state=True)
    assert "state" in venv.observation_space.spaces


def _policies(venv):
    yield "perceiver-ppo", agents.make_agent("ppo", venv, perceiver=TINY, device="cpu", n_steps=16)
    yield "perceiver-sac", agents.make_agent("sac", venv, perceiver=TINY, device="cpu", buffer_size=100)
    yield "sb3-ppo", agents.make_agent("ppo", venv, policy_type="sb3", device="cpu", n_steps=16)
    yield "sb3-sac", agents.make_agent("sac", venv, policy_type="sb3", device="cpu", buffer_size=100)
    yield "lstm", agents.make_agent("ppo", venv, policy_type="lstm", device="cpu", n_steps=16)


def test_changing_the_privileged_state_changes_no_action_value_or_q():
    venv = envs.make_vec_env(
        "cartpole-swingup", n_envs=2, modalities=STATES, proprio="positions", privileged_state=True
    )
    obs = venv.reset()
    other = {**obs, "state": obs["state"] * -7.0 + 3.0}
    for name, model in _policies(venv):
        policy = model.policy
        policy.set_training_mode(False)
        a, _ = model.predict(obs, deterministic=True, episode_start=np.ones(2, bool))
        b, _ = model.predict(other, deterministic=True, episode_start=np.ones(2, bool))
        np.testing.assert_array_equal(a, b, err_msg=name)
        with torch.no_grad():
            t, _ = policy.obs_to_tensor(obs)
            u, _ = policy.obs_to_tensor(other)
            actions = torch.as_tensor(a, dtype=torch.float32)
            if name.endswith("sac"):  # both Q-values
                for qa, qb in zip(policy.critic(t, actions), policy.critic(u, actions)):
                    torch.testing.assert_close(qa, qb, rtol=0, atol=0, msg=name)
            elif name != "lstm":
                torch.testing.assert_close(policy.predict_values(t), policy.predict_values(u), rtol=0, atol=0)


def test_probe_recovers_a_linear_map_and_scores_zero_on_noise():
    rng = np.random.default_rng(0)
    mixing = rng.standard_normal((40, 5))
    features = [rng.standard_normal((100, 40)) for _ in range(8)]
    states = [f @ mixing + 0.01 * rng.standard_normal((100, 5)) for f in features]
    layout = {"a": (0, 2), "b": (2, 5)}
    scores = state_probe(features, states, layout)
    assert scores["a"] > 0.99 and scores["b"] > 0.99
    noise = [rng.standard_normal((100, 40)) for _ in range(8)]
    scores = state_probe(noise, states, layout)
    assert abs(scores["a"]) < 0.1 and abs(scores["b"]) < 0.1
    with pytest.raises(ValueError, match="at least 4 episodes"):
        state_probe(features[:3], states[:3], layout)


def test_probe_scores_parts_by_the_same_fit_outside_the_mean():
    rng = np.random.default_rng(1)
    features = [rng.standard_normal((100, 30)) for _ in range(8)]
    # columns 0-1 are linear in the features, columns 2-3 are noise the features do not carry
    states = [np.concatenate([f[:, :2], rng.standard_normal((100, 2))], axis=1) for f in features]
    layout = {"position": (0, 4)}
    parts = {"position_sensed": np.array([0, 1]), "position_unsensed": np.array([2, 3])}
    plain = state_probe(features, states, layout)
    scores = state_probe(features, states, layout, parts=parts)
    assert scores["position"] == plain["position"] and scores["mean"] == plain["mean"]
    assert scores["position_sensed"] > 0.99 and scores["position_unsensed"] < 0.1  # no better than the mean
    assert 0.4 < scores["position"] < 0.6  # the whole sensor averages the two halves' spread


def test_state_parts_split_what_the_mode_keeps_from_what_it_removes():
    robot = gym.make("dmc/ball_in_cup-catch-v0", modalities=("proprio",), proprio="robot").unwrapped
    # position = [cup x, cup z, ball x, ball z] (0-3), velocity likewise (4-7): the robot mode keeps the cup
    assert {name: idx.tolist() for name, idx in robot.state_parts.items()} == {
        "position_sensed": [0, 1],
        "position_unsensed": [2, 3],
        "velocity_sensed": [4, 5],
        "velocity_unsensed": [6, 7],
    }
    cartpole = gym.make("dmc/cartpole-swingup-v0", modalities=("proprio_history",), proprio="robot").unwrapped
    assert cartpole.state_parts["position_unsensed"].tolist() == [1, 2]  # cos, sin of the pole's angle
    # whole sensors kept or removed are not split; without proprioception nothing is sensed
    assert gym.make("dmc/ball_in_cup-catch-v0", modalities=("proprio",)).unwrapped.state_parts == {}
    assert (
        gym.make(
            "dmc/cartpole-swingup-v0", modalities=("proprio",), proprio="positions"
        ).unwrapped.state_parts
        == {}
    )
    pixels_only = gym.make("dmc/ball_in_cup-catch-v0", modalities=("pixels",), proprio="robot", image_size=32)
    assert pixels_only.unwrapped.state_parts == {}
    pixels_only.close()


@pytest.mark.parametrize("features", [20, 35])  # fewer and more features than the 30 samples
def test_ridge_dual_and_primal_forms_agree(features):
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((30, features)), rng.standard_normal((30, 3))
    new = rng.standard_normal((7, features))
    primal, dual = ridge_fit(x, y, 1.0, dual=False)(new), ridge_fit(x, y, 1.0, dual=True)(new)
    assert np.allclose(primal, dual, atol=1e-8)
    assert np.allclose(
        ridge_fit(x, y, 1.0)(new), primal, atol=1e-8
    )  # the automatic choice: the same estimator
    assert not np.allclose(ridge_fit(x, y, 100.0)(new), primal, atol=1e-3)  # the penalty matters


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
def test_the_state_decoding_loss_reaches_the_encoder(algorithm):
    """With --aux-state-weight the encoder's gradient differs from the weight-0 run's on the same batch."""
    from stable_baselines3.common.logger import configure

    grads = {}
    for weight in (0.0, 1.0):
        venv = envs.make_vec_env("cartpole-swingup", n_envs=2, seed=0, modalities=("proprio", "action_history"),
                                 proprio="positions", privileged_state=True)  # fmt: skip
        extra = {"buffer_size": 64, "learning_starts": 32, "batch_size": 16} if algorithm == "sac" else {
            "n_steps": 16, "batch_size": 32, "n_epochs": 1}  # fmt: skip
        model = agents.make_agent(algorithm, venv, perceiver=TINY, device="cpu", seed=0,
                                  aux_state_weight=weight, **extra)  # fmt: skip
        model.set_logger(configure(None, []))
        torch.manual_seed(0)
        np.random.seed(0)
        model.learn(40)  # SAC: 8 updates after its 32 random steps; PPO: two rollouts of 2 x 16
        adapter = model.policy.encoder.adapters["proprio"].content.weight
        grads[weight] = adapter.grad.clone() if adapter.grad is not None else torch.zeros_like(adapter)
        venv.close()
    assert grads[1.0].abs().sum() > 0 and not torch.allclose(grads[0.0], grads[1.0])


def test_state_decoding_loss_falls_on_a_fixed_batch(dict_space):
    torch.manual_seed(0)
    config = PerceiverConfig(**TINY)
    encoder = PerceiverEncoder(dict_space, config)
    decoder = StateDecoder({"position": (0, 3), "velocity": (3, 7)}, config)
    from tests.conftest import sample_obs

    obs = sample_obs(dict_space, 32)
    state = obs["proprio"] * 3.0 + 1.0  # decodable from the proprio tokens
    optimizer = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=3e-3)
    losses = []
    for _ in range(60):
        loss, per_sensor = decoder.loss(encoder(obs), state)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert set(per_sensor) == {"position", "velocity"}
    assert losses[-1] < 0.3 * losses[0]
    decoder.eval()
    assert decoder.predict(encoder(obs)).shape == state.shape


def test_aux_state_weight_needs_the_privileged_state():
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, modalities=STATES)
    with pytest.raises(ValueError, match="needs the privileged 'state' key"):
        agents.make_agent("ppo", venv, perceiver=TINY, device="cpu", aux_state_weight=1.0)
    with pytest.raises(ValueError, match="needs policy_type 'perceiver'"):
        agents.make_agent("ppo", venv, policy_type="sb3", device="cpu", aux_state_weight=1.0)
    with pytest.raises(ValueError, match="policy_type 'lstm'.*needs algorithm 'ppo'"):
        agents.make_agent("sac", venv, policy_type="lstm", device="cpu")


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "sac"])
def test_state_decoding_trains_and_logs_per_sensor(algorithm):
    venv = envs.make_vec_env(
        "cartpole-swingup", n_envs=2, modalities=STATES, proprio="robot", privileged_state=True
    )
    extra = {"learning_starts": 32, "batch_size": 16} if algorithm == "sac" else {"n_steps": 16}
    model = agents.make_agent(algorithm, venv, perceiver=TINY, device="cpu", aux_state_weight=1.0, **extra)
    before = [p.detach().clone() for p in model.policy.state_decoder.parameters()]
    model.learn(96)
    logged = model.logger.name_to_value
    assert {"perceiver/state_decode_mse/position", "perceiver/state_decode_mse/velocity"} <= set(logged)
    after = list(model.policy.state_decoder.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))


def test_the_standardiser_floors_the_variance_of_a_near_constant_sensor():
    from perceiver_policy.state_decoding import RunningStandardizer

    standardizer = RunningStandardizer(2)
    x = torch.stack([torch.randn(256), 1e-4 * torch.randn(256)], dim=1)  # the second sensor barely moves
    standardizer.update(x)
    scale = standardizer.scale()
    assert scale[1] >= 0.1 and torch.isclose(scale[0], x[:, 0].std(unbiased=False), rtol=0.05)
    assert standardizer(x)[:, 1].abs().max() < 0.01  # not amplified up to 100x into the loss


def test_sac_target_runs_in_eval_mode_and_the_target_latents_without_dropout():
    import agents

    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio", "action_history"))
    model = agents.make_agent(
        "sac", venv, perceiver={"num_latents": 4, "latent_dim": 16, "dropout": 0.1}, device="cpu",
        buffer_size=100, learning_starts=16, batch_size=8,
    )  # fmt: skip
    model.learn(16)
    model.policy.set_training_mode(True)
    assert not model.policy.critic_target.training
    passes = []
    model.policy.encoder.register_forward_hook(
        lambda module, inputs, output: passes.append((torch.is_grad_enabled(), module.training))
    )
    from stable_baselines3.common.logger import configure

    model.set_logger(configure(None, []))
    model.train(gradient_steps=1, batch_size=8)
    assert (True, True) in passes and (False, False) in passes  # online with dropout; target without
    assert model.policy.encoder.training  # restored after the target pass
    venv.close()


@pytest.mark.parametrize("algorithm,recipe", [("ppo", "sb3"), ("sac", "sb3"), ("sac", "drq")])
def test_a_policy_trained_with_the_state_predicts_evaluates_and_exports_from_its_sensors(
    algorithm, recipe, tmp_path
):
    """The privileged state stays in the buffers and losses: the policy's interface is the sensor keys."""
    from perceiver_policy.export import DeterministicActor

    venv = envs.make_vec_env("cartpole-swingup", n_envs=2, seed=0, modalities=("proprio", "action_history"),
                             proprio="positions", privileged_state=True)  # fmt: skip
    extra = (
        {"buffer_size": 64, "learning_starts": 16, "batch_size": 8} if algorithm == "sac" else {"n_steps": 16}
    )
    if recipe == "drq":
        extra.update(recipe="drq", policy_kwargs={"hidden_dim": 32})
    model = agents.make_agent(algorithm, venv, perceiver=TINY, device="cpu", aux_state_weight=1.0, **extra)
    model.learn(32)
    assert "state" in model.observation_space.spaces  # the algorithm's buffers keep it
    assert "state" not in model.policy.observation_space.spaces and model.policy.state_decoder is not None
    obs = venv.reset()
    sensors = {k: v for k, v in obs.items() if k != "state"}
    action, _ = model.predict(sensors, deterministic=True)
    np.testing.assert_array_equal(
        action, model.predict(obs, deterministic=True)[0]
    )  # the state changes nothing
    assert DeterministicActor(model.policy).input_names == ["action_history", "proprio"]
    from experiments.evaluation import evaluate_policy

    result = evaluate_policy(model, "cartpole-swingup", {"modalities": ("proprio", "action_history"),
                             "proprio": "positions", "action_repeat": 8}, episodes=1)  # fmt: skip
    assert len(result.returns) == 1
    venv.close()


ACTOR_PROBE_CASES = [  # (algorithm, policy_type, recipe, extra)
    ("sac", "perceiver", "drq", {"policy_kwargs": {"hidden_dim": 32, "feature_dim": 8}}),
    ("sac", "perceiver", "sb3", {}),
    ("sac", "sb3", "sb3", {}),
    ("sac", "sb3", "sb3", {"use_sde": True}),  # its mean layer ends in a Hardtanh clip
    ("sac", "drq-cnn", "drq", {"policy_kwargs": {"hidden_dim": 32, "feature_dim": 8}}),
    ("ppo", "perceiver", "sb3", {}),
]


@pytest.mark.parametrize("algorithm,policy_type,recipe,extra", ACTOR_PROBE_CASES, ids=lambda c: str(c))
def test_actor_probe_features_are_what_the_deterministic_action_is_a_function_of(
    algorithm, policy_type, recipe, extra
):
    from experiments.evaluation import FeatureTap, action_layer, evaluate_policy

    env_kwargs = {"modalities": ("proprio", "action_history"), "action_repeat": 8}
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    model = agents.make_agent(algorithm, venv, perceiver=TINY, policy_type=policy_type, recipe=recipe,
                              device="cpu", seed=0, **extra)  # fmt: skip
    obs = {k: v[0] for k, v in venv.reset().items()}
    tap = FeatureTap(model, "actor")
    action, _ = model.predict(obs, deterministic=True)
    layer = action_layer(model)
    assert isinstance(layer, torch.nn.Linear) and tap.after_predict(None).shape == (layer.in_features,)
    with torch.no_grad():  # the layer's output from the tapped input: the action's mean, then SAC's squashing
        mean = layer(torch.as_tensor(tap.after_predict(None))[None])[0, : action.shape[-1]].numpy()
    np.testing.assert_allclose(
        np.tanh(mean) if algorithm == "sac" else np.clip(mean, -1, 1), action, atol=1e-5
    )
    tap.close()
    actor, both = (
        evaluate_policy(
            model, "cartpole-swingup", env_kwargs, episodes=4, probe_state=True, probe_features=wanted
        )
        for wanted in ("actor", ("encoder", "actor"))
    )
    assert set(actor.probe) == {"actor/position", "actor/velocity", "actor/mean"}
    assert {k: v for k, v in both.probe.items() if k.startswith("actor/")} == pytest.approx(actor.probe)
    encoder = evaluate_policy(model, "cartpole-swingup", env_kwargs, episodes=4, probe_state=True)
    assert {k: v for k, v in both.probe.items() if "/" not in k} == pytest.approx(encoder.probe)
    assert encoder.probe != pytest.approx({k[6:]: v for k, v in actor.probe.items()})  # two fits, two answers
    venv.close()


def test_probe_features_refuse_an_unknown_choice():
    from experiments.evaluation import FeatureTap, evaluate_policy

    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("proprio",), action_repeat=8)
    model = agents.make_agent("sac", venv, perceiver=TINY, device="cpu", seed=0)
    with pytest.raises(
        ValueError, match=r"unknown probe features 'critic'; valid choices: \['encoder', 'actor'\]"
    ):
        FeatureTap(model, "critic")
    with pytest.raises(ValueError, match="unknown probe features 'latents'"):
        evaluate_policy(model, "cartpole-swingup", {"modalities": ("proprio",)}, episodes=4, probe_state=True,
                        probe_features="latents")  # fmt: skip
    venv.close()


def test_a_fresh_readout_fit_on_latents_reads_a_state_they_hold_and_not_noise():
    from experiments.benchmarks.readout import fit_readout

    config = PerceiverConfig(**TINY)
    rng = np.random.default_rng(0)
    # what tells latents apart: the learned latent array they start from
    identity = 3 * rng.normal(size=(8, 32))
    latents = [(identity + rng.normal(size=(100, 8, 32))).astype(np.float32) for _ in range(8)]
    held = [(lat - identity)[:, 3, :2] @ np.array([[1.0], [-0.5]]) for lat in latents]  # latent 3 holds it
    noise = [rng.normal(size=(100, 1)) for _ in latents]  # nothing holds it
    states = [np.concatenate(pair, 1).astype(np.float32) for pair in zip(held, noise)]
    prediction = fit_readout("query", config, latents, states, epochs=60)
    test = np.concatenate(states[4:])
    assert prediction.shape == test.shape
    assert r2_score(prediction[:, 0], test[:, 0]) > 0.8 and r2_score(prediction[:, 1], test[:, 1]) < 0.2
    with pytest.raises(ValueError, match=r"unknown readout 'mean'; valid choices: \['query', 'flat'\]"):
        fit_readout("mean", config, latents, states)


PIXELS_ROBOT = {"modalities": ("pixels", "proprio"), "image_size": 48, "action_repeat": 8, "proprio": "robot"}
"""Cartpole with the pole only in 48 px frames: the benchmarks' plumbing tests."""


def test_the_readout_benchmark_reports_probes_and_fresh_readouts_per_state_part():  # plumbing: rows and columns
    from experiments.benchmarks.readout import readout_rows

    env_kwargs = PIXELS_ROBOT
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    model = agents.make_agent("sac", venv, perceiver={**TINY, "pixel_tokenizer": "conv"}, recipe="drq",
                              policy_kwargs={"hidden_dim": 32, "feature_dim": 8}, device="cpu", seed=0)  # fmt: skip
    rows = readout_rows(model, "cartpole-swingup", env_kwargs, episodes=4, epochs=10)
    assert [what for what, _ in rows] == [
        "linear probe: latents", "linear probe: mean latent", "linear probe: the actor's last layer",
        "fresh query readout, fit to the state", "fresh flat readout, fit to the state",
    ]  # fmt: skip
    for _, scores in rows:
        assert set(scores) == {"position", "velocity", "mean", "position_sensed", "position_unsensed",
                               "velocity_sensed", "velocity_unsensed"}  # fmt: skip
        assert all(np.isfinite(v) for v in scores.values())
    venv.close()


def test_a_fresh_critic_head_ranks_actions_by_features_that_hold_the_best_action_and_not_by_shuffled_ones():
    from experiments.benchmarks.critic import fit_head, predict, score

    rng = np.random.default_rng(0)
    features = torch.as_tensor(rng.normal(size=(400, 4)), dtype=torch.float32)
    candidates = torch.linspace(-1, 1, 11)[:, None]
    best = torch.tanh(features[:, :1])  # the best action is a function of the first feature
    teacher_q = 100 - 50 * (candidates[:, 0][None] - best) ** 2 + 5 * features[:, 1:2]  # (N, C)
    targets = (teacher_q - teacher_q.mean()) / teacher_q.std()
    fit, scored = np.arange(200), np.arange(200, 400)
    results = {}
    for name, x in (("own", features), ("shuffled", features[torch.as_tensor(rng.permutation(400))])):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(5, 64), torch.nn.ReLU(), torch.nn.Linear(64, 1))
        q_fn = lambda h, a, net=net: net(torch.cat([h.expand(len(a), -1), a], dim=-1))  # noqa: E731
        fit_head(net, q_fn, x, targets, candidates, fit, steps=400)
        results[name] = score(predict(q_fn, x, candidates, scored), targets[scored], teacher_q[scored])
    assert results["own"]["action_r2"] > 0.9 and results["shuffled"]["action_r2"] < 0.5
    assert results["own"]["regret"] < 0.5 * results["shuffled"]["regret"]
    perfect = score(targets[scored], targets[scored], teacher_q[scored])
    assert perfect["r2"] == pytest.approx(1.0) and perfect["regret"] == 0.0


def test_the_critic_benchmark_fits_each_head_kind_with_the_camera_and_with_another_states():  # plumbing
    from experiments.benchmarks.critic import HEAD_KINDS, critic_rows

    env_kwargs = PIXELS_ROBOT
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    heads = {"hidden_dim": 32, "feature_dim": 8}
    teacher = agents.make_agent(
        "sac", venv, policy_type="cnn", recipe="drq", policy_kwargs=heads, device="cpu", seed=0
    )
    student = agents.make_agent("sac", venv, perceiver={**TINY, "pixel_tokenizer": "conv"}, recipe="drq",
                                policy_kwargs=heads, device="cpu", seed=0)  # fmt: skip
    rows = critic_rows(teacher, [("cnn", teacher), ("perceiver", student)], "cartpole-swingup", env_kwargs,
                       episodes=2, steps=3)  # fmt: skip
    assert [row[:3] for row in rows] == [
        ["none (each candidate's mean Q)", "-", "-"],
        ["cnn", "its own", "flat"], ["cnn", "another state's", "flat"],
        *[["perceiver", camera, kind] for camera in ("its own", "another state's") for kind in HEAD_KINDS],
    ]  # fmt: skip
    assert all(np.isfinite(value) for row in rows for value in row[3:])
    sb3 = agents.make_agent("sac", venv, perceiver=TINY, device="cpu", seed=0)
    with pytest.raises(ValueError, match="sb3: the critic benchmark reads DrQ-recipe runs"):
        critic_rows(teacher, [("sb3", sb3)], "cartpole-swingup", env_kwargs, episodes=2, steps=1)
    with pytest.raises(ValueError, match="needs 2 or more, got 1"):
        critic_rows(teacher, [("cnn", teacher)], "cartpole-swingup", env_kwargs, episodes=1, steps=1)
    venv.close()
    other = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("pixels",), image_size=48,
                              action_repeat=8)  # fmt: skip
    blind = agents.make_agent(
        "sac", other, policy_type="cnn", recipe="drq", policy_kwargs=heads, device="cpu", seed=0
    )
    with pytest.raises(
        ValueError, match=r"blind reads \['pixels'\]; the teacher reads \['pixels', 'proprio'\]"
    ):
        critic_rows(teacher, [("blind", blind)], "cartpole-swingup", env_kwargs, episodes=2, steps=1)
    ppo = agents.make_agent("ppo", other, perceiver=TINY, device="cpu", seed=0)
    with pytest.raises(ValueError, match="the teacher needs a Q critic"):
        critic_rows(ppo, [("blind", blind)], "cartpole-swingup", env_kwargs, episodes=2, steps=1)
    other.close()
