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
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from .. import io, models
from ..attacks import PoisonResult
from ..defenses import DEFENSES, Filter, certify
from ..errors import PoisonReachError
from ..training import accuracy, train
from ..validation import check_choice, check_options
from .config import RunConfig, cell_name, fresh_model, load_data, victim_spec
from .run import text_table


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


def defend(run_dir: str | Path, name: str, options: dict | None = None, *, log=print) -> dict:
    """Apply defense ``name`` to every ε_d cell of the finished run in ``run_dir``; returns its metrics
    (also stored in metrics.json under ``defenses[defense_id(name, options)]``). The retrained
    models are of the victims' architecture (a transfer run's ``victim_model``), and so is the
    clean model the drops are measured against."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise PoisonReachError(f"{run_dir} is not a run folder (no config.yaml): give the folder `poisonreach run` wrote")
    if not (run_dir / "metrics.json").is_file():
        raise PoisonReachError(f"the run in {run_dir} is unfinished (no metrics.json): run the same `poisonreach run` again to finish it")
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    if config.protocol != "honest":
        raise PoisonReachError(f"{run_dir} is a --protocol {config.protocol} run: defenses retrain with the honest protocol, "
                               "so they are measured on honest runs only")
    metrics = io.read_json(run_dir / "metrics.json")
    record = {"defense": name, **io.plain(options or {})}
    key = defense_id(name, options)
    defense = make_defense(name, options, config)  # validates the options before any work
    splits, spec = load_data(config)
    spec = victim_spec(config, spec)
    clean_acc = metrics.get("victim_clean_acc", metrics["clean_acc"])  # a transfer run's victims have their own clean model
    X, y = splits.x_train, splits.y_train
    device = torch.device(config.device)
    fit = lambda X_fit, y_fit, **kw: train(fresh_model(config, spec), X_fit, y_fit, seed=config.seed, device=device, **config.training, **kw)
    num_outputs = models.last_linear(fresh_model(config, spec)).out_features

    summary = {"config": record, "results": []}
    if name == "dpa":
        summary["clean"] = _cached(run_dir / f"defense={key}", record, lambda: _dpa(defense, config, spec, X, y, splits, 0))
        log(f"DPA on the clean data: accuracy {summary['clean']['defended_acc']:.2f}%")
    for entry in metrics["results"]:
        cell = run_dir / cell_name(entry["eps_d"])
        result = PoisonResult.load(cell)
        X_mix, y_mix = result.mixed(X, y, num_outputs=num_outputs)
        n_clean = len(X_mix) - len(result.x)  # the poisons come last in the mixed set
        defense = make_defense(name, options, config, poison_share=len(result.x) / len(X_mix))

        def evaluate() -> dict:
            started = time.perf_counter()
            if isinstance(defense, Filter):
                out = _filter(defense, cell / f"defense={key}", X_mix, y_mix, n_clean, fit, splits, models.load_model(cell / "retrained_model.pt"))
            elif name == "dpa":
                out = _dpa(defense, config, spec, X_mix, y_mix, splits, len(result.x))
            else:
                out = {"defended_acc": accuracy(defense.train(fresh_model(config, spec), X_mix, y_mix, seed=config.seed, device=device, **config.training), splits.x_test, splits.y_test)}
            return {**out, "defense_time_s": time.perf_counter() - started}

        out = _cached(cell / f"defense={key}", record, evaluate)
        out = {
            "eps_d": entry["eps_d"],
            **out,
            "poisoned_acc": entry["poisoned_acc"],
            "acc_drop_defended": clean_acc - out["defended_acc"],
            "recovered": out["defended_acc"] - entry["poisoned_acc"],
        }
        summary["results"].append(out)
        log(f"eps_d={entry['eps_d']:g}: {name} accuracy {out['defended_acc']:.2f}% (drop {out['acc_drop_defended']:.2f}, recovered {out['recovered']:+.2f})")
    metrics.setdefault("defenses", {})[key] = summary
    io.write_json(run_dir / "metrics.json", metrics)
    return summary


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


def _filter(defense: Filter, folder: Path, X_mix, y_mix, n_clean: int, fit, splits, poisoned_model) -> dict:
    """Filter with the model trained on the poisoned set, then retrain on what is kept."""
    kept = defense.filter(poisoned_model, X_mix, y_mix)
    io.save_tensors(folder / "keep_mask.pt", {"keep_mask": kept.keep_mask, "scores": kept.scores})
    mask = kept.keep_mask
    model = fit(X_mix[mask], y_mix[mask])
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
