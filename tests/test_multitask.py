"""One Perceiver for many bodies: the multi-task env, masked sensor slots and actuators, per-task temperatures, and
the generalist through train / evaluate / resume / export as a user types them."""

import csv
import json
import os
import subprocess
import sys

import gymnasium
import numpy as np
import pytest
import torch
from conftest import HANG_GUARD_S
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import envs
from agents import PerceiverSAC, make_agent, transfer_weights
from agents.replay_buffer import TaskReplayBuffer
from envs.multitask import active_task_weights, parse_task_weights
from experiments import config as cfg
from experiments import train
from experiments.checkpoint import COMPLETE, latest_checkpoint
from experiments.reporting import find_runs
from perceiver_policy import PerceiverConfig
from perceiver_policy.sac_policy import MaskedSquashedGaussian

TASKS = ("cartpole-swingup", "reacher-easy", "finger-spin")  # 1, 2, 2 actuators; finger alone has touch
STATES = ("proprio", "action_history")
TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4}


def make_env(**kwargs):
    return envs.MultiTaskEnv(TASKS, modalities=STATES, action_repeat=8, **kwargs)


def test_slots_padding_and_flags_follow_the_playing_task():
    env = make_env()
    assert list(env.slots.items()) == [("position", 4), ("velocity", 3), ("to_target", 2), ("touch", 2)]
    assert env.action_space.shape == (2,) and env.observation_space["proprio"].shape == (11,)
    obs, info = env.reset(seed=0, options={"task": "cartpole-swingup"})
    assert info["task"] == "cartpole-swingup" and obs["task"].tolist() == [0]
    assert obs["action_mask"].tolist() == [1.0, 0.0]
    assert obs["proprio_present"].tolist() == [1.0, 1.0, 0.0, 0.0]  # position, velocity; no target, no touch
    layout = env.observation_space["proprio"].layout
    assert np.all(
        obs["proprio"][layout["position"][0] + 3 : layout["position"][1]] == 0
    )  # cartpole's 3 of 4 wide
    assert np.all(obs["proprio"][slice(*layout["touch"])] == 0)
    obs, *_ = env.step(np.array([0.5, 0.9], dtype=np.float32))
    assert obs["action_history"][-1].tolist() == [0.5, 0.0]  # the padding never reached the simulator
    obs, info = env.reset(options={"task": "finger-spin"})
    assert obs["proprio_present"].tolist() == [1.0, 1.0, 0.0, 1.0] and obs["task"].tolist() == [2]
    assert set(info["task_frames"]) == set(TASKS) and info["task_frames"]["cartpole-swingup"] == 8


def test_padded_action_entries_do_not_change_the_episode():
    a, b = make_env(task="cartpole-swingup"), make_env(task="cartpole-swingup")
    oa, _ = a.reset(seed=3)
    ob, _ = b.reset(seed=3)
    for step in range(5):
        action = np.array([np.sin(step), 0.0], dtype=np.float32)
        oa, ra, *_ = a.step(action)
        ob, rb, *_ = b.step(action + np.array([0.0, 0.7], dtype=np.float32))
        assert ra == rb and np.array_equal(oa["proprio"], ob["proprio"])


def test_task_sampler_weights_and_the_active_rule():
    env = make_env(task_weights=parse_task_weights("reacher-easy=1", TASKS))
    assert {env.reset(seed=s)[1]["task"] for s in range(8)} == {"reacher-easy"}
    env.set_task_weights([1, 0, 0])
    assert {env.reset()[1]["task"] for _ in range(5)} == {"cartpole-swingup"}
    weights = active_task_weights([800, 100, 1000], [800, 800, 900])
    assert weights.argmax() == 1 and weights[0] == weights[2] > 0  # at / above reference: the floor, never 0
    np.testing.assert_allclose(weights.sum(), 1.0)
    vec = envs.make_multitask_vec_env(TASKS, n_envs=2, seed=0, task_sampler="fixed", task_weights="finger-spin=2",
                                      modalities=STATES)  # fmt: skip
    assert vec.reset()["task"].ravel().tolist() == [2, 2]
    vec.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tasks": ["cartpole-swingup"]}, "at least two tasks"),
        ({"tasks": ["cartpole-swingup", "cartpole-swingup"]}, "listed twice"),
        ({"tasks": ["cartpole-swingup", "walker-run-fast"]}, "unknown task 'walker-run-fast'"),
        ({"task_sampler": "fixed"}, "needs task weights"),
        ({"task_sampler": "fixed", "task_weights": "walker-walk=1"}, "does not train"),
        ({"task_sampler": "greedy"}, "valid choices: \\['uniform', 'fixed', 'active'\\]"),
        ({"task_weights": "cartpole-swingup=1"}, "read by task_sampler 'fixed' only"),
    ],
)
def test_vec_env_errors_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        envs.make_multitask_vec_env(**{"tasks": TASKS, **kwargs}, modalities=STATES)


def test_a_task_whose_sensors_do_not_fit_the_slots_is_refused():
    with pytest.raises(ValueError, match="do not fit the sensor slots"):
        envs.MultiTaskEnv(TASKS, task="walker-walk", slots=make_env().slots, modalities=STATES)


def _agent(**perceiver):
    vec = envs.make_multitask_vec_env(TASKS, n_envs=2, seed=0, modalities=STATES, action_repeat=8)
    return make_agent("sac", vec, perceiver={**TINY, **perceiver}, learning_starts=16, batch_size=16, seed=0)


def test_absent_sensor_slots_and_padded_actions_reach_nothing():
    model = _agent()
    policy = model.policy
    vec = model.get_env()
    obs = vec.reset()
    obs = {k: torch.as_tensor(v) for k, v in obs.items()}
    obs["action_mask"] = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    obs["proprio_present"] = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    policy.set_training_mode(False)
    with torch.no_grad():
        latents = policy.encoder(obs)
        changed = dict(obs, proprio=obs["proprio"].clone())
        layout = vec.observation_space["proprio"].layout
        changed["proprio"][:, slice(*layout["touch"])] = 5.0  # an absent slot's values
        assert torch.equal(policy.encoder(changed), latents)
        actions = torch.tensor([[0.3, 0.0], [-0.2, 0.0]])
        noisy = actions + torch.tensor([[0.0, 0.9], [0.0, -0.4]])
        for a, b in zip(
            policy.critic.q_values(latents, actions, obs), policy.critic.q_values(latents, noisy, obs)
        ):
            assert torch.equal(a, b)
        sampled = policy.actor(obs)
    assert torch.all(sampled[:, 1] == 0)


def test_the_critics_greedy_action_leaves_a_bodys_padded_actions_at_zero():
    from experiments.evaluation import RelianceProbe

    model = _agent()
    obs = {k: v[0] for k, v in model.get_env().reset().items()}
    obs["action_mask"] = np.array([1.0, 0.0], dtype=np.float32)  # a one-actuator body in two action slots
    action, _ = model.predict(obs, deterministic=True)
    value, greedy, regret = RelianceProbe(model, ["proprio"]).critic_readings(obs, action)
    assert np.isfinite(value) and greedy.shape == (2,) and greedy[1] == 0.0 and -1.0 <= greedy[0] <= 1.0
    assert np.isfinite(regret)


def test_predict_refuses_a_task_index_it_was_not_trained_with():
    model = _agent()
    obs = model.get_env().reset()
    obs["task"][:] = 3
    with pytest.raises(ValueError, match="observation 'task': .* outside the policy's range \\[0, 2\\]"):
        model.predict(obs, deterministic=True)


def test_the_masked_log_probability_is_the_real_actuators_one():
    torch.manual_seed(0)
    mean, log_std = torch.randn(5, 3), torch.randn(5, 3).clamp(-2, 1)
    mask = torch.tensor([[1.0, 1.0, 0.0]] * 5)
    masked = MaskedSquashedGaussian(mean, log_std, mask)
    actions = masked.get_actions()
    reference = SquashedDiagGaussianDistribution(2).proba_distribution(mean[:, :2], log_std[:, :2])
    torch.testing.assert_close(
        masked.log_prob(actions), reference.log_prob(actions[:, :2], masked._gaussian[:, :2])
    )
    assert torch.all(actions[:, 2] == 0)


def test_each_actuator_slot_starts_with_its_own_action():
    """A body's actuators must not start tied. With one head shared by every slot, the near-identical initial
    actuator queries gave every joint almost the same mean action: the mean differed across slots 7x less than
    across observations."""
    policy = _agent().policy
    space = policy.observation_space
    obs = {k: torch.stack([torch.as_tensor(space.sample()[k]) for _ in range(64)]) for k in space.spaces}
    obs["action_mask"] = torch.ones(64, 2)
    with torch.no_grad():
        mean = policy.actor.distribution(policy.encoder(obs), obs).mean  # (64, 2)
    assert mean.std(dim=1).mean() > 0.5 * mean.std(dim=0).mean()


def test_a_policy_saved_with_one_shared_head_acts_as_it_was_trained():
    model = _agent()
    actor = model.policy.actor
    shared = torch.nn.Linear(32, 2)
    state = {k: v for k, v in actor.state_dict().items() if not k.startswith("head.")}
    state.update({"head.weight": shared.weight.detach(), "head.bias": shared.bias.detach()})
    actor.load_state_dict(state)
    out = torch.randn(4, 2, 32)
    torch.testing.assert_close(actor.head(out), shared(out))


def test_per_task_temperatures_learn_save_and_load(tmp_path):
    model = _agent()
    assert model.log_ent_coef.shape == (3,)
    model.learn(64)
    assert model.log_ent_coef.detach().ne(0).any()
    assert model.logger.name_to_value["train/actor_action_spread"] > 0.0  # over the real actuators only
    model.save(tmp_path / "mt.zip")
    loaded = PerceiverSAC.load(tmp_path / "mt.zip", env=model.get_env())
    torch.testing.assert_close(loaded.log_ent_coef.detach(), model.log_ent_coef.detach())
    obs = model.get_env().reset()
    np.testing.assert_array_equal(
        loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0]
    )


def test_a_source_with_fewer_tasks_keeps_its_task_embeddings():
    source, target = _agent(), envs.make_multitask_vec_env((*TASKS, "point_mass-easy"), modalities=STATES)
    model = make_agent("sac", target, perceiver=TINY, seed=1)
    report = transfer_weights(model, source.policy.state_dict())
    assert report["reinitialised"] == []
    before = source.policy.actor.task_query.weight
    after = model.policy.actor.task_query.weight
    assert after.shape == (4, 32) and torch.equal(after[:3], before)
    column = model.policy.encoder.adapters["task"].content.weight
    assert torch.equal(column[:, :3], source.policy.encoder.adapters["task"].content.weight)


@pytest.mark.parametrize("mode", ["output-queries", "lora"])
def test_a_frozen_encoder_still_trains_its_task_embedding(mode):
    """Fine-tuning a generalist to a new task freezes the encoder, but not the task token: the new task's row
    would otherwise stay a frozen random vector."""
    vec = envs.make_multitask_vec_env(TASKS, n_envs=1, seed=0, modalities=STATES, action_repeat=8)
    model = make_agent(
        "sac", vec, perceiver=TINY, policy_kwargs={"finetune": {"mode": mode}}, learning_starts=16,
        batch_size=16, seed=0,
    )  # fmt: skip
    encoder = model.policy.encoder
    task_before = encoder.adapters["task"].content.weight.detach().clone()
    frozen = {
        n: p.detach().clone() for n, p in encoder.cross_attention.named_parameters() if "lora_" not in n
    }
    model.learn(48)
    assert not torch.equal(encoder.adapters["task"].content.weight, task_before)
    for name, parameter in encoder.cross_attention.named_parameters():
        if "lora_" not in name:
            assert torch.equal(parameter, frozen[name]), name


def test_task_stems_read_each_body_in_its_own_coordinates():
    plain, stemmed = _agent().policy, _agent(task_stems=True).policy
    encoder = stemmed.encoder
    assert set(encoder.task_stems.weights) == {"proprio", "action_history"}
    proprio = encoder.specs[encoder.names.index("proprio")]
    assert encoder.task_stems.weights["proprio"].shape == (3, proprio.token_dim, 32)
    space = stemmed.observation_space
    obs = {k: torch.stack([torch.as_tensor(space.sample()[k]) for _ in range(4)]) for k in space.spaces}
    obs["task"] = torch.tensor([[0], [1], [2], [1]])
    obs["proprio_present"] = torch.ones_like(obs["proprio_present"])
    missing = plain.encoder.load_state_dict(encoder.state_dict(), strict=False)
    assert all(k.startswith("task_stems.") for k in missing.unexpected_keys)
    encoder.eval(), plain.encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder(obs), plain.encoder(obs))  # zero at initialisation: the shared map
        encoder.task_stems.weights["proprio"][1].normal_()
        changed = encoder(obs) != plain.encoder(obs)
    assert changed[[1, 3]].any() and not changed[[0, 2]].any()  # only task 1's samples read differently


def test_a_generalist_with_task_stems_transfers_to_a_new_task():
    source = _agent(task_stems=True)
    with torch.no_grad():
        source.policy.encoder.task_stems.weights["proprio"].normal_()
    target = envs.make_multitask_vec_env((*TASKS, "point_mass-easy"), modalities=STATES)
    model = make_agent("sac", target, perceiver={**TINY, "task_stems": True}, seed=1)
    assert transfer_weights(model, source.policy.state_dict())["reinitialised"] == []
    stems = model.policy.encoder.task_stems.weights["proprio"]
    assert torch.equal(stems[:3], source.policy.encoder.task_stems.weights["proprio"])
    assert torch.all(stems[3] == 0)  # the new task starts from the shared projection


def test_domain_embedding_off_ignores_the_task_key():
    assert "task" in _agent().policy.encoder.names
    model = _agent(domain_embedding=False)
    assert "task" not in model.policy.encoder.names and model.policy.actor.task_query is None


def test_task_stems_without_the_domain_embedding_are_refused_by_name():
    with pytest.raises(ValueError, match="task_stems=True.*domain_embedding=False.*task_stems=False"):
        PerceiverConfig(domain_embedding=False, task_stems=True)


def _filled_replay(n_envs: int, tasks_per_step, rewards=None, **kwargs) -> TaskReplayBuffer:
    """A replay whose transition (step, env) plays task tasks_per_step[step][env], its action (and its reward,
    unless `rewards` gives them) recording the same task index (to check that a sample's fields stay together)."""
    space = envs.make_multitask_vec_env(TASKS, n_envs=1, modalities=STATES).observation_space
    replay = TaskReplayBuffer(
        len(tasks_per_step), space, gymnasium.spaces.Box(-1, 1, (2,)), n_envs=n_envs, **kwargs
    )
    rewards = np.asarray(tasks_per_step, np.float32) if rewards is None else rewards
    for row, reward in zip(tasks_per_step, rewards, strict=True):
        obs = {k: np.zeros((n_envs, *v.shape), v.dtype) for k, v in space.spaces.items()}
        obs["task"][:, 0] = row
        action = np.repeat(np.asarray(row, np.float32)[:, None], 2, axis=1) / 10
        replay.add(obs, obs, action, np.asarray(reward, np.float32), np.zeros(n_envs), [{}] * n_envs)
    return replay


def test_task_reward_normalization_gives_every_task_the_same_reward_spread():
    tasks = np.array(
        [[0], [1]] * 200
    )  # alternating: task 0 rewards 0 / 2 (std 1), task 1 rewards 0 / 0.2 (0.1)
    rewards = np.where(tasks == 0, 2.0, 0.2) * (np.arange(400)[:, None] // 2 % 2)
    replay = _filled_replay(1, tasks, rewards, normalize_task_rewards=True)
    np.testing.assert_allclose(replay.reward_scales(), [0.55, 5.5, 1.0], rtol=1e-5)  # s = mean(1, 0.1)
    for weights in (None, [1.0, 1.0, 1.0]):  # SB3's uniform draw and the task-weighted draw alike
        replay.set_task_weights(weights)
        batch = replay.sample(512)
        task = batch.observations["task"].numpy().ravel()
        for t in (0, 1):
            np.testing.assert_allclose(
                np.unique(batch.rewards.numpy().ravel()[task == t]), [0.0, 1.1], rtol=1e-5
            )
    plain = _filled_replay(1, tasks, rewards).sample(512)
    assert set(np.unique(plain.rewards.numpy())) == {0.0, 2.0, np.float32(0.2)}


def test_the_replay_draws_each_task_by_the_sampler_weights():
    rng = np.random.default_rng(0)
    tasks = np.where(rng.random((500, 2)) < 0.9, 0, 1)  # task 0 holds 90 % of the transitions, task 2 none
    replay = _filled_replay(2, tasks)
    np.random.seed(0)
    uniform = replay.sample(4000).observations["task"].numpy().ravel()
    assert abs(np.mean(uniform == 1) - np.mean(tasks == 1)) < 0.03  # no weights: SB3's uniform draw
    replay.set_task_weights([1.0, 1.0, 1.0])  # task 2 is not stored: the batch splits between 0 and 1
    batch = replay.sample(4000)
    task = batch.observations["task"].numpy().ravel()
    assert abs(np.mean(task == 1) - 0.5) < 0.03 and not np.any(task == 2)
    np.testing.assert_array_equal(batch.actions.numpy()[:, 0] * 10, task)  # one transition's fields together
    np.testing.assert_array_equal(batch.rewards.numpy().ravel(), task)
    replay.set_task_weights([0.0, 1.0, 0.0])
    assert np.all(replay.sample(256).observations["task"].numpy() == 1)
    with pytest.raises(
        ValueError, match=r"task weights must be 3 finite non-negative numbers, got \[1.0, -1.0\]"
    ):
        replay.set_task_weights([1.0, -1.0])


def test_a_multitask_sac_agent_gets_the_task_replay():
    assert isinstance(_agent().replay_buffer, TaskReplayBuffer)


def test_config_refuses_what_a_multitask_run_cannot_do():
    with pytest.raises(ValueError, match="--tasks trains SAC with policy_type 'perceiver'"):
        cfg.from_dict({"tasks": list(TASKS)}).validate()
    with pytest.raises(ValueError, match="aux_state_weight"):
        cfg.from_dict({"tasks": list(TASKS), "algorithm": "sac", "aux_state_weight": 1.0}).validate()
    with pytest.raises(ValueError, match="task_references names \\['walker-walk'\\]"):
        cfg.from_dict(
            {"tasks": list(TASKS), "algorithm": "sac", "task_references": "walker-walk=9"}
        ).validate()
    with pytest.raises(ValueError, match="task_references are TASK=NUMBER pairs, got 'finger-spin=high'"):
        cfg.from_dict(
            {"tasks": list(TASKS), "algorithm": "sac", "task_references": "finger-spin=high"}
        ).validate()
    with pytest.raises(ValueError, match="unknown task_replay 'episodes'.*'auto', 'sampler', 'transitions'"):
        cfg.from_dict({"tasks": list(TASKS), "algorithm": "sac", "task_replay": "episodes"}).validate()
    pixels = {"tasks": list(TASKS), "algorithm": "sac", "modalities": ["pixels"], "task_replay": "sampler"}
    with pytest.raises(
        ValueError, match="task_replay 'sampler' weights the replay of multi-task runs from states"
    ):
        cfg.from_dict(pixels).validate()
    with pytest.raises(ValueError, match="task_reward_normalization scales rewards in the replay"):
        cfg.from_dict({**pixels, "task_replay": "auto", "task_reward_normalization": True}).validate()
    config = cfg.from_dict({"tasks": list(TASKS), "algorithm": "sac", "task_references": "finger-spin=500"})
    assert cfg.from_dict({"tasks": list(TASKS), "modalities": list(STATES)}).replay_follows_sampler()
    assert not cfg.from_dict({**pixels, "task_replay": "auto"}).replay_follows_sampler()
    assert config.task == TASKS[0]
    assert config.references() == {"cartpole-swingup": 848.0, "reacher-easy": 923.0, "finger-spin": 500.0}


def _cli(*args, code=0):
    env = {**os.environ, "MUJOCO_GL": "egl"}
    result = subprocess.run(
        [sys.executable, "-m", *args], capture_output=True, text=True, timeout=HANG_GUARD_S, env=env
    )
    assert result.returncode == code, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_generalist_trains_evaluates_every_task_resumes_and_exports(tmp_path):
    run = tmp_path / "mt"
    out = _cli("experiments.train", "--tasks", *TASKS, "--algorithm", "sac", "--modalities", *STATES, "--n-envs", "2",
         "--action-repeat", "125", "--total-steps", "64", "--eval-freq", "32", "--checkpoint-freq", "32",
         "--eval-episodes", "1", "--eval-video", "false", "--task-sampler", "active", "--algo", "learning_starts=16",
         "batch_size=16", "--perceiver", "num_latents=8", "latent_dim=32", "--run-dir", str(tmp_path), "--run-name",
         "mt", "--progress-bar", "false", "--reliance", "false", "--perceiver-log-freq", "0")  # fmt: skip
    accumulator = EventAccumulator(str(run / "tb"))
    accumulator.Reload()
    scalars = set(accumulator.Tags()["scalars"])
    for task in TASKS:
        assert {
            f"eval/{task}/return_mean",
            f"eval/{task}/normalized_return",
            f"multitask/weight/{task}",
        } <= scalars
    assert "eval/normalized_return_mean" in scalars
    assert any(tag.startswith("multitask/train_return/") for tag in scalars)  # episodes of 8 steps ended
    assert all(f"  {task}" in out for task in TASKS)  # the final evaluation, per task
    out = _cli("experiments.evaluate", str(run), "--episodes", "1", "--task", "reacher-easy")
    assert "| reacher-easy |" in out and "| cartpole-swingup |" not in out
    with open(run / "eval" / "tasks.csv", newline="") as handle:
        final = [r for r in csv.DictReader(handle) if r["task"] == "reacher-easy"][-1]
    # the checkpoint acts as the final evaluation saw it
    assert f"| {float(final['return_mean']):.1f} ± 0.0 |" in out
    # The task sampler's weights are in every checkpoint and come back with --resume (the active sampler's would
    # otherwise restart uniform); set by hand here, since a 1-episode evaluation may leave them uniform.
    checkpoint = latest_checkpoint(run)
    meta = json.loads((checkpoint / COMPLETE).read_text())
    assert len(meta["task_weights"]) == len(TASKS)
    (checkpoint / COMPLETE).write_text(json.dumps({**meta, "task_weights": [0.5, 0.3, 0.2]}))
    _, venv, _ = train.build(cfg.load(run / "config.yaml"), run, resume=True)
    np.testing.assert_allclose(venv.get_attr("task_weights", indices=[0])[0], [0.5, 0.3, 0.2])
    venv.close()
    tasks_csv = (
        run / "eval" / "tasks.csv"
    )  # one row per task and evaluation; a resume drops rows after its checkpoint
    with open(tasks_csv, "a") as handle:
        handle.write("999,124875,cartpole-swingup,1.0,0.001,0.3\n")
    _cli("experiments.train", "--resume", str(run), "--total-steps", "96")
    with open(tasks_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({(int(r["step"]), r["task"]) for r in rows}) == sorted(
        (s, t) for s in (32, 64, 96) for t in TASKS
    )
    assert len(rows) == 9 and all(float(r["return_mean"]) >= 0 for r in rows)
    runs = find_runs([run])  # the report puts the generalist under each of its tasks
    assert sorted(r.task for r in runs) == sorted(TASKS) and {r.frames[-1] for r in runs} == {96 * 125}
    out = _cli("experiments.export", str(run))
    assert "onnx" in out
    # Transfer to a body it never trained on: the generalist's layout, a new domain-embedding row, its task only.
    finetune = ["experiments.train", "--algorithm", "sac", "--init-from", str(run), "--finetune", "output-queries",
                "--modalities", *STATES, "--n-envs", "2", "--action-repeat", "8", "--total-steps", "32",
                "--eval-freq", "32", "--checkpoint-freq", "32", "--eval-episodes", "1", "--eval-video", "false",
                "--algo", "learning_starts=16", "batch_size=16", "--perceiver", "num_latents=8", "latent_dim=32",
                "--run-dir", str(tmp_path), "--progress-bar", "false", "--reliance", "false"]  # fmt: skip
    out = _cli(*finetune, "--task", "point_mass-easy", "--run-name", "ft")
    assert "0 freshly initialised" in out and "  point_mass-easy" in out and "  cartpole-swingup" not in out
    saved = cfg.load(tmp_path / "ft" / "config.yaml")
    assert saved.tasks == [*TASKS, "point_mass-easy"] and saved.task_weights == "point_mass-easy=1"
    out = _cli(*finetune, "--task", "walker-walk", "--run-name", "bad", code=2)
    assert "do not fit the sensor slots" in out and not (tmp_path / "bad").exists()


def test_the_actor_probe_of_a_generalist_reads_its_per_slot_heads():
    from experiments.evaluation import FeatureTap, action_layer
    from perceiver_policy.sac_policy import SlotHeads

    model = _agent()
    assert isinstance(action_layer(model), SlotHeads)
    obs = {k: v[0] for k, v in model.env.reset().items()}
    tap = FeatureTap(model, "actor")
    model.predict(obs, deterministic=True)
    assert tap.after_predict(None).shape == (2 * TINY["latent_dim"],)  # (actuator slots x D), flattened
    tap.close()
