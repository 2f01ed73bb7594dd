"""Benchmark: how fast each Gradient Canceling solver drives ‖g(χ)‖ down on a planted target.

The target is planted: the clean logistic regression's victim after a least-likely label flip of
ε_d·n random training points (``LabelFlip(strategy="least-likely")``), retrained with the paper's
protocol. Those flipped copies are admissible poisons, so the target is reachable at ε_d as far as
the victim's training converged (its training-gradient norm is printed; ``--converged`` trains every
model with ``training.minimize`` instead, so that it is reachable exactly). Each solver attacks the
same target at the same ε_d and records ‖g(µ) + ε_d·g(ν̂)‖ against wall time:

- ``pgd``: GradientCanceling (Algorithm 1 with backtracking), the labels of the start points;
- ``pgd-soft``: the same with ``optimize_labels=True`` — a relaxation: soft labels are not data
  points anyone can insert into a training set, shown for reference only;
- ``gn``: GaussNewtonCanceling, hard labels reassigned greedily;
- ``gn-fixed``: GaussNewtonCanceling with the start points' labels.

Gauss–Newton records the time of every iteration; projected gradient's per-epoch time is its
setup (an ``epochs=0`` run) plus an equal share of the rest per epoch. The table gives the final
ratio and the seconds to ratios 1e-1, 1e-2, 1e-3 (after setup, which every solver pays alike);
``--agreement`` also retrains a victim on clean ∪ each solver's poisons and reports the share of
test points on which it predicts what the target predicts. The plot (PNG and PDF) shows ratio
against time. Example (the issue's setting, about 15 minutes at one thread):

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_convergence.py --eps-d 0.1 --threads 1 --out bench/results/convergence
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from poisonreach import data, io, models, training
from poisonreach.attacks import GaussNewtonCanceling, GradientCanceling, LabelFlip

REPO = Path(__file__).resolve().parents[1]
THRESHOLDS = (1e-1, 1e-2, 1e-3)


def fit(model, X, y, seed: int, weight_decay: float | None):
    """The protocol: the paper's (Adadelta, 14 epochs) or, with a weight decay, the converged one."""
    if weight_decay is None:
        return training.train(model, X, y, seed=seed, progress=False)
    return training.minimize(model, X, y, weight_decay=weight_decay, progress=False)


def planted_target(splits, eps_d: float, seed: int, model: str = "lr", weight_decay: float | None = None):
    """The clean model and the victim of a least-likely flip at ε_d, trained by ``fit``."""
    fresh = lambda: models.create(model, splits.input_shape, splits.num_classes, mean=splits.mean, std=splits.std, seed=seed)  # noqa: E731
    X, y = splits.x_train, splits.y_train
    clean = fit(fresh(), X, y, seed, weight_decay)
    flip = LabelFlip(eps_d, strategy="least-likely", seed=seed).poison(clean, X, y)
    Xm, ym = flip.mixed(X, y)
    target = fit(fresh(), Xm, ym, seed, weight_decay).eval()
    return clean, target, training.training_gradient_norm(target, Xm, ym, weight_decay=weight_decay or 0.0)


def solvers(eps_d: float, args) -> dict:
    common = dict(parameters=args.parameters, seed=args.seed, progress=False, weight_decay=args.weight_decay or 0.0)
    return {
        "pgd": lambda epochs: GradientCanceling(eps_d, epochs=epochs, **common),
        "pgd-soft": lambda epochs: GradientCanceling(eps_d, epochs=epochs, optimize_labels=True, **common),
        "gn": lambda iterations: GaussNewtonCanceling(eps_d, iterations=iterations, tolerance=args.tolerance, **common),
        "gn-fixed": lambda iterations: GaussNewtonCanceling(eps_d, iterations=iterations, labels="fixed", tolerance=args.tolerance, **common),
    }


def run_solver(name: str, make, target, X, y, args) -> dict:
    """The solver's ratio history against seconds after its setup."""
    if name.startswith("gn"):
        result = make(args.gn_iterations).poison(target, X, y)
        times = result.extra["time_history"]
        seconds = [t - times[0] for t in times]
    else:
        started = time.perf_counter()
        make(0).poison(target, X, y)
        setup = time.perf_counter() - started
        started = time.perf_counter()
        result = make(args.pgd_epochs).poison(target, X, y)
        per_epoch = max(time.perf_counter() - started - setup, 0.0) / max(args.pgd_epochs, 1)
        seconds = [k * per_epoch for k in range(len(result.grad_norm_history))]
    h = result.grad_norm_history
    ratios = [v / h[0] for v in h]
    reach = {f"{t:g}": next((s for s, r in zip(seconds, ratios) if r <= t), None) for t in THRESHOLDS}
    return {"result": result, "seconds": seconds, "ratios": ratios, "final_ratio": ratios[-1], "seconds_to": reach,
            "labels": "soft (relaxation)" if name == "pgd-soft" else ("greedy hard" if name == "gn" else "fixed hard")}


def agreement(target, splits, result, seed: int, model: str, weight_decay: float | None) -> float:
    victim = fit(models.create(model, splits.input_shape, splits.num_classes, mean=splits.mean, std=splits.std, seed=seed),
                 *result.mixed(splits.x_train, splits.y_train, num_outputs=splits.num_classes), seed, weight_decay)
    return training.agreement(victim, target, splits.x_test)


def plot(rows: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in rows.items():
        ax.plot([max(s, 1e-2) for s in row["seconds"]], row["ratios"], label=f"{name}: {row['labels']} labels",
                linestyle=":" if name == "pgd-soft" else "-", marker="." if name.startswith("gn") else None, markersize=4)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("seconds after setup (one thread; the start drawn at 0.01 s)")
    ax.set_ylabel("‖g(χ)‖ / initial")
    ax.set_title(title, fontsize="small")
    ax.legend(fontsize="small")
    fig.tight_layout()
    for suffix in ("png", "pdf"):
        fig.savefig(out.parent / f"{out.name}.{suffix}", dpi=150)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--train-size", type=int, default=None, help="a seeded subset of the 42,000 training images (default: all)")
    parser.add_argument("--eps-d", type=float, default=0.1)
    parser.add_argument("--model", default="lr", help="lr (default) or nn, cnn with --parameters last")
    parser.add_argument("--parameters", default="all", help="the parameters whose gradient is cancelled: all or last")
    parser.add_argument("--solvers", nargs="+", default=["pgd", "pgd-soft", "gn", "gn-fixed"])
    parser.add_argument("--pgd-epochs", type=int, default=200)
    parser.add_argument("--gn-iterations", type=int, default=60)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="Gauss-Newton stops at this ratio")
    parser.add_argument("--agreement", action="store_true", help="retrain a victim per solver and compare predictions")
    parser.add_argument("--converged", dest="weight_decay", type=float, nargs="?", const=1e-3, default=None, metavar="WEIGHT_DECAY",
                        help="train the clean model, the target and the victims to convergence (training.minimize, weight decay "
                             "1e-3 unless given) instead of the paper's protocol; the solvers cancel the weight decay too")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="file stem for the JSON, PNG and PDF (default: print only)")
    parser.add_argument("--replot", default=None, metavar="JSON", help="redraw the figure of a JSON this script wrote, and stop")
    args = parser.parse_args()
    if args.replot:
        record = io.read_json(args.replot)
        stem = Path(args.replot).with_suffix("")
        model, params = record.get("model", "lr"), record.get("parameters", "all")
        plot(record["solvers"], stem, f"planted least-likely target, MNIST-{model.upper()} ({params} parameters) n = {record['n']}, ε_d = {record['eps_d']:g}")
        return
    torch.set_num_threads(args.threads)

    started = time.perf_counter()
    splits = data.load("mnist", root=args.data_root, seed=args.seed).subset(args.train_size, seed=args.seed)
    X, y = splits.x_train, splits.y_train
    clean, target, target_grad = planted_target(splits, args.eps_d, args.seed, args.model, args.weight_decay)
    print(f"MNIST-{args.model.upper()} (parameters {args.parameters}), n = {len(X)}, eps_d = {args.eps_d:g}: clean {training.accuracy(clean, splits.x_test, splits.y_test):.2f}%, "
          f"planted target {training.accuracy(target, splits.x_test, splits.y_test):.2f}%, the target's training-gradient norm "
          f"{target_grad:.3g} (setup {time.perf_counter() - started:.0f} s)", flush=True)
    rows = {}
    makers = solvers(args.eps_d, args)
    for name in args.solvers:
        rows[name] = run_solver(name, makers[name], target, X, y, args)
        if args.agreement:
            rows[name]["agreement"] = agreement(target, splits, rows[name]["result"], args.seed, args.model, args.weight_decay)
        row = rows[name]
        reach = "  ".join(f"{'-' if s is None else f'{s:.1f}':>7}" for s in row["seconds_to"].values())
        agree = f"  {row['agreement']:6.2f}%" if args.agreement else ""
        print(f"{name:9} {row['labels']:18} final {row['final_ratio']:.3g}  s to 1e-1/1e-2/1e-3: {reach}  "
              f"({len(row['ratios']) - 1} steps, {row['seconds'][-1]:.1f} s){agree}", flush=True)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        record = {"model": args.model, "parameters": args.parameters, "n": len(X), "eps_d": args.eps_d, "threads": args.threads, "target_grad_norm": target_grad,
                  "protocol": "paper" if args.weight_decay is None else f"converged, weight decay {args.weight_decay:g}",
                  "solvers": {k: {key: v for key, v in row.items() if key != "result"} for k, row in rows.items()}}
        io.write_json(out.parent / f"{out.name}.json", record)
        plot(rows, out, f"planted least-likely target, MNIST-{args.model.upper()} ({args.parameters} parameters) n = {len(X)}, ε_d = {args.eps_d:g}")
        print(f"wrote {out}.json/.png/.pdf")
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
