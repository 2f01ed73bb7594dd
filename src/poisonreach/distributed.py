"""Data parallelism over ``torch.distributed``: one process per rank, each with a shard of the rows.

Every process runs the same program on the same inputs (the same seeds, the same data on disk); the
work that grows with the data is split by rows. A sum over rows (g(µ), g(ν̂), a Jacobian–vector
product, a training gradient, a count of correct predictions) is each rank's sum over its own rows,
then :func:`all_reduce`d, so every rank holds the same total and everything computed from it (a
residual, a CG vector, a Levenberg–Marquardt decision, an L-BFGS step) is replicated exactly, with
no further traffic. Shards are contiguous and in rank order (:func:`shard`), so :func:`gather_rows`
puts a sharded tensor back in the single-process order. The results differ from one process's only
by the order floating-point sums are taken in.

Without an initialised process group (the default) every function is the single-process identity:
rank 0 of a world of 1. :func:`launch` starts N processes on this machine (``--nproc``);
:func:`from_environment` joins the group ``torchrun`` describes in its environment variables (one
or many machines). Backend: gloo on the CPU, NCCL on CUDA; a CUDA rank uses the GPU of its local
rank. Rank 0 alone writes files (:func:`is_writer`); it decides what is on disk (:func:`agree`) so
that all ranks resume the same steps.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import socket
import time
from contextlib import contextmanager
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .errors import PoisonReachError

logger = logging.getLogger(__name__)


def active() -> bool:
    """Whether this process is one of several ranks."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Rank 0 writes the run folder, checkpoints and logs of progress; the other ranks compute."""
    return rank() == 0


def shard(n: int, chunk: int = 1, *, of: int | None = None, at: int | None = None) -> slice:
    """This rank's contiguous share of range(n) in whole chunks of ``chunk`` rows (the first ranks
    take one chunk more when they do not divide evenly; the last chunk may be short). A rank whose
    chunks are those of the single-process grid computes each chunk's sum bit for bit as one process
    does, so a sum over chunks differs from one process's only by the order of its float64 terms."""
    size, r = world_size() if of is None else of, rank() if at is None else at
    base, extra = divmod(-(-n // chunk), size)
    start = (r * base + min(r, extra)) * chunk
    return slice(min(start, n), min(start + (base + (r < extra)) * chunk, n))


def local_chunks(n: int, chunk: int):
    """This rank's chunks of range(n) as slices, in order (:func:`shard`'s rows, ``chunk`` at a time)."""
    rows = shard(n, chunk)
    return (slice(start, min(start + chunk, rows.stop)) for start in range(rows.start, rows.stop, chunk))


def all_reduce(tensors: list[Tensor]) -> list[Tensor]:
    """Sum each tensor over the ranks, in place (one call per tensor list); returns the list."""
    if active():
        for t in tensors:
            dist.all_reduce(t)
    return tensors


def reduce_number(value: float | int | bool, op: str = "sum") -> float:
    """A Python number summed (``sum``) or maximised (``max``) over the ranks, in float64."""
    if not active():
        return float(value)
    t = torch.tensor(float(value), dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return float(t)


def gather_rows(local: Tensor, n: int, chunk: int = 1) -> Tensor:
    """The rows of a tensor sharded by :func:`shard` (``n`` rows, chunks of ``chunk``), concatenated
    in rank order on every rank: the single-process tensor."""
    if not active():
        return local
    size = world_size()
    counts = [len(range(n)[shard(n, chunk, of=size, at=r)]) for r in range(size)]
    width = max(max(counts), 1)
    # all_gather needs equal shapes: pad every shard to the largest, then drop the padding
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:c] for part, c in zip(parts, counts)])


def agree(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (a small picklable object: a flag, a path's existence)."""
    if not active():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_device() if dist.get_backend() == "nccl" else None)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def writer_first():
    """Rank 0 runs the block first (e.g. extracting an archive or writing a cache, which only it
    writes), then the others, who find what it wrote."""
    if not is_writer():
        barrier()
    try:
        yield
    finally:
        if is_writer():
            barrier()


def local_device(device: str | torch.device | None) -> torch.device | None:
    """A CUDA device name resolved to this rank's GPU (its local rank), other devices unchanged."""
    if device is None or not active():
        return None if device is None else torch.device(device)
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank())) % max(1, torch.cuda.device_count()))
    return device


def _device() -> torch.device:
    """Where collective scratch tensors live: NCCL needs them on this rank's GPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def backend_for(device: str | torch.device | None) -> str:
    """NCCL for CUDA, gloo otherwise."""
    return "nccl" if device is not None and torch.device(device).type == "cuda" else "gloo"


def from_environment(device: str | torch.device | None = None) -> bool:
    """Join the process group torchrun (or any launcher setting RANK, WORLD_SIZE, MASTER_ADDR and
    MASTER_PORT) describes; False when the environment names no group of more than one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    _quiet_followers()
    return True


@contextmanager
def joined(device: str | torch.device | None = None):
    """Join torchrun's group for the block when the environment describes one, and leave it after."""
    started = from_environment(device)
    try:
        yield
    finally:
        if started:
            dist.destroy_process_group()


def launch(fn: Callable[..., Any], nproc: int, *args, device: str | torch.device | None = None) -> Any:
    """Run ``fn(*args)`` in ``nproc`` processes on this machine, ranks of one group (gloo on the CPU,
    NCCL with a CUDA ``device``); returns rank 0's return value. A failing rank fails the launch."""
    if nproc < 1:
        raise PoisonReachError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1:
        return fn(*args)
    ctx = multiprocessing.get_context("spawn")  # torch does not survive fork
    port, results = _free_port(), ctx.SimpleQueue()
    procs = [ctx.Process(target=_rank_main, args=(r, nproc, port, backend_for(device), fn, args, results)) for r in range(nproc)]
    for p in procs:
        p.start()
    outcomes: dict[int, tuple[bool, Any]] = {}
    while len(outcomes) < nproc and any(p.is_alive() for p in procs) or not results.empty():
        if not results.empty():
            r, ok, payload = results.get()
            outcomes[r] = (ok, pickle.loads(payload))  # our own ranks' bytes
            if not ok:  # the others wait in a collective for the rank that failed: stop them
                for p in procs:
                    p.terminate()
        else:
            time.sleep(0.05)
    for p in procs:
        p.join()
    # the rank that reported its failure, else one that died without a word (the others were stopped)
    failed = [r for r, (ok, _) in outcomes.items() if not ok] or [r for r in range(nproc) if r not in outcomes]
    if failed:
        ok, value = outcomes.get(failed[0], (False, f"exit code {procs[failed[0]].exitcode}"))
        if isinstance(value, PoisonReachError):
            raise value
        raise PoisonReachError(f"rank {failed[0]} of {nproc} failed: {value}")
    return outcomes[0][1]


def _rank_main(r: int, size: int, port: int, backend: str, fn, args, results) -> None:
    os.environ.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(r % torch.cuda.device_count())
    dist.init_process_group(backend, rank=r, world_size=size)
    _quiet_followers()
    try:
        value = fn(*args)
        # plain pickle: tensors travel by value (a queue would share their memory, gone with this process)
        results.put((r, True, pickle.dumps(value if r == 0 else None)))
    except BaseException as e:  # reported to the launcher, which raises it
        results.put((r, False, pickle.dumps(e if isinstance(e, PoisonReachError) else f"{type(e).__name__}: {e}")))
        raise SystemExit(1)
    finally:
        dist.destroy_process_group()


def _quiet_followers() -> None:
    """Ranks other than 0 log warnings only: rank 0 speaks for the run."""
    if rank() != 0:
        logging.getLogger("poisonreach").setLevel(logging.WARNING)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
