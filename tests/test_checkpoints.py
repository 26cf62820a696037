"""Run state survives faults: atomic config, no moment with zero checkpoints, a full disk keeps the last one."""

import errno
import os
from pathlib import Path

import pytest

import agents
import envs
from experiments import config as cfg
from experiments.checkpoint import (
    CheckpointError,
    average_checkpoint,
    average_policy_weights,
    best_checkpoint,
    list_checkpoints,
    read_meta,
    save_average,
    save_best,
    save_checkpoint,
)

TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4}


@pytest.fixture(scope="module")
def model():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=("proprio", "action_history"))
    yield agents.make_agent("ppo", venv, perceiver=TINY, device="cpu", n_steps=16)
    venv.close()


def killed_at_rename_into(directory: Path, monkeypatch) -> None:
    """From now on the process "dies" (KeyboardInterrupt) at any rename into `directory`; undo with
    `monkeypatch.undo()`."""
    real_replace = os.replace

    def crash(src, dst):
        if Path(dst).parent == directory:
            raise KeyboardInterrupt("killed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)


def test_a_second_checkpoint_of_the_same_step_replaces_the_first_only_once_written(
    tmp_path, model, monkeypatch
):
    directory = tmp_path / "checkpoints"
    first = save_checkpoint(model, directory, 64, keep=1, with_replay_buffer=False, extra={})
    killed_at_rename_into(directory, monkeypatch)  # the process dies at the rename of the new checkpoint
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(model, directory, 64, keep=1, with_replay_buffer=False, extra={"again": True})
    assert list_checkpoints(directory) == [first]  # still one complete checkpoint
    monkeypatch.undo()
    second = save_checkpoint(model, directory, 64, keep=1, with_replay_buffer=False, extra={"again": True})
    assert list_checkpoints(directory) == [second] and read_meta(second)["again"] is True
    third = save_checkpoint(model, directory, 96, keep=1, with_replay_buffer=False, extra={})
    assert list_checkpoints(directory) == [third]


def test_a_full_disk_leaves_the_previous_checkpoint_intact(tmp_path, model, monkeypatch):
    directory = tmp_path / "checkpoints"
    first = save_checkpoint(model, directory, 32, keep=3, with_replay_buffer=False, extra={})

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(model, "save", disk_full)
    with pytest.raises(
        CheckpointError, match=r"step 64 not written .*No space left.*previous checkpoint .*intact"
    ):
        save_checkpoint(model, directory, 64, keep=3, with_replay_buffer=False, extra={})
    assert list_checkpoints(directory) == [first]
    assert not list(directory.glob(".tmp-*"))  # the partial write is cleaned up


def test_a_new_best_replaces_the_old_only_once_written_and_sets_a_resumed_run_s_bar(
    tmp_path, model, monkeypatch
):
    from experiments.callbacks import EvalCallback

    directory = tmp_path / "checkpoints"
    first = save_best(model, directory, 32, {"return_mean": 10.0})
    killed_at_rename_into(directory, monkeypatch)  # the process dies at the rename of the new best
    with pytest.raises(KeyboardInterrupt):
        save_best(model, directory, 64, {"return_mean": 20.0})
    assert best_checkpoint(tmp_path) == first  # the old best is intact
    monkeypatch.undo()
    again = save_best(model, directory, 32, {"return_mean": 15.0})  # the same step (a resumed run), better
    assert again.name == first.name + ".1" and not first.exists() and best_checkpoint(tmp_path) == again
    assert list_checkpoints(directory) == []  # best_ checkpoints are not --resume candidates
    evaluator = EvalCallback(1, "cartpole-balance", {}, 1, tmp_path, 1, False, 0, keep_best=True)
    assert evaluator.best_return == 15.0  # a resumed run must beat the best on disk
    assert EvalCallback(1, "cartpole-balance", {}, 1, tmp_path, 1, False, 0).best_return == float("-inf")


def test_an_average_replaces_the_old_only_once_written_and_refuses_another_run_s_policy(
    tmp_path, model, monkeypatch
):
    directory = tmp_path / "checkpoints"
    first = save_average(model, directory, 64, {"averaged_steps": [32, 64]})
    killed_at_rename_into(directory, monkeypatch)  # the process dies while writing the new average
    with pytest.raises(KeyboardInterrupt):
        save_average(model, directory, 64, {"averaged_steps": [48, 64]})
    monkeypatch.undo()
    assert average_checkpoint(tmp_path) == first and read_meta(first)["averaged_steps"] == [32, 64]
    again = save_average(model, directory, 64, {"averaged_steps": [48, 64]})
    assert again.name == first.name + ".1" and not first.exists() and average_checkpoint(tmp_path) == again
    assert read_meta(again)["averaged_steps"] == [48, 64]
    assert list_checkpoints(directory) == []  # average_ checkpoints are not --resume candidates

    venv = envs.make_vec_env("cartpole-balance", n_envs=1, modalities=("proprio", "action_history"))
    other = agents.make_agent("ppo", venv, perceiver={**TINY, "num_latents": 4}, device="cpu", n_steps=16)
    venv.close()
    mine, theirs = (
        save_checkpoint(model, directory, 1, 3, False, {}),
        save_checkpoint(other, directory, 2, 3, False, {}),
    )
    with pytest.raises(
        CheckpointError, match=r"hold different policies \('.+' differs\): average checkpoints of one run"
    ):
        average_policy_weights([mine, theirs])


def test_config_is_written_atomically(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    config = cfg.TrainConfig(task="cartpole-swingup")
    cfg.save(config, path)
    real_write = Path.write_text

    def crash_midway(self, text, *args, **kwargs):
        real_write(self, text[:10], *args, **kwargs)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(Path, "write_text", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        cfg.save(cfg.TrainConfig(task="walker-walk"), path)
    monkeypatch.setattr(Path, "write_text", real_write)
    assert cfg.load(path).task == "cartpole-swingup"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    import random

    import numpy as np
    import torch

    from experiments.checkpoint import rng_state, set_rng_state

    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    np.random.seed(0), random.seed(0), torch.manual_seed(0)
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no code unpickled
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
