"""`import consortium` stays light, and the public API is sorted and complete."""

from __future__ import annotations

import subprocess
import sys

import consortium


def test_import_does_not_load_heavy_optional_modules() -> None:
    code = (
        "import sys, consortium; "
        "print(','.join(m for m in ('grpc', 'ray', 'matplotlib', 'opacus', 'mlflow', 'tensorboard') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_sorted_and_resolvable() -> None:
    assert consortium.__all__ == sorted(consortium.__all__)
    for name in consortium.__all__:
        assert hasattr(consortium, name), name
