"""Gradient Canceling solved as the nonlinear least-squares problem it is (section 4, equation (18)).

The poisons z = (x_j, y_j) enter the residual r(z) = g(µ) + ε_d·g(ν̂(z)) ∈ R^P (P parameters) and
GC minimises ½‖r(z)‖² over the box Γ. Its Jacobian J (P × the poisons' pixels) is available in both
directions at the cost of a pass over the poisons: Jᵀu is the bracket of equation (19) with v = u
(:func:`poisonreach.gradients.cancel_gradient`), Jd its transpose, forward mode in
the pixels then one backward pass (:func:`poisonreach.gradients.gradient_jvp`). Each iteration:

1. **labels** (``labels="greedy"``): every poison takes, one after the other, the class that most
   lowers ‖r‖². When the cancelled parameters are the last linear layer h = Wφ + b (logistic
   regression, or ``parameters="last"``) and the loss is the cross-entropy or the logistic loss,
   ∇_(W,b) ℓ = (∇_h l) ⊗ (φ, 1) with ∇_h l = p − e_y, so relabelling poison j from a to c changes r
   by (ε_d/m)·(e_a − e_c) ⊗ (φ_j, 1): exact, closed form, no pass over the data;
2. **a Gauss–Newton step in the residual space**: with D the pixels free to move (a pixel at a bound
   that the gradient Jᵀr pushes outwards is held), solve (J D Jᵀ + λI) u = r by conjugate gradient
   (P unknowns, however many pixels) and step d = −D Jᵀu — the minimum-norm solution of the damped
   linearised problem. Pixels the step would carry out of the box are held at the bound they reach
   and the step is solved again for the others (an active set updated inside the step, up to
   ``active_set_rounds`` times), so the step is not clipped after it was computed;
3. **Levenberg–Marquardt**: the step is kept if ‖r‖ fell (λ shrinks), else undone and λ grows.

The labels are real classes throughout: every poison is an image in the box with one integer label.

Data parallel (:mod:`poisonreach.distributed`): each rank holds a shard of the poisons. Jᵀu is
per poison, so local; Jd, the residual and ‖Jᵀr‖² are sums over the poisons, all-reduced; the CG
vectors live in the residual space, replicated, so their dot products need no traffic; the label
pass gathers the poisons' features (m × (d + 1), small) and runs the same pass on every rank, in
the single-process order. Only the order of the sums differs from one process.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from .. import distributed
from ..errors import PoisonReachError
from ..gradients import cancel_gradient, chunks, conjugate_gradient, flat_norm, flatten, gradient_jvp, unflatten
from ..losses import cross_entropy, logistic
from ..models import features, last_linear
from ..validation import Choice, Number, evaluating
from .base import PoisonResult, clamp_box
from .canceling import CancelingAttack, CancelingProblem, canceling_problem, load_checkpoint, save_checkpoint

LABELS = ("greedy", "fixed")


@dataclass
class Iterate:
    """Where the solver is after ``iteration`` steps (what a checkpoint holds): the poisons, their
    labels, the Levenberg–Marquardt damping (None before the first step, inf when no step helped),
    and per step ‖r‖, the seconds since the start, the labels changed and the damping."""

    iteration: int
    x: Tensor
    y: Tensor
    damping: float | None
    history: list[float]
    time_history: list[float]
    labels_changed: list[int] = field(default_factory=list)
    damping_history: list[float] = field(default_factory=list)

    def finished(self, tolerance: float) -> bool:
        return self.history[-1] <= tolerance * self.history[0] or self.damping == math.inf


def relabel(p: CancelingProblem, x: Tensor, y: Tensor, r: list[Tensor]) -> tuple[Tensor, list[Tensor], int]:
    """One coordinate pass of hard-label reassignment for a last-layer residual (module docstring,
    step 1): poison after poison, the class c minimising ‖r + (ε_d/m)(e_{y_j} − e_c) ⊗ (φ_j, 1)‖²,
    the residual updated exactly after each change. Returns the labels, the residual and the number
    of labels changed."""
    alpha = p.eps_d / p.m
    one_logit = p.num_outputs == 1
    phi = torch.cat([torch.cat([features(p.model, x[sl]).detach().flatten(1) for sl in chunks(len(x), p.chunk_size)]),
                     torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
    phi, y = distributed.gather_rows(phi, p.m, p.chunk_size), distributed.gather_rows(y, p.m, p.chunk_size)  # every rank: the same pass over all
    R = torch.cat([r[0].reshape(p.num_outputs, -1), r[1].reshape(p.num_outputs, 1)], dim=1).double()
    # e(c): the label's part of ∇_h l = p − e(y), a one-hot row, or the label itself for one logit
    codes = torch.eye(2 if one_logit else p.num_outputs, dtype=R.dtype, device=R.device)
    codes = codes[:, 1:] if one_logit else codes
    y = y.clone()
    changed = 0
    for j in range(p.m):
        f = phi[j].double()
        s = R @ f  # ⟨R, e ⊗ φ̃_j⟩ = e·s
        diff = codes[y[j]] - codes  # e(a) − e(c) for every candidate c
        gain = 2 * alpha * (diff @ s) + alpha**2 * (diff**2).sum(1) * (f @ f)
        c = int(torch.argmin(gain))
        if gain[c] < 0:
            R += alpha * torch.outer(diff[c], f)
            y[j] = c
            changed += 1
    W, b = R[:, :-1].to(r[0].dtype), R[:, -1].to(r[1].dtype)
    return y[p.local], [W.reshape(r[0].shape), b.reshape(r[1].shape)], changed


class GaussNewtonCanceling(CancelingAttack):
    """Gradient Canceling by bound-aware Gauss–Newton / Levenberg–Marquardt steps with hard labels
    (see the module docstring).

    Parameters
    ----------
    eps_d: the poison budget ε_d = m / n (> 0); m = round(n·ε_d) poisons, at least one.
    iterations: Gauss–Newton steps (each one label pass, one CG solve, one trial per LM retry).
    cg_iterations: most conjugate-gradient iterations per solve (two passes over the poisons each).
    cg_tolerance: CG stops once ‖(J D Jᵀ + λI)u − r‖ ≤ cg_tolerance·‖r‖.
    damping: the first λ, relative to the curvature ‖Jᵀr‖²/‖r‖² along r.
    active_set_rounds: re-solves per step after holding the pixels the step would carry out of Γ.
    labels: ``greedy`` (each poison takes the class that most lowers ‖r‖², at the start and after
        every step; needs the cancelled parameters to be the last linear layer and the
        cross-entropy or logistic loss) or ``fixed`` (the labels of the clean points they start from).
    tolerance: stop once ‖r‖ / ‖r_0‖ ≤ tolerance.
    chunk_size, seed: as in :class:`GradientCanceling`.
    checkpoint: a file to save the state to every ``checkpoint_every`` steps; a checkpoint written
        with the same configuration and data is resumed.
    """

    name = "gc"
    data_parallel = True
    stopping = ("iterations", "tolerance")  # a step does not depend on them: a checkpoint resumes under others
    constraints = {
        "cg_tolerance": Number(low=0, low_open=True, high=1),
        "damping": Number(low=0, low_open=True),
        "active_set_rounds": Number(low=0, integer=True),
        "labels": Choice(LABELS),
        "tolerance": Number(low=0),
    }

    def __init__(
        self,
        eps_d: float,
        *,
        iterations: int = 100,
        cg_iterations: int = 40,
        cg_tolerance: float = 0.1,
        damping: float = 1e-3,
        active_set_rounds: int = 2,
        labels: str = "greedy",
        tolerance: float = 1e-4,
        chunk_size: int = 1024,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 5,
        **shared,
    ):
        self._set_params(locals())

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None, start: PoisonResult | None = None) -> PoisonResult:
        """Craft poisons against the target ``model`` (its parameters are w) on clean data (X, y),
        from ``start``'s first m poisons if given (:func:`canceling_problem`).

        ``extra`` holds per iteration the wall time since the start (``time_history``, s, the first
        entry after setting up), the labels changed by each pass and the LM damping."""
        device = self._device(model)
        with evaluating(model):  # the target is a fixed w: no dropout, batch-norm running statistics
            started = time.perf_counter()
            problem = canceling_problem(self, model, X, y, loss, device, start)
            self._check_labels(problem, loss)
            s = self.solve(problem, started)
        return self._result(s.x, s.y, problem.source, history=s.history, tau=problem.tau, kept=problem.kept, **problem.record(),
                            time_history=s.time_history, labels_changed=s.labels_changed, damping_history=s.damping_history)

    def solve(self, p: CancelingProblem, started: float) -> Iterate:
        """Run the solver on problem ``p`` (from a checkpoint when one matches), ``started`` the
        clock the time history counts from."""
        fingerprint = p.fingerprint(self)
        saved = load_checkpoint(self.checkpoint, fingerprint, p.device)
        state = self._start(p) if saved is None else Iterate(**{**saved, "x": saved["x"][p.local], "y": saved["y"][p.local]})
        r = p.residual(p.gradient_sum(state.x, state.y))  # not in a checkpoint: one pass rebuilds it
        if not state.history:  # a fresh start: its residual is the first entry
            state.history.append(flat_norm(r))
            state.time_history.append(time.perf_counter() - started)
        started = time.perf_counter() - state.time_history[-1]  # a resumed run continues its clock
        bar = self._progress(range(state.iteration, self.iterations), desc=f"GC-GN eps_d={self.eps_d:g}")
        for _ in bar:
            if state.finished(self.tolerance):
                break
            x, y = state.x, state.y
            if self.labels == "greedy":
                y, r, changed = relabel(p, x, y, r)
                state.labels_changed.append(changed)
            state.x, r, state.damping = self._step(p, x, y, r, state.damping)
            state.y = y
            state.iteration += 1
            state.history.append(flat_norm(r))
            state.time_history.append(time.perf_counter() - started)
            state.damping_history.append(state.damping)
            bar.set_postfix(ratio=f"{state.history[-1] / max(state.history[0], 1e-30):.3g}")
            if self.checkpoint is not None and state.iteration % self.checkpoint_every == 0:
                save_checkpoint(self.checkpoint, fingerprint, asdict(self._gathered(p, state)))
        bar.close()
        return self._gathered(p, state)

    @staticmethod
    def _gathered(p: CancelingProblem, state: Iterate) -> Iterate:
        """The state with every rank's poisons (in one process: the state itself)."""
        if not distributed.active():
            return state
        return dataclasses.replace(state, x=distributed.gather_rows(state.x, p.m, p.chunk_size),
                                   y=distributed.gather_rows(state.y, p.m, p.chunk_size))

    def _start(self, p: CancelingProblem) -> Iterate:
        """The start points projected onto Γ, with their labels (this rank's)."""
        x, y = p.start_points(p.local)
        return Iterate(iteration=0, x=x, y=y, damping=None, history=[], time_history=[])

    def _step(self, p: CancelingProblem, x: Tensor, y: Tensor, r: list[Tensor], lam: float | None):
        """One Levenberg–Marquardt step (module docstring, steps 2 and 3); λ = inf: no step helps."""
        alpha = p.eps_d / p.m
        rf = flatten(r)
        norm = float(rf.norm())
        transpose = lambda u: alpha * cancel_gradient(p.model, p.params, x, y, p.loss_fn, unflatten(u, r), chunk_size=self.chunk_size).x  # noqa: E731
        forward = lambda d: alpha * flatten(gradient_jvp(p.model, p.params, x, y, p.loss_fn, d, chunk_size=self.chunk_size, all_reduce=True))  # noqa: E731
        g = transpose(rf)
        free = torch.ones_like(x, dtype=torch.bool)
        if p.low is not None:  # held: at a bound, pushed outwards by the descent direction −g
            free &= ~(((x <= p.low) & (g > 0)) | ((x >= p.high) & (g < 0)))
        if lam is None:
            lam = self.damping * distributed.reduce_number(float((g.double() ** 2).sum())) / max(norm**2, 1e-300)
        for _ in range(8):
            d = self._gauss_newton(p, x, rf, free, lam, transpose, forward)
            x_new = clamp_box(x + d, p.low, p.high)
            r_new = p.residual(p.gradient_sum(x_new, y))
            if flat_norm(r_new) < norm:
                return x_new, r_new, lam / 3
            lam *= 4
        return x, r, math.inf

    def _gauss_newton(self, p, x, rf, free, lam, transpose, forward) -> Tensor:
        """d = fixed − D Jᵀu, (J D Jᵀ + λI)u = r + J·fixed: pixels that would leave Γ are held at
        the bound they reach (``fixed`` moves them there) and the rest re-solved."""
        free = free.clone()
        fixed = torch.zeros_like(x)
        target = rf
        for round_ in range(self.active_set_rounds + 1):
            mask = free.to(x.dtype)
            apply = lambda V: torch.stack([forward(mask * transpose(v)) for v in V]) + lam * V  # noqa: E731
            u, _ = conjugate_gradient(apply, target[None], iterations=self.cg_iterations, tolerance=self.cg_tolerance, truncate=True)
            d = fixed - mask * transpose(u[0])
            if p.low is None or round_ == self.active_set_rounds:
                return d
            out = free & ((x + d < p.low) | (x + d > p.high))
            if not distributed.reduce_number(bool(out.any()), "max"):  # every rank takes the same rounds
                return d
            free &= ~out
            fixed = torch.where(out, clamp_box(x + d, p.low, p.high) - x, fixed)
            target = rf + forward(fixed)

    def _check_labels(self, p: CancelingProblem, loss) -> None:
        if self.labels != "greedy":
            return
        head = list(last_linear(p.model).parameters())
        if p.y.is_floating_point():
            raise PoisonReachError(
                "labels='greedy' assigns class indices, but the clean labels are floats (soft labels or regression "
                "targets): pass int64 class labels, or use labels='fixed'"
            )
        if [id(t) for t in p.params] != [id(t) for t in head] or p.loss_fn not in (cross_entropy, logistic) or loss is not None:
            raise PoisonReachError(
                "labels='greedy' relabels in closed form, which needs the cancelled parameters to be the last linear "
                "layer (logistic regression, or parameters='last') and the cross-entropy or logistic loss: "
                "use parameters='last' or labels='fixed'"
            )
