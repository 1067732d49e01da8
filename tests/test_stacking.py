"""Stacked heads (classifiers/stacking.py): a method's trials fitted in one pass end as each would
alone, the tuned sweep stacks them (and --no-stack does not), and the stacks respect their budget."""
import json
import math

import numpy as np
import pytest
import torch

from classifiers import REGISTRY, create
from classifiers.records import load_records
from classifiers.stacking import fit_together, stack_groups, stack_key
from classifiers.training import TrialStack, cosine_lr
from classifiers.tuning import method_trials
from cli import lt_cls_cmd
from cli.lt_cls_cmd import main as lt_cls
from classifiers.training import DEFAULT_MEMORY_BUDGET
from tests.conftest import invoke
from tests.synthetic import import_entry, long_tailed_features

STACKABLE = tuple(name for name, cls in REGISTRY.items() if getattr(cls, "stackable", False))


@pytest.fixture(scope="module")
def data():
    return long_tailed_features(num_classes=20, dim=24, max_count=400, imbalance=50, test_per_class=100, seed=3)


def fit_kwargs(data):
    return {"class_counts": data["counts"], "classifier": (data["W"], data["b"]), "val": data["val"]}


def separately_and_together(name, trials, data, tile=None, **extra):
    X, y = data["train"]
    alone = [create(name, **p, device="cpu").fit(X, y, **fit_kwargs(data), **extra) for p in trials]
    together = fit_together([create(name, **p, device="cpu") for p in trials], X, y, **fit_kwargs(data), tile=tile,
                            **extra)
    return alone, together


def assert_same_fits(alone, together, X_test, exact=True):
    """Equal to the float32 tolerance of the issue; ``exact``: bit for bit (the CPU's one trial per
    matmul runs each trial's own arithmetic in its own order; a whole-stack matmul may round otherwise)."""
    for a, b in zip(alone, together):
        la, lb = a.logits(X_test), b.logits(X_test)
        assert (la.argmax(1) == lb.argmax(1)).mean() >= 0.999, a.get_params()
        np.testing.assert_allclose(lb, la, rtol=1e-4, atol=1e-4 * np.abs(la).max())
        if exact:
            np.testing.assert_array_equal(lb, la)
        np.testing.assert_array_equal(a.class_draws_, b.class_draws_)
        assert a.get_params() == b.get_params()


@pytest.mark.parametrize("tile", [None, 4, 6])  # the CPU's one trial per matmul, and the GPU's whole stack
@pytest.mark.parametrize("name, extra", [("crt", {}), ("la_loss", {"tau": 1.5})])
def test_six_trials_of_three_lrs_and_two_epoch_counts_equal_separate_runs(data, name, extra, tile):
    """The issue's check: 3 lrs x 2 epoch counts, stacked vs separate, >= 99.9 % equal test
    predictions and logits within 1e-4 relative."""
    trials = [{"lr": lr, "epochs": epochs, **extra} for lr in (0.05, 0.2, 0.8) for epochs in (3, 8)]
    alone, together = separately_and_together(name, trials, data, tile)
    assert len(stack_groups(together, rows=len(data["train"][1]), dim=24, num_classes=20)) == 1
    assert_same_fits(alone, together, data["test"][0], exact=tile is None)
    # the trials do differ: a stack that trained one trial six times would fail the check above
    assert len({a.logits(data["test"][0][:5]).round(3).tobytes() for a in alone}) == 6


@pytest.mark.parametrize("name", STACKABLE)
def test_every_stackable_method_equals_its_separate_runs_over_its_search_space(data, name):
    trials = method_trials(name, {"epochs": [2, 5]}, budget=6).params
    for tile in (None, len(trials)):  # the CPU's one trial per matmul, the GPU's whole stack
        alone, together = separately_and_together(name, trials, data, tile=tile)
        groups = stack_groups(together, rows=len(data["train"][1]), dim=24, num_classes=20)
        assert max(map(len, groups)) > 1, f"{name}'s trials were not stacked"
        assert_same_fits(alone, together, data["test"][0], exact=tile is None)


def test_stacked_trials_with_views_and_float16_features_equal_separate_runs(data):
    X, y = data["train"]
    rng = np.random.default_rng(0)
    views = np.stack([X, X + 0.05 * rng.normal(size=X.shape).astype(np.float32)])
    trials = [{"lr": lr, "epochs": e} for lr in (0.1, 0.4) for e in (2, 4)]
    half = {**data, "train": (X.astype(np.float16), y)}
    for inputs, extra in ((data, {"views": views}), (half, {})):
        alone, together = separately_and_together("crt", trials, inputs, **extra)
        assert_same_fits(alone, together, data["test"][0])


def test_the_stack_runs_each_trial_at_its_own_cosine_lr_until_its_own_last_epoch():
    stack = TrialStack(epochs=(4, 2), lrs=(0.2, 0.8), lr_factors=((1.0, 0.5), (1.0, 1.0)))
    assert [stack.active(e) for e in range(4)] == [2, 2, 1, 1]
    params = [torch.zeros(2, 5, 3), torch.zeros(2, 3)]  # W^T and b of two trials
    weight, bias = stack.steps(1, params)
    hand = [0.5 * 0.2 * (1 + math.cos(math.pi / 4)), 0.5 * 0.8 * (1 + math.cos(math.pi / 2)) * 0.5]
    assert weight.shape == (2, 1, 1) and bias.shape == (2, 1)
    np.testing.assert_allclose(weight.flatten().numpy(), hand, rtol=1e-6)
    np.testing.assert_allclose(bias.flatten().numpy(), [hand[0], hand[1] / 0.5], rtol=1e-6)
    assert [len(s) for s in stack.steps(3, [p[:1] for p in params])] == [1, 1]
    assert stack.steps(0, params)[1][1].item() == pytest.approx(cosine_lr(0.8, 0, 2))
    assert TrialStack((3,), (0.4,)).steps(1, params[:1]) == [cosine_lr(0.4, 1, 3)]


def test_stacks_group_what_may_differ_and_respect_the_memory_budget():
    def groups(estimators, budget=DEFAULT_MEMORY_BUDGET):
        return stack_groups(estimators, budget, rows=1000, dim=64, num_classes=10)

    crt = [create("crt", lr=lr, epochs=e) for lr in (0.1, 0.2) for e in (5, 10)]
    assert groups(crt) == [[0, 1, 2, 3]]
    # a seed, a sampler, a batch size, another method or a non-SGD method: another stack
    mixed = crt[:2] + [create("crt", seed=1), create("crt", sampler="instance"), create("crt", batch_size=64),
                       create("bsce"), create("ncm"), create("crt", epochs=0, init="joint")]
    assert groups(mixed) == [[0, 1], [2], [3], [4], [5], [6], [7]]
    assert stack_key(create("ncm")) is None and stack_key(create("crt", epochs=0, init="joint")) is None
    # progressively-balanced draws depend on the number of epochs: only equal epochs stack
    progressive = [create("crt", sampler="progressive", epochs=e, lr=lr) for e in (5, 10) for lr in (0.1, 0.2)]
    assert groups(progressive) == [[0, 1], [2, 3]]
    # the loss's own parameters may differ, another loss may not
    assert groups([create("crt", loss="logit_adjusted", tau=t) for t in (0.5, 1.0)] + [create("crt")]) == [[0, 1], [2]]
    per_trial = crt[0].stack_bytes(1000, 64, 10)
    assert groups(crt, budget=2 * per_trial) == [[0, 1], [2, 3]]
    assert groups(crt, budget=2 * per_trial - 1) == groups(crt, budget=per_trial) == [[0], [1], [2], [3]]
    assert groups(crt, budget=1) == [[0], [1], [2], [3]]


def test_fit_together_fits_what_it_cannot_stack_one_by_one(data):
    X, y = data["train"]
    mixed = [create("crt", epochs=2, device="cpu"), create("ncm", device="cpu"),
             create("crt", epochs=3, lr=0.4, device="cpu")]
    fitted = fit_together(mixed, X, y, **fit_kwargs(data))
    assert fitted is mixed and all(hasattr(e, "classes_") for e in fitted)
    alone = create("ncm", device="cpu").fit(X, y, **fit_kwargs(data))
    np.testing.assert_array_equal(alone.predict(data["test"][0]), fitted[1].predict(data["test"][0]))
    with pytest.raises(ValueError, match="differ in more"):
        from classifiers.crt import train_together
        train_together([create("crt", seed=0), create("crt", seed=1)], None)
    with pytest.raises(ValueError, match="differ in more"):
        REGISTRY["lws"]._fit_stack([create("lws", seed=0), create("lws", batch_size=64)], None)


def test_fit_together_with_labels_that_are_not_class_indices():
    rng = np.random.default_rng(2)
    y = np.repeat(np.array(["cat", "dog", "emu"]), [60, 20, 6])
    X = rng.normal(size=(len(y), 5)).astype(np.float32) + 3 * np.eye(3, 5)[np.searchsorted(["cat", "dog", "emu"], y)]
    trials = [{"lr": lr, "epochs": 3} for lr in (0.1, 0.5)]
    together = fit_together([create("crt", **p, device="cpu") for p in trials], X, y)
    alone = [create("crt", **p, device="cpu").fit(X, y) for p in trials]
    for a, b in zip(alone, together):
        assert list(b.classes_) == ["cat", "dog", "emu"]
        np.testing.assert_array_equal(a.predict(X), b.predict(X))


# -- the tuned sweep ------------------------------------------------------------------------------


@pytest.fixture
def entry(tmp_path, cache_dir, runner):
    return import_entry(runner, tmp_path, "synthetic", long_tailed_features(max_count=300, imbalance=60))


def tuned(runner, entry, out, *extra):
    return invoke(runner, lt_cls, ["sweep", "--cache", entry, "--out", str(out), "--quiet", "--no-plots", "--tune",
                                   "--methods", "crt,la_loss,ncm", "--param", "crt.epochs=2,4",
                                   "--param", "la_loss.epochs=2,3", "--budget", "6", "--seeds", "0,1", *extra])


def test_the_tuned_sweep_stacks_trials_and_no_stack_gives_the_same_choices(runner, entry, tmp_path):
    stacked = tuned(runner, entry, tmp_path / "stacked")
    assert stacked.exit_code == 0, stacked.output
    (tmp_path / "alone.toml").write_text("stack = false\n")  # the TOML's way to say --no-stack
    alone = tuned(runner, entry, tmp_path / "alone", "--config", tmp_path / "alone.toml")
    assert alone.exit_code == 0, alone.output
    a, b = (load_records(tmp_path / name / "results.jsonl") for name in ("stacked", "alone"))
    ncm = len(method_trials("ncm", {}, 6).params)
    assert len(a) == len(b) == 2 * (6 + 6 + ncm) + 2 * 3  # trials of crt, la_loss, ncm per seed, and the choices
    trials = [r for r in a if r["tuning"]["role"] == "trial"]
    assert {r["tuning"].get("stacked") for r in trials if r["method"] != "ncm"} == {6}
    assert all("stacked" not in r["tuning"] for r in trials if r["method"] == "ncm")
    assert all("stacked" not in r["tuning"] for r in b)

    def by_key(records):
        return {(r["method"], r["seed"], r["tuning"]["role"], json.dumps(r["params"], sort_keys=True)): r
                for r in records}

    a, b = by_key(a), by_key(b)
    assert a.keys() == b.keys()
    for key, record in a.items():
        assert record["top1"] == pytest.approx(b[key]["top1"], abs=0.5), key
        if key[2] == "selected":
            assert record["tuning"]["chosen"] == b[key]["tuning"]["chosen"], key


def test_no_stack_and_stack_budget_are_checked(runner, entry, tmp_path):
    def failing(*args):
        result = runner.invoke(lt_cls, ["sweep", "--cache", entry, "--out", str(tmp_path / "o"), "--quiet",
                                        "--methods", "crt", *args])
        assert result.exit_code != 0
        return result.output

    assert "--no-stack and --stack-budget apply to a tuned sweep" in failing("--no-stack")
    assert "--no-stack and --stack-budget apply to a tuned sweep" in failing("--stack-budget", "100")
    assert "--stack-budget" in failing("--tune", "--stack-budget", "0")
    config = tmp_path / "sweep.toml"
    config.write_text("stack = 1\n")
    assert "stack must be true or false" in failing("--tune", "--config", config)
    assert not (tmp_path / "o" / "results.jsonl").exists()
    assert lt_cls_cmd.DEFAULT_STACK_MIB * 2**20 == DEFAULT_MEMORY_BUDGET
