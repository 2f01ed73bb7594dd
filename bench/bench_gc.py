"""Benchmark: the cost of one Gradient Canceling step against training, and of τ against a forward pass.

What is measured, for each model (lr, nn, cnn on MNIST-shaped inputs, all on the same data):

- **GC step**, seconds per poison point: one epoch of :class:`poisonreach.attacks.GradientCanceling`
  with the whole poison set as one block (the paper's setting), timed as the difference between
  the attack run with ``epochs=1`` and with ``epochs=0``. Both pay for τ, g(µ) and one g(ν̂) pass;
  the difference is exactly one step: the double-backward pass (chunk by chunk), the projected
  update, and the g(ν̂) pass that measures the new objective. Timing the library's own attack keeps
  the benchmark honest when the attack's loop changes.
- **training**, seconds per sample: one epoch of :func:`poisonreach.training.train` over the N clean
  points with the paper's protocol (Adadelta, batches of 64, forward + backward + optimizer step in
  train mode), on a copy of the model so the other measurements see a fixed w.
- **τ**: :func:`poisonreach.reachability.threshold` over the N clean points, and **forward**: one
  :func:`poisonreach.training.predict_logits` pass over the same points in the same chunks.

Absolute seconds depend on the machine, the thread count and the torch build; the two ratios mostly
do not, so they are what to compare across machines and commits:

- GC/train = (GC seconds per poison point) / (training seconds per sample): one GC epoch over m
  poisons costs about ratio·m/N clean training epochs. A double-backward pass is expected to cost a
  small multiple of a training step (two forwards and up to three backwards).
- τ/forward = the threshold over one forward pass: τ is claimed to cost "a single forward pass",
  so this should stay close to 1.

Each number is the median of ``--repeats`` timed repetitions after one untimed warm-up, timed with
``time.perf_counter``. The last column, CPU/wall, is this process's CPU time over its wall time in
the timed runs: at one thread, a value well below 1 means other processes took the core and the
wall times are inflated (the JSON keeps every wall and CPU time). ``python bench/bench_gc.py --help``
lists the options; bench/README.md has the numbers measured when this script was written.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from poisonreach import data as pr_data
from poisonreach import models, reachability, training
from poisonreach.attacks import GradientCanceling
from poisonreach.errors import DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
INPUT_SHAPE = (1, 28, 28)
NUM_CLASSES = 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TRAIN_BATCH = 64  # the training protocol's batch size (training.train's default)
SEED = 0


# -- timing ------------------------------------------------------------------------------------------


def measure(fn: Callable[[], object], *, repeats: int, device: torch.device) -> dict:
    """Run ``fn`` once untimed (warm-up), then ``repeats`` timed times.

    Returns the median wall time, every wall time, and this process's CPU time per repetition: with
    one thread, CPU time well below wall time means other processes took the core.
    """

    def once() -> tuple[float, float]:
        _synchronize(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        fn()
        _synchronize(device)
        return time.perf_counter() - start, time.process_time() - cpu_start

    once()
    wall, cpu = zip(*(once() for _ in range(repeats)))
    return {"median": statistics.median(wall), "times": list(wall), "cpu_times": list(cpu)}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- data --------------------------------------------------------------------------------------------


def load_data(n: int, root: Path, seed: int = SEED) -> tuple[Tensor, Tensor, str]:
    """N MNIST training images in [0, 1] with their labels, or random ones if MNIST is not on disk."""
    try:
        splits = pr_data.load("mnist", root=root, seed=seed)
    except DatasetNotFoundError:
        gen = torch.Generator().manual_seed(seed)
        X = torch.rand((n, *INPUT_SHAPE), generator=gen)
        y = torch.randint(NUM_CLASSES, (n,), generator=gen)
        return X, y, f"random uniform pixels and labels (no MNIST under {root})"
    if n > len(splits.x_train):
        raise SystemExit(f"--n {n} exceeds the {len(splits.x_train)} MNIST training images")
    splits = splits.subset(n, seed=seed)
    return splits.x_train, splits.y_train, f"MNIST from {root}"


def make_gc(model: nn.Module, X: Tensor, y: Tensor, m: int, *, epochs: int, chunk_size: int,
            device: torch.device) -> Callable[[], object]:
    """The library's GradientCanceling with m poisons (whole set as one block, the paper's setting)
    run for ``epochs`` epochs. One step costs the difference between ``epochs=1`` and ``epochs=0``:
    both pay for τ, g(µ) and the first g(ν̂) pass, only the first takes a step."""
    attack = GradientCanceling(m / len(X), epochs=epochs, chunk_size=chunk_size, device=device, progress=False)
    return lambda: attack.poison(model, X, y)


def make_train_epoch(model: nn.Module, X: Tensor, y: Tensor, device: torch.device) -> Callable[[], None]:
    """One training epoch over (X, y) with the paper's protocol, on a private copy of ``model``."""
    trained = copy.deepcopy(model)

    def epoch() -> None:
        training.train(trained, X, y, epochs=1, batch_size=TRAIN_BATCH, seed=SEED, device=device, progress=False)

    return epoch


def bench_model(name: str, X: Tensor, y: Tensor, args: argparse.Namespace) -> dict:
    """The four timings of one model: medians in seconds, the two ratios and the raw times."""
    device = torch.device(args.device)
    model = models.create(name, INPUT_SHAPE, NUM_CLASSES, mean=MNIST_MEAN, std=MNIST_STD, seed=SEED).to(device)
    gc = {epochs: measure(make_gc(model, X, y, args.poisons, epochs=epochs, chunk_size=args.chunk_size, device=device),
                          repeats=args.repeats, device=device) for epochs in (0, 1)}
    timed = dict(
        gc_setup=gc[0],
        gc_one_epoch=gc[1],
        train=measure(make_train_epoch(model, X, y, device), repeats=args.repeats, device=device),
        tau=measure(lambda: reachability.threshold(model, X, y, device=device), repeats=args.repeats, device=device),
        forward=measure(lambda: training.predict_logits(model, X, device=device), repeats=args.repeats, device=device),
    )
    measured = dict(timed)
    timed["gc"] = {"median": gc[1]["median"] - gc[0]["median"]}
    gc_per_point = timed["gc"]["median"] / args.poisons
    train_per_sample = timed["train"]["median"] / len(X)
    return {
        "model": name,
        "parameters": sum(p.numel() for p in model.parameters()),
        "gc_step_s": timed["gc"]["median"],
        "gc_s_per_point": gc_per_point,
        "train_epoch_s": timed["train"]["median"],
        "train_s_per_sample": train_per_sample,
        "ratio_gc_train": gc_per_point / train_per_sample,
        "tau_s": timed["tau"]["median"],
        "forward_s": timed["forward"]["median"],
        "ratio_tau_forward": timed["tau"]["median"] / timed["forward"]["median"],
        # this process's CPU time over its wall time, all timed runs: well below 1 at one thread
        # means other processes took the core and the wall times above are inflated
        "cpu_share": sum(sum(v["cpu_times"]) for v in measured.values()) / sum(sum(v["times"]) for v in measured.values()),
        "times": {key: value["times"] for key, value in measured.items()},
        "cpu_times": {key: value["cpu_times"] for key, value in measured.items()},
    }


# -- output ------------------------------------------------------------------------------------------

COLUMNS = (
    ("model", "model", "{}"),
    ("GC s/point", "gc_s_per_point", "{:.3e}"),
    ("train s/sample", "train_s_per_sample", "{:.3e}"),
    ("GC/train", "ratio_gc_train", "{:.2f}"),
    ("tau s", "tau_s", "{:.4f}"),
    ("forward s", "forward_s", "{:.4f}"),
    ("tau/forward", "ratio_tau_forward", "{:.2f}"),
    ("CPU/wall", "cpu_share", "{:.2f}"),
)


def format_table(rows: list[dict]) -> str:
    """A Markdown table of the results, one row per model."""
    cells = [[fmt.format(row[key]) for _, key, fmt in COLUMNS] for row in rows]
    header = [title for title, _, _ in COLUMNS]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = [header, ["-" * w for w in widths], *cells]
    return "\n".join("| " + " | ".join(c.rjust(w) for c, w in zip(line, widths)) + " |" for line in lines)


def write_json(path: Path, payload: dict) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file beside it, then os.replace."""
    path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp creates 0600; a results file is for everyone to read
        with os.fdopen(fd, "w") as out:
            json.dump(payload, out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- command line ------------------------------------------------------------------------------------


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["lr", "nn", "cnn"], choices=["lr", "nn", "cnn"])
    parser.add_argument("--n", type=positive_int, default=4200, help="clean points N (g(µ), training, τ, forward)")
    parser.add_argument("--poisons", type=positive_int, default=1260, help="poison points m in the GC step")
    parser.add_argument("--threads", type=positive_int, default=1, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repetitions (median) after one warm-up")
    parser.add_argument("--chunk-size", type=positive_int, default=128, help="GC chunk size (GradientCanceling's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="where mnist/ is looked for")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    X, y, source = load_data(args.n, args.data_root)
    print(f"data: {source}; N={len(X)} clean, m={args.poisons} poisons (eps_d={args.poisons / len(X):.3g})")
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()} "
          f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), {os.cpu_count()} CPUs, "
          f"chunk {args.chunk_size}, median of {args.repeats} after 1 warm-up", flush=True)
    if load_before > 0.5:
        print(f"warning: 1-minute load average is {load_before:.2f} before the run; other processes "
              "sharing the cores inflate every time (the ratios less)", file=sys.stderr)

    rows = []
    for name in args.models:
        model_start = time.perf_counter()
        rows.append(bench_model(name, X, y, args))
        row = rows[-1]
        print(f"  {name}: GC step {row['gc_step_s']:.3f} s, train epoch {row['train_epoch_s']:.3f} s, "
              f"{time.perf_counter() - model_start:.1f} s with repeats", file=sys.stderr, flush=True)
    elapsed = time.perf_counter() - started
    load_after = os.getloadavg()[0]
    print(format_table(rows))
    print(f"total {elapsed:.1f} s; 1-minute load average {load_before:.2f} before, {load_after:.2f} after "
          f"(this run alone adds about {args.threads})")

    if args.json is not None:
        write_json(args.json, {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "data": source,
            "n": len(X),
            "poisons": args.poisons,
            "machine": {"platform": platform.platform(), "processor": platform.processor(),
                        "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version(),
                        "load_average_before": load_before, "load_average_after": load_after},
            "total_s": elapsed,
            "results": rows,
        })
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
