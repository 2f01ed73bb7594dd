"""Sweeps on Ray (``poisonreach sweep --executor ray``): the same table as the local executor, a
worker killed in the middle of a cell retried from its GC checkpoint, a failing cell reported with
its worker's traceback, and the parameter checks.

Ray runs locally (``ray.init(num_cpus=2)``), started once for the module: its start-up is most of
the time. The runners below are module-level functions, sent to the workers by value
(``ray.cloudpickle.register_pickle_by_value``: the workers cannot import this test module).
"""

from __future__ import annotations

import csv
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

from poisonreach.attacks import gradient_canceling
from poisonreach.attacks.gradient_canceling import GradientCanceling
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.run import run
from poisonreach.experiments.sweep import SweepFailed, load_sweep, run_sweep

# the smoke sweep (two cells, gc-pgd for 20 epochs), GC saving a checkpoint every 5 epochs so that a
# killed cell has one to resume from (checkpoint_every says when to save, never what GC computes)
SMOKE = ("smoke", ["run.attack_options.checkpoint_every=5"])
TIMING = ("wall_time_s",)  # the only column that differs between two runs of the same sweep


def table(out: Path) -> list[dict]:
    """results.csv of a sweep folder without its timing columns, as text."""
    with open(out / "results.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> list[dict]:
    """The smoke sweep's table under the local executor (--jobs 1), on one torch thread as each
    Ray task of one CPU runs, so that the two tables agree to the last digit."""
    out = tmp_path_factory.mktemp("reference") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_sweep(load_sweep(*SMOKE), out)
    finally:
        torch.set_num_threads(threads)
    return table(out)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance of two CPUs for the module, and the runners of this module sent by value."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_DEDUP_LOGS", "0")  # read when ray is imported: every worker line reaches the driver
        ray = pytest.importorskip("ray")
        ray.init(num_cpus=2, include_dashboard=False)
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
        try:
            yield ray
        finally:
            ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
            ray.shutdown()


def wait_for(capfd, patterns: list[str], seconds: float = 30) -> str:
    """stderr of this process, without Ray's colours, until every pattern is found in it (Ray
    forwards a worker's lines a little later)."""
    seen, deadline = "", time.monotonic() + seconds
    while not all(re.search(p, seen, re.MULTILINE) for p in patterns) and time.monotonic() < deadline:
        time.sleep(0.2)
        seen += re.sub(r"\x1b\[[0-9;]*m", "", capfd.readouterr().err)
    return seen


@pytest.mark.slow
def test_ray_gives_the_same_results_csv_as_the_local_executor(tmp_path, reference, ray_local, capfd, caplog):
    """... each cell in its own worker process, its log lines on this process's stderr starting with its cell id."""
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        rows = run_sweep(load_sweep(*SMOKE), out, executor="ray")
    assert table(out) == reference
    assert [r["cell"] for r in rows] == [r["cell"] for r in reference]
    # Ray's prefix names the task and its worker, then comes the worker's own line, which starts with the cell id
    lines = [rf"^\(cell {re.escape(cell)} pid=(\d+)[^)]*\) \d\d:\d\d:\d\d \[{re.escape(cell)}\] digits: 300 train" for cell in ("eps_w=2", "eps_w=3")]
    err = wait_for(capfd, lines)
    found = [re.search(line, err, re.MULTILINE) for line in lines]
    assert all(found), err[-3000:]
    assert os.getpid() not in {int(f.group(1)) for f in found}  # made in the workers
    assert ray_local.is_initialized()  # a connection the caller made is the caller's to end


def dies_after_the_first_checkpoint(config, out, tracking=None):
    """``run``, whose worker is killed (SIGKILL) right after GC's first checkpoint on the first
    attempt at a cell; on the next one, ``run`` noting the epoch GC resumed from.

    The attempts are told apart by marker files beside the sweep's cells/ folder:
    ``<cell>.died`` (the epoch of the checkpoint the worker died after) and ``<cell>.resumed``."""
    cell, folder = Path(out).name, Path(out).parent.parent
    died, resumed = folder / f"{cell}.died", folder / f"{cell}.resumed"
    if not died.exists():
        save = GradientCanceling._save_checkpoint

        def save_then_die(self, fingerprint, state):
            save(self, fingerprint, state)
            died.write_text(str(state.epoch))
            os.kill(os.getpid(), signal.SIGKILL)

        GradientCanceling._save_checkpoint = save_then_die
        try:
            return run(config, out, tracking=tracking)
        finally:
            GradientCanceling._save_checkpoint = save
    load = gradient_canceling.load_checkpoint

    def noting_load(path, fingerprint, device):
        state = load(path, fingerprint, device)
        if state is not None:
            resumed.write_text(str(state["epoch"]))
        return state

    gradient_canceling.load_checkpoint = noting_load
    try:
        return run(config, out, tracking=tracking)
    finally:
        gradient_canceling.load_checkpoint = load


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_resumes_from_its_checkpoint(tmp_path, reference, ray_local):
    out, (name, overrides) = tmp_path / "out", SMOKE
    run_sweep(load_sweep(name, [*overrides, "grid.eps_w=[2.0]"]), out, executor="ray", retries=1, runner=dies_after_the_first_checkpoint)
    assert (out / "eps_w=2.died").read_text() == "5"  # the first worker died after the checkpoint of epoch 5 ...
    assert (out / "eps_w=2.resumed").read_text() == "5"  # ... and the retry went on from it
    assert not (out / "cells" / "eps_w=2" / "eps_d=0.1" / "checkpoint.pt").exists()  # spent once the poisons were saved
    assert not (out / "errors").exists()
    assert table(out) == [row for row in reference if row["cell"] == "eps_w=2"]


def fails(config, out, tracking=None):
    """A cell that raises: noted in ``<cell>.tries`` beside the sweep's cells/ folder, then a RuntimeError."""
    tries = Path(out).parent.parent / f"{Path(out).name}.tries"
    tries.write_text(tries.read_text() + "x" if tries.exists() else "x")
    raise RuntimeError(f"boom in {Path(out).name}")


def test_a_failing_cell_is_reported_with_its_workers_traceback_and_not_retried(tmp_path, ray_local):
    out = tmp_path / "out"
    with pytest.raises(SweepFailed) as info:
        run_sweep(load_sweep("smoke", ["grid.eps_w=[2.0]"]), out, executor="ray", runner=fails)
    assert info.value.failures == {"eps_w=2": "RuntimeError: boom in eps_w=2"}  # the cell's own error, as the local executor reports it
    assert (out / "eps_w=2.tries").read_text() == "x"  # an exception is the cell's, not the worker's death: no retry
    report = (out / "errors" / "eps_w=2.txt").read_text()
    assert "WorkerTraceback" in report and "in fails" in report and "\x1b[" not in report  # where the worker raised it


# --------------------------------------------------------------------------------------------------
# starting and stopping Ray, parameters (no Ray needed)
# --------------------------------------------------------------------------------------------------


class FakeRay:
    """Ray's API as the executor uses it, noting each call; a task runs in this process when its
    result is asked for, and an exception it raises comes wrapped as Ray wraps it."""

    class exceptions:
        class RayError(Exception):
            pass

        class RayTaskError(RayError):
            cause = None

    class Ref:
        def __init__(self, call):
            self.call = call

    def __init__(self):
        self.calls = []

    def is_initialized(self):
        return False

    def init(self, address=None):
        self.calls.append(("init", address))

    def shutdown(self):
        self.calls.append(("shutdown",))

    def remote(self, **options):
        fake = self

        class Task:
            def options(self, name):
                return self

            def remote(self, job, args, threads, quiet):
                fake.calls.append(("task", options, threads))
                return FakeRay.Ref(lambda: job(*args))

        return lambda function: Task()

    def wait(self, refs):
        return refs[:1], refs[1:]

    def get(self, ref):
        try:
            return ref.call()
        except Exception as e:
            error = self.exceptions.RayTaskError(f"\x1b[36mray::cell\x1b[39m (pid=1)\n{type(e).__name__}: {e}")
            error.cause = e
            raise error from None

    def cancel(self, ref, force):
        self.calls.append(("cancel",))


def interrupted(config, out, tracking=None):
    raise KeyboardInterrupt


def test_ray_started_for_the_sweep_is_stopped_after_it_and_gets_the_sweeps_resources(tmp_path, monkeypatch):
    from poisonreach.experiments import ray_executor

    fake = FakeRay()
    monkeypatch.setattr(ray_executor, "require", lambda: fake)
    sweep = load_sweep("smoke", ["resources.num_cpus=2.5"])
    with pytest.raises(SweepFailed):
        run_sweep(sweep, tmp_path / "a", executor="ray", address="127.0.0.1:6379", retries=3, runner=fails)
    task = ("task", {"num_cpus": 2.5, "num_gpus": 0, "max_retries": 3}, 2)  # torch on 2 of the 2.5 CPUs
    assert fake.calls == [("init", "127.0.0.1:6379"), task, task, ("shutdown",)]
    assert "\x1b[" not in (tmp_path / "a" / "errors" / "eps_w=2.txt").read_text()  # Ray's colours left out

    fake.calls.clear()  # an interruption cancels the cells still running, and Ray still stops
    with pytest.raises(KeyboardInterrupt):
        run_sweep(sweep, tmp_path / "b", executor="ray", runner=interrupted)
    task = ("task", {"num_cpus": 2.5, "num_gpus": 0, "max_retries": 2}, 2)  # two retries by default
    assert fake.calls == [("init", None), task, task, ("cancel",), ("shutdown",)]


@pytest.mark.parametrize("options, fragment", [
    (dict(executor="dask"), "executor must be one of ['local', 'ray'], got 'dask'"),
    (dict(executor="ray", jobs=2), "jobs 2 (--jobs) asks for local worker processes"),
    (dict(address="127.0.0.1:6379"), "settings of the ray executor"),
    (dict(retries=3), "settings of the ray executor"),
    (dict(executor="ray", retries=-1), "retries must be >= 0"),
])
def test_executor_parameters_are_checked_before_anything_is_written(tmp_path, options, fragment):
    with pytest.raises(PoisonReachError, match=re.escape(fragment)):
        run_sweep(load_sweep("smoke"), tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


def test_without_ray_the_error_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(PoisonReachError) as info:
        run_sweep(load_sweep("smoke"), tmp_path / "out", executor="ray")
    assert str(info.value) == "--executor ray needs Ray: pip install 'poisonreach[ray]'"
    assert not (tmp_path / "out").exists()

    assert main(["sweep", "smoke", "--executor", "ray", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == "poisonreach: error: --executor ray needs Ray: pip install 'poisonreach[ray]'\n"


def test_an_unknown_executor_is_refused_by_the_command_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sweep", "smoke", "--executor", "dask"])
    assert info.value.code == 2
    assert "invalid choice: 'dask'" in capsys.readouterr().err
