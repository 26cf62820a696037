"""The state-regression benchmark: its R^2, its data and its plumbing (it reports no timing a test could assert)."""

import pytest
import torch

from experiments.benchmarks import estimator
from experiments.benchmarks.estimator import VARIANTS, Variant, bench_estimator, fit, r2_by_dim, square


def test_r2_is_one_for_the_target_zero_for_its_mean_and_negative_when_worse():
    target = torch.randn(100, 3)
    assert torch.allclose(r2_by_dim(target, target), torch.ones(3))
    assert torch.allclose(r2_by_dim(target.mean(0).expand(100, 3), target), torch.zeros(3), atol=1e-6)
    assert (r2_by_dim(-target, target) < 0).all()


def test_fit_learns_where_the_square_is_from_pixels_alone():
    result = fit(VARIANTS["cnn"], square(256, 0), square(128, 1), steps=60, evaluate_at=(1, 60),
                 batch_size=32, shift_pad=0)  # fmt: skip
    assert set(result["r2"]) == {1, 60} and result["params"] > 0
    assert result["r2"][60][0] > 0.9 and result["r2"][60][0] > result["r2"][1][0]  # the column is learned ...
    assert result["r2"][60][1] < 0.2  # ... the noise is not: R^2 is scored on held-out observations


def test_every_variant_builds_its_encoder_and_readout():
    data = square(8, 0)
    for name, variant in VARIANTS.items():
        result = fit(variant, data, data, steps=1, evaluate_at=(1,), batch_size=4)
        assert result["r2"][1].shape == (2,), name


def test_unknown_variants_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown estimator variants \['mlp'\]; valid choices: \['cnn'"):
        bench_estimator(variants=["mlp"])


def test_the_command_passes_its_steps_and_refuses_a_bad_count(monkeypatch):
    from experiments.benchmarks import cli

    seen = {}
    monkeypatch.setattr(
        estimator, "bench_estimator", lambda quick, variants, steps, task: seen.update(steps=steps, task=task)
    )
    cli.main(["estimator", "--variants", "cnn", "--steps", "1600"])
    assert seen == {"steps": 1600, "task": "cartpole-swingup"}
    with pytest.raises(ValueError, match=r"estimator steps must be a positive integer, got 0"):
        bench_estimator(variants=["cnn"], steps=0)


def test_the_command_refuses_a_bad_task_or_variant_before_collecting(monkeypatch, capsys):
    from experiments.benchmarks import cli

    def collect(*args, **kwargs):
        raise AssertionError("data collected before the arguments were checked")

    monkeypatch.setattr(estimator, "collect", collect)
    monkeypatch.setattr(estimator, "square", collect)
    assert cli.main(["estimator", "--variants", "cnn", "--task", "cartpole-swingupp"]) == 2
    err = capsys.readouterr().err
    assert "error: unknown task 'cartpole-swingupp'" in err and "'cartpole-swingup'" in err
    assert cli.main(["all", "--quick", "--variants", "mlp"]) == 2
    assert "error: unknown estimator variants ['mlp']; valid choices:" in capsys.readouterr().err


def test_the_table_has_one_row_per_variant(monkeypatch, capsys):
    monkeypatch.setattr(estimator, "collect", lambda count, seed, task: square(count, seed))
    monkeypatch.setattr(estimator, "square", lambda count, seed: square(16, seed))
    monkeypatch.setitem(
        VARIANTS, "tiny-perceiver", Variant("perceiver", {"num_latents": 4, "latent_dim": 16})
    )
    bench_estimator(variants=["cnn", "tiny-perceiver"], steps=4, observations=(16, 8))
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [row.split("|")[1].strip() for row in rows] == [
        "encoder",
        "cnn",
        "tiny-perceiver",
    ] * 2  # two tables
    assert "| 4 steps |" in rows[0] and "R^2 at 1 steps" in rows[3] and "R^2 at 4 steps" in rows[3]
    capsys.readouterr()
    monkeypatch.setitem(estimator.GROUPS, "stems", ("tiny-perceiver", "cnn"))
    bench_estimator(variants=["stems"], steps=4, observations=(16, 8))  # a group name: its variants, in order
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [row.split("|")[1].strip() for row in rows] == ["encoder", "tiny-perceiver", "cnn"] * 2


def test_reference_centred_latents_find_the_square_where_plain_latents_do_not_yet():
    train, test = square(256, 0), square(128, 1)
    runs = {name: fit(VARIANTS[name], train, test, steps=25, evaluate_at=(25,), batch_size=32, shift_pad=0, seed=1)
            for name in ("perceiver-patch", "perceiver-patch-reference")}  # fmt: skip
    assert runs["perceiver-patch-reference"]["r2"][25][0] > 0.5 > runs["perceiver-patch"]["r2"][25][0]


def test_a_variants_warmup_ramps_its_learning_rate_linearly(monkeypatch):
    rates, step = [], torch.optim.Adam.step
    monkeypatch.setattr(
        torch.optim.Adam,
        "step",
        lambda self, *a, **k: (rates.append(self.param_groups[0]["lr"]), step(self, *a, **k))[1],
    )
    data = square(8, 0)
    fit(Variant("cnn", lr=1e-3, warmup=4), data, data, steps=6, evaluate_at=(6,), batch_size=4)
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert (
        "perceiver-patch-warmup" in estimator.GROUPS["warmup"]
        and "perceiver-patch-warmup" not in estimator.DEFAULT
    )
    assert {"cnn", "perceiver-patch", "perceiver-patch-reference"} <= set(
        estimator.DEFAULT
    )  # the group's baselines


def test_the_encoder_learns_at_its_scale_of_the_rate(monkeypatch):
    groups = []
    adam = torch.optim.Adam

    def recording(params, **kwargs):
        groups.extend((len(g["params"]), g["lr"]) for g in params)
        return adam(params, **kwargs)

    monkeypatch.setattr(estimator.torch.optim, "Adam", recording)
    data = square(8, 0)
    fit(Variant("cnn", encoder_lr_scale=0.3), data, data, steps=1, evaluate_at=(1,), batch_size=4)
    (encoder, encoder_lr), (rest, rest_lr) = groups
    assert encoder_lr == pytest.approx(0.3e-3) and rest_lr == pytest.approx(1e-3) and encoder > 0 and rest > 0
