"""Does PPO's probability ratio stay exact under bf16? `python -m experiments.benchmark precision`.

SB3 collects a rollout with the policy in eval mode, one batch of n_envs observations per step, and recomputes
the log-probabilities in the update on minibatches of another size. With unchanged weights the ratio
exp(log p_update - log p_rollout) should be exactly 1. In float32 it is, up to summation order; under bf16
autocast the two batch shapes take different kernels and roundings, so it is not. This measures by how much,
with unchanged weights (no update in between), for float32 and for bf16 autocast on this device.
"""

from __future__ import annotations

import torch

import envs
from agents import make_agent
from experiments.benchmarks.common import table

TINY_PIXELS = {"image_size": 64, "frame_stack": 3, "action_repeat": 4}


def ratio_deviation(dtype: str, steps: int, minibatch: int, device: str, n_envs: int) -> tuple[float, float]:
    """(max, mean) of |ratio - 1| over one rollout of `steps` x `n_envs`, recomputed in minibatches."""
    torch.manual_seed(0)
    venv = envs.make_vec_env("cartpole-balance", n_envs=n_envs, seed=0, **TINY_PIXELS)
    model = make_agent("ppo", venv, perceiver={"dtype": dtype}, device=device, n_steps=steps, seed=0)
    policy = model.policy
    obs, stored = venv.reset(), []
    policy.set_training_mode(False)
    for _ in range(steps):
        with torch.no_grad():
            tensor, _ = policy.obs_to_tensor(obs)
            actions, _, log_prob = policy(tensor)
        stored.append((tensor, actions, log_prob))
        obs, *_ = venv.step(actions.cpu().numpy())
    venv.close()
    observations = {k: torch.cat([s[0][k] for s in stored]) for k in stored[0][0]}
    actions = torch.cat([s[1] for s in stored])
    old = torch.cat([s[2] for s in stored])
    policy.set_training_mode(True)  # as PPO's update (no dropout in the RL defaults)
    deviations = []
    with torch.no_grad():
        for start in range(0, len(actions), minibatch):
            part = {k: v[start : start + minibatch] for k, v in observations.items()}
            _, log_prob, _ = policy.evaluate_actions(part, actions[start : start + minibatch])
            deviations.append((torch.exp(log_prob - old[start : start + minibatch]) - 1).abs())
    deviation = torch.cat(deviations).float()
    return float(deviation.max()), float(deviation.mean())


def bench_bf16_ratio(quick: bool) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    steps = 16 if quick else 64
    rows = []
    for dtype in ("float32", "bfloat16"):
        for n_envs in (1, 4):
            worst, mean = ratio_deviation(
                dtype, steps * 4 // n_envs, minibatch=32, device=device, n_envs=n_envs
            )
            rows.append([dtype, device, n_envs, steps * 4, worst, mean])
    table(
        "PPO ratio at unchanged weights: rollout (batch = n_envs, eval mode) vs update (minibatch 32, train "
        "mode), pixels 64 px x 3 + proprio + history",
        ["precision", "device", "rollout batch", "samples", "max abs(ratio - 1)", "mean abs(ratio - 1)"],
        rows,
    )
