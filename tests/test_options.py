"""``poisonreach options`` and the command line's help.

- every constructor option of every attack, target generator and defense, and every option of the
  two training protocols, is listed with its type, a default that reads back (as KEY=VALUE reads
  it) to the signature's default, and a description from the docstrings;
- the docstring reader: both section styles, shared entries, entries inherited from a base class
  and "as in :class:`X`" references;
- ``--help`` of every command: no reST markup, every action described, every option's default shown;
- ``--version`` and ``poisonreach.__version__``.
"""

from __future__ import annotations

import argparse
import inspect
import re
import subprocess
import sys
from importlib import metadata

import pytest

import poisonreach
from poisonreach.attacks import ATTACKS, GaussNewtonCanceling, GradientCanceling
from poisonreach.cli import HelpFormatter, _parser, main
from poisonreach.defenses import DEFENSES
from poisonreach.experiments import options
from poisonreach.experiments.selection import SELECT_DEFAULTS, select_options
from poisonreach.io import parse_yaml
from poisonreach.targets import TARGET_GENERATORS
from poisonreach.training import CONVERGED_OPTIONS, HYPERPARAMETERS, minimize, train

EVERY = [*[(name, cls, None) for registry in (ATTACKS, TARGET_GENERATORS, DEFENSES) for name, cls in registry.items()],
         ("select", select_options, None), ("train", train, set(HYPERPARAMETERS)), ("minimize", minimize, set(CONVERGED_OPTIONS))]
MARKUP = re.compile(r"``|:[a-z]+:`")


def listed(text: str) -> dict[str, tuple[str, str]]:
    """Option name → (its line after the name, its description) in ``describe``'s output (the
    options follow the head's blank line)."""
    found, lines = {}, text.splitlines()
    for i, line in enumerate(lines[lines.index("") + 1:], start=lines.index("") + 1):
        if m := re.fullmatch(r"  (\w+)(.*)", line):
            after = lines[i + 1] if i + 1 < len(lines) else ""
            found[m.group(1)] = (m.group(2), after.strip() if after.startswith(" " * 6) else "")
    return found


@pytest.mark.parametrize("name, obj, names", EVERY, ids=[e[0] for e in EVERY])
def test_every_option_is_listed_with_its_type_default_and_text(name, obj, names, capsys):
    assert main(["options", name]) == 0
    out = capsys.readouterr().out
    shown = listed(out)
    params = [p for p in inspect.signature(obj).parameters.values() if names is None or p.name in names]
    assert params and set(shown) == {p.name for p in params}, out
    for p in params:
        rest, text = shown[p.name]
        if p.annotation is not inspect.Parameter.empty:
            assert rest.startswith(f": {p.annotation}"), (p.name, rest)
        if p.default is inspect.Parameter.empty:
            assert rest.endswith(" (required)"), (p.name, rest)
        else:
            default = rest.rsplit(" = ", 1)[1]
            expected = list(p.default) if isinstance(p.default, tuple) else p.default
            assert parse_yaml(default) == expected, (p.name, default)  # what --attack-option KEY=VALUE would read
        assert text and not MARKUP.search(text), (name, p.name, text)  # documented, in plain text


def name_of(cls) -> str:
    return next(name for name, c in ATTACKS.items() if c is cls)


def test_a_few_lines_as_printed():
    pgd = name_of(GradientCanceling)
    gc = options.describe(pgd)
    assert "  box: tuple[float, float] | str | None = [0.0, 1.0]\n      the admissible set Γ for the features: (low, high)" in gc
    assert "  epochs: int = 200\n      passes of projected gradient descent over the poisons.\n" in gc
    assert "  eps_d: float (required)\n" in gc and "  progress: bool | None = null\n" in gc
    assert "preset paper (--preset paper): epochs=1000, lr=0.5" in gc
    assert f"set with: run --attack {pgd} --attack-option KEY=VALUE" in gc
    assert "  tolerance: float = 1e-05\n" in options.describe("minimize")
    assert "set with: defend --defense dpa --option KEY=VALUE" in options.describe("dpa")


def test_without_a_name_every_name_is_listed(capsys):
    assert main(["options"]) == 0
    out = capsys.readouterr().out
    for name, _, _ in EVERY:
        assert re.search(rf"^  {re.escape(name)}  ", out, flags=re.M), name
    assert "Gradient Canceling: poisons that make a target model w stationary" in out


def test_the_select_targets_options_are_its_defaults(capsys):
    assert main(["options", "select"]) == 0
    assert set(listed(capsys.readouterr().out)) == set(SELECT_DEFAULTS)


def test_a_reader_that_leaves_early_gets_no_traceback():
    # `poisonreach options | head -1`: the pipe closes before the listing is written
    child = subprocess.Popen([sys.executable, "-m", "poisonreach", "options"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and err == ""


def test_an_unknown_name_is_one_line_naming_the_choices(capsys):
    assert main(["options", "gcc"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "'gcc'" in lines[0]
    assert [name for name, _, _ in EVERY if name not in lines[0]] == []


# the docstring reader


def test_both_section_styles_and_shared_entries():
    def numpy_style(a, b, c):
        """Summary.

        Parameters
        ----------
        a: first line
            continued. Second sentence.
        b, c: shared.

        Not part of the section: x: y.
        """

    def google_style(a, b):
        """Summary.

        Args:
            a: first.
            b: second, on
                two lines.
        """

    assert [o.help for o in options.options_of(numpy_style)] == ["first line continued.", "shared.", "shared."]
    assert [o.help for o in options.options_of(google_style)] == ["first.", "second, on two lines."]


def test_entries_come_from_base_classes_and_references():
    by_name = lambda cls: {o.name: o.help for o in options.options_of(cls)}  # noqa: E731
    gc, gn = by_name(GradientCanceling), by_name(GaussNewtonCanceling)
    # both inherit box from the docstring of their base CancelingAttack; GaussNewtonCanceling
    # documents seed as "as in :class:`GradientCanceling`"
    assert gn["box"] == gc["box"] and gc["box"].startswith("the admissible set")
    assert gn["seed"] == gc["seed"] and gc["seed"].startswith("seeds the initial subsample")
    # device is documented once, in the base class every estimator shares
    assert gc["device"] == gn["device"] and gc["device"].startswith("where the computation runs")
    assert gc["checkpoint_every"].startswith("how often the state is saved")


def test_plain_removes_the_markup():
    assert options.plain("``x`` and :class:`~poisonreach.attacks.GradientCanceling`, :func:`a.b`::") == \
        "x and GradientCanceling, a.b:"


# --help of every command


def commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"": parser, **sub.choices}


def help_of(capsys, command: str) -> str:
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"] if command else ["--help"])
    assert exit.value.code == 0
    return capsys.readouterr().out


def blocks(text: str) -> dict[str, str]:
    """Each option's help in a --help text, its lines joined, by its first option string."""
    found, current = {}, None
    for line in text.splitlines():
        if m := re.match(r"  (-[-\w]+)", line):
            current = m.group(1)
            found[current] = line
        elif current and line.startswith("   "):
            found[current] += " " + line.strip()
        else:
            current = None
    return {flag: " ".join(text.split()) for flag, text in found.items()}


@pytest.mark.parametrize("command", list(commands()))
def test_help_has_no_markup_and_describes_every_action_with_its_default(command, capsys):
    text = help_of(capsys, command)
    assert not MARKUP.search(text), MARKUP.search(text)
    shown = blocks(text)
    for action in commands()[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS, action
        flag = action.option_strings[0] if action.option_strings else None
        if flag is None or flag == "-h" or action.required or isinstance(action, argparse._VersionAction):
            continue
        assert "(default" in shown[flag] or "default:" in shown[flag] or "default)" in shown[flag], shown[flag]


def test_a_flag_without_a_stated_default_gets_it_appended():
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    parser.add_argument("--jobs", type=int, default=3, help="cells at once")
    parser.add_argument("--flag", action="store_true", help="a switch")
    parser.add_argument("--budgets", nargs="+", type=float, default=[0.1, 1.0], help="budgets")
    parser.add_argument("--root", default=None, help="a folder (default: the cache)")
    text = " ".join(parser.format_help().split())
    for expected in ("cells at once (default: 3)", "a switch (default: off)", "budgets (default: 0.1 1.0)",
                     "a folder (default: the cache)"):
        assert expected in text
    assert text.count("default") == 4


def test_version(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"poisonreach {poisonreach.__version__}"
    assert poisonreach.__version__ == metadata.version("poisonreach")  # the installed metadata is built from it
