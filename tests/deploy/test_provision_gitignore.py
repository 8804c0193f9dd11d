"""``consortium provision`` keeps keys and tokens out of version control: a ``.gitignore`` in
the output folder and in every folder handed over."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.importorskip("cryptography")

from consortium.deploy.provision import GITIGNORE, add_site, provision


def test_every_credentials_folder_carries_its_gitignore(tmp_path) -> None:
    made = provision(["east", "west"], tmp_path / "certs")
    add_site(made.root, "north")
    folders = [made.root, made.server_dir, *made.site_dirs.values(), made.root / "sites" / "north"]
    for folder in folders:
        assert (folder / ".gitignore").read_text() == GITIGNORE
    assert GITIGNORE.splitlines()[-1] == "*"


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_add_in_a_project_holding_certs_adds_no_credential(tmp_path) -> None:
    project = tmp_path / "project"  # a throwaway repository of the test's own
    project.mkdir()
    (project / "experiment.toml").write_text("rounds = 1\n")
    provision(["east"], project / "certs")
    shutil.copytree(project / "certs" / "sites" / "east", project / "east-copy")  # handed over
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    listed = subprocess.run(["git", "add", "--dry-run", "."], cwd=project, check=True,
                            capture_output=True, text=True).stdout
    assert "experiment.toml" in listed
    assert "certs/" not in listed and "east-copy/" not in listed


def test_a_users_own_gitignore_is_kept_on_overwrite(tmp_path) -> None:
    out = tmp_path / "certs"
    out.mkdir()
    (out / ".gitignore").write_text("*.key\n")
    provision(["east"], out, overwrite=True)
    assert (out / ".gitignore").read_text() == "*.key\n"
    provision(["east"], tmp_path / "fresh")
    provision(["east"], tmp_path / "fresh", overwrite=True)  # ours is replaced by ours
    assert (tmp_path / "fresh" / ".gitignore").read_text() == GITIGNORE
