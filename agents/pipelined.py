"""On-policy rollout collection that runs each half of the envs' policy forward while the other half steps.

With `envs.PipelinedSubprocVecEnv` (``--vec-env pipelined``) the envs are two halves, A and B, and one step t is

    wait A(t)  -> forward A(t+1)                          while B's workers still step t
    wait B(t)  -> bookkeeping of t (callbacks, buffer)    -> send A(t+1)
    forward B(t+1)                                        while A's workers step t+1
    send B(t+1)

so both forwards overlap env stepping. The transitions are SB3's, in SB3's order: a step's Gaussian action noise
is drawn for all envs at once (as SB3's single forward draws it) and split between the halves; the wrappers
(reward normalisation, the non-finite guard) see whole steps; callbacks run with nothing in flight. What
differs is that the policy runs on two half batches, whose outputs equal the full batch's to ~1e-6 (matrix
kernels may block differently), so a test compares this path with SB3's on the same seed.
"""

from __future__ import annotations

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize

from envs.vec import PipelinedSubprocVecEnv
from envs.wrappers import NonFiniteGuard


def pipelined_base(env: VecEnv) -> PipelinedSubprocVecEnv | None:
    """The `PipelinedSubprocVecEnv` under ``env``'s wrappers, or None. Each half's observations are read before
    the wrappers see the whole step, so every wrapper must pass observations through unchanged."""
    base = env.unwrapped
    if not isinstance(base, PipelinedSubprocVecEnv):
        return None
    while isinstance(env, VecEnvWrapper):
        transparent = isinstance(env, NonFiniteGuard) or (isinstance(env, VecNormalize) and not env.norm_obs)
        if not transparent:
            raise ValueError(
                f"vec_env 'pipelined' reads each half's observations before the wrappers do, so wrappers must not "
                f"change observations; {type(env).__name__} may (supported: NonFiniteGuard, "
                "VecNormalize(norm_obs=False)); use vec_env 'subproc'"
            )
        env = env.venv
    return base


def act(policy, obs: dict[str, torch.Tensor], noise: torch.Tensor):
    """SB3's `ActorCriticPolicy.forward` with the Gaussian noise given: (actions, values, log_probs)."""
    features = policy.extract_features(obs)
    if policy.share_features_extractor:
        latent_pi, latent_vf = policy.mlp_extractor(features)
    else:
        latent_pi = policy.mlp_extractor.forward_actor(features[0])
        latent_vf = policy.mlp_extractor.forward_critic(features[1])
    values = policy.value_net(latent_vf)  # (B, 1)
    distribution = policy._get_action_dist_from_latent(latent_pi)
    gaussian = distribution.distribution
    actions = gaussian.loc + noise * gaussian.scale  # what Normal.rsample computes from its own noise
    log_probs = distribution.log_prob(actions)  # (B,)
    return actions.reshape((-1, *policy.action_space.shape)), values, log_probs


def finite(obs: dict[str, np.ndarray]) -> bool:
    return all(np.isfinite(x).all() for x in obs.values() if np.issubdtype(x.dtype, np.floating))


class Pipeline:
    """The half-batch forwards and sends of `collect_pipelined`."""

    def __init__(self, algo, base: PipelinedSubprocVecEnv):
        if algo.use_sde or not isinstance(algo.action_space, spaces.Box):
            raise ValueError(
                "vec_env 'pipelined' supports Box actions without gSDE (use_sde=False); use 'subproc'"
            )
        self.algo, self.base, self.to_device = algo, base, algo._transfer()
        self.action_shape = (base.num_envs, *algo.action_space.shape)
        self.noise: torch.Tensor | None = None

    def draw_noise(self) -> None:
        """One step's noise for all envs, drawn as SB3's single forward draws it."""
        self.noise = torch.empty(self.action_shape, device=self.algo.device).normal_()

    def forward(self, half: int, obs: dict[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
        """(actions, values, log_probs) of half ``half``; ``obs`` is that half's part or the whole step's."""
        part = self.base.halves[half]
        if len(next(iter(obs.values()))) == self.base.num_envs:
            obs = {key: value[part] for key, value in obs.items()}
        with torch.no_grad():
            return act(self.algo.policy, self.to_device(obs), self.noise[part])

    def send(self, half: int, result: tuple[torch.Tensor, ...]) -> None:
        space = self.algo.action_space
        self.base.step_async_half(half, np.clip(result[0].cpu().numpy(), space.low, space.high))


def collect_pipelined(
    algo,
    env: VecEnv,
    base: PipelinedSubprocVecEnv,
    callback: BaseCallback,
    rollout_buffer,
    n_rollout_steps: int,
) -> bool:
    """`OnPolicyAlgorithm.collect_rollouts` for a `PipelinedSubprocVecEnv`: SB3's transitions in SB3's order."""
    assert algo._last_obs is not None, "No previous observation was provided"
    if not isinstance(algo._last_obs, dict):
        raise ValueError("vec_env 'pipelined' needs Dict observations (every DMCEnv observation is one)")
    pipe = Pipeline(algo, base)
    algo.policy.set_training_mode(False)
    rollout_buffer.reset()
    callback.on_rollout_start()
    pipe.draw_noise()
    current = []
    for half in (0, 1):  # A steps while B's forward runs
        current.append(pipe.forward(half, algo._last_obs))
        pipe.send(half, current[half])
    for n_steps in range(1, n_rollout_steps + 1):
        last_step = n_steps == n_rollout_steps
        ahead, next_a = base.step_wait_half(0), None  # A's new observations, while B's workers still step
        if not last_step and finite(ahead):  # a non-finite one waits for the guard's view of the whole step
            pipe.draw_noise()
            next_a = pipe.forward(0, ahead)
        new_obs, rewards, dones, infos = env.step_wait()  # receives B; the wrappers see the whole step
        actions = torch.cat([current[0][0], current[1][0]]).cpu().numpy()
        values, log_probs = (torch.cat([current[0][i], current[1][i]]) for i in (1, 2))
        algo.num_timesteps += env.num_envs
        callback.update_locals(locals())
        if not callback.on_step():
            return False
        algo._update_info_buffer(infos, dones)
        algo._bootstrap_timeouts(rewards, dones, infos, pipe.to_device)
        rollout_buffer.add(algo._last_obs, actions, rewards, algo._last_episode_starts, values, log_probs)
        algo._last_obs = new_obs
        algo._last_episode_starts = dones
        if last_step:
            break
        if next_a is None:
            pipe.draw_noise()
            next_a = pipe.forward(0, new_obs)
        pipe.send(0, next_a)
        next_b = pipe.forward(1, new_obs)  # while A's workers step
        pipe.send(1, next_b)
        current = [next_a, next_b]
    with torch.no_grad():
        values = algo.policy.predict_values(pipe.to_device(new_obs))
    rollout_buffer.compute_returns_and_advantage(last_values=values, dones=dones)
    callback.update_locals(locals())
    callback.on_rollout_end()
    return True
