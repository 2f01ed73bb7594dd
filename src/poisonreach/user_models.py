"""Models from the user's own code, named ``module.path:Class`` (``--model mymodels:Net``).

The module is imported as Python imports any module (from ``sys.path``, and from the folder the
program runs in, as ``python -m`` would), and the class, an ``nn.Module`` subclass, is called with
keyword arguments only:

- its options (``--model-option KEY=VALUE``), as given;
- each of ``input_shape`` (one sample's shape, e.g. ``(1, 28, 28)``), ``num_classes`` (an int),
  ``mean`` and ``std`` (the data set's per-channel statistics, tuples of floats) that its
  constructor names as a parameter. They come from the data set, so an option may not set them; a
  constructor that takes only ``**kwargs`` receives none of them.

The model gets pixel-space inputs (images N × C × H × W in [0, 1]), as the data sets hold them, and
normalises them itself if it wants to: poisons are optimised and projected in that space. Its
weights are drawn under the seed :func:`poisonreach.models.create` fixes.

A saved model records its spec and options, never its code or a pickle; rebuilding it imports the
module again, so :func:`poisonreach.models.load_model` rebuilds only the classes :func:`allow` was
called for (a run allows the ones its configuration names): a model file alone never chooses what
code runs.
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys

from torch import nn

from .errors import PoisonReachError

# what the data set gives a constructor that names them (and no option may set)
DATA_ARGUMENTS = ("input_shape", "num_classes", "mean", "std")
_ALLOWED: set[str] = set()


def is_spec(name) -> bool:
    """Whether ``name`` names a user class (``module:Class``) rather than a built-in model."""
    return isinstance(name, str) and ":" in name


def resolve(spec: str) -> type[nn.Module]:
    """The class ``spec`` (``module.path:Class``) names, imported; one line naming the problem otherwise."""
    module_name, _, class_name = spec.partition(":")
    if not all(part.isidentifier() for part in module_name.split(".")) or not class_name.isidentifier():
        raise PoisonReachError(f"model {spec!r} is neither a built-in name nor module.path:Class (e.g. mymodels:Net, "
                               "for class Net in mymodels.py)")
    module = _import(module_name, spec)
    cls = getattr(module, class_name, None)
    if cls is None:
        defined = sorted(name for name, value in vars(module).items()
                         if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module.__name__)
        raise PoisonReachError(f"module {module_name} ({module.__file__}) has no {class_name}, named by the model {spec!r}: "
                               f"its nn.Module classes are {', '.join(defined) or 'none'}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise PoisonReachError(f"{spec} is a {type(cls).__name__}, not an nn.Module subclass: name a torch model class")
    return cls


def _import(module_name: str, spec: str):
    """``module_name`` imported with the working folder first on the path, as ``python -m`` has it."""
    here = os.getcwd()
    added = here not in sys.path
    if added:
        sys.path.insert(0, here)
    if module_name not in sys.modules:
        importlib.invalidate_caches()  # a module written after start-up (by a script, a test) is found
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (module_name == e.name or module_name.startswith(e.name + ".")):
            raise PoisonReachError(f"cannot import {module_name} for the model {spec!r}: no module {e.name} in {here} or on "
                                   "PYTHONPATH; run from the folder that holds it, or add its folder to PYTHONPATH") from None
        raise PoisonReachError(f"importing {module_name} for the model {spec!r} failed: it imports {e.name}, which is not "
                               "installed; install it") from None
    except Exception as e:  # anything the module's own code raises on import
        raise PoisonReachError(f"importing {module_name} for the model {spec!r} failed ({type(e).__name__}: {e}): fix the "
                               "module") from None
    finally:
        if added:
            sys.path.remove(here)


def check_options(spec: str, options) -> type[nn.Module]:
    """The class of ``spec``, after checking that ``options`` are keyword arguments it can take."""
    cls = resolve(spec)
    if not isinstance(options, dict) or not all(isinstance(k, str) for k in options):
        raise PoisonReachError(f"the options of the model {spec} must be a mapping of names to values, got {options!r}")
    reserved = sorted(set(options) & set(DATA_ARGUMENTS))
    if reserved:
        raise PoisonReachError(f"model option(s) {reserved} of {spec} come from the data set: drop them (the constructor "
                               "receives them when it names them)")
    parameters = _parameters(cls)
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        accepted = [k for k, p in parameters.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and k not in DATA_ARGUMENTS]
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise PoisonReachError(f"unknown model option(s) {unknown} for {spec}: its constructor takes {accepted or 'none'}")
    return cls


def _parameters(cls: type) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(cls).parameters)
    except (TypeError, ValueError):  # no readable signature (a C extension type): assume it takes keywords
        return {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}


def build(spec: str, options: dict, *, input_shape: tuple[int, ...], num_classes: int, mean: tuple[float, ...],
          std: tuple[float, ...]) -> nn.Module:
    """A fresh instance of the user class ``spec``: its ``options`` and the data arguments its
    constructor names (see the module's docstring). The caller fixes the random state."""
    cls = check_options(spec, options)
    given = {"input_shape": tuple(input_shape), "num_classes": num_classes, "mean": tuple(mean), "std": tuple(std)}
    named = _parameters(cls)
    kwargs = {**options, **{k: v for k, v in given.items() if k in named}}
    try:
        model = cls(**kwargs)
    except Exception as e:  # the user's constructor: a missing or wrong option is the usual cause
        raise PoisonReachError(f"constructing {spec}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())}) failed "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): give its arguments as "
                               "model options (--model-option KEY=VALUE)") from None
    return model


def allow(spec: str) -> None:
    """Let :func:`poisonreach.models.load_model` rebuild saved models of the user class ``spec``
    (which imports its module and calls its constructor)."""
    if not is_spec(spec):
        raise PoisonReachError(f"{spec!r} is not a user model spec (module.path:Class)")
    _ALLOWED.add(spec)


def allowed(spec: str) -> bool:
    """Whether :func:`allow` was called for ``spec`` in this process."""
    return spec in _ALLOWED
