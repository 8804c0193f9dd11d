"""`consortium --help` and `--version` load no torch (issue 20: the command answers at once).

Timings are measured in benchmarks/cli_startup.py, not asserted here: these tests check the
cause of a slow start, the modules a fresh interpreter imports.
"""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version

import pytest

from consortium.cli import main

HEAVY = ("torch", "numpy", "grpc", "matplotlib", "rich", "pyarrow")


def _loaded_after(code: str) -> set[str]:
    probe = (f"import sys\n{code}\n"
             f"print('loaded:' + ','.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("loaded:"), out.stdout
    return set(filter(None, last.removeprefix("loaded:").split(",")))


@pytest.mark.parametrize("argv", [[], ["run"], ["server", "--insecure"], ["datasets"]])
def test_building_the_parser_imports_no_torch(argv: list[str]) -> None:
    loaded = _loaded_after(f"import consortium.cli as c\nc._parser({argv!r})")
    assert loaded == set(), f"building the parser imported {sorted(loaded)}"


def test_import_consortium_is_light_and_its_api_loads_on_use() -> None:
    assert _loaded_after("import consortium") == set()
    assert "torch" in _loaded_after("import consortium\nconsortium.simulate")


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["--version"]])
def test_help_and_version_exit_without_torch(argv: list[str]) -> None:
    code = f"import consortium.cli as c\ntry:\n    c.main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0, e.code"
    assert _loaded_after(code) == set()


def test_version_is_the_installed_package_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"consortium {version('consortium')}"


def test_a_lazily_registered_command_is_listed_and_parses_its_own_arguments(capsys) -> None:
    from consortium.cli import _parser

    with pytest.raises(SystemExit):
        _parser(["--help"]).parse_args(["--help"])
    assert "contribution" in capsys.readouterr().out
    args = _parser(["contribution", "RUN", "--json"]).parse_args(["contribution", "RUN", "--json"])
    assert (args.command, args.run_dir, args.json) == ("contribution", "RUN", True)
