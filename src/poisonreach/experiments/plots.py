"""Figures of a run folder or a sweep folder, as PNG and PDF (matplotlib, no display needed).

They are drawn from what the folders hold (metrics, poisons, saved models and config.yaml, read
back with :mod:`poisonreach.experiments.config`); :func:`plot_folder` tells the two kinds apart.
:func:`run_figures` and :func:`sweep_figures` draw them without saving.

Run folder (``poisonreach run``):
    gc_history      ‖g(µ) + ε_d·g(ν̂)‖ per GC epoch for each ε_d (Figures 3 and 7), its residual floor
                    dashed where the run recorded a positive one
    eps_d_curves    accuracy drop and ‖g(χ)‖ against ε_d, τ marked (Figure 1 middle/right, Figure 2)
    poisons         clean source / poisoned / perturbation image rows, poison labels under the
                    poisons (Figures 9 and 10)
    regression      1-D regression: data, poisons, clean / target / retrained lines (Figure 5)
Sweep folder (``poisonreach sweep``, cells under ``cells/``):
    eps_d_curves    the same curves with one line per cell
    gc_history      the learning curves of every cell at each ε_d (one panel ε_d = τ for the budget
                    "tau", each cell's own τ)
    tau_map         τ and the accuracy drop over a grid of fixed targets w ∈ R² (Figure 1 left)

A run's budget "tau" (ε_d = τ of its target) is labelled τ in ticks, legends and titles.
"""

from __future__ import annotations

import math
import re
from io import BytesIO
from pathlib import Path

import torch

from .. import io, models
from ..attacks import PoisonResult
from ..errors import PoisonReachError
from .config import RunConfig, load_data

EPS_D = r"$\varepsilon_d$"
GRAD_NORM = r"$\|g(\mu) + \varepsilon_d\, g(\hat\nu)\|_2$"


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


def save_figures(figures: dict, out: Path) -> list[Path]:
    """Write every figure of ``figures`` (stem → figure) into ``out`` and close them."""
    return [path for stem, fig in figures.items() for path in save_figure(fig, out, stem)]


def _cells(run_dir: Path, metrics: dict) -> list[tuple[dict, Path]]:
    return [(r, run_dir / f"eps_d={r['eps_d']:g}") for r in metrics["results"]]


def _tau_budget(folder: Path, metrics: dict) -> float | None:
    """The ε_d of the run's budget "tau" (its target's τ); None when its config.yaml asks for none
    or the run skipped it (τ = 0 or ∞ is no budget)."""
    tau, config = metrics.get("tau"), folder / "config.yaml"
    if tau is None or not config.is_file() or "tau" not in (io.read_yaml(config).get("eps_d") or []):
        return None
    return next((r["eps_d"] for r in metrics["results"] if math.isclose(r["eps_d"], tau, rel_tol=1e-6)), None)


def _budget(eps_d: float | str, tau_budget: float | None = None) -> str:
    """A budget's title, typeset: "ε_d = 0.1"; "ε_d = τ" for the budget "tau", with its value when it is a run's."""
    if eps_d == "tau":
        return r"$\varepsilon_d = \tau$"
    if eps_d == tau_budget:
        return rf"$\varepsilon_d = \tau$ = {eps_d:.3g}"
    return rf"{EPS_D} = {eps_d:g}"


def _label(metrics: dict) -> str:
    tau = metrics.get("tau")
    tau = "-" if tau is None or not math.isfinite(tau) else f"{tau:.3g}"
    return rf"{metrics['dataset']} / {metrics['model']}, $\varepsilon_w$ = {metrics['eps_w']:g}, $\tau$ = {tau}"


def _run_name(cell: Path, metrics: dict) -> str:
    """A sweep cell's legend entry: its name, eps_d / eps_w typeset, and its τ."""
    name = re.sub(r"\beps_([dw])=", r"$\\varepsilon_\1$=", cell.name)
    return rf"{name} ($\tau$ = {metrics['tau']:.3g})"


def plot_gc_history(ax, run_dir: Path, metrics: dict, *, prefix: str = "", tau_budget: float | None = None) -> bool:
    """Draw every ε_d cell's GC history on ``ax``, with its residual floor where the run recorded a
    positive one (dashed, the curve's colour: no poisons in the box go below it); False when no
    cell has a history (baseline attacks)."""
    drawn = floors = False
    for r, cell in _cells(run_dir, metrics):
        history = io.read_json(cell / "poisons.json")["grad_norm_history"]
        if history:
            (line,) = ax.plot(history, label=prefix + _budget(r["eps_d"], tau_budget))
            drawn = True
            if r.get("residual_floor"):
                ax.axhline(r["residual_floor"], color=line.get_color(), linestyle="--", linewidth=0.8)
                floors = True
    if floors:
        ax.plot([], [], "k--", linewidth=0.8, label="certified floor")
    ax.set_yscale("log")
    ax.set_xlabel("epoch (GC), step (GM)")
    ax.set_ylabel(GRAD_NORM)
    return drawn


def plot_folder(folder: str | Path) -> list[Path]:
    """The figures of a sweep folder (one holding ``cells/``) or else of a run folder, written into it."""
    folder = Path(folder)
    return plot_sweep(folder) if (folder / "cells").is_dir() else plot_run(folder)


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """All figures of one run folder, written into ``out`` (default: the run folder)."""
    figures = run_figures(run_dir)
    return save_figures(figures, Path(out) if out is not None else Path(run_dir))


def run_figures(run_dir: str | Path) -> dict:
    """The figures of one run folder by stem (gc_history, eps_d_curves, poisons or regression), not saved."""
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.json").is_file():
        raise PoisonReachError(f"{run_dir} holds no finished run (no metrics.json): finish it with `poisonreach run` first")
    metrics = io.read_json(run_dir / "metrics.json")
    tau_budget = _tau_budget(run_dir, metrics)
    plt = pyplot()
    figures = {}

    fig, ax = plt.subplots(figsize=(6, 4))
    if plot_gc_history(ax, run_dir, metrics, tau_budget=tau_budget):
        ax.set_title(_label(metrics))
        ax.legend()
        fig.tight_layout()
        figures["gc_history"] = fig
    else:
        plt.close(fig)

    if not metrics["results"]:
        return figures  # a target-only run (no ε_d): nothing else to draw
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fig.suptitle(_label(metrics))
    _eps_d_curves(fig, axes, [(None, metrics, tau_budget)])
    figures["eps_d_curves"] = fig

    last, cell = _cells(run_dir, metrics)[-1]
    result = PoisonResult.load(cell)
    if result.x.dim() == 4:
        figures["poisons"] = _poison_grid(result, run_dir, metrics, _budget(last["eps_d"], tau_budget))
    elif result.x.shape[1:] == (1,) and "clean_mse" in metrics:
        figures["regression"] = _regression_lines(run_dir, metrics, tau_budget)
    return figures


def _regression_lines(run_dir: Path, metrics: dict, tau_budget: float | None):
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
        ax.set_title(_budget(r["eps_d"], tau_budget))
        ax.set_xlabel("x")
    axes[0][0].set_ylabel("y")
    axes[0][0].legend(fontsize="x-small")
    fig.tight_layout()
    return fig


def _eps_d_curves(fig, axes, runs: list[tuple[str | None, dict, float | None]]) -> None:
    """Accuracy drop, clean − poisoned (left; for regression the rise of the test MSE, so up is damage
    either way), and final ‖g‖ (right) against ε_d, one line per (label, metrics, budget "tau") run,
    the target's own drop dotted, τ dashed; lays the figure out."""
    from matplotlib.lines import Line2D

    regression = any("poisoned_mse" in r for _, metrics, _ in runs for r in metrics["results"])
    dotted, dashed = _draw_curves(axes, runs, regression)
    axes[0].set_ylabel("test MSE increase" if regression else "accuracy drop (points)")
    axes[1].set_ylabel(f"{GRAD_NORM} after the attack")
    _grad_norm_axis(axes[1], runs)
    own = "the target's own " + ("MSE increase" if regression else "drop")
    tau = rf"$\tau$ = {runs[0][1]['tau']:.3g}" if dashed and len(runs) == 1 else r"$\tau$"
    styles = [(own, ":", dotted), (tau, "--", dashed)]
    for ax, shown in zip(axes, (styles, styles[1:])):  # the right panel has no target's drop
        handles = ax.get_legend_handles_labels()[0]
        handles += [Line2D([], [], color="0.3", linestyle=style, linewidth=1, label=text) for text, style, drawn in shown if drawn]
        if handles:
            ax.legend(handles=handles, fontsize="small")
        ax.set_xlabel(EPS_D)
    texts = _budget_axes(axes, runs)
    fig.tight_layout()
    _drop_overlapping(fig, axes, texts)


def _draw_curves(axes, runs, regression: bool) -> tuple[bool, bool]:
    """The lines of :func:`_eps_d_curves`; whether a target's drop (dotted) and a τ (dashed) were drawn."""
    dotted = dashed = False
    for label, metrics, _ in runs:
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
            dotted = True
        axes[1].plot(eps, [r["grad_norm_final"] for r in rows], marker="o", color=line.get_color(), label=label)
        tau = metrics.get("tau")
        if tau is not None and math.isfinite(tau) and tau > 0:
            for ax in axes:
                ax.axvline(tau, color=line.get_color(), linestyle="--", linewidth=1)
            dashed = True
    return dotted, dashed


def _grad_norm_axis(ax, runs) -> None:
    """Log ‖g‖ axis; over less than two decades it gets no labels, or colliding ones: 1, 2, 5 per decade."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    norms = [r["grad_norm_final"] for _, metrics, _ in runs for r in metrics["results"] if r["grad_norm_final"] > 0]
    few_decades = bool(norms) and max(norms) / min(norms) < 100
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0) if few_decades else (1.0,)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g" if few_decades else "%.0e"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _budget_axes(axes, runs) -> dict[float, str]:
    """Log ε_d axes with a tick at every budget run, labelled with it, "τ" at a run's budget "tau";
    returns the labels (budget → text)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    taus = {t for _, _, t in runs if t is not None}
    budgets = sorted({r["eps_d"] for _, metrics, _ in runs for r in metrics["results"]})
    texts = {b: r"$\tau$" if b in taus else f"{b:g}" for b in budgets}
    for ax in axes:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(budgets))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: texts.get(x, "")))
        ax.xaxis.set_minor_locator(NullLocator())
    return texts


def _drop_overlapping(fig, axes, texts: dict[float, str]) -> None:
    """Leave out the ε_d tick labels that would overlap one kept before: τ's first, then from the left
    (the tick stays)."""
    from matplotlib.ticker import FuncFormatter

    renderer = fig.canvas.get_renderer()
    for ax in axes:
        labels = dict(zip(ax.xaxis.get_majorticklocs(), ax.xaxis.get_majorticklabels()))
        kept, boxes = {}, []
        for b in sorted(labels, key=lambda b: (texts.get(b) != r"$\tau$", b)):
            box = labels[b].get_window_extent(renderer).expanded(1.2, 1.0)  # a little space between labels
            if not any(box.overlaps(other) for other in boxes):
                kept[b] = texts.get(b, "")
                boxes.append(box)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _, kept=kept: kept.get(x, "")))


def _poison_grid(result: PoisonResult, run_dir: Path, metrics: dict, title: str, count: int = 8):
    """Rows: the clean image each poison started from, the poison with its label under it, and their difference."""
    config = RunConfig.from_dict(io.read_yaml(run_dir / "config.yaml"))
    splits, _ = load_data(config)
    count = min(count, len(result.x))
    clean = splits.x_train[result.source_indices[:count]]
    poisons = result.x[:count]
    rows = [("clean", clean), ("poisoned", poisons), ("perturbation", poisons - clean)]
    plt = pyplot()
    fig, axes = plt.subplots(3, count, figsize=(1.4 * count, 4.8), squeeze=False)
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
            if name == "poisoned":
                ax.set_xlabel(_poison_label(result.y[j]), fontsize="small")
    fig.suptitle(f"{_label(metrics)}, {title}")
    fig.tight_layout()
    return fig


def _poison_label(y: torch.Tensor) -> str:
    """A poison's class; for soft labels the likeliest class with its probability."""
    if y.dim() == 0:
        return f"label {int(y)}"
    p, k = y.max(dim=0)
    return f"label {int(k)} ({float(p):.2f})"


def plot_sweep(sweep_dir: str | Path) -> list[Path]:
    """The sweep's figures, written into the sweep folder, from the finished cells' run folders."""
    return save_figures(sweep_figures(sweep_dir), Path(sweep_dir))


def sweep_figures(sweep_dir: str | Path) -> dict:
    """The figures of a sweep folder by stem (eps_d_curves, gc_history, tau_map), not saved."""
    sweep_dir = Path(sweep_dir)
    runs = [_finished(cell) for cell in sorted((sweep_dir / "cells").glob("*")) if (cell / "metrics.json").is_file()]
    if not runs:
        raise PoisonReachError(f"{sweep_dir} holds no finished cell (cells/*/metrics.json): run `poisonreach sweep` first")
    plt = pyplot()
    figures = {}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    _eps_d_curves(fig, axes, [(_run_name(cell, metrics), metrics, t) for cell, metrics, t in runs])
    figures["eps_d_curves"] = fig

    # every cell's budget "tau" is its own τ: one budget "tau" for them all
    budgets = sorted({r["eps_d"] for _, metrics, t in runs for r in metrics["results"] if r["eps_d"] != t})
    budgets += ["tau"] if any(t is not None for _, _, t in runs) else []
    fig = _sweep_histories(runs, budgets)
    if fig is not None:
        figures["gc_history"] = fig

    fixed = [(metrics, io.read_yaml(cell / "config.yaml"), t) for cell, metrics, t in runs]
    fixed = [(m, c, t) for m, c, t in fixed if c["target"] == "fixed" and len(_flat(c["target_options"].get("weight"))) == 2]
    if len(fixed) > 1:
        figures["tau_map"] = _tau_map(fixed, budgets)
    return figures


def _finished(cell: Path) -> tuple[Path, dict, float | None]:
    """A finished cell's folder, metrics and budget "tau"."""
    metrics = io.read_json(cell / "metrics.json")
    return cell, metrics, _tau_budget(cell, metrics)


def _sweep_histories(runs: list[tuple[Path, dict, float | None]], budgets: list):
    """The learning curves of every cell, one panel per budget; None when no cell has one."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 4), squeeze=False)
    drawn = False
    for ax, eps_d in zip(axes[0], budgets):
        for cell, metrics, tau_budget in runs:
            history = _history(cell, tau_budget if eps_d == "tau" else eps_d)
            if history:
                ax.plot(history, label=_run_name(cell, metrics))
                drawn = True
        ax.set_yscale("log")
        ax.set_title(_budget(eps_d))
        ax.set_xlabel("epoch (GC), step (GM)")
        ax.set_ylabel(GRAD_NORM)
        if ax.get_lines():
            ax.legend(fontsize="x-small")
    if not drawn:
        plt.close(fig)
        return None
    fig.tight_layout()
    return fig


def _history(cell: Path, eps_d: float | None) -> list[float]:
    path = cell / f"eps_d={eps_d:g}" / "poisons.json"
    return io.read_json(path)["grad_norm_history"] if eps_d is not None and path.is_file() else []


def _flat(value) -> list[float]:
    return [] if value is None else torch.as_tensor(value, dtype=torch.float64).reshape(-1).tolist()


def _tau_map(fixed: list[tuple[dict, dict, float | None]], budgets: list):
    """Figure 1 (left and middle): τ, and the accuracy drop (clean − poisoned) at each ε_d, over the
    target grid w ∈ R²."""
    plt = pyplot()
    w1 = sorted({_flat(c["target_options"]["weight"])[0] for _, c, _ in fixed})
    w2 = sorted({_flat(c["target_options"]["weight"])[1] for _, c, _ in fixed})
    grids = {key: torch.full((len(w2), len(w1)), math.nan) for key in [None, *budgets]}  # None: τ itself
    for metrics, config, tau_budget in fixed:
        a, b = _flat(config["target_options"]["weight"])
        i, j = w2.index(b), w1.index(a)
        grids[None][i, j] = metrics["tau"]
        for r in metrics["results"]:
            grids["tau" if r["eps_d"] == tau_budget else r["eps_d"]][i, j] = r["acc_drop"]
    cols = min(4, len(grids))
    rows = math.ceil(len(grids) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    drops = torch.stack([g for key, g in grids.items() if key is not None])
    high = float(drops.nan_to_num(0).max()) if len(drops) else 100.0  # one colour scale for every ε_d
    for ax, (key, grid) in zip(axes.flat, grids.items()):
        scale = {} if key is None else {"vmin": 0.0, "vmax": max(high, 1.0)}
        # one cell per grid value (the grid need not be evenly spaced), labelled with its w
        image = ax.imshow(grid.numpy(), origin="lower", aspect="auto", cmap="viridis" if key is None else "magma_r", **scale)
        fig.colorbar(image, ax=ax, label=r"threshold $\tau$" if key is None else "accuracy drop (points)")
        ax.set_xticks(range(len(w1)), [f"{v:g}" for v in w1])
        ax.set_yticks(range(len(w2)), [f"{v:g}" for v in w2])
        for i in range(len(w2)):  # the value in each cell: the grid is coarse enough to read
            for j in range(len(w1)):
                ax.text(j, i, f"{float(grid[i, j]):.3g}", ha="center", va="center", fontsize=7,
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
        ax.set_title(r"$\tau$" if key is None else f"accuracy drop, {_budget(key)}")
        ax.set_xlabel("$w_1$")
        ax.set_ylabel("$w_2$")
    for ax in list(axes.flat)[len(grids):]:
        ax.axis("off")
    fig.tight_layout()
    return fig
