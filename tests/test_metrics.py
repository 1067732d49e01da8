"""Metrics against hand computations."""
import numpy as np
import pytest

from classifiers import metrics


def test_hand_computed_example():
    # 3 classes; train counts: 150 (many), 50 (medium), 5 (few)
    y = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 0, 2, 0])
    logits = np.eye(3)[pred] * 5.0
    out = metrics.evaluate(logits, y, np.array([150, 50, 5]))
    assert out["many"] == pytest.approx(75.0) and out["medium"] == pytest.approx(50.0) and out["few"] == pytest.approx(50.0)
    assert out["top1"] == pytest.approx(100 * (0.75 + 0.5 + 0.5) / 3)
    assert out["accuracy"] == pytest.approx(100 * 5 / 8)
    assert (out["n_many"], out["n_medium"], out["n_few"]) == (1, 1, 1)
    # F1: class0 P=3/5 R=3/4 -> 2/3; class1 P=1/2 R=1/2 -> 1/2; class2 P=1 R=1/2 -> 2/3
    assert out["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert out["top5"] == pytest.approx(100.0)


def test_absent_classes_are_left_out():
    y = np.array([0, 0, 2])
    logits = np.eye(3)[[0, 1, 2]]
    out = metrics.evaluate(logits, y, np.array([10, 10, 10]))
    assert out["top1"] == pytest.approx(100 * (0.5 + 1.0) / 2)
    assert out["n_few"] == 2 and out["many"] is None and out["n_many"] == 0


def test_top5_and_ece_by_hand():
    logits = np.array([[0.0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0]])
    assert metrics.topk_accuracy(logits, np.array([0, 0]), 5) == pytest.approx(0.5)
    # two predictions with confidence 0.9 and 0.6 (in different bins), one right, one wrong
    probs_logits = np.log(np.array([[0.9, 0.1], [0.4, 0.6]]))
    ece = metrics.expected_calibration_error(probs_logits, np.array([0, 0]))
    assert ece == pytest.approx(0.5 * abs(1 - 0.9) + 0.5 * abs(0 - 0.6))


def test_shot_thresholds_are_configurable():
    groups = metrics.shot_groups(np.array([101, 100, 20, 19]), many=100, few=20)
    assert groups["many"].tolist() == [True, False, False, False]
    assert groups["medium"].tolist() == [False, True, True, False]
    assert groups["few"].tolist() == [False, False, False, True]


def test_metrics_of_a_tensor_equal_those_of_its_array():
    """The sweep scores logits where they are (a GPU's tensors); the numbers are the numpy ones."""
    import torch
    from featcache.metrics import calibration_bins, evaluate
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(3000, 12)) * 3).astype(np.float32)
    y = rng.integers(0, 12, 3000)
    counts = np.array([300, 200, 150, 120, 90, 60, 40, 25, 18, 9, 4, 2])
    as_array, as_tensor = evaluate(logits, y, counts), evaluate(torch.from_numpy(logits), torch.from_numpy(y), counts)
    assert as_array.keys() == as_tensor.keys()
    for name, value in as_array.items():
        assert as_tensor[name] == pytest.approx(value, rel=1e-12, abs=1e-12), name
    assert calibration_bins(logits, y) == calibration_bins(torch.from_numpy(logits), y)


def test_metrics_read_any_numpy_layout_and_order_ties_by_class_index():
    import torch
    from featcache.metrics import evaluate, topk_accuracy
    rng = np.random.default_rng(5)
    logits = rng.normal(size=(400, 10)).astype(np.float32)
    y = np.arange(400) % 10
    counts = np.full(10, 50)
    expected = evaluate(logits[::-1].copy(), y[::-1].copy(), counts)
    frozen = logits[::-1].copy()
    frozen.flags.writeable = False
    graded = torch.from_numpy(logits[::-1].copy()).requires_grad_(True)
    for variant in (logits[::-1], logits[::-1].astype(">f4"), np.asfortranarray(logits[::-1]), frozen, graded):
        assert evaluate(variant, y[::-1], counts) == pytest.approx(expected, rel=1e-12), type(variant)
    # equal logits rank by class index, as the argmax picks the first: with all-zero logits class c
    # is in the top 5 exactly when c < 5
    zeros = np.zeros((400, 10), dtype=np.float32)
    assert topk_accuracy(zeros, y, 5) == np.mean(y < 5) == topk_accuracy(torch.from_numpy(zeros), y, 5)
    assert topk_accuracy(zeros, y, 1) == np.mean(y == 0) == np.mean(zeros.argmax(1) == y)
