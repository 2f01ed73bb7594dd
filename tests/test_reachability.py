"""The reachability threshold τ against values derived independently of the library.

Every expected value here is computed from the paper's formulas by hand (math/numpy/scipy) or by
autograd on an explicit loss, never by feeding the library's own output back:

- appendix C.6: the three-point toy example, its stationary w⋆ and τ(2w⋆) ≈ 0.664 from (C.6);
- equation (7) / Corollary 1 for one-logit models (``threshold`` vs ``margin_threshold`` vs hand);
- Example 3 / Theorem 4: ⟨W, G(µ)⟩ as the real inner product of the last layer (weight and bias)
  with the autograd mean gradient of the cross-entropy, then τ(2) and τ(c) with scipy's lambertw;
- (A.12)–(A.16): min over logits of ⟨h, p − y⟩ = −W((c − 1)/e), found by scipy.optimize;
- Theorem 2 / equation (6): the constants a, b of the margin losses against dense grids, and τ for
  bounded margin ranges computed by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from scipy.special import lambertw

from poisonreach import models
from poisonreach.errors import PoisonReachError
from poisonreach.reachability import W_1_OVER_E, Threshold, lambert_w_constant, margin_threshold, threshold

LN2 = math.log(2.0)


def W(x: float) -> float:
    """The principal branch of Lambert's W, from scipy (independent of the library's constant)."""
    return float(lambertw(x).real)


# --------------------------------------------------------------------------------------------------
# Appendix C.6: x1 = (1, 1), y = +; x2 = (−1, 1), y = +; x3 = (0, 1), y = − (last entry = bias)
# --------------------------------------------------------------------------------------------------

TOY_X = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
TOY_Y = torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
W_STAR = torch.tensor([0.0, LN2], dtype=torch.float64)


def toy_inner_by_hand(w1: float, w2: float) -> float:
    """⟨w, g(µ)⟩ = (1/3) Σ t_i·l'(t_i) = (1/3) Σ −t_i / (1 + e^{t_i}), margins t_i = y_i ⟨w, x_i⟩."""
    margins = [w1 + w2, -w1 + w2, -w2]  # y1⟨w,x1⟩, y2⟨w,x2⟩, y3⟨w,x3⟩ with y3 = −1
    return sum(-t / (1.0 + math.exp(t)) for t in margins) / 3.0


def test_toy_w_star_is_stationary_by_autograd():
    w = W_STAR.clone().requires_grad_(True)
    loss = torch.log1p(torch.exp(-TOY_Y * (TOY_X @ w))).mean()  # (C.2)
    (g,) = torch.autograd.grad(loss, w)
    assert g.abs().max().item() < 1e-15
    # and (C.4) written out by hand for w⋆ = (0, ln 2): the three sigmoid weights are 1/3, 1/3, 2/3
    g1 = -(1 / 3) * 1 - (-1) * (1 / 3) + 0
    g2 = -(1 / 3) - (1 / 3) + (2 / 3)
    assert g1 == 0 and abs(g2) < 1e-15


def test_toy_tau_of_twice_w_star_matches_the_closed_form_of_c6():
    w = 2 * W_STAR
    w2 = 2 * LN2
    # closed form of the bracket of (C.6): 3⟨w, g⟩ = w2 (e^{w2} − 2) / (1 + e^{w2}) = 0.8 ln 2
    inner = w2 * (math.exp(w2) - 2) / (1 + math.exp(w2)) / 3
    assert inner == pytest.approx(toy_inner_by_hand(0.0, w2), rel=1e-14)
    assert inner == pytest.approx(4 * LN2 / 15, rel=1e-14)
    expected = inner / W(1 / math.e)
    got = margin_threshold(w, TOY_X, TOY_Y, "logistic")
    assert got.inner == pytest.approx(inner, rel=1e-12)
    assert got.tau == pytest.approx(expected, rel=1e-10)
    assert got.tau == pytest.approx(0.6638, abs=1e-4)  # the paper rounds 1/(3W(1/e)) to 1.2: ≈ 0.67
    assert abs(got.tau - 0.67) < 0.01
    assert got.lam == pytest.approx(expected / (1 + expected), rel=1e-10)
    assert not got.reachable(0.6) and got.reachable(0.7)


def test_toy_tau_of_scaled_targets():
    w = 2 * W_STAR / 1.1
    expected = toy_inner_by_hand(0.0, 2 * LN2 / 1.1) / W(1 / math.e)
    assert expected == pytest.approx(0.5087, abs=1e-4)
    assert margin_threshold(w, TOY_X, TOY_Y).tau == pytest.approx(expected, rel=1e-10)

    at_star = margin_threshold(W_STAR, TOY_X, TOY_Y)
    assert abs(at_star.inner) < 1e-15 and at_star.tau == 0.0

    half = margin_threshold(0.5 * W_STAR, TOY_X, TOY_Y)
    assert toy_inner_by_hand(0.0, LN2 / 2) < 0  # ⟨w, g(w)⟩ < 0, hence τ = 0 (appendix C.6)
    assert half.inner == pytest.approx(toy_inner_by_hand(0.0, LN2 / 2), rel=1e-12)
    assert half.tau == 0.0 and half.lam == 0.0


def test_toy_labels_in_zero_one_are_read_as_minus_one():
    y01 = torch.tensor([1, 1, 0])
    a = margin_threshold(2 * W_STAR, TOY_X, y01)
    assert a.tau == pytest.approx(4 * LN2 / 15 / W(1 / math.e), rel=1e-10)


def test_one_logit_lr_model_threshold_agrees_with_margin_threshold_and_by_hand():
    # bias = the padded coordinate: the model sees x ∈ {1, −1, 0} and carries w2 in its bias
    model = models.create("lr", (1,), 2).double()
    assert model.head.out_features == 1
    with torch.no_grad():
        model.head.weight.fill_(0.0)
        model.head.bias.fill_(2 * LN2)
    X = TOY_X[:, :1].clone()
    y = torch.tensor([1, 1, 0])
    got = threshold(model, X, y)
    assert got.tau == pytest.approx(4 * LN2 / 15 / W(1 / math.e), rel=1e-10)
    assert got.tau == pytest.approx(margin_threshold(2 * W_STAR, TOY_X, TOY_Y).tau, rel=1e-12)


def test_one_logit_lr_threshold_equals_margin_threshold_on_random_data():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(50, 2, generator=g, dtype=torch.float64)
    y = (torch.rand(50, generator=g) < 0.5).long()
    model = models.create("lr", (2,), 2).double()
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[-1.5, 2.0]]))
        model.head.bias.fill_(0.3)
    got = threshold(model, X, y, chunk_size=7)  # chunking must not matter
    ref = margin_threshold(torch.tensor([-1.5, 2.0]), X, y, bias=0.3)
    # by hand: margins t = ±(w⊤x + b), ⟨w, g⟩ = mean(−t / (1 + e^t))
    s = X.numpy() @ np.array([-1.5, 2.0]) + 0.3
    t = np.where(y.numpy() == 1, s, -s)
    inner = float(np.mean(-t / (1 + np.exp(t))))
    assert got.inner == pytest.approx(inner, rel=1e-10)
    assert ref.inner == pytest.approx(inner, rel=1e-10)
    assert got.tau == pytest.approx(max(inner / W(1 / math.e), 0.0), rel=1e-10)
    assert got.tau == pytest.approx(ref.tau, rel=1e-10)
    assert inner > 0  # the check above is not the trivial τ = 0


# --------------------------------------------------------------------------------------------------
# Example 3 / Theorem 4: the cross-entropy threshold through the last linear layer
# --------------------------------------------------------------------------------------------------


def last_layer_inner_by_autograd(model, X, y) -> float:
    """⟨(W, b), mean ∇_{(W,b)} ℓ⟩ for the cross-entropy, by autograd on the explicit mean loss."""
    head = models.last_linear(model)
    loss = F.cross_entropy(model(X), y)
    gW, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    return float((head.weight.detach() * gW).sum() + (head.bias.detach() * gb).sum())


def hand_set_three_class_model():
    model = models.create("lr", (4,), 3).double()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        model.head.weight.copy_(3 * torch.randn(3, 4, generator=g, dtype=torch.float64))
        model.head.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
    X = torch.randn(9, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=g)
    return model, X, y


def test_multiclass_inner_is_the_last_layer_inner_product_with_the_mean_gradient():
    model, X, y = hand_set_three_class_model()
    inner = last_layer_inner_by_autograd(model, X, y)
    assert inner > 0.1  # large random logits on random labels: confidently wrong on many points
    got = threshold(model, X, y, chunk_size=4)
    assert got.inner == pytest.approx(inner, rel=1e-10)
    assert got.tau == pytest.approx(max(inner / W(1 / math.e), 0.0), rel=1e-10)
    assert got.tau_multiclass == pytest.approx(max(inner / W(2 / math.e), 0.0), rel=1e-10)
    assert got.tau_multiclass < got.tau  # W(2/e) > W(1/e)
    assert got.lam == pytest.approx(got.tau / (1 + got.tau), rel=1e-12)


def test_multiclass_confident_correct_small_model_has_negative_inner_and_tau_zero():
    model = models.create("lr", (3,), 3).double()
    X = torch.eye(3, dtype=torch.float64)
    y = torch.arange(3)
    with torch.no_grad():
        model.head.weight.copy_(torch.eye(3, dtype=torch.float64))  # h = e_y: right, not confident
        model.head.bias.zero_()
    inner = last_layer_inner_by_autograd(model, X, y)
    # by hand: h = e_0, p = softmax(1, 0, 0), ⟨h, p − y⟩ = p_0 − 1
    p0 = math.e / (math.e + 2)
    assert inner == pytest.approx(p0 - 1, rel=1e-12)
    got = threshold(model, X, y)
    assert got.inner == pytest.approx(inner, rel=1e-10)
    assert got.tau == 0.0 and got.tau_multiclass == 0.0


def test_network_inner_uses_the_last_layer_with_its_bias():
    model = models.create("nn", (3,), 4, seed=2).double().eval()
    with torch.no_grad():
        model.head.weight.mul_(40)  # make the net confident so that τ > 0 is exercised
        model.head.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    g = torch.Generator().manual_seed(5)
    X = torch.randn(8, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (8,), generator=g)
    inner = last_layer_inner_by_autograd(model, X, y)
    assert inner > 0
    got = threshold(model, X, y)
    assert got.inner == pytest.approx(inner, rel=1e-9)
    assert got.tau == pytest.approx(inner / W(1 / math.e), rel=1e-9)
    assert got.tau_multiclass == pytest.approx(inner / W(3 / math.e), rel=1e-9)
    # the whole-network inner product differs: τ really is a last-layer quantity (Theorem 4)
    loss = F.cross_entropy(model(X), y)
    params = list(model.parameters())
    full = sum(float((p.detach() * gp).sum()) for p, gp in zip(params, torch.autograd.grad(loss, params)))
    assert abs(full - inner) > 1e-3


def test_threshold_with_soft_labels_matches_autograd():
    model, X, _ = hand_set_three_class_model()
    g = torch.Generator().manual_seed(8)
    soft = torch.softmax(torch.randn(len(X), 3, generator=g, dtype=torch.float64), dim=1)
    head = model.head
    loss = F.cross_entropy(model(X), soft)
    gW, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    inner = float((head.weight.detach() * gW).sum() + (head.bias.detach() * gb).sum())
    assert threshold(model, X, soft).inner == pytest.approx(inner, rel=1e-10)


def test_regression_labels_give_tau_zero():
    model = models.create("linreg", (2,), 1).double()
    X = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randn(20, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert threshold(model, X, y).tau == 0.0


# --------------------------------------------------------------------------------------------------
# (A.12)–(A.16): inf_h ⟨h, softmax(h) − y⟩ = −W((c − 1)/e)
# --------------------------------------------------------------------------------------------------


def inner_hp(h: np.ndarray, label: int = 0) -> float:
    p = np.exp(h - h.max())
    p /= p.sum()
    y = np.zeros_like(h)
    y[label] = 1
    return float(h @ (p - y))


@pytest.mark.parametrize("c", [2, 3, 10])
def test_lambert_w_is_the_minimum_of_h_dot_p_minus_y(c):
    rng = np.random.default_rng(c)
    best = math.inf
    for start in range(4):
        x0 = rng.normal(scale=2.0, size=c)
        res = minimize(inner_hp, x0, method="BFGS", options={"gtol": 1e-12})
        best = min(best, res.fun)
    assert best == pytest.approx(-W((c - 1) / math.e), abs=1e-6)
    assert lambert_w_constant(c) == pytest.approx(-best, abs=1e-6)
    # the bound holds everywhere: many random logits and labels never go below it
    h = rng.normal(size=(4000, c)) * rng.choice([0.1, 1.0, 3.0, 10.0], size=(4000, 1))
    labels = rng.integers(0, c, size=4000)
    values = np.array([inner_hp(hi, li) for hi, li in zip(h, labels)])
    assert values.min() >= -W((c - 1) / math.e) - 1e-12
    # and it is attained (A.15)–(A.16): every other logit at t⋆ = −1 − W((c − 1)/e) from the label's,
    # the root of (1 + t)/(c − 1) + e^t = 0 (derivative of t e^t / (1/(c − 1) + e^t))
    t_star = -1 - W((c - 1) / math.e)
    assert (1 + t_star) / (c - 1) + math.exp(t_star) == pytest.approx(0.0, abs=1e-14)
    h_opt = np.full(c, t_star)
    h_opt[0] = 0.0
    assert inner_hp(h_opt, 0) == pytest.approx(-W((c - 1) / math.e), abs=1e-12)


def test_w_constants():
    w = W_1_OVER_E
    assert w * math.exp(w) == pytest.approx(1 / math.e, rel=1e-14)
    assert w == pytest.approx(0.2784645427610738, rel=1e-14)
    assert lambert_w_constant(2) == pytest.approx(w, rel=1e-14)
    for c in (3, 10, 100):
        v = lambert_w_constant(c)
        assert v * math.exp(v) == pytest.approx((c - 1) / math.e, rel=1e-12)
    with pytest.raises(PoisonReachError):
        lambert_w_constant(1)


# --------------------------------------------------------------------------------------------------
# Theorem 2 / Corollary 1: the constants a, b and equation (6)
# --------------------------------------------------------------------------------------------------


def dl_logistic(t):  # l(t) = log(1 + e^{−t})
    return -1.0 / (1.0 + np.exp(t))


def dl_exponential(t):  # l(t) = e^{−t}
    return -np.exp(-t)


def dl_hinge(t):  # l(t) = max(0, 1 − t); the subgradient −1 at the kink
    return np.where(t <= 1.0, -1.0, 0.0)


DERIVATIVES = {"logistic": dl_logistic, "exponential": dl_exponential, "hinge": dl_hinge}
UNBOUNDED_A = {"logistic": -W(1 / math.e), "exponential": -1 / math.e, "hinge": -1.0}


def some_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(30, generator=g) < 0.5).long() * 2 - 1
    w = torch.tensor([0.7, -1.2, 0.4], dtype=torch.float64)
    return w, X, y


@pytest.mark.parametrize("loss", ["logistic", "exponential", "hinge"])
def test_unbounded_constants(loss):
    w, X, y = some_data()
    got = margin_threshold(w, X, y, loss)
    assert got.constant["a"] == pytest.approx(UNBOUNDED_A[loss], rel=1e-12)
    assert got.constant["b"] == math.inf
    # a dense grid agrees with the closed forms (the infimum is attained near t = 1.28, 1, 1)
    t = np.union1d(np.linspace(-5, 10, 3_000_001), [1.0])  # 1.0: the hinge's kink, its infimum
    assert (t * DERIVATIVES[loss](t)).min() == pytest.approx(UNBOUNDED_A[loss], abs=1e-9)
    # the inner product by hand: mean of t·l'(t) over the margins
    tm = y.numpy() * (X.numpy() @ w.numpy())
    inner = float(np.mean(tm * DERIVATIVES[loss](tm)))
    assert got.inner == pytest.approx(inner, rel=1e-12)
    a = UNBOUNDED_A[loss]
    lam = max(inner / (inner - a), 0.0) if inner > 0 else 0.0  # b = ∞: the second term is 0
    assert got.lam == pytest.approx(lam, rel=1e-12)
    assert got.tau == pytest.approx(lam / (1 - lam), rel=1e-12)


@pytest.mark.parametrize("loss", ["logistic", "exponential", "hinge"])
@pytest.mark.parametrize("t_range", [(-3.0, 5.0), (0.5, 4.0), (2.0, 6.0), (-5.0, 0.9), (-1.0, 1.0), (-2.0, -0.5)])
def test_bounded_constants_match_a_dense_grid(loss, t_range):
    w, X, y = some_data()
    got = margin_threshold(w, X, y, loss, t_range=t_range)
    lo, hi = t_range
    t = np.union1d(np.linspace(lo, hi, 2_000_001), [1.0] if lo <= 1.0 <= hi else [])  # the hinge's kink
    values = t * DERIVATIVES[loss](t)
    assert got.constant["a"] == pytest.approx(values.min(), abs=1e-9)
    assert got.constant["b"] == pytest.approx(values.max(), abs=1e-9)


def test_squared_unbounded_gives_tau_zero_for_any_w():
    g = torch.Generator().manual_seed(4)
    X = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = 5 * torch.randn(40, generator=g, dtype=torch.float64)
    for scale in (0.01, 1.0, 100.0):
        w = scale * torch.randn(3, generator=g, dtype=torch.float64)
        got = margin_threshold(w, X, y, "squared")
        s = X @ w
        assert got.inner == pytest.approx(float((s * (s - y)).mean()), rel=1e-12)
        assert got.tau == 0.0


@pytest.mark.parametrize("t_range, y_range", [((-2.0, 3.0), (-1.0, 0.5)), ((0.5, 3.0), (-1.0, 2.0)), ((-3.0, -1.0), (-4.0, 4.0)), ((1.0, 3.0), (-1.0, 0.5))])
def test_squared_bounded_constants_by_grid(t_range, y_range):
    w, X, _ = some_data()
    y = torch.linspace(-1, 1, len(X), dtype=torch.float64)
    got = margin_threshold(w, X, y, "squared", t_range=t_range, y_range=y_range)
    tt, yy = np.meshgrid(np.linspace(*t_range, 2001), np.linspace(*y_range, 801))
    values = tt * (tt - yy)  # t·l'(t, y) for l = ½(t − y)²
    assert got.constant["a"] == pytest.approx(values.min(), abs=1e-6)
    assert got.constant["b"] == pytest.approx(values.max(), abs=1e-9)


def test_equation_6_negative_inner_with_a_finite_b():
    # all margins 0.5 > 0: ⟨w, g(µ)⟩ < 0; poisons restricted to margins in [−1, 1] so b is finite
    X = torch.tensor([[0.5], [0.5], [-0.5]], dtype=torch.float64)
    y = torch.tensor([1, 1, -1])
    inner = -0.5 / (1 + math.exp(0.5))
    b = 1 / (1 + math.exp(-1))  # t·l'(t) at t = −1: the largest value on [−1, 1]
    lam = -inner / (b - inner)
    got = margin_threshold(torch.tensor([1.0]), X, y, t_range=(-1.0, 1.0))
    assert got.inner == pytest.approx(inner, rel=1e-12)
    assert got.constant["b"] == pytest.approx(b, rel=1e-12)
    assert got.lam == pytest.approx(lam, rel=1e-12)
    assert got.tau == pytest.approx(lam / (1 - lam), rel=1e-12)
    assert got.tau == pytest.approx(0.25822, abs=1e-5)
    # unbounded domain: b = ∞ and any negative-inner target is reachable with any ε_d > 0
    assert margin_threshold(torch.tensor([1.0]), X, y).tau == 0.0


def test_equation_6_positive_inner_with_a_bounded_a_and_the_unreachable_case():
    X = torch.tensor([[-0.5], [-0.5]], dtype=torch.float64)
    y = torch.tensor([1, 1])
    inner = 0.5 / (1 + math.exp(-0.5))
    a = -1 / (1 + math.e)  # t_min ≈ 1.28 is outside [−1, 1]: a = f(1)
    lam = inner / (inner - a)
    got = margin_threshold(torch.tensor([1.0]), X, y, t_range=(-1.0, 1.0))
    assert got.tau == pytest.approx(lam / (1 - lam), rel=1e-12)
    assert got.tau > margin_threshold(torch.tensor([1.0]), X, y).tau  # a smaller domain is harder
    assert margin_threshold(torch.tensor([1.0]), X, y).tau == pytest.approx(inner / W(1 / math.e), rel=1e-12)
    # margins in [−3, −1]: t·l'(t) ≥ f(−1) > ⟨w, g(µ)⟩ > 0, no poison can cancel: τ = ∞
    none = margin_threshold(torch.tensor([1.0]), X, y, t_range=(-3.0, -1.0))
    assert none.constant["a"] == pytest.approx(1 / (1 + math.exp(-1)), rel=1e-12)
    assert none.tau == math.inf and none.lam == 1.0
    assert not none.reachable(1e9)


def test_threshold_is_a_frozen_record():
    got = margin_threshold(2 * W_STAR, TOY_X, TOY_Y)
    assert isinstance(got, Threshold)
    assert got.to_dict()["tau"] == got.tau
    with pytest.raises(Exception):
        got.tau = 0.0


# --------------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case",
    ["lengths", "w_size", "nan", "inf", "loss", "labels"],
)
def test_margin_threshold_rejects_bad_input(case):
    w, X, y = W_STAR.clone(), TOY_X.clone(), TOY_Y.clone()
    loss = "logistic"
    if case == "lengths":
        y = y[:2]
    elif case == "w_size":
        w = torch.tensor([1.0, 2.0, 3.0])
    elif case == "nan":
        X[1, 0] = math.nan
    elif case == "inf":
        X[0, 1] = math.inf
    elif case == "loss":
        loss = "cross-entropy"
    elif case == "labels":
        y = torch.tensor([1.0, 2.0, -1.0])
    with pytest.raises(PoisonReachError):
        margin_threshold(w, X, y, loss)


def test_threshold_rejects_bad_input():
    model = models.create("lr", (2,), 3).double()
    X = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])
    with pytest.raises(PoisonReachError):
        threshold(model, X, y[:4])
    with pytest.raises(PoisonReachError):
        threshold(model, X[:0], y[:0])
    X[2, 1] = math.nan
    with pytest.raises(PoisonReachError):
        threshold(model, X, y)


@pytest.mark.parametrize("t_range", [(1.0, -1.0), (math.nan, 1.0)])
def test_margin_threshold_rejects_an_inverted_or_nan_range(t_range):
    # an empty or NaN margin domain has no infimum/supremum: observed, the library silently returns
    # τ = 0.258 with a = b = 0.731 for (1, −1), and τ = ∞ for (NaN, 1)
    X = torch.tensor([[0.5], [0.5]], dtype=torch.float64)
    with pytest.raises(PoisonReachError):
        margin_threshold(torch.tensor([1.0]), X, torch.tensor([1, 1]), t_range=t_range)
    with pytest.raises(PoisonReachError):
        margin_threshold(torch.tensor([1.0]), X, torch.tensor([0.5, 0.2]), "squared", t_range=(0.0, 1.0), y_range=t_range)


@pytest.mark.parametrize("chunk_size", [0, -1, 2.5])
def test_threshold_rejects_a_bad_chunk_size(chunk_size):
    # observed: 0 raises a bare ValueError from range(), −1 a TypeError from lambert_w_constant(None)
    model = models.create("lr", (2,), 3)
    X = torch.rand(5, 2, generator=torch.Generator().manual_seed(0))
    with pytest.raises(PoisonReachError):
        threshold(model, X, torch.tensor([0, 1, 2, 0, 1]), chunk_size=chunk_size)
