"""Defending a finished run: apply a defense to clean ∪ poisons of every ε_d cell (section 5.4, C.8).

A filtering defense (Sever, influence) is evaluated as the paper does: the model trained on the
poisoned set (the cell's ``retrained_model.pt``) is filtered, removing as many points as there are
poisons unless ``fraction`` is given, and a fresh model is retrained on what is kept. A training
defense (MaxUp) trains on the poisoned set itself. DPA trains its partition ensemble on the poisoned
set and also reports certified accuracy at radius ≥ the number of poisons, and its accuracy on the
clean set alone (Table 4's "Clean (DPA)").

Each cell gets ``defense=<id>/`` (defense.yaml, result.json, and keep_mask.pt for filters), where the
id is the name and the options given (:func:`defense_id`, e.g. ``dpa,num_partitions=1200``); the
run's metrics.json gains ``defenses[<id>]`` with, per ε_d, the paper's columns: ``defended_acc``,
``acc_drop_defended`` (GC-d, or GC-cd for a run with ``box: data-range``) and ``recovered``.
Finished cells are read back, so an interrupted ``defend`` continues where it stopped.

Any attack's poisons can be defended against too (:func:`defend_poisons`, ``poisonreach defend
--poisons FILE``): a poison file ``poisonreach evaluate`` reads, with the data set and model given
as for ``evaluate``. The clean model and the victim (the filters' input) are trained as a run
trains them, and each cell goes through the same steps as a run's, so a run's exported poisons
give the numbers of the run folder.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from pathlib import Path

import torch

from .. import io, models
from ..attacks import PoisonResult
from ..defenses import DEFENSES, Filter, certify
from ..errors import PoisonReachError
from ..rows import select_rows
from ..training import accuracy
from ..validation import check_choice, check_options
from .config import RunConfig, cell_name, fresh_model, load_data, victim_spec
from .evaluate import poisoned_set
from .run import fitter, text_table

logger = logging.getLogger(__name__)


def make_defense(name: str, options: dict | None, config: RunConfig, *, poison_share: float = 0.0):
    """The defense object, its constructor arguments from ``options`` (validated there).

    A filter without a ``fraction`` option removes ``poison_share`` of the points: as many as there
    are poisons, as in the paper.
    """
    check_choice("defense", name, DEFENSES)
    cls = DEFENSES[name]
    options = dict(options or {})
    check_options(cls, options, f"{name} defense")
    accepted = inspect.signature(cls).parameters
    for key, value in (("seed", config.seed), ("device", config.device)):
        if key in accepted:
            options.setdefault(key, value)
    if issubclass(cls, Filter):
        options.setdefault("fraction", poison_share)
    missing = [k for k, p in accepted.items() if p.default is inspect.Parameter.empty and k not in options]
    if missing:
        raise PoisonReachError(f"the {name} defense needs the option(s) {missing}: add e.g. --option {missing[0]}=...")
    return cls(**options)


def defense_id(name: str, options: dict | None) -> str:
    """The folder and metrics key of a defense with its options, e.g. ``dpa,num_partitions=1200``."""
    parts = [name] + [f"{k}={_compact(v)}" for k, v in sorted((options or {}).items())]
    return ",".join(parts)


def _compact(value) -> str:
    text = str(io.plain(value)).replace(" ", "")
    return "".join(c if c.isalnum() or c in "-_.+[]" else "_" for c in text)


def defend(run_dir: str | Path, name: str, options: dict | None = None, *, device: str | None = None) -> dict:
    """Apply defense ``name`` to every ε_d cell of the finished run in ``run_dir``; returns its metrics
    (also stored in metrics.json under ``defenses[defense_id(name, options)]``). The retrained
    models are of the victims' architecture (a transfer run's ``victim_model``), and so is the
    clean model the drops are measured against. ``device``: where to compute (default: the run's),
    which changes no result but its rounding."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PoisonReachError(f"{run_dir} is not a run folder (no config.yaml): give the folder `poisonreach run` wrote")
    if not (run_dir / "metrics.json").is_file():
        raise PoisonReachError(f"the run in {run_dir} is unfinished (no metrics.json): run the same `poisonreach run` again to finish it")
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    if device is not None:
        config = dataclasses.replace(config, device=device)
    record, key = _settings(name, options, config, str(run_dir))
    metrics = io.read_json(run_dir / "metrics.json")
    splits, spec = load_data(config)
    spec = victim_spec(config, spec)
    clean_acc = metrics.get("victim_clean_acc", metrics["clean_acc"])  # a transfer run's victims have their own clean model

    summary = _summary(record, options, config, spec, splits, cache=run_dir / f"defense={key}")
    for entry in metrics["results"]:
        cell = run_dir / cell_name(entry["eps_d"])
        poisons = PoisonResult.load(cell)
        out = _cached(cell / f"defense={key}", record, lambda: _defend_cell(
            name, options, config, spec, splits, poisons, lambda: models.load_model(cell / "retrained_model.pt"), cell / f"defense={key}"))
        summary["results"].append(_result(name, entry["eps_d"], out, clean_acc, entry["poisoned_acc"]))
    metrics.setdefault("defenses", {})[key] = summary
    io.write_json(run_dir / "metrics.json", metrics)
    return summary


def defend_poisons(poisons: str | Path, config: RunConfig, name: str, options: dict | None = None, *, out: str | Path | None = None) -> dict:
    """Apply defense ``name`` to clean ∪ the poisons in ``poisons`` (any file or folder
    :func:`poisonreach.experiments.evaluate.poisoned_set` reads, whoever made them), on the data
    set and model of ``config``: a clean model and the victim are trained as `poisonreach run`
    trains them (the run seed, the honest protocol), the defense is applied as :func:`defend`
    applies it to a run cell, and the summary has the same fields plus the poison file's. With
    ``out``, it is also written to ``out/defense=<id>/defense.json`` (a filter's keep mask beside it)."""
    config.validate()
    record, key = _settings(name, options, config, "the configuration")
    splits, spec, file, result = poisoned_set(poisons, config, f"the {name} defense")
    X, y = splits.x_train, splits.y_train
    fit = fitter(config, spec)
    logger.info(f"{len(result.x)} poisons from {file} on {len(X)} {config.dataset} training points (eps_d {result.eps_d:.4g}); "
        f"training the clean model and the victim ({config.model})")
    clean_acc = accuracy(fit(X, y), splits.x_test, splits.y_test)
    victim = fit(*result.mixed(X, y, num_outputs=_outputs(config, spec)))
    poisoned_acc = accuracy(victim, splits.x_test, splits.y_test)
    folder = None if out is None else Path(out) / f"defense={key}"
    summary = {**_summary(record, options, config, spec, splits), "poisons": str(file), "num_poisons": len(result.x), "num_train": len(X),
               **{k: getattr(config, k) for k in ("dataset", "model", "model_options", "seed", "train_size", "training")},
               "clean_acc": clean_acc}
    cell = _defend_cell(name, options, config, spec, splits, result, lambda: victim, folder)
    summary["results"].append(_result(name, result.eps_d, cell, clean_acc, poisoned_acc))
    if folder is not None:
        io.write_json(folder / "defense.json", summary)
    return summary


def _settings(name: str, options: dict | None, config: RunConfig, what: str) -> tuple[dict, str]:
    """The defense's settings as defense.yaml records them and its id, once the protocol of
    ``config`` (``what`` names it) and the options are checked: before any work."""
    if config.protocol != "honest":
        raise PoisonReachError(f"{what} has --protocol {config.protocol}: defenses retrain with the honest protocol, "
                               "so they are measured on honest runs only")
    make_defense(name, options, config)
    return {"defense": name, **io.plain(options or {})}, defense_id(name, options)


def _summary(record: dict, options: dict | None, config: RunConfig, spec: dict, splits, *, cache: Path | None = None) -> dict:
    """A defense's summary, its results to come; DPA's also holds its accuracy on the clean data
    alone (Table 4's "Clean (DPA)"), read back from ``cache`` when that holds it."""
    summary = {"config": record, "results": []}
    if record["defense"] == "dpa":
        clean = lambda: _dpa(make_defense("dpa", options, config), config, spec, splits.x_train, splits.y_train, splits, 0)  # noqa: E731
        summary["clean"] = clean() if cache is None else _cached(cache, record, clean)
        logger.info(f"DPA on the clean data: accuracy {summary['clean']['defended_acc']:.2f}%")
    return summary


def _outputs(config: RunConfig, spec: dict) -> int:
    """The number of outputs of the model ``spec`` builds (soft poison labels need it to mix)."""
    return models.last_linear(fresh_model(config, spec)).out_features


def _defend_cell(name: str, options: dict | None, config: RunConfig, spec: dict, splits, poisons: PoisonResult, poisoned_model,
                 folder: Path | None) -> dict:
    """The defense on clean ∪ ``poisons``: its accuracy and its own fields. A filter reads
    ``poisoned_model()``, the victim trained on that set, and keeps its mask in ``folder``."""
    started = time.perf_counter()
    X_mix, y_mix = poisons.mixed(splits.x_train, splits.y_train, num_outputs=_outputs(config, spec))
    n_clean = len(X_mix) - len(poisons.x)  # the poisons come last in the mixed set
    defense = make_defense(name, options, config, poison_share=len(poisons.x) / len(X_mix))
    if isinstance(defense, Filter):
        out = _filter(defense, folder, X_mix, y_mix, n_clean, fitter(config, spec), splits, poisoned_model())
    elif name == "dpa":
        out = _dpa(defense, config, spec, X_mix, y_mix, splits, len(poisons.x))
    else:
        model = defense.train(fresh_model(config, spec), X_mix, y_mix, seed=config.seed, device=torch.device(config.device), **config.training)
        out = {"defended_acc": accuracy(model, splits.x_test, splits.y_test)}
    return {**out, "defense_time_s": time.perf_counter() - started}


def _result(name: str, eps_d: float, out: dict, clean_acc: float, poisoned_acc: float) -> dict:
    """One ε_d's entry: the defense's fields and the paper's columns, the drop that remains
    (clean − defended) and the accuracy recovered (defended − poisoned)."""
    entry = {"eps_d": eps_d, **out, "poisoned_acc": poisoned_acc, "acc_drop_defended": clean_acc - out["defended_acc"],
             "recovered": out["defended_acc"] - poisoned_acc}
    logger.info(f"eps_d={eps_d:g}: {name} accuracy {entry['defended_acc']:.2f}% (drop {entry['acc_drop_defended']:.2f}, "
        f"recovered {entry['recovered']:+.2f})")
    return entry


def _cached(folder: Path, record: dict, make) -> dict:
    """Read ``folder/result.json`` when it was written by the same defense settings, else make it."""
    saved, done = folder / "defense.yaml", folder / "result.json"
    if saved.is_file() and io.read_yaml(saved) != io.plain(record):
        raise PoisonReachError(f"{folder} holds results of other {record['defense']} settings: delete that folder to rerun")
    if done.is_file():
        return io.read_json(done)
    io.write_yaml(saved, record)
    out = make()
    io.write_json(done, out)
    return out


def _filter(defense: Filter, folder: Path | None, X_mix, y_mix, n_clean: int, fit, splits, poisoned_model) -> dict:
    """Filter with the model trained on the poisoned set, then retrain on what is kept; the keep
    mask goes into ``folder`` when there is one."""
    kept = defense.filter(poisoned_model, X_mix, y_mix)
    if folder is not None:
        io.save_tensors(folder / "keep_mask.pt", {"keep_mask": kept.keep_mask, "scores": kept.scores})
    mask = kept.keep_mask
    model = fit(select_rows(X_mix, mask), y_mix[mask])
    return {
        "defended_acc": accuracy(model, splits.x_test, splits.y_test),
        "removed": int((~mask).sum()),
        "poisons_removed": int((~mask[n_clean:]).sum()),
        "clean_removed": int((~mask[:n_clean]).sum()),
    }


def _dpa(defense, config: RunConfig, spec: dict, X_train, y_train, splits, num_poisons: int) -> dict:
    ensemble = defense.train(fresh_model(config, spec), X_train, y_train)
    cert = certify(ensemble, splits.x_test, splits.y_test)
    return {
        "defended_acc": cert.accuracy,
        "certified_acc": cert.certified_accuracy(num_poisons),
        "median_radius": cert.median_radius,
        "num_poisons": num_poisons,
    }


def format_defense_table(name: str, summary: dict) -> str:
    """The defense's columns per ε_d: the drop that remains (clean − defended accuracy, positive:
    damage left) and the accuracy recovered (signed, negative when the defense costs accuracy)."""
    rows = [
        [f"{r['eps_d']:g}", f"{r['poisoned_acc']:.2f}", f"{r['defended_acc']:.2f}", f"{r['acc_drop_defended']:.2f}", f"{r['recovered']:+.2f}"]
        + ([f"{r['poisons_removed']}/{r['removed']}"] if "removed" in r else [])
        + ([f"{r['certified_acc']:.2f}", str(r["median_radius"])] if "certified_acc" in r else [])
        for r in summary["results"]
    ]
    cols = ["eps_d", "poisoned acc", f"{name} acc", "drop after defense", "recovered"]
    if summary["results"] and "removed" in summary["results"][0]:
        cols.append("poisons/removed")
    if summary["results"] and "certified_acc" in summary["results"][0]:
        cols += ["certified acc", "median radius"]
    head = f"defense {name}" + (f" (clean data: {summary['clean']['defended_acc']:.2f}%)" if "clean" in summary else "")
    return "\n".join([head, text_table(cols, rows)])
