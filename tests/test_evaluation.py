"""Evaluation-time interventions on what the policy reads (experiments.evaluation)."""

import numpy as np
import pytest

import agents
import envs
from experiments.evaluation import evaluate_policy

ENV = {"modalities": ("pixels", "proprio"), "image_size": 32, "action_repeat": 8}
TINY = {"num_latents": 4, "latent_dim": 16, "self_attn_layers": 1}


@pytest.fixture(scope="module")
def model():
    venv = envs.make_vec_env("cartpole-balance", n_envs=1, seed=0, **ENV)
    return agents.make_agent("ppo", venv, device="cpu", perceiver=TINY, n_steps=16)


def recorded_steps(model, monkeypatch, **kwargs) -> tuple[list[dict], np.ndarray]:
    """The observations one evaluated episode gave the policy and the actions it took (seed 3 unless given)."""
    seen, taken, predict = [], [], type(model).predict  # the class's, not an earlier spy's

    def spy(obs, **predict_kwargs):
        seen.append({key: np.array(value) for key, value in obs.items()})
        action, state = predict(model, obs, **predict_kwargs)
        taken.append(np.array(action))
        return action, state

    monkeypatch.setattr(model, "predict", spy)
    evaluate_policy(model, "cartpole-balance", ENV, episodes=1, **{"seed": 3, **kwargs})
    return seen, np.stack(taken)


def recorded_observations(model, monkeypatch, **kwargs) -> list[dict]:
    return recorded_steps(model, monkeypatch, **kwargs)[0]


def test_blank_modality_feeds_zeros_for_that_key_only(model, monkeypatch):
    normal = recorded_observations(model, monkeypatch)
    blank = recorded_observations(model, monkeypatch, blank=("pixels",))
    assert len(normal) == len(blank) == 125  # one episode, 1000 frames at action repeat 8
    assert all(obs["pixels"].any() for obs in normal)  # the camera sees the cart
    assert all(not obs["pixels"].any() and obs["pixels"].shape == normal[0]["pixels"].shape for obs in blank)
    assert all(obs["proprio"].any() for obs in blank)
    np.testing.assert_array_equal(blank[0]["proprio"], normal[0]["proprio"])  # same seed, same first reading


def test_sampled_actions_repeat_under_a_seed_and_leave_the_callers_generator_alone(model, monkeypatch):
    """deterministic=False samples from the policy (not its mean), seeded by the evaluation seed inside a forked
    torch generator: the same seed gives the same actions, and the caller's generator is left untouched."""
    import torch

    def actions(**kwargs):
        return recorded_steps(model, monkeypatch, **kwargs)[1]

    torch.manual_seed(123)
    before = torch.get_rng_state()
    sampled = actions(deterministic=False)
    assert torch.equal(torch.get_rng_state(), before)
    np.testing.assert_array_equal(actions(deterministic=False), sampled)
    mean = actions()
    assert len(mean) == len(sampled) == 125 and not np.allclose(sampled, mean)
    np.testing.assert_array_equal(actions(), mean)  # the default stays deterministic


def test_blank_modality_names_the_valid_keys(model):
    with pytest.raises(ValueError, match=r"unknown modality \['camera'\] for --blank-modality; valid choices: "
                                         r"\['pixels', 'proprio'\]"):  # fmt: skip
        evaluate_policy(model, "cartpole-balance", ENV, episodes=1, blank=("camera",))


def test_a_recurrent_state_is_carried_within_an_episode_and_reset_at_its_start():
    """evaluate_policy hands an LSTM policy back the state its last predict returned, and None with
    episode_start=True at each new episode (a fake recurrent model records what it is given)."""
    from gymnasium import spaces

    class FakeRecurrent:
        def __init__(self):
            self.policy = type("P", (), {"lstm_actor": object()})()
            self.observation_space = spaces.Dict({"proprio": spaces.Box(-np.inf, np.inf, (5,), np.float32)})
            self.calls = []

        def predict(self, obs, state=None, episode_start=None, deterministic=False):
            self.calls.append((state, bool(episode_start[0])))
            step = 0 if state is None else state[0] + 1
            return np.zeros(1, np.float32), (step,)

    model = FakeRecurrent()
    evaluate_policy(
        model, "cartpole-balance", {"modalities": ("proprio",), "action_repeat": 8}, episodes=2, seed=3
    )
    assert len(model.calls) == 250  # two episodes of 125 steps
    for start in (0, 125):
        assert model.calls[start] == (None, True)  # a new episode: no state, episode_start set
        assert [c for c in model.calls[start + 1 : start + 125]] == [((i,), False) for i in range(124)]


def test_modality_path_reads_the_evaluation_observations_the_encoder_read(model, monkeypatch):
    import torch

    from perceiver_policy.introspection import PATH_STAGES, modality_path

    seen = recorded_observations(model, monkeypatch)[:]  # a copy: the spy goes on recording below
    result = evaluate_policy(model, "cartpole-balance", ENV, episodes=1, seed=3, modality_path=True)
    assert set(result.modality_path) == {"pixels", "proprio"}
    assert all(set(stages) == set(PATH_STAGES) for stages in result.modality_path.values())
    batch, _ = model.policy.obs_to_tensor({key: np.stack([obs[key] for obs in seen]) for key in seen[0]})
    with torch.no_grad():
        expected = modality_path(model.policy.encoder, batch, "pixels")
    assert result.modality_path["pixels"] == pytest.approx(expected, rel=1e-5)


def test_modality_path_refuses_a_policy_without_a_perceiver_and_streaming(model):
    from types import SimpleNamespace

    other = SimpleNamespace(policy=SimpleNamespace(), observation_space=model.observation_space)
    with pytest.raises(
        ValueError, match="--modality-path traces a Perceiver's cross-attention.*use --reliance"
    ):
        evaluate_policy(other, "cartpole-balance", ENV, episodes=1, modality_path=True)
    with pytest.raises(ValueError, match="cannot be combined with --streaming"):
        evaluate_policy(model, "cartpole-balance", ENV, episodes=1, modality_path=True, streaming=True)


def test_the_modality_path_keeps_evenly_spaced_observations_in_bounded_memory(monkeypatch):
    import torch

    from experiments import evaluation

    monkeypatch.setattr(evaluation, "PATH_OBSERVATIONS", 4)
    encoder = torch.nn.Identity()
    tap = evaluation.EncoderInputTap(encoder)
    for step in range(21):
        encoder({"x": torch.full((1, 1), float(step))})
        tap.keep()
        assert len(tap.kept) < 8  # never 2 x PATH_OBSERVATIONS stored
    assert tap.batch()["x"].flatten().tolist() == [0.0, 8.0, 16.0]  # every 4th kept, then thinned to <= 4
    tap.close()
    encoder({"x": torch.zeros(1, 1)})
    assert tap.latest["x"].item() == 20.0  # the hook is gone
