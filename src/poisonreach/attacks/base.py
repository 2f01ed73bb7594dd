"""What every poisoning attack shares: constructor validation, ``repr``, and the result type.

An attack takes its hyperparameters in the constructor (validated there) and the data in
``poison(model, X, y, loss=None)``, which returns a :class:`PoisonResult`. The poisons are kept apart
from the clean data; :meth:`PoisonResult.mixed` forms the training set a victim would retrain on.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import io
from ..errors import PoisonReachError
from ..estimator import Estimator
from ..losses import to_probabilities
from ..gradients import PARAMETER_SETS
from ..rows import Rows, concat_rows, select_rows
from ..validation import Choice, Number, check_number, flag

# Constructor arguments that change where or how visibly an attack runs, never its result.
RUNTIME = ("device", "progress", "checkpoint", "checkpoint_every")


def check_box(box) -> tuple[float, float] | str | None:
    """The admissible set Γ of the features: ``(low, high)`` with low < high (a list is accepted),
    ``"data-range"`` (the per-feature range of the clean data, the paper's clipped GC-c) or None."""
    if isinstance(box, list):
        box = tuple(box)
    if box is None or box == "data-range":
        return box
    if isinstance(box, tuple) and len(box) == 2:
        for name, value in zip(("box[0]", "box[1]"), box):
            check_number(name, value)
        if box[0] < box[1]:
            return box
    raise PoisonReachError(f"box must be (low, high) with low < high, 'data-range' or None, got {box!r}")


def box_bounds(box, X: Tensor | Rows, *, device, dtype=torch.float32) -> tuple[Tensor | None, Tensor | None]:
    """Lower and upper bounds of Γ, broadcastable against poisons shaped like X; (None, None) for no box.
    The data range of :class:`~poisonreach.rows.Rows` is reduced chunk by chunk."""
    if box is None:
        return None, None
    if box == "data-range":
        return X.amin(dim=0).to(device, dtype), X.amax(dim=0).to(device, dtype)
    return torch.tensor(float(box[0]), device=device, dtype=dtype), torch.tensor(float(box[1]), device=device, dtype=dtype)


def clamp_box(x: Tensor, low: Tensor | None, high: Tensor | None) -> Tensor:
    """The projection onto the box [low, high] of :func:`box_bounds` (x itself without a box)."""
    return x if low is None else torch.minimum(torch.maximum(x, low), high)


SCHEDULES = ("cosine", "constant")


def scheduled_lr(lr: float, epoch: int, epochs: int, schedule: str) -> float:
    """The step size of ``epoch`` (0-based) of ``epochs``: annealed from ``lr`` to 0 along a half
    cosine (``"cosine"``) or ``lr`` throughout (``"constant"``)."""
    if schedule == "cosine" and epochs > 0:
        return lr * 0.5 * (1 + math.cos(math.pi * epoch / epochs))
    return lr


def draw_sources(n: int, m: int, gen: torch.Generator, *, distinct: bool = True) -> Tensor:
    """The clean points m poisons start from: distinct ones while there are enough (``distinct``),
    else a draw with replacement; seeded by ``gen``."""
    return torch.randperm(n, generator=gen)[:m] if distinct and m <= n else torch.randint(n, (m,), generator=gen)


class Attack(Estimator):
    """Base class of the attacks: hyperparameters in the constructor, data in :meth:`poison`.

    Every attack has a poison budget ε_d (``eps_d`` > 0: m = max(1, round(n·ε_d)) poisons for n clean
    points), a ``seed`` for all its random choices and a ``device``; :attr:`constraints` checks them
    and the arguments several attacks share. Subclasses build their result with :meth:`_result`.

    Parameters
    ----------
    checkpoint_every: how often the state is saved to ``checkpoint``, in epochs or iterations of
        the attack (a resumed attack repeats at most this many).
    """

    constraints = {
        "eps_d": Number(low=0, low_open=True),
        "box": lambda name, value: check_box(value),
        "parameters": Choice(PARAMETER_SETS),
        "replace": flag,
        "checkpoint_every": Number(low=1, integer=True),
        "weight_decay": Number(low=0),
        "schedule": Choice(SCHEDULES),
    }

    def num_poisons(self, n: int) -> int:
        """m = round(n·ε_d) poisons for n clean points, at least one."""
        return max(1, round(n * self.eps_d))

    def _result(self, x: Tensor, y: Tensor, source: Tensor, *, history=(), tau: float = math.nan, kept=None, **extra) -> "PoisonResult":
        """The :class:`PoisonResult` of this attack: its ε_d, seed and configuration, the poisons on the CPU."""
        return PoisonResult(
            x=x.detach().cpu(),
            y=y.detach().cpu(),
            source_indices=source,
            grad_norm_history=list(history),
            tau=tau,
            eps_d=self.eps_d,
            config=self.config(),
            seed=self.seed,
            kept_indices=kept,
            extra=extra,
        )

    def config(self) -> dict:
        """The hyperparameters that determine the result, with the attack's short name under
        ``attack`` (for run folders and checkpoints); runtime settings are left out."""
        params = {k: v for k, v in self.get_params().items() if k not in RUNTIME}
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in params.items()}
        return {"attack": self.name, **params}

    name = "attack"
    # True when ``poison`` takes the target model w (model-targeted, as GC); False when it takes the
    # clean model the attacker knows (the baselines).
    model_targeted = False
    # Options that only say when to stop, not what a step does: a checkpoint written under other
    # values of them resumes (left out of the canceling problem's fingerprint).
    stopping: tuple[str, ...] = ()

    def poison(self, model: nn.Module, X: Tensor, y: Tensor, loss=None) -> "PoisonResult":
        """Craft poisons against ``model`` on the clean training data (X, y)."""
        raise NotImplementedError


@dataclass
class PoisonResult:
    """Poisons and how they were made.

    x, y: the poisoned points (pixel space) and their labels (int64 classes, float probabilities
        when labels were optimised, or float regression targets).
    source_indices: for each poison, the index of the clean training point it started from.
    grad_norm_history: ‖g(µ) + ε_d·g(ν̂)‖₂ per epoch, the first entry before any update (for attacks
        that track it; equation (16)).
    tau: the threshold τ of the target on the clean data (section 3), NaN when not computed.
    kept_indices: the clean points kept when the attack replaces data (appendix C.10); None = all.
    """

    x: Tensor
    y: Tensor
    source_indices: Tensor
    grad_norm_history: list[float]
    tau: float
    eps_d: float
    config: dict
    seed: int
    kept_indices: Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def loss_history(self) -> list[float]:
        """The GC objective ½‖g(µ) + ε_d·g(ν̂)‖² per epoch (equation (18))."""
        return [0.5 * g * g for g in self.grad_norm_history]

    @property
    def grad_norm_initial(self) -> float:
        """‖g(µ) + ε_d·g(ν̂)‖ at the clean start: the first history entry, or, when the attack
        started from other poisons, ``extra["clean_start_grad_norm"]``; NaN without a history."""
        h = self.grad_norm_history
        return float(self.extra.get("clean_start_grad_norm", h[0])) if h else float("nan")

    @property
    def grad_norm_ratio(self) -> float:
        """Final ‖g(µ) + ε_d·g(ν̂)‖ over :attr:`grad_norm_initial`, so that a ratio means the same
        whichever start was taken; NaN without a history."""
        h, initial = self.grad_norm_history, self.grad_norm_initial
        return h[-1] / initial if h and initial > 0 else float("nan")

    def mixed(self, X: Tensor | Rows, y: Tensor, num_outputs: int | None = None) -> tuple[Tensor | Rows, Tensor]:
        """The victim's training set: the kept clean points followed by the poisons. Clean
        :class:`~poisonreach.rows.Rows` stay as they are stored: the set is then a
        :class:`~poisonreach.rows.Concatenated` that serves the poisons' rows from their tensor.

        Soft poison labels turn the clean labels into probabilities (``num_outputs`` columns).
        """
        if self.kept_indices is not None:
            X, y = select_rows(X, self.kept_indices), y[self.kept_indices]
        py = self.y
        if py.is_floating_point() != y.is_floating_point() or py.dim() != y.dim():
            if num_outputs is None:
                raise PoisonReachError("poison labels are probabilities: pass num_outputs to mix them with class labels")
            y, py = to_probabilities(y, num_outputs), to_probabilities(py, num_outputs)
        return concat_rows([X, self.x.to(X.dtype)]), torch.cat([y, py.to(y.dtype)])

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``poisons.pt`` (tensors) and ``poisons.json`` (the rest) into ``directory``."""
        directory = Path(directory)
        tensors = {"x": self.x, "y": self.y, "source_indices": self.source_indices}
        if self.kept_indices is not None:
            tensors["kept_indices"] = self.kept_indices
        io.save_tensors(directory / "poisons.pt", tensors)
        meta = {
            "eps_d": self.eps_d,
            "tau": self.tau,
            "seed": self.seed,
            "num_poisons": len(self.x),
            "grad_norm_history": self.grad_norm_history,
            "config": self.config,
            "extra": self.extra,
        }
        io.write_json(directory / "poisons.json", meta)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "PoisonResult":
        """Read what :meth:`save` wrote, without executing code."""
        directory = Path(directory)
        t = io.load_tensors(directory / "poisons.pt")
        meta = io.read_json(directory / "poisons.json")
        return cls(
            x=t["x"],
            y=t["y"],
            source_indices=t["source_indices"],
            kept_indices=t.get("kept_indices"),
            grad_norm_history=[float(v) for v in meta["grad_norm_history"]],
            tau=float(meta["tau"]),
            eps_d=float(meta["eps_d"]),
            config=meta["config"],
            seed=int(meta["seed"]),
            extra=meta.get("extra", {}),
        )
