"""The auditor's questions for a trained model and its training data, without running an attack
(``poisonreach audit``): *could ε_d poisoned points push this model to a given target?* and *how
much damage could any such attacker do?*

- **Thresholds**: τ(2), τ(c) (Theorems 3/4) and the sharpened τ of (A.17) with the box
  (:func:`poisonreach.reachability.sharpened_threshold`): below them no poisons reach the target.
- **A sufficient check** (:func:`construction_check`, linear models): the constructive poisons of
  Theorems 5/6 (:class:`poisonreach.attacks.Construction`), a victim retrained to convergence on
  clean ∪ them, its agreement with the target, and how far outside the box the poisons are. With
  the thresholds this brackets the ε_d a target needs.
- **The damage frontier** (:func:`damage_frontier`, convex victims): a victim retrained to
  convergence on poisoned data is a model that meets the necessary condition at that ε_d, so the
  largest test-accuracy drop over such models bounds any attack's. We *estimate* it from below by
  maximising a smoothed test error over the last layer under the condition, with restarts: the
  value is the largest drop found among models that meet it, not a certified bound.
- **Diagnosis of a poison set** (:func:`diagnose`): where it stands against τ, the residual it
  leaves at the intended target, what the victim became, and a one-sentence verdict.

The victims here are convex (a linear model with weight decay λ > 0, retrained by
:func:`poisonreach.training.minimize`), the setting in which "the victim reaches w" is exact.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from . import training
from .attacks import Construction, PoisonResult
from .errors import PoisonReachError
from .gradients import flat_norm, gradient_sum, select_parameters
from .losses import resolve
from .models import features, last_linear
from .reachability import W_1_OVER_E, box_threshold, inner_sum, lambert_w_constant, residual_floor, sharpened_threshold, threshold
from .rows import dense
from .validation import check_number

logger = logging.getLogger(__name__)

# A target counts as reached when the victim predicts as it does on this share of the test points.
REACHED_AGREEMENT = 99.0


def retrained(model: nn.Module, X: Tensor, y: Tensor, *, weight_decay: float, seed: int = 0) -> nn.Module:
    """A victim of ``model``'s architecture, its layers re-initialised under ``seed``, trained to
    convergence on (X, y) (for a linear model with λ > 0 the minimiser is unique, so the start does
    not matter)."""
    victim = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module in victim.modules():
            if module is not victim and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return training.minimize(victim, X, y, weight_decay=weight_decay, progress=False)


def box_distance(x: Tensor, box: tuple) -> dict:
    """Where the pixels of ``x`` stand against the box (low, high): the share inside, in percent,
    and the largest distance outside (0 when all are in)."""
    low, high = (torch.as_tensor(v, dtype=x.dtype).reshape(-1) if torch.is_tensor(v) else v for v in box)
    flat = x.reshape(len(x), -1)
    outside = torch.clamp(torch.maximum(low - flat, flat - high), min=0)
    return {"in_box": bool((outside == 0).all()), "inside_percent": 100.0 * float((outside == 0).double().mean()),
            "max_outside": float(outside.max()), "pixel_range": [float(x.min()), float(x.max())]}


def construction_check(target: nn.Module, X: Tensor, y: Tensor, eps_d: float, *, box: tuple, X_test: Tensor, weight_decay: float,
                       seed: int = 0, iterations: int = 100, progress: bool | None = None) -> dict:
    """Theorems 5/6's constructive poisons at ``eps_d`` against the linear ``target``, verified: a
    victim retrained to convergence on clean ∪ them, its agreement with the target on ``X_test``
    (percent), the residual ratio ‖g(χ)‖ / ‖g(µ)‖ the construction reached, and
    :func:`box_distance` of the poisons."""
    result = Construction(eps_d, weight_decay=weight_decay, seed=seed, iterations=iterations, progress=progress).poison(target, X, y)
    victim = retrained(target, *result.mixed(X, y), weight_decay=weight_decay)
    history = result.grad_norm_history
    return {"eps_d": eps_d, "residual_ratio": history[-1] / history[0], "agreement": training.agreement(victim, target, X_test),
            "victim_grad_norm": training.training_gradient_norm(victim, *result.mixed(X, y), weight_decay=weight_decay),
            **box_distance(result.x, box)}


RESTART_SCALES = (0.5, 1.0, 2.0, 4.0)  # the frontier's random starts: clean W̄ + scale·(a direction of W̄'s mean entry size)


@dataclass(frozen=True)
class FrontierPoint:
    """The largest test-accuracy drop found at ``eps_d`` over last layers that meet the necessary
    condition (an estimate of the bound from below, not certified), the test accuracy of that
    model, the condition used (``tau(c)``, or ``box LP`` with a box) and its value there (≤ 0 is
    met), the restarts and the linear programmes solved; ``model`` is that admissible model (a copy
    of the clean one with the found last layer; not in ``to_dict``)."""

    eps_d: float
    max_drop_estimate: float
    accuracy: float
    condition: str
    condition_value: float
    restarts: int
    programmes: int
    model: nn.Module | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}


def damage_frontier(model: nn.Module, X: Tensor, y: Tensor, X_test: Tensor, y_test: Tensor, eps_d: list[float], *,
                    weight_decay: float, box: tuple | None = None, restarts: int = 3, iterations: int = 100,
                    programme_candidates: int = 2, pullback_steps: int = 8, seed: int = 0) -> list[FrontierPoint]:
    """For each ε_d, the largest drop in test accuracy from ``model`` (the clean victim, trained to
    convergence) over last layers W̄ that meet a necessary condition of reachability at ε_d.

    The condition of equation (10) with the regulariser, ⟨W, G(µ)⟩ + (1 + ε_d)·λ‖W̄‖² − ε_d·W(·) ≤ 0,
    is cheap but weak: a last layer scaled towards 0 meets it at any ε_d > 0 whatever its predictions
    (measured on digits: a drop of 93 points at ε_d = 0.03). With ``box`` (a linear model) the
    condition is also :func:`poisonreach.reachability.box_threshold` ≤ ε_d, the whole stationarity
    over poisons in the box, which such models fail.

    The search: L-BFGS on a smoothed test error (the sigmoid of the margin over a temperature
    annealed from 1 to 0.1) minus a quadratic penalty on the scalar condition, from ``restarts``
    starts of its own (the clean W̄ and random directions around it, drawn from ``seed`` alone) and
    from the best point of the previous ε_d; each end point is pulled back along the segment from the
    clean W̄ (which meets both conditions) to where the scalar condition holds, and the
    ``programme_candidates`` most damaging of its own ends and the previous point's end further, by
    ``pullback_steps`` bisection steps, to where the box programme holds. The true test accuracy of
    the result counts. So an ε_d's result is at least as damaging as the search at that ε_d alone:
    the budgets before it only add a start. The values are drops found among admissible models: lower estimates of the
    bound, not the bound. Only the last layer moves (for a linear model, the whole model); the
    features φ are computed once.
    """
    check_number("weight_decay", weight_decay, low=0, low_open=True)
    check_number("restarts", restarts, low=1, high=len(RESTART_SCALES) + 1, integer=True)
    head = last_linear(model)
    with torch.no_grad():  # the programmes' data: every point's features at once, in float64
        Z = _with_bias(features(model, dense(X)).flatten(1).double())
        Z_test = _with_bias(features(model, dense(X_test)).flatten(1).double())
    c = head.out_features
    clean = torch.cat([head.weight.detach().double(), (head.bias.detach().double() if head.bias is not None else torch.zeros(c)).reshape(-1, 1)], 1)
    bound = W_1_OVER_E if c == 1 else lambert_w_constant(c)
    y, y_test = y.to(Z.device), y_test.to(Z.device)
    clean_acc = _accuracy(Z_test @ clean.T, y_test)

    def condition(W: Tensor, e: float) -> Tensor:
        return inner_sum(Z @ W.T, y) / len(Z) + (1 + e) * weight_decay * (W**2).sum() - e * bound

    def programme(W: Tensor, e: float) -> float:
        return box_threshold(_with_layer(model, W), X, y, box=box, weight_decay=weight_decay) - e

    def damage(end: tuple[Tensor, float]) -> float:  # of an end point (W̄, the condition's value there)
        return clean_acc - _accuracy(Z_test @ end[0].T, y_test)

    def search(W: Tensor, e: float) -> tuple[Tensor, float]:
        return _pull_back(clean, _ascend(W, Z_test, y_test, lambda W: condition(W, e), iterations), lambda W: condition(W, e))

    points, previous = [], None
    for e in eps_d:
        gen = torch.Generator().manual_seed(seed)  # the same random starts whatever budgets come before
        own = [clean] + [clean + torch.randn(clean.shape, generator=gen, dtype=clean.dtype) * clean.norm() / math.sqrt(clean.numel()) * s
                         for s in RESTART_SCALES[: restarts - 1]]
        ends = sorted((search(W, e) for W in own), key=damage, reverse=True)
        warm = [search(previous, e)] if previous is not None else []
        logger.info(f"frontier eps_d={e:g}: {len(own) + len(warm)} searches under the scalar condition, drops up to "
                    f"{max(map(damage, ends + warm)):.2f}")
        solved = 0
        if box is None:
            ends = ends + warm
        else:
            pulled = []
            for W, _ in ends[:programme_candidates] + warm:
                counted = _Counted(lambda W: programme(W, e))
                pulled.append(_pull_back(clean, W, counted, steps=pullback_steps))
                solved += counted.calls
                logger.info(f"frontier eps_d={e:g}: pulled back to the box programme ({counted.calls} programmes), drop {damage(pulled[-1]):.2f}")
            ends = pulled
        best, value = max(ends, key=damage)
        accuracy = _accuracy(Z_test @ best.T, y_test)
        previous = best
        points.append(FrontierPoint(eps_d=e, max_drop_estimate=clean_acc - accuracy, accuracy=accuracy,
                                    condition="tau(c)" if box is None else "box LP", condition_value=value,
                                    restarts=len(own) + len(warm), programmes=solved, model=_with_layer(model, best)))
    return points


class _Counted:
    """A condition that counts its evaluations (each a linear programme)."""

    def __init__(self, function):
        self.function, self.calls = function, 0

    def __call__(self, W: Tensor) -> float:
        self.calls += 1
        return self.function(W)


def _with_layer(model: nn.Module, W: Tensor) -> nn.Module:
    """A copy of ``model`` whose last layer is W̄ = (weight, bias)."""
    other = copy.deepcopy(model)
    layer = last_linear(other)
    with torch.no_grad():
        layer.weight.copy_(W[:, :-1])
        if layer.bias is not None:
            layer.bias.copy_(W[:, -1])
    return other


def _with_bias(Z: Tensor) -> Tensor:
    return torch.cat([Z, torch.ones(len(Z), 1, dtype=Z.dtype)], 1)


def _margins(H: Tensor, y: Tensor) -> Tensor:
    """How far each point is from being misclassified, negated: > 0 when it is wrong."""
    if H.shape[1] == 1:
        return -(2 * y.to(H.dtype) - 1) * H[:, 0]
    others = H.scatter(1, y[:, None], -math.inf)
    return torch.logsumexp(others, 1) - H.gather(1, y[:, None])[:, 0]


def _accuracy(H: Tensor, y: Tensor) -> float:
    predicted = (H[:, 0] > 0).long() if H.shape[1] == 1 else H.argmax(1)
    return 100.0 * float((predicted == y).double().mean())


def _ascend(W: Tensor, Z_test: Tensor, y_test: Tensor, condition, iterations: int) -> Tensor:
    W = W.clone().requires_grad_(True)
    for temperature, penalty in ((1.0, 1e2), (0.3, 1e3), (0.1, 1e4)):
        opt = torch.optim.LBFGS([W], max_iter=iterations, history_size=20, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            error = torch.sigmoid(_margins(Z_test @ W.T, y_test) / temperature).mean()
            objective = -error + penalty * torch.relu(condition(W)) ** 2
            objective.backward()
            return objective

        opt.step(closure)
    return W.detach()


def _pull_back(clean: Tensor, W: Tensor, condition, steps: int = 40) -> tuple[Tensor, float]:
    """The point of the segment clean → W farthest along it (by bisection) where ``condition(W̄) ≤ 0``,
    and the condition's value there (clean meets it: a clean model trained to convergence with
    λ‖W̄‖² < W(·) is stationary). Each point is evaluated once: a box programme costs a solve."""
    value = float(condition(W))
    if value <= 0:
        return W, value
    value = float(condition(clean))
    if value > 0:
        raise PoisonReachError("the clean model does not meet the necessary condition at this ε_d: train it to convergence "
                               "(--protocol converged) before auditing")
    lo, hi = 0.0, 1.0
    for _ in range(steps):
        mid = (lo + hi) / 2
        trial = float(condition(clean + mid * (W - clean)))
        if trial <= 0:
            lo, value = mid, trial
        else:
            hi = mid
    return clean + lo * (W - clean), value


def diagnose(target: nn.Module, X: Tensor, y: Tensor, poisons: PoisonResult, *, X_test: Tensor, weight_decay: float,
             box: tuple | None = None) -> dict:
    """What a poison set did against the target it was made for: its ε_d = m/n, the target's τ (the
    sharpened one with ``box``), the residual ratio ‖g(χ)‖ / ‖g(µ)‖ it leaves at the target (all
    parameters, the regulariser included), the victim retrained to convergence on clean ∪ poisons
    (its agreement with the target, its own τ(c) — at most ε_d, since these poisons reached it) and
    a one-sentence verdict. With ``box`` (a linear target) also ``floor_ratio``, the least ratio
    any m poisons in the box can leave (:func:`~poisonreach.reachability.residual_floor`, on the same
    scale), and ``in_box``, whether these poisons are such points: a ratio far above the floor
    says a better attack could get closer."""
    n, m = len(X), len(poisons.x)
    eps_d = m / n
    sharp = sharpened_threshold(target, X, y, box=box, weight_decay=weight_decay)
    params = select_parameters(target, "all")
    loss_fn = resolve(last_linear(target).out_features, y, None)
    device = next(target.parameters()).device
    g_mu = gradient_sum(target, params, X, y, loss_fn, chunk_size=1024, device=device)
    g_nu = gradient_sum(target, params, poisons.x, poisons.y, loss_fn, chunk_size=1024, device=device)
    decay = [weight_decay * p.detach() for p in params]
    residual = flat_norm([a / n + b / n + (n + m) / n * d for a, b, d in zip(g_mu, g_nu, decay)])
    ratio = residual / max(flat_norm([a / n + (n + m) / n * d for a, d in zip(g_mu, decay)]), 1e-300)
    victim = retrained(target, *poisons.mixed(X, y), weight_decay=weight_decay)
    agree = training.agreement(victim, target, X_test)
    floor = {}
    if box is not None:
        found = residual_floor(target, X, y, eps_d, box=box, weight_decay=weight_decay)
        low, high = (torch.as_tensor(v, dtype=poisons.x.dtype).reshape(-1) for v in box)
        flat = poisons.x.reshape(m, -1)
        floor = {"floor_ratio": found.ratio, "in_box": bool(((flat >= low - 1e-6) & (flat <= high + 1e-6)).all())}
    if eps_d < sharp.tau:
        verdict = f"unreachable below τ: ε_d = {eps_d:.4g} < τ = {sharp.tau:.4g}, no poisons of this budget can reach the target"
    elif agree >= REACHED_AGREEMENT:
        verdict = f"reached: the victim predicts as the target on {agree:.2f}% of the test points (residual ratio {ratio:.3g})"
    else:
        verdict = (f"reachable but the optimisation stalled: ε_d = {eps_d:.4g} ≥ τ = {sharp.tau:.4g}, yet the poisons leave "
                   f"residual ratio {ratio:.3g} and the victim agrees with the target on {agree:.2f}% only")
    if floor:
        verdict += (f"; poisons in the box can leave no ratio below {floor['floor_ratio']:.3g}"
                    + ("" if floor["in_box"] else " (these poisons are not all in the box)"))
    return {"eps_d": eps_d, "num_poisons": m, "tau": sharp.tau, "tau_multiclass": sharp.tau_multiclass, "residual_ratio": ratio, **floor,
            "agreement": agree, "victim_tau_multiclass": threshold(victim, X, y, weight_decay=weight_decay).tau_multiclass,
            "verdict": verdict}
