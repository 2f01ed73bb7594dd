"""Poisons in: retrain a fresh victim on clean ∪ given poisons and measure the damage (``poisonreach evaluate``).

The poisons may come from anywhere: a run cell (``eps_d=E/`` or its ``poisons.pt``), a file
``poisonreach export`` wrote (``.npz`` with arrays x and y, ``.safetensors`` with tensors x and y,
or a png folder with its ``labels.csv``), or another attack's own ``.pt``, ``.npz`` or
``.safetensors`` with x and y. Nothing is loaded that could execute code, and every problem with
the poisons (shape, pixel range, NaN, labels, an empty set, x and y of different lengths) is one
line naming it and the fix.

The victims are retrained as ``poisonreach run`` retrains them (section 5.1): the same data split
and training subset (``--seed``, ``--train-size``), model, training options and protocol, once per
victim seed, and so is a clean model of each seed, since a drop is measured against a clean model
trained the same way. ``acc_drop`` is clean − poisoned accuracy in points (positive: the poisons
did damage), per seed and as mean ± sample std; the victims' training-gradient norms say how far
from a stationary point each training stopped.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .. import io
from ..attacks import PoisonResult
from ..data import Splits
from ..data.user import read_images
from ..errors import CorruptFileError, PoisonReachError
from ..training import accuracy
from ..validation import check_values
from .config import RunConfig, load_data
from .export import require_safetensors
from .config import mean_std
from .run import fitter, plus_minus, text_table, trained_grad_norm

logger = logging.getLogger(__name__)
# the protocols that retrain a victim the way `poisonreach run` does (official retrains its own way)
EVALUATION_PROTOCOLS = ("honest", "converged")
# what a folder of poisons holds, in the order looked for: a run cell, an npz or safetensors export, a png export
FOLDER_FILES = ("poisons.pt", "poisons.npz", "poisons.safetensors", "labels.csv")
# image data sets (N × C × H × W) have pixels in [0, 1] (data.Splits); tabular ones have no box
PIXEL_BOX = (0.0, 1.0)


def evaluate(poisons: str | os.PathLike, config: RunConfig, *, out: str | os.PathLike | None = None) -> dict:
    """Retrain fresh victims on the clean training set of ``config`` ∪ the poisons in ``poisons``
    and return clean and poisoned test accuracy, ``acc_drop`` and training-gradient norms per
    victim seed (``config.victim_seeds``, else the run seed) with their means and sample standard
    deviations; with ``out``, also written to ``out/evaluation.json``."""
    config.validate()
    if config.protocol not in EVALUATION_PROTOCOLS:
        raise PoisonReachError(f"evaluate retrains with --protocol {' or '.join(EVALUATION_PROTOCOLS)}, got {config.protocol}: the "
                               "official retraining belongs to the official GC (poisonreach run --protocol official)")
    splits, spec, file, result = poisoned_set(poisons, config, "evaluate")
    X, y = splits.x_train, splits.y_train
    X_mix, y_mix = result.mixed(X, y)
    seeds = list(config.victim_seeds or [config.seed])
    logger.info(f"{len(result.x)} poisons from {file} on {len(X)} {config.dataset} training points (eps_d {result.eps_d:.4g}); "
        f"retraining {config.model}{f' from {config.pretrained}' if config.pretrained else ''} with the {config.protocol} protocol, "
        f"victim seeds {' '.join(map(str, seeds))}")
    per_seed = {k: [] for k in ("clean_acc", "poisoned_acc", "acc_drop", "clean_grad_norm", "victim_grad_norm")}
    for seed in seeds:
        fit = fitter(config, spec, seed)
        clean, victim = fit(X, y), fit(X_mix, y_mix)
        clean_acc, poisoned_acc = accuracy(clean, splits.x_test, splits.y_test), accuracy(victim, splits.x_test, splits.y_test)
        norms = trained_grad_norm(config, clean, X, y), trained_grad_norm(config, victim, X_mix, y_mix)  # each on the data it was trained on
        for key, value in zip(per_seed, (clean_acc, poisoned_acc, clean_acc - poisoned_acc, *norms)):
            per_seed[key].append(value)
        logger.info(f"victim seed {seed}: clean {clean_acc:.2f}%, poisoned {poisoned_acc:.2f}% (drop {clean_acc - poisoned_acc:.2f}), "
            f"victim ‖∇L‖ {per_seed['victim_grad_norm'][-1]:.3g}")
    record = {
        "poisons": str(file),
        "num_poisons": len(result.x),
        "num_train": len(X),
        "eps_d": result.eps_d,
        **{k: getattr(config, k) for k in ("dataset", "model", "model_options", "pretrained", "protocol", "seed", "train_size", "training")},
        "victim_seeds": seeds,
        **{f"{k}_per_seed": v for k, v in per_seed.items()},
        **{k: v for name in ("clean_acc", "poisoned_acc", "acc_drop", "victim_grad_norm") for k, v in mean_std(name, per_seed[name]).items()},
    }
    if out is not None:
        io.write_json(Path(out) / "evaluation.json", record)
    return record


def poisoned_set(poisons: str | os.PathLike, config: RunConfig, what: str) -> tuple[Splits, dict, Path, PoisonResult]:
    """The data splits and model specification of ``config``, the file holding ``poisons``
    (:func:`poison_file`) and its poisons checked against the splits; ``what`` (a command) names
    the measurement in the error for a regression data set, which has no accuracy."""
    splits, spec = load_data(config)
    if splits.task == "regression":
        raise PoisonReachError(f"{what} measures accuracy and {config.dataset} is a regression data set: choose a classification one")
    file = poison_file(poisons)
    return splits, spec, file, read_poisons(file, splits)


def format_evaluation(record: dict) -> str:
    """An :func:`evaluate` record as a table for the terminal: one row per victim seed, and their
    mean ± sample std when there are several; a drop is clean − poisoned (positive: damage)."""
    head = (f"{record['dataset']} / {record['model']}, {record['protocol']} protocol: {record['num_poisons']} poisons on "
            f"{record['num_train']} training points (eps_d {record['eps_d']:.4g})")
    cols = ["victim seed", "clean acc", "poisoned acc", "acc drop", "clean ‖∇L‖", "victim ‖∇L‖"]
    rows = [[str(seed), f"{clean:.2f}", f"{poisoned:.2f}", f"{drop:.2f}", f"{clean_norm:.3g}", f"{victim_norm:.3g}"]
            for seed, clean, poisoned, drop, clean_norm, victim_norm in zip(
                record["victim_seeds"], record["clean_acc_per_seed"], record["poisoned_acc_per_seed"], record["acc_drop_per_seed"],
                record["clean_grad_norm_per_seed"], record["victim_grad_norm_per_seed"])]
    if len(rows) > 1:
        rows.append(["mean ± std", *(plus_minus(record[f"{k}_mean"], record[f"{k}_std"]) for k in ("clean_acc", "poisoned_acc", "acc_drop")),
                     "", plus_minus(record["victim_grad_norm_mean"], record["victim_grad_norm_std"], ".3g")])
    return "\n".join([head, text_table(cols, rows, left_first=True)])


def poison_file(path: str | os.PathLike) -> Path:
    """The file that holds the poisons: ``path`` itself, or in a folder the first of :data:`FOLDER_FILES`."""
    path = Path(path)
    if path.is_dir():
        found = next((path / name for name in FOLDER_FILES if (path / name).is_file()), None)
        if found is None:
            raise PoisonReachError(f"{path} holds no poisons (none of {', '.join(FOLDER_FILES)}): give a .pt, .npz or .safetensors "
                                   "file, a run cell eps_d=E/ or a folder `poisonreach export` wrote")
        return found
    if not path.is_file():
        raise PoisonReachError(f"{path} does not exist: give a .pt, .npz or .safetensors file of poisons, or a folder holding one")
    if path.suffix not in READERS:
        raise PoisonReachError(f"{path} is not a poison file poisonreach reads: give a .pt, .npz or .safetensors file "
                               "(arrays x and y) or a png export's labels.csv")
    return path


def read_poisons(file: str | os.PathLike, splits: Splits) -> PoisonResult:
    """The poisons in ``file`` (:func:`poison_file`), checked against ``splits`` (:func:`check_poisons`)."""
    file = Path(file)
    return check_poisons(READERS[file.suffix](file), splits, str(file))


def check_poisons(arrays: dict, splits: Splits, source: str) -> PoisonResult:
    """``arrays["x"]`` and ``arrays["y"]`` (and ``kept_indices``, the clean rows a replacing attack
    keeps) as a :class:`PoisonResult` for the training split of ``splits``, or one
    :class:`PoisonReachError` naming the first problem and its fix. x becomes float32, y int64;
    the source indices are unknown (-1) and ε_d is the realised m/n."""
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise PoisonReachError(f"{source} has no {' and no '.join(missing)} (it holds {', '.join(sorted(arrays)) or 'nothing'}): "
                               "store the poison images as x and their labels as y")
    x, y = _tensor(source, "x", arrays["x"]), _tensor(source, "y", arrays["y"])
    if x.dim() == 0 or len(x) == 0:
        raise PoisonReachError(f"{source} holds no poisons (x has shape {tuple(x.shape)}): give at least one")
    if y.dim() == 0 or len(y) != len(x):
        raise PoisonReachError(f"{source} has {len(x)} images but {len(y) if y.dim() else 'a scalar'} labels: x and y need one "
                               "row per poison")
    shape, box = splits.input_shape, PIXEL_BOX if len(splits.input_shape) == 3 else None
    if tuple(x.shape[1:]) != shape:
        raise PoisonReachError(f"{source}: x has shape {tuple(x.shape)}, but {splits.name} inputs have shape {shape}: give x as "
                               f"({len(x)}, {', '.join(map(str, shape))})")
    if not x.is_floating_point():
        raise PoisonReachError(f"{source}: x is {str(x.dtype).removeprefix('torch.')}, but {splits.name} inputs are floats"
                               + (" in [0, 1]: divide 8-bit pixels by 255" if box else ": convert x to float32"))
    x = x.to(torch.float32)
    check_values(x, source, "x", "poison", box, f"{splits.name}'s pixel box [{PIXEL_BOX[0]:g}, {PIXEL_BOX[1]:g}]: clip the poisons to "
                                                "the box (an image holds no other value)")
    kept = _indices(source, "kept_indices", arrays["kept_indices"], len(splits.x_train)) if "kept_indices" in arrays else None
    return PoisonResult(x=x, y=_labels(source, y, splits.num_classes), source_indices=torch.full((len(x),), -1),
                        grad_norm_history=[], tau=math.nan, eps_d=len(x) / len(splits.x_train), config={"file": source}, seed=-1,
                        kept_indices=kept)


def _labels(source: str, y: Tensor, classes: int) -> Tensor:
    """y as int64 classes 0..classes-1 (whole-numbered floats accepted), else the error."""
    if y.dim() != 1:
        raise PoisonReachError(f"{source}: y has shape {tuple(y.shape)}; give one integer class per poison, shape ({len(y)},) "
                               "(soft labels are a relaxation, not data points)")
    if y.dtype == torch.bool or y.is_complex():
        raise PoisonReachError(f"{source}: y is {str(y.dtype).removeprefix('torch.')}: give integer classes 0..{classes - 1}")
    if y.is_floating_point() and not torch.equal(y, y.round()):
        raise PoisonReachError(f"{source}: y holds non-integer labels (e.g. {float(y[y != y.round()][0]):g}): give integer classes "
                               f"0..{classes - 1}")
    if y.min() < 0 or y.max() >= classes:
        raise PoisonReachError(f"{source}: labels range over {y.min().item():g}..{y.max().item():g}, but the data set has classes "
                               f"0..{classes - 1}: give labels in that range")
    return y.to(torch.int64)


def _indices(source: str, name: str, value, n: int) -> Tensor:
    t = _tensor(source, name, value)
    if t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool or len(t) and (t.min() < 0 or t.max() >= n):
        raise PoisonReachError(f"{source}: {name} must be integer rows of the {n}-point training split, got {t.dtype} of shape "
                               f"{tuple(t.shape)}{f', range {t.min().item():g}..{t.max().item():g}' if t.numel() else ''}")
    return t.to(torch.int64)


def _tensor(source: str, name: str, value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        return torch.from_numpy(np.ascontiguousarray(value))
    raise PoisonReachError(f"{source}: {name} is {getattr(value, 'dtype', type(value).__name__)}, not a numeric array")


def _read_pt(file: Path) -> dict:
    arrays = io.load_tensors(file)  # weights_only: tensors and plain containers, never code
    if not isinstance(arrays, dict):
        raise PoisonReachError(f"{file} holds a {type(arrays).__name__}, not a dict of tensors: save {{'x': images, 'y': labels}}")
    return arrays


def _read_safetensors(file: Path) -> dict:
    safetensors = require_safetensors()
    try:
        return safetensors.load_file(file)
    except Exception as e:  # the reader raises its own error type for any malformed file
        raise CorruptFileError(f"{file} is not a readable .safetensors file ({e})") from None


def _read_png(labels_csv: Path) -> dict:
    """A png export: labels.csv (file, label) and the 8-bit images it names, as pixels in [0, 1]."""
    with open(labels_csv, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    if not {"file", "label"} <= set(reader.fieldnames or ()):
        raise PoisonReachError(f"{labels_csv} needs the columns file,label (as `poisonreach export --format png` writes), "
                               f"found {','.join(reader.fieldnames or ()) or 'none'}")
    try:
        labels = np.array([row["label"] for row in rows], dtype=np.float64)
    except ValueError as e:
        raise PoisonReachError(f"{labels_csv}: a label is not a number ({e}): give integer classes") from None
    paths = [labels_csv.parent / row["file"] for row in rows]
    missing = next((path for path in paths if not path.is_file()), None)
    if missing is not None:
        raise PoisonReachError(f"{missing} is named in labels.csv but does not exist")
    return {"x": read_images(paths, str(labels_csv)).astype(np.float32) / np.float32(255), "y": labels}


READERS = {".pt": _read_pt, ".npz": io.load_npz, ".safetensors": _read_safetensors, ".csv": _read_png}
