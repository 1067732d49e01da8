"""The registered methods are scikit-learn estimators: estimator checks, clone, CV, grid search,
pipelines, any labels, long-tail scorers."""
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_classification
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from classifiers import REGISTRY, create
from classifiers.base import InvalidInputError
from classifiers.metrics import long_tail_scorers, shot_accuracy
from tests.synthetic import long_tailed_features

WITHOUT_CLASSIFIER = [name for name, cls in REGISTRY.items() if not cls.needs_classifier]
WITH_CLASSIFIER = [name for name, cls in REGISTRY.items() if cls.needs_classifier]


@parametrize_with_checks([create(name) for name in WITHOUT_CLASSIFIER],
                         expected_failed_checks=lambda estimator: estimator._expected_failed_checks)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def test_expected_failures_are_few_and_explained():
    for cls in REGISTRY.values():
        assert len(cls._expected_failed_checks) <= 3
        assert all(isinstance(reason, str) and len(reason) > 20 for reason in cls._expected_failed_checks.values())


@pytest.fixture(scope="module")
def strings():
    """Five imbalanced classes with string labels."""
    X, y = make_classification(n_samples=600, n_features=12, n_informative=8, n_classes=5, n_clusters_per_class=1,
                               weights=[0.5, 0.25, 0.13, 0.08, 0.04], class_sep=2.0, random_state=0)
    names = np.array(["ant", "bee", "cat", "dog", "eel"])
    return X.astype(np.float32), names[y]


FAST = {"crt": {"epochs": 3, "epoch_steps": "ceil"}, "knn": {}, "ncm": {}, "logreg": {}}


@pytest.mark.parametrize("name", list(FAST))
def test_clone_cv_grid_and_pipeline_with_string_labels(name, strings):
    X, y = strings
    estimator = create(name, **FAST[name])
    copy = clone(estimator)
    assert copy.get_params(deep=True) == estimator.get_params(deep=True) and copy is not estimator
    scores = cross_val_score(estimator, X, y, cv=3, scoring="balanced_accuracy")
    assert scores.shape == (3,) and np.all(scores > 0.5)
    predictions = clone(estimator).fit(X, y).predict(X)
    assert set(predictions) <= set(y) and predictions.dtype == y.dtype
    pipeline = Pipeline([("scale", StandardScaler()), ("clf", create(name, **FAST[name]))]).fit(X, y)
    assert list(pipeline.classes_) == sorted(set(y)) and set(pipeline.predict(X)) <= set(y)
    assert 0.5 < pipeline.score(X, y) <= 1.0
    proba = pipeline.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    assert (pipeline.classes_[proba.argmax(1)] == pipeline.predict(X)).mean() > 0.99


def test_grid_search_over_a_crt_parameter(strings):
    X, y = strings
    search = GridSearchCV(create("crt", epochs=3), {"sampler": ["class", "instance"]}, cv=3).fit(X, y)
    assert search.best_params_["sampler"] in ("class", "instance")
    assert set(search.predict(X)) <= set(y)


@pytest.fixture(scope="module")
def joint():
    data = long_tailed_features(max_count=300, imbalance=60)
    return data


@pytest.mark.parametrize("name", WITH_CLASSIFIER)
def test_methods_on_the_checkpoint_classifier_clone_search_and_pipeline(name, joint):
    (X, y), (W, b), val = joint["train"], (joint["W"], joint["b"]), joint["val"]
    estimator = create(name)
    assert clone(estimator).get_params() == estimator.get_params()
    grid = {"tau": [0.5, 1.0]} if "tau" in estimator.get_params() else {"device": ["cpu"]}
    search = GridSearchCV(estimator, grid, cv=3).fit(X, y, classifier=(W, b), val=val)
    assert search.best_estimator_.classes_.tolist() == list(range(8))
    pipeline = Pipeline([("clf", create(name))]).fit(X, y, clf__classifier=(W, b), clf__val=val)
    assert pipeline.predict(joint["test"][0]).shape == (len(joint["test"][0]),)


def test_the_issue_example_tau_grid_search(joint):
    (X, y), (W, b) = joint["train"], (joint["W"], joint["b"])
    search = GridSearchCV(create("tau"), {"tau": [0.5, 1.0]}).fit(X, y, classifier=(W, b))
    assert search.best_params_["tau"] in (0.5, 1.0)


def test_with_the_checkpoint_classifier_labels_must_be_class_indices(joint):
    (X, y), (W, b) = joint["train"], (joint["W"], joint["b"])
    with pytest.raises(InvalidInputError, match="class indices"):
        create("joint").fit(X, np.array(["a"] * len(y)), classifier=(W, b))
    with pytest.raises(InvalidInputError, match="cover 8 classes"):
        create("joint").fit(X, y + 8, classifier=(W, b))


def test_non_contiguous_integer_labels(joint):
    (X, y), (Xt, yt) = joint["train"], joint["test"]
    labels = np.array([3, 10, 11, 40, 41, 42, 100, 7])
    model = create("ncm").fit(X, labels[y])
    assert model.classes_.tolist() == sorted(labels.tolist())
    assert (model.predict(Xt) == labels[yt]).mean() > 0.5
    with pytest.raises(InvalidInputError, match="absent from y"):
        create("ncm").fit(X, labels[y], val=(Xt, yt + 1000))


def test_shot_scorers_against_a_hand_computation(strings):
    X, y = strings
    counts = {label: int((y == label).sum()) for label in np.unique(y)}  # ant 294, bee 152, cat 81, dog 48, eel 25
    y_pred = y.copy()
    y_pred[(y == "eel")] = "ant"  # every eel wrong
    y_pred[np.flatnonzero(y == "dog")[:10]] = "ant"  # 10 dogs wrong
    dogs = (y == "dog").sum()
    assert shot_accuracy(y, y_pred, train_counts=counts, group="few", many=100, few=30) == 0.0
    assert shot_accuracy(y, y_pred, train_counts=counts, group="medium", many=100, few=30) == pytest.approx(
        np.mean([1.0, (dogs - 10) / dogs]))
    assert shot_accuracy(y, y_pred, train_counts=counts, group="all") == pytest.approx(
        np.mean([1, 1, 1, (dogs - 10) / dogs, 0]))
    assert np.isnan(shot_accuracy(y, y_pred, train_counts=counts, group="many", many=1000))
    scorers = long_tail_scorers(counts, many=100, few=50)
    search = GridSearchCV(Pipeline([("scale", StandardScaler()), ("clf", create("ncm"))]),
                          {"clf__metric": ["l2", "cos"]}, scoring=scorers, refit="top1", cv=3).fit(X, y)
    assert set(search.cv_results_) >= {"mean_test_top1", "mean_test_few", "mean_test_many"}
