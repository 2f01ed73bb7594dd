"""The ``poisonreach`` command: a thin layer over the library.

    poisonreach run [--dataset D] [--model M] [--eps-w E] [--eps-d 0.03 0.1 1] [--out DIR] [--device cpu]
    poisonreach run ... --attack gm|tgda|labelflip [--attack-option KEY=VALUE ...]
    poisonreach defend --run RUN_DIR --defense sever|influence|maxup|dpa [--option KEY=VALUE ...]
    poisonreach sweep FILE [KEY=VALUE ...] [--profile cpu] [--jobs N]
    poisonreach plot RUN_OR_SWEEP_DIR
    poisonreach report SWEEP_DIR
    poisonreach tau --dataset D --model M --eps-w E [--json]

Bad input prints one line on stderr and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml

from . import data, io, models
from .attacks import GradientCanceling
from .attacks.gradient_canceling import SCHEDULES
from .gradients import PARAMETER_SETS
from .errors import PoisonReachError
from .defenses import DEFENSES
from .experiments import plots
from .experiments import sweep as sweep_module
from .experiments.report import write_report
from .experiments import defend as defend_module
from .experiments.defend import defend, format_defense_table
from .experiments.run import ATTACKS, POISONED_TARGETS, TARGET_GENERATORS, RunConfig, format_table, run
from .reachability import threshold
from .targets import EPS_W_MODES


def _box(text: str):
    if text == "none":
        return None
    if text == "data-range":
        return text
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--box takes LOW,HIGH (e.g. 0,1), 'data-range' or 'none', got {text!r}") from None
    return (low, high)


def _budget(text: str):
    if text == "tau":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--eps-d takes numbers or 'tau', got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as YAML (numbers, booleans, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"options take KEY=VALUE (e.g. epochs=50), got {text!r}")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r} as YAML") from None


def _common(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that builds a clean model and a target."""
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(data.names())} (default: digits)")
    p.add_argument("--model", default="lr", help=f"one of {', '.join(models.names())} (default: lr)")
    p.add_argument("--eps-w", type=float, default=1.0, help="radius of the parameter corruption (default: 1)")
    p.add_argument("--eps-w-mode", choices=EPS_W_MODES, default="absolute", help="absolute radius (the paper's tables) or relative to ‖w‖")
    p.add_argument("--target", choices=sorted([*TARGET_GENERATORS, *POISONED_TARGETS]), default="gradpc",
                   help="target generator (default: gradpc); fixed: last-layer parameters given with --target-option weight=[[...]]; "
                        "tgda, labelflip, gm: the model retrained on that attack's poisons (ε_d = 1 unless --target-option eps_d=...)")
    p.add_argument("--target-option", dest="target_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the target generator, e.g. weight=[[-1,-1]] bias=[0] for fixed (repeatable)")
    p.add_argument("--target-scale", type=float, default=1.0, help="multiply the target's last layer by this (appendix C.6)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-size", type=int, default=None, help="use a seeded random subset of the training split")
    p.add_argument("--data-root", default=None, help="folder holding the data sets (default: $POISONREACH_DATA or ~/.cache/poisonreach)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--train-epochs", type=int, default=None, help="training epochs (default: 14, the paper's protocol)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: Adadelta 1.0)")
    p.add_argument("--train-batch-size", type=int, default=None, help="training batch size (default: 64)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poisonreach", description="Model-targeted indiscriminate data poisoning: the threshold τ, Gradient Canceling, baselines, defenses, and the paper's experiments.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="clean model → target → τ → GC for each ε_d → retrain → metrics", description=run.__doc__)
    _common(p)
    p.add_argument("--eps-d", type=_budget, nargs="+", default=[0.03, 0.1, 1.0], help="poison budgets ε_d; 'tau' means ε_d = τ of the target (default: 0.03 0.1 1)")
    p.add_argument("--out", default=None, help="run folder (default: runs/DATASET-MODEL-epswE-seedS); an existing folder of the same run is resumed")
    p.add_argument("--attack", choices=sorted(ATTACKS), default="gc", help="gc (Gradient Canceling, default), gm (Gradient Matching), tgda or labelflip")
    p.add_argument("--attack-option", dest="attack_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the attack, e.g. --attack-option epochs=50 (repeatable)")
    p.add_argument("--preset", choices=sorted(GradientCanceling.presets), default=None, help="named GC setting ('paper': SGD momentum, cosine, lr 0.5, 1000 epochs)")
    # GC options are left out of the namespace unless given, so the preset's or the class's defaults apply
    gc = p.add_argument_group("Gradient Canceling", "unset options keep GradientCanceling's defaults")
    unset = argparse.SUPPRESS
    gc.add_argument("--gc-epochs", dest="gc.epochs", type=int, default=unset, help="GC epochs")
    gc.add_argument("--gc-lr", dest="gc.lr", type=float, default=unset, help="GC step size per point")
    gc.add_argument("--gc-momentum", dest="gc.momentum", type=float, default=unset)
    gc.add_argument("--schedule", dest="gc.schedule", choices=SCHEDULES, default=unset)
    gc.add_argument("--block-size", dest="gc.block_size", type=int, default=unset, help="poisons per GC step (default: all at once)")
    gc.add_argument("--box", dest="gc.box", type=_box, default=unset, help="admissible set: LOW,HIGH, 'data-range' (GC-c) or 'none' (default: 0,1)")
    gc.add_argument("--optimize-labels", dest="gc.optimize_labels", action="store_true", default=unset, help="also optimise the poison labels")
    gc.add_argument("--replace", dest="gc.replace", action="store_true", default=unset, help="replace clean points instead of adding (appendix C.10)")
    gc.add_argument("--parameters", dest="gc.parameters", choices=PARAMETER_SETS, default=unset, help="parameters whose gradient is cancelled (default: all)")
    p.add_argument("--quiet", action="store_true", help="print only the table")

    p = sub.add_parser("defend", help="apply a defense to every ε_d cell of a finished run", description=defend_module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a run folder written by `poisonreach run`")
    p.add_argument("--defense", required=True, choices=sorted(DEFENSES), help="sever, influence, maxup or dpa")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the defense, e.g. --option rounds=2 or --option num_partitions=1200 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--quiet", action="store_true", help="print only the table")

    p = sub.add_parser("sweep", help="run a sweep file: a grid of runs, resumable, in parallel, with a results table",
                       description=sweep_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep_module.add_arguments(p)

    p = sub.add_parser("report", help="write report.md for a sweep folder: its table beside the paper's numbers, and its figures")
    p.add_argument("folder", help="a sweep folder (poisonreach sweep)")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("plot", help="draw the figures of a run or sweep folder (PNG and PDF)", description=plots.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a run folder (poisonreach run) or a sweep folder (poisonreach sweep)")
    p.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)

    p = sub.add_parser("tau", help="the reachability threshold of a target, without any attack")
    _common(p)
    p.add_argument("--target-file", default=None, help="a saved target model (poisonreach format): skip training and corruption")
    p.add_argument("--json", action="store_true", help="print JSON")
    return parser


def _training(args) -> dict:
    given = {"epochs": args.train_epochs, "lr": args.train_lr, "batch_size": args.train_batch_size}
    return {k: v for k, v in given.items() if v is not None}


def _config(args, **extra) -> RunConfig:
    return RunConfig(
        dataset=args.dataset,
        model=args.model,
        eps_w=args.eps_w,
        eps_w_mode=args.eps_w_mode,
        target=args.target,
        target_scale=args.target_scale,
        target_options=dict(args.target_option),
        seed=args.seed,
        train_size=args.train_size,
        data_root=args.data_root,
        training=_training(args),
        device=args.device,
        **extra,
    )


def _cmd_run(args) -> int:
    gc_options = {k.removeprefix("gc."): v for k, v in vars(args).items() if k.startswith("gc.")}
    if gc_options and args.attack != "gc":
        given = ", ".join("--" + k.replace("_", "-") for k in gc_options)
        raise PoisonReachError(f"{given} set Gradient Canceling options, but --attack is {args.attack}: use --attack-option KEY=VALUE")
    config = _config(args, eps_d=args.eps_d, attack=args.attack, attack_options={**gc_options, **dict(args.attack_option)}, preset=args.preset)
    out = args.out or f"runs/{args.dataset}-{args.model}-epsw{args.eps_w:g}-seed{args.seed}"
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    metrics = run(config, out, log=log)
    if args.quiet:
        print(format_table(metrics))
    print(f"run folder: {out}", file=sys.stderr)
    return 0


def _cmd_defend(args) -> int:
    log = (lambda *a: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))
    summary = defend(args.run, args.defense, dict(args.option), log=log)
    print(format_defense_table(args.defense, summary))
    return 0


def _cmd_plot(args) -> int:
    folder = Path(args.folder)
    written = plots.plot_sweep(folder) if (folder / "cells").is_dir() else plots.plot_run(folder)
    print("\n".join(str(p) for p in written))
    return 0


def _cmd_report(args) -> int:
    print(write_report(args.folder))
    return 0


def _cmd_tau(args) -> int:
    config = _config(args)
    config.validate()
    splits = data.load(args.dataset, root=args.data_root, seed=args.seed).subset(args.train_size, seed=args.seed)
    X, y = splits.x_train, splits.y_train
    device = torch.device(args.device)
    if args.target_file:
        target = models.load_model(args.target_file).to(device)
    else:
        from .training import train

        clean = train(models.create(args.model, splits.input_shape, splits.num_classes, mean=splits.mean, std=splits.std, seed=args.seed).to(device), X, y, seed=args.seed, device=device, **config.training)
        target = config.make_generator().generate(clean, X, y)
    thr = threshold(target, X, y)
    record = {"dataset": args.dataset, "model": args.model, "eps_w": None if args.target_file else args.eps_w, **thr.to_dict()}
    if args.json:
        print(json.dumps(io.plain(record), indent=2))
    else:
        print(f"tau = {thr.tau:.6g}   (tau(c) = {thr.tau_multiclass if thr.tau_multiclass is None else f'{thr.tau_multiclass:.6g}'}, <W, G(mu)> = {thr.inner:.6g}, lambda = {thr.lam:.6g})")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # sweep overrides (KEY=VALUE) may also follow the options: argparse leaves those over
    if args.command == "sweep" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.threads is not None:
        if args.threads < 1:
            print("poisonreach: error: --threads must be at least 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    try:
        return {"run": _cmd_run, "defend": _cmd_defend, "sweep": sweep_module.command, "plot": _cmd_plot, "report": _cmd_report, "tau": _cmd_tau}[args.command](args)
    except PoisonReachError as e:
        print(f"poisonreach: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poisonreach: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
