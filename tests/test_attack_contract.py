"""The contract every attack keeps: constructor validation, the estimator API and the one verb, ``poison``.

One test per check, each over a table of every attack in :data:`poisonreach.attacks.ATTACKS`
(``test_the_tables_cover_every_attack`` fails when an attack is missing from one). Behaviour
particular to one attack is tested in that attack's own file.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from contract import bad_cases, check_estimator, examples, kwargs_id

from poisonreach.attacks import (
    ATTACKS, TGDA, Attack, CancelingAttack, Construction, FrankWolfeCanceling, GaussNewtonCanceling, GradientCanceling, GradientMatching, LabelFlip,
    OfficialGradientCanceling, PoisonResult,
)
from poisonreach.errors import PoisonReachError

NAMES = {"gc": GaussNewtonCanceling, "gc-pgd": GradientCanceling, "gc-fw": FrankWolfeCanceling, "gm": GradientMatching, "labelflip": LabelFlip, "tgda": TGDA,
         "gc-official": OfficialGradientCanceling, "construct": Construction}
REQUIRED = {"eps_d": 0.1}  # the bad arguments below are tried on top of these
RUNTIME = ("device", "progress", "checkpoint", "checkpoint_every")  # never part of config()
BAD_BUDGETS = [0, -0.1, math.nan, math.inf, "0.1", True]  # every attack rejects these as eps_d

# Bad constructor arguments: each raises a PoisonReachError naming the argument (its last key; see contract.py).
BAD_PARAMS = {
    GradientCanceling: [
        dict(epochs=-1), dict(epochs=2.5),
        dict(lr=0), dict(lr=-1.0), dict(lr=math.nan), dict(lr=math.inf),
        dict(momentum=2), dict(momentum=-0.1), dict(momentum=math.nan),
        dict(schedule="linear"),
        dict(block_size=0), dict(block_size=1.5),
        dict(chunk_size=0),
        dict(box=(1, 0)), dict(box=(0.5, 0.5)), dict(box=(0, math.nan)), dict(box=(0, 1, 2)), dict(box="range"),
        dict(parameters="middle"),
        dict(seed=1.5), dict(seed="0"),
        dict(checkpoint_every=0),
    ],
    GaussNewtonCanceling: [
        dict(iterations=-1), dict(iterations=1.5),
        dict(cg_iterations=0),
        dict(cg_tolerance=0), dict(cg_tolerance=2),
        dict(damping=0), dict(damping=math.nan),
        dict(active_set_rounds=-1),
        dict(labels="soft"),
        dict(tolerance=-1e-3),
        dict(box=(1, 0)), dict(box="range"),
        dict(parameters="middle"),
        dict(chunk_size=0),
        dict(seed="0"),
        dict(progress="yes"),
        dict(checkpoint_every=0),
    ],
    FrankWolfeCanceling: [
        dict(step="2/(t+2)"),
        dict(starts=0), dict(starts=2.5),
        dict(start_steps=-1), dict(start_steps=True),
        dict(box=None),
    ],
    GradientMatching: [
        dict(objective="negated"), dict(objective=None),
        dict(steps=-1), dict(steps=2.5),
        dict(lr=0), dict(lr=-1.0), dict(lr=math.nan),
        dict(optimizer="rmsprop"),
        dict(schedule="cosine"),
        dict(restarts=0), dict(restarts=1.5),
        dict(restarts=2),  # restarts need a ball to start in
        dict(eps_perturbation=0), dict(eps_perturbation=-0.1), dict(eps_perturbation=math.inf),
        dict(box=(1, 0)), dict(box=(0.5, 0.5)), dict(box=(0, 1, 2)), dict(box="range"),
        dict(parameters="middle"),
        dict(chunk_size=0),
        dict(seed=1.5), dict(seed="0"),
    ],
    LabelFlip: [
        dict(eps_d=-0.5), dict(eps_d=None),
        dict(strategy="margin"), dict(strategy=None),
        dict(chunk_size=0), dict(chunk_size=2.5),
        dict(seed=0.5), dict(seed="1"),
    ],
    OfficialGradientCanceling: [
        dict(epochs=-1), dict(epochs=2.5),
        dict(lr=0), dict(lr=-1.0), dict(lr=math.nan),
        dict(schedule="linear"),
        dict(stop_below=-1), dict(stop_below=math.inf),
        dict(chunk_size=0),
        dict(seed="0"),
        dict(progress="yes"),
    ],
    Construction: [
        dict(iterations=-1), dict(iterations=1.5),
        dict(tolerance=-1e-3), dict(tolerance=math.nan),
        dict(weight_decay=-1.0),
        dict(seed="0"),
        dict(progress="yes"),
    ],
    TGDA: [
        dict(epochs=-1), dict(epochs=2.5),
        dict(leader_lr=0), dict(leader_lr=math.inf),
        dict(follower_lr=-1.0), dict(follower_lr=math.nan),
        dict(leader_steps=0),
        dict(follower_steps=0), dict(follower_steps=1.5),
        dict(cg_iterations=0),
        dict(damping=-0.1), dict(damping=math.inf),
        dict(generator="gan"),
        dict(box=(1, 0)), dict(box=(0.5, 0.5)), dict(box=(0, math.nan)), dict(box=(0, 1, 2)), dict(box="range"),
        dict(batch_size=0), dict(batch_size=10.5),
        dict(pretrain_follower=-1),
        dict(chunk_size=0),
        dict(seed=1.5),
        dict(progress="yes"),
    ],
}
for _cls in NAMES.values():
    BAD_PARAMS[_cls] = BAD_PARAMS[_cls] + [dict(eps_d=eps_d) for eps_d in BAD_BUDGETS]

# Valid values at the edges of the accepted ranges.
EDGE_VALUES = {
    GradientCanceling: [dict(eps_d=1e-6, epochs=0, momentum=0.0, block_size=1, chunk_size=1, box=[-1, 1], seed=0)],
    FrankWolfeCanceling: [dict(start_steps=0)],
    GaussNewtonCanceling: [dict(iterations=0, active_set_rounds=0, tolerance=0, box=None)],
}

# Instances with non-default arguments, and their repr: only the arguments that differ from the defaults.
EXAMPLES = [
    (GradientCanceling, dict(eps_d=0.1, lr=0.3, box=None), "GradientCanceling(eps_d=0.1, lr=0.3, box=None)"),
    (GradientCanceling,
     dict(eps_d=0.2, epochs=7, lr=0.3, momentum=0.5, schedule="constant", backtrack=False, block_size=4, chunk_size=9, box="data-range",
          optimize_labels=True, replace=True, parameters="last", seed=3, device="cpu", progress=False, checkpoint=Path("x.ckpt"),
          checkpoint_every=5),
     # the canceling problem's shared parameters (CancelingAttack.shared) come after the solver's own
     "GradientCanceling(eps_d=0.2, epochs=7, lr=0.3, momentum=0.5, schedule='constant', backtrack=False, block_size=4, chunk_size=9, "
     "optimize_labels=True, checkpoint=PosixPath('x.ckpt'), checkpoint_every=5, box='data-range', replace=True, parameters='last', "
     "seed=3, device='cpu', progress=False)"),
    (GaussNewtonCanceling, dict(eps_d=0.1, iterations=5, labels="fixed", box=None),
     "GaussNewtonCanceling(eps_d=0.1, iterations=5, labels='fixed', box=None)"),
    (FrankWolfeCanceling, dict(eps_d=0.1, step="open-loop", starts=3, start_steps=0, box="data-range"),
     "FrankWolfeCanceling(eps_d=0.1, step='open-loop', starts=3, start_steps=0, box='data-range')"),
    (GradientMatching,
     dict(eps_d=0.1, steps=20, restarts=3, eps_perturbation=0.05, box=[-1, 1], optimizer="adam", device="cpu", progress=False),
     "GradientMatching(eps_d=0.1, steps=20, optimizer='adam', restarts=3, eps_perturbation=0.05, box=(-1, 1), device='cpu', progress=False)"),
    (LabelFlip, dict(eps_d=0.3, strategy="loss", chunk_size=10, seed=3, device="cpu"),
     "LabelFlip(eps_d=0.3, strategy='loss', chunk_size=10, seed=3, device='cpu')"),
    (TGDA, dict(eps_d=0.1, leader_lr=0.5, box=None), "TGDA(eps_d=0.1, leader_lr=0.5, box=None)"),
    (OfficialGradientCanceling, dict(eps_d=0.03, epochs=5, lr=1.0, schedule="constant", stop_below=0.0, chunk_size=7, seed=2, progress=False),
     "OfficialGradientCanceling(eps_d=0.03, epochs=5, lr=1.0, schedule='constant', stop_below=0.0, chunk_size=7, seed=2, progress=False)"),
    (TGDA,
     dict(eps_d=0.2, epochs=7, leader_lr=0.3, follower_lr=0.2, leader_steps=2, follower_steps=5, cg_iterations=8, damping=0.1,
          generator="points", box=[-1, 1], batch_size=None, pretrain_follower=3, chunk_size=9, seed=3, device="cpu", progress=False),
     "TGDA(eps_d=0.2, epochs=7, leader_lr=0.3, follower_lr=0.2, leader_steps=2, follower_steps=5, cg_iterations=8, damping=0.1, "
     "generator='points', box=(-1, 1), batch_size=None, pretrain_follower=3, chunk_size=9, seed=3, device='cpu', progress=False)"),
] + [(cls, dict(REQUIRED), f"{cls.__name__}(eps_d=0.1)") for cls in NAMES.values()]  # the defaults are not shown


def cases(table: dict) -> list:
    return [pytest.param(cls, kwargs, id=f"{cls.__name__}-{kwargs_id(kwargs)}") for cls, rows in table.items() for kwargs in rows]


def as_stored(value):
    """Lists (of a box) are stored as tuples."""
    return tuple(value) if isinstance(value, list) else value


def test_the_tables_cover_every_attack():
    assert ATTACKS == NAMES and all(cls.name == name for name, cls in NAMES.items())
    assert set(BAD_PARAMS) == set(ATTACKS.values()) and {cls for cls, _, _ in EXAMPLES} == set(ATTACKS.values())


@pytest.mark.parametrize("cls, kwargs, match", bad_cases(BAD_PARAMS))
def test_check_params(cls, kwargs, match):
    with pytest.raises(PoisonReachError, match=match):
        cls(**{**REQUIRED, **kwargs})


@pytest.mark.parametrize("cls, kwargs", cases(EDGE_VALUES))
def test_valid_edge_values_are_accepted(cls, kwargs):
    params = cls(**{**REQUIRED, **kwargs}).get_params()
    assert all(params[k] == as_stored(v) for k, v in kwargs.items())


@pytest.mark.parametrize("cls", [cls for cls in NAMES.values() if "box" in inspect.signature(cls).parameters], ids=lambda c: c.__name__)
def test_a_box_given_as_a_list_is_stored_as_a_tuple(cls):
    assert cls(0.1, box=[-1, 1]).box == (-1, 1)


@pytest.mark.parametrize("cls, kwargs, shown", examples(EXAMPLES))
def test_estimator_round_trip_repr_and_config(cls, kwargs, shown):
    attack = cls(**kwargs)
    assert isinstance(attack, Attack)
    again = check_estimator(attack, kwargs, shown, as_stored)
    assert again.config() == attack.config()
    params, config = attack.get_params(), attack.config()
    assert config["attack"] == cls.name and not set(RUNTIME) & set(config)  # runtime settings never change a result
    assert config == {"attack": cls.name, **{k: list(v) if isinstance(v, tuple) else v for k, v in params.items() if k not in RUNTIME}}


@pytest.mark.parametrize("cls", NAMES.values(), ids=lambda c: c.__name__)
def test_the_one_verb_is_poison(cls):
    signature = inspect.signature(cls.poison, eval_str=True)
    assert list(signature.parameters)[:5] == ["self", "model", "X", "y", "loss"]
    assert signature.parameters["loss"].default is None
    assert signature.return_annotation is PoisonResult


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_adds_round_n_eps_d_poisons(name, digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:100], s.y_train[:100]
    quick = {"gc-pgd": dict(epochs=1), "gc": dict(iterations=1), "gm": dict(steps=1), "tgda": dict(epochs=1, follower_steps=1, generator="points"),
             "gc-official": dict(epochs=1), "construct": dict(iterations=1)}
    attack = ATTACKS[name](0.25, **quick.get(name, {}), **({"progress": False} if "progress" in inspect.signature(ATTACKS[name]).parameters else {}))
    result = attack.poison(model, X, y)
    assert len(result.x) == 25 and result.x.shape[1:] == X.shape[1:]
    assert result.source_indices.shape == (25,) and int(result.source_indices.max()) < 100
    assert result.eps_d == 0.25 and result.config == attack.config()
    assert torch.isfinite(result.x).all()



@pytest.mark.parametrize("name", ["gc", "gc-pgd", "gc-fw"])
def test_the_canceling_attacks_start_from_given_poisons(name, digits_lr):
    """Each solver of problem (18) takes ``start``: its first m poisons are the start points, and
    the ratio is against the residual at the clean start, the default start's first entry."""
    s, model = digits_lr
    X, y = s.x_train[:100], s.y_train[:100]
    flips = LabelFlip(0.3, strategy="least-likely", seed=1).poison(model, X, y)  # 30 flips: more than the 25 poisons
    quick = {"gc-pgd": dict(epochs=1), "gc": dict(iterations=1), "gc-fw": dict(iterations=1)}
    assert issubclass(ATTACKS[name], CancelingAttack)
    result = ATTACKS[name](0.25, **quick[name], progress=False).poison(model, X, y, start=flips)
    default = ATTACKS[name](0.25, **quick[name], progress=False).poison(model, X, y)
    if name != "gc-fw":  # Frank–Wolfe's first step replaces ν_0's atoms
        assert torch.equal(result.source_indices, flips.source_indices[:25])
    assert result.grad_norm_initial == pytest.approx(default.grad_norm_history[0], rel=1e-4)
    assert result.grad_norm_history[0] != pytest.approx(default.grad_norm_history[0], rel=1e-3)  # another start


@pytest.mark.parametrize("name", ["gc", "gc-pgd", "gc-fw"])
def test_a_start_outside_the_box_is_projected_onto_it(name, digits_lr):
    """Every solver of problem (18) with a box descends from the projection of its start onto Γ:
    two starts far above the box, at different heights, project onto the same points and give the
    same poisons."""
    s, model = digits_lr
    X, y = s.x_train[:100], s.y_train[:100]
    flips = LabelFlip(0.25, strategy="least-likely", seed=1).poison(model, X, y)
    quick = {"gc-pgd": dict(epochs=1), "gc": dict(iterations=1), "gc-fw": dict(iterations=1)}
    results = [ATTACKS[name](0.25, box=(0.0, 1.0), **quick[name], progress=False).poison(model, X, y, start=replace(flips, x=flips.x + shift))
               for shift in (100.0, 200.0)]
    assert results[0].grad_norm_history[0] == results[1].grad_norm_history[0]
    assert torch.equal(results[0].x, results[1].x) and results[0].x.max() <= 1.0
