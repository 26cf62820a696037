"""SAC update cost on pixels: `python -m experiments.benchmark sac [--quick]` (also part of `train` and `all`).

One update = replay sample + DrQ shifts + critic, actor and temperature steps, at batch 128 on cartpole-swingup
pixels 84 px x 3 frames + proprio + action history. PerceiverSAC + FrameReplayBuffer against SB3's SAC with
`MultiInputPolicy` (NatureCNN) + DictReplayBuffer, and the replay/augmentation kernels against the
alternatives they replaced, all measured side by side in this process.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

import envs
from agents import make_agent
from agents.augment import shifted_windows
from agents.factory import computes_in_bf16
from experiments import config as cfg
from experiments import sweeping
from experiments.benchmarks.common import synchronize, table, timed
from perceiver_policy.model import cpu_has_native_bf16

BATCH = 128


def seconds_per_call(fn, repeats: int) -> float:
    return float(np.mean(timed(fn, repeats, warmup=1)))


def clamped_index_shift(pixels: torch.Tensor, offsets: torch.Tensor, pad: int) -> torch.Tensor:
    """The first `random_shift` (advanced indexing with clamped indices), kept here as the comparison."""
    batch, channels, height, width = pixels.shape
    rows = (torch.arange(height) + offsets[0, :, None] - pad).clamp_(0, height - 1)  # (B, H)
    cols = (torch.arange(width) + offsets[1, :, None] - pad).clamp_(0, width - 1)  # (B, W)
    index = torch.arange(batch)[:, None, None, None], torch.arange(channels)[None, :, None, None]
    return pixels[(*index, rows[:, None, :, None], cols[:, None, None, :])]


def sac_update_table(fill: int, updates: int, device: str = "cpu"):
    """Times `updates` SAC updates of ours and of SB3's, alternated, after `fill` random steps; prints the table.
    Returns (ours / SB3 updates-per-second, the two models, the env)."""
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, image_size=84, action_repeat=8)
    common = dict(device=device, seed=0, batch_size=BATCH, buffer_size=10_000, learning_starts=fill)
    if device == "cuda":  # fp32 on both sides, as the study runs on the GPU used
        common["perceiver"] = {"dtype": "float32"}
    models = {
        "PerceiverSAC + FrameReplayBuffer (DrQ shifts)": make_agent("sac", venv, **common),
        "SB3 SAC, MultiInputPolicy (NatureCNN) + DictReplayBuffer": make_agent(
            "sac", venv, policy_type="sb3", **common
        ),
    }
    for model in models.values():
        model.learn(fill)  # random actions until learning_starts: fills the buffer, no update yet
        model.train(gradient_steps=2, batch_size=BATCH)  # warm-up (CUDA: kernels, allocator, handles)
    times = {name: [] for name in models}
    for _ in range(updates):  # alternate the two, so that drifts in machine speed hit both
        for name, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=1, batch_size=BATCH)
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    baseline = float(np.median(times[list(models)[1]]))
    rows = [
        [name, float(np.median(t)), 1 / float(np.median(t)), baseline / float(np.median(t))]
        for name, t in times.items()
    ]
    where = torch.cuda.get_device_name(0) if device == "cuda" else device
    table(
        f"SAC update on {where}, batch {BATCH}, cartpole-swingup pixels 84 px x 3 + proprio + history, "
        f"median of {updates}",
        ["agent", "s / update", "updates / s", "speed vs SB3 SAC"],
        rows,
    )
    return rows[0][3], models, venv


def bench_sac(quick: bool) -> float:
    """Prints the tables; returns SAC updates/s ours / SB3's."""
    fill, updates = (300, 4) if quick else (600, 20)
    speedup, models, venv = sac_update_table(fill, updates)
    ours = models[list(models)[0]].replay_buffer
    theirs = models[list(models)[1]].replay_buffer
    repeats = 5 if quick else 20
    pixels = ours.sample(BATCH).observations["pixels"]  # (B, 9, 84, 84) uint8
    offsets = torch.randint(0, 9, (2, BATCH))
    slots = torch.as_tensor(np.random.randint(0, fill, (BATCH, ours.frame_stack)))
    envs_index = torch.zeros(BATCH, 1, dtype=torch.long)
    kernels = [
        ["replay sample, FrameReplayBuffer (frame rows by index_select)", seconds_per_call(lambda: ours.sample(BATCH), repeats)],
        ["replay sample, SB3 DictReplayBuffer", seconds_per_call(lambda: theirs.sample(BATCH), repeats)],
        ["frame gather: frames[slots, envs] (advanced indexing, the first version)", seconds_per_call(lambda: ours.frames[slots, envs_index], repeats)],
        ["DrQ shift: one index_select of padded rows", seconds_per_call(lambda: shifted_windows(pixels, offsets, 4), repeats)],
        ["DrQ shift: clamped-index gather (the first version)", seconds_per_call(lambda: clamped_index_shift(pixels, offsets, 4), repeats)],
    ]  # fmt: skip
    table(
        f"SAC data path on the CPU, batch {BATCH}", ["operation", "ms"], [[n, 1000 * s] for n, s in kernels]
    )
    venv.close()
    return speedup


LEAN = {"num_latents": 32, "latent_dim": 64, "self_attn_layers": 1, "patch_size": 12}
BF16_CONVS = {"conv_dtype": "bfloat16"}
ONLINE_TARGET = {"target_encoder": "online"}
STRIDE4_STEM = {
    "pixel_tokenizer": "conv",
    "conv_kernels": [5, 3, 3],
    "conv_strides": [4, 2, 1],
}  # 5x5/4, 3x3/2, 3x3/1: 121 tokens
DRQ_AGENTS = {  # name -> (policy_type, Perceiver options, policy options, agent options)
    "Perceiver, patch tokens": ("perceiver", LEAN, {}, {}),
    "Perceiver, patch tokens, bf16 autocast": ("perceiver", {**LEAN, "dtype": "bfloat16"}, {}, {}),
    "Perceiver, conv tokens": ("perceiver", {**LEAN, "pixel_tokenizer": "conv"}, {}, {}),
    "Perceiver, conv tokens, target_encoder=online": (
        "perceiver",
        {**LEAN, "pixel_tokenizer": "conv"},
        {},
        ONLINE_TARGET,
    ),
    "Perceiver, conv tokens, critic_head=queries": (
        "perceiver",
        {**LEAN, "pixel_tokenizer": "conv"},
        {"critic_head": "queries"},
        {},
    ),
    "Perceiver, conv tokens, target_encoder=online + critic_head=queries": (
        "perceiver",
        {**LEAN, "pixel_tokenizer": "conv"},
        {"critic_head": "queries"},
        ONLINE_TARGET,
    ),
    "Perceiver, conv tokens, target_encoder=online + critic_head=queries, bf16 autocast": (
        "perceiver",
        {**LEAN, "pixel_tokenizer": "conv", "dtype": "bfloat16"},
        {"critic_head": "queries"},
        ONLINE_TARGET,
    ),
    "Perceiver, conv tokens 5x5/4 + 3x3/2 + 3x3/1, target_encoder=online + critic_head=queries": (
        "perceiver",
        {**LEAN, **STRIDE4_STEM},
        {"critic_head": "queries"},
        ONLINE_TARGET,
    ),
    "NatureCNN (cnn)": ("cnn", {}, {}, {}),
    "NatureCNN (cnn), target_encoder=online": ("cnn", {}, {}, ONLINE_TARGET),
    "NatureCNN (cnn), bf16 convolutions": ("cnn", {}, BF16_CONVS, {}),
    "DrQ's encoder (drq-cnn)": ("drq-cnn", {}, {}, {}),
    "DrQ's encoder (drq-cnn), target_encoder=online": ("drq-cnn", {}, {}, ONLINE_TARGET),
    "DrQ's encoder (drq-cnn), bf16 convolutions": ("drq-cnn", {}, BF16_CONVS, {}),
}


def tokenizer_table() -> None:
    """Tokens, parameters and forward FLOPs of each pixel tokenizer (the encoder's image adapter) at 84 px x 3."""
    from gymnasium import spaces
    from torch.utils.flop_counter import FlopCounterMode

    from perceiver_policy.config import PerceiverConfig
    from perceiver_policy.model import PerceiverEncoder

    space = spaces.Dict({"pixels": spaces.Box(0, 255, (9, 84, 84), np.uint8)})
    rows = []
    for name, options in (
        ("patch (12 px, per frame)", {}),
        ("conv (3 x 3/2, 32 ch, stacked)", {"pixel_tokenizer": "conv"}),
        (
            "conv (5 x 5/4, 3 x 3/2, 3 x 3/1, 32 ch, stacked)",
            STRIDE4_STEM,
        ),
        ("keypoints (the conv stem, 32 keypoints, stacked)", {"pixel_tokenizer": "keypoints"}),
        (
            "keypoints (the conv stem, 32 keypoints per frame)",
            {"pixel_tokenizer": "keypoints", "keypoints_per_frame": True},
        ),
    ):
        encoder = PerceiverEncoder(space, PerceiverConfig(**{**LEAN, **options}))
        adapter = encoder.adapters["pixels"]
        pixels = torch.zeros(1, 9, 84, 84, dtype=torch.uint8)
        with torch.no_grad(), FlopCounterMode(display=False) as adapter_flops:
            adapter(pixels)
        with torch.no_grad(), FlopCounterMode(display=False) as encoder_flops:
            encoder({"pixels": pixels})
        params = sum(p.numel() for p in adapter.parameters())
        rows.append([name, encoder.num_tokens["pixels"], params, adapter_flops.get_total_flops() / 1e6,
                     encoder_flops.get_total_flops() / 1e6])  # fmt: skip
    table(
        "Pixel tokenizers of the lean Perceiver (32 latents x 64), 84 px x 3 frames, one observation",
        ["tokenizer", "tokens", "tokenizer parameters", "tokenizer MFLOPs", "encoder MFLOPs"],
        rows,
    )


def alternated_update_ms(venv, agents: dict[str, dict], batch: int, updates: int) -> dict[str, float]:
    """Median ms per SAC update of each agent (`make_agent("sac", venv, **kwargs)`), alternated in this process
    so that drifts in machine speed hit every agent; each timed call is one critic-only and one full update
    (actor, temperature, target), halved. The first agent's 300 random steps fill the replay buffer that every
    agent with the same buffer type samples from (an update's cost does not depend on which transitions it reads)."""
    emulated = []  # bf16 rows where the CPU emulates it
    if not cpu_has_native_bf16():
        emulated = [
            n for n, k in agents.items() if computes_in_bf16(k.get("perceiver"), k.get("policy_kwargs"))
        ]
    if emulated:
        print(f"(rows skipped: {emulated}; this CPU has no native bf16, where it was measured 5x slower)")
    models, filled = {}, None
    for name, kwargs in ((n, k) for n, k in agents.items() if n not in emulated):
        model = make_agent("sac", venv, device="cpu", seed=0, batch_size=batch, buffer_size=2000,
                           learning_starts=300, **kwargs)  # fmt: skip
        if filled is not None and type(model.replay_buffer) is type(filled.replay_buffer):
            model.replay_buffer, model.num_timesteps = filled.replay_buffer, filled.num_timesteps
            model.set_logger(filled.logger)
        else:
            model.learn(300)  # random actions until learning_starts: fills the buffer, no update yet
            filled = filled or model
        model.train(gradient_steps=2, batch_size=batch)  # warm-up; two updates: one with the actor
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(updates):
        for name, model in models.items():
            start = time.perf_counter()
            model.train(gradient_steps=2, batch_size=batch)
            times[name].append((time.perf_counter() - start) / 2)
    return {name: 1000 * float(np.median(t)) for name, t in times.items()}


def update_ms_table(title: str, ms: dict[str, float]) -> None:
    fastest = min(ms.values())
    table(
        title, ["agent", "ms / update", "x the fastest"], [[name, t, t / fastest] for name, t in ms.items()]
    )


def drq_update_table(batches: tuple[int, ...], updates: int, skip: tuple[str, ...] = ()) -> None:
    """ms per DrQ-recipe update (K = M = 2, critic + actor + temperature + target) of every agent, identical but
    for the encoder, alternated in this process; cartpole-swingup pixels only (84 px x 3)."""
    venv = envs.make_vec_env("cartpole-swingup", n_envs=1, seed=0, image_size=84, action_repeat=8,
                             modalities=("pixels",))  # fmt: skip
    for batch in batches:
        agents = {
            name: dict(
                perceiver=perceiver,
                policy_type=policy_type,
                recipe="drq",
                policy_kwargs=policy or None,
                **options,
            )
            for name, (policy_type, perceiver, policy, options) in DRQ_AGENTS.items()
            if (name, batch) not in skip
        }
        update_ms_table(
            f"DrQ-recipe SAC update (K = M = 2, actor / target every 2), batch {batch}, cartpole-swingup "
            f"pixels 84 px x 3, median of {updates} pairs, {torch.get_num_threads()} torch threads",
            alternated_update_ms(venv, agents, batch, updates),
        )
    venv.close()


SWEEPS = Path(__file__).resolve().parents[1] / "sweeps"
FUSE_SPEC = SWEEPS / "study2-fuse.yaml"
FUSE_AGENTS = {  # row -> the variant of study 2's sweep spec it times
    "Perceiver (plain)": "perceiver",
    "Perceiver, grouped latents + sampler with camera-only samples, patch tokens": "perceiver-groups-mix-camera",
    "Perceiver, grouped latents + sampler with camera-only samples, conv tokens": "perceiver-groups-mix-camera-conv",
    "SB3 SAC, MultiInputPolicy (NatureCNN + MLP)": "cnn",
}
FUSE_DRQ_SPEC = SWEEPS / "study2-fuse-drq.yaml"
FUSE_DRQ_AGENTS = {  # row -> the variant of study 2's DrQ-recipe spec it times (+ flags added to its command)
    "Perceiver, conv tokens, online target (plain)": "perceiver-conv-online-target",
    "Perceiver, best (+ SB3's critic head, encoder at 0.3x lr)": "perceiver-conv-online-queries-enc-lr0.3",
    "Perceiver, best, bf16 autocast": "perceiver-conv-online-queries-enc-lr0.3-bf16",
    "Perceiver, grouped latents": "perceiver-conv-online-target-groups",
    "NatureCNN + MLP (cnn)": "cnn",
    "NatureCNN + MLP (cnn), bf16 convolutions": ("cnn", ("--policy", "conv_dtype=bfloat16")),
}
FUSE_DRQ_CUP_SPEC = SWEEPS / "study2-fuse-drq-cup.yaml"
FUSE_DRQ_CUP_AGENTS = {  # row -> the variant of the ball_in_cup-catch spec it times
    "Perceiver, best (+ SB3's critic head, encoder at 0.3x lr)": "perceiver-conv-online-queries-enc-lr0.3",
    "Perceiver, best + running mean frame": "perceiver-conv-online-queries-enc-lr0.3-meanframe",
    "Perceiver, best + placed latents + running mean frame": "perceiver-conv-online-queries-enc-lr0.3-local-meanframe",
    "Perceiver, best on keypoint tokens + running mean frame": "perceiver-keypoints-online-queries-enc-lr0.3-meanframe",
    "NatureCNN + MLP (cnn)": "cnn",
}
BENCH_SETS = ("batch_size", "buffer_size", "learning_starts")  # set by `alternated_update_ms`


def spec_configs(
    spec: Path, labels: dict[str, str | tuple[str, tuple[str, ...]]]
) -> dict[str, cfg.TrainConfig]:
    """row -> the TrainConfig `experiments.train` resolves for that variant of the sweep spec (its first seed); a
    row given as (label, flags) adds those flags to the variant's command."""
    rows = {row: (entry, ()) if isinstance(entry, str) else entry for row, entry in labels.items()}
    by_label = {}
    for _, settings in sweeping.trials(sweeping.load_spec(spec)):
        by_label.setdefault(settings.get(sweeping.LABEL), settings)
    missing = sorted({label for label, _ in rows.values()} - set(by_label))
    if missing:
        raise ValueError(f"{spec} has no variants {missing}; its variants: {sorted(map(str, by_label))}")
    parser = cfg.build_parser("")
    return {
        row: cfg.resolve(parser.parse_args([*sweeping.train_args(by_label[label]), *flags]))
        for row, (label, flags) in rows.items()
    }


def spec_update_table(spec: Path, rows: dict, title: str, batch: int, updates: int) -> None:
    """ms per SAC update of each row's agent, built from its sweep-spec variant as `experiments.train` builds it,
    on that spec's env, alternated in this process."""
    from experiments.train import agent_kwargs, make_env

    configs = spec_configs(spec, rows)
    agents = {
        row: {k: v for k, v in agent_kwargs(config).items() if k not in BENCH_SETS}
        for row, config in configs.items()
    }
    venv = make_env(next(iter(configs.values())), seed=0)
    update_ms_table(
        f"{title}, batch {batch}, median of {updates} pairs, {torch.get_num_threads()} torch threads",
        alternated_update_ms(venv, agents, batch, updates),
    )
    venv.close()


def bench_fuse(quick: bool) -> None:
    """`python -m experiments.benchmark fuse [--quick]`: ms per SAC update (SB3's recipe, batch 128) of study 2's
    agents, each built from its variant of `experiments/sweeps/study2-fuse.yaml` as `experiments.train` builds
    it, on that study's env (cartpole-swingup with `--proprio robot`: 84 px x 3 + the cart sensor + 8 past
    actions), alternated in this process."""
    batch, updates = (32, 2) if quick else (128, 10)
    title = "Study 2's SAC update (SB3 recipe), cartpole-swingup `--proprio robot`, 84 px x 3 + cart sensor + history"
    spec_update_table(FUSE_SPEC, FUSE_AGENTS, title, batch, updates)


def bench_fuse_drq(quick: bool) -> None:
    """`python -m experiments.benchmark fuse-drq [--quick]`: the same for study 2 under DrQ's recipe
    (`experiments/sweeps/study2-fuse-drq.yaml`: K = M = 2, actor and target every 2 updates; batch 128, the
    preset's), float32 beside bf16 for the best Perceiver and for NatureCNN + MLP (where the CPU has native bf16);
    then ball_in_cup-catch's agents (`study2-fuse-drq-cup.yaml`), with and without the running mean frame."""
    batch, updates = (32, 2) if quick else (128, 10)
    title = (
        "Study 2's SAC update (DrQ recipe, K = M = 2), cartpole-swingup `--proprio robot`, 84 px x 3 + cart "
        "sensor + history"
    )
    spec_update_table(FUSE_DRQ_SPEC, FUSE_DRQ_AGENTS, title, batch, updates)
    title = "The same on ball_in_cup-catch `--proprio robot`, 84 px x 3 + cup sensor + history"
    spec_update_table(FUSE_DRQ_CUP_SPEC, FUSE_DRQ_CUP_AGENTS, title, batch, updates)


def bench_drq(quick: bool) -> None:
    """`python -m experiments.benchmark drq [--quick]`: the tokenizer table and the DrQ update table."""
    tokenizer_table()
    if quick:
        drq_update_table((32,), updates=2)
    else:
        slow = [name for name in DRQ_AGENTS if name.startswith("DrQ's encoder")]
        drq_update_table((128, 512), updates=5, skip=tuple((name, 512) for name in slow))
