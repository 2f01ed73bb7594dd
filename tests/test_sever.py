"""Sever (Diakonikolas et al. 2019) and the per-sample gradients it scores.

- ``per_sample_gradients`` equals a loop of per-sample autograd calls (class, one-logit, soft-label
  and regression losses; a model with batch-norm and dropout, in eval mode; any chunking);
- Sever's scores equal ⟨g_i − ĝ, v⟩² with v from a dense torch.linalg.svd of the centred gradients
  computed in the test, per class and globally, streamed and cached, over one and two rounds;
- Sever removes planted mislabelled outliers from a separable two-class Gaussian set;
- the proportional split of the removals over classes, seeds, soft labels, regression targets.

Constructor validation, repr and get_params: ``test_defense_contract.py``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from poisonreach import models, training
from poisonreach.defenses.sever import Sever, allocate
from poisonreach.errors import PoisonReachError
from poisonreach.gradients import per_sample_gradients, select_parameters
from poisonreach.losses import cross_entropy, logistic, squared


class TinyNet(nn.Module):
    """An MLP with batch-norm and dropout: per-sample gradients must use eval mode."""

    def __init__(self, d, out):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(6, out)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_net(d=3, out=3, seed=0):
    torch.manual_seed(seed)
    net = TinyNet(d, out).double()
    # non-trivial running statistics, so that train-mode batch statistics would give other gradients
    with torch.no_grad():
        net.body[1].running_mean.uniform_(-0.5, 0.5)
        net.body[1].running_var.uniform_(0.5, 2.0)
    return net


def loop_gradients(model, params, X, y, loss):
    """Per-sample gradients one autograd call at a time, in eval mode."""
    model.eval()
    rows = [torch.cat([g.flatten() for g in torch.autograd.grad(loss(model(X[i : i + 1]), y[i : i + 1]).sum(), params)]) for i in range(len(X))]
    return torch.stack(rows)


def dense_scores(G, groups):
    """τ_i = ⟨g_i − ĝ, v⟩² per group, v the top right singular vector of the centred group matrix."""
    scores = torch.zeros(len(G), dtype=torch.float64)
    for idx in groups:
        C = G[idx] - G[idx].mean(0)
        v = torch.linalg.svd(C, full_matrices=False).Vh[0]
        scores[idx] = (C @ v) ** 2
    return scores


# --------------------------------------------------------------------------------------------------
# per_sample_gradients
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["classes", "one-logit", "soft", "regression"])
@pytest.mark.parametrize("chunk_size", [1, 4, 100])
def test_per_sample_gradients_match_an_autograd_loop(case, chunk_size):
    g = torch.Generator().manual_seed(1)
    X = torch.randn(11, 3, generator=g, dtype=torch.float64)
    if case == "classes":
        model, y, loss = tiny_net(out=3), torch.randint(3, (11,), generator=g), cross_entropy
    elif case == "one-logit":
        model, y, loss = tiny_net(out=1), torch.randint(2, (11,), generator=g), logistic
    elif case == "soft":
        model, y, loss = tiny_net(out=3), torch.softmax(torch.randn(11, 3, generator=g, dtype=torch.float64), 1), cross_entropy
    else:
        model, y, loss = tiny_net(out=1), torch.randn(11, generator=g, dtype=torch.float64), squared
    model.train()
    params = select_parameters(model, "all")
    blocks = list(per_sample_gradients(model, params, X, y, loss, chunk_size=chunk_size, device=torch.device("cpu")))
    assert [len(b) for b in blocks] == [min(chunk_size, 11 - s) for s in range(0, 11, chunk_size)]
    assert all(m.training for m in model.modules())  # modes restored
    expected = loop_gradients(model, params, X, y, loss)
    torch.testing.assert_close(torch.cat(blocks), expected, rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_of_a_parameter_subset_and_a_cnn():
    model = models.create("cnn", (1, 8, 8), 3, seed=0).double()
    X = torch.rand(5, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 2, 1, 1, 0])
    for which in ("all", "last"):
        params = select_parameters(model, which)
        got = torch.cat(list(per_sample_gradients(model, params, X, y, cross_entropy, chunk_size=2, device=torch.device("cpu"))))
        assert got.shape == (5, sum(p.numel() for p in params))
        assert not got.requires_grad  # no graph through the parameters left out
        torch.testing.assert_close(got, loop_gradients(model, params, X, y, cross_entropy), rtol=1e-10, atol=1e-12)


def test_per_sample_gradients_reject_foreign_parameters():
    model, other = tiny_net(), tiny_net()
    with pytest.raises(PoisonReachError, match="parameters of model"):
        next(per_sample_gradients(model, list(other.parameters()), torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), cross_entropy, chunk_size=2, device=torch.device("cpu")))


# --------------------------------------------------------------------------------------------------
# Sever's scores against a dense SVD
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def problem():
    """80 points of 3 classes and a float64 MLP with P = 57 parameters (more than the power block)."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(80, 3, generator=g, dtype=torch.float64)
    y = torch.randint(3, (80,), generator=g)
    return tiny_net(), X, y


@pytest.mark.parametrize("per_class", [True, False])
@pytest.mark.parametrize("cache_mb", [0, 1024])
def test_scores_equal_a_dense_svd(problem, per_class, cache_mb):
    model, X, y = problem
    sever = Sever(0.1, per_class=per_class, cache_mb=cache_mb, chunk_size=16, power_tol=1e-10, progress=False)
    result = sever.filter(model, X, y)
    G = loop_gradients(model, select_parameters(model, "all"), X, y, cross_entropy)
    groups = [(y == c).nonzero().flatten() for c in range(3)] if per_class else [torch.arange(80)]
    expected = dense_scores(G, groups)
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-12)
    singular = [float(torch.linalg.svdvals(G[idx] - G[idx].mean(0))[0]) for idx in groups]
    assert result.extra["top_singular_values"][0] == pytest.approx(singular, rel=1e-8)
    assert max(result.extra["power_iterations"][0]) > 1  # P > power_block: the iteration had work to do
    # the removed points are the top scores of each group, as many per group as allocate says
    quotas = allocate(8, [len(idx) for idx in groups])
    for idx, quota in zip(groups, quotas):
        top = idx[expected[idx].argsort(descending=True)[:quota]]
        assert set(result.removed_indices.tolist()) >= set(top.tolist())
    assert len(result.removed_indices) == 8


def test_two_rounds_recompute_the_scores_on_the_remaining_points(problem):
    model, X, y = problem
    result = Sever(0.2, rounds=2, power_tol=1e-10, progress=False).filter(model, X, y)
    G = loop_gradients(model, select_parameters(model, "all"), X, y, cross_entropy)
    groups = [(y == c).nonzero().flatten() for c in range(3)]
    keep = torch.ones(80, dtype=torch.bool)
    expected = torch.zeros(80, dtype=torch.float64)
    for budget in (8, 8):  # 16 removals over two rounds
        alive = [idx[keep[idx]] for idx in groups]
        round_scores = dense_scores(G, alive)
        for idx, quota in zip(alive, allocate(budget, [len(idx) for idx in alive])):
            expected[idx] = round_scores[idx]
            keep[idx[round_scores[idx].argsort(descending=True)[:quota]]] = False
    assert result.extra["removed_per_round"] == [8, 8]
    torch.testing.assert_close(result.scores, expected, rtol=1e-6, atol=1e-12)
    assert torch.equal(result.keep_mask, keep)


def test_a_few_passes_of_the_power_iteration_on_a_fresh_seed_need_not_agree_but_one_seed_repeats(problem):
    model, X, y = problem
    one = Sever(0.1, power_iterations=1, power_block=1, seed=0, progress=False)
    with pytest.warns(UserWarning, match="power_iterations"):
        a, b = one.filter(model, X, y), one.filter(model, X, y)
        c = Sever(0.1, power_iterations=1, power_block=1, seed=1, progress=False).filter(model, X, y)
    assert torch.equal(a.scores, b.scores) and torch.equal(a.keep_mask, b.keep_mask)
    assert not torch.allclose(a.scores, c.scores)  # one pass from a random start: the seed matters
    converged = [Sever(0.1, seed=s, power_tol=1e-10, progress=False).filter(model, X, y).scores for s in (0, 1)]
    torch.testing.assert_close(converged[0], converged[1], rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------------------------------
# what Sever is for
# --------------------------------------------------------------------------------------------------


def planted_outliers(seed=0, n=200, k=10):
    """A separable two-class Gaussian set plus k far-out points labelled with the other class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    X = torch.randn(n, 2, generator=g) + 3.0 * y[:, None]
    bad = torch.randn(k, 2, generator=g) * 0.3
    bad[: k // 2] += -6.0  # deep in class 0's side, labelled 1
    bad[k // 2 :] += 9.0  # deep in class 1's side, labelled 0
    bad_y = torch.cat([torch.ones(k // 2, dtype=torch.long), torch.zeros(k - k // 2, dtype=torch.long)])
    return torch.cat([X, bad]), torch.cat([y, bad_y]), torch.arange(n, n + k)


@pytest.mark.parametrize("per_class", [True, False])
def test_sever_removes_planted_outliers(per_class):
    X, y, outliers = planted_outliers()
    model = models.create("lr", (2,), 2, seed=0)
    training.train(model, X, y, epochs=30, batch_size=32, optimizer="sgd", lr=0.1, progress=False)
    result = Sever(len(outliers) / len(X), per_class=per_class, progress=False).filter(model, X, y)
    assert sorted(result.removed_indices.tolist()) == outliers.tolist()
    # the filtered set is clean and separable again: retraining fits it
    kept = result.keep_mask
    retrained = training.train(models.create("lr", (2,), 2, seed=0), X[kept], y[kept], epochs=30, batch_size=32, optimizer="sgd", lr=0.1, progress=False)
    assert training.accuracy(retrained, X[kept], y[kept]) > training.accuracy(model, X[kept], y[kept])


def test_soft_labels_are_grouped_by_their_most_probable_class(problem):
    model, X, y = problem
    hard = Sever(0.1, power_tol=1e-10, progress=False).filter(model, X, y)
    onehot = torch.nn.functional.one_hot(y, 3).double()
    soft = Sever(0.1, power_tol=1e-10, progress=False).filter(model, X, onehot)
    torch.testing.assert_close(soft.scores, hard.scores, rtol=1e-6, atol=1e-12)
    assert torch.equal(soft.keep_mask, hard.keep_mask)


def test_one_logit_soft_labels_group_at_one_half():
    X, y, outliers = planted_outliers()
    model = training.train(models.create("lr", (2,), 2, seed=0), X, y, epochs=5, optimizer="sgd", lr=0.1, progress=False)
    hard = Sever(0.05, progress=False).filter(model, X, y)
    certain = Sever(0.05, progress=False).filter(model, X, y.float().reshape(-1, 1))
    torch.testing.assert_close(certain.scores, hard.scores)
    # P(y = 1) of 0.1 / 0.9: other gradients, the same two groups and so the same quota per class
    soft = Sever(0.05, progress=False).filter(model, X, y.float().reshape(-1, 1) * 0.8 + 0.1)
    assert (~soft.keep_mask[y == 1]).sum() == (~hard.keep_mask[y == 1]).sum() == 5


def test_regression_targets_need_per_class_false():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=g)
    y = X @ torch.tensor([1.0, -2.0]) + 0.1 * torch.randn(40, generator=g)
    y[:3] += 20.0  # three gross outliers in the targets
    model = training.train(models.create("linreg", (2,), 1, seed=0), X, y, epochs=30, optimizer="sgd", lr=0.05, progress=False)
    with pytest.raises(PoisonReachError, match="per_class=False"):
        Sever(0.1).filter(model, X, y)
    result = Sever(3 / 40, per_class=False, progress=False).filter(model, X, y)
    assert sorted(result.removed_indices.tolist()) == [0, 1, 2]


def test_fraction_zero_keeps_everything(problem):
    model, X, y = problem
    result = Sever(0.0, progress=False).filter(model, X, y)
    assert result.keep_mask.all() and result.scores.shape == (80,)


# --------------------------------------------------------------------------------------------------
# the split over classes
# --------------------------------------------------------------------------------------------------


def test_allocate_by_largest_remainders():
    assert allocate(5, [10, 10, 10]) == [2, 2, 1]  # 5/3 each: the tie goes to the earlier groups
    assert allocate(3, [1, 1, 8]) == [0, 0, 3]  # 0.3, 0.3, 2.4: the largest remainder is 0.4
    assert allocate(4, [5, 0, 15]) == [1, 0, 3]
    assert allocate(0, [3, 4]) == [0, 0]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        sizes = torch.randint(0, 20, (int(torch.randint(1, 6, (1,), generator=g)),), generator=g).tolist()
        if sum(sizes) == 0:
            continue
        count = int(torch.randint(0, sum(sizes), (1,), generator=g))
        quotas = allocate(count, sizes)
        assert sum(quotas) == count
        assert all(0 <= q <= s and abs(q - count * s / sum(sizes)) < 1 for q, s in zip(quotas, sizes))
