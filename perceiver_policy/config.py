"""One dataclass configures the Perceiver IO encoder/decoder."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

DTYPES = ("float32", "bfloat16")
DEFAULT_PATCH_SIZE = 12
LEGACY_FIELDS = {"modality_dropout": "encoder_modality_dropout"}
PROPRIO_TOKENS = ("sensor", "chunk")
PIXEL_TOKENIZERS = ("patch", "conv", "keypoints")
MISSING_TOKENS = ("remove", "mask")
IMAGE_CENTERINGS = ("none", "running")
SHARED_GROUP = "shared"
CENTERINGS = ("none", "running", "reference")
"""A policy's `center_features`: 'none'; 'running' (the DrQ recipe's readouts subtract a running mean of their
input); 'reference' (the Perceiver's latents minus those of a reference observation, `PerceiverEncoder`)."""


def centering_mode(value: bool | str) -> str:
    """`center_features` as one of `CENTERINGS` (True: 'running', False: 'none')."""
    if isinstance(value, bool):
        return "running" if value else "none"
    if value not in CENTERINGS:
        raise ValueError(f"center_features {value!r} unknown; valid choices: {[*CENTERINGS, True, False]}")
    return value


def reference_centring(value: bool | str, policy: str) -> bool:
    """`center_features` of a policy whose heads read the latents directly (SB3's SAC recipe, PPO / A2C):
    'reference' or 'none'; 'running' is a statistic of the DrQ recipe's readouts, which `policy` has not."""
    mode = centering_mode(value)
    if mode == "running":
        raise ValueError(
            f"center_features {value!r} (a running mean) belongs to the DrQ recipe's readouts; {policy} takes "
            "'reference' or 'none'"
        )
    return mode == "reference"


@dataclass
class PerceiverConfig:
    """Perceiver IO hyper-parameters. Defaults are the lean CPU preset (fast enough for a control loop).

    Perceiver IO's published models use 256-512 latents of 256-1024 channels with several self-attention layers;
    that belongs on a GPU. With 32 latents x 64 channels and one self-attention layer the encoder runs at
    about the cost of SB3's NatureCNN extractor on 2 CPU cores (see docs/results.md).
    """

    num_latents: int = 32
    """M, the number of latent vectors (the cross-attention cost is O(M * N) for N input tokens)."""
    latent_scaling: list[int] = field(default_factory=list)
    """Nested latents (dynamic latent scaling): the numbers k of leading latents the policy is trained to run
    with, e.g. [4, 8, 16, 32]; the largest must be `num_latents`. Each update of PerceiverSAC, PerceiverPPO and
    PerceiverA2C reads the first k latents, k drawn uniformly from the list (PPO/A2C: one k per rollout and its
    update, so the ratio's old log-probabilities are the rollout's own), so every prefix of the latent array is a
    working encoder; at inference `perceiver_policy.set_num_latents(model, k)` picks one. Empty: all latents, always."""
    latent_dim: int = 64
    """Channels of every latent and of every input token after its modality's projection."""
    cross_attn_heads: int = 1
    """Heads of the input cross-attention (DeepMind's Perceiver IO uses 1)."""
    self_attn_heads: int = 4
    """Heads of each latent self-attention layer."""
    self_attn_layers: int = 1
    """Latent self-attention layers in one block."""
    self_attn_repeats: int = 1
    """How many times the block of self-attention layers is applied."""
    share_repeat_weights: bool = True
    """Reuse the block's weights across repeats (Perceiver's weight sharing) instead of new layers per repeat."""
    widening_factor: int = 2
    """MLP hidden width = widening_factor * latent_dim."""
    decoder_heads: int = 1
    """Heads of the output-query cross-attention."""
    dropout: float = 0.0
    """Dropout on residual branches. RL default 0: see `attn_dropout`."""
    attn_dropout: float = 0.0
    """Attention-probability dropout; ~0.1 suits supervised training. Keep 0 for PPO/A2C: SB3 collects rollouts
    in eval mode and computes the PPO ratio in train mode, so any dropout biases the ratio (and CPU SDPA leaves
    its fused kernel when dropout > 0)."""
    drop_path: float = 0.0
    """Stochastic-depth rate of the deepest residual block; rates grow linearly over the blocks (input
    cross-attention first, then each self-attention layer), so any depth gets a non-zero rate. RL default 0."""
    fourier_bands: int = 8
    """Fourier frequency bands per position axis, linearly spaced from 1 to resolution / 2 (as Perceiver IO)."""
    use_position_features: bool = True
    """Concatenate Fourier position features to token contents; off makes the model permutation-invariant."""
    patch_size: int | None = None
    """Pixel patch side (the image modality's token stride). None (default): the divisor of the image size
    nearest `DEFAULT_PATCH_SIZE` = 12 (84 and 96 px: 12; 64 px: 8); an explicit value must divide the image size."""
    pixel_tokenizer: str = "patch"
    """'patch': one token per (frame, patch_size x patch_size patch), a linear map of each frame's patch; 'conv': a
    small conv stem (3x3 convs, `conv_channels` wide, strides `conv_strides`, padding 1, ReLU) over the *stacked*
    frames, whose feature-map cells become tokens with 2-D Fourier features (84 px, strides 2, 2, 2: 11 x 11 =
    121 tokens); the first layer sees every frame, so motion is visible before the attention; 'keypoints': the same
    stem, then a 1 x 1 conv to `keypoints` maps, each read out by a spatial softmax (Finn et al. 2016, "Deep Spatial
    Autoencoders for Visuomotor Learning"; robomimic's `SpatialSoftmax`) as the expected (x, y) of its mass: one
    token per keypoint whose content *is* a place in the image, so a latent that attends to it reads where a
    thing is as a value, not through position features mixed by attention."""
    conv_channels: int = 32
    """Channels of each conv-stem layer (pixel_tokenizer 'conv' and 'keypoints')."""
    conv_strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    """Stride of each conv-stem layer (pixel_tokenizer 'conv' and 'keypoints'); the number of layers is its length."""
    keypoints: int = 32
    """Keypoints (= tokens) of pixel_tokenizer 'keypoints'."""
    keypoints_per_frame: bool = False
    """pixel_tokenizer 'keypoints': the stem reads each frame of the stack alone (its first layer 3 channels wide)
    and each frame has its own `keypoints` tokens, with a (frame, keypoint) Fourier index: motion is the change of
    a keypoint from one frame to the next, as Finn et al. fed their policy. False: one set over the stacked frames."""
    conv_kernels: list[int] | None = None
    """Kernel side of each conv-stem layer, padded by (k - 1) // 2 (pixel_tokenizer 'conv', 'keypoints'); None: 3 for every
    layer. NatureCNN's stem is `conv_kernels=[8, 4, 3] conv_strides=[4, 2, 1]` (84 px: 10 x 10 tokens)."""
    image_centering: str = "none"
    """'running': every image tokenizer reads the frames minus a running mean frame of the training observations
    (the fixed background cancels, what moves remains; `perceiver_policy.modalities.CentredImage`), 'none': the
    frames as they are. On a fixed camera the background differs from place to place far more than anything
    differs between observations, and attention compares tokens by content."""
    proprio_tokens: str = "sensor"
    """'sensor': one token per sensor of the env's layout; 'chunk': one token per `proprio_chunk` values."""
    proprio_chunk: int = 4
    """Values per proprio token in 'chunk' mode (and for vector modalities without a layout)."""
    encoder_modality_dropout: float = 0.0
    """Model-side, training mode only: the encoder drops a whole modality per sample with this probability (never
    all of them). It makes PPO's ratio inexact (rollouts run in eval mode); for PPO use the env-side
    `TrainConfig.env_modality_dropout`, which puts the flags into the observation. (Was `modality_dropout`.)"""
    missing_tokens: str = "remove"
    """How a withheld or missing modality enters the cross-attention. 'remove': its tokens get no attention (the
    same result as if they had never been there; the softmax's denominator changes, so "missing" and
    "uninformative" differ). 'mask': each of its tokens is replaced by a learned mask token of that modality (as
    Perceiver IO's multimodal preprocessor does), keeping the token count: the latents see that it is withheld."""
    latent_groups: dict = field(default_factory=dict)
    """Grouped latents (bottleneck fusion), e.g. {pixels: 16, proprio: 8, action_history: 8}: in the input
    cross-attention each group's latents read only their modality's tokens; 'shared' latents (MBT's bottleneck)
    read every modality; latent self-attention fuses the groups. Counts sum to num_latents, in this order along
    the latent array; needs missing_tokens 'mask' (a group whose modality is withheld reads its mask tokens). Empty:
    every latent reads every token."""
    image_locality: float = 0.0
    """Latents with a place on the image (0: off). The latents that read an image (its group's with latent_groups,
    else all) are laid on a rows x cols grid over its token map (rows the largest divisor of their count up to its
    square root), and each latent's cross-attention logit for an image token falls by d^2 / 2, d the distance from
    the token's cell to the latent's place in units of `image_locality` grid spacings (normalised so that the
    image keeps its share of attention). Each latent then starts as the pooled features of its neighbourhood, a
    coarse feature map that keeps where things are (uniform attention over all cells, a global mean, keeps
    nothing of where a small object is), and can still sharpen by content. 1.0: about one spacing."""
    domain_embedding: bool = True
    """Multi-task observations (a `task` key, envs.multitask): a learned embedding of the task enters the encoder as
    one more input token (the latents read the body's identity beside its sensors, whose slots are shared across
    bodies) and joins each actuator query of the actor (actuator slot j is a different joint in each body). False
    ignores the `task` key (to measure what the embedding is worth). Without a `task` key: no effect."""
    task_stems: bool = False
    """Multi-task observations: every vector and sequence token (sensor slots, action history) is projected by the
    shared content projection plus a per-task residual projection, zero at initialisation (embodiment-specific
    stems, as in HPT, Wang et al. 2024). A slot shared by two bodies (cartpole's and cheetah's `velocity`, action
    slot j) is then read in each body's own coordinates instead of through one map. Without a `task` key: no effect."""
    modality_gating: bool = True
    """Learned per-head, per-modality logit bias and per-latent modality gate in the input cross-attention."""
    init_std: float = 0.02
    """Std of the truncated-normal init of latents, queries and modality embeddings (Linear layers use 1/sqrt(fan_in))."""
    dtype: str = "float32"
    """'bfloat16' runs the model under autocast (CUDA, or CPU where supported); 'float32' otherwise."""
    modality_overrides: dict = field(default_factory=dict)
    """Per-modality settings by observation key, e.g. {'pixels': {'stride': 12}}; see modalities.py."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool" and not isinstance(value, bool):
                raise ValueError(f"PerceiverConfig.{f.name} must be true or false, got {value!r}")
        positive = (
            "num_latents",
            "latent_dim",
            "cross_attn_heads",
            "self_attn_heads",
            "self_attn_repeats",
            "widening_factor",
            "decoder_heads",
            "proprio_chunk",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PerceiverConfig.{name} must be a positive integer, got {value!r}")
        scaling = self.latent_scaling
        if not isinstance(scaling, (list, tuple)) or any(
            not isinstance(k, int) or isinstance(k, bool) or not 0 < k <= self.num_latents for k in scaling
        ):
            raise ValueError(
                f"PerceiverConfig.latent_scaling must be a list of integers in [1, num_latents={self.num_latents}], "
                f"got {scaling!r}"
            )
        if scaling and max(scaling) != self.num_latents:
            raise ValueError(
                f"PerceiverConfig.latent_scaling {list(scaling)} must include num_latents={self.num_latents} as its "
                "largest value (latents beyond the largest k would never be trained)"
            )
        self.latent_scaling = sorted(set(scaling))
        if self.missing_tokens not in MISSING_TOKENS:
            raise ValueError(
                f"PerceiverConfig.missing_tokens {self.missing_tokens!r} unknown; valid choices: {list(MISSING_TOKENS)}"
            )
        groups = self.latent_groups
        if not isinstance(groups, dict) or any(
            not isinstance(n, int) or isinstance(n, bool) or n <= 0 for n in groups.values()
        ):
            raise ValueError(
                f"PerceiverConfig.latent_groups must map modality names (or {SHARED_GROUP!r}) to positive latent "
                f"counts, e.g. {{pixels: 16, proprio: 8, action_history: 8}} (a space after each colon), got {groups!r}"
            )
        if groups:
            if sum(groups.values()) != self.num_latents:
                raise ValueError(
                    f"PerceiverConfig.latent_groups {groups} has {sum(groups.values())} latents; num_latents is "
                    f"{self.num_latents}: the counts must add up to it"
                )
            if self.missing_tokens != "mask":
                raise ValueError(
                    "PerceiverConfig.latent_groups needs missing_tokens 'mask': with 'remove', a group whose modality "
                    "is withheld would have no token to read"
                )
            if self.latent_scaling:
                raise ValueError(
                    "PerceiverConfig.latent_groups and latent_scaling cannot be combined: a prefix of grouped latents "
                    "would drop whole groups"
                )
        if self.image_centering not in IMAGE_CENTERINGS:
            raise ValueError(
                f"PerceiverConfig.image_centering {self.image_centering!r} unknown; valid choices: "
                f"{list(IMAGE_CENTERINGS)}"
            )
        locality = self.image_locality
        if isinstance(locality, bool) or not isinstance(locality, (int, float)) or not locality >= 0:
            raise ValueError(
                f"PerceiverConfig.image_locality must be a number >= 0 (grid spacings; 0: off), got {locality!r}"
            )
        if locality and self.latent_scaling:
            raise ValueError(
                "PerceiverConfig.image_locality and latent_scaling cannot be combined: a prefix of latents placed on "
                "the image would read only part of it"
            )
        if locality and self.pixel_tokenizer == "keypoints":
            raise ValueError(
                "PerceiverConfig.image_locality needs a token map to place latents on; pixel_tokenizer 'keypoints' "
                "has none (each keypoint token carries its place as content): use pixel_tokenizer 'conv' or 'patch'"
            )
        if self.task_stems and not self.domain_embedding:
            raise ValueError(
                "PerceiverConfig.task_stems=True reads the task index that domain_embedding=False hides from the "
                "encoder; set task_stems=False too to train without the task's identity"
            )
        if self.patch_size is not None and (
            not isinstance(self.patch_size, int) or isinstance(self.patch_size, bool) or self.patch_size <= 0
        ):
            raise ValueError(
                f"PerceiverConfig.patch_size must be a positive integer or None, got {self.patch_size!r}"
            )
        for name in ("self_attn_layers", "fourier_bands"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PerceiverConfig.{name} must be a non-negative integer, got {value!r}")
        for name in ("dropout", "attn_dropout", "drop_path", "encoder_modality_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"PerceiverConfig.{name} must be in [0, 1), got {value!r}")
        for heads in ("cross_attn_heads", "self_attn_heads", "decoder_heads"):
            if self.latent_dim % getattr(self, heads):
                raise ValueError(
                    f"PerceiverConfig.{heads}={getattr(self, heads)} must divide latent_dim={self.latent_dim}"
                )
        if self.dtype not in DTYPES:
            raise ValueError(f"PerceiverConfig.dtype {self.dtype!r} unknown; valid choices: {list(DTYPES)}")
        if self.pixel_tokenizer not in PIXEL_TOKENIZERS:
            raise ValueError(
                f"PerceiverConfig.pixel_tokenizer {self.pixel_tokenizer!r} unknown; valid choices: {list(PIXEL_TOKENIZERS)}"
            )
        for name in ("conv_channels", "keypoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PerceiverConfig.{name} must be a positive integer, got {value!r}")
        strides = self.conv_strides
        if (
            not isinstance(strides, (list, tuple))
            or not strides
            or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in strides)
        ):
            raise ValueError(
                f"PerceiverConfig.conv_strides must be a non-empty list of positive integers, got {strides!r}"
            )
        self.conv_strides = list(strides)
        kernels = self.conv_kernels
        if kernels is not None:
            if (
                not isinstance(kernels, (list, tuple))
                or len(kernels) != len(strides)
                or any(not isinstance(v, int) or isinstance(v, bool) or v <= 0 for v in kernels)
            ):
                raise ValueError(
                    f"PerceiverConfig.conv_kernels must be None or one positive integer per conv_strides entry "
                    f"({len(strides)}), got {kernels!r}"
                )
            self.conv_kernels = list(kernels)
        if self.proprio_tokens not in PROPRIO_TOKENS:
            raise ValueError(
                f"PerceiverConfig.proprio_tokens {self.proprio_tokens!r} unknown; valid choices: {list(PROPRIO_TOKENS)}"
            )
        if not self.init_std > 0:
            raise ValueError(f"PerceiverConfig.init_std must be > 0, got {self.init_std!r}")
        if not isinstance(self.modality_overrides, dict):
            raise ValueError(
                f"PerceiverConfig.modality_overrides must be a dict, got {self.modality_overrides!r}"
            )

    def latent_choices(self) -> list[int]:
        """The numbers of latents this configuration runs with: `latent_scaling`, or [num_latents] without it."""
        return list(self.latent_scaling) or [self.num_latents]

    def image_patch_size(self, height: int, width: int) -> int:
        """`patch_size` if given, else the common divisor of the image sides nearest `DEFAULT_PATCH_SIZE`
        (the smaller one on a tie: finer tokens)."""
        if self.patch_size is not None:
            return self.patch_size
        divisors = [d for d in range(2, min(height, width) + 1) if height % d == 0 and width % d == 0]
        if not divisors:
            return 1
        return min(divisors, key=lambda d: (abs(d - DEFAULT_PATCH_SIZE), d))

    @classmethod
    def from_dict(cls, values: dict) -> PerceiverConfig:
        """Build from a plain dict (e.g. YAML), naming unknown keys and the valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {LEGACY_FIELDS.get(k, k): v for k, v in values.items()}  # configs saved before a rename
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown PerceiverConfig fields {unknown}; valid fields: {sorted(names)}")
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
