"""The shared base of the SGD-trained estimators: the schedule declared once, built from the parameters."""
import pytest

from classifiers import REGISTRY, create
from classifiers.params import InvalidParameterError
from classifiers.training import EPOCH_STEPS, EPOCH_STEPS_RULE, Schedule, SGDTrained

SGD_METHODS = [name for name, cls in REGISTRY.items() if "epochs" in cls.param_names()]


@pytest.mark.parametrize("name", SGD_METHODS)
def test_schedule_constraints_are_the_bases(name):
    cls = REGISTRY[name]
    assert issubclass(cls, SGDTrained) and cls.uses_views
    for param, rules in SGDTrained._parameter_constraints.items():
        assert cls._parameter_constraints[param] is rules, param


EPOCH_STEP_METHODS = [name for name in SGD_METHODS if "epoch_steps" in REGISTRY[name].param_names()]


@pytest.mark.parametrize("name", SGD_METHODS)
def test_schedule_is_built_from_the_parameters(name):
    """With ``epoch_steps="ceil"`` (the count before the official ones; the fixed count of the
    methods without the parameter) the schedule is the one this test pinned before."""
    steps = {"epoch_steps": "ceil"} if name in EPOCH_STEP_METHODS else {}
    estimator = create(name, epochs=3, lr=0.01, momentum=0.5, weight_decay=0.0, batch_size=7, sampler="sqrt",
                       seed=4, **steps)
    assert estimator._schedule() == Schedule(3, 0.01, 0.5, 0.0, 7, "sqrt", 4)


@pytest.mark.parametrize("name", EPOCH_STEP_METHODS)
def test_epoch_steps_is_declared_once_and_reaches_the_schedule(name):
    cls = REGISTRY[name]
    assert cls._parameter_constraints["epoch_steps"] is EPOCH_STEPS_RULE
    for steps in EPOCH_STEPS:
        assert create(name, epoch_steps=steps)._schedule().epoch_steps == steps
    with pytest.raises(InvalidParameterError, match=rf"^{name}: parameter epoch_steps='round' is invalid"):
        create(name, epoch_steps="round")


def test_the_official_loops_batch_counts_are_the_defaults():
    """classifier-balancing's int(N / B) for cRT, LWS and the recipes on cRT's loop; MiSLAS's
    ceil(N / B) + 1 for las; DisAlign and MARC keep every draw once."""
    defaults = {name: REGISTRY[name]().epoch_steps for name in SGD_METHODS}
    assert defaults == {**dict.fromkeys(SGD_METHODS, "floor"), "las": "ceil+1", "maxnorm": "ceil",
                        "disalign": "ceil", "marc": "ceil"}
    assert "epoch_steps" not in REGISTRY["maxnorm"].param_names()  # its signature is maxnorm.py's


@pytest.mark.parametrize("name", SGD_METHODS)
def test_every_sgd_method_refuses_a_bad_schedule_alike(name):
    with pytest.raises(InvalidParameterError, match=rf"^{name}: parameter momentum=1.0 is invalid; "
                                                    r"expected a number in \[0, 1\)$"):
        create(name, momentum=1.0)
