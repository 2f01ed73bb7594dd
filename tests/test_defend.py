"""`poisonreach defend` and `run --attack`: a defense applied to a finished run folder."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from poisonreach.cli import main
from poisonreach.defenses import DEFENSES, Filter, FilterResult
from poisonreach.experiments.defend import defend

FAST = ["--train-size", "300", "--train-epochs", "3", "--attack", "gc-pgd", "--attack-option", "epochs=5", "--eps-w", "0.3"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gc"
    assert main(["run", *FAST, "--eps-d", "0.1", "0.3", "--out", str(out), "--quiet"]) == 0
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    dest = tmp_path / "run"
    shutil.copytree(finished_run, dest)
    return dest


class _DropPoisons(Filter):
    """A perfect filter for the test: it removes the last ``fraction`` of the points (the poisons)."""

    name = "oracle"

    def __init__(self, fraction: float = 0.0):
        self.fraction = fraction

    def filter(self, model, X, y, loss=None):
        keep = torch.ones(len(X), dtype=torch.bool)
        keep[len(X) - round(len(X) * self.fraction):] = False
        return FilterResult(keep, (~keep).float())


def test_a_filter_that_removes_exactly_the_poisons_recovers_the_clean_accuracy(run_copy, monkeypatch):
    monkeypatch.setitem(DEFENSES, "oracle", _DropPoisons)
    summary = defend(run_copy, "oracle")
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert metrics["defenses"]["oracle"] == json.loads(json.dumps(summary))
    for r, cell in zip(summary["results"], metrics["results"]):
        n_poisons = cell["num_poisons"]
        assert r["removed"] == r["poisons_removed"] == n_poisons and r["clean_removed"] == 0
        # retraining on exactly the clean points is the clean model: same seed, same data, same order
        assert math.isclose(r["defended_acc"], metrics["clean_acc"])
        assert math.isclose(r["acc_drop_defended"], 0.0, abs_tol=1e-9)
        assert math.isclose(r["recovered"], metrics["clean_acc"] - cell["poisoned_acc"])
        mask = torch.load(run_copy / f"eps_d={cell['eps_d']:g}" / "defense=oracle" / "keep_mask.pt", weights_only=True)["keep_mask"]
        assert (~mask).sum() == n_poisons


def test_maxup_defense_through_the_cli_resumes(run_copy, capsys):
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup", "--option", "m=2", "--quiet"]) == 0
    first = capsys.readouterr().out
    assert "maxup acc" in first and "recovered" in first
    result = run_copy / "eps_d=0.1" / "defense=maxup,m=2" / "result.json"
    stamp = result.stat().st_mtime_ns
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup", "--option", "m=2", "--quiet"]) == 0
    assert capsys.readouterr().out == first and result.stat().st_mtime_ns == stamp  # read back, not redone


def test_each_defense_setting_gets_its_own_folder_and_metrics_entry(run_copy):
    defend(run_copy, "maxup", {"m": 2})
    defend(run_copy, "maxup", {"m": 3, "strength": 0.2})
    metrics = json.loads((run_copy / "metrics.json").read_text())
    assert set(metrics["defenses"]) == {"maxup,m=2", "maxup,m=3,strength=0.2"}
    assert (run_copy / "eps_d=0.3" / "defense=maxup,m=3,strength=0.2" / "result.json").is_file()


def test_a_defense_folder_of_other_settings_is_refused(run_copy, capsys):
    defend(run_copy, "maxup", {"m": 2})
    saved = run_copy / "eps_d=0.1" / "defense=maxup,m=2" / "defense.yaml"
    saved.write_text(saved.read_text().replace("m: 2", "m: 5"))
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup", "--option", "m=2"]) == 2
    assert "other maxup settings" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--defense", "maxup", "--option", "m=0"], "m must be >= 1"),
        (["--defense", "maxup", "--option", "sigma=1"], "unknown maxup defense option(s) ['sigma']"),
    ],
)
def test_bad_defense_options_fail_before_any_work(run_copy, capsys, argv, message):
    assert main(["defend", "--run", str(run_copy), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list((run_copy / "eps_d=0.1").glob("defense=*"))


def test_defend_needs_a_finished_run(tmp_path, run_copy, capsys):
    assert main(["defend", "--run", str(tmp_path), "--defense", "maxup"]) == 2
    assert "not a run folder" in capsys.readouterr().err
    (run_copy / "metrics.json").unlink()
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup"]) == 2
    assert "unfinished" in capsys.readouterr().err


def test_gc_flags_with_another_attack_are_refused(tmp_path, capsys):
    assert main(["run", "--attack", "gm", "--optimize-labels", "--out", str(tmp_path / "x")]) == 2
    assert "--attack-option" in capsys.readouterr().err


@pytest.mark.parametrize(
    "attack, options",
    [
        ("labelflip", ["--attack-option", "strategy=loss"]),
        ("gm", ["--attack-option", "steps=5"]),
        ("tgda", ["--attack-option", "epochs=2", "--attack-option", "follower_steps=2", "--attack-option", "generator=points"]),
    ],
)
def test_run_with_a_baseline_attack(tmp_path, attack, options):
    out = tmp_path / attack
    argv = ["run", "--train-size", "300", "--train-epochs", "3", "--eps-w", "0.3", "--eps-d", "0.3", "--attack", attack, *options]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    (cell,) = metrics["results"]
    config = json.loads((out / "eps_d=0.3" / "poisons.json").read_text())["config"]
    assert config["attack"] == attack and cell["num_poisons"] == 90
    # ‖g(µ) + ε_d·g(ν̂)‖ at the target, computed by the run since baselines do not track it
    assert cell["grad_norm_initial"] == pytest.approx(metrics["grad_norm_clean"]) and cell["grad_norm_final"] > 0


def test_unknown_attack_options_are_named(tmp_path, capsys):
    assert main(["run", "--attack", "labelflip", "--attack-option", "steps=3", "--out", str(tmp_path / "x")]) == 2
    assert "unknown labelflip attack option(s) ['steps']" in capsys.readouterr().err


def test_a_target_made_by_a_baseline_attack(tmp_path):
    """Table 7: the model retrained on label-flip poisons becomes GC's target."""
    out = tmp_path / "lf-target"
    argv = ["run", "--train-size", "300", "--train-epochs", "5", "--train-batch-size", "16", "--attack", "gc-pgd", "--attack-option", "epochs=5", "--eps-d", "0.1",
            "--target", "labelflip", "--target-option", "eps_d=0.5", "--target-option", "strategy=loss"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    poisons = json.loads((out / "target_poisons" / "poisons.json").read_text())
    assert poisons["num_poisons"] == 150 and poisons["config"]["attack"] == "labelflip"
    assert metrics["target_acc"] < metrics["clean_acc"]


@pytest.mark.parametrize("defense", ["sever", "influence"])
def test_filtering_defenses_through_the_cli(run_copy, capsys, defense):
    assert main(["defend", "--run", str(run_copy), "--defense", defense, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "poisons/removed" in out
    summary = json.loads((run_copy / "metrics.json").read_text())["defenses"][defense]
    for r, cell in zip(summary["results"], json.loads((run_copy / "metrics.json").read_text())["results"]):
        assert r["removed"] == cell["num_poisons"]  # as many points as there are poisons (the paper's rule)
        assert 0 <= r["poisons_removed"] <= r["removed"]


def test_dpa_through_the_cli_reports_certified_accuracy(run_copy, capsys):
    assert main(["defend", "--run", str(run_copy), "--defense", "dpa"]) == 2
    assert "needs the option(s) ['num_partitions']" in capsys.readouterr().err
    argv = ["defend", "--run", str(run_copy), "--defense", "dpa", "--option", "num_partitions=5", "--option", "epochs=3", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "certified acc" in out and "clean data" in out
    summary = json.loads((run_copy / "metrics.json").read_text())["defenses"]["dpa,epochs=3,num_partitions=5"]
    assert 0 < summary["clean"]["defended_acc"] <= 100
    for r in summary["results"]:
        # 5 base models: a radius of at most 2, so nothing is certified against 30 or more poisons
        assert r["certified_acc"] == 0 and r["median_radius"] <= 2


# any attack's poisons: defend --poisons FILE


def _comparable(summary: dict) -> list[dict]:
    """The results without their timings, which differ between two runs of the same computation."""
    return [{k: v for k, v in r.items() if k != "defense_time_s"} for r in json.loads(json.dumps(summary))["results"]]


@pytest.mark.parametrize("defense, options", [("sever", []), ("maxup", ["--option", "m=2"]),
                                              ("dpa", ["--option", "num_partitions=5", "--option", "epochs=2"])])
def test_a_runs_exported_poisons_defend_as_the_run_folder_does(run_copy, tmp_path, capsys, defense, options):
    assert main(["export", str(run_copy), "--format", "npz", "--out", str(tmp_path / "export")]) == 0
    assert main(["defend", "--run", str(run_copy), "--defense", defense, *options, "--quiet"]) == 0
    metrics = json.loads((run_copy / "metrics.json").read_text())
    folder = metrics["defenses"]
    (key,) = folder
    for cell, run_cell in zip(folder[key]["results"], metrics["results"]):
        name = f"eps_d={cell['eps_d']:g}"
        argv = ["defend", "--poisons", str(tmp_path / "export" / name / "poisons.npz"), "--train-size", "300", "--train-epochs", "3",
                "--defense", defense, *options, "--out", str(tmp_path / name), "--quiet"]
        assert main(argv) == 0, capsys.readouterr().err
        summary = json.loads((tmp_path / name / f"defense={key}" / "defense.json").read_text())
        assert summary["poisons"].endswith("poisons.npz") and summary["num_poisons"] == run_cell["num_poisons"]
        assert summary["clean_acc"] == metrics["clean_acc"]
        (mine,) = _comparable(summary)
        assert mine == {**_comparable({"results": [cell]})[0], "eps_d": mine["eps_d"]}
        assert mine["eps_d"] == pytest.approx(cell["eps_d"], abs=0.5 / 300)  # the realised m/n
        if defense == "sever":  # the same points removed
            saved = torch.load(run_copy / name / f"defense={key}" / "keep_mask.pt", weights_only=True)["keep_mask"]
            assert torch.equal(torch.load(tmp_path / name / f"defense={key}" / "keep_mask.pt", weights_only=True)["keep_mask"], saved)
        if defense == "dpa":
            assert summary["clean"] == folder[key]["clean"]
    assert "drop after defense" in capsys.readouterr().out


def test_defend_takes_the_run_or_the_poisons_and_refuses_what_does_not_apply(run_copy, tmp_path, capsys):
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup", "--dataset", "mnist", "--train-epochs", "5"]) == 2
    err = capsys.readouterr().err
    assert "--dataset, --train-epochs: for --poisons only" in err and len(err.strip().splitlines()) == 1
    assert main(["defend", "--run", str(run_copy), "--defense", "maxup", "--out", str(tmp_path)]) == 2
    assert "--out: for --poisons only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["defend", "--defense", "maxup"])
    assert "one of the arguments --run --poisons is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["defend", "--run", str(run_copy), "--poisons", str(tmp_path), "--defense", "maxup"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_bad_poisons_are_one_line_before_any_training(tmp_path, capsys):
    import numpy as np

    file = tmp_path / "poisons.npz"
    np.savez(file, x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    assert main(["defend", "--poisons", str(file), "--defense", "sever"]) == 2
    err = capsys.readouterr().err
    assert "digits inputs have shape (1, 8, 8)" in err and len(err.strip().splitlines()) == 1
    assert main(["defend", "--poisons", str(tmp_path / "missing.npz"), "--defense", "sever"]) == 2
    assert "does not exist" in capsys.readouterr().err
