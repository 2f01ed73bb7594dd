"""The sweep engine: every cell of a sweep file, resumable, optionally in parallel, and its table.

    poisonreach sweep NAME|FILE [KEY=VALUE ...] [--profile cpu] [--jobs N] [--out DIR] [--dry-run] [--log tensorboard|mlflow]
                      [--executor local|ray] [--address ADDR] [--retries N]

NAME is a sweep shipped with the package (the paper's tables and figures, e.g. table2-mnist), FILE
the path of a user's sweep file; the format and its layers (defaults, file, profile, overrides) are
those of :mod:`poisonreach.experiments.sweep_file`. A sweep folder (default ``sweeps/<name>``, or
``sweeps/<name>-<profile>``) holds:

    sweep.yaml              the resolved sweep; a folder holding other settings (run, grid,
                            defenses; run.eps_d, run.victim_seeds, run.data_root and run.device
                            excepted) is refused, as ``run`` refuses a folder of another run
    cells/<cell_id>/        one run folder per cell (:func:`poisonreach.experiments.run.run`), named
                            by its grid values, e.g. ``cells/model=lr,attack=gc``
    results.csv             one row per cell, ε_d and defense (:data:`COLUMNS`), rewritten atomically
                            whenever a cell finishes
    errors/<cell_id>.txt    the traceback of a cell that failed (removed once it succeeds)
    tensorboard/<cell_id>/, mlruns/
                            with ``--log tensorboard`` or ``--log mlflow``: every cell's record
                            (:mod:`poisonreach.experiments.tracking`; MLflow's experiment is the
                            sweep's name, its runs the cell ids)

Resuming: a cell whose folder holds metrics.json and the cell's own config.yaml (and the results of
every defense of the sweep) is read back, not rerun; any other cell is handed to the runner, which
resumes a half-written run folder itself. ``run.eps_d`` and ``run.victim_seeds`` may change between
invocations: the cells' runs then compute the new budgets and seeds only. Running the same command
again therefore continues a killed sweep and retries its failed cells.

Parallel cells (``jobs`` > 1) run in worker processes started with "spawn" (torch does not survive
fork), each pinned to its own share of the cores: a disjoint CPU set (``os.sched_setaffinity`` where
the platform has it) and ``len(cores) // jobs`` torch and OpenMP threads. Every log record made
while a cell runs, in a worker or in this process, starts each line with ``[cell_id]``; a worker's
records are sent to this process and handled by its loggers (so they reach its stderr, or whatever
handlers it has). A failing cell is reported and the others go on; the sweep then raises
:class:`SweepFailed` (the CLI exits with status 1) after writing the table of the finished cells.

``--executor ray`` (the extra ``pip install 'poisonreach[ray]'``;
:mod:`poisonreach.experiments.ray_executor`) runs each cell as a Ray task instead, on this machine
or on the cluster ``--address`` names (``ray start --head`` on one machine, ``ray start --address
HEAD:6379`` on the others; docs/scaling.md). A task reserves the sweep file's ``resources``
(``num_cpus``, ``num_gpus``; default one CPU) and runs torch on ``num_cpus`` threads, so Ray runs
as many cells at once as the cluster holds and ``--jobs`` stays 1. The cells write the same
folders and this process the same results.csv as the local executor; ``--out`` must be a folder
that every machine sees at the same path (a shared file system). A cell whose worker dies is run
again (``--retries``, default 2) and resumes from its folder and GC checkpoint. Log lines start
with ``[cell_id]`` as above; Ray shows a worker's in this process's stderr. Ray that the sweep
started is stopped when it ends.

Rows: the cell id, the grid axes not among the fixed columns, dataset, model, victim_model (a
transfer victim's architecture, else empty), eps_w, attack, defense, eps_d (as configured: a number
or "tau"), clean_acc, victim_clean_acc (a transfer victim's clean model, the reference of its drops),
target_acc, tau, poisoned_acc, acc_drop (clean − poisoned, percentage points), defended_acc, recovered, grad_norm_ratio
(‖g(µ) + ε_d·g(ν̂)‖ / ‖g(µ)‖ at the target), residual_floor_ratio (the least that ratio can be with
poisons in the box, certified, for GC on a linear model; else empty), param_distance, target_agreement (% of test points
where the victim predicts as the target does), the training-gradient norms clean_grad_norm,
target_grad_norm and victim_grad_norm, with victim seeds their list and poisoned_acc, acc_drop and
target_agreement as _mean and _std over them, wall_time_s and paper_acc_drop (the paper's drop,
clean − attacked as acc_drop is, whatever sign the paper prints; or empty:
:mod:`poisonreach.experiments.paper`). In a defense row acc_drop is the drop after the defense and
paper_acc_drop the paper's drop after it (Tables 3, 4 and 8); poisoned_acc stays undefended. A run
without ε_d has one row about its target: attack is the target's name and acc_drop its drop.
"""

from __future__ import annotations

import argparse
import csv
import io as _io
import json
import logging
import logging.handlers
import math
import multiprocessing
import os
import sys
import threading
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path

from .. import io
from ..errors import CorruptFileError, PoisonReachError
from ..progress import Progress
from ..validation import check_choice, check_number
from . import tracking as tracking_module
from .config import ADDITIVE_FIELDS, RUNTIME_FIELDS, RunConfig, available_cores, set_worker_threads
from .defend import defend
from .run import run, text_table
from .sweep_file import SETTINGS, Sweep, load_sweep, shipped_sweeps, target_label
from .tracking import Tracking

__all__ = ["COLUMNS", "EXECUTORS", "HEADERS", "OFFICIAL_COLUMNS", "SEED_COLUMNS", "Sweep", "SweepFailed", "add_arguments", "command", "default_out", "describe",
           "format_results", "load_sweep", "run_sweep", "show", "show_cell", "shown_columns", "write_results"]

logger = logging.getLogger(__name__)

EXECUTORS = ("local", "ray")  # where the cells run: this machine's processes (jobs), or Ray tasks

# accuracies are NaN for regression, which reports test MSE instead (Figure 5); param_distance is
# ‖w_retrained − w_target‖ and target_agreement the % of test points where victim and target predict
# alike, how close the victim came to the target; *_grad_norm are training-gradient norms (the
# convergence check); victim_seeds ("0 1 2") and the *_mean/*_std over them when the run has them
SEED_COLUMNS = ["victim_seeds", "poisoned_acc_mean", "poisoned_acc_std", "acc_drop_mean", "acc_drop_std",
                "target_agreement_mean", "target_agreement_std"]
# under the official protocol (run.protocol: official): the victim's test accuracy over its epochs and
# the drop against the official retraining on clean data (acc_drop is against the Adadelta clean model)
OFFICIAL_COLUMNS = ["retrain_acc_min", "retrain_acc_median", "retrain_acc_max", "acc_drop_vs_official_clean"]
COLUMNS = ["dataset", "model", "victim_model", "eps_w", "attack", "protocol", "defense", "eps_d", "selected_target", "clean_acc", "victim_clean_acc",
           "target_acc", "clean_mse", "target_mse",
           "tau", "poisoned_acc", "poisoned_mse", "acc_drop", "defended_acc", "recovered", "grad_norm_ratio",
           "residual_floor_ratio", "param_distance", "target_agreement", "clean_grad_norm", "target_grad_norm", "victim_grad_norm", *SEED_COLUMNS,
           *OFFICIAL_COLUMNS, "wall_time_s", "paper_acc_drop"]


class SweepFailed(PoisonReachError):
    """Some cells failed; ``failures`` maps their ids to the errors, ``rows`` are the finished cells'."""

    def __init__(self, message: str, failures: dict[str, str], rows: list[dict]):
        super().__init__(message)
        self.failures = failures
        self.rows = rows


def default_out(sweep: Sweep) -> Path:
    return Path("sweeps") / (sweep.name if sweep.profile is None else f"{sweep.name}-{sweep.profile}")


# --------------------------------------------------------------------------------------------------
# one cell (in this process or in a worker)
# --------------------------------------------------------------------------------------------------


def _complete_metrics(cell_dir: Path, config: RunConfig) -> dict | None:
    """The metrics of a finished run of exactly ``config`` in ``cell_dir``, else None."""
    try:
        if (cell_dir / "metrics.json").is_file() and not config.differing_keys(io.read_yaml(cell_dir / "config.yaml")):
            return io.read_json(cell_dir / "metrics.json")
    except (CorruptFileError, PoisonReachError):  # damaged or missing: the runner redoes or reports it
        pass
    return None


def _finished(cell_dir: Path, config: RunConfig, defense_ids: list[str]) -> dict | None:
    """The output of a cell whose run and defenses are all done, else None."""
    metrics = _complete_metrics(cell_dir, config)
    defended = (metrics or {}).get("defenses", {})
    if metrics is None or any(d not in defended for d in defense_ids):
        return None
    return {"metrics": metrics, "defenses": {d: defended[d] for d in defense_ids}}


@contextmanager
def _cell_logs(cid: str):
    """Meanwhile, every log record made in this process (any logger, the library's included) starts
    each line with ``[cid]``: a process runs one cell at a time."""
    make = logging.getLogRecordFactory()

    def factory(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.msg, record.args = "\n".join(f"[{cid}] {line}" for line in record.getMessage().splitlines()), None
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(make)


def _cell_job(cid: str, config: RunConfig, cell_dir: Path, runner, defenses: list[dict], defender, tracking: Tracking | None) -> dict:
    """Run (or read back) one cell and its defenses: {"metrics": ..., "defenses": {id: summary}}."""
    with _cell_logs(cid):
        metrics = _complete_metrics(cell_dir, config)
        if metrics is None:
            metrics = runner(config, cell_dir, tracking=tracking)
        else:
            logger.info("the run finished earlier: reading it back")
        defended = metrics.get("defenses", {})
        summaries = {d["id"]: defended[d["id"]] if d["id"] in defended else defender(cell_dir, d["name"], d["options"]) for d in defenses}
    return {"metrics": metrics, "defenses": summaries}


def _core_plan(workers: int) -> tuple[list[list[int]], int]:
    """Disjoint CPU sets (near-equal shares of the available cores) and the threads per worker."""
    cores = available_cores()
    if workers > len(cores):  # more workers than cores: they share, one core each
        return [[cores[i % len(cores)]] for i in range(workers)], 1
    return [cores[i * len(cores) // workers : (i + 1) * len(cores) // workers] for i in range(workers)], len(cores) // workers


def _init_worker(core_sets, threads: int, log_queue, levels: dict[str, int]) -> None:
    # the worker's records go to the parent (_pump), at the levels the parent's loggers have
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(log_queue)]
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)
    set_worker_threads(threads)
    cores = core_sets.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)


def _pump(queue) -> None:
    """Hand the workers' log records to this process's loggers until the None that ends them."""
    while (record := queue.get()) is not None:
        logging.getLogger(record.name).handle(record)


# --------------------------------------------------------------------------------------------------
# the sweep
# --------------------------------------------------------------------------------------------------


def _comparable(settings: dict, key: str):
    """A setting as the refusal compares it: ``run`` with the fields a file written before they
    existed lacks taken as their defaults, and without those a run folder may change too (the
    budgets and victim seeds it grows by, where it reads and computes; as ``run`` accepts them)."""
    value = settings.get(key)
    if key != "run" or not isinstance(value, dict):
        return value
    return {k: v for k, v in {**io.plain(RunConfig().to_dict()), **value}.items() if k not in (*ADDITIVE_FIELDS, *RUNTIME_FIELDS)}


def _claim(out: Path, sweep: Sweep) -> None:
    """Write sweep.yaml, refusing a folder that holds a sweep with other settings."""
    saved = out / "sweep.yaml"
    if saved.is_file():
        previous = io.read_yaml(saved)
        differ = [key for key in SETTINGS if _comparable(previous, key) != _comparable(sweep.settings, key)]
        if differ:
            raise PoisonReachError(f"{out} holds a sweep with other settings ({', '.join(differ)} differ): choose another --out folder or delete {out}")
    io.write_yaml(saved, sweep.resolved)


def run_sweep(sweep: Sweep, out: str | os.PathLike, *, jobs: int = 1, executor: str = "local", address: str | None = None,
              retries: int | None = None, runner=run, defender=None, tracking: Tracking | None = None) -> list[dict]:
    """Run every unfinished cell of ``sweep`` into ``out/cells/<cell_id>`` and return the rows of the
    results table (also written to ``out/results.csv``), in grid order.

    ``executor`` "local" runs the cells in this process, or in ``jobs`` worker processes; "ray" runs
    each as a Ray task reserving ``sweep.resources`` (:mod:`.ray_executor`: ``address`` is the
    cluster, none starts Ray on this machine; a cell whose worker died is run again up to
    ``retries`` times, default 2), so Ray decides how many run at once and ``jobs`` stays 1;
    ``out`` must then be a path that every worker's machine sees.

    ``runner(config, folder, tracking=)`` runs one cell (default :func:`poisonreach.experiments.run.run`),
    recording it with ``tracking``; ``defender(run_dir, name, options)`` applies a defense to a
    finished cell (default :func:`poisonreach.experiments.defend.defend`). With ``jobs`` > 1 or
    Ray both must be picklable module-level functions. Raises :class:`SweepFailed` after all cells
    if any failed.
    """
    check_number("jobs", jobs, low=1, integer=True)
    check_choice("executor", executor, EXECUTORS)
    if executor == "ray":
        from . import ray_executor

        if jobs > 1:
            raise PoisonReachError(f"jobs {jobs} (--jobs) asks for local worker processes, which the ray executor does not use: Ray runs "
                                   "as many cells at once as the cluster's CPUs and GPUs hold (the sweep file's resources), so leave jobs at 1")
        retries = ray_executor.RETRIES if retries is None else retries
        check_number("retries", retries, low=0, integer=True)
        ray_executor.require()  # before anything is written
    elif address is not None or retries is not None:
        raise PoisonReachError("address and retries (--address, --retries) are settings of the ray executor: add --executor ray")
    out = Path(out)
    _claim(out, sweep)
    defenses = sweep.defenses
    if defenses and defender is None:
        defender = defend
    defense_ids = [d["id"] for d in defenses]
    outputs, failures = {}, {}

    def finish(cid: str, output: dict | None = None, error: BaseException | None = None) -> None:
        report = out / "errors" / f"{cid}.txt"
        if error is None:
            outputs[cid] = output
            report.unlink(missing_ok=True)
        else:
            failures[cid] = f"{type(error).__name__}: {error}"
            logger.error(f"[{cid}] failed: {failures[cid]}")
            io.atomic_write_bytes(report, "".join(traceback.format_exception(error)).encode())
        write_results(out / "results.csv", sweep, _rows(sweep, outputs, defenses))
        cells.update()

    pending = []
    for cid, config in sweep.cells:
        done = _finished(out / "cells" / cid, config, defense_ids)
        if done is None:
            pending.append((cid, config))
        else:
            logger.info(f"[{cid}] finished earlier: skipped")
            outputs[cid] = done
    logger.info(f"sweep {sweep.name}: {len(sweep.cells)} cells, {len(pending)} to run, into {out}")

    workers = min(jobs, len(pending))
    with Progress(desc=f"sweep {sweep.name}", total=len(pending), unit="cells", logger=logger) as cells:
        if executor == "ray" and pending:
            cells_dir = out.absolute() / "cells"  # workers elsewhere resolve no relative path against this folder
            ray_executor.run_cells([(cid, (cid, config, cells_dir / cid, runner, defenses, defender, tracking)) for cid, config in pending],
                                   _cell_job, finish, resources=sweep.resources, retries=retries, address=address)
        elif workers <= 1:
            for cid, config in pending:
                try:
                    finish(cid, _cell_job(cid, config, out / "cells" / cid, runner, defenses, defender, tracking))
                except Exception as e:  # one broken cell must not stop the others
                    finish(cid, error=e)
        elif pending:
            _run_parallel(pending, out, workers, runner, defenses, defender, tracking, finish)

    rows = _rows(sweep, outputs, defenses)
    write_results(out / "results.csv", sweep, rows)
    if failures:
        # cells that failed alike (e.g. a missing data set) are listed once with the shared message
        by_message: dict[str, list[str]] = {}
        for cid, message in failures.items():
            by_message.setdefault(message, []).append(cid)
        listing = "; ".join(f"{', '.join(cids)}: {message}" for message, cids in by_message.items())
        raise SweepFailed(
            f"{len(failures)} of {len(sweep.cells)} cells failed ({listing}); tracebacks are in {out / 'errors'}; "
            "run the same command again to retry them (finished cells are kept)", failures, rows)
    return rows


def _run_parallel(pending, out: Path, workers: int, runner, defenses, defender, tracking, finish) -> None:
    ctx = multiprocessing.get_context("spawn")
    core_sets, threads = _core_plan(workers)
    core_queue, log_queue = ctx.Queue(), ctx.Queue()
    for cores in core_sets:
        core_queue.put(cores)
    pump = threading.Thread(target=_pump, args=(log_queue,), daemon=True)
    pump.start()
    levels = {name: logging.getLogger(name).getEffectiveLevel() for name in ("", "poisonreach")}
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(core_queue, threads, log_queue, levels))
    try:
        futures = {pool.submit(_cell_job, cid, config, out / "cells" / cid, runner, defenses, defender, tracking): cid
                   for cid, config in pending}
        for future in as_completed(futures):
            try:
                output = future.result()
            except Exception as e:  # includes a worker that died (BrokenProcessPool)
                finish(futures[future], error=e)
            else:
                finish(futures[future], output)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    else:
        pool.shutdown()  # workers exit after flushing their log lines, so the None below comes last
    finally:
        log_queue.put(None)
        pump.join()


# --------------------------------------------------------------------------------------------------
# results
# --------------------------------------------------------------------------------------------------


def columns(sweep: Sweep) -> list[str]:
    axes = [axis for axis in sweep.resolved["grid"] if axis not in COLUMNS]
    return ["cell", *axes, *COLUMNS]


def _scalar(value):
    return value if value is None or isinstance(value, (str, int, float)) else json.dumps(value, separators=(",", ":"))


def _cell_rows(sweep: Sweep, cid: str, config: RunConfig, output: dict, defenses: list[dict]) -> list[dict]:
    m = io.plain(output["metrics"])
    base = {"cell": cid, **{a: _scalar(v) for a, v in sweep.grid_values[cid].items() if a not in COLUMNS},
            "dataset": config.dataset, "model": config.model, "victim_model": config.victim_model, "victim_clean_acc": m.get("victim_clean_acc"),
            "eps_w": config.eps_w, "attack": config.attack,
            "protocol": config.protocol, "clean_acc": m["clean_acc"], "target_acc": m.get("target_acc"), "clean_mse": m.get("clean_mse"),
            "target_mse": m.get("target_mse"), "tau": m.get("tau"), "clean_grad_norm": m.get("clean_grad_norm"),
            "target_grad_norm": m.get("target_grad_norm")}
    # target: select names a target per ε_d, whose fields its result carries
    chosen = lambda r: ({"selected_target": r["target"], **{k: r[k] for k in ("target_acc", "target_mse", "tau", "target_grad_norm") if k in r}}  # noqa: E731
                        if "target" in r else {})
    paper = lambda eps_d, did: sweep.paper_values.get((cid, eps_d, did))
    if not config.eps_d:
        return [{**base, "attack": target_label(config), "acc_drop": m["clean_acc"] - m["target_acc"],
                 "wall_time_s": m["wall_time_s"], "paper_acc_drop": paper(None, None)}]
    # each configured budget with its result; "tau" ran at ε_d = τ, or was skipped (τ = 0) and has no row
    by_eps_d = {r["eps_d"]: r for r in m["results"]}
    done = [(e, by_eps_d[v]) for e in config.eps_d if (v := m["tau"] if e == "tau" else e) in by_eps_d]
    rows = [
        {**base, **chosen(r), "eps_d": eps_d, "poisoned_acc": r["poisoned_acc"], "poisoned_mse": r.get("poisoned_mse"), "acc_drop": r["acc_drop"],
         "grad_norm_ratio": r["grad_norm_ratio"], "residual_floor_ratio": r.get("residual_floor_ratio"), "param_distance": r["param_distance"], "target_agreement": r.get("target_agreement"),
         "victim_grad_norm": r.get("victim_grad_norm"), **_seed_values(r), **{k: r.get(k) for k in OFFICIAL_COLUMNS},
         "wall_time_s": m["wall_time_s"],
         "paper_acc_drop": paper(eps_d, None)}
        for eps_d, r in done
    ]
    for d in defenses:
        summary = io.plain(output["defenses"][d["id"]])
        rows += [
            {**base, "defense": d["id"], "eps_d": eps_d, "poisoned_acc": r["poisoned_acc"], "acc_drop": s["acc_drop_defended"],
             "defended_acc": s["defended_acc"], "recovered": s["recovered"], "grad_norm_ratio": r["grad_norm_ratio"],
             "wall_time_s": s.get("defense_time_s"), "paper_acc_drop": paper(eps_d, d["id"])}
            for (eps_d, r), s in zip(done, summary["results"])
        ]
    return rows


def _seed_values(result: dict) -> dict:
    """The victim-seed columns of a result (none without victim seeds)."""
    if not result.get("victim_seeds"):
        return {}
    return {"victim_seeds": " ".join(map(str, result["victim_seeds"])), **{k: result.get(k) for k in SEED_COLUMNS[1:]}}


def _rows(sweep: Sweep, outputs: dict, defenses: list[dict]) -> list[dict]:
    keys = columns(sweep)
    rows = [row for cid, config in sweep.cells if cid in outputs for row in _cell_rows(sweep, cid, config, outputs[cid], defenses)]
    return [{key: row.get(key) for key in keys} for row in rows]


def write_results(path: str | os.PathLike, sweep: Sweep, rows: list[dict]) -> Path:
    """``rows`` as CSV (empty cells for missing values), written atomically."""
    text = _io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns(sweep), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return io.atomic_write_bytes(path, text.getvalue().encode())


def _number(value) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def _present(value) -> bool:
    """A value worth a column: not missing, and not the NaN of an undefined accuracy."""
    x = _number(value)
    return value not in (None, "") and (x is None or not math.isnan(x))


def show(key: str, value) -> str:
    """One results value as text: accuracies, agreements and drops (clean − poisoned, positive for
    damage, ours and the paper's alike) in %, "-" for a missing value or the NaN of an undefined
    accuracy."""
    x = _number(value)
    if x is None:
        return "-" if value in (None, "") else str(value)
    if math.isnan(x):
        return "-"
    if key.endswith("acc") or key.startswith("retrain_acc") or "acc_drop" in key or key in ("recovered", "target_agreement"):
        return f"{x:.2f}"
    if key == "wall_time_s":
        return f"{x:.0f}"
    if key.endswith("grad_norm"):
        return f"{x:.3g}"
    return f"{x:.4g}"


def show_cell(key: str, row: dict) -> str:
    """``row[key]`` as :func:`show` prints it; a ``*_mean`` column as "mean ± std" with its ``*_std``."""
    if key.endswith("_mean") and _present(row.get(key)):
        text, std = f"{_number(row[key]):.2f}", _number(row.get(key.removesuffix("_mean") + "_std"))
        return text if std is None or math.isnan(std) else f"{text} ± {std:.2f}"
    return show(key, row.get(key))


# The columns of the printed table and the report, in order, with their headers; the optional ones
# are shown only where some row has a value: defenses when one ran, MSEs for regression, accuracies
# for classification. The CSV keeps everything.
HEADERS = {"cell": "cell", "dataset": "dataset", "model": "model", "victim_model": "victim model", "attack": "attack", "eps_w": "eps_w",
           "defense": "defense", "eps_d": "eps_d", "selected_target": "chosen target", "clean_acc": "clean", "victim_clean_acc": "victim clean",
           "target_acc": "target", "clean_mse": "clean MSE", "target_mse": "target MSE",
           "tau": "tau", "poisoned_acc": "poisoned", "poisoned_mse": "poisoned MSE", "acc_drop": "drop", "paper_acc_drop": "paper",
           "defended_acc": "defended", "recovered": "recovered", "grad_norm_ratio": "‖g‖ ratio",
           "residual_floor_ratio": "floor ratio", "param_distance": "‖w − w_t‖",
           "target_agreement": "agree", "victim_grad_norm": "victim ‖∇L‖", "victim_seeds": "victim seeds",
           "poisoned_acc_mean": "poisoned (seeds)", "acc_drop_mean": "drop (seeds)", "target_agreement_mean": "agree (seeds)",
           "retrain_acc_min": "epochs min", "retrain_acc_max": "epochs max", "acc_drop_vs_official_clean": "drop vs SGD clean",
           "wall_time_s": "time (s)"}
_OPTIONAL = {"dataset", "model", "victim_model", "victim_clean_acc", "attack", "eps_w", "defense", "selected_target", "defended_acc", "recovered",
             "clean_acc", "target_acc",
             "poisoned_acc", "acc_drop", "clean_mse", "target_mse", "poisoned_mse", "target_agreement", "victim_grad_norm",
             "victim_seeds", "poisoned_acc_mean", "acc_drop_mean", "target_agreement_mean", "retrain_acc_min", "retrain_acc_max",
             "acc_drop_vs_official_clean", "residual_floor_ratio"}
TERMINAL = [k for k in HEADERS if k not in ("dataset", "model", "attack", "eps_w")]  # the cell id names those


def shown_columns(rows: list[dict], keys=TERMINAL) -> list[str]:
    """The keys of ``keys`` worth a column for these rows (see :data:`HEADERS`)."""
    return [k for k in keys if k not in _OPTIONAL or any(_present(r.get(k)) for r in rows)]


def format_results(rows: list[dict]) -> str:
    """The rows as a fixed-width table for the terminal."""
    keys = shown_columns(rows)
    return text_table([HEADERS[k] for k in keys], [[show_cell(k, r) for k in keys] for r in rows], left_first=True)


# --------------------------------------------------------------------------------------------------
# command line (wired by poisonreach.cli)
# --------------------------------------------------------------------------------------------------


def _status(cell_dir: Path, config: RunConfig) -> str:
    if _complete_metrics(cell_dir, config) is not None:
        return "done"
    return "partial" if (cell_dir / "config.yaml").is_file() else "new"


def describe(sweep: Sweep, out: str | os.PathLike) -> str:
    """What a sweep would do: its cells, their state in ``out`` and the paper numbers found."""
    out = Path(out)
    found = sum(v is not None for v in sweep.paper_values.values())
    lines = [f"sweep {sweep.name} ({sweep.source}" + (f", profile {sweep.profile}" if sweep.profile else "") + f") into {out}"]
    if sweep.description:
        lines.append(sweep.description.strip())
    lines.append(f"{len(sweep.cells)} cells; defenses: {', '.join(d['id'] for d in sweep.defenses) or 'none'}"
                 + (f"; paper numbers found for {found} of {len(sweep.paper_values)} rows" if sweep.paper else ""))
    width = max(len(cid) for cid, _ in sweep.cells)
    for cid, config in sweep.cells:
        eps = ", ".join(e if isinstance(e, str) else f"{e:g}" for e in config.eps_d) or "none (target only)"
        lines.append(f"  {_status(out / 'cells' / cid, config):7s} {cid.ljust(width)}  eps_d: {eps}")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``poisonreach sweep``."""
    p.add_argument("file", metavar="NAME|FILE",
                   help=f"a shipped sweep by name ({', '.join(shipped_sweeps())}) or the path of a sweep file (YAML)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="override a setting by its dotted path, e.g. run.attack_options.epochs=50 or grid.model=[lr] (value read as YAML)")
    p.add_argument("--profile", default=None, help="apply a profile of the file (e.g. cpu; default: none, the file as written)")
    p.add_argument("--jobs", type=int, default=1,
                   help="with --executor local: cells run at once, each in its own process with its share of the cores (default: 1)")
    p.add_argument("--executor", choices=EXECUTORS, default="local",
                   help="where the cells run: local (this machine's processes, --jobs) or ray (one Ray task per cell reserving the "
                        "sweep file's resources, so Ray decides how many run at once; pip install 'poisonreach[ray]') (default: local)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --executor ray: the Ray cluster to connect to, e.g. HOST:6379 after `ray start --head` "
                        "(default: start Ray on this machine for the sweep, or RAY_ADDRESS's cluster)")
    p.add_argument("--retries", type=int, default=None, metavar="N",
                   help="with --executor ray: runs of a cell after its worker died (killed, out of memory, machine lost), each resuming "
                        "the cell's folder and GC checkpoint (default: 2)")
    p.add_argument("--out", default=None, help="sweep folder (default: sweeps/NAME or sweeps/NAME-PROFILE); an existing one is resumed")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads with --jobs 1 (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the table (and warnings)")
    tracking_module.add_arguments(p, store="the sweep folder: tensorboard/CELL/ or mlruns/")


def command(args: argparse.Namespace) -> int:
    """``poisonreach sweep``: 0 when every cell finished, 1 when some failed (the table shows the rest)."""
    sweep = load_sweep(args.file, args.overrides, args.profile)
    out = Path(args.out) if args.out else default_out(sweep)
    if args.executor == "ray":  # the workers, on other machines too, write there (and the tracking store)
        out = out.absolute()
    if args.dry_run:
        print(describe(sweep, out))
        return 0
    tracking = tracking_module.from_arguments(args, uri=None if args.log is None else str(out / tracking_module.FOLDERS[args.log]),
                                              experiment=sweep.name)
    try:
        rows = run_sweep(sweep, out, jobs=args.jobs, executor=args.executor, address=args.address, retries=args.retries, tracking=tracking)
    except SweepFailed as e:
        print(format_results(e.rows))
        print(f"poisonreach: error: {e}", file=sys.stderr)
        return 1
    print(format_results(rows))
    print(f"sweep folder: {out}", file=sys.stderr)
    return 0
