"""`consortium provision` and `consortium audit verify` from the command line."""

from __future__ import annotations

import json

import pytest

from consortium.cli import main

pytest.importorskip("cryptography", reason="provisioning needs: pip install 'consortium[deploy]'")


def test_provision_writes_one_folder_per_site_and_revokes(tmp_path, capsys) -> None:
    out = tmp_path / "certs"
    assert main(["provision", "--sites", "cleveland,hungary", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--certs" in printed and "hand over" in printed
    site = out / "sites" / "hungary"
    assert sorted(p.name for p in site.iterdir()) == [".gitignore", "ca.pem", "client.key", "client.pem", "token"]
    assert not (site / "ca.key").exists()  # a site's folder holds only its own secrets
    assert main(["provision", "--sites", "x", "--out", str(out)]) == 2  # refuses to overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["provision", "--out", str(out), "--revoke", "hungary"]) == 0
    registry = json.loads((out / "server" / "sites.json").read_text())
    assert registry["sites"]["hungary"]["revoked"] and not registry["sites"]["cleveland"]["revoked"]


def test_audit_verify_passes_a_clean_log_and_flags_an_edited_one(tmp_path, capsys) -> None:
    from consortium.deploy.audit import AuditLog

    with AuditLog(tmp_path / "audit.jsonl") as log:
        log.append("task", site="a", round=1, task_id="t1")
        log.append("result", site="a", round=1, task_id="t1", norm=0.5)
    assert main(["audit", "verify", str(tmp_path)]) == 0
    lines = (tmp_path / "audit.jsonl").read_text().splitlines()
    lines[1] = lines[1].replace("0.5", "0.25")
    (tmp_path / "audit.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["audit", "verify", str(tmp_path)]) == 1
    assert "line 2" in capsys.readouterr().out


def test_the_server_keeps_freed_megabyte_buffers_on_glibc() -> None:
    """tune_malloc applies on glibc Linux and is a no-op elsewhere (run in a child process:
    it changes the allocator of the process that calls it)."""
    import os
    import platform
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[2] / "src"
    out = subprocess.run(
        [sys.executable, "-c", "from consortium.deploy.server import tune_malloc; print(tune_malloc())"],
        capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": str(src)},
    ).stdout.strip()
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out == str(glibc)


def test_the_installed_version_is_known_to_sites_and_server() -> None:
    from importlib.metadata import version

    from consortium.deploy import package_version

    assert package_version() == version("consortium")  # what Register compares on both sides
