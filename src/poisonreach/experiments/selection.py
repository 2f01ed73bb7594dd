"""Choosing the target per ε_d (appendix D, over a wider family): ``--target select``.

The candidates are of three families:

- ``gradpc``: GradPC targets over an ε_w grid;
- ``labelflip``: *planted* targets, the victim trained on clean ∪ a label flip of E·n points at a
  budget E (Table 7's idea: such a target is reachable at E by construction and often has τ = 0,
  so fewer points may reach it too), by default at E = ε_d, 1.5·ε_d, 2·ε_d, 3·ε_d and 5·ε_d. E = ε_d
  makes sure there is a candidate GC can reach (its own flips do); the larger ones are the chance
  to do more damage with ε_d·n optimised points than with flips;
- ``frontier``: the most damaging model :func:`poisonreach.audit.damage_frontier` finds admissible
  at B = 0.5·ε_d and 0.7·ε_d (searched on the *validation* split; linear models with a box and
  weight decay λ > 0 only, where the box programme makes "admissible" mean something). Such a
  model is a direction of damage, not a target GC can pin: its τ is usually above ε_d and GC
  leaves part of its residual, but the victim of GC's poisons can still be worse than any
  reachable target's (measured on MNIST-LR at ε_d = 1, docs/results.md). So τ does not rule it out
  and its victim decides.

For each ε_d the procedure is run on the training and validation splits only (the test split is
never read):

1. τ of every candidate (the training split, the victims' weight decay); ``gradpc`` and
   ``labelflip`` candidates with τ > ε_d are ruled out (a planted target with E ≤ ε_d stays in:
   its own flips reach it, so GC should too);
2. GC (the run's attack) attacks the others in order of validation accuracy, lowest first; a
   planted target's attack starts from the first ε_d·n of the flips that planted it (the same
   clean points as GC's own start, with the flipped labels: at E = ε_d they reach the target
   already, so GC is never behind that flip; with the clean labels its greedy relabelling settles
   elsewhere), the others' from the clean points. A candidate is *reached* when the residual ratio
   ‖g(χ)‖ / ‖g(χ₀)‖ is at most ``reach`` (one tenth), χ₀ the clean start whichever start GC took
   (so that "reached" means the same for both); then the victim is trained (the run's way) on
   clean ∪ GC's poisons and its validation accuracy recorded;
3. the choice is the reached candidate whose victim has the lowest validation accuracy, and its
   poisons are the cell's. A candidate whose own validation accuracy is not below the best victim's
   so far is not tried: in every selection we measured, the victim of a reached candidate was less
   damaging than its target, so such a candidate could not win.

Each cell records every candidate (family, τ, validation accuracy, the ratio GC reached, its
victim's validation accuracy, or why it was not tried) in ``selection.json``; candidate models live
in ``candidates/NAME/`` (built when an ε_d first needs them), each GC attempt and its victim's
accuracy in ``eps_d=E/candidate=NAME/``, so a run that stops is resumed without redoing any of them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from torch import Tensor, nn

from .. import io, models
from ..attacks import Attack, LabelFlip, PoisonResult
from ..attacks.base import box_bounds
from ..audit import damage_frontier
from ..errors import PoisonReachError
from ..reachability import threshold
from ..targets import GradPC
from ..training import accuracy
from ..validation import Choice, Number

logger = logging.getLogger(__name__)
_CHECKS = {"flip_strategy": Choice(("random", "loss", "least-likely")), "reach": Number(low=0, low_open=True, high=1),
           "seed": Number(low=0, integer=True, optional=True)}


def select_options(*, eps_w=(0.05, 0.1, 0.25, 0.5, 1.0), flip_factors=(1.0, 1.5, 2.0, 3.0, 5.0), flip_eps_d=(),
                   frontier_factors=(0.5, 0.7, 1.0), flip_strategy: str = "least-likely", reach: float = 0.1,
                   seed: int | None = None) -> dict:
    """Choose the target per ε_d among GradPC, planted label-flip and damage-frontier candidates
    (appendix D over a wider family): the options of ``--target select``, checked, as a dict.

    Args:
        eps_w: radii of the GradPC candidates (absolute ε_w); a list, may be empty.
        flip_factors: planted label-flip candidates at E = factor·ε_d, for each ε_d.
        flip_eps_d: planted label-flip candidates at these budgets E, for every ε_d.
        frontier_factors: damage-frontier models admissible at B = factor·ε_d (a linear model with a box and weight decay).
        flip_strategy: how the planting flips choose their labels: random, loss or least-likely.
        reach: GC reaches a candidate when it brings the residual to this fraction of its clean start.
        seed: the candidates' random draws (GradPC's direction, the flipped points, the frontier's starts); None: the run's seed.
    """
    options = {"eps_w": eps_w, "flip_factors": flip_factors, "flip_eps_d": flip_eps_d, "frontier_factors": frontier_factors}
    for key, values in options.items():
        if not isinstance(values, (list, tuple)) or not all(isinstance(v, (int, float)) and v > 0 for v in values):
            raise PoisonReachError(f"select target option {key} must be a list of positive numbers (may be empty), got {values!r}")
    if not any(options.values()):
        raise PoisonReachError("the select target has no candidates: give eps_w, flip_factors, flip_eps_d or frontier_factors a value")
    options = {key: list(values) for key, values in options.items()}
    for key, value in {"flip_strategy": flip_strategy, "reach": reach, "seed": seed}.items():
        options[key] = _CHECKS[key](key, value)
    return options


SELECT_DEFAULTS = select_options()


def check_select_options(options: dict) -> dict:
    """``target_options`` of ``target: select`` completed with the defaults, or one clear error."""
    unknown = sorted(set(options) - set(SELECT_DEFAULTS))
    if unknown:
        raise PoisonReachError(f"unknown option(s) {unknown} of the select target: it takes {sorted(SELECT_DEFAULTS)}")
    return select_options(**options)


@dataclass
class Candidate:
    """One target considered: ``name`` (``gradpc-eps_w=1``, ``labelflip-eps_d=0.3``,
    ``frontier-eps_d=0.5``), its ``family`` (the name's first part), ``budget`` (E of a planted
    target, B of a frontier one), τ(c) on the training split (equation (10); τ(2) for one logit),
    validation accuracy, and for each ε_d the residual ratio GC reached against the clean start
    (None: not tried, ``reason`` says why), what GC started from (``start``: ``clean`` or
    ``planting``), whether the ratio reached it (``kept``), the validation accuracy of the victim of
    those poisons, and whether it is the choice."""

    name: str
    tau: float
    val_acc: float
    budget: float | None = None
    family: str = ""
    grad_norm_ratio: float | None = None
    start: str = ""
    kept: bool = False
    victim_val_acc: float | None = None
    chosen: bool = False
    reason: str = ""


class TargetSelection:
    """The candidates of one run and the choice per ε_d. A candidate is built the first time an ε_d
    needs it and cached in ``folder`` (``NAME/target_model.pt``), so one that several ε_d share —
    the GradPC grid, ``flip_eps_d`` — is built once.

    ``fit(X, y)`` trains a victim the run's way (a planted target is one); ``save(model, path)``
    writes a model file; ``weight_decay`` is the victims' (for τ)."""

    def __init__(self, options: dict, clean: nn.Module, X: Tensor, y: Tensor, splits, fit, save, folder: Path, *,
                 weight_decay: float, seed: int):
        self.options = check_select_options(options)
        self.clean, self.X, self.y, self.splits, self.fit, self.save, self.folder = clean, X, y, splits, fit, save, folder
        self.weight_decay = weight_decay
        self.seed = seed if self.options["seed"] is None else self.options["seed"]
        self.device = next(clean.parameters()).device  # where candidates read back from their files go
        self.targets: dict[str, nn.Module] = {}
        self.built: dict[str, Candidate] = {}
        self.plantings: dict[str, PoisonResult] = {}
        self._said_no_frontier = False

    def candidates(self, eps_d: float, box=(0.0, 1.0)) -> list[Candidate]:
        """The candidates for ``eps_d``: the GradPC grid, the planted flips by budget E, then the
        frontier models by budget B (those need a linear model, ``box`` and weight decay)."""
        budgets = sorted({round(f * eps_d, 10) for f in self.options["flip_factors"]} | {float(e) for e in self.options["flip_eps_d"]})
        wanted = [(f"gradpc-eps_w={e:g}", float(e), None) for e in self.options["eps_w"]] + [(f"labelflip-eps_d={e:g}", None, e) for e in budgets]
        found = [self._candidate(name, eps_w, budget) for name, eps_w, budget in wanted]
        return found + self._frontier([round(f * eps_d, 10) for f in self.options["frontier_factors"]], box)

    def _candidate(self, name: str, eps_w: float | None, budget: float | None) -> Candidate:
        """The GradPC target of radius ``eps_w`` or the planted one of budget ``budget``, built once."""
        if name not in self.built:
            path = self.folder / name / "target_model.pt"
            if path.is_file():
                target = models.load_model(path).to(self.device)
            elif budget is None:
                target = self.save(GradPC(eps_w, seed=self.seed).generate(self.clean, self.X, self.y), path)
            else:
                flips = self._planting(name)
                target = self.save(self.fit(*flips.mixed(self.X, self.y, models.last_linear(self.clean).out_features)), path)
            self._add(name, target, budget)
        return self.built[name]

    def _planting(self, name: str) -> PoisonResult | None:
        """The label flips that planted candidate ``name`` (None for the other families): seeded,
        so the same flips whether the target was built now or read back."""
        if not name.startswith("labelflip-"):
            return None
        if name not in self.plantings:
            budget = float(name.split("=", 1)[1])
            self.plantings[name] = LabelFlip(budget, strategy=self.options["flip_strategy"], seed=self.seed).poison(self.clean, self.X, self.y)
        return self.plantings[name]

    def _frontier(self, budgets: list[float], box) -> list[Candidate]:
        """The frontier candidates at ``budgets``: one :func:`damage_frontier` search on the
        validation split for those not built yet; none for a model it does not apply to."""
        names = [f"frontier-eps_d={b:g}" for b in budgets]
        if not budgets or box is None or self.weight_decay <= 0 or not models.is_linear(self.clean, tuple(self.X.shape[1:])):
            if budgets and not self._said_no_frontier:
                logger.info("select: no frontier candidates (they need a linear model, a box and weight decay > 0)")
                self._said_no_frontier = True
            return []
        missing = []  # budgets neither built in this run nor saved by an earlier one
        for name, b in zip(names, budgets):
            path = self.folder / name / "target_model.pt"
            if name not in self.built and path.is_file():
                self._add(name, models.load_model(path).to(self.device), b)
            elif name not in self.built:
                missing.append((name, b))
        if missing:
            low, high = box_bounds(box, self.X, device=self.device)
            points = damage_frontier(self.clean, self.X, self.y, self.splits.x_val, self.splits.y_val, [b for _, b in missing],
                                     weight_decay=self.weight_decay, box=(low, high), seed=self.seed)
            for (name, b), point in zip(missing, points):
                self._add(name, self.save(point.model, self.folder / name / "target_model.pt"), b)
        return [self.built[name] for name in names]

    def _add(self, name: str, target: nn.Module, budget: float | None) -> None:
        self.targets[name] = target
        # τ(c), equation (10): with c > 2 classes τ(2)'s constant W(1/e) is not a bound of ⟨h, p − e_y⟩
        # (−W((c − 1)/e) is), so τ(2) would rule out targets that may be reachable
        tau = threshold(target, self.X, self.y, weight_decay=self.weight_decay)
        self.built[name] = Candidate(name, tau.tau if tau.tau_multiclass is None else tau.tau_multiclass,
                                     accuracy(target, self.splits.x_val, self.splits.y_val), budget, name.split("-")[0])
        c = self.built[name]
        logger.info(f"select: candidate {name}: tau {c.tau:.3g}, validation accuracy {c.val_acc:.2f}%")

    def choose(self, attack: Attack, cell: Path) -> tuple[nn.Module | None, PoisonResult | None, list[Candidate]]:
        """The target for ``attack.eps_d``, GC's poisons against it, and every candidate's record
        (also written to ``cell/selection.json``); (None, None, records) when GC reaches none."""
        eps_d, reach = attack.eps_d, self.options["reach"]
        records = [Candidate(**{**asdict(c), "grad_norm_ratio": None, "kept": False, "victim_val_acc": None, "chosen": False, "reason": ""})
                   for c in self.candidates(eps_d, attack.box)]
        for c in records:
            if c.tau > eps_d and c.family != "frontier":
                c.reason = f"tau {c.tau:.3g} > eps_d {eps_d:g}"
        best, poisons = None, None
        for c in sorted((c for c in records if not c.reason), key=lambda c: c.val_acc):
            if best is not None and c.val_acc >= best.victim_val_acc:
                c.reason = f"not tried: its validation accuracy is not below that of {best.name}'s victim ({best.victim_val_acc:.2f}%)"
                continue
            folder = cell / f"candidate={c.name}"
            start = self._planting(c.name)
            result = self._attack(attack, folder, self.targets[c.name], start)
            c.grad_norm_ratio = result.grad_norm_ratio  # against the clean start, whichever start GC took
            c.start = "clean" if start is None else "planting"
            c.kept = c.grad_norm_ratio <= reach
            if not c.kept:
                c.reason = f"GC residual ratio {c.grad_norm_ratio:.3g} > {reach:g}"
                continue
            c.victim_val_acc = self._victim_accuracy(folder, result)
            if best is None or c.victim_val_acc < best.victim_val_acc:
                best, poisons = c, result
        if best is not None:
            best.chosen = True
        io.write_json(cell / "selection.json", {"eps_d": eps_d, "reach": reach, "chosen": None if best is None else best.name,
                                                "candidates": [asdict(c) for c in records]})
        logger.info(f"select eps_d={eps_d:g}: " + (f"{best.name} (val {best.val_acc:.2f}%, ratio {best.grad_norm_ratio:.3g}, "
                                                 f"victim val {best.victim_val_acc:.2f}%)" if best else "GC reached no candidate"))
        return (None if best is None else self.targets[best.name]), poisons, records

    def _victim_accuracy(self, folder: Path, poisons: PoisonResult) -> float:
        """Validation accuracy of the victim trained on clean ∪ ``poisons`` (read back when done)."""
        path = folder / "victim.json"
        if path.is_file():
            return io.read_json(path)["val_acc"]
        victim = self.fit(*poisons.mixed(self.X, self.y, models.last_linear(self.clean).out_features))
        value = accuracy(victim, self.splits.x_val, self.splits.y_val)
        io.write_json(path, {"val_acc": value})
        return value

    def _attack(self, attack: Attack, folder: Path, target: nn.Module, start: PoisonResult | None) -> PoisonResult:
        """GC against one candidate from ``start`` (None: the clean points), read back when done,
        with a checkpoint of its own."""
        if (folder / "poisons.pt").is_file():
            return PoisonResult.load(folder)
        params = attack.get_params()
        if "checkpoint" in params:
            params["checkpoint"] = folder / "checkpoint.pt"
        result = type(attack)(**params).poison(target, self.X, self.y, start=start)
        result.save(folder)
        if "checkpoint" in params:
            Path(params["checkpoint"]).unlink(missing_ok=True)
        return result

