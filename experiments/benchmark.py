"""Benchmarks (not tests): `python -m experiments.benchmark env|policy|train|sac|precision|streaming|gpu|all [--quick]`.

Every table compares alternatives measured side by side in the same run and reports ratios; quote them with
the machine (printed first). Timings use `time.perf_counter` after warm-up; latency is per call, p50/p95.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

import envs  # noqa: E402
from experiments.benchmark_common import machine, percentiles, table, timed  # noqa: E402
from experiments.runtime import keep_freed_memory
from perceiver_policy import PerceiverConfig, PerceiverEncoder, count_flops, count_parameters  # noqa: E402
from perceiver_policy.model import cpu_has_native_bf16  # noqa: E402

TASK = "cheetah-run"
PIXEL_OBS = {"image_size": 84, "frame_stack": 3, "action_history_len": 8}


# ------------------------------------------------------------------------------------------------------- env
def env_steps_per_sec(steps: int, n_envs: int = 1, vec_env_type: str = "dummy", **kwargs) -> float:
    venv = envs.make_vec_env(TASK, n_envs=n_envs, seed=0, vec_env_type=vec_env_type, **kwargs)
    venv.reset()
    actions = np.zeros((n_envs, *venv.action_space.shape), np.float32)
    for _ in range(5):
        venv.step(actions)
    start = time.perf_counter()
    for _ in range(steps // n_envs):
        venv.step(actions)
    elapsed = time.perf_counter() - start
    venv.close()
    return (steps // n_envs) * n_envs / elapsed


def bench_env(quick: bool) -> None:
    steps = 300 if quick else 2000
    workers = max(2, min(4, os.cpu_count() or 2))
    base = env_steps_per_sec(steps, modalities=("proprio",))
    rows = [["states (proprio)", "-", "-", 1, base, 1.0]]
    for backend in ("fast", "dm_control"):
        for size in (64, 84):
            for stack in (1, 3):
                if stack == 1 and size == 64:
                    continue
                sps = env_steps_per_sec(steps, render_backend=backend, image_size=size, frame_stack=stack)
                rows.append([f"pixels+proprio+history, {backend}", size, stack, 1, sps, sps / base])
    for n, kind in ((1, "subproc"), (workers, "subproc")):
        sps = env_steps_per_sec(steps, n_envs=n, vec_env_type=kind, image_size=84)
        rows.append([f"pixels fast, {kind} x{n}", 84, 3, n, sps, sps / base])
    table(
        f"Env steps/s, {TASK}, action repeat 1 (agent steps = frames)",
        ["observation / renderer", "px", "frames", "workers", "steps/s", "vs states"],
        rows,
    )


# ---------------------------------------------------------------------------------------------------- policy
def default_space():
    env = envs.DMCEnv("cheetah", "run", **PIXEL_OBS)
    space = env.observation_space
    env.close()
    return space


def sample_batch(space, batch: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    return {
        k: torch.as_tensor(rng.integers(0, 256, (batch, *s.shape), dtype=np.uint8))
        if s.dtype == np.uint8
        else torch.as_tensor(rng.standard_normal((batch, *s.shape)).astype(np.float32))
        for k, s in space.spaces.items()
    }


def extractors(space, config: PerceiverConfig):
    from stable_baselines3.common.preprocessing import preprocess_obs
    from stable_baselines3.common.torch_layers import CombinedExtractor

    from perceiver_policy.policies import PerceiverExtractor

    ours = PerceiverExtractor(space, config).eval()
    cnn = CombinedExtractor(space).eval()
    # SB3 scales pixels in preprocess_obs before the extractor: include it, as ours scales inside.
    return {"perceiver": ours, "cnn": lambda obs: cnn(preprocess_obs(obs, space, normalize_images=True))}, cnn


def bench_policy(quick: bool) -> None:
    torch.set_grad_enabled(False)
    space = default_space()
    config = PerceiverConfig()
    repeats, big = (30, 5) if quick else (200, 20)
    one, batch = sample_batch(space, 1), sample_batch(space, 256)
    models, cnn = extractors(space, config)
    rows, results = [], {}
    for name, model in models.items():
        p50, p95 = percentiles(timed(lambda m=model: m(one), repeats))
        throughput = 256 / np.median(timed(lambda m=model: m(batch), big))
        params = count_parameters(model if name == "perceiver" else cnn)
        results[name] = (p50, throughput)
        rows.append([name, params, p50, p95, throughput])
    ratio_latency = results["perceiver"][0] / results["cnn"][0]
    ratio_throughput = results["perceiver"][1] / results["cnn"][1]
    rows.append(["perceiver / cnn", "", ratio_latency, "", ratio_throughput])
    table(
        f"Extractor forward, pixels 84 px x 3 frames + proprio + 8-step history; Perceiver {config.num_latents}x"
        f"{config.latent_dim}, {config.self_attn_layers} self-attn layer, {config.image_patch_size(84, 84)}-px patches "
        f"(targets: latency <= 1.5x, throughput >= 1x)",
        ["extractor", "params", "b=1 p50 ms", "b=1 p95 ms", "b=256 samples/s"],
        rows,
    )

    rows = []
    for latents in (32, 64, 128, 256, 512):
        cfg = PerceiverConfig(num_latents=latents)
        model = extractors(space, cfg)[0]["perceiver"]
        p50, p95 = percentiles(timed(lambda m=model: m(one), repeats // 2 or 1))
        flops = count_flops(space, cfg)
        rows.append(
            [latents, count_parameters(model), flops["cross_attn"] / 1e6, flops["total"] / 1e6, p50, p95]
        )
    table(
        "num_latents sweep (latent_dim 64): the quality/speed trade-off",
        ["latents", "params", "cross-attn MFLOPs", "total MFLOPs", "b=1 p50 ms", "b=1 p95 ms"],
        rows,
    )

    rows = []
    variants = {
        "fp32": PerceiverConfig(),
        "bf16 autocast": PerceiverConfig(dtype="bfloat16"),
    }
    if not cpu_has_native_bf16() and not torch.cuda.is_available():
        print("(bf16 autocast row skipped: this CPU has no native bf16, where it was measured 5x slower)")
        variants.pop("bf16 autocast")
    for name, cfg in variants.items():
        model = extractors(space, cfg)[0]["perceiver"]
        p50, _ = percentiles(timed(lambda m=model: m(one), repeats))
        throughput = 256 / np.median(timed(lambda m=model: m(batch), big))
        rows.append([name, p50, throughput])
    model = extractors(space, config)[0]["perceiver"]
    p50_cached, _ = percentiles(timed(lambda: model(one), repeats))
    rows.append(["Fourier features cached (default)", p50_cached, ""])
    p50_rebuilt, _ = percentiles(timed(lambda: rebuild_fourier_then_forward(model, one), repeats))
    rows.append(["Fourier features rebuilt every forward", p50_rebuilt, ""])
    cross = model.encoder.cross_attention
    p50_nocache, _ = percentiles(timed(lambda: (setattr(cross, "_query_cache", None), model(one)), repeats))
    rows.append(["latent-query cache off", p50_nocache, ""])
    table(
        "Precision and caches (b=1 latency; b=256 throughput)",
        ["variant", "b=1 p50 ms", "b=256 samples/s"],
        rows,
    )
    torch.set_grad_enabled(True)
    bench_input_checks(space, model, repeats)
    from experiments.benchmark_attention import bench_attention_kernel

    bench_attention_kernel(space, quick)


def bench_input_checks(space, model, repeats: int) -> None:
    """What the input checks add: `check_observation` on each predict, the non-finite guard on each env step."""
    from envs.wrappers import NonFiniteGuard
    from perceiver_policy.observations import check_observation

    one = {k: v.numpy() for k, v in sample_batch(space, 1).items()}
    guard = NonFiniteGuard.__new__(NonFiniteGuard)  # only its per-step check, without an env behind it
    guard.sanitize, guard.nonfinite_count = False, 0
    guard.float_keys = [k for k, s in space.spaces.items() if np.issubdtype(s.dtype, np.floating)]
    tensors = {k: torch.as_tensor(v) for k, v in one.items()}
    with torch.no_grad():
        forward, _ = percentiles(timed(lambda: model(tensors), repeats))
    check, _ = percentiles(timed(lambda: check_observation(one, space), repeats * 10))
    finite, _ = percentiles(timed(lambda: guard._check_obs(dict(one)), repeats * 10))
    table(
        "Input checks, batch 1 (cost beside the Perceiver's own forward)",
        ["check", "p50 ms", "share of the forward"],
        [["check_observation (keys, shapes, dtypes)", check, check / forward],
         ["non-finite guard (one isfinite().all() per float key)", finite, finite / forward],
         ["Perceiver forward", forward, 1.0]],
    )  # fmt: skip


def rebuild_fourier_then_forward(model, obs):
    """What a naive implementation does: recompute every modality's Fourier features in forward."""
    from perceiver_policy.position import grid_fourier_features

    for adapter in model.encoder.adapters.values():
        adapter.position_features = grid_fourier_features(
            adapter.spec.fourier_resolutions, model.encoder.config.fourier_bands
        )
    return model(obs)


# ----------------------------------------------------------------------------------------------------- train
def train_worker(spec: dict) -> dict:
    """One measurement in a fresh process (so peak memory is its own)."""
    import resource

    from stable_baselines3 import PPO
    from stable_baselines3.common.buffers import DictRolloutBuffer

    import agents

    venv = envs.make_vec_env(
        spec["task"],
        n_envs=spec["n_envs"],
        seed=0,
        image_size=spec["image_size"],
        action_repeat=spec["action_repeat"],
        vec_env_type=spec.get("vec_env", "dummy"),
    )
    n_steps, steps = spec["n_steps"], spec["steps"]
    device = spec.get("device", "cpu")
    common = dict(
        n_steps=n_steps, batch_size=spec["batch_size"], n_epochs=spec["n_epochs"], device=device, seed=0
    )
    if spec["policy"] == "perceiver":
        buffer = DictRolloutBuffer if spec.get("sb3_buffer") else agents.DeviceRolloutBuffer
        perceiver = {"patch_size": 8} if spec["image_size"] == 64 else {}
        perceiver["dtype"] = spec.get("dtype", "float32")
        model = agents.make_agent("ppo", venv, perceiver=perceiver, rollout_buffer_class=buffer, **common)
    else:
        model = PPO("MultiInputPolicy", venv, **common)
    model.learn(n_steps * spec["n_envs"])  # warm-up: one rollout + update
    start = time.perf_counter()
    model.learn(steps, reset_num_timesteps=False)
    learn_sps = steps / (time.perf_counter() - start)
    # one rollout collection, then one update, timed apart
    from stable_baselines3.common.callbacks import BaseCallback

    class Null(BaseCallback):
        def _on_step(self):
            return True

    callback = Null()
    callback.init_callback(model)
    # Collection vs the env-only limit (same envs, random actions), interleaved round by round so that drifts
    # in machine speed hit both; several rollouts, since one 64-step rollout was too noisy to compare.
    collect_s = env_s = update_s = 0.0
    rounds = spec.get("rounds", 4)
    for _ in range(rounds):
        start = time.perf_counter()
        model.collect_rollouts(model.env, callback, model.rollout_buffer, n_steps)
        collect_s += time.perf_counter() - start
        start = time.perf_counter()
        model.train()
        update_s += time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(n_steps):
            venv.step(np.stack([venv.action_space.sample() for _ in range(spec["n_envs"])]))
        env_s += time.perf_counter() - start
    collect_sps = rounds * n_steps * spec["n_envs"] / collect_s
    env_sps = rounds * n_steps * spec["n_envs"] / env_s
    update_s /= rounds
    model._last_obs = None
    venv.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "learn_sps": learn_sps,
        "collect_sps": collect_sps,
        "update_s": update_s,
        "env_sps": env_sps,
        "peak_mb": peak_mb,
    }


def run_worker(spec: dict) -> dict:
    mode = "replay-worker" if "replay" in spec else "train-worker"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.benchmark", mode, json.dumps(spec)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(quick: bool) -> dict[str, float]:
    """Prints the tables; returns the PPO headline ratios of the default (CPU: SB3 buffer) configuration."""
    spec = {
        "task": "cartpole-balance",
        "n_envs": 4,
        "image_size": 64,
        "action_repeat": 4,
        "n_steps": 64,
        "batch_size": 128,
        "n_epochs": 4,
        "steps": 512 if quick else 4096,
    }
    configs = {
        "ours": {**spec, "policy": "perceiver"},
        "sb3_buffer": {**spec, "policy": "perceiver", "sb3_buffer": True},
        "cnn": {**spec, "policy": "cnn"},
        # Subprocess envs, stepped whole or in two halves overlapped with the policy (--vec-env pipelined).
        "subproc": {**spec, "policy": "perceiver", "sb3_buffer": True, "vec_env": "subproc"},
        "pipelined": {**spec, "policy": "perceiver", "sb3_buffer": True, "vec_env": "pipelined"},
    }
    if cpu_has_native_bf16() and not torch.cuda.is_available():  # emulated bf16 was 5x slower: no row there
        configs["bf16"] = {**spec, "policy": "perceiver", "sb3_buffer": True, "dtype": "bfloat16"}
    results = {name: [] for name in configs}
    for _ in range(1 if quick else 2):  # alternate configurations; report the mean of the repeats
        for name, config in configs.items():
            results[name].append(run_worker(config))
    means = {n: {k: float(np.mean([r[k] for r in runs])) for k in runs[0]} for n, runs in results.items()}
    labels = {
        "ours": "Perceiver + DeviceRolloutBuffer (the CUDA default)",
        "sb3_buffer": "Perceiver + SB3 DictRolloutBuffer (the CPU default)",
        "cnn": "SB3 MultiInputPolicy (NatureCNN)",
        "subproc": "Perceiver + SB3 buffer, --vec-env subproc",
        "pipelined": "Perceiver + SB3 buffer, --vec-env pipelined (halves overlapped)",
        "bf16": "Perceiver + SB3 buffer, dtype=bfloat16 (CPU autocast, native bf16)",
    }
    cnn = means["cnn"]
    rows = [
        [labels[name], m["learn_sps"], m["learn_sps"] / cnn["learn_sps"], m["update_s"], m["collect_sps"],
         m["collect_sps"] / m["env_sps"], m["peak_mb"]]
        for name, m in means.items()
    ]  # fmt: skip
    table(
        f"PPO on {spec['task']}, pixels {spec['image_size']} px x 3 + proprio + history, {spec['n_envs']} envs, "
        f"n_steps {spec['n_steps']}, {spec['n_epochs']} epochs, mean of {len(results['ours'])} alternating runs (targets: >= 1x MultiInputPolicy; collection >= 0.8x env)",
        [
            "policy / buffer",
            "learn steps/s",
            "vs MultiInput",
            "update s",
            "collect steps/s",
            "collect / env-only",
            "peak RSS MB",
        ],
        rows,
    )
    default = means["ours" if torch.cuda.is_available() else "sb3_buffer"]
    headline = {
        "ppo_vs_multiinput": default["learn_sps"] / cnn["learn_sps"],
        "collect_vs_env": default["collect_sps"] / default["env_sps"],
        "pipelined_vs_subproc": means["pipelined"]["collect_sps"] / means["subproc"]["collect_sps"],
    }
    from gymnasium import spaces
    from stable_baselines3.common.buffers import DictReplayBuffer

    from agents import FrameReplayBuffer

    space = default_space()
    action = spaces.Box(-1, 1, (6,), np.float32)
    ours_buffer = FrameReplayBuffer(100_000, space, action, device="cpu")
    theirs = DictReplayBuffer(100_000, space, action, device="cpu")
    theirs_bytes = sum(
        a.nbytes
        for a in [
            *theirs.observations.values(),
            *theirs.next_observations.values(),
            theirs.actions,
            theirs.rewards,
            theirs.dones,
            theirs.timeouts,
        ]
    )
    table(
        "Replay memory, 100k transitions, pixels 84 px x 3 frames + proprio + history (target <= 0.2x)",
        ["buffer", "GB", "ratio"],
        [
            [
                "FrameReplayBuffer (frames once)",
                ours_buffer.nbytes() / 1e9,
                ours_buffer.nbytes() / theirs_bytes,
            ],
            ["SB3 DictReplayBuffer", theirs_bytes / 1e9, 1.0],
        ],
    )
    transitions = 2_000 if quick else 10_000
    measured = {kind: run_worker({"replay": kind, "transitions": transitions}) for kind in ("frames", "sb3")}
    ratio = measured["frames"]["rss_mb"] / measured["sb3"]["rss_mb"]
    table(
        f"Replay memory measured: resident-set growth after allocating and filling {transitions} transitions "
        "(each in a fresh process; the same 84 px x 3 + proprio + history)",
        ["buffer", "RSS growth MB", "ratio", "MB per 100k transitions"],
        [["FrameReplayBuffer", measured["frames"]["rss_mb"], ratio, measured["frames"]["rss_mb"] * 1e5 / transitions],
         ["SB3 DictReplayBuffer", measured["sb3"]["rss_mb"], 1.0, measured["sb3"]["rss_mb"] * 1e5 / transitions]],
    )  # fmt: skip
    return headline


def summary(train: dict[str, float], sac_speedup: float) -> None:
    from experiments.benchmark_attention import cross_attention_kernels

    inference, training = cross_attention_kernels(PerceiverEncoder(default_space(), PerceiverConfig()))
    rows = [
        ["PPO learn steps/s, ours / MultiInputPolicy", train["ppo_vs_multiinput"], ">= 1.0"],
        ["rollout collection / env-only limit", train["collect_vs_env"], ">= 0.8"],
        ["collection, --vec-env pipelined / subproc", train["pipelined_vs_subproc"], "> 1"],
        ["SAC updates/s, ours / SB3 SAC (NatureCNN)", sac_speedup, "> 2.9 (docs/results.md)"],
        [f"input cross-attention kernel: inference {inference}, training {training}", "", ""],
    ]
    table("Throughput targets, this run", ["measure", "ratio", "target"], rows)


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        line = next(line for line in handle if line.startswith("VmRSS"))
    return int(line.split()[1]) / 1024


def replay_worker(spec: dict) -> dict:
    """Allocate one replay buffer and fill it with random transitions; report the growth of resident memory."""
    from gymnasium import spaces
    from stable_baselines3.common.buffers import DictReplayBuffer

    from agents import FrameReplayBuffer

    space, transitions = default_space(), spec["transitions"]
    action = spaces.Box(-1, 1, (6,), np.float32)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (3, 84, 84), dtype=np.uint8) for _ in range(4)]
    vectors = {
        k: rng.standard_normal((1, *s.shape)).astype(np.float32)
        for k, s in space.spaces.items()
        if k != "pixels"
    }
    before = rss_mb()
    cls = FrameReplayBuffer if spec["replay"] == "frames" else DictReplayBuffer
    buffer = cls(transitions, space, action, device="cpu")
    stack = np.concatenate(frames[:3])[None]
    for t in range(transitions):
        obs = {"pixels": stack, **vectors}
        stack = np.concatenate([stack[0, 3:], frames[t % 4]])[None]
        buffer.add(
            obs, {"pixels": stack, **vectors}, np.zeros((1, 6), np.float32), np.zeros(1), np.zeros(1), [{}]
        )
    return {"rss_mb": rss_mb() - before}


def bench_gpu_rollouts(quick: bool) -> None:
    """CPU path vs GPU path, fp32 vs bf16, 1/8/32 subprocess envs: rollout collection and learning speed."""
    if not torch.cuda.is_available():
        print("\n### GPU rollout batching\n\nno CUDA device here: table skipped (run on a GPU machine)")
        return
    base = {"task": "cheetah-run", "image_size": 84, "action_repeat": 4, "n_steps": 64, "batch_size": 256,
            "n_epochs": 4, "policy": "perceiver", "vec_env": "subproc"}  # fmt: skip
    rows = []
    for n_envs in (1, 8, 32):
        for device, dtype in (("cpu", "float32"), ("cuda", "float32"), ("cuda", "bfloat16")):
            spec = {**base, "n_envs": n_envs, "device": device, "dtype": dtype,
                    "steps": (256 if quick else 2048) * max(1, n_envs // 4)}  # fmt: skip
            try:
                result = run_worker(spec)
            except subprocess.CalledProcessError as error:  # one failed row must not cost the others
                print(
                    f"{n_envs} envs, {device} {dtype}: worker failed:\n{error.stderr[-2000:]}",
                    file=sys.stderr,
                )
                rows.append([n_envs, device, dtype, "failed", "", "", ""])
                continue
            rows.append([n_envs, device, dtype, result["collect_sps"], result["collect_sps"] / result["env_sps"],
                         result["learn_sps"], result["update_s"]])  # fmt: skip
            # each row as it comes: what was measured survives a time limit
            print(f"row done: {rows[-1]}", file=sys.stderr, flush=True)
    table("GPU rollout batching, PPO, cheetah-run pixels 84 px x 3 + proprio + history (subprocess envs)",
          ["envs", "device", "dtype", "collect steps/s", "collect / env-only", "learn steps/s", "update s"], rows)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "what",
        choices=[
            "env",
            "policy",
            "train",
            "sac",
            "drq",
            "precision",
            "streaming",
            "gpu",
            "all",
            "train-worker",
            "replay-worker",
        ],
    )
    parser.add_argument("spec", nargs="?", help=argparse.SUPPRESS)
    parser.add_argument(
        "--quick", action="store_true", help="fewer repetitions: a few minutes on 2 CPU cores"
    )
    args = parser.parse_args(argv)
    if args.what in ("train-worker", "replay-worker"):
        worker = train_worker if args.what == "train-worker" else replay_worker
        print(json.dumps(worker(json.loads(args.spec))))
        return 0
    torch.manual_seed(0)
    print(f"machine: {machine()}; date: {time.strftime('%Y-%m-%d')}; quick={args.quick}")
    if args.what in ("env", "all"):
        bench_env(args.quick)
    if args.what in ("policy", "all"):
        bench_policy(args.quick)
    headline = None
    if args.what in ("train", "all"):
        headline = bench_train(args.quick)
        if args.what == "train":  # "all" prints it with the other GPU tables
            bench_gpu_rollouts(args.quick)
    if args.what in ("gpu", "all"):
        from experiments.benchmark_gpu import bench_gpu

        bench_gpu(args.quick)
    if args.what in ("precision", "all"):
        from experiments.benchmark_precision import bench_bf16_ratio

        bench_bf16_ratio(args.quick)
    if args.what in ("streaming", "all"):
        from experiments.benchmark_streaming import bench_streaming

        bench_streaming(args.quick)
    if args.what in ("train", "sac", "all"):
        from experiments.benchmark_sac import bench_sac

        sac_speedup = bench_sac(args.quick)
        if headline is not None:
            summary(headline, sac_speedup)
    if args.what in ("drq", "all"):
        from experiments.benchmark_sac import bench_drq

        bench_drq(args.quick)
    return 0


if __name__ == "__main__":
    keep_freed_memory()  # the commands tune the allocator, importing the package does not
    sys.exit(main())
