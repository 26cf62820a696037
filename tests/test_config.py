"""The training config: frames vs agent steps, renamed fields, what --resume may change."""

import pytest
from conftest import HANG_GUARD_S

from experiments import config as cfg


def resolve(*argv):
    return cfg.resolve(cfg.build_parser("test").parse_args(list(argv)))


def test_presets_state_frequencies_in_frames():
    config = resolve("--preset", "cartpole-swingup-pixels")  # action repeat 8
    assert (config.total_steps, config.eval_freq, config.checkpoint_freq) == (12_500, 2_000, 1_000)
    config = resolve("--preset", "cartpole-swingup-pixels", "--action-repeat", "4")
    assert (config.total_steps, config.eval_freq) == (25_000, 4_000)  # the same frames at another repeat
    config = resolve("--preset", "cartpole-swingup-pixels", "--eval-freq", "100")
    assert config.eval_freq == 100 and config.eval_every_frames is None  # an explicit step count wins


def test_a_preset_may_be_a_yaml_file_such_as_a_runs_config(tmp_path):
    """`--preset FILE.yaml` reads TrainConfig fields from a file: a run's saved config.yaml gives that run's settings
    back (a new run: its run_name is dropped), flags override the file, and bad files are named."""
    from experiments.train import default_run_name

    run = resolve("--preset", "cartpole-swingup-pixels", "--seed", "3", "--perceiver", "num_latents=16",
                  "--run-name", "first")  # fmt: skip
    saved = tmp_path / "first" / "config.yaml"  # where the run wrote it
    saved.parent.mkdir()
    cfg.save(run, saved)
    again = resolve("--preset", str(saved))
    assert again.run_name is None and again.preset == str(saved)
    skip = {"run_name", "preset"}
    assert {k: v for k, v in again.to_dict().items() if k not in skip} == {
        k: v for k, v in run.to_dict().items() if k not in skip
    }
    assert default_run_name(again).startswith("first-s3-")  # named after the run it came from
    other = resolve("--preset", str(saved), "--seed", "4", "--perceiver", "num_latents=8")
    assert other.seed == 4 and other.perceiver["num_latents"] == 8 and other.task == "cartpole-swingup"
    mine = tmp_path / "mine.yml"
    mine.write_text("task: walker-walk\nalgorithm: sac\n")
    assert resolve("--preset", str(mine)).task == "walker-walk"
    assert default_run_name(resolve("--preset", str(mine), "--seed", "2")).startswith("mine-s2-")
    # a run's folder loses its seed and time; the policy type is not named twice
    timed = tmp_path / "cup-cnn-s0-20261206-101010" / "config.yaml"
    timed.parent.mkdir()
    cfg.save(resolve("--preset", "ball_in_cup-catch-pixels", "--policy-type", "cnn"), timed)
    assert default_run_name(resolve("--preset", str(timed), "--seed", "1")).startswith("cup-cnn-s1-")
    assert default_run_name(resolve("--preset", str(timed), "--policy-type", "drq-cnn")).startswith(
        "cup-cnn-drq-cnn-s0-"
    )
    with pytest.raises(
        ValueError, match=r"preset file '.*absent.yaml' not found; .*'cartpole-swingup-pixels'"
    ):
        resolve("--preset", str(tmp_path / "absent.yaml"))
    mine.write_text("- task\n")
    with pytest.raises(ValueError, match="must be a mapping of TrainConfig fields .*got list"):
        resolve("--preset", str(mine))
    mine.write_text("tsak: walker-walk\n")
    with pytest.raises(ValueError, match=r"unknown config fields \['tsak'\]"):
        resolve("--preset", str(mine))
    with pytest.raises(
        ValueError, match="unknown preset 'cartpole-swingp'; valid choices: .*ending in .yaml / .yml"
    ):
        resolve("--preset", "cartpole-swingp")


def test_renamed_modality_dropout_fields_still_load():
    from perceiver_policy import PerceiverConfig

    assert cfg.from_dict({"modality_dropout": 0.2}).env_modality_dropout == 0.2  # an old config.yaml
    assert resolve("--modality-dropout", "0.3").env_modality_dropout == 0.3  # an old command line
    assert PerceiverConfig.from_dict({"modality_dropout": 0.1}).encoder_modality_dropout == 0.1
    assert not hasattr(cfg.TrainConfig(), "modality_dropout")


def test_resume_applies_safe_flags_and_refuses_the_rest():
    config = resolve("--preset", "cartpole-swingup-pixels")
    args = cfg.build_parser("t").parse_args(
        ["--total-steps", "20000", "--eval-freq", "500", "--device", "cpu"]
    )
    applied = config.apply_resume_flags(cfg.given_fields(args))
    assert applied == ["device", "eval_freq", "total_steps"]
    assert (config.total_steps, config.eval_freq, config.device) == (20_000, 500, "cpu")
    assert config.total_frames is None and config.eval_every_frames is None
    args = cfg.build_parser("t").parse_args(
        ["--seed", "3", "--perceiver", "num_latents=8", "--eval-freq", "9"]
    )
    with pytest.raises(ValueError, match=r"cannot change --perceiver, --seed \(start a new run instead\)"):
        config.apply_resume_flags(cfg.given_fields(args))
    assert config.seed == 0 and config.eval_freq == 500  # nothing applied when anything is refused


@pytest.mark.parametrize("variable", ["PERCEIVER_RL_SYSTEM_MALLOC", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_"])
def test_allocator_tuning_leaves_a_users_allocator_choice_alone(monkeypatch, variable):
    from experiments.runtime import keep_freed_memory

    monkeypatch.setenv(variable, "1")
    assert keep_freed_memory() is False


def test_allocator_tuning_applies_on_glibc(monkeypatch):
    import platform

    from experiments.runtime import USER_SETTINGS, keep_freed_memory

    for variable in USER_SETTINGS:
        monkeypatch.delenv(variable, raising=False)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is expected


def test_optimizers_build_and_load_without_importing_dynamo_until_it_is_imported():
    """A command's optimizers are built and their state loaded without torch._dynamo (3.5 s of a tiny evaluate);
    once something imports it, torch's own wrappers take the methods back."""
    code = (
        "import sys, torch\n"
        "from experiments.runtime import DYNAMO_WRAPPED_OPTIMIZER_METHODS, defer_dynamo_import\n"
        "assert defer_dynamo_import()\n"
        "layer = torch.nn.Linear(2, 1)\n"
        "opt = torch.optim.Adam(layer.parameters())\n"
        "opt.add_param_group({'params': [torch.nn.Parameter(torch.zeros(1))]})\n"
        "layer(torch.ones(1, 2)).sum().backward()\n"
        "opt.load_state_dict(opt.state_dict()); opt.zero_grad()\n"
        "assert layer.weight.grad is None\n"
        "assert 'torch._dynamo' not in sys.modules, 'imported'\n"
        "import torch._dynamo\n"
        "opt.load_state_dict(opt.state_dict()); opt.zero_grad()\n"
        "for name in DYNAMO_WRAPPED_OPTIMIZER_METHODS[1:]:\n"
        "    cached = getattr(getattr(torch.optim.Optimizer, name).__wrapped__, '__dynamo_disable')\n"
        "    assert cached.__module__.startswith('torch'), (name, cached)\n"
    )
    runs_cleanly(code)


def test_drq_recipe_takes_drqs_action_repeat_unless_one_is_given():
    assert resolve("--algorithm", "sac", "--recipe", "drq", "--task", "walker-walk").action_repeat == 2
    assert resolve("--algorithm", "sac", "--recipe", "drq", "--task", "cartpole-swingup").action_repeat == 8
    given = resolve("--algorithm", "sac", "--recipe", "drq", "--task", "walker-walk", "--action-repeat", "4")
    assert given.action_repeat == 4
    assert (
        resolve("--algorithm", "sac", "--task", "walker-walk").action_repeat == 4
    )  # the sb3 recipe: unchanged


def test_pixel_presets_are_drqs_recipe_at_drqs_action_repeat():
    from agents import DRQ_ACTION_REPEAT

    for name in (n for n in cfg.list_presets() if n.endswith("-pixels") and "balance" not in n):
        config = resolve("--preset", name)
        assert config.recipe == "drq" and config.algorithm == "sac", name
        assert config.action_repeat == DRQ_ACTION_REPEAT[config.task.split("-")[0]], name
        assert "learning_rate" not in config.algo and "tau" not in config.algo, name  # DrQ's values stand


def test_help_gives_each_flag_its_docstring_and_one_default():
    import dataclasses

    missing = [f.name for f in dataclasses.fields(cfg.TrainConfig) if f.name not in cfg.field_docs()]
    assert not missing, f"TrainConfig fields without a docstring (their --help would be empty): {missing}"
    text = cfg.build_parser("t").format_help()
    assert "(default: None) (default" not in text and "(default X)" not in text
    assert "Choices: full|robot|positions." in " ".join(text.split())
    assert "Choices: sb3|drq." in " ".join(text.split())


@pytest.mark.parametrize("policy_type", ["sb3", "lstm", "cnn", "drq-cnn"])
def test_options_only_the_perceiver_honours_are_refused_for_other_policies(policy_type):
    recipe = "sb3" if policy_type == "sb3" else "drq"
    algorithm = (
        ["--algorithm", "ppo"] if policy_type == "lstm" else ["--algorithm", "sac", "--recipe", recipe]
    )
    base = ["--policy-type", policy_type, *algorithm]
    with pytest.raises(ValueError, match=f"policy_type '{policy_type}' has none"):
        resolve(*base, "--perceiver", "num_latents=8")
    with pytest.raises(ValueError, match="env_modality_dropout needs policy_type 'perceiver'"):
        resolve(*base, "--env-modality-dropout", "0.2")
    with pytest.raises(ValueError, match="curriculum needs policy_type 'perceiver'"):
        resolve(*base, "--curriculum", "[{step: 0, modalities: [proprio]}]")
    if policy_type != "lstm":  # a preset's Perceiver block is dropped, not refused
        assert resolve("--preset", "cartpole-swingup-pixels", *base).perceiver == {}


def runs_cleanly(code: str) -> None:
    """`code` run by a fresh Python process exits 0 (its stderr shown if not)."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=HANG_GUARD_S
    )
    assert result.returncode == 0, result.stderr[-2000:]


def test_importing_the_commands_leaves_the_process_alone():
    """Only running a command tunes its process (experiments.runtime); importing any module does not."""
    code = (
        "import experiments.runtime as r\n"
        "def boom(*a, **k): raise SystemExit('the process was tuned on import')\n"
        "r.keep_freed_memory = r.defer_dynamo_import = r.prepare_process = boom\n"
        "import experiments.train, experiments.evaluate, experiments.benchmark, experiments.export, experiments.plot\n"
        "import experiments.report, experiments.distill, experiments.average\n"
    )
    runs_cleanly(code)


def test_key_values_read_exponent_floats_as_numbers():
    config = resolve(
        "--task", "cartpole-swingup", "--algorithm", "sac", "--algo", "learning_rate=3e-4", "tau=1E-2"
    )
    assert config.algo == {"learning_rate": 3e-4, "tau": 1e-2}
    assert cfg.load_yaml("[1e-3, 2, 1.5, abc, 1e]") == [1e-3, 2, 1.5, "abc", "1e"]


def test_fine_tuning_is_refused_under_drqs_recipe_before_a_run_starts(tmp_path):
    source = ("--init-from", str(tmp_path))  # checked after the recipe: no run needed to see the refusal
    with pytest.raises(
        ValueError, match=r"finetune 'lora' trains the policies of recipe 'sb3', got recipe 'drq'"
    ):
        resolve("--preset", "cartpole-swingup-pixels", "--finetune", "lora", *source)


def test_centring_is_checked_before_a_run_starts():
    pixels = ("--preset", "cartpole-swingup-pixels", "--modalities", "pixels")
    assert resolve(*pixels, "--policy", "center_features=reference").policy == {
        "center_features": "reference"
    }
    for argv, message in (
        (("--policy", "center_features=mean"), r"center_features 'mean' unknown; valid choices: \['none'"),
        (("--policy-type", "cnn", "--policy", "center_features=reference"), "policy_type 'cnn' takes 'running'"),
        (("--recipe", "sb3", "--policy", "center_features=true"),
         r"a setting of the DrQ recipe's readouts; sac with recipe 'sb3' takes 'reference' or 'none'"),
        (("--recipe", "sb3", "--policy-type", "sb3", "--policy", "center_features=none"),
         "policy_type 'sb3' takes no center_features"),
        (("--algorithm", "ppo", "--recipe", "sb3", "--policy", "center_features=running"),
         "readouts; ppo takes 'reference' or 'none'"),
    ):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            resolve(*pixels, *argv)
    # 'reference' under every recipe and algorithm, with modalities withheld per sample
    for argv in (
        ("--recipe", "sb3"),
        ("--algorithm", "ppo", "--recipe", "sb3"),
        ("--env-modality-dropout", "0.2"),
    ):
        assert (
            resolve(*pixels, *argv, "--policy", "center_features=reference").policy["center_features"]
            == "reference"
        )
    with pytest.raises(ValueError, match=r"a multi-task run \(cartpole-swingup walker-walk\) takes 'none'"):
        resolve("--algorithm", "sac", "--modalities", "proprio", "action_history", "--tasks", "cartpole-swingup",
                "walker-walk", "--policy", "center_features=reference")  # fmt: skip
