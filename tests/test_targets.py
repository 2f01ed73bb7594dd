"""Target parameters: GradPC and RandomPC (Sun et al. 2020), scaling (appendix C.6) and the
distance to a target (appendix D's selection: ``test_selection.py``).

Expected values are computed here from the definitions: perturbation norms from the parameters
themselves, the first GradPC step from an autograd gradient, τ of a scaled LR from its logits.

Constructor validation, repr and config: ``test_generator_contract.py``.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from scipy.special import lambertw

from poisonreach import data, models, training
from poisonreach.errors import PoisonReachError
from poisonreach.losses import cross_entropy
from poisonreach.reachability import threshold
from poisonreach.targets import GradPC, RandomPC, parameter_distance, scale_target


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before) -> bool:
    return all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def mean_ce(model, X, y) -> float:
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model(X), y))


OR_PROTOCOL = dict(epochs=300, optimizer="sgd", lr=1.0, momentum=0.9, gamma=1.0, batch_size=10_000, seed=0, progress=False)


@pytest.fixture(scope="module")
def or2d():
    s = data.load("or2d", seed=0)
    model = training.train(models.create("lr", (2,), 2, seed=0), s.x_train, s.y_train, **OR_PROTOCOL)
    return s, model


def test_the_clean_models(digits_lr, or2d):
    s, model = digits_lr
    assert training.accuracy(model, s.x_val, s.y_val) > 90  # observed 92.6
    s2, lr = or2d
    assert training.accuracy(lr, s2.x_train, s2.y_train) == 100.0
    assert training.accuracy(lr, s2.x_val, s2.y_val) > 95  # observed 98.3 (one noisy corner point)


# --------------------------------------------------------------------------------------------------
# GradPC
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_w", [0.5, 1.0, 2.0])
def test_gradpc_absolute_radius_reduces_accuracy_and_raises_the_loss(digits_lr, eps_w):
    s, model = digits_lr
    before = snapshot(model)
    target = GradPC(eps_w).generate(model, s.x_train, s.y_train)
    assert target is not model and unchanged(model, before)
    # the perturbation lies on the sphere of radius ε_w (the ball is reached within ten steps of ε_w/10)
    assert float((flat(target) - flat(model)).norm()) == pytest.approx(eps_w, abs=1e-5)
    # ascent: higher training loss, lower validation accuracy (observed 92.6 → 74 / 49 / 15 %)
    assert mean_ce(target, s.x_train, s.y_train) > mean_ce(model, s.x_train, s.y_train) + 0.2
    assert training.accuracy(target, s.x_val, s.y_val) < training.accuracy(model, s.x_val, s.y_val) - 10
    assert not target.training


def test_gradpc_relative_radius(digits_lr):
    s, model = digits_lr
    target = GradPC(0.1, eps_w_mode="relative").generate(model, s.x_train, s.y_train)
    radius = 0.1 * float(flat(model).norm())
    assert float((flat(target) - flat(model)).norm()) == pytest.approx(radius, abs=1e-5)
    assert radius != pytest.approx(0.1, abs=1e-2)  # the two modes really differ here (‖w‖ ≈ 3.7)


def test_gradpc_lowers_accuracy_on_or2d(or2d):
    s, model = or2d
    # 140 points in batches of 8: 18 steps of ε_w/10, enough to reach the sphere
    target = GradPC(10.0, batch_size=8).generate(model, s.x_train, s.y_train)
    assert float((flat(target) - flat(model)).norm()) == pytest.approx(10.0, abs=1e-4)
    assert training.accuracy(target, s.x_val, s.y_val) < 90  # observed 75 %
    with torch.no_grad():
        lt = torch.nn.functional.binary_cross_entropy_with_logits(target(s.x_train).reshape(-1), s.y_train.float())
        lm = torch.nn.functional.binary_cross_entropy_with_logits(model(s.x_train).reshape(-1), s.y_train.float())
    assert lt > lm


def test_gradpc_first_step_is_the_normalised_gradient(digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:200], s.y_train[:200]
    # one full batch, one epoch: exactly one step of size ε_w/10 along ∇L/‖∇L‖, from autograd here
    params = list(model.parameters())
    grads = torch.autograd.grad(cross_entropy(model(X), y).mean(), params)
    g = torch.cat([t.double().reshape(-1) for t in grads])
    target = GradPC(3.0, batch_size=len(X)).generate(model, X, y)
    torch.testing.assert_close(flat(target) - flat(model), 0.3 * g / g.norm(), rtol=1e-4, atol=1e-6)
    # a step larger than the radius is projected back onto the sphere
    big = GradPC(0.05, step_size=1.0, batch_size=len(X)).generate(model, X, y)
    torch.testing.assert_close(flat(big) - flat(model), 0.05 * g / g.norm(), rtol=1e-4, atol=1e-6)


def test_gradpc_is_deterministic_per_seed(digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:300], s.y_train[:300]
    a = GradPC(1.0, batch_size=32, seed=1).generate(model, X, y)
    b = GradPC(1.0, batch_size=32, seed=1).generate(model, X, y)
    c = GradPC(1.0, batch_size=32, seed=2).generate(model, X, y)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))


# --------------------------------------------------------------------------------------------------
# RandomPC
# --------------------------------------------------------------------------------------------------


def test_randompc_norm_and_determinism(digits_lr):
    s, model = digits_lr
    before = snapshot(model)
    a = RandomPC(0.7, seed=3).generate(model)
    assert unchanged(model, before)
    assert float((flat(a) - flat(model)).norm()) == pytest.approx(0.7, abs=1e-5)
    rel = RandomPC(0.2, eps_w_mode="relative", seed=3).generate(model)
    assert float((flat(rel) - flat(model)).norm()) == pytest.approx(0.2 * float(flat(model).norm()), abs=1e-5)
    b = RandomPC(0.7, seed=3).generate(model, s.x_train, s.y_train)
    c = RandomPC(0.7, seed=4).generate(model)
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    # the same direction for both modes and seeds: only the radius differs
    da, dr = flat(a) - flat(model), flat(rel) - flat(model)
    torch.testing.assert_close(da / da.norm(), dr / dr.norm(), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# scale_target (appendix C.6) and parameter_distance
# --------------------------------------------------------------------------------------------------


def test_scale_target_keeps_predictions_and_scales_the_logits(digits_lr):
    s, model = digits_lr
    before = snapshot(model)
    half = scale_target(model, 0.5)
    assert unchanged(model, before)
    with torch.no_grad():
        torch.testing.assert_close(half(s.x_val), 0.5 * model(s.x_val), rtol=1e-5, atol=1e-6)
    assert training.accuracy(half, s.x_val, s.y_val) == training.accuracy(model, s.x_val, s.y_val)
    for factor in (0, -1.0, math.nan):
        with pytest.raises(PoisonReachError):
            scale_target(model, factor)


def or2d_tau_by_hand(model, X, y, factor):
    """τ of the LR whose logits are factor·h: mean of t·l'(t) over margins t = ±factor·h, / W(1/e)."""
    with torch.no_grad():
        h = factor * model(X).double().reshape(-1).numpy()
    t = np.where(y.numpy() == 1, h, -h)
    inner = float(np.mean(-t / (1 + np.exp(t))))
    return inner, max(inner / float(lambertw(1 / math.e).real), 0.0)


def test_scaling_an_lr_target_on_or2d_lowers_tau(or2d):
    s, model = or2d
    X, y = s.x_train, s.y_train
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.head.weight.neg_()
        flipped.head.bias.neg_()
    taus = []
    for factor in (0.1, 0.05, 0.025):
        scaled = scale_target(flipped, factor)
        assert training.accuracy(scaled, X, y) == 0.0  # every point on the wrong side, at every scale
        inner, tau = or2d_tau_by_hand(flipped, X, y, factor)
        got = threshold(scaled, X, y)
        assert got.inner == pytest.approx(inner, rel=1e-5)
        assert got.tau == pytest.approx(tau, rel=1e-5)
        taus.append(got.tau)
    assert taus[0] > taus[1] > taus[2] > 0  # halving w lowers τ (observed 2.80, 1.19, 0.46)
    assert taus[1] < taus[0] / 2  # and by more than half here


def test_parameter_distance_by_hand():
    a = models.create("lr", (3,), 2, seed=0)
    b = models.create("lr", (3,), 2, seed=1)
    wa, wb = flat(a), flat(b)
    assert parameter_distance(a, b) == pytest.approx(float((wa - wb).norm() / wb.norm()), rel=1e-6)
    assert parameter_distance(b, b) == 0.0
    with pytest.raises(PoisonReachError):
        parameter_distance(a, models.create("lr", (4,), 2))


def test_fixed_target_sets_the_last_layer_and_keeps_the_rest():
    from poisonreach.targets import FixedTarget

    model = models.create("nn", (1, 4, 4), 2, mean=0.5, std=0.25, seed=0)
    head = models.last_linear(model)
    weight = torch.arange(head.weight.numel(), dtype=torch.float32).view_as(head.weight).tolist()
    target = FixedTarget(weight, bias=[0.5, -0.5]).generate(model)
    assert torch.equal(models.last_linear(target).weight, torch.tensor(weight))
    assert models.last_linear(target).bias.tolist() == [0.5, -0.5]
    assert torch.equal(models.last_linear(model).weight, head.weight)  # the clean model is untouched
    body = [n for n, _ in model.named_parameters() if not n.startswith("head")]
    assert all(torch.equal(dict(target.named_parameters())[n], dict(model.named_parameters())[n]) for n in body)
    with pytest.raises(PoisonReachError, match="the target weight has 3 values"):
        FixedTarget([1.0, 2.0, 3.0]).generate(model)


def test_fixed_target_from_the_command_line(tmp_path, capsys):
    from poisonreach.cli import main

    code = main(["tau", "--dataset", "or2d", "--target", "fixed", "--target-option", "weight=[[-2, -2]]", "--target-option", "bias=[1]", "--json"])
    assert code == 0
    record = json.loads(capsys.readouterr().out)
    # OR data: the target predicts 0 where the label is 1 and 1 where it is 0; τ is finite and positive
    assert 0 < record["tau"] < float("inf")
