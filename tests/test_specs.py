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


def test_a_variant_starts_from_another_specs_variant(tmp_path):
    (tmp_path / "a.yaml").write_text(
        "variants:\n  - {label: best, policy_type: perceiver, algo.lr_warmup: 100, perceiver.pixel_tokenizer: conv}\n"
        "  - {label: chained, from: a#best, algo.lr_warmup: 50}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "name: b\nrun_name: 'b-{label}-s{seed}'\nvariants:\n  - {from: a#best}\n"
        "  - {from: a#chained, label: slow, perceiver.num_latents: 16}\ngrid:\n  seed: [0]\n"
    )
    (name0, first), (name1, second) = trials(load_spec(tmp_path / "b.yaml"))
    assert name0 == "b-best-s0" and first == {"label": "best", "policy_type": "perceiver", "algo.lr_warmup": 100,
                                              "perceiver.pixel_tokenizer": "conv", "seed": 0}  # fmt: skip
    # resolved in turn, own keys overriding; the source's keys keep their order
    assert name1 == "b-slow-s0" and list(second) == [
        "label",
        "policy_type",
        "algo.lr_warmup",
        "perceiver.pixel_tokenizer",
        "perceiver.num_latents",
        "seed",
    ]
    assert (
        second["algo.lr_warmup"] == 50 and second["perceiver.num_latents"] == 16 and second["label"] == "slow"
    )
    for ref, message in [
        ("nope#best", r"no spec 'nope' in .*; valid: \['a', 'b', 'c'\]"),
        ("a#worst", r"a has no variant labelled 'worst'; valid: \['best', 'chained'\]"),
        ("a", r"must name SPEC#LABEL"),
        ("c#loop", r"cycle: c#loop -> c#loop"),
    ]:
        (tmp_path / "c.yaml").write_text(
            f"variants:\n  - {{label: loop, from: '{ref}'}}\ngrid:\n  seed: [0]\n"
        )
        with pytest.raises(ValueError, match=message):
            load_spec(tmp_path / "c.yaml")


def test_the_best_perceivers_settings_live_in_one_spec():
    """The specs that run the best pixels-only Perceiver read its settings from pixels-drq.yaml."""
    folder = Path(__file__).parents[1] / "experiments" / "sweeps"
    label = "perceiver-conv-online-queries-enc-lr0.3"
    best = next(v for v in load_spec(folder / "pixels-drq.yaml").variants if v["label"] == label)
    for name in ["pixels-drq-cup", "pixels-drq512", "study2-fuse-drq", "study2-fuse-drq-cup"]:
        assert f"from: pixels-drq#{label}" in (folder / f"{name}.yaml").read_text()
        assert next(v for v in load_spec(folder / f"{name}.yaml").variants if v["label"] == label) == best


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


def test_print_commands_reads_several_specs_in_one_process(capsys):
    """The GPU script reads every study's commands from one process: the specs' commands in the order given, each
    spec checked before any is printed; running (Ray) takes one spec."""
    from experiments.sweep import main

    folder = Path(__file__).parents[1] / "experiments" / "sweeps"
    one, other = folder / "latent-scaling.yaml", folder / "smoke.yaml"
    assert main([str(one), "--print-commands", "--seeds", "7"]) == 0
    first = capsys.readouterr().out.splitlines()
    assert main([str(other), "--print-commands", "--seeds", "7"]) == 0
    second = capsys.readouterr().out.splitlines()
    assert main([str(one), str(other), "--print-commands", "--seeds", "7"]) == 0
    assert capsys.readouterr().out.splitlines() == first + second
    assert main([str(one), str(folder / "absent.yaml"), "--print-commands"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and "sweep spec '" in out.err and "absent.yaml' not found" in out.err
    assert main([str(one), str(other)]) == 2
    assert "a sweep runs one spec, got 2" in capsys.readouterr().err


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


def test_a_sweep_names_the_trial_with_a_bad_value_before_it_runs_any(tmp_path):
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "run_name: 'bad-{label}'\nbase: {task: cartpole-swingup, modalities: [proprio]}\n"
        "variants: [{label: good}, {label: typo, policy_type: percieve}, {label: late, algo.n_steps: -3}]\n"
    )
    for extra in (["--print-commands"], []):  # the study scripts' path, and Ray's (refused before Ray starts)
        out = subprocess.run([sys.executable, "-m", "experiments.sweep", str(spec), *extra],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert out.returncode == 2 and out.stdout == "", out.stderr
        assert (
            "error: trial bad-typo: unknown policy_type 'percieve'; valid choices: ['perceiver'" in out.stderr
        )
