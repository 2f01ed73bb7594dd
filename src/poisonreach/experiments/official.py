"""The official protocol (``RunConfig.protocol = "official"``, ``poisonreach run --protocol official``).

The official code's way of making and measuring GC poisons, as one named protocol rather than a
set of flags, so that its numbers can be reproduced and set beside the honest protocol's:

- **poisons**: :class:`~poisonreach.attacks.OfficialGradientCanceling` (``--attack gc`` under this
  protocol): the first weight tensor's summed gradient, the unsquared norm, plain gradient steps on
  normalised pixels at lr 10 for 1,000 epochs, no box, started from the first ε_d·n training images
  in file order. The attack sees the training split in file order (``Splits.train_index``); the
  saved ``source_indices`` are rows of the training split as everywhere else. Any other attack
  also sees the split in file order and is retrained as below.
- **retraining**: :func:`poisonreach.training.official_retrain`: a fresh float64 logistic
  regression (``nn.Linear`` on normalised inputs), plain SGD at lr 0.1 in shuffled batches of
  10,000, 100 epochs, the test accuracy after *every* epoch kept.
- **clean references**, both: ``clean_acc``, the clean model of this library's protocol (Adadelta,
  section 5.1), which is the model the official code corrupts into the target and whose accuracy
  the paper prints as clean; and ``official_clean_acc``, the official retraining on clean data
  alone. ``acc_drop`` is measured against the first, as the official code's numbers are;
  ``acc_drop_vs_official_clean`` against the second.

Each result holds ``poisoned_acc`` (the final epoch, where the script stops), ``retrain_acc_min``,
``retrain_acc_median`` and ``retrain_acc_max`` over the epochs, ``retrain_acc_per_epoch``, the two
drops, how far the poisons leave [0, 1] (``poison_pixel_min``/``max``,
``poison_fraction_outside_unit_box``), and the fields of an honest result (target agreement,
gradient norms, parameter distance; from the victim cast to float32). With victim seeds every
retraining (clean and poisoned) is done once per seed, and the per-seed lists, means and sample
standard deviations are added as in the honest protocol.

Files: ``official_clean_seed=S.json`` (per-epoch accuracies) and ``official_clean_model_seed=S.pt``
in the run folder; in each ``eps_d=E/``, ``official_retrain_seed=S.json`` and the victim
(``retrained_model.pt`` for the run's seed, ``retrained_model_seed=S.pt`` for others; saved models
load as float32). A finished retraining is read back from its JSON file, never redone.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from torch import nn

from .. import io, models
from ..attacks import PoisonResult
from ..rows import dense, select_rows
from ..targets import parameter_distance
from ..training import agreement, official_retrain, training_gradient_norm
from .config import RunConfig, fresh_model, mean_std

logger = logging.getLogger(__name__)

__all__ = ["CleanReferences", "file_order", "run_cell"]


def file_order(splits) -> torch.Tensor:
    """The permutation that puts the training split's rows in the order of the original file
    (the identity when the splits do not know it)."""
    if splits.train_index is None:
        return torch.arange(len(splits.x_train))
    return torch.argsort(splits.train_index)


def _seeds(config: RunConfig) -> list[int]:
    """Every seed a retraining is done with: the run's own first, then the victim seeds."""
    return [config.seed, *[s for s in (config.victim_seeds or []) if s != config.seed]]



def _retrain_record(record_path: Path, model_path: Path, config: RunConfig, spec: dict, X, y, splits, seed: int, save, diagnose=None) -> dict:
    """The official retraining of a fresh model (seed ``seed``) on (X, y): read back from
    ``record_path`` when it was done, else trained, its model saved and its record written.
    ``diagnose(model32)`` adds fields computed from the trained model (cast to float32)."""
    if record_path.is_file():
        return io.read_json(record_path)
    started = time.perf_counter()
    result = official_retrain(fresh_model(config, spec, seed), X, y, splits.x_test, splits.y_test, seed=seed,
                              device=torch.device(config.device))  # its defaults are the official settings
    save(result.model, model_path)
    record = {"seed": seed, "final_acc": result.final_acc, **result.summary("acc"), "retrain_time_s": time.perf_counter() - started}
    if diagnose is not None:
        record.update(diagnose(copy.deepcopy(result.model).float()))
    io.write_json(record_path, record)
    return record


class CleanReferences:
    """The official retraining on clean data alone, for the run's seed and every victim seed."""

    def __init__(self, config: RunConfig, spec: dict, save, out: Path, splits):
        self.seed = config.seed
        X, y = splits.x_train, splits.y_train
        self.records = {
            seed: _retrain_record(out / f"official_clean_seed={seed}.json", out / f"official_clean_model_seed={seed}.pt",
                                  config, spec, X, y, splits, seed, save)
            for seed in _seeds(config)
        }
        self.victim_seeds = list(config.victim_seeds) if config.victim_seeds else None

    def acc(self, seed: int) -> float:
        return self.records[seed]["final_acc"]

    def summary(self) -> dict:
        """The fields of metrics.json: the run seed's official clean accuracy (final epoch) and its
        spread over the epochs; with victim seeds the per-seed finals and their mean and std."""
        own = self.records[self.seed]
        out = {"official_clean_acc": own["final_acc"],
               **{f"official_clean_acc_{k}": own[f"acc_{k}"] for k in ("min", "median", "max", "per_epoch")}}
        if self.victim_seeds:
            finals = [self.acc(s) for s in self.victim_seeds]
            out.update({"official_clean_acc_per_seed": finals, **mean_std("official_clean_acc", finals)})
        return out


def run_cell(attack, model: nn.Module, target: nn.Module, X, y, splits, cell: Path, *, config: RunConfig, spec: dict, save,
             clean_acc: dict[int, float], references: CleanReferences, grad_norms) -> dict:
    """One ε_d under the official protocol: poison ``model`` (the target, or the clean model for a
    baseline) with the training split in file order, or load the saved poisons; retrain the
    official way once per seed; write and return the result. ``clean_acc`` maps each seed to its
    clean model's accuracy (this library's protocol); ``grad_norms(poisons)`` gives the ‖g‖ fields."""
    cell.mkdir(parents=True, exist_ok=True)
    attack_time = None
    if (cell / "poisons.pt").is_file():
        poisons = PoisonResult.load(cell)
    else:
        order = file_order(splits)
        started = time.perf_counter()
        poisons = attack.poison(model, select_rows(X, order), y[order])
        attack_time = time.perf_counter() - started
        poisons.source_indices = order[poisons.source_indices]  # rows of the training split, as everywhere
        if poisons.kept_indices is not None:
            poisons.kept_indices = order[poisons.kept_indices].sort().values
        poisons.save(cell)
    x_p = poisons.x.to(torch.float64)
    # clean ∪ poisons in float64, as the victim trains on them (mixed casts the poisons to X's dtype)
    X_mix, y_mix = poisons.mixed(dense(X).to(torch.float64), y, num_outputs=models.last_linear(target).out_features)
    X_mix32 = X_mix.float()

    def diagnose(victim: nn.Module) -> dict:
        return {"target_agreement": agreement(victim, target, splits.x_test),
                "victim_grad_norm": training_gradient_norm(victim, X_mix32, y_mix, device=torch.device(config.device)),
                "param_distance": parameter_distance(victim, target)}

    records = {}
    for seed in _seeds(config):
        name = "retrained_model.pt" if seed == config.seed else f"retrained_model_seed={seed}.pt"
        records[seed] = _retrain_record(cell / f"official_retrain_seed={seed}.json", cell / name, config, spec, X_mix, y_mix,
                                        splits, seed, save, diagnose)
    own = records[config.seed]
    previous = io.read_json(cell / "result.json") if (cell / "result.json").is_file() else {}
    entry = {
        "eps_d": attack.eps_d,
        "num_poisons": len(poisons.x),
        "protocol": "official",
        "poisoned_acc": own["final_acc"],  # the final epoch, where the official script stops
        "acc_drop": clean_acc[config.seed] - own["final_acc"],
        "acc_drop_reference": "clean_acc: the clean model of this library's protocol (Adadelta), the official code's clean reference",
        "acc_drop_vs_official_clean": references.acc(config.seed) - own["final_acc"],
        **{f"retrain_acc_{k}": own[f"acc_{k}"] for k in ("min", "median", "max", "per_epoch")},
        **grad_norms(poisons),
        "target_agreement": own["target_agreement"],
        "victim_grad_norm": own["victim_grad_norm"],
        "param_distance": own["param_distance"],
        "poison_pixel_min": float(x_p.min()),
        "poison_pixel_max": float(x_p.max()),
        "poison_fraction_outside_unit_box": float(((x_p < 0) | (x_p > 1)).double().mean()),
        "attack_time_s": attack_time if attack_time is not None else previous.get("attack_time_s"),
    }
    if config.victim_seeds:
        entry.update(_seed_statistics(config.victim_seeds, records, clean_acc, references))
    io.write_json(cell / "result.json", entry)
    text = (f"eps_d={attack.eps_d:g} (official protocol): poisoned accuracy {entry['poisoned_acc']:.2f}% at the last epoch "
            f"(epochs {entry['retrain_acc_min']:.2f}–{entry['retrain_acc_max']:.2f}%, median {entry['retrain_acc_median']:.2f}), "
            f"drop {entry['acc_drop']:.2f} against the Adadelta clean model, {entry['acc_drop_vs_official_clean']:.2f} against "
            f"the official retraining on clean data; poisons outside [0, 1]: pixels in [{entry['poison_pixel_min']:.3g}, "
            f"{entry['poison_pixel_max']:.3g}], {100 * entry['poison_fraction_outside_unit_box']:.1f}% of values out of the box")
    if config.victim_seeds:
        text += (f"; over victim seeds {list(config.victim_seeds)}: poisoned {entry['poisoned_acc_mean']:.2f} ± "
                 f"{entry['poisoned_acc_std']:.2f}%, drop {entry['acc_drop_mean']:.2f} ± {entry['acc_drop_std']:.2f}, "
                 f"epochs over all seeds {min(entry['retrain_acc_min_per_seed']):.2f}–{max(entry['retrain_acc_max_per_seed']):.2f}%")
    logger.info(text)
    return entry


def _seed_statistics(seeds: list[int], records: dict, clean_acc: dict[int, float], references: CleanReferences) -> dict:
    """The victim-seed fields of an official result, in the order of ``seeds``."""
    per = {
        "clean_acc": [clean_acc[s] for s in seeds],
        "official_clean_acc": [references.acc(s) for s in seeds],
        "poisoned_acc": [records[s]["final_acc"] for s in seeds],
    }
    per["acc_drop"] = [c - p for c, p in zip(per["clean_acc"], per["poisoned_acc"])]
    per["acc_drop_vs_official_clean"] = [c - p for c, p in zip(per["official_clean_acc"], per["poisoned_acc"])]
    for k in ("min", "median", "max", "per_epoch"):
        per[f"retrain_acc_{k}"] = [records[s][f"acc_{k}"] for s in seeds]
    for k in ("target_agreement", "victim_grad_norm", "param_distance"):
        per[k] = [records[s][k] for s in seeds]
    out = {"victim_seeds": list(seeds), **{f"{k}_per_seed": v for k, v in per.items()}}
    for k in ("poisoned_acc", "acc_drop", "acc_drop_vs_official_clean", "retrain_acc_min", "retrain_acc_median", "retrain_acc_max",
              "target_agreement", "victim_grad_norm", "param_distance"):
        out.update(mean_std(k, per[k]))
    return out
