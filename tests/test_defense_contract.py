"""The contract every defense keeps: constructor validation, the estimator API and its verb; a
filter leaves the model it is given as it was.

The filtering defenses (Sever, Influence) answer ``filter(model, X, y, loss=None) -> FilterResult``,
the training defenses (MaxUp, DeepPartitionAggregation) ``train(model, X, y, ...)``. One test per
check, each over a table of every defense in :data:`poisonreach.defenses.DEFENSES`
(``test_the_tables_cover_every_defense`` fails when a defense is missing from one). Behaviour
particular to one defense is tested in that defense's own file.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from contract import bad_cases, check_estimator, examples
from torch import nn

from poisonreach.defenses import DEFENSES, DeepPartitionAggregation, Filter, FilterResult, Influence, MaxUp, Sever
from poisonreach.errors import PoisonReachError

NAMES = {"sever": Sever, "influence": Influence, "maxup": MaxUp, "dpa": DeepPartitionAggregation}
FILTERS = (Sever, Influence)
TRAINING = (MaxUp, DeepPartitionAggregation)
REQUIRED = {Sever: {"fraction": 0.1}, Influence: {"fraction": 0.1}, MaxUp: {}, DeepPartitionAggregation: {"num_partitions": 10}}

# Bad constructor arguments: each raises a PoisonReachError naming the argument (its last key), or,
# given as (kwargs, message), with that message (contract.py).
BAD_PARAMS = {
    Sever: [
        dict(fraction=-0.1), dict(fraction=1.5), dict(fraction="0.1"),
        dict(rounds=0), dict(rounds=1.5),
        dict(parameters="first"), dict(parameters="head"),
        dict(per_class=1),
        dict(power_block=0),
        dict(power_iterations=0),
        dict(power_tol=0),
        dict(cache_mb=-1),
        dict(chunk_size=0),
        dict(seed=1.0),
    ],
    Influence: [
        dict(fraction=-0.1), dict(fraction=2),
        dict(solver="newton"),
        dict(damping=-1e-3), dict(damping=math.nan),
        dict(parameters="first"),
        dict(cg_iterations=0),
        dict(cg_tolerance=0),
        dict(lissa_depth=0),
        dict(lissa_scale=0),
        dict(lissa_repeats=0),
        dict(lissa_batch_size=0),
        dict(block_size=0),
        dict(chunk_size=2.5),
        dict(seed="1"),
    ],
    MaxUp: [
        (dict(m=0), "m must be >= 1"),
        (dict(m=1.5), "m must be an integer"),
        (dict(augmentation="cutmix"), "augmentation must be one of"),
        (dict(strength=-0.1), "strength must be >= 0"),
        (dict(augmentation="shift", strength=1.5), "strength must be an integer"),
    ],
    DeepPartitionAggregation: [
        dict(num_partitions=0), dict(num_partitions=2.5), dict(num_partitions=True), dict(num_partitions=2**24 + 1),
        dict(epochs=0),
        dict(lr=0.0), dict(lr=math.nan),
        dict(batch_size=0),
        dict(optimizer="rmsprop"),
        dict(gamma=0.0), dict(gamma=1.5),
        dict(momentum=1.0), dict(momentum=-0.1),
        dict(weight_decay=-1e-4),
        dict(group_size=0),
        dict(chunk_size=0),
        dict(seed=-1), dict(seed=1.5),
        dict(progress="yes"),
    ],
}

# Instances, and their repr: only the arguments that differ from the defaults.
EXAMPLES = [
    (Sever, dict(fraction=0.1), "Sever(fraction=0.1)"),
    (Sever,
     dict(fraction=0.2, rounds=3, parameters="last", per_class=False, power_block=2, power_iterations=5, power_tol=1e-3, cache_mb=0,
          chunk_size=7, seed=4, device="cpu", progress=False),
     "Sever(fraction=0.2, rounds=3, parameters='last', per_class=False, power_block=2, power_iterations=5, power_tol=0.001, "
     "cache_mb=0.0, chunk_size=7, seed=4, device='cpu', progress=False)"),
    (Influence, dict(fraction=0.1), "Influence(fraction=0.1)"),
    (Influence,
     dict(fraction=0.2, solver="lissa", damping=0.5, parameters="last", cg_iterations=3, cg_tolerance=1e-3, lissa_depth=5, lissa_scale=3.0,
          lissa_repeats=2, lissa_batch_size=8, block_size=4, chunk_size=9, seed=2, device="cpu", progress=False),
     "Influence(fraction=0.2, solver='lissa', damping=0.5, parameters='last', cg_iterations=3, cg_tolerance=0.001, lissa_depth=5, "
     "lissa_scale=3.0, lissa_repeats=2, lissa_batch_size=8, block_size=4, chunk_size=9, seed=2, device='cpu', progress=False)"),
    (MaxUp, dict(), "MaxUp()"),
    (MaxUp, dict(m=2, strength=0.2), "MaxUp(m=2, strength=0.2)"),
    (DeepPartitionAggregation, dict(num_partitions=1200), "DeepPartitionAggregation(num_partitions=1200)"),
    (DeepPartitionAggregation, dict(num_partitions=3000, epochs=5, optimizer="sgd", lr=0.1, seed=2),
     "DeepPartitionAggregation(num_partitions=3000, epochs=5, lr=0.1, optimizer='sgd', seed=2)"),
]


def test_the_tables_cover_every_defense():
    assert DEFENSES == NAMES and all(cls.name == name for name, cls in NAMES.items())
    assert set(FILTERS + TRAINING) == set(DEFENSES.values()) == set(REQUIRED) == set(BAD_PARAMS) == {cls for cls, _, _ in EXAMPLES}


@pytest.mark.parametrize("cls, kwargs, match", bad_cases(BAD_PARAMS))
def test_check_params(cls, kwargs, match):
    with pytest.raises(PoisonReachError, match=match):
        cls(**{**REQUIRED[cls], **kwargs})


@pytest.mark.parametrize("cls, kwargs, shown", examples(EXAMPLES))
def test_estimator_round_trip_and_repr(cls, kwargs, shown):
    check_estimator(cls(**kwargs), kwargs, shown)


@pytest.mark.parametrize("cls", FILTERS, ids=lambda c: c.__name__)
def test_a_filter_answers_filter(cls):
    assert issubclass(cls, Filter)
    signature = inspect.signature(cls.filter, eval_str=True)
    assert list(signature.parameters) == ["self", "model", "X", "y", "loss"] and signature.parameters["loss"].default is None
    assert signature.return_annotation is FilterResult


@pytest.mark.parametrize("cls", TRAINING, ids=lambda c: c.__name__)
def test_a_training_defense_answers_train(cls):
    assert not issubclass(cls, Filter)
    signature = inspect.signature(cls.train, eval_str=True)
    assert list(signature.parameters)[:4] == ["self", "model", "X", "y"]
    assert issubclass(signature.return_annotation, nn.Module)


@pytest.mark.parametrize("cls", FILTERS, ids=lambda c: c.__name__)
def test_a_filter_leaves_the_model_and_its_modes_as_they_were(cls):
    """An MLP with batch-norm (non-trivial running statistics) and dropout, given in train mode: the
    filter scores in eval mode, then restores every submodule's mode; no parameter or buffer changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randint(3, (40,), generator=g)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    damped = {"damping": 1.0} if cls is Influence else {}  # the untrained MLP's Hessian is indefinite
    result = cls(0.1, progress=False, **damped).filter(model, X, y)
    assert isinstance(result, FilterResult) and result.keep_mask.shape == (40,) and int((~result.keep_mask).sum()) == 4
    assert all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
