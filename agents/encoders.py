"""The pluggable encoders of the shared pixel SAC recipe (`agents.drq_policy.DrQSACPolicy`).

An encoder is the trunk that the critic's loss trains and the actor reads detached: ``encoder(obs) -> h``. Each
encoder also builds the *readout* that actor and critic each own (DrQ's ``Encoder.head``: Linear -> feature_dim,
LayerNorm, tanh), so that the heads above it are identical for every encoder:

- ``perceiver``: the Perceiver IO encoder (latents (B, M, D)); its readout is one output query cross-attending
  the latents, then DrQ's Linear / LayerNorm / tanh;
- ``cnn``: SB3's NatureCNN convolutions (8x8/4, 4x4/2, 3x3/1 -> 64 x 7 x 7 at 84 px);
- ``drq-cnn``: DrQ's encoder (4 conv 3x3, 32 filters, strides 2, 1, 1, 1, no padding -> 32 x 35 x 35 at 84 px).

The convolutional encoders read every key the Perceiver reads: the stacked frames through the convolutions (the
first layer sees all frames at once), every vector and history through a small MLP, concatenated. The privileged
``state`` is never an input; observations with per-sample ``absent_modalities`` flags are refused by name (only
the Perceiver masks modalities).
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.modalities import (
    ABSENT_KEY,
    STATE_KEY,
    channels_last_pixels,
    is_image_space,
    scaled_stem,
)
from perceiver_policy.model import LearnedQueries, PerceiverDecoder, PerceiverEncoder

ENCODERS = ("perceiver", "cnn", "drq-cnn")
# The conv encoders' precision. bf16 autocast made their forward + backward 1.6-1.7x faster on a CPU with native
# bf16 (AVX512-BF16), features within 0.4-0.7 % of float32's (docs/results.md); float32 stays the default until a
# learning run has shown that bf16 leaves the returns alone.
CONV_DTYPES = ("float32", "bfloat16")
READOUTS = ("query", "flat")
"""How actor and critic read the Perceiver's latents (B, M, D): ``query``, one learned output query cross-attends
them (D features); ``flat``, DrQ's head on the flattened latents (M * D features), as on a conv feature map.
The convolutional encoders always read out ``flat``."""
VECTOR_HIDDEN = 64
"""Width of the small MLP that reads the vector and history keys of the convolutional encoders."""


def orthogonal_init(module: nn.Module) -> None:
    """DrQ's `utils.weight_init` (denisyarats/drq, utils.py): orthogonal Linear weights, orthogonal conv weights
    with the ReLU gain, zero biases."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.orthogonal_(sub.weight)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Conv2d):
            nn.init.orthogonal_(sub.weight, nn.init.calculate_gain("relu"))
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class FeatureReadout(nn.Module):
    """DrQ's encoder head (drq.py `Encoder.head` + tanh): flat h (B, F) -> Linear -> LayerNorm -> tanh (B, feature_dim).

    `center`: subtract a running mean of h first (updated in training mode with weight `momentum` per batch, used as
    is in eval mode). The Perceiver's latents are dominated by an input-independent part (the learned latent array,
    position and modality embeddings, the attention's average over background tokens): on cartpole pixels their
    variation across states is ~1 % of their size at initialisation against ~60 % for a conv feature map
    (docs/results.md), so without centering the critic starts, and can stay, blind to the state."""

    def __init__(self, in_dim: int, feature_dim: int, center: bool = False, momentum: float | None = None):
        super().__init__()
        self.linear = nn.Linear(in_dim, feature_dim)
        self.norm = nn.LayerNorm(feature_dim)
        self.center = center
        self.momentum = check_center_momentum(CENTER_MOMENTUM if momentum is None else momentum)
        if center:
            self.register_buffer("running_mean", torch.zeros(in_dim))
            self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.flatten(1)
        if self.center:
            if self.training:
                with torch.no_grad():
                    mean = h.detach().float().mean(0)
                    if not bool(self.initialised):
                        self.running_mean.copy_(mean)
                        self.initialised.fill_(True)
                    else:
                        self.running_mean.lerp_(mean, self.momentum)
            h = h - self.running_mean.to(h.dtype)
        return torch.tanh(self.norm(self.linear(h)))


CENTER_MOMENTUM = 0.01
"""Default weight of each training batch in the readout's running mean (an average over the last ~100 batches).
The running mean lags the encoder it centres: on the state-regression benchmark 0.1 learned faster (docs/results.md)."""


def check_center_momentum(momentum: float) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 < momentum <= 1:
        raise ValueError(f"center_momentum must be a number in (0, 1], got {momentum!r}")
    return float(momentum)


class QueryReadout(nn.Module):
    """The Perceiver's readout: one learned output query cross-attends the latents (B, M, D) -> (B, D), then DrQ's
    Linear -> LayerNorm -> tanh. Actor and critic each own one, as each DrQ network owns its `Encoder.head`."""

    def __init__(
        self, config: PerceiverConfig, feature_dim: int, center: bool = False, momentum: float | None = None
    ):
        super().__init__()
        self.query = LearnedQueries(1, config.latent_dim, config.init_std)
        self.decoder = PerceiverDecoder(config)
        self.head = FeatureReadout(config.latent_dim, feature_dim, center, momentum)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.head(self.decoder(self.query(latents.shape[0]), latents)[:, 0])


def _input_keys(observation_space: spaces.Dict, name: str) -> tuple[str | None, list[str]]:
    """(pixel key or None, vector / history keys) of a Dict space; refuses what a conv encoder cannot honour."""
    if not isinstance(observation_space, spaces.Dict):
        raise ValueError(f"encoder {name!r} needs a Dict observation space, got {observation_space}")
    if ABSENT_KEY in observation_space.spaces:
        raise ValueError(
            f"encoder {name!r} cannot mask modalities per sample ({ABSENT_KEY!r} in the observation: "
            "env_modality_dropout > 0); use policy_type 'perceiver' for modality dropout"
        )
    pixel_key, vector_keys = None, []
    for key, space in observation_space.spaces.items():
        if key == STATE_KEY:
            continue
        if is_image_space(space):
            if pixel_key is not None:
                raise ValueError(f"encoder {name!r} reads one image key, got {pixel_key!r} and {key!r}")
            pixel_key = key
        else:
            vector_keys.append(key)
    return pixel_key, vector_keys


class ConvEncoder(nn.Module):
    """Stacked uint8 frames -> convolutions -> flat (B, C*H'*W'), concatenated with a small MLP over the
    vector / history keys -> h (B, out_dim). The convolutions read x / 255 (DrQ's `obs / 255.`), the scaling folded
    into the first layer (`scaled_conv2d`), channels-last (25-35 % faster on the CPU, ../docs/results.md)."""

    def __init__(
        self, observation_space: spaces.Dict, name: str, convs: list[nn.Conv2d], dtype: str = "float32"
    ):
        super().__init__()
        if dtype not in CONV_DTYPES:
            raise ValueError(f"conv_dtype {dtype!r} is not one of {list(CONV_DTYPES)} (encoder {name!r})")
        self.name = name
        self.dtype = dtype  # 'bfloat16': the convolutions run under bf16 autocast; their output is cast back
        self.pixel_key, self.vector_keys = _input_keys(observation_space, name)
        self.out_dim = 0
        self.convs = None
        if self.pixel_key is not None:
            layers: list[nn.Module] = []
            for conv in convs:
                layers += [conv, nn.ReLU(inplace=True)]  # in place: the conv's fresh output, not an input
            self.convs = nn.Sequential(*layers)
            orthogonal_init(self.convs)  # before channels-last: orthogonal_ writes through a contiguous view
            self.convs.to(memory_format=torch.channels_last)
            shape = observation_space[self.pixel_key].shape
            try:
                with torch.no_grad():
                    self.conv_shape = tuple(self.convs(torch.zeros(1, *shape)).shape[1:])  # (C, H', W')
            except RuntimeError as err:
                raise ValueError(
                    f"encoder {name!r} cannot read {shape[-2]}x{shape[-1]} images: its convolutions shrink them to "
                    "nothing; use a larger image_size (84, as DrQ) or another policy_type"
                ) from err
            self.out_dim += int(np.prod(self.conv_shape))
        self.vector_dim = sum(int(np.prod(observation_space[k].shape)) for k in self.vector_keys)
        self.vectors = None
        if self.vector_keys:
            self.vectors = nn.Sequential(
                nn.Linear(self.vector_dim, VECTOR_HIDDEN),
                nn.ReLU(),
                nn.Linear(VECTOR_HIDDEN, VECTOR_HIDDEN),
                nn.ReLU(),
            )
            orthogonal_init(self.vectors)
            self.out_dim += VECTOR_HIDDEN

    def forward(self, obs: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.convs is not None:
            pixels = obs[self.pixel_key]  # (B, F*3, H, W) uint8
            bf16 = self.dtype == "bfloat16"
            x = channels_last_pixels(pixels, dtype=torch.bfloat16 if bf16 else torch.float32)  # raw 0..255
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                features = scaled_stem(self.convs, x)  # DrQ's `obs / 255.`, folded into the first layer
            parts.append(features.float().flatten(1))  # (B, C*H'*W'), float32 either way
        if self.vectors is not None:
            flat = torch.cat([obs[k].float().flatten(1) for k in self.vector_keys], dim=1)  # (B, vector_dim)
            parts.append(self.vectors(flat))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]  # (B, out_dim)

    def make_readout(
        self, feature_dim: int, kind: str = "flat", center: bool = False, momentum: float | None = None
    ) -> nn.Module:
        if kind != "flat":
            raise ValueError(
                f"encoder {self.name!r} reads out its flat feature map only; readout {kind!r} is for "
                "policy_type 'perceiver' (valid choice here: 'flat')"
            )
        readout = FeatureReadout(self.out_dim, feature_dim, center, momentum)
        orthogonal_init(readout)
        return readout


def nature_cnn(observation_space: spaces.Dict, dtype: str = "float32") -> ConvEncoder:
    """SB3's NatureCNN convolutions (stable_baselines3/common/torch_layers.py: 8x8/4, 4x4/2, 3x3/1, 32-64-64)."""
    channels = _channels(observation_space)
    convs = [
        nn.Conv2d(channels, 32, 8, stride=4),
        nn.Conv2d(32, 64, 4, stride=2),
        nn.Conv2d(64, 64, 3, stride=1),
    ]
    return ConvEncoder(observation_space, "cnn", convs, dtype)


def drq_cnn(observation_space: spaces.Dict, dtype: str = "float32") -> ConvEncoder:
    """DrQ's encoder (denisyarats/drq, drq.py `Encoder`): 4 conv 3x3, 32 filters, strides 2, 1, 1, 1, no padding."""
    channels = _channels(observation_space)
    convs = [nn.Conv2d(channels, 32, 3, stride=2)] + [nn.Conv2d(32, 32, 3, stride=1) for _ in range(3)]
    return ConvEncoder(observation_space, "drq-cnn", convs, dtype)


def _channels(observation_space: spaces.Dict) -> int:
    pixel_key, _ = _input_keys(observation_space, "cnn")
    return observation_space[pixel_key].shape[0] if pixel_key is not None else 1


class PerceiverTrunk(PerceiverEncoder):
    """The Perceiver encoder as a pluggable trunk: h = latents (B, M, D); readout by an output query or flat.

    `reference=True` (`center_features='reference'`): h = latents(obs) - latents(reference), the reference being
    the first observation the trunk reads (`PerceiverEncoder`), copied into the target critic with the running
    means. In pixel SAC runs a running mean's lag grew to 600x the across-state signal within 3k updates
    (docs/results.md); the reference has nothing to lag."""

    def make_readout(
        self, feature_dim: int, kind: str = "query", center: bool = False, momentum: float | None = None
    ) -> nn.Module:
        if kind == "query":
            readout = QueryReadout(self.config, feature_dim, center, momentum)
            orthogonal_init(readout.head)
            return readout
        if kind == "flat":
            readout = FeatureReadout(
                self.config.num_latents * self.config.latent_dim, feature_dim, center, momentum
            )
            orthogonal_init(readout)
            return readout
        raise ValueError(f"unknown readout {kind!r}; valid choices: {list(READOUTS)}")


def build_encoder(
    name: str,
    observation_space: spaces.Dict,
    perceiver: PerceiverConfig,
    reference: bool = False,
    conv_dtype: str = "float32",
) -> nn.Module:
    """The trunk named `name` (one of `ENCODERS`) for this observation space; `reference`: the Perceiver's latents
    relative to a reference observation's (`PerceiverTrunk`); `conv_dtype` (`CONV_DTYPES`): the precision of the
    conv encoders' convolutions (the Perceiver's is `PerceiverConfig.dtype`)."""
    if reference and name != "perceiver":
        raise ValueError(
            f"center_features 'reference' is for the Perceiver's latents; encoder {name!r} takes 'running' or 'none'"
        )
    if conv_dtype != "float32" and name == "perceiver":
        raise ValueError(
            f"conv_dtype {conv_dtype!r} sets the precision of the cnn and drq-cnn encoders; the Perceiver's is "
            "--perceiver dtype=bfloat16"
        )
    if name == "perceiver":
        return PerceiverTrunk(observation_space, perceiver, reference)
    if name == "cnn":
        return nature_cnn(observation_space, conv_dtype)
    if name == "drq-cnn":
        return drq_cnn(observation_space, conv_dtype)
    raise ValueError(f"unknown encoder {name!r}; valid choices: {list(ENCODERS)}")
