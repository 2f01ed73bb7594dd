"""Per-sample losses, central differences, a small MLP and tensor helpers written out with plain
torch, independently of the library, for the tests that check the library's gradients and
objectives against them."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def ce_loss(outputs, y):
    """Per-sample cross-entropy written out (indices or probabilities)."""
    logp = torch.log_softmax(outputs, dim=1)
    if y.is_floating_point():
        return -(y * logp).sum(dim=1)
    return -logp.gather(1, y.reshape(-1, 1)).reshape(-1)


def logistic_loss(outputs, y):
    """Per-sample logistic loss with labels (or probabilities) p of class 1: −p log σ(h) − (1−p) log σ(−h)."""
    h = outputs.reshape(-1)
    p = y.reshape(-1).to(h.dtype)
    return -(p * F.logsigmoid(h) + (1 - p) * F.logsigmoid(-h))


def squared_loss(outputs, y):
    """Per-sample squared loss ½(h − y)² of a one-output model."""
    return 0.5 * (outputs.reshape(-1) - y) ** 2


def flat(tensors):
    """The tensors as one vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def central_differences(f, Z, h=1e-6):
    """The gradient of the scalar function f at Z by central differences of step h, entry by entry."""
    out = torch.zeros_like(Z)
    for i in range(Z.numel()):
        e = torch.zeros_like(Z)
        e.reshape(-1)[i] = h
        out.reshape(-1)[i] = (f(Z + e) - f(Z - e)) / (2 * h)
    return out


class _ReverseOnlyTanh(torch.autograd.Function):
    """tanh with a twice-differentiable backward and no forward-mode formula (no ``jvp``)."""

    @staticmethod
    def forward(ctx, x):
        out = torch.tanh(x)
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(x) ** 2)  # differentiable again: double backward works


class ReverseOnlyTanh(nn.Module):
    """A layer forward mode cannot go through: the library falls back to reverse mode."""

    def forward(self, x):
        return _ReverseOnlyTanh.apply(x)


class TinyMLP(nn.Module):
    """``layers`` hidden layers of width ``hidden``, each followed by ``act`` (tanh by default), then a
    linear head; ``body`` and ``head`` as in the library's models."""

    def __init__(self, d, hidden, out, act=None, layers=1):
        super().__init__()
        act = nn.Tanh() if act is None else act
        body = [nn.Linear(d, hidden), act]
        for _ in range(layers - 1):
            body += [nn.Linear(hidden, hidden), act]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(self.body(x))
