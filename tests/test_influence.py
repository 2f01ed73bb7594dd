"""The influence defense (Koh and Liang 2017).

- the damped Hessian-vector products equal central finite differences of the gradient;
- the self-influence gᵀ(H + λI)⁻¹g of every solver equals one computed in the test from a dense
  torch.autograd.functional Hessian and per-sample Jacobian; CG and (full-batch and sampled) LiSSA
  agree with ``exact``;
- score/n predicts the change of a point's own loss under leave-one-out retraining of an
  L2-regularised logistic regression trained to convergence by Newton's method;
- the defense removes planted mislabelled outliers; seeds, errors.

Constructor validation, repr and get_params: ``test_defense_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from poisonreach import models, training
from poisonreach.defenses.influence import EXACT_MAX_PARAMETERS, DampedHessian, Influence
from poisonreach.gradients import conjugate_gradient
from poisonreach.errors import PoisonReachError
from poisonreach.gradients import select_parameters
from poisonreach.losses import cross_entropy, squared

CPU = torch.device("cpu")


class TanhNet(nn.Module):
    def __init__(self, d, out):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 5), nn.Tanh())
        self.head = nn.Linear(5, out)

    def forward(self, x):
        return self.head(self.body(x))


def tanh_net(d=3, out=3, seed=0):
    torch.manual_seed(seed)
    return TanhNet(d, out).double()


def flat(model):
    """The mean loss as a function of the flattened parameters, built without the library."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def per_sample(t, X, y, loss):
        values = dict(zip(names, [v.reshape(s) for v, s in zip(t.split([s.numel() for s in shapes]), shapes)]))
        return loss(functional_call(model, values, (X,)), y)

    return theta, per_sample


def dense_self_influence(model, X, y, loss, damping):
    """gᵢᵀ(H + λI)⁻¹gᵢ from a dense Hessian of the mean loss and the per-sample Jacobian."""
    theta, per_sample = flat(model)
    H = torch.autograd.functional.hessian(lambda t: per_sample(t, X, y, loss).mean(), theta)
    G = torch.autograd.functional.jacobian(lambda t: per_sample(t, X, y, loss), theta)  # (n, P)
    A = H + damping * torch.eye(len(theta), dtype=H.dtype)
    return (G * torch.linalg.solve(A, G.T).T).sum(1)


@pytest.fixture(scope="module")
def lr3():
    """A trained 3-class float64 logistic regression on 60 Gaussian points (P = 15)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(60) % 3
    X = torch.randn(60, 4, generator=g, dtype=torch.float64) + F.one_hot(y, 4).double() * 2
    model = models.create("lr", (4,), 3, seed=0).double()
    training.train(model, X, y, epochs=20, batch_size=16, progress=False)
    return model, X, y


# --------------------------------------------------------------------------------------------------
# the Hessian-vector products and the solvers
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_hvp_matches_finite_differences_of_the_gradient(damping):
    model = tanh_net()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(13, 3, generator=g, dtype=torch.float64)
    y = torch.randint(3, (13,), generator=g)
    params = select_parameters(model, "all")
    V = torch.randn(4, sum(p.numel() for p in params), generator=g, dtype=torch.float64)
    got = DampedHessian(model, params, X, y, cross_entropy, damping=damping, chunk_size=5, device=CPU)(V)
    theta, per_sample = flat(model)

    def gradient(t):
        t = t.clone().requires_grad_(True)
        return torch.autograd.grad(per_sample(t, X, y, cross_entropy).mean(), t)[0]

    h = 1e-5
    fd = torch.stack([(gradient(theta + h * v) - gradient(theta - h * v)) / (2 * h) for v in V]) + damping * V
    torch.testing.assert_close(got, fd, rtol=1e-6, atol=1e-8)
    # the dense matrix, column blocks of any width, against torch.autograd.functional.hessian
    H = torch.autograd.functional.hessian(lambda t: per_sample(t, X, y, cross_entropy).mean(), theta)
    dense = DampedHessian(model, params, X, y, cross_entropy, damping=damping, chunk_size=5, device=CPU).dense(block_size=7)
    torch.testing.assert_close(dense, H + damping * torch.eye(len(theta), dtype=H.dtype), rtol=1e-10, atol=1e-12)
    # the Hessian of a subset is the mean over that subset only
    index = torch.tensor([0, 4, 7])
    sub = DampedHessian(model, params, X, y, cross_entropy, damping=damping, chunk_size=2, device=CPU)(V, index)
    torch.testing.assert_close(sub, DampedHessian(model, params, X[index], y[index], cross_entropy, damping=damping, chunk_size=5, device=CPU)(V))


def test_conjugate_gradient_solves_a_block_of_systems():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(12, 12, generator=g, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(12, dtype=torch.float64)
    B = torch.randn(5, 12, generator=g, dtype=torch.float64)
    B[2] = 0  # a zero right-hand side is solved by x = 0 without dividing by zero
    x, missed = conjugate_gradient(lambda V: V @ A, B, iterations=100, tolerance=1e-12)
    assert missed == 0
    torch.testing.assert_close(x, torch.linalg.solve(A, B.T).T, rtol=1e-8, atol=1e-10)
    _, missed = conjugate_gradient(lambda V: V @ A, B, iterations=2, tolerance=1e-12)
    assert missed == 4  # every non-zero row needs more than two iterations
    with pytest.raises(PoisonReachError, match="damping"):
        conjugate_gradient(lambda V: V @ torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64)), torch.ones(1, 2, dtype=torch.float64), iterations=5, tolerance=1e-12)


@pytest.mark.parametrize("solver", ["exact", "cg"])
@pytest.mark.parametrize("which", ["lr", "tanh-net", "linreg"])
def test_self_influence_equals_a_dense_computation(lr3, solver, which):
    _, X, y = lr3
    model, loss, damping = {
        "lr": (lr3[0], cross_entropy, 0.05),
        "tanh-net": (tanh_net(d=4), cross_entropy, 2.0),  # the untrained net's Hessian is indefinite: damp it
        "linreg": (models.create("linreg", (4,), 1, seed=0).double(), squared, 0.0),  # H = mean of x̃x̃ᵀ
    }[which]
    if which == "linreg":
        y = X @ torch.tensor([1.0, -1.0, 0.5, 2.0], dtype=torch.float64) + y.double()
    result = Influence(0.1, solver=solver, damping=damping, cg_tolerance=1e-12, block_size=7, chunk_size=16, progress=False).filter(model, X, y)
    expected = dense_self_influence(model, X, y, loss, damping)
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-10)
    top = expected.argsort(descending=True)[:6]
    assert sorted(result.removed_indices.tolist()) == sorted(top.tolist())


def test_lissa_agrees_with_exact(lr3):
    model, X, y = lr3
    exact = Influence(0.1, solver="exact", damping=0.1, progress=False).filter(model, X, y).scores
    # full-batch LiSSA is a deterministic Neumann series: it converges to the exact value
    # (the largest eigenvalue of H + 0.1·I is about 1.04 here, the smallest 0.1: 200 steps contract by 1e-7)
    full = Influence(0.1, solver="lissa", damping=0.1, lissa_batch_size=60, lissa_depth=200, lissa_scale=1.2, block_size=60, progress=False).filter(model, X, y).scores
    torch.testing.assert_close(full, exact, rtol=1e-4, atol=1e-8)
    # sampled Hessians: noisy, yet they rank the points like the exact scores
    sampled = Influence(0.1, solver="lissa", damping=0.1, lissa_batch_size=10, lissa_depth=100, lissa_scale=4.0, lissa_repeats=2, block_size=60, seed=0, progress=False)
    a, b = sampled.filter(model, X, y), sampled.filter(model, X, y)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.keep_mask, b.keep_mask)
    other = Influence(**{**sampled.get_params(), "seed": 1}).filter(model, X, y).scores
    assert not torch.equal(a.scores, other)
    assert torch.corrcoef(torch.stack([a.scores, exact]))[0, 1] > 0.95


# --------------------------------------------------------------------------------------------------
# against leave-one-out retraining
# --------------------------------------------------------------------------------------------------


def newton(theta, X, y, weights, damping, steps=30):
    """argmin_θ (1/n) Σ w_j ℓ_j(θ) + (λ/2)‖θ‖² for binary logistic regression, θ = (w₁…w_d, b)."""
    n = len(X)

    def objective(t):
        h = X @ t[:-1] + t[-1]
        losses = -(y * F.logsigmoid(h) + (1 - y) * F.logsigmoid(-h))
        return (weights * losses).sum() / n + 0.5 * damping * (t * t).sum()

    for _ in range(steps):
        grad = torch.autograd.functional.jacobian(objective, theta)
        theta = theta - torch.linalg.solve(torch.autograd.functional.hessian(objective, theta), grad)
    assert float(torch.linalg.vector_norm(torch.autograd.functional.jacobian(objective, theta))) < 1e-12
    return theta


def own_loss(theta, x, y):
    h = x @ theta[:-1] + theta[-1]
    return float(-(y * F.logsigmoid(h) + (1 - y) * F.logsigmoid(-h)))


def test_self_influence_predicts_leave_one_out_retraining():
    g = torch.Generator().manual_seed(0)
    n, damping = 50, 0.05
    y = (torch.arange(n) % 2).double()
    X = torch.randn(n, 3, generator=g, dtype=torch.float64) + 1.5 * y[:, None]
    y[:4] = 1 - y[:4]  # a few mislabelled points: the large influences
    theta = newton(torch.zeros(4, dtype=torch.float64), X, y, torch.ones(n, dtype=torch.float64), damping)
    model = models.create("lr", (3,), 2, seed=0).double()
    with torch.no_grad():
        model.head.weight.copy_(theta[:-1].reshape(1, 3))
        model.head.bias.copy_(theta[-1:])
    scores = Influence(0.1, solver="exact", damping=damping, progress=False).filter(model, X, y.long()).scores
    points = list(range(4)) + list(range(10, 50, 5))
    predicted, actual = [], []
    for i in points:
        weights = torch.ones(n, dtype=torch.float64)
        weights[i] = 0  # removal is upweighting by ε = −1/n (Koh & Liang, section 2.1)
        loo = newton(theta, X, y, weights, damping)
        predicted.append(float(scores[i]) / n)
        actual.append(own_loss(loo, X[i], y[i]) - own_loss(theta, X[i], y[i]))
    predicted, actual = torch.tensor(predicted), torch.tensor(actual)
    assert (actual > 0).all()  # removing a point raises its own loss
    assert torch.corrcoef(torch.stack([predicted, actual]))[0, 1] > 0.99
    relative = (predicted - actual).abs() / actual
    assert relative.max() < 0.25 and relative.median() < 0.1  # first order: the largest influences err most


# --------------------------------------------------------------------------------------------------
# what the defense is for, and its errors
# --------------------------------------------------------------------------------------------------


def test_influence_removes_planted_outliers():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 2
    X = torch.cat([torch.randn(200, 2, generator=g) + 3.0 * y[:, None], torch.randn(10, 2, generator=g) * 0.3 - 6.0])
    y = torch.cat([y, torch.ones(10, dtype=torch.long)])  # deep in class 0's side, labelled 1
    model = training.train(models.create("lr", (2,), 2, seed=0), X, y, epochs=30, batch_size=32, optimizer="sgd", lr=0.1, progress=False)
    for solver in ("exact", "cg"):
        result = Influence(10 / 210, solver=solver, progress=False).filter(model, X, y)
        assert sorted(result.removed_indices.tolist()) == list(range(200, 210))


def test_soft_labels_give_the_scores_of_their_classes(lr3):
    model, X, y = lr3
    hard = Influence(0.1, solver="exact", progress=False).filter(model, X, y)
    soft = Influence(0.1, solver="exact", progress=False).filter(model, X, F.one_hot(y, 3).double())
    torch.testing.assert_close(soft.scores, hard.scores)


def test_an_indefinite_hessian_is_an_error_that_names_the_fix(lr3):
    _, X, y = lr3
    with pytest.raises(PoisonReachError, match="raise damping above"):
        Influence(0.1, solver="exact", damping=0.0, progress=False).filter(tanh_net(d=4), X, y)


def test_exact_refuses_a_large_hessian():
    model = models.create("nn", (2,), 3, seed=0)
    assert sum(p.numel() for p in model.parameters()) > EXACT_MAX_PARAMETERS
    X, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    with pytest.raises(PoisonReachError, match="parameters='last'"):
        Influence(0.25, solver="exact").filter(model, X, y)
    last = Influence(0.25, solver="exact", parameters="last", progress=False).filter(model, X, y)  # 2,355 parameters
    assert last.extra["num_parameters"] == 784 * 3 + 3 and (~last.keep_mask).sum() == 1


def test_auto_takes_exact_for_small_models_and_cg_for_large_ones(lr3):
    model, X, y = lr3
    small = Influence(0.1, progress=False).filter(model, X, y)
    assert small.extra["solver"] == "exact"
    torch.testing.assert_close(small.scores, Influence(0.1, solver="exact", progress=False).filter(model, X, y).scores, rtol=0, atol=0)
    large = models.create("nn", (2,), 3, seed=0)
    large = Influence(0.25, damping=10.0, progress=False).filter(large, torch.randn(4, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0]))
    assert large.extra["solver"] == "cg" and large.extra["num_parameters"] > EXACT_MAX_PARAMETERS


def test_lissa_divergence_is_an_error(lr3):
    model, X, y = lr3
    with pytest.raises(PoisonReachError, match="raise lissa_scale"):
        Influence(0.1, solver="lissa", damping=1.0, lissa_scale=0.01, lissa_depth=200, progress=False).filter(model, X, y)
