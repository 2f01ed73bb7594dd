"""Experiments: the run folder (``run``), defenses on a run (``defend``), sweeps over the paper's
tables and figures (``sweep``), their figures (``plots``), Markdown reports (``report``) and the
paper's own numbers (``paper``)."""
