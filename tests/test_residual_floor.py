"""The residual floor (``reachability.residual_floor``): a certified lower bound of Gradient
Canceling's ‖r‖ at a budget, for a linear model and poisons in a box.

- it is a lower bound: no poisons drawn in the box, and none Gauss–Newton finds, leave a smaller
  residual, computed here by autograd on clean ∪ poisons (weak duality);
- it lies between the relaxation's minimum and that minimum with the bounds a ≤ ⟨h, p − e_y⟩ ≤ b
  over the box added, both computed on a problem small enough for a direct solver (SLSQP over the
  relaxation's masses and feature sums, written out here); where the bounds rule out every budget
  in the box, they lift the floor above the relaxation's;
- it vanishes exactly where the box programme says the residual can (``box_threshold``), and is
  positive below;
- ``poisonreach run`` records it beside GC's residual, never above it, and fills it into a result
  written without it; ``poisonreach audit`` reports it per target and ε_d.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import json

from poisonreach import data, io, models, training
from poisonreach.attacks import GaussNewtonCanceling
from poisonreach.errors import PoisonReachError
from poisonreach.reachability import box_threshold, floor_threshold, residual_floor, sharpened_threshold
from poisonreach.experiments.audit import audit, format_audit
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.run import format_table, run
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
        assert 0 < floor.floor <= floor.clean and floor.relaxed <= floor.clean
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


def relaxation_minimum(c: np.ndarray, U: np.ndarray, lo: np.ndarray, hi: np.ndarray, eps_d: float, W=None, bounds=None) -> float:
    """min ‖c + ε_d·v‖, v = Σ_u u ⊗ (β_u, α_u) over α ≥ 0, Σ α ≤ 1, α_u·lo ≤ β_u ≤ α_u·hi: the relaxation
    written in its primal variables, solved by SLSQP; with ``W`` and ``bounds`` = (a, b) also
    a ≤ ⟨W, v⟩ ≤ b (each poison's ⟨h, p − e_y⟩ is in [a, b], so their mean is)."""
    P, d = U.shape[0], len(lo)

    def v(z):
        beta, alpha = z[: P * d].reshape(P, d), z[P * d:]
        return U.T @ np.concatenate([beta, alpha[:, None]], 1)

    cons = [{"type": "ineq", "fun": lambda z: 1 - z[P * d:].sum()}]
    for u in range(P):
        cons.append({"type": "ineq", "fun": lambda z, u=u: z[u * d:(u + 1) * d] - z[P * d + u] * lo})
        cons.append({"type": "ineq", "fun": lambda z, u=u: z[P * d + u] * hi - z[u * d:(u + 1) * d]})
    if bounds is not None:
        cons.append({"type": "ineq", "fun": lambda z: float(np.vdot(W, v(z))) - bounds[0]})
        cons.append({"type": "ineq", "fun": lambda z: bounds[1] - float(np.vdot(W, v(z)))})
    for start in (np.zeros(P * (d + 1)), np.full(P * (d + 1), 0.5 / P)):  # SLSQP's stopping test can stall at one start
        found = minimize(lambda z: 0.5 * float(((c + eps_d * v(z)) ** 2).sum()), start, method="SLSQP", constraints=cons,
                         bounds=[(None, None)] * (P * d) + [(0, None)] * P, options={"ftol": 1e-14, "maxiter": 1000})
        if found.success:
            break
    assert found.success, found.message
    return float(np.sqrt(2 * found.fun))


def small_problem(seed: int) -> tuple:
    """A 2-feature, 3-class linear target far from the clean minimiser, and what the SLSQP
    relaxation needs: c(ε_d) as a function, the directions U, W̄ and the bounds (a, b) on
    ⟨h, p − e_y⟩ found on a fine grid of the box and every label (inside the true range, so the
    constraint they give is tighter and its minimum no smaller than the true one)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(60, 2, generator=gen)
    y = torch.randint(0, 3, (60,), generator=gen)
    model = models.create("lr", (2,), 3, seed=seed)
    head = models.last_linear(model)
    with torch.no_grad():
        head.weight.mul_(4.0)
    W = torch.cat([head.weight, head.bias[:, None]], 1).detach().double().numpy()
    loss = torch.nn.functional.cross_entropy(model(X), y)
    G = torch.autograd.grad(loss, [head.weight, head.bias])
    G = torch.cat([G[0], G[1][:, None]], 1).double().numpy()
    U = np.stack([np.eye(3)[k] - np.eye(3)[j] for k in range(3) for j in range(3) if k != j])
    grid = torch.stack(torch.meshgrid(torch.linspace(0, 1, 201), torch.linspace(0, 1, 201), indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        h = model(grid).double()
    inner = torch.stack([(h * (torch.softmax(h, 1) - torch.eye(3, dtype=torch.float64)[k])).sum(1) for k in range(3)])
    return model, X, y, (lambda eps_d: G + (1 + eps_d) * DECAY * W), U, W, (float(inner.min()), float(inner.max()))


@pytest.mark.parametrize("seed", range(3))
def test_the_floor_lies_between_the_relaxations_minima(seed):
    model, X, y, c, U, W, bounds = small_problem(seed)
    box, lo, hi = (0.0, 1.0), np.zeros(2), np.ones(2)
    for eps_d in (0.05, 0.2):
        loose = relaxation_minimum(c(eps_d), U, lo, hi, eps_d)
        tight = relaxation_minimum(c(eps_d), U, lo, hi, eps_d, W, bounds)
        floor = residual_floor(model, X, y, eps_d, box=box, weight_decay=DECAY, tolerance=1e-6, iterations=200000)
        assert loose * (1 - 2e-3) <= floor.floor <= tight * (1 + 1e-6)
        assert floor.relaxed >= loose * (1 - 1e-6)  # an iterate of the relaxation without the bounds on ⟨h, p − e_y⟩
        assert floor.clean == pytest.approx(float(np.linalg.norm(c(eps_d))), rel=1e-6)
        # ``uniform`` bounds every smaller budget's minimum, and is the floor's own bound where it is tight
        assert 0 < floor.uniform <= floor.floor
        for smaller in (0.0, eps_d / 4, eps_d / 2, eps_d):
            assert floor.uniform <= relaxation_minimum(c(smaller), U, lo, hi, smaller, W, bounds) * (1 + 1e-6)


def first_budget(minimum, level: float, high: float = 8.0) -> float:
    """The least ε_d in (0, high] with minimum(ε_d) ≤ level to 1%, by bisection on log ε_d (the
    relaxations' minima are convex in ε_d: where they are at most ``level`` is an interval)."""
    assert minimum(high) <= level < minimum(1e-4)
    low = 1e-4
    while high > low * 1.01:
        middle = math.sqrt(low * high)
        low, high = (middle, high) if minimum(middle) > level else (low, middle)
    return high


@pytest.mark.parametrize("seed", range(2))
def test_the_floor_threshold_lies_between_the_relaxations_budgets(seed):
    model, X, y, c, U, W, bounds = small_problem(seed)
    lo, hi = np.zeros(2), np.ones(2)
    found = floor_threshold(model, X, y, 0.1, box=(0.0, 1.0), weight_decay=DECAY, precision=0.01, iterations=200000)
    assert found.residual == pytest.approx(0.1 * float(np.linalg.norm(c(0.0))), rel=1e-6)  # G by float32 autograd here
    assert found.forbidden < found.tau <= found.forbidden * 1.01 and found.evaluations > 2
    # the relaxation with the bounds first reaches δ at or after ``forbidden`` (certified); the one
    # without them no later than ``tau`` (the floor is above that relaxation's minimum only where the
    # bounds bind, and comes within 2e-3 of it)
    tight = first_budget(lambda e: relaxation_minimum(c(e), U, lo, hi, e, W, bounds), found.residual)
    loose = first_budget(lambda e: relaxation_minimum(c(e), U, lo, hi, e), found.residual * (1 - 2e-3))
    assert found.forbidden <= tight
    if seed == 0:  # weight decay makes the minimum rise again past ε_d ≈ 4: the floor at 8 is no bound at 4, ``uniform`` is
        at_four, late = relaxation_minimum(c(4.0), U, lo, hi, 4.0, W, bounds), residual_floor(model, X, y, 8.0, box=(0.0, 1.0), weight_decay=DECAY)
        assert late.uniform <= at_four < late.floor
    assert loose <= found.tau * 1.01
    # a smaller share needs more poison
    assert floor_threshold(model, X, y, 0.02, box=(0.0, 1.0), weight_decay=DECAY).forbidden >= found.forbidden


def test_the_floor_threshold_reads_its_own_floors(digits):
    s, clean, box = digits
    target = GradPC(1.0).generate(clean, s.x_train, s.y_train)
    X, y = s.x_train, s.y_train
    found = floor_threshold(target, X, y, 0.1, box=box, weight_decay=DECAY)
    assert 0 < found.forbidden < found.tau <= found.forbidden * 1.02
    below = residual_floor(target, X, y, found.forbidden, box=box, weight_decay=DECAY, tolerance=0.0, decide=found.residual)
    above = residual_floor(target, X, y, found.tau, box=box, weight_decay=DECAY, tolerance=0.0, decide=found.residual)
    assert below.uniform > found.residual and not above.uniform > found.residual
    # out of reach of any budget searched, and reachable from the start
    assert floor_threshold(target, X, y, 0.1, box=box, weight_decay=DECAY, eps_max=found.forbidden).tau == math.inf
    assert floor_threshold(target, X, y, 0.1, box=box, weight_decay=DECAY, eps_min=found.tau).forbidden == 0.0
    for bad, match in (({"ratio": 0.0}, "ratio"), ({"ratio": 1.0}, "ratio"), ({"ratio": 0.1, "eps_max": 1e-5}, "eps_max")):
        with pytest.raises(PoisonReachError, match=match):
            floor_threshold(target, X, y, box=box, **bad)


def test_the_bounds_on_the_logits_lift_the_floor_between_the_two_programmes(digits):
    s, clean, box = digits
    target = GradPC(1.25).generate(clean, s.x_train, s.y_train)
    X, y = s.x_train, s.y_train
    sharp = sharpened_threshold(target, X, y, box=box, weight_decay=DECAY)
    # at ε_d = 0.3 the relaxation alone can cancel r, not with the bounds a ≤ ⟨h, p − e_y⟩ ≤ b
    assert box_threshold(target, X, y, box=box, weight_decay=DECAY) < 0.3 < sharp.tau_lp
    assert residual_floor(target, X, y, 0.3, box=box, weight_decay=DECAY).floor > 0


def test_the_floor_vanishes_where_the_box_programme_says_it_can(digits):
    s, clean, box = digits
    target = GradPC(1.0).generate(clean, s.x_train, s.y_train)
    X, y = s.x_train, s.y_train
    sharp = sharpened_threshold(target, X, y, box=box, weight_decay=DECAY)  # the box programme with the bounds a, b
    tau = box_threshold(target, X, y, box=box, weight_decay=DECAY, bounds=(sharp.infimum, sharp.supremum))
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


def test_a_run_records_the_floor_beside_gcs_residual(tmp_path):
    config = RunConfig(dataset="digits", train_size=300, eps_w=2.0, eps_d=[0.03, 0.3], attack="gc", attack_options={"iterations": 4},
                       protocol="converged")
    out = tmp_path / "run"
    metrics = run(config, out)
    for r in metrics["results"]:
        # certified: GC's own residual (same box, same weight decay, float32 sums) is never below it
        assert r["residual_floor"] <= r["grad_norm_final"] * (1 + 1e-5)
        assert r["residual_floor_ratio"] == pytest.approx(r["residual_floor"] / r["grad_norm_initial"])
        assert r["residual_floor_ratio"] <= r["grad_norm_ratio"] * (1 + 1e-5)
    assert metrics["results"][0]["residual_floor"] > 0  # this target is out of reach at ε_d = 0.03
    assert "floor/initial" in format_table(metrics)
    # a result written before the floor existed gets it, and nothing is retrained
    cell = out / "eps_d=0.03"
    entry = io.read_json(cell / "result.json")
    io.write_json(cell / "result.json", {k: v for k, v in entry.items() if not k.startswith("residual_floor")})
    stamp = (cell / "retrained_model.pt").stat().st_mtime_ns
    again = run(config, out)
    assert again["results"][0] == metrics["results"][0] and (cell / "retrained_model.pt").stat().st_mtime_ns == stamp


def test_no_floor_where_it_bounds_nothing(tmp_path):
    # unbounded poisons: every residual can be approached, no floor is claimed
    config = RunConfig(dataset="digits", train_size=200, eps_w=1.0, eps_d=[0.1], attack="gc", attack_options={"iterations": 2, "box": None},
                       protocol="converged")
    (result,) = run(config, tmp_path / "unbounded")["results"]
    assert "residual_floor" not in result and "floor/initial" not in format_table(io.read_json(tmp_path / "unbounded" / "metrics.json"))


def test_the_audit_reports_the_floor_per_target_and_budget(tmp_path):
    config = RunConfig(dataset="digits", train_size=300, eps_d=[0.01, 1.0], protocol="converged")
    record = audit(config, tmp_path / "audit", eps_w=[0.25, 2.0], frontier=False, construction=False)
    for t in record["targets"]:
        assert [f["eps_d"] for f in t["floors"]] == [0.01, 1.0]
        for f in t["floors"]:
            assert 0 <= f["floor"] <= f["clean"] and f["relaxed"] <= f["clean"] and f["floor_ratio"] == pytest.approx(f["floor"] / f["clean"])
    # the small step ε_w = 0.25 is within reach of all the data's budget, ε_w = 2 not of a hundredth of it
    assert record["targets"][0]["floors"][1]["floor"] == 0.0 and record["targets"][1]["floors"][0]["floor"] > 0
    # the budget to a tenth: certified below ``forbidden``, found to 2%, and where the floors say so
    for t in record["targets"]:
        tenth = t["floor_threshold"]
        assert tenth["ratio"] == 0.1 and 0 < tenth["forbidden"] < tenth["tau"] <= 1.02 * tenth["forbidden"]
        for f in t["floors"]:
            if f["floor"] > tenth["residual"]:
                assert f["eps_d"] < tenth["tau"]
    assert record["targets"][0]["floor_threshold"]["tau"] < record["targets"][1]["floor_threshold"]["forbidden"]  # the larger step needs more
    assert "tau to 1/10" in format_audit(record)
    assert "residual floor" in (tmp_path / "audit" / "audit.md").read_text()
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["targets"][0]["floors"] == record["targets"][0]["floors"]


def test_the_mixed_bound_is_the_best_along_its_directions():
    from poisonreach.reachability import _mixed_bound

    rng = np.random.default_rng(0)
    t = np.concatenate([-np.logspace(-4, 6, 4000), [0.0], np.logspace(-4, 6, 4000)])
    for _ in range(50):
        r, W, c = rng.normal(size=(3, 4, 5))
        alpha, (a, b) = float(np.vdot(r, c)) - abs(rng.normal()), np.sort(rng.normal(size=2))
        beta = np.where(t >= 0, np.vdot(W, c) + 0.3 * a, np.vdot(W, c) + 0.3 * b)
        along = (alpha + beta * t) / np.linalg.norm(r[None] + t[:, None, None] * W[None], axis=(1, 2))
        got, at = _mixed_bound(alpha, float(np.vdot(W, c) + 0.3 * a), float(np.vdot(W, c) + 0.3 * b), float(np.vdot(r, r)),
                               float(np.vdot(r, W)), float(np.vdot(W, W)))
        assert along.max() <= got + 1e-9 and got <= along.max() + 1e-4 * (1 + abs(got))
        # the t it returns is where that bound is attained (±inf: the scalar condition, U = ±W̄)
        beta_at = np.vdot(W, c) + 0.3 * (a if at >= 0 else b)
        value = np.sign(at) * beta_at / np.linalg.norm(W) if np.isinf(at) else (alpha + beta_at * at) / np.linalg.norm(r + at * W)
        assert value == pytest.approx(got, rel=1e-9, abs=1e-12)
