"""`poisonreach report SWEEP_DIR`: one Markdown page with the sweep's table beside the paper's numbers
and its figures.

The page (``report.md`` in the sweep folder) holds the sweep's name and description, the resolved
settings, the results table read from ``results.csv`` (our accuracy drop next to the paper's, and
the difference where the paper gives a number), the wall time of every cell, and the figures of
:func:`poisonreach.experiments.plots.plot_sweep` (drawn first if missing).
"""

from __future__ import annotations

import csv
from pathlib import Path

import yaml

from .. import io
from ..errors import PoisonReachError
from .plots import plot_sweep
from .sweep import HEADERS, show_cell, shown_columns

# The report names the sweep's grid values as columns too, and says whose drop is whose.
NAMES = {**HEADERS, "acc_drop": "drop (ours)", "paper_acc_drop": "drop (paper)"}


def markdown_table(rows: list[dict]) -> str:
    keys = shown_columns(rows, list(HEADERS))
    head = "| " + " | ".join(NAMES[k] for k in keys) + " |"
    rule = "|" + "|".join("---" for _ in keys) + "|"
    body = ["| " + " | ".join(show_cell(k, r) for k in keys) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def write_report(sweep_dir: str | Path) -> Path:
    """Write ``report.md`` into the sweep folder and return its path."""
    sweep_dir = Path(sweep_dir)
    csv_path = sweep_dir / "results.csv"
    if not csv_path.is_file():
        raise PoisonReachError(f"{sweep_dir} has no results.csv: run `poisonreach sweep` into it first")
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    sweep = io.read_yaml(sweep_dir / "sweep.yaml") if (sweep_dir / "sweep.yaml").is_file() else {}
    figures = [p for p in sorted(sweep_dir.glob("*.png"))]
    if not figures:
        figures = [p for p in plot_sweep(sweep_dir) if p.suffix == ".png"]
    lines = [f"# {sweep.get('name', sweep_dir.name)}", ""]
    if sweep.get("description"):
        lines += [str(sweep["description"]).strip(), ""]
    lines += ["## Results", "", "A drop is clean − poisoned accuracy in percentage points (positive: the attack did damage), "
              "ours and the paper's alike (most of its tables print the change, negative); \"drop (paper)\" is the paper's "
              "number for the same cell where it gives one.", "", markdown_table(rows), ""]
    compared = [(float(r["acc_drop"]), float(r["paper_acc_drop"])) for r in rows if r.get("paper_acc_drop") not in (None, "") and r.get("acc_drop") not in (None, "")]
    if compared:
        gap = sum(abs(ours - paper) for ours, paper in compared) / len(compared)
        lines += [f"Mean absolute difference from the paper over {len(compared)} cells: {gap:.2f} percentage points.", ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures] + [""]
    if sweep:
        lines += ["## Settings", "", "```yaml", yaml.safe_dump(sweep, sort_keys=False).rstrip(), "```", ""]
    return io.atomic_write_bytes(sweep_dir / "report.md", "\n".join(lines).encode())
