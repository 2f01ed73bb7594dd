"""Run folders that forgive: what may change between two commands on one folder, and what is refused.

- a run that fails before its first result (missing data, a bad option) leaves nothing that blocks
  the corrected command in the same folder, and one that fails at its first ε_d cell leaves its
  clean model and target to the corrected attack;
- ``data_root``, ``device`` and ``threads`` are no part of a run's identity;
- a folder whose results another configuration made is refused, naming the fields and both values;
- a budget added to a finished run computes only the new cell, the same as a fresh run would;
- the default folder name includes the attack.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest

from poisonreach import io
from poisonreach.cli import main
from poisonreach.data.fake_files import write_cifar
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig
from poisonreach.experiments.run import default_out, run
from poisonreach.experiments.sweep import load_sweep, run_sweep
from test_sweep import FAKE, FakeRunner, write

BASE = dict(dataset="digits", train_size=200, eps_w=0.3, eps_d=[0.1], attack="gc-pgd", attack_options={"epochs": 3},
            training={"epochs": 3, "batch_size": 32})


def config(**changes) -> RunConfig:
    return RunConfig(**{**BASE, **changes})


def stamps(folder: Path) -> dict[str, int]:
    """Every file of a folder (relative path) and its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished run at ε_d = 0.1 and its metrics."""
    out = tmp_path_factory.mktemp("finished") / "run"
    return out, run(config(), out)


def copy(finished, dest: Path) -> Path:
    shutil.copytree(finished[0], dest)
    return dest


def test_a_run_that_misses_its_data_leaves_nothing_in_the_way(tmp_path):
    out, data = tmp_path / "run", tmp_path / "data"
    cifar = dict(dataset="cifar10", model="lr", train_size=40, eps_d=[0.1], attack="labelflip", training={"epochs": 1})
    with pytest.raises(PoisonReachError, match="cifar"):
        run(RunConfig(**cifar, data_root=str(tmp_path / "nowhere")), out)
    write_cifar(data / "cifar10" / "cifar-10-batches-py", per_batch=20)
    metrics = run(RunConfig(**cifar, data_root=str(data)), out)  # the corrected command, same folder
    assert [r["eps_d"] for r in metrics["results"]] == [0.1]
    assert io.read_yaml(out / "config.yaml")["data_root"] == str(data)


def test_a_bad_option_leaves_nothing_in_the_way(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(PoisonReachError, match="cnn"):  # found from the data's shape, before config.yaml is written
        run(config(dataset="or2d", model="cnn", train_size=None), out)
    assert sorted(stamps(out)) == []
    metrics = run(config(dataset="or2d", model="lr", train_size=None), out)
    assert metrics["dataset"] == "or2d" and io.read_yaml(out / "config.yaml")["model"] == "lr"


def test_a_bad_attack_option_leaves_the_clean_model_and_target_to_the_corrected_one(tmp_path):
    out = tmp_path / "run"
    bad = config(attack="gc", attack_options={"parameters": "first", "iterations": 2})  # greedy labels need the last layer
    with pytest.raises(PoisonReachError, match="labels='greedy'"):
        run(bad, out)
    before = stamps(out)
    assert {"clean_model.pt", "target_model.pt"} <= set(before) and not any(k.startswith("eps_d=") for k in before)
    fixed = config(attack="gc", attack_options={"parameters": "first", "iterations": 2, "labels": "fixed"})
    metrics = run(fixed, out)
    after = stamps(out)
    assert after["clean_model.pt"] == before["clean_model.pt"] and after["target_model.pt"] == before["target_model.pt"]
    assert metrics["results"][0]["num_poisons"] == 20
    # the same models as a fresh run of the corrected command
    fresh = run(fixed, tmp_path / "fresh")
    assert [r["poisoned_acc"] for r in fresh["results"]] == [r["poisoned_acc"] for r in metrics["results"]]


def test_results_of_another_configuration_are_refused_naming_what_differs(finished, tmp_path):
    out = copy(finished, tmp_path / "run")
    with pytest.raises(PoisonReachError) as info:
        run(config(eps_w=0.5, training={"epochs": 4, "batch_size": 32}), out)
    message = str(info.value)
    assert "eps_w: 0.3 there, 0.5 here" in message
    assert 'training: {"epochs": 3, "batch_size": 32} there, {"epochs": 4, "batch_size": 32} here' in message
    assert "attack" not in message.split("(")[1]  # only what differs
    # the attack, once its cells hold results, is refused too
    with pytest.raises(PoisonReachError, match='attack: "gc-pgd" there, "gc" here'):
        run(config(attack="gc", attack_options={}), out)


def test_data_root_device_and_threads_are_no_part_of_a_run(finished, tmp_path, capsys):
    out = copy(finished, tmp_path / "run")
    models_before = {k: v for k, v in stamps(out).items() if k.endswith(".pt")}
    metrics = run(config(data_root=str(tmp_path / "elsewhere")), out)  # digits is bundled: any root reads it
    assert {k: v for k, v in stamps(out).items() if k.endswith(".pt")} == models_before
    assert metrics["results"] == finished[1]["results"]
    assert config(device="cuda:0").differing_keys(config().to_dict()) == []
    assert config().differing_keys({**config().to_dict(), "device": "cuda:1", "data_root": "/data"}) == []
    argv = ["run", "--train-size", "200", "--eps-w", "0.3", "--eps-d", "0.1", "--attack", "gc-pgd", "--attack-option", "epochs=3",
            "--train-epochs", "3", "--train-batch-size", "32", "--out", str(out)]
    assert main([*argv, "--threads", "1"]) == 0 and main(argv) == 0
    assert "resuming the run" in capsys.readouterr().err
    assert {k: v for k, v in stamps(out).items() if k.endswith(".pt")} == models_before


def test_an_added_budget_computes_only_its_cell(finished, tmp_path, caplog):
    out = copy(finished, tmp_path / "run")
    before = stamps(out)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        metrics = run(config(eps_d=[0.1, 0.3]), out)
    after = stamps(out)
    changed = {k for k in after if after[k] != before.get(k)}
    # the run's records are rewritten (τ, one forward pass, too), the one new cell made; no model retrained
    assert {k for k in changed if not k.endswith((".png", ".pdf"))} == {"config.yaml", "metrics.json", "threshold.json", *(
        f"eps_d=0.3/{f}" for f in ("poisons.pt", "poisons.json", "retrained_model.pt", "result.json"))}
    assert metrics["results"][0] == finished[1]["results"][0]
    assert any("eps_d changed from [0.1] to [0.1, 0.3]" in m for m in caplog.messages)
    # the new cell is the one a fresh run would compute
    fresh = run(config(eps_d=[0.3]), tmp_path / "fresh")
    strip = lambda r: {k: v for k, v in r.items() if k != "attack_time_s"}  # noqa: E731
    assert strip(metrics["results"][1]) == strip(fresh["results"][0])
    # and a budget dropped leaves its cell on disk, out of the results
    assert [r["eps_d"] for r in run(config(eps_d=[0.3]), out)["results"]] == [0.3] and (out / "eps_d=0.1" / "result.json").is_file()


def test_the_default_folder_names_the_attack(tmp_path, monkeypatch, capsys):
    assert default_out(config()) == Path("runs/digits-lr-gc-pgd-epsw0.3-seed0")
    assert default_out(RunConfig()) == Path("runs/digits-lr-gc-epsw1-seed0")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--train-size", "200", "--eps-w", "0.3", "--eps-d", "0.1", "--attack", "labelflip", "--train-epochs", "1",
                 "--quiet"]) == 0
    assert "run folder: runs/digits-lr-labelflip-epsw0.3-seed0" in capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "digits-lr-labelflip-epsw0.3-seed0" / "metrics.json").read_text())["results"]


def test_a_sweep_folder_takes_other_budgets_and_data_roots(tmp_path):
    path = write(tmp_path, FAKE)
    run_sweep(load_sweep(path, lookup=None), tmp_path / "out", runner=FakeRunner())
    runner = FakeRunner()
    run_sweep(load_sweep(path, ["run.eps_d=[0.1]", "run.data_root=/elsewhere"], lookup=None), tmp_path / "out", runner=runner)
    assert len(runner.calls) == 4  # not refused: every cell goes to its runner, which computes what is new
    with pytest.raises(PoisonReachError, match="run differ"):
        run_sweep(load_sweep(path, ["run.train_size=50"], lookup=None), tmp_path / "out", runner=FakeRunner())
