"""Model-targeted indiscriminate data poisoning: the reachability threshold τ and the Gradient
Canceling attack of Lu, Kamath and Yu (ICML 2023), the baselines, the defenses and the paper's
experiments.

The library is its modules (``poisonreach.data``, ``models``, ``training``, ``reachability``,
``targets``, ``attacks``, ``defenses``); ``poisonreach.experiments`` and the ``poisonreach`` command
are built on them. Importing the package itself imports none of them.
"""

# The one copy of the version: the build reads it from here (pyproject.toml, tool.setuptools.dynamic).
__version__ = "0.1.0"
