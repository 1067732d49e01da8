"""The cRT family's losses, heads and initialisations, DisAlign and MARC, against plain autograd /
torch.optim implementations of each paper's formula."""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from classifiers import create
from classifiers.losses import LOSSES, make_loss
from classifiers.metrics import per_class_accuracy, shot_groups
from classifiers.training import Schedule, draw_epochs
from featcache.errors import FeatcacheError
from tests.synthetic import long_tailed_features
from tests.test_sweep import entry  # noqa: F401  (the fixture: an imported synthetic entry)

COUNTS = np.array([500, 120, 40, 9, 3, 1])


def fit(name, data, **params):
    (X, y), val = data["train"], data["val"]
    return create(name, device="cpu", **params).fit(X, y, class_counts=data["counts"],
                                                    classifier=(data["W"], data["b"]), val=val)


# -- each loss: value and gradient against autograd of the paper's formula ------------------------


def cb_weights(beta):
    w = torch.tensor([(1 - beta) / (1 - beta ** n) for n in COUNTS.tolist()], dtype=torch.float64)
    return w / w.sum() * len(COUNTS)


def reference(name, params, z, y, epoch):
    """The paper's loss, written directly (float64)."""
    n = torch.tensor(COUNTS, dtype=torch.float64)
    log_p = lambda logits: torch.log_softmax(logits, 1)  # noqa: E731
    if name == "ce":
        return F.cross_entropy(z, y)
    if name == "logit_adjusted":
        return F.cross_entropy(z + params["tau"] * torch.log(n / n.sum()), y)
    if name == "class_balanced":
        p_y = log_p(z).gather(1, y[:, None]).squeeze(1).exp()
        focal = (1 - p_y) ** params["gamma"] * -torch.log(p_y)
        return (cb_weights(params["beta"])[y] * focal).mean()
    if name == "ldam":
        m = n ** -0.25
        m = m * (params["max_margin"] / m.max())
        adjusted = params["s"] * (z - F.one_hot(y, len(n)) * m[y][:, None])
        weight = cb_weights(params["beta"]) if epoch >= params["drw_epoch"] else None
        return F.cross_entropy(adjusted, y, weight=weight)
    if name == "label_aware_smoothing":
        head, tail = params["smooth_head"], params["smooth_tail"]
        eps = tail + (head - tail) * torch.sin((n - n.min()) * math.pi / (2 * (n.max() - n.min())))
        target = F.one_hot(y, len(n)) * (1 - eps[y])[:, None] + (eps[y] / len(n))[:, None]
        return -(target * log_p(z)).sum(1).mean()
    if name == "grw":
        w = (1 / (n / n.sum())) ** params["rho"]
        return F.cross_entropy(z, y, weight=w / w.sum() * len(n))
    raise AssertionError(name)


CASES = [("ce", {}), ("logit_adjusted", {"tau": 1.0}), ("logit_adjusted", {"tau": 1.7}),
         ("class_balanced", {"beta": 0.9999, "gamma": 0.0}), ("class_balanced", {"beta": 0.99, "gamma": 0.5}),
         ("class_balanced", {"beta": 0.999, "gamma": 2.0}),
         ("ldam", {"max_margin": 0.5, "s": 30.0, "drw_epoch": 3, "beta": 0.9999}),
         ("label_aware_smoothing", {"smooth_head": 0.3, "smooth_tail": 0.0}),
         ("label_aware_smoothing", {"smooth_head": 0.4, "smooth_tail": 0.1}), ("grw", {"rho": 1.2})]


def test_cases_cover_every_loss():
    assert {name for name, _ in CASES} == set(LOSSES)


@pytest.mark.parametrize("name, params", CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CASES)])
@pytest.mark.parametrize("epoch", [0, 5])
def test_loss_value_and_gradient_equal_autograd_of_the_formula(name, params, epoch):
    generator = torch.Generator().manual_seed(len(name) + epoch)
    z = torch.randn(64, len(COUNTS), generator=generator, dtype=torch.float64) * (0.1 if name == "ldam" else 3)
    y = torch.randint(0, len(COUNTS), (64,), generator=generator)
    z_ref = z.clone().requires_grad_(True)
    expected = reference(name, params, z_ref, y, epoch)
    expected.backward()
    loss = make_loss(name, COUNTS, torch.device("cpu"), params)
    shifted = z.float() if loss.offset is None else z.float() + loss.offset  # the offset is folded in by the head
    assert float(loss.value(shifted, y, epoch)) == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose((loss.grad(shifted, y, epoch) / len(y)).numpy(), z_ref.grad.numpy(),
                               rtol=1e-4, atol=1e-6)


# -- the training loop against torch.optim ------------------------------------------------------


@pytest.fixture(scope="module")
def data():
    return long_tailed_features()


def optim_reference(data, sampler, epochs, lr, momentum, weight_decay, batch_size, params, logits_fn, loss_fn, seed=0):
    """torch.optim.SGD + CosineAnnealingLR over the same draws, autograd gradients."""
    X, y = (torch.from_numpy(a) for a in data["train"])
    schedule = Schedule(epochs, lr, momentum, weight_decay, batch_size, sampler, seed)
    draws, _ = draw_epochs(y, data["counts"], schedule)
    optimiser = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, epochs)
    for epoch, indices in enumerate(draws):
        for start in range(0, len(indices), batch_size):
            batch = indices[start:start + batch_size]
            optimiser.zero_grad()
            loss_fn(logits_fn(X[batch]), y[batch], epoch).backward()
            optimiser.step()
        scheduler.step()


def test_bsce_equals_the_balanced_softmax_trained_with_torch_optim(data):
    """bsce (now the family's logit_adjusted tau=1) is the loop of commit 0ec6261: same init, same
    draws, cross-entropy of x W^T + b + log n_j, PyTorch SGD."""
    # pinned at that commit's lr and every-draw-once epochs: bsce now defaults to the official decoupled
    # lr 0.4 and int(N / B) batches per epoch (tests/test_fidelity.py)
    model = fit("bsce", data, lr=0.2, epoch_steps="ceil")
    dim, classes = data["W"].shape[1], len(data["counts"])
    generator = torch.Generator().manual_seed(0)
    bound = 1 / math.sqrt(dim)
    weight = ((torch.rand(classes, dim, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    bias = ((torch.rand(classes, generator=generator) * 2 - 1) * bound).requires_grad_(True)
    log_n = torch.log(torch.tensor(data["counts"], dtype=torch.float32))
    optim_reference(data, "instance", 10, 0.2, 0.9, 5e-4, 512, [weight, bias], lambda x: x @ weight.T + bias,
                    lambda z, y, e: F.cross_entropy(z + log_n, y))
    X = data["test"][0]
    expected = X @ weight.detach().numpy().T + bias.detach().numpy()
    np.testing.assert_allclose(model.decision_function(X), expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(model.predict(X), expected.argmax(1))


@pytest.mark.parametrize("loss, extra", [("ce", {}), ("ldam", {"max_margin": 0.5, "s": 30.0, "drw_epoch": 1,
                                                                 "beta": 0.9999})])
def test_cosine_head_trains_like_autograd_of_the_cosine_logits(data, loss, extra):
    params = dict(epochs=2, lr=0.1, momentum=0.9, weight_decay=2e-4, batch_size=128, sampler="instance")
    model = fit("crt", data, loss=loss, head="cosine", cosine_scale=10.0, init="class_mean", epoch_steps="ceil",
                **params, **extra)  # the reference loop below takes every draw once
    X, y = (torch.from_numpy(a) for a in data["train"])
    sums = torch.zeros(len(data["counts"]), X.shape[1]).index_add_(0, y, X)
    weight = F.normalize(sums, dim=1).requires_grad_(True)
    reference_loss = make_loss(loss, data["counts"], torch.device("cpu"), extra)
    optim_reference(data, "instance", 2, 0.1, 0.9, 2e-4, 128, [weight],
                    lambda x: 10.0 * F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T,
                    lambda z, t, e: reference_loss.value(z, t, e))
    np.testing.assert_allclose(model.weight_, weight.detach().numpy(), rtol=1e-3, atol=1e-4)  # float32 drift, s=30


def test_cosine_head_logits_are_scale_times_cosine(data):
    model = fit("crt", data, head="cosine", cosine_scale=25.0)
    X = data["test"][0]
    cos = (X / np.linalg.norm(X, axis=1, keepdims=True)) @ \
        (model.weight_ / np.linalg.norm(model.weight_, axis=1, keepdims=True)).T
    np.testing.assert_allclose(model.decision_function(X), 25.0 * cos, rtol=1e-5, atol=1e-4)
    assert model.bias_ is None


def test_disalign_trains_like_autograd_of_its_formula(data):
    model = fit("disalign", data, epochs=3)
    W, b = (torch.from_numpy(a) for a in (data["W"], data["b"]))
    dim, classes = W.shape[1], len(W)
    v = torch.full((dim,), 0.1, requires_grad=True)
    v0 = ((torch.rand(1, generator=torch.Generator().manual_seed(0)) * 2 - 1) / math.sqrt(dim)).requires_grad_(True)
    alpha, beta = torch.zeros(classes, requires_grad=True), torch.zeros(classes, requires_grad=True)
    counts = torch.tensor(data["counts"], dtype=torch.float32)
    grw = (counts.sum() / counts) ** 1.2
    grw = grw / grw.sum() * classes

    def logits(x):
        conf = torch.sigmoid(x @ v + v0)[:, None]
        return (1 + conf * alpha) * (x @ W.T + b) + conf * beta

    optim_reference(data, "instance", 3, 0.05, 0.9, 5e-4, 256, [v, v0, alpha, beta], logits,
                    lambda z, y, e: F.cross_entropy(z, y, weight=grw))
    np.testing.assert_allclose(model.logit_scale_, alpha.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.confidence_weight_, v.detach().numpy(), rtol=1e-4, atol=1e-5)
    Xt = torch.from_numpy(data["test"][0])
    np.testing.assert_allclose(model.decision_function(Xt.numpy()), logits(Xt).detach().numpy(), rtol=1e-4, atol=1e-4)


def test_marc_trains_like_autograd_of_its_formula(data):
    model = fit("marc", data, epochs=3)
    W, b = (torch.from_numpy(a) for a in (data["W"], data["b"]))
    omega, beta = torch.ones(len(W), requires_grad=True), torch.zeros(len(W), requires_grad=True)
    counts = torch.tensor(data["counts"], dtype=torch.float32)
    grw = (counts.sum() / counts) ** 1.2
    grw = grw / grw.sum() * len(W)

    def logits(x):  # the official MARCLinear: a * (x W^T + b) + b' * ||w||, trained with GRW (rho 1.2)
        return omega * (x @ W.T + b) + beta * W.norm(dim=1)

    optim_reference(data, "instance", 3, 0.05, 0.9, 5e-4, 256, [omega, beta], logits,
                    lambda z, y, e: F.cross_entropy(z, y, weight=grw))
    np.testing.assert_allclose(model.omega_, omega.detach().numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(model.beta_, beta.detach().numpy(), rtol=1e-4, atol=1e-5)
    Xt = torch.from_numpy(data["test"][0])
    np.testing.assert_allclose(model.decision_function(Xt.numpy()), logits(Xt).detach().numpy(), rtol=1e-4, atol=1e-4)


# -- the Must-show equalities -------------------------------------------------------------------


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_crt_from_joint_with_zero_epochs_is_joint(data, head):
    X = data["test"][0]
    joint = fit("joint", data).decision_function(X)
    model = fit("crt", data, init="joint", epochs=0, head=head, cosine_scale=1.0)
    if head == "linear":
        np.testing.assert_array_equal(model.decision_function(X), joint)
        np.testing.assert_array_equal(model.predict(X), fit("joint", data).predict(X))
    else:
        norms = np.linalg.norm(X, axis=1, keepdims=True) * np.linalg.norm(data["W"], axis=1)
        np.testing.assert_allclose(model.decision_function(X), (joint - data["b"]) / norms, rtol=1e-5, atol=1e-6)


def test_zero_epochs_needs_init_joint(data):
    with pytest.raises(FeatcacheError, match="epochs=0 needs init='joint'"):
        fit("crt", data, epochs=0)
    with pytest.raises(FeatcacheError, match="init='joint' needs the checkpoint's classifier"):
        create("crt", init="joint").fit(*data["train"])
    with pytest.raises(FeatcacheError, match="parameter loss='focal' is invalid"):
        create("crt", loss="focal")


def test_la_loss_at_tau_one_is_bsce(data):
    X = data["test"][0]
    bsce = fit("bsce", data, lr=0.2).predict(X)  # la_loss keeps cRT's lr; bsce defaults to its official 0.4
    np.testing.assert_array_equal(fit("la_loss", data, tau=1.0).predict(X), bsce)
    assert not np.array_equal(fit("la_loss", data, tau=2.0).predict(X), bsce)


def test_class_mean_init_with_zero_learning_is_the_normalised_class_means(data):
    model = fit("crt", data, init="class_mean", epochs=1, lr=1e-12, momentum=0.0, weight_decay=0.0)
    X, y = data["train"]
    means = np.stack([X[y == c].mean(0) for c in range(len(data["counts"]))])
    np.testing.assert_allclose(model.weight_, means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-6)


NEW = ["la_loss", "cb_loss", "ldam_drw", "las", "disalign", "marc"]


@pytest.mark.parametrize("seed, shape", [(0, {}), (3, dict(num_classes=12, dim=24, max_count=300, imbalance=60)),
                                         (5, dict(num_classes=20, dim=32, max_count=400, imbalance=100))])
def test_new_methods_beat_joint_on_balanced_top1_and_few_shot(seed, shape):
    problem = long_tailed_features(seed=seed, **shape)
    few = shot_groups(problem["counts"])["few"]
    X, y = problem["test"]

    def scores(name):
        acc = per_class_accuracy(fit(name, problem).predict(X), y, len(problem["counts"]))
        return acc.mean(), acc[few].mean()

    joint = scores("joint")
    for name in NEW:
        balanced, few_shot = scores(name)
        assert balanced > joint[0] and few_shot > joint[1], (name, balanced, few_shot, joint)


# -- through the CLI ------------------------------------------------------------------------------


def test_lt_cls_list_names_the_new_methods(runner):
    from cli.lt_cls_cmd import main as lt_cls
    from tests.conftest import invoke
    output = invoke(runner, lt_cls, ["list"]).output
    for name in NEW:
        assert re.search(rf"^{name}\s", output, re.M), name


def test_each_new_method_runs_through_the_sweep_and_beats_joint(entry, runner, tmp_path):
    from classifiers.records import load_records
    from tests.test_sweep import sweep
    out = tmp_path / "sweep"
    sweep(runner, entry, out, "--methods", ",".join(["joint", "crt"] + NEW), "--param", "crt.loss=ce,grw",
          "--param", "crt.head=linear,cosine")
    records = {(r["method"], r["params"].get("loss"), r["params"].get("head")): r
               for r in load_records(out / "results.jsonl")}
    assert {key for key in records if key[0] == "crt"} == {("crt", loss, head) for loss in ("ce", "grw")
                                                           for head in ("linear", "cosine")}
    joint = records[("joint", None, None)]
    for (method, _, _), record in records.items():
        if method in NEW:
            assert record["top1"] > joint["top1"] and record["few"] > joint["few"], (method, record, joint)
