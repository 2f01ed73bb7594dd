"""Per-sample losses, resolved from the model's output and the labels.

The attack and the threshold need *per-sample* losses ℓ(z; w) so that means and sums over the
clean set µ and the poisons ν̂ stay explicit (equations (3) and (17)).

Labels decide the task:
- int64 labels of shape (N,) are class indices: cross-entropy when the model has several outputs,
  the logistic loss when it has one output (labels in {0, 1});
- float labels of shape (N, C) are class probabilities (soft labels, e.g. optimised poison labels):
  cross-entropy, or the logistic loss with C == 1;
- float labels of shape (N,) are regression targets: squared error ½(h − y)² (Example 1).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import PoisonReachError

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    """ℓ = −⟨y, log softmax(h)⟩ (Example 3), per sample; y holds indices or probabilities."""
    return F.cross_entropy(outputs, y, reduction="none")


def logistic(outputs: Tensor, y: Tensor) -> Tensor:
    """ℓ = log(1 + exp(−s·h)) with s = 2y − 1 (Example 2), per sample; y in {0, 1} or in [0, 1]."""
    return F.binary_cross_entropy_with_logits(outputs.reshape(-1), y.reshape(-1).to(outputs.dtype), reduction="none")


def squared(outputs: Tensor, y: Tensor) -> Tensor:
    """ℓ = ½(h − y)² (Example 1), per sample."""
    return 0.5 * (outputs.reshape(-1) - y.reshape(-1).to(outputs.dtype)) ** 2


LOSSES: dict[str, LossFn] = {"cross-entropy": cross_entropy, "logistic": logistic, "squared": squared}


def task_of(y: Tensor) -> str:
    """'classification' for integer or soft (2-D float) labels, 'regression' for 1-D float labels."""
    if y.is_floating_point() and y.dim() == 1:
        return "regression"
    return "classification"


def resolve(num_outputs: int, y: Tensor, loss: str | LossFn | None = None) -> LossFn:
    """The per-sample loss for a model with ``num_outputs`` outputs and labels ``y``.

    ``loss`` overrides the choice: a name from :data:`LOSSES` or a callable
    ``(outputs, y) -> losses of shape (N,)``.
    """
    if callable(loss):
        return loss
    if loss is not None:
        if loss not in LOSSES:
            raise PoisonReachError(f"unknown loss {loss!r}: choose one of {sorted(LOSSES)} or pass a callable")
        return LOSSES[loss]
    if task_of(y) == "regression":
        return squared
    return logistic if num_outputs == 1 else cross_entropy


def to_probabilities(y: Tensor, num_outputs: int) -> Tensor:
    """Labels as float probabilities of shape (N, num_outputs): one-hot, or P(y = 1) for one output."""
    if y.is_floating_point():
        return y.reshape(len(y), -1) if num_outputs == 1 else y
    if num_outputs == 1:
        return y.reshape(-1, 1).float()
    return F.one_hot(y, num_outputs).float()
