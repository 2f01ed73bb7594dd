"""The contract every target generator keeps: constructor validation, the estimator API and its
verb, ``generate(model, X, y)``, which returns a corrupted copy of the model.

One test per check, each over a table of every generator a run can name
(:data:`poisonreach.experiments.run.TARGET_GENERATORS`; ``test_the_tables_cover_every_generator``
fails when one is missing from a table). What each generator computes is tested in ``test_targets.py``.
"""

from __future__ import annotations

import inspect
import math

import pytest
from contract import bad_cases, check_estimator, examples
from torch import nn

from poisonreach.errors import PoisonReachError
from poisonreach.targets import TARGET_GENERATORS
from poisonreach.targets import FixedTarget, GradPC, RandomPC

NAMES = {"gradpc": GradPC, "randompc": RandomPC, "fixed": FixedTarget}
REQUIRED = {GradPC: {"eps_w": 1.0}, RandomPC: {"eps_w": 1.0}, FixedTarget: {"weight": [1.0]}}
RUNTIME = ("device", "progress")  # never part of config()

# Bad constructor arguments: each raises a PoisonReachError naming the argument (its last key), or,
# given as (kwargs, message), with that message (contract.py).
BAD_PARAMS = {
    GradPC: [
        dict(eps_w=0), dict(eps_w=-1.0), dict(eps_w=math.nan), dict(eps_w=math.inf), dict(eps_w="1"), dict(eps_w=True),
        dict(eps_w_mode="percent"),
        dict(batch_size=0),
        dict(epochs=0),
        dict(step_size=0),
        dict(seed=0.5),
    ],
    RandomPC: [dict(eps_w=0), dict(eps_w=-0.5), dict(eps_w=math.nan), dict(eps_w=math.inf)],
    FixedTarget: [(dict(weight=[math.nan]), "weight must be finite")],
}

# Instances, their repr (only the arguments that differ from the defaults) and, where pinned, their config.
EXAMPLES = [
    (GradPC, dict(eps_w=0.5, batch_size=8), "GradPC(eps_w=0.5, batch_size=8)", None),
    (GradPC, dict(eps_w=0.1, eps_w_mode="relative", step_size=0.01, epochs=2, seed=3, device="cpu", progress=False),
     "GradPC(eps_w=0.1, eps_w_mode='relative', step_size=0.01, epochs=2, seed=3, device='cpu', progress=False)", None),
    (RandomPC, dict(eps_w=0.5), "RandomPC(eps_w=0.5)", {"generator": "randompc", "eps_w": 0.5, "eps_w_mode": "absolute", "seed": 0}),
    (FixedTarget, dict(weight=[[-2.0, -2.0]], bias=[1.0]), "FixedTarget(weight=[[-2.0, -2.0]], bias=[1.0])",
     {"generator": "fixed", "weight": [[-2.0, -2.0]], "bias": [1.0]}),
]


def test_the_tables_cover_every_generator():
    assert TARGET_GENERATORS == NAMES
    assert set(NAMES.values()) == set(REQUIRED) == set(BAD_PARAMS) == {row[0] for row in EXAMPLES}


@pytest.mark.parametrize("cls, kwargs, match", bad_cases(BAD_PARAMS))
def test_check_params(cls, kwargs, match):
    with pytest.raises(PoisonReachError, match=match):
        cls(**{**REQUIRED[cls], **kwargs})


@pytest.mark.parametrize("cls, kwargs, shown, config", examples(EXAMPLES))
def test_estimator_round_trip_repr_and_config(cls, kwargs, shown, config):
    generator = cls(**kwargs)
    again = check_estimator(generator, kwargs, shown)
    assert again.config() == generator.config()
    name = next(k for k, v in NAMES.items() if v is cls)
    got = generator.config()
    assert got == {"generator": name, **{k: v for k, v in generator.get_params().items() if k not in RUNTIME}}  # runtime settings left out
    if config is not None:
        assert got == config


@pytest.mark.parametrize("cls", NAMES.values(), ids=lambda c: c.__name__)
def test_the_one_verb_is_generate(cls):
    signature = inspect.signature(cls.generate, eval_str=True)
    assert list(signature.parameters)[:4] == ["self", "model", "X", "y"]
    assert signature.return_annotation is nn.Module
