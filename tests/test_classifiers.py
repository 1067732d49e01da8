"""Stage 2 estimators against independent numpy / scikit-learn implementations of their formulas."""
import numpy as np
import pytest
import torch
from sklearn.neighbors import NearestCentroid

import classifiers
from classifiers import create
from featcache.errors import FeatcacheError
from tests.synthetic import long_tailed_features


@pytest.fixture(scope="module")
def data():
    return long_tailed_features()


def fit(name, data, **params):
    (X, y), val = data["train"], data["val"]
    return create(name, **params).fit(X, y, class_counts=data["counts"], classifier=(data["W"], data["b"]),
                                      val=val)


def balanced(pred, y):
    return np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)])


def test_joint_matches_formula(data):
    X, y = data["test"]
    np.testing.assert_allclose(fit("joint", data).decision_function(X), X @ data["W"].T + data["b"], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 1.7])
def test_tau_fixed_matches_formula(data, tau):
    X, y = data["test"]
    W = data["W"]
    expected = X @ (W / np.linalg.norm(W, axis=1, keepdims=True) ** tau).T
    got = fit("tau", data, tau=tau).decision_function(X)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert abs(balanced(got.argmax(1), y) - balanced(expected.argmax(1), y)) <= 1e-4


def test_tau_auto_picks_the_independent_choice(data):
    (Xv, yv), (X, y), W = data["val"], data["test"], data["W"]
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    curve = {}
    for i in range(21):  # the official way: a full matmul per tau
        tau = round(0.1 * i, 1)
        curve[tau] = balanced((Xv @ (W / norms ** tau).T).argmax(1), yv)
    best = max(curve.values())
    chosen = min(t for t, s in curve.items() if s == best)
    model = fit("tau", data, tau="auto")
    assert model.tau_ == pytest.approx(chosen)
    assert model.val_curve_ == pytest.approx(curve, abs=1e-9)
    expected = (X @ (W / norms ** chosen).T).argmax(1)
    assert balanced(model.predict(X), y) == pytest.approx(balanced(expected, y), abs=1e-4)


def test_tau_zero_is_joint_without_bias(data):
    X, _ = data["test"]
    no_bias = create("joint").fit(*data["train"], classifier=(data["W"], np.zeros_like(data["b"])))
    np.testing.assert_allclose(fit("tau", data, tau=0.0).decision_function(X), no_bias.decision_function(X), rtol=1e-6)


def test_tau_auto_without_val_is_a_clear_error(data):
    with pytest.raises(FeatcacheError, match="needs a validation split"):
        create("tau", tau="auto").fit(*data["train"], classifier=(data["W"], data["b"]))


def test_lws_with_unit_scales_is_joint(data):
    X, _ = data["test"]
    model = fit("lws", data, epochs=0)
    np.testing.assert_array_equal(model.scales_, np.ones(8, np.float32))
    np.testing.assert_allclose(model.decision_function(X), fit("joint", data).decision_function(X), rtol=1e-6)


def test_lws_learns_to_lift_the_tail(data):
    model = fit("lws", data)
    scales = model.scales_
    assert scales[-1] > scales[0]
    X, y = data["test"]
    assert balanced(model.predict(X), y) > balanced(fit("joint", data).predict(X), y)


def cl2n(X, mean):
    Z = X - mean
    return Z / np.linalg.norm(Z, axis=1, keepdims=True)


def test_ncm_equals_sklearn_nearest_centroid_on_cl2n(data):
    (Xtr, ytr), (X, _) = data["train"], data["test"]
    mean = Xtr.mean(0)
    reference = NearestCentroid().fit(cl2n(Xtr, mean), ytr).predict(cl2n(X, mean))
    model = fit("ncm", data)
    np.testing.assert_array_equal(model.predict(X), reference)
    centroids = np.stack([cl2n(Xtr, mean)[ytr == c].mean(0) for c in range(8)])
    expected = -((cl2n(X, mean)[:, None, :] - centroids[None]) ** 2).sum(-1)
    np.testing.assert_allclose(model.decision_function(X), expected, atol=1e-4)


def test_ncm_cosine_option(data):
    (Xtr, ytr), (X, _) = data["train"], data["test"]
    mean = Xtr.mean(0)
    centroids = np.stack([cl2n(Xtr, mean)[ytr == c].mean(0) for c in range(8)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    np.testing.assert_allclose(fit("ncm", data, metric="cos").decision_function(X), cl2n(X, mean) @ centroids.T, atol=1e-5)


def l2n(X):
    return X / np.linalg.norm(X, axis=1, keepdims=True)


def test_knn_k1_is_brute_force_1nn(data):
    (Xtr, ytr), (X, _) = data["train"], data["test"]
    nearest = (l2n(X) @ l2n(Xtr).T).argmax(1)
    np.testing.assert_array_equal(fit("knn", data, k=1).predict(X), ytr[nearest])


def test_knn_weighted_vote_matches_formula(data):
    (Xtr, ytr), (X, y) = data["train"], data["test"]
    sims = l2n(X) @ l2n(Xtr).T
    top = np.argsort(-sims, axis=1)[:, :20]
    scores = np.zeros((len(X), 8))
    for i in range(len(X)):
        for j in top[i]:
            scores[i, ytr[j]] += np.exp(sims[i, j] / 0.07)
    scores /= scores.sum(axis=1, keepdims=True)  # the normalised vote
    model = fit("knn", data, chunk_size=37)
    got = model.decision_function(X)
    np.testing.assert_allclose(got, scores, rtol=1e-3, atol=1e-7)
    np.testing.assert_allclose(model.predict_proba(X), scores, rtol=1e-3, atol=1e-7)
    assert abs(balanced(got.argmax(1), y) - balanced(scores.argmax(1), y)) <= 1e-4


@pytest.mark.parametrize("feature_norm", ["l2n", "cl2n"])
def test_knn_searched_block_by_block_equals_one_brute_force_search(data, monkeypatch, feature_norm):
    import classifiers.knn
    (Xtr, ytr), (X, _) = data["train"], data["test"]
    mean = Xtr.mean(0) if feature_norm == "cl2n" else 0
    sims = l2n(X - mean) @ l2n(Xtr - mean).T
    order = np.argsort(-sims, axis=1)[:, :5]
    top = np.take_along_axis(sims, order, 1)
    expected = np.zeros((len(X), 8))
    np.add.at(expected, (np.arange(len(X))[:, None], ytr[order]), np.exp((top - top[:, :1]) / 0.07))
    monkeypatch.setattr(classifiers.knn, "_BLOCK_BYTES", 4 * Xtr.shape[1] * 7)  # blocks of k = 5 rows
    model = fit("knn", data, k=5, chunk_size=23, feature_norm=feature_norm)
    chunks = model._search_blocks(torch.from_numpy(X), 5)  # chunks of 23 queries
    searched, ids = (torch.cat(parts).numpy() for parts in zip(*chunks))
    np.testing.assert_allclose(searched, top, atol=1e-5)  # sorted, most similar first
    np.testing.assert_allclose(np.take_along_axis(sims, ids, 1), top, atol=1e-5)
    np.testing.assert_allclose(model.decision_function(X), expected / expected.sum(1, keepdims=True),
                               rtol=1e-3, atol=1e-6)


def test_logit_adjust_matches_formula(data):
    X, _ = data["test"]
    prior = data["counts"] / data["counts"].sum()
    expected = X @ data["W"].T + data["b"] - 0.7 * np.log(prior)
    np.testing.assert_allclose(fit("logit_adjust", data, tau=0.7).decision_function(X), expected, rtol=1e-5, atol=1e-4)
    assert fit("logit_adjust", data, tau="auto").tau_ in [round(0.1 * i, 1) for i in range(21)]


@pytest.mark.parametrize("name", ["crt", "lws", "bsce", "maxnorm"])
def test_training_is_deterministic_for_a_seed(data, name):
    X, _ = data["test"]
    a, b = fit(name, data, seed=3).decision_function(X), fit(name, data, seed=3).decision_function(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, fit(name, data, seed=4).decision_function(X))


@pytest.mark.parametrize("name", ["crt", "lws", "maxnorm"])
def test_default_sampling_is_class_balanced(data, name):
    draws = fit(name, data).class_draws_
    per_epoch = draws.sum(1)
    assert (per_epoch == len(data["train"][1])).all()  # an epoch is N draws
    share = draws.sum(0) / draws.sum()
    n = draws.sum()
    # uniform over 8 classes, within 5 standard errors of a multinomial share
    assert np.all(np.abs(share - 1 / 8) < 5 * np.sqrt((1 / 8) * (7 / 8) / n))


def test_bsce_samples_instance_balanced_and_trains_with_log_prior(data):
    model = fit("bsce", data)
    share = model.class_draws_.sum(0) / model.class_draws_.sum()
    expected = data["counts"] / data["counts"].sum()
    assert np.all(np.abs(share - expected) < 5 * np.sqrt(expected * (1 - expected) / model.class_draws_.sum()))
    X, y = data["test"]
    plain_instance_crt = fit("crt", data, sampler="instance")
    assert balanced(model.predict(X), y) > balanced(plain_instance_crt.predict(X), y)


def test_crt_beats_joint_on_the_tail(data):
    X, y = data["test"]
    tail = y >= 5
    assert np.mean(fit("crt", data).predict(X)[tail] == y[tail]) > np.mean(fit("joint", data).predict(X)[tail] == y[tail])


def test_maxnorm_caps_every_class_norm(data):
    model = fit("maxnorm", data, max_norm=0.5)
    assert np.linalg.norm(model.weight_, axis=1).max() <= 0.5 + 1e-5


def test_logreg_probe_runs(data):
    X, y = data["test"]
    assert balanced(fit("logreg", data).predict(X), y) > 0.5


# -- the contract, over the whole registry ---------------------------------------------------


@pytest.mark.parametrize("name", list(classifiers.REGISTRY))
def test_estimator_contract(data, name):
    (X, y), (Xt, _) = data["train"], data["test"]
    estimator = create(name)
    assert estimator.get_params() == classifiers.REGISTRY[name].defaults()
    with pytest.raises(FeatcacheError, match="not fitted"):
        estimator.predict(Xt)
    assert estimator.fit(X, y, class_counts=data["counts"], classifier=(data["W"], data["b"]),
                                          val=data["val"]) is estimator
    logits = estimator.decision_function(Xt)
    assert logits.shape == (len(Xt), 8) and logits.dtype == np.float32
    assert estimator.predict(Xt).shape == (len(Xt),)
    again = create(name).fit(X, y, class_counts=data["counts"], classifier=(data["W"], data["b"]), val=data["val"])
    np.testing.assert_array_equal(again.decision_function(Xt), logits)
    half = create(name).fit(X.astype(np.float16), y, class_counts=data["counts"],
                            classifier=(data["W"], data["b"]), val=(data["val"][0].astype(np.float16), data["val"][1]))
    assert (half.predict(Xt.astype(np.float16)) == estimator.predict(Xt)).mean() > 0.9
    learned = [k for k in vars(estimator) if k.endswith("_") and not k.startswith("_")]
    assert learned and all(k not in estimator.get_params() for k in learned)


def test_unknown_method_and_parameter_list_the_valid_ones():
    with pytest.raises(FeatcacheError, match="choose one of joint, ncm"):
        create("svm")
    with pytest.raises(FeatcacheError, match="its parameters are tau, grid, device"):
        create("tau", tua=1)


def test_methods_that_need_the_joint_classifier_say_so(data):
    with pytest.raises(FeatcacheError, match="needs the checkpoint's classifier"):
        create("tau").fit(*data["train"])


def test_class_with_no_training_samples_is_named(data):
    X, y = data["train"]
    keep = y != 3
    with pytest.raises(FeatcacheError, match="class 3 has no training samples"):
        create("ncm").fit(X[keep], y[keep], class_counts=np.bincount(y[keep], minlength=8))


def test_available_lists_parameters_and_descriptions():
    entries = {e["name"]: e for e in classifiers.available()}
    assert entries["knn"]["params"]["k"] == 20 and entries["knn"]["params"]["temperature"] == 0.07
    assert entries["crt"]["params"]["epochs"] == 10 and entries["lws"]["params"]["epochs"] == 5
    assert all(e["description"] for e in entries.values())


def test_argmax_is_matches_argmax_including_ties():
    import torch
    from classifiers.tau_norm import argmax_is
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (2000, 7), generator=generator).float()  # many ties
    labels = torch.randint(0, 7, (2000,), generator=generator)
    assert torch.equal(argmax_is(scores.clone(), labels), scores.argmax(1) == labels)


def test_lws_memory_budget_caches_or_recomputes_with_the_same_result(data):
    X, _ = data["test"]
    cached, recomputed = fit("lws", data, memory_budget=10**15), fit("lws", data, memory_budget=0)
    assert cached.cached_logits_ and not recomputed.cached_logits_
    np.testing.assert_allclose(recomputed.scales_, cached.scales_, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(recomputed.predict(X), cached.predict(X))


@pytest.mark.parametrize("name", ["disalign", "marc"])
def test_frozen_logit_methods_give_the_same_result_with_and_without_the_cache(data, name):
    X, _ = data["test"]
    cached, recomputed = fit(name, data, memory_budget=10**15), fit(name, data, memory_budget=0)
    np.testing.assert_allclose(recomputed.logits(X), cached.logits(X), rtol=1e-4, atol=1e-5)


def test_frozen_logit_cache_memory_lives_until_its_last_view_goes():
    import gc
    from classifiers.training import zeros_on_huge_pages
    cache = zeros_on_huge_pages(3000, 700, torch.device("cpu"))
    assert cache.shape == (3000, 700) and cache.dtype == torch.float32 and cache.is_contiguous()
    assert not cache.any()
    cache.copy_(torch.arange(3000 * 700, dtype=torch.float32).view(3000, 700))
    rows = cache[10:12]
    del cache
    gc.collect()
    assert rows[1, 0] == 11 * 700 and rows[0, 699] == 10 * 700 + 699
    assert zeros_on_huge_pages(0, 700, torch.device("cpu")).shape == (0, 700)


def test_frozen_logit_cache_falls_back_to_small_pages_where_the_kernel_refuses_huge_ones(monkeypatch):
    import mmap
    import types
    import classifiers.training as training
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        pytest.skip("no MADV_HUGEPAGE on this platform")

    class Refusing(mmap.mmap):
        def madvise(self, *args):
            raise OSError(22, "Invalid argument")  # a kernel built without transparent huge pages

    monkeypatch.setattr(training, "mmap", types.SimpleNamespace(
        mmap=Refusing, MADV_HUGEPAGE=mmap.MADV_HUGEPAGE, MAP_PRIVATE=mmap.MAP_PRIVATE, MAP_ANONYMOUS=mmap.MAP_ANONYMOUS))
    cache = training.zeros_on_huge_pages(40, 3, torch.device("cpu"))
    assert cache.shape == (40, 3) and not cache.any()


def test_knn_pickles_only_its_own_rows_and_refuses_an_old_faiss_pickle(data):
    import pickle
    (Xtr, ytr), (X, _) = data["train"], data["test"]
    stack = torch.from_numpy(np.stack([Xtr] * 20))  # a sweep's views: X is views[0]
    model = create("knn", device="cpu").fit(stack[0], ytr)
    restored = pickle.loads(pickle.dumps(model))
    assert restored._train.untyped_storage().nbytes() == Xtr.nbytes
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))
    state = model.__getstate__()
    state["_index"] = np.zeros(3, dtype=np.uint8)  # what the faiss-index version pickled
    with pytest.raises(FeatcacheError, match="fit it again"):
        create("knn").__setstate__(state)


def test_choose_on_val_takes_the_best_score_and_the_smaller_value_on_ties():
    from classifiers.base import FitData, choose_on_val
    val = (torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
    fit_data = FitData(val[0], val[1], np.array([2, 2]), 2, None, val, torch.device("cpu"))
    seen = []

    def score(X_val, y_val):
        seen.append((X_val, y_val))
        return [0.5, 0.5, 0.25]

    chosen, curve = choose_on_val(fit_data, "m", "tau", [0.2, 0.1, 0.0], score)
    assert chosen == 0.1 and curve == {0.2: 0.5, 0.1: 0.5, 0.0: 0.25}
    assert len(seen) == 1 and seen[0][0] is val[0] and seen[0][1] is val[1]  # the whole grid in one call
    fit_data.val = None
    with pytest.raises(FeatcacheError, match=r"^m: tau='auto' needs a validation split"):
        choose_on_val(fit_data, "m", "tau", [0.0], score)
