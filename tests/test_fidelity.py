"""Each recipe against its official code's loop, written out here with torch.optim on the same draws,
and against hand computations: batches per epoch and the per-epoch lr of classifier-balancing
(cRT, LWS), MiSLAS's stage 2 (``las``), the two cosine NCMs, and the defaults of every preset
against its official configuration (docs/methods.md, "Official configurations")."""
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classifiers import REGISTRY, create, training
from classifiers.ncm import NCM
from classifiers.training import (
    Schedule,
    cosine_lr,
    draw_epochs,
    epoch_batches,
    sgd_train,
)
from tests.synthetic import long_tailed_features


def fit(name, data, **params):
    (X, y), val = data["train"], data["val"]
    return create(name, device="cpu", **params).fit(X, y, class_counts=data["counts"],
                                                    classifier=(data["W"], data["b"]), val=val)


@pytest.fixture(scope="module")
def data():
    return long_tailed_features(max_count=300, imbalance=60)  # N = 668


# -- batches per epoch and the per-epoch lr, by hand ----------------------------------------------


@pytest.mark.parametrize("rule, n, batch, expected", [
    ("floor", 10, 4, [4, 4]), ("ceil", 10, 4, [4, 4, 2]), ("ceil+1", 10, 4, [4, 4, 4, 4]), ("floor-1", 10, 4, [4]),
    ("floor", 12, 4, [4, 4, 4]), ("ceil", 12, 4, [4, 4, 4]), ("ceil+1", 12, 4, [4, 4, 4, 4]),
    ("floor-1", 12, 4, [4, 4]),
    # the official count is 0 here: one batch of min(N, B) rather than no training at all
    ("floor", 3, 4, [3]), ("floor-1", 6, 4, [4]), ("ceil", 3, 4, [3]),
    # MiSLAS's loader yields max_j n_j C draws (here 2 (N - 1)) and its loop ends with them
    ("ceil+1", 3, 4, [4]), ("ceil+1", 5, 4, [4, 4])])
def test_the_loop_runs_the_hand_computed_batches_at_the_paper_era_lr(rule, n, batch, expected):
    """The real loop (draw_epochs + sgd_train) on one parameter whose gradient is 1, no momentum or
    weight decay: each step moves it by exactly that step's lr. Classes of N - 1 and 1 samples."""
    epochs, base = 4, 0.3
    schedule = Schedule(epochs, base, 0.0, 0.0, batch, "instance", 0, epoch_steps=rule)
    labels = (torch.arange(n) == n - 1).long()
    draws, histogram = draw_epochs(labels, np.bincount(labels.numpy()), schedule)
    assert histogram.sum(1).tolist() == [sum(expected)] * epochs
    param, sizes, lrs = torch.zeros(1, dtype=torch.float64), [], []
    before = [0.0]

    def grad(indices):
        sizes[-1].append(len(indices))
        before[0] = float(param)
        return [torch.ones(1, dtype=torch.float64)]

    def after_step():
        lrs.append(before[0] - float(param))

    sgd_train([param], grad, draws, schedule, post_step=after_step, on_epoch=lambda e: sizes.append([]))
    assert sizes == [expected] * epochs
    hand = [0.5 * base * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]  # epoch 1 at the base lr
    assert hand[0] == base and hand[-1] > 0
    np.testing.assert_allclose(lrs, np.repeat(hand, len(expected)), rtol=1e-6)
    assert [cosine_lr(base, e, epochs) for e in range(epochs)] == pytest.approx(hand)
    assert epoch_batches(n, batch, rule, loader_draws=2 * (n - 1))[0] == len(expected)


def test_mislas_count_ends_with_its_loader_on_balanced_data():
    """N = 10 in two classes of 5, B = 4: the class-aware loader yields max_j n_j C = 10 draws, fewer
    than the ceil(10 / 4) + 1 = 4 batches of 4 the break allows: 4, 4, 2, as every-draw-once."""
    labels = torch.arange(10) % 2
    schedule = Schedule(2, 0.1, 0.0, 0.0, 4, "class", 0, epoch_steps="ceil+1")
    draws, _ = draw_epochs(labels, np.bincount(labels.numpy()), schedule)
    assert [len(d) for d in draws] == [10, 10]
    assert epoch_batches(10, 4, "ceil+1", loader_draws=10) == (3, 10)
    assert epoch_batches(10, 4, "ceil+1") == (4, 16)


def test_floor_epochs_are_the_every_draw_once_epochs_without_their_last_batch():
    labels = torch.arange(10) % 3
    counts = np.bincount(labels.numpy())
    ceil, _ = draw_epochs(labels, counts, Schedule(3, 0.1, 0.9, 0.0, 4, "class", 7, epoch_steps="ceil"))
    floor, histogram = draw_epochs(labels, counts, Schedule(3, 0.1, 0.9, 0.0, 4, "class", 7, epoch_steps="floor"))
    for c, f in zip(ceil, floor):
        assert torch.equal(c[:8], f) and len(f) == 8
    assert histogram.sum() == 24


def test_pytorch_since_1_1_would_skip_the_first_lr_and_end_at_zero():
    """What docs/methods.md says of classifier-balancing's loop on a current PyTorch: scheduler.step()
    at the top of each epoch, as run_networks.py does, trains epochs 1 ... E at the values of
    e = 1 ... E: the base lr is never used and the last epoch trains at lr 0."""
    epochs, base = 5, 0.2
    optimiser = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs, eta_min=0.0)
    trained_at = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
        for _ in range(epochs):
            scheduler.step()
            trained_at.append(optimiser.param_groups[0]["lr"])
    assert trained_at == pytest.approx([cosine_lr(base, e, epochs) for e in range(1, epochs + 1)], abs=1e-12)
    assert trained_at[-1] == pytest.approx(0.0, abs=1e-12)
    assert [cosine_lr(base, e, epochs) for e in range(epochs)][0] == base  # ours: the PyTorch < 1.1 order


@pytest.mark.parametrize("name, params, expected", [
    ("crt", {}, [128] * 5), ("lws", {}, [128] * 5), ("bsce", {}, [128] * 5), ("la_loss", {}, [128] * 5),
    ("crt", {"epoch_steps": "ceil"}, [128] * 5 + [668 - 5 * 128]), ("las", {}, [128] * 7),
    ("disalign", {}, [128] * 5 + [668 - 5 * 128])])
def test_each_method_runs_its_official_batches_per_epoch(data, monkeypatch, name, params, expected):
    """N = 668, B = 128: classifier-balancing int(668 / 128) = 5 batches; MiSLAS ceil + 1 = 7."""
    sizes = []
    original = training.sgd_train

    def recording(params_, grad_fn, epochs, schedule, **hooks):
        def counting(batch, *trials):  # a stack's tile of trials (one trial here) after the batch
            sizes[-1].append(len(batch))
            return grad_fn(batch, *trials)
        on_epoch = hooks.pop("on_epoch", None)

        def next_epoch(epoch):
            sizes.append([])
            if on_epoch is not None:
                on_epoch(epoch)
        return original(params_, counting, epochs, schedule, on_epoch=next_epoch, **hooks)

    monkeypatch.setattr(training, "sgd_train", recording)
    fit(name, data, epochs=3, batch_size=128, **params)
    assert sizes == [expected] * 3


# -- cRT and LWS against classifier-balancing's run_networks.py loop --------------------------------


def official_classifier_balancing(data, schedule, params, logits_fn):
    """run_networks.py's train(): epoch_steps = int(N / B); ``for step, batch in enumerate(loader):
    if step == epoch_steps: break``; SGD(momentum, weight_decay) + CosineAnnealingLR(T_max=epochs,
    eta_min=0), stepped at the top of every epoch on the PyTorch it names (< 1.1: epoch 1 at the base
    lr), i.e. after every epoch on a current PyTorch. The loader is the every-draw-once stream of
    the same sampler (the official class-aware sampler yields more than N; the loop stops first)."""
    X, y = (torch.from_numpy(a) for a in data["train"])
    stream, _ = draw_epochs(y, data["counts"], Schedule(**{**schedule.__dict__, "epoch_steps": "ceil"}))
    epoch_steps = int(len(y) / schedule.batch_size)
    optimiser = torch.optim.SGD(params, lr=schedule.lr, momentum=schedule.momentum,
                                weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, schedule.epochs, eta_min=0.0)
    steps = 0
    for indices in stream:
        for step, start in enumerate(range(0, len(indices), schedule.batch_size)):
            if step == epoch_steps:
                break
            batch = indices[start:start + schedule.batch_size]
            optimiser.zero_grad()
            F.cross_entropy(logits_fn(X[batch]), y[batch]).backward()
            optimiser.step()
            steps += 1
        scheduler.step()
    return steps


def test_crt_is_classifier_balancings_crt_loop(data):
    model = fit("crt", data, epochs=4, batch_size=128)
    dim, classes = data["W"].shape[1], len(data["counts"])
    generator = torch.Generator().manual_seed(0)
    bound = 1 / math.sqrt(dim)  # nn.Linear's initialisation, as crt's from its seed
    weight = ((torch.rand(classes, dim, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    bias = ((torch.rand(classes, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    steps = official_classifier_balancing(data, model._schedule(), [weight, bias], lambda x: x @ weight.T + bias)
    assert steps == 4 * (668 // 128)
    np.testing.assert_allclose(model.weight_, weight.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bias_, bias.detach().numpy(), rtol=1e-4, atol=1e-5)


def test_lws_is_classifier_balancings_lws_loop(data):
    """TauNormClassifier.py's DotProduct_Classifier: fc frozen, logits fc(x) * scales, scales from 1,
    weight decay on the scales too."""
    model = fit("lws", data, epochs=3, batch_size=128)
    W, b = (torch.from_numpy(a) for a in (data["W"], data["b"]))
    scales = torch.ones(len(W), requires_grad=True)
    official_classifier_balancing(data, model._schedule(), [scales], lambda x: (x @ W.T + b) * scales)
    np.testing.assert_allclose(model.scales_, scales.detach().numpy(), rtol=1e-4, atol=1e-6)


# -- las against MiSLAS's train_stage2.py -----------------------------------------------------------


def mislas_smoothing(counts, head, tail):
    n = np.asarray(counts, dtype=np.float64)
    return tail + (head - tail) * np.sin((n - n.min()) * np.pi / (2 * (n.max() - n.min())))


def mislas_loss(logits, target, smooth):
    """methods.py's LabelAwareSmoothing.forward."""
    smoothing = smooth[target]
    logprobs = F.log_softmax(logits, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    return ((1 - smoothing) * nll + smoothing * -logprobs.mean(dim=-1)).mean()


def test_las_is_mislas_stage_two(data):
    """train_stage2.py: classifier from the stage-1 weights, LearnableWeightScaling (ones) on its
    output, SGD([{classifier}, {lws}], lr, momentum, weight_decay), adjust_learning_rate at the top of
    each epoch (group 0 at lr_factor x the cosine value, group 1 at the value), ``for i, batch in
    enumerate(loader): if i > end_steps: break`` with end_steps = ceil(N / B)."""
    model = fit("las", data, epochs=3)
    assert (model.recipe_, model.lr, model.lr_factor, model.batch_size) == ("mislas", 0.1, 0.05, 256)
    X, y = (torch.from_numpy(a) for a in data["train"])
    draws, _ = draw_epochs(y, data["counts"], model._schedule())
    weight = torch.from_numpy(data["W"].copy()).requires_grad_(True)
    bias = torch.from_numpy(data["b"].copy()).requires_grad_(True)
    learned_norm = torch.ones(1, len(data["counts"]), requires_grad=True)
    smooth = torch.from_numpy(mislas_smoothing(data["counts"], 0.3, 0.0)).float()
    optimiser = torch.optim.SGD([{"params": [weight, bias]}, {"params": [learned_norm]}], 0.1, momentum=0.9,
                                weight_decay=5e-4)
    end_steps = int(np.ceil(len(y) / 256))
    steps = 0
    for epoch, indices in enumerate(draws):
        lr = 0.5 * 0.1 * (1 + math.cos(epoch / 3 * math.pi))
        optimiser.param_groups[0]["lr"], optimiser.param_groups[1]["lr"] = 0.05 * lr, lr
        loader = torch.cat([indices, indices])  # the official class-aware loader runs longer than the loop
        for i, start in enumerate(range(0, len(loader), 256)):
            if i > end_steps:
                break
            batch = loader[start:start + 256]
            loss = mislas_loss(learned_norm * (X[batch] @ weight.T + bias), y[batch], smooth)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            steps += 1
    assert steps == 3 * (end_steps + 1)
    f = learned_norm.detach()[0]
    np.testing.assert_allclose(model.scales_, f.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(model.weight_, (f[:, None] * weight.detach()).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.bias_, (f * bias.detach()).numpy(), rtol=1e-4, atol=1e-5)
    Xt = data["test"][0]
    expected = f.numpy() * (Xt @ weight.detach().numpy().T + bias.detach().numpy())
    np.testing.assert_allclose(model.decision_function(Xt), expected, rtol=1e-4, atol=1e-4)


def test_las_one_step_of_both_parameter_groups_by_hand():
    """Three samples (class counts 2, 1), one batch of all three, one SGD step, in float64 by hand:
    u = x W^T + b, z = f u, q = (1 - eps_y) e_y + eps_y / C, g = (softmax(z) - q) / B;
    dW = (g f)^T X, db = sum g f, df = sum g u, each + wd * param; W, b move by 0.05 lr, f by lr."""
    X = np.array([[1.0, 0.5], [0.8, -0.2], [-0.3, 1.0]])
    y = np.array([0, 0, 1])
    W, b = np.array([[0.9, 0.1], [-0.4, 0.7]]), np.array([0.2, -0.1])
    lr, factor, wd = 0.1, 0.05, 5e-4
    model = create("las", epochs=1, batch_size=3, epoch_steps="floor", smooth_head=0.3, device="cpu")
    model.fit(X, y, classifier=(W, b))
    labels = torch.from_numpy(y)
    (batch,), _ = draw_epochs(labels, np.bincount(y), model._schedule())  # the draws the fit used
    batch = batch.numpy()
    eps = np.array([0.3, 0.0])  # smooth_head at the larger class, smooth_tail at the rarest
    f = np.ones(2)
    u = X[batch] @ W.T + b
    z = f * u
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    q = np.eye(2)[y[batch]] * (1 - eps[y[batch]])[:, None] + (eps[y[batch]] / 2)[:, None]
    g = (p - q) / len(batch)
    W1 = W - factor * lr * ((g * f).T @ X[batch] + wd * W)
    b1 = b - factor * lr * ((g * f).sum(0) + wd * b)
    f1 = f - lr * ((g * u).sum(0) + wd * f)
    np.testing.assert_allclose(model.scales_, f1, rtol=1e-5)
    np.testing.assert_allclose(model.weight_, f1[:, None] * W1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(model.bias_, f1 * b1, rtol=1e-5, atol=1e-7)
    assert not np.allclose(f1, 1.0) and not np.allclose(W1, W)


def test_las_without_a_classifier_falls_back_to_a_fresh_layer(data):
    X, y = data["train"]
    fresh = create("las", epochs=2, device="cpu").fit(X, y, class_counts=data["counts"])
    assert fresh.recipe_ == "fresh" and np.array_equal(fresh.scales_, np.ones(len(data["counts"])))
    same = create("crt", loss="label_aware_smoothing", epochs=2, lr=0.1, batch_size=256, epoch_steps="ceil+1",
                  device="cpu").fit(X, y, class_counts=data["counts"])
    np.testing.assert_array_equal(fresh.weight_, same.weight_)  # cRT's fresh layer under las's schedule
    forced = fit("las", data, epochs=2, recipe="fresh")
    assert forced.recipe_ == "fresh"
    with pytest.raises(Exception, match="recipe='mislas' starts from the checkpoint's classifier"):
        create("las", recipe="mislas").fit(X, y, class_counts=data["counts"])
    with pytest.raises(Exception, match="head='cosine' needs recipe='fresh'"):
        fit("las", data, head="cosine")
    assert fit("las", data, epochs=0).recipe_ == "mislas"  # epochs=0: the joint classifier
    np.testing.assert_array_equal(fit("las", data, epochs=0).weight_, data["W"])


# -- NCM: the true cosine and the official "cos" ----------------------------------------------------


def test_ncm_cosines_match_their_definitions_by_hand():
    rng = np.random.default_rng(3)
    X, y = rng.normal(size=(30, 4)) + 1.0, np.repeat([0, 1, 2], [15, 10, 5])
    queries = rng.normal(size=(7, 4))
    mean = X.mean(0)

    def cl2n(A):
        A = A - mean
        return A / np.linalg.norm(A, axis=1, keepdims=True)

    centroids = np.stack([cl2n(X)[y == c].mean(0) for c in range(3)])  # not unit length
    true_cos = cl2n(queries) @ (centroids / np.linalg.norm(centroids, axis=1, keepdims=True)).T
    official = cl2n(queries) @ centroids.T / X.shape[1]  # KNNClassifier.cos_similarity: A B^T / feat_dim
    np.testing.assert_allclose(NCM(metric="cos").fit(X, y).decision_function(queries), true_cos, atol=1e-5)
    model = NCM(metric="cos_official").fit(X, y)
    np.testing.assert_allclose(model.decision_function(queries), official, atol=1e-6)
    np.testing.assert_allclose(model.centroids_, centroids, atol=1e-6)
    for norm in ("un", "l2n"):
        A = queries if norm == "un" else queries / np.linalg.norm(queries, axis=1, keepdims=True)
        T = X if norm == "un" else X / np.linalg.norm(X, axis=1, keepdims=True)
        cents = np.stack([T[y == c].mean(0) for c in range(3)])
        np.testing.assert_allclose(NCM(feature_norm=norm, metric="cos_official").fit(X, y).decision_function(queries),
                                   A @ cents.T / 4, rtol=1e-5, atol=1e-5)


def test_the_two_cosines_rank_classes_differently():
    """l2n features: class 0 two unit vectors at +-60 degrees (centroid (0.5, 0), length 0.5),
    class 1 one at 45 degrees (length 1). A query at 10 degrees is 10 degrees from class 0's
    direction and 35 from class 1's: the cosine picks 0; x . c / D = 0.5 cos 10 vs cos 35 picks 1."""
    angle = np.deg2rad
    X = np.array([[np.cos(angle(60)), np.sin(angle(60))], [np.cos(angle(-60)), np.sin(angle(-60))],
                  [np.cos(angle(45)), np.sin(angle(45))]])
    y = np.array([0, 0, 1])
    query = np.array([[np.cos(angle(10)), np.sin(angle(10))]])
    assert NCM(feature_norm="l2n", metric="cos").fit(X, y).predict(query).tolist() == [0]
    official = NCM(feature_norm="l2n", metric="cos_official").fit(X, y)
    assert official.predict(query).tolist() == [1]
    np.testing.assert_allclose(official.logits(query)[0], [0.5 * np.cos(angle(10)) / 2, np.cos(angle(35)) / 2],
                               atol=1e-6)


# -- every preset's defaults against its official configuration -------------------------------------

OFFICIAL = {  # the values docs/methods.md's table cites, file by file
    "crt": dict(lr=0.2, batch_size=512, epochs=10, weight_decay=5e-4, momentum=0.9, sampler="class",
                epoch_steps="floor", init="random"),
    "lws": dict(lr=0.2, batch_size=512, epochs=5, weight_decay=5e-4, momentum=0.9, sampler="class",
                epoch_steps="floor"),
    "bsce": dict(lr=0.4, batch_size=512, epochs=10, weight_decay=5e-4, momentum=0.9, sampler="instance",
                 epoch_steps="floor", init="random"),
    "las": dict(lr=0.1, lr_factor=0.05, batch_size=256, epochs=10, weight_decay=5e-4, momentum=0.9,
                sampler="class", epoch_steps="ceil+1", smooth_head=0.3, smooth_tail=0.0, recipe="auto"),
    "marc": dict(lr=0.05, batch_size=256, epochs=10, weight_decay=5e-4, momentum=0.9, sampler="instance"),
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_defaults_are_the_official_configuration(name):
    defaults = REGISTRY[name].defaults()
    assert {k: defaults[k] for k in OFFICIAL[name]} == OFFICIAL[name]


def test_methods_md_has_an_official_configuration_row_for_every_trained_preset():
    text = (Path(__file__).parents[1] / "docs" / "methods.md").read_text()
    section = text.split("## Official configurations", 1)[1].split("\n## ", 1)[0]
    trained = [name for name, cls in REGISTRY.items() if "epochs" in cls.param_names()]
    for name in trained + ["ncm", "tau"]:
        assert re.search(rf"^\| `{re.escape(name)}` \|", section, re.M), name
