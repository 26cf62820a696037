"""Which pixel encoder learns the state fastest? Supervised state regression from pixels, every encoder side by side.

A pixel SAC critic can only value states it can tell apart, and it learns to tell them apart from a TD signal
that is noisy and moving. This benchmark takes the RL out: each encoder, with the readout a DrQ-recipe critic
uses (`make_readout`: Linear -> 50 + LayerNorm + tanh) and DrQ's 2 x 1024 head, regresses the simulator's full
state (standardised) from 84 px x 3 frame stacks, with DrQ's +-4 px shifts, Adam at DrQ's lr 1e-3 (unless a variant sets
another), batch 128.
Scored on held-out episodes: R^2 per state dimension, averaged over the position dimensions and over the
velocity dimensions, after a quarter, half and all of the steps. An encoder that cannot learn the state here
in a few hundred steps gives its critic features that do not vary across states (docs/results.md, "Why the
Perceiver does not learn under DrQ's recipe").

Two tables. First the simplest question a pixel encoder must answer: where is a bright 12-px square on a dark
84 px stack (its column, regressed; a noise column beside it must stay unlearned), batch 32, no shifts, three
seeds. Then cartpole-swingup: random actions held for 1-8 steps (so the cart crosses the track and the pole
swings), DrQ's action repeat 8.

`python -m experiments.benchmark estimator [--quick] [--variants NAME ...]`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from agents.augment import random_shift
from agents.drq_policy import FEATURE_DIM, HIDDEN_DEPTH, HIDDEN_DIM, centering_mode, mlp
from agents.encoders import build_encoder, orthogonal_init
from agents.warmup import warmup_factor
from experiments.benchmarks.common import table
from experiments.benchmarks.features import LEAN  # the lean Perceiver of the pixel studies
from perceiver_policy.config import PerceiverConfig
from perceiver_policy.modalities import ModalityAdapter, ModalitySpec, register_adapter


@dataclass(frozen=True)
class Variant:
    """One encoder as a DrQ-recipe critic would build it: `build_encoder(encoder, ...)` + `make_readout`."""

    encoder: str
    perceiver: dict = field(default_factory=dict)
    readout: str | None = None  # None: the encoder's default ('query' for the Perceiver, 'flat' for CNNs)
    center: bool | str = False  # agents.drq_policy.CENTERINGS: False / 'none', True / 'running', 'reference'
    center_momentum: float | None = None  # None: agents.encoders.CENTER_MOMENTUM
    lr: float = 1e-3  # DrQ's
    warmup: int = 0  # steps of linear learning-rate warmup (0: none, as DrQ)
    # the encoder's learning rate / the rest's (the RL runs' `encoder_lr_scale`)
    encoder_lr_scale: float = 1.0


CONV = {**LEAN, "pixel_tokenizer": "conv"}
"""The lean Perceiver on conv tokens (3x3 stride-2 layers, 32 channels)."""
KEYPOINTS = {**LEAN, "pixel_tokenizer": "keypoints"}
"""The lean Perceiver on keypoint tokens (the conv stem, 32 spatial-softmax keypoints)."""
NATURE_STEM = {
    **CONV,
    "conv_kernels": [8, 4, 3],
    "conv_strides": [4, 2, 1],
    "conv_channels": 64,
}
"""NatureCNN's convolutions (8x8/4, 4x4/2, 3x3/1, here 64 channels each) as the Perceiver's tokenizer."""


class CNNTokens(ModalityAdapter):
    """A diagnostic tokenizer, not a library one: NatureCNN's convolutions (DrQ's orthogonal init), then a flat
    Linear + ReLU over the whole feature map as NatureCNN reads out, reshaped into tokens. Its tokens carry what a
    CNN's features carry: if a Perceiver on them still learns the state more slowly than the CNN, the latent path
    (cross-attention, self-attention, readout) loses it, not the tokenizer. A kind ModalitySpec does not know
    gets (shape[0],) token positions of shape[1] features: 9 tokens of 84 for 84 px x 3 frames."""

    def __init__(self, spec: ModalitySpec, config: PerceiverConfig):
        super().__init__(spec, config)
        self.stem = nn.Sequential(
            nn.Conv2d(spec.shape[0], 32, 8, stride=4),
            nn.ReLU(),
            nn.Conv2d(32, 64, 4, stride=2),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, stride=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        orthogonal_init(self.stem)
        with torch.no_grad():
            cells = self.stem(torch.zeros(1, *spec.shape)).shape[1]
        self.flat = nn.Linear(cells, spec.num_tokens * spec.token_dim)

    def tokens_content(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.flat(self.stem(x.float() * (1.0 / 255.0) - 0.5)))
        return features.view(x.shape[0], self.spec.num_tokens, self.spec.token_dim)


register_adapter("estimator_cnn_tokens", CNNTokens)
CNN_TOKENS = {**LEAN, "modality_overrides": {"pixels": {"kind": "estimator_cnn_tokens"}}}
"""The lean Perceiver reading `CNNTokens`."""

VARIANTS: dict[str, Variant] = {
    "cnn": Variant("cnn"),
    "drq-cnn": Variant("drq-cnn"),
    "perceiver-patch": Variant("perceiver", LEAN),
    "perceiver-patch-centred": Variant("perceiver", LEAN, center=True),
    "perceiver-conv": Variant("perceiver", CONV),
    "perceiver-conv-centred": Variant("perceiver", CONV, center=True),
    "perceiver-patch-centred-m0.1": Variant("perceiver", LEAN, center=True, center_momentum=0.1),
    "perceiver-conv-centred-m0.1": Variant("perceiver", CONV, center=True, center_momentum=0.1),
    "perceiver-patch-reference": Variant("perceiver", LEAN, center="reference"),
    "perceiver-conv-reference": Variant("perceiver", CONV, center="reference"),
    "perceiver-conv-reference-flat": Variant("perceiver", CONV, readout="flat", center="reference"),
    "perceiver-conv64-reference": Variant("perceiver", {**CONV, "conv_channels": 64}, center="reference"),
    "perceiver-conv221-reference": Variant(
        "perceiver", {**CONV, "conv_strides": [2, 2, 1]}, center="reference"
    ),
    "perceiver-conv-reference-64latents": Variant(
        "perceiver", {**CONV, "num_latents": 64}, center="reference"
    ),
    "perceiver-conv-reference-2layers": Variant(
        "perceiver", {**CONV, "self_attn_layers": 2}, center="reference"
    ),
    "perceiver-patch-reference-lr3e-4": Variant("perceiver", LEAN, center="reference", lr=3e-4),
    "perceiver-patch-reference-heads4": Variant(
        "perceiver", {**LEAN, "cross_attn_heads": 4}, center="reference"
    ),
    "perceiver-patch-reference-dim128": Variant("perceiver", {**LEAN, "latent_dim": 128}, center="reference"),
    "perceiver-patch6-reference": Variant("perceiver", {**LEAN, "patch_size": 6}, center="reference"),
    "perceiver-patch-reference-bands16": Variant(
        "perceiver", {**LEAN, "fourier_bands": 16}, center="reference"
    ),
    "perceiver-conv-reference-heads4": Variant(
        "perceiver", {**CONV, "cross_attn_heads": 4}, center="reference"
    ),
    "perceiver-cnn-tokens-reference": Variant("perceiver", CNN_TOKENS, center="reference"),
    "perceiver-cnn-tokens-reference-flat": Variant(
        "perceiver", CNN_TOKENS, readout="flat", center="reference"
    ),
    # agents.warmup: the Perceiver's tokens grow an input-independent part in Adam's first steps at full rate
    "perceiver-patch-warmup": Variant("perceiver", LEAN, warmup=100),
    "perceiver-conv-warmup": Variant("perceiver", CONV, warmup=100),
    "perceiver-patch-reference-warmup": Variant("perceiver", LEAN, center="reference", warmup=100),
    "perceiver-conv-reference-warmup": Variant("perceiver", CONV, center="reference", warmup=100),
    "cnn-warmup": Variant("cnn", warmup=100),
    # latents with a place on the image (PerceiverConfig.image_locality): a coarse feature map in the latent array
    "perceiver-conv-local": Variant("perceiver", {**CONV, "image_locality": 1.0}),
    "perceiver-conv-local0.5": Variant("perceiver", {**CONV, "image_locality": 0.5}),
    "perceiver-conv-local-warmup": Variant("perceiver", {**CONV, "image_locality": 1.0}, warmup=100),
    "perceiver-conv-local-reference": Variant(
        "perceiver", {**CONV, "image_locality": 1.0}, center="reference"
    ),
    "perceiver-patch-local": Variant("perceiver", {**LEAN, "image_locality": 1.0}),
    # the frames minus a running mean frame (PerceiverConfig.image_centering): the fixed background cancels
    "perceiver-conv-meanframe": Variant("perceiver", {**CONV, "image_centering": "running"}),
    "perceiver-conv-meanframe-warmup": Variant(
        "perceiver", {**CONV, "image_centering": "running"}, warmup=100
    ),
    "perceiver-conv-local-meanframe-warmup": Variant(
        "perceiver", {**CONV, "image_locality": 1.0, "image_centering": "running"}, warmup=100
    ),
    "perceiver-patch-meanframe": Variant("perceiver", {**LEAN, "image_centering": "running"}),
    # the encoder at 0.3x the learning rate, as the best cartpole Perceiver trains (`--policy encoder_lr_scale=0.3`)
    "perceiver-conv-local-meanframe-warmup-enc-lr0.3": Variant(
        "perceiver",
        {**CONV, "image_locality": 1.0, "image_centering": "running"},
        warmup=100,
        encoder_lr_scale=0.3,
    ),
    "cnn-enc-lr0.3": Variant("cnn", encoder_lr_scale=0.3),
    # keypoint tokens (PerceiverConfig.pixel_tokenizer='keypoints'): each token's content is a place in the image
    "perceiver-keypoints": Variant("perceiver", KEYPOINTS),
    "perceiver-keypoints-warmup": Variant("perceiver", KEYPOINTS, warmup=100),
    "perceiver-keypoints-meanframe-warmup": Variant(
        "perceiver", {**KEYPOINTS, "image_centering": "running"}, warmup=100
    ),
    "perceiver-keypoints-per-frame-warmup": Variant(
        "perceiver", {**KEYPOINTS, "keypoints_per_frame": True}, warmup=100
    ),
    "perceiver-keypoints-per-frame-meanframe-warmup": Variant(
        "perceiver", {**KEYPOINTS, "keypoints_per_frame": True, "image_centering": "running"}, warmup=100
    ),
    "perceiver-nature-reference": Variant("perceiver", NATURE_STEM, center="reference"),
    "perceiver-nature-reference-flat": Variant("perceiver", NATURE_STEM, readout="flat", center="reference"),
}
STEMS = (
    "cnn",
    "perceiver-conv-reference",
    "perceiver-conv-reference-flat",
    "perceiver-conv64-reference",
    "perceiver-conv221-reference",
    "perceiver-conv-reference-64latents",
    "perceiver-conv-reference-2layers",
    "perceiver-nature-reference",
    "perceiver-nature-reference-flat",
)
"""The conv-token Perceivers against NatureCNN: which stem and readout learn the velocity (`--variants`)."""
KNOBS = (
    "cnn",
    "perceiver-patch-reference",
    "perceiver-patch-reference-lr3e-4",
    "perceiver-patch-reference-heads4",
    "perceiver-patch-reference-dim128",
    "perceiver-patch6-reference",
    "perceiver-patch-reference-bands16",
    "perceiver-conv-reference-heads4",
    "perceiver-cnn-tokens-reference",
    "perceiver-cnn-tokens-reference-flat",
)
"""One setting at a time of the reference-centred Perceiver, and CNN features as its tokens: is the velocity gap
the tokenizer's, the attention's, the width's or the learning rate's? (`--variants knobs`)"""
WARMUP = (
    "cnn",
    "cnn-warmup",
    "perceiver-patch",
    "perceiver-patch-warmup",
    "perceiver-conv-warmup",
    "perceiver-patch-reference",
    "perceiver-patch-reference-warmup",
    "perceiver-conv-reference-warmup",
)
"""A 100-step linear learning-rate warmup (`agents.warmup`), with and without the reference (`--variants warmup`)."""
LOCALITY = (
    "cnn",
    "perceiver-conv",
    "perceiver-conv-local",
    "perceiver-conv-local0.5",
    "perceiver-conv-warmup",
    "perceiver-conv-local-warmup",
    "perceiver-conv-reference",
    "perceiver-conv-local-reference",
    "perceiver-patch",
    "perceiver-patch-local",
)
"""Latents with a place on the image against latents that read all of it, from the start (`--variants locality`)."""
BACKGROUND = (
    "cnn",
    "perceiver-conv",
    "perceiver-conv-meanframe",
    "perceiver-conv-warmup",
    "perceiver-conv-meanframe-warmup",
    "perceiver-conv-local-warmup",
    "perceiver-conv-local-meanframe-warmup",
    "perceiver-patch",
    "perceiver-patch-meanframe",
    "perceiver-conv-local-meanframe-warmup-enc-lr0.3",
    "cnn-enc-lr0.3",
)
"""Frames minus a running mean frame against the frames as they are (`--variants background`), and the best with
its encoder at 0.3x the learning rate, as the RL runs train it."""
KEYPOINT_GROUP = (
    "cnn",
    "perceiver-conv-warmup",
    "perceiver-conv-local-meanframe-warmup",
    "perceiver-keypoints",
    "perceiver-keypoints-warmup",
    "perceiver-keypoints-meanframe-warmup",
    "perceiver-keypoints-per-frame-warmup",
    "perceiver-keypoints-per-frame-meanframe-warmup",
)
"""Keypoint tokens against conv tokens and NatureCNN (`--variants keypoints`)."""
GROUPS = {
    "stems": STEMS,
    "knobs": KNOBS,
    "warmup": WARMUP,
    "locality": LOCALITY,
    "background": BACKGROUND,
    "keypoints": KEYPOINT_GROUP,
}
DEFAULT = tuple(
    name
    for name in VARIANTS
    if name != "drq-cnn"
    and name not in STEMS[2:] + KNOBS[2:]
    and "-local" not in name
    and "-meanframe" not in name
    and "-keypoint" not in name
    and not name.endswith("-warmup")
    and "-enc-lr" not in name
)  # DrQ's encoder: ~5x NatureCNN's time per step; the others: `--variants stems|knobs|warmup|locality|background|keypoints`
QUICK = ("cnn", "perceiver-patch", "perceiver-patch-centred", "perceiver-patch-reference")


@dataclass
class StateData:
    """Pixel stacks (N, F*3, H, W) uint8 and states (N, S) float32, with the state's sensor layout."""

    pixels: torch.Tensor
    states: torch.Tensor
    layout: dict
    """{sensor: (start, stop)} of the state vector, or {part: indices} for a part of a sensor."""


def collect(
    count: int, seed: int, task: str = "cartpole-swingup", action_repeat: int | None = None
) -> StateData:
    """`count` observations of `task` (84 px x 3 frames, privileged state) under random actions, each held for
    1-8 agent steps, at DrQ's action repeat for the domain unless given. The privileged state is the task's full
    observation vector (positions and velocities); where `--proprio robot` keeps a sensor only in part, its two
    parts are scored too (ball_in_cup: 'position_unsensed' is the ball's, which only the camera shows)."""
    import envs
    from agents import DRQ_ACTION_REPEAT
    from envs import proprio_modes
    from envs.dmc import parse_task

    domain, name = parse_task(task)
    repeat = action_repeat or DRQ_ACTION_REPEAT.get(domain, 8)
    venv = envs.make_vec_env(task, n_envs=1, seed=seed, modalities=("pixels",), action_repeat=repeat,
                             privileged_state=True)  # fmt: skip
    layout: dict = dict(venv.observation_space[envs.STATE_KEY].layout)
    if "robot" in proprio_modes.valid_modes(domain):
        sizes = {name: stop - start for name, (start, stop) in layout.items()}
        sensed, _ = proprio_modes.select(domain, name, "robot", sizes)
        layout.update(proprio_modes.sensed_parts(layout, sensed))
    rng = np.random.default_rng(seed)
    shape = venv.action_space.shape
    obs, pixels, states, action, hold = venv.reset(), [], [], None, 0
    for _ in range(count):
        pixels.append(obs["pixels"][0])
        states.append(obs[envs.STATE_KEY][0])
        if hold == 0:
            action, hold = rng.uniform(-1, 1, (1, *shape)).astype(np.float32), int(rng.integers(1, 9))
        hold -= 1
        obs, *_ = venv.step(action)
    venv.close()
    return StateData(torch.as_tensor(np.stack(pixels)), torch.as_tensor(np.stack(states)), layout)


def square(count: int, seed: int) -> StateData:
    """A bright 12 x 12 px square at a random column of a dark 3-frame, 84 px stack; the state is its column
    and a column of noise (which no encoder can learn: a held-out check that R^2 is not fit to the training set)."""
    generator = torch.Generator().manual_seed(seed)
    column = torch.randint(0, 72, (count,), generator=generator)
    pixels = torch.zeros(count, 9, 84, 84, dtype=torch.uint8)
    for i, c in enumerate(column.tolist()):
        pixels[i, :, 36:48, c : c + 12] = 255
    states = torch.stack([column.float(), torch.randn(count, generator=generator)], 1)
    return StateData(pixels, states, {"position": (0, 1), "noise": (1, 2)})


def r2_by_dim(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Coefficient of determination of each column: 1 - SSE / SST (1: exact, 0: the column's mean, < 0: worse)."""
    sse = (prediction - target).pow(2).sum(0)
    sst = (target - target.mean(0)).pow(2).sum(0).clamp_min(1e-12)
    return 1 - sse / sst


class StateRegressor(nn.Module):
    """encoder -> readout (a DrQ-recipe critic's features, 50-d) -> DrQ's 2 x 1024 MLP -> the state."""

    def __init__(self, variant: Variant, observation_space, state_dim: int):
        super().__init__()
        centering = centering_mode(variant.center)
        self.encoder = build_encoder(
            variant.encoder, observation_space, PerceiverConfig(**variant.perceiver), centering == "reference"
        )
        kind = variant.readout or ("query" if variant.encoder == "perceiver" else "flat")
        self.readout = self.encoder.make_readout(
            FEATURE_DIM, kind, centering == "running", variant.center_momentum
        )
        self.head = mlp(FEATURE_DIM, HIDDEN_DIM, state_dim, HIDDEN_DEPTH)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.readout(self.encoder({"pixels": pixels})))


def fit(
    variant: Variant,
    train: StateData,
    test: StateData,
    steps: int,
    evaluate_at: tuple[int, ...],
    batch_size: int = 128,
    lr: float | None = None,
    shift_pad: int = 4,
    seed: int = 0,
) -> dict:
    """Train one variant; {'r2': {step: (R^2 per state dim)}, 'ms_per_step': float, 'params': int}."""
    from gymnasium import spaces

    torch.manual_seed(seed)
    space = spaces.Dict({"pixels": spaces.Box(0, 255, tuple(train.pixels.shape[1:]), np.uint8)})
    model = StateRegressor(variant, space, train.states.shape[1])
    mean, std = train.states.mean(0), train.states.std(0).clamp_min(1e-6)
    rate = variant.lr if lr is None else lr
    encoder = {id(p) for p in model.encoder.parameters()}
    groups = [
        {
            "params": [p for p in model.parameters() if id(p) in encoder],
            "lr": rate * variant.encoder_lr_scale,
        },
        {"params": [p for p in model.parameters() if id(p) not in encoder], "lr": rate},
    ]
    optimizer = torch.optim.Adam(groups)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: warmup_factor(done, variant.warmup))
    generator = torch.Generator().manual_seed(seed)
    scores, elapsed = {}, 0.0
    for step in range(1, steps + 1):
        model.train()
        index = torch.randint(0, len(train.pixels), (batch_size,), generator=generator)
        start = time.perf_counter()
        prediction = model(random_shift(train.pixels[index], shift_pad))
        loss = (prediction - (train.states[index] - mean) / std).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        elapsed += time.perf_counter() - start
        if step in evaluate_at:
            model.eval()
            with torch.no_grad():
                predicted = torch.cat([model(chunk) for chunk in test.pixels.split(256)])
            scores[step] = r2_by_dim(predicted, (test.states - mean) / std)
    params = sum(p.numel() for p in model.parameters())
    return {"r2": scores, "ms_per_step": 1000 * elapsed / steps, "params": params}


def group_means(r2: torch.Tensor, layout: dict) -> dict[str, float]:
    """Mean R^2 over each sensor of the state layout (cartpole: position, velocity), a (start, stop) range or the
    indices of a part."""
    return {
        name: float(r2[slice(*where) if isinstance(where, tuple) else torch.as_tensor(where)].mean())
        for name, where in layout.items()
    }


def variant_names(
    quick: bool = False,
    variants: list[str] | None = None,
    steps: int | None = None,
    task: str = "cartpole-swingup",
) -> list[str]:
    """The variants `bench_estimator` fits, in order (groups expanded), after checking every argument: a bad
    variant, step count or task is refused before any data is collected."""
    from envs.dmc import parse_task

    names = [n for v in (variants or (QUICK if quick else DEFAULT)) for n in GROUPS.get(v, (v,))]
    if steps is not None and steps < 1:
        raise ValueError(f"estimator steps must be a positive integer, got {steps!r}")
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown estimator variants {unknown}; valid choices: {[*VARIANTS, *GROUPS]}")
    parse_task(task)
    return names


def bench_estimator(
    quick: bool = False,
    variants: list[str] | None = None,
    steps: int | None = None,
    observations: tuple[int, int] | None = None,
    task: str = "cartpole-swingup",
) -> None:
    """The table for `variants` (names of `VARIANTS`, or a group of `GROUPS`: 'stems', 'knobs', 'warmup'); `steps` and
    `observations` (train, held-out) override the sizes (full: 800 steps on 6000 / 1000 observations; quick: 400 on
    2000 / 500). Default variants: all but 'drq-cnn', the stem and knob variants and the '-warmup' ones (quick:
    four). `task`: the DMC task whose images and states are regressed."""
    names = variant_names(quick, variants, steps, task)
    square_table(names, seeds=(1,) if quick else (1, 2, 3), steps=min(steps or 100, 100))
    steps = steps or (400 if quick else 800)
    evaluate_at = tuple(sorted({max(1, steps // 4), max(1, steps // 2), steps}))
    n_train, n_test = observations or ((2000, 500) if quick else (6000, 1000))
    train = collect(n_train, seed=0, task=task)
    test = collect(n_test, seed=1, task=task)
    rows = []
    for name in names:
        result = fit(VARIANTS[name], train, test, steps, evaluate_at)
        groups = [group_means(result["r2"][s], train.layout) for s in evaluate_at]
        cells = [" / ".join(f"{g[k]:.2f}" for k in train.layout) for g in groups]
        rows.append([name, result["params"], *cells, result["ms_per_step"]])
    sensors = " / ".join(train.layout)
    table(
        f"State regression from pixels ({task}, {len(train.pixels)} train / {len(test.pixels)} held-out "
        f"observations, DrQ shifts, Adam 1e-3 unless the name says otherwise, batch 128): held-out R^2 ({sensors})",
        ["encoder", "parameters", *[f"R^2 at {s} steps" for s in evaluate_at], "ms / step"],
        rows,
    )


def square_table(names: list[str], seeds: tuple[int, ...], steps: int = 100) -> None:
    """R^2 of the square's column on held-out stacks after 10 / 25 / 50 / `steps` steps, each seed's value."""
    train, test = square(512, seed=0), square(256, seed=1)
    evaluate_at = tuple(sorted({min(s, steps) for s in (10, 25, 50)} | {steps}))
    rows = []
    for name in names:
        runs = [fit(VARIANTS[name], train, test, steps, evaluate_at, batch_size=32, shift_pad=0, seed=seed)
                for seed in seeds]  # fmt: skip
        cells = [" / ".join(f"{float(run['r2'][s][0]):.2f}" for run in runs) for s in evaluate_at]
        rows.append([name, *cells])
    table(
        f"Where is the square? Held-out R^2 of its column (512 train / 256 held-out stacks, batch 32), seeds "
        f"{' / '.join(map(str, seeds))}",
        ["encoder", *[f"{s} steps" for s in evaluate_at]],
        rows,
    )
