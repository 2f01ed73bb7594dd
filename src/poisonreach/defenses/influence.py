"""The influence defense (Koh and Liang 2017, "Understanding Black-box Predictions via Influence
Functions"), one of the filtering defenses of appendix C.8 (Table 8).

Upweighting a training point z by ε changes the parameters by −ε·H⁻¹∇ℓ(z; w) (Koh & Liang,
equation (1)), where H = (1/n) Σ_j ∇²ℓ(z_j; w) is the Hessian of the mean training loss at the
model's parameters w; so it changes z's own loss by I_up,loss(z, z) = −gᵀH⁻¹g with g = ∇ℓ(z; w)
(their equation (2) with z_test = z). Removing z is ε = −1/n: its own loss rises by (1/n)·gᵀH⁻¹g.
The defense scores every point by its self-influence

    s_i = g_iᵀ (H + λI)⁻¹ g_i,       λ = ``damping``,

and removes the points with the largest s_i: those whose removal would most change their own loss,
i.e. the points the model fits only because they are in the training set. H + λI is the Hessian of
the objective (1/n) Σ ℓ + (λ/2)‖w‖²: train with weight decay λ to make that the exact objective;
the damping also makes H + λI positive definite for a non-convex model whose H is not, which every
solver here requires (an error says so otherwise). The points are ranked globally: H is shared, so
the scores of all points are on one scale.

Every s_i needs its own inverse-Hessian-vector product. The solvers (``auto``, the default, takes
``exact`` for at most 20,000 selected parameters and ``cg`` above):

- ``exact``: H + λI is built densely from P Hessian-vector products in one pass over the data (a
  chunk's forward and first backward serve all columns, ``block_size`` per batched second
  backward), Cholesky-factorised once as LLᵀ, and s_i = ‖L⁻¹g_i‖² for all points through
  triangular solves. Needs P² numbers: for small P (logistic regression, or ``parameters="last"``).
- ``cg``: conjugate gradient on (H + λI) x_i = g_i for ``block_size`` points at a time. H is shared,
  so the block is one matrix of right-hand sides with an independent CG recurrence per column; each
  iteration is one pass over the data with batched Hessian-vector products.
- ``lissa``: LiSSA (Agarwal et al. 2017, as used by Koh & Liang): x ← g + (I − (Ĥ + λI)/scale)·x
  for ``lissa_depth`` steps, Ĥ the Hessian of a random batch of ``lissa_batch_size`` points drawn
  anew each step (seeded), estimating scale·(H + λI)⁻¹g; averaged over ``lissa_repeats``. It
  converges only when ``lissa_scale`` exceeds the largest eigenvalue of Ĥ + λI.

Hessian-vector products are :func:`poisonreach.gradients.hessian_vector_products`: double backprop
summed over chunks of the data, in eval mode, batched over a block of vectors.

Memory: ``exact`` P² numbers; ``cg`` about 5 × ``block_size`` × P numbers (x, r, p, A·p, g) plus
the double-backward graph of one data chunk times ``block_size`` vectors; ``lissa`` about 3 ×
``block_size`` × P. Time: ``cg`` costs N/``block_size`` × iterations passes over the data, which is
prohibitive for large N and all parameters of a deep model: there, use ``parameters="last"`` with
``exact``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..errors import PoisonReachError
from ..gradients import chunks, conjugate_gradient, hessian_vector_products, per_sample_gradients
from ..validation import Choice, Number
from .base import Filter, FilterResult, removal_count

SOLVERS = ("auto", "cg", "lissa", "exact")

# The exact solver's dense Hessian: 20,000² float32 numbers are 1.6 GB.
EXACT_MAX_PARAMETERS = 20_000


class Influence(Filter):
    """Remove the points of highest self-influence gᵀ(H + λI)⁻¹g (see the module docstring).

    Parameters
    ----------
    fraction: share of the given points removed (the paper: ε_d/(1 + ε_d), as many as poisons).
    solver: ``exact`` (P ≤ 20,000 selected parameters), ``cg``, ``lissa``, or ``auto``: ``exact`` when
        P ≤ 20,000, else ``cg``.
    damping: λ added to the Hessian of the mean loss (> 0 keeps H + λI positive definite).
    parameters: ``all`` (default) or ``last`` (the last linear layer).
    cg_iterations, cg_tolerance: CG stops for a point once ‖(H + λI)x − g‖ ≤ cg_tolerance·‖g‖, or
        after cg_iterations iterations (with a warning).
    lissa_depth, lissa_scale, lissa_repeats, lissa_batch_size: LiSSA's recursion depth, the scale
        that must exceed the largest eigenvalue of the sampled damped Hessian, the number of averaged
        estimates, and the points per sampled Hessian (≥ N: the full Hessian, no sampling).
    block_size: points whose inverse-Hessian-vector products are solved together (and Hessian
        columns built per pass by ``exact``).
    chunk_size: samples per forward/backward; bounds memory, not the result.
    seed: seeds LiSSA's sampling (the other solvers draw nothing).
    """

    name = "influence"
    constraints = {
        "solver": Choice(SOLVERS),
        "cg_tolerance": Number(low=0, low_open=True),
        "lissa_depth": Number(low=1, integer=True),
        "lissa_scale": Number(low=0, low_open=True),
        "lissa_repeats": Number(low=1, integer=True),
        "lissa_batch_size": Number(low=1, integer=True),
        "block_size": Number(low=1, integer=True),
    }

    def __init__(
        self,
        fraction: float,
        *,
        solver: str = "auto",
        damping: float = 0.01,
        parameters: str = "all",
        cg_iterations: int = 100,
        cg_tolerance: float = 1e-5,
        lissa_depth: int = 1000,
        lissa_scale: float = 10.0,
        lissa_repeats: int = 1,
        lissa_batch_size: int = 64,
        block_size: int = 64,
        chunk_size: int = 128,
        **shared,
    ):
        self._set_params(locals())

    def filter(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> FilterResult:
        """Score the points of (X, y) by self-influence at ``model``'s parameters; drop ``fraction``."""
        device, loss_fn, params = self._setup(model, X, y, loss)
        size = sum(p.numel() for p in params)
        solver = self.solver if self.solver != "auto" else "exact" if size <= EXACT_MAX_PARAMETERS else "cg"
        if solver == "exact" and size > EXACT_MAX_PARAMETERS:
            raise PoisonReachError(
                f"solver 'exact' needs a dense {size}×{size} Hessian but allows at most {EXACT_MAX_PARAMETERS} "
                "parameters: use solver='cg' or 'lissa', or parameters='last'"
            )
        damped = DampedHessian(model, params, X, y, loss_fn, damping=self.damping, chunk_size=self.chunk_size, device=device)
        gen = torch.Generator().manual_seed(self.seed)
        factor = self._cholesky(damped) if solver == "exact" else None
        n = len(X)
        scores = torch.empty(n, dtype=torch.float64)
        unconverged = 0
        bar = self._progress(total=n, desc=f"influence ({solver})")
        for sl in chunks(n, self.block_size):
            g = torch.cat(list(per_sample_gradients(model, params, X[sl], y[sl], loss_fn, chunk_size=self.chunk_size, device=device)))
            if solver == "exact":
                s = (torch.linalg.solve_triangular(factor, g.T, upper=False) ** 2).sum(0)  # ‖L⁻¹g‖² = gᵀ(LLᵀ)⁻¹g
            else:
                if solver == "cg":
                    x, missed = conjugate_gradient(damped, g, iterations=self.cg_iterations, tolerance=self.cg_tolerance)
                    unconverged += missed
                else:
                    x = self._lissa(damped, g, gen)
                s = (g * x).sum(1)
            scores[sl] = s.double().cpu()
            bar.update(len(g))
        bar.close()
        if unconverged:
            warnings.warn(
                f"CG did not reach cg_tolerance={self.cg_tolerance:g} for {unconverged} points in "
                f"{self.cg_iterations} iterations: raise cg_iterations or damping",
                stacklevel=2,
            )
        keep = torch.ones(n, dtype=torch.bool)
        keep[torch.sort(scores, descending=True, stable=True).indices[: removal_count(n, self.fraction)]] = False
        return FilterResult(keep_mask=keep, scores=scores, extra={"solver": solver, "num_parameters": size, "cg_unconverged": unconverged})

    def _cholesky(self, damped: "DampedHessian") -> Tensor:
        """The lower Cholesky factor of the dense H + λI."""
        A = damped.dense(self.block_size)
        A = (A + A.T) / 2  # symmetric up to rounding; the factorisation wants exact symmetry
        factor, info = torch.linalg.cholesky_ex(A)
        if info != 0:
            smallest = float(torch.linalg.eigvalsh(A)[0])
            raise PoisonReachError(
                f"H + damping·I is not positive definite (smallest eigenvalue {smallest:.3g}): the model is not at a "
                f"minimum of a convex loss; raise damping above {self.damping - smallest:.3g} or use parameters='last'"
            )
        return factor

    def _lissa(self, damped: "DampedHessian", B: Tensor, gen: torch.Generator) -> Tensor:
        """LiSSA's estimate of (H + λI)⁻¹ b_i for every row b_i of B (Agarwal et al. 2017, Algorithm 1)."""
        estimate = torch.zeros_like(B)
        for _ in range(self.lissa_repeats):
            h = B.clone()
            for _ in range(self.lissa_depth):
                index = torch.randperm(damped.n, generator=gen)[: self.lissa_batch_size]
                h = B + h - damped(h, index) / self.lissa_scale
            if not torch.isfinite(h).all():
                raise PoisonReachError(
                    f"LiSSA diverged: lissa_scale={self.lissa_scale:g} must exceed the largest eigenvalue of the "
                    "sampled Hessian plus damping; raise lissa_scale"
                )
            estimate += h / self.lissa_scale
        return estimate / self.lissa_repeats


class DampedHessian:
    """V ↦ (H + λI)·v for every row v of V (k, P): H = (1/n) Σ_j ∇²ℓ(z_j; w), the Hessian of the
    mean loss over (X, y) at ``params`` (or over the rows ``index``), by
    :func:`poisonreach.gradients.hessian_vector_products` (batched over the rows of V, eval mode).
    """

    def __init__(self, model: nn.Module, params, X: Tensor, y: Tensor, loss_fn, *, damping: float, chunk_size: int, device):
        self.model, self.params, self.X, self.y, self.loss_fn = model, list(params), X, y, loss_fn
        self.damping, self.chunk_size, self.device = damping, chunk_size, device
        self.n = len(X)

    def __call__(self, V: Tensor, index: Tensor | None = None) -> Tensor:
        X, y = (self.X, self.y) if index is None else (self.X[index], self.y[index])
        return self._products(X, y, V) / len(X) + self.damping * V

    def dense(self, block_size: int) -> Tensor:
        """The P × P matrix H + λI, ``block_size`` columns per batched second backward; the forward
        and first backward of a chunk serve all the columns."""
        A = self._products(self.X, self.y, None, block_size=block_size)
        A /= self.n
        A.diagonal().add_(self.damping)
        return A

    def _products(self, X: Tensor, y: Tensor, V: Tensor | None, block_size: int | None = None) -> Tensor:
        return hessian_vector_products(
            self.model, self.params, X, y, self.loss_fn, V, chunk_size=self.chunk_size, device=self.device, block_size=block_size
        )
