"""The registry owns each method's metadata; tables, sweep, `lt-cls list` and the benchmark read it."""
import re

import pytest

from classifiers import REGISTRY, available, create
from classifiers.base import DIAGNOSTICS, FAMILIES, default_methods, register
from classifiers.tables import aggregate
from cli.lt_cls_cmd import main as lt_cls
from tests.conftest import invoke
from tests.synthetic import long_tailed_features


@pytest.mark.parametrize("name", list(REGISTRY))
def test_constraint_table_covers_exactly_the_init_parameters(name):
    """scikit-learn's rule for ``_parameter_constraints``: one entry per ``__init__`` parameter."""
    cls = REGISTRY[name]
    assert set(cls._parameter_constraints) == set(cls.param_names()), name


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_method_has_a_display_name_and_family(name):
    info = REGISTRY[name].info
    assert info.name == name and info.display.strip() and info.family in FAMILIES
    assert set(info.diagnostics) <= set(DIAGNOSTICS)
    assert info.needs_classifier == REGISTRY[name].needs_classifier
    assert info.chosen_on_val == tuple(REGISTRY[name].auto_params)


def test_display_names_are_distinct_and_families_are_in_table_order():
    infos = [cls.info for cls in REGISTRY.values()]
    assert len({i.display for i in infos}) == len(infos)
    assert [FAMILIES.index(i.family) for i in infos] == sorted(FAMILIES.index(i.family) for i in infos)
    assert infos[0].name == "joint" and default_methods()[0] == "joint"


def test_register_refuses_an_unknown_family_or_diagnostic():
    with pytest.raises(ValueError, match="family 'novel' is not one of paper, beyond-paper, reference"):
        register("x", display="X", family="novel")
    with pytest.raises(ValueError, match="unknown diagnostics roc"):
        register("x", display="X", family="paper", diagnostics=("roc",))
    assert "x" not in REGISTRY


@pytest.fixture(scope="module")
def data():
    return long_tailed_features()


@pytest.mark.parametrize("name", [n for n, cls in REGISTRY.items() if cls.info.diagnostics])
def test_declared_diagnostics_have_what_the_sweep_reads(data, name):
    (X, y), val = data["train"], data["val"]
    info = REGISTRY[name].info
    params = {p: "auto" for p in info.chosen_on_val}
    if "epochs" in REGISTRY[name].param_names():
        params["epochs"] = 1
    fitted = create(name, **params).fit(X, y, class_counts=data["counts"], classifier=(data["W"], data["b"]),
                                        val=val)
    if "weight_norms" in info.diagnostics:
        assert fitted.weight_.shape == data["W"].shape
    if "tau_curve" in info.diagnostics:
        assert fitted.val_curve_ and fitted.tau_ in fitted.val_curve_


def test_tables_list_methods_by_family_then_registration():
    record = {"params": {}, "seed": 0, "representation": "r", "eval_split": "test", "selected_on": None,
              "status": "ok", "many_threshold": 100, "few_threshold": 20, "cache_key": "k",
              **dict.fromkeys(("top1", "many", "medium", "few"), 50.0)}
    rows = aggregate([{**record, "method": name} for name in reversed(REGISTRY)])
    assert [r.method for r in rows] == list(REGISTRY)
    assert [r.label for r in rows] == [cls.info.display for cls in REGISTRY.values()]


def test_available_and_list_show_the_metadata(runner):
    entries = {e["name"]: e for e in available()}
    assert entries["tau"]["display"] == "tau-norm" and entries["tau"]["family"] == "paper"
    assert entries["tau"]["needs_classifier"] and entries["tau"]["chosen_on_val"] == ("tau",)
    assert "tau_curve" in entries["tau"]["diagnostics"] and not entries["ncm"]["needs_classifier"]
    output = invoke(runner, lt_cls, ["list"]).output
    assert re.search(r"^\s+tau-norm \(paper\); needs the checkpoint's classifier, the val split for tau='auto'$",
                     output, re.M)
    assert re.search(r"^\s+LogReg \(sklearn\) \(reference\)$", output, re.M)
