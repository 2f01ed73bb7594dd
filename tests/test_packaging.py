"""What a plain ``pip install`` ships: the package's ``__init__`` and version, the paper's numbers
and every sweep file as package data, found by name (``poisonreach sweep table2-mnist``) from any
folder, while a path names the user's own file.

The wheel is built from a copy of the checkout (``pip wheel --no-deps --no-build-isolation``, the
installed setuptools, offline; about 2 s) and its sweep files are then found from the unpacked
wheel alone, in a fresh interpreter.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import yaml

import poisonreach
from poisonreach.cli import main
from poisonreach.errors import PoisonReachError
from poisonreach.experiments.sweep_file import load_sweep, shipped_sweeps, sweep_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "src" / "poisonreach" / "experiments" / "configs"


def test_the_package_has_an_init_with_the_version():
    assert Path(poisonreach.__file__).name == "__init__.py"
    assert poisonreach.__version__.count(".") == 2


def test_the_shipped_names_are_the_package_data_files_and_each_is_documented():
    names = shipped_sweeps()
    assert names == sorted(p.stem for p in CONFIGS.glob("*.yaml")) and "table2-mnist" in names
    readme = (CONFIGS / "README.md").read_text(encoding="utf-8")
    assert [n for n in names if f"`{n}`" not in readme] == []  # every shipped sweep has its row


def test_a_name_finds_the_shipped_file_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    shipped = resources.files("poisonreach.experiments").joinpath("configs", "table2-mnist.yaml")
    assert sweep_path("table2-mnist") == shipped and shipped.is_file()
    assert load_sweep("table2-mnist").name == "table2-mnist"
    assert main(["sweep", "table2-mnist", "--dry-run"]) == 0
    assert "sweep table2-mnist" in capsys.readouterr().out


def test_a_path_names_the_users_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "table2-mnist.yaml").write_text(yaml.safe_dump({"name": "mine", "run": {"eps_d": [0.1]}}))
    assert load_sweep("table2-mnist.yaml", lookup=None).name == "mine"  # a suffix: the file here
    assert load_sweep("./table2-mnist.yaml", lookup=None).name == "mine"
    assert load_sweep(tmp_path / "table2-mnist.yaml", lookup=None).name == "mine"
    assert load_sweep("table2-mnist").name == "table2-mnist"  # a bare name: the shipped one


@pytest.mark.parametrize("given, words", [
    ("table2-mnits", ["no shipped sweep is named 'table2-mnits'", "table2-mnist", "smoke", "path of a YAML file"]),
    ("experiments/table2-mnist.yaml", ["sweep file experiments/table2-mnist.yaml does not exist", "table2-mnist"]),
])
def test_a_wrong_name_or_path_is_one_line_listing_the_shipped_names(given, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PoisonReachError):
        sweep_path(given)
    assert main(["sweep", given]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    for word in words:
        assert word in lines[0]


def test_a_wheel_ships_every_sweep_file_and_the_version(tmp_path):
    pytest.importorskip("setuptools")
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, checkout / name)
    shutil.copytree(ROOT / "src", checkout / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheel")],
                           cwd=checkout, capture_output=True, text=True)
    if built.returncode != 0 and "No module named pip" in built.stderr:
        pytest.skip("pip is not installed in this interpreter")
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp_path / "wheel").glob("poisonreach-*.whl")
    assert wheel.name.startswith(f"poisonreach-{poisonreach.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        files = set(z.namelist())
        z.extractall(tmp_path / "installed")
    assert {f"poisonreach/experiments/configs/{name}.yaml" for name in shipped_sweeps()} <= files
    assert {"poisonreach/__init__.py", "poisonreach/experiments/paper.yaml"} <= files
    # the unpacked wheel alone (first on the path) finds a shipped sweep by name, from another folder
    found = subprocess.run([sys.executable, "-c", "from poisonreach.experiments.sweep_file import sweep_path; print(sweep_path('smoke'))"],
                           cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed"), "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == tmp_path / "installed" / "poisonreach" / "experiments" / "configs" / "smoke.yaml"
