"""Reproduction check: the ResNet rows of Table 2 (the shipped sweeps ``table2-cifar10``, ResNet-18,
and ``table2-tinyimagenet``, ResNet-34) run end to end with their ``cpu`` profile
on full-size data sets, and how long each sweep takes.

The real CIFAR-10 and TinyImageNet cannot be fetched here, so the script first writes synthetic
ones of the original sizes and formats into ``--data-root`` (``poisonreach.data.fake_files``: CIFAR-10's
five pickle batches of 10,000 images and a test batch of 10,000; TinyImageNet's
tiny-imagenet-200/ tree of 64x64 JPEGs, 200 classes of 500 training and 50 validation images).
The images have class structure (a colour pattern per class plus noise), so the models learn
something; the accuracies and τ say nothing about the paper. Data already written with the same
sizes and seed is reused.

Each sweep is the CLI, unchanged: ``poisonreach sweep FILE --profile cpu --out OUT/NAME --threads
N`` with ``POISONREACH_DATA`` set to the data root (the sweep file itself is not touched), plus any
``--set KEY=VALUE`` overrides (to measure candidate profile settings). The sweep's log is echoed
with elapsed seconds and kept in OUT/NAME.log; afterwards the run folder's artefacts are listed in
the order they were written, with the seconds between them, which is where the time went:

    config.yaml → clean_model.pt           loading the data, training the clean model
    → target_model.pt                      clean test accuracy, the GradPC target
    → threshold.json                       target test accuracy, τ
    → eps_d=E/poisons.pt                   ‖g(µ)‖ at the target (first cell only), the GC attack
    → eps_d=E/retrained_model.pt           retraining on clean ∪ poisons
    → eps_d=E/result.json                  poisoned test accuracy, ‖g‖ after the poisons
    → metrics.json                         target validation accuracy

Printed per sweep: wall time, CPU time of the sweep process and CPU/wall (well under ``--threads``
means other processes had the cores), the load average before and after.

    OMP_NUM_THREADS=1 .venv/bin/python bench/run_resnet_profiles.py --threads 1 --configs cifar10
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from poisonreach.data import fake_files

REPO = Path(__file__).resolve().parent.parent

CONFIGS = {"cifar10": "table2-cifar10", "tinyimagenet": "table2-tinyimagenet"}  # shipped sweeps, by name
SIZES_FILE = "synthetic-sizes.json"  # beside the data set's folder: what was written there
BASE = Path("/tmp/poisonreach-resnet-profiles")


def write_data(name: str, root: Path, args: argparse.Namespace) -> float:
    """Write the synthetic data set ``name`` below ``root`` unless the same sizes are there;
    return the seconds spent writing (0 when reused)."""
    if name == "cifar10":
        folder = root / "cifar10" / "cifar-10-batches-py"
        sizes = {"per_batch": args.cifar_per_batch, "test_size": args.cifar_test, "seed": args.seed, "noise": args.noise}
        write = lambda: fake_files.write_cifar(folder, args.cifar_per_batch, test_size=args.cifar_test, seed=args.seed,  # noqa: E731
                                             noise=args.noise)
    else:
        folder = root / "tinyimagenet" / "tiny-imagenet-200"
        sizes = {"wnids": args.tin_classes, "train_per_class": args.tin_train, "val_per_class": args.tin_val, "seed": args.seed,
                 "noise": args.noise}
        write = lambda: fake_files.write_tinyimagenet(folder, wnids=args.tin_classes, train_per_class=args.tin_train,  # noqa: E731
                                                    val_per_class=args.tin_val, seed=args.seed, noise=args.noise)
    record = folder.parent / SIZES_FILE
    if record.is_file() and json.loads(record.read_text()) == sizes:
        print(f"{name}: reusing the synthetic data in {folder} ({sizes})", flush=True)
        return 0.0
    if folder.exists():
        raise SystemExit(f"{folder} exists but was not written by this script with {sizes}: delete it or choose another --data-root")
    started = time.perf_counter()
    write()
    record.write_text(json.dumps(sizes))
    took = time.perf_counter() - started
    print(f"{name}: wrote synthetic data {sizes} to {folder} in {took:.0f} s", flush=True)
    return took


def timeline(run_dir: Path, started: float) -> list[tuple[str, float]]:
    """(artefact, seconds since the sweep started) for the run folder's files, oldest first."""
    names = ["config.yaml", "clean_model.pt", "target_model.pt", "threshold.json", "metrics.json"]
    paths = [run_dir / n for n in names] + [p for cell in sorted(run_dir.glob("eps_d=*"))
                                            for p in (cell / "poisons.pt", cell / "retrained_model.pt", cell / "result.json")]
    found = [(str(p.relative_to(run_dir)), p.stat().st_mtime - started) for p in paths if p.is_file()]
    return sorted(found, key=lambda item: item[1])


def run_sweep(name: str, args: argparse.Namespace) -> dict:
    """One sweep through the CLI, its log echoed with elapsed seconds; its times and timeline."""
    out = Path(args.out) / name
    command = [sys.executable, "-m", "poisonreach.cli", "sweep", CONFIGS[name], "--profile", args.profile,
               "--out", str(out), "--threads", str(args.threads), *args.set]
    env = {**os.environ, "POISONREACH_DATA": str(args.data_root), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads)}
    print("$ POISONREACH_DATA=%s %s" % (args.data_root, " ".join(command)), flush=True)
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started_epoch, started = time.time(), time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(Path(args.out) / f"{name}.log", "a") as log, \
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO) as proc:
        for line in proc.stdout:
            stamped = f"[{time.perf_counter() - started:7.0f} s] {line.rstrip()}"
            print(stamped, flush=True)
            log.write(stamped + "\n")
            log.flush()
    wall = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    run_dir = out / "cells" / "default"
    result = {"config": name, "returncode": proc.returncode, "wall_s": wall, "cpu_s": cpu, "cpu_per_wall": cpu / wall,
              "load_before": load_before, "load_after": os.getloadavg(), "command": command,
              "timeline": timeline(run_dir, started_epoch) if run_dir.is_dir() else []}
    return result


def report(result: dict) -> str:
    lines = [f"{result['config']}: exit {result['returncode']}, wall {result['wall_s']:.0f} s, CPU {result['cpu_s']:.0f} s "
             f"(CPU/wall {result['cpu_per_wall']:.2f}), load average {result['load_before'][0]:.2f} before, "
             f"{result['load_after'][0]:.2f} after"]
    previous = 0.0
    for artefact, at in result["timeline"]:
        lines.append(f"  {at:8.0f} s  (+{at - previous:6.0f} s)  {artefact}")
        previous = at
    if result["timeline"]:
        lines.append(f"  {result['wall_s']:8.0f} s  (+{result['wall_s'] - previous:6.0f} s)  end (plots, table)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="which sweeps (default: both)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the sweep (default: 1)")
    parser.add_argument("--out", type=Path, default=BASE / "sweeps", help=f"sweep folders and logs (default: {BASE}/sweeps)")
    parser.add_argument("--data-root", type=Path, default=BASE / "data", help=f"where the synthetic data sets go (default: {BASE}/data)")
    parser.add_argument("--profile", default="cpu", help="the sweep files' profile (default: cpu)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="sweep overrides, e.g. run.train_size=500")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic images")
    parser.add_argument("--noise", type=float, default=48.0,
                        help="std of the pixel noise (0-255 levels) around each class pattern; at 48 a ResNet reaches 100%% clean accuracy")
    parser.add_argument("--cifar-per-batch", type=int, default=10_000, help="images per CIFAR-10 training batch (5 batches)")
    parser.add_argument("--cifar-test", type=int, default=10_000, help="CIFAR-10 test images")
    parser.add_argument("--tin-classes", type=int, default=200, help="TinyImageNet classes (wnids)")
    parser.add_argument("--tin-train", type=int, default=500, help="TinyImageNet training images per class")
    parser.add_argument("--tin-val", type=int, default=50, help="TinyImageNet validation (test split) images per class")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")

    results = []
    for name in args.configs:
        write_s = write_data(name, args.data_root, args)
        result = {**run_sweep(name, args), "write_data_s": write_s}
        print(report(result), flush=True)
        results.append(result)
    print("\nsummary (wall time per sweep):")
    for r in results:
        print(f"  {r['config']:13s} {r['wall_s']:8.0f} s  exit {r['returncode']}  CPU/wall {r['cpu_per_wall']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    sys.exit(0 if all(r["returncode"] == 0 for r in main()) else 1)
