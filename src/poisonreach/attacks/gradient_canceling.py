"""The Gradient Canceling attack (section 4, Algorithm 1, equations (16)–(19)).

GC looks for poisons ν̂ = (1/m) Σ_j δ_{z_j}, m = round(n·ε_d), that make the target parameter w
stationary on the mixed data: it minimises L(ν̂) = ½‖g(µ) + ε_d·g(ν̂)‖² (equation (18)) by projected
gradient descent on the poisons, using the exact gradient (19)

    ∂L/∂z_j = (ε_d/m) · ∇_z ⟨∇_w ℓ(z_j; w), v⟩,   v = g(µ) + ε_d·g(ν̂)  (ε_d/m = 1/n).

Each step costs two passes over the poisons: g(ν̂) chunk by chunk without a graph, then the
gradient of ⟨∇_w ℓ(z_j; w), v⟩ chunk by chunk with v fixed. That is exactly (19), holds one chunk's
double-backward graph in memory instead of the whole poison set's, and g(µ), g(ν̂) stay explicit sums.

``solver="frank-wolfe"`` solves the same problem over poisoning *measures* instead (appendix B,
(B.1)–(B.5)): ν is a weighted set of atoms, each iteration adds the atom that solves the linear
subproblem (B.5) and mixes it in by (B.3); see :meth:`GradientCanceling._frank_wolfe`.

Where we differ from the official code: the gradient covers all parameters (``parameters="all"``, not
only the first weight tensor), the model is in eval mode (no dropout), g(·) are means (not sums), and
each step is projected onto the admissible set Γ (``box``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import io
from ..errors import PoisonReachError
from ..losses import resolve, task_of, to_probabilities
from ..reachability import threshold
from ..validation import check_choice, check_model_data, check_number, evaluating
from .base import Attack, PoisonResult, box_bounds, check_box
from ..gradients import PARAMETER_SETS, cancel_gradient, chunks, flat_norm, gradient_sum, select_parameters

SCHEDULES = ("cosine", "constant")
SOLVERS = ("pgd", "frank-wolfe")
# line-search: the exact minimiser of (B.1) along the FW direction; open-loop: η_t = 2/(t + 2) (appendix B)
FW_STEPS = ("line-search", "open-loop")

# The paper's setting (appendix C.1): SGD with momentum, cosine schedule, lr 0.5, 1000 epochs,
# the whole poison set as one batch.
PRESETS = {
    "paper": dict(epochs=1000, lr=0.5, momentum=0.9, schedule="cosine", backtrack=False, batch_size=None),
}


def project_simplex(p: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based)."""
    u, _ = torch.sort(p, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, p.shape[1] + 1, device=p.device, dtype=p.dtype)
    rho = ((u - css / k) > 0).sum(dim=1, keepdim=True)
    theta = css.gather(1, rho - 1) / rho
    return (p - theta).clamp_min(0)


def atom_scores(
    model: nn.Module,
    params: list[Tensor],
    X: Tensor,
    y: Tensor,
    loss_fn,
    v: list[Tensor],
    *,
    chunk_size: int,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """⟨v, ∇_w ℓ(z_j; w)⟩ for every row z_j = (x_j, y_j), and its gradient in x_j: the objective of
    the linear subproblem (B.5) with v = g(µ) + ε_d·g(ν_t), and what projected gradient needs.

    One double backward per chunk: with a = 1 as the backward's seed, Σ_j a_j ∇_w ℓ(z_j) paired with v
    has derivative ⟨v, ∇_w ℓ(z_j)⟩ in a_j (the per-row values) and Σ_j ∇_x⟨v, ∇_w ℓ(z_j)⟩ in x, whose
    row j depends on z_j alone (the model is in eval mode). Returns both on ``device``.
    """
    values = torch.empty(len(X), dtype=X.dtype, device=device)
    grads = torch.empty(X.shape, dtype=X.dtype, device=device)
    for sl in chunks(len(X), chunk_size):
        xc = X[sl].to(device).detach().requires_grad_(True)
        seed = torch.ones(len(xc), dtype=xc.dtype, device=device, requires_grad=True)
        losses = loss_fn(model(xc), y[sl].to(device))
        g = torch.autograd.grad(losses, params, grad_outputs=seed, create_graph=True)
        dot = sum((gi * vi).sum() for gi, vi in zip(g, v))
        # allow_unused: a loss that is constant in x (or in the seed) has no path to it
        dv, dx = torch.autograd.grad(dot, (seed, xc), allow_unused=True)
        values[sl] = 0.0 if dv is None else dv.detach()
        grads[sl] = 0.0 if dx is None else dx.detach()
    return values, grads


def linear_minimization(
    model: nn.Module,
    params: list[Tensor],
    loss_fn,
    v: list[Tensor],
    starts: Tensor,
    labels: Tensor,
    low: Tensor,
    high: Tensor,
    *,
    steps: int,
    chunk_size: int,
    device: torch.device,
) -> tuple[int, Tensor, Tensor, float]:
    """Approximately solve the linear subproblem (B.5): min over z = (x, y) ∈ Γ = [low, high] × labels
    of ⟨v, ∇_w ℓ(z; w)⟩.

    The paper notes that (B.5) is nonconvex. Even for a linear model h = Wx + b with cross-entropy it
    is ⟨p(x) − e_y, V_W x + v_b⟩ (∇_W ℓ = (p − e_y)xᵀ), a nonconvex function of x for each label. For
    one output it depends on x only through two affine functions (h and u = v_Wᵀx + v_b):
    (σ(h) − y)·u for the logistic loss and (h − y)·u, an indefinite quadratic, for the squared loss;
    its minimum over the box is then on the boundary of the box's 2-D image, i.e. at a box point
    with all coordinates but (generically) one at a bound, which the corner starts below reach.

    So we run projected gradient from every start paired with every label, and from the box corner
    that minimises the linearisation at each of those (x_i = high_i where the gradient is negative,
    else low_i), and keep the best point found; it is a local minimum, not a certified global one.
    Each candidate takes box-scaled steps −s·(high − low)·∇/‖∇‖_∞, with s doubled (up to 1) after a
    decrease and halved, the step undone, otherwise.

    Returns the index of the start the winner came from, its x and label, and its value.
    """
    k = len(starts)
    # label-major: candidate i starts from starts[i % k]
    x = starts.to(device).repeat(len(labels), *[1] * (starts.dim() - 1)).clamp(min=low, max=high)
    ly = labels.to(device).repeat_interleave(k, dim=0)
    val, grad = atom_scores(model, params, x, ly, loss_fn, v, chunk_size=chunk_size, device=device)
    corners = torch.where(grad < 0, high, low)
    cval, cgrad = atom_scores(model, params, corners, ly, loss_fn, v, chunk_size=chunk_size, device=device)
    x, ly, val, grad = torch.cat([x, corners]), torch.cat([ly, ly]), torch.cat([val, cval]), torch.cat([grad, cgrad])
    width = high - low
    shape = (-1,) + (1,) * (x.dim() - 1)
    step = torch.full((len(x),), 0.25, dtype=x.dtype, device=device)
    for _ in range(steps):
        scale = grad.flatten(1).abs().amax(1).clamp_min(torch.finfo(grad.dtype).tiny)
        trial = (x - (step / scale).reshape(shape) * width * grad).clamp(min=low, max=high)
        tval, tgrad = atom_scores(model, params, trial, ly, loss_fn, v, chunk_size=chunk_size, device=device)
        better = tval < val
        x[better], val[better], grad[better] = trial[better], tval[better], tgrad[better]
        step = torch.where(better, (2 * step).clamp(max=1.0), step / 2)
    best = int(torch.argmin(val))
    return best % k, x[best], ly[best], float(val[best])


def exact_step(r: list[Tensor], d: list[Tensor]) -> float:
    """argmin over η ∈ [0, 1] of ½‖r + η·d‖².

    Along the Frank–Wolfe direction ν_t → δ_z, g(ν) is affine in η, so (B.1) is the quadratic
    ½‖r‖² + η⟨r, d⟩ + ½η²‖d‖² with r = g(µ) + ε_d·g(ν_t) and d = ε_d·(∇_w ℓ(z) − g(ν_t)); its
    minimiser −⟨r, d⟩/‖d‖² is clipped to [0, 1] so that ν stays a probability measure.
    """
    rd = float(sum((a.double() * b.double()).sum() for a, b in zip(r, d)))
    dd = float(sum((b.double() ** 2).sum() for b in d))
    return 0.0 if dd == 0 else min(max(-rd / dd, 0.0), 1.0)


def largest_remainder(weights: Tensor, m: int) -> Tensor:
    """Multiplicities c_i ≥ 0 with Σ c_i = m that round m·w_i (Hamilton's largest-remainder method):
    ⌊m·w_i⌋ each, plus one for the atoms with the largest remainders until the total is m."""
    exact = weights.double() / weights.double().sum() * m
    counts = exact.floor().long()
    rest = m - int(counts.sum())
    order = torch.argsort(exact - counts, descending=True, stable=True)
    counts[order[:rest]] += 1
    return counts


class GradientCanceling(Attack):
    """Gradient Canceling: poisons that make a target model w stationary on clean ∪ poisons.

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = round(n·ε_d) poisons, at least one.
    epochs: passes of projected gradient descent over the poisons.
    lr: step size per point. The exact gradient (19) carries the factor 1/n; the step is taken on
        n·∂L/∂z_j so one lr serves data sets of any size.
    momentum: heavy-ball momentum of the SGD update.
    schedule: ``cosine`` (annealed to 0 over ``epochs``) or ``constant``.
    backtrack: undo an epoch that increased the objective, halve the step and restart momentum;
        after each accepted epoch the step grows by 10% back towards ``lr``. The objective is
        computed every epoch anyway, so this costs a copy of the poisons, not a pass; it keeps one
        ``lr`` usable for bounded and unbounded poisons alike.
    batch_size: poisons updated per step; None updates all at once (the paper). With a batch size
        the running g(ν̂) is updated exactly after each block (block-coordinate descent).
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    box: the admissible set Γ for the features: ``(low, high)`` pixel bounds, ``"data-range"`` (the
        per-feature range of the clean data, the paper's GC-c), or None (unconstrained).
    optimize_labels: also optimise the labels: class probabilities projected onto the simplex, or
        regression targets (free without a box, within the clean targets' range with one).
    replace: appendix C.10: a random subset of size n/(1+ε_d) of the clean data stands in for µ.
    parameters: which parameters' gradient to cancel: ``all`` (default), ``last`` (Theorem 4) or
        ``first`` (the official code's behaviour).
    seed: seeds the initial subsample, the replaced subset and the block order (and the starts of
        the Frank–Wolfe subproblems).
    checkpoint: a file to save the state to every ``checkpoint_every`` epochs; an existing
        checkpoint written with the same configuration and data is resumed (``pgd`` only).
    solver: ``pgd`` (Algorithm 1, the paper's method) or ``frank-wolfe`` (appendix B; see
        :meth:`_frank_wolfe`). Frank–Wolfe runs ``epochs`` iterations, each adding one atom, needs a
        bounded ``box``, chooses every atom's label itself (so ``optimize_labels`` changes nothing),
        and ignores ``lr``, ``momentum``, ``schedule`` and ``backtrack``.
    fw_step: Frank–Wolfe step sizes: ``line-search`` (the exact minimiser, :func:`exact_step`) or
        ``open-loop`` (η_t = 2/(t + 2), the paper's example); both take η_0 = 1.
    fw_starts: clean points drawn per Frank–Wolfe iteration as starts of the subproblem (B.5); each
        is paired with every label and also gives a box-corner start (:func:`linear_minimization`).
    fw_steps: projected-gradient steps per start in the subproblem (B.5).
    """

    name = "gc"
    model_targeted = True

    def __init__(
        self,
        eps_d: float,
        *,
        epochs: int = 200,
        lr: float = 1.0,
        momentum: float = 0.9,
        schedule: str = "cosine",
        backtrack: bool = True,
        batch_size: int | None = None,
        chunk_size: int = 128,
        box: tuple[float, float] | str | None = (0.0, 1.0),
        optimize_labels: bool = False,
        replace: bool = False,
        parameters: str = "all",
        seed: int = 0,
        device: str | torch.device | None = None,
        progress: bool | None = None,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 25,
        solver: str = "pgd",
        fw_step: str = "line-search",
        fw_starts: int = 8,
        fw_steps: int = 30,
    ):
        check_number("eps_d", eps_d, low=0, low_open=True)
        check_number("epochs", epochs, low=0, integer=True)
        check_number("lr", lr, low=0, low_open=True)
        check_number("momentum", momentum, low=0, high=1)
        check_choice("schedule", schedule, SCHEDULES)
        if batch_size is not None:
            check_number("batch_size", batch_size, low=1, integer=True)
        check_number("chunk_size", chunk_size, low=1, integer=True)
        box = check_box(box)
        check_choice("parameters", parameters, PARAMETER_SETS)
        check_number("seed", seed, integer=True)
        check_number("checkpoint_every", checkpoint_every, low=1, integer=True)
        check_choice("solver", solver, SOLVERS)
        check_choice("fw_step", fw_step, FW_STEPS)
        check_number("fw_starts", fw_starts, low=1, integer=True)
        check_number("fw_steps", fw_steps, low=0, integer=True)
        if solver == "frank-wolfe":
            if box is None:
                raise PoisonReachError(
                    "solver='frank-wolfe' needs a bounded box: its subproblem (B.5) has no minimum over "
                    "unbounded features; pass box=(low, high) or box='data-range'"
                )
            if batch_size is not None:
                raise PoisonReachError("batch_size applies to solver='pgd' only: leave it None with 'frank-wolfe'")
            if checkpoint is not None:
                raise PoisonReachError("checkpoints are supported by solver='pgd' only: leave checkpoint None with 'frank-wolfe'")
        self.eps_d = float(eps_d)
        self.epochs = epochs
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.schedule = schedule
        self.backtrack = bool(backtrack)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.box = box
        self.optimize_labels = bool(optimize_labels)
        self.replace = bool(replace)
        self.parameters = parameters
        self.seed = seed
        self.device = device
        self.progress = progress
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self.solver = solver
        self.fw_step = fw_step
        self.fw_starts = fw_starts
        self.fw_steps = fw_steps

    @classmethod
    def from_preset(cls, name: str, eps_d: float, **overrides) -> "GradientCanceling":
        """A named setting from :data:`PRESETS` (``"paper"``: appendix C.1), with overrides."""
        check_choice("preset", name, PRESETS)
        return cls(eps_d, **{**PRESETS[name], **overrides})

    def _lr_at(self, epoch: int) -> float:
        if self.schedule == "cosine" and self.epochs > 0:
            return self.lr * 0.5 * (1 + math.cos(math.pi * epoch / self.epochs))
        return self.lr

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> PoisonResult:
        """Craft poisons against the target ``model`` (its parameters are w) on clean data (X, y)."""
        device = self._device(model)
        with evaluating(model):  # the target is a fixed w: no dropout, batch-norm running statistics
            return self._run(model, X, y, loss, device)

    def _run(self, model: nn.Module, X: Tensor, y: Tensor, loss, device: torch.device) -> PoisonResult:
        gen = torch.Generator().manual_seed(self.seed)
        n_total = len(X)
        kept = None
        if self.replace:
            kept = torch.randperm(n_total, generator=gen)[: max(1, round(n_total / (1 + self.eps_d)))].sort().values
            X_mu, y_mu = X[kept], y[kept]
        else:
            X_mu, y_mu = X, y
        n = len(X_mu)
        m = max(1, round(n * self.eps_d))
        num_outputs = check_model_data(model, X, y, device, strict=not callable(loss))
        loss_fn = resolve(num_outputs, y, loss)
        params = select_parameters(model, self.parameters)

        source = torch.randperm(n_total, generator=gen)[:m] if m <= n_total else torch.randint(n_total, (m,), generator=gen)
        low, high = box_bounds(self.box, X, device=device)
        tau = threshold(model, X_mu, y_mu, device=device).tau if loss is None else math.nan
        # g(µ): the sum over the clean chunks divided by n; computed once, w is fixed.
        g_mu = [g / n for g in gradient_sum(model, params, X_mu, y_mu, loss_fn, chunk_size=self.chunk_size, device=device)]
        if self.solver == "frank-wolfe":
            x, py, source, history, extra = self._frank_wolfe(model, params, X, y, loss_fn, num_outputs, g_mu, source, low, high, gen, device)
        else:
            x, py, history, extra = self._pgd(model, params, X, y, n, loss_fn, num_outputs, g_mu, source, low, high, device)
        return PoisonResult(
            x=x.detach().cpu(),
            y=py.detach().cpu(),
            source_indices=source,
            grad_norm_history=history,
            tau=tau,
            eps_d=self.eps_d,
            config=self.config(),
            seed=self.seed,
            kept_indices=kept,
            extra={"num_clean": n, "num_poisons": m, **extra},
        )

    def _pgd(self, model, params, X, y, n, loss_fn, num_outputs, g_mu, source, low, high, device):
        """Algorithm 1: projected gradient descent on the poisons (see the module docstring)."""
        m = len(source)
        x = X[source].to(device=device, dtype=torch.float32).clone()
        py = y[source].to(device).clone()
        regression = task_of(y) == "regression"
        if self.optimize_labels and not regression:
            py = to_probabilities(py, num_outputs)
        # regression targets move freely without a box, within the clean targets' range with one
        y_low, y_high = (None, None) if self.box is None else (y.min().to(device), y.max().to(device))
        fingerprint = self._fingerprint(X, y, m)
        state = self._load_checkpoint(fingerprint, device)
        resumed_at = None if state is None else state["epoch"]
        if state is None:
            state = {"epoch": 0, "history": [], "step_scale": 1.0, "rejected": 0, "x": x, "y": py,
                     "buf_x": torch.zeros_like(x), "buf_y": torch.zeros_like(py) if self.optimize_labels else None}
        weight = self.eps_d / m  # ε_d · (1/m): the weight of one poison's gradient in v

        def residual(g_nu_sum: list[Tensor]) -> list[Tensor]:
            return [gm + weight * gs for gm, gs in zip(g_mu, g_nu_sum)]  # v = g(µ) + ε_d·g(ν̂)

        accepted = None  # the state at the start of the last accepted epoch, for backtracking
        bar = self._progress(range(state["epoch"], self.epochs + 1), desc=f"GC eps_d={self.eps_d:g}")
        for epoch in bar:
            g_nu_sum = gradient_sum(model, params, state["x"], state["y"], loss_fn, chunk_size=self.chunk_size, device=device)
            v = residual(g_nu_sum)
            norm = flat_norm(v)
            if epoch != resumed_at:  # a resumed epoch was decided before its checkpoint was written
                if self.backtrack and accepted is not None and norm > accepted["norm"]:
                    g_nu_sum, v, norm = self._undo(state, accepted)
                elif self.backtrack and epoch > 0:
                    state["step_scale"] = min(1.0, state["step_scale"] * 1.1)
                state["history"].append(norm)
                state["epoch"] = epoch
                if self.checkpoint is not None and epoch > 0 and epoch % self.checkpoint_every == 0:
                    self._save_checkpoint(fingerprint, state)
            if self.backtrack:
                accepted = {"x": state["x"].clone(), "y": state["y"].clone(), "g_nu_sum": g_nu_sum, "v": v, "norm": norm}
            bar.set_postfix(grad_norm=f"{norm:.3g}", ratio=f"{norm / max(state['history'][0], 1e-30):.3g}")
            if epoch == self.epochs:
                break  # the last entry is the norm after the final update
            x, py = state["x"], state["y"]
            lr = self._lr_at(epoch) * state["step_scale"]
            blocks = self._blocks(m, epoch)
            for b, idx in enumerate(blocks):
                gx, gy, old = cancel_gradient(
                    model, params, x[idx], py[idx], loss_fn, v, chunk_size=self.chunk_size, with_labels=self.optimize_labels
                )
                with torch.no_grad():
                    # n·∂L/∂z_j = (n·ε_d/m)·∇_z⟨∇_w ℓ(z_j), v⟩: a per-point step (see the class docstring)
                    factor = n * weight
                    x[idx] = self._step(x[idx], gx * factor, state["buf_x"], idx, lr)
                    x[idx] = torch.maximum(torch.minimum(x[idx], high), low) if low is not None else x[idx]
                    if self.optimize_labels:
                        py[idx] = self._step(py[idx], gy * factor, state["buf_y"], idx, lr)
                        if regression:
                            py[idx] = py[idx] if y_low is None else torch.clamp(py[idx], y_low, y_high)
                        else:
                            py[idx] = py[idx].clamp(0, 1) if num_outputs == 1 else project_simplex(py[idx])
                if b < len(blocks) - 1:  # keep g(ν̂) exact for the next block; the next epoch recomputes it anyway
                    new = gradient_sum(model, params, x[idx], py[idx], loss_fn, chunk_size=self.chunk_size, device=device)
                    g_nu_sum = [s - o + w for s, o, w in zip(g_nu_sum, old, new)]
                    v = residual(g_nu_sum)
        bar.close()
        return state["x"], state["y"], state["history"], {"rejected_epochs": state["rejected"], "final_step_scale": state["step_scale"]}

    def _frank_wolfe(self, model, params, X, y, loss_fn, num_outputs, g_mu, source, low, high, gen, device):
        """Frank–Wolfe on the poisoning measure ν (appendix B).

        (B.1), min_ν ½‖g(µ) + ε_d·g(ν)‖², is a convex quadratic in ν. ν is kept as atoms z_i with
        weights w_i and g(ν) = Σ_i w_i ∇_w ℓ(z_i; w) as a running vector: ν_0 is uniform on the
        clean points PGD starts from (projected onto the box), so both solvers' histories start from
        the same measure when the clean data lies in the box. Iteration t solves (B.5) for v = g(µ) +
        ε_d·g(ν_t) (:func:`linear_minimization`), then ν_{t+1} = (1 − η_t)ν_t + η_t δ_{z_t} (B.3) with
        η_t from ``fw_step``; the first step is η_0 = 1 with either rule (as 2/(0 + 2)), so ν_1 = δ_{z_0}:
        left to the line search, ν_0's m atoms linger with small weights and make the rounding below
        coarse (on the OR data of the tests, ratio 0.079 after rounding instead of 0.0085). The FW gap −⟨v, d⟩, d = ε_d(∇_w ℓ(z_t) − g(ν_t)), bounds the
        suboptimality of ν_t when (B.5) is solved exactly; with an approximate solution it is a lower
        bound of the true gap.

        The paper's ν̂ is uniform over m points, so the final measure is rounded to multiplicities that
        sum to m (:func:`largest_remainder`): atoms lighter than about 1/(2m) are dropped. The history
        holds ‖g(µ) + ε_d·g(ν_t)‖ of the measures; ``extra`` has the objective ½‖·‖² of the last
        measure and of the returned m points (``objective_measure``, ``objective_rounded``).
        """
        m = len(source)
        eps = self.eps_d
        atoms_x = X[source].to(device=device, dtype=torch.float32).clamp(min=low, max=high)
        atoms_y = y[source].to(device)
        atoms_src = source.clone()
        weights = torch.full((m,), 1.0 / m, dtype=torch.float64, device=device)
        labels = self._labels(y, num_outputs, device)
        # the running sums in float64, so that hundreds of rank-one updates do not drift
        g_nu = [s.double() / m for s in gradient_sum(model, params, atoms_x, atoms_y, loss_fn, chunk_size=self.chunk_size, device=device)]
        r = [gm.double() + eps * gn for gm, gn in zip(g_mu, g_nu)]
        history, gaps, etas = [flat_norm(r)], [], []
        bar = self._progress(range(self.epochs), desc=f"GC-FW eps_d={self.eps_d:g}")
        for t in bar:
            idx = torch.randint(len(X), (self.fw_starts,), generator=gen)
            v = [ri.to(p.dtype) for ri, p in zip(r, params)]
            k, zx, zy, _ = linear_minimization(
                model, params, loss_fn, v, X[idx].to(atoms_x.dtype), labels, low, high, steps=self.fw_steps, chunk_size=self.chunk_size, device=device
            )
            g_z = gradient_sum(model, params, zx[None], zy[None], loss_fn, chunk_size=1, device=device)
            d = [eps * (gz.double() - gn) for gz, gn in zip(g_z, g_nu)]
            gaps.append(-float(sum((ri * di).sum() for ri, di in zip(r, d))))
            eta = exact_step(r, d) if self.fw_step == "line-search" and t > 0 else 2.0 / (t + 2)
            etas.append(eta)
            if eta > 0:
                r = [ri + eta * di for ri, di in zip(r, d)]
                g_nu = [(1 - eta) * gn + eta * gz.double() for gn, gz in zip(g_nu, g_z)]
                weights = torch.cat([weights * (1 - eta), weights.new_tensor([eta])])
                atoms_x, atoms_y = torch.cat([atoms_x, zx[None]]), torch.cat([atoms_y, zy[None].to(atoms_y.dtype)])
                atoms_src = torch.cat([atoms_src, idx[k : k + 1]])
                keep = weights > 0  # η = 1 replaces the whole measure
                weights, atoms_x, atoms_y, atoms_src = weights[keep], atoms_x[keep], atoms_y[keep], atoms_src[keep.cpu()]
            history.append(flat_norm(r))
            bar.set_postfix(grad_norm=f"{history[-1]:.3g}", ratio=f"{history[-1] / max(history[0], 1e-30):.3g}", atoms=len(weights))
        bar.close()
        counts = largest_remainder(weights, m)
        x = atoms_x.repeat_interleave(counts, dim=0)
        py = atoms_y.repeat_interleave(counts, dim=0)
        rounded = [gm + eps / m * s for gm, s in zip(g_mu, gradient_sum(model, params, x, py, loss_fn, chunk_size=self.chunk_size, device=device))]
        extra = {
            "fw_gap": gaps,
            "fw_step_sizes": etas,
            "num_atoms": len(weights),
            "objective_measure": 0.5 * history[-1] ** 2,
            "objective_rounded": 0.5 * flat_norm(rounded) ** 2,
        }
        return x, py, atoms_src.repeat_interleave(counts.cpu()), history, extra

    @staticmethod
    def _labels(y: Tensor, num_outputs: int, device) -> Tensor:
        """The label part of Γ, in the clean labels' format."""
        if task_of(y) == "regression":
            # (B.5) is linear in a regression target y (the squared loss gives (h − y)·u), unbounded
            # below unless y is bounded: Γ takes the clean targets' range, whose ends are the minimisers
            return torch.stack([y.min(), y.max()]).to(device)
        classes = torch.arange(2 if num_outputs == 1 else num_outputs, device=device)
        # (B.5) is linear in a soft label, so a class (a vertex of the simplex) is always a minimiser
        return to_probabilities(classes, num_outputs) if y.is_floating_point() else classes

    @staticmethod
    def _undo(state: dict, accepted: dict) -> tuple[list[Tensor], list[Tensor], float]:
        """The last epoch increased the objective: restore its start, halve the step, restart momentum."""
        state.update(x=accepted["x"].clone(), y=accepted["y"].clone(), step_scale=state["step_scale"] / 2, rejected=state["rejected"] + 1)
        for buf in (state["buf_x"], state["buf_y"]):
            if buf is not None:
                buf.zero_()
        return accepted["g_nu_sum"], accepted["v"], accepted["norm"]

    def _step(self, z: Tensor, grad: Tensor, buf: Tensor, idx, lr: float) -> Tensor:
        """Heavy-ball SGD on the rows ``idx``; momentum is kept per point so blocks don't drag others."""
        buf[idx] = self.momentum * buf[idx] + grad
        return z - lr * buf[idx]

    def _blocks(self, m: int, epoch: int) -> list:
        if self.batch_size is None or self.batch_size >= m:
            return [slice(0, m)]
        # the order depends only on (seed, epoch), so a resumed run visits the same blocks
        order = torch.randperm(m, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [order[i : i + self.batch_size].sort().values for i in range(0, m, self.batch_size)]

    # -- checkpoints: resume a long run after a kill, losing at most checkpoint_every epochs --------

    def _fingerprint(self, X: Tensor, y: Tensor, m: int) -> str:
        # the schedule depends on epochs, so a checkpoint resumes only the very same configuration
        data = [len(X), m, float(X.double().sum()), float(y.double().sum())]
        return json.dumps({"config": self.config(), "data": data}, sort_keys=True)

    def _load_checkpoint(self, fingerprint: str, device) -> dict | None:
        if self.checkpoint is None or not Path(self.checkpoint).is_file():
            return None
        saved = io.load_tensors(self.checkpoint)
        if saved.get("fingerprint") != fingerprint:
            raise PoisonReachError(
                f"checkpoint {self.checkpoint} was written by a different configuration or data set: "
                "delete it or choose another checkpoint path"
            )
        return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in saved["state"].items()}

    def _save_checkpoint(self, fingerprint: str, state: dict) -> None:
        """The state at the start of an epoch, after its backtracking decision."""
        cpu = {k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()}
        io.save_tensors(self.checkpoint, {"fingerprint": fingerprint, "state": cpu})
