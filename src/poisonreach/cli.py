"""The ``poisonreach`` command: a thin layer over :mod:`poisonreach.experiments`.

    poisonreach run [--dataset D] [--model M] [--eps-w E] [--eps-d 0.03 0.1 1] [--out DIR] [--device cpu]
    poisonreach run ... [--attack gc|gc-fw|gm|tgda|labelflip] [--attack-option KEY=VALUE ...] [--preset paper]
    poisonreach run ... [--victim-seeds 0 1 2] [--protocol honest|converged|official] [--victim-model M] [--log tensorboard|mlflow [--log-uri URI]]
    poisonreach run --dataset npz:FILE|folder:DIR --model module.path:Class [--model-option KEY=VALUE ...] ...
    poisonreach defend --run RUN_DIR --defense sever|influence|maxup|dpa [--option KEY=VALUE ...]
    poisonreach defend --poisons FILE --defense D [--dataset D] [--model M] [--out DIR]
    poisonreach export RUN_DIR --format npz|safetensors|png --out DIR [--eps-d E] [--allow-soft-labels]
    poisonreach evaluate --poisons FILE [--dataset D] [--model M] [--victim-seeds 0 1 2] [--protocol honest|converged] [--out DIR]
    poisonreach sweep FILE [KEY=VALUE ...] [--profile cpu] [--jobs N | --executor ray [--address ADDR]] [--log tensorboard|mlflow]
    poisonreach plot RUN_OR_SWEEP_DIR
    poisonreach report SWEEP_DIR
    poisonreach tau --dataset D --model M --eps-w E [--json]
    poisonreach train --dataset D --model M [--protocol honest|converged] --out FILE [--json]
    poisonreach audit [--data FILE.npz|DIR] [--model M] [--weights FILE] [--target-weights FILE] [--poisons FILE ...] [--runs RUN_DIR ...]
    poisonreach options [NAME]
    poisonreach --version

Each command parses its arguments and calls one function of the experiments: ``run.run``,
``defend.defend`` (or ``defend.defend_poisons``), ``export.export``, ``evaluate.evaluate``, ``sweep.command``,
``plots.plot_folder``, ``report.write_report``, ``run.tau``, ``run.train_model``, ``options.describe``. Tables and results go to
stdout; log lines (progress, what a run is doing) to stderr (``tracking.console_logging``; ``--quiet``
keeps warnings only). Bad input prints one line on stderr and exits with status 2; no traceback.
Every option's help shows its default (:class:`HelpFormatter`), and the descriptions are the
experiments' docstrings without their markup.
"""

from __future__ import annotations

import argparse
import json
import sys

import yaml


from .experiments import __version__
from .experiments import audit as audit_module
from .experiments import defend as defend_module
from .experiments import evaluate as evaluate_module
from .experiments import export as export_module
from .experiments import options as options_module
from .experiments import plots
from .experiments import report as report_module
from .experiments import run as run_module
from .experiments import sweep as sweep_module
from .experiments import tracking
from .experiments.config import (ATTACKS, CONVERGED_OPTIONS, DEFENSES, EPS_W_MODES, PARAMETER_SETS, PRESETS, PROTOCOLS, TARGETS, TRAINING_OPTIONS,
                                 PoisonReachError, RunConfig, dataset_names, model_names, parse_yaml, set_threads)
from .experiments.defend import defend, format_defense_table
from .experiments.report import write_report
from .experiments.run import format_table, format_tau, format_trained, tau, train_model


def _box(text: str):
    if text == "none":
        return None
    if text == "data-range":
        return text
    try:
        low, high = (float(v) for v in text.split(","))
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--box takes LOW,HIGH (e.g. 0,1), 'data-range' or 'none', got {text!r}") from None
    return (low, high)


def _budget(text: str):
    if text == "tau":
        return text
    try:
        return float(text)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"--eps-d takes numbers or 'tau', got {text!r}") from None


def _option(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE read as YAML (numbers, booleans, lists, null)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"options take KEY=VALUE (e.g. epochs=50), got {text!r}")
    try:
        return key.strip(), parse_yaml(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"cannot read the value of {text!r} as YAML") from None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (docstrings, line breaks kept); an option's help ends with
    "(default: ...)" unless it states its default itself, which it must where the default is None
    (the help then says what happens) or the option is required."""

    def _get_help_string(self, action: argparse.Action) -> str:  # the hook ArgumentDefaultsHelpFormatter overrides
        text = action.help or ""
        if not action.option_strings or "default" in text or action.required or action.default in (None, argparse.SUPPRESS):
            return text
        value = action.default
        if isinstance(value, list):  # nargs="+" and repeatable options
            shown = " ".join(map(str, value)) or "none"
        else:
            shown = "off" if value is False else str(value)
        return f"{text} (default: {shown.replace('%', '%%')})"


def _common(p: argparse.ArgumentParser, *, target: bool = True) -> None:
    """Options shared by every command that builds a clean model (and a target, unless ``target`` is False)."""
    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(dataset_names())}, or your own: npz:FILE (arrays x and y, "
                                                       "optionally x_test and y_test) or folder:DIR (one sub-folder of PNG/JPEG images "
                                                       "per class) (default: digits)")
    p.add_argument("--model", default="lr", help=f"one of {', '.join(model_names())}, or your own nn.Module class as module.path:Class, "
                                                 "importable from the working folder or PYTHONPATH and ending in an nn.Linear (default: lr)")
    p.add_argument("--model-option", dest="model_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of a module.path:Class model (repeatable); the constructor also receives "
                        "input_shape, num_classes, mean and std when it names them")
    p.add_argument("--pretrained", default=None, metavar="FILE",
                   help="start every model from these weights (a model file of a run, or torch.save(model.state_dict())) instead "
                        "of the seed's initialisation: fine-tuning a pretrained network; with --protocol converged --train-option "
                        "parameters=last only its last layer trains, on the fixed features (default: none, train from scratch)")
    if target:
        p.add_argument("--eps-w", type=float, default=1.0, help="radius of the parameter corruption (default: 1)")
        p.add_argument("--eps-w-mode", choices=EPS_W_MODES, default="absolute", help="absolute radius (the paper's tables) or relative to ‖w‖")
        p.add_argument("--target", choices=sorted(TARGETS), default="gradpc",
                       help="target generator (default: gradpc); fixed: last-layer parameters given with --target-option weight=[[...]]; "
                            "tgda, labelflip, gm: the model retrained on that attack's poisons (ε_d = 1 unless --target-option eps_d=...)")
        p.add_argument("--target-option", dest="target_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                       help="a constructor argument of the target generator, e.g. weight=[[-1,-1]] bias=[0] for fixed (repeatable; "
                            "poisonreach options gradpc lists a generator's)")
        p.add_argument("--target-scale", type=float, default=1.0, help="multiply the target's last layer by this (appendix C.6)")
    p.add_argument("--seed", type=int, default=0, help="seeds the data split, the models' initialisation and training"
                                                       + (", the target and the attack" if target else " (the victim seed unless --victim-seeds)"))
    p.add_argument("--train-size", type=int, default=None, help="use a seeded random subset of the training split (default: all of it)")
    p.add_argument("--data-root", default=None, help="folder holding the data sets (default: $POISONREACH_DATA or ~/.cache/poisonreach)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--train-epochs", type=int, default=None, help="training epochs (default: 14, the paper's protocol)")
    p.add_argument("--train-lr", type=float, default=None, help="training learning rate (default: Adadelta 1.0)")
    p.add_argument("--train-batch-size", type=int, default=None, help="training batch size (default: 64)")
    p.add_argument("--train-option", dest="train_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any option of the training protocol, e.g. gamma=1 (no learning-rate decay), optimizer=sgd, "
                        f"weight_decay=0.0005 (repeatable; one of {', '.join(TRAINING_OPTIONS)}; "
                        f"under --protocol converged one of {', '.join(CONVERGED_OPTIONS)}; poisonreach options train and "
                        "poisonreach options minimize describe them)")


# The documented shortcuts for the Gradient Canceling attacks' options (the README tour and the
# Makefile use them): flag → (the option it sets, add_argument's keywords). Any other option, of
# any attack, is --attack-option KEY=VALUE.
SHORTCUT_ATTACKS = ("gc", "gc-pgd", "gc-fw")
SHORTCUTS = {
    "--box": ("box", dict(type=_box, metavar="LOW,HIGH|data-range|none", help="admissible set: LOW,HIGH, 'data-range' (GC-c) or 'none' (default: 0,1)")),
    "--optimize-labels": ("optimize_labels", dict(action="store_true", help="gc-pgd only: optimise soft poison labels, a relaxation (default: "
                                                                            "off, the labels of the points they start from; gc chooses hard labels)")),
    "--replace": ("replace", dict(action="store_true", help="replace clean points instead of adding (appendix C.10; default: off, poisons are added)")),
    "--parameters": ("parameters", dict(choices=PARAMETER_SETS, help="parameters whose gradient is cancelled (default: all)")),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="poisonreach", formatter_class=HelpFormatter,
                                     description="Model-targeted indiscriminate data poisoning: the threshold τ, Gradient Canceling, "
                                                 "baselines, defenses, and the paper's experiments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="poisonreach COMMAND --help describes each")

    def command(name: str, help: str, doc: str | None = None) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=options_module.plain(doc or help), formatter_class=HelpFormatter)

    p = command("run", "clean model → target → τ → GC for each ε_d → retrain → metrics", run_module.__doc__)
    _common(p)
    p.add_argument("--eps-d", type=_budget, nargs="+", default=[0.03, 0.1, 1.0], help="poison budgets ε_d; 'tau' means ε_d = τ of the target (default: 0.03 0.1 1)")
    p.add_argument("--out", default=None, help="run folder (default: runs/DATASET-MODEL-ATTACK-epswE-seedS); an existing folder of the same "
                                               "run is resumed, with more eps_d or victim seeds too")
    p.add_argument("--attack", choices=sorted(ATTACKS), default="gc",
                   help="gc (Gradient Canceling by Gauss-Newton steps with hard labels, default), gc-pgd (Algorithm 1's projected "
                        "gradient descent; --preset paper is the paper's setting of it), gc-fw (Frank-Wolfe over measures), gc-official "
                        "(the official code's GC, what --protocol official runs for gc), gm (Gradient Matching), tgda or labelflip")
    p.add_argument("--attack-option", dest="attack_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the attack, e.g. --attack-option epochs=50 (repeatable; poisonreach options gc "
                        "lists an attack's)")
    p.add_argument("--preset", choices=PRESETS, default=None, help="a named setting of a GC solver; 'paper': gc-pgd with SGD momentum, "
                                                                  "cosine, lr 0.5, 1000 epochs, also chosen by --attack gc --preset paper "
                                                                  "(default: none, the attack's own defaults)")
    # shortcuts are left out of the namespace unless given, so the preset's or the class's defaults apply
    group = p.add_argument_group("Gradient Canceling shortcuts", f"each sets one option of --attack {', '.join(SHORTCUT_ATTACKS)}, "
                                 "as --attack-option KEY=VALUE does")
    for flag, (key, kwargs) in SHORTCUTS.items():
        group.add_argument(flag, dest=f"shortcut.{key}", default=argparse.SUPPRESS, **kwargs)
    p.add_argument("--victim-seeds", dest="victim_seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="also retrain the victim (and a clean model) from scratch with each of these seeds on the same poisons, "
                        "and report mean ± std over them (e.g. 0 1 2); the unsuffixed numbers stay the run seed's (default: none, "
                        "the run seed's victim only)")
    p.add_argument("--victim-model", default=None, metavar="M",
                   help="a transfer victim: retrain this architecture (a name as for --model, or module.path:Class) on clean ∪ poisons, "
                        "with its own clean model as the reference of the drops (default: none, the victims are --model)")
    p.add_argument("--victim-model-option", dest="victim_model_option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of a module.path:Class --victim-model (repeatable)")
    p.add_argument("--protocol", choices=PROTOCOLS, default="honest",
                   help="honest (default): this library's GC and the paper's retraining; converged: this library's GC, every model "
                        "trained to a stationary point of mean loss + weight_decay/2*|w|^2 by full-batch L-BFGS in float64 "
                        "(--train-option weight_decay=0.001 tolerance=1e-05 max_iterations=2000); official: the official code's GC (--attack gc: "
                        "first weight tensor, summed losses, unsquared norm, normalised pixels, no box, lr 10, 1000 epochs, the first "
                        "eps_d*n images) and its retraining (float64 LR, SGD lr 0.1, batch 10000, 100 epochs, test accuracy every epoch); "
                        "logistic regression on MNIST-like data only")
    tracking.add_arguments(p, store="the run folder: RUN/tensorboard/ or RUN/mlruns/")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data parallel over N processes on this machine (gloo on the CPU, NCCL with --device cuda, a GPU each): "
                        "GC (--attack gc) and every training split their rows, rank 0 writes the run folder; several machines: "
                        "torchrun --nproc-per-node N ... -m poisonreach run ... (docs/scaling.md) (default: 1)")
    p.add_argument("--quiet", action="store_true", help="print only the table (and warnings)")

    p = command("defend", "apply a defense to every ε_d cell of a finished run, or to any poison file", defend_module.__doc__)
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--run", default=None, help="a run folder written by `poisonreach run`, whose configuration names the data and "
                                                   "model (no default: give --run or --poisons)")
    given.add_argument("--poisons", default=None, help="instead of --run: a .pt, .npz or .safetensors file holding x and y, a run cell "
                                                       "eps_d=E/, or a folder `poisonreach export` wrote, defended on --dataset and --model "
                                                       "(no default: give --run or --poisons)")
    p.add_argument("--defense", required=True, choices=sorted(DEFENSES), help="sever, influence, maxup or dpa")
    p.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                   help="a constructor argument of the defense, e.g. --option rounds=2 or --option num_partitions=1200 (repeatable; "
                        "poisonreach options sever lists a defense's)")
    _common(p.add_argument_group("with --poisons", "the data set, model and training the poisons are defended on, as for "
                                 "`poisonreach evaluate`"), target=False)
    p.add_argument("--out", default=None, help="with --poisons: a folder to write defense=ID/defense.json into (default: none, print only)")
    p.add_argument("--quiet", action="store_true", help="print only the table (and warnings)")

    p = command("export", "write the poisons of a run as npz, safetensors or PNG files with a manifest", export_module.__doc__)
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder written by `poisonreach run`")
    p.add_argument("--format", required=True, choices=export_module.FORMATS,
                   help="npz, safetensors (needs the safetensors package) or png (8-bit images, pixels clipped to [0, 1])")
    p.add_argument("--out", required=True, help="the folder to write into, one eps_d=E/ folder per cell")
    p.add_argument("--eps-d", type=float, default=None, help="export this cell only (default: every eps_d cell of the run)")
    p.add_argument("--allow-soft-labels", action="store_true",
                   help="export soft labels (probabilities) as float32 y, although they are a relaxation, not data points (default: off, refused)")

    p = command("evaluate", "retrain a fresh victim on clean ∪ given poisons and report the accuracy drop", evaluate_module.__doc__)
    p.add_argument("--poisons", required=True, help="a .pt, .npz or .safetensors file holding x and y, a run cell eps_d=E/, or a "
                                                    "folder `poisonreach export` wrote")
    _common(p, target=False)
    p.add_argument("--victim-seeds", dest="victim_seeds", type=int, nargs="+", default=None, metavar="SEED",
                   help="retrain the victim and a clean model with each of these seeds and report mean ± std over them (e.g. 0 1 2; "
                        "default: --seed only)")
    p.add_argument("--protocol", choices=evaluate_module.EVALUATION_PROTOCOLS, default="honest",
                   help="honest (default): the paper's retraining; converged: full-batch L-BFGS to a stationary point, as "
                        "`poisonreach run --protocol converged`")
    p.add_argument("--out", default=None, help="a folder to write evaluation.json into (default: none, print only)")
    p.add_argument("--quiet", action="store_true", help="print only the table (and warnings)")

    p = command("sweep", "run a shipped or own sweep file: a grid of runs, resumable, in parallel, with a results table", sweep_module.__doc__)
    sweep_module.add_arguments(p)

    p = command("report", "write report.md for a sweep folder: its table beside the paper's numbers, and its figures", report_module.__doc__)
    p.add_argument("folder", help="a sweep folder (poisonreach sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, for figures drawn from saved models (default: torch's choice)")

    p = command("plot", "draw the figures of a run or sweep folder (PNG and PDF)", plots.__doc__)
    p.add_argument("folder", help="a run folder (poisonreach run) or a sweep folder (poisonreach sweep)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads, for figures drawn from saved models (default: torch's choice)")

    p = command("tau", "the reachability threshold of a target, without any attack")
    _common(p)
    p.add_argument("--target-file", default=None, help="a saved target model (poisonreach format): skip training and corruption "
                                                       "(default: none, train the clean model and make the target)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("train", "train the clean model a run would train first and write it to a model file (e.g. for --pretrained)",
                run_module.train_model.__doc__)
    _common(p, target=False)
    p.add_argument("--protocol", choices=evaluate_module.EVALUATION_PROTOCOLS, default="honest",
                   help="honest (default): the paper's training; converged: full-batch L-BFGS to a stationary point, as "
                        "`poisonreach run --protocol converged`")
    p.add_argument("--out", required=True, help="the model file to write (refused if it exists)")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = command("audit", "how much poison a target needs and how much damage any attack could do, without running one",
                audit_module.__doc__)
    _common(p, target=False)
    p.add_argument("--data", default=None, metavar="FILE.npz|DIR", help="your data set, as --dataset npz:FILE or folder:DIR (default: --dataset)")
    p.add_argument("--weights", default=None, help="the model's trained weights, a state dict saved by torch.save, read with "
                                                   "weights_only=True (default: none, train the model to convergence here)")
    p.add_argument("--target-weights", default=None, help="the bad target to audit, a state dict of the same model (default: none, "
                                                          "GradPC targets over --eps-w)")
    p.add_argument("--eps-w", type=float, nargs="+", default=list(audit_module.EPS_W_GRID), help="radii of the GradPC targets audited without "
                                                                                                 "--target-weights")
    p.add_argument("--eps-d", type=float, nargs="+", default=[0.03, 0.1, 1.0], help="budgets of the constructions and the frontier")
    p.add_argument("--box", type=_box, default=None, metavar="LOW,HIGH", help="the poisons' pixel box (default: 0,1 for images, the "
                                                                                "training data's per-feature range otherwise)")
    p.add_argument("--poisons", nargs="+", default=[], help="poison sets (.pt, .npz, .safetensors, run cells) made for --target-weights, "
                                                            "to diagnose (default: none)")
    p.add_argument("--runs", nargs="+", default=[], help="run folders whose achieved drops the frontier is plotted with (default: none)")
    p.add_argument("--restarts", type=int, default=3, help="starts of the frontier's own search per eps_d (the clean model and random ones); each eps_d after the first also starts from the previous best")
    p.add_argument("--no-frontier", action="store_true", help="skip the damage frontier (it trains; the box programme runs per candidate)")
    p.add_argument("--no-construction", action="store_true", help="skip the constructive poisons (they train)")
    p.add_argument("--out", default=None, help="the audit folder (default: runs/audit-DATASET-MODEL)")
    p.add_argument("--json", action="store_true", help="print audit.json instead of the tables")

    p = command("options", "list the options of an attack, target generator, defense or training protocol, with types and defaults",
                options_module.__doc__)
    p.add_argument("name", nargs="?", default=None, help="an attack (e.g. gc), target generator, defense, train or minimize "
                                                          "(default: list the names)")
    return parser


def _training(args) -> dict:
    given = {"epochs": args.train_epochs, "lr": args.train_lr, "batch_size": args.train_batch_size}
    return {**dict(args.train_option), **{k: v for k, v in given.items() if v is not None}}


def _config(args, **extra) -> RunConfig:
    target = {} if "target" not in args else dict(eps_w=args.eps_w, eps_w_mode=args.eps_w_mode, target=args.target,
                                                  target_scale=args.target_scale, target_options=dict(args.target_option))
    return RunConfig(
        dataset=args.dataset,
        model=args.model,
        model_options=dict(args.model_option),
        pretrained=args.pretrained,
        **target,
        seed=args.seed,
        train_size=args.train_size,
        data_root=args.data_root,
        training=_training(args),
        device=args.device,
        **extra,
    )


def _cmd_run(args) -> int:
    shortcuts = {k.removeprefix("shortcut."): v for k, v in vars(args).items() if k.startswith("shortcut.")}  # in command-line order
    if shortcuts and args.attack not in SHORTCUT_ATTACKS:
        flags = {key: flag for flag, (key, _) in SHORTCUTS.items()}
        given = ", ".join(flags[k] for k in shortcuts)
        raise PoisonReachError(f"{given} set Gradient Canceling options, but --attack is {args.attack}: use --attack-option KEY=VALUE")
    config = _config(args, eps_d=args.eps_d, attack=args.attack, attack_options={**shortcuts, **dict(args.attack_option)}, preset=args.preset,
                     victim_seeds=args.victim_seeds, protocol=args.protocol, victim_model=args.victim_model,
                     victim_model_options=dict(args.victim_model_option))
    out = args.out or run_module.default_out(config)
    metrics = run_module.run_processes(config, out, nproc=args.nproc, tracking=tracking.from_arguments(args), quiet=args.quiet,
                                       threads=args.threads)
    if run_module.is_writer():  # under torchrun: rank 0 prints the table
        print(format_table(metrics))
        print(f"run folder: {out}", file=sys.stderr)
    return 0


def _cmd_defend(args) -> int:
    if args.run is None:
        summary = defend_module.defend_poisons(args.poisons, _config(args), args.defense, dict(args.option), out=args.out)
    else:
        # a run folder's configuration names its data, model and training: a flag that would set them is refused, not ignored
        probe = argparse.ArgumentParser(add_help=False)
        _common(probe, target=False)
        given = [f"--{dest.replace('_', '-')}" for dest, default in [*vars(probe.parse_args([])).items(), ("out", None)]
                 if dest not in ("threads", "device") and getattr(args, dest) != default]
        if given:
            raise PoisonReachError(f"{', '.join(given)}: for --poisons only (a run folder's configuration names its data, model and "
                                   f"training); drop {'them' if len(given) > 1 else 'it'}")
        # --device says where to compute, not what: given, it overrides the run's
        summary = defend(args.run, args.defense, dict(args.option), device=None if args.device == "cpu" else args.device)
    print(format_defense_table(args.defense, summary))
    return 0


def _cmd_export(args) -> int:
    for cell in export_module.export(args.run_dir, args.format, args.out, eps_d=args.eps_d, allow_soft_labels=args.allow_soft_labels):
        print(f"eps_d={cell['eps_d']:g}: {cell['num_poisons']} poisons → {cell['folder']}")
    return 0


def _cmd_evaluate(args) -> int:
    config = _config(args, victim_seeds=args.victim_seeds, protocol=args.protocol)
    print(evaluate_module.format_evaluation(evaluate_module.evaluate(args.poisons, config, out=args.out)))
    return 0


def _cmd_plot(args) -> int:
    print("\n".join(str(p) for p in plots.plot_folder(args.folder)))
    return 0


def _cmd_report(args) -> int:
    print(write_report(args.folder))
    return 0


def _cmd_tau(args) -> int:
    print(format_tau(tau(_config(args), args.target_file), as_json=args.json))
    return 0


def _cmd_train(args) -> int:
    print(format_trained(train_model(_config(args, protocol=args.protocol), args.out), as_json=args.json))
    return 0


def _cmd_audit(args) -> int:
    if args.data is not None:
        args.dataset = audit_module.dataset_spec(args.data)
    config = _config(args, eps_d=args.eps_d, protocol="converged")
    out = args.out or audit_module.default_out(config)
    record = audit_module.audit(config, out, weights=args.weights, target_weights=args.target_weights, eps_w=args.eps_w,
                                box="data-range" if args.box == "data-range" else args.box, poisons=args.poisons, runs=args.runs,
                                frontier=not args.no_frontier, construction=not args.no_construction, restarts=args.restarts)
    print(json.dumps(record, indent=2) if args.json else audit_module.format_audit(record))
    print(f"audit folder: {out}", file=sys.stderr)
    return 0


def _cmd_options(args) -> int:
    print(options_module.describe(args.name) if args.name else options_module.listing())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # sweep overrides (KEY=VALUE) may also follow the options: argparse leaves those over
    if args.command == "sweep" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "threads", None) is not None:
        if args.threads < 1:
            print("poisonreach: error: --threads must be at least 1", file=sys.stderr)
            return 2
        set_threads(args.threads)
    try:
        # under torchrun this process is one rank of a data-parallel job (docs/scaling.md)
        with run_module.joined(getattr(args, "device", None)), \
                tracking.console_logging(quiet=getattr(args, "quiet", False) or not run_module.is_writer()):
            return {"run": _cmd_run, "defend": _cmd_defend, "export": _cmd_export, "evaluate": _cmd_evaluate, "sweep": sweep_module.command,
                    "plot": _cmd_plot, "report": _cmd_report, "tau": _cmd_tau, "train": _cmd_train, "audit": _cmd_audit,
                    "options": _cmd_options}[args.command](args)
    except PoisonReachError as e:
        print(f"poisonreach: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("poisonreach: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`poisonreach options | head`): stop quietly, as a shell tool does
        tracking.discard_stdout()
        return 141


if __name__ == "__main__":
    sys.exit(main())
