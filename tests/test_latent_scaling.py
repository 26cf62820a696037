"""Dynamic latent scaling: nested latents in training, any trained k at inference, exact for PPO and SAC."""

import copy

import numpy as np
import pytest
import torch
from stable_baselines3.common.logger import configure

import envs
from agents import make_agent
from agents.on_policy import PerceiverPPO
from perceiver_policy import PerceiverConfig, PerceiverEncoder, get_num_latents, set_num_latents
from perceiver_policy.latent_scaling import choose_num_latents, latent_choices, num_latents
from tests.conftest import sample_obs
from tests.test_experiments import TINY, cli, tags

SMALL = {"num_latents": 4, "latent_dim": 16, "fourier_bands": 2, "patch_size": 8}


def test_the_first_k_latents_read_the_tokens_as_a_k_latent_encoder_would(dict_space):
    """A prefix of the latent array is an encoder of its own: the same weights, sliced, give the same latents."""
    big = PerceiverEncoder(dict_space, PerceiverConfig(**{**SMALL, "latent_scaling": [2, 4]})).eval()
    small = PerceiverEncoder(dict_space, PerceiverConfig(**{**SMALL, "num_latents": 2})).eval()
    state = big.state_dict()
    state["latents"] = state["latents"][:2]
    state["cross_attention.gate_logits"] = state["cross_attention.gate_logits"][:2]
    small.load_state_dict(state)
    obs = sample_obs(dict_space, 3)
    with torch.no_grad():
        full = big(obs)
        big.set_num_latents(2)
        prefix = big(obs)
        big.set_num_latents(4)
        again = big(obs)  # the cached queries and gates serve every k: switching back gives the same result
        expected = small(obs)
    assert full.shape == (3, 4, 16) and prefix.shape == (3, 2, 16)
    torch.testing.assert_close(prefix, expected)
    torch.testing.assert_close(again, full)


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"latent_scaling": [2, 3]}, r"must include num_latents=4 as its largest"),
        ({"latent_scaling": [0, 4]}, r"integers in \[1, num_latents=4\], got \[0, 4\]"),
        ({"latent_scaling": "4"}, r"must be a list"),
    ],
)
def test_bad_latent_scaling_is_a_named_error(fields, message):
    with pytest.raises(ValueError, match=message):
        PerceiverConfig(**{**SMALL, **fields})


def test_a_policy_runs_only_at_the_ks_it_was_trained_with(dict_space):
    plain = PerceiverEncoder(dict_space, PerceiverConfig(**SMALL))
    with pytest.raises(ValueError, match=r"all 4 latents only .*valid choices: \[4\]"):
        plain.set_num_latents(2)
    scaled = PerceiverEncoder(dict_space, PerceiverConfig(**{**SMALL, "latent_scaling": [4, 1, 2]}))
    assert scaled.config.latent_scaling == [1, 2, 4]
    with pytest.raises(ValueError, match=r"num_latents 3 .*valid choices: \[1, 2, 4\]"):
        scaled.set_num_latents(3)


@pytest.fixture(scope="module")
def venv():
    env = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio", "action_history"))
    yield env
    env.close()


def record_ks(monkeypatch):
    """Records (number of latents, grad enabled, batch) of every encoder forward."""
    seen = []
    forward = PerceiverEncoder.forward

    def recording(self, obs, absent=None):
        out = forward(self, obs, absent)
        seen.append((out.shape[1], torch.is_grad_enabled(), out.shape[0]))
        return out

    monkeypatch.setattr(PerceiverEncoder, "forward", recording)
    return seen


@pytest.mark.parametrize("recipe", ["sb3", "drq"])
def test_sac_updates_draw_k_and_the_agent_acts_with_all_latents(venv, monkeypatch, recipe):
    perceiver = {**SMALL, "latent_scaling": [1, 2, 4]}
    model = make_agent(
        "sac", venv, perceiver=perceiver, recipe=recipe, device="cpu", seed=0, learning_starts=8, batch_size=8,
        **({"policy_kwargs": {"hidden_dim": 32}} if recipe == "drq" else {}),
    )  # fmt: skip
    seen = record_ks(monkeypatch)
    model.learn(40)
    trained = {k for k, grad, _ in seen if grad}  # the critic's encoder pass of each update
    assert trained == {1, 2, 4}
    acting = [k for k, grad, batch in seen if not grad and batch == 1]  # predict on the one env's observation
    assert len(acting) >= 20 and set(acting) == {4}
    assert get_num_latents(model) == 4  # restored after every update
    assert latent_choices(model) == [1, 2, 4]
    if recipe == "drq":  # the target critic's own encoder copy follows the k of the update
        set_num_latents(model, 2)
        assert model.policy.critic_target.encoder.num_active_latents == 2


def test_drq_flat_readout_refuses_latent_scaling(venv):
    with pytest.raises(ValueError, match=r"readout 'flat' .*needs readout 'query'"):
        make_agent("sac", venv, perceiver={**SMALL, "latent_scaling": [2, 4]}, recipe="drq", device="cpu",
                   policy_kwargs={"readout": "flat"})  # fmt: skip


def test_ppo_updates_with_the_k_its_rollout_was_collected_with(venv, monkeypatch):
    """Exactness: before the first gradient step, the update's log-probabilities equal the rollout's."""
    model = make_agent("ppo", venv, perceiver={**SMALL, "latent_scaling": [1, 2, 4]}, device="cpu", seed=0,
                       n_steps=16, batch_size=16, n_epochs=1)  # fmt: skip
    model.set_logger(configure(None, []))
    checked = []
    train = PerceiverPPO.train

    def checking_train(self):
        data = next(self.rollout_buffer.get(None))
        with torch.no_grad():
            _, log_prob, _ = self.policy.evaluate_actions(data.observations, data.actions)
        torch.testing.assert_close(log_prob, data.old_log_prob, atol=1e-5, rtol=1e-5)
        checked.append(get_num_latents(self))
        train(self)
        assert get_num_latents(self) == 4  # acting k restored after the update

    monkeypatch.setattr(PerceiverPPO, "train", checking_train)
    model.learn(16 * 12)
    assert len(checked) == 12 and set(checked) == {1, 2, 4}


def test_num_latents_context_restores_and_choose_picks_the_largest_that_fits(venv):
    model = make_agent("ppo", venv, perceiver={**SMALL, "latent_scaling": [2, 4]}, device="cpu")
    with num_latents(model, 2):
        assert get_num_latents(model) == 2
    assert get_num_latents(model) == 4
    obs = venv.observation_space.sample()
    k, latency = choose_num_latents(model, obs, budget_ms=1e6, repeats=5)
    assert k == 4 and set(latency) == {2, 4}
    with pytest.raises(ValueError, match=r"no trained number of latents fits .*k=2: "):
        choose_num_latents(model, obs, budget_ms=1e-9, repeats=5)
    sb3 = make_agent("sac", venv, policy_type="sb3", device="cpu")
    with pytest.raises(ValueError, match="has no Perceiver encoder"):
        set_num_latents(sb3, 2)
    action = model.predict(obs, deterministic=True)[0]
    set_num_latents(copy.deepcopy(model.policy), 2)  # a loaded policy accepts the call too
    assert np.isfinite(action).all()


def test_scaled_run_trains_evaluates_and_exports_at_each_k(tmp_path):
    """The user's path: train with latent_scaling, TensorBoard per k, evaluate and export at any trained k."""
    run = tmp_path / "scaled"
    cli("experiments.train", "--task", "cartpole-balance", *TINY, "--modalities", "proprio", "action_history",
        "--perceiver", "num_latents=4", "latent_dim=16", "latent_scaling=[2, 4]", "--algo", "n_steps=16",
        "batch_size=32", "--total-steps", "64", "--eval-freq", "32", "--checkpoint-freq", "32",
        "--eval-video", "false", "--run-dir", str(tmp_path), "--run-name", "scaled", "--progress-bar", "false")  # fmt: skip
    scalars = set(tags(run).Tags()["scalars"])
    assert {"eval/k2/return_mean", "eval/k4/return_mean", "perf/k2/latency_p95_ms"} <= scalars
    result = cli("experiments.evaluate", str(run), "--episodes", "1", "--num-latents", "2", "4")
    assert (
        "| cartpole-balance | - | 2 | 1 |" in result.stdout
        and "| cartpole-balance | - | 4 | 1 |" in result.stdout
    )
    assert (run / "eval" / "eval-k2-4.csv").exists()
    budget = cli("experiments.evaluate", str(run), "--episodes", "1", "--latency-budget-ms", "10000")
    assert "within 10000 ms: k=4" in budget.stdout
    bad = cli("experiments.evaluate", str(run), "--num-latents", "3", check=False)
    assert bad.returncode == 2 and "valid choices: [2, 4]" in bad.stderr
    exported = cli("experiments.export", str(run), "--format", "torchscript", "--num-latents", "2",
                   "--check-steps", "6")  # fmt: skip
    assert (run / "export" / "actor-k2.pt").exists() and "max |action - predict|" in exported.stdout
