"""Per-sample losses, resolved from the model's output and the labels.

The attack and the threshold need *per-sample* losses ℓ(z; w) so that means and sums over the
clean set µ and the poisons ν̂ stay explicit (equations (3) and (17)).

Labels decide the task:
- int64 labels of shape (N,) are class indices: cross-entropy when the model has several outputs,
  the logistic loss when it has one output (labels in {0, 1});
- float labels of shape (N, C) are class probabilities (soft labels, e.g. optimised poison labels):
  cross-entropy, or the logistic loss with C == 1;
- float labels of shape (N,) are regression targets: squared error ½(h − y)² (Example 1).

The *reversed* losses (equation (20)) are what Gradient Matching's attacker wants the clean data to
minimise: ℓ̄ = −log(1 − p_y), large where the model is right.
"""

from __future__ import annotations

import math
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


def reversed_cross_entropy(outputs: Tensor, y: Tensor) -> Tensor:
    """ℓ̄ = −log(1 − p_y) (equation (20)) per sample, for class indices or probabilities y (then
    −Σ_c y_c log(1 − p_c)).

    log(1 − p_c) = logsumexp_{k≠c} h_k − logsumexp_k h_k holds exactly and stays finite however
    confident the model is, where 1 − softmax(h)_c rounds to 0 (in float32 once the margin exceeds
    about 17).
    """
    num_classes = outputs.shape[1]
    if num_classes < 2:
        raise PoisonReachError("the reversed cross-entropy needs at least two classes; use the logistic loss for one output")
    others = torch.eye(num_classes, dtype=torch.bool, device=outputs.device)  # row c masks out class c
    log_rest = torch.logsumexp(outputs.unsqueeze(1).masked_fill(others, -math.inf), dim=2)
    log_not = log_rest - torch.logsumexp(outputs, dim=1, keepdim=True)  # log(1 − p_c), shape (N, C)
    probs = y.to(outputs.dtype) if y.is_floating_point() else F.one_hot(y, num_classes).to(outputs.dtype)
    return -(probs * log_not).sum(dim=1)


def reversed_logistic(outputs: Tensor, y: Tensor) -> Tensor:
    """ℓ̄ = −log(1 − p_y) for one logit h, p_1 = σ(h): 1 − p_y is the probability of the other class,
    so ℓ̄ is the logistic loss with the label flipped (y ∈ {0, 1} or a probability of class 1)."""
    return logistic(outputs, 1 - y.reshape(-1).to(outputs.dtype))


REVERSED: dict[LossFn, LossFn] = {cross_entropy: reversed_cross_entropy, logistic: reversed_logistic}
