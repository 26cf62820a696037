"""DrQ's update rule (agents/drq.py) against a transcription of DrQ's equations, and its encoders."""

import copy
import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gymnasium import spaces
from stable_baselines3.common.logger import configure
from stable_baselines3.common.type_aliases import DictReplayBufferSamples

import envs
from agents import DRQ_DEFAULTS, DrQSACPolicy, make_agent
from agents.drq import drq_step
from agents.drq_policy import DrQActor, squashed_log_prob
from perceiver_policy.config import PerceiverConfig
from perceiver_policy.model import PerceiverEncoder

LEAN = {"num_latents": 4, "latent_dim": 16, "fourier_bands": 2, "patch_size": 12}
SMALL_HEADS = {"hidden_dim": 32, "feature_dim": 8}


@pytest.fixture(scope="module")
def venv():
    env = envs.make_vec_env(
        "cartpole-swingup", n_envs=1, seed=0, modalities=("pixels", "proprio"), image_size=48, action_repeat=8
    )
    yield env
    env.close()


def agent(venv, policy_type="drq-cnn", policy_kwargs=None, **overrides):
    model = make_agent(
        "sac", venv, perceiver=LEAN, policy_kwargs=policy_kwargs or dict(SMALL_HEADS), policy_type=policy_type,
        recipe="drq", device="cpu", seed=0, buffer_size=200, learning_starts=0, **overrides,
    )  # fmt: skip
    model.set_logger(configure(None, []))
    return model


def batch(model, size=6, seed=0):
    """A replay-shaped batch of random observations (uint8 pixels), actions, rewards and dones."""
    generator = torch.Generator().manual_seed(seed)
    space = model.observation_space

    def observation():
        out = {}
        for key, sub in space.spaces.items():
            if sub.dtype == np.uint8:
                out[key] = torch.randint(0, 256, (size, *sub.shape), generator=generator, dtype=torch.uint8)
            else:
                out[key] = torch.randn((size, *sub.shape), generator=generator)
        return out

    return DictReplayBufferSamples(
        observations=observation(),
        actions=torch.rand((size, 1), generator=generator) * 2 - 1,
        next_observations=observation(),
        dones=(torch.rand((size, 1), generator=generator) < 0.3).float(),
        rewards=torch.rand((size, 1), generator=generator),
    )


class Recorder:
    """Replaces `DrQActor.sample_and_mode` (which `sample` calls) by the same computation that also records the
    Gaussian noise it drew, and the augmented copies by fixed, distinguishable copies (copy i rolls the pixels by
    i), so a transcription can replay both."""

    def __init__(self, monkeypatch, model):
        self.noise: list[torch.Tensor] = []
        recorder = self

        def sample_and_mode(actor, h):
            mean, std = actor.mean_std(h)
            noise = torch.randn_like(mean)
            recorder.noise.append(noise)
            pre_tanh = mean + std * noise
            return torch.tanh(pre_tanh), squashed_log_prob(pre_tanh, mean, std), torch.tanh(mean.detach())

        monkeypatch.setattr(DrQActor, "sample_and_mode", sample_and_mode)
        monkeypatch.setattr(model, "augmented_copies", self.copies)

    @staticmethod
    def copy_of(obs, index):
        return {k: v.roll(index, dims=-1) if v.dtype == torch.uint8 else v for k, v in obs.items()}

    def copies(self, obs, count):
        return {k: torch.cat([self.copy_of(obs, i)[k] for i in range(count)]) for k in obs}


def drq_transcription(policy, log_alpha, data, noise, K, M, gamma, target_entropy, online_target=False):
    """DrQ's equations (denisyarats/drq, drq.py `update_critic` / `update_actor_and_alpha`), one copy at a time,
    on a deep copy of the policy; returns (critic loss, actor loss, alpha loss). `noise`: the recorded draws
    (K*B for the target's next actions, then B for the actor). The actor reads the first copy's encoder output
    from before the critic's step (agents/drq.py says why). `online_target`: the target critic reads the online
    encoder's next_obs features (denisyarats/drqv2, drqv2.py `update`: `next_obs = self.encoder(next_obs)`)."""
    alpha = log_alpha.exp().detach()
    batch = data.actions.shape[0]
    squash = lambda mean, std: torch.distributions.TransformedDistribution(  # noqa: E731
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform(cache_size=1)]
    )
    targets = []
    with torch.no_grad():
        for k in range(K):
            next_obs = Recorder.copy_of(data.next_observations, k)
            mean, std = policy.actor.mean_std(policy.encoder(next_obs))
            pre_tanh = mean + std * noise[0][k * batch : (k + 1) * batch]
            action = torch.tanh(pre_tanh)
            log_prob = squash(mean, std).log_prob(action).sum(-1, keepdim=True)
            target = policy.critic_target
            encoder = policy.encoder if online_target else target.encoder
            q1, q2 = target.q_values(encoder(next_obs), action)
            target_v = torch.min(q1, q2) - alpha * log_prob
            targets.append(data.rewards + (1 - data.dones) * gamma * target_v)
        target_q = sum(targets) / K
    critic_loss, first_h = 0.0, None
    for m in range(M):
        h = policy.encoder(Recorder.copy_of(data.observations, m))
        first_h = h if first_h is None else first_h
        q1, q2 = policy.critic.q_values(h, data.actions)
        critic_loss = critic_loss + F.mse_loss(q1, target_q) + F.mse_loss(q2, target_q)
    policy.critic.optimizer.zero_grad()
    critic_loss.backward()
    policy.critic.optimizer.step()
    mean, std = policy.actor.mean_std(first_h.detach())
    pre_tanh = mean + std * noise[1]
    action = torch.tanh(pre_tanh)
    log_prob = squash(mean, std).log_prob(action).sum(-1, keepdim=True)
    q1, q2 = policy.critic.q_values(first_h.detach(), action)
    actor_loss = (alpha * log_prob - torch.min(q1, q2)).mean()
    alpha_loss = (log_alpha.exp() * (-log_prob - target_entropy).detach()).mean()
    return critic_loss.item(), actor_loss.item(), alpha_loss.item()


@pytest.mark.parametrize(
    "policy_type", ["drq-cnn", "cnn", "perceiver", "perceiver-queries", "drq-cnn-online", "perceiver-online"]
)
@pytest.mark.parametrize("copies", [(2, 2), (1, 3)])
def test_drq_losses_equal_a_transcription_of_drqs_equations(venv, monkeypatch, policy_type, copies):
    """perceiver-queries: the Perceiver with SB3's recipe's critic head (critic_head='queries') on DrQ's update;
    -online: the target critic reads the online encoder (target_encoder='online', DrQ-v2's target)."""
    K, M = copies
    online = policy_type.endswith("-online")
    policy_type = policy_type.removesuffix("-online")
    heads = {**SMALL_HEADS, "critic_head": "queries"} if policy_type == "perceiver-queries" else None
    model = agent(
        venv, policy_type.split("-queries")[0], heads, target_augmentations=K, critic_augmentations=M,
        target_encoder="online" if online else "copy",
    )  # fmt: skip
    data = batch(model)
    reference_policy = copy.deepcopy(model.policy)
    reference_alpha = model.log_ent_coef.detach().clone()
    recorder = Recorder(monkeypatch, model)
    metrics = drq_step(model, data, update=0)
    assert [n.shape[0] for n in recorder.noise] == [K * 6, 6]
    expected = drq_transcription(
        reference_policy,
        reference_alpha,
        data,
        recorder.noise,
        K,
        M,
        model.gamma,
        model.target_entropy,
        online,
    )
    got = (metrics["critic_loss"], metrics["actor_loss"], metrics["ent_coef_loss"])
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    assert metrics["ent_coef"] == pytest.approx(0.1)  # DrQ's initial temperature


@pytest.mark.parametrize("policy_type", ["drq-cnn", "cnn"])
def test_bf16_conv_encoders_give_drqs_losses_closely(venv, monkeypatch, policy_type):
    """conv_dtype='bfloat16': the convolutions under bf16 autocast, everything else float32; the features and the
    update's losses stay within 2 % of the float32 transcription of DrQ's equations on the same weights."""
    model = agent(venv, policy_type, policy_kwargs={**SMALL_HEADS, "conv_dtype": "bfloat16"})
    assert model.policy.encoder.dtype == "bfloat16"
    data = batch(model)
    reference_policy = copy.deepcopy(model.policy)
    for encoder in (reference_policy.encoder, reference_policy.critic_target.encoder):
        encoder.dtype = "float32"  # the transcription in float32 (the actor and critic share one encoder)
    reference_alpha = model.log_ent_coef.detach().clone()
    recorder = Recorder(monkeypatch, model)
    with torch.no_grad():
        features = model.policy.encoder(data.observations)
        exact = reference_policy.encoder(data.observations)
    assert features.dtype == torch.float32
    assert not torch.equal(features, exact)  # bf16 did run
    assert float((features - exact).norm() / exact.norm()) < 2e-2  # measured 0.4-0.7 % at 84 px
    metrics = drq_step(model, data, update=0)
    expected = drq_transcription(reference_policy, reference_alpha, data, recorder.noise, 2, 2, model.gamma,
                                 model.target_entropy)  # fmt: skip
    # The critic and temperature losses read the weights before any step; the actor loss reads the critic after
    # its first Adam step, which moves each weight by about the learning rate whatever the gradient's size, so a
    # bf16 rounding of a near-zero gradient can flip a step: that loss is not compared.
    assert metrics["critic_loss"] == pytest.approx(expected[0], rel=2e-2)
    # the temperature loss is alpha (0.1) times a log-probability's gap to the target entropy: 2e-3 is 0.02 nats
    assert metrics["ent_coef_loss"] == pytest.approx(expected[2], abs=2e-3)
    grads = [p.grad for p in model.policy.encoder.parameters()]
    assert all(g is not None and g.dtype == torch.float32 and g.abs().sum() > 0 for g in grads)


def test_conv_dtype_is_kept_and_checked(venv, tmp_path):
    from stable_baselines3 import SAC

    from experiments.config import TrainConfig

    model = agent(venv, "cnn", policy_kwargs={**SMALL_HEADS, "conv_dtype": "bfloat16"})
    model.save(tmp_path / "model")
    assert SAC.load(tmp_path / "model", device="cpu").policy.encoder.dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"conv_dtype 'float16' is not one of \['float32', 'bfloat16'\]"):
        agent(venv, "drq-cnn", policy_kwargs={**SMALL_HEADS, "conv_dtype": "float16"})
    with pytest.raises(ValueError, match="the Perceiver's is --perceiver dtype=bfloat16"):
        agent(venv, "perceiver", policy_kwargs={**SMALL_HEADS, "conv_dtype": "bfloat16"})
    with pytest.raises(ValueError, match=r"conv_dtype is a setting of the DrQ recipe .*recipe 'sb3'"):
        TrainConfig(algorithm="sac", recipe="sb3", policy={"conv_dtype": "bfloat16"}).validate()
    with pytest.raises(ValueError, match=r"conv_dtype sets the precision .* got policy_type 'perceiver'"):
        TrainConfig(
            algorithm="sac", recipe="drq", policy_type="perceiver", policy={"conv_dtype": "bfloat16"}
        ).validate()
    with pytest.raises(ValueError, match=r"conv_dtype 'half' is not one of"):
        TrainConfig(
            algorithm="sac", recipe="drq", policy_type="cnn", policy={"conv_dtype": "half"}
        ).validate()
    TrainConfig(
        algorithm="sac", recipe="drq", policy_type="drq-cnn", policy={"conv_dtype": "bfloat16"}
    ).validate()


def test_squashed_log_prob_is_drqs_squashed_normal():
    torch.manual_seed(0)
    mean, std = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    pre_tanh = mean + std * torch.randn(5, 3)
    drq = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, std), [torch.distributions.TanhTransform(cache_size=1)]
    )
    expected = drq.log_prob(torch.tanh(pre_tanh)).sum(-1, keepdim=True)
    assert torch.allclose(squashed_log_prob(pre_tanh, mean, std), expected, atol=1e-4)


def test_log_std_is_tanh_rescaled_into_drqs_bounds(venv):
    policy = agent(venv).policy
    assert policy.log_std_bounds == (-10.0, 2.0)
    h = policy.encoder(batch(agent(venv)).observations) * 1e3  # saturate the tanh both ways
    _, std = policy.actor.mean_std(h)
    assert std.log().min() >= -10.0 - 1e-4 and std.log().max() <= 2.0 + 1e-4


@pytest.mark.parametrize("K,M", [(1, 1), (2, 2), (3, 1)])
def test_k_and_m_set_how_many_copies_each_network_reads(venv, K, M):
    model = agent(venv, target_augmentations=K, critic_augmentations=M)
    seen = {"online": [], "target": []}
    model.policy.encoder.register_forward_hook(
        lambda mod, inp, out: seen["online"].append((out.shape[0], torch.is_grad_enabled()))
    )
    model.policy.critic_target.encoder.register_forward_hook(
        lambda mod, inp, out: seen["target"].append(out.shape[0])
    )
    drq_step(model, batch(model, size=4), update=1)  # update 1: the critic only (interval 2)
    # online: K*B without grad (the actor's next actions), M*B with grad (the critic loss); target: K*B
    assert seen == {"online": [(4 * K, False), (4 * M, True)], "target": [4 * K]}


def test_an_online_target_reads_the_actors_pass_and_never_the_encoder_copy(venv, tmp_path):
    """target_encoder='online' (DrQ-v2): one pass of the online encoder over next_obs serves the actor's next
    actions and the target critic; the copy's encoder is never run, and the target's other layers still are."""
    from stable_baselines3 import SAC

    from experiments.config import TrainConfig

    model = agent(venv, "perceiver", {**SMALL_HEADS, "critic_head": "queries"}, target_encoder="online")
    seen = {"online": [], "target": [], "target_heads": 0}
    model.policy.encoder.register_forward_hook(
        lambda mod, inp, out: seen["online"].append((out.shape[0], torch.is_grad_enabled()))
    )
    model.policy.critic_target.encoder.register_forward_hook(
        lambda mod, inp, out: seen["target"].append(out.shape[0])
    )
    heads = model.policy.critic_target.q_values
    model.policy.critic_target.q_values = lambda *a: (seen.__setitem__("target_heads", 1), heads(*a))[1]
    drq_step(model, batch(model, size=4), update=1)
    assert seen == {"online": [(8, False), (8, True)], "target": [], "target_heads": 1}
    model.save(tmp_path / "model")
    assert SAC.load(tmp_path / "model", device="cpu").target_encoder == "online"  # kept on --resume
    TrainConfig(algorithm="sac", recipe="drq", algo={"target_encoder": "online"}).validate()
    for config, message in (
        (dict(recipe="drq", algo={"target_encoder": "ema"}), r"target_encoder 'ema' is not one of \['copy', 'online'\]"),
        (dict(recipe="sb3", algo={"target_encoder": "online"}), r"target_encoder is a setting of the DrQ recipe"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            TrainConfig(algorithm="sac", **config).validate()


@pytest.mark.parametrize("policy_type", ["perceiver", "cnn"])
def test_encoder_lr_scale_sets_how_far_the_encoder_steps_and_is_saved(venv, tmp_path, policy_type):
    """Adam's first step moves each weight by at most its learning rate, most weights by about it: with
    encoder_lr_scale 0.1 the encoder's weights move a tenth as far as the critic heads', under the warmup too,
    and a reloaded model keeps the ratio."""
    from stable_baselines3 import SAC

    from experiments.config import TrainConfig

    lr, scale = 1e-3, 0.1
    model = agent(venv, policy_type, policy_kwargs={**SMALL_HEADS, "encoder_lr_scale": scale}, learning_rate=lr,
                  lr_warmup=4)  # fmt: skip
    model.replay_buffer = type("Fixed", (), {"sample": lambda self, n, env=None: batch(model, n)})()
    encoder = [p.detach().clone() for p in model.policy.encoder.parameters()]
    heads = [p.detach().clone() for p in model.policy.critic.q_networks.parameters()]
    model.train(gradient_steps=1, batch_size=4)  # update 0: the warmup's factor is 1/4
    rates = [group["lr"] for group in model.policy.critic.optimizer.param_groups]
    assert rates == pytest.approx([lr * scale / 4, lr / 4])
    step = lambda before, now: max(float((a - b.detach()).abs().max()) for a, b in zip(before, now))  # noqa: E731
    encoder_step = step(encoder, model.policy.encoder.parameters())
    head_step = step(heads, model.policy.critic.q_networks.parameters())
    # float32 weights near 1 hold a 2.5e-5 step to about 1 % (their spacing there is 1.2e-7)
    assert 0.5 * lr * scale / 4 < encoder_step <= 1.02 * lr * scale / 4
    assert 0.5 * lr / 4 < head_step <= 1.02 * lr / 4
    assert [group["lr"] for group in model.policy.actor.optimizer.param_groups] == pytest.approx([lr / 4])
    model.save(tmp_path / "model")
    loaded = SAC.load(tmp_path / "model", device="cpu")
    assert loaded.policy.encoder_lr_scale == scale
    assert [group.get("lr_scale") for group in loaded.policy.critic.optimizer.param_groups] == [scale, None]
    with pytest.raises(ValueError, match=r"encoder_lr_scale must be a positive number .* got 0"):
        agent(venv, policy_type, policy_kwargs={**SMALL_HEADS, "encoder_lr_scale": 0})
    with pytest.raises(ValueError, match=r"encoder_lr_scale is a setting of the DrQ recipe .*recipe 'sb3'"):
        TrainConfig(algorithm="sac", recipe="sb3", policy={"encoder_lr_scale": 0.3}).validate()
    with pytest.raises(ValueError, match=r"encoder_lr_scale must be a positive number .* got 'low'"):
        TrainConfig(algorithm="sac", recipe="drq", policy={"encoder_lr_scale": "low"}).validate()
    TrainConfig(
        algorithm="sac", recipe="drq", policy_type=policy_type, policy={"encoder_lr_scale": 0.3}
    ).validate()


def test_the_encoder_receives_no_actor_gradient(venv):
    model = agent(venv)
    for group in model.policy.critic.optimizer.param_groups:
        group["lr"] = 0.0  # the critic's step (which owns the encoder) changes nothing
    encoder = {k: v.clone() for k, v in model.policy.encoder.state_dict().items()}
    actor = {k: v.clone() for k, v in model.policy.actor.state_dict().items()}
    drq_step(model, batch(model), update=0)  # update 0: critic, actor and temperature
    assert all(torch.equal(v, model.policy.encoder.state_dict()[k]) for k, v in encoder.items())
    changed = [k for k, v in actor.items() if not torch.equal(v, model.policy.actor.state_dict()[k])]
    assert changed and not any(k.startswith("_encoder") for k in changed)
    assert not set(model.policy.actor.state_dict()) & {f"encoder.{k}" for k in encoder}


def test_actor_temperature_and_target_follow_their_intervals(venv, monkeypatch):
    model = agent(venv, actor_update_interval=2, target_update_interval=3)
    steps = {"actor": 0, "alpha": 0}
    for name, optimizer in (("actor", model.policy.actor.optimizer), ("alpha", model.ent_coef_optimizer)):
        original = optimizer.step
        monkeypatch.setattr(
            optimizer,
            "step",
            lambda *a, _o=original, _n=name, **k: (steps.__setitem__(_n, steps[_n] + 1), _o(*a, **k))[1],
        )  # noqa: E501
    target_changes, previous = [], [p.clone() for p in model.policy.critic_target.parameters()]
    model.replay_buffer = type("Fixed", (), {"sample": lambda self, n, env=None: batch(model, n)})()
    for _ in range(6):
        model.train(gradient_steps=1, batch_size=4)
        now = list(model.policy.critic_target.parameters())
        target_changes.append(any(not torch.equal(a, b) for a, b in zip(previous, now)))
        previous = [p.clone() for p in now]
    assert steps == {"actor": 3, "alpha": 3}  # updates 0, 2, 4
    assert target_changes == [True, False, False, True, False, False]  # updates 0 and 3
    assert model._n_updates == 6


def test_the_target_copy_includes_the_encoder_and_polyak_uses_tau(venv):
    model = agent(venv, tau=0.25)
    policy = model.policy
    assert policy.critic_target.encoder is not policy.encoder
    before = [p.clone() for p in policy.critic_target.encoder.parameters()]
    with torch.no_grad():
        for p in policy.encoder.parameters():
            p.add_(1.0)
    model.replay_buffer = type("Fixed", (), {"sample": lambda self, n, env=None: batch(model, n)})()
    for group in policy.critic.optimizer.param_groups:
        group["lr"] = 0.0
    model.train(gradient_steps=1, batch_size=4)  # update 0: a target update
    for old, new, online in zip(
        before, policy.critic_target.encoder.parameters(), policy.encoder.parameters()
    ):
        assert torch.allclose(new, 0.75 * old + 0.25 * online, atol=1e-6)


def test_drq_defaults_are_drqs_values(venv):
    assert DRQ_DEFAULTS["batch_size"] == 512 and DRQ_DEFAULTS["learning_rate"] == 1e-3
    model = make_agent("sac", venv, policy_type="cnn", recipe="drq", device="cpu", buffer_size=100)
    assert (model.target_augmentations, model.critic_augmentations, model.actor_update_interval) == (2, 2, 2)
    assert (model.tau, model.target_update_interval, model.learning_starts) == (0.01, 2, 1000)
    assert math.isclose(float(model.log_ent_coef.detach().exp()), 0.1, rel_tol=1e-6)
    policy = model.policy
    assert isinstance(policy, DrQSACPolicy) and policy.hidden_dim == 1024 and policy.hidden_depth == 2
    assert [m.out_features for m in policy.critic.q_networks[0] if isinstance(m, torch.nn.Linear)] == [
        1024,
        1024,
        1,
    ]
    assert policy.feature_dim == 50 and policy.critic.readout.linear.out_features == 50


def test_drq_cnn_is_drqs_encoder():
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    model = make_agent_free_encoder("drq-cnn", space)
    convs = [m for m in model.convs if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride, c.padding) for c in convs] == [
        (32, (3, 3), (2, 2), (0, 0)),
        (32, (3, 3), (1, 1), (0, 0)),
        (32, (3, 3), (1, 1), (0, 0)),
        (32, (3, 3), (1, 1), (0, 0)),
    ]
    assert model.conv_shape == (32, 35, 35) and model.out_dim == 32 * 35 * 35
    nature = make_agent_free_encoder("cnn", space)
    assert nature.conv_shape == (64, 7, 7)


def make_agent_free_encoder(name, space):
    from agents.encoders import build_encoder

    return build_encoder(name, space, PerceiverConfig())


def test_conv_stems_scale_pixels_as_drq_does_without_touching_the_input():
    from perceiver_policy.modalities import channels_last_pixels

    pixels = torch.randint(0, 256, (4, 9, 84, 84), dtype=torch.uint8)
    for dtype in (torch.float32, torch.bfloat16):  # uint8 -> float32 / bf16 is exact (integers to 256)
        x = channels_last_pixels(pixels, dtype)
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x.float(), pixels.float())
    floats = pixels.float().contiguous(memory_format=torch.channels_last)
    before = floats.clone()
    assert channels_last_pixels(floats) is floats and torch.equal(floats, before)  # read, never written
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    encoder = make_agent_free_encoder("drq-cnn", space)
    reference = torch.nn.Sequential(
        *[torch.nn.ReLU() if isinstance(m, torch.nn.ReLU) else m for m in encoder.convs]
    )
    expected = reference((pixels.float() / 255.0).contiguous(memory_format=torch.channels_last)).flatten(1)
    got = encoder({"pixels": pixels})  # DrQ's `obs / 255.`, folded into the first layer: float rounding apart
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6) and got.abs().max() > 0.1


@pytest.mark.parametrize(
    "kernel, stride, padding, size",
    [(3, 2, 1, 84), (3, 2, 1, 85), (8, 4, 3, 84), (5, 4, 2, 84), (3, 1, 1, 13), (4, 2, 1, 64), (8, 4, 0, 84)],
)
@pytest.mark.parametrize("shift", [0.5, 0.0])
def test_scaled_conv2d_is_the_conv_of_the_scaled_zero_padded_image_with_its_gradients(
    kernel, stride, padding, size, shift
):
    """The scaling folded into the weights, the cells whose windows reach the padding corrected: the same output
    and weight / bias gradients as scaling first, at every border (leading and trailing padded cells)."""
    from perceiver_policy.modalities import channels_last_pixels, scaled_conv2d

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(9, 8, kernel, stride, padding)
    pixels = torch.randint(0, 256, (2, 9, size, size), dtype=torch.uint8)
    expected = conv(pixels.float() / 255.0 - shift)
    got = scaled_conv2d(conv, channels_last_pixels(pixels), shift)
    assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    want = torch.autograd.grad((expected * weights).sum(), [conv.weight, conv.bias])
    have = torch.autograd.grad((got * weights).sum(), [conv.weight, conv.bias])
    for a, b in zip(want, have):
        assert (a - b).norm() < 1e-5 * a.norm()  # the folded sums cancel: relative, not elementwise
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 input: raw values exact, within bf16 rounding
        low = scaled_conv2d(conv, channels_last_pixels(pixels, torch.bfloat16), shift)
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected).abs().max() < 4 * 2**-8 * expected.abs().max()
    with (
        torch.no_grad()
    ):  # acting: the border correction is kept while the weights stay, renewed when they change
        assert torch.allclose(scaled_conv2d(conv, channels_last_pixels(pixels), shift), expected, atol=1e-5)
        conv.weight.mul_(-2.0)
        again = scaled_conv2d(conv, channels_last_pixels(pixels), shift)
        assert torch.allclose(again, conv(pixels.float() / 255.0 - shift), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="ungrouped, int-padded Conv2d, got groups 3"):
        scaled_conv2d(torch.nn.Conv2d(9, 9, 3, groups=3), channels_last_pixels(pixels))


def test_an_image_too_small_for_the_convolutions_is_a_named_error():
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8)})
    with pytest.raises(ValueError, match="encoder 'cnn' cannot read 32x32 images"):
        make_agent_free_encoder("cnn", space)


def test_conv_encoders_read_every_key_but_the_state_and_refuse_absent_flags():
    from agents.encoders import build_encoder

    space = spaces.Dict(
        {
            "pixels": spaces.Box(0, 255, (6, 48, 48), np.uint8),
            "proprio": spaces.Box(-np.inf, np.inf, (5,), np.float32),
            "action_history": spaces.Box(-1, 1, (4, 2), np.float32),
            "state": spaces.Box(-np.inf, np.inf, (7,), np.float32),
        }
    )
    encoder = build_encoder("cnn", space, PerceiverConfig())
    assert encoder.pixel_key == "pixels" and encoder.vector_keys == ["action_history", "proprio"]
    assert encoder.vector_dim == 5 + 8
    obs = {k: torch.zeros((2, *s.shape), dtype=torch.uint8 if s.dtype == np.uint8 else torch.float32)
           for k, s in space.spaces.items()}  # fmt: skip
    base = encoder(obs)
    obs["proprio"] = torch.ones(2, 5)
    assert not torch.equal(encoder(obs), base)  # the vector keys reach the features
    obs["state"] = torch.ones(2, 7)
    assert torch.equal(encoder(obs), encoder({k: v for k, v in obs.items() if k != "state"}))
    with pytest.raises(ValueError, match="absent_modalities"):
        build_encoder("drq-cnn", spaces.Dict({**space.spaces, "absent_modalities": spaces.MultiBinary(3)}),
                      PerceiverConfig())  # fmt: skip


def test_recipe_errors_name_the_valid_choices(venv):
    with pytest.raises(ValueError, match=r"unknown recipe 'drqq'; valid choices: \['sb3', 'drq'\]"):
        make_agent("sac", venv, recipe="drqq", device="cpu")
    with pytest.raises(ValueError, match="policy_type 'cnn' trains with recipe 'drq'"):
        make_agent("sac", venv, policy_type="cnn", device="cpu")
    with pytest.raises(ValueError, match="needs algorithm 'sac'"):
        make_agent("ppo", venv, policy_type="drq-cnn", recipe="drq", device="cpu")
    with pytest.raises(ValueError, match="recipe 'drq' is a SAC recipe"):
        make_agent("ppo", venv, recipe="drq", device="cpu")
    with pytest.raises(ValueError, match="target_augmentations must be a positive integer, got 0"):
        agent(venv, target_augmentations=0)
    with pytest.raises(ValueError, match=r"\{'critic_augmentations': 2\} are settings of DrQ's update rule"):
        make_agent("sac", venv, perceiver=LEAN, device="cpu", buffer_size=100, critic_augmentations=2)
    with pytest.raises(ValueError, match=r"target_encoder must be one of \('copy', 'online'\), got 'onlin'"):
        agent(venv, target_encoder="onlin")
    with pytest.raises(ValueError, match=r"\{'target_encoder': 'copy'\} are settings of DrQ's update rule"):
        make_agent("sac", venv, perceiver=LEAN, device="cpu", buffer_size=100, target_encoder="copy")


def test_conv_tokenizer_reads_the_stacked_frames_into_grid_tokens():
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    encoder = PerceiverEncoder(space, PerceiverConfig(num_latents=4, latent_dim=16, pixel_tokenizer="conv"))
    assert encoder.num_tokens == {"pixels": 11 * 11}  # 84 -> 42 -> 21 -> 11
    adapter = encoder.adapters["pixels"]
    assert adapter.spec.kind == "conv_image" and adapter.stem[0].in_channels == 9  # all three frames at once
    assert adapter.position_features.shape[0] == 121
    x = torch.randint(0, 256, (2, 9, 84, 84), dtype=torch.uint8)
    tokens = adapter(x)
    assert tokens.shape == (2, 121, 16)
    moved = x.clone()
    moved[:, 6:] = torch.roll(x[:, 6:], 4, dims=-1)  # only the newest frame changes: every token may change
    assert not torch.equal(adapter(moved), tokens)
    with pytest.raises(ValueError, match="pixel_tokenizer 'conf' unknown; valid choices"):
        PerceiverConfig(pixel_tokenizer="conf")
    with pytest.raises(ValueError, match="conv_strides must be a non-empty list"):
        PerceiverConfig(conv_strides=[])
    # NatureCNN's stem (8x8/4, 4x4/2, 3x3/1), padded by (k - 1) // 2: 84 -> 21 -> 10 -> 10
    nature = PerceiverConfig(
        num_latents=4, latent_dim=16, pixel_tokenizer="conv", conv_kernels=[8, 4, 3], conv_strides=[4, 2, 1]
    )
    encoder = PerceiverEncoder(space, nature)
    assert encoder.num_tokens == {"pixels": 10 * 10}
    stem = [layer for layer in encoder.adapters["pixels"].stem if isinstance(layer, torch.nn.Conv2d)]
    assert [(c.kernel_size, c.stride, c.padding) for c in stem] == [((8, 8), (4, 4), (3, 3)), ((4, 4), (2, 2), (1, 1)),
                                                                    ((3, 3), (1, 1), (1, 1))]  # fmt: skip
    assert encoder.adapters["pixels"](x).shape == (2, 100, 16)
    with pytest.raises(
        ValueError, match=r"conv_kernels must be None or one positive integer per conv_strides entry \(3\)"
    ):
        PerceiverConfig(conv_kernels=[8, 4])


def test_keypoint_tokens_carry_where_a_bright_square_is():
    """One token per keypoint whose content is the expected (x, y) of its map's spatial softmax: with a stem that
    passes the newest frame's red channel and a cold softmax, the keypoint is the square's centre in [-1, 1]."""
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8)})
    config = PerceiverConfig(num_latents=4, latent_dim=16, pixel_tokenizer="keypoints", keypoints=3,
                             conv_strides=[1], conv_channels=2)  # fmt: skip
    encoder = PerceiverEncoder(space, config)
    assert encoder.num_tokens == {"pixels": 3}
    adapter = encoder.adapters["pixels"]
    assert adapter.spec.kind == "keypoint_image" and adapter.stem[0].in_channels == 9  # all frames at once
    with torch.no_grad():
        adapter.stem[0].weight.zero_()
        adapter.stem[0].weight[0, 6, 1, 1] = 1.0  # feature 0: relu(red / 255 - 0.5) of the newest frame
        adapter.stem[0].bias.zero_()
        adapter.keypoint_maps.weight.zero_()
        adapter.keypoint_maps.weight[:, 0] = 1.0
        adapter.keypoint_maps.bias.zero_()
        adapter.log_temperature.fill_(math.log(0.005))  # logits 0 or 100: all the mass on the square
    cell = torch.linspace(-1, 1, 32)
    for row, col in [(4, 20), (25, 3), (14, 14)]:
        x = torch.zeros(2, 9, 32, 32, dtype=torch.uint8)
        x[:, 6, row : row + 2, col : col + 2] = 255  # a 2 x 2 square in the newest frame
        x[:, 0, 0:2, 0:2] = 255  # an older frame's square: feature 0 does not see it
        keypoints = adapter.tokens_content(x)
        expected = torch.tensor([(cell[col] + cell[col + 1]) / 2, (cell[row] + cell[row + 1]) / 2])
        torch.testing.assert_close(keypoints, expected.expand(2, 3, 2), atol=1e-4, rtol=0)
    assert adapter(x).shape == (2, 3, 16)
    per_frame = PerceiverEncoder(space, dataclasses.replace(config, keypoints_per_frame=True))
    frames = per_frame.adapters["pixels"]  # each frame alone through the stem: 3 keypoints per frame
    assert per_frame.num_tokens == {"pixels": 9} and frames.stem[0].in_channels == 3
    assert frames.position_features.shape[0] == 9  # a (frame, keypoint) index
    with torch.no_grad():
        frames.stem[0].weight.zero_()
        frames.stem[0].weight[0, 0, 1, 1] = 1.0  # feature 0: each frame's red channel
        frames.stem[0].bias.zero_()
        frames.keypoint_maps.load_state_dict(adapter.keypoint_maps.state_dict())
        frames.log_temperature.copy_(adapter.log_temperature)
    corner = torch.tensor([(cell[0] + cell[1]) / 2] * 2)
    by_frame = torch.stack([corner, torch.zeros(2), expected]).repeat_interleave(3, dim=0)  # frame 1 is blank
    torch.testing.assert_close(frames.tokens_content(x), by_frame.expand(2, 9, 2), atol=1e-4, rtol=0)
    keypoints.sum().backward()  # the temperature learns with the maps
    assert adapter.log_temperature.grad is not None and adapter.keypoint_maps.weight.grad is not None
    with pytest.raises(ValueError, match="pixel_tokenizer 'keypoints' has none"):
        PerceiverConfig(pixel_tokenizer="keypoints", image_locality=1.0)
    with pytest.raises(ValueError, match="keypoints must be a positive integer, got 0"):
        PerceiverConfig(pixel_tokenizer="keypoints", keypoints=0)
    with pytest.raises(ValueError, match=r"valid choices: \['patch', 'conv', 'keypoints'\]"):
        PerceiverConfig(pixel_tokenizer="keypoint")


def test_state_decoding_joins_the_critic_loss_of_the_drq_perceiver():
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("pixels",), image_size=48,
                             action_repeat=8, privileged_state=True)  # fmt: skip
    model = make_agent("sac", venv, perceiver=LEAN, policy_kwargs=dict(SMALL_HEADS), recipe="drq", device="cpu",
                       buffer_size=100, learning_starts=0, aux_state_weight=1.0)  # fmt: skip
    data = batch(model)
    decoder = model.policy.state_decoder
    assert decoder is not None and all(
        any(p is q for group in model.policy.critic.optimizer.param_groups for q in group["params"])
        for p in decoder.parameters()
    )
    metrics = drq_step(model, data, update=0)
    assert set(metrics["state_decode"]) == {"position", "velocity"}
    with pytest.raises(ValueError, match="encoder 'cnn' has none"):
        make_agent(
            "sac", venv, policy_type="cnn", recipe="drq", device="cpu", buffer_size=100, aux_state_weight=1.0
        )
    venv.close()


def test_the_perceiver_reads_out_by_query_or_flat_and_conv_encoders_flat_only(venv):
    from agents.encoders import FeatureReadout, QueryReadout

    query = agent(venv, "perceiver").policy
    assert isinstance(query.critic.readout, QueryReadout) and query.readout == "query"
    model = make_agent(
        "sac", venv, perceiver=LEAN, policy_kwargs={**SMALL_HEADS, "readout": "flat"}, policy_type="perceiver",
        recipe="drq", device="cpu", seed=0, buffer_size=200, learning_starts=0,
    )  # fmt: skip
    flat = model.policy
    assert isinstance(flat.critic.readout, FeatureReadout) and isinstance(flat.actor.readout, FeatureReadout)
    assert flat.critic.readout.linear.in_features == LEAN["num_latents"] * LEAN["latent_dim"]
    h = flat.encoder(batch(model).observations)
    assert flat.actor.mean_std(h)[0].shape == (6, 1)
    assert flat._get_constructor_parameters()["readout"] == "flat"  # saved with the policy
    for policy_type, readout, message in (("cnn", "query", r"readout 'query'.*'flat'"),
                                          ("perceiver", "mean", r"'mean'.*\['query', 'flat'\]")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            make_agent("sac", venv, perceiver=LEAN, policy_kwargs={**SMALL_HEADS, "readout": readout},
                       policy_type=policy_type, recipe="drq", device="cpu", buffer_size=200)  # fmt: skip


def test_query_critic_head_reads_the_latents_with_action_queries_and_is_saved(venv, tmp_path):
    """critic_head='queries': SB3's recipe's Perceiver critic (action-conditioned output queries over the latents)
    under DrQ's recipe; the actor keeps DrQ's head; the target critic is a full copy, encoder included."""
    from stable_baselines3 import SAC

    from agents.drq_policy import QueryCritic
    from agents.encoders import FeatureReadout
    from experiments.config import TrainConfig
    from perceiver_policy.sac_policy import PerceiverSACCritic

    model = agent(venv, "perceiver", {**SMALL_HEADS, "critic_head": "queries"})
    policy = model.policy
    assert isinstance(policy.critic, QueryCritic) and isinstance(policy.critic.heads, PerceiverSACCritic)
    assert (
        isinstance(policy.critic_target, QueryCritic) and policy.critic_target.encoder is not policy.encoder
    )
    assert isinstance(policy.actor, DrQActor)
    critic_params = {id(p) for g in policy.critic.optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in policy.encoder.parameters()} <= critic_params
    assert {id(p) for p in policy.critic.heads.parameters()} <= critic_params
    h = policy.encoder(batch(model).observations)
    q_low, q_high = (torch.cat(policy.critic.q_values(h, torch.full((6, 1), a)), 1) for a in (-1.0, 1.0))
    assert q_low.shape == (6, 2) and not torch.allclose(q_low, q_high)  # Q reads the action
    model.save(tmp_path / "model")
    loaded = SAC.load(tmp_path / "model", device="cpu").policy
    assert loaded.critic_head == "queries" and isinstance(loaded.critic, QueryCritic)
    torch.testing.assert_close(torch.cat(loaded.critic.q_values(h, torch.zeros(6, 1)), 1),
                               torch.cat(policy.critic.q_values(h, torch.zeros(6, 1)), 1))  # fmt: skip
    # the actor alone reads the latents flattened (readout 'flat'); the critic keeps its action queries
    flat = agent(venv, "perceiver", {**SMALL_HEADS, "critic_head": "queries", "readout": "flat"})
    flat.save(tmp_path / "flat")
    for policy in (flat.policy, SAC.load(tmp_path / "flat", device="cpu").policy):
        assert isinstance(policy.critic, QueryCritic) and isinstance(policy.actor.readout, FeatureReadout)
        assert policy.actor.readout.linear.in_features == LEAN["num_latents"] * LEAN["latent_dim"]
    assert flat.policy.actor.mean_std(flat.policy.encoder(batch(flat).observations))[0].shape == (6, 1)
    for policy_type, kwargs, message in (
        ("perceiver", {"critic_head": "attention"}, r"unknown critic_head 'attention'; valid choices: \['mlp', 'queries'\]"),
        ("cnn", {"critic_head": "queries"}, r"encoder 'cnn' takes critic_head 'mlp'"),
        ("perceiver", {"critic_head": "queries", "center_features": "running"}, r"no readout for center_features 'running'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            agent(venv, policy_type, {**SMALL_HEADS, **kwargs})
    for config, message in (
        (
            dict(recipe="sb3", policy={"critic_head": "queries"}),
            r"critic_head is a setting of the DrQ recipe",
        ),
        (
            dict(recipe="drq", policy_type="drq-cnn", policy={"critic_head": "queries"}),
            r"'drq-cnn' takes 'mlp'",
        ),
        (
            dict(recipe="drq", policy={"critic_head": "q"}),
            r"critic_head 'q' is not one of \['mlp', 'queries'\]",
        ),
    ):
        with pytest.raises(ValueError, match=message):
            TrainConfig(algorithm="sac", **config).validate()
    TrainConfig(algorithm="sac", recipe="drq", policy={"critic_head": "queries"}).validate()


def test_centered_readouts_subtract_a_running_mean_that_the_target_follows(venv, tmp_path):
    from agents.encoders import CENTER_MOMENTUM, FeatureReadout

    readout = FeatureReadout(4, 3, center=True)
    h = torch.randn(8, 4) + 5.0
    readout.train()
    readout(h)
    torch.testing.assert_close(readout.running_mean, h.mean(0))  # the first batch initialises it
    h2 = torch.randn(8, 4)
    readout(h2)
    torch.testing.assert_close(readout.running_mean, h.mean(0) + CENTER_MOMENTUM * (h2.mean(0) - h.mean(0)))
    readout.eval()
    before = readout.running_mean.clone()
    out = readout(h)
    torch.testing.assert_close(readout.running_mean, before)  # eval mode reads it, never moves it
    manual = torch.tanh(readout.norm(readout.linear(h - before)))
    torch.testing.assert_close(out, manual)
    model = make_agent(
        "sac", venv, perceiver=LEAN, policy_kwargs={**SMALL_HEADS, "center_features": True}, policy_type="perceiver",
        recipe="drq", device="cpu", seed=0, buffer_size=200, learning_starts=0,
    )  # fmt: skip
    model.set_logger(configure(None, []))
    drq_step(model, batch(model), update=0)  # update 0: the target update copies the running means
    online = dict(model.policy.critic.named_buffers())
    for name, value in model.policy.critic_target.named_buffers():
        if name.endswith("running_mean"):
            torch.testing.assert_close(value, online[name])
    assert model.policy._get_constructor_parameters()["center_features"] is True
    model.save(tmp_path / "m.zip")  # the running means are saved with the weights
    loaded = type(model).load(tmp_path / "m.zip", device="cpu")
    torch.testing.assert_close(
        loaded.policy.actor.readout.head.running_mean, model.policy.actor.readout.head.running_mean
    )


def test_drq_steps_measure_whether_the_critic_features_vary(venv):
    model = agent(venv, "perceiver")
    metrics = drq_step(model, batch(model), update=0)
    assert 0.0 < metrics["critic_feature_variation"] < 2.0
    assert "critic_feature_variation" not in drq_step(model, batch(model), update=1)  # every 100 updates


def test_the_actors_action_spread_is_zero_when_it_acts_alike_in_every_state(venv):
    from agents.drq import action_spread

    modes = torch.tensor([[0.9, 0.2], [-0.9, 0.2], [0.9, 0.2], [-0.9, 0.2]])
    assert action_spread(modes) == pytest.approx((0.9 + 0.0) / 2)  # population std per actuator, averaged
    mask = torch.tensor([[1, 0], [1, 0], [1, 1], [1, 1]])  # the second actuator is real in two samples only
    assert action_spread(torch.tensor([[0.5, 9.0], [0.5, -9.0], [0.5, 0.3], [0.5, 0.3]]), mask) == 0.0
    model = agent(venv, "perceiver")  # the DrQ step reports it on its actor updates
    assert drq_step(model, batch(model), update=0)["actor_action_spread"] > 0.0
    trunk = model.policy.actor.trunk[-1]
    with (
        torch.no_grad()
    ):  # an actor whose output ignores its input: one action, however far inside the bounds
        trunk.weight.zero_()
        trunk.bias[: model.action_space.shape[0]].fill_(1.8)  # tanh(1.8) = 0.95, the cup runs' |action|
    assert drq_step(model, batch(model), update=0)["actor_action_spread"] == 0.0


def test_a_collapse_of_the_critic_features_is_warned_once_a_run(venv, monkeypatch):
    import agents.drq as drq

    model = agent(venv, "perceiver")
    model.replay_buffer = type("Fixed", (), {"sample": lambda self, n, env=None: batch(model, n)})()
    with warnings.catch_warnings():
        warnings.simplefilter("error", drq.FeatureCollapseWarning)
        model.train(gradient_steps=1, batch_size=4)  # update 0 measures a varied batch: no warning
    measured = iter([0.0, 1e-6])
    monkeypatch.setattr(drq, "feature_variation", lambda features: next(measured))
    model._n_updates = 100
    with pytest.warns(
        drq.FeatureCollapseWarning, match=r"collapsed by update 101: .*variation 0 \(below 0.001\)"
    ):
        model.train(gradient_steps=1, batch_size=4)
    model._n_updates = 200
    with warnings.catch_warnings():
        warnings.simplefilter("error", drq.FeatureCollapseWarning)
        model.train(gradient_steps=1, batch_size=4)  # once a run
    with pytest.raises(StopIteration):
        next(measured)  # both measurements were read


def test_center_momentum_sets_how_fast_the_running_mean_follows_and_is_saved(venv, tmp_path):
    from agents.encoders import FeatureReadout

    readout = FeatureReadout(4, 3, center=True, momentum=0.5)
    readout.train()
    h, h2 = torch.randn(8, 4) + 5.0, torch.randn(8, 4)
    readout(h)
    readout(h2)
    torch.testing.assert_close(readout.running_mean, (h.mean(0) + h2.mean(0)) / 2)
    for bad in (0.0, 1.5, True, "fast"):
        with pytest.raises(ValueError, match=rf"center_momentum must be a number in \(0, 1\], got {bad!r}"):
            FeatureReadout(4, 3, center=True, momentum=bad)
    model = make_agent(
        "sac", venv, perceiver=LEAN, policy_type="perceiver", recipe="drq", device="cpu", seed=0, buffer_size=200,
        policy_kwargs={**SMALL_HEADS, "center_features": True, "center_momentum": 0.1},
    )  # fmt: skip
    assert {model.policy.actor.readout.head.momentum, model.policy.critic.readout.head.momentum} == {0.1}
    model.save(tmp_path / "m.zip")
    loaded = type(model).load(tmp_path / "m.zip", device="cpu")
    assert loaded.policy.critic_target.readout.head.momentum == 0.1


def square_stacks(columns, size=48):
    """Pixel stacks (n, 9, size, size) of one grey background with a bright square at each given column."""
    pixels = torch.full((len(columns), 9, size, size), 90, dtype=torch.uint8)
    for i, c in enumerate(columns):
        pixels[i, :, 18:26, c : c + 8] = 250
    return pixels


def test_reference_centring_subtracts_the_latents_of_the_first_observation_read(venv, tmp_path):
    from agents.drq import feature_variation
    from agents.encoders import PerceiverTrunk

    model = agent(venv, "perceiver", policy_kwargs={**SMALL_HEADS, "center_features": "reference"})
    encoder = model.policy.encoder
    assert isinstance(encoder, PerceiverTrunk) and not bool(encoder.reference_initialised)
    obs = {
        "pixels": square_stacks([2, 10, 20, 30, 38]),
        "proprio": torch.zeros(5, 5),
    }  # only the square moves
    with torch.no_grad():
        h = encoder(obs)  # the first read: the first sample becomes the reference
        plain = encoder._encode(obs)  # the latents without the reference
    assert bool(encoder.reference_initialised) and torch.equal(encoder.reference_pixels, obs["pixels"][:1])
    torch.testing.assert_close(
        h, plain - plain[:1], atol=1e-5, rtol=0
    )  # h = latents(obs) - latents(reference)
    assert h[0].abs().max() < 1e-5
    # What does not depend on the input cancels: plain latents barely differ between the squares, h does not
    assert feature_variation(h[1:]) > 10 * feature_variation(plain[1:])
    later = {"pixels": square_stacks([12, 14]), "proprio": torch.randn(2, 5)}
    encoder(later)
    assert torch.equal(encoder.reference_pixels, obs["pixels"][:1])  # captured once
    drq_step(model, batch(model), update=0)  # update 0: the target critic takes the reference
    assert torch.equal(model.policy.critic_target.encoder.reference_pixels, obs["pixels"][:1])
    model.save(tmp_path / "m.zip")
    loaded = type(model).load(tmp_path / "m.zip", device="cpu")
    assert loaded.policy.center_features == "reference"
    assert torch.equal(loaded.policy.encoder.reference_pixels, obs["pixels"][:1])


def test_centring_choices_are_checked(venv):
    with pytest.raises(
        ValueError, match=r"center_features 'mean' unknown; valid choices: \['none', 'running'"
    ):
        agent(venv, "perceiver", policy_kwargs={**SMALL_HEADS, "center_features": "mean"})
    with pytest.raises(ValueError, match="'reference' is for the Perceiver's latents; encoder 'cnn' takes"):
        agent(venv, "cnn", policy_kwargs={**SMALL_HEADS, "center_features": "reference"})
    running = agent(venv, "perceiver", policy_kwargs={**SMALL_HEADS, "center_features": "running"})
    assert running.policy.critic.readout.head.center and not running.policy.encoder.reference


def test_a_reference_centred_encoder_runs_uncached_under_streaming(venv):
    from perceiver_policy.streaming import applies, streaming

    plain = agent(venv, "perceiver")
    model = agent(venv, "perceiver", policy_kwargs={**SMALL_HEADS, "center_features": "reference"})
    assert applies(plain.policy) and not applies(model.policy)
    obs = {"pixels": square_stacks([4]), "proprio": torch.zeros(1, 5)}
    with torch.no_grad():
        expected = model.policy.actor(obs, deterministic=True)
        with streaming(model.policy) as cache:
            assert cache is None
            torch.testing.assert_close(model.policy.actor(obs, deterministic=True), expected)
