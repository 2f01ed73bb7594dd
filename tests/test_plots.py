"""Figures a paper can use: ε_d, ε_w and τ typeset, the budget "tau" labelled τ, the target's own
drop a legend entry, labelled colour bars, ε_d tick labels that do not overlap, poison labels under
the poisons. The figures are inspected as matplotlib objects before they are saved."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from poisonreach import io
from poisonreach.attacks import PoisonResult
from poisonreach.cli import main
from poisonreach.experiments import plots
from poisonreach.experiments.config import RunConfig

# 300 digits, short training and GC; eps_w 1 gives the target a τ ≈ 0.61, a budget to run at
FAST = ["--train-size", "300", "--train-epochs", "3", "--attack", "gc-pgd", "--attack-option", "epochs=5", "--eps-w", "1"]
EPS_D = r"$\varepsilon_d$"
TAU = r"$\tau$"
# budgets close together on a log axis, and each cell's own τ among them
CLOSE = [0.01, 0.012, 0.015, 0.02, 0.03, 0.05, 0.1, 0.11, 0.3, 0.5, 1.0, 2.0]
TAUS = {(-0.6, -0.6): 1.44, (-0.6, -0.15): 0.836, (-0.15, -0.6): 0.723, (-0.15, -0.15): 0.204}


@pytest.fixture(scope="module")
def tau_run(tmp_path_factory):
    """A finished digits run at ε_d = 0.03 and ε_d = τ."""
    out = tmp_path_factory.mktemp("runs") / "tau"
    assert main(["run", *FAST, "--eps-d", "0.03", "tau", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory):
    """A sweep folder of four fixed targets w ∈ R² (config.yaml and metrics.json only) at the close
    budgets and ε_d = τ."""
    out = tmp_path_factory.mktemp("sweeps") / "grid"
    for (a, b), tau in TAUS.items():
        cell = out / "cells" / f"eps_w=1,w={a:g},{b:g}"
        config = RunConfig(dataset="or2d", target="fixed", target_options={"weight": [[a, b]], "bias": [0.1]}, eps_d=[*CLOSE, "tau"])
        io.write_yaml(cell / "config.yaml", config.to_dict())
        results = [{"eps_d": e, "acc_drop": min(99.0, 50 * e / tau), "grad_norm_final": 10 ** -min(7, 3 * e / tau)}
                   for e in sorted([*CLOSE, tau])]
        io.write_json(cell / "metrics.json", {"dataset": "or2d", "model": "lr", "eps_w": 1.0, "clean_acc": 99.5,
                                              "target_acc": 3.0, "tau": tau, "results": results})
    return out


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plots.pyplot().close("all")


def drawn(fig):
    fig.canvas.draw()  # tick labels get their texts when drawn
    return fig


def texts(fig) -> list[str]:
    from matplotlib.text import Text

    return [t.get_text() for t in drawn(fig).findobj(Text) if t.get_text()]


def tick_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_xticklabels() if t.get_text()]


def legend_entries(ax) -> dict[str, str]:
    legend = ax.get_legend()
    return {text.get_text(): handle.get_linestyle() for text, handle in zip(legend.get_texts(), legend.legend_handles)}


def test_eps_and_tau_are_typeset_in_every_figure(tau_run, grid_sweep):
    figures = {**plots.run_figures(tau_run), **{f"sweep {k}": f for k, f in plots.sweep_figures(grid_sweep).items()}}
    assert set(figures) == {"gc_history", "eps_d_curves", "poisons", "sweep eps_d_curves", "sweep tau_map"}
    for name, fig in figures.items():
        for text in texts(fig):
            plain = re.sub(r"\$[^$]*\$", "", text)  # what is left outside mathtext
            assert not re.search(r"ε|τ|eps_[dw]", plain), (name, text)
    for fig in (figures["eps_d_curves"], figures["sweep eps_d_curves"]):
        assert [ax.get_xlabel() for ax in fig.axes] == [EPS_D, EPS_D]
        assert r"\varepsilon_d" in fig.axes[1].get_ylabel()
    assert r"$\varepsilon_w$ = 1" in figures["eps_d_curves"].get_suptitle()
    assert any(r"$\varepsilon_w$=1" in t for t in legend_entries(figures["sweep eps_d_curves"].axes[0]))
    assert r"\varepsilon_d" in figures["gc_history"].axes[0].get_ylabel()


def test_the_budget_tau_is_labelled_tau(tau_run, tmp_path):
    metrics = io.read_json(tau_run / "metrics.json")
    tau = metrics["tau"]
    assert [r["eps_d"] for r in metrics["results"]] == [0.03, tau] and 0 < tau < 1
    figures = plots.run_figures(tau_run)
    for ax in drawn(figures["eps_d_curves"]).axes:
        assert tick_texts(ax) == ["0.03", TAU]
    floors = [r["residual_floor"] for r in metrics["results"] if r.get("residual_floor")]
    assert floors  # this target is out of reach at 0.03: a positive floor to draw
    assert list(legend_entries(figures["gc_history"].axes[0])) == [rf"{EPS_D} = 0.03", rf"$\varepsilon_d = \tau$ = {tau:.3g}",
                                                                   "certified floor"]
    # each positive floor a dashed level under its own curve (GC never goes below it)
    dashed = [line for line in figures["gc_history"].axes[0].get_lines() if line.get_linestyle() == "--" and len(line.get_ydata())]
    assert sorted(float(line.get_ydata()[0]) for line in dashed) == pytest.approx(sorted(floors))
    assert figures["poisons"].get_suptitle().endswith(rf"$\varepsilon_d = \tau$ = {tau:.3g}")

    # the same number asked for as a number is no τ
    numeric = tmp_path / "numeric"
    shutil.copytree(tau_run, numeric)
    io.write_yaml(numeric / "config.yaml", {**io.read_yaml(tau_run / "config.yaml"), "eps_d": [0.03, tau]})
    assert tick_texts(drawn(plots.run_figures(numeric)["eps_d_curves"]).axes[0]) == ["0.03", f"{tau:g}"]


def test_a_sweeps_budget_tau_is_one_panel_and_a_tick_per_cell(grid_sweep):
    figures = plots.sweep_figures(grid_sweep)
    assert tick_texts(drawn(figures["eps_d_curves"]).axes[0]).count(TAU) == len(TAUS)
    titles = [ax.get_title() for ax in figures["tau_map"].axes if ax.get_title()]
    assert titles == [TAU, *(f"accuracy drop, {EPS_D} = {e:g}" for e in CLOSE), r"accuracy drop, $\varepsilon_d = \tau$"]
    panel = [ax for ax in figures["tau_map"].axes if ax.get_title()][-1]
    assert [t.get_text() for t in panel.texts] == ["50"] * len(TAUS)  # every cell's drop at its own τ


def test_the_targets_own_drop_and_tau_are_legend_entries(tau_run, grid_sweep):
    tau = io.read_json(tau_run / "metrics.json")["tau"]
    left, right = plots.run_figures(tau_run)["eps_d_curves"].axes
    assert left.get_ylabel() == "accuracy drop (points)"
    assert legend_entries(left) == {"the target's own drop": ":", rf"$\tau$ = {tau:.3g}": "--"}
    assert legend_entries(right) == {rf"$\tau$ = {tau:.3g}": "--"}
    left, right = plots.sweep_figures(grid_sweep)["eps_d_curves"].axes
    entries = legend_entries(left)
    assert len(entries) == len(TAUS) + 2 and entries["the target's own drop"] == ":" and entries[TAU] == "--"
    assert "dotted" not in left.get_ylabel() and "dashed" not in left.get_xlabel()


def test_colour_bars_say_what_the_colour_is(grid_sweep):
    fig = plots.sweep_figures(grid_sweep)["tau_map"]
    bars = [ax.get_ylabel() for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert bars == [r"threshold $\tau$", *["accuracy drop (points)"] * (len(CLOSE) + 1)]


def test_budget_tick_labels_do_not_overlap(tau_run, grid_sweep):
    for fig in (plots.sweep_figures(grid_sweep)["eps_d_curves"], plots.run_figures(tau_run)["eps_d_curves"]):
        renderer = drawn(fig).canvas.get_renderer()
        for ax in fig.axes:
            labels = [t for t in ax.get_xticklabels() if t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i, box in enumerate(boxes):
                for j in range(i):
                    assert not box.overlaps(boxes[j]), (labels[j].get_text(), labels[i].get_text())
    sweep = plots.sweep_figures(grid_sweep)["eps_d_curves"]
    ax = drawn(sweep).axes[0]
    assert len(ax.get_xticks()) == len(CLOSE) + len(TAUS)  # every budget keeps its tick mark
    assert tick_texts(ax).count(TAU) == len(TAUS) and {"0.01", "0.1", "1", "2"} <= set(tick_texts(ax))


def test_poison_labels_are_shown_under_the_poisons(tau_run, tmp_path):
    tau = io.read_json(tau_run / "metrics.json")["tau"]
    result = PoisonResult.load(tau_run / f"eps_d={tau:g}")
    fig = plots.run_figures(tau_run)["poisons"]
    rows = [fig.axes[i * 8:(i + 1) * 8] for i in range(3)]
    assert [ax.get_xlabel() for ax in rows[1]] == [f"label {int(y)}" for y in result.y[:8]]
    assert not any(ax.get_xlabel() for ax in rows[0] + rows[2])

    # soft labels: the likeliest class and its probability
    soft = tmp_path / "soft"
    shutil.copytree(tau_run, soft)
    likeliest = (result.y + 1) % 10
    result.y = torch.full((len(likeliest), 10), 0.02).scatter(1, likeliest.view(-1, 1), 0.82)
    result.save(soft / f"eps_d={tau:g}")
    fig = plots.run_figures(soft)["poisons"]
    assert [ax.get_xlabel() for ax in fig.axes[8:16]] == [f"label {int(k)} (0.82)" for k in likeliest[:8]]
