"""Progress off a terminal: a log line at most every 30 s, from every long loop, and none from a short one.

The throttling is tested with an injected clock, never by sleeping: a clock that returns the times
it is given, one per call, or that advances a fixed step per call (every step then outlasts the
interval, so every loop logs at each step: that shows which loops report through the helper).
"""

from __future__ import annotations

import io
import itertools
import logging

import pytest

from poisonreach import data, models, progress, training
from poisonreach.attacks import GaussNewtonCanceling, GradientCanceling
from poisonreach.experiments.sweep import load_sweep, run_sweep
from poisonreach.progress import Progress, duration
from test_sweep import FAKE, FakeRunner, write


@pytest.fixture
def off_terminal(monkeypatch):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: False)


def clock(*times):
    """A clock returning ``times`` one call after the other."""
    it = iter(times)
    return lambda: next(it)


def lines(caplog, name="poisonreach.progress"):
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_lines_come_at_the_first_step_30_s_after_the_previous_one(off_terminal, caplog):
    # the start, then one reading per step (5 steps), then the end
    times = clock(0.0, 10.0, 29.9, 30.0, 45.0, 61.0, 70.0)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        bar = Progress(range(5), desc="GC", clock=times)
        for i in bar:
            bar.set_postfix(ratio=f"{0.5 ** i:.3g}")
        bar.close()
    # step 3 at 30.0 s (30 s after the start) and step 5 at 61.0 s (31 s after that); then the end
    assert lines(caplog) == ["GC: 3/5 it, ratio 0.25, 30 s", "GC: 5/5 it, ratio 0.0625, 1 min 01 s",
                             "GC: done, 5/5 it, ratio 0.0625, 1 min 10 s"]


def test_a_short_loop_says_nothing(off_terminal, caplog):
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        with Progress(total=100, desc="train", unit="epoch", clock=itertools.count(0.0, 0.29).__next__) as bar:
            for _ in range(100):
                bar.update()
    assert lines(caplog) == [] and bar.n == 100  # 29 s in all


def test_updates_count_and_report_the_total(off_terminal, caplog):
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        with Progress(total=100, desc="minimize", clock=clock(0.0, 40.0, 50.0, 75.0, 80.0)) as bar:
            for n in (25, 25, 25):
                bar.update(n)
                bar.set_postfix(grad_norm="1e-3")
    # 40 s: a line (postfix not yet set); 50 s: 10 s later, none; 75 s: 35 s later, a line; the end
    assert lines(caplog) == ["minimize: 25/100 it, 40 s", "minimize: 75/100 it, grad_norm 1e-3, 1 min 15 s",
                             "minimize: done, 75/100 it, grad_norm 1e-3, 1 min 20 s"]


@pytest.mark.parametrize("show, terminal, bar_on", [(False, False, False), (None, True, True), (True, False, True), (False, True, False)])
def test_no_lines_where_a_bar_is_drawn_or_progress_is_off(monkeypatch, caplog, show, terminal, bar_on):
    monkeypatch.setattr(progress, "stderr_is_terminal", lambda: terminal)
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        bar = Progress(range(3), desc="x", show=show, clock=itertools.count(0.0, 100.0).__next__, file=io.StringIO())
        drawn = not bar.bar.disable
        list(bar)
        bar.close()
    assert lines(caplog) == [] and drawn == bar_on


def test_a_library_user_without_logging_sees_no_line(off_terminal, capsys):
    # no handler configured: INFO records are dropped (logging's last resort shows warnings only)
    list(Progress(range(3), desc="quiet", clock=itertools.count(0.0, 100.0).__next__))
    assert capsys.readouterr().err == ""


def test_duration():
    assert [duration(s) for s in (0.4, 59.4, 60, 199.6, 3600, 7500)] == ["0 s", "59 s", "1 min 00 s", "3 min 20 s", "1 h 00 min",
                                                                        "2 h 05 min"]


# --------------------------------------------------------------------------------------------------
# the library's long loops report through the helper
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def slow_clock(monkeypatch, off_terminal):
    """Every reading of the clock 31 s after the previous one: each step of a loop outlasts the interval."""
    monkeypatch.setattr(progress, "monotonic", itertools.count(0.0, 31.0).__next__)


@pytest.fixture(scope="module")
def digits():
    s = data.load("digits", seed=0).subset(200, seed=0)
    return s, models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)


def test_training_epochs_and_lbfgs_rounds_are_reported(slow_clock, digits, caplog):
    s, model = digits
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        training.train(model, s.x_train, s.y_train, epochs=3, batch_size=32)
        training.minimize(model, s.x_train, s.y_train, max_iterations=50)
    epochs = [m for m in lines(caplog, "poisonreach.training") if m.startswith("train: ")]
    assert [m.split(",")[0] for m in epochs] == ["train: 1/3 epoch", "train: 2/3 epoch", "train: 3/3 epoch", "train: done"]
    assert all("loss " in m for m in epochs)
    rounds = [m for m in lines(caplog, "poisonreach.training") if m.startswith("minimize: ")]
    assert rounds and "grad_norm " in rounds[0] and rounds[-1].startswith("minimize: done")


def test_gc_solvers_report_their_iterations(slow_clock, digits, caplog):
    s, model = digits
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        GaussNewtonCanceling(0.1, iterations=2, tolerance=0.0).poison(model, s.x_train, s.y_train)
        GradientCanceling(0.1, epochs=2).poison(model, s.x_train, s.y_train)
    gn = lines(caplog, "poisonreach.attacks.gauss_newton")
    assert gn[0].startswith("GC-GN eps_d=0.1: 1/2 it, ratio ") and gn[-1].startswith("GC-GN eps_d=0.1: done, 2/2 it")
    assert lines(caplog, "poisonreach.attacks.gradient_canceling")[0].startswith("GC eps_d=0.1: 1/3 it, grad_norm ")


def test_a_sweep_reports_its_cells(slow_clock, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        run_sweep(load_sweep(write(tmp_path, FAKE), lookup=None), tmp_path / "out", runner=FakeRunner())
    assert [m for m in lines(caplog, "poisonreach.experiments.sweep") if "/4 cells" in m][:2] == [
        "sweep fake: 1/4 cells, 31 s", "sweep fake: 2/4 cells, 1 min 02 s"]


def test_progress_flag_off_silences_the_lines(slow_clock, digits, caplog):
    s, model = digits
    with caplog.at_level(logging.INFO, logger="poisonreach"):
        training.train(model, s.x_train, s.y_train, epochs=2, batch_size=32, progress=False)
        GaussNewtonCanceling(0.1, iterations=2, progress=False).poison(model, s.x_train, s.y_train)
    assert caplog.records == []
