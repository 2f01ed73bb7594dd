"""Experiments: a run's configuration (``config``), the run folder (``run``), defenses on a run
(``defend``), sweep files (``sweep_file``) and sweeps over the paper's tables and figures
(``sweep``), their figures (``plots``), Markdown reports (``report``), the paper's own numbers
(``paper``) and appendix D's choice of a target (``selection``).

Layers: ``config`` over the library; ``plots`` reads run folders through ``config``; ``run`` over
both; ``defend``, then ``sweep_file``, ``sweep`` and ``report`` above; ``poisonreach.cli`` over
these only. Nothing in the library imports this package."""
