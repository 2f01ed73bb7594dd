"""Figures of a run folder or a sweep folder, as PNG and PDF (matplotlib, no display needed).

They are drawn from what the folders hold (metrics, poisons, saved models and config.yaml, read
back with :mod:`poisonreach.experiments.config`); :func:`plot_folder` tells the two kinds apart.

Run folder (``poisonreach run``):
    gc_history      ‖g(µ) + ε_d·g(ν̂)‖ per GC epoch for each ε_d (Figures 3 and 7)
    eps_d_curves    accuracy drop and ‖g(χ)‖ against ε_d, τ marked (Figure 1 middle/right, Figure 2)
    poisons         clean source / poisoned / perturbation image rows (Figures 9 and 10)
    regression      1-D regression: data, poisons, clean / target / retrained lines (Figure 5)
Sweep folder (``poisonreach sweep``, cells under ``cells/``):
    eps_d_curves    the same curves with one line per cell
    gc_history      the learning curves of every cell at each ε_d
    tau_map         τ and the accuracy drop over a grid of fixed targets w ∈ R² (Figure 1 left)
"""

from __future__ import annotations

import math
from io import BytesIO
from pathlib import Path

import torch

from .. import io, models
from ..attacks import PoisonResult
from ..errors import PoisonReachError
from .config import RunConfig, load_data


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out: Path, stem: str) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically and close the figure."""
    plt = pyplot()
    written = []
    for fmt in ("png", "pdf"):
        buf = BytesIO()
        fig.savefig(buf, format=fmt, dpi=120)
        io.atomic_write_bytes(out / f"{stem}.{fmt}", buf.getvalue())
        written.append(out / f"{stem}.{fmt}")
    plt.close(fig)
    return written


def _cells(run_dir: Path, metrics: dict) -> list[tuple[dict, Path]]:
    return [(r, run_dir / f"eps_d={r['eps_d']:g}") for r in metrics["results"]]


def _label(metrics: dict) -> str:
    tau = metrics.get("tau")
    tau = "-" if tau is None or not math.isfinite(tau) else f"{tau:.3g}"
    return f"{metrics['dataset']} / {metrics['model']}, ε_w = {metrics['eps_w']:g}, τ = {tau}"


def plot_gc_history(ax, run_dir: Path, metrics: dict, *, prefix: str = "") -> bool:
    """Draw every ε_d cell's GC history on ``ax``; False when no cell has one (baseline attacks)."""
    drawn = False
    for r, cell in _cells(run_dir, metrics):
        history = io.read_json(cell / "poisons.json")["grad_norm_history"]
        if history:
            ax.plot(history, label=f"{prefix}ε_d = {r['eps_d']:g}")
            drawn = True
    ax.set_yscale("log")
    ax.set_xlabel("epoch (GC), step (GM)")
    ax.set_ylabel("‖g(µ) + ε_d·g(ν̂)‖₂")
    return drawn


def plot_folder(folder: str | Path) -> list[Path]:
    """The figures of a sweep folder (one holding ``cells/``) or else of a run folder, written into it."""
    folder = Path(folder)
    return plot_sweep(folder) if (folder / "cells").is_dir() else plot_run(folder)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """All figures of one run folder, written into ``out`` (default: the run folder)."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise PoisonReachError(f"{run_dir} holds no finished run (no metrics.json): finish it with `poisonreach run` first")
    out = Path(out) if out is not None else run_dir
    metrics = io.read_json(run_dir / "metrics.json")
    plt = pyplot()
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    if plot_gc_history(ax, run_dir, metrics):
        ax.set_title(_label(metrics))
        ax.legend()
        fig.tight_layout()
        written += save_figure(fig, out, "gc_history")
    else:
        plt.close(fig)

    if not metrics["results"]:
        return written  # a target-only run (no ε_d): nothing else to draw
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _eps_d_curves(axes, [(None, metrics)])
    fig.suptitle(_label(metrics))
    fig.tight_layout()
    written += save_figure(fig, out, "eps_d_curves")

    last, cell = _cells(run_dir, metrics)[-1]
    result = PoisonResult.load(cell)
    if result.x.dim() == 4:
        written += _poison_grid(result, run_dir, metrics, out, f"ε_d = {last['eps_d']:g}")
    elif result.x.shape[1:] == (1,) and "clean_mse" in metrics:
        written += _regression_lines(run_dir, metrics, out)
    return written


def _regression_lines(run_dir: Path, metrics: dict, out: Path) -> list[Path]:
    """Figure 5: one panel per ε_d with the clean data, the poisons, and the clean, target and
    retrained lines (GC reaches the target line at every ε_d for least squares, Example 1)."""
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    splits, _ = load_data(config)
    cells = _cells(run_dir, metrics)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(cells), figsize=(3.6 * len(cells), 3.4), squeeze=False, sharey=True)
    grid = torch.linspace(float(splits.x_train.min()) - 1, float(splits.x_train.max()) + 1, 50).view(-1, 1)
    lines = {name: models.load_model(run_dir / f"{name}_model.pt") for name in ("clean", "target")}
    for ax, (r, cell) in zip(axes[0], cells):
        result = PoisonResult.load(cell)
        ax.scatter(splits.x_train[:, 0], splits.y_train, s=4, color="0.6", label="clean")
        ax.scatter(result.x[:, 0], result.y, s=8, color="tab:red", label="poisons")
        with torch.no_grad():
            for name, model in {**lines, "retrained": models.load_model(cell / "retrained_model.pt")}.items():
                ax.plot(grid[:, 0], model.eval()(grid)[:, 0], label=name, linestyle="--" if name == "target" else "-")
        ax.set_title(f"ε_d = {r['eps_d']:g}")
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("y")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    return save_figure(fig, out, "regression")


def _eps_d_curves(axes, runs: list[tuple[str | None, dict]]) -> None:
    """Accuracy drop, clean − poisoned (left; for regression the rise of the test MSE, so up is damage
    either way), and final ‖g‖ (right) against ε_d, one line per run, τ dashed."""
    regression = any("poisoned_mse" in r for _, metrics in runs for r in metrics["results"])
    for label, metrics in runs:
        rows = sorted(metrics["results"], key=lambda r: r["eps_d"])
        eps = [r["eps_d"] for r in rows]
        # accuracy is undefined for regression: the rise of the test MSE instead
        damage = [r["poisoned_mse"] - metrics["clean_mse"] if regression else r["acc_drop"] for r in rows]
        if not regression and len(metrics.get("victim_seeds") or []) > 1 and all("acc_drop_mean" in r for r in rows):
            # victim seeds: the mean drop with ± one sample standard deviation
            line = axes[0].errorbar(eps, [r["acc_drop_mean"] for r in rows], yerr=[r["acc_drop_std"] for r in rows],
                                    marker="o", capsize=3, label=label)[0]
        else:
            line = axes[0].plot(eps, damage, marker="o", label=label)[0]
        if metrics.get("target_mse" if regression else "target_acc") is not None:  # one target (select: one per ε_d)
            target_damage = metrics["target_mse"] - metrics["clean_mse"] if regression else metrics["clean_acc"] - metrics["target_acc"]
            axes[0].axhline(target_damage, color=line.get_color(), linestyle=":", linewidth=1)  # the target's own (GradPC's)
        axes[1].plot(eps, [r["grad_norm_final"] for r in rows], marker="o", color=line.get_color(), label=label)
        tau = metrics.get("tau")
        if tau is not None and math.isfinite(tau) and tau > 0:
            for ax in axes:
                ax.axvline(tau, color=line.get_color(), linestyle="--", linewidth=1)
    axes[0].set_ylabel(("test MSE increase" if regression else "accuracy drop (points)") + " (dotted: the target's)")
    axes[1].set_ylabel("‖g(µ) + ε_d·g(ν̂)‖₂ after the attack")
    axes[1].set_yscale("log")
    from matplotlib.ticker import FixedLocator, FormatStrFormatter, LogLocator, NullFormatter, NullLocator

    budgets = sorted({r["eps_d"] for _, metrics in runs for r in metrics["results"]})
    # log axes over less than a decade get no labels, or colliding ones: label what was run
    norms = [r["grad_norm_final"] for _, metrics in runs for r in metrics["results"] if r["grad_norm_final"] > 0]
    few_decades = bool(norms) and max(norms) / min(norms) < 100
    axes[1].yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if few_decades else (1.0,)))
    axes[1].yaxis.set_major_formatter(FormatStrFormatter("%.3g" if few_decades else "%.0e"))
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("ε_d (dashed: τ)")
        if any(label for label, _ in runs):
            ax.legend(fontsize="small")


def _poison_grid(result: PoisonResult, run_dir: Path, metrics: dict, out: Path, title: str, count: int = 8) -> list[Path]:
    """Rows: the clean image each poison started from, the poison, and their difference."""
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    splits, _ = load_data(config)
    count = min(count, len(result.x))
    clean = splits.x_train[result.source_indices[:count]]
    poisons = result.x[:count]
    rows = [("clean", clean), ("poisoned", poisons), ("perturbation", poisons - clean)]
    plt = pyplot()
    fig, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.6), squeeze=False)
    for i, (name, images) in enumerate(rows):
        for j in range(count):
            ax = axes[i][j]
            img = images[j]
            if name == "perturbation":
                scale = float(img.abs().max()) or 1.0
                shown = (img / (2 * scale) + 0.5).clamp(0, 1)  # zero change is mid-grey
            else:
                shown = img.clamp(0, 1)
            shown = shown.permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(shown, cmap="gray" if shown.ndim == 2 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(name)
    fig.suptitle(f"{_label(metrics)}, {title}")
    fig.tight_layout()
    return save_figure(fig, out, "poisons")


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """The sweep's figures, written into the sweep folder, from the finished cells' run folders."""
    sweep_dir = Path(sweep_dir)
    runs = [(cell.name, io.read_json(cell / "metrics.json"), cell) for cell in sorted((sweep_dir / "cells").glob("*")) if (cell / "metrics.json").is_file()]
    if not runs:
        raise PoisonReachError(f"{sweep_dir} holds no finished cell (cells/*/metrics.json): run `poisonreach sweep` first")
    plt = pyplot()
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _eps_d_curves(axes, [(f"{name} (τ = {metrics['tau']:.3g})", metrics) for name, metrics, _ in runs])
    fig.tight_layout()
    written += save_figure(fig, sweep_dir, "eps_d_curves")

    budgets = sorted({r["eps_d"] for _, metrics, _ in runs for r in metrics["results"]})
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    drawn = False
    for ax, eps_d in zip(axes[0], budgets):
        for name, metrics, cell in runs:
            history = _history(cell, eps_d)
            if history:
                ax.plot(history, label=f"{name} (τ = {metrics['tau']:.3g})")
                drawn = True
        ax.set_yscale("log")
        ax.set_title(f"ε_d = {eps_d:g}")
        ax.set_xlabel("epoch (GC), step (GM)")
        ax.set_ylabel("‖g(µ) + ε_d·g(ν̂)‖₂")
        ax.legend(fontsize="x-small")
    if drawn:
        fig.tight_layout()
        written += save_figure(fig, sweep_dir, "gc_history")
    else:
        plt.close(fig)

    fixed = [(metrics, io.read_yaml(cell / "config.yaml")) for _, metrics, cell in runs]
    fixed = [(m, c) for m, c in fixed if c["target"] == "fixed" and len(_flat(c["target_options"].get("weight"))) == 2]
    if len(fixed) > 1:
        written += _tau_map(fixed, budgets, sweep_dir)
    return written


def _history(cell: Path, eps_d: float) -> list[float]:
    path = cell / f"eps_d={eps_d:g}" / "poisons.json"
    return io.read_json(path)["grad_norm_history"] if path.is_file() else []


def _flat(value) -> list[float]:
    return [] if value is None else torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()


def _tau_map(fixed: list[tuple[dict, dict]], budgets: list[float], out: Path) -> list[Path]:
    """Figure 1 (left and middle): τ, and the accuracy drop (clean − poisoned) at each ε_d, over the
    target grid w ∈ R²."""
    plt = pyplot()
    w1 = sorted({_flat(c["target_options"]["weight"])[0] for _, c in fixed})
    w2 = sorted({_flat(c["target_options"]["weight"])[1] for _, c in fixed})
    grids = {key: torch.full((len(w2), len(w1)), math.nan) for key in ["tau", *budgets]}
    for metrics, config in fixed:
        a, b = _flat(config["target_options"]["weight"])
        i, j = w2.index(b), w1.index(a)
        grids["tau"][i, j] = metrics["tau"]
        for r in metrics["results"]:
            grids[r["eps_d"]][i, j] = r["acc_drop"]
    cols = min(4, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    drops = torch.stack([g for key, g in grids.items() if key != "tau"])
    high = float(drops.nan_to_num(0).max()) if len(drops) else 100.0  # one colour scale for every ε_d
    for ax, (key, grid) in zip(axes.flat, grids.items()):
        scale = {} if key == "tau" else {"vmin": 0.0, "vmax": max(high, 1.0)}
        # one cell per grid value (the grid need not be evenly spaced), labelled with its w
        image = ax.imshow(grid.numpy(), origin="lower", aspect="auto", cmap="viridis" if key == "tau" else "magma_r", **scale)
        fig.colorbar(image, ax=ax)
        ax.set_xticks(range(len(w1)), [f"{v:g}" for v in w1])
        ax.set_yticks(range(len(w2)), [f"{v:g}" for v in w2])
        for i in range(len(w2)):  # the value in each cell: the grid is coarse enough to read
            for j in range(len(w1)):
                ax.text(j, i, f"{float(grid[i, j]):.3g}", ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set_title("τ" if key == "tau" else f"accuracy drop, ε_d = {key:g}")
        ax.set_xlabel("w₁")
        ax.set_ylabel("w₂")
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, out, "tau_map")
