"""The constructive poisons of Theorems 5 and 6 (appendix A), for linear models.

For a linear model h = W̄z̄ (z̄ = (φ(x), 1), φ the model's normalisation of the pixels) a point's
gradient is ∇_h l ⊗ z̄, so when every poison's z̄ lies in a subspace U that holds the rows of the
clean gradient G(µ), the whole residual g(µ) + ε_d·g(ν̂) lies in R^c ⊗ U: problem (18) shrinks from
the pixels to dim U ≤ 2c + 1 coordinates per poison. The theorems' transformation
T(x) = G(µ)[W⊤G(µ)]⁻¹W⊤x maps a point onto the span of G(µ) keeping its logits, which reduces
reachability to the c × c moment condition (A.11). We take U = span(rows of G(µ), rows of W̄, e_bias):
the orthogonal projection onto it also keeps a point's logits (W̄'s rows are in U) and its bias
coordinate 1 (e_bias is in U), so it is a T that respects the bias the theorems leave out. The
poisons start at the projections of clean points and the Gauss–Newton solver (hard labels, no box)
solves (18) within U; the pixels x = φ⁻¹(z) of the result lie wherever the construction puts them.

This is a *sufficient* check, not an attack on a bounded domain: poisons outside the data's box are
a relaxation, and the result says how far out they are (``extra["pixel_range"]``).
"""

from __future__ import annotations

import dataclasses
import time

import torch
from torch import Tensor, nn

from ..models import affine_features, features, last_linear
from ..validation import Number, evaluating
from .base import Attack, PoisonResult
from .canceling import canceling_problem
from .gauss_newton import GaussNewtonCanceling


class Construction(Attack):
    """The constructive poisons of Theorems 5/6 for a linear model, unbounded (module docstring).

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = round(n·ε_d) poisons, at least one.
    iterations: Gauss–Newton steps of the solver within the subspace.
    tolerance: stop once ‖r‖ / ‖r_0‖ ≤ tolerance.
    weight_decay: the victim's weight decay λ (it minimises the mean loss plus λ/2·‖w‖²); its
        stationarity then carries the term (1 + ε_d)·λw.
    seed: seeds the clean points the poisons start from.
    """

    name = "construct"
    model_targeted = True
    constraints = {"tolerance": Number(low=0), "weight_decay": Number(low=0)}

    def __init__(self, eps_d: float, *, iterations: int = 100, tolerance: float = 1e-7, weight_decay: float = 0.0, **shared):
        self._set_params(locals())

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> PoisonResult:
        """Construct poisons that make the linear target ``model`` stationary on clean (X, y) ∪ poisons."""
        device = self._device(model)
        solver = GaussNewtonCanceling(self.eps_d, iterations=self.iterations, tolerance=self.tolerance, box=None, parameters="last",
                                      weight_decay=self.weight_decay, seed=self.seed, device=device, progress=self.progress)
        with evaluating(model):
            started = time.perf_counter()
            s, t = affine_features(model, tuple(X.shape[1:]), device)
            p = canceling_problem(solver, model, X, y, loss, device)
            solver._check_labels(p, loss)
            head = last_linear(model)
            G = torch.cat([p.g_mu[0].reshape(head.out_features, -1), p.g_mu[1].reshape(-1, 1)], 1).double()
            W = torch.cat([head.weight.detach(), head.bias.detach().reshape(-1, 1)], 1).double()
            bias = torch.zeros(1, G.shape[1], dtype=G.dtype, device=device)
            bias[0, -1] = 1
            U = torch.linalg.qr(torch.cat([G, W, bias]).T).Q  # (d + 1) × k, orthonormal
            # z̄ = U·a with a = a0 + N·b: the bias coordinate (U a)_last = 1 for every b
            last = U[-1]
            a0 = last / (last @ last)
            N = torch.linalg.svd(last[None]).Vh[1:].T  # orthonormal basis of {a : last·a = 0}
            to_features = nn.Linear(N.shape[1], U.shape[0] - 1).to(device)
            with torch.no_grad():
                to_features.weight.copy_((U @ N)[:-1])
                to_features.bias.copy_((U @ a0)[:-1])
            to_features.requires_grad_(False)
            within = nn.Sequential(to_features, head)  # the target, reading coordinates b
            z = torch.cat([features(model, p.start_x.to(device)).flatten(1).double(),
                           torch.ones(p.m, 1, dtype=G.dtype, device=device)], 1)
            coords = ((z @ U - a0) @ N).float()  # the projections of the start points onto U
            q = dataclasses.replace(p, model=within, params=list(head.parameters()), X=coords, y=p.start_y.to(device),
                                    source=torch.arange(p.m), low=None, high=None, start_x=coords, start_y=p.start_y.to(device))
            state = solver.solve(q, started)
            with torch.no_grad():
                x = ((to_features(state.x).double() - t) / s).float().reshape(p.m, *X.shape[1:])
        return self._result(x, state.y, p.source, history=state.history, tau=p.tau, **p.record(),
                            subspace_dim=N.shape[1], pixel_range=[float(x.min()), float(x.max())],
                            time_history=state.time_history, labels_changed=state.labels_changed)
