"""experiments.report: tables from run directories, statistics as rliable computes them."""

import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import config as cfg
from experiments.reporting import find_runs, method_name, write_report

pytest.importorskip("rliable")


def fake_run(root, name, task, policy_type, returns, frames_per_eval=10_000):
    run = root / name
    (run / "eval").mkdir(parents=True)
    budget = len(returns) * frames_per_eval // 8  # agent steps at action repeat 8: the run reached its budget
    cfg.save(
        cfg.TrainConfig(
            task=task,
            algorithm="sac",
            policy_type=policy_type,
            modalities=["pixels"],
            action_repeat=8,
            total_steps=budget,
        ),  # fmt: skip
        run / "config.yaml",
    )
    rows = ["step,frames,return_mean"] + [
        f"{(i + 1) * frames_per_eval // 8},{(i + 1) * frames_per_eval},{value}"
        for i, value in enumerate(returns)
    ]
    (run / "eval" / "history.csv").write_text("\n".join(rows) + "\n")
    return run


def test_report_statistics_are_rliable_on_the_same_scores(tmp_path):
    from rliable import library as rly
    from rliable import metrics

    rng = np.random.default_rng(0)
    finals = {}
    for task in ("cartpole-swingup", "walker-walk"):
        for policy_type, level in (("perceiver", 600), ("sb3", 400)):
            for seed in range(5):
                final = float(level + rng.normal(0, 100))
                finals.setdefault(policy_type, {}).setdefault(task, []).append(final)
                fake_run(
                    tmp_path / "sweep", f"{task}-{policy_type}-s{seed}", task, policy_type, [100.0, final]
                )
    (tmp_path / "sweep" / "not-a-run").mkdir()  # ignored
    report = write_report(find_runs([tmp_path / "sweep"]), tmp_path / "out", reps=500).read_text()
    assert (tmp_path / "out" / "performance_profile.png").stat().st_size > 1000
    assert (tmp_path / "out" / "curves.png").stat().st_size > 1000
    scores = {}  # {method: (seeds, tasks) returns / 1000}, tasks in the report's (sorted) order
    for policy_type, per_task in finals.items():
        config = cfg.TrainConfig(algorithm="sac", policy_type=policy_type, modalities=["pixels"], action_repeat=8,
                                 total_steps=2500)  # fmt: skip
        scores[method_name(config)] = (
            np.array([per_task["cartpole-swingup"], per_task["walker-walk"]]).T / 1000
        )

    def all_four(x):
        return np.array([metrics.aggregate_iqm(x), metrics.aggregate_median(x), metrics.aggregate_mean(x),
                         metrics.aggregate_optimality_gap(x)])  # fmt: skip

    for method in scores:
        np.random.seed(0)  # as the report does: arch draws from NumPy's global RNG too
        points, intervals = rly.get_interval_estimates(
            {method: scores[method]}, all_four, reps=500, random_state=np.random.RandomState(0)
        )
        row = next(line for line in report.splitlines() if line.startswith(f"| {method} | 5×2 |"))
        iqm, low, high = map(float, re.search(r"\| ([\d.]+) \[([\d.]+), ([\d.]+)\] \|", row).groups())
        assert iqm == pytest.approx(points[method][0], abs=5e-4)
        assert (low, high) == (
            pytest.approx(intervals[method][0, 0], abs=5e-4),
            pytest.approx(intervals[method][1, 0], abs=5e-4),
        )
    per_seed = ", ".join(f"{v:.1f}" for v in finals["sb3"]["walker-walk"])
    assert per_seed in report


def test_runs_pool_only_when_agent_and_protocol_are_equal(tmp_path):
    from experiments.plot import label

    base = dict(task="cartpole-swingup", algorithm="sac", modalities=["pixels"])
    key = method_name(cfg.TrainConfig(**base))
    assert method_name(cfg.TrainConfig(**base, seed=3, device="cuda")) == key  # seeds and devices pool
    for change in ({"init_from": "runs/src", "finetune": "lora"}, {"total_steps": 5000}, {"action_repeat": 2},
                   {"perceiver": {"dropout": 0.1}}, {"algo": {"batch_size": 512}}, {"recipe": "drq"},
                   {"env_modality_dropout": 0.2}):  # fmt: skip
        assert method_name(cfg.TrainConfig(**{**base, **change})) != key, change
    assert label(cfg.TrainConfig(**base)) == f"cartpole-swingup {key}"  # plot and report: one key
    fake_run(tmp_path, "full", "cartpole-swingup", "perceiver", [100.0, 200.0])
    cut = fake_run(tmp_path, "cut", "cartpole-swingup", "perceiver", [100.0])
    cfg.save(cfg.TrainConfig(task="cartpole-swingup", algorithm="sac", modalities=["pixels"], action_repeat=8,
                             total_steps=2500), cut / "config.yaml")  # fmt: skip
    with pytest.warns(UserWarning, match="cut"):
        runs = find_runs([tmp_path])
    assert [run.path.name for run in runs] == ["full"]


def test_report_errors_name_the_path(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        find_runs([tmp_path / "missing"])
    with pytest.raises(ValueError, match="no run with an evaluation history"):
        find_runs([tmp_path])


def test_plot_legend_keeps_what_differs_and_the_title_what_is_shared():
    from experiments.plot import split_common_prefix

    common, short = split_common_prefix(["swingup ppo [proprio] Perceiver", "swingup ppo [proprio] SB3 MLP"])
    assert common == "swingup ppo [proprio]" and short == ["Perceiver", "SB3 MLP"]
    assert split_common_prefix(["a b", "a b c"]) == ("a", ["b", "b c"])  # never an empty label
    assert split_common_prefix(["only one"]) == ("", ["only one"])


def test_plot_keeps_runs_on_another_device_apart():
    from experiments import config as cfg
    from experiments.plot import label

    cpu = cfg.TrainConfig(task="cartpole-swingup", seed=0)
    assert label(cfg.TrainConfig(task="cartpole-swingup", seed=1)) == label(cpu)  # seeds share a curve
    assert label(cfg.TrainConfig(task="cartpole-swingup", device="cuda")) == label(cpu) + " on CUDA"
    assert label(cfg.TrainConfig(task="cartpole-swingup", device="cuda"), by_device=False) == label(cpu)


def seed_runs(tmp_path, monkeypatch, devices: tuple[str, ...], curves: list[tuple[list, list]]) -> list:
    """One cartpole-swingup run directory per seed (its config only); `experiments.plot` reads `curves[seed]`
    as its (steps, values) instead of TensorBoard events. Returns the directories; `curves` stays editable."""
    from experiments import plot as plot_module

    runs = []
    for seed, device in enumerate(devices):
        run_dir = tmp_path / f"run-s{seed}"
        run_dir.mkdir()
        cfg.save(cfg.TrainConfig(task="cartpole-swingup", seed=seed, device=device), run_dir / "config.yaml")
        runs.append(run_dir)
    monkeypatch.setattr(
        plot_module, "read_scalars", lambda run_dir, tag: tuple(map(np.array, curves[runs.index(run_dir)]))
    )
    return runs


def test_plot_merge_devices_pools_the_seeds_into_one_curve(tmp_path, monkeypatch):
    from experiments import plot as plot_module

    curves = [([1, 2], [10.0, 20.0]), ([1, 2], [30.0, 40.0])]
    runs = seed_runs(tmp_path, monkeypatch, ("cpu", "cuda"), curves)
    assert len(plot_module.group_runs(runs)) == 2
    assert [len(v) for v in plot_module.group_runs(runs, by_device=False).values()] == [2]
    grouped = []
    real_group_runs = plot_module.group_runs
    monkeypatch.setattr(
        plot_module, "group_runs", lambda *a: grouped.append(real_group_runs(*a)) or grouped[-1]
    )
    assert (
        plot_module.main([str(r) for r in runs] + ["--merge-devices", "--out", str(tmp_path / "c.png")]) == 0
    )
    assert [len(v) for v in grouped[-1].values()] == [2] and (tmp_path / "c.png").stat().st_size > 0
    assert plot_module.main([str(r) for r in runs] + ["--out", str(tmp_path / "d.png")]) == 0
    assert [len(v) for v in grouped[-1].values()] == [1, 1]


def test_plot_says_when_a_cut_seed_shortens_the_curve(tmp_path, monkeypatch, capsys):
    from experiments import plot as plot_module

    curves = [([1, 2, 3], [1.0, 2.0, 3.0]), ([1, 2], [1.0, 2.0])]
    runs = seed_runs(tmp_path, monkeypatch, ("cpu", "cpu"), curves)
    plot_module.plot(runs, tmp_path / "c.png")
    repeat = cfg.TrainConfig(task="cartpole-swingup").action_repeat
    assert f"stops at {2 * repeat} frames, where {runs[1]} ends" in capsys.readouterr().err
    curves[1] = ([1, 2, 3], [1.0, 2.0, 3.0])
    plot_module.plot(runs, tmp_path / "d.png")
    assert "warning" not in capsys.readouterr().err


def test_hand_given_scores_get_rliable_intervals_and_name_their_errors(tmp_path, capsys):
    pytest.importorskip("rliable")
    from experiments.reporting import score_table

    text = score_table({"c": {"a": {"t": [100.0, 200.0, 300.0]}, "b": {"t": [50.0]}}}, reps=200)
    row = next(line for line in text.splitlines() if "| a |" in line)
    assert "| 3 | 200.0 ± 100.0 |" in row  # sample std (ddof = 1)
    low, high = (float(v) for v in row.split("|")[7].split("[")[1].rstrip("] ").split(","))
    assert 100.0 <= low <= 200.0 <= high <= 300.0
    assert "– (one seed)" in next(line for line in text.splitlines() if "| b |" in line)
    with pytest.raises(ValueError, match=r"agent 'b' has tasks \['u'\], the others \['t'\]"):
        score_table({"c": {"a": {"t": [1.0, 2.0]}, "b": {"u": [1.0, 2.0]}}})
    path = tmp_path / "s.yaml"
    path.write_text("c: {a: {t: [100, 200]}, b: {t: [300, 400]}}\n")
    out = subprocess.run([sys.executable, "-m", "experiments.report", "--scores", str(path), "--reps", "200"],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert "| c | b | t | 2 | 350.0 ± 70.7 |" in out
    from experiments.report import main

    assert main(["--scores", str(tmp_path / "absent.yaml")]) == 2
    assert "--scores file '" in capsys.readouterr().err
    run = tmp_path / "run"
    assert main([str(run), "--out", str(tmp_path / "out"), "--baselines", str(tmp_path / "none.yaml")]) == 2
    err = capsys.readouterr().err
    assert "--baselines file '" in err and "none.yaml' not found; give a YAML of published rows" in err


def test_a_generalist_counts_once_per_task_beside_the_single_task_runs(tmp_path):
    tasks = ["cartpole-swingup", "walker-walk"]
    generalist = dict(algorithm="sac", modalities=["proprio"], action_repeat=4, tasks=tasks, total_steps=500)
    for seed, (active, finals) in enumerate([("uniform", (700.0, 100.0)), ("uniform", (500.0, 300.0)),
                                             ("active", (600.0, 200.0))]):  # fmt: skip
        run = tmp_path / f"mt-{active}-s{seed}"
        (run / "eval").mkdir(parents=True)
        cfg.save(cfg.TrainConfig(**generalist, task_sampler=active, seed=seed), run / "config.yaml")
        (run / "eval" / "history.csv").write_text(f"step,frames,return_mean\n500,2000,{sum(finals) / 2}\n")
        rows = [f"500,2000,{task},{value},{value / 800:.4f},0.5" for task, value in zip(tasks, finals)]
        (run / "eval" / "tasks.csv").write_text(
            "step,frames,task,return_mean,normalized_return,weight\n" + "\n".join(rows) + "\n"
        )
    for task, value in zip(tasks, (650.0, 150.0)):  # one single-task agent, run once per task
        run = tmp_path / f"single-{task}"
        (run / "eval").mkdir(parents=True)
        cfg.save(cfg.TrainConfig(task=task, algorithm="sac", modalities=["proprio"], action_repeat=4,
                                 total_steps=250), run / "config.yaml")  # fmt: skip
        (run / "eval" / "history.csv").write_text(f"step,frames,return_mean\n250,1000,{value}\n")
    lone = tmp_path / "lone"  # a body alone in the layout (fixed weights): its own task, not the pooled mean
    (lone / "eval").mkdir(parents=True)
    cfg.save(cfg.TrainConfig(**{**generalist, "total_steps": 250}, task="walker-walk", task_sampler="fixed",
                             task_weights="walker-walk=1"), lone / "config.yaml")  # fmt: skip
    (lone / "eval" / "history.csv").write_text("step,frames,return_mean\n250,1000,90\n")
    runs = find_runs([tmp_path])
    by = {(r.path.name, r.task): r.score for r in runs}
    assert by[("mt-uniform-s1", "walker-walk")] == 300.0 and by[("mt-active-s2", "cartpole-swingup")] == 600.0
    assert by[("lone", "walker-walk")] == 90.0 and ("lone", "cartpole-swingup") not in by
    methods = {r.path.name: r.method for r in runs}
    assert methods["mt-uniform-s0"] == methods["mt-uniform-s1"] != methods["mt-active-s2"]
    assert "sampler=active" in methods["mt-active-s2"] and "2k frames over 2 tasks" in methods["mt-active-s2"]
    assert methods["single-walker-walk"] == methods["single-cartpole-swingup"]
    assert "in the layout of 2 tasks" in methods["lone"]
    report = write_report(runs, tmp_path / "out", reps=200).read_text()
    aggregate = report.split("## Across tasks (cartpole-swingup, walker-walk)")[1]
    assert f"| {methods['mt-uniform-s0']} | 2×2 |" in aggregate  # seeds × tasks
    assert f"| {methods['single-walker-walk']} | 1×2 |" in aggregate
    assert "Left out (not run on every one of these tasks): " + methods["lone"] in aggregate
    with pytest.warns(UserWarning, match="cut"):  # a generalist cut before its budget is not a final score
        cfg.save(
            cfg.TrainConfig(**{**generalist, "total_steps": 1000}), tmp_path / "mt-active-s2" / "config.yaml"
        )
        assert "mt-active-s2" not in {r.path.name for r in find_runs([tmp_path])}
    (tmp_path / "mt-uniform-s0" / "eval" / "tasks.csv").write_text("step,frames,return_mean\n500,2000,1\n")
    with pytest.raises(ValueError, match=r"tasks.csv: no column \['task'\]"):
        find_runs([tmp_path / "mt-uniform-s0"])
