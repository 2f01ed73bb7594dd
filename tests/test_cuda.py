"""GPU readiness: every attack, defense and training path runs with ``--device cuda`` unchanged.

Marked ``cuda``; these tests skip on a machine without a CUDA GPU (this project's CI has none), and
run with ``pytest -m cuda`` where there is one. Two GPUs also run the data-parallel job on NCCL.
"""

from __future__ import annotations

import json

import pytest
import torch

from poisonreach.attacks import ATTACKS
from poisonreach.cli import main
from poisonreach.defenses import DEFENSES

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = ["--train-size", "300", "--train-epochs", "2", "--eps-w", "0.3", "--eps-d", "0.1", "--quiet"]
# a few steps each: the point is that the device reaches every tensor, not the attack's strength
FEW = {"gc": ["iterations=2"], "gc-pgd": ["epochs=2"], "gc-fw": ["iterations=2"], "gc-official": ["epochs=2"], "gm": ["steps=2"],
       "tgda": ["epochs=1"], "labelflip": [], "construct": ["iterations=2"]}


def _options(attack: str) -> list[str]:
    return [arg for option in FEW.get(attack, []) for arg in ("--attack-option", option)]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_attack_runs_on_cuda(attack, tmp_path):
    out = tmp_path / attack
    assert main(["run", *SMALL, "--attack", attack, *_options(attack), "--device", "cuda", "--out", str(out)]) == 0
    assert json.loads((out / "metrics.json").read_text())["results"]


@pytest.fixture(scope="module")
def cuda_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cuda") / "run"
    assert main(["run", *SMALL, "--attack", "gc", *_options("gc"), "--device", "cuda", "--out", str(out)]) == 0
    return out


DEFENSE_OPTIONS = {"dpa": ["--option", "num_partitions=4"]}


@pytest.mark.parametrize("defense", sorted(DEFENSES))
def test_every_defense_runs_on_cuda(defense, cuda_run):
    options = DEFENSE_OPTIONS.get(defense, [])
    assert main(["defend", "--run", str(cuda_run), "--defense", defense, *options, "--device", "cuda", "--quiet"]) == 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_two_gpus_run_the_one_gpu_run(tmp_path):
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        assert main(["run", *SMALL, "--protocol", "converged", "--attack-option", "chunk_size=16", "--device", "cuda",
                     "--nproc", str(nproc), "--out", str(out)]) == 0
        runs[nproc] = json.loads((out / "metrics.json").read_text())["results"][0]
    assert runs[2]["poisoned_acc"] == runs[1]["poisoned_acc"]
