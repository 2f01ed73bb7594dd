"""Experiments: a run's configuration (``config``), the run folder (``run``), defenses on a run
or a poison file (``defend``), sweep files (``sweep_file``) and sweeps over the paper's tables and
figures (``sweep``), their figures (``plots``), Markdown reports (``report``), poison sets written
for other pipelines (``export``) and any poison set retrained on (``evaluate``), the paper's own
numbers (``paper``), appendix D's choice of a target (``selection``), the options of every
attack, target generator, defense and training protocol (``options``), and log lines and
experiment tracking (``tracking``); ``configs/`` holds the shipped sweep files.

Layers: ``config`` over the library; ``plots`` reads run folders through ``config``; ``run`` over
both; ``export`` over ``config``; ``evaluate`` over ``run`` and ``export``; ``defend`` over
``evaluate``, then ``sweep_file``, ``sweep`` and ``report`` above; ``options`` over ``config``;
``tracking`` under ``run``; ``poisonreach.cli`` over these only. Nothing in the library imports this package."""

from .. import __version__  # for the command line, which reaches the package through here only

__all__ = ["__version__"]
