"""Snapshot of short Gradient Canceling runs: PGD (Algorithm 1) and Frank–Wolfe (appendix B), on
``digits`` and ``or2d``.

Refactoring GC must not change a single bit of what it returns: each case's poisons, labels and
source indices (SHA-256 of their bytes) and every history entry (as ``float.hex``) are compared with
``snapshots/gc.json``, written once by ``python tests/test_gc_snapshot.py`` from the code before
the refactoring. A change that alters any number fails here; regenerate the file only for a change
that is meant to alter GC's results, and say so in its commit.

Bit identity holds on one machine and one set of libraries only: float32 kernels round differently on
another CPU (the file written on an earlier machine failed 9 of 10 cases here, the code unchanged). So
the file records where it was written (``machine``: torch and numpy versions, torch's CPU capability,
the CPU model and a digest of its feature flags), and elsewhere the comparison is skipped with the
command that rewrites it there.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from poisonreach import data, models, training
from poisonreach.attacks import FrankWolfeCanceling, GradientCanceling
from poisonreach.targets import FixedTarget, GradPC

SNAPSHOT = Path(__file__).with_name("snapshots") / "gc.json"

# case name -> (data set, eps_d, attack options); the attack's seed is 0 in every case
CASES = {
    "digits-pgd": ("digits", 0.1, {"epochs": 12}),
    "digits-pgd-blocks": ("digits", 0.1, {"epochs": 6, "block_size": 8}),
    "digits-pgd-labels": ("digits", 0.1, {"epochs": 8, "optimize_labels": True}),
    "digits-pgd-paper": ("digits", 0.1, {"preset": "paper", "epochs": 8}),
    "digits-pgd-unboxed-last": ("digits", 0.1, {"epochs": 8, "box": None, "parameters": "last"}),
    "digits-fw": ("digits", 0.1, {"solver": "frank-wolfe", "epochs": 10}),
    "digits-fw-open-loop": ("digits", 0.1, {"solver": "frank-wolfe", "epochs": 6, "fw_step": "open-loop"}),
    "or2d-pgd": ("or2d", 0.5, {"epochs": 20}),
    "or2d-pgd-labels": ("or2d", 0.5, {"epochs": 10, "optimize_labels": True}),
    "or2d-fw": ("or2d", 0.5, {"solver": "frank-wolfe", "epochs": 15}),
}


def make_attack(eps_d: float, options: dict):
    """The attack of a case, in the API of the day (the snapshot, not this function, is the contract)."""
    options = dict(options)
    if options.pop("solver", "pgd") == "frank-wolfe":
        renamed = {"epochs": "iterations", "fw_step": "step"}
        return FrankWolfeCanceling(eps_d, **{renamed[k]: v for k, v in options.items()}, progress=False)
    preset = options.pop("preset", None)
    return GradientCanceling(eps_d, **{**GradientCanceling.presets.get(preset, {}), **options}, progress=False)


def targets() -> dict:
    """The clean data and the target of each data set: a GradPC target on a 300-image digits subset,
    the 0 %-accuracy target w = (−1, −1), b = 0.5 of Figure 1 on the OR data."""
    out = {}
    s = data.load("digits", seed=0).subset(300, seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.train(clean, s.x_train, s.y_train, epochs=3, batch_size=16, seed=0, progress=False)
    out["digits"] = (s, GradPC(0.5, progress=False).generate(clean, s.x_train, s.y_train))
    s = data.load("or2d", seed=0)
    clean = models.create("lr", s.input_shape, s.num_classes, mean=s.mean, std=s.std, seed=0)
    training.train(clean, s.x_train, s.y_train, epochs=3, batch_size=16, seed=0, progress=False)
    out["or2d"] = (s, FixedTarget(weight=[[-1.0, -1.0]], bias=[0.5]).generate(clean))
    return out


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()


def fingerprint(result) -> dict:
    return {
        "x": digest(result.x),
        "y": digest(result.y),
        "source_indices": digest(result.source_indices),
        "y_dtype": str(result.y.dtype),
        "shape": list(result.x.shape),
        "history": [float(h).hex() for h in result.grad_norm_history],
    }


def compute(name: str, cache: dict) -> dict:
    dataset, eps_d, options = CASES[name]
    s, target = cache[dataset]
    return fingerprint(make_attack(eps_d, options).poison(target, s.x_train, s.y_train))


@pytest.fixture(scope="module")
def cache():
    return targets()


def machine() -> dict:
    """What float32 rounding depends on besides the code."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    first = lambda key: next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "unknown")  # noqa: E731
    return {"torch": torch.__version__, "numpy": np.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu": first("model name"), "cpu_flags": hashlib.sha256(first("flags").encode()).hexdigest()[:16]}


@pytest.mark.parametrize("name", sorted(CASES))
def test_gc_results_are_bit_identical_to_the_snapshot(name, cache):
    snapshot = json.loads(SNAPSHOT.read_text())
    if snapshot["machine"] != machine():
        pytest.skip(f"the snapshot was written on {snapshot['machine']}, this is {machine()}: bit identity holds on one machine; "
                    "run `python tests/test_gc_snapshot.py` here (from the code before a refactoring) to compare here")
    assert compute(name, cache) == snapshot["cases"][name]


if __name__ == "__main__":
    torch.set_num_threads(1)
    made = targets()
    cases = {name: compute(name, made) for name in sorted(CASES)}
    SNAPSHOT.write_text(json.dumps({"machine": machine(), "cases": cases}, indent=1) + "\n")
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
