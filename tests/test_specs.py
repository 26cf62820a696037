"""The studies' sweep specs are their single source of truth: every trial resolves to a valid training config,
run names come from the spec's template, and `--print-commands` prints what the study scripts run."""

import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import config as cfg
from experiments.sweeping import load_spec, trials

SPECS = sorted((Path(__file__).parents[1] / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_trial_of_every_spec_is_a_valid_training_run(path):
    spec = load_spec(path)
    if spec.search:
        pytest.skip("a search space: trials are sampled while it runs")
    from experiments.sweeping import train_args

    for name, settings in trials(spec):
        args = cfg.build_parser("t").parse_args([*train_args(settings), "--run-name", name])
        config = cfg.resolve(args)  # validates: e.g. Perceiver options given to an SB3 agent are refused
        assert config.run_name == name


def test_run_names_come_from_the_template_and_labels(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nrun_name: 'x-{label}-s{seed}'\nvariants:\n  - {label: a, policy_type: perceiver}\n"
        "  - {label: b, policy_type: sb3}\ngrid:\n  seed: [0, 1]\nbase:\n  task: cartpole-balance\n"
    )
    names = [name for name, _ in trials(load_spec(path))]
    assert names == ["x-a-s0", "x-a-s1", "x-b-s0", "x-b-s1"]
    path.write_text(
        "name: s\nrun_name: 'x-s{seed}'\nvariants:\n  - {label: a}\n  - {label: b}\ngrid:\n  seed: [0]\n"
    )
    with pytest.raises(ValueError, match=r"same name: \['x-s0'\]"):
        trials(load_spec(path))
    path.write_text("name: s\nrun_name: 'x-{policy}-s{seed}'\ngrid:\n  seed: [0]\n")
    with pytest.raises(ValueError, match=r"names 'policy', which this trial does not set"):
        trials(load_spec(path))


def test_print_commands_prints_the_study_scripts_jobs():
    spec = Path(__file__).parents[1] / "experiments" / "sweeps" / "latent-scaling.yaml"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.sweep", str(spec), "--print-commands", "--run-dir", "R", "--seeds", "7"],
        capture_output=True, text=True, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert len(out) == 5  # five variants x one seed
    argv = shlex.split(out[0])
    assert argv[0] == "experiments.train" and "latent_scaling=[4, 8, 16, 32]" in argv
    assert argv[-4:] == ["--run-dir", "R", "--run-name", "latents-swingup-scaled-s7"]


def test_print_commands_into_a_reader_that_stops_early_is_no_traceback():
    spec = Path(__file__).parents[1] / "experiments" / "sweeps" / "pixels-drq.yaml"
    reader = "import sys; print(sys.stdin.readline(), end='')"  # `| head -1`
    # 300 seeds: ≈ 1 MB of commands, more than a pipe holds, so the writer meets the closed end
    seeds = " ".join(map(str, range(300)))
    shell = (f"{shlex.quote(sys.executable)} -m experiments.sweep {spec} --print-commands --seeds {seeds} | "
             f"{shlex.quote(sys.executable)} -c {shlex.quote(reader)}")  # fmt: skip
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("experiments.train ") and out.stdout.count("\n") == 1
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr
