"""The Gradient Canceling attack (section 4, Algorithm 1, equations (16)–(19)).

GC looks for poisons ν̂ = (1/m) Σ_j δ_{z_j}, m = round(n·ε_d), that make the target parameter w
stationary on the mixed data: it minimises L(ν̂) = ½‖g(µ) + ε_d·g(ν̂)‖² (equation (18)) by projected
gradient descent on the poisons, using the exact gradient (19)

    ∂L/∂z_j = (ε_d/m) · ∇_z ⟨∇_w ℓ(z_j; w), v⟩,   v = g(µ) + ε_d·g(ν̂)  (ε_d/m = 1/n).

Each step costs two passes over the poisons: g(ν̂) chunk by chunk without a graph, then the
gradient of ⟨∇_w ℓ(z_j; w), v⟩ chunk by chunk with v fixed. That is exactly (19), holds one chunk's
double-backward graph in memory instead of the whole poison set's, and g(µ), g(ν̂) stay explicit sums.

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
from tqdm.auto import tqdm

from .. import io
from ..errors import PoisonReachError
from ..losses import resolve, task_of, to_probabilities
from ..reachability import threshold
from ..validation import check_choice, check_model_data, check_number
from .base import Attack, PoisonResult
from ..gradients import PARAMETER_SETS, cancel_gradient, flat_norm, gradient_sum, select_parameters

SCHEDULES = ("cosine", "constant")

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
    optimize_labels: also optimise the labels, as class probabilities projected onto the simplex.
    replace: appendix C.10: a random subset of size n/(1+ε_d) of the clean data stands in for µ.
    parameters: which parameters' gradient to cancel: ``all`` (default), ``last`` (Theorem 4) or
        ``first`` (the official code's behaviour).
    seed: seeds the initial subsample, the replaced subset and the block order.
    checkpoint: a file to save the state to every ``checkpoint_every`` epochs; an existing
        checkpoint written with the same configuration and data is resumed.
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
    ):
        check_number("eps_d", eps_d, low=0, low_open=True)
        check_number("epochs", epochs, low=0, integer=True)
        check_number("lr", lr, low=0, low_open=True)
        check_number("momentum", momentum, low=0, high=1)
        check_choice("schedule", schedule, SCHEDULES)
        if batch_size is not None:
            check_number("batch_size", batch_size, low=1, integer=True)
        check_number("chunk_size", chunk_size, low=1, integer=True)
        if isinstance(box, list):
            box = tuple(box)
        if not (box is None or box == "data-range" or (isinstance(box, tuple) and len(box) == 2 and box[0] < box[1])):
            raise PoisonReachError(f"box must be (low, high) with low < high, 'data-range' or None, got {box!r}")
        check_choice("parameters", parameters, PARAMETER_SETS)
        check_number("seed", seed, integer=True)
        check_number("checkpoint_every", checkpoint_every, low=1, integer=True)
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
        device = torch.device(self.device) if self.device is not None else next(model.parameters()).device
        was_training = model.training
        model.eval()  # the target is a fixed w: no dropout, batch-norm running statistics
        try:
            return self._run(model, X, y, loss, device)
        finally:
            model.train(was_training)

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
        if self.optimize_labels and task_of(y) == "regression":
            raise PoisonReachError("optimize_labels applies to classification labels, not regression targets")
        params = select_parameters(model, self.parameters)

        source = torch.randperm(n_total, generator=gen)[:m] if m <= n_total else torch.randint(n_total, (m,), generator=gen)
        x = X[source].to(device=device, dtype=torch.float32).clone()
        py = y[source].to(device).clone()
        if self.optimize_labels:
            py = to_probabilities(py, num_outputs)
        low, high = self._bounds(X, device)
        fingerprint = self._fingerprint(X, y, m)
        state = self._load_checkpoint(fingerprint, device)
        resumed_at = None if state is None else state["epoch"]
        if state is None:
            state = {"epoch": 0, "history": [], "step_scale": 1.0, "rejected": 0, "x": x, "y": py,
                     "buf_x": torch.zeros_like(x), "buf_y": torch.zeros_like(py) if self.optimize_labels else None}

        tau = threshold(model, X_mu, y_mu, device=device).tau if loss is None else math.nan
        # g(µ): the sum over the clean chunks divided by n; computed once, w is fixed.
        g_mu = [g / n for g in gradient_sum(model, params, X_mu, y_mu, loss_fn, chunk_size=self.chunk_size, device=device)]
        weight = self.eps_d / m  # ε_d · (1/m): the weight of one poison's gradient in v

        def residual(g_nu_sum: list[Tensor]) -> list[Tensor]:
            return [gm + weight * gs for gm, gs in zip(g_mu, g_nu_sum)]  # v = g(µ) + ε_d·g(ν̂)

        accepted = None  # the state at the start of the last accepted epoch, for backtracking
        bar = tqdm(range(state["epoch"], self.epochs + 1), desc=f"GC eps_d={self.eps_d:g}", disable=None if self.progress is None else not self.progress, leave=False)
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
                        py[idx] = py[idx].clamp(0, 1) if num_outputs == 1 else project_simplex(py[idx])
                if b < len(blocks) - 1:  # keep g(ν̂) exact for the next block; the next epoch recomputes it anyway
                    new = gradient_sum(model, params, x[idx], py[idx], loss_fn, chunk_size=self.chunk_size, device=device)
                    g_nu_sum = [s - o + w for s, o, w in zip(g_nu_sum, old, new)]
                    v = residual(g_nu_sum)
        bar.close()
        return PoisonResult(
            x=state["x"].detach().cpu(),
            y=state["y"].detach().cpu(),
            source_indices=source,
            grad_norm_history=state["history"],
            tau=tau,
            eps_d=self.eps_d,
            config=self.config(),
            seed=self.seed,
            kept_indices=kept,
            extra={"num_clean": n, "num_poisons": m, "rejected_epochs": state["rejected"], "final_step_scale": state["step_scale"]},
        )

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

    def _bounds(self, X: Tensor, device) -> tuple[Tensor | None, Tensor | None]:
        if self.box is None:
            return None, None
        if self.box == "data-range":
            return X.amin(dim=0).to(device), X.amax(dim=0).to(device)
        return torch.tensor(float(self.box[0]), device=device), torch.tensor(float(self.box[1]), device=device)

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
