"""Export a trained policy: `python -m experiments.export RUN_DIR_OR_CHECKPOINT --format onnx|torchscript`.

Writes a deterministic actor (the observation keys as inputs, uint8 pixels accepted; output `action`, already
clipped / rescaled to the env's bounds as `predict` returns it) that runs without SB3: ONNX (onnxruntime, any
language) or TorchScript (`torch.jit.load`). Checks the exported file against `model.predict` on real
observations of the run's task and prints batch-1 latency of both. ONNX needs `pip install -e .[export]`.
`--num-latents K` exports a policy trained with latent_scaling running its first K latents.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from agents import algorithm_class
from envs.vec import make_env_fn
from experiments.checkpoint import CheckpointError, load_model, locate
from experiments.runtime import prepare_process
from perceiver_policy.export import FORMATS, DeterministicActor, export_onnx, export_torchscript
from perceiver_policy.latent_scaling import set_num_latents


def observations(config, count: int, seed: int = 0) -> list[dict]:
    """Real observations of the run's task (random actions), one per step."""
    env = make_env_fn(config.task, **config.env_kwargs())()
    obs, _ = env.reset(seed=seed)
    out = [obs]
    for _ in range(count - 1):
        obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
        out.append(obs if not (terminated or truncated) else env.reset()[0])
    env.close()
    return out


def runner(path: Path, fmt: str, names: list[str]):
    """A callable obs dict -> action (1, A) numpy for the exported file."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda obs: session.run(None, {k: obs[k][None] for k in names})[0]
    module = torch.jit.load(str(path))
    return lambda obs: module(*[torch.as_tensor(obs[k][None]) for k in names]).detach().numpy()


def p50_ms(fn, items: list) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    warm = times[5:] if len(times) > 5 else times  # the first calls warm caches up, when there are enough
    return float(np.percentile(1000 * np.asarray(warm), 50))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="run directory or checkpoint directory")
    parser.add_argument(
        "--format", choices=FORMATS, default="onnx", help="what to write (default: %(default)s)"
    )
    parser.add_argument(
        "--output", type=Path, default=None, help="file to write (default: RUN_DIR/export/actor.*)"
    )
    parser.add_argument("--check-steps", type=int, default=50, help="observations to compare and time on")
    parser.add_argument(
        "--num-latents",
        type=int,
        default=None,
        metavar="K",
        help="export with the first K latents (a value the policy was trained with; see latent_scaling)",
    )
    args = parser.parse_args(argv)
    if args.check_steps < 1:
        parser.error(f"--check-steps must be at least 1, got {args.check_steps}")
    try:
        config, checkpoint = locate(args.path)
        model = load_model(algorithm_class(config.algorithm, config.policy_type), checkpoint, device="cpu")
        if args.num_latents is not None:
            set_num_latents(model, args.num_latents)  # names the trained choices when K is not one
        actor = DeterministicActor(model.policy)
        suffix = (f"-k{args.num_latents}" if args.num_latents is not None else "") + (
            ".onnx" if args.format == "onnx" else ".pt"
        )
        out = args.output or checkpoint.parent.parent / "export" / f"actor{suffix}"
        out.parent.mkdir(parents=True, exist_ok=True)
        (export_onnx if args.format == "onnx" else export_torchscript)(actor, out)
        run = runner(out, args.format, actor.input_names)
    except (ValueError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    items = observations(config, args.check_steps)
    torch_actions = [model.predict(obs, deterministic=True)[0] for obs in items]
    exported = [run(obs)[0] for obs in items]
    error = float(max(np.abs(a - b).max() for a, b in zip(torch_actions, exported)))
    with torch.no_grad():
        torch_ms = p50_ms(lambda obs: model.predict(obs, deterministic=True), items)
    exported_ms = p50_ms(run, items)
    with torch.no_grad():  # the same module without SB3's predict around it (conversion, checks, numpy)
        actor_ms = p50_ms(
            lambda obs: actor(*[torch.as_tensor(obs[k][None]) for k in actor.input_names]), items
        )
    print(f"written: {out} ({out.stat().st_size / 1e6:.2f} MB; inputs {actor.input_names}, output 'action')")
    print(f"max |action - predict| over {len(items)} observations of {config.task}: {error:.2e}")
    print("| runtime | batch-1 p50 ms |\n| --- | --- |")
    print(f"| torch, SB3 predict | {torch_ms:.3f} |\n| torch, the exported module | {actor_ms:.3f} |")
    print(
        f"| {args.format} ({'onnxruntime' if args.format == 'onnx' else 'torch.jit'}) | {exported_ms:.3f} |"
    )
    return 0 if error < 1e-3 else 1


if __name__ == "__main__":
    prepare_process()  # the commands tune their process, importing the package does not
    sys.exit(main())
