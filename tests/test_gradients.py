"""The shared Hessian-vector products, poisonreach.gradients.hessian_vector_products (used by TGDA
and the influence defense), against the dense Hessian of torch.autograd.functional.hessian:

- k vectors at once, one vector, and V = None (the dense Hessian, columns in blocks of any width);
- the result does not depend on the chunk size;
- a parameter the loss does not depend on gets a zero block, a loss linear in the parameters a
  zero Hessian; the model is evaluated in eval mode and its modes are restored; V's shape is checked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from poisonreach.errors import PoisonReachError
from poisonreach.gradients import hessian_vector_products
from poisonreach.losses import cross_entropy

CPU = torch.device("cpu")


class TwoTensors(nn.Module):
    """Three logits 2·tanh(x W); ``unused`` never enters the output."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64))
        self.unused = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))

    def forward(self, x):
        return 2 * torch.tanh(x @ self.weight)


def data(n=11, d=4, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


def dense_hessian(model, X, y, loss_fn=cross_entropy):
    """∇² Σ_z ℓ(z; w) over all parameters, flattened in their order, built without the library."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def total(t):
        values = [v.reshape(s) for v, s in zip(t.split([s.numel() for s in shapes]), shapes)]
        return loss_fn(functional_call(model, dict(zip(names, values)), (X,)), y).sum()

    return torch.autograd.functional.hessian(total, theta)


def products(model, X, y, V, *, chunk_size, block_size=None, loss_fn=cross_entropy):
    return hessian_vector_products(
        model, list(model.parameters()), X, y, loss_fn, V, chunk_size=chunk_size, device=CPU, block_size=block_size
    )


def test_products_equal_the_dense_hessian_times_each_vector_for_any_chunk_size():
    model = TwoTensors()
    X, y = data()
    H = dense_hessian(model, X, y)
    assert H[:12, :12].abs().max() > 1e-2  # the weight's block is not trivial
    V = torch.randn(5, 14, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    results = {c: products(model, X, y, V, chunk_size=c) for c in (1, 4, 11, 100)}  # 11 points
    for chunk_size, got in results.items():
        torch.testing.assert_close(got, V @ H, rtol=1e-10, atol=1e-12, msg=f"chunk_size={chunk_size}")
        assert torch.equal(got[:, 12:], torch.zeros(5, 2, dtype=torch.float64))  # ``unused``: a zero block
        torch.testing.assert_close(got, results[100], rtol=1e-12, atol=1e-13)
    # a single vector takes the unbatched second backward
    torch.testing.assert_close(products(model, X, y, V[2:3], chunk_size=4), (V @ H)[2:3], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_size", [None, 1, 5, 14])
def test_no_vectors_give_the_dense_hessian_in_blocks_of_any_width(block_size):
    model = TwoTensors()
    X, y = data()
    got = products(model, X, y, None, chunk_size=3, block_size=block_size)
    torch.testing.assert_close(got, dense_hessian(model, X, y), rtol=1e-10, atol=1e-12)


def test_a_loss_linear_in_the_parameters_has_a_zero_hessian():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).double()
    X, _ = data()
    V = torch.randn(3, 10, dtype=torch.float64)
    got = products(model, X, torch.zeros(len(X)), V, chunk_size=4, loss_fn=lambda out, y: out.sum(1))
    assert torch.equal(got, torch.zeros(3, 10, dtype=torch.float64))


def test_the_products_are_taken_in_eval_mode_and_the_modes_are_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Tanh(), nn.Linear(6, 3)).double().train()
    X, y = data()
    got = products(model, X, y, None, chunk_size=4)
    assert all(m.training for m in model.modules())
    torch.testing.assert_close(got, dense_hessian(model.eval(), X, y), rtol=1e-10, atol=1e-12)


def test_vectors_of_the_wrong_size_are_an_error():
    model = TwoTensors()
    X, y = data()
    with pytest.raises(PoisonReachError, match=r"shape \(k, 14\).*got \(3, 12\)"):
        products(model, X, y, torch.zeros(3, 12, dtype=torch.float64), chunk_size=4)
