"""``poisonreach audit``: how much poison would it take to push a model to a bad target, and how bad
could it get — for a trained model and its training data, without running an attack
(:mod:`poisonreach.audit`).

The model is one of ours or the user's (``--model module.path:Class``), its weights a state dict
(``--weights``, read with ``weights_only=True``) or trained here to convergence (the converged
protocol, weight decay λ); the data one of ours or the user's (``npz:FILE``, ``folder:DIR``). The
target is ``--target-weights`` (a model of the same class) or, without it, GradPC targets over an
ε_w grid. For each target: τ(2), τ(c) and the sharpened τ (with the box, for a linear model: the
scalar bounds and the box programme), and for a linear model the budget that may cancel nine tenths
of the target's residual (:func:`~poisonreach.reachability.floor_threshold`), at every ε_d the residual
floor (how far from the target's stationarity any poisons in the box must leave it,
:func:`~poisonreach.reachability.residual_floor`) and the constructive poisons of Theorems 5/6,
verified by retraining — the thresholds and the constructions bracket the ε_d the target needs. For a linear
model, the damage frontier: per ε_d the largest drop found over models that meet the necessary
condition, an estimate of what any attack could do to a victim retrained to convergence, plotted
beside the drops of run folders (``--runs``). ``--poisons`` diagnoses poison sets made for the
target.

Writes ``audit.json``, ``audit.md`` and ``frontier.png``/``.pdf`` into the folder, and prints the
tables. Thresholds cost about a forward pass (the box programme a few cutting-plane rounds, seconds
for MNIST-LR); a residual floor a second to half a minute on MNIST-LR, the budget to a tenth a dozen
of them; the frontier and the constructions train.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch

from .. import audit as library, data, io, models
from ..errors import PoisonReachError
from ..models import is_linear
from ..reachability import floor_threshold, residual_floor, sharpened_threshold, threshold
from ..targets import GradPC
from ..training import accuracy
from .config import RunConfig, fresh_model, load_data, short_name
from .evaluate import read_poisons
from .plots import pyplot, save_figure
from .run import fitter, text_table

logger = logging.getLogger(__name__)

# ε_w of the GradPC targets audited when no target is given
EPS_W_GRID = (0.25, 0.5, 1.0, 2.0)
# the share of the target's residual the budget "to a tenth" leaves (floor_threshold)
TENTH = 0.1


def audit(config: RunConfig, out: str | os.PathLike, *, weights: str | None = None, target_weights: str | None = None,
          eps_w: list[float] = EPS_W_GRID, box=None, poisons: list[str] = (), runs: list[str] = (), frontier: bool = True,
          construction: bool = True, restarts: int = 3) -> dict:
    """Audit the model of ``config`` on its data into folder ``out`` (module docstring) and return
    the record written to ``audit.json``. ``config.protocol`` must be ``converged``: the audit's
    victims are trained to convergence with its weight decay. ``box`` is (low, high), ``"data-range"``
    (the per-feature range of the training data) or None: [0, 1] for images, the data range otherwise."""
    if config.protocol != "converged":
        raise PoisonReachError("the audit's victims are trained to convergence: use the converged protocol")
    if config.trained_parameters != "all":
        raise PoisonReachError("the audit's victims retrain every parameter: drop --train-option parameters=last "
                               "(poisonreach run and evaluate fit a pretrained network's head)")
    out = Path(out)
    splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    if splits.task == "regression":
        raise PoisonReachError(f"{config.dataset} is a regression data set: the audit measures accuracy, choose a classification one")
    decay = config.weight_decay
    if box is None:
        box = (0.0, 1.0) if X.dim() == 4 else "data-range"
    if box == "data-range":
        box = (X.amin(0), X.amax(0))
    model = _model(config, spec, weights, out, X, y)
    linear = is_linear(model, tuple(X.shape[1:]))
    clean_acc = accuracy(model, splits.x_test, splits.y_test)
    logger.info(f"{config.dataset}: {len(X)} training points; model {config.model}, test accuracy {clean_acc:.2f}%"
                + ("" if linear else " (not linear: the thresholds only)"))
    if target_weights is not None:
        targets = [("given", models.load_weights(fresh_model(config, spec), target_weights))]
    else:
        targets = [(f"gradpc eps_w={e:g}", GradPC(e, seed=config.seed).generate(model, X, y)) for e in eps_w]
    record = {"dataset": config.dataset, "model": config.model, "model_options": config.model_options, "weight_decay": decay,
              "clean_acc": clean_acc, "num_train": len(X), "linear": linear, "box": _plain_box(box), "eps_d": list(config.eps_d),
              "targets": [_audit_target(name, target, X, y, splits, config, box, linear, construction) for name, target in targets]}
    if len(targets) == 1:  # the flat keys, for the one target
        record.update({k: record["targets"][0][k] for k in ("tau", "tau_multiclass", "tau_sharpened", "sharpening_matrix", "construction")})
    if frontier and linear:
        logger.info("damage frontier: searching for the most damaging admissible models")
        record["frontier"] = [p.to_dict() for p in library.damage_frontier(model, X, y, splits.x_test, splits.y_test, list(config.eps_d),
                                                                           weight_decay=decay, box=box, restarts=restarts, seed=config.seed)]
    record["runs"] = [_achieved(run) for run in runs]
    if poisons:
        if target_weights is None:
            raise PoisonReachError("--poisons diagnoses poisons against the target they were made for: name it with --target-weights")
        record["diagnoses"] = [{"poisons": str(p), **library.diagnose(targets[0][1], X, y, read_poisons(p, splits), X_test=splits.x_test,
                                                                       weight_decay=decay, box=box if linear else None)} for p in poisons]
    io.write_json(out / "audit.json", record)
    figures = plot_frontier(record, out) if "frontier" in record else []
    io.atomic_write_bytes(out / "audit.md", format_markdown(record, figures).encode())
    return record


def dataset_spec(path: str) -> str:
    """The data-set name of a user's file or folder (``--data PATH``): ``npz:PATH`` or ``folder:PATH``."""
    return data.user.spec_of(path)


def default_out(config: RunConfig) -> Path:
    """The folder ``poisonreach audit`` writes without --out: ``runs/audit-DATASET-MODEL``."""
    return Path("runs") / f"audit-{short_name(config.dataset)}-{short_name(config.model)}"


def _model(config: RunConfig, spec: dict, weights: str | None, out: Path, X, y):
    """The audited model: ``weights`` loaded into the configuration's model, or one trained here to
    convergence (saved, and read back when the folder has it)."""
    if weights is not None:
        return models.load_weights(fresh_model(config, spec), weights).eval()
    path = out / "clean_model.pt"
    if path.is_file():
        return models.load_model(path)
    logger.info("no --weights: training the model to convergence")
    model = fitter(config, spec)(X, y)
    models.save_model(model, path, **spec)
    return model


def _plain_box(box) -> list:
    return [v.tolist() if torch.is_tensor(v) else v for v in box]


def _audit_target(name: str, target, X, y, splits, config: RunConfig, box, linear: bool, construction: bool) -> dict:
    decay = config.weight_decay
    base = threshold(target, X, y, weight_decay=decay)
    sharp = sharpened_threshold(target, X, y, box=box if linear else None, weight_decay=decay)
    entry = {"name": name, "target_acc": accuracy(target, splits.x_test, splits.y_test), "tau": base.tau, "tau_multiclass": base.tau_multiclass,
             "tau_sharpened": sharp.tau, "tau_lp": sharp.tau_lp, "sharpening_matrix": sharp.matrix, "infimum": sharp.infimum,
             "supremum": sharp.supremum, "construction": []}
    logger.info(f"{name}: target accuracy {entry['target_acc']:.2f}%, tau {base.tau:.4g}, tau(c) {base.tau_multiclass:.4g}, "
                f"sharpened {sharp.tau:.4g}")
    if linear:
        tenth = floor_threshold(target, X, y, TENTH, box=box, weight_decay=decay)
        entry["floor_threshold"] = tenth.to_dict()
        logger.info(f"{name}: below eps_d = {tenth.forbidden:.4g} no poisons in the box cancel nine tenths of its residual "
                    f"(first allowed at {_fmt(tenth.tau)}, {tenth.evaluations} floors)")
        entry["floors"] = [_floor(target, X, y, e, box, decay) for e in config.eps_d]
        for f in entry["floors"]:
            logger.info(f"{name}, eps_d={f['eps_d']:g}: " + (f"no poisons in the box leave the residual below {f['floor']:.3g} "
                        f"({f['floor_ratio']:.3g} of its value without poisons)" if f["floor"] > 0 else
                        f"residual floor 0, no bound found (the relaxation comes within {f['relaxed'] / f['clean']:.2g} of cancelling it)"))
    if linear and construction:
        for e in config.eps_d:
            check = library.construction_check(target, X, y, e, box=box, X_test=splits.x_test, weight_decay=decay, seed=config.seed)
            entry["construction"].append(check)
            logger.info(f"{name}, eps_d={e:g}: constructed poisons leave ratio {check['residual_ratio']:.3g}, the victim agrees "
                        f"{check['agreement']:.2f}%, {check['inside_percent']:.1f}% of their pixels in the box")
    entry["reached_at"] = next((c["eps_d"] for c in entry["construction"] if _reached(c)), None)
    return entry


def _floor(target, X, y, eps_d: float, box, decay: float) -> dict:
    """:func:`~poisonreach.reachability.residual_floor` at ε_d, with ``floor_ratio``: the floor over
    ‖r‖ without poisons, so 0.1 or more says no attack can cancel nine tenths of the target's residual."""
    floor = residual_floor(target, X, y, eps_d, box=box, weight_decay=decay)
    return {**floor.to_dict(), "floor_ratio": floor.ratio}


def _reached(check: dict) -> bool:
    return check["agreement"] >= library.REACHED_AGREEMENT


def _achieved(run: str) -> dict:
    """The drops a run folder achieved, per ε_d (the mean over victim seeds where there are
    several), labelled with its attack, its options and its target's kind."""
    folder = Path(run)
    if not (folder / "metrics.json").is_file():
        raise PoisonReachError(f"{folder} holds no metrics.json: give a finished run folder (poisonreach run)")
    metrics, config = io.read_json(folder / "metrics.json"), io.read_yaml(folder / "config.yaml")
    options = " ".join(f"{k}={v}" for k, v in sorted((config.get("attack_options") or {}).items()))
    label = " ".join(part for part in (config.get("attack"), options, "(target select)" if config.get("target") == "select" else "") if part)
    return {"run": str(folder), "attack": label,
            "results": [{"eps_d": r["eps_d"], "acc_drop": r.get("acc_drop_mean", r["acc_drop"])} for r in metrics["results"]]}


def _fmt(value, spec: str = ".4g") -> str:
    return "-" if value is None else ("inf" if value == math.inf else f"{value:{spec}}")


def _bracket(entry: dict) -> str:
    """The ε_d the target needs: at least the sharpened τ, at most the first ε_d whose constructed
    poisons reached it (with real points when they are in the box)."""
    reached = next((c for c in entry["construction"] if _reached(c)), None)
    if reached is None:
        return f"≥ {_fmt(entry['tau_sharpened'])}" + (" (not reached by the construction)" if entry["construction"] else "")
    where = "in the box" if reached["in_box"] else f"unbounded, {100 - reached['inside_percent']:.1f}% of pixels outside"
    return f"[{_fmt(entry['tau_sharpened'])}, {reached['eps_d']:g}] ({where})"


def format_audit(record: dict) -> str:
    """The audit's tables for the terminal."""
    head = (f"{record['dataset']} / {record['model']}: clean accuracy {record['clean_acc']:.2f}%, {record['num_train']} training points, "
            f"weight decay {record['weight_decay']:g}")
    rows = [[t["name"], f"{t['target_acc']:.2f}", _fmt(t["tau"]), _fmt(t["tau_multiclass"]), _fmt(t["tau_lp"]), _fmt(t["tau_sharpened"]),
             _fmt(t["floor_threshold"]["tau"]) if "floor_threshold" in t else "-", _bracket(t)] for t in record["targets"]]
    parts = [head, text_table(["target", "target acc", "tau(2)", "tau(c)", "tau box LP", "tau sharpened", "tau to 1/10", "eps_d needed"], rows,
                              left_first=True)]
    floors = [[t["name"], f"{f['eps_d']:g}", f"{f['floor']:.3g}", f"{f['floor_ratio']:.3g}", f"{f['relaxed'] / f['clean']:.3g}"]
              for t in record["targets"] for f in t.get("floors", [])]
    if floors:
        parts.append("residual floor (certified: no poisons in the box leave ‖r‖ below it; ratios to ‖r‖ without poisons)\n"
                     + text_table(["target", "eps_d", "floor", "floor ratio", "relaxation reached"], floors, left_first=True))
    construction = [[t["name"], f"{c['eps_d']:g}", f"{c['residual_ratio']:.3g}", f"{c['agreement']:.2f}", f"{c['inside_percent']:.1f}",
                     f"{c['max_outside']:.3g}"] for t in record["targets"] for c in t["construction"]]
    if construction:
        parts.append(text_table(["constructed poisons", "eps_d", "ratio", "agree %", "pixels in box %", "max outside"], construction, left_first=True))
    if "frontier" in record:
        achieved = {(r["attack"], p["eps_d"]): p["acc_drop"] for r in record["runs"] for p in r["results"]}
        attacks = sorted({a for a, _ in achieved})
        rows = [[f"{p['eps_d']:g}", f"{p['max_drop_estimate']:.2f}", p["condition"],
                 *[_fmt(achieved.get((a, p["eps_d"])), ".2f") for a in attacks]] for p in record["frontier"]]
        parts.append("damage frontier (largest drop found over admissible models: an estimate of the bound from below, not certified)\n"
                     + text_table(["eps_d", "max drop estimate", "condition", *[f"{a} drop" for a in attacks]], rows))
    for d in record.get("diagnoses", []):
        parts.append(f"{d['poisons']}: {d['verdict']}")
    return "\n\n".join(parts)


def format_markdown(record: dict, figures: list[Path]) -> str:
    """audit.md: the tables and the frontier figure."""
    lines = ["# Reachability audit", "", "```", format_audit(record), "```", ""]
    lines += [f"![damage frontier]({f.name})" for f in figures if f.suffix == ".png"]
    lines += ["", "τ values are necessary thresholds: below them no poisons reach the target; \"tau to 1/10\" is the least budget "
              "at which the residual floor lets poisons in the box cancel nine tenths of the target's residual ‖g(µ) + λw‖ (below it "
              "no poisons can). The constructed poisons "
              "(Theorems 5/6) reach it when the victim agrees with it; with the thresholds they bracket the ε_d it needs. "
              "The frontier's drops were found among models that meet the necessary condition: lower estimates of what "
              "any attack can do to a victim retrained to convergence.", ""]
    return "\n".join(lines)


def plot_frontier(record: dict, out: Path) -> list[Path]:
    """The frontier's drops against ε_d (log scale), the run folders' achieved drops beside them."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    frontier = record["frontier"]
    ax.plot([p["eps_d"] for p in frontier], [p["max_drop_estimate"] for p in frontier], "o-", color="black",
            label="frontier (estimate, admissible models)")
    for run in record["runs"]:
        ax.plot([p["eps_d"] for p in run["results"]], [p["acc_drop"] for p in run["results"]], "s--", label=f"{run['attack']} (achieved)")
    ax.set_xscale("log")
    ax.set_xlabel(r"$\varepsilon_d$")
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title(f"{record['dataset']} / {record['model']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, out, "frontier")
