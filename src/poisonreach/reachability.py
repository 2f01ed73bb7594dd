"""The reachability threshold τ (section 3, appendix A).

A target parameter w is λ-poisoning reachable when some poisoning distribution ν cancels the clean
gradient: (1 − λ)·g(µ) + λ·g(ν) = 0 (Definition 1), with λ = ε_d / (1 + ε_d). Taking the inner product
with w turns that vector condition into a scalar one that costs a single forward pass:

- binary linear margin classifiers, Theorem 2 / Corollary 1: reachable iff
  λ > max{⟨w,g(µ)⟩ / (⟨w,g(µ)⟩ − a), −⟨w,g(µ)⟩ / (b − ⟨w,g(µ)⟩)}, with a, b the infimum and supremum of
  t·l'(t) over the margins t the domain allows (equation (6));
- cross-entropy models, Example 3 / Theorem 4: necessary ε_d ≥ τ(c) = max{⟨W,G(µ)⟩ / W((c−1)/e), 0}
  (equation (10)), where ⟨W,G(µ)⟩ is taken over the last linear layer with its bias; τ(2) uses
  W(1/e) and is the convention of the paper's Table 2.

Both only need the logits h of the training data: for the last linear layer h = Wφ + b,
⟨(W, b), ∇_{(W,b)} ℓ⟩ = ⟨h, ∇_h l(h, y)⟩, so no per-sample gradient is ever formed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.optimize import linprog, minimize_scalar
from scipy.special import lambertw
from torch import Tensor, nn

from . import distributed
from .errors import PoisonReachError
from .gradients import gradient_sum
from .losses import resolve, task_of
from .models import affine_features, last_linear
from .validation import check_model_data, check_number, evaluating

W_1_OVER_E = float(lambertw(1 / math.e).real)  # ≈ 0.2785: −inf_t t·l'(t) for the logistic loss


def lambert_w_constant(num_classes: int) -> float:
    """W((c − 1)/e): minus the infimum of ⟨h, p − y⟩ over logits h (equation (A.16))."""
    if num_classes < 2:
        raise PoisonReachError(f"the cross-entropy threshold needs at least 2 classes, got {num_classes}")
    return float(lambertw((num_classes - 1) / math.e).real)


@dataclass(frozen=True)
class Threshold:
    """The outcome of a reachability test.

    tau: the ε_d threshold below which the target cannot be reached (τ(2) for cross-entropy models,
        the paper's Table 2 convention); ``inf`` when no budget suffices.
    tau_multiclass: τ(c) from equation (10) for c-class cross-entropy models, else None.
    inner: ⟨w, g(µ)⟩ (linear models) or ⟨W, G(µ)⟩ (last layer with bias).
    lam: the poison proportion threshold λ = τ / (1 + τ).
    constant: the constant used: a (and b) of Theorem 2, or W(1/e) / W((c−1)/e).
    """

    tau: float
    tau_multiclass: float | None
    inner: float
    lam: float
    constant: dict

    def reachable(self, eps_d: float) -> bool:
        """Whether ε_d passes the (necessary) threshold test."""
        return eps_d >= self.tau

    def to_dict(self) -> dict:
        return asdict(self)


def _tau_from_lambda(lam: float) -> float:
    """ε_d = λ / (1 − λ), the inverse of λ = ε_d / (1 + ε_d)."""
    lam = max(lam, 0.0)
    return math.inf if lam >= 1.0 else lam / (1.0 - lam)


# t·l'(t) for the margin losses of Corollary 1. Each is decreasing up to its minimiser t_min and
# increasing towards 0 after it, so over an interval [lo, hi] the infimum sits at clip(t_min, lo, hi)
# and the supremum at an end (+∞ as t → −∞, the limit 0 as t → +∞).
def _t_dl_logistic(t: float) -> float:
    return -t / (1.0 + math.exp(t)) if t < 700 else 0.0


def _t_dl_exponential(t: float) -> float:
    return -t * math.exp(-t) if t > -700 else math.inf


def _t_dl_hinge(t: float) -> float:
    return -t if t <= 1.0 else 0.0  # at the kink t = 1 the subgradient −1 is the extreme one


_MARGIN_LOSSES = {
    # name: (t·l'(t), its minimiser, l'(t) as a tensor function for ⟨w, g(µ)⟩)
    "logistic": (_t_dl_logistic, 1.0 + W_1_OVER_E, lambda t: -torch.sigmoid(-t)),
    "exponential": (_t_dl_exponential, 1.0, lambda t: -torch.exp(-t)),
    "hinge": (_t_dl_hinge, 1.0, lambda t: -(t < 1).to(t.dtype)),
}
LINEAR_LOSSES = (*_MARGIN_LOSSES, "squared")


def _clip(t: float, lo: float, hi: float) -> float:
    return min(max(t, lo), hi)


def _margin_constants(loss: str, lo: float, hi: float) -> tuple[float, float]:
    """(a, b) = (inf, sup) of t·l'(t) over t ∈ [lo, hi] (Corollary 1)."""
    f, t_min, _ = _MARGIN_LOSSES[loss]
    a = f(_clip(t_min, lo, hi))
    b = max(math.inf if lo == -math.inf else f(lo), 0.0 if hi == math.inf else f(hi))
    return a, b


def _squared_constants(t_range: tuple[float, float], y_range: tuple[float, float]) -> tuple[float, float]:
    """(a, b) = (inf, sup) of t·(t − y) over the box t_range × y_range (Example 1)."""
    (t_lo, t_hi), (y_lo, y_hi) = t_range, y_range
    if math.inf in (t_hi, y_hi, -t_lo, -y_lo):
        return -math.inf, math.inf
    # convex in t for fixed y (minimum at t = y/2), linear in y: extremes lie on the y ends
    a = min(_clip(y / 2, t_lo, t_hi) * (_clip(y / 2, t_lo, t_hi) - y) for y in (y_lo, y_hi))
    b = max(t * (t - y) for y in (y_lo, y_hi) for t in (t_lo, t_hi))
    return a, b


def _check_finite(name: str, x: Tensor) -> None:
    if not torch.isfinite(x).all():
        raise PoisonReachError(f"{name} contains NaN or infinite values: clean the data before computing τ")


def margin_threshold(
    w: Tensor,
    X: Tensor,
    y: Tensor,
    loss: str = "logistic",
    *,
    bias: float | Tensor = 0.0,
    t_range: tuple[float, float] = (-math.inf, math.inf),
    y_range: tuple[float, float] = (-math.inf, math.inf),
) -> Threshold:
    """Theorem 2 / Corollary 1 for a binary linear classifier ``sign(⟨w, x⟩ + bias)``.

    y holds labels in {−1, +1} (0 is read as −1) for the margin losses ``logistic``, ``exponential``
    and ``hinge``, and real targets for ``squared`` (least squares, Example 1). ``t_range`` bounds the
    margins y·(w⊤x + bias) the domain allows (unbounded by default; for inputs with ‖x‖ ≤ r use
    ±‖w‖·r), ``y_range`` the regression targets. With the unbounded domain, τ is
    ⟨w, g(µ)⟩ / W(1/e) for the logistic loss (equation (7)) and 0 for the squared loss.
    """
    for name, (lo, hi) in (("t_range", t_range), ("y_range", y_range)):
        if not lo <= hi:  # also false for NaN
            raise PoisonReachError(f"{name} must be (low, high) with low <= high, got {(lo, hi)!r}")
    if loss not in LINEAR_LOSSES:
        raise PoisonReachError(f"unknown loss {loss!r} for margin_threshold: choose one of {list(LINEAR_LOSSES)}")
    X = X.reshape(len(X), -1).to(torch.float64)
    w = torch.as_tensor(w, dtype=torch.float64).reshape(-1)
    if X.shape[1] != w.numel():
        raise PoisonReachError(f"w has {w.numel()} entries but the data have {X.shape[1]} features")
    if len(X) != len(y):
        raise PoisonReachError(f"X has {len(X)} rows but y has {len(y)} labels")
    _check_finite("X", X)
    scores = X @ w + torch.as_tensor(bias, dtype=torch.float64)
    y = y.to(torch.float64)
    if loss == "squared":
        inner = float((scores * (scores - y)).mean())  # ⟨w, g(µ)⟩ = E[(w⊤x)·(w⊤x − y)]
        a, b = _squared_constants(t_range, y_range)
    else:
        if not bool(((y == 1) | (y == -1) | (y == 0)).all()):
            raise PoisonReachError("margin losses need binary labels in {-1, +1} (or {0, 1})")
        t = torch.where(y == 1, scores, -scores)
        inner = float((t * _MARGIN_LOSSES[loss][2](t)).mean())
        a, b = _margin_constants(loss, *t_range)
    return _from_constants(inner, a, b)


def _from_constants(inner: float, a: float, b: float) -> Threshold:
    """Equation (6): λ > max{inner / (inner − a), −inner / (b − inner)}."""
    candidates = []
    for num, den in ((inner, inner - a), (-inner, b - inner)):
        if math.isinf(den):
            candidates.append(0.0)
        elif den > 0:
            candidates.append(num / den)
        else:
            # a ≥ inner (or b ≤ inner): every poison pulls the same way as µ, no λ < 1 cancels it
            candidates.append(1.0 if num > 0 else 0.0)
    lam = min(max(candidates + [0.0]), 1.0)
    tau = _tau_from_lambda(lam)
    return Threshold(tau=tau, tau_multiclass=None, inner=inner, lam=lam, constant={"a": a, "b": b})


@torch.no_grad()
def threshold(
    model: nn.Module, X: Tensor, y: Tensor, *, weight_decay: float = 0.0, chunk_size: int = 256, device=None
) -> Threshold:
    """τ(2) and τ(c) of a trained classifier on its training data (Example 3, Theorem 4).

    ⟨W, G(µ)⟩ is computed on the last linear layer with its bias as the mean of ⟨h, p − y⟩ over the
    data, h the logits: one forward pass in chunks, no gradients. A model with one output is a
    binary logistic model (labels 0/1), for which τ(2) is exact (Corollary 1); a regression model
    (float targets) has τ = 0 for any target (Example 1).

    ``weight_decay`` λ: the victim minimises the mean loss plus λ/2·‖w‖² (the optimizers' weight
    decay, bias included). Its stationarity, taken in the inner product with the last layer W,
    reads ⟨W, G(µ)⟩ + ε_d·⟨W, G(ν)⟩ + (1 + ε_d)·R = 0 with R = λ‖W‖², so the regulariser shifts
    both the clean term and the poisons' bound −W(·) by R: τ = (⟨W, G(µ)⟩ + R) / (W(·) − R), and
    no budget suffices (τ = ∞) once R ≥ W(·) while the shifted clean term is positive.
    """
    check_number("chunk_size", chunk_size, low=1, integer=True)
    check_number("weight_decay", weight_decay, low=0)
    c = check_model_data(model, X, y, device)
    if task_of(y) == "regression":
        return Threshold(tau=0.0, tau_multiclass=None, inner=math.nan, lam=0.0, constant={"a": -math.inf, "b": math.inf})
    device = device or next(model.parameters()).device
    total = 0.0
    with evaluating(model), torch.no_grad():  # one forward pass; nothing here is differentiated
        for sl in distributed.local_chunks(len(X), chunk_size):  # data parallel: this rank's chunks, then the sum over ranks
            h = model(X[sl].to(device)).to(torch.float64)
            total += float(inner_sum(h.reshape(len(h), -1), y[sl].to(device)))
    inner = distributed.reduce_number(total) / len(X)
    shift = weight_decay * _squared_norm(last_linear(model)) if weight_decay else 0.0
    w1 = W_1_OVER_E
    tau2 = _shifted_tau(inner, w1, shift)
    tau_c = tau2 if c == 1 else _shifted_tau(inner, lambert_w_constant(c), shift)
    constant = {"W(1/e)": w1} if c == 1 else {"W(1/e)": w1, "W((c-1)/e)": lambert_w_constant(c), "c": c}
    if weight_decay:
        constant.update(weight_decay=weight_decay, regulariser=shift)
    lam = tau2 / (1 + tau2) if tau2 < math.inf else 1.0
    return Threshold(tau=tau2, tau_multiclass=tau_c, inner=inner, lam=lam, constant=constant)


def _squared_norm(head: nn.Linear) -> float:
    return sum(float((p.detach().to(torch.float64) ** 2).sum()) for p in (head.weight, head.bias) if p is not None)


def _shifted_tau(inner: float, bound: float, shift: float) -> float:
    """max{(inner + R) / (W − R), 0}: the smallest ε_d ≥ 0 with inner + ε_d·V + (1 + ε_d)·R = 0 for
    some V ≥ −W (R = 0 is equation (10))."""
    if inner + shift <= 0:
        return 0.0
    return (inner + shift) / (bound - shift) if bound > shift else math.inf


def inner_sum(h: Tensor, y: Tensor) -> Tensor:
    """Σ ⟨h, ∇_h l(h, y)⟩ over a chunk: ⟨h, p − y⟩ for cross-entropy, t·l'(t) for one logit."""
    if h.shape[1] == 1:
        if y.is_floating_point() and y.dim() == 2:
            y = y.reshape(-1)
        h = h.reshape(-1)
        return (h * (torch.sigmoid(h) - y.to(h.dtype))).sum()  # equals Σ t·l'(t) with t = ±h
    p = torch.softmax(h, dim=1)
    target = y.to(h.dtype) if y.is_floating_point() else torch.nn.functional.one_hot(y, h.shape[1]).to(h.dtype)
    return (h * (p - target)).sum()


@dataclass(frozen=True)
class SharpenedThreshold:
    """The necessary threshold of (A.17) maximised over the matrix A (:func:`sharpened_threshold`).

    tau: the sharpened threshold, ≥ ``tau_multiclass`` (τ(c)); below it no poisons reach the target.
    tau_multiclass: τ(c) (A = I over all logits, equation (10)).
    matrix: the A attaining ``tau`` (c × c).
    inner: g_A(µ) = E_µ ⟨A∇_h l, h⟩ (with A = I: ⟨W, G(µ)⟩).
    infimum, supremum: a and b, the infimum and supremum of ⟨A∇_h l, h⟩ over the poisons the domain
        allows (or bounds of them that keep the threshold necessary).
    domain: ``logits`` (every logit vector) or ``box`` (inputs in a box, through a linear model).
    tau_lp: with a box, :func:`box_threshold` (part of ``tau``); None without one.
    """

    tau: float
    tau_multiclass: float
    matrix: list[list[float]]
    inner: float
    infimum: float
    supremum: float
    domain: str
    tau_lp: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def sharpened_threshold(model: nn.Module, X: Tensor, y: Tensor, *, box: tuple[Tensor | float, Tensor | float] | None = None,
                        weight_decay: float = 0.0, chunk_size: int = 256, device=None) -> SharpenedThreshold:
    """The necessary condition (A.17), 0 = (1 − λ)·g_A(µ) + λ·g_A(ν) with g_A(z) = ⟨A∇_h l, h⟩,
    maximised over the matrix A: with a, b the infimum and supremum of g_A over the poisons the
    domain allows, ε_d must pass equation (6)'s test for every A.

    **Over all logits A = I is optimal**, so the value is τ(c). The softmax is invariant to
    h ↦ h + s·1, so a finite infimum needs A1 ∝ 1; and along a ray h = t·v whose largest entry is
    v_k, ∇_h l → e_k − e_y and g_A ≈ t·(e_k − e_y)⊤A v, which stays bounded below for every such v
    and every label y only if A⊤(e_k − e_y) lies in the cone of the e_k − e_j, j ≠ k; for all pairs
    (k, y) at once that forces A⊤ = αI + r1⊤ (α ≥ 0), i.e. g_A = α·g_I. Every other A has infimum
    −∞ and threshold 0.

    **With a box** (``box=(low, high)``, the poisons' pixels, for a linear model only) the logits are
    bounded, so a rises and b falls. For A = I they are taken over the logit differences
    d_k = h_k − h_y, each within the exact range the box allows (a product of intervals that holds
    the true set: the values bound the box's infimum and supremum, so the threshold stays
    necessary). There g_I = Σ_k e^{d_k} d_k / Σ_k e^{d_k} is unimodal in each d_k with its minimum
    at d_k = f − 1 (f the value), so the minimiser over the intervals is d_k = clip(f − 1) for one
    scalar f (:func:`_box_minimum`) and a maximiser is a corner (:func:`_box_maximum`). With one
    logit the box bounds the margins and Corollary 1 applies to them. A target with ⟨W, G(µ)⟩ < 0,
    τ(c) = 0, can so need a budget: the poisons must supply g_I > 0, at most b. Other A are not
    searched over the box (no certified bound of their a and b): the matrix reported is I.

    With a box the value also takes :func:`box_threshold`, the whole stationarity condition over
    the box as a linear programme, with a and b among its constraints (so it is at least the
    scalar test's value).

    ``weight_decay`` shifts the clean term and a, b by R = λ‖W‖² as in :func:`threshold`. The value
    is the largest of these and τ(c), all necessary.
    """
    base = threshold(model, X, y, weight_decay=weight_decay, chunk_size=chunk_size, device=device)
    c = int(base.constant.get("c", 1))
    a, b = -base.constant.get("W((c-1)/e)", base.constant["W(1/e)"]), math.inf
    tau_lp = None
    if box is not None:
        a, b = _box_constants(model, X.shape[1:], c, box, device or next(model.parameters()).device)
        tau_lp = box_threshold(model, X, y, box=box, weight_decay=weight_decay, bounds=(a, b), chunk_size=chunk_size, device=device)
    shift = float(base.constant.get("regulariser", 0.0))
    tau = max(_from_constants(base.inner + shift, a + shift, b + shift).tau, base.tau_multiclass, tau_lp or 0.0)
    return SharpenedThreshold(tau=tau, tau_multiclass=base.tau_multiclass, matrix=torch.eye(c).tolist(), inner=base.inner,
                              infimum=a, supremum=b, domain="logits" if box is None else "box", tau_lp=tau_lp)


def box_threshold(model: nn.Module, X: Tensor, y: Tensor, *, box: tuple, weight_decay: float = 0.0,
                  bounds: tuple[float, float] = (-math.inf, math.inf), chunk_size: int = 256, device=None,
                  tolerance: float = 1e-6) -> float:
    """The least ε_d for which the victim's stationarity at a linear target can hold with poisons
    in ``box``: a linear programme over a relaxation of the poisons' gradients (appendix A's
    condition (A.10) itself, not a scalar projection of it).

    A poison z's gradient is ∇_h l ⊗ z̄ with z̄ = (φ(x), 1), x in the box, and ∇_h l = p − e_y a
    convex combination of the e_k − e_y, k ≠ y (for one logit σ(h) − y ∈ [−1, 1]: of ±1). So
    ε_d·E_ν[∇ℓ] is Σ_u u ⊗ β_u with β_u = (mass·mean φ, mass) =: (β_u, α_u), α_u·low ≤ β_u ≤ α_u·high
    over the features' box, and Σ α_u = ε_d. The stationarity G(µ) + ε_d·E_ν[∇ℓ] + (1 + ε_d)·λW̄ = 0
    is linear in (β, α), and so are the scalar bounds a·ε_d ≤ ⟨W̄, ε_d·E_ν[∇ℓ]⟩ ≤ b·ε_d
    (``bounds``, :func:`sharpened_threshold`): the least Σ α is a necessary threshold — p is let
    free of z, so it is a relaxation, and poisons that meet it need not exist. ``inf``: no ε_d.

    The β are eliminated. Feature i asks for Σ_u β_{u,i}·u = r_i, a point of the zonotope
    Σ_u α_u·u·[low_i, high_i]; for the directions e_k − e_j that is a flow between the classes
    with capacities in [α·low_i, α·high_i], and Hoffman's circulation theorem says it exists iff
    for every set S of classes 1_S·r_i ≤ Σ_u α_u·max(low_i·1_S·u, high_i·1_S·u) (with one logit, the
    two ends of an interval: S = ±1). So only the c(c − 1) + 1 masses are unknowns, under
    d·(2^c − 2) cuts, of which the violated ones are added round by round (cutting planes; each
    round's programme is small and solved by HiGHS's dual simplex) until none is violated by more
    than a mass of ``tolerance`` can supply (cuts are scaled by feature i's max(|low_i|, |high_i|),
    the most a unit of mass brings to them, so ``tolerance`` is in units of ε_d; it is kept above
    the solver's feasibility tolerance, 1e-7, which a smaller one would chase round after round).
    The ⟨W̄, ·⟩ bound is a function of Σ α alone. (Written out with every β an unknown, the
    programme has c(c − 1)·(d + 1) unknowns, and G summed in float32 has class sums of about 1e-7
    where every poison's gradient has 0: its equalities are then inconsistent and a solver may call
    it infeasible, as HiGHS did for targets this one solves; tests/test_box_threshold.py.)

    The last layer is taken with its rows centred (W̄ − 1·mean_k W̄_k: the same predictions and
    probabilities; a victim trained with weight decay is centred, since the loss's gradients have
    rows that sum to 0 and the regulariser pins the common part at 0).
    """
    check_number("tolerance", tolerance, low=1e-7)
    G, W, lo, hi, U = _linear_relaxation(model, X, y, box, chunk_size, device)
    num, d = W.shape[0], len(lo)
    if num > 1:
        W = W - W.mean(0, keepdims=True)
    normals = _class_cuts(num)
    up, down = np.maximum(U @ normals.T, 0), np.maximum(-(U @ normals.T), 0)  # P × cuts
    # the unknowns x = (α_u, the gradient-free mass p_y·0), ε_d = Σ x; what the poisons must
    # supply is r = R − ε_d·λW̄ with R = −(G + λW̄)
    R, decay = -(G + weight_decay * W), weight_decay * W
    P, ones = len(U), np.ones(len(U) + 1)
    # the bias column, where β_u = α_u exactly: Σ_u α_u·u + ε_d·λW̄_bias = R_bias (with c logits
    # one row is the others' negated sum)
    A_eq = np.hstack([U.T, np.zeros((num, 1))]) + decay[:, d:] * ones
    A_eq, b_eq = A_eq[: max(num - 1, 1)], R[: max(num - 1, 1), d]
    # ⟨W̄, r⟩ = ⟨W̄, R⟩ − ε_d·λ‖W̄‖² between a·ε_d and b·ε_d
    inner, squared = float((W * R).sum()), weight_decay * float((W * W).sum())
    A_ub, b_ub = [], []
    for sign, constant in ((1.0, bounds[0]), (-1.0, bounds[1])):
        if math.isfinite(constant):
            A_ub.append(sign * (constant + squared) * ones)
            b_ub.append(sign * inner)
    cut_R, cut_decay = R[:, :d].T @ normals.T, decay[:, :d].T @ normals.T  # d × cuts: 1_S·R_i, 1_S·λW̄_i
    # each feature's cuts in units of mass: divided by the most a unit of mass brings to them
    scale = np.maximum(np.maximum(np.abs(lo), np.abs(hi)), np.finfo(float).tiny)
    high, low, cut_R, cut_decay = hi / scale, lo / scale, cut_R / scale[:, None], cut_decay / scale[:, None]
    added = np.zeros(cut_R.shape, dtype=bool)
    while True:
        found = _least_mass(ones, np.array(A_ub) if A_ub else None, np.array(b_ub) if b_ub else None, A_eq, b_eq)
        if found.status == 2:
            return math.inf
        alpha, eps = found.x[:P], float(found.x.sum())
        # the cut's violation: (1_S·r_i − (high_i·α⊤up_S − low_i·α⊤down_S)) / scale_i
        violation = cut_R - eps * cut_decay - np.outer(high, alpha @ up) + np.outer(low, alpha @ down)
        violation[added] = -math.inf  # a cut already in holds to the solver's own tolerance
        worst = violation.argmax(1)
        rows = np.flatnonzero(violation[np.arange(d), worst] > tolerance)
        if not len(rows):
            return eps
        added[rows, worst[rows]] = True
        cuts = -(high[rows, None] * up[:, worst[rows]].T - low[rows, None] * down[:, worst[rows]].T)
        cuts = np.hstack([cuts, np.zeros((len(rows), 1))]) - cut_decay[rows, worst[rows]][:, None] * ones
        A_ub.extend(cuts)
        b_ub.extend(-cut_R[rows, worst[rows]])


def _least_mass(cost, A_ub, b_ub, A_eq, b_eq):
    """One round of :func:`box_threshold`'s programme (x ≥ 0) solved by HiGHS's dual simplex, or,
    where that stops on numerical trouble (seen as HiGHS status 15, "model status unknown", on a
    damage-frontier model at B = ε_d = 0.1 on MNIST), by its interior-point method; infeasible
    (status 2) is an answer, anything else one clear error."""
    failures = []
    for method in ("highs-ds", "highs-ipm"):
        found = linprog(cost, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq, bounds=[(0, None)] * len(cost), method=method)
        if found.status in (0, 2):
            return found
        failures.append(f"{method}: status {found.status}, {found.message}")
    raise PoisonReachError("the box threshold's linear programme did not solve (" + "; ".join(failures) + "); "
                           "audit without a box (--box none)")


def _class_cuts(num: int, most: int = 12) -> np.ndarray:
    """The normals 1_S of the cuts of :func:`box_threshold`'s flows, one row per set S of classes
    (neither empty nor all); with one logit, ±1."""
    if num == 1:
        return np.array([[1.0], [-1.0]])
    if num > most:
        raise PoisonReachError(f"the box threshold enumerates the 2^c - 2 sets of classes: c = {num} is more than {most}; "
                               "audit without a box (--box none) or on fewer classes")
    bits = (np.arange(1, 2**num - 1)[:, None] >> np.arange(num)) & 1
    return bits.astype(float)


@dataclass(frozen=True)
class ResidualFloor:
    """How small Gradient Canceling's residual can get at one budget (:func:`residual_floor`).

    eps_d: the budget ε_d = m/n.
    floor: certified: no poisons in the box leave ‖r‖ below it, r = g(µ) + ε_d·g(ν̂) + (1 + ε_d)·λw
        the residual of equation (18) with the victim's weight decay λ.
    uniform: certified for every budget up to ε_d: at no ε_d' ≤ ε_d do poisons in the box leave ‖r‖
        below it (at most ``floor``; the floor's direction bounds ‖r‖ affinely in ε_d').
    relaxed: the least ‖r‖ found over the relaxation without the bounds on ⟨h, p − e_y⟩, an upper
        end of that relaxation's minimum; the floor can be above it where the bounds bind, and real
        poisons, their p tied to their pixels, may do worse than both.
    clean: ‖g(µ) + (1 + ε_d)·λw‖, what poisons without a gradient leave.
    iterations: Frank–Wolfe iterations run.
    """

    eps_d: float
    floor: float
    uniform: float
    relaxed: float
    clean: float
    iterations: int

    @property
    def ratio(self) -> float:
        """floor / clean: the share of the residual without poisons that any poisons must leave."""
        return self.floor / self.clean if self.clean > 0 else math.nan

    def allows(self, residual: float) -> bool:
        """Whether some poisons might bring ‖r‖ down to ``residual`` (necessary, not sufficient)."""
        return self.floor <= residual

    def to_dict(self) -> dict:
        return asdict(self)


def residual_floor(model: nn.Module, X: Tensor, y: Tensor, eps_d: float, *, box: tuple, weight_decay: float = 0.0,
                   iterations: int = 5000, tolerance: float = 1e-3, decide: float | None = None, chunk_size: int = 256,
                   device=None) -> ResidualFloor:
    """A certified lower bound of the least residual ‖r‖ Gradient Canceling can reach at budget ε_d
    with poisons in ``box`` (equation (18)), for a linear model. τ says whether r can vanish; below
    τ this says how far from zero it must stay, so "GC brings ‖r‖ to a tenth of its start" is
    possible only if ``floor`` ≤ 0.1·‖r_start‖.

    The poisons' gradients are relaxed as in :func:`box_threshold`: ∇ℓ = u ⊗ (φ, 1), u a mixture of
    the e_k − e_y and 0, φ in the features' box, p free of the pixels; what is kept of p's tie to
    the pixels is the bounds a ≤ ⟨W̄, ∇ℓ⟩ = ⟨h, p − e_y⟩ ≤ b over the box (:func:`sharpened_threshold`),
    which the poisons' mean v meets too. Weak duality turns every direction U into a bound:
    ‖r‖·‖U‖ ≥ ⟨U, r⟩ ≥ ⟨U, c⟩ + ε_d·h(U), with c = g(µ) + (1 + ε_d)·λw and h(U) = min(0, min over u
    and φ of ⟨U, u ⊗ (φ, 1)⟩) in closed form (each feature at the end of the box the sign of
    (uᵀU)_j picks); along U = r + t·W̄ the bounds replace the W̄ part, ⟨U, v⟩ ≥ h(r) + t·a (t ≥ 0;
    t·b below), and the best t is in closed form (:func:`_mixed_bound`; t → ∞ is the scalar
    condition alone). For a fixed U the bound is affine in ε_d, so its values at 0 and ε_d bound
    every budget between (``uniform``). Pairwise Frank–Wolfe on min ‖c + ε_d·v‖² over the
    relaxation's hull (without the bounds), whose linear minimisation is that same closed form
    (exact line search), supplies the directions r: its iterates give ``relaxed``, the best bound
    ``floor``. Without the bounds the two meet at the relaxation's minimum (strong duality); with
    them the floor lies between that minimum and the minimum with the bounds. It stops once
    ``relaxed`` − ``floor`` ≤ ``tolerance``·‖c‖, or, given ``decide``, once ``uniform`` is above it
    or the relaxation below it (enough for ``allows(decide)``). The bounds hold whenever it stops.
    """
    check_number("eps_d", eps_d, low=0.0)
    relaxation = _FloorProblem(model, X, y, box, weight_decay, chunk_size, device)
    return relaxation.solve(eps_d, iterations=iterations, tolerance=tolerance, decide=decide)


@dataclass(frozen=True)
class FloorThreshold:
    """The budget at which the residual floor first lets ‖r‖ reach a share of its value without
    poisons (:func:`floor_threshold`): τ for the event "‖r‖ ≤ ``ratio``·‖g(µ) + λw‖" instead of "r = 0".

    ratio: the share ρ; residual: the level δ = ρ·‖g(µ) + λw‖ it stands for.
    tau: the least budget found at which the floor allows ‖r‖ ≤ δ (inf: none up to the search's end).
    forbidden: certified: at no budget up to it can poisons in the box bring ‖r‖ to δ.
    evaluations: residual floors computed.
    """

    ratio: float
    residual: float
    tau: float
    forbidden: float
    evaluations: int

    def to_dict(self) -> dict:
        return asdict(self)


def floor_threshold(model: nn.Module, X: Tensor, y: Tensor, ratio: float = 0.1, *, box: tuple, weight_decay: float = 0.0,
                    eps_max: float = 10.0, eps_min: float = 1e-4, precision: float = 0.02, iterations: int = 5000,
                    chunk_size: int = 256, device=None) -> FloorThreshold:
    """How much poison it takes, at least, to cancel all but ``ratio`` of the target's residual
    (equation (18)) with poisons in ``box``, for a linear model: the auditor's "how much data" for
    an approximate target, where τ answers it for an exact one. Bisection on log ε_d over [eps_min,
    eps_max] of the decision "the floor's ``uniform`` bound is above δ" (:func:`residual_floor`
    with ``decide`` = δ), to a relative width ``precision``: every budget it certifies covers all
    smaller ones, so ``forbidden`` holds for the whole range below it, and ``tau`` is the least
    budget where no bound above δ was found (the floor is necessary, not sufficient, so an attack
    may need more)."""
    check_number("ratio", ratio, low=0.0, high=1.0, low_open=True, high_open=True)
    check_number("eps_min", eps_min, low=0.0, low_open=True)
    check_number("eps_max", eps_max, low=eps_min, low_open=True)
    check_number("precision", precision, low=0.0, low_open=True)
    relaxation = _FloorProblem(model, X, y, box, weight_decay, chunk_size, device)
    residual = ratio * float(np.linalg.norm(relaxation.c0))
    evaluations = 0

    def forbids(eps_d: float) -> bool:
        nonlocal evaluations
        evaluations += 1
        return relaxation.solve(eps_d, iterations=iterations, tolerance=0.0, decide=residual).uniform > residual

    if forbids(eps_max):
        return FloorThreshold(ratio, residual, math.inf, eps_max, evaluations)
    if not forbids(eps_min):
        return FloorThreshold(ratio, residual, eps_min, 0.0, evaluations)
    low, high = eps_min, eps_max
    while high > low * (1 + precision):
        middle = math.sqrt(low * high)
        low, high = (middle, high) if forbids(middle) else (low, middle)
    return FloorThreshold(ratio, residual, high, low, evaluations)


class _FloorProblem:
    """The box relaxation of a linear model's residual (:func:`residual_floor`), set up once and
    solved at any budget: G = g(µ), the last layer W̄, the features' box, the directions u and the
    bounds (a, b) on ⟨h, p − e_y⟩."""

    def __init__(self, model: nn.Module, X: Tensor, y: Tensor, box: tuple, weight_decay: float, chunk_size: int, device):
        self.G, self.W, lo, hi, U = _linear_relaxation(model, X, y, box, chunk_size, device)
        self.a, self.b = _box_constants(model, X.shape[1:], self.W.shape[0], box, device or next(model.parameters()).device)
        self.decay = weight_decay
        self.c0 = self.G + weight_decay * self.W  # the residual without poisons at ε_d = 0: g(µ) + λw
        self.lo, self.hi = np.append(lo, 1.0), np.append(hi, 1.0)  # the bias's feature is 1
        self.U = np.vstack([U, np.zeros(U.shape[1])])  # the zero row is the zero atom

    def solve(self, eps_d: float, *, iterations: int, tolerance: float, decide: float | None) -> ResidualFloor:
        """Pairwise Frank–Wolfe: v = Σ_i w_i·U[k_i] ⊗ z_i over the active atoms, z_i a corner of the
        box; weight moves from the worst active atom to the best atom in the box."""
        U, W, lo, hi = self.U, self.W, self.lo, self.hi
        c0, c = self.c0, self.G + (1 + eps_d) * self.decay * W  # c as the floor always formed it (same rounding)
        wc, ww, wc0 = float(np.vdot(W, c)), float(np.vdot(W, W)), float(np.vdot(W, c0))
        clean = float(np.linalg.norm(c))
        active = _ActiveSet(len(lo))
        active.add(len(U) - 1, np.zeros(len(lo), dtype=bool), lo, 1.0)
        v, r = np.zeros_like(c), c.copy()
        floor, uniform, relaxed, it = -math.inf, -math.inf, clean, 0
        for it in range(1, iterations + 1):
            norm = float(np.linalg.norm(r))
            relaxed = min(relaxed, norm)
            if norm == 0.0:
                floor = 0.0
                break
            D = U @ r  # ⟨r, u ⊗ z⟩ = D_u·z for every direction u
            bits = D < 0
            values = (D * np.where(bits, hi, lo)).sum(1)
            k = int(values.argmin())
            rw = float(np.vdot(r, W))
            bound, t = _mixed_bound(float(np.vdot(r, c)) + eps_d * float(values[k]), wc + eps_d * self.a, wc + eps_d * self.b,
                                    norm * norm, rw, ww)
            at_zero = (wc0 * math.copysign(1.0, t) / math.sqrt(ww) if math.isinf(t) else
                       (float(np.vdot(r, c0)) + t * wc0) / math.sqrt(max(norm * norm + 2 * rw * t + ww * t * t, 1e-300)))
            floor, uniform = max(floor, bound), max(uniform, min(bound, at_zero))
            if (relaxed - max(floor, 0.0) <= tolerance * clean or eps_d == 0.0
                    or (decide is not None and not uniform <= decide < relaxed)):
                break
            j, worst = active.worst(D)
            if worst <= values[k]:  # no pair lowers ‖r‖: the iterate is the relaxation's minimiser
                break
            corner = np.where(bits[k], hi, lo)
            step = np.outer(U[k], corner) - np.outer(U[active.k[j]], active.z[j])
            gamma = min(max(-float(np.vdot(r, step)) / (eps_d * float(np.vdot(step, step))), 0.0), float(active.w[j]))
            active.add(k, bits[k], corner, gamma)
            active.remove(j, gamma)
            v += gamma * step
            r = c + eps_d * v
        floor = max(floor, 0.0)
        return ResidualFloor(eps_d=float(eps_d), floor=floor, uniform=max(uniform, 0.0), relaxed=relaxed, clean=clean,
                             iterations=it)


def _mixed_bound(alpha: float, beta_up: float, beta_down: float, rr: float, rw: float, ww: float) -> tuple[float, float]:
    """The best of :func:`residual_floor`'s bounds along the directions U = r + t·W̄: with
    ⟨r, v⟩ ≥ h(r) and a ≤ ⟨W̄, v⟩ ≤ b, ‖r‖ ≥ (α + β·t)/‖r + t·W̄‖, α = ⟨r, c⟩ + ε_d·h(r), β = ⟨W̄, c⟩
    + ε_d·a for t ≥ 0 (``beta_up``), ⟨W̄, c⟩ + ε_d·b for t ≤ 0 (``beta_down``); ``rr``, ``rw``, ``ww``
    are ‖r‖², ⟨r, W̄⟩, ‖W̄‖². On each half-line the ratio's one stationary point or its limit
    ±β/‖W̄‖ (the scalar condition alone, U = ±W̄) is the best. Returns the bound and its t (±inf
    for that limit)."""

    def ratio(t: float, beta: float) -> float:
        return (alpha + beta * t) / math.sqrt(max(rr + 2 * rw * t + ww * t * t, 1e-300))

    best = (ratio(0.0, beta_up), 0.0)
    for beta, sign in ((beta_up, 1.0), (beta_down, -1.0)):
        if ww == 0.0 or not math.isfinite(beta):
            continue
        best = max(best, (sign * beta / math.sqrt(ww), sign * math.inf))
        den = beta * rw - alpha * ww
        if den != 0.0 and (t := (alpha * rw - beta * rr) / den) * sign > 0:
            best = max(best, (ratio(t, beta), t))
    return best


class _ActiveSet:
    """The atoms U[k] ⊗ z carrying weight in :func:`residual_floor`'s pairwise Frank–Wolfe, in
    arrays that grow by doubling, each atom found by its (direction, corner) key: an iteration
    costs one pass over the atoms, not a copy of them."""

    def __init__(self, size: int, capacity: int = 64):
        self.k, self.z, self.w = np.zeros(capacity, dtype=np.int64), np.zeros((capacity, size)), np.zeros(capacity)
        self.keys: list[tuple[int, bytes]] = []
        self.slot: dict[tuple[int, bytes], int] = {}

    def worst(self, D: np.ndarray) -> tuple[int, float]:
        """The active atom of largest ⟨r, atom⟩ (D = U r) and that value."""
        n = len(self.keys)
        scores = np.einsum("ij,ij->i", self.z[:n], D[self.k[:n]])
        j = int(scores.argmax())
        return j, float(scores[j])

    def add(self, k: int, bits: np.ndarray, z: np.ndarray, weight: float) -> None:
        key = (k, np.packbits(bits).tobytes())
        if key not in self.slot:
            n = len(self.keys)
            if n == len(self.w):
                self.k, self.z, self.w = (np.concatenate([part, np.zeros_like(part)]) for part in (self.k, self.z, self.w))
            self.k[n], self.z[n], self.w[n] = k, z, 0.0
            self.slot[key] = n
            self.keys.append(key)
        self.w[self.slot[key]] += weight

    def remove(self, a: int, weight: float) -> None:
        """Take ``weight`` from atom ``a``; an atom left without weight leaves, the last one taking its slot."""
        self.w[a] -= weight
        if self.w[a] > 0.0:
            return
        last = len(self.keys) - 1
        del self.slot[self.keys[a]]
        if a != last:
            self.k[a], self.z[a], self.w[a] = self.k[last], self.z[last], self.w[last]
            self.keys[a] = self.keys[last]
            self.slot[self.keys[a]] = a
        self.keys.pop()


def _linear_relaxation(model: nn.Module, X: Tensor, y: Tensor, box: tuple, chunk_size: int, device) -> tuple:
    """What the box relaxation of a linear model's poison gradients needs (:func:`box_threshold`),
    as float64 arrays: G = g(µ) over the last layer with its bias (c × (d + 1)), that layer W̄ (not
    centred), the features' box [lo, hi] (d each) and the directions u = e_k − e_y, k ≠ y, a
    poison's ∇_h l is a mixture of (with one logit ±1), one per row."""
    device = device or next(model.parameters()).device
    head = last_linear(model)
    scale, offset = affine_features(model, tuple(X.shape[1:]), device)
    num = head.out_features
    with evaluating(model):
        G = gradient_sum(model, [head.weight, head.bias], X, y, resolve(num, y, None), chunk_size=chunk_size, device=device)
    G = torch.cat([g.reshape(num, -1) for g in G], 1).double().cpu().numpy() / len(X)
    W = torch.cat([head.weight.detach().double(), head.bias.detach().double().reshape(-1, 1)], 1).cpu().numpy()
    ends = [scale * torch.as_tensor(v, dtype=torch.float64, device=scale.device).flatten() + offset for v in box]
    lo, hi = torch.minimum(*ends).cpu().numpy(), torch.maximum(*ends).cpu().numpy()
    eye = np.eye(num)
    U = np.stack([eye[0], -eye[0]] if num == 1 else [eye[k] - eye[j] for k in range(num) for j in range(num) if k != j])
    return G, W, lo, hi, U


def _box_constants(model: nn.Module, shape, c: int, box, device) -> tuple[float, float]:
    """(a, b): the infimum and supremum of ⟨h, ∇_h l⟩ over the labels and the inputs in ``box``
    (bounds of them; :func:`sharpened_threshold`), the logits h = W'x + b' of a linear model."""
    scale, offset = affine_features(model, tuple(shape), device)
    head = last_linear(model)
    weight = head.weight.detach().double()
    W = weight * scale
    bias = weight @ offset + (head.bias.detach().double() if head.bias is not None else 0.0)
    low, high = (torch.as_tensor(v, dtype=torch.float64, device=device).flatten().expand(W.shape[1]) for v in box)
    if c == 1:  # the margins t = ±h over the box, either label
        h_lo, h_hi = (float(v + bias[0]) for v in _range_over_box(W[0], low, high))
        return _margin_constants("logistic", min(h_lo, -h_hi), max(h_hi, -h_lo))
    a, b = math.inf, -math.inf
    for label in range(c):
        lo, hi = _range_over_box(W - W[label], low, high)
        lo, hi = lo + bias - bias[label], hi + bias - bias[label]
        lo[label] = hi[label] = 0.0
        a = min(a, _box_minimum(lo, hi, lambert_w_constant(c)))
        b = max(b, _box_maximum(lo, hi))
    return a, b


def _range_over_box(weights: Tensor, low: Tensor, high: Tensor) -> tuple[Tensor, Tensor]:
    """The least and largest value of weights·x over x in the box [low, high] (row by row)."""
    return (torch.minimum(weights * low, weights * high).sum(-1), torch.maximum(weights * low, weights * high).sum(-1))


def _softmax_mean(d: Tensor) -> Tensor:
    """Σ_k e^{d_k}·d_k / Σ_k e^{d_k} over the last dimension: ⟨h, p − e_y⟩ with d = h − h_y."""
    return (torch.softmax(d, -1) * d).sum(-1)


def _box_minimum(lo: Tensor, hi: Tensor, bound: float) -> float:
    """min of :func:`_softmax_mean` over d ∈ [lo, hi]: the least of ψ(f) = F(clip(f − 1, lo, hi))
    over the values f can take, [−bound, max hi] (bound = W((c − 1)/e): F ≥ −bound everywhere, and
    F ≤ max d). A grid, then a bounded scalar search around its best point, in float64."""
    lo, hi = lo.double(), hi.double()

    def psi(f: float) -> float:
        return float(_softmax_mean(torch.clamp(torch.full_like(lo, f - 1.0), lo, hi)))

    grid = torch.linspace(-bound, max(float(hi.max()), 0.0), 401, dtype=torch.float64).tolist()
    values = [psi(f) for f in grid]
    i = min(range(len(grid)), key=values.__getitem__)
    found = minimize_scalar(psi, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]), method="bounded", options={"xatol": 1e-12})
    return min(values[i], float(found.fun))


def _box_maximum(lo: Tensor, hi: Tensor, corners: int = 1 << 16) -> float:
    """max of :func:`_softmax_mean` over d ∈ [lo, hi]: F is unimodal (a minimum, no maximum
    inside) in each coordinate, so a maximiser is a corner; with too many corners, max hi (F is a
    mean of the d_k)."""
    lo, hi = lo.double(), hi.double()
    free = (hi > lo).nonzero().flatten()
    if 2 ** len(free) > corners:
        return float(hi.max())
    bits = (torch.arange(2 ** len(free))[:, None] >> torch.arange(len(free))) & 1
    d = lo.repeat(len(bits), 1)
    d[:, free] = torch.where(bits.bool(), hi[free], lo[free])
    return float(_softmax_mean(d).max())
