"""Choosing a target (appendix D): the strongest GradPC target that GC reaches with a given budget.

An experiment procedure over the library: targets from :mod:`poisonreach.targets`, τ from
:mod:`poisonreach.reachability`, GC from :mod:`poisonreach.attacks`, validation accuracy from
:mod:`poisonreach.training`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import Tensor, nn

# reachability.threshold and training.accuracy are read at each call, so a patched one is used
from .. import reachability, training
from ..attacks import GradientCanceling
from ..targets import GradPC


@dataclass
class Candidate:
    """One target considered by :func:`select_target`."""

    eps_w: float
    tau: float
    val_acc: float
    loss_ratio: float | None = None  # final / initial GC objective; None when ruled out by τ
    kept: bool = False
    reason: str = ""


@dataclass
class Selection:
    """The outcome of the appendix D procedure: the chosen target and every candidate's record."""

    model: nn.Module | None
    eps_w: float | None
    candidates: list[Candidate] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"eps_w": self.eps_w, "candidates": [asdict(c) for c in self.candidates]}


def select_target(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    X_val: Tensor,
    y_val: Tensor,
    *,
    eps_w_list: list[float],
    eps_d: float,
    make_generator: Callable[[float], GradPC] = GradPC,
    make_attack: Callable[[float], object] | None = None,
    loss_margin: float = 0.1,
) -> Selection:
    """Appendix D: choose the strongest target that GC can reach with budget ε_d.

    For each ε_w: generate the target, compute τ and rule it out if τ > ε_d; run GC and keep it if
    its final objective is below ``loss_margin`` (one tenth) of the initial one; among those kept,
    pick the one with the lowest accuracy on the *validation* split (the largest drop). The test
    split is never used.
    """
    make_attack = make_attack or (lambda e: GradientCanceling(e))
    candidates, models = [], []
    for eps_w in eps_w_list:
        target = make_generator(eps_w).generate(model, X, y)
        cand = Candidate(eps_w=eps_w, tau=reachability.threshold(target, X, y).tau, val_acc=training.accuracy(target, X_val, y_val))
        if cand.tau > eps_d:
            cand.reason = f"tau {cand.tau:.3g} > eps_d {eps_d:g}"
        else:
            result = make_attack(eps_d).poison(target, X, y)
            cand.loss_ratio = result.grad_norm_ratio**2
            cand.kept = cand.loss_ratio <= loss_margin
            cand.reason = "" if cand.kept else f"GC loss ratio {cand.loss_ratio:.3g} > {loss_margin:g}"
        candidates.append(cand)
        models.append(target)
    kept = [i for i, c in enumerate(candidates) if c.kept]
    if not kept:
        return Selection(model=None, eps_w=None, candidates=candidates)
    best = min(kept, key=lambda i: candidates[i].val_acc)
    return Selection(model=models[best], eps_w=candidates[best].eps_w, candidates=candidates)
