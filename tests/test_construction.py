"""The constructive poisons of Theorems 5/6 (``attacks/construction.py``).

- on the binary linear sets (or2d, gaussian10) a target with τ ≤ ε_d is reached exactly, and the
  victim retrained to convergence on clean ∪ constructed poisons predicts as the target does;
- the poisons' pixels, put through the real model, give the residual the solver reports (the
  subspace and the inverse normalisation are right);
- below τ the residual cannot vanish (τ is necessary); a model that is not linear is refused.
"""

from __future__ import annotations

import pytest
import torch

from poisonreach import data, models, training
from poisonreach.attacks import Construction
from poisonreach.errors import PoisonReachError
from poisonreach.gradients import flat_norm, gradient_sum, select_parameters
from poisonreach.losses import resolve
from poisonreach.targets import GradPC

DECAY = 1e-3


def converged(name: str, eps_w: float):
    s = data.load(name, seed=0)
    model = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.minimize(model, s.x_train, s.y_train, weight_decay=DECAY, progress=False)
    return s, GradPC(eps_w).generate(model, s.x_train, s.y_train)


def stationarity(target, X, y, result) -> float:
    """‖g(µ) + (m/n)·g(ν̂) + (n+m)/n·λw‖ of the last layer, from the poisons' pixels."""
    params = select_parameters(target, "last")
    loss = resolve(1 if target.head.out_features == 1 else target.head.out_features, y, None)
    n, m = len(X), len(result.x)
    g = [a + b + DECAY * (n + m) * p.detach() for a, b, p in zip(
        gradient_sum(target, params, X, y, loss, chunk_size=512, device=torch.device("cpu")),
        gradient_sum(target, params, result.x, result.y, loss, chunk_size=512, device=torch.device("cpu")), params)]
    return flat_norm(g) / n


@pytest.mark.parametrize("name", ["or2d", "gaussian10"])
def test_a_target_with_tau_below_eps_d_is_reached_exactly(name):
    s, target = converged(name, 0.5)
    result = Construction(0.1, weight_decay=DECAY, progress=False).poison(target, s.x_train, s.y_train)
    assert result.tau <= 0.1
    history = result.grad_norm_history
    assert history[-1] <= 1e-6 * history[0]
    assert result.y.dtype == torch.int64 and len(result.x) == round(0.1 * len(s.x_train))
    # the pixels, through the real model, cancel the clean gradient as the solver says
    assert stationarity(target, s.x_train, s.y_train, result) == pytest.approx(history[-1], rel=1e-2, abs=1e-6 * history[0])
    victim = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=1)
    training.minimize(victim, *result.mixed(s.x_train, s.y_train), weight_decay=DECAY, progress=False)
    assert training.agreement(victim, target, s.x_test) == 100.0


def test_below_tau_the_residual_stays_and_at_tau_it_vanishes():
    s, target = converged("gaussian10", 2.0)
    below = Construction(0.1, weight_decay=DECAY, progress=False).poison(target, s.x_train, s.y_train)
    assert below.tau > 0.1  # τ is necessary: no construction can cancel the gradient here
    assert below.grad_norm_history[-1] > 0.1 * below.grad_norm_history[0]
    above = Construction(1.0, weight_decay=DECAY, progress=False).poison(target, s.x_train, s.y_train)
    assert above.grad_norm_history[-1] <= 1e-6 * above.grad_norm_history[0]


def test_the_features_of_a_linear_model_are_inverted_and_others_refused():
    s = data.load("digits", seed=0)
    lr = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    scale, shift = models.affine_features(lr, s.input_shape, torch.device("cpu"))
    x = torch.rand(3, *s.input_shape)
    torch.testing.assert_close(models.features(lr, x).double(), scale * x.flatten(1).double() + shift, rtol=1e-5, atol=1e-5)
    nn_model = models.create("nn", s.input_shape, s.num_classes, seed=0)
    with pytest.raises(PoisonReachError, match="needs a linear model"):
        Construction(0.1, progress=False).poison(nn_model, s.x_train, s.y_train)
