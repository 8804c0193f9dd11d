"""How ``consortium server`` starts: it waits for the federation it was provisioned for.

Issue 14, point 4: with ``--min-sites`` defaulting to 1, round 1 started with the first site
that connected and the others were refused for the whole run.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import pytest

from consortium.config import load_config
from consortium.deploy.hub import Hub, SiteInfo, SitesMissingError
from tests.deploy.test_e2e import (
    EXPERIMENT,
    SITES,
    _cli,
    _client,
    _free_port,
    _records,
    _write_sites,
)

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

INFO = SiteInfo((3,), 2, 10, 5)


def test_the_wait_announces_each_site_as_it_is_ready_and_ends_when_all_named_are(hub: Hub) -> None:
    lines: list[tuple[str, str, int, int]] = []

    def arrive() -> None:
        for site in ("b", "a"):
            time.sleep(0.05)
            hub.describe(hub.register(site), INFO)

    threading.Thread(target=arrive).start()
    ready = hub.wait_for_sites(["a", "b"], 5.0, on_ready=lambda *line: lines.append(line))
    assert sorted(ready) == ["a", "b"]
    assert [line for line in lines if line[1] == "ready"] == [("b", "ready", 1, 2),
                                                              ("a", "ready", 2, 2)]
    assert [line[0] for line in lines if line[1] == "connected"] == ["b", "a"]


def test_the_register_timeout_names_who_never_came_and_who_did_not_describe(hub: Hub) -> None:
    hub.describe(hub.register("a"), INFO)
    hub.register("b")  # connected, never described its data
    with pytest.raises(SitesMissingError) as caught:
        hub.wait_for_sites(["a", "b", "c"], 0.2)
    message = str(caught.value)
    assert "ready: ['a']; missing: ['b', 'c']" in message
    assert "never connected: ['c']" in message
    assert "connected but did not describe their data: ['b']" in message
    assert "--min-sites" in message


def test_a_site_expelled_while_the_server_waits_is_not_waited_for(hub: Hub) -> None:
    hub.describe(hub.register("a"), INFO)
    hub.expel("c", "site 'c' was revoked during the run")
    assert sorted(hub.wait_for_sites(["a", "c"], 1.0)) == ["a"]


def test_whom_the_server_waits_for(tmp_path: Path) -> None:
    from consortium.deploy.provision import provision, revoke
    from consortium.deploy.server import sites_to_wait_for
    from consortium.errors import ConfigError

    provision(["north", "south", "east", "west"], tmp_path / "certs")
    revoke(tmp_path / "certs", "west")
    certs = tmp_path / "certs" / "server"
    cfg = load_config(None, ["sampling.clients_per_round=3"])
    # provisioned and not revoked, by name
    assert sites_to_wait_for(cfg, min_sites=None, certs=certs) == ["east", "north", "south"]
    # a resumed run: the sites it started with, less those revoked since
    assert sites_to_wait_for(cfg, min_sites=None, certs=certs,
                             roster={"north": {}, "west": {}}) == ["north"]
    # --insecure knows no names: the experiment's cohort
    assert sites_to_wait_for(cfg, min_sites=None, certs=None) == 3
    assert sites_to_wait_for(cfg, min_sites=None, certs=None, roster={"b": {}, "a": {}}) == ["a", "b"]
    # --min-sites overrides everything
    assert sites_to_wait_for(cfg, min_sites=1, certs=certs) == 1
    with pytest.raises(ConfigError, match="--min-sites 0"):
        sites_to_wait_for(cfg, min_sites=0, certs=certs)


def test_three_sites_started_four_seconds_apart_without_min_sites_all_train_in_round_1(
    tmp_path: Path,
) -> None:
    """The issue's acceptance: no --min-sites, sites 4 s apart, every one in round 1."""
    from consortium.deploy.provision import provision

    _write_sites(tmp_path)
    (tmp_path / "exp.toml").write_text(EXPERIMENT.replace("rounds = 4", "rounds = 2"))
    provision(SITES, tmp_path / "certs")
    port = _free_port()
    server = _cli(
        "server", str(tmp_path / "exp.toml"), "--listen", f"127.0.0.1:{port}", "--certs",
        str(tmp_path / "certs" / "server"), "--out", str(tmp_path / "run"),
        "--register-timeout", "120", "--round-timeout", "60", "--no-progress",
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
    )
    clients = []
    try:
        for i, site in enumerate(SITES):
            if i:
                time.sleep(4)
            clients.append(_client(tmp_path, port, site))
        _, err = server.communicate(timeout=240)
        assert server.returncode == 0, err
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
    records = _records(tmp_path / "run")
    assert records[0]["clients"] == 3 and not records[0].get("failed"), records[0]
    assert "the 3 provisioned sites ['east', 'north', 'south']" in err
    connected = [line for line in err.splitlines() if " connected (" in line]
    assert sorted(line.split("'")[1] for line in connected) == sorted(SITES)
    assert [line.split("connected ")[1] for line in connected] == ["(1 of 3)", "(2 of 3)",
                                                                   "(3 of 3)"]
    ready = [line for line in err.splitlines() if " ready (" in line]
    assert sorted(line.split("'")[1] for line in ready) == sorted(SITES)
