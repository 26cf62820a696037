import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
from gymnasium import spaces

from perceiver_policy import (
    ActionQueries,
    LearnedQueries,
    ModalityAdapter,
    PerceiverConfig,
    PerceiverDecoder,
    PerceiverEncoder,
    build_specs,
    count_flops,
    count_parameters,
    register_adapter,
)
from perceiver_policy.introspection import PATH_STAGES, attention_entropy, modality_balance, modality_path
from tests.conftest import sample_obs

KEYS = ("pixels", "proprio", "action_history")


def small(**kwargs) -> PerceiverConfig:
    return PerceiverConfig(num_latents=8, latent_dim=32, patch_size=8, fourier_bands=4, **kwargs)


def subspace(space, keys):
    return spaces.Dict({k: space[k] for k in keys})


@pytest.mark.parametrize("keys", [c for r in (1, 2, 3) for c in itertools.combinations(KEYS, r)])
def test_output_shapes_for_every_modality_combination(dict_space, keys):
    space = subspace(dict_space, keys)
    encoder = PerceiverEncoder(space, small())
    latents = encoder(sample_obs(space, 3))
    assert latents.shape == (3, 8, 32) and latents.dtype == torch.float32
    decoder = PerceiverDecoder(small())
    assert decoder(LearnedQueries(2, 32)(3), latents).shape == (3, 2, 32)
    assert decoder(ActionQueries(2, 32, 2)(torch.zeros(3, 2)), latents).shape == (3, 2, 32)


def test_token_layout_of_the_registry(dict_space):
    specs = {s.name: s for s in build_specs(dict_space, small())}
    assert specs["pixels"].num_tokens == 3 * 4 * 4 and specs["pixels"].token_dim == 3 * 8 * 8
    assert specs["proprio"].num_tokens == 2  # one per sensor of the layout
    assert specs["action_history"].num_tokens == 4
    chunked = {s.name: s for s in build_specs(dict_space, small(proprio_tokens="chunk", proprio_chunk=3))}
    assert chunked["proprio"].num_tokens == 3


@pytest.mark.parametrize("key", KEYS)
def test_permutation_invariance_within_a_modality_without_positions(dict_space, key):
    torch.manual_seed(0)
    space = subspace(dict_space, KEYS)
    encoder = PerceiverEncoder(space, small(use_position_features=False)).eval()
    obs = sample_obs(space, 2)
    permuted = dict(obs)
    if key == "pixels":  # permute whole patches: tokens are (frame, patch) pairs
        x = obs["pixels"].reshape(2, 3, 3, 4, 8, 4, 8)
        perm = torch.randperm(4)
        permuted["pixels"] = x[:, :, :, perm].reshape(2, 9, 32, 32)
    elif key == "proprio":  # swap the two sensors' values: same-size chunks under 'chunk' tokens
        encoder = PerceiverEncoder(
            space, small(use_position_features=False, proprio_tokens="chunk", proprio_chunk=1)
        ).eval()
        permuted["proprio"] = obs["proprio"][:, torch.randperm(7)]
    else:
        permuted["action_history"] = obs["action_history"][:, torch.randperm(4)]
    with torch.no_grad():
        torch.testing.assert_close(encoder(obs), encoder(permuted), atol=1e-5, rtol=1e-5)
    # and with position features the order matters
    positional = PerceiverEncoder(space, small()).eval()
    with torch.no_grad():
        assert not torch.allclose(positional(obs), positional(permuted), atol=1e-4)


@pytest.mark.parametrize("missing", KEYS)
def test_missing_modality_equals_removing_its_tokens(dict_space, missing):
    torch.manual_seed(1)
    encoder = PerceiverEncoder(dict_space, small()).eval()
    with torch.no_grad():  # make gates and biases non-trivial
        encoder.cross_attention.gate_logits.normal_()
        encoder.cross_attention.modality_bias.normal_()
    obs = sample_obs(dict_space, 4)
    without = {k: v for k, v in obs.items() if k != missing}
    flags = torch.tensor([True, False, True, False])
    with torch.no_grad():
        removed = encoder(without)
        full = encoder(obs)
        masked = encoder(obs, absent={missing: flags})
        encoder.disabled_modalities = {missing}
        disabled = encoder(obs)
    torch.testing.assert_close(masked[flags], removed[flags], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked[~flags], full[~flags], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(disabled, removed)
    assert not torch.allclose(full, removed, atol=1e-4)


def test_every_modality_absent_is_an_error(dict_space):
    encoder = PerceiverEncoder(dict_space, small())
    obs = sample_obs(dict_space, 2)
    with pytest.raises(ValueError, match="every modality is absent"):
        encoder(obs, absent={k: torch.ones(2, dtype=torch.bool) for k in KEYS})
    with pytest.raises(ValueError, match="unknown modalities.*lidar"):
        encoder(obs, absent={"lidar": torch.ones(2, dtype=torch.bool)})
    with pytest.raises(ValueError, match="no modality to read"):
        encoder({})


def test_modality_dropout_only_in_training(dict_space):
    torch.manual_seed(0)
    encoder = PerceiverEncoder(dict_space, small(encoder_modality_dropout=0.5))
    obs = sample_obs(dict_space, 64)
    encoder.train()
    flags = encoder._absent_flags((0, 1, 2), 4096, None, torch.device("cpu"))
    assert flags is not None and not flags.all(dim=1).any()
    # p = 0.5 per modality, minus the re-kept modality of the 1/8 of samples that dropped all three: 0.458
    assert 0.43 < flags.float().mean() < 0.49
    a, b = encoder(obs), encoder(obs)
    assert not torch.allclose(a, b)
    encoder.eval()
    assert encoder._absent_flags((0, 1, 2), 64, None, torch.device("cpu")) is None
    with torch.no_grad():
        torch.testing.assert_close(encoder(obs), encoder(obs))


def test_fourier_features_are_buffers_built_once(dict_space, monkeypatch):
    import perceiver_policy.modalities as modalities

    encoder = PerceiverEncoder(dict_space, small())
    buffers = dict(encoder.named_buffers())
    assert any(name.endswith("position_features") for name in buffers)
    assert not any("position_features" in k for k in encoder.state_dict())  # non-persistent

    def fail(*args, **kwargs):
        raise AssertionError("Fourier features rebuilt in forward")

    monkeypatch.setattr(modalities, "grid_fourier_features", fail)
    before = {n: b.data_ptr() for n, b in encoder.named_buffers()}
    encoder(sample_obs(dict_space, 2))
    assert before == {n: b.data_ptr() for n, b in encoder.named_buffers()}


def test_fourier_frequencies_consistent_across_modalities():
    from perceiver_policy.position import fourier_features, grid_fourier_features

    # the same axis resolution gives the same features whatever modality asks
    a = grid_fourier_features((8,), 4)
    b = grid_fourier_features((1, 8), 4)[:, [1, *range(10, 18)]]  # [x1, sin(x1) bands, cos(x1) bands]
    torch.testing.assert_close(a, b)
    # highest band is the Nyquist frequency resolution/2: sin(pi * 4 * x) at x = 0.5 is 0
    feats = fourier_features(torch.tensor([[0.5]]), (8,), 4)
    assert abs(float(feats[0, 4])) < 1e-6


def test_latent_query_cache_identical_and_invalidated(dict_space):
    torch.manual_seed(0)
    encoder = PerceiverEncoder(dict_space, small()).eval()
    cross = encoder.cross_attention
    obs = sample_obs(dict_space, 3)
    with torch.no_grad():
        first = encoder(obs)
        cached_q = cross._query_cache.value
        second = encoder(obs)
        assert cross._query_cache.value is cached_q  # reused, not recomputed
    torch.testing.assert_close(first, second)
    encoder.train()
    assert cross._query_cache.value is None
    encoder.eval()
    with torch.no_grad():
        encoder(obs)
        encoder.latents.add_(0.5)  # a parameter change (optimizer steps are in-place too)
        changed = encoder(obs)
        cross._query_cache.clear()
        fresh = encoder(obs)
    torch.testing.assert_close(changed, fresh)
    assert not torch.allclose(changed, first)
    # gradients need the uncached path
    out = encoder(obs)
    out.sum().backward()
    assert encoder.latents.grad is not None


@pytest.mark.parametrize(
    "options",
    [{}, {"pixel_tokenizer": "conv"}, {"pixel_tokenizer": "conv", "image_centering": "running"}],
    ids=["patch", "conv", "conv-meanframe"],
)
def test_what_a_no_grad_pass_keeps_follows_a_fused_adam_step(dict_space, options):
    """torch's fused Adam (the policies' optimizer) writes parameters without bumping their version counters: the
    latent queries, the conv stem's border correction and the mean-frame offset kept by a no-grad pass must follow
    the new values, as a fresh copy of the encoder computes them (kept by version only, they did not)."""
    torch.manual_seed(0)
    encoder = PerceiverEncoder(dict_space, small(**options)).eval()
    obs = sample_obs(dict_space, 3)
    with torch.no_grad():
        before = encoder(obs)  # keeps what it may
    optimizer = torch.optim.Adam(encoder.parameters(), lr=0.05, fused=True)
    versions = [p._version for p in encoder.parameters()]
    encoder(obs).square().sum().backward()
    optimizer.step()
    assert [p._version for p in encoder.parameters()] == versions  # what made version keys go stale
    fresh = PerceiverEncoder(dict_space, small(**options)).eval()
    fresh.load_state_dict(encoder.state_dict())
    with torch.no_grad():
        after, expected = encoder(obs), fresh(obs)
    torch.testing.assert_close(after, expected)
    assert not torch.allclose(after, before)


def test_the_kept_gating_mask_follows_the_token_index_not_its_address():
    """The gating mask kept in eval mode without grad is that of the index passed now: an index written in place
    (same address, other modalities) gets its own mask."""
    from perceiver_policy.cross_attention import GatedCrossAttention

    torch.manual_seed(0)
    cross = GatedCrossAttention(32, 2, 4, 2, 2, 0.0, 0.0, gating=True, tokens_per_modality=[3, 2]).eval()
    with torch.no_grad():
        cross.gate_logits.normal_()
        index = torch.tensor([0, 0, 0, 1, 1])
        first = cross.logit_bias(index).clone()
        index.copy_(torch.tensor([1, 1, 0, 0, 0]))
        second = cross.logit_bias(index)
    expected = (cross.modality_bias[:, None, :] + cross.gate_logits[None])[:, :, index].unsqueeze(0)
    torch.testing.assert_close(second, expected)
    assert not torch.allclose(first, second)


def test_gradients_reach_every_parameter(dict_space):
    torch.manual_seed(0)
    config = small(self_attn_layers=2, self_attn_repeats=2)
    encoder = PerceiverEncoder(dict_space, config)
    decoder = PerceiverDecoder(config)
    queries = ActionQueries(2, 32, 2)
    out = decoder(queries(torch.randn(4, 2)), encoder(sample_obs(dict_space, 4)))
    out.pow(2).sum().backward()
    for module in (encoder, decoder, queries):
        for name, param in module.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_weight_sharing_does_not_duplicate_parameters(dict_space):
    shared = PerceiverEncoder(dict_space, small(self_attn_layers=2, self_attn_repeats=3))
    unshared = PerceiverEncoder(
        dict_space, small(self_attn_layers=2, self_attn_repeats=3, share_repeat_weights=False)
    )
    assert len(shared.self_attention) == 2 and len(shared._layer_sequence()) == 6
    assert len(unshared.self_attention) == 6
    per_layer = count_parameters(unshared.self_attention[0])
    assert count_parameters(unshared) - count_parameters(shared) == 4 * per_layer


def test_state_dict_round_trip(dict_space):
    torch.manual_seed(0)
    a = PerceiverEncoder(dict_space, small()).eval()
    torch.manual_seed(1)
    b = PerceiverEncoder(dict_space, small()).eval()
    obs = sample_obs(dict_space, 2)
    with torch.no_grad():
        assert not torch.allclose(a(obs), b(obs))
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(obs), b(obs))


def test_bf16_autocast_runs_and_stays_close(dict_space):
    torch.manual_seed(0)
    fp32 = PerceiverEncoder(dict_space, small()).eval()
    bf16 = PerceiverEncoder(dict_space, small(dtype="bfloat16")).eval()
    bf16.load_state_dict(fp32.state_dict())
    obs = sample_obs(dict_space, 2)
    with torch.no_grad():
        a, b = fp32(obs), bf16(obs)
    assert b.dtype == torch.float32
    assert (a - b).abs().mean() < 0.05


def test_torch_compile_runs(dict_space):
    pytest.importorskip("torch._dynamo")
    encoder = PerceiverEncoder(dict_space, small()).eval()
    obs = sample_obs(dict_space, 2)
    try:
        compiled = torch.compile(encoder, backend="eager", fullgraph=False)
        with torch.no_grad():
            torch.testing.assert_close(compiled(obs), encoder(obs))
    except RuntimeError as err:  # no C++ toolchain for inductor is fine: eager backend covers tracing
        pytest.skip(f"torch.compile unavailable: {err}")


def test_attention_capture_is_opt_in_and_sums_to_one(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    obs = sample_obs(dict_space, 2)
    with torch.no_grad():
        encoder(obs)
        assert encoder.last_capture is None
        encoder.capture_attention = True
        encoder(obs)
    capture = encoder.last_capture
    weights = capture["weights"]
    assert weights.shape == (2, 1, 8, 48 + 2 + 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 1, 8))
    balance = modality_balance(capture)
    assert set(balance) == set(KEYS) and abs(sum(balance.values()) - 1) < 1e-4
    assert 0 < attention_entropy(capture) <= np.log(54) + 1e-4


def test_balanced_init_gives_every_modality_an_equal_share(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    encoder.capture_attention = True
    with torch.no_grad():
        encoder(sample_obs(dict_space, 4))
    balance = modality_balance(encoder.last_capture)
    for share in balance.values():  # 48 pixel tokens, 2 proprio, 4 history: still ~1/3 each
        assert abs(share - 1 / 3) < 0.1, balance


def test_gating_shifts_attention_between_modalities(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    encoder.capture_attention = True
    obs = sample_obs(dict_space, 2)
    index = encoder.names.index("proprio")
    with torch.no_grad():
        encoder(obs)
        before = modality_balance(encoder.last_capture)["proprio"]
        encoder.cross_attention.gate_logits[:, index] = 5.0
        encoder(obs)
        after = modality_balance(encoder.last_capture)["proprio"]
    assert after > before + 0.3


def test_flop_and_parameter_counts(dict_space):
    small_flops = count_flops(dict_space, small())
    big = PerceiverConfig(num_latents=16, latent_dim=32, patch_size=8, fourier_bands=4)
    big_flops = count_flops(dict_space, big)
    assert small_flops["tokens"] == 54
    # the cross-attention logits/weighted-sum term scales linearly in M
    assert big_flops["cross_attn"] > small_flops["cross_attn"]
    assert big_flops["tokenize"] == small_flops["tokenize"]
    assert count_parameters(PerceiverEncoder(dict_space, small())) > 0


def test_custom_modality_is_one_registry_entry(dict_space):
    class DepthAdapter(ModalityAdapter):
        def tokens_content(self, x):
            return x.float().reshape(x.shape[0], -1, self.spec.token_dim)

    register_adapter("depth_rows", DepthAdapter)
    space = spaces.Dict({**dict_space.spaces, "depth": spaces.Box(0, 1, (6, 5), np.float32)})
    config = small(modality_overrides={"depth": {"kind": "depth_rows"}})
    encoder = PerceiverEncoder(space, config)
    assert encoder.num_tokens["depth"] == 6
    assert encoder(sample_obs(space, 2)).shape == (2, 8, 32)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_latents": 0}, "num_latents must be a positive integer"),
        ({"latent_dim": -4}, "latent_dim must be a positive integer"),
        ({"cross_attn_heads": 3}, "cross_attn_heads=3 must divide latent_dim=64"),
        ({"self_attn_layers": -1}, "self_attn_layers must be a non-negative integer"),
        ({"attn_dropout": 1.5}, "attn_dropout must be in \\[0, 1\\)"),
        ({"drop_path": -0.1}, "drop_path must be in"),
        ({"encoder_modality_dropout": 1.0}, "encoder_modality_dropout must be in"),
        ({"dtype": "float16"}, "dtype 'float16' unknown.*float32.*bfloat16"),
        ({"proprio_tokens": "joint"}, "proprio_tokens 'joint' unknown"),
        ({"patch_size": 0}, "patch_size must be a positive integer"),
        ({"init_std": 0.0}, "init_std must be > 0"),
        ({"keypoints_per_frame": 2}, "keypoints_per_frame must be true or false, got 2"),
        ({"use_position_features": "yes"}, "use_position_features must be true or false, got 'yes'"),
    ],
)
def test_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PerceiverConfig(**kwargs)


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match="unknown PerceiverConfig fields \\['latents'\\]"):
        PerceiverConfig.from_dict({"latents": 3})


def test_patch_size_must_divide_image(dict_space):
    with pytest.raises(ValueError, match="patch_size 5 does not divide image size 32.*valid choices"):
        PerceiverEncoder(dict_space, small().__class__(patch_size=5))


def test_non_dict_observation_space_is_rejected():
    with pytest.raises(ValueError, match="needs a gymnasium Dict observation space"):
        PerceiverEncoder(spaces.Box(-1, 1, (3,)), small())


def test_absent_flags_in_the_observation_match_the_absent_argument(dict_space):
    from envs import ABSENT_KEY

    space = spaces.Dict({**dict_space.spaces, ABSENT_KEY: spaces.MultiBinary(3)})
    encoder = PerceiverEncoder(space, small()).eval()
    assert ABSENT_KEY not in encoder.names
    obs = sample_obs(dict_space, 3)
    flags = torch.tensor(
        [[0, 1, 0], [0, 0, 0], [1, 0, 1]], dtype=torch.int8
    )  # order: action_history, pixels, proprio
    with torch.no_grad():
        from_obs = encoder({**obs, ABSENT_KEY: flags})
        from_arg = encoder(obs, absent={n: flags[:, i].bool() for i, n in enumerate(encoder.names)})
    torch.testing.assert_close(from_obs, from_arg)


def test_pixels_are_scaled_to_minus_half_plus_half(dict_space):
    encoder = PerceiverEncoder(dict_space, small())
    adapter = encoder.adapters["pixels"]
    pixels = torch.randint(0, 256, (2, 9, 32, 32), dtype=torch.uint8)
    content = adapter.tokens_content(pixels)
    expected = adapter.content(content / 255.0 - 0.5)  # the definition, applied explicitly
    torch.testing.assert_close(adapter.project(content), expected, atol=1e-5, rtol=1e-5)
    # the convolutional forward equals the explicit patch projection (+ position features)
    explicit = expected + adapter.position(adapter.position_features)
    torch.testing.assert_close(adapter(pixels), explicit, atol=1e-4, rtol=1e-4)
    # patch 0 of frame 0 is the top-left 8x8 block of the first three channels
    torch.testing.assert_close(content[0, 0], pixels[0, :3, :8, :8].reshape(-1).float())


def test_modality_dropout_never_revives_a_modality_the_caller_flagged_absent(dict_space):
    torch.manual_seed(0)
    encoder = PerceiverEncoder(dict_space, small(encoder_modality_dropout=0.9)).train()
    assert encoder.names[0] == "action_history"  # the column the old fallback re-enabled
    absent = {"action_history": torch.ones(512, dtype=torch.bool)}
    flags = encoder._absent_flags((0, 1, 2), 512, absent, torch.device("cpu"))
    assert flags[:, 0].all()  # still absent everywhere
    assert not flags.all(dim=1).any()  # and every sample keeps a modality
    assert flags[:, 1:].any()  # dropout still acts on the others


def test_attention_on_frames_is_the_pixel_share_on_the_patch_grid(dict_space):
    from experiments.tb import attention_overlay
    from perceiver_policy.introspection import attention_on_frames, modality_balance

    encoder = PerceiverEncoder(dict_space, small())
    encoder.eval()
    encoder.capture_attention = True
    obs = sample_obs(dict_space, 2)
    with torch.no_grad():
        encoder(obs)
    capture = encoder.last_capture
    heat = attention_on_frames(capture, encoder.specs, sample=0)
    assert heat.shape == (3, 4, 4)  # 3 frames of 32 px in 8-px patches
    # the grid holds exactly the pixel modality's share of sample 0's attention
    sample0 = {**capture, "weights": capture["weights"][:1]}
    assert float(heat.sum()) == pytest.approx(modality_balance(sample0)["pixels"], rel=1e-5)
    image = attention_overlay(obs["pixels"][0].numpy(), heat.numpy())
    assert image.shape == (64, 3 * 64, 3) and image.dtype == np.uint8
    encoder.disabled_modalities = {"pixels"}
    with torch.no_grad():
        encoder(obs)
    assert attention_on_frames(encoder.last_capture, encoder.specs) is None


def test_attention_on_frames_of_conv_tokens_is_one_map_over_the_stack():
    """Conv tokens read the stacked frames at once: one (Hp, Wp) map, drawn over every frame, even where the
    cells do not divide the image (11 cells over 84 px)."""
    from experiments.tb import attention_overlay
    from perceiver_policy.introspection import attention_on_frames, modality_balance

    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    encoder = PerceiverEncoder(space, PerceiverConfig(num_latents=4, latent_dim=16, pixel_tokenizer="conv"))
    encoder.eval()
    encoder.capture_attention = True
    obs = sample_obs(space, 2)
    with torch.no_grad():
        encoder(obs)
    heat = attention_on_frames(encoder.last_capture, encoder.specs)
    assert heat.shape == (11, 11)
    assert float(heat.sum()) == pytest.approx(1.0, rel=1e-5)  # the only modality
    image = attention_overlay(obs["pixels"][0].numpy(), heat.numpy())
    assert image.shape == (168, 3 * 168, 3) and image.dtype == np.uint8
    assert modality_balance(encoder.last_capture)["pixels"] == pytest.approx(1.0)


def test_keypoints_on_frames_are_where_the_keypoints_sit_with_their_attention():
    """Keypoint tokens are drawn where their spatial softmax puts them, in the frame's pixels: a cold softmax on
    a bright 2 x 2 square at pixels [20, 22) x [4, 6) puts every keypoint at its centre (21, 5); their masses are
    the pixel modality's share of the attention; drawing them leaves the running mean frame where it was."""
    from experiments.tb import attention_on_image, keypoint_overlay
    from perceiver_policy.introspection import keypoints_on_frames

    space = spaces.Dict(
        {"pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8), "proprio": spaces.Box(-1, 1, (4,))}
    )
    config = PerceiverConfig(num_latents=4, latent_dim=16, pixel_tokenizer="keypoints", keypoints=3,
                             conv_strides=[1], conv_channels=2, image_centering="running")  # fmt: skip
    encoder = PerceiverEncoder(space, config)
    adapter = encoder.adapters["pixels"]
    with torch.no_grad():
        adapter.stem[0].weight.zero_()
        adapter.stem[0].weight[0, 6, 1, 1] = 1.0  # feature 0: the newest frame's red channel
        adapter.stem[0].bias.zero_()
        adapter.keypoint_maps.weight.zero_()
        adapter.keypoint_maps.weight[:, 0] = 1.0
        adapter.keypoint_maps.bias.zero_()
        adapter.log_temperature.fill_(math.log(0.005))
    obs = sample_obs(space, 2)
    obs["pixels"] = torch.zeros(2, 9, 32, 32, dtype=torch.uint8)
    obs["pixels"][:, 6, 4:6, 20:22] = 255
    encoder.capture_attention = True
    with torch.no_grad():
        encoder(obs)  # training mode: the mean frame moves with this pass (a black one: nothing subtracted)
    adapter.mean_frame.zero_()
    count = int(adapter.mean_count)
    places, mass = keypoints_on_frames(encoder, encoder.last_capture, obs["pixels"], sample=1)
    assert int(adapter.mean_count) == count and adapter.training  # no statistics moved, the mode restored
    torch.testing.assert_close(places, torch.tensor([[21.0, 5.0]]).expand(1, 3, 2), atol=1e-3, rtol=0)
    sample1 = {**encoder.last_capture, "weights": encoder.last_capture["weights"][1:]}
    assert float(mass.sum()) == pytest.approx(modality_balance(sample1)["pixels"], rel=1e-5)
    image = keypoint_overlay(obs["pixels"][1].numpy(), places.numpy(), mass.numpy())
    plain = obs["pixels"][1].numpy().reshape(3, 3, 32, 32).transpose(0, 2, 3, 1).repeat(2, 1).repeat(2, 2)
    changed = (image.reshape(64, 3, 64, 3).transpose(1, 0, 2, 3) != plain).any(-1)  # (F, 64, 64)
    assert changed[:, 10, 42].all()  # every frame: a disc at (21, 5) x 2
    assert not changed[:, 40:, :].any() and not changed[:, :, :20].any()  # nowhere far from it
    assert attention_on_image(encoder, encoder.last_capture, obs["pixels"][0]).shape == (64, 3 * 64, 3)
    per_frame = PerceiverEncoder(space, dataclasses.replace(config, keypoints_per_frame=True))
    per_frame.capture_attention = True
    with torch.no_grad():
        per_frame(obs)
    places, mass = keypoints_on_frames(per_frame, per_frame.last_capture, obs["pixels"])
    assert places.shape == (3, 3, 2) and mass.shape == (3, 3)  # each frame's own keypoints
    assert ((places >= 0) & (places <= 32)).all()
    assert keypoint_overlay(obs["pixels"][0].numpy(), places.numpy(), mass.numpy()).shape == (64, 3 * 64, 3)
    patches = PerceiverEncoder(space, small())
    patches.capture_attention = True
    with torch.no_grad():
        patches(obs)
    assert (
        keypoints_on_frames(patches, patches.last_capture, obs["pixels"]) is None
    )  # patch tokens: a heat map
    encoder.disabled_modalities = {"pixels"}
    with torch.no_grad():
        encoder(obs)
    assert attention_on_image(encoder, encoder.last_capture, obs["pixels"][0]) is None


def test_cross_attention_is_eligible_for_the_fused_kernel(dict_space, monkeypatch):
    """The gating reaches SDPA as a float mask: q, k and v share one head size, and without grad PyTorch picks
    its fused flash kernel on the CPU (the old extra bias channels forced the math kernel)."""
    from torch.nn.attention import SDPBackend

    from perceiver_policy import attention

    calls = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
        calls.append(SDPBackend(torch._fused_sdp_choice(q, k, v, attn_mask, dropout_p, False)))
        assert q.shape[-1] == k.shape[-1] == v.shape[-1]
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    encoder = PerceiverEncoder(dict_space, small())
    encoder.eval()
    obs = sample_obs(dict_space, 4)
    with torch.no_grad():
        encoder(obs)
        encoder(obs, absent={"pixels": torch.tensor([True, False, False, True])})
    assert calls and set(calls) == {SDPBackend.FLASH_ATTENTION}  # cross- and self-attention alike


def test_attention_under_cpu_bf16_autocast_runs_in_float32(dict_space, monkeypatch):
    """Under CPU bf16 autocast every attention call reaches SDPA in float32 (its bf16 CPU kernel was up to 8.9x slower
    forward + backward) and hands bf16 back to the layers around it; the encoder's output stays within bf16's
    rounding of the float32 encoder's, and gradients reach the first layers."""
    from perceiver_policy import attention

    dtypes = []
    real = attention.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, dropout_p=0.0, scale=None):
        dtypes.append(
            {t.dtype for t in (q, k, v) if t is not None}
            | ({attn_mask.dtype} if attn_mask is not None else set())
        )
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    q, k, v = (torch.randn(3, 2, n, 8, dtype=torch.bfloat16) for n in (4, 5, 5))
    mask = torch.zeros(1, 1, 4, 5, dtype=torch.bfloat16)
    mask[..., -1] = attention.ABSENT_LOGIT
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention.attend(q, k, v, attn_mask=mask, scale=0.3)
    expected = real(q.float(), k.float(), v.float(), attn_mask=mask.float(), scale=0.3)
    assert out.dtype == torch.bfloat16 and dtypes == [{torch.float32}]
    assert torch.equal(out, expected.to(torch.bfloat16))

    dtypes.clear()
    config = small()
    encoder = PerceiverEncoder(dict_space, config)
    obs = sample_obs(dict_space, 4)
    reference = encoder(obs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = encoder(obs)
    assert dtypes and all(d == {torch.float32} for d in dtypes)  # cross- and self-attention alike
    assert torch.allclose(latents.float(), reference, atol=0.1, rtol=0.05)
    latents.float().square().mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad and p.dim() > 1)


def assert_random_only_in_training(encoder, obs) -> None:
    """Two forwards differ in train mode (something is dropped) and are identical in eval mode."""
    encoder.train()
    assert not torch.equal(encoder(obs), encoder(obs))
    encoder.eval()
    assert torch.equal(encoder(obs), encoder(obs))


def test_drop_path_applies_at_any_depth_and_only_in_training(dict_space):
    from perceiver_policy.attention import DropPath

    encoder = PerceiverEncoder(dict_space, small(drop_path=0.4, self_attn_layers=1))
    assert encoder.cross_attention.drop_path.rate == pytest.approx(0.2)
    assert encoder.self_attention[0].drop_path.rate == pytest.approx(0.4)  # the deepest block gets drop_path
    drop = DropPath(0.5)
    x = torch.ones(400, 3, 2)
    out = drop.train()(x)
    kept = out[:, 0, 0] != 0
    assert 0.3 < kept.float().mean() < 0.7  # whole samples dropped...
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 2.0))  # ...the kept ones rescaled
    assert torch.equal(drop.eval()(x), x)
    obs = sample_obs(dict_space, 8)
    assert_random_only_in_training(encoder, obs)


def test_attention_dropout_only_in_training(dict_space):
    encoder = PerceiverEncoder(dict_space, small(attn_dropout=0.5))
    obs = sample_obs(dict_space, 4)
    assert_random_only_in_training(encoder, obs)


def test_count_flops_matches_torch_flop_counter(dict_space):
    """The analytic per-stage FLOPs equal what torch's FlopCounterMode counts on the same forward (batch 1,
    training mode so the latent queries are projected, math attention kernel so its matmuls are visible)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from perceiver_policy.introspection import count_flops

    config = small(self_attn_layers=2)
    encoder = PerceiverEncoder(dict_space, config).train()
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        encoder(sample_obs(dict_space, 1))
    by_module = {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    analytic = count_flops(dict_space, config)
    tokenize = sum(v for k, v in by_module.items() if k.count(".") == 2 and ".adapters." in k)
    assert tokenize == analytic["tokenize"]
    assert by_module["PerceiverEncoder.cross_attention"] == analytic["cross_attn"]
    self_attention = sum(by_module[f"PerceiverEncoder.self_attention.{i}"] for i in range(2))
    assert self_attention == analytic["self_attn"]
    assert counter.get_total_flops() == analytic["tokenize"] + analytic["cross_attn"] + analytic["self_attn"]


def test_fourier_drift_measures_the_position_projection_from_a_saved_baseline(dict_space):
    encoder = PerceiverEncoder(dict_space, small())
    adapter = encoder.adapters["pixels"]
    assert adapter.position_drift() == 0.0
    with torch.no_grad():
        adapter.content.weight.mul_(3.0)  # content changes are input drift, not Fourier drift
    assert adapter.position_drift() == 0.0
    with torch.no_grad():
        adapter.position.weight.mul_(1.5)
    assert adapter.position_drift() == pytest.approx(0.5, rel=1e-5)
    restored = PerceiverEncoder(dict_space, small())
    restored.load_state_dict(encoder.state_dict())  # the baseline travels with the weights (--resume)
    assert restored.adapters["pixels"].position_drift() == pytest.approx(0.5, rel=1e-5)
    old = {k: v for k, v in encoder.state_dict().items() if "position_baseline" not in k}
    legacy = PerceiverEncoder(dict_space, small())
    legacy.load_state_dict(
        old
    )  # a checkpoint from before the baseline: the loaded projection is the reference
    assert legacy.adapters["pixels"].position_drift() == pytest.approx(0.0, abs=1e-6)


def test_conv_tokens_are_not_drowned_by_their_position_features_at_init():
    # PyTorch's default conv init shrank the stem's output at each layer: contents 25x smaller than the position
    # features, every token alike, and a Perceiver on conv tokens that could not learn the state from pixels.
    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    encoder = PerceiverEncoder(space, PerceiverConfig(num_latents=8, latent_dim=64, pixel_tokenizer="conv"))
    adapter = encoder.adapters["pixels"]
    pixels = torch.randint(0, 256, (16, 9, 84, 84), dtype=torch.uint8)
    with torch.no_grad():
        content, position = adapter.embed(pixels), adapter.position(adapter.position_features)
    rms = lambda x: float(x.pow(2).mean().sqrt())  # noqa: E731
    assert rms(content) > 0.25 * rms(position)


@pytest.mark.parametrize("missing_tokens", ["remove", "mask"])
def test_reference_centred_latents_withhold_only_what_each_row_withholds(missing_tokens):
    """latents(obs) - latents(reference): the reference row reads every modality, whatever the batch withholds
    (a missing key, per-sample flags); the first observation read becomes the reference, once."""
    space = spaces.Dict(
        {
            "pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8),
            "proprio": spaces.Box(-np.inf, np.inf, (5,), np.float32),
        }
    )
    config = PerceiverConfig(num_latents=8, latent_dim=32, patch_size=8, missing_tokens=missing_tokens)
    torch.manual_seed(0)
    encoder = PerceiverEncoder(space, config, reference=True).eval()
    obs = {"pixels": torch.randint(0, 255, (4, 9, 32, 32), dtype=torch.uint8), "proprio": torch.randn(4, 5)}
    with torch.no_grad():
        h = encoder(obs)
        reference = {"pixels": obs["pixels"][:1], "proprio": obs["proprio"][:1]}
        base = encoder._encode(reference)
        torch.testing.assert_close(h, encoder._encode(obs) - base, atol=1e-5, rtol=0)
        assert h[0].abs().max() < 1e-5
        absent = {"pixels": torch.tensor([True, False, True, False])}
        flagged = encoder(obs, absent)
        torch.testing.assert_close(flagged, encoder._encode(obs, absent) - base, atol=1e-5, rtol=0)
        removed = encoder({"proprio": obs["proprio"]})  # no pixels key: every row withholds them
        torch.testing.assert_close(
            removed, encoder._encode({"proprio": obs["proprio"]}) - base, atol=1e-5, rtol=0
        )
        torch.testing.assert_close(removed[[0, 2]], flagged[[0, 2]], atol=1e-5, rtol=0)
        encoder({"pixels": obs["pixels"][2:], "proprio": obs["proprio"][2:]})
    assert torch.equal(encoder.reference_pixels, obs["pixels"][:1])  # captured once


def test_reference_centring_refuses_multitask_observations_and_an_incomplete_first_read():
    space = spaces.Dict(
        {
            "proprio": spaces.Box(-np.inf, np.inf, (5,), np.float32),
            "task": spaces.Box(0, 3, (1,), np.int64),
        }
    )
    with pytest.raises(ValueError, match="multi-task observations .* take center_features 'none'"):
        PerceiverEncoder(space, PerceiverConfig(num_latents=4, latent_dim=16), reference=True)
    pixels = spaces.Dict(
        {
            "pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8),
            "proprio": spaces.Box(-np.inf, np.inf, (5,), np.float32),
        }
    )
    encoder = PerceiverEncoder(
        pixels, PerceiverConfig(num_latents=4, latent_dim=16, patch_size=8), reference=True
    )
    with pytest.raises(
        ValueError, match=r"the reference observation must have every modality \['pixels', 'proprio'\]"
    ):
        encoder({"proprio": torch.zeros(2, 5)})


def test_modality_path_finds_where_a_modality_is_lost(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    obs = sample_obs(dict_space, 6)
    with torch.no_grad():  # the latents never attend to the pixels: their tokens change, the latents do not
        encoder.cross_attention.modality_bias[:, encoder.names.index("pixels")] = -1e4
    pixels = modality_path(encoder, obs, "pixels")
    assert set(pixels) == set(PATH_STAGES)
    assert pixels["attention"] < 1e-6 and pixels["tokens"] > 0.5
    assert pixels["cross_attention"] < 1e-4 and pixels["latents"] < 1e-4
    proprio = modality_path(encoder, obs, "proprio")
    assert proprio["attention"] > 0.1 and proprio["cross_attention"] > 0.05 and proprio["latents"] > 0.05
    assert encoder.capture_attention is False and not encoder.training  # left as it was


def test_modality_path_focus_is_zero_for_uniform_attention_and_grows_with_sharper_queries(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    obs = sample_obs(dict_space, 4)
    with torch.no_grad():  # zero queries: every latent averages each modality's tokens uniformly
        encoder.cross_attention.q.weight.zero_()
        encoder.cross_attention.q.bias.zero_()
    assert abs(modality_path(encoder, obs, "pixels")["focus"]) < 1e-5
    with torch.no_grad():
        encoder.cross_attention.q.weight.normal_(0, 3.0)
    assert modality_path(encoder, obs, "pixels")["focus"] > 0.05
    proprio = encoder.specs[encoder.names.index("proprio")]
    assert np.isnan(modality_path(encoder, obs, "proprio")["token_signal"]) == (proprio.num_tokens == 1)


def test_modality_path_withholds_with_mask_tokens_when_the_encoder_has_them(dict_space):
    obs = sample_obs(dict_space, 4)
    obs["pixels"] = torch.zeros_like(obs["pixels"])  # zeros withheld as zeros change nothing ...
    assert modality_path(PerceiverEncoder(dict_space, small()).eval(), obs, "pixels")["tokens"] < 1e-6
    masked = PerceiverEncoder(dict_space, small(missing_tokens="mask")).eval()
    with torch.no_grad():
        masked.mask_tokens.normal_()
    assert modality_path(masked, obs, "pixels")["tokens"] > 0.1  # ... the mask tokens do


def test_modality_path_names_a_bad_key_and_a_batch_of_one(dict_space):
    encoder = PerceiverEncoder(dict_space, small()).eval()
    with pytest.raises(
        ValueError, match=r"unknown modality 'lidar'.*valid choices: \['action_history', 'pixels'"
    ):
        modality_path(encoder, sample_obs(dict_space, 2), "lidar")
    with pytest.raises(ValueError, match="at least 2, got 1"):
        modality_path(encoder, sample_obs(dict_space, 1), "pixels")
