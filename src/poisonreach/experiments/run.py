"""The main job: clean model → target → τ → the attack for each ε_d → retrain → metrics.

The evaluation protocol of section 5.1: the victim retrains from scratch on clean ∪ poisons, with
the same seed and the same training protocol as the clean model, so the accuracy drop measures the
poisons and nothing else. GC attacks the target; the baselines (gm, tgda, labelflip) attack the
clean model, as they know no target; τ and ‖g(µ) + ε_d·g(ν̂)‖ at the target are reported for all.
One run writes one self-contained folder:

    config.yaml           the resolved configuration (read with yaml.safe_load)
    metrics.json          clean_acc, target_acc, tau, grad_norm_clean (‖g(µ)‖ at the target),
                          clean_grad_norm (the clean model's training-gradient norm), and one entry
                          per ε_d under "results" (poisoned_acc, acc_drop, target_agreement,
                          victim_grad_norm, grad_norm_final, ...)
    clean_model.pt        the clean model and target_model.pt the target (poisonreach.models.load_model)
    clean_model_seed=S.pt the clean model of victim seed S (``victim_seeds``; S ≠ the run's seed)
    clean_victim_model.pt with ``victim_model``: the clean model of the victims' architecture (and
                          clean_victim_model_seed=S.pt for victim seed S), the drops' reference
    threshold.json        the full reachability record of the target
    eps_d=<value>/        poisons.pt, poisons.json (GC history, config), retrained_model.pt, result.json,
                          retrained_model_seed=S.pt (victim seed S ≠ the run's seed)
    *.png, *.pdf          figures (poisonreach.experiments.plots.plot_run): gc_history, eps_d_curves,
                          poisons (image data)
    tensorboard/, mlruns/ with --log tensorboard or mlflow: the run's records (:mod:`.tracking`)

How close the victim came to the target is ``target_agreement``, the percentage of test points where
the two predict the same class (:func:`poisonreach.training.agreement`; classification only): the
parameter distance misleads, since flat directions (the weights of always-zero pixels, a shift
common to all logits) move w without changing a prediction. Every trained model's convergence is
recorded: its training-gradient norm
(:func:`poisonreach.training.training_gradient_norm`) over the data it was trained on, clean data for
the clean model, clean ∪ poisons for a victim, clean ∪ the target's own poisons for a poisoned target.
How far from the best possible GC stopped is ``residual_floor_ratio`` (:func:`floor_fields`, for the
problem-(18) solvers on a linear classifier with a box): no poisons in the box bring
``grad_norm_ratio`` below it, so a ratio close to it says the solver did all the box allowed.

Victim seeds (``RunConfig.victim_seeds``): the victim is retrained from scratch with each seed (its
initialisation and batch order; the poisons, the target and the data split stay the run's), and
so is a clean model, since a drop is measured against a clean model trained the same way. The
per-seed lists and their mean and sample standard deviation go into each result; ``poisoned_acc``,
``acc_drop`` and the other unsuffixed fields stay those of the run's own seed, so adding victim
seeds changes no number a run without them reports. A seed equal to the run's seed reuses its
models; another seed trains its own.

Transfer victims (``RunConfig.victim_model``): the victims retrain another architecture; the
clean model, the target, τ and the attack stay ``model``'s, and each drop is measured against a
clean model of the victim's architecture, trained the same way (``victim_clean_acc``;
``victim_clean_acc_per_seed`` and its statistics with victim seeds). ``param_distance`` is then
null, the victim's parameters not being the target's.

``protocol: official`` (:mod:`poisonreach.experiments.official`) makes the poisons and retrains the
victims as the official code does; the clean model, the target and τ are the same as in the honest
protocol, and each result also carries the spread of the victim's test accuracy over its epochs.

A folder that already holds the same configuration is resumed: finished steps are loaded, not rerun.
Other budgets ``eps_d`` or ``victim_seeds`` are not a different run: the cells and seeds not yet
done are computed, the others read back; ``data_root`` and ``device`` say where a run reads and
computes, not what, and may change too. A folder whose results another configuration made is
refused, naming what differs; one that holds no results yet (a run that failed before its first
model, or before its first ε_d cell for a change of the attack alone) is taken over
(:func:`claim`). :func:`tau` makes the same clean model and target and stops at τ, writing nothing.
Progress and results are logged (:mod:`logging`); ``tracking`` records the run in TensorBoard or
MLflow (:mod:`.tracking`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from torch import nn

from .. import distributed, io, models
from ..attacks import Attack, CancelingAttack, PoisonResult
from ..attacks.base import box_bounds
from ..gradients import flat_norm, gradient_sum, select_parameters
from ..losses import resolve, task_of
from ..validation import evaluating
from ..errors import PoisonReachError
from ..reachability import residual_floor, threshold
from ..targets import parameter_distance, scale_target
from ..training import accuracy, agreement, mean_squared_error, minimize, train, training_gradient_norm
from .config import (ADDITIVE_FIELDS, ATTACK_FIELDS, CELL_PREFIX, POISONED_TARGETS, RunConfig, cell_name, fresh_model, load_data, mean_std,
                     available_cores, set_worker_threads, short_name, victim_spec)
from .official import CleanReferences, run_cell as run_official_cell
from .plots import plot_run
from .selection import TargetSelection
from .tracking import FOLDERS as TRACKING_FOLDERS
from .tracking import Tracker, Tracking, console_logging, open_tracker

logger = logging.getLogger(__name__)


def _load_or(path: Path, make):
    """Resume: load a finished model file, else build it with ``make`` and save it."""
    if path.is_file():
        return models.load_model(path)
    return make()


def run(config: RunConfig, out: str | os.PathLike, *, tracking: Tracking | None = None) -> dict:
    """Run the main job into folder ``out`` and return its metrics (also written to metrics.json);
    ``tracking`` records it (:mod:`.tracking`)."""
    config.validate()
    out = Path(out)
    claim(config, out)
    if distributed.active():  # one rank of a data-parallel job: its own GPU; rank 0 writes and records
        config = dataclasses.replace(config, device=str(distributed.local_device(config.device)))
        tracking = tracking if distributed.is_writer() else None
        distributed.barrier()  # every rank has checked the folder before rank 0 writes to it
    with open_tracker(tracking, out, config.to_dict()) as tracker:
        return _run(config, out, tracker)


# the command line's view of a data-parallel job: torchrun's group joined, rank 0 prints
is_writer, joined = distributed.is_writer, distributed.joined


def run_processes(config: RunConfig, out: str | os.PathLike, *, nproc: int, tracking: Tracking | None = None, quiet: bool = False,
                  threads: int | None = None) -> dict:
    """:func:`run` data parallel on ``nproc`` processes of this machine (``run --nproc``; 1: in this
    process), rank 0's metrics. Each rank takes ``threads`` torch threads (default: its share of
    the cores) and logs to stderr, the ranks other than 0 warnings only."""
    if nproc > 1 and distributed.active():
        raise PoisonReachError("--nproc starts its own processes, but this one is already a rank of torchrun's: drop --nproc")
    if nproc == 1:
        return run(config, out, tracking=tracking)
    return distributed.launch(_rank, nproc, config, out, tracking, quiet, threads or max(1, len(available_cores()) // nproc),
                              device=config.device)


def _rank(config: RunConfig, out, tracking: Tracking | None, quiet: bool, threads: int) -> dict:
    """One rank of :func:`run_processes`: a fresh process, so its threads and console logging."""
    set_worker_threads(threads)
    with console_logging(quiet=quiet or not distributed.is_writer()):
        return run(config, out, tracking=tracking)


def default_out(config: RunConfig) -> Path:
    """The run folder ``poisonreach run`` writes without --out: ``runs/DATASET-MODEL-ATTACK-epswE-seedS``
    (a user's data set or model by its short name, a transfer run with ``-victim-M`` appended)."""
    victim = f"-victim-{short_name(config.victim_model)}" if config.victim_model else ""
    return Path("runs") / f"{short_name(config.dataset)}-{short_name(config.model)}-{config.attack}-epsw{config.eps_w:g}-seed{config.seed}{victim}"


# what a run folder holds that is no result of its configuration: the configuration, tracking stores
_NOT_RESULTS = ("config.yaml", *TRACKING_FOLDERS.values())


def claim(config: RunConfig, out: Path) -> None:
    """Check that ``config`` may run in ``out`` (:func:`_run` writes it to ``out/config.yaml`` once the
    data and the models are known good), or refuse the folder, naming the fields that differ
    and their two values, when it holds results that another configuration made: a differing field
    other than the budgets and victim seeds (which a run grows by) blocks a folder with any result,
    one of the attack's only a folder with files in its ε_d cells (the clean model and the target
    do not depend on the attack)."""
    saved = out / "config.yaml"
    if saved.is_file():
        previous = io.read_yaml(saved)
        differ = config.differing_keys(previous)
        blocking = [k for k in differ if k not in ADDITIVE_FIELDS and _holds_results(out, cells_only=k in ATTACK_FIELDS)]
        if blocking:
            mine = io.plain(config.to_dict())
            shown = "; ".join(f"{k}: {json.dumps(previous.get(k) if isinstance(previous, dict) else previous)} there, "
                              f"{json.dumps(mine.get(k))} here" for k in blocking)
            raise PoisonReachError(f"{out} holds results of a run with a different configuration ({shown}): choose another "
                                   f"--out folder, or delete {out}")
        taken = [k for k in differ if k not in ADDITIVE_FIELDS]
        logger.info(f"resuming the run in {out}" if not taken else
                    f"{out} holds no results that depend on {', '.join(taken)}: running the new configuration in it")
        for k in (k for k in ADDITIVE_FIELDS if k in differ):
            logger.info(f"{k} changed from {previous.get(k)} to {getattr(config, k)}: computing what is new, reading back the rest")


def _holds_results(out: Path, *, cells_only: bool) -> bool:
    """Whether ``out`` holds a file a run made (a model, poisons, a result), in its ε_d cells only with ``cells_only``."""
    for path in out.rglob("*"):
        top = path.relative_to(out).parts[0]
        if top not in _NOT_RESULTS and (top.startswith(CELL_PREFIX) or not cells_only) and path.is_file():
            return True
    return False


def _run(config: RunConfig, out: Path, tracker: Tracker) -> dict:
    """The body of :func:`run`, its folder claimed."""
    device = torch.device(config.device)
    started = time.perf_counter()

    with distributed.writer_first():  # rank 0 extracts archives and writes caches, the others read them
        splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    fit = fitter(config, spec, callback=tracker.training_step)

    def save(model: nn.Module, path: Path, spec: dict = spec) -> nn.Module:
        models.save_model(model, path, **spec)
        tracker.trained(path.relative_to(out).with_suffix("").as_posix())  # the losses of its training, if trained now
        return model

    # the victims' architecture: the target's, or a transfer victim's (config.victim_model)
    vspec = victim_spec(config, spec)
    transfer = vspec is not spec
    fit_victim, save_victim = (fitter(config, vspec), functools.partial(save, spec=vspec)) if transfer else (fit, save)
    fresh_model(config, spec)  # fail on a model that does not fit the data before any output or work
    victim_outputs = models.last_linear(fresh_model(config, vspec)).out_features
    io.write_yaml(out / "config.yaml", config.to_dict())  # the data and the models are known good: the folder is this run's
    logger.info(f"{config.dataset}: {len(X)} train, {len(splits.x_val)} val, {len(splits.x_test)} test; model {config.model}"
                + (f", victim model {config.victim_model}" if transfer else ""))
    clean = _load_or(out / "clean_model.pt", lambda: save(fit(X, y), out / "clean_model.pt")).to(device)
    clean_acc, clean_mse = _evaluate(clean, splits.x_test, splits.y_test)
    clean_grad_norm = trained_grad_norm(config, clean, X, y)

    classification = splits.task != "regression"
    # the clean model every drop is measured against: trained as the victims are, so the victim's architecture
    reference = (clean_acc, clean_mse, clean_grad_norm)
    if transfer:
        path = out / "clean_victim_model.pt"
        clean_victim = _load_or(path, lambda: save_victim(fit_victim(X, y), path)).to(device)
        reference = (*_evaluate(clean_victim, splits.x_test, splits.y_test), trained_grad_norm(config, clean_victim, X, y))
        logger.info(f"victim model {config.victim_model} trained on clean data: "
                    + (f"accuracy {reference[0]:.2f}%" if classification else f"test MSE {reference[1]:.4g}"))
    selection = None
    if config.target == "select":  # a target per ε_d, chosen in the loop below
        target, about, thr = None, {}, None
        selection = TargetSelection(config.target_options, clean, X, y, splits, fit, save, out / "candidates",
                                    weight_decay=config.weight_decay, seed=config.seed)
    else:
        target = _load_or(out / "target_model.pt", lambda: save(make_target(config, clean, X, y, splits, fit, poisons_dir=out / "target_poisons"),
                                                                out / "target_model.pt")).to(device)
        planted = out / "target_poisons"
        about, thr = _describe_target(config, target, clean, X, y, splits,
                                      PoisonResult.load(planted) if config.target in POISONED_TARGETS and (planted / "poisons.pt").is_file() else None)
        io.write_json(out / "threshold.json", thr.to_dict())
        quality = (f"clean test MSE {clean_mse:.4g}, target test MSE {about['target_mse']:.4g}" if not classification
                   else f"clean accuracy {clean_acc:.2f}%, target accuracy {about['target_acc']:.2f}%")
        logger.info(f"{quality}, tau {thr.tau:.4g} (tau(c) {_fmt(thr.tau_multiclass)})")

    seeds = (_SeedPlan(config, vspec, save_victim, out, "victim_" if transfer else "", reference, splits, callback=tracker.training_step)
             if config.victim_seeds else None)
    if seeds is not None:
        logger.info(f"victim seeds {config.victim_seeds}: clean accuracy " + ", ".join(f"{a:.2f}%" for a in seeds.clean_acc) if classification
            else f"victim seeds {config.victim_seeds}: clean test MSE " + ", ".join(f"{m:.4g}" for m in seeds.clean_mse))
    official = CleanReferences(config, spec, save, out, splits) if config.protocol == "official" else None
    if official is not None:
        logger.info(f"official protocol: the official retraining on clean data reaches {official.acc(config.seed):.2f}% at its last epoch "
            f"(epochs {official.records[config.seed]['acc_min']:.2f}–{official.records[config.seed]['acc_max']:.2f}%)")
    results = []
    for budget, attack in zip(config.eps_d, config.make_attacks(thr.tau if thr else 1.0, checkpoint_dir=out)):
        if budget == "tau" and not 0 < thr.tau < math.inf:
            # τ = 0: any ε_d > 0 reaches the target (Theorem 2), so there is no budget to attack at
            logger.info(f"eps_d 'tau' skipped: this target has τ = {thr.tau:g}, which is no budget")
            continue
        cell, chosen = out / cell_name(attack.eps_d), {}
        if selection is not None:
            target, poisons, records = selection.choose(attack, cell)
            if target is None:
                logger.info(f"eps_d={attack.eps_d:g} skipped: GC reached none of the candidates (see {cell / 'selection.json'})")
                continue
            if not (cell / "poisons.pt").is_file():
                poisons.save(cell)
            chosen = {"target": next(c.name for c in records if c.chosen), **_describe_target(config, target, clean, X, y, splits)[0]}
        grad_norm_clean = {**about, **chosen}["grad_norm_clean"]  # ‖g(µ)‖ at this cell's target
        victim_of = target if attack.model_targeted else clean  # the baselines know the clean model only
        if official is not None:
            clean_by_seed = {config.seed: clean_acc, **(dict(zip(seeds.seeds, seeds.clean_acc)) if seeds is not None else {})}
            results.append(run_official_cell(attack, victim_of, target, X, y, splits, cell, config=config, spec=spec,
                                             save=save, clean_acc=clean_by_seed, references=official,
                                             grad_norms=lambda poisons: _grad_norms(poisons, target, X, y, grad_norm_clean)))
        else:
            results.append({**chosen, **_run_cell(attack, victim_of, target, X, y, splits, cell, fit_victim, save_victim, reference[0],
                                                  grad_norm_clean, grad_norm=lambda model, X_fit, y_fit: trained_grad_norm(config, model, X_fit, y_fit),
                                                  seeds=seeds, num_outputs=victim_outputs)})
        tracker.cell(results[-1], cell)

    metrics = {
        "dataset": config.dataset,
        "model": config.model,
        "eps_w": config.eps_w,
        "target": config.target,  # "select": each result names its own target and carries its fields
        "clean_acc": clean_acc,
        **({"clean_mse": clean_mse} if not classification else {}),
        # the target's accuracies, τ, ‖g(µ)‖ at it (the scale of the ratios) and, for a trained
        # target, its training-gradient norm over clean ∪ its poisons (None for a corrupted one)
        **about,
        "clean_grad_norm": clean_grad_norm,  # convergence of the clean model, on the clean data
        # a transfer victim's architecture and its clean model, the reference of the drops
        **({"victim_model": config.victim_model, "victim_model_options": config.victim_model_options, "victim_clean_acc": reference[0],
            **({"victim_clean_mse": reference[1]} if not classification else {}), "victim_clean_grad_norm": reference[2]} if transfer else {}),
        **(seeds.summary() if seeds is not None else {}),
        **({"protocol": "official", **official.summary()} if official is not None else {}),
        "num_train": len(X),
        "results": results,
        "wall_time_s": time.perf_counter() - started,
    }
    io.write_json(out / "metrics.json", metrics)
    tracker.finish(metrics)
    if distributed.is_writer():
        plot_run(out)
    return metrics


def _describe_target(config: RunConfig, target: nn.Module, clean: nn.Module, X, y, splits, poisons: PoisonResult | None = None):
    """(fields, threshold) of a target: test and validation accuracy (MSE for regression), τ,
    ‖g(µ)‖ at it, its training-gradient norm over clean ∪ ``poisons`` when it was trained on them
    (else None), and its agreement with the clean model."""
    target_acc, target_mse = _evaluate(target, splits.x_test, splits.y_test)
    thr = threshold(target, X, y, weight_decay=config.weight_decay)
    mixed = None if poisons is None else poisons.mixed(X, y, num_outputs=models.last_linear(target).out_features)
    classification = splits.task != "regression"
    fields = {
        "target_acc": target_acc,
        "target_val_acc": _evaluate(target, splits.x_val, splits.y_val)[0],
        **({"target_mse": target_mse} if not classification else {}),
        "tau": thr.tau,
        "tau_multiclass": thr.tau_multiclass,
        "inner": thr.inner,
        "grad_norm_clean": mixed_grad_norm(target, X, y),
        "target_grad_norm": None if mixed is None else trained_grad_norm(config, target, *mixed),
        **({"target_clean_agreement": agreement(target, clean, splits.x_test)} if classification else {}),
    }
    return fields, thr


def fitter(config: RunConfig, spec: dict, seed: int | None = None, *, callback=None):
    """``fit(X, y)``: train a fresh model of the run from scratch (the same seed and protocol each
    time); ``seed`` replaces the run's seed for the initialisation and the batch order;
    ``callback`` is the training's (:func:`poisonreach.training.train`)."""
    device = torch.device(config.device)
    seed = config.seed if seed is None else seed
    if config.protocol == "converged":
        return lambda X_fit, y_fit: minimize(fresh_model(config, spec, seed), X_fit, y_fit, device=device, callback=callback, **config.training)
    return lambda X_fit, y_fit: train(fresh_model(config, spec, seed), X_fit, y_fit, seed=seed, device=device, callback=callback,
                                      **config.training)


def trained_grad_norm(config: RunConfig, model: nn.Module, X, y) -> float:
    """The training-gradient norm of a model of the run trained on (X, y), with the protocol's weight
    decay, over the parameters its training fits."""
    return training_gradient_norm(model, X, y, weight_decay=config.weight_decay, parameters=config.trained_parameters,
                                  device=torch.device(config.device))


class _SeedPlan:
    """The victim seeds of a run: one clean model per seed (the run's own for the run's seed, else
    ``clean_model_seed=S.pt``, trained once and loaded after), its test accuracy (or MSE) and its
    training-gradient norm, and the victims' file names; ``callback`` is the trainings'. ``spec``
    is the victims' architecture; for a transfer victim ``prefix`` is ``victim_``, so its clean
    models are ``clean_victim_model_seed=S.pt`` and their fields ``victim_clean_*``."""

    def __init__(self, config: RunConfig, spec: dict, save, out: Path, prefix: str, clean_stats: tuple, splits, *, callback=None):
        self.config, self.spec, self.save, self.seeds, self.prefix, self.callback = config, spec, save, list(config.victim_seeds), prefix, callback
        device = torch.device(config.device)
        X, y = splits.x_train, splits.y_train
        self.clean_acc, self.clean_mse, self.clean_grad_norm = [], [], []
        for seed in self.seeds:
            if seed == config.seed:
                acc, mse, norm = clean_stats
            else:
                path = out / f"clean_{prefix}model_seed={seed}.pt"
                model = _load_or(path, lambda: save(self.fit(seed)(X, y), path)).to(device)
                (acc, mse), norm = _evaluate(model, splits.x_test, splits.y_test), trained_grad_norm(config, model, X, y)
            self.clean_acc.append(acc)
            self.clean_mse.append(mse)
            self.clean_grad_norm.append(norm)

    def fit(self, seed: int):
        return fitter(self.config, self.spec, seed, callback=self.callback)

    def victim_file(self, cell: Path, seed: int) -> Path:
        return cell / ("retrained_model.pt" if seed == self.config.seed else f"retrained_model_seed={seed}.pt")

    def summary(self) -> dict:
        """The clean models' fields of metrics.json."""
        regression, clean = self.clean_mse[0] is not None, f"{self.prefix}clean"
        return {"victim_seeds": self.seeds,
                **({f"{clean}_mse_per_seed": self.clean_mse, **mean_std(f"{clean}_mse", self.clean_mse)} if regression
                   else {f"{clean}_acc_per_seed": self.clean_acc, **mean_std(f"{clean}_acc", self.clean_acc)}),
                f"{clean}_grad_norm_per_seed": self.clean_grad_norm}



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
    if config.target == "select" and not target_file:
        raise PoisonReachError("--target select chooses a target per eps_d inside `poisonreach run`; each cell's selection.json "
                               "holds every candidate's tau (or give a saved target with --target-file)")
    splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    if target_file:
        target = models.load_model(target_file).to(torch.device(config.device))
    else:
        fit = fitter(config, spec)
        target = make_target(config, fit(X, y), X, y, splits, fit)
    thr = threshold(target, X, y, weight_decay=config.weight_decay)
    return {"dataset": config.dataset, "model": config.model, "eps_w": None if target_file else config.eps_w, **thr.to_dict()}


def format_tau(record: dict, *, as_json: bool = False) -> str:
    """A :func:`tau` record as one line for the terminal, or as JSON."""
    if as_json:
        return json.dumps(io.plain(record), indent=2)
    multiclass = record["tau_multiclass"]
    return (f"tau = {record['tau']:.6g}   (tau(c) = {multiclass if multiclass is None else f'{multiclass:.6g}'}, "
            f"<W, G(mu)> = {record['inner']:.6g}, lambda = {record['lam']:.6g})")


def train_model(config: RunConfig, out: str | os.PathLike) -> dict:
    """Train the run's clean model and write it to the model file ``out`` (``poisonreach train``):
    the model :func:`run` trains first, by the same seed and protocol, for ``--pretrained`` or any
    command that reads a model file. An existing ``out`` is refused, not overwritten. Returns the
    file, its test accuracy (or MSE), its training-gradient norm over the parameters the protocol
    fits (the convergence check) and the seconds the training took."""
    config.validate()
    if config.protocol == "official":
        raise PoisonReachError("train fits a model by --protocol honest or converged; the official protocol's models are made "
                               "inside its runs (poisonreach run --protocol official)")
    out = Path(out)
    if out.exists():
        raise PoisonReachError(f"{out} exists: give another --out, or delete it to train again")
    splits, spec = load_data(config)
    X, y = splits.x_train, splits.y_train
    started = time.perf_counter()
    model = fitter(config, spec)(X, y)
    seconds = time.perf_counter() - started
    models.save_model(model, out, **spec)
    acc, mse = _evaluate(model, splits.x_test, splits.y_test)
    return {"file": str(out), "dataset": config.dataset, "model": config.model, "protocol": config.protocol, "seed": config.seed,
            "train_size": len(X), "test_acc": acc, "test_mse": mse, "train_grad_norm": trained_grad_norm(config, model, X, y),
            "seconds": seconds}


def format_trained(record: dict, *, as_json: bool = False) -> str:
    """A :func:`train_model` record as one line for the terminal, or as JSON."""
    if as_json:
        return json.dumps(io.plain(record), indent=2)
    quality = f"test MSE {record['test_mse']:.4g}" if record["test_mse"] is not None else f"test accuracy {record['test_acc']:.2f}%"
    return (f"{record['file']}: {record['model']} trained on {record['train_size']} {record['dataset']} points, {record['protocol']} protocol, "
            f"{quality}, training-gradient norm {record['train_grad_norm']:.2g}, {record['seconds']:.1f} s")


def _poison(attack: Attack, model: nn.Module, X, y, splits) -> PoisonResult:
    # an attack that validates its poisons (TGDA's leader) gets the validation split, never the test set
    takes_validation = "validation" in inspect.signature(attack.poison).parameters
    return attack.poison(model, X, y, **({"validation": (splits.x_val, splits.y_val)} if takes_validation else {}))


def _run_cell(attack, model, target, X, y, splits, cell: Path, fit, save, clean_acc: float, grad_norm_clean: float, *,
              grad_norm, seeds: "_SeedPlan | None" = None, num_outputs: int) -> dict:
    """One ε_d: poison ``model`` (or load the finished poisons), retrain from scratch, evaluate; with
    victim ``seeds``, retrain once per seed too. ``fit`` and ``save`` train and save a victim, whose
    model has ``num_outputs`` outputs; ``clean_acc`` is the clean model's of the victim's
    architecture. What a finished result.json holds is read back;
    fields it lacks (written by an earlier version, or new victim seeds) are computed from the saved
    models, training only the victims that have no model file."""
    done = cell / "result.json"
    entry = io.read_json(done) if done.is_file() else None
    poisons = None

    def mixed():  # clean ∪ poisons, the victims' training set (the poisons read only when needed)
        nonlocal poisons
        poisons = PoisonResult.load(cell) if poisons is None else poisons
        return poisons.mixed(X, y, num_outputs=num_outputs)

    classification = splits.task != "regression"
    changed = entry is None
    retrained = None
    if entry is None:
        cell.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if (cell / "poisons.pt").is_file():
            poisons = PoisonResult.load(cell)
        else:
            poisons = _poison(attack, model, X, y, splits)
            poisons.save(cell)
        attack_time = time.perf_counter() - started
        X_mix, y_mix = mixed()
        retrained = _load_or(cell / "retrained_model.pt", lambda: save(fit(X_mix, y_mix), cell / "retrained_model.pt"))
        poisoned_acc, poisoned_mse = _evaluate(retrained, splits.x_test, splits.y_test)
        entry = {
            "eps_d": attack.eps_d,
            "num_poisons": len(poisons.x),
            "poisoned_acc": poisoned_acc,
            "acc_drop": clean_acc - poisoned_acc,
            **({"poisoned_mse": poisoned_mse} if poisoned_mse is not None else {}),
            # ‖g(χ)‖ of the target on clean ∪ poisons, whatever attack made them (GC tracks it already)
            **_grad_norms(poisons, target, X, y, grad_norm_clean),
            "param_distance": _distance(retrained, target),
            "attack_time_s": attack_time,
        }
    if "residual_floor" not in entry and floor_applies(attack, target, X, y):
        entry.update(floor_fields(attack, target, X, y, entry))
        changed = True
    missing = [k for k in ("target_agreement", "victim_grad_norm") if k not in entry and (classification or k != "target_agreement")]
    if missing:  # a fresh result, or one written before these fields existed: the run seed's victim
        if retrained is None:
            retrained = models.load_model(cell / "retrained_model.pt").to(next(target.parameters()).device)
        if "target_agreement" in missing:
            entry["target_agreement"] = agreement(retrained, target, splits.x_test)
        if "victim_grad_norm" in missing:
            entry["victim_grad_norm"] = grad_norm(retrained, *mixed())
        changed = True
    if seeds is not None and (entry.get("victim_seeds") != seeds.seeds or not _seed_fields(classification) <= set(entry)):
        entry.update(_seed_statistics(entry, seeds, cell, target, splits, mixed(), grad_norm, classification))
        changed = True
    elif seeds is None and "victim_seeds" in entry:  # seeds dropped from the configuration: so are their fields
        entry = {k: v for k, v in entry.items() if k != "victim_seeds" and not k.endswith(("_per_seed", "_mean", "_std"))}
        changed = True
    if changed:
        io.write_json(done, entry)
    if getattr(attack, "checkpoint", None) is not None:
        Path(attack.checkpoint).unlink(missing_ok=True)  # the poisons are saved: the checkpoint is spent
    quality = (f"test MSE {entry['poisoned_mse']:.4g}" if not classification else
               f"poisoned accuracy {entry['poisoned_acc']:.2f}% (drop {entry['acc_drop']:.2f}), agreement with the target "
               f"{entry['target_agreement']:.2f}%")
    if seeds is not None and classification:
        quality += (f"; over victim seeds {seeds.seeds}: poisoned {entry['poisoned_acc_mean']:.2f} ± {entry['poisoned_acc_std']:.2f}%, "
                    f"drop {entry['acc_drop_mean']:.2f} ± {entry['acc_drop_std']:.2f}")
    floor = f" (floor {entry['residual_floor_ratio']:.3g})" if "residual_floor_ratio" in entry else ""
    logger.info(f"eps_d={attack.eps_d:g}: {quality}, ‖g‖ ratio {entry['grad_norm_ratio']:.3g}{floor}, ‖w − w_t‖ {_fmt(entry['param_distance'], '.3g')}, "
        f"victim ‖∇L‖ {entry['victim_grad_norm']:.3g}")
    return entry


# the per-seed lists of a result, in the order of its victim seeds
_PER_SEED = ("clean_acc", "poisoned_acc", "acc_drop", "target_agreement", "victim_grad_norm", "param_distance",
             "clean_mse", "poisoned_mse")


def _seed_fields(classification: bool) -> set[str]:
    """The keys :func:`_seed_statistics` writes."""
    names = ["clean_acc", "poisoned_acc", "acc_drop", "target_agreement"] if classification else ["clean_mse", "poisoned_mse"]
    return ({"victim_seeds"} | {f"{k}_per_seed" for k in [*names, "victim_grad_norm", "param_distance"]}
            | {f"{k}_{s}" for k in [*names[1:], "victim_grad_norm", "param_distance"] for s in ("mean", "std")})


def _seed_statistics(entry: dict, seeds: "_SeedPlan", cell: Path, target, splits, mixed, grad_norm, classification: bool) -> dict:
    """The victim-seed fields of one result: per-seed lists and their means and standard deviations.
    A seed already in ``entry`` is read back from it; the run's seed is the entry's own victim;
    any other seed's victim is loaded from its file or, when there is none, trained and saved."""
    X_mix, y_mix = mixed
    known = {}
    for i, seed in enumerate(entry.get("victim_seeds") or []):
        known[seed] = {k: entry[f"{k}_per_seed"][i] for k in _PER_SEED if f"{k}_per_seed" in entry}
    records = []
    for seed, clean_acc, clean_mse in zip(seeds.seeds, seeds.clean_acc, seeds.clean_mse):
        if seed in known:
            record = known[seed]
        elif seed == seeds.config.seed:
            record = {k: entry[k] for k in ("poisoned_acc", "target_agreement", "victim_grad_norm", "param_distance", "poisoned_mse") if k in entry}
        else:
            path = seeds.victim_file(cell, seed)
            victim = _load_or(path, lambda: seeds.save(seeds.fit(seed)(X_mix, y_mix), path)).to(next(target.parameters()).device)
            poisoned_acc, poisoned_mse = _evaluate(victim, splits.x_test, splits.y_test)
            record = {"poisoned_acc": poisoned_acc, "victim_grad_norm": grad_norm(victim, X_mix, y_mix),
                      "param_distance": _distance(victim, target),
                      **({"target_agreement": agreement(victim, target, splits.x_test)} if classification else {"poisoned_mse": poisoned_mse})}
        record = {**record, **({"clean_acc": clean_acc, "acc_drop": clean_acc - record["poisoned_acc"]} if classification
                               else {"clean_mse": clean_mse})}
        records.append(record)
    names = ["clean_acc", "poisoned_acc", "acc_drop", "target_agreement"] if classification else ["clean_mse", "poisoned_mse"]
    out = {"victim_seeds": seeds.seeds}
    for name in [*names, "victim_grad_norm", "param_distance"]:
        out[f"{name}_per_seed"] = [r[name] for r in records]
    for name in [*names[1:], "victim_grad_norm", "param_distance"]:
        values = out[f"{name}_per_seed"]
        out.update(mean_std(name, values) if None not in values else {f"{name}_mean": None, f"{name}_std": None})
    return out


def floor_applies(attack: Attack, target: nn.Module, X, y) -> bool:
    """Whether :func:`~poisonreach.reachability.residual_floor` bounds this attack's residual: a
    problem-(18) solver over the whole clean set, cancelling every parameter of a linear
    classifier (its last layer is all of it), with its poisons in a box."""
    return (isinstance(attack, CancelingAttack) and attack.box is not None and not attack.replace and attack.parameters != "first"
            and task_of(y) != "regression" and models.is_linear(target, tuple(X.shape[1:])))


def floor_fields(attack: CancelingAttack, target: nn.Module, X, y, entry: dict) -> dict:
    """The residual floor at a cell's budget m/n with the attack's box and weight decay:
    ``residual_floor`` (certified: no poisons in the box leave ‖r‖ below it), ``residual_floor_relaxed``
    (the least ‖r‖ found over the relaxation without its bounds on the logits) and ``residual_floor_ratio`` (the floor over
    ``grad_norm_initial``, the scale of ``grad_norm_ratio``, which can never be below it)."""
    device = next(target.parameters()).device
    floor = residual_floor(target, X, y, entry["num_poisons"] / len(X), box=box_bounds(attack.box, X, device=device, dtype=torch.float64),
                           weight_decay=attack.weight_decay, device=device)
    initial = entry["grad_norm_initial"]
    return {"residual_floor": floor.floor, "residual_floor_relaxed": floor.relaxed,
            "residual_floor_ratio": floor.floor / initial if initial > 0 else math.nan}


def _distance(victim: nn.Module, target: nn.Module) -> float | None:
    """``parameter_distance`` of a victim to the target; None for a transfer victim of another
    architecture, whose parameters are not the target's."""
    if [p.shape for p in victim.parameters()] != [p.shape for p in target.parameters()]:
        return None
    return parameter_distance(victim, target)


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
    """‖g(µ) + ε_d·g(ν̂)‖ at the target at the clean start and at the end: GC's record
    (:attr:`PoisonResult.grad_norm_initial`, the last history entry), or for attacks that do not
    track it ‖g(µ)‖ and the norm computed here."""
    if result.grad_norm_history:
        initial, final = result.grad_norm_initial, result.grad_norm_history[-1]
    else:
        initial, final = grad_norm_clean, mixed_grad_norm(target, X, y, result)
    return {"grad_norm_initial": initial, "grad_norm_final": final, "grad_norm_ratio": final / initial if initial > 0 else math.nan}


def _fmt(x, spec: str = ".4g") -> str:
    return "-" if x is None else f"{x:{spec}}"


def text_table(header: list[str], rows: list[list[str]], *, left_first: bool = False) -> str:
    """Fixed-width columns for the terminal: the header, a rule, the rows; cells are right-aligned,
    the first column left-aligned with ``left_first``."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if left_first and i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def plus_minus(mean: float, std: float, fmt: str = ".2f") -> str:
    """"mean ± std"."""
    return f"{mean:{fmt}} ± {std:{fmt}}"


def format_table(metrics: dict) -> str:
    """The run's results as a fixed-width table for the terminal; a drop is clean − poisoned accuracy
    (positive: the poisons did damage), as in metrics.json. With several victim seeds the
    accuracy, drop, agreement and distance columns are mean ± sample std over them (and the header
    says so), the victims' ‖∇L‖ the largest over them; otherwise the run seed's values. A transfer
    run's head also has the victim architecture's clean model, the drops' reference."""
    regression = "clean_mse" in metrics  # accuracy is undefined: the test MSE instead (Figure 5)
    seeds = metrics.get("victim_seeds") or []
    several = len(seeds) > 1
    transfer = metrics.get("victim_model")
    clean = "victim_clean" if transfer else "clean"  # the fields of the clean models the victims are compared with
    selected = metrics.get("target") == "select"  # a target per ε_d: its name, accuracy and τ in each row
    target = "chosen per eps_d" if selected else None
    if regression:
        quality = f"clean test MSE {metrics['clean_mse']:.4g}, target {target or format(metrics['target_mse'], '.4g')}"
    elif several and not transfer:
        quality = f"clean {plus_minus(metrics['clean_acc_mean'], metrics['clean_acc_std'])}%, target {target or format(metrics['target_acc'], '.2f') + '%'}"
    else:
        quality = f"clean {metrics['clean_acc']:.2f}%, target {target or format(metrics['target_acc'], '.2f') + '%'}"
    head = f"{metrics['dataset']} / {metrics['model']}: {quality}" + ("" if selected else f", tau {_fmt(metrics['tau'])}")
    if transfer:
        reference = (f"test MSE {metrics['victim_clean_mse']:.4g}" if regression else
                     f"{plus_minus(metrics['victim_clean_acc_mean'], metrics['victim_clean_acc_std'])}%" if several
                     else f"{metrics['victim_clean_acc']:.2f}%")
        head += f"\nvictim model {transfer} (transfer), trained on clean data: {reference}, the reference of the drops"
    norms = [f"clean {metrics['clean_grad_norm']:.3g}"] if transfer else []
    if f"{clean}_grad_norm" in metrics:
        largest = max(metrics.get(f"{clean}_grad_norm_per_seed") or [metrics[f"{clean}_grad_norm"]])
        norms.append(f"{clean.replace('_', ' ')} {largest:.3g}" + (" (max over the seeds)" if several else ""))
    if metrics.get("target_grad_norm") is not None:
        norms.append(f"target {metrics['target_grad_norm']:.3g}")
    if norms:
        head += "\ntraining-gradient norms ‖∇L‖ (0 at convergence): " + ", ".join(norms)
    if several:
        head += f"\nmean ± std over victim seeds {' '.join(map(str, seeds))}"
    official = metrics.get("protocol") == "official"
    if official:
        clean_official = (plus_minus(metrics["official_clean_acc_mean"], metrics["official_clean_acc_std"]) if several
                          else f"{metrics['official_clean_acc']:.2f}")
        head += ("\nofficial protocol: poisoned = the last of 100 epochs of the official retraining (SGD lr 0.1, float64), the drop "
                 f"against the clean model above; the official retraining on clean data alone: {clean_official}% ('drop vs SGD clean')")
    agree = not regression and all("target_agreement" in r for r in metrics["results"])
    converged = all("victim_grad_norm" in r for r in metrics["results"])
    floors = metrics["results"] and all("residual_floor_ratio" in r for r in metrics["results"])
    cols = ["eps_d", *(["target", "target acc", "tau"] if selected else []), "poisons",
            *(["test MSE"] if regression else ["poisoned acc", "acc drop"]), *(["agree %"] if agree else []),
            "‖g‖ final/initial", *(["floor/initial"] if floors else []), "param dist", *(["victim ‖∇L‖" + (" max" if several else "")] if converged else [])]
    if official:  # the spread over the epochs (over all seeds' epochs with several) and the second reference
        cols[4:4] = ["epochs min–max" + (" (all seeds)" if several else ""), "drop vs SGD clean"]  # after the drop

    def row(r: dict) -> list[str]:
        multi = several and "victim_seeds" in r
        if regression:
            quality = [plus_minus(r["poisoned_mse_mean"], r["poisoned_mse_std"], ".4g") if multi else f"{r['poisoned_mse']:.4g}"]
        elif multi:
            quality = [plus_minus(r["poisoned_acc_mean"], r["poisoned_acc_std"]), plus_minus(r["acc_drop_mean"], r["acc_drop_std"])]
        else:
            quality = [f"{r['poisoned_acc']:.2f}", f"{r['acc_drop']:.2f}"]
        if official and multi:
            quality += [f"{min(r['retrain_acc_min_per_seed']):.2f}–{max(r['retrain_acc_max_per_seed']):.2f}",
                        plus_minus(r["acc_drop_vs_official_clean_mean"], r["acc_drop_vs_official_clean_std"])]
        elif official:
            quality += [f"{r['retrain_acc_min']:.2f}–{r['retrain_acc_max']:.2f}", f"{r['acc_drop_vs_official_clean']:.2f}"]
        if agree:
            quality.append(plus_minus(r["target_agreement_mean"], r["target_agreement_std"]) if multi else f"{r['target_agreement']:.2f}")
        distance = (plus_minus(r["param_distance_mean"], r["param_distance_std"], ".3g") if multi and r["param_distance_mean"] is not None
                    else _fmt(r["param_distance"], ".3g"))
        chosen = [r["target"], f"{r['target_acc']:.2f}", _fmt(r["tau"])] if selected else []
        cells = [f"{r['eps_d']:g}", *chosen, str(r["num_poisons"]), *quality, f"{r['grad_norm_ratio']:.3g}", *([f"{r['residual_floor_ratio']:.3g}"] if floors else []), distance]
        if converged:
            cells.append(f"{max(r['victim_grad_norm_per_seed']) if multi else r['victim_grad_norm']:.3g}")
        return cells

    return "\n".join([head, text_table(cols, [row(r) for r in metrics["results"]])])
