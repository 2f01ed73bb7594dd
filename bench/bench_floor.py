"""Benchmark: the cost of the residual floor (:func:`poisonreach.reachability.residual_floor`).

For a logistic regression trained to convergence (weight decay 1e-3) on N MNIST images and GradPC
targets over ``--eps-w``, the floor at each ``--eps-d`` is computed with the library's defaults
(5,000 Frank–Wolfe iterations at most, tolerance 1e-3 of ‖r‖ without poisons), and timed beside
one forward pass of the model over the N images and τ (:func:`poisonreach.reachability.threshold`),
in the same process. Printed per cell: the floor as a ratio to ‖r‖ without poisons, where the
relaxation's iterates got (``relaxed`` / clean), the iterations, the seconds, milliseconds per
iteration, and the floor over the forward pass. The iterations depend on the target: a positive
floor settles in hundreds, a floor of 0 (the relaxation can cancel r) runs them all. Per target
also the budget to a tenth (:func:`poisonreach.reachability.floor_threshold`, ratio 0.1): its
value, the floors it computed and its seconds over the forward pass; and the box threshold
(:func:`poisonreach.reachability.box_threshold`, the cutting-plane programme over (A.10)) of the
target and of the clean model, with its seconds over the forward pass.

Absolute seconds depend on the machine; the ratios mostly do not. bench/README.md has the numbers
measured when this script was written.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from poisonreach import data as pr_data
from poisonreach import models, reachability, training
from poisonreach.errors import DatasetNotFoundError
from poisonreach.experiments.run import text_table
from poisonreach.targets import GradPC

REPO = Path(__file__).resolve().parents[1]
WEIGHT_DECAY = 1e-3


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--train-size", type=int, default=4200)
    parser.add_argument("--eps-w", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--eps-d", type=float, nargs="+", default=[0.01, 0.1, 1.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="a JSON file for every number (default: print only)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        splits = pr_data.load("mnist", root=args.data_root, seed=0).subset(args.train_size, seed=0)
        source = f"MNIST from {args.data_root}, {args.train_size} images"
    except DatasetNotFoundError:
        splits = pr_data.load("digits", seed=0)
        source = f"digits ({len(splits.x_train)} images; no MNIST under {args.data_root})"
    X, y = splits.x_train, splits.y_train
    clean = models.create("lr", splits.input_shape, splits.num_classes, mean=splits.mean, std=splits.std, seed=0)
    training.minimize(clean, X, y, weight_decay=WEIGHT_DECAY, progress=False)
    _, forward = timed(lambda: training.predict_logits(clean, X))
    _, tau_time = timed(lambda: reachability.threshold(clean, X, y, weight_decay=WEIGHT_DECAY))
    clean_box, clean_box_time = timed(lambda: reachability.box_threshold(clean, X, y, box=(0.0, 1.0), weight_decay=WEIGHT_DECAY))
    cells, thresholds = [], []
    for eps_w in args.eps_w:
        target = GradPC(eps_w, seed=0).generate(clean, X, y)
        tenth, seconds = timed(lambda: reachability.floor_threshold(target, X, y, 0.1, box=(0.0, 1.0), weight_decay=WEIGHT_DECAY))
        box, box_seconds = timed(lambda: reachability.box_threshold(target, X, y, box=(0.0, 1.0), weight_decay=WEIGHT_DECAY))
        thresholds.append({"eps_w": eps_w, **tenth.to_dict(), "seconds": seconds, "threshold_over_forward": seconds / forward,
                           "box_threshold": box, "box_seconds": box_seconds, "box_over_forward": box_seconds / forward})
        print(f"eps_w={eps_w:g}: budget to a tenth {tenth.tau:.4g} ({tenth.evaluations} floors), {seconds:.1f} s", flush=True)
        for eps_d in args.eps_d:
            floor, seconds = timed(lambda: reachability.residual_floor(target, X, y, eps_d, box=(0.0, 1.0), weight_decay=WEIGHT_DECAY))
            cells.append({"eps_w": eps_w, "eps_d": eps_d, **floor.to_dict(), "floor_ratio": floor.ratio, "seconds": seconds,
                          "ms_per_iteration": 1e3 * seconds / floor.iterations, "floor_over_forward": seconds / forward})
            print(f"eps_w={eps_w:g} eps_d={eps_d:g}: floor ratio {floor.ratio:.3g} in {floor.iterations} iterations, {seconds:.1f} s", flush=True)
    rows = [[f"{c['eps_w']:g}", f"{c['eps_d']:g}", f"{c['floor_ratio']:.3g}", f"{c['relaxed'] / c['clean']:.3g}", str(c["iterations"]),
             f"{c['seconds']:.2f}", f"{c['ms_per_iteration']:.2f}", f"{c['floor_over_forward']:.0f}"] for c in cells]
    print(f"{source}; one forward pass {forward * 1e3:.1f} ms, tau {tau_time * 1e3:.1f} ms, the clean model's box threshold "
          f"{clean_box:.3g} in {clean_box_time:.2f} s, {args.threads} thread(s)")
    print(text_table(["eps_w", "eps_d", "floor ratio", "relaxed ratio", "iterations", "s", "ms/it", "floor/forward"], rows))
    print(text_table(["eps_w", "budget to a tenth", "certified below", "floors", "s", "threshold/forward", "box threshold", "s",
                      "box/forward"],
                     [[f"{t['eps_w']:g}", f"{t['tau']:.4g}", f"{t['forbidden']:.4g}", str(t["evaluations"]), f"{t['seconds']:.1f}",
                       f"{t['threshold_over_forward']:.0f}", f"{t['box_threshold']:.4g}", f"{t['box_seconds']:.2f}",
                       f"{t['box_over_forward']:.0f}"] for t in thresholds]))
    record = {"source": source, "threads": args.threads, "machine": platform.platform(), "torch": torch.__version__,
              "forward_s": forward, "tau_s": tau_time, "clean_box_threshold": clean_box, "clean_box_s": clean_box_time,
              "cells": cells, "thresholds": thresholds}
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return record


if __name__ == "__main__":
    main()
