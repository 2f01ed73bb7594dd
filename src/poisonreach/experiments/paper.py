"""The paper's published numbers as records, to compare reproductions against.

Every number of Tables 1–9 of Lu, Kamath & Yu, "Exploring the Limits of Model-Targeted
Indiscriminate Data Poisoning Attacks" (ICML 2023), and the results quoted in its text and figure
captions, one record per printed number, in ``paper.yaml`` next to this module:

    lookup(2, dataset="mnist", model="lr", attack="gc", eps_d=0.03, metric="acc_drop")  # 22.97
    find(table=6, target="gradpc/2", metric="tau")                                      # 3 records

Vocabulary (every record has ``table``, ``metric`` and ``value``; the other keys appear only where
they apply, and a key that does not apply is absent):

table
    1–9 for Tables 1–9; for numbers in the text or a caption, where they are printed: ``sec1``,
    ``ex2`` (Example 2), ``sec5.2``, ``sec5.3``, ``c6`` (appendix C.6), ``fig1``, ``fig8``.
dataset
    mnist, cifar10, tinyimagenet, or2d (Figure 1's OR set), gaussian10, mnist17, regression2d,
    toy (the three-point set (C.3) of appendix C.6). Names are those of ``poisonreach.data.load``,
    except toy, which is written out in the appendix.
model
    lr, linreg, nn, cnn, resnet18, resnet34 (names of ``poisonreach.models.create``).
attack
    gc (Gradient Canceling, Algorithm 1), gc-c (GC with poisons clipped to the clean data's range,
    Table 3), tgda (Lu et al. 2022), gm (Gradient Matching, Geiping et al. 2021), gradpc and
    randompc (parameter corruption, Sun et al. 2020), labelflip.
target
    the target parameter GC aims at, or whose τ is given: gradpc (the GradPC model of the row),
    gradpc/2 (that model scaled by one half, Table 6), tgda (the model TGDA poisoned with ε_d = 1,
    Table 7), grid (Figure 1's grid of targets), 2w*, 2w*/1.1, w*/2 (scalings of the stationary point
    w* of the toy set, appendix C.6). Tables 3, 4, 8 and 9 do not restate their target; their GC
    numbers repeat Table 2's, so they are recorded as gradpc (Section 5.1: GradPC targets).
defense
    sever, influence, maxup, dpa. A record with ``defense`` is the outcome after that defense.
k
    the number of DPA partitions (Table 4).
eps_w
    the GradPC / RandomPC budget (Tables 1 and 5). Table 2 does not print the ε_w of its targets;
    notes say which Table 1 column its MNIST drops match.
eps_d
    the poisoning ratio |poisons| / |clean|, or ``"tau"`` for the column "ε_d = τ" (GC run at the
    target's own threshold).
threat
    add (poisons are added, the paper's setting) or replace (they replace a random part of the
    clean training set, appendix C.10); only Table 9 varies it.
metric
    clean_acc: test accuracy of the clean model (%);
    target_acc: test accuracy of the attacked (or target) model (%);
    acc_drop: clean minus attacked accuracy (percentage points), positive when the accuracy falls:
    the sign of ``acc_drop`` in run folders and sweeps, so the two compare directly. Tables 1 and 5
    print it so (after the slash); Tables 2–4 and 6–9 print the accuracy change, negative for a
    drop, and are stored negated (the notes quote the numbers as printed);
    recovered: accuracy the defense gives back (printed "+x", stored positive);
    tau: the reachability threshold τ(2) = max{⟨W, G(µ)⟩ / W(1/e), 0} (equations (7), (10); L637);
    eps_w: the relative parameter change an attack caused (TGDA in Tables 1 and 5);
    dpa_clean_acc: test accuracy of DPA trained on clean data (%);
    certified_acc: the share of test points DPA certifies at the given ε_d (%);
    grad_lower_bound: inf_t t·l'(t) = −W(1/e) for the logistic loss (Example 2);
    tau_ratio: τ(2)/τ(c) = W((c−1)/e)/W(1/e) for the data set's c classes (Section 5.2);
    tau_coef: 1/W(1/e), the factor in τ ≈ max{3.6 ⟨W, G(µ)⟩, 0} (Section 5.3);
    reached: 1 if GC drives ‖g(χ)‖ to zero (reaches the target), 0 if it stalls (Figure 8).
note
    free text where the paper is ambiguous or inconsistent (e.g. Table 2 prints −22.97 where
    Tables 3 and 8 print −22.79); not a search key.

Searching: a key given as None matches the records that lack it, e.g. ``defense=None`` selects
the undefended GC row among the defended ones.
"""

from __future__ import annotations

import functools
import math
import numbers
from importlib import resources

import yaml

from ..errors import PoisonReachError

__all__ = ["KEYS", "VOCABULARY", "find", "lookup", "parse", "records"]

# The categorical keys and the values they admit.
VOCABULARY: dict[str, tuple[str, ...]] = {
    "dataset": ("mnist", "cifar10", "tinyimagenet", "or2d", "gaussian10", "mnist17", "regression2d", "toy"),
    "model": ("lr", "linreg", "nn", "cnn", "resnet18", "resnet34"),
    "attack": ("gc", "gc-c", "tgda", "gm", "gradpc", "randompc", "labelflip"),
    "target": ("gradpc", "gradpc/2", "tgda", "grid", "2w*", "2w*/1.1", "w*/2"),
    "defense": ("sever", "influence", "maxup", "dpa"),
    "threat": ("add", "replace"),
    "metric": ("clean_acc", "target_acc", "acc_drop", "recovered", "tau", "eps_w", "dpa_clean_acc",
               "certified_acc", "grad_lower_bound", "tau_ratio", "tau_coef", "reached"),
}
TEXT_TABLES = ("sec1", "ex2", "sec5.2", "sec5.3", "c6", "fig1", "fig8")
# The keys that identify a record (what find and lookup search on), in display order.
KEYS = ("table", "dataset", "model", "attack", "target", "defense", "k", "eps_w", "eps_d", "threat", "metric")
_REQUIRED = ("table", "metric", "value")


def _number(what: str, value, *, integer: bool = False) -> float | int:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (integer and not isinstance(value, numbers.Integral)):
        raise PoisonReachError(f"{what} must be a finite {'integer' if integer else 'number'}, got {value!r}")
    return int(value) if integer else float(value)


def _normalise(i: int, raw) -> dict:
    """Record ``i`` of ``raw`` checked against the vocabulary, numbers as float (k as int)."""
    where = f"record {i}"
    if not isinstance(raw, dict):
        raise PoisonReachError(f"{where} must be a mapping of keys to values, got {raw!r}")
    unknown = sorted(set(raw) - set(KEYS) - {"value", "note"})
    if unknown:
        raise PoisonReachError(f"{where} has unknown keys {unknown}: use only {list(KEYS) + ['value', 'note']}")
    missing = [key for key in _REQUIRED if key not in raw]
    if missing:
        raise PoisonReachError(f"{where} ({raw!r}) lacks {missing}: every record needs table, metric and value")
    record = {}
    for key, value in raw.items():
        what = f"{where}: {key}"
        if key in VOCABULARY:
            if value not in VOCABULARY[key]:
                raise PoisonReachError(f"{what} must be one of {list(VOCABULARY[key])}, got {value!r}")
        elif key == "table":
            if not (value in TEXT_TABLES or (isinstance(value, int) and not isinstance(value, bool) and value >= 1)):
                raise PoisonReachError(f"{what} must be a table number >= 1 or one of {list(TEXT_TABLES)}, got {value!r}")
        elif key == "k":
            value = _number(what, value, integer=True)
        elif key == "eps_d" and value == "tau":
            pass
        elif key in ("eps_w", "eps_d", "value"):
            value = _number(what + (" (or 'tau')" if key == "eps_d" else ""), value)
        elif key == "note" and not isinstance(value, str):
            raise PoisonReachError(f"{what} must be text, got {value!r}")
        record[key] = value
    return record


def _identity(record: dict) -> tuple:
    return tuple(record.get(key) for key in KEYS)


def parse(data) -> list[dict]:
    """Validate and normalise a list of records in ``paper.yaml``'s format (see the module docstring).

    Raises PoisonReachError for a key or value outside the vocabulary, a missing table, metric or
    value, or two records with the same keys (one number per key combination).
    """
    if not isinstance(data, list):
        raise PoisonReachError(f"the records must be a list of mappings, got {type(data).__name__}")
    result, seen = [], {}
    for i, raw in enumerate(data):
        record = _normalise(i, raw)
        identity = _identity(record)
        if identity in seen:
            raise PoisonReachError(
                f"records {seen[identity]} and {i} have the same keys {_describe(record)}: "
                "add the key that tells them apart, or remove the duplicate"
            )
        seen[identity] = i
        result.append(record)
    return result


@functools.cache
def _load() -> tuple[dict, ...]:
    text = resources.files(__package__).joinpath("paper.yaml").read_text(encoding="utf-8")
    return tuple(parse(yaml.safe_load(text)))


def records() -> list[dict]:
    """All records of ``paper.yaml`` (loaded once; each call returns fresh copies)."""
    return [dict(record) for record in _load()]


def _check_keys(keys: dict) -> None:
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise PoisonReachError(f"unknown keys {unknown}: search on {list(KEYS)}")


def find(**keys) -> list[dict]:
    """The records whose value for every given key equals the given one (None: the key is absent)."""
    _check_keys(keys)
    return [dict(r) for r in _load() if all(r.get(key) == value for key, value in keys.items())]


def _describe(record: dict) -> str:
    return ", ".join(f"{key}={record[key]!r}" for key in KEYS if key in record)


def lookup(table: int | str, **keys) -> float | None:
    """The value of the one record of ``table`` matching all ``keys``; None if no record matches.

    Raises PoisonReachError when several match, listing them and the keys that tell them apart.
    """
    found = find(table=table, **keys)
    if not found:
        return None
    if len(found) > 1:
        differ = [key for key in KEYS if len({r.get(key) for r in found}) > 1]
        listing = "\n  ".join(f"{_describe(r)}: {r['value']}" for r in found)
        raise PoisonReachError(
            f"lookup({table!r}, {_describe(keys)}) matches {len(found)} records; single one out by "
            f"giving the keys in which they differ ({', '.join(differ)}):\n  {listing}"
        )
    return found[0]["value"]
