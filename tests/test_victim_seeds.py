"""What a run records about its victims: agreement with the target, the convergence of every trained
model, and victim statistics over seeds (poisonreach.experiments.run with ``victim_seeds``).

- target_agreement and the training-gradient norms of the run equal independent computations on
  the saved models; a planted target (the victim of a least-likely label flip) is the victim of the
  same flip bit for bit, and GC's residual at it is its own training-gradient norm rescaled;
- victim seeds: without them nothing changes; with them the unsuffixed numbers are the run seed's,
  every seed's clean model and victim are independent trainings from scratch with that seed, the
  statistics are those of the per-seed lists (sample std), and the table prints mean ± std;
- resuming trains nothing that is saved, a killed run retrains only the missing models, new victim
  seeds train only their models, a change of any other key is refused by name, and a folder written
  before these fields existed is completed.
"""

from __future__ import annotations

import logging
import shutil
import statistics
from pathlib import Path

import pytest
import torch

from poisonreach import io, models
from poisonreach.attacks import PoisonResult
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.config import RunConfig, load_data
from poisonreach.experiments.run import format_table, run
from poisonreach.targets import parameter_distance
from poisonreach.training import agreement, train, training_gradient_norm

# small and fast: label flips need no optimisation, three training epochs on 300 digits
BASE = dict(train_size=300, eps_w=0.3, eps_d=[0.1, 0.5], attack="labelflip", attack_options={"strategy": "loss"}, training={"epochs": 3})
SEEDS = [0, 1, 2]


def config(**changes) -> RunConfig:
    return RunConfig(**{**BASE, **changes})


def stamps(folder: Path) -> dict[str, int]:
    """Every model and poison file under ``folder`` with its modification time."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*.pt"))}


def same_parameters(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.fixture(scope="module", autouse=True)
def no_figures():
    """The figures cost most of a small run and are tested elsewhere (test_cli.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("poisonreach.experiments.run.plot_run", lambda out: [])
        yield


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "run"
    return out, run(config(), out)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    out = tmp_path_factory.mktemp("seeded") / "run"
    return out, run(config(victim_seeds=SEEDS), out)


@pytest.fixture(scope="module")
def splits():
    return load_data(config())[0]


# --------------------------------------------------------------------------------------------------
# agreement and convergence
# --------------------------------------------------------------------------------------------------


def test_agreement_and_gradient_norms_equal_independent_computations(plain, splits):
    out, metrics = plain
    X, y = splits.x_train, splits.y_train
    clean, target = models.load_model(out / "clean_model.pt"), models.load_model(out / "target_model.pt")
    assert metrics["clean_grad_norm"] == pytest.approx(training_gradient_norm(clean, X, y), rel=1e-6)
    assert metrics["clean_grad_norm"] > 0.05  # three epochs: far from converged, and the record says so
    assert metrics["target_grad_norm"] is None  # GradPC corrupts, it does not train
    assert metrics["target_clean_agreement"] == agreement(target, clean, splits.x_test)
    saved = io.read_json(out / "metrics.json")
    for r in metrics["results"]:
        cell = out / f"eps_d={r['eps_d']:g}"
        victim = models.load_model(cell / "retrained_model.pt")
        X_mix, y_mix = PoisonResult.load(cell).mixed(X, y)
        assert r["target_agreement"] == agreement(victim, target, splits.x_test)
        assert 0 < r["target_agreement"] < 100
        assert r["victim_grad_norm"] == pytest.approx(training_gradient_norm(victim, X_mix, y_mix), rel=1e-6)
        assert r["victim_grad_norm"] != pytest.approx(training_gradient_norm(victim, X, y), rel=1e-3)  # clean ∪ poisons, not clean
        assert r == io.read_json(cell / "result.json")
    assert [r["target_agreement"] for r in saved["results"]] == [r["target_agreement"] for r in metrics["results"]]
    table = format_table(metrics)
    assert "agree %" in table and "victim ‖∇L‖" in table and "±" not in table
    assert f"clean {metrics['clean_grad_norm']:.3g}" in table


def test_a_planted_least_likely_target_is_the_victim_of_its_flip(tmp_path):
    """The target is the victim of a least-likely flip at ε_d = 0.1; the same flip as the attack
    gives that very model, and ‖g(µ) + ε_d·g(ν̂)‖ at it is (n + m)/n times its training-gradient
    norm: zero only as far as the target's training converged."""
    flip = {"strategy": "least-likely", "eps_d": 0.1}
    c = config(eps_d=[0.1], target="labelflip", target_options=flip, attack_options={"strategy": "least-likely"})
    metrics = run(c, tmp_path / "planted")
    (r,) = metrics["results"]
    assert r["target_agreement"] == 100.0 and r["param_distance"] == 0.0
    assert r["victim_grad_norm"] == metrics["target_grad_norm"] > 0
    n, m = metrics["num_train"], r["num_poisons"]
    assert r["grad_norm_final"] == pytest.approx((n + m) / n * metrics["target_grad_norm"], rel=1e-5)
    planted = io.read_json(tmp_path / "planted" / "target_poisons" / "poisons.json")
    assert planted["config"]["strategy"] == "least-likely" and planted["num_poisons"] == m == 30


# --------------------------------------------------------------------------------------------------
# victim seeds
# --------------------------------------------------------------------------------------------------

PER_SEED = ["clean_acc", "poisoned_acc", "acc_drop", "target_agreement", "victim_grad_norm", "param_distance"]


def test_without_victim_seeds_nothing_changes(plain, seeded):
    (_, a), (_, b) = plain, seeded
    assert all("victim_seeds" not in r and not any(k.endswith("_per_seed") for k in r) for r in a["results"])
    assert "victim_seeds" not in a and "clean_acc_per_seed" not in a
    for key in ("clean_acc", "target_acc", "tau", "clean_grad_norm", "grad_norm_clean"):
        assert a[key] == b[key]
    for ra, rb in zip(a["results"], b["results"]):
        assert {k: rb[k] for k in ra if k != "attack_time_s"} == {k: v for k, v in ra.items() if k != "attack_time_s"}


def test_per_seed_lists_and_their_statistics(seeded):
    out, metrics = seeded
    assert metrics["victim_seeds"] == SEEDS and len(metrics["clean_acc_per_seed"]) == 3
    assert metrics["clean_acc_per_seed"][0] == metrics["clean_acc"]
    assert metrics["clean_acc_mean"] == pytest.approx(statistics.mean(metrics["clean_acc_per_seed"]))
    assert metrics["clean_acc_std"] == pytest.approx(statistics.stdev(metrics["clean_acc_per_seed"]))
    for r in metrics["results"]:
        assert r["victim_seeds"] == SEEDS
        assert r["clean_acc_per_seed"] == metrics["clean_acc_per_seed"]
        for key in PER_SEED[1:]:
            assert r[f"{key}_per_seed"][0] == r[key]  # seed 0 is the run's seed: its own victim
        assert r["acc_drop_per_seed"] == pytest.approx([c - p for c, p in zip(r["clean_acc_per_seed"], r["poisoned_acc_per_seed"])])
        for key in ("poisoned_acc", "acc_drop", "target_agreement", "victim_grad_norm", "param_distance"):
            values = r[f"{key}_per_seed"]
            assert r[f"{key}_mean"] == pytest.approx(statistics.mean(values))
            assert r[f"{key}_std"] == pytest.approx(statistics.stdev(values))  # the sample std, ddof = 1
        assert len(set(r["poisoned_acc_per_seed"])) > 1  # the seeds give different victims
        cell = out / f"eps_d={r['eps_d']:g}"
        assert sorted(p.name for p in cell.glob("retrained_model*.pt")) == [
            "retrained_model.pt", "retrained_model_seed=1.pt", "retrained_model_seed=2.pt"]
    assert sorted(p.name for p in out.glob("clean_model*.pt")) == ["clean_model.pt", "clean_model_seed=1.pt", "clean_model_seed=2.pt"]


def test_each_seed_is_a_retrain_from_scratch_with_that_seed(seeded, splits):
    """Initialisation and batch order are the seed's; the poisons and the data are the run's."""
    out, metrics = seeded
    X, y = splits.x_train, splits.y_train
    spec = dict(name="lr", input_shape=splits.input_shape, num_classes=splits.num_classes, mean=splits.mean, std=splits.std)
    fit = lambda X_fit, y_fit, seed: train(models.create(**spec, seed=seed), X_fit, y_fit, seed=seed, epochs=3, progress=False)  # noqa: E731
    target = models.load_model(out / "target_model.pt")
    clean2 = models.load_model(out / "clean_model_seed=2.pt")
    assert same_parameters(clean2, fit(X, y, 2))
    r = metrics["results"][1]
    cell = out / "eps_d=0.5"
    X_mix, y_mix = PoisonResult.load(cell).mixed(X, y)
    victim1 = models.load_model(cell / "retrained_model_seed=1.pt")
    assert same_parameters(victim1, fit(X_mix, y_mix, 1))
    assert not same_parameters(victim1, models.load_model(cell / "retrained_model_seed=2.pt"))
    assert r["target_agreement_per_seed"][1] == agreement(victim1, target, splits.x_test)
    assert r["param_distance_per_seed"][1] == parameter_distance(victim1, target)
    assert r["victim_grad_norm_per_seed"][1] == pytest.approx(training_gradient_norm(victim1, X_mix, y_mix), rel=1e-6)
    from poisonreach.training import accuracy
    assert metrics["clean_acc_per_seed"][2] == accuracy(clean2, splits.x_test, splits.y_test)
    assert r["poisoned_acc_per_seed"][1] == accuracy(victim1, splits.x_test, splits.y_test)


def test_the_table_prints_mean_and_std_over_several_seeds(seeded):
    _, metrics = seeded
    table = format_table(metrics)
    r = metrics["results"][0]
    assert "mean ± std over victim seeds 0 1 2" in table
    assert f"{r['poisoned_acc_mean']:.2f} ± {r['poisoned_acc_std']:.2f}" in table
    assert f"{r['acc_drop_mean']:.2f} ± {r['acc_drop_std']:.2f}" in table
    assert f"{r['target_agreement_mean']:.2f} ± {r['target_agreement_std']:.2f}" in table
    assert f"{metrics['clean_acc_mean']:.2f} ± {metrics['clean_acc_std']:.2f}%" in table
    assert f"{max(r['victim_grad_norm_per_seed']):.3g}" in table


def test_a_run_seed_outside_the_victim_seeds_and_a_single_seed(plain, seeded, tmp_path):
    """The unsuffixed numbers stay the run seed's (as without victim seeds); the statistics are over
    the listed seeds only, whose models are the same trainings as in any other folder."""
    (_, a), (_, b) = plain, seeded
    c = run(config(victim_seeds=[1]), tmp_path / "one")
    assert c["clean_acc_per_seed"] == [b["clean_acc_per_seed"][1]] and c["clean_acc_std"] == 0.0
    for ra, rb, rc in zip(a["results"], b["results"], c["results"]):
        assert rc["poisoned_acc"] == ra["poisoned_acc"] and rc["acc_drop"] == ra["acc_drop"]
        assert rc["poisoned_acc_per_seed"] == [rb["poisoned_acc_per_seed"][1]]
        assert rc["poisoned_acc_mean"] == rb["poisoned_acc_per_seed"][1] and rc["poisoned_acc_std"] == 0.0
        assert rc["acc_drop_std"] == 0.0 and rc["victim_grad_norm_std"] == 0.0
    assert (tmp_path / "one" / "eps_d=0.1" / "retrained_model.pt").is_file()  # the run seed's victim, as always
    assert "±" not in format_table(c)  # one seed: no spread to print


@pytest.mark.parametrize("seeds", [[], [0, 0], [0.5], "0 1", [True]])
def test_bad_victim_seeds_are_refused(seeds, tmp_path):
    with pytest.raises(PoisonReachError, match="victim_seeds"):
        run(config(victim_seeds=seeds), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------------------------------
# resuming
# --------------------------------------------------------------------------------------------------


def copy(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def test_a_rerun_trains_nothing_and_reproduces(seeded, tmp_path, caplog):
    out = copy(seeded[0], tmp_path / "again")
    before = stamps(out)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        metrics = run(config(victim_seeds=SEEDS), out)
    assert any("resuming" in line for line in caplog.messages)
    assert stamps(out) == before
    assert metrics["results"] == seeded[1]["results"]


def test_a_killed_run_retrains_only_the_missing_models(seeded, tmp_path):
    out = copy(seeded[0], tmp_path / "killed")
    cell = out / "eps_d=0.5"
    lost = [cell / "result.json", cell / "retrained_model_seed=2.pt", out / "clean_model_seed=1.pt", out / "metrics.json"]
    kept = cell / "retrained_model_seed=1.pt"
    reference = {p.name: models.load_model(p) for p in lost if p.suffix == ".pt"}
    for p in lost:
        p.unlink()
    before = stamps(out)
    metrics = run(config(victim_seeds=SEEDS), out)
    after = stamps(out)
    assert {k for k in after if after[k] != before.get(k)} == {"eps_d=0.5/retrained_model_seed=2.pt", "clean_model_seed=1.pt"}
    assert after[str(kept.relative_to(out))] == before[str(kept.relative_to(out))]
    for p in lost:
        if p.suffix == ".pt":
            assert same_parameters(models.load_model(p), reference[p.name])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "attack_time_s"} for r in rs]  # noqa: E731
    assert strip(metrics["results"]) == strip(seeded[1]["results"])


def test_new_victim_seeds_train_only_their_models(seeded, tmp_path, caplog):
    out = copy(seeded[0], tmp_path / "more")
    before = stamps(out)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        metrics = run(config(victim_seeds=[0, 2, 3]), out)
    after = stamps(out)
    assert sorted(k for k in after if after[k] != before.get(k)) == [
        "clean_model_seed=3.pt", "eps_d=0.1/retrained_model_seed=3.pt", "eps_d=0.5/retrained_model_seed=3.pt"]
    assert any("victim_seeds changed" in line for line in caplog.messages)
    assert io.read_yaml(out / "config.yaml")["victim_seeds"] == [0, 2, 3]
    for old, new in zip(seeded[1]["results"], metrics["results"]):
        assert new["victim_seeds"] == [0, 2, 3]
        for key in PER_SEED:
            assert new[f"{key}_per_seed"][:2] == [old[f"{key}_per_seed"][0], old[f"{key}_per_seed"][2]]
        assert new["poisoned_acc_mean"] == pytest.approx(statistics.mean(new["poisoned_acc_per_seed"]))
    # back to no victim seeds: the per-seed fields go, the run seed's numbers stay
    metrics = run(config(), out)
    assert all("victim_seeds" not in r and "poisoned_acc_mean" not in r for r in metrics["results"])
    assert [r["poisoned_acc"] for r in metrics["results"]] == [r["poisoned_acc"] for r in seeded[1]["results"]]


def test_a_change_of_another_key_is_refused_by_name(seeded):
    with pytest.raises(PoisonReachError, match=r"different configuration \(training: \{.*\} there, \{.*\} here\)"):
        run(config(training={"epochs": 4}, victim_seeds=SEEDS), seeded[0])


def test_a_folder_written_before_these_fields_is_completed(plain, tmp_path):
    out = copy(plain[0], tmp_path / "old")
    saved = io.read_yaml(out / "config.yaml")
    del saved["victim_seeds"]
    io.write_yaml(out / "config.yaml", saved)
    for cell in out.glob("eps_d=*"):
        entry = io.read_json(cell / "result.json")
        io.write_json(cell / "result.json", {k: v for k, v in entry.items() if k not in ("target_agreement", "victim_grad_norm")})
    before = stamps(out)
    metrics = run(config(), out)
    assert stamps(out) == before
    assert metrics["results"] == plain[1]["results"]


# --------------------------------------------------------------------------------------------------
# regression and the command line
# --------------------------------------------------------------------------------------------------


def test_regression_victim_seeds_report_the_test_mse(tmp_path):
    c = RunConfig(dataset="regression2d", model="linreg", eps_w=0.5, eps_d=[0.2], attack="gc-pgd", attack_options={"epochs": 3, "box": None},
                  training={"epochs": 3, "batch_size": 16, "optimizer": "sgd", "lr": 0.05}, victim_seeds=[0, 1])
    metrics = run(c, tmp_path / "reg")
    (r,) = metrics["results"]
    assert "target_agreement" not in r and "target_clean_agreement" not in metrics and "clean_acc_per_seed" not in metrics
    assert r["poisoned_mse_per_seed"][0] == r["poisoned_mse"] and len(metrics["clean_mse_per_seed"]) == 2
    assert r["poisoned_mse_mean"] == pytest.approx(statistics.mean(r["poisoned_mse_per_seed"]))
    assert r["poisoned_mse_std"] == pytest.approx(statistics.stdev(r["poisoned_mse_per_seed"]))
    assert r["victim_grad_norm"] > 0 and "± " in format_table(metrics)


def test_the_command_line_takes_victim_seeds_and_training_options(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["run", "--train-size", "200", "--train-epochs", "2", "--train-option", "gamma=1", "--eps-d", "0.1",
            "--attack", "labelflip", "--attack-option", "strategy=least-likely", "--victim-seeds", "0", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "mean ± std over victim seeds 0 1" in printed and "agree %" in printed
    saved = io.read_yaml(out / "config.yaml")
    assert saved["victim_seeds"] == [0, 1] and saved["training"] == {"gamma": 1, "epochs": 2}
    assert main([*argv[:-3], "--train-option", "gama=1", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "unknown training option(s) ['gama']" in err and "gamma" in err and "Traceback" not in err
    assert main([*argv[:-3], "--train-option", "gamma=2", "--out", str(tmp_path / "y")]) == 2
    assert "gamma" in capsys.readouterr().err
