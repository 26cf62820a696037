"""Learning-rate warmup (agents/warmup.py) and the check that every algorithm setting is one the class takes."""

import pytest
from stable_baselines3.common.logger import configure

import envs
from agents import make_agent
from agents.warmup import check_warmup, warmup_factor

TINY = {"num_latents": 4, "latent_dim": 16, "fourier_bands": 2}


@pytest.fixture(scope="module")
def venv():
    env = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, modalities=("proprio",), action_repeat=8)
    yield env
    env.close()


def learning_rates(model, optimizers) -> list[float]:
    model._update_learning_rate(optimizers)  # SB3 passes a list (SAC) or one optimizer (PPO, A2C)
    optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
    return [group["lr"] for optimizer in optimizers for group in optimizer.param_groups]


def test_the_factor_ramps_linearly_to_one():
    assert [warmup_factor(n, 4) for n in (0, 1, 2, 3, 4, 100)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_a_bad_warmup_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=f"lr_warmup must be a non-negative integer.*got {bad!r}"):
        check_warmup(bad)


def test_sac_ramps_actor_critic_and_temperature_and_then_keeps_the_schedule(venv, tmp_path):
    model = make_agent(
        "sac", venv, perceiver=TINY, device="cpu", seed=0, learning_rate=1e-3, lr_warmup=4, buffer_size=100
    )
    model.set_logger(configure(None, []))
    optimizers = [model.actor.optimizer, model.critic.optimizer, model.ent_coef_optimizer]
    seen = []
    for done in (0, 1, 3, 7):
        model._n_updates = done
        seen.append(learning_rates(model, optimizers))
    assert [set(rates) for rates in seen] == [{2.5e-4}, {5e-4}, {1e-3}, {1e-3}]
    model._n_updates = 1  # the ramp is part of the saved model: a resumed run continues it
    model.save(tmp_path / "model")
    loaded = type(model).load(tmp_path / "model", env=venv, device="cpu")
    loaded.set_logger(configure(None, []))
    assert loaded.lr_warmup == 4
    assert set(learning_rates(loaded, [loaded.critic.optimizer])) == {5e-4}


def test_without_warmup_sac_keeps_the_schedules_rate(venv):
    model = make_agent("sac", venv, perceiver=TINY, device="cpu", seed=0, learning_rate=1e-3, buffer_size=100)
    model.set_logger(configure(None, []))
    assert model.lr_warmup == 0 and set(learning_rates(model, [model.critic.optimizer])) == {1e-3}


@pytest.mark.parametrize("algorithm", ["ppo", "a2c"])
def test_on_policy_agents_ramp_their_optimizer(venv, algorithm):
    model = make_agent(algorithm, venv, perceiver=TINY, device="cpu", seed=0, learning_rate=1e-3, lr_warmup=2)
    model.set_logger(configure(None, []))
    assert set(learning_rates(model, model.policy.optimizer)) == {5e-4}
    model._n_updates = 5
    assert set(learning_rates(model, model.policy.optimizer)) == {1e-3}


def test_a_setting_the_algorithm_lacks_is_refused_with_the_valid_choices(venv):
    with pytest.raises(
        ValueError, match=r"unknown sac settings \['lr_warmup'\] for policy_type 'sb3'.*valid choices"
    ):
        make_agent("sac", venv, policy_type="sb3", device="cpu", buffer_size=100, lr_warmup=10)
    with pytest.raises(ValueError, match=r"unknown ppo settings \['n_step'\].*'n_steps'"):
        make_agent("ppo", venv, perceiver=TINY, device="cpu", n_step=16)


@pytest.mark.parametrize(
    "algorithm,policy_type,policy_class",
    [
        ("ppo", "perceiver", "PerceiverActorCriticPolicy"),
        ("ppo", "sb3", "MultiInputActorCriticPolicy"),
        ("ppo", "lstm", "RecurrentMultiInputActorCriticPolicy"),
        ("sac", "sb3", "MultiInputPolicy"),
        ("sac", "perceiver", "PerceiverSACPolicy"),
    ],
)
def test_a_policy_setting_the_policy_lacks_is_refused_with_the_valid_choices(
    venv, algorithm, policy_type, policy_class
):
    extra = {"buffer_size": 100} if algorithm == "sac" else {}
    with pytest.raises(
        ValueError,
        match=rf"unknown policy settings \['readout'\] for policy_type '{policy_type}' \({policy_class}\); "
        r"valid choices: \[.*'optimizer_kwargs'",
    ):
        make_agent(
            algorithm, venv, perceiver=TINY, policy_type=policy_type, device="cpu",
            policy_kwargs={"readout": "flat"}, **extra,
        )  # fmt: skip


def test_the_policy_settings_each_policy_documents_are_accepted(venv):
    model = make_agent("ppo", venv, perceiver=TINY, device="cpu", policy_kwargs={"log_std_mode": "state"})
    assert model.policy.log_std_mode == "state"
    model = make_agent("ppo", venv, policy_type="lstm", device="cpu", policy_kwargs={"lstm_hidden_size": 8})
    assert model.policy.lstm_actor.hidden_size == 8
