"""Distillation by DAgger (agents.distill, experiments.distill)."""

import json

import numpy as np
import pytest
import torch

import agents
import envs
from agents.distill import DaggerConfig, dagger, make_student, student_keys

MODALITIES = ("proprio", "proprio_history", "action_history")
ENV = {"action_repeat": 8, "modalities": MODALITIES, "proprio_history_len": 3, "action_history_len": 3}


def test_dagger_student_improves_on_its_own_states():
    venv = envs.make_vec_env("cartpole-balance", n_envs=2, seed=0, **ENV)
    teacher = agents.make_agent(
        "ppo", venv, device="cpu", perceiver={"num_latents": 8, "latent_dim": 32}, seed=0
    )
    with torch.no_grad():  # an untrained head acts near 0: make the teacher's actions depend on what it reads
        teacher.policy.action_net.weight.mul_(300.0)
    keys = student_keys(teacher.observation_space, "mlp")
    student = make_student(envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, **ENV), seed=0)
    config = DaggerConfig(iterations=4, steps_per_iteration=300, epochs=15, latent_weight=0.1, seed=0)
    history = dagger(teacher, student, keys, venv, config)
    assert history.beta == [1.0, 0.5, 0.25, 0.125]
    assert history.dataset_size == [300, 600, 900, 1200]
    # the action error on the states the student itself visits, measured before training on them, falls
    assert history.on_policy_mse[-1] < 0.5 * history.on_policy_mse[0], history.on_policy_mse


def test_student_kinds_and_errors():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, image_size=32, action_repeat=8)
    space = venv.observation_space
    assert student_keys(space, "mlp") == [k for k in space.spaces if k != "pixels"]
    assert student_keys(space, "cnn") == list(space.spaces)
    with pytest.raises(ValueError, match=r"unknown student 'gru'; valid choices: \['mlp', 'cnn'\]"):
        student_keys(space, "gru")
    pixels_only = envs.make_vec_env("cartpole-balance", n_envs=1, image_size=32, modalities=("pixels",))
    with pytest.raises(ValueError, match="use --student cnn"):
        student_keys(pixels_only.observation_space, "mlp")


@pytest.mark.slow
def test_cli_distill_writes_a_run_that_evaluates(tmp_path):
    from tests.test_experiments import cli, ppo_run

    cli(*ppo_run(tmp_path, "teacher", 64, 64))
    result = cli("experiments.distill", str(tmp_path / "teacher"), "--student", "mlp", "--iterations", "2",
                 "--steps-per-iteration", "64", "--epochs", "2", "--eval-episodes", "1")  # fmt: skip
    assert "% of the teacher's" in result.stdout
    run = tmp_path / "teacher-distill-mlp"
    summary = json.loads((run / "distill.json").read_text())
    assert summary["student_keys"] == ["action_history", "proprio"] and summary["student_parameters"] > 0
    assert np.isfinite(summary["teacher_latency_p50_ms"]) and len(summary["on_policy_mse"]) == 2
    evaluated = cli("experiments.evaluate", str(run), "--episodes", "1")
    assert "cartpole-balance" in evaluated.stdout
    again = cli("experiments.distill", str(tmp_path / "teacher"), check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
