"""Sever (Diakonikolas et al. 2019, "Sever: A Robust Meta-Algorithm for Stochastic Optimization"),
the filtering defense of section 5.4 (Table 3) and appendix C.8 (Table 8).

At the model's parameters w, Sever stacks the per-sample gradients g_i = ∇_w ℓ(z_i; w) into a
matrix, centres it at the mean gradient ĝ, takes the top right singular vector v of the centred
matrix and scores every point by τ_i = ⟨g_i − ĝ, v⟩² (Sever, Algorithm 1); the highest-scoring
points are removed. Poisons that move the model must share a gradient direction, which is then the
direction of largest variance, so they score high.

Choices (the paper says only that Sever "removes ε_d training points with the highest outlier
scores, defined using the top singular value of the gradient matrix"):

- ``rounds=1``: one filtering step removing the whole budget, as the paper's description and its
  budget of exactly ε_d points imply. Sever's own Algorithm 1 retrains between rounds; the filter
  only gets one model, so with ``rounds > 1`` the model is *not* retrained: each round removes
  fraction/rounds of the points and recomputes ĝ, v and τ on the points that remain, at the same w.
- ``per_class=True``: each class is filtered on its own (its own ĝ and v), which stops the between-class differences of the gradients from being the top
  direction. The points removed in a round are spread over the classes in proportion to their
  current sizes (largest remainders), because scores of different classes are projections on
  different directions and have different scales; a global ranking would let the class with the
  largest gradient variance absorb the budget. Soft labels (N, C) are grouped by their most probable
  class (P(y = 1) > 0.5 for one column); regression targets need ``per_class=False``.
- The top singular vector comes from randomized subspace (block power) iteration on the P × P
  matrix Cᵀ C, C the centred gradient matrix, streamed over chunks of per-sample gradients:
  Cᵀ C Q = Σ_i (g_i − ĝ)((g_i − ĝ)ᵀ Q), so the N × P matrix is never formed unless it fits in
  ``cache_mb``, in which case it is kept to avoid recomputing the gradients on every pass.

The iteration runs in float64 (each chunk is converted as it is used, or cached converted): in
float32 it stalled at a
relative residual of 5e-4 and a top singular value off by 6e-4 (the ``nn`` model on digits,
P ≈ 6.7e5).

Memory: one chunk of per-sample gradients in the model's dtype and in float64 (``chunk_size`` × P
each), the block Q and its product (2 × ``power_block`` × P float64), plus the cached gradients (at
most ``cache_mb``); P is the number of selected parameters (``parameters="last"`` for large models).
Time: 2 + iterations passes of per-sample gradients over each class per round, or one pass and
cheap matrix products when the gradients are cached.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import PoisonReachError
from ..gradients import per_sample_gradients
from ..losses import task_of
from ..rounding import largest_remainder
from ..validation import Number, strict_flag
from .base import Filter, FilterResult, removal_count


class Sever(Filter):
    """Sever: remove the points whose centred gradients project most on the top singular vector.

    Parameters
    ----------
    fraction: share of the given points removed (the paper: ε_d/(1 + ε_d), as many as poisons).
    rounds: filtering rounds at the same model, each removing fraction/rounds of the points (see
        the module docstring); 1 is the paper's single step.
    parameters: the parameters whose gradients are scored: ``all`` (default) or ``last`` (the last
        linear layer; much cheaper for deep models).
    per_class: filter every class on its own and spread the removals proportionally to class sizes.
    power_block: width of the random block of the subspace iteration; a wider block converges in
        fewer passes when the top singular values are close.
    power_iterations: most passes of subspace iteration per class and round.
    power_tol: stop once the Ritz pair (θ, v) of Cᵀ C has ‖Cᵀ C v − θ v‖ ≤ power_tol·θ.
    cache_mb: keep a class's per-sample gradients in memory (on ``device``, float64) when they take
        at most this many MiB, instead of recomputing them on every pass; 0 always streams.
    chunk_size: samples per per-sample gradient computation; bounds memory, not the result.
    seed: seeds the random starting block.
    """

    name = "sever"
    constraints = {
        "rounds": Number(low=1, integer=True),
        "per_class": strict_flag,
        "power_block": Number(low=1, integer=True),
        "power_iterations": Number(low=1, integer=True),
        "power_tol": Number(low=0, low_open=True),
        "cache_mb": Number(low=0),
    }

    def __init__(
        self,
        fraction: float,
        *,
        rounds: int = 1,
        parameters: str = "all",
        per_class: bool = True,
        power_block: int = 8,
        power_iterations: int = 100,
        power_tol: float = 1e-6,
        cache_mb: float = 1024.0,
        chunk_size: int = 128,
        **shared,
    ):
        self._set_params(locals())

    def filter(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> FilterResult:
        """Score the points of (X, y) at ``model``'s parameters and drop ``fraction`` of them."""
        device, loss_fn, params = self._setup(model, X, y, loss)
        groups = self._groups(y)
        n = len(X)
        total = removal_count(n, self.fraction)
        keep = torch.ones(n, dtype=torch.bool)
        scores = torch.zeros(n, dtype=torch.float64)
        gen = torch.Generator().manual_seed(self.seed)
        removed, singular, passes = [], [], []
        bar = self._progress(total=self.rounds * len(groups), desc="Sever")
        for r in range(self.rounds):
            budget = round(total * (r + 1) / self.rounds) - round(total * r / self.rounds)
            alive = [g[keep[g]] for g in groups]
            quotas = allocate(budget, [len(g) for g in alive])
            singular.append([])
            passes.append([])
            for idx, quota in zip(alive, quotas):
                bar.update()
                if len(idx) == 0:
                    continue
                s, sigma, iterations = self._scores(model, params, X[idx], y[idx], loss_fn, device, gen)
                scores[idx] = s
                singular[-1].append(sigma)
                passes[-1].append(iterations)
                # a stable sort keeps ties in index order, so equal scores are removed reproducibly
                keep[idx[torch.sort(s, descending=True, stable=True).indices[:quota]]] = False
            removed.append(budget)
        bar.close()
        return FilterResult(
            keep_mask=keep,
            scores=scores,
            extra={"removed_per_round": removed, "top_singular_values": singular, "power_iterations": passes},
        )

    def _groups(self, y: Tensor) -> list[Tensor]:
        """Indices of the points filtered together: one group per class, or all points."""
        if not self.per_class:
            return [torch.arange(len(y))]
        if task_of(y) == "regression":
            raise PoisonReachError("per_class needs class labels, but y holds regression targets: use per_class=False")
        if y.is_floating_point():  # soft labels: the most probable class
            y = (y[:, 0] > 0.5).long() if y.shape[1] == 1 else y.argmax(1)
        return [(y == c).nonzero().flatten() for c in torch.unique(y)]

    def _scores(self, model, params, X, y, loss_fn, device, gen) -> tuple[Tensor, float, int]:
        """τ_i = ⟨g_i − ĝ, v⟩² for one group, its top singular value and the passes it took."""
        size = sum(p.numel() for p in params)

        def compute():
            return per_sample_gradients(model, params, X, y, loss_fn, chunk_size=self.chunk_size, device=device)

        # float64 throughout (see the module docstring); the cache holds the converted blocks
        cached = [g.double() for g in compute()] if len(X) * size * 8 <= self.cache_mb * 2**20 else None

        def stream():
            return iter(cached) if cached is not None else (g.double() for g in compute())

        mean = sum(g.sum(0) for g in stream()) / len(X)
        width = min(self.power_block, size)
        q = torch.linalg.qr(torch.randn(size, width, generator=gen, dtype=torch.float64).to(device)).Q
        for iteration in range(1, self.power_iterations + 1):
            # Cᵀ C Q = Σ_i (g_i − ĝ) u_iᵀ with u_i = (g_i − ĝ)ᵀQ, without forming g_i − ĝ
            aq, u_sum, shift = torch.zeros_like(q), torch.zeros(width, dtype=q.dtype, device=device), mean @ q
            for g in stream():
                u = g @ q - shift
                aq += g.T @ u
                u_sum += u.sum(0)
            aq -= torch.outer(mean, u_sum)
            # Rayleigh–Ritz on span(Q): the top eigenpair of Qᵀ Cᵀ C Q gives the best v in the span
            values, vectors = torch.linalg.eigh(q.T @ aq)
            theta, w = float(values[-1]), vectors[:, -1]
            v = q @ w
            if theta <= 0 or float(torch.linalg.vector_norm(aq @ w - theta * v)) <= self.power_tol * theta:
                break  # θ = 0: all gradients are equal, every score is 0
            q = torch.linalg.qr(aq).Q
        else:
            warnings.warn(
                f"Sever's power iteration did not reach power_tol={self.power_tol:g} in {self.power_iterations} "
                "passes: raise power_iterations or power_block",
                stacklevel=3,
            )
        shift = mean @ v
        scores = torch.cat([(g @ v - shift) ** 2 for g in stream()])
        return scores.cpu(), max(theta, 0.0) ** 0.5, iteration


def allocate(count: int, sizes: list[int]) -> list[int]:
    """Split ``count`` removals over groups of the given sizes in proportion to the sizes (largest
    remainders, ties to the earlier group). With count < Σ sizes no group gets more than its size."""
    return largest_remainder(sizes, count).tolist()
