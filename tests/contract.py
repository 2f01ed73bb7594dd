"""Tables of bad constructor arguments as pytest parameters, for the contract tests of each role
(``test_attack_contract.py``, ``test_defense_contract.py``, ``test_generator_contract.py``).

:func:`check_estimator` is the estimator round trip every role shares. A table maps a class to its bad cases; a case is the keyword arguments, which must raise a
PoisonReachError naming the argument (the last key: the earlier ones set up the context), or a pair
(kwargs, message) when the test pins the message itself.
"""

from __future__ import annotations

import inspect
import re

import pytest


def kwargs_id(kwargs: dict) -> str:
    return "-".join(f"{k}={v!r}" for k, v in kwargs.items())


def bad_cases(table: dict) -> list:
    """``pytest.param(cls, kwargs, match)`` for every case of the table; ``match`` is a regular expression."""
    rows = []
    for cls, cases in table.items():
        for case in cases:
            kwargs, match = case if isinstance(case, tuple) else (case, rf"\b{re.escape(list(case)[-1])}\b")
            rows.append(pytest.param(cls, kwargs, match, id=f"{cls.__name__}-{kwargs_id(kwargs)}"))
    return rows


def examples(rows: list) -> list:
    """One ``pytest.param`` per row of a table of example instances, named after the class."""
    return [pytest.param(*row, id=f"{row[0].__name__}-{i}") for i, row in enumerate(rows)]


def check_estimator(obj, kwargs: dict, shown: str, stored=lambda value: value):
    """``obj`` was made as ``type(obj)(**kwargs)``: its repr is ``shown`` (the arguments that differ
    from the defaults), ``get_params`` returns the constructor's arguments under their names (the
    given ones as ``stored`` keeps them), and ``type(obj)(**obj.get_params())`` is an equal object,
    which is returned."""
    cls = type(obj)
    assert repr(obj) == shown
    params = obj.get_params()
    assert list(params) == list(inspect.signature(cls).parameters)
    assert {k: params[k] for k in kwargs} == {k: stored(v) for k, v in kwargs.items()}
    again = cls(**params)
    assert again.get_params() == params and repr(again) == repr(obj)
    return again
