"""A model module beside the experiment file imports without PYTHONPATH; one that fails to
import is one line with the cause (exit 2)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import consortium.config as config
from consortium.cli import main

MODEL = """from torch import nn


def build(input_shape, num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[-1], num_classes))
"""


def _experiment(folder: Path, module: str, source: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{module}.py").write_text(source)
    exp = folder / "exp.toml"
    exp.write_text(f'rounds = 1\n[model]\nname = "{module}:build"\n[evaluation]\nbaselines = []\n')
    return exp


@pytest.fixture
def clean_import_state(monkeypatch):
    """What one import of a user's module leaves in this process, undone after the test."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(config, "_EXPERIMENT_FOLDERS", [])
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("usermodel_"):
            del sys.modules[name]


def test_the_console_command_imports_a_module_beside_the_experiment(tmp_path) -> None:
    exp = _experiment(tmp_path / "project", "tinynet", MODEL)
    elsewhere = tmp_path / "elsewhere"  # neither the experiment's folder nor on PYTHONPATH
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "consortium.cli", "run", str(exp), "--out", str(tmp_path / "run"),
         "--no-progress", "--no-report"],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.parametrize(("source", "cause"), [
    ("import torch\nraise RuntimeError('weights file missing\\nmore')\n",
     "RuntimeError: weights file missing (FILE, line 2)"),
    ("def build(:\n", "SyntaxError: invalid syntax (FILE, line 1)"),
    ("import not_installed_anywhere_xyz\n",
     "ModuleNotFoundError: No module named 'not_installed_anywhere_xyz' (FILE, line 1)"),
])
def test_a_module_that_fails_to_import_is_one_line(tmp_path, capsys, clean_import_state,
                                                   source, cause) -> None:
    module = f"usermodel_{uuid.uuid4().hex[:8]}"
    exp = _experiment(tmp_path / "project", module, source)
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"importing {module!r} for model '{module}:build' failed: " in err
    assert cause.replace("FILE", str(tmp_path / "project" / f"{module}.py")) in err


def test_a_missing_module_names_where_it_was_looked_for(tmp_path, capsys, clean_import_state) -> None:
    module = f"usermodel_{uuid.uuid4().hex[:8]}"
    exp = _experiment(tmp_path / "project", "other", MODEL)
    exp.write_text(exp.read_text().replace("other:build", f"{module}:build"))
    assert main(["run", str(exp), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"no module {module!r} on the Python path, beside the experiment file" in err
    assert str(tmp_path / "project") in err and f"put {module}.py beside the experiment" in err
