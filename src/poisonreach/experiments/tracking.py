"""How a run reports: log lines on stderr, and experiment tracking (``--log tensorboard|mlflow``).

:func:`console_logging` is what the command line does with the library's :mod:`logging` records:
the ``poisonreach`` loggers at INFO (WARNING with ``--quiet``), each line on stderr as
``HH:MM:SS message`` ("warning: " before a warning), written through tqdm so that a progress bar
on a terminal is not cut. Tables go to stdout.

``--log tensorboard`` and ``--log mlflow`` (:class:`Tracking`; the optional extras
``poisonreach[tensorboard]`` and ``poisonreach[mlflow]``) record every invocation of a run in a
local store, no server needed: TensorBoard event files in ``RUN/tensorboard/`` (``--log-uri DIR``:
in ``DIR/<run folder name>/``), an MLflow file store in ``RUN/mlruns/`` (``--log-uri``: any MLflow
tracking URI, or a folder), one MLflow run named after the run folder. The names are the same in
both:

    config (params)             the resolved configuration, flattened (``attack_options.epochs``);
                                in TensorBoard also as text, and with the final numbers in HPARAMS
    train/<model>/loss          per epoch, the mean training loss of each model the run trains,
                                named by its file (``clean_model``, ``eps_d_0.1/retrained_model``);
                                under ``--protocol converged`` ``objective`` and ``grad_norm`` per
                                round of L-BFGS iterations (step: the iterations done)
    eps_d_<E>/grad_norm         ‖g(χ)‖ = ‖g(µ) + ε_d·g(ν̂)‖ at the target per attack iteration (the
                                poisons' history; step 0 before the first update), for the attacks
                                that track it
    eps_d_<E>/<field>           the cell's numbers: poisoned_acc, acc_drop, target_agreement,
                                grad_norm_ratio, victim_grad_norm, ... (as in result.json)
    <field>                     the run's numbers: clean_acc, target_acc, tau, clean_grad_norm, ...

A model loaded from the run folder (a resumed run) was not trained by this invocation and has no
losses to record; everything else is recorded again from the folder. A run that fails is marked
FAILED in MLflow.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from .. import io
from ..errors import PoisonReachError
from ..validation import check_choice

# backend → the default store inside a run folder (not a result of the run: run.py ignores it)
FOLDERS = {"tensorboard": "tensorboard", "mlflow": "mlruns"}
BACKENDS = tuple(FOLDERS)


# --------------------------------------------------------------------------------------------------
# log lines
# --------------------------------------------------------------------------------------------------


class _Console(logging.Handler):
    """Records on the current stderr (looked up at each line), through tqdm.write so that a bar
    being drawn is moved below the line rather than cut."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # logging's own convention: a failing handler reports, never raises
            self.handleError(record)


class _Format(logging.Formatter):
    """``HH:MM:SS message``; ``HH:MM:SS warning: message`` from WARNING up."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        label = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.formatTime(record, '%H:%M:%S')} {label}{record.message}"


@contextmanager
def console_logging(quiet: bool = False):
    """Show the library's log records on stderr meanwhile (INFO and up; WARNING and up when
    ``quiet``); the logging configuration is restored afterwards."""
    root, package = logging.getLogger(), logging.getLogger("poisonreach")
    handler, level = _Console(), package.level
    handler.setFormatter(_Format())
    root.addHandler(handler)
    package.setLevel(logging.WARNING if quiet else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        package.setLevel(level)


def discard_stdout() -> None:
    """Send what is left of stdout to the null device: its reader has gone (``poisonreach options |
    head``), and the flush at exit would otherwise raise ``BrokenPipeError`` a second time."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# --------------------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser, *, store: str) -> None:
    """``--log`` and ``--log-uri``; ``store`` says where the default store is (for the help)."""
    p.add_argument("--log", choices=BACKENDS, default=None,
                   help="record the configuration, GC's ‖g(χ)‖ per iteration, the training losses and the final numbers: "
                        f"tensorboard (event files; pip install 'poisonreach[tensorboard]') or mlflow (a file store; pip "
                        f"install 'poisonreach[mlflow]'), in {store} (default: none)")
    p.add_argument("--log-uri", default=None, metavar="URI",
                   help="where --log writes instead: a folder for tensorboard (a subfolder per run), a folder or an MLflow "
                        f"tracking URI (e.g. file:PATH) for mlflow (default: {store})")


def from_arguments(args: argparse.Namespace, **settings) -> "Tracking | None":
    """The :class:`Tracking` that ``--log`` and ``--log-uri`` ask for (None without ``--log``),
    its package checked; ``settings`` are the other fields (``uri`` the default store)."""
    if args.log is None:
        if args.log_uri is not None:
            raise PoisonReachError("--log-uri says where --log writes: add --log tensorboard or --log mlflow")
        return None
    tracking = Tracking(args.log, **{**settings, **({"uri": args.log_uri} if args.log_uri is not None else {})})
    tracking.check()
    return tracking


@dataclass(frozen=True)
class Tracking:
    """What ``--log`` asks for: a backend (:data:`BACKENDS`), where it writes (``uri``; None: in the
    run folder) and the MLflow experiment. Plain data, so a sweep hands it to its worker processes,
    each of which opens its cells' trackers."""

    backend: str
    uri: str | None = None
    experiment: str = "poisonreach"

    def __post_init__(self):
        check_choice("log", self.backend, BACKENDS)

    def check(self) -> None:
        """Fail now, in one line, when the backend's package is not installed."""
        try:
            importlib.import_module(self.backend)
        except ImportError:
            raise PoisonReachError(f"--log {self.backend} needs the {self.backend} package: pip install "
                                   f"'poisonreach[{self.backend}]'") from None

    def open(self, run_dir: str | os.PathLike, config: dict) -> "Tracker":
        """A tracker for the run in ``run_dir`` with configuration ``config``, which it records."""
        self.check()
        run_dir = Path(run_dir)
        if self.backend == "tensorboard":
            folder = run_dir / FOLDERS["tensorboard"] if self.uri is None else Path(self.uri) / run_dir.name
            return _TensorBoard(config, folder)
        uri = (run_dir / FOLDERS["mlflow"]).resolve().as_uri() if self.uri is None else _as_uri(self.uri)
        return _MLflow(config, uri, self.experiment, run_dir)


def open_tracker(tracking: Tracking | None, run_dir: str | os.PathLike, config: dict) -> "Tracker":
    """``tracking``'s tracker, or one that records nothing."""
    return Tracker() if tracking is None else tracking.open(run_dir, config)


def _as_uri(uri: str) -> str:
    """A URI as given (it has a scheme), a folder as its file: URI."""
    return uri if re.match(r"^[A-Za-z][\w+.-]+:", uri) else Path(uri).resolve().as_uri()


def key(*parts: str) -> str:
    """A record's name: the parts joined by "/", with what MLflow refuses in a name ("=" of the
    cell folders, among others) replaced by "_", so both backends show the same names."""
    return re.sub(r"[^\w./ :-]", "_", "/".join(parts))


class Tracker:
    """What a run tells its tracker; this one records nothing (no ``--log``). A context manager:
    leaving it closes the store, marking the run failed on an exception."""

    def training_step(self, step: int, values: dict) -> None:
        """The ``callback`` of every training the run does (:func:`poisonreach.training.train`)."""

    def trained(self, name: str) -> None:
        """The model last trained was saved as ``name`` (its file in the run folder, no suffix)."""

    def cell(self, entry: dict, folder: Path) -> None:
        """One ε_d finished: its result and its folder (the poisons' history is in poisons.json)."""

    def finish(self, metrics: dict) -> None:
        """The run finished with ``metrics`` (metrics.json)."""

    def close(self, failed: bool = False) -> None:
        """Write out and close the store."""

    def __enter__(self) -> "Tracker":
        return self

    def __exit__(self, kind, value, traceback) -> None:
        self.close(failed=kind is not None)


class _Recording(Tracker):
    """The records common to the backends (module docstring), over three primitives: ``_start``
    records the configuration, ``_write`` series as (name, step, value) triples, ``_final`` final
    numbers by name; and ``close``."""

    def __init__(self, config: dict):
        self.config = io.plain(config)
        self.params = _flat(self.config)
        self._steps: list[tuple[int, dict]] = []  # the current training's, until its model is saved
        self._start()

    def training_step(self, step: int, values: dict) -> None:
        self._steps.append((step, values))

    def trained(self, name: str) -> None:
        steps, self._steps = self._steps, []
        self._write([(key("train", name, k), step, value) for step, values in steps for k, value in values.items()])

    def cell(self, entry: dict, folder: Path) -> None:
        record = folder / "poisons.json"
        history = io.read_json(record).get("grad_norm_history", []) if record.is_file() else []
        self._write([(key(folder.name, "grad_norm"), step, float(value)) for step, value in enumerate(history)])
        self._final({key(folder.name, k): v for k, v in _numbers(entry).items() if k != "eps_d"})

    def finish(self, metrics: dict) -> None:
        self._final({key(k): v for k, v in _numbers(metrics).items()})

    def _start(self) -> None:
        raise NotImplementedError

    def _write(self, points: list[tuple[str, int, float]]) -> None:
        raise NotImplementedError

    def _final(self, values: dict[str, float]) -> None:
        raise NotImplementedError


def _flat(config: dict, prefix: str = "") -> dict:
    """A configuration as one level of dotted names; lists, None and empty mappings as JSON text."""
    out = {}
    for name, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


def _numbers(record: dict) -> dict[str, float]:
    """The numeric fields of a result or of metrics.json (not lists, texts, flags or missing values)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class _TensorBoard(_Recording):
    """Event files in ``folder``, written by torch's SummaryWriter (which needs the tensorboard
    package). The final numbers go into the HPARAMS record beside the configuration, at the end of
    the run: a number at one step is no curve."""

    def __init__(self, config: dict, folder: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.final = SummaryWriter(str(folder)), {}
        super().__init__(config)

    def _start(self) -> None:
        text = yaml.safe_dump(self.config, sort_keys=False)
        self.writer.add_text("config", "\n".join("    " + line for line in text.splitlines()))  # a code block in markdown

    def _write(self, points: list[tuple[str, int, float]]) -> None:
        for name, step, value in points:
            self.writer.add_scalar(name, value, step)

    def _final(self, values: dict[str, float]) -> None:
        self.final.update(values)

    def finish(self, metrics: dict) -> None:
        super().finish(metrics)
        self.writer.add_hparams(self.params, self.final, run_name=".")  # "." : this run's folder, not a subfolder

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class _MLflow(_Recording):
    """One MLflow run named after the run folder, in experiment ``experiment`` of the store ``uri``."""

    def __init__(self, config: dict, uri: str, experiment: str, run_dir: Path):
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        if uri.startswith("file:"):
            # MLflow 3 keeps the file store (no server, no database) behind this switch
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client, self.Metric, self.Param = MlflowClient(tracking_uri=uri), Metric, Param
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            try:
                found = self.client.get_experiment(self.client.create_experiment(experiment))
            except MlflowException:  # created meanwhile, by another cell of a parallel sweep
                found = self.client.get_experiment_by_name(experiment)
        self.run_id = self.client.create_run(found.experiment_id, run_name=run_dir.name,
                                             tags={"poisonreach.run_dir": str(run_dir.resolve())}).info.run_id
        super().__init__(config)

    def _start(self) -> None:
        self.client.log_batch(self.run_id, params=[self.Param(k, str(v)) for k, v in self.params.items()])

    def _write(self, points: list[tuple[str, int, float]]) -> None:
        if points:
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[self.Metric(name, value, now, step) for name, step, value in points])

    def _final(self, values: dict[str, float]) -> None:
        self._write([(name, 0, value) for name, value in values.items()])

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
