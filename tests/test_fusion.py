"""Fusion mechanisms of the encoder: mask tokens for withheld modalities, grouped latents."""

import json
import re

import numpy as np
import pytest
import torch

from perceiver_policy import PerceiverConfig, PerceiverEncoder
from perceiver_policy.attention import ABSENT_LOGIT
from tests.conftest import sample_obs

SMALL = {"num_latents": 8, "latent_dim": 16, "fourier_bands": 2, "patch_size": 8}


def masked_encoder(space, **fields):
    return PerceiverEncoder(space, PerceiverConfig(**{**SMALL, "missing_tokens": "mask", **fields})).eval()


def test_mask_tokens_a_missing_key_equals_a_flag_and_ignores_the_withheld_content(dict_space):
    encoder = masked_encoder(dict_space)
    torch.nn.init.normal_(encoder.mask_tokens)  # as after training: mask tokens that differ from zero
    obs = sample_obs(dict_space, 4)
    flags = {"pixels": torch.tensor([True, False, True, False])}
    with torch.no_grad():
        flagged = encoder(obs, absent=flags)
        without = encoder({k: v for k, v in obs.items() if k != "pixels"})
        other = encoder({**obs, "pixels": sample_obs(dict_space, 4, seed=1)["pixels"]}, absent=flags)
        full = encoder(obs)
    torch.testing.assert_close(flagged[[0, 2]], without[[0, 2]])  # flagged == missing: the same mask tokens
    torch.testing.assert_close(flagged[[0, 2]], other[[0, 2]])  # the withheld frames do not leak in
    torch.testing.assert_close(flagged[[1, 3]], full[[1, 3]])  # other samples keep their pixels
    assert not torch.allclose(flagged[0], full[0])


def test_mask_tokens_keep_the_token_count_and_are_trained(dict_space):
    encoder = masked_encoder(dict_space).train()
    encoder.capture_attention = True
    obs = sample_obs(dict_space, 3)
    latents = encoder({k: v for k, v in obs.items() if k != "pixels"})
    assert encoder.last_capture["weights"].shape[-1] == sum(encoder.num_tokens.values())
    latents.square().mean().backward()
    assert encoder.mask_tokens.grad[encoder.names.index("pixels")].abs().sum() > 0
    assert encoder.mask_tokens.grad[encoder.names.index("proprio")].abs().sum() == 0  # present: not used


def test_removal_is_the_default_and_drops_the_tokens(dict_space):
    encoder = PerceiverEncoder(dict_space, PerceiverConfig(**SMALL)).eval()
    assert encoder.mask_tokens is None
    encoder.capture_attention = True
    with torch.no_grad():
        encoder({k: v for k, v in sample_obs(dict_space, 2).items() if k != "pixels"})
    assert encoder.last_capture["weights"].shape[-1] == sum(
        n for k, n in encoder.num_tokens.items() if k != "pixels"
    )


def test_grouped_latents_read_only_their_modality(dict_space):
    groups = {"pixels": 4, "proprio": 2, "shared": 2}
    encoder = masked_encoder(
        dict_space, latent_groups=groups, self_attn_layers=0
    )  # latents = cross-attention
    obs = sample_obs(dict_space, 2)
    changed = {**obs, "proprio": obs["proprio"] + 1.0}
    with torch.no_grad():
        before, after = encoder(obs), encoder(changed)
    assert torch.allclose(before[:, :4], after[:, :4])  # the pixel group does not read proprio
    assert not torch.allclose(before[:, 4:6], after[:, 4:6])  # the proprio group does
    assert not torch.allclose(before[:, 6:], after[:, 6:])  # shared latents read everything
    # action_history has no group: only the shared latents read it
    history = {**obs, "action_history": obs["action_history"] + 1.0}
    with torch.no_grad():
        moved = encoder(history)
    assert torch.allclose(before[:, :6], moved[:, :6]) and not torch.allclose(before[:, 6:], moved[:, 6:])


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"missing_tokens": "zero"}, r"missing_tokens 'zero' unknown; valid choices: \['remove', 'mask'\]"),
        ({"missing_tokens": "mask", "latent_groups": {"pixels": 3}}, r"has 3 latents; num_latents is 8"),
        ({"latent_groups": {"pixels": 8}}, r"needs missing_tokens 'mask'"),
        ({"missing_tokens": "mask", "latent_groups": {"pixels": 0, "shared": 8}}, r"positive latent counts"),
        ({"missing_tokens": "mask", "latent_groups": {"pixels:8": None}}, r"a space after each colon\), got"),
        (
            {"image_locality": -1.0},
            r"image_locality must be a number >= 0 \(grid spacings; 0: off\), got -1.0",
        ),
        ({"image_locality": True}, r"image_locality must be a number >= 0 .*got True"),
        (
            {"image_locality": 1.0, "latent_scaling": [4, 8]},
            r"image_locality and latent_scaling cannot be combined",
        ),
    ],
)
def test_bad_fusion_settings_are_named_errors(fields, message):
    with pytest.raises(ValueError, match=message):
        PerceiverConfig(**{**SMALL, **fields})


def test_a_group_for_a_modality_the_observation_lacks_is_a_named_error(dict_space):
    with pytest.raises(
        ValueError,
        match=r"latent_groups names \['lidar'\].*valid choices: \['action_history', 'pixels', 'proprio', 'shared'\]",
    ):
        masked_encoder(dict_space, latent_groups={"lidar": 4, "shared": 4})


def zero_queries(encoder):
    with torch.no_grad():  # every latent's logits are its biases alone
        encoder.cross_attention.q.weight.zero_()
        encoder.cross_attention.q.bias.zero_()
    return encoder


def test_latents_placed_on_the_image_pool_their_place_and_keep_the_images_share(dict_space):
    from perceiver_policy.introspection import modality_balance, modality_path

    obs = sample_obs(dict_space, 4)
    config = {**SMALL, "num_latents": 16, "pixel_tokenizer": "conv", "conv_strides": [2, 2]}  # 8 x 8 tokens
    plain = zero_queries(PerceiverEncoder(dict_space, PerceiverConfig(**config)).eval())
    placed = zero_queries(PerceiverEncoder(dict_space, PerceiverConfig(**config, image_locality=1.0)).eval())
    shares = []
    for encoder in (plain, placed):
        encoder.capture_attention = True
        with torch.no_grad():
            encoder(obs)
        shares.append(modality_balance(encoder.last_capture))
    assert shares[1] == pytest.approx(shares[0], abs=1e-5)  # the prior moves attention within the image only
    assert (
        modality_path(plain, obs, "pixels")["focus"]
        < 1e-5
        < 0.1
        < modality_path(placed, obs, "pixels")["focus"]
    )
    weights = placed.last_capture["weights"][0, 0]  # (latents, tokens)
    pixels = placed.last_capture["modality_index"] == placed.names.index("pixels")
    peaks = weights[:, pixels].argmax(-1)  # each latent's most attended cell of the 8 x 8 map
    rows, cols = (peaks // 8).tolist(), (peaks % 8).tolist()
    # 16 latents on a 4 x 4 grid of places, row-major: latent 0 top left, 3 top right, 12 bottom left, 15 bottom right
    assert (rows[0], cols[0]) in {(0, 0), (0, 1), (1, 0), (1, 1)} and (rows[15], cols[15]) in {
        (6, 6),
        (6, 7),
        (7, 6),
        (7, 7),
    }
    assert rows[3] <= 1 and cols[3] >= 6 and rows[12] >= 6 and cols[12] <= 1


def test_only_the_image_groups_latents_get_a_place_and_patch_tokens_repeat_it_per_frame(dict_space):
    groups = {"pixels": 4, "proprio": 2, "shared": 2}
    encoder = masked_encoder(dict_space, latent_groups=groups, image_locality=1.0)
    present = tuple(range(len(encoder.names)))
    bias = encoder._latent_token_bias(present, torch.device("cpu"))
    index = encoder._modality_index(present, torch.device("cpu"))
    pixels = index == encoder.names.index("pixels")
    image = bias[:4][:, pixels]  # the pixel group's latents on the pixel tokens: a place prior each
    assert (image.std(-1) > 0.1).all()
    per_frame = image.reshape(
        4, 3, -1
    )  # patch tokens ordered (frame, row, col): the same prior in every frame
    assert torch.equal(per_frame[:, 0], per_frame[:, 1]) and torch.equal(per_frame[:, 0], per_frame[:, 2])
    assert (bias[4:6][:, pixels] == ABSENT_LOGIT).all()  # ... the others read none (proprio group) ...
    assert (bias[6:][:, pixels] == 0).all()  # ... or all of the image alike (shared latents)
    assert (bias[4:6][:, index == encoder.names.index("proprio")] == 0).all()


def _scene(background: torch.Tensor, ball: torch.Tensor, batch: int) -> torch.Tensor:
    """(batch, 9, 32, 32) uint8 stacks: a fixed background plus the same ball in every frame."""
    return (background + ball).to(torch.uint8).repeat(batch, 3, 1, 1)


@pytest.mark.parametrize("tokenizer", ["patch", "conv", "keypoints"])
def test_a_running_mean_frame_cancels_the_fixed_background(dict_space, tokenizer):
    """Two cameras with different fixed backgrounds see the same moving ball: once each encoder's mean frame is
    its background, their pixel tokens are the same; without centring they differ."""
    generator = torch.Generator().manual_seed(0)
    backgrounds = [torch.randint(40, 140, (1, 3, 32, 32), generator=generator).float() for _ in range(2)]
    ball = torch.zeros(1, 3, 32, 32)
    ball[..., 10:16, 20:26] = 100.0
    config = {**SMALL, "pixel_tokenizer": tokenizer}
    centred = PerceiverEncoder(dict_space, PerceiverConfig(**config, image_centering="running"))
    plain = PerceiverEncoder(dict_space, PerceiverConfig(**config))
    plain.load_state_dict(centred.state_dict(), strict=False)  # the same weights, no mean frame
    tokens, plain_tokens = [], []
    for background in backgrounds:
        adapter = centred.adapters["pixels"]
        adapter.mean_count.zero_()
        adapter.train()
        adapter(
            _scene(background, 0.0, 8)
        )  # training passes over the empty scene: the mean is its background
        assert torch.allclose(adapter.mean_frame, background[0], atol=1e-4)
        adapter.eval()
        with torch.no_grad():
            tokens.append(adapter(_scene(background, ball, 1)))
            plain_tokens.append(plain.adapters["pixels"](_scene(background, ball, 1)))
    torch.testing.assert_close(tokens[0], tokens[1], atol=1e-4, rtol=0)
    # keypoints start near the map's centre (an untrained softmax is near uniform): they move less
    assert (plain_tokens[0] - plain_tokens[1]).abs().max() > (0.01 if tokenizer == "keypoints" else 0.1)


def test_the_mean_frame_follows_training_passes_only_and_is_saved_with_the_weights(dict_space):
    from perceiver_policy.modalities import CENTERING_MOMENTUM

    config = PerceiverConfig(**SMALL, pixel_tokenizer="conv", image_centering="running")
    encoder = PerceiverEncoder(dict_space, config)
    adapter = encoder.adapters["pixels"]
    first, second = sample_obs(dict_space, 4, seed=1), sample_obs(dict_space, 4, seed=2)
    frames = [obs["pixels"].float().unflatten(1, (3, 3)).mean(dim=(0, 1)) for obs in (first, second)]
    encoder.train()
    encoder(first)  # the first pass sets the mean to its batch's ...
    torch.testing.assert_close(adapter.mean_frame, frames[0])
    assert int(adapter.mean_count) == 1  # one batch of the running mean, as every training pass
    expected_mean = (frames[0] + frames[1]) / 2  # the first 1 / momentum batches weigh alike
    centred = adapter.centred(second["pixels"])  # a pass subtracts the mean as it was, then moves it
    torch.testing.assert_close(centred, second["pixels"].float() - frames[0].repeat(3, 1, 1) + 127.5)
    torch.testing.assert_close(adapter.mean_frame, expected_mean)
    assert int(adapter.mean_count) == 2 and CENTERING_MOMENTUM < 1 / 2
    encoder.eval()
    before = adapter.mean_frame.clone()
    with torch.no_grad():
        expected = encoder(second)
    assert torch.equal(adapter.mean_frame, before)  # acting and evaluating never move it
    restored = PerceiverEncoder(dict_space, config).eval()
    restored.load_state_dict(encoder.state_dict())
    assert {"adapters.pixels.mean_frame", "adapters.pixels.mean_count"} <= set(encoder.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(restored(second), expected)


@pytest.mark.parametrize("per_frame", [False, True])
def test_the_mean_frame_folded_into_the_stem_is_the_stem_over_centred_pixels(dict_space, per_frame):
    """Conv and keypoint stems subtract the mean frame inside their first layer: the features and the first
    layer's gradients equal the stem run as written over (x - mean) / 255, zero-padded; a training pass uses the
    mean as it was, then moves it; kept offsets follow changes of the mean and of the weights."""
    import torch.nn.functional as F

    tokenizer = {"pixel_tokenizer": "keypoints", "keypoints_per_frame": True} if per_frame else {}
    config = PerceiverConfig(**{"pixel_tokenizer": "conv", **SMALL, **tokenizer}, image_centering="running")
    # weights of their own, whatever ran before in this worker: float rounding is compared
    torch.manual_seed(0)
    adapter = PerceiverEncoder(dict_space, config).adapters["pixels"]
    with torch.no_grad():
        adapter.mean_frame.copy_(
            torch.rand(adapter.mean_frame.shape, generator=torch.Generator().manual_seed(0)) * 255
        )
        adapter.mean_count.fill_(5)

    def written(mean: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The stem over (x - mean) / 255, as the layers are written, and its smallest |pre-activation|."""
        frames = x.reshape(-1, 3, *x.shape[-2:]) if per_frame else x
        h = (frames.float() - mean.repeat(frames.shape[1] // 3, 1, 1)) / 255.0
        smallest = float("inf")
        for layer in adapter.stem:
            if isinstance(layer, torch.nn.Conv2d):
                h = layer(h)
                smallest = min(smallest, float(h.abs().min()))
                h = F.relu(h)
        return h, smallest

    # A pre-activation within float rounding of 0 can fall on either side of its ReLU in the folded and the
    # written stem (one at 7e-8 moved a channel's weight gradient by 4 % on an AMD EPYC): inputs whose every
    # pre-activation clears 1e-5, so that the two stems' gradients compare the folding, not the rounding.
    with torch.no_grad():
        inputs = (sample_obs(dict_space, 4, seed=seed)["pixels"] for seed in range(3, 200))
        x = next((x for x in inputs if written(adapter.mean_frame, x)[1] > 1e-5), None)
    assert x is not None, "no input with every pre-activation 1e-5 away from 0"

    stem_input = x.reshape(-1, 3, *x.shape[-2:]) if per_frame else x
    mean = adapter.mean_frame.clone()
    adapter.train()
    folded = adapter.stem_features(stem_input)
    expected_mean = mean.lerp(x.float().unflatten(1, (-1, 3)).mean(dim=(0, 1)), 1 / 6)
    torch.testing.assert_close(adapter.mean_frame, expected_mean)  # moved after the pass ...
    adapter.mean_frame.copy_(mean)
    adapter.eval()  # ... which subtracted the mean as it was
    reference, _ = written(mean, x)
    torch.testing.assert_close(folded, reference, atol=1e-5, rtol=1e-4)
    first = adapter.stem[0]
    grads = [
        torch.autograd.grad(out.square().sum(), [first.weight, first.bias]) for out in (folded, reference)
    ]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3)
    with torch.no_grad():  # without gradients the offset is kept ...
        torch.testing.assert_close(adapter.stem_features(stem_input),
                                   reference, atol=1e-5, rtol=1e-4)  # fmt: skip
        adapter.mean_frame.add_(20.0)  # ... until the mean moves
        moved = adapter.stem_features(stem_input)
        torch.testing.assert_close(moved, written(adapter.mean_frame, x)[0], atol=1e-5, rtol=1e-4)
        first.weight.mul_(0.5)  # ... or the weights change
        halved = adapter.stem_features(stem_input)
        torch.testing.assert_close(halved, written(adapter.mean_frame, x)[0], atol=1e-5, rtol=1e-4)


def test_image_centering_names_its_choices():
    with pytest.raises(
        ValueError, match=r"image_centering 'mean' unknown; valid choices: \['none', 'running'\]"
    ):
        PerceiverConfig(**SMALL, image_centering="mean")


# --------------------------------------------------------------------------- the weighted modality sampler
NAMES = ("pixels", "proprio", "action_history")


def test_mix_specs_parse_and_name_their_errors():
    from agents.modality_mix import parse_mix, parse_schedule

    assert parse_mix("all=3 pixels+action_history=1", NAMES) == {"all": 0.75, "pixels+action_history": 0.25}
    with pytest.raises(ValueError, match=r"subset 'pixels\+lidar' names \['lidar'\].*among \['pixels'"):
        parse_mix("pixels+lidar=1", NAMES)
    with pytest.raises(ValueError, match=r"weight of 'all' must be > 0, got '-1'"):
        parse_mix("all=-1", NAMES)
    with pytest.raises(ValueError, match=r"need modality_mix_mode 'curriculum', got 'fixed'"):
        parse_schedule("0: all=1; 100: proprio=1", NAMES, "fixed")
    with pytest.raises(ValueError, match=r"unknown modality_mix_mode 'greedy'; valid choices"):
        parse_schedule("all=1", NAMES, "greedy")


def test_curriculum_interpolates_between_stages_in_frames():
    from agents.modality_mix import ModalityMixer

    mixer = ModalityMixer("0: all=1; 1000: all=0.5 pixels=0.5", "curriculum", NAMES, frames_per_step=4)
    assert mixer.subsets == ["all", "pixels"]
    np.testing.assert_allclose(mixer.weights(0), [1.0, 0.0])
    np.testing.assert_allclose(mixer.weights(125), [0.75, 0.25])  # 500 frames: half way
    np.testing.assert_allclose(mixer.weights(10_000), [0.5, 0.5])
    index, flags = mixer.draw(4000, 10_000, "cpu")
    assert abs(float((index == 1).float().mean()) - 0.5) < 0.05
    assert flags[index == 1].tolist()[0] == [False, True, True]  # 'pixels': proprio and history withheld
    assert not flags[index == 0].any()


def test_active_mode_draws_more_of_the_subset_with_the_larger_td_error():
    from agents.modality_mix import ACTIVE_FLOOR, ModalityMixer

    mixer = ModalityMixer("all=0.5 pixels+action_history=0.5", "active", NAMES)
    for _ in range(300):
        mixer.record(torch.tensor([0, 0, 1, 1]), torch.tensor([0.1, 0.1, 5.0, 5.0]))
    weights = mixer.weights(0)
    assert weights[1] > 0.8 and weights[0] >= ACTIVE_FLOOR / 2 - 1e-9


def test_reliance_mode_trains_more_often_without_the_modality_the_policy_leans_on():
    from agents.modality_mix import RELIANCE_GAIN, ModalityMixer

    spec = "all=0.4 pixels+proprio=0.2 pixels+action_history=0.2 pixels=0.2"
    mixer = ModalityMixer(spec, "reliance", NAMES)
    np.testing.assert_allclose(mixer.weights(0), [0.4, 0.2, 0.2, 0.2])  # the spec until an evaluation
    # a policy that loses 58 % of its return without the cart sensor and nothing without the camera or history
    # (the camera, which no subset withholds, is neither measured nor counted: its mask token is never trained)
    assert mixer.withholdable_names == ("proprio", "action_history")
    mixer.follow_reliance({"pixels": 0.9, "proprio": 0.58, "action_history": -0.1})
    shares = {"proprio": 1.0, "action_history": 0.0}
    gaps = [
        shares["action_history"] - 1 / 2,
        shares["proprio"] - 1 / 2,
        shares["proprio"] + shares["action_history"] - 1,
    ]
    moved = 0.2 * np.exp(RELIANCE_GAIN * np.array(gaps))
    np.testing.assert_allclose(mixer.weights(0), [0.4, *(0.6 * moved / moved.sum())])
    assert mixer.weights(0)[2] > 0.3  # pixels+action_history (the cart sensor withheld) drawn most
    index, flags = mixer.draw(20_000, 0, "cpu")
    assert (
        abs(float(flags[:, 1].float().mean()) - sum(mixer.weights(0)[2:])) < 0.02
    )  # proprio withheld that often
    for balanced in (
        {"pixels": 0.3, "proprio": 0.3, "action_history": 0.3},
        {"pixels": 0.0, "proprio": -1.0},
    ):
        mixer.follow_reliance(balanced)  # equal reliance, or nothing lost: the spec again
        np.testing.assert_allclose(mixer.weights(0), [0.4, 0.2, 0.2, 0.2])
    with pytest.raises(
        ValueError, match=r"reliance drops name \['lidar'\].*\['pixels', 'proprio', 'action_history'\]"
    ):
        mixer.follow_reliance({"lidar": 0.5})


def test_the_sampler_state_round_trips_and_names_a_mismatch():
    from agents.modality_mix import ModalityMixer

    mixer = ModalityMixer("all=0.5 pixels+action_history=0.5", "reliance", NAMES)
    mixer.follow_reliance({"proprio": 0.9})
    other = ModalityMixer("all=0.5 pixels+action_history=0.5", "reliance", NAMES)
    other.load_state(mixer.state())
    np.testing.assert_allclose(other.weights(0), mixer.weights(0))
    with pytest.raises(ValueError, match=r"does not match this sampler's subsets \['all', 'pixels'\]"):
        ModalityMixer("all=0.5 pixels=0.5", "reliance", NAMES).load_state(
            {"weights": [1.0], "td_error": [1.0]}
        )


@pytest.fixture(scope="module")
def mix_venv():
    import envs

    env = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("pixels", "proprio", "action_history"),
                            image_size=32, action_repeat=8)  # fmt: skip
    yield env
    env.close()


@pytest.mark.parametrize(
    "recipe,center", [("sb3", "none"), ("drq", "none"), ("sb3", "reference"), ("drq", "reference")]
)
def test_withheld_modalities_are_masked_alike_in_online_target_and_actor_passes(
    mix_venv, monkeypatch, recipe, center
):
    from stable_baselines3.common.logger import configure

    from agents import make_agent
    from perceiver_policy.modalities import ABSENT_KEY

    model = make_agent(
        "sac", mix_venv, perceiver={**SMALL, "missing_tokens": "mask"}, recipe=recipe, device="cpu", seed=0,
        learning_starts=8, batch_size=8, modality_mix="all=0.5 pixels+action_history=0.5",
        **({"policy_kwargs": {"hidden_dim": 32, "center_features": center}, "target_augmentations": 2,
            "critic_augmentations": 2} if recipe == "drq" else {"policy_kwargs": {"center_features": center}}),
    )  # fmt: skip
    model.set_logger(configure(None, []))
    seen = []
    forward = PerceiverEncoder.forward

    def recording(self, obs, absent=None):
        seen.append(obs[ABSENT_KEY].clone() if ABSENT_KEY in obs else None)
        return forward(self, obs, absent)

    model.learn(8)  # seed steps fill the replay
    monkeypatch.setattr(PerceiverEncoder, "forward", recording)
    model.train(gradient_steps=1, batch_size=8)
    flags = [f for f in seen if f is not None]
    assert len(flags) == len(seen) >= 2  # every training pass carries the sampler's flags
    per_sample = flags[0][:8]
    assert all(
        torch.equal(f.view(-1, 8, 3)[0], per_sample) for f in flags
    )  # one subset per sample everywhere
    proprio_only = tuple(int(n == "proprio") for n in model.policy.encoder.names)
    assert set(map(tuple, per_sample.int().tolist())) <= {
        (0, 0, 0),
        proprio_only,
    }  # proprio withheld or nothing
    seen.clear()
    model.predict(mix_venv.observation_space.sample(), deterministic=True)
    assert seen == [None]  # acting sees every modality


def on_policy_mix_model(venv, algorithm, mix="all=0.5 pixels+action_history=0.5", **kwargs):
    from stable_baselines3.common.logger import configure

    from agents import make_agent

    extra = {"n_steps": 16, "batch_size": 8, "n_epochs": 2} if algorithm == "ppo" else {"n_steps": 16}
    model = make_agent(algorithm, venv, perceiver={**SMALL, "missing_tokens": "mask"}, device="cpu", seed=0,
                       modality_mix=mix, **{**extra, **kwargs})  # fmt: skip
    model.set_logger(configure(None, []))
    # as after training: mask tokens that differ from zero, actions that depend on the latents
    with torch.no_grad():
        torch.nn.init.normal_(model.policy.encoder.mask_tokens, std=3.0)
        torch.nn.init.normal_(model.policy.action_net.weight)
    return model


def collected(model):
    """The model after one rollout (no update yet)."""
    _, callback = model._setup_learn(model.n_steps * model.n_envs, None)
    model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
    return model


@pytest.mark.parametrize("buffer_class", ["sb3", "device"])
def test_ppo_old_log_probs_are_recomputed_under_each_samples_masks(mix_venv, buffer_class):
    from stable_baselines3.common.buffers import DictRolloutBuffer

    from agents import DeviceRolloutBuffer
    from perceiver_policy.modalities import ABSENT_KEY

    buffer_class = DictRolloutBuffer if buffer_class == "sb3" else DeviceRolloutBuffer
    model = collected(on_policy_mix_model(mix_venv, "ppo", rollout_buffer_class=buffer_class))
    buffer = model.rollout_buffer

    def old_log_probs() -> np.ndarray:
        stored = buffer.log_probs if buffer_class is DictRolloutBuffer else buffer._log_probs.cpu().numpy()
        return stored.reshape(-1).copy()

    acting = old_log_probs()
    model._mix_rollout()
    flags = torch.as_tensor(buffer.observations[ABSENT_KEY]).reshape(16, -1)
    proprio_only = [int(n == "proprio") for n in model.policy.encoder.names]
    assert {tuple(f) for f in flags.int().tolist()} == {(0, 0, 0), tuple(proprio_only)}  # both subsets drawn
    obs = {k: torch.as_tensor(v).reshape(16, *v.shape[2:]) for k, v in buffer.observations.items()}
    model.policy.set_training_mode(False)
    with torch.no_grad():
        _, log_prob, _ = model.policy.evaluate_actions(obs, torch.as_tensor(buffer.actions).reshape(16, -1))
    np.testing.assert_allclose(old_log_probs(), log_prob.numpy(), rtol=1e-5, atol=1e-6)
    masked = flags.any(dim=1).numpy()
    assert not np.allclose(acting[masked], old_log_probs()[masked])  # they changed
    np.testing.assert_allclose(acting[~masked], old_log_probs()[~masked], rtol=1e-5)
    model.train()  # the minibatches read the flags from the buffer, whichever kind it is


@pytest.mark.parametrize("recompute", [True, False])
def test_ppo_ratio_starts_at_one_with_the_sampler(mix_venv, monkeypatch, recompute):
    """At learning rate 0 the policy never moves, so every ratio must be exactly 1 (approx KL 0, nothing clipped):
    the old log-probs are the masked policy's. With the acting pass's log-probs kept instead (the recomputation
    patched out), the masked samples' ratios differ from 1: the bias the recomputation removes."""
    model = collected(on_policy_mix_model(mix_venv, "ppo", learning_rate=0.0))
    if not recompute:
        buffer = model.rollout_buffer
        acting = buffer.log_probs.copy(), buffer.values.copy()
        model._mix_rollout()  # the masks, then the acting pass's log-probs back
        buffer.log_probs, buffer.values = acting
        monkeypatch.setattr(model, "_mix_rollout", lambda: None)
    model.train()
    logged = model.logger.name_to_value
    if recompute:
        assert logged["train/approx_kl"] == pytest.approx(0.0, abs=1e-7)
        assert logged["train/clip_fraction"] == 0.0
    else:
        assert logged["train/approx_kl"] > 1e-4


@pytest.mark.parametrize("algorithm", ["ppo", "a2c"])
def test_on_policy_sampler_masks_every_update_pass_and_not_acting(mix_venv, monkeypatch, algorithm):
    from perceiver_policy.modalities import ABSENT_KEY

    model = collected(on_policy_mix_model(mix_venv, algorithm))
    seen = []
    forward = PerceiverEncoder.forward

    def recording(self, obs, absent=None):
        seen.append(obs.get(ABSENT_KEY))
        return forward(self, obs, absent)

    monkeypatch.setattr(PerceiverEncoder, "forward", recording)
    model.train()
    assert seen and all(f is not None for f in seen)  # the recompute pass and every minibatch carry the flags
    assert {(0, 0, 0)} < {tuple(f) for flags in seen for f in torch.as_tensor(flags).int().tolist()}
    assert "all" in model.mixer.subsets and model.mixer.td_error != [1.0, 1.0]  # value errors recorded
    seen.clear()
    model.predict(mix_venv.observation_space.sample(), deterministic=True)
    assert seen == [None]  # acting sees every modality


def test_on_policy_active_sampler_follows_the_value_error(mix_venv):
    from agents.modality_mix import ACTIVE_FLOOR

    model = collected(on_policy_mix_model(mix_venv, "ppo", modality_mix_mode="active"))
    model._mix_rollout()
    errors = np.asarray(model.mixer.td_error)
    expected = ACTIVE_FLOOR / 2 + (1 - ACTIVE_FLOOR) * errors / errors.sum()
    np.testing.assert_allclose(model.mixer.weights(0), expected)
    assert not np.allclose(model.mixer.weights(0), [0.5, 0.5])


def test_an_agent_without_a_perceiver_refuses_the_sampler_by_name(mix_venv):
    from agents import make_agent

    with pytest.raises(
        ValueError, match=r"modality_mix withholds modalities inside the Perceiver; encoder 'drq-cnn'"
    ):
        make_agent("sac", mix_venv, policy_type="drq-cnn", recipe="drq", device="cpu", modality_mix="all=1")


def test_modality_mix_is_refused_where_it_cannot_be_exact():
    from experiments import config as cfg

    parser = cfg.build_parser("t")
    with pytest.raises(ValueError, match=r"needs policy_type 'perceiver', got 'sb3'.*env_modality_dropout"):
        cfg.resolve(
            parser.parse_args(["--algorithm", "ppo", "--policy-type", "sb3", "--modality-mix", "all=1"])
        )
    with pytest.raises(ValueError, match=r"subset 'pixels' names \['pixels'\]"):
        cfg.resolve(
            parser.parse_args(["--algorithm", "sac", "--modalities", "proprio", "--modality-mix", "pixels=1"])
        )


@pytest.mark.parametrize("algorithm", ["sac", "ppo"])
def test_a_run_with_mask_tokens_and_the_sampler_logs_the_mix(tmp_path, algorithm):
    from tests.test_experiments import TINY, cli, tags

    algo = ["learning_starts=16", "batch_size=16", "buffer_size=500"] if algorithm == "sac" else [
        "n_steps=32", "batch_size=16", "n_epochs=1"]  # fmt: skip
    cli("experiments.train", "--task", "cartpole-balance", "--algorithm", algorithm, *TINY, "--n-envs", "1",
        "--perceiver", "num_latents=8", "latent_dim=16", "patch_size=8", "missing_tokens=mask",
        "--modality-mix", "all=0.5 pixels+action_history=0.5", "--modality-mix-mode", "active",
        "--algo", *algo, "--total-steps", "64", "--reliance", "false",
        "--eval-freq", "64", "--eval-video", "false", "--run-dir", str(tmp_path), "--run-name", "mix",
        "--progress-bar", "false")  # fmt: skip
    scalars = set(tags(tmp_path / "mix").Tags()["scalars"])
    assert {"perceiver/modality_mix/all", "perceiver/modality_mix/pixels+action_history",
            "perceiver/modality_mix_critic_loss/all", "eval/return_mean"} <= scalars  # fmt: skip


def test_the_reliance_sampler_replays_the_evaluation_without_each_modality_and_resumes_its_weights(tmp_path):
    from experiments.checkpoint import latest_checkpoint, locate, read_meta
    from experiments.train import build
    from tests.test_experiments import TINY, cli, tags

    cli("experiments.train", "--task", "cartpole-balance", "--algorithm", "sac", *TINY, "--n-envs", "1",
        "--perceiver", "num_latents=8", "latent_dim=16", "patch_size=8", "missing_tokens=mask",
        "--modality-mix", "all=0.5 pixels+action_history=0.5", "--modality-mix-mode", "reliance",
        "--algo", "learning_starts=16", "batch_size=16", "buffer_size=500", "--total-steps", "64",
        "--reliance", "false", "--eval-freq", "32", "--eval-video", "false", "--run-dir", str(tmp_path),
        "--run-name", "mix", "--progress-bar", "false")  # fmt: skip
    scalars = set(tags(tmp_path / "mix").Tags()["scalars"])
    logged = {"perceiver/reliance/proprio/return", "perf/eval_seconds"}  # tags only; no timing is read
    assert logged <= scalars  # proprio: the one withheld
    assert not {"perceiver/reliance/pixels/return", "perceiver/reliance/action_history/return"} & scalars
    assert [e.step for e in tags(tmp_path / "mix").Scalars("perceiver/reliance/proprio/return")] == [32, 64]
    checkpoint = latest_checkpoint(tmp_path / "mix")
    meta = read_meta(checkpoint)
    assert len(meta["modality_mix"]["weights"]) == 2
    meta["modality_mix"]["weights"] = [0.3, 0.7]  # where an evaluation could have moved them
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    config, _ = locate(tmp_path / "mix")
    model, venv, step = build(config, tmp_path / "mix", resume=True)
    venv.close()
    assert step == 64 and model.mixer.mode == "reliance"
    np.testing.assert_allclose(model.mixer.weights(0), [0.3, 0.7])


def test_the_reliance_sampler_needs_a_subset_that_withholds_something():
    from experiments import config as cfg

    parser = cfg.build_parser("t")
    every = "+".join(reversed(NAMES))  # every modality, in another order: withholds nothing either
    for spec in ("all=1", f"all=0.5 {every}=0.5"):
        with pytest.raises(
            ValueError,
            match=rf"'reliance' moves weight between subsets that withhold.*'{re.escape(spec)}' has none",
        ):
            cfg.resolve(parser.parse_args(["--algorithm", "sac", "--modalities", *NAMES, "--modality-mix", spec,
                                           "--modality-mix-mode", "reliance"]))  # fmt: skip
    cfg.resolve(parser.parse_args(["--algorithm", "sac", "--modalities", *NAMES, "--modality-mix",
                                   "all=0.5 pixels+proprio=0.5", "--modality-mix-mode", "reliance"]))  # fmt: skip


# --------------------------------------------------------------------------- causal reliance
@pytest.mark.parametrize("algorithm,missing_tokens", [("ppo", "remove"), ("sac", "mask")])
def test_reliance_is_zero_for_a_modality_the_policy_cannot_read(mix_venv, algorithm, missing_tokens):
    from agents import make_agent
    from experiments.evaluation import evaluate_policy

    model = make_agent(algorithm, mix_venv, perceiver={**SMALL, "missing_tokens": missing_tokens}, device="cpu",
                       seed=0, **({"learning_starts": 10} if algorithm == "sac" else {}))  # fmt: skip
    encoder = model.policy.encoder
    with (
        torch.no_grad()
    ):  # no attention reaches the pixel tokens (nor their mask tokens): the policy is blind
        encoder.cross_attention.modality_bias[:, encoder.names.index("pixels")] = -30000.0
    env_kwargs = {"modalities": ("pixels", "proprio", "action_history"), "image_size": 32, "action_repeat": 8}
    result = evaluate_policy(
        model, "cartpole-swingup", env_kwargs, episodes=2, reliance=True, reliance_every=4
    )
    assert set(result.reliance) == {"pixels", "proprio", "action_history"}
    for how in ("", "_resampled"):  # withheld (masked or blanked), and resampled from the other episode
        assert (
            result.reliance["pixels"][f"action{how}"] < 1e-5
            and result.reliance["pixels"][f"value{how}"] < 1e-5
        )
        assert (
            result.reliance["proprio"][f"action{how}"] > 1e-4
            and result.reliance["proprio"][f"value{how}"] > 1e-4
        )
        # the critic cannot see the pixels either: its preferred action never moves with them
        if algorithm == "sac":
            assert result.reliance["pixels"][f"greedy{how}"] == 0.0
        else:  # PPO has no Q critic, so no greedy action
            assert np.isnan(result.reliance["pixels"][f"greedy{how}"])
    assert np.isfinite(result.actor_regret) == (algorithm == "sac")


def test_reliance_works_for_every_policy_type():
    import envs
    from agents import make_agent
    from experiments.evaluation import evaluate_policy

    env_kwargs = {"modalities": ("proprio", "action_history"), "action_repeat": 8}
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    for algorithm, policy_type in (("sac", "sb3"), ("ppo", "sb3"), ("ppo", "lstm"), ("sac", "drq-cnn")):
        model = make_agent(algorithm, venv, policy_type=policy_type, device="cpu", seed=0,
                           **({"recipe": "drq"} if policy_type == "drq-cnn" else {}))  # fmt: skip
        reliance = evaluate_policy(model, "cartpole-swingup", env_kwargs, episodes=1, reliance=True).reliance
        assert set(reliance) == {"proprio", "action_history"}
        assert reliance["proprio"]["action"] > 0  # an untrained policy still reads its sensors
        assert np.isnan(reliance["proprio"]["value"]) == (policy_type == "lstm")
        assert np.isnan(reliance["proprio"]["greedy"]) == (algorithm == "ppo")
    venv.close()


def test_resampled_modalities_come_from_earlier_episodes_and_need_two():
    """Resampling replaces a key by the same key of a probed state of an earlier episode (the pool is kept by
    reservoir sampling): none in the first episode, so one episode reports NaN; blanked measures are unaffected."""
    import envs
    from agents import make_agent
    from experiments import evaluation
    from experiments.evaluation import RelianceProbe, evaluate_policy

    env_kwargs = {"modalities": ("proprio", "action_history"), "action_repeat": 8}
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    model = make_agent("sac", venv, perceiver=SMALL, device="cpu", seed=0)
    probe = RelianceProbe(model, ["proprio", "action_history"])
    donors = []
    original = probe.donor
    probe.donor = lambda: donors.append((probe.episode, original())) or donors[-1][1]
    obs = venv.reset()
    for _ in range(3):
        for t in range(4):
            single = {k: v[0] for k, v in obs.items()}
            action, _ = model.predict(single, deterministic=True)
            probe.step(single, action, None, np.array([t == 0]))
            obs, *_ = venv.step(action[None])
    assert [d is None for _, d in donors] == [True] * 4 + [False] * 8  # the first episode only fills the pool
    assert (
        len(probe.changes["action_resampled"]["proprio"])
        == 8
        == len(probe.changes["greedy_resampled"]["proprio"])
    )
    kept = {id(o): e for e, o in probe.pool}
    assert all(kept[id(d)] < episode for episode, d in donors if d is not None)  # always an earlier episode
    assert probe.summary()["proprio"]["action_resampled"] > 0

    one = evaluate_policy(model, "cartpole-swingup", env_kwargs, episodes=1, reliance=True, reliance_every=8)
    assert np.isnan(one.reliance["proprio"]["action_resampled"]) and one.reliance["proprio"]["action"] > 0

    probe = RelianceProbe(model, ["proprio"])  # the pool stays bounded: reservoir sampling
    for t in range(evaluation.RESAMPLE_POOL + 50):
        probe.episode = t // 100
        probe.offer({"proprio": np.full(5, t, dtype=np.float32)})
    assert len(probe.pool) == evaluation.RESAMPLE_POOL and probe.offered == evaluation.RESAMPLE_POOL + 50
    assert max(int(o["proprio"][0]) for _, o in probe.pool) >= evaluation.RESAMPLE_POOL  # later ones got in
    venv.close()


def test_the_actor_regret_is_zero_at_the_critics_greedy_action():
    """`critic_readings` returns how much the greedy candidate is worth above the action read: 0 for the greedy
    action itself, above 0 for a worse one (a fresh SAC critic, cartpole's [-1, 1] action)."""
    import envs
    from agents import make_agent
    from experiments.evaluation import RelianceProbe

    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("proprio", "action_history"))
    model = make_agent("sac", venv, perceiver=SMALL, device="cpu", seed=0)
    probe = RelianceProbe(model, ["proprio"])
    obs = {k: v[0] for k, v in venv.reset().items()}
    _, greedy, _ = probe.critic_readings(obs, np.zeros(1, dtype=np.float32))
    _, again, regret = probe.critic_readings(obs, greedy)
    np.testing.assert_array_equal(again, greedy)
    assert abs(regret) < 1e-5
    worst = [probe.critic_readings(obs, np.array([a], dtype=np.float32))[2] for a in np.linspace(-1, 1, 11)]
    assert min(worst) == pytest.approx(0.0, abs=1e-5) and max(worst) > 1e-4
    venv.close()


def test_greedy_candidates_are_a_grid_up_to_two_dimensions_then_fixed_draws():
    from experiments.evaluation import GREEDY_CANDIDATES, GREEDY_GRID, greedy_actions

    grid = greedy_actions(2)
    assert grid.shape == (GREEDY_GRID**2, 2) and grid.dtype == np.float32
    assert len(np.unique(grid, axis=0)) == len(grid)  # every pair once
    for column in grid.T:
        np.testing.assert_allclose(np.unique(column), np.linspace(-1, 1, GREEDY_GRID), atol=1e-6)
    drawn = greedy_actions(6)
    assert drawn.shape == (GREEDY_CANDIDATES, 6) and np.abs(drawn).max() <= 1.0
    np.testing.assert_array_equal(drawn, greedy_actions(6))  # the same candidates at every probe


@pytest.mark.parametrize(
    "policy_type,kwargs",
    [
        ("sb3", {}),
        ("perceiver", {"perceiver": SMALL}),
        ("drq-cnn", {"recipe": "drq"}),
        ("perceiver", {"perceiver": SMALL, "recipe": "drq"}),
        ("perceiver", {"perceiver": SMALL, "recipe": "drq", "policy_kwargs": {"critic_head": "queries"}}),
    ],
    ids=["sb3", "perceiver-sb3-recipe", "drq-cnn", "perceiver-drq", "perceiver-drq-queries"],
)
def test_min_q_over_actions_equals_the_critic_on_the_repeated_observation(policy_type, kwargs):
    """The greedy action's shortcut (the observation encoded once, its features repeated over the candidates) gives
    the critic's own Q of each (observation, action) pair, for every critic of the toolkit."""
    import envs
    from agents import make_agent
    from experiments.evaluation import greedy_actions, min_q_over_actions

    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, modalities=("proprio", "action_history"))
    model = make_agent("sac", venv, policy_type=policy_type, device="cpu", seed=0, **kwargs)
    tensors, _ = model.policy.obs_to_tensor(venv.reset())
    candidates = torch.as_tensor(greedy_actions(1))
    with torch.no_grad():
        shortcut = min_q_over_actions(model.policy.critic, tensors, candidates)
        repeated = {k: v.expand(len(candidates), *v.shape[1:]) for k, v in tensors.items()}
        direct = torch.cat(model.policy.critic(repeated, candidates), dim=1).min(dim=1).values
    assert shortcut.shape == (len(candidates),)
    torch.testing.assert_close(shortcut, direct, rtol=1e-5, atol=1e-5)
    assert direct.std() > 0  # Q varies over the candidates: the comparison is not of constants
    venv.close()


def test_reliance_every_probes_every_kth_step_and_leaves_the_episodes_alone():
    import envs
    from agents import make_agent
    from experiments import config as cfg
    from experiments.evaluation import RelianceProbe, evaluate_policy

    env_kwargs = {"modalities": ("proprio", "action_history"), "action_repeat": 8}
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    model = make_agent("sac", venv, perceiver=SMALL, device="cpu", seed=0)
    obs = {k: v[0] for k, v in venv.reset().items()}
    probe = RelianceProbe(model, ["proprio", "action_history"], every=3)
    for _ in range(7):
        action, _ = model.predict(obs, deterministic=True)
        probe.step(obs, action, None, np.ones(1, dtype=bool))
    assert len(probe.values) == 3 and len(probe.changes["action"]["proprio"]) == 3  # steps 1, 4 and 7
    every, thinned = (
        evaluate_policy(model, "cartpole-swingup", env_kwargs, episodes=1, reliance=True, reliance_every=k)
        for k in (1, 4)
    )
    assert every.returns == thinned.returns  # probing never changes the actions the episode takes
    assert (
        set(thinned.reliance) == {"proprio", "action_history"} and thinned.reliance["proprio"]["action"] > 0
    )
    with pytest.raises(ValueError, match="step interval must be a positive integer, got 0"):
        RelianceProbe(model, ["proprio"], every=0)
    with pytest.raises(ValueError, match="reliance_every must be a positive integer, got 0"):
        cfg.TrainConfig(reliance_every=0).validate()
    venv.close()


def test_grouped_latents_train_under_drqs_recipe_with_an_online_target(mix_venv):
    """study2-fuse-drq's grouped variant: conv tokens, grouped latents, mask tokens, the online target."""
    from stable_baselines3.common.logger import configure

    from agents import make_agent

    groups = {"pixels": 4, "proprio": 2, "action_history": 2}
    model = make_agent(
        "sac", mix_venv, perceiver={**SMALL, "missing_tokens": "mask", "latent_groups": groups,
                                    "pixel_tokenizer": "conv", "self_attn_layers": 0},
        recipe="drq", device="cpu", seed=0, learning_starts=8, batch_size=8, target_encoder="online",
        policy_kwargs={"hidden_dim": 32},
    )  # fmt: skip
    model.set_logger(configure(None, []))
    model.learn(8)  # seed steps fill the replay
    encoder = model.policy.encoder
    before = [p.detach().clone() for p in encoder.parameters()]
    model.train(gradient_steps=2, batch_size=8)
    assert any(not torch.equal(b, p) for b, p in zip(before, encoder.parameters()))  # the critic trains it
    obs = {k: torch.as_tensor(v[None]) for k, v in mix_venv.observation_space.sample().items()}
    changed = {**obs, "proprio": obs["proprio"] + 1.0}
    with torch.no_grad():
        latents, moved = encoder(obs), encoder(changed)
    # after training, the camera's group still reads no proprio
    assert torch.allclose(latents[:, :4], moved[:, :4])
    assert not torch.allclose(latents[:, 4:6], moved[:, 4:6])


def test_the_state_probe_reads_the_full_observation_features_when_the_reliance_probe_runs_too():
    import envs
    from agents import make_agent
    from experiments.evaluation import evaluate_policy

    env_kwargs = {"modalities": ("proprio", "action_history"), "action_repeat": 8}
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, **env_kwargs)
    model = make_agent("sac", venv, perceiver=SMALL, device="cpu", seed=0)
    alone, beside = (
        evaluate_policy(
            model, "cartpole-swingup", env_kwargs, episodes=4, probe_state=True, reliance=reliance
        )
        for reliance in (False, True)
    )
    assert beside.reliance["proprio"]["action"] > 0  # the withheld passes ran through the tapped encoder
    assert alone.probe == pytest.approx(beside.probe, abs=1e-9)
    venv.close()
