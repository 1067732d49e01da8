"""The shared base of the SGD-trained estimators: the schedule declared once, built from the parameters."""
import pytest

from classifiers import REGISTRY, create
from classifiers.params import InvalidParameterError
from classifiers.training import Schedule, SGDTrained

SGD_METHODS = [name for name, cls in REGISTRY.items() if "epochs" in cls.param_names()]


@pytest.mark.parametrize("name", SGD_METHODS)
def test_schedule_constraints_are_the_bases(name):
    cls = REGISTRY[name]
    assert issubclass(cls, SGDTrained) and cls.uses_views
    for param, rules in SGDTrained._parameter_constraints.items():
        assert cls._parameter_constraints[param] is rules, param


@pytest.mark.parametrize("name", SGD_METHODS)
def test_schedule_is_built_from_the_parameters(name):
    estimator = create(name, epochs=3, lr=0.01, momentum=0.5, weight_decay=0.0, batch_size=7, sampler="sqrt",
                       seed=4)
    assert estimator._schedule() == Schedule(3, 0.01, 0.5, 0.0, 7, "sqrt", 4)


@pytest.mark.parametrize("name", SGD_METHODS)
def test_every_sgd_method_refuses_a_bad_schedule_alike(name):
    with pytest.raises(InvalidParameterError, match=rf"^{name}: parameter momentum=1.0 is invalid; "
                                                    r"expected a number in \[0, 1\)$"):
        create(name, momentum=1.0)
