"""The sweep engine (poisonreach.experiments.sweep_file and .sweep).

- sweep files: every unknown key is named with its place (top level, run, grid, profile, defenses,
  override); grid axes must be lists; layers resolve as defaults < file < profile < overrides, with
  dicts merged and lists replaced; grid expansion order and cell ids are deterministic and safe;
  every cell is validated at load;
- the engine with a fake runner: finished cells are skipped, a failing cell is reported and the
  others run, a folder of another sweep is refused, results.csv, paper numbers, defense rows, the
  fixed-width table;
- the engine with the real ``run`` on digits/LR: a sweep killed between cells, and one killed in the
  middle of a cell, resume to the table of an uninterrupted sweep; ``jobs=2`` gives that table too;
- every shipped sweep loads with each of its profiles.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

from poisonreach import io
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.report import write_report
from poisonreach.experiments.run import run
from poisonreach.experiments.sweep import (
    COLUMNS, SweepFailed, add_arguments, command, describe, format_results, load_sweep, run_sweep)
from poisonreach.experiments.sweep_file import cell_id, shipped_sweeps, sweep_path

# tiny but real: τ > 0 for both targets, so eps_d "tau" runs (about 1.5 s a cell at one thread)
SMALL = {
    "name": "small",
    "run": {"dataset": "digits", "model": "lr", "train_size": 200, "eps_d": [0.1, "tau"],
            "attack": "gc-pgd", "attack_options": {"epochs": 3}, "training": {"epochs": 5, "batch_size": 32}},
    "grid": {"eps_w": [2.0, 3.0]},
}


def write(tmp_path: Path, doc: dict, name: str = "sweep.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def without_time(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "wall_time_s"} for row in rows]


class FakeRunner:
    """Writes a run folder's config.yaml and metrics.json with numbers derived from the config."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, config: RunConfig, out, tracking=None):
        out = Path(out)
        self.calls.append(out.name)
        if out.name in self.fail:
            raise RuntimeError(f"boom in {out.name}")
        io.write_yaml(out / "config.yaml", config.to_dict())
        tau = 2.0 * config.eps_w
        results = []
        for e in config.budgets(tau):
            poisoned = 90.0 - 10 * config.eps_w * e
            results.append({"eps_d": e, "poisoned_acc": poisoned, "acc_drop": 90.0 - poisoned, "grad_norm_ratio": 1 / (1 + e),
                            "param_distance": 2 / (1 + e)})
        metrics = {"dataset": config.dataset, "model": config.model, "clean_acc": 90.0, "target_acc": 90.0 - 20 * config.eps_w,
                   "tau": tau, "results": results, "wall_time_s": 1.5}
        io.write_json(out / "metrics.json", metrics)
        return metrics


def fake_defender(calls):
    def defend(run_dir, name, options):
        calls.append((Path(run_dir).name, name, options))
        metrics = io.read_json(Path(run_dir) / "metrics.json")
        results = [{"eps_d": r["eps_d"], "poisoned_acc": r["poisoned_acc"], "defended_acc": r["poisoned_acc"] + 5,
                    "acc_drop_defended": r["acc_drop"] - 5, "recovered": 5.0, "defense_time_s": 0.5} for r in metrics["results"]]
        return {"config": {"defense": name, **options}, "results": results}
    return defend


# --------------------------------------------------------------------------------------------------
# sweep files
# --------------------------------------------------------------------------------------------------

UNKNOWN = [
    ({"grdi": {"model": ["lr"]}}, (), ["'grdi'", "top level", "'grid'"]),
    ({"run": {"modle": "lr"}}, (), ["'modle'", "section run", "'model'"]),
    ({"run": {"training": {"epochs": 1}, "traning": {}}}, (), ["'traning'", "section run"]),
    ({"grid": {"modle": ["lr"]}}, (), ["'modle'", "section grid", "'model'"]),
    ({"grid": {"atack_options.epochs": [3]}}, (), ["'atack_options'", "section grid"]),
    ({"profiles": {"cpu": {"rnu": {"model": "lr"}}}}, (), ["'rnu'", "profiles.cpu", "'run'"]),
    ({"profiles": {"cpu": {"run": {"modle": "lr"}}}}, (), ["'modle'", "profiles.cpu.run"]),
    ({"profiles": {"cpu": {"grid": {"modle": ["lr"]}}}}, (), ["'modle'", "profiles.cpu.grid"]),
    ({"defenses": [{"name": "maxup", "opts": {}}]}, (), ["'opts'", "defenses[0]", "'options'"]),
    ({}, ("modle=lr",), ["'modle'", "command line", "'run'"]),
    ({}, ("run.modle=lr",), ["'modle'", "run.modle=lr", "'model'"]),
    ({}, ("grid.modle=[lr]",), ["'modle'", "grid.modle", "'model'"]),
    ({}, ("profiles.cpu.run.model=lr",), ["'profiles'", "command line"]),
    ({"resources": {"num_cpu": 2}}, (), ["'num_cpu'", "section resources", "'num_cpus'"]),
    ({"profiles": {"gpu": {"resources": {"gpus": 1}}}}, (), ["'gpus'", "profiles.gpu.resources", "'num_gpus'"]),
    ({}, ("resources.cpus=2",), ["'cpus'", "command line", "'num_cpus'"]),
]


@pytest.mark.parametrize("doc, overrides, fragments", UNKNOWN)
def test_unknown_key_is_named_with_its_place(tmp_path, doc, overrides, fragments):
    path = write(tmp_path, {"name": "x", **doc}, "mine.yaml")
    with pytest.raises(PoisonReachError) as info:
        load_sweep(path, overrides, lookup=None)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    if not overrides:
        assert "mine.yaml" in message


@pytest.mark.parametrize("doc, overrides, fragment", [
    ({"grid": {"model": "lr"}}, (), "must be a non-empty list"),
    ({"grid": {"model": []}}, (), "must be a non-empty list"),
    ({}, ("grid.model=lr",), "must be a non-empty list"),
    ({"grid": {"model.depth": [1]}}, (), "not a mapping"),
    ({"grid": {"training": [5]}}, (), "must be a mapping"),
    ({"run": {"training": 5}}, (), "must be a mapping"),
    ({}, ("run.training=5",), "must be a mapping"),
    ({"defenses": {"name": "maxup"}}, (), "must be a list"),
    ({"defenses": [{"options": {}}]}, (), "needs a name"),
    ({"name": "a/b"}, (), "names a folder"),
    ({"paper": {"dataset": "mnist"}}, (), "needs a table"),
    ({}, ("run.model",), "KEY=VALUE"),
    ({}, ("=3",), "KEY=VALUE"),
    ({}, ("run.eps_d=[0.1",), "as YAML"),
    ({}, ("run=3",), "set one key"),
    ({}, ("name.x=3",), "no sub-keys"),
    ({"resources": 2}, (), "section resources must be a mapping"),
    ({"resources": {"num_cpus": 0}}, (), "section resources must be > 0, got 0"),
    ({"resources": {"num_gpus": -1}}, (), "section resources must be >= 0, got -1"),
    ({"resources": {"num_gpus": "one"}}, (), "num_gpus in "),
    ({}, ("resources.num_gpus=[1]",), "must be a number, got [1]"),
])
def test_malformed_sections_fail_clearly(tmp_path, doc, overrides, fragment):
    path = write(tmp_path, {"name": "x", **doc})
    with pytest.raises(PoisonReachError, match=re.escape(fragment)):
        load_sweep(path, overrides, lookup=None)


def test_unknown_profile_lists_the_profiles(tmp_path):
    path = write(tmp_path, {"profiles": {"cpu": {"run": {"seed": 1}}, "gpu": {}}})
    with pytest.raises(PoisonReachError, match=r"no profile 'fast'.*\['cpu', 'gpu'\]"):
        load_sweep(path, profile="fast", lookup=None)


def test_layers_defaults_file_profile_overrides(tmp_path):
    doc = {
        "name": "layers",
        "run": {"train_size": 100, "eps_d": [0.1, 1], "attack": "gc-pgd", "attack_options": {"lr": 0.5, "epochs": 9},
                "training": {"epochs": 1, "batch_size": 64}},
        "grid": {"model": ["lr", "nn"], "eps_w": [0.5]},
        "profiles": {"cpu": {"run": {"train_size": 50, "eps_d": [0.3], "attack_options": {"epochs": 2}, "training": {"epochs": 2}},
                             "grid": {"eps_w": [1.0, 2.0]}}},
    }
    path = write(tmp_path, doc)
    defaults = RunConfig()

    plain = load_sweep(path, lookup=None)
    first = plain.cells[0][1]
    assert (first.train_size, first.eps_d, first.eps_w) == (100, [0.1, 1], 0.5)
    assert first.seed == defaults.seed and first.target == defaults.target  # untouched defaults stay

    sweep = load_sweep(path, ["run.attack_options.epochs=7", "run.seed=3", "grid.model=[lr]"], profile="cpu", lookup=None)
    assert [cid for cid, _ in sweep.cells] == ["model=lr,eps_w=1", "model=lr,eps_w=2"]  # grid axes merge; lists replace
    config = sweep.cells[0][1]
    assert config.train_size == 50  # profile over file
    assert config.eps_d == [0.3]  # lists replace
    assert config.attack_options == {"lr": 0.5, "epochs": 7}  # dicts merge; the override wins over the profile
    assert config.training == {"epochs": 2, "batch_size": 64}
    assert config.seed == 3 and config.dataset == defaults.dataset
    assert sweep.resolved["run"]["seed"] == 3 and sweep.profile == "cpu"


def test_resources_layer_and_a_folder_accepts_other_resources(tmp_path):
    """Defaults, the file, the profile, the overrides, as every section; resources decide where a
    cell runs, not its result, so a sweep folder resumes under other ones."""
    doc = {**SMALL, "resources": {"num_cpus": 2}, "profiles": {"gpu": {"resources": {"num_gpus": 1}}}}
    path = write(tmp_path, doc)
    assert load_sweep(write(tmp_path, SMALL, "plain.yaml"), lookup=None).resources == {"num_cpus": 1, "num_gpus": 0}
    assert load_sweep(path, lookup=None).resources == {"num_cpus": 2, "num_gpus": 0}
    assert load_sweep(path, ["resources.num_cpus=0.5"], profile="gpu", lookup=None).resources == {"num_cpus": 0.5, "num_gpus": 1}
    runner = FakeRunner()
    run_sweep(load_sweep(path, lookup=None), tmp_path / "out", runner=runner)
    run_sweep(load_sweep(path, ["resources.num_cpus=4"], lookup=None), tmp_path / "out", runner=runner)  # not refused
    assert runner.calls == ["eps_w=2", "eps_w=3"]  # ... and its finished cells are kept


def test_override_hidden_by_a_grid_axis_is_refused(tmp_path):
    path = write(tmp_path, {"run": {"attack": "gc-pgd"}, "grid": {"model": ["lr"], "attack_options.epochs": [3]}})
    with pytest.raises(PoisonReachError, match=r"hidden by the grid axis 'model'.*grid\.model"):
        load_sweep(path, ["run.model=nn"], lookup=None)
    with pytest.raises(PoisonReachError, match="hidden by the grid axis 'attack_options.epochs'"):
        load_sweep(path, ["run.attack_options.epochs=5"], lookup=None)
    load_sweep(path, ["run.attack_options.lr=0.5"], lookup=None)  # a sibling of the axis is not hidden


def test_override_values_are_yaml(tmp_path):
    path = write(tmp_path, {"name": "y"})
    sweep = load_sweep(path, ["run.eps_d=[0.1, tau]", "run.train_size=null", "name=renamed", "description=a b"], lookup=None)
    config = sweep.cells[0][1]
    assert config.eps_d == [0.1, "tau"] and config.train_size is None
    assert (sweep.name, sweep.description) == ("renamed", "a b")


def test_grid_expansion_is_cartesian_first_axis_slowest(tmp_path):
    doc = {"run": {"attack": "gc-pgd", "attack_options": {"lr": 0.5}}, "grid": {"eps_w": [0.5, 1], "attack_options.epochs": [3, 5], "seed": [0]}}
    path = write(tmp_path, doc)
    sweep = load_sweep(path, lookup=None)
    expected = [(w, e) for w in (0.5, 1) for e in (3, 5)]
    assert [cid for cid, _ in sweep.cells] == [f"eps_w={w:g},attack_options.epochs={e},seed=0" for w, e in expected]
    for (cid, config), (w, e) in zip(sweep.cells, expected):
        assert config.eps_w == w and config.attack_options == {"lr": 0.5, "epochs": e}
        assert sweep.grid_values[cid] == {"eps_w": w, "attack_options.epochs": e, "seed": 0}
    again = load_sweep(path, lookup=None)
    assert [(cid, c.to_dict()) for cid, c in again.cells] == [(cid, c.to_dict()) for cid, c in sweep.cells]
    assert [cid for cid, _ in load_sweep(write(tmp_path, {}, "nogrid.yaml"), lookup=None).cells] == ["default"]


def test_cell_ids_are_safe_unique_and_deterministic(tmp_path):
    assert cell_id({"model": "lr", "attack": "gc"}) == "model=lr,attack=gc"
    assert cell_id({"eps_d": [0.1, "tau"]}) == cell_id({"eps_d": [0.1, "tau"]})
    unsafe = [cell_id({"data_root": "a/b"}), cell_id({"data_root": "a_b"}), cell_id({"data_root": "a b"})]
    assert len(set(unsafe)) == 3  # sanitised names keep a hash of the original text
    long = [cell_id({"target_options": {"weight": [[float(i)] * 40]}}) for i in range(2)]
    assert long[0] != long[1]
    for cid in unsafe + long + [cell_id({"eps_d": [0.1, "tau"]})]:
        assert len(cid) <= 100 and re.fullmatch(r"[A-Za-z0-9._=,+-]+", cid), cid
        (tmp_path / cid).mkdir()


def test_repeated_grid_values_fail(tmp_path):
    with pytest.raises(PoisonReachError, match="twice"):
        load_sweep(write(tmp_path, {"grid": {"model": ["lr", "lr"]}}), lookup=None)


@pytest.mark.parametrize("grid, fragments", [
    ({"model": ["lr", "nope"]}, ["cell model=nope", "model must be one of"]),
    ({"attack_options.iterations": [3, -1]}, ["cell attack_options.iterations=-1", "iterations"]),
    ({"attack_options.epoch": [3]}, ["cell attack_options.epoch=3", "'epoch'"]),
    ({"eps_w": ["big"]}, ["cell eps_w=big"]),
])
def test_every_cell_is_validated_at_load(tmp_path, grid, fragments):
    runner = FakeRunner()
    with pytest.raises(PoisonReachError) as info:
        run_sweep(load_sweep(write(tmp_path, {"grid": grid}), lookup=None), tmp_path / "out", runner=runner)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    assert runner.calls == [] and not (tmp_path / "out").exists()


def test_defenses_are_validated_at_load(tmp_path):
    path = write(tmp_path, {"defenses": [{"name": "nope"}]})
    with pytest.raises(PoisonReachError, match="cell default.*defense must be one of"):
        load_sweep(path, lookup=None)


# --------------------------------------------------------------------------------------------------
# the engine with a fake runner
# --------------------------------------------------------------------------------------------------

FAKE = {"name": "fake", "run": {"eps_d": [0.1, "tau"]}, "grid": {"eps_w": [0.5, 1.0], "seed": [0, 1]}}


def test_finished_cells_are_skipped(tmp_path, caplog):
    sweep = load_sweep(write(tmp_path, FAKE), lookup=None)
    runner = FakeRunner()
    rows = run_sweep(sweep, tmp_path / "out", runner=runner)
    assert runner.calls == [cid for cid, _ in sweep.cells]
    for cid, _ in sweep.cells:
        assert (tmp_path / "out" / "cells" / cid / "metrics.json").is_file()

    again = FakeRunner()
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        assert run_sweep(sweep, tmp_path / "out", runner=again) == rows
    assert again.calls == [] and sum("skipped" in line for line in caplog.messages) == len(sweep.cells)

    # a finished folder of another configuration is not this cell's: it goes to the runner
    cid, config = sweep.cells[0]
    io.write_yaml(tmp_path / "out" / "cells" / cid / "config.yaml", {**config.to_dict(), "train_size": 7})
    run_sweep(sweep, tmp_path / "out", runner=again)
    assert again.calls == [cid]


def test_failing_cell_is_reported_and_the_others_run(tmp_path, caplog):
    sweep = load_sweep(write(tmp_path, FAKE), lookup=None)
    bad = sweep.cells[1][0]
    with pytest.raises(SweepFailed) as info:
        run_sweep(sweep, tmp_path / "out", runner=FakeRunner(fail={bad}))
    assert bad in str(info.value) and f"boom in {bad}" in str(info.value)
    assert list(info.value.failures) == [bad]
    assert any(r.levelname == "ERROR" and r.getMessage().startswith(f"[{bad}] failed: RuntimeError: boom") for r in caplog.records)
    assert "boom" in (tmp_path / "out" / "errors" / f"{bad}.txt").read_text()
    finished = [cid for cid, _ in sweep.cells if cid != bad]
    assert [r["cell"] for r in info.value.rows] == [cid for cid in finished for _ in range(2)]
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert [r["cell"] for r in csv.DictReader(f)] == [r["cell"] for r in info.value.rows]

    retry = FakeRunner()
    rows = run_sweep(sweep, tmp_path / "out", runner=retry)
    assert retry.calls == [bad] and not (tmp_path / "out" / "errors" / f"{bad}.txt").exists()
    assert without_time(rows) == without_time(run_sweep(sweep, tmp_path / "clean", runner=FakeRunner()))


def test_a_folder_of_another_sweep_is_refused(tmp_path):
    path = write(tmp_path, FAKE)
    run_sweep(load_sweep(path, lookup=None), tmp_path / "out", runner=FakeRunner())
    with pytest.raises(PoisonReachError, match=r"other settings \(run differ\).*another --out"):
        run_sweep(load_sweep(path, ["run.train_size=50"], lookup=None), tmp_path / "out", runner=FakeRunner())
    with pytest.raises(PoisonReachError, match=r"other settings \(grid differ\)"):
        run_sweep(load_sweep(path, ["grid.seed=[0]"], lookup=None), tmp_path / "out", runner=FakeRunner())
    renamed = load_sweep(path, ["description=same settings"], lookup=None)  # text only: the same sweep
    run_sweep(renamed, tmp_path / "out", runner=FakeRunner())
    assert io.read_yaml(tmp_path / "out" / "sweep.yaml")["description"] == "same settings"


def test_rows_and_results_csv(tmp_path):
    doc = {"name": "rows", "run": {"eps_d": [0.1, "tau"], "attack": "gc-pgd"}, "grid": {"eps_w": [0.5, 1.0], "attack_options.epochs": [3]}}
    sweep = load_sweep(write(tmp_path, doc), lookup=None)
    rows = run_sweep(sweep, tmp_path / "out", runner=FakeRunner())
    assert list(rows[0]) == ["cell", "attack_options.epochs", *COLUMNS]
    labels, numbers = [], []
    for w in (0.5, 1.0):
        tau = 2.0 * w
        for label, e in ((0.1, 0.1), ("tau", tau)):
            labels.append((f"eps_w={w:g},attack_options.epochs=3", 3, w, label))
            numbers.append([90 - 20 * w, tau, 90 - 10 * w * e, 10 * w * e, 1 / (1 + e)])
    assert [(r["cell"], r["attack_options.epochs"], r["eps_w"], r["eps_d"]) for r in rows] == labels
    for r, expected in zip(rows, numbers):
        assert [r["target_acc"], r["tau"], r["poisoned_acc"], r["acc_drop"], r["grad_norm_ratio"]] == pytest.approx(expected)
    assert all(r["defense"] is None and r["paper_acc_drop"] is None and r["dataset"] == "digits" for r in rows)
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        read = list(csv.DictReader(f))
    assert read == [{k: "" if v is None else str(v) for k, v in r.items()} for r in rows]


def test_target_only_run_is_one_row_about_the_target(tmp_path):
    sweep = load_sweep(write(tmp_path, {"run": {"eps_d": [], "eps_w": 0.5}}), lookup=None)
    (row,) = run_sweep(sweep, tmp_path / "out", runner=FakeRunner())
    assert (row["attack"], row["eps_d"], row["poisoned_acc"]) == ("gradpc", None, None)
    assert row["acc_drop"] == pytest.approx(10.0)  # clean 90 − target (90 − 20·0.5)


class FakePaper:
    """Records the keys of every lookup; answers from ``values`` keyed by (attack, eps_d, defense)."""

    def __init__(self, values):
        self.values, self.calls = values, []

    def __call__(self, table, **keys):
        self.calls.append((table, keys))
        return self.values.get((keys.get("attack"), keys.get("eps_d"), keys.get("defense")))


def test_paper_numbers_are_looked_up_per_row(tmp_path):
    doc = {"paper": {"table": 3, "threat": "add"},
           "run": {"dataset": "mnist", "eps_d": [0.03, "tau"], "target_scale": 0.5},
           "grid": {"attack_options.box": ["data-range", [0, 1]]},
           "defenses": [{"name": "maxup", "options": {}}]}
    paper = FakePaper({("gc-c", 0.03, None): 11.28, ("gc-c", 0.03, "maxup"): 9.66, ("gc", "tau", None): 69.66})
    sweep = load_sweep(write(tmp_path, doc), lookup=paper)
    base = {"dataset": "mnist", "model": "lr", "metric": "acc_drop", "target": "gradpc/2", "threat": "add"}
    assert paper.calls[:4] == [
        (3, {**base, "attack": "gc-c", "eps_d": 0.03, "defense": None}),
        (3, {**base, "attack": "gc-c", "eps_d": "tau", "defense": None}),
        (3, {**base, "attack": "gc-c", "eps_d": 0.03, "defense": "maxup"}),
        (3, {**base, "attack": "gc-c", "eps_d": "tau", "defense": "maxup"}),
    ]
    assert len(paper.calls) == 8
    cells = [cid for cid, _ in sweep.cells]
    assert sweep.paper_values[(cells[0], 0.03, None)] == 11.28
    assert sweep.paper_values[(cells[0], 0.03, "maxup")] == 9.66
    assert sweep.paper_values[(cells[1], "tau", None)] == 69.66
    assert sweep.paper_values[(cells[1], 0.03, None)] is None

    defended = []
    rows = run_sweep(sweep, tmp_path / "out", runner=FakeRunner(), defender=fake_defender(defended))
    assert [r["paper_acc_drop"] for r in rows] == [11.28, None, 9.66, None, None, 69.66, None, None]
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        assert [r["paper_acc_drop"] for r in csv.DictReader(f)] == ["11.28", "", "9.66", "", "", "69.66", "", ""]


def test_paper_keys_of_dpa_and_target_only_rows(tmp_path):
    paper = FakePaper({})
    doc = {"paper": {"table": 4, "k": 1200}, "run": {"eps_d": [0.008]}, "defenses": [{"name": "maxup"}]}
    sweep = load_sweep(write(tmp_path, doc), lookup=paper)
    sweep.defenses.append({"name": "dpa", "options": {"num_partitions": 3000}, "id": "dpa,num_partitions=3000"})
    from poisonreach.experiments.sweep_file import paper_keys, row_specs

    config = sweep.cells[0][1]
    keys = [paper_keys(config, sweep.paper, e, d) for e, _, d in row_specs(config, sweep.defenses)]
    assert [(k["defense"], k["k"]) for k in keys] == [(None, 1200), ("maxup", 1200), ("dpa", 3000)]
    target_only = load_sweep(write(tmp_path, {"paper": {"table": 1}, "run": {"eps_d": [], "eps_w": 0.5}}, "t.yaml"), lookup=paper)
    assert paper.calls[-1] == (1, {"dataset": "digits", "model": "lr", "metric": "acc_drop", "attack": "gradpc", "eps_w": 0.5, "defense": None})
    assert list(target_only.paper_values) == [("default", None, None)]


def test_paper_lookup_errors_name_the_section(tmp_path):
    def ambiguous(table, **keys):
        raise PoisonReachError("matches 2 records")

    with pytest.raises(PoisonReachError, match=r"section paper, cell default: matches 2 records"):
        load_sweep(write(tmp_path, {"paper": {"table": 2}}), lookup=ambiguous)
    sweep = load_sweep(write(tmp_path, {"paper": {"table": 2}}), lookup=None)  # no paper module: no numbers
    assert sweep.paper_values == {}


def test_the_papers_table_2_numbers():
    pytest.importorskip("poisonreach.experiments.paper")
    sweep = load_sweep("table2-mnist")
    # Table 2, MNIST, LR, Gradient Canceling columns
    lr = "model=lr,eps_w=1"
    got = {k: v for k, v in sweep.paper_values.items() if k[0] == lr}
    assert got == {(lr, 0.03, None): 22.97, (lr, 0.1, None): 63.83, (lr, 1, None): 67.01, (lr, "tau", None): 69.66}


def test_results_csv_puts_the_papers_drop_beside_ours_with_one_sign(tmp_path):
    """acc_drop and paper_acc_drop are both clean − attacked: where both did damage (the fake
    runner's drops, every drop of Table 2) both are positive, in the CSV and in the printed table."""
    sweep = load_sweep("table2-mnist", ["grid.model+eps_w=[[lr, 1.0]]"])
    run_sweep(sweep, tmp_path / "out", runner=FakeRunner())
    with open(tmp_path / "out" / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["eps_d"], r["paper_acc_drop"]) for r in rows] == [("0.03", "22.97"), ("0.1", "63.83"), ("1", "67.01"), ("tau", "69.66")]
    assert all(float(r["acc_drop"]) > 0 for r in rows)
    table = format_results(rows).splitlines()
    header = table[0].split()
    drop, paper = header.index("drop"), header.index("paper")
    assert [(line.split()[drop], line.split()[paper]) for line in table[2:]] == [
        (f"{float(r['acc_drop']):.2f}", f"{float(r['paper_acc_drop']):.2f}") for r in rows]
    gap = sum(abs(float(r["acc_drop"]) - float(r["paper_acc_drop"])) for r in rows) / len(rows)
    (tmp_path / "out" / "figure.png").write_bytes(b"")  # drawn already: the fake cells have nothing to plot
    report = write_report(tmp_path / "out").read_text()
    assert f"Mean absolute difference from the paper over 4 cells: {gap:.2f} percentage points." in report


def test_defense_rows(tmp_path):
    doc = {**FAKE, "grid": {"eps_w": [0.5]}, "defenses": [{"name": "maxup", "options": {"m": 2}}]}
    calls = []
    rows = run_sweep(load_sweep(write(tmp_path, doc), lookup=None), tmp_path / "out", runner=FakeRunner(),
                     defender=fake_defender(calls))
    assert calls == [("eps_w=0.5", "maxup", {"m": 2})]
    plain, defended = rows[:2], rows[2:]
    assert [r["defense"] for r in rows] == [None, None, "maxup,m=2", "maxup,m=2"]
    for p, d in zip(plain, defended):
        assert d["eps_d"] == p["eps_d"] and d["poisoned_acc"] == p["poisoned_acc"]
        assert d["defended_acc"] == pytest.approx(p["poisoned_acc"] + 5)
        assert d["acc_drop"] == pytest.approx(p["acc_drop"] - 5)  # the drop after the defense
        assert d["recovered"] == 5.0 and d["wall_time_s"] == 0.5


def test_format_results_is_a_fixed_width_table():
    rows = [
        {"cell": "model=lr", "eps_d": 0.1, "clean_acc": 92.35, "target_acc": 21.48, "tau": 1.15, "poisoned_acc": 69.38,
         "acc_drop": 22.97, "grad_norm_ratio": 0.5, "param_distance": 4.25, "wall_time_s": 12.4, "paper_acc_drop": 22.97},
        {"cell": "model=nn,attack=gc", "eps_d": "tau", "clean_acc": 98.04, "target_acc": 78.0, "tau": "inf", "poisoned_acc": 78.99,
         "acc_drop": 19.05, "grad_norm_ratio": 0.01, "param_distance": 0.5, "wall_time_s": 3, "paper_acc_drop": None},
    ]
    lines = format_results(rows).splitlines()
    assert len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["cell", "eps_d", "clean", "target", "tau", "poisoned", "drop", "paper", "‖g‖", "ratio",
                                "‖w", "−", "w_t‖", "time", "(s)"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["model=lr", "0.1", "92.35", "21.48", "1.15", "69.38", "22.97", "22.97", "0.5", "4.25", "12"]
    assert lines[3].split() == ["model=nn,attack=gc", "tau", "98.04", "78.00", "inf", "78.99", "19.05", "-", "0.01", "0.5", "3"]
    assert "defense" not in lines[0]


def test_dry_run_lists_cells_and_their_state(tmp_path, capsys):
    path = write(tmp_path, FAKE)
    out = tmp_path / "out"
    sweep = load_sweep(path, lookup=None)
    run_sweep(sweep, out, runner=FakeRunner())
    first = sweep.cells[0][0]
    (out / "cells" / first / "metrics.json").unlink()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert command(parser.parse_args([str(path), "grid.seed=[0, 1, 2]", "--out", str(out), "--dry-run"])) == 0
    lines = capsys.readouterr().out.splitlines()
    status = {line.split()[1]: line.split()[0] for line in lines if line.startswith("  ")}
    assert status[first] == "partial" and status["eps_w=1,seed=1"] == "done" and status["eps_w=0.5,seed=2"] == "new"
    assert describe(sweep, out).count("\n  ") == len(sweep.cells)


# --------------------------------------------------------------------------------------------------
# the engine with the real run
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """SMALL run without interruption, in this process."""
    folder = tmp_path_factory.mktemp("reference")
    sweep = load_sweep(write(folder, SMALL), lookup=None)
    return run_sweep(sweep, folder / "out")


def test_reference_sweep_ran_every_cell(reference):
    assert [(r["cell"], r["eps_d"]) for r in reference] == [("eps_w=2", 0.1), ("eps_w=2", "tau"), ("eps_w=3", 0.1), ("eps_w=3", "tau")]
    for r in reference:
        assert r["acc_drop"] == pytest.approx(r["clean_acc"] - r["poisoned_acc"])
        assert r["tau"] > 0


def test_killed_sweep_resumes_to_the_same_table(tmp_path, reference):
    sweep = load_sweep(write(tmp_path, SMALL), lookup=None)
    out = tmp_path / "out"
    (first, _), (second, _) = sweep.cells
    started = []

    def killed_after_first_cell(config, folder, tracking=None):
        if started:
            raise KeyboardInterrupt  # the process dies here: nothing of the second cell is written
        started.append(Path(folder).name)
        return run(config, folder)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, out, runner=killed_after_first_cell)
    assert (out / "cells" / first / "metrics.json").is_file() and not (out / "cells" / second).exists()

    resumed = []

    def counting(config, folder, tracking=None):
        resumed.append(Path(folder).name)
        return run(config, folder)

    rows = run_sweep(sweep, out, runner=counting)
    assert resumed == [second]
    assert without_time(rows) == without_time(reference)
    with open(out / "results.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == len(reference)


def test_half_written_cell_is_redone_to_the_same_result(tmp_path, reference, caplog):
    sweep = load_sweep(write(tmp_path, SMALL), ["grid.eps_w=[3.0]"], lookup=None)
    out = tmp_path / "out"
    (cid, _), = sweep.cells

    class DieAfterTheTarget(logging.Handler):
        def emit(self, record):
            if "clean accuracy" in record.getMessage():
                raise KeyboardInterrupt  # killed after the clean model, the target and τ were saved

    logger, handler = logging.getLogger("poisonreach.experiments.run"), DieAfterTheTarget()
    logger.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt), caplog.at_level(logging.INFO, logger="poisonreach"):
            run_sweep(sweep, out)
    finally:
        logger.removeHandler(handler)
    cell = out / "cells" / cid
    assert (cell / "config.yaml").is_file() and (cell / "target_model.pt").is_file()
    assert not (cell / "metrics.json").exists()
    assert "partial" in describe(sweep, out)

    rows = run_sweep(sweep, out)
    assert without_time(rows) == without_time([r for r in reference if r["cell"] == cid])


def pinned_run(config, out, tracking=None):
    """run, after logging the worker's CPU set and torch threads (importable by spawned workers)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    logging.getLogger("poisonreach.test_sweep").info(f"pinned cores={cores} threads={torch.get_num_threads()} pid={os.getpid()}")
    return run(config, out)


@pytest.mark.slow
def test_two_jobs_give_the_same_table(tmp_path, reference, caplog):
    """... and every log line of a worker reaches this process's handlers, each line starting with its cell id."""
    sweep = load_sweep(write(tmp_path, SMALL), lookup=None)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        rows = run_sweep(sweep, tmp_path / "out", jobs=2, runner=pinned_run)
    logs = caplog.messages
    # the workers may use another thread count than this process (cores // 2): float sums may
    # differ in the last bits, nothing more
    assert [{k: v for k, v in r.items() if not isinstance(v, float)} for r in without_time(rows)] == \
           [{k: v for k, v in r.items() if not isinstance(v, float)} for r in without_time(reference)]
    for r, ref in zip(rows, reference):
        assert {k: v for k, v in r.items() if isinstance(v, float) and k != "wall_time_s"} == pytest.approx(
            {k: v for k, v in ref.items() if isinstance(v, float) and k != "wall_time_s"}, rel=1e-6, abs=1e-9)

    worker_lines = [line for line in logs if not line.startswith("sweep ")]
    assert worker_lines and all(re.match(r"\[eps_w=[23]\] ", line) for line in worker_lines)
    pins = {m.group(1): ([int(c) for c in re.findall(r"\d+", m.group(2))], int(m.group(3))) for line in logs
            if (m := re.match(r"\[(eps_w=\d)\] pinned cores=(\[.*\]) threads=(\d+)", line))}
    assert set(pins) == {"eps_w=2", "eps_w=3"}
    assert os.getpid() not in {r.process for r in caplog.records if "pinned cores" in r.getMessage()}  # made in the workers
    if hasattr(os, "sched_getaffinity"):
        available = len(os.sched_getaffinity(0))
        (cores_a, threads_a), (cores_b, threads_b) = pins.values()
        if available >= 2:
            assert not set(cores_a) & set(cores_b)  # disjoint shares of the machine
        assert threads_a == threads_b == max(1, available // 2)


# --------------------------------------------------------------------------------------------------
# shipped configs
# --------------------------------------------------------------------------------------------------


def shipped_configs():
    cases = []
    for name in shipped_sweeps():
        doc = yaml.safe_load(sweep_path(name).read_text(encoding="utf-8")) or {}
        profiles = list((doc.get("profiles") or {}) if isinstance(doc, dict) else {})
        cases += [pytest.param(name, profile, id=f"{name}-{profile or 'default'}") for profile in [None, *profiles]]
    return cases


def test_the_paper_is_shipped():
    assert len(shipped_sweeps()) >= 19 and {"smoke", "table2-mnist", "fig1-or"} <= set(shipped_sweeps())


@pytest.mark.parametrize("name, profile", shipped_configs())
def test_shipped_config_loads_and_validates(name, profile):
    sweep = load_sweep(name, profile=profile)  # validates every cell, its defenses and paper lookups
    assert sweep.cells
    assert len({cid for cid, _ in sweep.cells}) == len(sweep.cells)


def test_a_joint_grid_axis_sets_its_fields_together(tmp_path):
    from poisonreach.experiments.sweep_file import parse_sweep

    doc = {"name": "joint", "run": {"dataset": "digits", "eps_d": [0.1]},
           "grid": {"model+eps_w": [["lr", 1.0], ["nn", 0.5]], "seed": [0, 1]}}
    sweep = parse_sweep(doc, "test", lookup=lambda *a, **k: None)
    got = [(cid, c.model, c.eps_w, c.seed) for cid, c in sweep.cells]
    assert got == [("model=lr,eps_w=1,seed=0", "lr", 1.0, 0), ("model=lr,eps_w=1,seed=1", "lr", 1.0, 1),
                   ("model=nn,eps_w=0.5,seed=0", "nn", 0.5, 0), ("model=nn,eps_w=0.5,seed=1", "nn", 0.5, 1)]
    bad = {**doc, "grid": {"model+eps_w": [["lr"]]}}
    with pytest.raises(PoisonReachError, match="must be a list of 2 values"):
        parse_sweep(bad, "test", lookup=lambda *a, **k: None)
    with pytest.raises(PoisonReachError, match="modle"):
        parse_sweep({**doc, "grid": {"modle+eps_w": [["lr", 1.0]]}}, "test", lookup=lambda *a, **k: None)


def test_a_joint_axis_is_named_by_its_scalar_parts_when_they_tell_its_values_apart():
    from poisonreach.experiments.sweep_file import parse_sweep

    lookup = lambda *a, **k: None  # noqa: E731
    doc = {"name": "joint", "run": {"dataset": "digits", "eps_d": [0.1]},
           "grid": {"attack+attack_options": [["gc-pgd", {"epochs": 3, "box": None}], ["gm", {"steps": 2}]]}}
    sweep = parse_sweep(doc, "test", lookup=lookup)
    assert [cid for cid, _ in sweep.cells] == ["attack=gc-pgd", "attack=gm"]
    assert [c.attack_options for _, c in sweep.cells] == [{"epochs": 3, "box": None}, {"steps": 2}]
    assert sweep.grid_values["attack=gm"] == {"attack": "gm", "attack_options": {"steps": 2}}  # the rows keep the options
    # the same attack twice: only the options tell the cells apart, so they stay in the name
    same = parse_sweep({**doc, "grid": {"attack+attack_options": [["gc-pgd", {"epochs": 3}], ["gc-pgd", {"epochs": 4}]]}}, "test", lookup=lookup)
    ids = [cid for cid, _ in same.cells]
    assert len(set(ids)) == 2 and all("epochs" in cid for cid in ids), ids


def test_regression_rows_show_mse_and_hide_the_undefined_accuracies():
    nan = float("nan")
    rows = [{"cell": "attack=gc", "eps_d": 0.1, "clean_acc": nan, "target_acc": nan, "clean_mse": 0.27, "target_mse": 1.33,
             "tau": 0.0, "poisoned_acc": nan, "poisoned_mse": 1.32, "acc_drop": nan, "grad_norm_ratio": 5e-7,
             "param_distance": 0.0014, "wall_time_s": 6, "paper_acc_drop": None}]
    lines = format_results(rows).splitlines()
    assert [c.strip() for c in lines[0].split("  ") if c.strip()] == [
        "cell", "eps_d", "clean MSE", "target MSE", "tau", "poisoned MSE", "paper", "‖g‖ ratio", "‖w − w_t‖", "time (s)"]
    assert lines[2].split() == ["attack=gc", "0.1", "0.27", "1.33", "0", "1.32", "-", "5e-07", "0.0014", "6"]


def test_figures_5_and_6_gc_reaches_the_least_squares_target_and_gm_does_not(tmp_path):
    """The shipped fig5-6-regression sweep, unchanged but for two budgets (about 10 s): GC's victim
    lands on the target line at both (Example 1: any ε_d > 0 reaches a least-squares target), while
    Gradient Matching toward the same target matches the direction of −g(µ) and the victim stays
    near the clean line (appendix C.4: GM 'achieves different model parameters for every ε_d').
    Observed: GC ‖w − w_t‖ 0.0014 / 0.0008, GM 0.32 / 0.23 with the clean line 0.33 away."""
    sweep = load_sweep("fig5-6-regression", overrides=["run.eps_d=[0.1, 1.0]"])
    rows = run_sweep(sweep, tmp_path / "out")
    by = {(r["attack"], r["eps_d"]): r for r in rows}
    for eps_d in (0.1, 1.0):
        gc, gm = by["gc-pgd", eps_d], by["gm", eps_d]
        assert gc["grad_norm_ratio"] < 1e-5 and gc["param_distance"] < 0.02
        assert gc["poisoned_mse"] == pytest.approx(gc["target_mse"], rel=0.02)
        assert gm["param_distance"] > 0.2 and gm["poisoned_mse"] < 0.5 * gm["target_mse"]
        history = io.read_json(tmp_path / "out" / "cells" / "attack=gm" / f"eps_d={eps_d:g}" / "poisons.json")["extra"]["objective_history"]
        assert history[-1] < 1e-3  # the direction is matched all the same


def test_overrides_may_follow_the_options(tmp_path, capsys):
    from poisonreach.cli import main

    assert main(["sweep", "smoke", "--profile", "tiny", "--dry-run", "run.attack_options.epochs=2", "--out", str(tmp_path / "s")]) == 0
    assert main(["sweep", "smoke", "run.attack_options.epochs=2", "--profile", "tiny", "--dry-run", "--out", str(tmp_path / "s")]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["sweep", "smoke", "--dry-run", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_victim_seeds_in_a_sweep_reach_the_table_and_may_grow(tmp_path):
    """run.victim_seeds: the mean ± std columns in results.csv and the table; a later invocation
    with more seeds reuses the folder (and a sweep.yaml written before the field existed) and trains
    only the new seeds."""
    doc = {"name": "seeds", "run": {"train_size": 200, "eps_d": [0.1], "attack": "labelflip", "training": {"epochs": 2},
                                    "victim_seeds": [0, 1]}, "grid": {"eps_w": [2.0]}}
    path = write(tmp_path, doc)
    out = tmp_path / "out"
    (row,) = run_sweep(load_sweep(path, lookup=None), out)
    (r,) = io.read_json(out / "cells" / "eps_w=2" / "metrics.json")["results"]
    assert row["victim_seeds"] == "0 1"
    for key in ("target_agreement", "victim_grad_norm", "acc_drop_mean", "acc_drop_std", "poisoned_acc_mean", "target_agreement_std"):
        assert row[key] == r[key]
    assert row["clean_grad_norm"] > 0 and row["target_grad_norm"] is None
    with open(out / "results.csv", newline="") as f:
        (read,) = list(csv.DictReader(f))
    assert read["victim_seeds"] == "0 1" and float(read["acc_drop_std"]) == pytest.approx(r["acc_drop_std"])
    table = format_results([row])
    assert "drop (seeds)" in table and f"{r['acc_drop_mean']:.2f} ± {r['acc_drop_std']:.2f}" in table and "agree" in table

    saved = io.read_yaml(out / "sweep.yaml")
    del saved["run"]["victim_seeds"]  # as an earlier version wrote it
    io.write_yaml(out / "sweep.yaml", saved)
    cell = out / "cells" / "eps_w=2"
    before = {p.name: p.stat().st_mtime_ns for p in cell.rglob("*.pt")}
    (row,) = run_sweep(load_sweep(path, ["run.victim_seeds=[0, 1, 2]"], lookup=None), out)
    after = {p.name: p.stat().st_mtime_ns for p in cell.rglob("*.pt")}
    assert sorted(k for k in after if after[k] != before.get(k)) == ["clean_model_seed=2.pt", "retrained_model_seed=2.pt"]
    assert row["victim_seeds"] == "0 1 2"
    with pytest.raises(PoisonReachError, match="victim_seeds"):
        load_sweep(path, ["run.victim_seeds=[0, 0]"], lookup=None)


def test_mean_columns_show_their_spread_and_hide_without_seeds():
    rows = [{"cell": "a", "eps_d": 0.1, "acc_drop": 3.0, "acc_drop_mean": 2.5, "acc_drop_std": 0.5, "poisoned_acc_mean": 80.0,
             "poisoned_acc_std": 1.25, "victim_seeds": "0 1", "target_agreement": 91.0, "victim_grad_norm": 0.0123},
            {"cell": "b", "eps_d": 0.1, "acc_drop": 1.0}]
    lines = format_results(rows).splitlines()
    assert " 2.50 ± 0.50" in lines[2] and "80.00 ± 1.25" in lines[2] and "0.0123" in lines[2] and "91.00" in lines[2]
    assert "±" not in lines[3]
    assert "seeds" not in format_results(rows[1:]) and "agree" not in format_results(rows[1:])
