"""A sweep's cells as Ray tasks (``poisonreach sweep --executor ray``), on this machine or a cluster.

Ray is an optional dependency (``pip install 'poisonreach[ray]'``), imported only here and only
when a sweep asks for it. Each cell is one task that reserves the sweep's ``resources``
(``num_cpus``, ``num_gpus``: :mod:`poisonreach.experiments.sweep_file`), so Ray runs as many cells
at once as the cluster holds; the task runs torch on ``num_cpus`` threads. A task whose worker
process dies (killed, out of memory, its machine lost) is run again up to ``retries`` times; the
cell's run folder then resumes where the dead worker left it (the saved models, the finished ε_d
cells and GC's checkpoint), so a retry costs at most the work since the last checkpoint. A cell
that raises is not retried: it is reported, as under the local executor.

A worker's log lines go to its stderr, which Ray shows in the driver's (each line after Ray's
``(cell <cell_id> pid=...)``, and every one: Ray's merging of alike lines is turned off unless
RAY_DEDUP_LOGS says otherwise), at the driver's verbosity: INFO with ``poisonreach sweep``, WARNING
with ``--quiet`` or in a program that configured no logging.
"""

from __future__ import annotations

import logging
import os
import re

from ..errors import PoisonReachError
from .config import set_worker_threads
from .tracking import console_logging

RETRIES = 2  # runs of a cell after its worker died, by default
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the task's name in a remote traceback


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a Ray worker, as text: chained as that exception's
    cause, so a sweep's error report shows where in the worker it was raised."""


def require():
    """The ``ray`` module, or a one-line PoisonReachError saying how to install it."""
    # the cells log alike lines with their own numbers: Ray, imported from here, shows every one
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        import ray
    except ImportError:
        raise PoisonReachError("--executor ray needs Ray: pip install 'poisonreach[ray]'") from None
    return ray


def _task(job, args: tuple, threads: int, quiet: bool):
    """One cell in a Ray worker: torch on the task's CPUs, log lines on the worker's stderr, then ``job(*args)``."""
    set_worker_threads(threads)
    with console_logging(quiet=quiet):
        return job(*args)


def _local_error(ray, error):
    """The exception a cell raised in its worker, with the worker's traceback as its cause; a
    Ray error (a worker that died more often than retried, a lost object) as it is."""
    if not isinstance(error, ray.exceptions.RayTaskError) or not isinstance(error.cause, Exception):
        return error
    error.cause.__cause__ = WorkerTraceback(_ANSI.sub("", str(error)))
    return error.cause


def run_cells(cells: list[tuple[str, tuple]], job, finish, *, resources: dict, retries: int = RETRIES, address: str | None = None) -> None:
    """Run ``job(*args)`` for each (cell id, args) of ``cells`` as a Ray task reserving ``resources``
    and call ``finish(cell_id, output)``, or ``finish(cell_id, error=exception)``, as each ends.

    ``address`` is the cluster to connect to (``ray.init(address=...)``, e.g. ``HOST:6379`` after
    ``ray start --head``); without it a Ray instance is started on this machine, or the cluster
    RAY_ADDRESS names is used. Ray started or connected here is shut down afterwards; a process
    already connected to Ray (its own ``ray.init``) keeps its connection and runs the cells there.
    On an interruption the cells still running are cancelled.
    """
    ray = require()
    connected = ray.is_initialized()
    if not connected:
        ray.init(address=address)
    try:
        task = ray.remote(num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"], max_retries=retries)(_task)
        quiet = logging.getLogger("poisonreach").getEffectiveLevel() > logging.INFO
        threads = max(1, int(resources["num_cpus"]))
        running = {task.options(name=f"cell {cid}").remote(job, args, threads, quiet): cid for cid, args in cells}
        try:
            while running:
                (ref,), _ = ray.wait(list(running))
                cid = running.pop(ref)
                try:
                    output = ray.get(ref)
                except ray.exceptions.RayError as e:
                    finish(cid, error=_local_error(ray, e))
                else:
                    finish(cid, output)
        except BaseException:
            for ref in running:
                ray.cancel(ref, force=True)
            raise
    finally:
        if not connected:
            ray.shutdown()
