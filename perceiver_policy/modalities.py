"""The modality registry: how each observation key becomes a set of tokens.

A `ModalitySpec` declares a modality's kind, shape, token stride and Fourier resolutions; an adapter (one per
kind) turns its observation into `(B, N, latent_dim)` tokens. Every modality then feeds the *same* encoder, so a
new sensor is a new entry (`register_adapter` for a new kind, or `modality_overrides` for a new key), never a new
attention stack. Built-in kinds:

- ``image``: uint8 `(F*3, H, W)` frame stacks -> one token per (frame, patch) with 2-D Fourier features and a
  frame-index feature. Pixels are scaled to float here and nowhere else.
- ``vector``: float `(D,)` -> one token per named sensor (from the env's layout) or per fixed-size chunk, with a
  Fourier index encoding.
- ``sequence``: float `(T, C)` (e.g. the action history) -> one token per step with a temporal Fourier encoding.
- ``conv_image``: uint8 `(F*3, H, W)` frame stacks -> a conv stem over all frames at once -> one token per cell
  of its feature map, with 2-D Fourier features (`PerceiverConfig.pixel_tokenizer='conv'` picks it for images).
  Its first layer scales the pixels (`scaled_conv2d`).
- ``keypoint_image``: the conv stem of ``conv_image``, then one token per keypoint (a spatial softmax's expected
  (x, y) of a learned feature map), with a Fourier index encoding (`PerceiverConfig.pixel_tokenizer='keypoints'`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gymnasium import spaces
from torch import nn

from perceiver_policy.config import PerceiverConfig
from perceiver_policy.kept import Kept
from perceiver_policy.position import fourier_dim, grid_fourier_features

ABSENT_KEY = "absent_modalities"  # = envs.wrappers.ABSENT_KEY (kept import-free of envs)
STATE_KEY = "state"  # = envs.dmc.STATE_KEY: the privileged full state, for losses and probes, never an input
TASK_KEY = "task"  # = envs.multitask.TASK_KEY: the task index of a multi-task observation
ACTION_MASK_KEY = "action_mask"  # = envs.multitask.ACTION_MASK_KEY: which padded action entries are real
# = envs.multitask.PRESENT_SUFFIX: '<key>_present' flags that key's tokens (its sensor slots)
PRESENT_SUFFIX = "_present"
NOT_MODALITIES = (ABSENT_KEY, STATE_KEY, ACTION_MASK_KEY)
STEM_KINDS = ("conv_image", "keypoint_image")  # image kinds read by a conv stem
ON_IMAGE_KINDS = ("image", "conv_image")  # image kinds whose tokens are places on the image (patches, cells)
KINDS = ("image", "vector", "sequence", "conv_image", "keypoint_image", "task")
_DEFAULT_KIND = {
    "pixels": "image",
    "proprio": "vector",
    "action_history": "sequence",
    "proprio_history": "sequence",
    TASK_KEY: "task",
}


def task_count(observation_space: spaces.Dict) -> int:
    """Tasks a multi-task observation's `task` index takes (its Box bound + 1); 0 without a `task` key."""
    space = observation_space.spaces.get(TASK_KEY)
    return int(np.max(space.high)) + 1 if space is not None else 0


def channels_last_pixels(pixels: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, C, H, W) images -> the same values, channels-last, in `dtype`: the input of `scaled_conv2d`. uint8 is laid
    out channels-last before the cast (a quarter of the bytes to move); uint8 -> float32 or bf16 is exact (integers
    to 256). A float input in `dtype` and channels-last is returned as it is (never written)."""
    return pixels.contiguous(memory_format=torch.channels_last).to(dtype)


def _padded_cells(
    size: int, kernel: int, stride: int, padding: int, dilation: int, cells: int
) -> tuple[int, int]:
    """(leading, trailing): how many output cells along one axis have a window that reaches into the padding."""
    leading = min(cells, -(-padding // stride))  # cell i starts at i * stride - padding < 0
    last_inside = (size - 1 + padding - dilation * (kernel - 1)) // stride  # the last cell ending inside
    return leading, min(cells - leading, max(0, cells - 1 - last_inside))


def scaled_conv2d(conv: nn.Conv2d, pixels: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """`conv(pixels / 255 - shift)`, the scaled image zero-padded as `conv` pads, computed on the raw pixel values
    (`channels_last_pixels`): the scaling is folded into the weights, W (x / 255 - shift) + b = (W / 255) x + (b -
    shift * sum W), and the cells whose window reaches into the padding, where the folded bias subtracted shift
    times weights that met zeros, get shift * (those weights) back (a batch-1 convolution of ones gives the sum of
    each cell's weights inside the image; only the border rows and columns are written).

    The same function as scaling first, within float rounding (tested, with its gradients), without the two
    passes over the batch that scaling costs: a DrQ-recipe update scales four batches of 256 stacks of 84 px x 9
    channels. Profiled at batch 256 under bf16 autocast, the scaling passes took longer than the first layer."""
    if conv.groups != 1 or isinstance(conv.padding, str):
        raise ValueError(f"scaled_conv2d folds an ungrouped, int-padded Conv2d, got groups {conv.groups}, "
                         f"padding {conv.padding!r}")  # fmt: skip
    weight = conv.weight
    total = weight.sum(dim=(1, 2, 3))  # (C_out,)
    bias = -shift * total if conv.bias is None else conv.bias - shift * total
    out = F.conv2d(pixels, weight / 255.0, bias, conv.stride, conv.padding, conv.dilation)
    if not shift or not any(conv.padding):
        return out
    (height, width), (rows, cols) = pixels.shape[-2:], out.shape[-2:]
    top, bottom = _padded_cells(
        height, weight.shape[2], conv.stride[0], conv.padding[0], conv.dilation[0], rows
    )
    left, right = _padded_cells(
        width, weight.shape[3], conv.stride[1], conv.padding[1], conv.dilation[1], cols
    )
    correction = _border_correction(conv, pixels, total, shift, out.dtype)
    every, middle = slice(None), slice(top, rows - bottom)
    regions = [
        (r, c)
        for count, r, c in (
            (top, slice(0, top), every),
            (bottom, slice(rows - bottom, rows), every),
            (left, middle, slice(0, left)),
            (right, middle, slice(cols - right, cols)),
        )
        if count
    ]
    if torch.is_grad_enabled() and (out.requires_grad or correction.requires_grad):
        return _AddAtBorder.apply(out, correction, regions)
    return _add_at_border(out, correction, regions)


def _border_correction(
    conv: nn.Conv2d, pixels: torch.Tensor, total: torch.Tensor, shift: float, dtype: torch.dtype
) -> torch.Tensor:
    """shift * (the weights each output cell's window puts on the padding): (C_out, H', W'), 0 away from the border.
    Without gradients (acting, evaluation) it is kept until the weights change: at batch 1 its batch-1
    convolution of ones would cost as much as the layer itself."""
    key = (tuple(pixels.shape[1:]), pixels.dtype, dtype, shift)

    def correction() -> torch.Tensor:
        ones = torch.ones(1, *pixels.shape[1:], dtype=pixels.dtype, device=pixels.device)
        inside = F.conv2d(ones, conv.weight, None, conv.stride, conv.padding, conv.dilation)[
            0
        ]  # (C_out, H', W')
        return (shift * (total[:, None, None] - inside)).to(dtype)

    return kept_without_grad(conv, "_border_correction", key, (conv.weight,), correction)


def kept_without_grad(owner: nn.Module, name: str, key: tuple, sources: tuple, compute) -> torch.Tensor:
    """`compute()`, kept on `owner` under `name` while `key` (shapes, dtypes) and the values of `sources` (the
    weights / buffers it reads: `perceiver_policy.kept`) stay the same, when no gradient is recorded (the DrQ
    target, acting, evaluation); with gradients computed afresh, never kept."""
    if torch.is_grad_enabled():
        return compute()
    return owner.__dict__.setdefault(name, Kept()).fetch(key, sources, compute)


def scaled_stem(
    stem: nn.Sequential, pixels: torch.Tensor, shift: float = 0.0, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """A conv stem (its first layer a Conv2d) over `pixels / 255 - shift`, from the raw `channels_last_pixels`: the
    first layer scales (`scaled_conv2d`), the rest run as they are. `offset` (C_out, H', W'): subtracted from the
    first layer's output before its activation (`CentredImage.centring_offset`)."""
    features = scaled_conv2d(stem[0], pixels, shift)
    if offset is not None:  # in place: the conv's fresh output, which its backward does not read
        offset = offset.to(features.dtype)
        if torch.is_grad_enabled() and (features.requires_grad or offset.requires_grad):
            features = _SubOffset.apply(features, offset)
        else:
            features = features.sub_(offset)
    for layer in stem[1:]:
        features = layer(features)
    return features


def _add_at_border(out: torch.Tensor, correction: torch.Tensor, regions) -> torch.Tensor:
    for r, c in regions:  # disjoint (rows, cols) regions of the (H', W') map
        out[:, :, r, c] += correction[:, r, c]
    return out


class _AddAtBorder(torch.autograd.Function):
    """`_add_at_border` for autograd: the gradient passes to `out` as it is. Autograd's own record of in-place
    writes into slices copies the whole gradient map per slice, out of channels-last, which made every backward
    kernel after it slower than the scaling this replaces."""

    @staticmethod
    def forward(ctx, out, correction, regions):
        ctx.regions, ctx.shape = regions, correction.shape
        ctx.mark_dirty(out)
        return _add_at_border(out, correction, regions)

    @staticmethod
    def backward(ctx, grad):
        grad_correction = grad.new_zeros(ctx.shape)
        for r, c in ctx.regions:
            grad_correction[:, r, c] = grad[:, :, r, c].sum(dim=0)
        return grad, grad_correction, None


def batch_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """(B, C, H, W) -> its sum over the batch (C, H, W), summed in memory order: over a channels-last tensor
    PyTorch's own reduction over dim 0 took 9x (19x with a dtype) the time of summing the (B, H*W*C) view
    (256 stacks of 84 px x 9 channels, one thread: 21 / 47 ms against 2.4 ms)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return x.sum(dim=0, dtype=dtype)
    batch, channels, height, width = x.shape
    per_cell = x.permute(0, 2, 3, 1).reshape(batch, -1).sum(dim=0, dtype=dtype)  # a view: no copy
    return per_cell.view(height, width, channels).permute(2, 0, 1)


class _SubOffset(torch.autograd.Function):
    """`out.sub_(offset)` of a (B, C, H', W') map and a (C, H', W') one, for autograd: the gradient passes to `out`
    as it is and to `offset` as minus its `batch_sum` (autograd's own reduction of the broadcast took 118 ms over a
    channels-last (256, 32, 42, 42) gradient, profiled)."""

    @staticmethod
    def forward(ctx, out, offset):
        ctx.mark_dirty(out)
        return out.sub_(offset)

    @staticmethod
    def backward(ctx, grad):
        return grad, -batch_sum(grad)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """The dtype autocast computes convolutions in on `device` (float32 when autocast is off there)."""
    kind = device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else torch.float32


def is_input_key(name: str, config: PerceiverConfig | None = None) -> bool:
    """Whether an observation key becomes tokens: not the absent flags, the privileged state, the action mask or
    a key's presence flags; the task index only with `config.domain_embedding`."""
    if name in NOT_MODALITIES or name.endswith(PRESENT_SUFFIX):
        return False
    return name != TASK_KEY or config is None or config.domain_embedding


@dataclass(frozen=True)
class ModalitySpec:
    """What the encoder needs to know about one observation key."""

    name: str
    kind: str
    shape: tuple[int, ...]
    stride: int
    """Patch side (image), values per chunk (vector) or steps per token (sequence, 1)."""
    layout: tuple[tuple[str, int, int], ...] | None = None
    """Vector only: named (sensor, start, stop) slices; one token per sensor when given."""
    channels_per_frame: int = 3
    """Image only: channels of one frame in the stacked channel axis."""
    conv_strides: tuple[int, ...] = ()
    """conv_image only: the stride of each conv layer of the stem."""
    conv_kernels: tuple[int, ...] = ()
    """conv_image only: the kernel side of each layer, padded by (k - 1) // 2; empty: 3 for every layer."""
    conv_channels: int = 32
    """conv_image and keypoint_image: channels of each stem layer (conv_image: = raw features per token)."""
    keypoints: int = 32
    """keypoint_image only: keypoints (= tokens), each a spatial softmax over one map of the stem's output."""
    keypoints_per_frame: bool = False
    """keypoint_image only: the stem reads each frame alone, `keypoints` tokens per frame (else the stacked frames)."""
    num_classes: int = 0
    """task only: how many tasks the index takes (the embedding's rows)."""

    @property
    def conv_layers(self) -> tuple[tuple[int, int], ...]:
        """conv_image and keypoint_image: (kernel, stride) of each stem layer."""
        kernels = self.conv_kernels or (3,) * len(self.conv_strides)
        return tuple(zip(kernels, self.conv_strides))

    @property
    def stem_in_channels(self) -> int:
        """conv_image and keypoint_image: the channels the stem's first layer reads (the stack, or one frame)."""
        return self.channels_per_frame if self.keypoints_per_frame else self.shape[0]

    @property
    def conv_grid(self) -> tuple[int, int]:
        """conv_image and keypoint_image: the stem's feature-map size (H', W'); a layer of kernel k, stride s and padding
        p = (k - 1) // 2 maps n to (n + 2p - k) // s + 1."""
        height, width = self.shape[1], self.shape[2]
        for k, s in self.conv_layers:
            pad = (k - 1) // 2
            height, width = (height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1
        return height, width

    @property
    def fourier_resolutions(self) -> tuple[int, ...]:
        if self.kind == "conv_image":
            return self.conv_grid
        if self.kind == "keypoint_image":
            frames = self.shape[0] // self.channels_per_frame
            return (frames, self.keypoints) if self.keypoints_per_frame else (self.keypoints,)
        if self.kind == "image":
            frames, height, width = self.shape[0] // self.channels_per_frame, self.shape[1], self.shape[2]
            return (frames, height // self.stride, width // self.stride)
        if self.kind == "vector":
            return (self.num_tokens,)
        if self.kind == "task":
            return (1,)
        return (self.shape[0],)

    @property
    def num_tokens(self) -> int:
        if self.kind in ("image", *STEM_KINDS):
            return int(np.prod(self.fourier_resolutions))
        if self.kind == "vector":
            return len(self.layout) if self.layout else -(-self.shape[0] // self.stride)
        if self.kind == "task":
            return 1
        return self.shape[0]

    @property
    def token_dim(self) -> int:
        """Raw content features per token, before projection."""
        if self.kind == "conv_image":
            return self.conv_channels
        if self.kind == "keypoint_image":
            return 2  # (x, y)
        if self.kind == "image":
            return self.channels_per_frame * self.stride**2
        if self.kind == "vector":
            return max(stop - start for _, start, stop in self.layout) if self.layout else self.stride
        if self.kind == "task":
            return self.num_classes
        return self.shape[1]


def is_image_space(space: spaces.Space) -> bool:
    """Whether a space holds images: a uint8 Box of rank 3, (channels, H, W) (frame stacks: frames x 3 channels)."""
    return isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3


def infer_kind(name: str, space: spaces.Space) -> str:
    if name in _DEFAULT_KIND:
        return _DEFAULT_KIND[name]
    if is_image_space(space):
        return "image"
    if isinstance(space, spaces.Box) and len(space.shape) == 1:
        return "vector"
    if isinstance(space, spaces.Box) and len(space.shape) == 2:
        return "sequence"
    raise ValueError(
        f"cannot tokenise observation {name!r} with space {space}; supported: uint8 Box (C, H, W) images, "
        f"1-D Box vectors, 2-D Box sequences (or register an adapter with register_adapter)"
    )


def build_specs(observation_space: spaces.Space, config: PerceiverConfig) -> list[ModalitySpec]:
    """One spec per key of a Dict observation space, in the space's key order."""
    if not isinstance(observation_space, spaces.Dict):
        raise ValueError(
            f"the Perceiver policy needs a gymnasium Dict observation space, got {type(observation_space).__name__}: "
            f"{observation_space}"
        )
    specs = []
    for name, space in observation_space.spaces.items():
        if not is_input_key(name, config):  # absent / presence flags, the privileged state, the action mask
            continue
        overrides = dict(config.modality_overrides.get(name, {}))
        kind = overrides.pop("kind", None) or infer_kind(name, space)
        if kind == "image" and config.pixel_tokenizer in ("conv", "keypoints"):
            kind = "conv_image" if config.pixel_tokenizer == "conv" else "keypoint_image"
            overrides = {
                "conv_strides": tuple(config.conv_strides),
                "conv_kernels": tuple(config.conv_kernels or ()),
                "conv_channels": config.conv_channels,
                **(
                    {"keypoints": config.keypoints, "keypoints_per_frame": config.keypoints_per_frame}
                    if kind == "keypoint_image"
                    else {}
                ),
                **overrides,
            }
        if kind not in ADAPTERS:
            raise ValueError(
                f"unknown modality kind {kind!r} for {name!r}; valid choices: {sorted(ADAPTERS)}"
            )
        layout = getattr(space, "layout", None)
        if kind == "vector" and layout and config.proprio_tokens == "sensor":
            layout = tuple((sensor, int(a), int(b)) for sensor, (a, b) in layout.items())
        else:
            layout = None
        if kind == "task":
            overrides.setdefault("num_classes", task_count(observation_space))
        if kind == "image":
            stride = config.image_patch_size(*space.shape[-2:]) if len(space.shape) == 3 else 1
        else:
            stride = {"vector": config.proprio_chunk, "sequence": 1}.get(kind, 1)
        fields = {f.name for f in dataclasses.fields(ModalitySpec)} - {"name", "kind", "shape"}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ValueError(
                f"unknown modality override {bad} for {name!r}; valid keys: {sorted(fields | {'kind'})}"
            )
        spec = ModalitySpec(
            name, kind, tuple(space.shape), **{"stride": stride, "layout": layout, **overrides}
        )
        _validate_spec(spec)
        specs.append(spec)
    return specs


def _validate_spec(spec: ModalitySpec) -> None:
    if spec.kind in STEM_KINDS and (len(spec.shape) != 3 or spec.shape[0] % spec.channels_per_frame):
        raise ValueError(f"image modality {spec.name!r} needs (frames*3, H, W), got shape {spec.shape}")
    if spec.kind == "image":
        if len(spec.shape) != 3 or spec.shape[0] % spec.channels_per_frame:
            raise ValueError(f"image modality {spec.name!r} needs (frames*3, H, W), got shape {spec.shape}")
        for side in spec.shape[1:]:
            if side % spec.stride:
                divisors = [d for d in range(2, side + 1) if side % d == 0]
                raise ValueError(
                    f"patch_size {spec.stride} does not divide image size {side} of {spec.name!r}; "
                    f"valid choices: {divisors}"
                )


class ModalityAdapter(nn.Module):
    """Base: content projection + projected Fourier position features (a non-persistent buffer)."""

    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__()
        self.spec = spec
        self.content = nn.Linear(spec.token_dim, config.latent_dim)
        self.use_position = config.use_position_features
        if self.use_position:
            features = grid_fourier_features(spec.fourier_resolutions, config.fourier_bands)  # (N, P)
            # Built once per layout, moved with the module, never saved in checkpoints nor rebuilt in forward.
            self.register_buffer("position_features", features, persistent=False)
            self.position = nn.Linear(features.shape[1], config.latent_dim, bias=False)
            # The projected position features at initialisation, saved with the weights: the reference of the
            # Fourier-drift metric (it survives --resume; a modality enabled late has its own from the start).
            self.register_buffer("position_baseline", torch.zeros(features.shape[0], config.latent_dim))

    def reset_position_baseline(self) -> None:
        """Take the current projected position features as the drift reference (done after weight init)."""
        if self.use_position:
            with torch.no_grad():
                self.position_baseline.copy_(self.position(self.position_features))

    def position_drift(self) -> float:
        """||P - P_0|| / ||P_0|| of the projected position features (N, D): how far training has moved them."""
        with torch.no_grad():
            current = self.position(self.position_features)
            return float(
                (current - self.position_baseline).norm() / self.position_baseline.norm().clamp_min(1e-12)
            )

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints saved before the baseline existed: the loaded projection becomes the reference.
        key, weight = prefix + "position_baseline", prefix + "position.weight"
        if self.use_position and key not in state_dict and weight in state_dict:
            with torch.no_grad():
                state_dict[key] = self.position_features @ state_dict[weight].t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, content: torch.Tensor) -> torch.Tensor:
        return self.content(content)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Content tokens (B, N, D), before position features."""
        return self.project(self.tokens_content(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x)  # (B, N, D)
        if self.use_position:
            tokens = tokens + self.position(self.position_features)  # (N, D) broadcast over the batch
        return tokens


CENTERING_MOMENTUM = 0.01
"""The weight of each training batch in the running mean frame of `image_centering='running'` (after the first
1 / momentum batches, which are averaged evenly): its time constant is about 100 encoder passes."""


class CentredImage(ModalityAdapter):
    """An image adapter that can subtract a running mean frame (`PerceiverConfig.image_centering='running'`).

    A fixed camera sees the same background at every place in every frame, so what differs from place to place
    (the background) outweighs what differs from one observation to the next (a ball, a pole): measured on
    ball_in_cup-catch, the pixel tokens of a trained Perceiver varied across observations by 1-6 % of their spread
    across places (`evaluate --modality-path`'s token signal), and attention, which compares tokens by content,
    saw mostly the background. A CNN's dense layer can subtract a per-place constant; the tokens' per-place
    Fourier features cannot. Centring subtracts the mean frame of the training observations (one (C, H, W) mean,
    the same for every frame of the stack, so each frame's tokens still depend on that frame alone), as AlexNet
    subtracted the mean image of its training set: the background cancels and what moves remains. The mean is
    updated by every training-mode pass (`CENTERING_MOMENTUM`), frozen when acting and evaluating, and saved with
    the weights (`mean_frame`, `mean_count`)."""

    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__(spec, config)
        self.centered = config.image_centering == "running"
        if self.centered:
            channels, height, width = self.spec.channels_per_frame, *self.spec.shape[-2:]
            self.register_buffer("mean_frame", torch.zeros(channels, height, width))
            self.register_buffer("mean_count", torch.zeros((), dtype=torch.long))

    def _with_mean(self, pixels: torch.Tensor, use):
        """`use(mean_frame)` for the pass over `pixels` (B, F*C, H, W): in training mode the batch then moves the
        mean for the next pass (the very first pass sets it first), so a pass subtracts the mean its policy acted
        with."""
        first = self.training and int(self.mean_count) == 0
        if first:
            self._update_mean(pixels)
        result = use(self.mean_frame)
        if self.training and not first:
            self._update_mean(pixels)
        return result

    def centred(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, F*C, H, W) raw pixels -> float32 pixels - the mean frame + 127.5: an input whose scaled form
        x / 255 - 0.5 is (pixels - mean) / 255, so the folded scaling of the tokenizers applies unchanged (patch
        tokens; the conv stems fold the mean into their first layer instead, `centring_offset`). Without
        centring: `pixels` as they are."""
        if not self.centered:
            return pixels
        frames = pixels.shape[1] // self.spec.channels_per_frame
        # no reshape of the batch axis: an exported graph keeps a dynamic batch
        return self._with_mean(pixels, lambda mean: pixels.float() - (mean - 127.5).repeat(frames, 1, 1))

    def centring_offset(self, conv: nn.Conv2d, stem_input: torch.Tensor) -> torch.Tensor | None:
        """The centring folded into a stem's first layer: `conv`'s zero-padded response, without bias, to the mean
        frame / 255 over each frame that `stem_input` (the stem's raw (B', F'*C, H, W) input) stacks, (C_out, H',
        W'), to subtract from its output over the raw pixels at shift 0. conv(x / 255) - conv(mean / 255) is
        conv((x - mean) / 255) exactly (both zero-padded), without the two passes over the batch that subtracting
        the mean from every pixel costs (a float copy, then a channels-last one). In training mode `stem_input`
        then moves the mean (its samples and frames). None without centring. Without gradients the offset is
        kept until the weights or the mean change."""
        if not self.centered:
            return None
        frames = stem_input.shape[1] // self.spec.channels_per_frame
        dtype = stem_input.dtype

        def offset(mean: torch.Tensor) -> torch.Tensor:
            key = (frames, dtype)

            def response() -> torch.Tensor:
                shift = (mean * (1.0 / 255.0)).repeat(frames, 1, 1)[None].to(dtype)
                return F.conv2d(shift, conv.weight, None, conv.stride, conv.padding, conv.dilation)[0]

            return kept_without_grad(self, "_centring_offset", key, (conv.weight, mean), response)

        return self._with_mean(stem_input, offset)

    @torch.no_grad()
    def _update_mean(self, pixels: torch.Tensor) -> None:
        """Moves the mean frame towards the mean of `pixels` (B, F*C, H, W) over samples and frames."""
        batch, channels = pixels.shape[0], self.spec.channels_per_frame
        total = batch_sum(pixels, torch.float32).unflatten(0, (-1, channels)).sum(dim=0)  # (C, H, W)
        self.mean_count += 1
        rate = max(1.0 / float(self.mean_count), CENTERING_MOMENTUM)
        self.mean_frame.lerp_(total / (batch * (pixels.shape[1] // channels)), rate)


class ImageAdapter(CentredImage):
    """Pixels are scaled here and nowhere else: tokens see x / 255 - 0.5, folded into the patch projection.

    A linear map of non-overlapping p x p patches is a stride-p convolution, so the forward pass casts the
    image once (contiguous, vectorised) and convolves: no copy of 432-wide patch vectors. The scaling is folded
    into the weights, W(x / 255 - 0.5) + b = (W / 255) x + (b - W.sum(1) / 2). Profiled at batch 256, the
    naive cast-scale-permute path spent 75% of the forward time moving pixels."""

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        """The explicit patches (B, F*Hp*Wp, C*p*p), raw 0..255; `forward` computes the same thing faster."""
        p, c = self.spec.stride, self.spec.channels_per_frame
        batch, _, height, width = x.shape
        x = self.centred(x)
        x = x.reshape(batch, -1, c, height // p, p, width // p, p).permute(0, 1, 3, 5, 2, 4, 6)
        return x.reshape(batch, -1, c * p * p).float()

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        weight, bias = self.content.weight, self.content.bias
        return weight * (1.0 / 255.0), bias - 0.5 * weight.sum(dim=1)

    def project(self, content: torch.Tensor) -> torch.Tensor:
        return F.linear(content, *self._folded())

    def embed(self, x: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """(B, F*C, H, W) uint8 -> (B, F*Hp*Wp, D), tokens ordered (frame, patch row, patch col); each frame's
        tokens depend on that frame only (bit for bit: streaming inference relies on it). `folded`: the
        `_folded()` weights, when the caller caches them."""
        p, c = self.spec.stride, self.spec.channels_per_frame
        batch, channels, height, width = x.shape
        x = self.centred(x)
        frames = x.reshape(batch * (channels // c), c, height, width).float()
        weight, bias = folded or self._folded()
        out = F.conv2d(frames, weight.view(-1, c, p, p), bias, stride=p)  # (B*F, D, Hp, Wp)
        return out.flatten(2).transpose(1, 2).reshape(batch, -1, out.shape[1])


class ConvImageAdapter(CentredImage):
    """A conv stem over the stacked frames (B, F*3, H, W) uint8 -> tokens (B, H'*W', D), one per feature-map cell.

    The first layer reads every frame of the stack (as DrQ's encoder does), so frame differences (motion) are in
    each token; 3x3 convolutions are shift-equivariant, so DrQ's shifts move the features with the image instead
    of re-cutting patch borders. The stem reads x / 255 - 0.5, zero-padded, with the scaling folded into its first
    layer (`scaled_conv2d`); channels-last on the CPU."""

    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__(spec, config)
        layers: list[nn.Module] = []
        channels = spec.stem_in_channels
        for kernel, stride in spec.conv_layers:
            conv = nn.Conv2d(channels, spec.conv_channels, kernel, stride=stride, padding=(kernel - 1) // 2)
            layers += [conv, nn.ReLU(inplace=True)]  # in place: the conv's fresh output, not an input
            channels = spec.conv_channels
        self.stem = nn.Sequential(*layers)
        # DrQ's init (orthogonal, ReLU gain, zero bias), before channels-last. PyTorch's default conv init shrinks
        # the activations at every layer: at 84 px the token contents came out 25x smaller than the position
        # features, so every token looked alike and a Perceiver on conv tokens could not learn the state
        # (experiments/benchmarks/estimator.py, docs/results.md).
        for layer in self.stem:
            if isinstance(layer, nn.Conv2d):
                nn.init.orthogonal_(layer.weight, nn.init.calculate_gain("relu"))
                nn.init.zeros_(layer.bias)
        self.stem.to(memory_format=torch.channels_last)

    def stem_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The stem over raw frames (B', F'*3, H, W) uint8 -> (B', C, H', W') channels-last: pixels / 255 - 0.5, or
        with centring (pixels - the mean frame) / 255, the mean folded into the first layer (`centring_offset`)."""
        # raw 0..255: the first layer scales
        pixels = channels_last_pixels(pixels, dtype=autocast_dtype(pixels.device))
        offset = self.centring_offset(self.stem[0], pixels)
        return scaled_stem(self.stem, pixels, shift=0.5 if offset is None else 0.0, offset=offset)

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        features = self.stem_features(x)  # (B, conv_channels, H', W'), channels-last
        return features.flatten(2).transpose(
            1, 2
        )  # (B, H'*W', conv_channels): a view of channels-last memory


class KeypointImageAdapter(ConvImageAdapter):
    """The conv stem of `ConvImageAdapter` (over the stacked frames, or each frame), a 1 x 1 conv to K maps, and a
    spatial softmax per map (Finn et al. 2016; robomimic's `SpatialSoftmax`): (B, F*3, H, W) uint8 -> (B, K, 2)
    keypoints, the expected (x, y) in [-1, 1] of each map's softmax over the feature-map cells, at a learned
    temperature.

    A conv-token Perceiver must find a small object by attention and read its place from the position features
    mixed into the attended values; a keypoint token's content is the place itself, so a latent that reads it
    reads where the thing is, at sub-cell precision, whatever the other tokens hold. Over the stacked frames a
    keypoint may follow one frame's object; with `keypoints_per_frame` the stem reads each frame alone, each frame
    has its own keypoints (B, F*K, 2), and motion is the change of a keypoint between frames."""

    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__(spec, config)
        self.keypoint_maps = nn.Conv2d(spec.conv_channels, spec.keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))  # temperature 1 at the start, as robomimic's
        height, width = spec.conv_grid
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("cell_xy", torch.stack([xs.flatten(), ys.flatten()], dim=1), persistent=False)

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        frames = (  # each frame alone through the stem: (B * F, C, H, W)
            x.reshape(-1, self.spec.channels_per_frame, *x.shape[-2:]) if self.spec.keypoints_per_frame else x
        )
        features = self.stem_features(frames)  # (B [* F], C, H', W')
        # (B [* F], K, H' * W'): the softmax in float32
        logits = self.keypoint_maps(features).flatten(2).float()
        attention = torch.softmax(logits / self.log_temperature.exp(), dim=-1)
        return (attention @ self.cell_xy).reshape(batch, -1, 2)  # (B, [F *] K, 2): each keypoint's (x, y)


class VectorAdapter(ModalityAdapter):
    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__(spec, config)
        dim, width = spec.shape[0], spec.token_dim
        groups = (
            [(a, b) for _, a, b in spec.layout]
            if spec.layout
            else [(a, min(a + width, dim)) for a in range(0, dim, width)]
        )
        # Gather indices into the vector padded with one zero at index `dim`: (N, width)
        index = torch.full((len(groups), width), dim, dtype=torch.long)
        for token, (start, stop) in enumerate(groups):
            index[token, : stop - start] = torch.arange(start, stop)
        self.register_buffer("gather_index", index, persistent=False)

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1)], dim=1)  # (B, D + 1)
        return padded[:, self.gather_index]  # (B, N, width)


class TaskAdapter(ModalityAdapter):
    """The task index (B, 1) -> one token (B, 1, D): the domain embedding (a linear map of the one-hot index,
    i.e. one learned row per task)."""

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        # an index outside the trained tasks is refused by the policy's observation check (its Box bounds)
        return F.one_hot(x.reshape(x.shape[0], 1).long(), self.spec.num_classes).float()  # (B, 1, n_tasks)


class SequenceAdapter(ModalityAdapter):
    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()  # (B, T, C): one token per step


ADAPTERS: dict[str, type[ModalityAdapter]] = {
    "image": ImageAdapter,
    "vector": VectorAdapter,
    "sequence": SequenceAdapter,
    "conv_image": ConvImageAdapter,
    "keypoint_image": KeypointImageAdapter,
    "task": TaskAdapter,
}


def register_adapter(kind: str, adapter: type[ModalityAdapter]) -> None:
    """Add a tokeniser for a new kind of sensor; select it with modality_overrides={key: {'kind': kind}}."""
    if not (isinstance(adapter, type) and issubclass(adapter, ModalityAdapter)):
        raise ValueError(f"adapter for {kind!r} must subclass ModalityAdapter, got {adapter!r}")
    ADAPTERS[kind] = adapter


def position_feature_dim(spec: ModalitySpec, config: PerceiverConfig) -> int:
    return fourier_dim(len(spec.fourier_resolutions), config.fourier_bands)
