"""The converged protocol: models trained to a stationary point of mean loss + λ/2·‖w‖², and the
weight decay λ carried into τ and into the Gradient Canceling problem.

- ``training.minimize`` meets its tolerance (measured by the independent
  ``training_gradient_norm``), is deterministic, finds one minimiser from different starts (the
  objective is strongly convex for a linear model), and warns when it runs out of iterations;
- τ with weight decay against the defining equation inner + ε·(−W) + (1 + ε)·R = 0 solved by
  bisection, and ∞ once the regulariser outweighs what any poison can do;
- a planted target trained to convergence is reached *exactly* by its own poisons once the
  canceling problem carries the regulariser, and not without it;
- RunConfig: the protocol's own options, the weight decay handed to the canceling attacks, and a
  digits run whose victim predicts as the planted target does.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch

from poisonreach import data, models, training
from poisonreach.attacks import GradientCanceling, LabelFlip
from poisonreach.attacks.canceling import canceling_problem
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.run import run
from poisonreach.gradients import flat_norm
from poisonreach.reachability import lambert_w_constant, threshold

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", seed=0)


def fresh(splits, seed=0):
    return models.create("lr", splits.input_shape, splits.num_classes, mean=splits.mean, std=splits.std, seed=seed)


def test_minimize_meets_its_tolerance_and_is_deterministic(digits):
    X, y = digits.x_train, digits.y_train
    a = training.minimize(fresh(digits), X, y, weight_decay=1e-3, tolerance=1e-6, progress=False)
    b = training.minimize(fresh(digits), X, y, weight_decay=1e-3, tolerance=1e-6, progress=False)
    # the float32 copy of the float64 minimiser, measured by an independent function
    assert training.training_gradient_norm(a, X, y, weight_decay=1e-3) <= 2e-6
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    # a mini-batch protocol does not get there: the check can fail
    c = training.train(fresh(digits), X, y, epochs=2, weight_decay=1e-3, progress=False)
    assert training.training_gradient_norm(c, X, y, weight_decay=1e-3) > 1e-3


def test_minimize_finds_the_one_minimiser_from_any_start(digits):
    X, y = digits.x_train, digits.y_train
    a = training.minimize(fresh(digits, seed=0), X, y, weight_decay=1e-2, tolerance=1e-7, progress=False)
    b = training.minimize(fresh(digits, seed=5), X, y, weight_decay=1e-2, tolerance=1e-7, progress=False)
    distance = flat_norm([p - q for p, q in zip(a.parameters(), b.parameters())])
    # strong convexity (modulus λ): ‖w_a − w_b‖ ≤ (‖∇_a‖ + ‖∇_b‖) / λ
    assert distance <= 2e-7 / 1e-2 * 1.5
    assert training.agreement(a, b, digits.x_test) == 100.0


def test_minimize_warns_when_it_runs_out_of_iterations(digits, caplog):
    with caplog.at_level(logging.WARNING, logger="poisonreach.training"):
        training.minimize(fresh(digits), digits.x_train, digits.y_train, max_iterations=3, tolerance=1e-9, progress=False)
    assert "above the tolerance" in caplog.text and "after 3 L-BFGS iterations" in caplog.text


@pytest.mark.parametrize("bad", [dict(weight_decay=-1.0), dict(tolerance=0.0), dict(max_iterations=0), dict(history_size=1.5)])
def test_minimize_checks_its_options(digits, bad):
    with pytest.raises(PoisonReachError, match=next(iter(bad))):
        training.minimize(fresh(digits), digits.x_train, digits.y_train, progress=False, **bad)


def _tau_by_bisection(inner: float, bound: float, shift: float) -> float:
    """The smallest ε ≥ 0 with inner + ε·(−bound) + (1 + ε)·shift ≤ 0, by bisection on [0, 1e6]."""
    f = lambda e: inner - e * bound + (1 + e) * shift  # noqa: E731
    if f(0.0) <= 0:
        return 0.0
    if f(1e6) > 0:
        return math.inf
    lo, hi = 0.0, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if f(mid) <= 0 else (mid, hi)
    return hi


def _bad_target(splits):
    """A model with a far from zero τ: the clean model with a shrunken, sign-flipped last layer."""
    model = training.train(fresh(splits), splits.x_train, splits.y_train, epochs=3, progress=False)
    with torch.no_grad():
        models.last_linear(model).weight.mul_(-0.2)
    return model


@pytest.mark.parametrize("weight_decay", [1e-4, 1e-2])
def test_tau_with_weight_decay_solves_the_stationarity_equation(digits, weight_decay):
    X, y = digits.x_train, digits.y_train
    model = _bad_target(digits)
    plain, decayed = threshold(model, X, y), threshold(model, X, y, weight_decay=weight_decay)
    head = models.last_linear(model)
    shift = weight_decay * float((head.weight.detach().double() ** 2).sum() + (head.bias.detach().double() ** 2).sum())
    assert decayed.inner == plain.inner and decayed.constant["regulariser"] == pytest.approx(shift, rel=1e-12)
    c = digits.num_classes
    assert decayed.tau == pytest.approx(_tau_by_bisection(plain.inner, 0.2784645427610738, shift), rel=1e-9)
    assert decayed.tau_multiclass == pytest.approx(_tau_by_bisection(plain.inner, lambert_w_constant(c), shift), rel=1e-9)
    assert decayed.tau > plain.tau > 0  # the regulariser is one more pull the poisons must cancel


def test_tau_is_infinite_when_the_regulariser_outweighs_every_poison(digits):
    X, y = digits.x_train, digits.y_train
    model = _bad_target(digits)
    head = models.last_linear(model)
    squared = float((head.weight.detach().double() ** 2).sum() + (head.bias.detach().double() ** 2).sum())
    assert threshold(model, X, y, weight_decay=1.0 / squared).tau == math.inf  # R = 1 > W(1/e)


def test_a_converged_planted_target_is_cancelled_exactly_by_its_own_poisons(digits):
    X, y = digits.x_train, digits.y_train
    wd, eps_d = 1e-3, 0.1
    clean = training.minimize(fresh(digits), X, y, weight_decay=wd, tolerance=1e-7, progress=False)
    flips = LabelFlip(eps_d, strategy="least-likely", seed=0).poison(clean, X, y)
    target = training.minimize(fresh(digits), *flips.mixed(X, y), weight_decay=wd, tolerance=1e-7, progress=False)

    def residual_of_flips(weight_decay: float) -> float:
        problem = canceling_problem(GradientCanceling(eps_d, weight_decay=weight_decay), target, X, y, None, CPU)
        assert torch.equal(problem.source, flips.source_indices)  # the same seeded draw of ε_d·n points
        return flat_norm(problem.residual(problem.gradient_sum(flips.x, flips.y)))

    # (1 + ε_d)·‖∇ objective‖: the tolerance the training met, up to float32 rounding
    assert residual_of_flips(wd) <= 1e-5
    # (1 + ε_d)·λ‖w‖ is left over when the regulariser is ignored
    assert residual_of_flips(0.0) > 100 * residual_of_flips(wd)


def test_converged_protocol_options_and_the_weight_decay_handed_to_gc():
    config = RunConfig(protocol="converged", attack="gc", eps_d=[0.1])
    config.validate()
    assert config.weight_decay == 1e-3 and config.make_attacks()[0].weight_decay == 1e-3
    config = RunConfig(protocol="converged", attack="gc", eps_d=[0.1], training={"weight_decay": 0.01},
                       attack_options={"weight_decay": 0.5})
    assert config.make_attacks()[0].weight_decay == 0.5  # the attack's own option wins
    assert RunConfig(training={"weight_decay": 5e-4}, eps_d=[0.1]).make_attacks()[0].weight_decay == 5e-4
    assert RunConfig(attack="labelflip", eps_d=[0.1], training={"weight_decay": 5e-4}).make_attacks()[0].get_params().get("weight_decay") is None
    with pytest.raises(PoisonReachError, match="converged protocol's training takes"):
        RunConfig(protocol="converged", training={"epochs": 3}).validate()
    with pytest.raises(PoisonReachError, match="honest protocol's training takes"):
        RunConfig(training={"tolerance": 1e-5}).validate()


def test_converged_run_reaches_a_planted_digits_target(tmp_path):
    config = RunConfig(dataset="digits", protocol="converged", target="labelflip", eps_d=[0.1], attack="gc",
                       target_options={"strategy": "least-likely", "eps_d": 0.1}, training={"tolerance": 1e-6})
    metrics = run(config, tmp_path)
    entry = metrics["results"][0]
    for key in ("clean_grad_norm", "target_grad_norm"):
        assert metrics[key] <= 2e-6
    assert entry["victim_grad_norm"] <= 2e-6
    assert entry["grad_norm_ratio"] <= 1e-2
    assert entry["target_agreement"] >= 99.0
    assert entry["acc_drop"] > 0
