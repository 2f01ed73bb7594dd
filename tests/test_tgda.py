"""TGDA (Lu, Kamath & Yu 2022): the total-gradient descent-ascent baseline.

- the Hessian-vector product agrees with central differences of gradients; conjugate gradient
  converges to the dense solve, its error decreases, and it stops on negative curvature;
- the total gradient D_θ L = −∂²_{θw} ℓ (∂²_{ww} ℓ + λI)⁻¹ ∂_w L agrees with a dense-Hessian solve
  (multiclass LR, both generators) and with central differences of L(w*(θ)) after solving the
  follower's problem to optimality by Newton's method (implicit function theorem);
- one epoch is the documented leader ascent step followed by the follower's descent step;
- on digits with LR, TGDA lowers the test accuracy of a model retrained on clean ∪ poisons;
- budget, box, labels, determinism, the caller's model left alone, validation of the data.

Constructor validation, repr and get_params: ``test_attack_contract.py``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from reference import ce_loss, flat, logistic_loss

from poisonreach import data, models, training
from poisonreach.attacks.tgda import (
    TGDA,
    AutoencoderGenerator,
    PointsGenerator,
    total_gradient,
)
from poisonreach.gradients import conjugate_gradient, hessian_vector_products
from poisonreach.errors import PoisonReachError
from poisonreach.losses import cross_entropy, logistic

CPU = torch.device("cpu")

# --------------------------------------------------------------------------------------------------
# helpers computed without the library
# --------------------------------------------------------------------------------------------------


def unflatten(vector, like):
    out, i = {}, 0
    for name, t in like.items():
        out[name] = vector[i : i + t.numel()].view_as(t)
        i += t.numel()
    return out


class Problem:
    """A follower, a generator and data, with the follower's loss ℓ(θ, w) and the leader's L(w) as
    functions of flat parameter vectors, for dense derivatives by torch.autograd.functional."""

    def __init__(self, follower, generator, clean, index, labels, validation, loss):
        self.follower, self.generator = follower, generator
        self.clean, self.index, self.labels, self.validation, self.loss = clean, index, labels, validation, loss
        self.w_names = {k: v.detach() for k, v in follower.named_parameters()}
        self.t_names = {k: v.detach() for k, v in generator.named_parameters()}
        self.w0 = flat(self.w_names.values())
        self.t0 = flat(self.t_names.values())

    def follower_loss(self, w, t):
        poisons = functional_call(self.generator, unflatten(t, self.t_names), (self.index,))
        Xc, yc = self.clean
        out = functional_call(self.follower, unflatten(w, self.w_names), (torch.cat([Xc, poisons]),))
        return self.loss(out, torch.cat([yc, self.labels])).mean()

    def leader_objective(self, w):
        Xv, yv = self.validation
        return self.loss(functional_call(self.follower, unflatten(w, self.w_names), (Xv,)), yv).mean()

    def dense_total_gradient(self, w, t, damping):
        """−∂²_{θw} ℓ (∂²_{ww} ℓ + λI)⁻¹ ∂_w L from the full Hessian of ℓ over (w, θ)."""
        p = len(w)
        H = torch.autograd.functional.hessian(lambda v: self.follower_loss(v[:p], v[p:]), torch.cat([w, t]))
        g = torch.autograd.functional.jacobian(self.leader_objective, w)
        u = torch.linalg.solve(H[:p, :p] + damping * torch.eye(p, dtype=w.dtype), g)
        return -H[p:, :p] @ u

    def library_total_gradient(self, damping, cg_iterations, chunk_size=2):
        params = list(self.follower.parameters())
        out = total_gradient(
            self.follower, params, self.generator, self.index, self.labels, self.clean, self.validation,
            cross_entropy if self.loss is ce_loss else logistic,
            cg_iterations=cg_iterations, damping=damping, chunk_size=chunk_size, device=CPU,
        )
        return flat(out)


def points_problem(classes=3, d=3, n=14, m=5, n_val=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Xv = torch.randn(n_val, d, generator=g, dtype=torch.float64)
    Z = torch.rand(m, d, generator=g, dtype=torch.float64)
    k = 2 if classes == 1 else classes
    y, yv, yz = (torch.randint(0, k, (s,), generator=g) for s in (n, n_val, m))
    follower = models.create("lr", (d,), 2 if classes == 1 else classes, seed=1).double().eval()
    return X, y, Xv, yv, Z, yz, follower


def randomise(module, seed):
    """Random weights everywhere, so that every block of the mixed Hessian is non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def make_generator(kind, Z, yz, classes, low=None, high=None):
    if kind == "points":
        return PointsGenerator(Z, low, high)
    torch.manual_seed(0)
    codes = F.one_hot(yz, classes).double()
    return randomise(AutoencoderGenerator(Z, codes, low, high).double(), 3)


# --------------------------------------------------------------------------------------------------
# 1. Hessian-vector products and conjugate gradient
# --------------------------------------------------------------------------------------------------


class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.head = nn.Linear(5, 4)

    def forward(self, x):
        return self.head(self.body(x))


def test_hessian_vector_product_matches_central_differences_of_gradients():
    torch.manual_seed(0)
    model = TinyMLP().double()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(1)
    parts = [
        (torch.randn(7, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (7,), generator=g)),
        (torch.rand(4, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (4,), generator=g)),
    ]
    v = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]

    def grad_sum():
        total = sum(ce_loss(model(X), y).sum() for X, y in parts)
        return flat(torch.autograd.grad(total, params))

    h = 1e-5
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(h * vi)
    plus = grad_sum()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.sub_(2 * h * vi)
    minus = grad_sum()
    with torch.no_grad():
        for p, vi in zip(params, v):
            p.add_(h * vi)
    fd = (plus - minus) / (2 * h)

    # summed part by part, as total_gradient does
    hv = sum(hessian_vector_products(model, params, X, y, cross_entropy, flat(v)[None], chunk_size=3, device=CPU)[0] for X, y in parts)
    assert fd.abs().max() > 1e-3
    torch.testing.assert_close(hv, fd, rtol=1e-6, atol=1e-8)


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    Q = torch.randn(n, n, generator=g, dtype=torch.float64)
    return Q @ Q.T + 0.1 * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def as_parts(vector):
    """A vector of 6 as a (2, 2) and a (2,) tensor, the way parameters come."""
    return [vector[:4].reshape(2, 2), vector[4:]]


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_conjugate_gradient_converges_to_the_dense_solve(damping):
    A, b = spd(6, seed=2)
    solve = torch.linalg.solve(A + damping * torch.eye(6, dtype=torch.float64), b)
    M = A + damping * torch.eye(6, dtype=torch.float64)
    cg = lambda k: conjugate_gradient(lambda rows: rows @ M, b[None], iterations=k, truncate=True)[0][0]  # noqa: E731
    torch.testing.assert_close(cg(6), solve, rtol=1e-8, atol=1e-10)
    # CG minimises the (A + λI)-norm of the error over growing Krylov spaces: it never increases
    errors = []
    for k in range(1, 7):
        e = cg(k) - solve
        errors.append(float(e @ M @ e))
    assert all(b_ <= a_ * (1 + 1e-9) for a_, b_ in zip(errors, errors[1:]))
    assert errors[0] > 1e3 * errors[-1]


def test_conjugate_gradient_stops_on_non_positive_curvature():
    A = torch.diag(torch.tensor([-1.0, 2.0], dtype=torch.float64))
    solve = lambda b: conjugate_gradient(lambda rows: rows @ A, b[None], iterations=5, truncate=True)[0][0]  # noqa: E731
    # the first direction b = e1 has curvature −1: b itself is returned
    torch.testing.assert_close(solve(torch.tensor([1.0, 0.0], dtype=torch.float64)), torch.tensor([1.0, 0.0], dtype=torch.float64))
    # b = (1, 1): α = 2/1, x₁ = (2, 2), r₁ = (3, −3), p₁ = r₁ + 9 b = (12, 6) has curvature −72: stop at x₁
    torch.testing.assert_close(solve(torch.tensor([1.0, 1.0], dtype=torch.float64)), torch.tensor([2.0, 2.0], dtype=torch.float64))
    # a zero right-hand side is solved by zero
    assert torch.equal(solve(torch.zeros(2, dtype=torch.float64)), torch.zeros(2, dtype=torch.float64))


# --------------------------------------------------------------------------------------------------
# 2. the total gradient
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["points", "autoencoder"])
@pytest.mark.parametrize("damping", [0.05, 1.0])
def test_total_gradient_matches_the_dense_hessian_solve(kind, damping):
    X, y, Xv, yv, Z, yz, follower = points_problem()
    randomise(follower, 4)
    generator = make_generator(kind, Z, yz, 3)
    index = torch.tensor([0, 2, 3])  # the batch's poisons: the others must not enter ℓ
    prob = Problem(follower, generator, (X, y), index, yz[index], (Xv, yv), ce_loss)
    dense = prob.dense_total_gradient(prob.w0, prob.t0, damping)
    # 15 follower parameters: CG is exact after 15 iterations (the softmax Hessian is singular: λ > 0)
    lib = prob.library_total_gradient(damping, cg_iterations=15)
    assert dense.abs().max() > 1e-4
    torch.testing.assert_close(lib, dense, rtol=1e-6, atol=1e-9)
    if kind == "points":  # the unused poisons get no gradient
        assert torch.equal(lib.view(5, 3)[[1, 4]], torch.zeros(2, 3, dtype=torch.float64))


def newton(prob, t, iterations=30):
    """w*(θ): the follower's minimiser by Newton's method (strictly convex: binary LR, non-separable)."""
    w = prob.w0.clone()
    for _ in range(iterations):
        g = torch.autograd.functional.jacobian(lambda v: prob.follower_loss(v, t), w)
        H = torch.autograd.functional.hessian(lambda v: prob.follower_loss(v, t), w)
        w = w - torch.linalg.solve(H, g)
    assert g.abs().max() < 1e-12
    return w


@pytest.mark.parametrize("kind", ["points", "autoencoder"])
def test_total_gradient_is_the_derivative_of_the_leader_objective_at_the_best_response(kind):
    """Implicit function theorem: at w = w*(θ), D_θ L = d/dθ L(w*(θ)); checked by central
    differences of θ ↦ L(w*(θ)) along random directions, w* solved by Newton's method."""
    X, y, Xv, yv, Z, yz, follower = points_problem(classes=1, d=2, n=20, m=4)
    generator = make_generator(kind, Z, yz, 2)
    index = torch.arange(4)
    prob = Problem(follower, generator, (X, y), index, yz, (Xv, yv), logistic_loss)
    w_star = newton(prob, prob.t0)
    with torch.no_grad():  # the follower sits at its best response
        for p, v in zip(follower.parameters(), unflatten(w_star, prob.w_names).values()):
            p.copy_(v)
    lib = prob.library_total_gradient(damping=0.0, cg_iterations=3)  # 3 follower parameters
    assert torch.allclose(lib, prob.dense_total_gradient(w_star, prob.t0, 0.0), rtol=1e-8, atol=1e-12)

    g = torch.Generator().manual_seed(5)
    h = 1e-5
    for _ in range(3):
        direction = torch.randn(len(prob.t0), generator=g, dtype=torch.float64)
        up = prob.leader_objective(newton(prob, prob.t0 + h * direction))
        down = prob.leader_objective(newton(prob, prob.t0 - h * direction))
        fd = float((up - down) / (2 * h))
        assert abs(fd) > 1e-5
        assert float(lib @ direction) == pytest.approx(fd, rel=1e-5, abs=1e-10)


# --------------------------------------------------------------------------------------------------
# 3. one epoch, re-derived
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_validation", [True, False])
def test_one_epoch_is_a_leader_ascent_step_then_a_follower_descent_step(with_validation):
    """Full batch, one leader and one follower step: z ← z + lr·D_z L (dense formula), then
    w ← w − lr_f·∇_w ℓ on clean ∪ the new poisons; L on the validation data, or on the clean data."""
    X, y, Xv, yv, _, _, follower = points_problem()
    randomise(follower, 4)
    lr, follower_lr, damping = 0.7, 0.3, 0.1
    attack = TGDA(0.3, epochs=1, leader_lr=lr, follower_lr=follower_lr, follower_steps=1, cg_iterations=15,
                  damping=damping, generator="points", box=None, batch_size=None, progress=False)
    validation = (Xv, yv) if with_validation else None
    r = attack.poison(follower, X, y, validation=validation)
    m = len(r.x)
    assert m == 4  # round(14 · 0.3)
    seeds, labels = X[r.source_indices], y[r.source_indices]
    assert torch.equal(r.y, labels)  # labels are kept
    val = (Xv, yv) if with_validation else (X, y)
    before = Problem(follower, PointsGenerator(seeds, None, None), (X, y), torch.arange(m), labels, val, ce_loss)
    step = before.dense_total_gradient(before.w0, before.t0, damping).view_as(seeds)
    torch.testing.assert_close(r.x, seeds + lr * step, rtol=1e-7, atol=1e-10)

    after = Problem(follower, PointsGenerator(r.x, None, None), (X, y), torch.arange(m), labels, val, ce_loss)
    w1 = before.w0 - follower_lr * torch.autograd.functional.jacobian(lambda w: after.follower_loss(w, after.t0), before.w0)
    history = r.extra
    assert history["leader_objective"] == [
        pytest.approx(float(before.leader_objective(before.w0)), rel=1e-10),
        pytest.approx(float(after.leader_objective(w1)), rel=1e-10),
    ]
    assert history["follower_loss"] == [
        pytest.approx(float(before.follower_loss(before.w0, before.t0)), rel=1e-10),
        pytest.approx(float(after.follower_loss(w1, after.t0)), rel=1e-10),
    ]
    logits = functional_call(follower, unflatten(w1, before.w_names), (val[0],))
    assert history["follower_accuracy"][1] == pytest.approx(100.0 * float((logits.argmax(1) == val[1]).double().mean()))
    assert history["num_validation"] == len(val[0]) and history["num_clean"] == 14 and history["num_poisons"] == 4
    assert r.grad_norm_history == [] and math.isnan(r.tau)


def test_the_autoencoder_starts_at_the_seeds():
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0)
    X, y = s.x_train[:200], s.y_train[:200]
    r = TGDA(0.1, epochs=0, progress=False).poison(model, X, y)
    assert torch.equal(r.x, X[r.source_indices]) and torch.equal(r.y, y[r.source_indices])
    assert len(r.extra["leader_objective"]) == 1


# --------------------------------------------------------------------------------------------------
# 4. the attack on digits
# --------------------------------------------------------------------------------------------------


def retrain(s, X, y):
    """The victim: LR from the same initial weights, trained as the clean model was (the fixture)."""
    model = models.create("lr", s.input_shape, 10, mean=s.mean, std=s.std, seed=0)
    return training.train(model, X, y, epochs=5, batch_size=16, progress=False)


def test_tgda_lowers_the_test_accuracy_of_a_retrained_model(digits_lr):
    s, model = digits_lr
    X, y = s.x_train, s.y_train
    attack = dict(generator="points", leader_lr=1000.0, batch_size=None, pretrain_follower=10, progress=False)
    r = TGDA(0.5, epochs=10, **attack).poison(model, X, y, validation=(s.x_val, s.y_val))
    clean = training.accuracy(retrain(s, X, y), s.x_test, s.y_test)
    poisoned = training.accuracy(retrain(s, *r.mixed(X, y)), s.x_test, s.y_test)
    # observed: clean 91.6 %, poisoned 84.7 %; the leader's validation loss 0.219 → 0.767, the
    # follower's validation accuracy 96.1 % → 78.4 %
    assert poisoned < clean - 4.0
    L = r.extra["leader_objective"]
    assert L[-1] > 2 * L[0]
    assert r.extra["follower_accuracy"][-1] < r.extra["follower_accuracy"][0] - 10.0
    # the control: the same number of unoptimised seed copies does not hurt
    seeds_only = TGDA(0.5, epochs=0, **attack).poison(model, X, y, validation=(s.x_val, s.y_val))
    assert torch.equal(seeds_only.x, X[seeds_only.source_indices])
    assert training.accuracy(retrain(s, *seeds_only.mixed(X, y)), s.x_test, s.y_test) > clean - 1.0


def test_the_autoencoder_leader_raises_its_objective(digits_lr):
    s, model = digits_lr
    attack = TGDA(0.5, epochs=10, leader_lr=1.0, follower_lr=0.5, follower_steps=10, batch_size=None, pretrain_follower=20,
                  progress=False)
    r = attack.poison(model, s.x_train, s.y_train, validation=(s.x_val, s.y_val))
    L, acc = r.extra["leader_objective"], r.extra["follower_accuracy"]
    # observed: validation loss 0.135 → 0.172, follower validation accuracy 97.0 % → 94.9 % (the
    # victim retrained as in the test above: 93.3 %, no drop: TGDA is weak, Table 2 of the paper)
    assert L[-1] > 1.15 * L[0]
    assert acc[-1] < acc[0] - 1.5
    assert r.x.min() >= 0.0 and r.x.max() <= 1.0
    assert not torch.equal(r.x, s.x_train[r.source_indices])


# --------------------------------------------------------------------------------------------------
# 5. budget, box, determinism, the caller's model
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps_d, expected", [(0.1, 14), (0.003, 1), (0.33, 46), (2.0, 280)])
def test_number_of_poisons(eps_d, expected):
    s = data.load("or2d", seed=0)
    X, y = s.x_train, s.y_train
    assert len(X) == 140
    model = models.create("lr", (2,), 2, seed=0)
    r = TGDA(eps_d, epochs=1, follower_steps=1, cg_iterations=2, batch_size=50, progress=False).poison(model, X, y)
    assert len(r.x) == len(r.y) == len(r.source_indices) == expected
    assert r.extra["num_poisons"] == expected and r.extra["num_clean"] == 140
    assert torch.equal(r.y, y[r.source_indices])
    if expected <= 140:
        assert len(set(r.source_indices.tolist())) == expected  # a subsample without repeats
    Xm, ym = r.mixed(X, y)
    assert len(Xm) == len(ym) == 140 + expected


@pytest.mark.parametrize("generator, lr", [("points", 1e4), ("autoencoder", 3.0)])
def test_poisons_stay_in_the_box(generator, lr, digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:300], s.y_train[:300]
    config = dict(epochs=3, generator=generator, leader_lr=lr, batch_size=100, follower_steps=2, cg_iterations=4, progress=False)
    boxed = TGDA(0.2, **config).poison(model, X, y)
    assert boxed.x.min() >= 0.0 and boxed.x.max() <= 1.0
    moved = boxed.x != X[boxed.source_indices]
    assert (moved & ((boxed.x == 0) | (boxed.x == 1))).any()  # the bounds are active
    free = TGDA(0.2, **config, box=None).poison(model, X, y)
    assert free.x.min() < 0.0 or free.x.max() > 1.0  # without the box the same run leaves [0, 1]


def test_a_diverging_leader_is_reported(digits_lr):
    s, model = digits_lr
    attack = TGDA(0.2, epochs=3, leader_lr=30.0, box=None, batch_size=100, follower_steps=2, cg_iterations=4, progress=False)
    with pytest.raises(PoisonReachError, match=r"diverged after epoch [1-3] of 3: .*lower leader_lr"):
        attack.poison(model, s.x_train[:300], s.y_train[:300])


@pytest.mark.parametrize("generator", ["points", "autoencoder"])
def test_data_range_box_keeps_each_feature_within_the_clean_range(generator):
    s = data.load("gaussian10", seed=0)
    X, y = s.x_train[:200], s.y_train[:200]
    model = models.create("lr", (10,), 2, seed=0)
    training.train(model, X, y, epochs=3, progress=False)
    lo, hi = X.min(0).values, X.max(0).values
    config = dict(epochs=3, generator=generator, leader_lr=1e4 if generator == "points" else 30.0, batch_size=None,
                  follower_steps=2, cg_iterations=4, progress=False)
    boxed = TGDA(0.2, box="data-range", **config).poison(model, X, y)
    assert (boxed.x >= lo).all() and (boxed.x <= hi).all()
    free = TGDA(0.2, box=None, **config).poison(model, X, y)
    assert ((free.x < lo) | (free.x > hi)).any()


@pytest.mark.parametrize("generator", ["points", "autoencoder"])
def test_same_seed_same_poisons(generator, digits_lr):
    s, model = digits_lr
    X, y = s.x_train[:300], s.y_train[:300]
    config = dict(epochs=2, generator=generator, leader_lr=5.0, batch_size=64, follower_steps=3, cg_iterations=4, progress=False)
    a = TGDA(0.1, seed=1, **config).poison(model, X, y)
    b = TGDA(0.1, seed=1, **config).poison(model, X, y)
    c = TGDA(0.1, seed=2, **config).poison(model, X, y)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert torch.equal(a.source_indices, b.source_indices)
    assert a.extra == b.extra
    assert not torch.equal(a.source_indices, c.source_indices)
    assert a.extra["leader_objective"] != c.extra["leader_objective"]


def test_poison_leaves_the_callers_model_untouched(digits_lr):
    s, model = digits_lr
    before = copy.deepcopy(model.state_dict())
    model.train()
    try:
        r = TGDA(0.1, epochs=2, leader_lr=5.0, batch_size=100, follower_steps=3, cg_iterations=4, progress=False).poison(
            model, s.x_train[:300], s.y_train[:300]
        )
        assert model.training  # its mode too
    finally:
        model.eval()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert r.extra["follower_loss"][-1] != r.extra["follower_loss"][0]  # the follower (a copy) did move


def test_regression_targets():
    s = data.load("regression2d", seed=0)
    model = models.create("linreg", s.input_shape, 1, seed=0)
    training.train(model, s.x_train, s.y_train, epochs=5, progress=False)
    attack = TGDA(0.2, epochs=5, generator="points", leader_lr=100.0, batch_size=None, box=None, pretrain_follower=20,
                  progress=False)
    r = attack.poison(model, s.x_train, s.y_train)
    assert "follower_accuracy" not in r.extra
    assert r.y.is_floating_point() and torch.equal(r.y, s.y_train[r.source_indices])
    L = r.extra["leader_objective"]  # observed: 0.1465 → 0.1490, rising every epoch
    assert all(b > a for a, b in zip(L, L[1:]))


# --------------------------------------------------------------------------------------------------
# 6. validation of the data, defaults, result files
# --------------------------------------------------------------------------------------------------


def test_poison_validates_its_data():
    s = data.load("digits", seed=0)
    model = models.create("lr", s.input_shape, 10, seed=0)
    X, y = s.x_train[:50].clone(), s.y_train[:50]
    attack = TGDA(0.1, epochs=1, progress=False)
    with pytest.raises(PoisonReachError, match="samples"):
        attack.poison(model, X, y[:-1])
    with pytest.raises(PoisonReachError, match="pair"):
        attack.poison(model, X, y, validation=s.x_val)
    with pytest.raises(PoisonReachError, match="validation data must look like"):
        attack.poison(model, X, y, validation=(s.x_val, F.one_hot(s.y_val, 10).float()))
    with pytest.raises(PoisonReachError):
        attack.poison(model, X, y, validation=(s.x_val.flatten(1), s.y_val))
    with pytest.raises(PoisonReachError, match="labels must lie"):
        attack.poison(model, X, y, validation=(s.x_val, s.y_val + 10))
    X[3, 0, 0, 0] = math.nan
    with pytest.raises(PoisonReachError, match="NaN"):
        attack.poison(model, X, y)


def test_defaults_follow_the_tgda_paper():
    a = TGDA(0.03)
    assert (a.epochs, a.leader_lr, a.follower_lr, a.leader_steps, a.follower_steps, a.cg_iterations, a.damping, a.batch_size) == (
        200, 0.01, 0.1, 1, 20, 16, 0.0, 1000
    )
    assert a.generator == "autoencoder"


def test_the_result_saves_and_loads(tmp_path, digits_lr):
    s, model = digits_lr
    r = TGDA(0.1, epochs=1, batch_size=100, follower_steps=2, cg_iterations=2, progress=False).poison(
        model, s.x_train[:200], s.y_train[:200], validation=(s.x_val[:50], s.y_val[:50])
    )
    back = type(r).load(r.save(tmp_path / "tgda"))
    assert torch.equal(back.x, r.x) and torch.equal(back.y, r.y) and torch.equal(back.source_indices, r.source_indices)
    assert back.extra == r.extra and back.config == r.config and math.isnan(back.tau)
