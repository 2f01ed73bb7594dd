"""Gradient Canceling as the official code runs it (the attack of ``--protocol official``).

The official repository's GC script for MNIST logistic regression does something narrower than
problem (18), and :class:`OfficialGradientCanceling` does what it does, written from this
description of it (not from its code):

- the gradient is that of the *first* weight tensor only (for LR the weight matrix, not the bias);
- losses are *summed*, not averaged: the objective is ‖Σ_clean ∇_W ℓ + Σ_poisons ∇_W ℓ‖₂, which is
  n·‖g(µ) + ε_d·g(ν̂)‖ over that tensor;
- the poisons are variables in the model's *normalised* input space ((x − mean)/std, the model's own
  normalisation), and take plain gradient steps there, z ← z − lr_t·∇_z, lr_t = lr·½(1 + cos(π t/T))
  over T epochs (the script's schedule), with no momentum and **no projection onto any box**;
- the poisons start as the first m training images and their labels, in the order the data are
  given (the script's file order), not a seeded random draw; the labels stay fixed;
- the attack stops updating once the objective falls below 1 (``stop_below``), as the script does;
- float64 throughout.

Which variant. The repository's first upload minimises ‖Σ∇ℓ‖, the norm itself; its later edit
squares the norm. At the script's lr of 10 for 1,000 epochs the squared objective diverges on
MNIST (its gradient grows with the residual), while the unsquared one is stable (its gradient is
the residual's direction mapped back, ‖∇_z‖ does not grow with ‖v‖). This class implements the
**unsquared first upload**, the one that can be run at its own settings.

What it returns. Poisons are returned in *pixel space* (x = z·std + mean), like every other
attack's, and since nothing bounds them they are not images: ``extra`` records ``pixel_min``,
``pixel_max`` and ``fraction_outside_unit_box`` (the share of pixel values outside [0, 1]) so that
no one mistakes them for admissible points. ``grad_norm_history`` is the first tensor's
‖g(µ) + ε_d·g(ν̂)‖ (the objective divided by n, this library's convention), one entry per epoch
and one after the last step; ``extra["objective_history"]`` is the script's own ‖Σ∇ℓ‖.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..gradients import cancel_gradient, flat_norm, gradient_sum, select_parameters
from ..losses import resolve
from ..reachability import threshold
from ..rows import dense
from ..validation import Number, check_model_data
from .base import Attack, PoisonResult, scheduled_lr



def normalisation(model: nn.Module, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """The (mean, std) the model normalises its inputs with (``model.normalize``, as
    :func:`poisonreach.models.create` builds it), or (0, 1) for a model without one."""
    norm = getattr(model, "normalize", None)
    if norm is not None and hasattr(norm, "mean") and hasattr(norm, "std"):
        return norm.mean.detach().to(dtype), norm.std.detach().to(dtype)
    return torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)


@dataclass
class OfficialProblem:
    """The official objective for one target, in float64: poisons ``z`` (normalised space) with
    fixed labels ``yp``; ``g_clean`` is Σ_clean ∇_W ℓ over the first weight tensor W, fixed."""

    model: nn.Module
    params: list[Tensor]
    loss_fn: object
    mean: Tensor
    std: Tensor
    g_clean: list[Tensor]
    chunk_size: int
    device: torch.device

    def pixels(self, z: Tensor) -> Tensor:
        """The poisons in pixel space, x = z·std + mean (the model normalises x back to z)."""
        return z * self.std + self.mean

    def residual(self, z: Tensor, yp: Tensor) -> tuple[list[Tensor], float]:
        """v = Σ_clean ∇_W ℓ + Σ_poisons ∇_W ℓ and the objective ‖v‖₂."""
        g_poison = gradient_sum(self.model, self.params, self.pixels(z), yp, self.loss_fn, chunk_size=self.chunk_size, device=self.device)
        v = [a + b for a, b in zip(self.g_clean, g_poison)]
        return v, flat_norm(v)

    def gradient(self, z: Tensor, yp: Tensor, v: list[Tensor], norm: float) -> Tensor:
        """∇_z ‖v‖ = Jᵀv / ‖v‖ at z (v and its norm from :meth:`residual` at the same z): the
        bracket ∇_x⟨Σ_j ∇_W ℓ(x_j), v⟩ in pixels, times std for x = z·std + mean."""
        bracket = cancel_gradient(self.model, self.params, self.pixels(z), yp, self.loss_fn, v, chunk_size=self.chunk_size, device=self.device)
        return bracket.x * self.std / norm


class OfficialGradientCanceling(Attack):
    """The official code's Gradient Canceling (first upload: the unsquared norm), see the module
    docstring for every way it differs from :class:`~poisonreach.attacks.GradientCanceling`.

    Parameters
    ----------
    eps_d: the poison budget; m = round(n·ε_d) poisons (the script truncates, int(n·ε_d); the
        two agree whenever n·ε_d is a whole number, as for 42,000 or 60,000 MNIST images).
    epochs: gradient steps (the script's 1,000).
    lr: the step size on the unsquared, summed objective in normalised pixel units (the script's 10).
    schedule: ``cosine`` (the script's: lr·½(1 + cos(π t/epochs)) at step t) or ``constant``.
    stop_below: stop updating once ‖Σ∇ℓ‖ < this (the script's 1); 0 never stops early.
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    seed: recorded only: the attack makes no random choice (it starts from the first m points).

    ``poison(model, X, y)`` takes the target (its first parameter tensor is cancelled) and the clean
    data in the order whose first m rows the poisons start from; :meth:`problem` is the objective
    it descends on, for inspection and tests.
    """

    name = "gc-official"
    model_targeted = True
    constraints = {
        "stop_below": Number(low=0),
    }

    def __init__(
        self,
        eps_d: float,
        *,
        epochs: int = 1000,
        lr: float = 10.0,
        schedule: str = "cosine",
        stop_below: float = 1.0,
        chunk_size: int = 1024,
        **shared,
    ):
        self._set_params(locals())

    def _lr_at(self, epoch: int) -> float:
        return scheduled_lr(self.lr, epoch, self.epochs, self.schedule)

    def problem(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> OfficialProblem:
        """The objective against the target ``model`` on clean data (X, y): a float64 copy of the
        model in eval mode, its first parameter tensor, and Σ_clean ∇_W ℓ."""
        device = self._device(model)
        target = copy.deepcopy(model).to(device).double().eval()
        X64 = dense(X).to(torch.float64)  # the official code's float64 copy of the clean set
        num_outputs = check_model_data(target, X64, y, device, strict=not callable(loss))
        loss_fn = resolve(num_outputs, y, loss)
        params = select_parameters(target, "first")
        mean, std = (t.to(device) for t in normalisation(target))
        g_clean = gradient_sum(target, params, X64, y, loss_fn, chunk_size=self.chunk_size, device=device)
        return OfficialProblem(target, params, loss_fn, mean, std, g_clean, self.chunk_size, device)

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> PoisonResult:
        """Poisons against the target ``model`` on clean data (X, y), starting from X[:m], y[:m]."""
        n = len(X)
        m = self.num_poisons(n)
        p = self.problem(model, X, y, loss)
        tau = threshold(model, X, y, device=p.device).tau if loss is None else math.nan
        source = torch.arange(m) % n  # the first m points, in order (again from the start if m > n)
        yp = y[source].to(p.device).clone()
        z = ((X[source].to(p.device, torch.float64) - p.mean) / p.std).clone()  # the poisons in normalised space
        objective, stopped_at = [], None
        bar = self._progress(range(self.epochs), desc=f"GC official eps_d={self.eps_d:g}")
        for epoch in bar:
            v, norm = p.residual(z, yp)
            objective.append(norm)
            bar.set_postfix(objective=f"{norm:.4g}")
            if norm < self.stop_below:
                stopped_at = epoch
                break
            z = z - self._lr_at(epoch) * p.gradient(z, yp, v, norm)  # a plain step, no projection
        bar.close()
        if stopped_at is None:
            objective.append(p.residual(z, yp)[1])  # after the last step
        x = p.pixels(z).detach()
        return self._result(
            x, yp, source, history=[o / n for o in objective], tau=tau,
            num_clean=n, num_poisons=m, variant="first upload: ‖Σ∇ℓ‖ unsquared, first weight tensor, normalised space, no box",
            objective_history=objective, stopped_at_epoch=stopped_at,
            pixel_min=float(x.min()), pixel_max=float(x.max()),
            fraction_outside_unit_box=float(((x < 0) | (x > 1)).double().mean()),
        )
