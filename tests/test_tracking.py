"""How a run reports: tables on stdout and log lines on stderr, a sweep's worker lines with their
cell id, and ``--log tensorboard|mlflow`` read back from their local stores.

The tracking tests need the optional extras (``pip install '.[tensorboard,mlflow]'``; the test
extra and CI install them) and skip without them.
"""

from __future__ import annotations

import logging
import math
import sys

import pytest

from poisonreach import io
from poisonreach.attacks import PoisonResult
from poisonreach.cli import main
from poisonreach.experiments.config import RunConfig, load_data
from poisonreach.experiments.run import fitter
from poisonreach.experiments.tracking import Tracking, key

# 300 digits, short training and GC: a few seconds a run
FAST = ["--train-size", "300", "--train-epochs", "3", "--attack", "gc-pgd", "--attack-option", "epochs=5", "--eps-w", "0.3",
        "--eps-d", "0.1", "0.5", "--threads", "1"]
TRAINED = {"clean_model", "eps_d_0.1/retrained_model", "eps_d_0.5/retrained_model"}  # the GradPC target is not trained


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def history(run_dir, eps_d) -> list[float]:
    return PoisonResult.load(run_dir / f"eps_d={eps_d:g}").grad_norm_history


def clean_losses() -> list[float]:
    """The clean model's loss per epoch, from a training of its own with the run's settings."""
    config = RunConfig(train_size=300, training={"epochs": 3}, eps_w=0.3)
    splits, spec = load_data(config)
    seen = []
    fitter(config, spec, callback=lambda step, values: seen.append(values["loss"]))(splits.x_train, splits.y_train)
    return seen


# --------------------------------------------------------------------------------------------------
# log lines
# --------------------------------------------------------------------------------------------------


def test_the_table_goes_to_stdout_and_the_log_to_stderr(tmp_path, capsys):
    code, out, err = run_cli(capsys, "run", *FAST, "--out", str(tmp_path / "run"))
    assert code == 0
    assert "poisoned acc" in out and "acc drop" in out and "digits: 300 train" not in out
    assert "digits: 300 train" in err and "eps_d=0.5: poisoned accuracy" in err and "poisoned acc " not in err
    assert all(line[2] == ":" and line[5] == ":" for line in err.splitlines() if not line.startswith("run folder"))  # HH:MM:SS
    # --quiet: the table alone on stdout, no log line
    code, out, err = run_cli(capsys, "run", *FAST, "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0 and "poisoned acc" in out and err.splitlines() == [f"run folder: {tmp_path / 'run'}"]
    # the command leaves the logging configuration as it found it
    assert logging.getLogger("poisonreach").level == logging.NOTSET
    assert not [h for h in logging.getLogger().handlers if type(h).__name__ == "_Console"]


def test_a_warning_says_so(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--train-size", "300", "--eps-d", "0.1", "--attack", "labelflip", "--protocol", "converged",
                           "--train-option", "max_iterations=2", "--out", str(tmp_path / "run"), "--quiet")
    assert code == 0 and " warning: minimize stopped at gradient norm" in err


# --------------------------------------------------------------------------------------------------
# tracking: common
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_missing_package_is_one_line_naming_the_extra(backend, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, backend, None)  # import fails as if not installed
    code, _, err = run_cli(capsys, "run", *FAST, "--out", str(tmp_path / "run"), "--log", backend)
    assert code == 2 and err.strip() == (f"poisonreach: error: --log {backend} needs the {backend} package: "
                                         f"pip install 'poisonreach[{backend}]'")
    assert not (tmp_path / "run").exists()  # checked before anything is written


def test_log_uri_needs_log(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", *FAST, "--out", str(tmp_path / "run"), "--log-uri", str(tmp_path / "store"))
    assert code == 2 and "--log-uri says where --log writes" in err and len(err.strip().splitlines()) == 1


def test_record_names_are_valid_for_both_backends():
    assert key("train", "eps_d=0.1/retrained_model_seed=2", "loss") == "train/eps_d_0.1/retrained_model_seed_2/loss"
    assert key("eps_d=1e-05", "grad_norm") == "eps_d_1e-05/grad_norm"
    with pytest.raises(Exception, match="log"):
        Tracking("wandb")


# --------------------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------------------


def events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def test_tensorboard_records_config_gc_history_losses_and_final_numbers(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, "run", *FAST, "--out", str(run_dir), "--log", "tensorboard")
    assert code == 0
    ea, metrics = events(run_dir / "tensorboard"), io.read_json(run_dir / "metrics.json")
    text = ea.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "dataset: digits" in text and "epochs: 5" in text
    for eps_d in (0.1, 0.5):  # ‖g(χ)‖ per GC epoch, step 0 before the first update
        points = ea.Scalars(f"eps_d_{eps_d:g}/grad_norm")
        assert [p.step for p in points] == list(range(6))
        assert [p.value for p in points] == pytest.approx(history(run_dir, eps_d), rel=1e-6)
    trained = {tag.removeprefix("train/").removesuffix("/loss") for tag in ea.Tags()["scalars"] if tag.startswith("train/")}
    assert trained == TRAINED
    assert [(p.step, p.value) for p in ea.Scalars("train/clean_model/loss")] == [
        (s, pytest.approx(v, rel=1e-6)) for s, v in zip((1, 2, 3), clean_losses())]
    # the final numbers beside the configuration (HPARAMS)
    assert ea.Scalars("clean_acc")[0].value == pytest.approx(metrics["clean_acc"], rel=1e-6)
    assert ea.Scalars("eps_d_0.5/acc_drop")[0].value == pytest.approx(metrics["results"][1]["acc_drop"], rel=1e-6)
    session = next(HParamsPluginData.FromString(c).session_start_info for c in ea.PluginTagToContent("hparams").values()
                   if HParamsPluginData.FromString(c).HasField("session_start_info"))
    assert session.hparams["eps_w"].number_value == pytest.approx(0.3) and session.hparams["attack"].string_value == "gc-pgd"
    assert session.hparams["attack_options.epochs"].number_value == 5


def test_tensorboard_log_uri_holds_a_folder_per_run(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    code, _, _ = run_cli(capsys, "run", *FAST, "--out", str(tmp_path / "run"), "--log", "tensorboard", "--log-uri", str(tmp_path / "tb"))
    assert code == 0 and not (tmp_path / "run" / "tensorboard").exists()
    assert [p.value for p in events(tmp_path / "tb" / "run").Scalars("eps_d_0.1/grad_norm")] == pytest.approx(
        history(tmp_path / "run", 0.1), rel=1e-6)


@pytest.mark.slow
def test_a_parallel_sweep_prints_its_table_logs_its_workers_lines_with_their_cells_and_records_each_cell(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    code, out, err = run_cli(capsys, "sweep", "smoke", "--profile", "tiny", "grid.eps_w=[2.0,3.0]", "--jobs", "2", "--out", str(tmp_path / "sw"),
                             "--log", "tensorboard")
    assert code == 0
    assert out.splitlines()[0].split()[:2] == ["cell", "eps_d"] and "[eps_w=" not in out
    for cell in ("eps_w=2", "eps_w=3"):
        # lines the workers logged reach this process's stderr, each with its cell id
        assert any(f" [{cell}] digits: 100 train" in line for line in err.splitlines())
        assert any(f" [{cell}] eps_d=0.1: poisoned accuracy" in line for line in err.splitlines())
        assert [p.value for p in events(tmp_path / "sw" / "tensorboard" / cell).Scalars("eps_d_0.1/grad_norm")] == pytest.approx(
            history(tmp_path / "sw" / "cells" / cell, 0.1), rel=1e-6)


# --------------------------------------------------------------------------------------------------
# MLflow
# --------------------------------------------------------------------------------------------------


def mlflow_runs(uri: str, experiment: str = "poisonreach"):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time ASC"])


def test_mlflow_records_config_gc_history_losses_and_final_numbers(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "run"
    code, _, _ = run_cli(capsys, "run", *FAST, "--out", str(run_dir), "--log", "mlflow")
    assert code == 0
    client, (record,) = mlflow_runs((run_dir / "mlruns").as_uri())
    metrics = io.read_json(run_dir / "metrics.json")
    assert record.info.status == "FINISHED" and record.info.run_name == "run"
    params = record.data.params
    assert params["dataset"] == "digits" and float(params["eps_w"]) == 0.3 and params["attack_options.epochs"] == "5"
    assert params["eps_d"] == "[0.1, 0.5]" and params["victim_seeds"] == "null"
    for eps_d in (0.1, 0.5):
        points = sorted(client.get_metric_history(record.info.run_id, f"eps_d_{eps_d:g}/grad_norm"), key=lambda m: m.step)
        assert [p.step for p in points] == list(range(6)) and [p.value for p in points] == history(run_dir, eps_d)
    losses = sorted(client.get_metric_history(record.info.run_id, "train/clean_model/loss"), key=lambda m: m.step)
    assert [(p.step, p.value) for p in losses] == list(zip((1, 2, 3), clean_losses()))
    assert {k.removeprefix("train/").removesuffix("/loss") for k in record.data.metrics if k.startswith("train/")} == TRAINED
    assert record.data.metrics["clean_acc"] == metrics["clean_acc"] and record.data.metrics["tau"] == metrics["tau"]
    assert record.data.metrics["eps_d_0.1/acc_drop"] == metrics["results"][0]["acc_drop"]
    assert math.isclose(record.data.metrics["eps_d_0.5/grad_norm_ratio"], metrics["results"][1]["grad_norm_ratio"])

    # the same command again: a second MLflow run, the cells read back and recorded, no model trained
    code, _, _ = run_cli(capsys, "run", *FAST, "--out", str(run_dir), "--log", "mlflow")
    _, (_, again) = mlflow_runs((run_dir / "mlruns").as_uri())
    assert not [k for k in again.data.metrics if k.startswith("train/")] and "eps_d_0.1/acc_drop" in again.data.metrics


def test_mlflow_marks_a_failed_run_and_takes_a_log_uri(tmp_path, capsys, monkeypatch):
    pytest.importorskip("mlflow")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = tmp_path / "store"  # a folder: its file: URI
    code, _, err = run_cli(capsys, "run", "--dataset", "or2d", "--model", "cnn", "--out", str(tmp_path / "bad"), "--log", "mlflow",
                           "--log-uri", str(store))
    assert code == 2 and "cnn" in err
    _, (record,) = mlflow_runs(store.as_uri())
    assert record.info.status == "FAILED" and record.info.run_name == "bad" and record.data.params["model"] == "cnn"
    assert not (tmp_path / "bad" / "mlruns").exists()
