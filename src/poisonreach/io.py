"""Artefact files that load without executing code, written atomically.

Poison sets are shared between people, so nothing here uses pickle: tensors go through
``torch.save`` and come back through ``torch.load(weights_only=True)``, numpy archives through
``np.load(allow_pickle=False)``, metadata is JSON or YAML read with ``safe_load``. Every write goes to a temporary file in the same folder and is then renamed
over the destination, so a killed run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import yaml

from . import distributed
from .errors import CorruptFileError, PoisonReachError


@contextmanager
def atomic_write(dest: str | os.PathLike) -> Iterator[tuple[IO[bytes], Path]]:
    """Yield a file open for writing beside ``dest`` and its path; it becomes ``dest`` only if the
    block succeeds, so readers never see a half-written file. In a data-parallel job only rank 0
    writes: the other ranks' copies (the same bytes) go to a scratch file that is dropped."""
    dest = Path(dest)
    if not distributed.is_writer():
        with tempfile.TemporaryDirectory() as scratch, open(Path(scratch) / dest.name, "wb") as out:
            yield out, Path(scratch) / dest.name
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            yield out, Path(tmp)
            if not out.closed:  # a caller may close it early, e.g. to verify the finished file
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    with atomic_write(path) as (out, _):
        out.write(data)
    return Path(path)


def plain(obj: Any) -> Any:
    """``obj`` as plain JSON/YAML types; non-finite floats become strings so the file stays standard JSON."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return plain(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # "inf", "-inf", "nan": float() reads them back
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(plain(obj), indent=2) + "\n").encode())


def _read_text(path: str | os.PathLike, parse, kind: str, errors) -> Any:
    path = Path(path)
    if not path.is_file():
        raise PoisonReachError(f"{path} does not exist: pass the folder that `poisonreach run` wrote")
    try:
        return parse(path.read_text())
    except errors as e:
        raise CorruptFileError(f"{path} is not valid {kind} ({e}): the file is damaged, re-run to recreate it") from e


def read_json(path: str | os.PathLike) -> Any:
    return _read_text(path, json.loads, "JSON", json.JSONDecodeError)


def write_yaml(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, yaml.safe_dump(plain(obj), sort_keys=False).encode())


class _Loader(yaml.SafeLoader):
    """The safe loader, reading numbers as YAML 1.2 does: ``1e-5`` is a float (YAML 1.1, PyYAML's
    default, needs a dot, ``1.0e-5``, and reads ``1e-5`` as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """A YAML document (never executes code; numbers as in :class:`_Loader`)."""
    return yaml.load(text, Loader=_Loader)


def read_yaml(path: str | os.PathLike) -> Any:
    return _read_text(path, parse_yaml, "YAML", yaml.YAMLError)


def save_tensors(path: str | os.PathLike, tensors: dict[str, Any]) -> Path:
    """``torch.save`` a dict of tensors and plain values, atomically."""
    buffer = io.BytesIO()
    torch.save(tensors, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def load_tensors(path: str | os.PathLike) -> dict[str, Any]:
    """Load a file written by :func:`save_tensors` without executing code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise PoisonReachError(f"{path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for damaged or unsafe files, with many-line messages
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a torch.save archive at all
            unsafe = []
        if unsafe:
            raise CorruptFileError(f"{path} holds Python objects other than tensors ({', '.join(unsafe)}): refused") from None
        raise CorruptFileError(f"{path} cannot be loaded as tensors ({type(e).__name__}): it is damaged or was not written by torch.save") from None


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every array of the ``.npz`` archive at ``path``, read with ``allow_pickle=False``; an archive
    holding Python objects is refused in one line, never unpickled."""
    path = Path(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # not an archive: numpy takes it for a pickle, which it refuses
        raise CorruptFileError(f"{path} is not a readable .npz archive ({e}): save it with numpy.savez(FILE, x=..., y=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise PoisonReachError(f"{path} holds one array, not an archive of x and y: save it with numpy.savez(FILE, x=..., y=...)")
    with archive:
        try:
            return {name: archive[name] for name in archive.files}
        except ValueError:
            raise PoisonReachError(f"{path} holds Python objects other than numeric arrays: refused") from None
