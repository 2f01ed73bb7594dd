"""Benchmark: peak resident memory (and wall time) of loading the large data sets and of a GC run.

Each measurement runs in a fresh Python process and reports that process's own peak resident set
size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``), so no measurement inherits another's memory.
Linux carries a process's peak across ``exec`` from the process it was forked from, so the parent
stays small (numpy only, about 30 MB) and makes the synthetic data set in a child of its own:

- **tinyimagenet**: ``data.load("tinyimagenet")`` from its decoded cache, then one training batch
  of 64 random rows touched (summed): the peak at that point; then g(µ) of a logistic regression
  over the whole training split (:func:`poisonreach.gradients.gradient_sum`, chunks of 256), one
  full pass over the data: the peak after it. When no data root with the real set is given
  (``--tinyimagenet-root``), a synthetic full-size one is made in a temporary folder: the
  original folder layout with 100,000 + 10,000 empty placeholder JPEGs (a fresh cache means the
  loader only lists them) and a cache of random uint8 pixels, 100,000×3×64×64 training and
  10,000 test images, in the format of each code version. The output says which.
- **mnist-gc**: a Gauss–Newton GC run on real MNIST with logistic regression: load the data,
  train the clean model to convergence (L-BFGS, λ = 1e-3), plant a GradPC target (ε_w 0.5), run
  :class:`poisonreach.attacks.GaussNewtonCanceling` (ε_d 0.03, ``--iterations``), retrain the victim
  to convergence on clean ∪ poisons and take its test accuracy.

``--baseline-src DIR`` also measures another version of the library (a ``src`` folder, e.g. the
commit before streaming data: ``git archive dc2153f src | tar -x -C /tmp/base`` and
``--baseline-src /tmp/base/src``), reading TinyImageNet's cache in that version's format (one
``.npz``). bench/README.md has the numbers measured when this script was written.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
TRAIN_PER_CLASS, VAL_PER_CLASS, CLASSES = 500, 50, 200
BATCH = 64


def peak_mb() -> float:
    """This process's peak resident set size in MB (Linux reports ru_maxrss in kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_tinyimagenet(root: str) -> dict:
    import torch
    from poisonreach import data, models
    from poisonreach.gradients import gradient_sum, select_parameters
    from poisonreach.losses import resolve

    started = time.perf_counter()
    splits = data.load("tinyimagenet", root=root, seed=0)
    loaded = time.perf_counter() - started
    batch = splits.x_train[torch.randperm(len(splits.x_train), generator=torch.Generator().manual_seed(0))[:BATCH]]
    checksum, batch_peak, batch_s = float(batch.sum()), peak_mb(), time.perf_counter() - started
    model = models.create("lr", input_shape=splits.input_shape, num_classes=splits.num_classes, mean=splits.mean, std=splits.std, seed=0)
    params = select_parameters(model)
    gradient_sum(model, params, splits.x_train, splits.y_train, resolve(splits.num_classes, splits.y_train), chunk_size=256,
                 device=torch.device("cpu"))
    return {"load_s": loaded, "batch_s": batch_s, "batch_peak_rss_mb": batch_peak, "wall_s": time.perf_counter() - started,
            "pass_s": time.perf_counter() - started - batch_s, "train": len(splits.x_train), "test": len(splits.x_test),
            "x_train": type(splits.x_train).__name__, "batch_sum": checksum}


def measure_mnist_gc(root: str, train_size: int | None, iterations: int) -> dict:
    from poisonreach import data, models
    from poisonreach.attacks import GaussNewtonCanceling
    from poisonreach.targets import GradPC
    from poisonreach.training import accuracy, minimize

    started = time.perf_counter()
    splits = data.load("mnist", root=root, seed=0).subset(train_size, seed=0)
    X, y = splits.x_train, splits.y_train

    def fit(X_fit, y_fit):
        model = models.create("lr", input_shape=splits.input_shape, num_classes=10, mean=splits.mean, std=splits.std, seed=0)
        return minimize(model, X_fit, y_fit, weight_decay=1e-3, progress=False)

    clean = fit(X, y)
    target = GradPC(0.5, seed=0).generate(clean, X, y)
    attack = GaussNewtonCanceling(0.03, iterations=iterations, weight_decay=1e-3, seed=0, progress=False)
    poisons = attack.poison(target, X, y)
    victim = fit(*poisons.mixed(X, y, num_outputs=10))
    return {"wall_s": time.perf_counter() - started, "train": len(X), "x_train": type(X).__name__,
            "clean_acc": accuracy(clean, splits.x_test, splits.y_test), "poisoned_acc": accuracy(victim, splits.x_test, splits.y_test),
            "grad_norm_history": poisons.grad_norm_history}


def child(args) -> None:
    """Run one measurement (or make the synthetic data set) in this process and print its numbers
    as one JSON line."""
    if args.child == "make-tinyimagenet":
        out = {kind: str(root) for kind, root in synthetic_tinyimagenet(Path(args.root)).items()}
    elif args.child == "tinyimagenet":
        out = measure_tinyimagenet(args.root)
    else:
        out = measure_mnist_gc(args.root, args.train_size, args.iterations)
    print(json.dumps({**out, "peak_rss_mb": peak_mb()}))


def run_child(src: Path, name: str, root: Path, args) -> dict:
    """One measurement in a fresh interpreter that imports the library from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    command = [sys.executable, __file__, "--child", name, "--root", str(root), "--iterations", str(args.iterations)]
    if args.train_size is not None:
        command += ["--train-size", str(args.train_size)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the {name} measurement with {src} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def synthetic_tinyimagenet(folder: Path) -> dict[str, Path]:
    """Data roots with a full-size synthetic TinyImageNet: one placeholder tree, and a fresh cache in
    each format (``new``: the memory-mappable .npy and its labels; ``old``: the earlier .npz)."""
    from poisonreach.data import tinyimagenet

    tree = folder / "tree" / tinyimagenet.TOP
    wnids = [f"n{i:08d}" for i in range(CLASSES)]
    (tree / "val" / "images").mkdir(parents=True)
    (tree / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    for wnid in wnids:
        images = tree / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(TRAIN_PER_CLASS):
            (images / f"{wnid}_{i}.JPEG").touch()
    annotations = []
    for i in range(CLASSES * VAL_PER_CLASS):
        (tree / "val" / "images" / f"val_{i}.JPEG").touch()
        annotations.append(f"val_{i}.JPEG\t{wnids[i % CLASSES]}\t0\t0\t63\t63\n")
    (tree / "val" / "val_annotations.txt").write_text("".join(annotations))
    roots = {kind: folder / kind for kind in ("new", "old")}
    for root in roots.values():
        (root / tinyimagenet.SUB).mkdir(parents=True)
        (root / tinyimagenet.SUB / tinyimagenet.TOP).symlink_to(tree, target_is_directory=True)
    n_train, n_test = CLASSES * TRAIN_PER_CLASS, CLASSES * VAL_PER_CLASS
    y_train, y_test = np.repeat(np.arange(CLASSES), TRAIN_PER_CLASS), np.arange(n_test) % CLASSES
    new = roots["new"] / tinyimagenet.SUB
    pixels = np.lib.format.open_memmap(new / tinyimagenet.CACHE, mode="w+", dtype=np.uint8, shape=(n_train + n_test, 3, 64, 64))
    rng = np.random.default_rng(0)
    for start in range(0, len(pixels), 10_000):
        pixels[start:start + 10_000] = rng.integers(0, 256, (min(10_000, len(pixels) - start), 3, 64, 64), dtype=np.uint8)
    pixels.flush()
    np.savez(new / tinyimagenet.LABELS, y_train=y_train, y_test=y_test)
    np.savez(roots["old"] / tinyimagenet.SUB / tinyimagenet.OLD_CACHE, x_train=pixels[:n_train], y_train=y_train,
             x_test=pixels[n_train:], y_test=y_test)
    del pixels
    return roots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--measure", nargs="+", choices=("tinyimagenet", "mnist-gc"), default=["tinyimagenet", "mnist-gc"])
    parser.add_argument("--tinyimagenet-root", type=Path, default=None,
                        help="a data root holding the real TinyImageNet (default: a synthetic full-size one in a temporary folder)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="the data root holding MNIST")
    parser.add_argument("--train-size", type=int, default=None, help="MNIST training points for mnist-gc (default: all 42,000)")
    parser.add_argument("--iterations", type=int, default=3, help="Gauss–Newton iterations of mnist-gc")
    parser.add_argument("--baseline-src", type=Path, default=None, help="also measure the library in this src folder")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    parser.add_argument("--child", choices=("make-tinyimagenet", "tinyimagenet", "mnist-gc"), help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    versions = {"this tree": REPO / "src", **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        if "tinyimagenet" in args.measure:
            if args.tinyimagenet_root is not None:
                print(f"tinyimagenet: the real data set under {args.tinyimagenet_root} (this tree only)")
                roots = {"this tree": args.tinyimagenet_root}
            else:
                started = time.perf_counter()
                made = run_child(REPO / "src", "make-tinyimagenet", Path(tmp), args)
                print(f"tinyimagenet: the real data set is absent: a synthetic full-size one ({CLASSES * TRAIN_PER_CLASS:,} + "
                      f"{CLASSES * VAL_PER_CLASS:,} random uint8 images, placeholder JPEGs) made in {time.perf_counter() - started:.0f} s")
                roots = {"this tree": made["new"], "baseline": made["old"]}
            for version, src in versions.items():
                if version in roots:
                    results.append({"measure": "tinyimagenet", "version": version, **run_child(src, "tinyimagenet", roots[version], args)})
        if "mnist-gc" in args.measure:
            for version, src in versions.items():
                results.append({"measure": "mnist-gc", "version": version, **run_child(src, "mnist-gc", args.data_root, args)})
    print(f"{'measure':<14}{'version':<11}{'peak RSS MB':>12}{'wall s':>9}  x_train")
    for r in results:
        if "batch_peak_rss_mb" in r:  # the load and one batch, then the full pass
            print(f"{'  load+batch':<14}{r['version']:<11}{r['batch_peak_rss_mb']:>12.0f}{r['batch_s']:>9.1f}")
        print(f"{r['measure']:<14}{r['version']:<11}{r['peak_rss_mb']:>12.0f}{r['wall_s']:>9.1f}  {r['x_train']} ({r['train']:,} rows)")
    if args.json is not None:
        write_json(args.json, results)


def write_json(path: Path, payload) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file beside it, then os.replace (not
    bench_gc's or poisonreach.io's writer: importing torch would raise every child's peak)."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as out:
        json.dump(payload, out, indent=2)
    os.replace(out.name, path)


if __name__ == "__main__":
    main()
