"""The Gradient Canceling problem (section 4, equations (16)–(18)) that both GC solvers solve.

For a target w, clean data µ (n points) and a budget ε_d, find m = round(n·ε_d) poisons ν̂ in the
admissible set Γ that minimise

    L(ν̂) = ½‖g(µ) + ε_d·g(ν̂)‖²,   g(ν̂) = (1/m) Σ_j ∇_w ℓ(z_j; w)              (18)

When the victim's training adds weight decay λ (it minimises the mean loss plus λ/2·‖w‖², the
attacks' ``weight_decay``), its stationarity at w is g(µ) + ε_d·g(ν̂) + (1 + ε_d)·λw = 0 with
1 + ε_d = (n + m)/n, so the constant (n + m)/n·λw joins g(µ) (``CancelingProblem.g_mu``).

:class:`~poisonreach.attacks.GradientCanceling` descends on the m points (Algorithm 1);
:class:`~poisonreach.attacks.FrankWolfeCanceling` optimises over measures (appendix B) and rounds
to m points; :class:`~poisonreach.attacks.GaussNewtonCanceling` takes Gauss–Newton steps.
:class:`CancelingAttack`, their base, declares the problem's parameters once. :func:`canceling_problem` does what they all need first: the replaced subset of appendix
C.10, the seeded start points, the box Γ, the threshold τ and g(µ), an explicit sum over chunks.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import distributed, io
from ..errors import PoisonReachError
from ..gradients import flat_norm, gradient_sum, select_parameters
from ..losses import LossFn, resolve
from ..reachability import threshold
from ..rows import select_rows
from ..estimator import keywords
from ..validation import check_model_data
from .base import Attack, PoisonResult, box_bounds, clamp_box, draw_sources


def _problem(*, box: tuple[float, float] | str | None = (0.0, 1.0), replace: bool = False, parameters: str = "all",
             weight_decay: float = 0.0):
    """The parameters of problem (18) every solver takes (documented in :class:`CancelingAttack`)."""


class CancelingAttack(Attack):
    """Base of the attacks that solve problem (18); their constructors take its parameters as
    ``**shared`` (with ``seed``, ``device`` and ``progress``). Their ``poison`` takes, beside the
    data, an optional ``start``: poisons to start from instead of the seeded clean points (the label
    flips that planted a target, say; :func:`canceling_problem`).

    Parameters
    ----------
    box: the admissible set Γ for the features: ``(low, high)`` pixel bounds, ``"data-range"`` (the
        per-feature range of the clean data, the paper's GC-c), or None (unconstrained).
    replace: appendix C.10: a random subset of size n/(1+ε_d) of the clean data stands in for µ.
    parameters: which parameters' gradient to cancel: ``all`` (default), ``last`` (Theorem 4) or
        ``first`` (the official code's behaviour).
    weight_decay: the victim's weight decay λ (it minimises the mean loss plus λ/2·‖w‖²); its
        stationarity then carries the term (1 + ε_d)·λw.
    """

    model_targeted = True
    shared = keywords(_problem) + Attack.shared
    data_parallel = False  # whether the solver runs on sharded poisons (:mod:`poisonreach.distributed`)


@dataclass
class CancelingProblem:
    """Problem (18) for one target. ``X``, ``y`` are all the clean data (poisons start from them);
    µ is the ``n`` points of ``kept`` (all of them unless the attack replaces data); ``source`` are
    the m start points; ``eps_d`` is the proportion m/n the victim trains on (the attack's ε_d
    rounded to whole points), so that the residual is the victim's stationarity exactly; ``low``/``high`` bound Γ (None: unbounded); ``gen`` continues the seeded
    stream the draws came from.

    Data parallel (:mod:`poisonreach.distributed`): g(µ) is each rank's sum over its shard of µ,
    all-reduced; ``local`` are this rank's poisons (whole chunks of range(m)), and :meth:`gradient_sum`
    sums over the poisons it is given, this rank's, all-reduced, so the residual is the same on
    every rank. In one process ``local`` is all of them and the reductions do nothing."""

    model: nn.Module
    params: list[Tensor]
    loss_fn: LossFn
    num_outputs: int
    X: Tensor
    y: Tensor
    n: int
    eps_d: float
    g_mu: list[Tensor]
    source: Tensor
    low: Tensor | None
    high: Tensor | None
    tau: float
    kept: Tensor | None
    gen: torch.Generator
    chunk_size: int
    device: torch.device
    local: slice
    start_x: Tensor  # the m start points (clean ones, or a given start's) and their labels
    start_y: Tensor
    clean_start_norm: float | None = None  # ‖residual‖ at the clean start, kept when another start is given

    @property
    def m(self) -> int:
        return len(self.source)

    def record(self) -> dict:
        """What a result's ``extra`` says of the problem: n, m, and the residual norm at the clean
        start when another start was given."""
        said = {"num_clean": self.n, "num_poisons": self.m}
        return said if self.clean_start_norm is None else {**said, "clean_start_grad_norm": self.clean_start_norm}

    def start_points(self, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """The start points ``rows`` projected onto Γ (float32, on the device) and their labels."""
        return clamp_box(self.start_x[rows].to(device=self.device, dtype=torch.float32), self.low, self.high), self.start_y[rows].to(self.device)

    def gradient_sum(self, x: Tensor, y: Tensor) -> list[Tensor]:
        """Σ_j ∇_w ℓ(z_j; w) over the points (x, y), chunk by chunk, and over the ranks' points."""
        return gradient_sum(self.model, self.params, x, y, self.loss_fn, chunk_size=self.chunk_size, device=self.device, all_reduce=True)

    def residual(self, g_nu_sum: list[Tensor]) -> list[Tensor]:
        """v = g(µ) + ε_d·g(ν̂) from Σ_j ∇_w ℓ(z_j; w) (g(ν̂) is that sum over m)."""
        return [gm + self.eps_d / self.m * gs for gm, gs in zip(self.g_mu, g_nu_sum)]

    def fingerprint(self, attack: Attack) -> str:
        """What a checkpoint must have been written by: the attack's configuration and these data.
        The options in the attack's ``stopping`` only say when to stop, not what a step does, so
        they are left out: a run can be extended, or stopped at a looser tolerance, from its
        checkpoint."""
        config = {k: v for k, v in attack.config().items() if k not in attack.stopping}
        data = [len(self.X), self.m, float(self.X.sum(dtype=torch.float64)), float(self.y.double().sum()),
                float(self.start_x.sum(dtype=torch.float64)), float(self.start_y.double().sum())]
        return json.dumps({"config": config, "data": data}, sort_keys=True)


def load_checkpoint(path: str | os.PathLike | None, fingerprint: str, device: torch.device) -> dict | None:
    """The state saved at ``path`` by :func:`save_checkpoint` with this fingerprint (tensors on
    ``device``), None when there is no file; a file from another configuration is refused."""
    if path is None or not Path(path).is_file():
        return None
    saved = io.load_tensors(path)
    if saved.get("fingerprint") != fingerprint:
        raise PoisonReachError(
            f"checkpoint {path} was written by a different configuration or data set: delete it or choose another checkpoint path"
        )
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in saved["state"].items()}


def save_checkpoint(path: str | os.PathLike, fingerprint: str, state: dict) -> None:
    """Write a solver's state (tensors and plain values) atomically, on the CPU (rank 0 writes)."""
    io.save_tensors(path, {"fingerprint": fingerprint, "state": {k: v.cpu() if isinstance(v, Tensor) else v for k, v in state.items()}})


def canceling_problem(attack: CancelingAttack, model: nn.Module, X: Tensor, y: Tensor, loss, device: torch.device,
                      start: PoisonResult | None = None) -> CancelingProblem:
    """Set up problem (18) for ``attack`` (its ``eps_d``, ``seed``, ``replace``, ``box``,
    ``parameters``, ``chunk_size``) against the target ``model`` on the clean data (X, y). Every
    rank draws the same poisons and start points; each sums g(µ) over its shard of µ.

    ``start`` (a :class:`PoisonResult`, e.g. the label flips that planted the target) gives the
    start points instead of the seeded clean ones: its first m poisons, images and labels, with
    their sources. The residual norm at the clean start is then kept too (``clean_start_norm``), so
    that a ratio against it means the same whichever start the solver took."""
    if distributed.active() and not attack.data_parallel:
        raise PoisonReachError(f"attack {attack.name!r} runs in one process: drop --nproc (or torchrun), or use the Gauss–Newton "
                               "solver (--attack gc), which runs data parallel")
    gen = torch.Generator().manual_seed(attack.seed)
    kept = None
    if attack.replace:  # appendix C.10: a subset of size n/(1 + ε_d) stands in for µ
        kept = torch.randperm(len(X), generator=gen)[: max(1, round(len(X) / (1 + attack.eps_d)))].sort().values
        X_mu, y_mu = select_rows(X, kept), y[kept]
    else:
        X_mu, y_mu = X, y
    n = len(X_mu)
    num_outputs = check_model_data(model, X, y, device, strict=not callable(loss))
    loss_fn = resolve(num_outputs, y, loss)
    params = select_parameters(model, attack.parameters)
    source = draw_sources(len(X), attack.num_poisons(n), gen)
    low, high = box_bounds(attack.box, X, device=device)
    tau = threshold(model, X_mu, y_mu, weight_decay=attack.weight_decay, device=device).tau if loss is None else math.nan
    # g(µ): the sum over the clean chunks divided by n; computed once, w is fixed. The victim's
    # regulariser λ/2·‖w‖² enters its stationarity as (n + m)/n·λw: a constant of the problem.
    decay = attack.weight_decay * (n + len(source)) / n
    rows = distributed.shard(n, attack.chunk_size)
    g_mu = [g / n + decay * p.detach() for g, p in
            zip(gradient_sum(model, params, select_rows(X_mu, rows), y_mu[rows], loss_fn, chunk_size=attack.chunk_size, device=device, all_reduce=True), params)]
    p = CancelingProblem(
        model=model, params=params, loss_fn=loss_fn, num_outputs=num_outputs, X=X, y=y, n=n, eps_d=len(source) / n,
        g_mu=g_mu, source=source, low=low, high=high, tau=tau, kept=kept, gen=gen, chunk_size=attack.chunk_size, device=device,
        local=distributed.shard(len(source), attack.chunk_size), start_x=X[source], start_y=y[source],
    )
    if start is None:
        return p
    m = p.m
    if len(start.y) < m or tuple(start.x.shape[1:]) != tuple(X.shape[1:]) or start.y.dtype != y.dtype:
        raise PoisonReachError(f"the start poisons ({len(start.y)} of shape {tuple(start.x.shape[1:])}, labels {start.y.dtype}) must be at "
                               f"least the attack's {m} points, shaped and labelled as the clean data ({tuple(X.shape[1:])}, {y.dtype})")
    p.clean_start_norm = flat_norm(p.residual(p.gradient_sum(*p.start_points(p.local))))
    p.source, p.start_x, p.start_y = start.source_indices[:m].clone(), start.x[:m], start.y[:m]
    return p
