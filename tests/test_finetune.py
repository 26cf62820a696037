"""Transfer (perceiver_policy.finetuning, agents.transfer_weights, experiments.train --init-from --finetune)."""

import numpy as np
import pytest
import torch

import agents
import envs
from perceiver_policy import count_parameters
from perceiver_policy.finetuning import (
    check_finetune,
    lora_parameter_names,
    merge_lora,
)

pytest.importorskip("peft")

TINY = {"num_latents": 8, "latent_dim": 32, "fourier_bands": 4}
ENV = {"image_size": 32, "action_repeat": 8}


def make(algorithm: str, task: str = "cartpole-balance", mode: str = "all", **env):
    venv = envs.make_vec_env(task, n_envs=2, seed=0, **{**ENV, **env})
    extra = (
        {"n_steps": 16, "batch_size": 16}
        if algorithm == "ppo"
        else {"learning_starts": 16, "batch_size": 16, "buffer_size": 200}
    )
    return agents.make_agent(
        algorithm,
        venv,
        device="cpu",
        perceiver=TINY,
        seed=0,
        policy_kwargs={"finetune": {"mode": mode, "lora_rank": 4}},
        **extra,
    )


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


@pytest.mark.parametrize("algorithm", ["ppo", "sac"])
@pytest.mark.parametrize("mode", ["output-queries", "lora"])
def test_frozen_encoder_is_unchanged_and_the_rest_trains(algorithm, mode):
    source = make(algorithm)
    source.learn(64)
    model = make(algorithm, task="cartpole-swingup", mode=mode)
    report = agents.transfer_weights(model, source.policy.state_dict())
    assert report["reinitialised"] == [] and report["unused"] == []
    encoder = model.policy.encoder
    frozen_before = {k: v for k, v in snapshot(encoder).items() if "lora_" not in k}
    before = snapshot(model.policy)
    model.learn(96)
    after = snapshot(model.policy)
    for key, value in frozen_before.items():  # every base encoder tensor, bit for bit
        assert torch.equal(encoder.state_dict()[key], value), key
    trained = [k for k in before if not torch.equal(before[k], after[k])]
    assert trained and all(not k.startswith(("encoder.", "features_extractor.", "pi_features", "vf_features")) or
                           "lora_" in k for k in trained)  # fmt: skip
    if mode == "lora":
        assert any("lora_B" in k for k in trained)  # the adapters moved (B starts at zero)


def test_lora_adds_only_adapter_parameters_and_merges_back():
    plain, lora = make("ppo"), make("ppo", mode="lora")
    plain_names = {n for n, _ in plain.policy.named_parameters()}
    lora_names = {n for n, _ in lora.policy.named_parameters()}
    renamed = {n.replace(".base_layer", "") for n in lora_names}  # a wrapped Linear keeps its weights
    added = renamed - plain_names
    assert added == set(lora_parameter_names(lora.policy)) and added
    assert plain_names <= renamed
    encoder_params = sum(p.numel() for n, p in lora.policy.encoder.named_parameters() if "lora_" not in n)
    total = count_parameters(lora.policy, trainable_only=False)
    assert count_parameters(lora.policy) == total - encoder_params
    lora.learn(64)  # move the adapters away from their zero start
    obs = lora.env.reset()
    expected, _ = lora.predict(obs, deterministic=True)
    merge_lora(lora.policy.encoder)
    assert lora_parameter_names(lora.policy) == []
    assert {n for n, _ in lora.policy.named_parameters()} == plain_names
    merged, _ = lora.predict(obs, deterministic=True)
    np.testing.assert_allclose(merged, expected, atol=1e-5)


def test_lora_policy_save_load_round_trip(tmp_path):
    model = make("sac", mode="lora")
    model.learn(48)
    obs = model.env.reset()
    expected, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = agents.algorithm_class("sac").load(tmp_path / "model.zip", device="cpu")
    assert loaded.policy.finetune["mode"] == "lora" and lora_parameter_names(loaded.policy)
    actual, _ = loaded.predict(obs, deterministic=True)
    np.testing.assert_allclose(actual, expected, atol=1e-6)


def test_heads_for_another_action_space_are_reinitialised():
    source = make("ppo", modalities=("proprio", "action_history"))
    model = make(
        "ppo", task="reacher-easy", modalities=("proprio", "action_history")
    )  # 2-D action, 6 sensors
    fresh = snapshot(model.policy)
    report = agents.transfer_weights(model, source.policy.state_dict())
    assert "action_net.weight" in report["reinitialised"] and "log_std" in report["reinitialised"]
    assert "features_extractor.encoder.latents" in report["loaded"]
    state = model.policy.state_dict()
    assert torch.equal(state["action_net.weight"], fresh["action_net.weight"])
    assert torch.equal(
        state["features_extractor.encoder.latents"],
        source.policy.state_dict()["features_extractor.encoder.latents"],
    )


def test_bad_finetune_settings_name_the_choices():
    with pytest.raises(
        ValueError, match=r"unknown finetune mode 'heads'; valid choices: \['all', 'output-queries', 'lora'\]"
    ):
        check_finetune({"mode": "heads"})
    with pytest.raises(ValueError, match=r"unknown LoRA targets \['v'\]; valid choices"):
        check_finetune({"mode": "lora", "lora_targets": ["q", "v"]})
    with pytest.raises(ValueError, match="lora_rank must be a positive integer, got 0"):
        check_finetune({"mode": "lora", "lora_rank": 0})


@pytest.mark.slow
def test_cli_init_from_and_finetune_lora_then_evaluate(tmp_path):
    from tests.test_experiments import cli, ppo_run, tags

    cli(*ppo_run(tmp_path, "source", 64, 64))
    run = ppo_run(tmp_path, "target", 64, 64, "--task", "cartpole-swingup", "--init-from", str(tmp_path / "source"),
                  "--finetune", "lora", "--lora-rank", "4", "--lora-targets", "q", "kv")  # fmt: skip
    result = cli(*run)
    assert "init from" in result.stdout and "finetune lora:" in result.stdout
    scalars = tags(tmp_path / "target")
    trainable = scalars.Scalars("finetune/trainable_params")[0].value
    assert 0 < trainable < scalars.Scalars("finetune/total_params")[0].value
    evaluated = cli("experiments.evaluate", str(tmp_path / "target"), "--episodes", "1")
    assert "cartpole-swingup" in evaluated.stdout
    wrong = cli(*ppo_run(tmp_path, "wrong", 64, 64, "--algorithm", "sac", "--init-from", str(tmp_path / "source")),
                check=False)  # fmt: skip
    assert wrong.returncode == 2 and "trained with algorithm 'ppo'; this run uses 'sac'" in wrong.stderr


@pytest.mark.slow
def test_cli_finetune_errors_name_the_fix(tmp_path):
    from tests.test_experiments import cli, ppo_run

    no_source = cli(*ppo_run(tmp_path, "x", 64, 64, "--finetune", "lora"), check=False)
    assert no_source.returncode == 2 and "give the trained run with --init-from" in no_source.stderr
    bad = cli(*ppo_run(tmp_path, "y", 64, 64, "--finetune", "heads", "--init-from", "z"), check=False)
    assert bad.returncode == 2 and "valid choices: ['all', 'output-queries', 'lora']" in bad.stderr


def test_exported_lora_actor_is_merged_and_acts_as_predict(tmp_path):
    from perceiver_policy.export import DeterministicActor, export_torchscript

    model = make("sac", mode="lora")
    model.learn(48)
    actor = DeterministicActor(model.policy)
    assert lora_parameter_names(actor) == [] and lora_parameter_names(model.policy)  # merged copy, model kept
    scripted = torch.jit.load(str(export_torchscript(actor, tmp_path / "actor.pt")))
    obs = model.env.reset()
    expected, _ = model.predict(obs, deterministic=True)
    actual = scripted(*[torch.as_tensor(obs[k]) for k in actor.input_names]).detach().numpy()
    np.testing.assert_allclose(actual, expected, atol=1e-5)
