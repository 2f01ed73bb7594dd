"""Sweep files: YAML descriptions of a grid of runs, resolved in layers into validated cells.

The paper's tables and figures are shipped with the package as sweep files (``configs/`` beside
this module, listed by :func:`shipped_sweeps`, described in its README.md); :func:`sweep_path`
finds one by its name (``table2-mnist``), while a path (with a directory or a .yaml suffix) names
a user's own file.

A sweep file (read with ``yaml.safe_load``)::

    name: table2-mnist          # the default output folder is sweeps/<name>
    description: Table 2, MNIST rows
    paper: {table: 2}           # where the paper's numbers are (poisonreach.experiments.paper.lookup)
    run:                        # defaults of every cell: RunConfig fields
      dataset: mnist
      eps_d: [0.03, 0.1, 1, tau]
      training: {epochs: 14}
    grid:                       # cartesian product, first axis slowest; a key is a RunConfig field,
      model: [lr, nn, cnn]      # a dotted key reaches into a dict field (attack_options.epochs)
      attack: [gc, gm, tgda]
      model+eps_w: [[lr, 1.0], [nn, 0.5]]   # a joint axis: each value sets both fields together
    defenses:                   # applied to every finished cell (experiments.defend)
      - {name: sever, options: {rounds: 2}}
    resources: {num_cpus: 1, num_gpus: 0}   # what one cell reserves under --executor ray
    profiles:                   # overlays of run, grid, defenses and resources, selected with --profile
      cpu: {run: {train_size: 4200}, grid: {model: [lr, nn]}}

Layers, later wins: RunConfig's defaults, the file, the selected profile, then command-line
overrides ``key=value``, where the key is a dotted path from the top (``run.attack_options.epochs=50``,
``grid.model=[lr]``, ``paper.table=3``) and the value is read with ``yaml.safe_load``. Dicts merge
key by key; lists (and every other value) replace. A grid value is assigned to its cell as a whole.
An override of a ``run`` key that a grid axis sets is refused (the axis would hide it).

Resources: ``num_cpus`` (a number > 0, default 1) and ``num_gpus`` (≥ 0, default 0) are what
each cell reserves as a Ray task under ``poisonreach sweep --executor ray`` (fractions share a
device; the cell's torch runs ``num_cpus`` threads, at least one), so Ray runs as many cells at
once as the cluster's CPUs and GPUs hold; a GPU cell also needs ``run.device: cuda``. They decide
where and how fast a cell runs, never its result: a sweep folder accepts other resources
(``resources.num_cpus=4`` on the command line). ``--executor local`` (``--jobs``) ignores them.

Each cell is the folder ``cells/<id>``, the id made of its grid values (``model=lr,eps_w=1``); the
mapping parts of a joint axis are left out of it when the axis's other parts tell its values apart
(``attack+attack_options: [[gc, {...}], [gm, {...}]]`` gives ``attack=gc`` and ``attack=gm``).

Every key is checked: an unknown one fails with a PoisonReachError naming the key, where it was
(file and section, or the override) and the keys accepted there. Every cell is validated
(``RunConfig.validate``, the defenses' options, the paper lookup) before anything runs.

Paper numbers: each row of the results (one per cell, ε_d and defense) is looked up with
``lookup(table, dataset=, model=, attack=, eps_d=, target=, defense=, metric="acc_drop")``: attack is
``gc-c`` for GC with ``box: data-range`` (Table 3), target is given for model-targeted attacks only
(``gradpc``, or ``gradpc/2`` for ``target_scale: 0.5``, Table 6), defense is None for undefended rows
and ``k`` is DPA's ``num_partitions`` (Table 4). A run without ε_d (Tables 1 and 5) is one row about
its target: attack is the target's name and ``eps_w`` is given. The other keys of the ``paper``
section are passed as given and replace the derived ones (e.g. ``{table: 9, threat: add}``), except
defense, which each row sets, and k in the rows of a DPA defense.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import yaml

from .. import io
from ..errors import PoisonReachError
from ..validation import check_number
from . import paper as paper_numbers
from .config import RunConfig
from .defend import defense_id, make_defense

SECTIONS = ("name", "description", "paper", "run", "grid", "defenses", "resources", "profiles")
PROFILE_SECTIONS = ("run", "grid", "defenses", "resources")
DEFENSE_KEYS = ("name", "options")
# what one cell reserves as a Ray task (--executor ray), with the lowest value each accepts (open: above it)
RESOURCES = {"num_cpus": 1, "num_gpus": 0}
_RESOURCE_LOW = {"num_cpus": (0, True), "num_gpus": (0, False)}
# The parts of a resolved sweep that decide its results: a sweep folder refuses other values.
SETTINGS = ("run", "grid", "defenses")
MAX_CELL_ID = 100
_SAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass
class Sweep:
    """A resolved sweep (``profile``: the profile applied). ``cells`` are (cell_id, RunConfig) in grid order; ``grid_values[cell_id]``
    holds that cell's value of every grid axis; ``paper_values[(cell_id, eps_d, defense)]`` the
    paper's accuracy drop of each row (None where the paper has none; eps_d is the configured value
    or None for a run without ε_d, defense a defense id or None)."""

    name: str
    description: str
    paper: dict
    cells: list[tuple[str, RunConfig]]
    defenses: list[dict]
    source: str
    resolved: dict
    profile: str | None = None
    grid_values: dict[str, dict] = field(default_factory=dict)
    paper_values: dict[tuple, float | None] = field(default_factory=dict)

    @property
    def settings(self) -> dict:
        return {key: self.resolved[key] for key in SETTINGS}

    @property
    def resources(self) -> dict:
        """What one cell reserves as a Ray task: num_cpus and num_gpus (see the module docstring)."""
        return self.resolved["resources"]


# --------------------------------------------------------------------------------------------------
# structure
# --------------------------------------------------------------------------------------------------

_FIELDS = [f.name for f in fields(RunConfig)]
_DICT_FIELDS = [name for name, value in RunConfig().to_dict().items() if isinstance(value, dict)]


def _unknown(keys, valid, where: str, what: str = "key") -> None:
    unknown = [k for k in keys if k not in valid]
    if unknown:
        raise PoisonReachError(f"unknown {what} {unknown[0]!r} in {where}: valid {what}s are {list(valid)}")


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PoisonReachError(f"{where} must be a mapping of keys to values, got {value!r}")
    return value


def _check_run_path(path: list[str], where: str) -> None:
    """A run key: a RunConfig field, or a dotted path into one of its dict fields."""
    _unknown(path[:1], _FIELDS, where)
    if len(path) > 1 and path[0] not in _DICT_FIELDS:
        raise PoisonReachError(f"{'.'.join(path)!r} in {where} reaches into {path[0]}, which is not a mapping: only {_DICT_FIELDS} have sub-keys")


def _check_run(run, where: str) -> dict:
    run = _mapping(run, where)
    _unknown(run, _FIELDS, where)
    for key in _DICT_FIELDS:
        if key in run:
            _mapping(run[key], f"{where}.{key}")
    return run


def _check_grid(grid, where: str) -> dict:
    grid = _mapping(grid, where)
    for axis, values in grid.items():
        parts = str(axis).split("+")
        for part in parts:
            _check_run_path(part.split("."), f"{where} (grid axis {axis!r})")
        if not isinstance(values, list) or not values:
            raise PoisonReachError(f"grid axis {axis!r} in {where} must be a non-empty list of values, got {values!r}: write e.g. {axis}: [{values!r}]")
        if len(parts) > 1:  # a joint axis: each value sets every part at once
            for value in values:
                if not isinstance(value, list) or len(value) != len(parts):
                    raise PoisonReachError(f"each value of the joint grid axis {axis!r} in {where} must be a list of {len(parts)} values "
                                           f"({', '.join(parts)}), got {value!r}")
        for part_index, part in enumerate(parts):
            if part in _DICT_FIELDS:
                for value in values:
                    _mapping(value if len(parts) == 1 else value[part_index], f"a value of grid axis {axis!r} in {where}")
    return grid


def _split_axes(values: dict) -> dict:
    """Grid values with joint axes (``model+eps_w: [lr, 1.0]``) split into one entry per part."""
    flat = {}
    for axis, value in values.items():
        parts = axis.split("+")
        flat.update({axis: value} if len(parts) == 1 else dict(zip(parts, value)))
    return flat


def _check_defenses(defenses, where: str) -> list:
    if defenses is None:
        return []
    if not isinstance(defenses, list):
        raise PoisonReachError(f"{where} must be a list of {{name: ..., options: {{...}}}}, got {defenses!r}")
    for i, d in enumerate(defenses):
        at = f"{where}[{i}]"
        _mapping(d, at)
        _unknown(d, DEFENSE_KEYS, at)
        if not isinstance(d.get("name"), str):
            raise PoisonReachError(f"{at} needs a name (sever, influence, maxup or dpa), got {d!r}")
        _mapping(d.get("options"), f"{at}.options")
    return defenses


def _check_resources(value, where: str) -> dict:
    value = _mapping(value, where)
    _unknown(value, RESOURCES, where)
    for key, amount in value.items():
        low, low_open = _RESOURCE_LOW[key]
        check_number(f"{key} in {where}", amount, low=low, low_open=low_open)
    return value


def _check_document(doc, source: str) -> dict:
    doc = _mapping(doc, f"{source} (top level)")
    _unknown(doc, SECTIONS, f"{source} (top level)")
    _check_run(doc.get("run"), f"{source}, section run")
    _check_grid(doc.get("grid"), f"{source}, section grid")
    _check_defenses(doc.get("defenses"), f"{source}, section defenses")
    _mapping(doc.get("paper"), f"{source}, section paper")
    _check_resources(doc.get("resources"), f"{source}, section resources")
    for name, profile in _mapping(doc.get("profiles"), f"{source}, section profiles").items():
        where = f"{source}, section profiles.{name}"
        profile = _mapping(profile, where)
        _unknown(profile, PROFILE_SECTIONS, where)
        _check_run(profile.get("run"), f"{where}.run")
        _check_grid(profile.get("grid"), f"{where}.grid")
        _check_defenses(profile.get("defenses"), f"{where}.defenses")
        _check_resources(profile.get("resources"), f"{where}.resources")
    return doc


# --------------------------------------------------------------------------------------------------
# layers
# --------------------------------------------------------------------------------------------------


def deep_merge(base: dict, overlay: dict) -> dict:
    """``base`` updated by ``overlay``: dicts merge key by key, anything else (lists too) replaces."""
    merged = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def parse_override(text: str) -> tuple[list[str], object]:
    """``a.b.c=VALUE`` → (["a", "b", "c"], VALUE read with yaml.safe_load)."""
    key, sep, value = text.partition("=")
    path = key.strip().split(".")
    if not sep or not all(path):
        raise PoisonReachError(f"an override is KEY=VALUE with a dotted KEY (e.g. run.attack_options.epochs=50), got {text!r}")
    try:
        return path, io.parse_yaml(value)
    except yaml.YAMLError as e:
        raise PoisonReachError(f"cannot read the value of the override {text!r} as YAML ({e})") from None


def _override_layer(text: str) -> tuple[dict, str | None]:
    """The overlay of one override and, for a ``run`` key, its dotted path (to detect shadowing)."""
    path, value = parse_override(text)
    where = f"the override {text!r} (command line)"
    _unknown(path[:1], [s for s in SECTIONS if s != "profiles"], where)
    section = path[0]
    if section == "run":
        if len(path) < 2:
            raise PoisonReachError(f"{where} replaces all of run: set one key, e.g. run.model=lr")
        _check_run_path(path[1:], where)
        layer: object = value
        for key in reversed(path[1:]):
            layer = {key: layer}
        _check_run(layer, where)
        return {"run": layer}, ".".join(path[1:])
    if section == "grid":
        if len(path) < 2:
            raise PoisonReachError(f"{where} replaces the whole grid: set one axis, e.g. grid.model=[lr]")
        axis = ".".join(path[1:])
        return {"grid": _check_grid({axis: value}, where)}, None
    if section in ("paper", "resources"):
        layer = value
        for key in reversed(path[1:]):
            layer = {key: layer}
        return {section: (_check_resources if section == "resources" else _mapping)(layer, where)}, None
    if len(path) > 1:
        raise PoisonReachError(f"{section} has no sub-keys: write {section}=VALUE in {where}")
    if section == "defenses":
        _check_defenses(value, where)
    return {section: value}, None


def resolve(doc: dict, source: str, *, overrides=(), profile: str | None = None) -> dict:
    """The layered sweep: name, description, paper, run (complete), grid, defenses, resources (complete)."""
    doc = _check_document(doc, source)
    resolved = {
        "name": doc.get("name", Path(source).stem),
        "description": doc.get("description") or "",
        "paper": doc.get("paper") or {},
        "run": deep_merge(RunConfig().to_dict(), doc.get("run") or {}),
        "grid": doc.get("grid") or {},
        "defenses": doc.get("defenses") or [],
        "resources": deep_merge(RESOURCES, doc.get("resources") or {}),
    }
    if profile is not None:
        profiles = doc.get("profiles") or {}
        if profile not in profiles:
            raise PoisonReachError(f"{source} has no profile {profile!r}: its profiles are {list(profiles)}")
        resolved = deep_merge(resolved, {k: v for k, v in (profiles[profile] or {}).items() if v is not None})
    run_paths = []
    for text in overrides:
        layer, run_path = _override_layer(text)
        resolved = deep_merge(resolved, layer)
        run_paths.append((text, run_path))
    for text, run_path in run_paths:
        for axis in (part for joint in resolved["grid"] for part in joint.split("+")):
            if run_path is not None and (run_path == axis or run_path.startswith(axis + ".")):
                raise PoisonReachError(f"the override {text!r} is hidden by the grid axis {axis!r}: override grid.{axis}=[...] instead")
    if not isinstance(resolved["name"], str) or not _NAME.fullmatch(resolved["name"]):
        raise PoisonReachError(f"the sweep name {resolved['name']!r} ({source}) names a folder: use letters, digits, '.', '_' and '-'")
    if not isinstance(resolved["description"], str):
        raise PoisonReachError(f"description in {source} must be text, got {resolved['description']!r}")
    if resolved["paper"] and "table" not in resolved["paper"]:
        raise PoisonReachError(f"section paper of {source} needs a table (e.g. paper: {{table: 2}}), got {resolved['paper']!r}")
    return io.plain(resolved)


# --------------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------------


def _text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list) and all(isinstance(v, (int, float, str, list)) for v in value):
        return ",".join(_text(v) for v in value)  # [[-1.0, -2.0]] reads -1,-2; a clash is caught by expand
    if isinstance(value, dict) and all(isinstance(v, (int, float, str, list)) for v in value.values()):
        return ",".join(f"{k}={_text(v)}" for k, v in value.items())
    if isinstance(value, (list, dict)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def cell_id(values: dict) -> str:
    """A readable, filesystem-safe, deterministic folder name for a cell's grid values, e.g.
    ``model=lr,attack=gc``. A name whose text had to change (unsafe characters) or is too long gets
    a hash of the full text, so different values never share a folder."""
    if not values:
        return "default"
    text = ",".join(f"{axis}={_text(v)}" for axis, v in values.items())
    safe = _SAFE.sub("_", text)
    if safe == text and len(text) <= MAX_CELL_ID:
        return text
    digest = hashlib.sha1(text.encode()).hexdigest()[:10]
    return f"{safe[: MAX_CELL_ID - 11]}-{digest}"


def _assign(config: dict, axis: str, value) -> None:
    *parents, last = axis.split(".")
    target = config
    for key in parents:
        target = target.setdefault(key, {})
    target[last] = copy.deepcopy(value)


def _id_values(grid: dict, combo: tuple) -> dict:
    """The grid values that name a cell: a joint axis's mapping parts (``attack+attack_options:
    [gm, {...}]``) are left out when its other parts already tell its values apart, so the folder
    reads ``attack=gm`` rather than a hashed dump of the options."""
    named = {}
    for (axis, values), value in zip(grid.items(), combo):
        parts = axis.split("+")
        if len(parts) == 1:
            named[axis] = value
            continue
        scalar = [i for i in range(len(parts)) if not any(isinstance(v[i], dict) for v in values)]
        distinct = len({tuple(_text(v[i]) for i in scalar) for v in values}) == len(values)
        named.update({parts[i]: value[i] for i in (scalar if scalar and distinct else range(len(parts)))})
    return named


def expand(resolved: dict) -> list[tuple[str, dict, dict]]:
    """(cell_id, grid values, RunConfig dict) for every point of the grid, first axis slowest."""
    grid = resolved["grid"]
    cells, seen = [], {}
    for combo in itertools.product(*grid.values()):
        values = _split_axes(dict(zip(grid, combo)))
        config = copy.deepcopy(resolved["run"])
        for axis, value in values.items():
            _assign(config, axis, value)
        cid = cell_id(_id_values(grid, combo))
        if cid in seen:
            raise PoisonReachError(f"the grid gives cell {cid} twice ({seen[cid]} and {values}): remove repeated values from the grid axes")
        seen[cid] = values
        cells.append((cid, values, config))
    return cells


# --------------------------------------------------------------------------------------------------
# rows and the paper's numbers
# --------------------------------------------------------------------------------------------------


def target_label(config: RunConfig) -> str:
    """The target in the paper's vocabulary: ``gradpc``, or ``gradpc/2`` for a target scaled by 1/2."""
    return config.target if config.target_scale == 1 else f"{config.target}/{1 / config.target_scale:g}"


def row_specs(config: RunConfig, defenses: list[dict]) -> list[tuple]:
    """The rows of a cell as (configured ε_d or None, defense id or None, defense entry or None):
    the undefended rows first, then each defense's; a run without ε_d has one row (its target)."""
    if not config.eps_d:
        return [(None, None, None)]
    rows = [(e, None, None) for e in config.eps_d]
    for d in defenses:
        rows += [(e, d["id"], d) for e in config.eps_d]
    return rows


def paper_keys(config: RunConfig, paper: dict, eps_d, defense: dict | None) -> dict:
    """The keyword arguments of ``paper.lookup`` for one row (see the module docstring)."""
    keys = {"dataset": config.dataset, "model": config.model, "metric": "acc_drop"}
    if eps_d is None:
        keys.update(attack=target_label(config), eps_w=config.eps_w)
    else:
        # the paper's GC is problem (18), whichever solver runs it; GC-c is GC in the data range
        canceling = config.attack in ("gc", "gc-pgd")
        gc_c = canceling and config.attack_options.get("box") == "data-range"
        keys.update(attack="gc-c" if gc_c else "gc" if canceling else config.attack, eps_d=eps_d)
        targeted = config.make_attacks()[0].model_targeted  # an instance: GM's depends on its objective
        keys["target"] = target_label(config) if targeted else None
        if paper.get("table") == 9:  # adding versus replacing (appendix C.10)
            keys["threat"] = "replace" if config.attack_options.get("replace") else "add"
    keys.update({k: v for k, v in paper.items() if k != "table"})
    keys["defense"] = None if defense is None else defense["name"]
    if defense is not None and defense["name"] == "dpa" and "num_partitions" in defense["options"]:
        keys["k"] = defense["options"]["num_partitions"]
    return keys


_REAL = object()
SHIPPED = "configs"  # the folder of the shipped sweep files, package data beside this module


def shipped_sweeps() -> list[str]:
    """The names of the sweep files shipped with the package, sorted."""
    return sorted(f.name.removesuffix(".yaml") for f in resources.files(__package__).joinpath(SHIPPED).iterdir() if f.name.endswith(".yaml"))


def sweep_path(name_or_path: str | os.PathLike) -> Path | Traversable:
    """The sweep file a command line names: a shipped one by its bare name (``table2-mnist``), or
    the user's file at a path (a ``Path``, or text with a directory or a .yaml/.yml suffix)."""
    text = os.fspath(name_or_path)
    shipped = shipped_sweeps()
    if isinstance(name_or_path, os.PathLike) or os.sep in text or "/" in text or text.endswith((".yaml", ".yml")):
        if not Path(text).is_file():
            raise PoisonReachError(f"sweep file {text} does not exist: give the path of a YAML file, or the name of a shipped "
                                   f"sweep ({', '.join(shipped)})")
        return Path(text)
    if text not in shipped:
        raise PoisonReachError(f"no shipped sweep is named {text!r}: give one of {', '.join(shipped)}, or the path of a YAML file")
    return resources.files(__package__).joinpath(SHIPPED, f"{text}.yaml")


def load_sweep(path: str | os.PathLike, overrides=(), profile: str | None = None, *, lookup=_REAL) -> Sweep:
    """Read, layer and validate a sweep file, shipped or the user's (:func:`sweep_path`; see the
    module docstring for the format).

    ``lookup(table, **keys) -> float | None`` gives the paper's numbers (default:
    :func:`poisonreach.experiments.paper.lookup`; None: no paper numbers).
    """
    path = sweep_path(path)
    try:
        doc = io.parse_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PoisonReachError(f"{path} is not valid YAML ({e})") from None
    return parse_sweep(doc, str(path), overrides=overrides, profile=profile, lookup=lookup)


def parse_sweep(doc, source: str, *, overrides=(), profile: str | None = None, lookup=_REAL) -> Sweep:
    """:func:`load_sweep` of an already parsed document; ``source`` names it in messages."""
    resolved = resolve(doc, source, overrides=overrides, profile=profile)
    defenses = [{"name": d["name"], "options": d.get("options") or {}} for d in resolved["defenses"]]
    for d in defenses:
        d["id"] = defense_id(d["name"], d["options"])
    cells, grid_values = [], {}
    for cid, values, config_dict in expand(resolved):
        try:
            config = RunConfig.from_dict(config_dict)
            config.validate()
            for d in defenses:
                make_defense(d["name"], d["options"], config)
        except (TypeError, ValueError) as e:  # PoisonReachError, or a value of the wrong type
            raise PoisonReachError(f"{source}: cell {cid}: {e}") from None
        cells.append((cid, config))
        grid_values[cid] = values
    sweep = Sweep(resolved["name"], resolved["description"], resolved["paper"], cells, defenses, source, resolved, profile, grid_values)
    lookup = paper_numbers.lookup if lookup is _REAL else lookup
    if sweep.paper and lookup is not None:
        for cid, config in cells:
            for eps_d, did, d in row_specs(config, defenses):
                try:
                    value = lookup(sweep.paper["table"], **paper_keys(config, sweep.paper, eps_d, d))
                except PoisonReachError as e:
                    raise PoisonReachError(f"{source}, section paper, cell {cid}: {e}") from None
                sweep.paper_values[(cid, eps_d, did)] = value
    return sweep
