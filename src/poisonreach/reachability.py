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

import torch
from scipy.special import lambertw
from torch import Tensor, nn

from .errors import PoisonReachError
from .losses import task_of
from .models import last_linear
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
    check_model_data(model, X, y, device)
    if task_of(y) == "regression":
        return Threshold(tau=0.0, tau_multiclass=None, inner=math.nan, lam=0.0, constant={"a": -math.inf, "b": math.inf})
    device = device or next(model.parameters()).device
    total, c = 0.0, None
    with evaluating(model), torch.no_grad():  # one forward pass; nothing here is differentiated
        for start in range(0, len(X), chunk_size):
            h = model(X[start : start + chunk_size].to(device)).to(torch.float64)
            h = h.reshape(len(h), -1)
            c = h.shape[1]
            yb = y[start : start + chunk_size].to(device)
            total += float(_inner_sum(h, yb))
    inner = total / len(X)
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


def _inner_sum(h: Tensor, y: Tensor) -> Tensor:
    """Σ ⟨h, ∇_h l(h, y)⟩ over a chunk: ⟨h, p − y⟩ for cross-entropy, t·l'(t) for one logit."""
    if h.shape[1] == 1:
        if y.is_floating_point() and y.dim() == 2:
            y = y.reshape(-1)
        h = h.reshape(-1)
        return (h * (torch.sigmoid(h) - y.to(h.dtype))).sum()  # equals Σ t·l'(t) with t = ±h
    p = torch.softmax(h, dim=1)
    target = y.to(h.dtype) if y.is_floating_point() else torch.nn.functional.one_hot(y, h.shape[1]).to(h.dtype)
    return (h * (p - target)).sum()
