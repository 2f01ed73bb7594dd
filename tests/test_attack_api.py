"""What every attack shares: the budget check, the estimator API and the one verb, ``poison``."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from poisonreach.attacks import Attack, PoisonResult
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.run import ATTACKS

BAD_BUDGETS = [0, -0.1, math.nan, math.inf, "0.1", True]


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("eps_d", BAD_BUDGETS, ids=repr)
def test_every_attack_rejects_a_bad_budget(name, eps_d):
    with pytest.raises(PoisonReachError, match="eps_d"):
        ATTACKS[name](eps_d)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_is_an_estimator_with_one_verb(name):
    cls = ATTACKS[name]
    attack = cls(0.1)
    assert isinstance(attack, Attack) and attack.name == name
    assert repr(attack) == f"{cls.__name__}(eps_d=0.1)"  # only non-defaults are shown
    again = cls(**attack.get_params())
    assert again.get_params() == attack.get_params()
    config = attack.config()
    assert config["attack"] == name and config["eps_d"] == 0.1 and "device" not in config and "progress" not in config
    params = list(inspect.signature(cls.poison).parameters)
    assert params[:5] == ["self", "model", "X", "y", "loss"]
    assert inspect.signature(cls.poison).return_annotation in (PoisonResult, "PoisonResult")


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_adds_round_n_eps_d_poisons(name, digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:100], s.y_train[:100]
    quick = {"gc": dict(epochs=1), "gm": dict(steps=1), "tgda": dict(epochs=1, follower_steps=1, generator="points")}
    attack = ATTACKS[name](0.25, **quick.get(name, {}), **({"progress": False} if "progress" in inspect.signature(ATTACKS[name]).parameters else {}))
    result = attack.poison(model, X, y)
    assert len(result.x) == 25 and result.x.shape[1:] == X.shape[1:]
    assert result.source_indices.shape == (25,) and int(result.source_indices.max()) < 100
    assert result.eps_d == 0.25 and result.config == attack.config()
    assert torch.isfinite(result.x).all()
