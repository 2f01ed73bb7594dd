"""The box threshold (``reachability.box_threshold``) against the programme it eliminates.

``box_threshold`` solves appendix A's stationarity condition (A.10) over the box relaxation of the
poisons' gradients with the per-feature β eliminated (Hoffman's circulation theorem) and the cuts
added round by round. The reference here is the programme as first written, with every β_{u,i} an
unknown and every box constraint present, solved in one go, on gradients taken by autograd: the
two must agree, and the cutting-plane value, a relaxation of it, must never exceed it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sparse
import torch
import torch.nn.functional as F
from scipy.optimize import OptimizeResult, linprog

from poisonreach import data, models, reachability, training
from poisonreach.attacks import LabelFlip
from poisonreach.errors import PoisonReachError
from poisonreach.models import last_linear
from poisonreach.reachability import box_threshold, sharpened_threshold
from poisonreach.targets import GradPC

DECAY = 1e-3


def reference(model, X, y, box, mean, std, weight_decay, bounds=(-math.inf, math.inf)) -> float:
    """min Σ_u α_u + α_0 over β_u (d each) and α ≥ 0 subject to, for every class k and feature i,
    Σ_u u_k·β_{u,i} + ε·λW̄_{k,i} = −(G + λW̄)_{k,i}, the same on the bias with α_u for β_{u,i},
    α_u·low_i ≤ β_{u,i} ≤ α_u·high_i and a·ε ≤ ⟨W̄, Σ_u u ⊗ (β_u, α_u)⟩ ≤ b·ε, with ε = Σ α."""
    head = last_linear(model)
    logits = model(X)
    loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.float()) if logits.shape[1] == 1 else F.cross_entropy(logits, y)
    gw, gb = torch.autograd.grad(loss, [head.weight, head.bias])
    G = torch.cat([gw, gb[:, None]], 1).double().numpy()
    W = torch.cat([head.weight, head.bias[:, None]], 1).detach().double().numpy()
    c, d = W.shape[0], W.shape[1] - 1
    if c > 1:  # G's class sums are 0 but for float32 rounding, which makes these equalities inconsistent
        W, G = W - W.mean(0), G - G.mean(0)
    lo, hi = (np.full(d, (v - mean) / std) for v in box)
    eye = np.eye(c)
    U = np.stack([eye[0], -eye[0]] if c == 1 else [eye[k] - eye[j] for k in range(c) for j in range(c) if k != j])
    P = len(U)
    # unknowns: β (P·d, u-major), α (P), α_0
    n = P * d + P + 1
    beta = lambda u, i: u * d + i  # noqa: E731
    alpha = lambda u: P * d + u  # noqa: E731
    eq, ub = [], []  # (row, column, value) triplets, repeated ones summed
    for k in range(c):
        for i in range(d + 1):
            row = k * (d + 1) + i
            eq += [(row, beta(u, i) if i < d else alpha(u), U[u, k]) for u in range(P)]
            eq += [(row, col, weight_decay * W[k, i]) for col in range(P * d, n)]
    for u in range(P):
        for i in range(d):
            ub += [(2 * beta(u, i), beta(u, i), 1.0), (2 * beta(u, i), alpha(u), -hi[i]),
                   (2 * beta(u, i) + 1, beta(u, i), -1.0), (2 * beta(u, i) + 1, alpha(u), lo[i])]
    coupling = np.zeros(n)
    for u in range(P):
        coupling[u * d:(u + 1) * d] = U[u] @ W[:, :d]
        coupling[alpha(u)] = U[u] @ W[:, d]
    masses = np.r_[np.zeros(P * d), np.ones(P + 1)]
    rows = 2 * P * d
    for sign, constant in ((-1.0, bounds[0]), (1.0, bounds[1])):
        if math.isfinite(constant):
            ub += [(rows, col, v) for col, v in enumerate(sign * (coupling - constant * masses))]
            rows += 1
    matrix = lambda t, m: sparse.coo_matrix(([v for *_, v in t], ([r for r, *_ in t], [q for _, q, _ in t])), shape=(m, n)).tocsr()  # noqa: E731
    A_eq, b_eq = matrix(eq, c * (d + 1)), -(G + weight_decay * W).ravel()
    A_ub, b_ub = matrix(ub, rows), np.zeros(rows)
    found = linprog(masses, A_ub=A_ub, b_ub=b_ub, A_eq=A_eq, b_eq=b_eq,
                    bounds=[(None, None)] * (P * d) + [(0, None)] * (P + 1), method="highs")
    assert found.status in (0, 2), found.message
    return math.inf if found.status == 2 else float(found.fun)


def _random_problem(c: int, seed: int, *, d: int = 5, n: int = 30):
    """A linear model with ``c`` logits (one: binary logistic regression) on n random points."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(n, d, generator=gen)
    y = torch.randint(0, 2 if c == 1 else c, (n,), generator=gen)
    model = models.create("lr", (d,), 2 if c == 1 else c, mean=0.5, std=0.5, seed=seed)
    assert last_linear(model).out_features == c
    return model, X, y


@pytest.mark.parametrize("c", [1, 3, 4])
@pytest.mark.parametrize("bounded", [False, True])
def test_the_cutting_planes_reach_the_full_programme_on_random_problems(c, bounded):
    finite = 0
    for seed in range(6):
        model, X, y = _random_problem(c, seed)
        # the stationarity of a victim trained with data near X: G is then small, the threshold finite
        training.minimize(model, X[:20], y[:20], weight_decay=DECAY, progress=False)
        bounds = (-0.4, 0.3) if bounded else (-math.inf, math.inf)
        for box in ((0.0, 1.0), (0.2, 0.9)):
            want = reference(model, X, y, box, 0.5, 0.5, DECAY, bounds)
            got = box_threshold(model, X, y, box=box, weight_decay=DECAY, bounds=bounds)
            finite += math.isfinite(want)
            assert got <= want * (1 + 1e-6) + 1e-9  # a relaxation of the full programme (to float32 gradients)
            assert got == pytest.approx(want, rel=1e-5, abs=1e-5)  # and the same, once no cut is violated (inf too)
    assert finite >= 6, finite  # the comparison is not vacuous


def _flip_target(E):
    """``digits`` and the victim of a least-likely flip at budget E: reachable at E by its own flips."""
    s = data.load("digits", seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(clean, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    flips = LabelFlip(E, strategy="least-likely").poison(clean, s.x_train, s.y_train)
    target = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(target, *flips.mixed(s.x_train, s.y_train), weight_decay=DECAY, tolerance=1e-8, progress=False)
    return s, target


@pytest.mark.parametrize("E", [0.05, 0.3])
def test_the_cutting_planes_reach_the_full_programme_on_digits_victims(E):
    s, target = _flip_target(E)
    sharp = sharpened_threshold(target, s.x_train, s.y_train, weight_decay=DECAY)
    mean, std = float(s.mean[0]), float(s.std[0])
    for bounds in ((-math.inf, math.inf), (sharp.infimum, sharp.supremum)):
        want = reference(target, s.x_train, s.y_train, (0.0, 1.0), mean, std, DECAY, bounds)
        got = box_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY, bounds=bounds)
        assert 0 < want <= E * (1 + 1e-3)  # reached at E by its own flips
        assert got <= want * (1 + 1e-6) + 1e-9 and got == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_a_clean_victim_needs_no_poisons_to_within_the_tolerance():
    s = data.load("digits", seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(clean, s.x_train, s.y_train, weight_decay=DECAY, tolerance=1e-8, progress=False)
    assert 0 <= box_threshold(clean, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY) <= 1e-5


def test_more_than_twelve_classes_or_a_tolerance_below_the_solvers_are_refused():
    X, y = torch.rand(20, 4), torch.arange(20) % 13
    model = models.create("lr", (4,), 13, seed=0)
    with pytest.raises(PoisonReachError, match=r"c = 13 is more than 12.*--box none"):
        box_threshold(model, X, y, box=(0.0, 1.0), weight_decay=DECAY)
    with pytest.raises(PoisonReachError, match="tolerance must be >= 1e-07"):
        box_threshold(model, X, y % 3, box=(0.0, 1.0), weight_decay=DECAY, tolerance=1e-9)


def test_float32_rounding_of_the_clean_gradient_does_not_make_the_programme_infeasible():
    # G(µ) summed in float32 has class sums of ~1e-7, not 0, while every poison gradient's are 0: the
    # written-out programme's equalities are then inconsistent and a solver may call it infeasible
    # (it did for this target). The cuts compare to a tolerance and find the feasible point.
    s = data.load("digits", seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(clean, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    target = GradPC(2.0).generate(clean, s.x_train, s.y_train)
    sharp = sharpened_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY)
    free = box_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY)
    assert 0 < free < sharp.tau_multiclass and sharp.tau_lp == pytest.approx(sharp.tau_multiclass, rel=1e-5)
    # the written-out programme on G with its class sums made exactly 0 finds the same point
    want = reference(target, s.x_train, s.y_train, (0.0, 1.0), float(s.mean[0]), float(s.std[0]), DECAY)
    assert free <= want * (1 + 1e-6) + 1e-9 and free == pytest.approx(want, rel=1e-5)


def _dual_simplex_stalls(monkeypatch, fail=("highs-ds",)):
    """linprog as HiGHS answers a programme it cannot classify (status 4, model status unknown) for
    the methods in ``fail``; the real solver for the others. Returns the methods called."""
    called = []

    def patched(*args, method, **kwargs):
        called.append(method)
        if method in fail:
            return OptimizeResult(status=4, message="HiGHS Status 15: model_status is Unknown", x=None)
        return linprog(*args, method=method, **kwargs)

    monkeypatch.setattr(reachability, "linprog", patched)
    return called


def test_a_round_the_dual_simplex_cannot_classify_is_solved_by_the_interior_point_method(monkeypatch):
    s, target = _flip_target(0.3)
    want = box_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY)
    called = _dual_simplex_stalls(monkeypatch)
    got = box_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY)
    assert "highs-ipm" in called and 0 < want < math.inf
    assert got == pytest.approx(want, rel=1e-4)


def test_a_programme_no_method_solves_is_one_clear_error_naming_both(monkeypatch):
    s, target = _flip_target(0.3)
    _dual_simplex_stalls(monkeypatch, fail=("highs-ds", "highs-ipm"))
    with pytest.raises(PoisonReachError, match=r"did not solve \(highs-ds: status 4.*; highs-ipm: status 4.*--box none"):
        box_threshold(target, s.x_train, s.y_train, box=(0.0, 1.0), weight_decay=DECAY)
