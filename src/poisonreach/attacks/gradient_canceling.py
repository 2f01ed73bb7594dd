"""The Gradient Canceling attack (section 4, Algorithm 1, equations (16)–(19)).

GC looks for poisons ν̂ = (1/m) Σ_j δ_{z_j}, m = round(n·ε_d), that make the target parameter w
stationary on the mixed data: it minimises L(ν̂) = ½‖g(µ) + ε_d·g(ν̂)‖² (equation (18), set up in
:mod:`poisonreach.attacks.canceling`) by projected gradient descent on the poisons, using the exact
gradient (19)

    ∂L/∂z_j = (ε_d/m) · ∇_z ⟨∇_w ℓ(z_j; w), v⟩,   v = g(µ) + ε_d·g(ν̂)  (ε_d/m = 1/n).

Each step costs two passes over the poisons: g(ν̂) chunk by chunk without a graph, then the
gradient of ⟨∇_w ℓ(z_j; w), v⟩ chunk by chunk with v fixed. That is exactly (19), holds one chunk's
graph in memory instead of the whole poison set's, and g(µ), g(ν̂) stay explicit sums.

Where we differ from the official code: the gradient covers all parameters (``parameters="all"``, not
only the first weight tensor), the model is in eval mode (no dropout), g(·) are means (not sums), and
each step is projected onto the admissible set Γ (``box``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..gradients import cancel_gradient, flat_norm
from ..losses import task_of, to_probabilities
from ..validation import Number, evaluating, flag
from .base import PoisonResult, clamp_box, scheduled_lr
from .canceling import CancelingAttack, CancelingProblem, canceling_problem, load_checkpoint, save_checkpoint


def project_simplex(p: Tensor) -> Tensor:
    """Euclidean projection of each row onto the probability simplex (sort-based)."""
    u, _ = torch.sort(p, dim=1, descending=True)
    css = u.cumsum(dim=1) - 1
    k = torch.arange(1, p.shape[1] + 1, device=p.device, dtype=p.dtype)
    rho = ((u - css / k) > 0).sum(dim=1, keepdim=True)
    theta = css.gather(1, rho - 1) / rho
    return (p - theta).clamp_min(0)


@dataclass
class Descent:
    """Where the descent is at the start of ``epoch`` (what a checkpoint holds): the poisons and
    their labels, the per-point momentum buffers, ‖g(µ) + ε_d·g(ν̂)‖ per epoch so far, and the
    backtracking state (the step's scale, the epochs undone)."""

    epoch: int
    x: Tensor
    y: Tensor
    buf_x: Tensor
    buf_y: Tensor | None
    history: list[float]
    step_scale: float = 1.0
    rejected: int = 0


@dataclass
class Point:
    """The residual at an accepted start of an epoch, kept to undo the epoch that follows."""

    x: Tensor
    y: Tensor
    g_nu_sum: list[Tensor]
    v: list[Tensor]
    norm: float


class GradientCanceling(CancelingAttack):
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
    block_size: poisons updated per step; None updates all at once (the paper). With a block size
        the running g(ν̂) is updated exactly after each block (block-coordinate descent).
    chunk_size: rows per forward/backward chunk; bounds memory, not the result.
    optimize_labels: also optimise the labels: class probabilities projected onto the simplex, or
        regression targets (free without a box, within the clean targets' range with one).
    seed: seeds the initial subsample, the replaced subset and the block order.
    checkpoint: a file to save the state to every ``checkpoint_every`` epochs; an existing
        checkpoint written with the same configuration and data is resumed.

    ``presets`` holds named settings: ``GradientCanceling(eps_d, **GradientCanceling.presets["paper"])``
    is appendix C.1's.
    """

    name = "gc-pgd"
    # The paper's setting (appendix C.1): SGD with momentum, cosine schedule, lr 0.5, 1000 epochs,
    # the whole poison set as one block.
    presets = {"paper": dict(epochs=1000, lr=0.5, momentum=0.9, schedule="cosine", backtrack=False, block_size=None)}
    constraints = {
        "momentum": Number(low=0, high=1),
        "backtrack": flag,
        "block_size": Number(low=1, integer=True, optional=True),
        "optimize_labels": flag,
    }

    def __init__(
        self,
        eps_d: float,
        *,
        epochs: int = 200,
        lr: float = 1.0,
        momentum: float = 0.9,
        schedule: str = "cosine",
        backtrack: bool = True,
        block_size: int | None = None,
        chunk_size: int = 128,
        optimize_labels: bool = False,
        checkpoint: str | os.PathLike | None = None,
        checkpoint_every: int = 25,
        **shared,
    ):
        self._set_params(locals())

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None, start: PoisonResult | None = None) -> PoisonResult:
        """Craft poisons against the target ``model`` (its parameters are w) on clean data (X, y),
        from ``start``'s first m poisons if given (:func:`canceling_problem`), projected onto Γ
        like every later iterate."""
        device = self._device(model)
        with evaluating(model):  # the target is a fixed w: no dropout, batch-norm running statistics
            problem = canceling_problem(self, model, X, y, loss, device, start)
            state = self._descend(problem)
        return self._result(
            state.x, state.y, problem.source, history=state.history, tau=problem.tau, kept=problem.kept,
            **problem.record(), rejected_epochs=state.rejected, final_step_scale=state.step_scale,
        )

    def _descend(self, p: CancelingProblem) -> Descent:
        """Algorithm 1: projected gradient descent on the poisons, with backtracking and checkpoints."""
        state, resumed_at, fingerprint = self._start(p)
        accepted = None  # the start of the last accepted epoch, for backtracking
        bar = self._progress(range(state.epoch, self.epochs + 1), desc=f"GC eps_d={self.eps_d:g}")
        for epoch in bar:
            g_nu_sum = p.gradient_sum(state.x, state.y)  # line 4: g(ν̂), as a sum over the poisons
            v = p.residual(g_nu_sum)  # line 5: L = ½‖v‖²
            norm = flat_norm(v)
            if epoch != resumed_at:  # a resumed epoch was decided before its checkpoint was written
                if self.backtrack and accepted is not None and norm > accepted.norm:
                    g_nu_sum, v, norm = self._undo(state, accepted)
                elif self.backtrack and epoch > 0:
                    state.step_scale = min(1.0, state.step_scale * 1.1)
                self._record(state, epoch, norm, fingerprint)
            if self.backtrack:
                accepted = Point(state.x.clone(), state.y.clone(), g_nu_sum, v, norm)
            bar.set_postfix(grad_norm=f"{norm:.3g}", ratio=f"{norm / max(state.history[0], 1e-30):.3g}")
            if epoch == self.epochs:
                break  # the last entry is the norm after the final update
            lr = self._lr_at(epoch) * state.step_scale
            blocks = self._blocks(p.m, epoch)
            for b, idx in enumerate(blocks):
                last = b == len(blocks) - 1  # the next epoch recomputes g(ν̂) anyway
                old = None if last else p.gradient_sum(state.x[idx], state.y[idx])
                self._step(p, state, idx, v, lr)  # lines 6–7: step along (19), project onto Γ
                if not last:  # keep g(ν̂) exact for the next block
                    new = p.gradient_sum(state.x[idx], state.y[idx])
                    g_nu_sum = [s - o + w for s, o, w in zip(g_nu_sum, old, new)]
                    v = p.residual(g_nu_sum)
        bar.close()
        return state

    def _step(self, p: CancelingProblem, state: Descent, idx, v: list[Tensor], lr: float) -> None:
        """One projected heavy-ball step on the poisons ``idx`` along n·∂L/∂z_j (19)."""
        x, py = state.x, state.y
        bracket = cancel_gradient(p.model, p.params, x[idx], py[idx], p.loss_fn, v, chunk_size=self.chunk_size, with_labels=self.optimize_labels)
        with torch.no_grad():
            # n·∂L/∂z_j = ∇_z⟨∇_w ℓ(z_j), v⟩ (ε_d = m/n): a per-point step (see the class docstring)
            x[idx] = clamp_box(self._momentum(x[idx], bracket.x, state.buf_x, idx, lr), p.low, p.high)
            if self.optimize_labels:
                py[idx] = self._project_labels(p, self._momentum(py[idx], bracket.y, state.buf_y, idx, lr))

    def _momentum(self, z: Tensor, grad: Tensor, buf: Tensor, idx, lr: float) -> Tensor:
        """Heavy-ball SGD on the rows ``idx``; momentum is kept per point so blocks don't drag others."""
        buf[idx] = self.momentum * buf[idx] + grad
        return z - lr * buf[idx]

    def _project_labels(self, p: CancelingProblem, labels: Tensor) -> Tensor:
        """Labels back into Γ: regression targets into the clean targets' range (free without a
        box), probabilities onto [0, 1] for one output or the simplex."""
        if task_of(p.y) == "regression":
            return labels if self.box is None else torch.clamp(labels, p.y.min().to(p.device), p.y.max().to(p.device))
        return labels.clamp(0, 1) if p.num_outputs == 1 else project_simplex(labels)

    def _lr_at(self, epoch: int) -> float:
        return scheduled_lr(self.lr, epoch, self.epochs, self.schedule)

    def _blocks(self, m: int, epoch: int) -> list:
        if self.block_size is None or self.block_size >= m:
            return [slice(0, m)]
        # the order depends only on (seed, epoch), so a resumed run visits the same blocks
        order = torch.randperm(m, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        return [order[i : i + self.block_size].sort().values for i in range(0, m, self.block_size)]

    # -- bookkeeping: backtracking, the history, checkpoints ---------------------------------------

    def _undo(self, state: Descent, accepted: Point) -> tuple[list[Tensor], list[Tensor], float]:
        """The last epoch increased the objective: restore its start, halve the step, restart momentum."""
        state.x, state.y = accepted.x.clone(), accepted.y.clone()
        state.step_scale /= 2
        state.rejected += 1
        for buf in (state.buf_x, state.buf_y):
            if buf is not None:
                buf.zero_()
        return accepted.g_nu_sum, accepted.v, accepted.norm

    def _record(self, state: Descent, epoch: int, norm: float, fingerprint: str) -> None:
        """Enter the epoch's decided norm in the history; save a checkpoint when one is due."""
        state.history.append(norm)
        state.epoch = epoch
        if self.checkpoint is not None and epoch > 0 and epoch % self.checkpoint_every == 0:
            self._save_checkpoint(fingerprint, state)

    def _save_checkpoint(self, fingerprint: str, state: Descent) -> None:
        save_checkpoint(self.checkpoint, fingerprint, asdict(state))

    def _start(self, p: CancelingProblem) -> tuple[Descent, int | None, str]:
        """The state to descend from: the checkpoint's when one was written by this configuration
        on these data (with the epoch it resumes), else the start points; and the fingerprint."""
        fingerprint = p.fingerprint(self)
        saved = load_checkpoint(self.checkpoint, fingerprint, p.device)
        if saved is not None:
            state = Descent(**saved)
            return state, state.epoch, fingerprint
        x, py = (t.clone() for t in p.start_points())
        if self.optimize_labels and task_of(p.y) != "regression":
            py = to_probabilities(py, p.num_outputs)
        buf_y = torch.zeros_like(py) if self.optimize_labels else None
        return Descent(epoch=0, x=x, y=py, buf_x=torch.zeros_like(x), buf_y=buf_y, history=[]), None, fingerprint
