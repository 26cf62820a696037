"""Every Python block of the README runs, as a user would run it: saved as a script, `python example.py`.

Budgets are shrunk by exact text substitutions (each must still be found in the README, so the test notices when
the README changes), nothing else is touched."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HANG_GUARD_S

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"
TINY_BUDGETS = {
    "model.learn(10_000)": "model.learn(64)",
    "n_steps=128": "n_steps=16",
    "buffer_size=100_000": "buffer_size=500",
    "learning_starts=1_000": "learning_starts=32",
    '{"num_latents": 64}': '{"num_latents": 8, "latent_dim": 32}',
}


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert python_blocks()


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_a_script(tmp_path, index):
    code = python_blocks()[index]
    for old, new in TINY_BUDGETS.items():
        if index == 0:
            assert old in code, f"README block changed: {old!r} not found; update TINY_BUDGETS"
        code = code.replace(old, new)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONPATH": str(README.parent)}
    result = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=HANG_GUARD_S,
        env=env,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


def readme_commands() -> dict[str, set[str]]:
    """{module: flags} of every `python -m experiments.<module> ...` command in the README's bash blocks
    (continuation lines joined)."""
    commands: dict[str, set[str]] = {}
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            match = re.search(r"python -m (experiments\.\w+)(.*)", line)  # comments too: flags they show
            if match:
                flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", match.group(2)))
                commands.setdefault(match.group(1), set()).update(flags)
    return commands


@pytest.mark.parametrize("module", sorted(readme_commands()))
def test_readme_commands_use_existing_flags(module):
    """A flag the README shows must be one the command accepts (its --help lists it)."""
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr[-2000:]
    missing = sorted(flag for flag in readme_commands()[module] if flag not in result.stdout)
    assert not missing, f"README shows {missing} for {module}, which --help does not list"
