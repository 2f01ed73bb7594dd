"""Choosing the target per ε_d (appendix D, over a wider family): ``--target select``.

The candidates are GradPC targets over an ε_w grid and *planted* targets: the victim trained on
clean ∪ a label flip of E·n points at a budget E (Table 7's idea: such a target is reachable at E by
construction and often has τ = 0, so fewer points may reach it too). For each ε_d the procedure of
appendix D is run on the training and validation splits only (the test split is never read):

1. τ of every candidate (the training split, the victims' weight decay); those with τ > ε_d are
   ruled out (a planted target with E ≤ ε_d stays in: its own flips reach it, so GC should too);
2. GC (the run's attack) attacks the others in order of validation accuracy, lowest first, and
   stops at the first whose residual ratio ‖g(χ)‖ / ‖g(χ₀)‖ is at most ``reach`` (one tenth);
3. that candidate is the choice: the largest validation drop among the targets GC reaches (any
   candidate tried later has a higher validation accuracy), and its poisons are the cell's.

Each cell records every candidate (τ, validation accuracy, the ratio GC reached or why it was not
tried) in ``selection.json``; candidate models live in ``candidates/NAME/``, each GC attempt in
``eps_d=E/candidate=NAME/``, so a run that stops is resumed without redoing any of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from torch import Tensor, nn

from .. import io, models
from ..attacks import Attack, LabelFlip, PoisonResult
from ..errors import PoisonReachError
from ..reachability import threshold
from ..targets import GradPC
from ..training import accuracy
from ..validation import Choice, Number

# target_options of ``target: select`` and their defaults
SELECT_DEFAULTS = {
    "eps_w": [0.25, 0.5, 1.0, 2.0],  # GradPC radii (absolute)
    "flip_eps_d": [0.1, 0.3, 1.0, 3.0],  # budgets E of the planted label-flip targets
    "flip_strategy": "least-likely",
    "reach": 0.1,  # GC must bring the residual to this fraction of its start
}
_CHECKS = {"flip_strategy": Choice(("random", "loss", "least-likely")), "reach": Number(low=0, low_open=True, high=1)}


def check_select_options(options: dict) -> dict:
    """``target_options`` of ``target: select`` completed with the defaults, or one clear error."""
    unknown = sorted(set(options) - set(SELECT_DEFAULTS))
    if unknown:
        raise PoisonReachError(f"unknown option(s) {unknown} of the select target: it takes {sorted(SELECT_DEFAULTS)}")
    merged = {**SELECT_DEFAULTS, **options}
    for key in ("eps_w", "flip_eps_d"):
        values = merged[key]
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
            raise PoisonReachError(f"select target option {key} must be a list of positive numbers (may be empty), got {values!r}")
    if not merged["eps_w"] and not merged["flip_eps_d"]:
        raise PoisonReachError("the select target has no candidates: give eps_w or flip_eps_d a value")
    for key, check in _CHECKS.items():
        check(key, merged[key])
    return merged


@dataclass
class Candidate:
    """One target considered: ``name`` (``gradpc-eps_w=1``, ``labelflip-eps_d=0.3``), ``budget`` E of a
    planted target, τ on the training split, validation accuracy, and for each ε_d the residual
    ratio GC reached (None: not tried, ``reason`` says why)."""

    name: str
    tau: float
    val_acc: float
    budget: float | None = None
    grad_norm_ratio: float | None = None
    kept: bool = False
    reason: str = ""


class TargetSelection:
    """The candidates of one run, built once (and cached in ``folder``), and the choice per ε_d.

    ``fit(X, y)`` trains a victim the run's way (a planted target is one); ``save(model, path)``
    writes a model file; ``weight_decay`` is the victims' (for τ)."""

    def __init__(self, options: dict, clean: nn.Module, X: Tensor, y: Tensor, splits, fit, save, folder: Path, *,
                 weight_decay: float, seed: int, log=print):
        self.options = check_select_options(options)
        self.X, self.y, self.splits, self.log = X, y, splits, log
        self.targets: dict[str, nn.Module] = {}
        self.candidates: list[Candidate] = []
        num_outputs = models.last_linear(clean).out_features
        makers: list[tuple[str, float | None, Callable[[], nn.Module]]] = [
            (f"gradpc-eps_w={e:g}", None, lambda e=e: GradPC(e, seed=seed).generate(clean, X, y))
            for e in self.options["eps_w"]
        ] + [
            (f"labelflip-eps_d={e:g}", float(e), lambda e=e: fit(*LabelFlip(e, strategy=self.options["flip_strategy"], seed=seed)
                                                                 .poison(clean, X, y).mixed(X, y, num_outputs)))
            for e in self.options["flip_eps_d"]
        ]
        for name, budget, make in makers:
            path = folder / name / "target_model.pt"
            target = models.load_model(path) if path.is_file() else save(make(), path)
            target = target.to(next(clean.parameters()).device)
            self.targets[name] = target
            tau = threshold(target, X, y, weight_decay=weight_decay).tau
            self.candidates.append(Candidate(name, tau, accuracy(target, splits.x_val, splits.y_val), budget))
        log("select: candidates " + ", ".join(f"{c.name} (tau {c.tau:.3g}, val {c.val_acc:.2f}%)" for c in self.candidates))

    def choose(self, attack: Attack, cell: Path) -> tuple[nn.Module | None, PoisonResult | None, list[Candidate]]:
        """The target for ``attack.eps_d``, GC's poisons against it, and every candidate's record
        (also written to ``cell/selection.json``); (None, None, records) when GC reaches none."""
        eps_d, reach = attack.eps_d, self.options["reach"]
        records = [Candidate(**{**asdict(c), "grad_norm_ratio": None, "kept": False, "reason": ""}) for c in self.candidates]
        for c in records:
            if c.tau > eps_d:
                c.reason = f"tau {c.tau:.3g} > eps_d {eps_d:g}"
        chosen, poisons = None, None
        for c in sorted((c for c in records if not c.reason), key=lambda c: c.val_acc):
            if chosen is not None:
                c.reason = f"not tried: {chosen.name} has a lower validation accuracy and GC reaches it"
                continue
            folder = cell / f"candidate={c.name}"
            result = self._attack(attack, folder, self.targets[c.name])
            c.grad_norm_ratio = result.grad_norm_ratio
            c.kept = c.grad_norm_ratio <= reach
            if c.kept:
                chosen, poisons = c, result
            else:
                c.reason = f"GC residual ratio {c.grad_norm_ratio:.3g} > {reach:g}"
        io.write_json(cell / "selection.json", {"eps_d": eps_d, "reach": reach, "chosen": None if chosen is None else chosen.name,
                                                "candidates": [asdict(c) for c in records]})
        self.log(f"select eps_d={eps_d:g}: " + (f"{chosen.name} (val {chosen.val_acc:.2f}%, ratio {chosen.grad_norm_ratio:.3g})"
                                                if chosen else "GC reached no candidate"))
        return (None if chosen is None else self.targets[chosen.name]), poisons, records

    def _attack(self, attack: Attack, folder: Path, target: nn.Module) -> PoisonResult:
        """GC against one candidate (read back when done), with a checkpoint of its own."""
        if (folder / "poisons.pt").is_file():
            return PoisonResult.load(folder)
        params = attack.get_params()
        if "checkpoint" in params:
            params["checkpoint"] = folder / "checkpoint.pt"
        result = type(attack)(**params).poison(target, self.X, self.y)
        result.save(folder)
        if "checkpoint" in params:
            Path(params["checkpoint"]).unlink(missing_ok=True)
        return result

