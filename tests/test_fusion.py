"""Fusion mechanisms of the encoder: mask tokens for withheld modalities, grouped latents."""

import pytest
import torch

from perceiver_policy import PerceiverConfig, PerceiverEncoder
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
