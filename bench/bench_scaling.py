"""Benchmark: data-parallel throughput of GC and training at 1 and 2 processes (gloo, one thread each).

For each model (``--models``, default lr and nn) on N MNIST training images (``--n``; random pixels
when MNIST is not under ``--data-root``), measured in the same invocation:

- **GC**: seconds per Gauss–Newton iteration of :class:`poisonreach.attacks.GaussNewtonCanceling`
  (ε_d = ``--eps-d``, hard labels, box [0, 1], the last layer's gradient for models other than lr,
  ``--iterations`` steps, tolerance 0 so every step
  runs) against the clean model trained for one epoch (in one process, the same weights for both): the solver's own wall-time history, last
  entry minus first, over the steps taken (set-up, τ and g(µ) excluded). Also whether the
  2-process poisons equal the 1-process ones (largest pixel difference, labels equal).
- **train**: seconds per epoch of :func:`poisonreach.training.train` (the paper's protocol:
  Adadelta, batches of 64), one epoch after an untimed warm-up epoch; under 2 processes every
  batch is split between them under DistributedDataParallel.
- **minimize**: seconds per L-BFGS iteration of :func:`poisonreach.training.minimize` (the
  converged protocol, float64, chunks of ``--chunk-size``), ``--lbfgs-iterations`` iterations.

Efficiency = t(1) / (2·t(2)): 1.00 is a perfect halving. Every process runs one torch thread, so two
processes use the machine's two cores; other load on the machine shows in the load average the script
prints. ``--json FILE`` keeps the numbers. bench/README.md records a measured run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

from poisonreach import data as pr_data
from poisonreach import distributed, io, models, training
from poisonreach.attacks import GaussNewtonCanceling
from poisonreach.errors import DatasetNotFoundError

REPO = Path(__file__).resolve().parents[1]


def load(n: int, root: Path, seed: int = 0):
    """N MNIST training images (a seeded subset), or random pixels and labels when MNIST is absent."""
    try:
        splits = pr_data.load("mnist", root=root, seed=seed).subset(n, seed=seed)
        return splits.x_train, splits.y_train, splits.mean, splits.std, "MNIST"
    except DatasetNotFoundError:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g), 0.1307, 0.3081, "random pixels"


def target_state(model_name: str, args: argparse.Namespace) -> dict:
    """GC's target: the clean model after one epoch, trained once in one process, so that both runs
    of GC attack the same weights (training under DDP agrees to ~1e-7 only, which GC amplifies)."""
    torch.set_num_threads(1)
    X, y, mean, std, _ = load(args.n, Path(args.data_root))
    model = models.create(model_name, (1, 28, 28), 10, mean=mean, std=std, seed=0)
    return training.train(model, X, y, epochs=1, progress=False).state_dict()


def measure(model_name: str, args: argparse.Namespace, target: dict) -> dict:
    """Every measurement of one model in this process (a rank of a launch, or the only process)."""
    torch.set_num_threads(1)
    X, y, mean, std, _ = load(args.n, Path(args.data_root))
    fresh = lambda: models.create(model_name, (1, 28, 28), 10, mean=mean, std=std, seed=0)  # noqa: E731
    clean = fresh()
    clean.load_state_dict(target)
    clean.eval()
    out = {}
    model = fresh()
    training.train(model, X, y, epochs=1, progress=False)  # warm-up
    distributed.barrier()
    started = time.perf_counter()
    training.train(model, X, y, epochs=1, progress=False)
    out["train_s_per_epoch"] = time.perf_counter() - started
    distributed.barrier()
    started = time.perf_counter()
    training.minimize(fresh(), X, y, max_iterations=args.lbfgs_iterations, tolerance=1e-12, chunk_size=args.chunk_size, progress=False)
    out["minimize_s_per_iteration"] = (time.perf_counter() - started) / args.lbfgs_iterations
    # hard labels need the last layer's gradient (closed-form relabelling): the whole of lr, the head of the others
    attack = GaussNewtonCanceling(args.eps_d, iterations=args.iterations, tolerance=0.0, chunk_size=args.chunk_size, progress=False,
                                  parameters="all" if model_name == "lr" else "last")
    r = attack.poison(clean, X, y)
    steps = len(r.grad_norm_history) - 1
    out["gc_s_per_iteration"] = (r.extra["time_history"][-1] - r.extra["time_history"][0]) / max(steps, 1)
    out["gc_steps"], out["gc_ratio"] = steps, r.grad_norm_ratio
    out["poisons"] = (r.x, r.y)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lr", "nn"])
    parser.add_argument("--n", type=int, default=42_000, help="clean training points (default 42,000, the MNIST training split)")
    parser.add_argument("--eps-d", type=float, default=0.1)
    parser.add_argument("--iterations", type=int, default=3, help="Gauss–Newton steps timed (default 3)")
    parser.add_argument("--lbfgs-iterations", type=int, default=25)
    parser.add_argument("--chunk-size", type=int, default=256, help="GC and L-BFGS chunk rows (default 256: the poisons are 17 chunks at the defaults, so both ranks get work)")
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    _, _, _, _, source = load(10, Path(args.data_root))
    print(f"data: {source}, N = {args.n}, eps_d = {args.eps_d}; one torch thread per process; "
          f"load average before: {os.getloadavg()[0]:.2f}; {platform.python_version()}, torch {torch.__version__}")
    started = time.perf_counter()
    rows = []
    print("| model | what | 1 process | 2 processes | efficiency |")
    print("| ----- | ---- | --------- | ----------- | ---------- |", flush=True)
    for name in args.models:
        target = target_state(name, args)
        one = measure(name, args, target)
        two = distributed.launch(measure, 2, name, args, target)
        (x1, y1), (x2, y2) = one.pop("poisons"), two.pop("poisons")
        row = {"model": name, "one": one, "two": two, "poisons_max_diff": float((x1 - x2).abs().max()), "labels_equal": bool(torch.equal(y1, y2))}
        for key in ("gc_s_per_iteration", "train_s_per_epoch", "minimize_s_per_iteration"):
            row[f"{key}_efficiency"] = one[key] / (2 * two[key])
        rows.append(row)
        for key, label in (("gc_s_per_iteration", "GC s/iteration"), ("train_s_per_epoch", "train s/epoch"),
                           ("minimize_s_per_iteration", "L-BFGS s/iteration")):
            print(f"| {row['model']} | {label} | {row['one'][key]:.4g} | {row['two'][key]:.4g} | {row[f'{key}_efficiency']:.2f} |")
        print(f"| {row['model']} | 2-process poisons vs 1 | max pixel difference {row['poisons_max_diff']:.3g} | labels equal: "
              f"{row['labels_equal']} | |", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}; whole run {time.perf_counter() - started:.0f} s")
    if args.json:
        io.write_json(args.json, {"rows": rows, "data": source, "args": vars(args)})


if __name__ == "__main__":
    sys.exit(main())
