"""PPO training throughput (rollout collection vs the env-only limit, update), replay memory, GPU rollout batching.

Each configuration runs in a fresh process (`python -m experiments.benchmark train-worker|replay-worker SPEC`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

os.environ.setdefault("MUJOCO_GL", "egl")

import envs  # noqa: E402
from experiments.benchmarks.common import table  # noqa: E402
from experiments.benchmarks.policy import default_space  # noqa: E402
from perceiver_policy import PerceiverConfig, PerceiverEncoder  # noqa: E402
from perceiver_policy.model import cpu_has_native_bf16  # noqa: E402

MIX = "all=0.5 pixels+action_history=0.3 proprio+action_history=0.2"


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


def bench_mix_update(spec: dict, quick: bool) -> float:
    """PPO's update with the weighted modality sampler against the same update without it, in one process on one
    model (mask tokens): rounds alternate the order, each update gets a freshly collected rollout (not timed).
    With the sampler, `train` adds the no-grad pass that recomputes the old log-probs and the per-sample flags."""
    import agents

    venv = envs.make_vec_env(spec["task"], n_envs=spec["n_envs"], seed=0, image_size=spec["image_size"],
                             action_repeat=spec["action_repeat"])  # fmt: skip
    model = agents.make_agent(
        "ppo", venv, perceiver={"patch_size": 8, "missing_tokens": "mask"}, modality_mix=MIX, device="cpu", seed=0,
        n_steps=spec["n_steps"], batch_size=spec["batch_size"], n_epochs=spec["n_epochs"],
    )  # fmt: skip
    _, callback = model._setup_learn(spec["n_steps"] * spec["n_envs"], None)
    mixer, seconds = model.mixer, {"without": [], "with": []}
    for round_ in range(3 if quick else 8):
        for mode in ("without", "with") if round_ % 2 == 0 else ("with", "without"):
            model.collect_rollouts(model.env, callback, model.rollout_buffer, spec["n_steps"])
            model.mixer = mixer if mode == "with" else None
            start = time.perf_counter()
            model.train()
            seconds[mode].append(time.perf_counter() - start)
    model.mixer = mixer
    venv.close()
    ratio = float(np.median(seconds["with"]) / np.median(seconds["without"]))
    table(
        f"PPO update with the weighted modality sampler ({MIX!r}), mask tokens, the same model and spec, "
        f"{len(seconds['with'])} alternating rounds (medians)",
        ["update", "s", "ratio"],
        [["without the sampler", float(np.median(seconds["without"])), 1.0],
         ["with the sampler (recomputed old log-probs + per-sample masks)", float(np.median(seconds["with"])), ratio]],
    )  # fmt: skip
    return ratio


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
        "mix_update_vs_mask": bench_mix_update(spec, quick),
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
    from experiments.benchmarks.attention import cross_attention_kernels

    inference, training = cross_attention_kernels(PerceiverEncoder(default_space(), PerceiverConfig()))
    rows = [
        ["PPO learn steps/s, ours / MultiInputPolicy", train["ppo_vs_multiinput"], ">= 1.0"],
        ["rollout collection / env-only limit", train["collect_vs_env"], ">= 0.8"],
        ["collection, --vec-env pipelined / subproc", train["pipelined_vs_subproc"], "> 1"],
        [
            "PPO update with --modality-mix / without",
            train["mix_update_vs_mask"],
            "≈ 1.1 predicted (one more forward)",
        ],
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
