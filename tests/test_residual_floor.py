"""The residual floor (``reachability.residual_floor``): a certified lower bound of Gradient
Canceling's ‖r‖ at a budget, for a linear model and poisons in a box.

- it is a lower bound: no poisons drawn in the box, and none Gauss–Newton finds, leave a smaller
  residual, computed here by autograd on clean ∪ poisons (weak duality);
- it is the relaxation's minimum: on a problem small enough for a direct solver (SLSQP over the
  relaxation's masses and feature sums, written out here), floor and minimum agree;
- it vanishes exactly where the box programme says the residual can (``box_threshold``), and is
  positive below.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from poisonreach import data, models, training
from poisonreach.attacks import GaussNewtonCanceling
from poisonreach.errors import PoisonReachError
from poisonreach.reachability import box_threshold, residual_floor
from poisonreach.targets import GradPC

DECAY = 1e-3


@pytest.fixture(scope="module")
def digits():
    s = data.load("digits", seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(clean, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    box = (float(s.x_train.min()), float(s.x_train.max()))
    return s, clean, box


def residual(model, X, y, x_p=None, y_p=None, eps_d=None) -> float:
    """‖g(µ) + ε_d·g(ν̂) + (1 + ε_d)·λw‖, ε_d = m/n, by autograd: the mean gradients of the two parts
    (without poisons: ‖g(µ) + (1 + ε_d)·λw‖)."""
    params = list(model.parameters())
    loss = torch.nn.functional.cross_entropy(model(X), y)
    if x_p is not None:
        eps_d = len(x_p) / len(X)
        loss = loss + eps_d * torch.nn.functional.cross_entropy(model(x_p), y_p)
    grads = torch.autograd.grad(loss, params)
    return float(torch.cat([(g + (1 + eps_d) * DECAY * p).detach().flatten() for g, p in zip(grads, params)]).double().norm())


def test_no_poisons_in_the_box_go_below_the_floor(digits):
    s, clean, box = digits
    target = GradPC(2.0).generate(clean, s.x_train, s.y_train)  # beyond the box programme's reach at any ε_d
    X, y = s.x_train, s.y_train
    gen = torch.Generator().manual_seed(0)
    for eps_d in (0.02, 0.1):
        m = round(eps_d * len(X))
        floor = residual_floor(target, X, y, m / len(X), box=box, weight_decay=DECAY)
        assert 0 < floor.floor <= floor.relaxed <= floor.clean
        assert floor.clean == pytest.approx(residual(target, X, y, eps_d=m / len(X)), rel=1e-5)
        for _ in range(20):  # random poisons: pixels at the box's ends or inside, any labels
            x_p = box[0] + (box[1] - box[0]) * (torch.rand((m, *X.shape[1:]), generator=gen) > 0.5).float()
            x_p = torch.where(torch.rand(x_p.shape, generator=gen) < 0.3, torch.rand(x_p.shape, generator=gen) * box[1], x_p)
            assert residual(target, X, y, x_p, torch.randint(0, s.num_classes, (m,), generator=gen)) >= floor.floor
        gc = GaussNewtonCanceling(eps_d, box=box, weight_decay=DECAY, iterations=8).poison(target, X, y)
        achieved = residual(target, X, y, gc.x, gc.y)
        assert achieved == pytest.approx(gc.grad_norm_history[-1], rel=1e-3)
        assert floor.floor <= achieved  # tight-ish: GC ends within a small factor of it
        assert achieved < 10 * floor.floor


def relaxation_minimum(c: np.ndarray, U: np.ndarray, lo: np.ndarray, hi: np.ndarray, eps_d: float) -> float:
    """min ‖c + ε_d·Σ_u u ⊗ (β_u, α_u)‖ over α ≥ 0, Σ α ≤ 1, α_u·lo ≤ β_u ≤ α_u·hi: the relaxation
    written in its primal variables, solved by SLSQP."""
    P, d = U.shape[0], len(lo)

    def r(z):
        beta, alpha = z[: P * d].reshape(P, d), z[P * d:]
        return c + eps_d * (U.T @ np.concatenate([beta, alpha[:, None]], 1))

    cons = [{"type": "ineq", "fun": lambda z: 1 - z[P * d:].sum()}]
    for u in range(P):
        cons.append({"type": "ineq", "fun": lambda z, u=u: z[u * d:(u + 1) * d] - z[P * d + u] * lo})
        cons.append({"type": "ineq", "fun": lambda z, u=u: z[P * d + u] * hi - z[u * d:(u + 1) * d]})
    found = minimize(lambda z: 0.5 * float((r(z) ** 2).sum()), np.zeros(P * (d + 1)), method="SLSQP", constraints=cons,
                     bounds=[(None, None)] * (P * d) + [(0, None)] * P, options={"ftol": 1e-14, "maxiter": 1000})
    assert found.success, found.message
    return float(np.sqrt(2 * found.fun))


@pytest.mark.parametrize("seed", range(3))
def test_the_floor_is_the_relaxations_minimum(seed):
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(60, 2, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    model = models.create("lr", (2,), 3, seed=seed)
    head = models.last_linear(model)
    with torch.no_grad():
        head.weight.mul_(4.0)  # a target far from the clean minimiser
    box = (0.0, 1.0)
    W = torch.cat([head.weight, head.bias[:, None]], 1).detach().double().numpy()
    loss = torch.nn.functional.cross_entropy(model(X), y)
    G = torch.autograd.grad(loss, [head.weight, head.bias])
    G = torch.cat([G[0], G[1][:, None]], 1).double().numpy()
    U = np.stack([np.eye(3)[k] - np.eye(3)[j] for k in range(3) for j in range(3) if k != j])
    for eps_d in (0.05, 0.2):
        c = G + (1 + eps_d) * DECAY * W
        exact = relaxation_minimum(c, U, np.zeros(2), np.ones(2), eps_d)
        floor = residual_floor(model, X, y, eps_d, box=box, weight_decay=DECAY, tolerance=1e-6, iterations=200000)
        assert floor.floor <= exact * (1 + 1e-6) and floor.relaxed >= exact * (1 - 1e-6)
        assert floor.floor == pytest.approx(exact, rel=2e-3)
        assert floor.clean == pytest.approx(float(np.linalg.norm(c)), rel=1e-6)


def test_the_floor_vanishes_where_the_box_programme_says_it_can(digits):
    s, clean, box = digits
    target = GradPC(1.0).generate(clean, s.x_train, s.y_train)
    X, y = s.x_train, s.y_train
    tau = box_threshold(target, X, y, box=box, weight_decay=DECAY)
    assert 0 < tau < 1
    assert residual_floor(target, X, y, 2 * tau, box=box, weight_decay=DECAY).floor == 0.0
    below = residual_floor(target, X, y, tau / 2, box=box, weight_decay=DECAY)
    assert below.floor > 0 and below.relaxed > 0


def test_bad_input_is_refused(digits):
    s, clean, box = digits
    with pytest.raises(PoisonReachError, match="eps_d"):
        residual_floor(clean, s.x_train, s.y_train, -0.1, box=box)
    nn_model = models.create("nn", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    with pytest.raises(PoisonReachError, match="linear model"):
        residual_floor(nn_model, s.x_train, s.y_train, 0.1, box=box)
