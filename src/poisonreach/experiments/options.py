"""``poisonreach options [NAME]``: every option of an attack, a target generator, a defense or a
training protocol, with its type, its default and the first sentence of its documentation; without
a NAME, the names there are.

Nothing is listed by hand: the names are those of the registries (``ATTACKS``,
``TARGET_GENERATORS``, ``DEFENSES``, with ``select_options`` for ``--target select``) and of the training functions (``train``, with the options its
protocol checks, and ``minimize``); each option's type and default come from the signature of the
class or function, its text from the docstrings of the class and its bases.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from dataclasses import dataclass

from ..attacks import ATTACKS
from ..defenses import DEFENSES
from ..errors import PoisonReachError
from ..targets import TARGET_GENERATORS
from ..training import CONVERGED_OPTIONS, HYPERPARAMETERS, minimize, train
from .config import POISONED_TARGETS
from .selection import select_options

__all__ = ["GROUPS", "Option", "describe", "listing", "options_of", "plain"]


@dataclass(frozen=True)
class Group:
    """A kind of configurable object: its name → (class or function, the options it lists or None
    for every constructor argument), and how a run sets them."""

    title: str
    members: dict
    usage: str


GROUPS = (
    Group("attacks", {name: (cls, None) for name, cls in ATTACKS.items()},
          "run --attack NAME --attack-option KEY=VALUE (eps_d is --eps-d; device is the run's, and so is seed unless given here); in a sweep "
          "run.attack and run.attack_options"),
    Group("target generators", {name: (cls, None) for name, cls in TARGET_GENERATORS.items()},
          f"run --target NAME --target-option KEY=VALUE (eps_w and eps_w_mode are --eps-w and --eps-w-mode; device "
          f"is the run's, and so is seed unless given here); in a sweep run.target and run.target_options; "
          f"the attacks {', '.join(POISONED_TARGETS)} are targets too, with their attack options"),
    Group("target selection", {"select": (select_options, None)},
          "run --target select --target-option KEY=VALUE (lists as [0.1,0.5]); in a sweep run.target: select and "
          "run.target_options"),
    Group("defenses", {name: (cls, None) for name, cls in DEFENSES.items()},
          "defend --defense NAME --option KEY=VALUE; in a sweep defenses: [{name: NAME, options: {...}}]"),
    Group("training protocols", {"train": (train, tuple(HYPERPARAMETERS)), "minimize": (minimize, tuple(CONVERGED_OPTIONS))},
          "--train-option KEY=VALUE; in a sweep run.training; train under --protocol honest (the default) and official, "
          "minimize under --protocol converged"),
)
# the objects an "as in :class:`X`" entry may name, by bare and by dotted name
_KNOWN = [obj for group in GROUPS for obj, _ in group.members.values()]
_BY_NAME = {**{obj.__name__: obj for obj in _KNOWN}, **{f"{obj.__module__}.{obj.__name__}": obj for obj in _KNOWN}}

_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_SENTENCE_END = re.compile(r"(?<=\.)(?<!e\.g\.)(?<!i\.e\.)(?<!al\.)\s+(?=\(?[A-Z])")
_SECTIONS = ("Args:", "Arguments:")
_ENTRY = re.compile(r"(\w+(?:,\s*\w+)*):\s*(.*)")
_AS_IN = re.compile(r"as in :[a-z]+:`~?([\w.]+)`\.?")


def plain(text: str | None) -> str:
    """A docstring for the terminal: its indentation removed (``inspect.cleandoc``), ``literal`` and
    :role:`target` their text (``~a.b``: b), a literal block's "::" a colon."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), inspect.cleandoc(text or ""))
    return re.sub(r"::$", ":", _LITERAL.sub(r"\1", text), flags=re.M)


def _entries(doc: str | None) -> dict[str, str]:
    """Option name → its entry's text (lines joined) in the docstring's parameter section: the
    ``name: text`` lines of a ``Parameters`` section (underlined, as numpy writes it) or of an
    ``Args:`` section, continued on more indented lines, ``a, b: text`` shared by several names."""
    lines = inspect.cleandoc(doc or "").splitlines()
    found: dict[str, list[str]] = {}
    for i, line in enumerate(lines):
        underlined = line.strip() == "Parameters" and i + 1 < len(lines) and set(lines[i + 1].strip()) == {"-"}
        if not (underlined or line.strip() in _SECTIONS):
            continue
        body = lines[i + (2 if underlined else 1):]
        indent, current = None, None
        for text in body:
            if not text.strip():
                break  # the section ends at its first blank line
            depth = len(text) - len(text.lstrip())
            indent = depth if indent is None else indent
            match = _ENTRY.fullmatch(text.strip()) if depth == indent else None
            if match:
                current = [match.group(2)]
                for name in re.split(r",\s*", match.group(1)):
                    found[name] = current  # several names share one entry
            elif depth > indent and current is not None:
                current.append(text.strip())
            else:
                break
    return {name: " ".join(parts) for name, parts in found.items()}


def _entry(obj, name: str, seen: frozenset = frozenset()) -> str | None:
    """The documentation of option ``name`` of ``obj``: its own docstring's entry, else its base
    classes'; an entry "as in :class:`Other`" is Other's."""
    for owner in inspect.getmro(obj)[:-1] if inspect.isclass(obj) else (obj,):
        text = _entries(owner.__doc__).get(name)
        if text is None:
            continue
        other = _AS_IN.fullmatch(text)
        if other and other.group(1) in _BY_NAME and _BY_NAME[other.group(1)] not in seen | {obj}:
            return _entry(_BY_NAME[other.group(1)], name, seen | {obj})
        return text
    return None


def _first_sentence(text: str) -> str:
    return _SENTENCE_END.split(plain(" ".join(text.split())), maxsplit=1)[0]


@dataclass(frozen=True)
class Option:
    name: str
    type: str  # the annotation as written, "" without one
    default: object  # inspect.Parameter.empty: required
    help: str  # the first sentence of its entry, "" when undocumented

    @property
    def required(self) -> bool:
        return self.default is inspect.Parameter.empty


def options_of(obj, names=None) -> list[Option]:
    """The options of a class's constructor or a function (only ``names``, if given), in
    signature order."""
    params = [p for p in inspect.signature(obj).parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    chosen = [p for p in params if names is None or p.name in names]
    return [Option(p.name, "" if p.annotation is inspect.Parameter.empty else str(p.annotation), p.default,
                   _first_sentence(_entry(obj, p.name) or "")) for p in chosen]


def _value(value) -> str:
    """A default as a user types it in KEY=VALUE (YAML): strings bare, tuples as lists, null, true."""
    if isinstance(value, str):
        return value
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def _summary(obj) -> str:
    return _first_sentence(inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0])


def _find(name: str) -> tuple[Group, object, tuple | None]:
    for group in GROUPS:
        if name in group.members:
            return (group, *group.members[name])
    names = "; ".join(f"{group.title} {', '.join(sorted(group.members))}" for group in GROUPS)
    raise PoisonReachError(f"{name!r} has no options listed here: give one of {names} (poisonreach options lists them)")


def describe(name: str, width: int = 100) -> str:
    """Every option of ``name`` (an attack, target generator, defense, ``train`` or ``minimize``)."""
    group, obj, names = _find(name)
    kind = group.title.removesuffix("s") + ("" if obj.__name__ == name else f" {obj.__name__}")
    head = [f"{name}: {kind}. {_summary(obj)}", f"set with: {group.usage.replace('NAME', name)}"]
    presets = getattr(obj, "presets", {})
    for preset, values in presets.items():
        head.append(f"preset {preset} (--preset {preset}): " + ", ".join(f"{k}={_value(v)}" for k, v in values.items()))
    lines = [textwrap.fill(line, width, subsequent_indent="  ") for line in head] + [""]
    for option in options_of(obj, names):
        kind = f": {option.type}" if option.type else ""
        lines.append(f"  {option.name}{kind}" + (" (required)" if option.required else f" = {_value(option.default)}"))
        if option.help:
            lines.append(textwrap.fill(option.help, width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def listing(width: int = 100) -> str:
    """The names ``poisonreach options NAME`` takes, by kind, each with its summary."""
    lines = []
    for group in GROUPS:
        lines.append(textwrap.fill(f"{group.title} ({group.usage}):", width, subsequent_indent="  "))
        pad = max(map(len, group.members)) + 2
        for name, (obj, _) in sorted(group.members.items()):
            lines.append(textwrap.fill(_summary(obj), width, initial_indent=f"  {name.ljust(pad)}", subsequent_indent=" " * (pad + 2)))
    lines.append("poisonreach options NAME lists the options of one, with their types and defaults.")
    return "\n".join(lines)
