"""The estimator base: parameters shared by a family of classes are declared once (``shared``)."""

from __future__ import annotations

import inspect

import pytest

from poisonreach.attacks import ATTACKS, CancelingAttack, FrankWolfeCanceling, GaussNewtonCanceling, GradientCanceling
from poisonreach.defenses import DEFENSES
from poisonreach.estimator import Estimator, keywords
from poisonreach.targets import TARGET_GENERATORS
from poisonreach.validation import Number


def _extra(*, scale: float = 2.0, seed: int = 0):
    """A stub declaring two shared parameters."""


class Toy(Estimator):
    constraints = {"scale": Number(low=0), "size": Number(low=1, integer=True)}
    shared = keywords(_extra)

    def __init__(self, size: int, *, name: str = "toy", **shared):
        self._set_params(locals())


def test_a_shared_parameter_is_in_the_signature_after_the_own_ones():
    assert list(inspect.signature(Toy).parameters) == ["size", "name", "scale", "seed"]
    assert inspect.signature(Toy).parameters["scale"].default == 2.0


def test_shared_parameters_are_validated_stored_and_shown():
    toy = Toy(3, scale=0.5)
    assert (toy.size, toy.name, toy.scale, toy.seed) == (3, "toy", 0.5, 0)
    assert repr(toy) == "Toy(size=3, scale=0.5)"
    assert toy.get_params() == {"size": 3, "name": "toy", "scale": 0.5, "seed": 0}
    with pytest.raises(Exception, match="scale"):
        Toy(3, scale=-1.0)


def test_an_unknown_keyword_is_refused_as_python_refuses_it():
    with pytest.raises(TypeError, match="unexpected keyword argument 'sclae'"):
        Toy(3, sclae=1.0)


def test_a_parameter_declared_twice_fails_when_the_class_is_made():
    with pytest.raises(ValueError, match="duplicate parameter name"):
        class Twice(Toy):  # noqa: F841
            def __init__(self, size: int, *, seed: int = 1, **shared):
                self._set_params(locals())


def test_the_canceling_solvers_take_the_problem_parameters_from_their_base():
    problem = [p.name for p in CancelingAttack.shared]
    assert problem[:4] == ["box", "replace", "parameters", "weight_decay"]
    for cls in (GaussNewtonCanceling, GradientCanceling, FrankWolfeCanceling):
        assert issubclass(cls, CancelingAttack) and cls.model_targeted
        assert list(inspect.signature(cls).parameters)[-len(problem):] == problem
        assert cls(0.1, weight_decay=0.5, replace=True).weight_decay == 0.5


@pytest.mark.parametrize("cls", [*ATTACKS.values(), *DEFENSES.values(), *TARGET_GENERATORS.values()], ids=lambda c: c.__name__)
def test_no_constructor_leaves_its_varkw_in_the_signature(cls):
    """What ``inspect``, ``help`` and ``poisonreach options`` show is every parameter by name."""
    kinds = {p.kind for p in inspect.signature(cls).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
