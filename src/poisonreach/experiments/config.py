"""A run's configuration and the pieces every experiment builds from it.

:class:`RunConfig` holds everything that determines a run; :func:`load_data` and :func:`fresh_model`
give its data and its untrained model, :func:`cell_name` the folder of one ε_d. The names the
command line offers (data sets, models, attacks, defenses, targets, presets) are gathered here, so
``poisonreach.cli`` reaches the library only through ``poisonreach.experiments``.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .. import data, io, models, user_models
from ..attacks import ATTACKS, Attack
from ..data import names as dataset_names
from ..defenses import DEFENSES
from ..errors import PoisonReachError
from ..gradients import PARAMETER_SETS
from ..io import parse_yaml
from ..models import names as model_names
from ..targets import EPS_W_MODES, TARGET_GENERATORS, FixedTarget, GradPC
from ..training import CONVERGED_OPTIONS
from ..training import HYPERPARAMETERS as TRAINING_OPTIONS
from ..training import minimize
from ..validation import check_choice, check_number, check_options
from .selection import check_select_options

__all__ = ["ADDITIVE_FIELDS", "ATTACKS", "ATTACK_FIELDS", "CELL_PREFIX", "CONVERGED_OPTIONS", "DEFENSES", "EPS_W_MODES", "OFFICIAL_DATASETS", "PARAMETER_SETS", "POISONED_TARGETS", "PRESETS", "PROTOCOLS", "TARGETS",
           "TARGET_GENERATORS", "TRAINING_OPTIONS", "PoisonReachError", "RunConfig", "cell_name", "dataset_names", "fresh_model",
            "RUNTIME_FIELDS", "load_data", "mean_std", "model_names", "parse_yaml", "set_threads", "set_worker_threads", "available_cores", "short_name", "victim_spec"]

# Targets that are the model a baseline attack's poisons produce (Table 7: TGDA's poisoned models as
# targets for GC); target_options are the attack's arguments, ε_d = 1 unless given.
POISONED_TARGETS = ("tgda", "labelflip", "gm")
# "select": a target per ε_d, chosen among GradPC and planted candidates (experiments/selection.py)
TARGETS = (*TARGET_GENERATORS, *POISONED_TARGETS, "select")
# How the poisons are made and the models trained: "honest" (this library's GC, every model trained
# by the paper's protocol, section 5.1), "converged" (this library's GC, every model trained to a
# stationary point of its regularised objective, training.minimize) or "official" (the official
# code's GC and retraining, experiments/official.py)
PROTOCOLS = ("honest", "converged", "official")
# the data sets --protocol official accepts: MNIST-like images, as the official LR script assumes
OFFICIAL_DATASETS = ("digits", "mnist", "mnist17", "fashion-mnist")
# the named settings of the attacks (their ``presets``), e.g. "paper" of gc-pgd, and the attack each belongs to
PRESET_ATTACKS = {preset: name for name, cls in ATTACKS.items() for preset in getattr(cls, "presets", {})}
PRESETS = sorted(PRESET_ATTACKS)


# Fields that say where a run reads its data and computes, not what it computes: no part of a run's
# identity (RunConfig.differing_keys leaves them out), so a run folder may move between machines.
RUNTIME_FIELDS = ("data_root", "device")
# Fields a run grows by: each ε_d has a cell folder and each victim seed models of its own, so a
# resumed run computes the new ones and reads the others back.
ADDITIVE_FIELDS = ("eps_d", "victim_seeds")
# Fields that only the ε_d cells depend on (the poisons and the victims), not the clean model or the target.
ATTACK_FIELDS = ("attack", "preset", "attack_options")
# the start of every ε_d cell's folder name (cell_name)
CELL_PREFIX = "eps_d="


def set_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads in this process."""
    torch.set_num_threads(threads)


def available_cores() -> list[int]:
    """The CPU cores this process may run on."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def set_worker_threads(threads: int) -> None:
    """Use ``threads`` torch CPU threads in this worker process (a sweep's), and tell the libraries
    that start their thread pools later (OpenMP) the same."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    set_threads(threads)


@dataclass
class RunConfig:
    """Everything that determines a run. ``attack`` names the attack (:data:`ATTACKS`);
    ``attack_options`` and ``training`` are keyword arguments of its class and of
    :func:`poisonreach.training.train`. ``preset`` names a setting of the attack class (its
    ``presets``, e.g. GC's ``paper``), under ``attack_options``. ``protocol`` is ``honest`` (the
    default), ``converged`` (every model of the run trained by :func:`poisonreach.training.minimize`
    to a stationary point of the mean loss plus λ/2·‖w‖²; ``training`` then holds its options,
    :data:`CONVERGED_OPTIONS`) or ``official``: the official code's GC and retraining
    (:mod:`.official`), under which ``attack: gc`` means
    :class:`~poisonreach.attacks.OfficialGradientCanceling`; ``training`` then still sets the clean
    model's (and target's) protocol, not the official retraining, which is fixed. The attacks that
    cancel gradients take the training's weight decay (:attr:`weight_decay`) unless
    ``attack_options`` sets theirs: the target is a stationary point of the regularised objective.

    ``dataset`` is a name of :func:`poisonreach.data.names` or the user's own ``npz:PATH`` or
    ``folder:PATH``; ``model`` a name of :func:`poisonreach.models.names` or the user's own class
    ``module.path:Class``, constructed with ``model_options`` (:mod:`poisonreach.user_models`).
    ``victim_model`` (with ``victim_model_options``), when set, is the architecture the victims
    retrain (a transfer victim): the target, τ and the attack stay ``model``'s, and every drop is
    measured against a clean model of the victim's architecture trained the same way.
    ``pretrained``, when set, is a weights file every model of the run starts from instead of its
    seed's initialisation; with the converged protocol's ``parameters="last"`` only the last layer
    trains, on the fixed pretrained features (a fine-tuning victim)."""

    dataset: str = "digits"
    model: str = "lr"
    model_options: dict = field(default_factory=dict)  # a module.path:Class model's constructor arguments
    eps_w: float = 1.0
    eps_w_mode: str = "absolute"
    target: str = "gradpc"
    target_scale: float = 1.0
    target_options: dict = field(default_factory=dict)  # fixed: {weight, bias}; gradpc: {step_size, ...}
    # "tau": ε_d = τ (Table 2); an empty list stops after the target and τ (Tables 1 and 5)
    eps_d: list[float | str] = field(default_factory=lambda: [0.03, 0.1, 1.0])
    seed: int = 0
    train_size: int | None = None
    data_root: str | None = None
    attack: str = "gc"
    preset: str | None = None
    attack_options: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    device: str = "cpu"
    # victim statistics: retrain the victim (and a clean model) from scratch with each seed (model
    # initialisation and batch order) on the same poisons; None: only the run's own seed
    victim_seeds: list[int] | None = None
    protocol: str = "honest"
    # transfer: the victims' architecture when it is not the target's (a name or module.path:Class)
    victim_model: str | None = None
    victim_model_options: dict = field(default_factory=dict)
    # fine-tuning: a model file (save_model's, or a state dict) every model of the run starts from
    # instead of the seed's initialisation; with the converged option parameters=last only its head trains
    pretrained: str | None = None

    @property
    def attack_name(self) -> str:
        """The attack that runs: ``attack``, except for ``gc`` under the official protocol, which is
        the official code's GC (``gc-official``), and ``gc`` with a preset of another GC solver,
        which is that solver (``--preset paper``: the paper's projected gradient descent, ``gc-pgd``)."""
        if self.attack != "gc":
            return self.attack
        if self.protocol == "official":
            return "gc-official"
        return PRESET_ATTACKS.get(self.preset, "gc") if self.preset is not None else "gc"

    @property
    def training_options(self) -> dict:
        """The options the protocol's training takes, name → check."""
        return CONVERGED_OPTIONS if self.protocol == "converged" else TRAINING_OPTIONS

    @property
    def weight_decay(self) -> float:
        """λ of the models' training objective: ``training``'s, else the protocol's default."""
        default = inspect.signature(minimize).parameters["weight_decay"].default if self.protocol == "converged" else 0.0
        return float(self.training.get("weight_decay", default))

    @property
    def trained_parameters(self) -> str:
        """What the models' training fits: ``all`` parameters, or the ``last`` linear layer on fixed
        features (the converged protocol's ``parameters`` option)."""
        return self.training.get("parameters", "all") if self.protocol == "converged" else "all"

    def validate(self) -> None:
        data.check_name(self.dataset)
        models.check_name(self.model, self.model_options)
        if self.victim_model is not None:
            models.check_name(self.victim_model, self.victim_model_options)
        elif self.victim_model_options:
            raise PoisonReachError(f"victim model options {sorted(self.victim_model_options)} are given but no victim model: "
                                   "add --victim-model M or drop them")
        check_choice("target", self.target, list(TARGETS))
        check_choice("attack", self.attack, ATTACKS)
        check_choice("protocol", self.protocol, PROTOCOLS)
        if self.protocol == "official":
            if self.victim_model is not None:
                raise PoisonReachError("--protocol official retrains the official script's logistic regression: drop --victim-model")
            if self.model != "lr":
                raise PoisonReachError(f"--protocol official supports only --model lr (the official script's logistic regression), got {self.model!r}")
            if self.dataset not in OFFICIAL_DATASETS:
                raise PoisonReachError(f"--protocol official supports only MNIST-like data ({', '.join(OFFICIAL_DATASETS)}), got {self.dataset!r}")
        presets = getattr(ATTACKS[self.attack_name], "presets", {})
        if self.preset is not None and self.preset not in presets:
            raise PoisonReachError(
                f"preset {self.preset!r} is not a setting of the {self.attack_name} attack: "
                + (f"choose one of {sorted(presets)}" if presets else "it has none, drop the preset")
            )
        check_number("target_scale", self.target_scale, low=0, low_open=True)
        if self.pretrained is not None:
            if self.victim_model is not None:
                raise PoisonReachError("--pretrained weights are the run's model's and cannot start a --victim-model: drop one of them")
            if self.protocol == "official":
                raise PoisonReachError("--protocol official retrains a fresh logistic regression: drop --pretrained")
            if not Path(self.pretrained).expanduser().is_file():
                raise PoisonReachError(f"no pretrained model file at {self.pretrained}: give a file written by save_model or torch.save(model.state_dict())")
        if self.victim_seeds is not None:
            if not isinstance(self.victim_seeds, (list, tuple)) or not self.victim_seeds:
                raise PoisonReachError(f"victim_seeds must be a non-empty list of integer seeds (or null), got {self.victim_seeds!r}")
            for seed in self.victim_seeds:
                check_number("victim_seeds", seed, integer=True)
            if len(set(self.victim_seeds)) != len(self.victim_seeds):
                raise PoisonReachError(f"victim_seeds repeats a seed: {list(self.victim_seeds)}; each seed gives the same victim every time")
        # an attack's or a target's seed defaults to the run's (which also draws the split) and may be
        # set apart from it; a training seed is the victim seeds' business
        for key in ("device", "progress", "seed"):
            if (key != "seed" and (key in self.attack_options or key in self.target_options)) or key in self.training:
                raise PoisonReachError(f"set {key} at the top level of the configuration, not under attack_options/target_options/training"
                                       + ("; victims are retrained with each of --victim-seeds" if key == "seed" else ""))
        unknown = sorted(set(self.training) - set(self.training_options))
        if unknown:
            raise PoisonReachError(f"unknown training option(s) {unknown}: the {self.protocol} protocol's training takes "
                                   f"{sorted(self.training_options)}")
        for key, value in self.training.items():
            self.training_options[key](f"training option {key}", value)
        self.make_attacks()  # validates ε_d and the attack's hyperparameters before any work
        if self.target == "select":
            self._validate_select()
        else:
            self.make_generator()
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise PoisonReachError(f"--device {self.device} was asked for but CUDA is not available: use --device cpu")

    def _validate_select(self) -> None:
        check_select_options(self.target_options)
        if not ATTACKS[self.attack_name].model_targeted:
            raise PoisonReachError(f"--target select chooses the target GC gets closest to: use a GC attack (gc, gc-pgd, gc-fw), "
                                   f"not {self.attack_name}")
        if self.protocol == "official":
            raise PoisonReachError("--target select runs this library's GC on each candidate: use --protocol honest or converged")
        if "tau" in self.eps_d:
            raise PoisonReachError("eps_d 'tau' needs one target, and --target select chooses one per eps_d: give numbers")

    def make_generator(self):
        """The target generator (an attack for the poisoned targets); ``eps_w`` and ``eps_w_mode``
        apply to the corruption generators."""
        if self.target in POISONED_TARGETS:
            cls = ATTACKS[self.target]
            check_options(cls, self.target_options, f"{self.target} target")
            generator = cls(**{"eps_d": 1.0, "seed": self.seed, **self.target_options, "device": self.device})
            if generator.model_targeted:
                raise PoisonReachError(
                    f"a {self.target} target is made by attacking the clean model; {generator!r} needs a target "
                    "itself: drop the option that makes it model-targeted from target_options"
                )
            return generator
        cls = TARGET_GENERATORS[self.target]
        check_options(cls, self.target_options, f"{self.target} target")
        if cls is FixedTarget:
            return cls(**self.target_options)
        kwargs = {"eps_w_mode": self.eps_w_mode, "seed": self.seed, **self.target_options}
        if cls is GradPC:
            kwargs.update(device=self.device, progress=None)
        return cls(self.eps_w, **kwargs)

    def budgets(self, tau: float = 1.0) -> list[float]:
        """The ε_d values, with "tau" replaced by the target's τ (a stand-in before τ is known, or
        when τ is 0 or infinite, which are no budgets: ``run`` skips those)."""
        return [(tau if 0 < tau < math.inf else 1.0) if e == "tau" else e for e in self.eps_d]

    def make_attacks(self, tau: float = 1.0, checkpoint_dir: Path | None = None) -> list[Attack]:
        """One attack per ε_d, built from ``attack_options`` (validated by the attack's constructor)."""
        cls = ATTACKS[self.attack_name]
        check_options(cls, self.attack_options, f"{self.attack_name} attack")
        attacks = []
        for eps_d in self.budgets(tau):
            preset = cls.presets[self.preset] if self.preset is not None else {}
            kwargs = {**preset, "seed": self.seed, **self.attack_options, "device": self.device}
            if "weight_decay" in inspect.signature(cls).parameters:
                kwargs.setdefault("weight_decay", self.weight_decay)
            if self.trained_parameters != "all" and "parameters" in inspect.signature(cls).parameters:
                kwargs.setdefault("parameters", self.trained_parameters)  # the victims' stationarity condition is on these
            if checkpoint_dir is not None and "checkpoint" in inspect.signature(cls).parameters:
                kwargs["checkpoint"] = checkpoint_dir / cell_name(eps_d) / "checkpoint.pt"
            attacks.append(cls(eps_d, **kwargs))
        return attacks

    def to_dict(self) -> dict:
        return asdict(self)

    def differing_keys(self, saved: dict) -> list[str]:
        """The fields in which a saved configuration (a config.yaml read back) differs from this one,
        :data:`RUNTIME_FIELDS` left out. A field the saved file lacks was written before the field
        existed and counts as its default."""
        mine, defaults = io.plain(self.to_dict()), io.plain(RunConfig().to_dict())
        if not isinstance(saved, dict):
            return ["(the saved file is not a configuration)"]
        return ([k for k in mine if k not in RUNTIME_FIELDS and saved.get(k, defaults[k]) != mine[k]]
                + sorted(set(saved) - set(mine)))

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise PoisonReachError(f"unknown configuration key(s) {unknown}: known keys are {sorted(known)}")
        return cls(**d)


def load_data(config: RunConfig) -> tuple[data.Splits, dict]:
    """The run's data splits and the model specification (``models.create``'s arguments). The
    user classes the configuration names may be rebuilt from the run's model files
    (:func:`poisonreach.user_models.allow`)."""
    for name in (config.model, config.victim_model):
        if user_models.is_spec(name):
            user_models.allow(name)
    splits = data.load(config.dataset, root=config.data_root, seed=config.seed).subset(config.train_size, seed=config.seed)
    spec = dict(name=config.model, options=config.model_options, input_shape=splits.input_shape, num_classes=splits.num_classes,
                mean=splits.mean, std=splits.std)
    return splits, spec


def victim_spec(config: RunConfig, spec: dict) -> dict:
    """The model specification of the run's victims: ``spec`` with the victim architecture, when
    the configuration names one (a transfer victim)."""
    if config.victim_model is None:
        return spec
    return {**spec, "name": config.victim_model, "options": config.victim_model_options}


def fresh_model(config: RunConfig, spec: dict, seed: int | None = None) -> nn.Module:
    """The untrained model every training of the run starts from (the run's seed each time, or
    ``seed``: a victim seed's initialisation), with the ``pretrained`` weights when the run names them
    (the seed then initialises nothing: every training starts from them)."""
    model = models.create(**spec, seed=config.seed if seed is None else seed)
    if config.pretrained is not None:
        models.load_weights(model, Path(config.pretrained).expanduser())
    return model.to(torch.device(config.device))


def mean_std(name: str, values: list[float]) -> dict:
    """``name_mean`` and ``name_std`` (the sample standard deviation, ddof = 1; 0 for one value)."""
    t = torch.tensor(values, dtype=torch.float64)
    return {f"{name}_mean": float(t.mean()), f"{name}_std": float(t.std(correction=1)) if len(values) > 1 else 0.0}


def short_name(name: str) -> str:
    """A data set or model name as part of a folder name: a user's ``npz:PATH`` or ``folder:PATH``
    becomes the file's stem or the folder's name, ``module.path:Class`` the class."""
    if data.user.is_spec(name):
        return Path(name.partition(":")[2]).expanduser().absolute().stem
    return name.rpartition(":")[2]


def cell_name(eps_d: float) -> str:
    return f"{CELL_PREFIX}{eps_d:g}"


