"""Benchmark: Deep Partition Aggregation on MNIST (section 5.4, Table 4): training time, clean and
certified accuracy.

For one base model architecture (``--model``) and k (``--k``), on the 42,000 MNIST training images
of ``poisonreach.data.load("mnist")``:

- **train s**: :meth:`DeepPartitionAggregation.train` with ``--epochs`` epochs (the default protocol
  of ``training.train`` unless ``--optimizer``, ``--lr``, ``--gamma``, ``--batch-size`` say otherwise), and the same with 1 epoch; **s/epoch** = (T_E − T_1) / (E − 1),
  **setup s** = T_1 − s/epoch (hashing, canonical order, initialising k base models, stacking).
  With ``--epochs 1`` only T_1 is measured and s/epoch is T_1. The same split is reported in CPU
  seconds (``cpu_s_per_epoch``, ``setup_cpu_s``), which other processes on the cores disturb less.
- **certify s**: :meth:`DeepPartitionAggregation.certify` over ``--test-n`` test images (all
  10,000 by default): every test image through every base model.
- clean accuracy of the vote, the median certified radius, and the certified accuracy at radius
  r = round(ε_d·n) with ε_d = 0.008 (the poisoning ratio of Table 4; 336 insertions for n = 42,000).

Times are wall-clock (``time.perf_counter``) with ``torch.set_num_threads(--threads)``; the last
column, CPU/wall, is this process's CPU time over its wall time (well below the thread count means
other processes took the cores). Peak resident memory is reported too.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_dpa.py --model lr --k 1200
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from poisonreach import data as pr_data
from poisonreach import models
from poisonreach.defenses.dpa import DeepPartitionAggregation

EPS_D = 0.008  # Table 4


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="lr", choices=["lr", "nn", "cnn"])
    parser.add_argument("--k", type=int, default=1200, help="number of partitions / base models")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--group-size", type=int, default=64, help="base models trained and run at once")
    parser.add_argument("--optimizer", default="adadelta", choices=["adadelta", "sgd", "adam"])
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--gamma", type=float, default=0.7, help="learning-rate decay per epoch")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--test-n", type=int, default=None, help="test images to certify (default: all)")
    parser.add_argument("--data-root", default=str(repo.parent / "shared" / "data"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    s = pr_data.load("mnist", root=args.data_root, seed=0)
    x_test, y_test = s.x_test[: args.test_n], s.y_test[: args.test_n]
    template = models.create(args.model, s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    print(f"# MNIST: {len(s.x_train)} training images, {len(x_test)} test images; model {args.model}, k = {args.k}, "
          f"{args.epochs} epochs of {args.optimizer} (lr {args.lr}, gamma {args.gamma}, batch {args.batch_size}), "
          f"{args.threads} thread(s), group size {args.group_size}; load {os.getloadavg()[0]:.2f}", flush=True)

    def dpa(epochs: int) -> DeepPartitionAggregation:
        return DeepPartitionAggregation(args.k, epochs=epochs, group_size=args.group_size, device=args.device,
                                        optimizer=args.optimizer, lr=args.lr, gamma=args.gamma, batch_size=args.batch_size)

    def one_epoch() -> None:  # the ensemble is dropped at once: k base models can take gigabytes
        dpa(1).train(template, s.x_train, s.y_train)

    _, t1, c1 = timed(one_epoch)
    print(f"1 epoch: {t1:.1f} s", flush=True)
    if args.epochs > 1:
        method = dpa(args.epochs)
        ensemble, total, cpu = timed(lambda: method.train(template, s.x_train, s.y_train))
        per_epoch, per_epoch_cpu = (total - t1) / (args.epochs - 1), (cpu - c1) / (args.epochs - 1)
    else:
        method, total, cpu = dpa(1), t1, c1
        ensemble, _, _ = timed(lambda: method.train(template, s.x_train, s.y_train))
        per_epoch, per_epoch_cpu = t1, c1
    print(f"{args.epochs} epochs: {total:.1f} s", flush=True)
    cert, t_cert, c_cert = timed(lambda: method.certify(ensemble, x_test, y_test))
    radius = round(EPS_D * len(s.x_train))
    sizes = torch.bincount(method.partition(s.x_train), minlength=args.k)
    result = {
        "model": args.model,
        "k": args.k,
        "epochs": args.epochs,
        "threads": args.threads,
        "group_size": args.group_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "gamma": args.gamma,
        "batch_size": args.batch_size,
        "n_train": len(s.x_train),
        "n_test": len(x_test),
        "partition_size_min_mean_max": [int(sizes.min()), float(sizes.float().mean()), int(sizes.max())],
        "train_s": total,
        "train_1_epoch_s": t1,
        "s_per_epoch": per_epoch,
        "setup_s": t1 - per_epoch,
        "cpu_s_per_epoch": per_epoch_cpu,
        "setup_cpu_s": c1 - per_epoch_cpu,
        "certify_s": t_cert,
        "train_cpu_s": cpu,
        "certify_cpu_s": c_cert,
        "cpu_over_wall": (cpu + c_cert) / (total + t_cert),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "clean_accuracy": cert.accuracy,
        "median_radius": cert.median_radius,
        "certified_radius": radius,
        "certified_accuracy_at_radius": cert.certified_accuracy(radius),
        "certified_accuracy_at": {r: cert.certified_accuracy(r) for r in (0, 50, 100, 200, 300, 400, 500)},
        "load_average_after": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=1))
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, args.json)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
