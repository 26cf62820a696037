import os

os.environ.setdefault("MUJOCO_GL", "egl")
# One torch (OpenMP) thread per test process and per command a test starts (they inherit it): `make test` runs
# two pytest-xdist workers on two cores, and two threads each oversubscribe them. Measured on the 2-core host
# beside two training runs: a tiny DrQ-recipe training command took 54.2 s with two threads, 16.8 s with one.
# Set OMP_NUM_THREADS yourself to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from gymnasium import spaces  # noqa: E402

import envs  # noqa: E402,F401  (registers dmc/ ids)

# A subprocess's time limit in the tests guards against a hang only, never against slowness: a loaded 2-core CI
# host ran the suite 3x slower than a quiet one, and one end-to-end run there took over 300 s.
HANG_GUARD_S = 3600
from envs import SensorBox  # noqa: E402


@pytest.fixture
def dict_space() -> spaces.Dict:
    """The default multimodal observation (small pixels to keep tests fast)."""
    return spaces.Dict(
        {
            "pixels": spaces.Box(0, 255, (9, 32, 32), np.uint8),
            "proprio": SensorBox(-np.inf, np.inf, (7,), np.float32, {"position": (0, 3), "velocity": (3, 7)}),
            "action_history": spaces.Box(-1, 1, (4, 2), np.float32),
        }
    )


def sample_obs(space: spaces.Dict, batch: int, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    out = {}
    for key, sub in space.spaces.items():
        if sub.dtype == np.uint8:
            out[key] = torch.as_tensor(rng.integers(0, 256, (batch, *sub.shape), dtype=np.uint8))
        else:
            out[key] = torch.as_tensor(rng.standard_normal((batch, *sub.shape)).astype(np.float32))
    return out
