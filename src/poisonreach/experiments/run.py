"""The main job: clean model → target → τ → the attack for each ε_d → retrain → metrics.

The evaluation protocol of section 5.1: the victim retrains from scratch on clean ∪ poisons, with
the same seed and the same training protocol as the clean model, so the accuracy drop measures the
poisons and nothing else. GC attacks the target; the baselines (gm, tgda, labelflip) attack the
clean model, as they know no target; τ and ‖g(µ) + ε_d·g(ν̂)‖ at the target are reported for all.
One run writes one self-contained folder:

    config.yaml           the resolved configuration (read with yaml.safe_load)
    metrics.json          clean_acc, target_acc, tau, grad_norm_clean (‖g(µ)‖ at the target), and one
                          entry per ε_d under "results" (poisoned_acc, acc_drop, grad_norm_final, ...)
    clean_model.pt        the clean model and target_model.pt the target (poisonreach.models.load_model)
    threshold.json        the full reachability record of the target
    eps_d=<value>/        poisons.pt, poisons.json (GC history, config), retrained_model.pt, result.json
    *.png, *.pdf          figures (poisonreach.experiments.plots.plot_run): gc_history, eps_d_curves,
                          poisons (image data)

A folder that already holds the same configuration is resumed: finished steps are loaded, not rerun.
:func:`tau` makes the same clean model and target and stops at τ, writing nothing.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from .. import io, models
from ..attacks import Attack, PoisonResult
from ..gradients import flat_norm, gradient_sum, select_parameters
from ..losses import resolve, task_of
from ..validation import evaluating
from ..errors import PoisonReachError
from ..reachability import threshold
from ..targets import parameter_distance, scale_target
from ..training import accuracy, mean_squared_error, train
from .config import RunConfig, cell_name, fresh_model, load_data
from .plots import plot_run


def _load_or(path: Path, make):
    """Resume: load a finished model file, else build it with ``make`` and save it."""
    if path.is_file():
        return models.load_model(path)
    return make()


def run(config: RunConfig, out: str | os.PathLike, *, log=print) -> dict:
    """Run the main job into folder ``out`` and return its metrics (also written to metrics.json)."""
    config.validate()
    out = Path(out)
    saved = out / "config.yaml"
    if saved.is_file():
        previous = io.read_yaml(saved)
        if previous != io.plain(config.to_dict()):
            raise PoisonReachError(f"{out} holds a run with a different configuration: choose another --out folder")
        log(f"resuming the run in {out}")
    io.write_yaml(saved, config.to_dict())
    device = torch.device(config.device)
    started = time.perf_counter()

    splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    fit = _fitter(config, spec)

    def save(model: nn.Module, path: Path) -> nn.Module:
        models.save_model(model, path, **spec)
        return model

    fresh_model(config, spec)  # fail on a model that does not fit the data before any output or work
    log(f"{config.dataset}: {len(X)} train, {len(splits.x_val)} val, {len(splits.x_test)} test; model {config.model}")
    clean = _load_or(out / "clean_model.pt", lambda: save(fit(X, y), out / "clean_model.pt")).to(device)
    clean_acc, clean_mse = _evaluate(clean, splits.x_test, splits.y_test)

    def new_target() -> nn.Module:
        return save(make_target(config, clean, X, y, splits, fit, poisons_dir=out / "target_poisons"), out / "target_model.pt")

    target = _load_or(out / "target_model.pt", new_target).to(device)
    target_acc, target_mse = _evaluate(target, splits.x_test, splits.y_test)
    thr = threshold(target, X, y)
    io.write_json(out / "threshold.json", thr.to_dict())
    quality = (f"clean test MSE {clean_mse:.4g}, target test MSE {target_mse:.4g}" if splits.task == "regression"
               else f"clean accuracy {clean_acc:.2f}%, target accuracy {target_acc:.2f}%")
    log(f"{quality}, tau {thr.tau:.4g} (tau(c) {_fmt(thr.tau_multiclass)})")

    grad_norm_clean = mixed_grad_norm(target, X, y)
    results = []
    for budget, attack in zip(config.eps_d, config.make_attacks(thr.tau, checkpoint_dir=out)):
        if budget == "tau" and not 0 < thr.tau < math.inf:
            # τ = 0: any ε_d > 0 reaches the target (Theorem 2), so there is no budget to attack at
            log(f"eps_d 'tau' skipped: this target has τ = {thr.tau:g}, which is no budget")
            continue
        victim_of = target if attack.model_targeted else clean  # the baselines know the clean model only
        results.append(_run_cell(attack, victim_of, target, X, y, splits, out / cell_name(attack.eps_d), fit, save, clean_acc, grad_norm_clean, log))

    metrics = {
        "dataset": config.dataset,
        "model": config.model,
        "eps_w": config.eps_w,
        "clean_acc": clean_acc,
        "target_acc": target_acc,
        "target_val_acc": _evaluate(target, splits.x_val, splits.y_val)[0],
        **({"clean_mse": clean_mse, "target_mse": target_mse} if splits.task == "regression" else {}),
        "tau": thr.tau,
        "tau_multiclass": thr.tau_multiclass,
        "inner": thr.inner,
        "grad_norm_clean": grad_norm_clean,  # ‖g(µ)‖ at the target: the scale of the ratios
        "num_train": len(X),
        "results": results,
        "wall_time_s": time.perf_counter() - started,
    }
    io.write_json(out / "metrics.json", metrics)
    plot_run(out)
    log(format_table(metrics))
    return metrics


def _fitter(config: RunConfig, spec: dict):
    """``fit(X, y)``: train a fresh model of the run from scratch (the same seed and protocol each time)."""
    device = torch.device(config.device)
    return lambda X_fit, y_fit: train(fresh_model(config, spec), X_fit, y_fit, seed=config.seed, device=device, **config.training)


def make_target(config: RunConfig, clean: nn.Module, X, y, splits, fit, *, poisons_dir: Path | None = None) -> nn.Module:
    """The run's target from the clean model: the generator's corrupted copy, or for a poisoned
    target the model ``fit`` trains on clean ∪ the baseline attack's poisons (Table 7; the poisons
    are saved into ``poisons_dir`` when given); scaled by ``target_scale`` (appendix C.6)."""
    generator = config.make_generator()
    if isinstance(generator, Attack):  # the victim's model after this attack (Table 7)
        result = _poison(generator, clean, X, y, splits)
        if poisons_dir is not None:
            result.save(poisons_dir)
        target = fit(*result.mixed(X, y, num_outputs=models.last_linear(clean).out_features))
    else:
        target = generator.generate(clean, X, y)
    if config.target_scale != 1.0:
        target = scale_target(target, config.target_scale)
    return target


def tau(config: RunConfig, target_file: str | os.PathLike | None = None) -> dict:
    """The reachability threshold of the run's target, without any attack (``poisonreach tau``): the
    clean model and the target as :func:`run` makes them, or the saved model ``target_file``.
    Returns dataset, model, eps_w (None for a saved target) and the threshold's fields
    (:meth:`poisonreach.reachability.Threshold.to_dict`)."""
    config.validate()
    splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    if target_file:
        target = models.load_model(target_file).to(torch.device(config.device))
    else:
        fit = _fitter(config, spec)
        target = make_target(config, fit(X, y), X, y, splits, fit)
    thr = threshold(target, X, y)
    return {"dataset": config.dataset, "model": config.model, "eps_w": None if target_file else config.eps_w, **thr.to_dict()}


def format_tau(record: dict, *, as_json: bool = False) -> str:
    """A :func:`tau` record as one line for the terminal, or as JSON."""
    if as_json:
        return json.dumps(io.plain(record), indent=2)
    multiclass = record["tau_multiclass"]
    return (f"tau = {record['tau']:.6g}   (tau(c) = {multiclass if multiclass is None else f'{multiclass:.6g}'}, "
            f"<W, G(mu)> = {record['inner']:.6g}, lambda = {record['lam']:.6g})")


def _poison(attack: Attack, model: nn.Module, X, y, splits) -> PoisonResult:
    # an attack that validates its poisons (TGDA's leader) gets the validation split, never the test set
    takes_validation = "validation" in inspect.signature(attack.poison).parameters
    return attack.poison(model, X, y, **({"validation": (splits.x_val, splits.y_val)} if takes_validation else {}))


def _run_cell(attack, model, target, X, y, splits, cell: Path, fit, save, clean_acc: float, grad_norm_clean: float, log) -> dict:
    """One ε_d: poison ``model`` (or load the finished poisons), retrain from scratch, evaluate."""
    done = cell / "result.json"
    if done.is_file():
        return io.read_json(done)
    cell.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    if (cell / "poisons.pt").is_file():
        result = PoisonResult.load(cell)
    else:
        result = _poison(attack, model, X, y, splits)
        result.save(cell)
    attack_time = time.perf_counter() - started
    X_mix, y_mix = result.mixed(X, y, num_outputs=models.last_linear(target).out_features)
    retrained = save(fit(X_mix, y_mix), cell / "retrained_model.pt")
    poisoned_acc, poisoned_mse = _evaluate(retrained, splits.x_test, splits.y_test)
    entry = {
        "eps_d": attack.eps_d,
        "num_poisons": len(result.x),
        "poisoned_acc": poisoned_acc,
        "acc_drop": clean_acc - poisoned_acc,
        **({"poisoned_mse": poisoned_mse} if poisoned_mse is not None else {}),
        # ‖g(χ)‖ of the target on clean ∪ poisons, whatever attack made them (GC tracks it already)
        **_grad_norms(result, target, X, y, grad_norm_clean),
        "param_distance": parameter_distance(retrained, target),
        "attack_time_s": attack_time,
    }
    io.write_json(done, entry)
    if getattr(attack, "checkpoint", None) is not None:
        Path(attack.checkpoint).unlink(missing_ok=True)  # the poisons are saved: the checkpoint is spent
    quality = f"test MSE {poisoned_mse:.4g}" if poisoned_mse is not None else f"poisoned accuracy {poisoned_acc:.2f}% (drop {entry['acc_drop']:.2f})"
    log(f"eps_d={attack.eps_d:g}: {quality}, ‖g‖ ratio {entry['grad_norm_ratio']:.3g}, ‖w − w_t‖ {entry['param_distance']:.3g}")
    return entry


def mixed_grad_norm(model: nn.Module, X, y, poisons: PoisonResult | None = None, *, chunk_size: int = 256) -> float:
    """‖g(µ) + ε_d·g(ν̂)‖₂ at the model's parameters (the GC residual, equation (16)): the sum of
    the per-sample gradients over clean ∪ poisons divided by the number of clean points n."""
    num_outputs = models.last_linear(model).out_features
    X_mix, y_mix = (X, y) if poisons is None else poisons.mixed(X, y, num_outputs=num_outputs)
    n = len(X_mix) - (0 if poisons is None else len(poisons.x))
    device = next(model.parameters()).device
    params = select_parameters(model, "all")
    with evaluating(model):
        total = gradient_sum(model, params, X_mix, y_mix, resolve(num_outputs, y_mix), chunk_size=chunk_size, device=device)
    return flat_norm([t / n for t in total])


def _evaluate(model: nn.Module, X, y) -> tuple[float, float | None]:
    """(accuracy in %, None) for classification; (NaN, mean squared error) for regression targets,
    where accuracy is undefined (Figure 5's least squares)."""
    if task_of(y) == "regression":
        return math.nan, mean_squared_error(model, X, y)
    return accuracy(model, X, y), None


def _grad_norms(result: PoisonResult, target: nn.Module, X, y, grad_norm_clean: float) -> dict:
    """‖g(µ)‖ and ‖g(µ) + ε_d·g(ν̂)‖ at the target: the first and last GC history entries, or
    computed here for attacks that do not track them."""
    if result.grad_norm_history:
        initial, final = result.grad_norm_history[0], result.grad_norm_history[-1]
    else:
        initial, final = grad_norm_clean, mixed_grad_norm(target, X, y, result)
    return {"grad_norm_initial": initial, "grad_norm_final": final, "grad_norm_ratio": final / initial if initial > 0 else math.nan}


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4g}"


def text_table(header: list[str], rows: list[list[str]], *, left_first: bool = False) -> str:
    """Fixed-width columns for the terminal: the header, a rule, the rows; cells are right-aligned,
    the first column left-aligned with ``left_first``."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if left_first and i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def format_table(metrics: dict) -> str:
    """The run's results as a fixed-width table for the terminal."""
    regression = "clean_mse" in metrics  # accuracy is undefined: the test MSE instead (Figure 5)
    quality = (f"clean test MSE {metrics['clean_mse']:.4g}, target {metrics['target_mse']:.4g}" if regression
               else f"clean {metrics['clean_acc']:.2f}%, target {metrics['target_acc']:.2f}%")
    head = f"{metrics['dataset']} / {metrics['model']}: {quality}, tau {_fmt(metrics['tau'])}"
    cols = ["eps_d", "poisons", *(["test MSE"] if regression else ["poisoned acc", "acc drop"]), "‖g‖ final/initial", "param dist"]
    rows = [
        [f"{r['eps_d']:g}", str(r["num_poisons"]),
         *([f"{r['poisoned_mse']:.4g}"] if regression else [f"{r['poisoned_acc']:.2f}", f"{-r['acc_drop']:+.2f}"]),
         f"{r['grad_norm_ratio']:.3g}", f"{r['param_distance']:.3g}"]
        for r in metrics["results"]
    ]
    return "\n".join([head, text_table(cols, rows)])
