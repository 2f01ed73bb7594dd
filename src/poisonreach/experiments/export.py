"""Poisons out: the poison sets of a run folder in formats other pipelines read (``poisonreach export``).

Each ε_d cell of the run (or the one asked for) becomes ``OUT/eps_d=<E>/`` with

    poisons.npz          npz: arrays x, y, source_indices, eps_d (and kept_indices when the attack
                         replaced clean points); numpy.load(allow_pickle=False) reads it
    poisons.safetensors  safetensors: the same tensors
    00000.png, ...       png: one 8-bit PNG per poison (grayscale or RGB), pixels clipped to [0, 1],
    labels.csv           and file,label,source_index per poison
    manifest.json        what the files hold, the attack that made them and the training set they belong to

x is float32 in the run's pixel space, shaped as the data set (N × C × H × W for images), y int64
classes. Soft labels (``gc-pgd --optimize-labels``) are a relaxation of the problem, not points
anyone can insert, so they are refused unless ``allow_soft_labels``. docs/formats.md describes
every file and field; ``poisonreach evaluate`` reads all three formats back.
"""

from __future__ import annotations

import io as bytes_io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .. import io
from ..attacks import PoisonResult
from ..errors import PoisonReachError
from ..validation import check_choice
from .config import RunConfig, cell_name

FORMATS = ("npz", "safetensors", "png")
FORMAT_VERSION = 1


def export(run_dir: str | Path, fmt: str, out: str | Path, *, eps_d: float | None = None,
           allow_soft_labels: bool = False) -> list[dict]:
    """Write the poisons of every ε_d cell of ``run_dir`` (or only ``eps_d``'s) in format ``fmt``
    into ``out/eps_d=<E>/``; returns each cell's manifest with its ``folder``. Every cell is read and
    checked before anything is written."""
    check_choice("format", fmt, FORMATS)
    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / "config.yaml").is_file():
        raise PoisonReachError(f"{run_dir} is not a run folder (no config.yaml): give the folder `poisonreach run` wrote")
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    metrics = io.read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").is_file() else {}
    if fmt == "safetensors":
        require_safetensors()  # a missing package fails before any work
    cells = [(cell, PoisonResult.load(cell)) for cell in _cells(run_dir, eps_d)]
    labels = {cell: _check_cell(result, config, cell, fmt, allow_soft_labels) for cell, result in cells}
    written = []
    for cell, result in cells:
        folder, arrays = out / cell.name, _arrays(result, labels[cell])
        files = WRITERS[fmt](folder, arrays)
        record = manifest(result, arrays, config, fmt, labels[cell], num_train=metrics.get("num_train"), **files)
        io.write_json(folder / "manifest.json", record)
        written.append({**record, "folder": str(folder)})
    return written


def _cells(run_dir: Path, eps_d: float | None) -> list[Path]:
    """The cells holding poisons, by increasing ε_d (only ``eps_d``'s when given)."""
    cells = sorted((p.parent for p in run_dir.glob("eps_d=*/poisons.pt")), key=lambda c: float(c.name.removeprefix("eps_d=")))
    if not cells:
        raise PoisonReachError(f"{run_dir} holds no poisons yet (no eps_d=*/poisons.pt): finish `poisonreach run` into it first")
    if eps_d is None:
        return cells
    chosen = run_dir / cell_name(eps_d)
    if chosen not in cells:
        raise PoisonReachError(f"{run_dir} has no poisons at eps_d={eps_d:g}: its cells are "
                               f"{', '.join(c.name.removeprefix('eps_d=') for c in cells)}")
    return [chosen]


def _check_cell(result: PoisonResult, config: RunConfig, cell: Path, fmt: str, allow_soft: bool) -> str:
    """The kind of the cell's labels, "classes" (int64), "soft" (float probabilities, one column per
    class) or "regression" (float targets of a regression data set, data points unlike soft
    labels), once the cell is known to fit the format."""
    if not result.y.is_floating_point():
        kind = "classes"
    elif result.y.dim() == 1:
        kind = "regression"
    elif not allow_soft:
        raise PoisonReachError(f"{cell} has soft labels (probabilities, from --optimize-labels): they are a relaxation of the "
                               "attack, not data points anyone can insert; pass --allow-soft-labels to export them anyway")
    else:
        kind = "soft"
    if fmt == "png" and kind != "classes":
        raise PoisonReachError(f"{cell} has {kind} labels and labels.csv holds one class per image: use --format npz or safetensors")
    if fmt == "png" and (result.x.dim() != 4 or result.x.shape[1] not in (1, 3)):
        raise PoisonReachError(f"png writes images with 1 or 3 channels, but the {config.dataset} poisons have shape "
                               f"{tuple(result.x.shape)}: use --format npz or safetensors")
    return kind


def _arrays(result: PoisonResult, labels: str) -> dict[str, torch.Tensor]:
    """The tensors every format holds: x float32, y int64 (float32 unless classes), the indices int64, ε_d float64."""
    arrays = {
        "x": result.x.to(torch.float32).contiguous(),
        "y": result.y.to(torch.int64 if labels == "classes" else torch.float32).contiguous(),
        "source_indices": result.source_indices.to(torch.int64).contiguous(),
        "eps_d": torch.tensor(result.eps_d, dtype=torch.float64),
    }
    if result.kept_indices is not None:  # replacing attacks (appendix C.10): the clean points the victim keeps
        arrays["kept_indices"] = result.kept_indices.to(torch.int64).contiguous()
    return arrays


def manifest(result: PoisonResult, arrays: dict, config: RunConfig, fmt: str, labels: str, *, num_train: int | None = None,
             **files) -> dict:
    """manifest.json of one cell: the format, the arrays' shapes and dtypes, the range of x actually
    found and the box the attack declared, the training set the poisons belong to (the rows of
    ``source_indices`` and ``kept_indices`` are rows of its training split) and the attack."""
    x = arrays["x"]
    return {
        "format": "poisonreach-poisons",
        "format_version": FORMAT_VERSION,
        "file_format": fmt,
        **files,
        "num_poisons": len(x),
        "eps_d": result.eps_d,
        "labels": labels,
        "arrays": {name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for name, t in arrays.items()},
        "value_range": [float(x.min()), float(x.max())],
        "box": result.config.get("box"),  # null: none declared (--box none, or an attack without one, e.g. label flip's copies)
        "training_set": {"dataset": config.dataset, "seed": config.seed, "train_size": config.train_size, "split": "train",
                         "num_train": num_train},
        "attack": result.config.get("attack"),
        "attack_config": result.config,
        "victim": _victim(config),
    }


def _victim(config: RunConfig) -> dict:
    """How the run's victims were retrained: their architecture (a transfer run's ``victim_model``)
    with its options when it has any, the pretrained weights they started from when they did, the
    protocol and the training options."""
    model, options = (config.victim_model, config.victim_model_options) if config.victim_model else (config.model, config.model_options)
    return {"model": model, **({"model_options": options} if options else {}),
            **({"pretrained": config.pretrained} if config.pretrained else {}), "protocol": config.protocol, "training": config.training}


def require_safetensors():
    """``safetensors.torch``, an optional dependency, or one line saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise PoisonReachError("the safetensors format needs the safetensors package: pip install safetensors "
                               "(or poisonreach[safetensors])") from None
    return safetensors.torch


def _write_npz(folder: Path, arrays: dict) -> dict:
    buffer = bytes_io.BytesIO()
    np.savez(buffer, **{k: v.numpy() for k, v in arrays.items()})
    io.atomic_write_bytes(folder / "poisons.npz", buffer.getvalue())
    return {"file": "poisons.npz"}


def _write_safetensors(folder: Path, arrays: dict) -> dict:
    data = require_safetensors().save(arrays, metadata={"format": "poisonreach-poisons", "format_version": str(FORMAT_VERSION)})
    io.atomic_write_bytes(folder / "poisons.safetensors", data)
    return {"file": "poisons.safetensors"}


def _write_png(folder: Path, arrays: dict) -> dict:
    """One PNG per poison, round(255·clip(x, 0, 1)) in 8 bits, and labels.csv; the manifest says
    how many values the clipping changed."""
    x = arrays["x"].numpy()
    outside = (x < 0) | (x > 1)
    pixels = np.rint(np.clip(x, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)  # N × H × W × C
    width = max(5, len(str(len(x) - 1)))
    rows = ["file,label,source_index"]
    for i, (image, label, source) in enumerate(zip(pixels, arrays["y"].tolist(), arrays["source_indices"].tolist())):
        name = f"{i:0{width}d}.png"
        buffer = bytes_io.BytesIO()
        Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(buffer, format="PNG")
        io.atomic_write_bytes(folder / name, buffer.getvalue())
        rows.append(f"{name},{label},{source}")
    io.atomic_write_bytes(folder / "labels.csv", ("\n".join(rows) + "\n").encode())
    return {"file": "labels.csv", "png": {"mode": "L" if x.shape[1] == 1 else "RGB", "encoding": "round(255 * clip(x, 0, 1))",
                                          "clipped_values": int(outside.sum()), "clipped_poisons": int(outside.any(axis=(1, 2, 3)).sum())}}


WRITERS = {"npz": _write_npz, "safetensors": _write_safetensors, "png": _write_png}
