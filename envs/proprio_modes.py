"""Partial observation: which of dm_control's proprioceptive entries an agent senses.

Three modes of the ``proprio`` vector (and of ``proprio_history``):

- ``full``: everything the task returns (the default; on most tasks this is the full physical state);
- ``robot``: only the agent's own body: the world's entries (cartpole's pole, ball_in_cup's ball, reacher's
  target direction, finger's spinner and target, ...) are removed, so they must be *seen* by the camera.
  Where the whole observation is the body (walker, cheetah, hopper, pendulum, acrobot, point_mass, humanoid,
  lqr) ``robot`` equals ``full``;
- ``positions``: every velocity entry removed (the position-only POMDP protocol of the recurrent-RL
  literature), so velocities must be inferred from frames or history.

A mode is a list of *kept* slices ``(sensor, start, stop, name)`` of dm_control's flattened entries (``start,
stop`` index the entry flattened in C order, ``None`` = the whole entry; ``name`` labels a partial slice).
Entries a task does not return are skipped (finger-spin has no target, finger-turn has one).
"""

from __future__ import annotations

import numpy as np

PROPRIO_MODES = ("full", "robot", "positions")
FULL = "full"  # a mode that keeps everything

Keep = tuple  # (sensor,) or (sensor, start, stop, name)

# Per domain: mode -> kept slices, or FULL. Domains not listed define only 'full'.
DOMAIN_MODES: dict[str, dict[str, object]] = {
    # position = [cart x, cos θ_1.., sin θ_1..], velocity = [cart ẋ, θ̇_1..]: the cart is the body, the poles the world
    "cartpole": {
        "robot": (("position", 0, 1, "cart_position"), ("velocity", 0, 1, "cart_velocity")),
        "positions": (("position",),),
    },
    # position = joint angles, to_target = the target's direction (world), velocity = joint velocities
    "reacher": {"robot": (("position",), ("velocity",)), "positions": (("position",), ("to_target",))},
    # position = qpos = [cup x, cup z, ball x, ball z], velocity = qvel likewise
    "ball_in_cup": {
        "robot": (("position", 0, 2, "cup_position"), ("velocity", 0, 2, "cup_velocity")),
        "positions": (("position",),),
    },
    # position = [proximal, distal angles, spinner tip x, y]; velocity = [proximal, distal, spinner hinge];
    # touch = the fingertip's sensors (body); target_position, dist_to_target (turn tasks) = world
    "finger": {
        "robot": (("position", 0, 2, "finger_position"), ("velocity", 0, 2, "finger_velocity"), ("touch",)),
        "positions": (("position",), ("touch",), ("target_position",), ("dist_to_target",)),
    },
    "walker": {"robot": FULL, "positions": (("orientations",), ("height",))},
    "cheetah": {"robot": FULL, "positions": (("position",),)},
    "hopper": {"robot": FULL, "positions": (("position",), ("touch",))},
    "pendulum": {"robot": FULL, "positions": (("orientation",),)},
    "acrobot": {"robot": FULL, "positions": (("orientations",),)},
    "point_mass": {"robot": FULL, "positions": (("position",),)},
    "lqr": {"robot": FULL, "positions": (("position",),)},
    "humanoid": {
        "robot": FULL,
        "positions": (
            ("joint_angles",),
            ("head_height",),
            ("extremities",),
            ("torso_vertical",),
            ("position",),
        ),
    },
    "swimmer": {"robot": (("joints",), ("body_velocities",)), "positions": (("joints",), ("to_target",))},
    "fish": {
        "robot": (("joint_angles",), ("upright",), ("velocity",)),
        "positions": (("joint_angles",), ("upright",), ("target",)),
    },
    "manipulator": {
        "robot": (("arm_pos",), ("arm_vel",), ("touch",), ("hand_pos",)),
        "positions": (("arm_pos",), ("touch",), ("hand_pos",), ("object_pos",), ("target_pos",)),
    },
    "stacker": {
        "robot": (("arm_pos",), ("arm_vel",), ("touch",), ("hand_pos",)),
        "positions": (("arm_pos",), ("touch",), ("hand_pos",), ("box_pos",), ("target_pos",)),
    },
}


def valid_modes(domain: str) -> tuple[str, ...]:
    return ("full", *DOMAIN_MODES.get(domain, {}))


def full_layout(sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """{sensor: size} in dm_control's order -> {sensor: (start, stop)} in the flattened vector."""
    layout, start = {}, 0
    for name, size in sizes.items():
        layout[name] = (start, start + size)
        start += size
    return layout


def select(domain: str, task: str, mode: str, sizes: dict[str, int]):
    """(indices into the full flattened vector, layout of the kept vector) for one task and mode."""
    if mode not in PROPRIO_MODES:
        raise ValueError(f"unknown proprio mode {mode!r}; valid choices: {list(PROPRIO_MODES)}")
    modes = valid_modes(domain)
    if mode not in modes:
        raise ValueError(
            f"proprio mode {mode!r} is not defined for {domain}-{task}; valid choices: {list(modes)}"
        )
    full = full_layout(sizes)
    keeps = DOMAIN_MODES.get(domain, {}).get(mode, FULL)
    if keeps == FULL:
        return np.arange(sum(sizes.values())), full
    indices, layout = [], {}
    for keep in keeps:
        sensor = keep[0]
        if sensor not in full:
            continue  # an entry this task does not return
        begin, end = full[sensor]
        start, stop, name = (keep[1], keep[2], keep[3]) if len(keep) == 4 else (0, end - begin, sensor)
        layout[name] = (len(indices), len(indices) + stop - start)
        indices.extend(range(begin + start, begin + stop))
    if not indices:
        raise ValueError(f"proprio mode {mode!r} keeps nothing of {domain}-{task}'s sensors {list(sizes)}")
    return np.asarray(indices), layout


def sensed_parts(layout: dict[str, tuple[int, int]], sensed: np.ndarray) -> dict[str, np.ndarray]:
    """The sensors of `layout` (the full flattened vector) that a mode keeps only in part, split in two:
    {'<sensor>_sensed': indices kept, '<sensor>_unsensed': indices removed}, in the full vector. For state probes:
    under `--proprio robot` on ball_in_cup, position_sensed is the cup's (x, z), position_unsensed the ball's,
    which only the camera shows. Sensors kept whole or removed whole are not split (their own entry says it)."""
    parts = {}
    for name, (start, stop) in layout.items():
        inside = np.intersect1d(np.arange(start, stop), sensed)
        if 0 < len(inside) < stop - start:
            parts[f"{name}_sensed"] = inside
            parts[f"{name}_unsensed"] = np.setdiff1d(np.arange(start, stop), sensed)
    return parts


def describe(domain: str, task: str, sizes: dict[str, int]) -> dict[str, list[str]]:
    """{mode: [kept sensor names]}, the README table's row for a task."""
    return {mode: list(select(domain, task, mode, sizes)[1]) for mode in valid_modes(domain)}
