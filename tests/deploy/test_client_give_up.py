"""A client whose server never answers gives up after a documented default, with one line."""

from __future__ import annotations

import inspect
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("grpc")

from consortium.cli import _parser, main
from consortium.deploy.client import SiteRunner
from consortium.errors import ConsortiumError


def _closed_port() -> int:
    """A 127.0.0.1 port nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _csv(path: Path) -> Path:
    path.write_text("f1,f2,label\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(20)))
    return path


def test_the_default_is_ten_minutes_in_the_runner_and_on_the_command_line() -> None:
    default = inspect.signature(SiteRunner).parameters["give_up_after_s"].default
    args = _parser().parse_args(["client", "--server", "h:1", "--site", "a", "--data", "x"])
    assert default == args.give_up_after == 600.0


def test_a_client_pointed_at_a_closed_port_gives_up(tmp_path) -> None:
    port = _closed_port()
    runner = SiteRunner(f"127.0.0.1:{port}", site="a", data=_csv(tmp_path / "a.csv"), certs=None,
                        give_up_after_s=1.0, max_backoff_s=0.2)
    started = time.monotonic()
    with pytest.raises(ConsortiumError, match=rf"no connection to 127.0.0.1:{port} for 1 s.*gave up"):
        runner.run()
    assert time.monotonic() - started < 30  # it stopped (the limit, not a hang)


def test_the_command_exits_2_with_one_line(tmp_path, capsys) -> None:
    port = _closed_port()
    code = main(["client", "--server", f"127.0.0.1:{port}", "--site", "a", "--insecure",
                 "--data", str(_csv(tmp_path / "a.csv")), "--give-up-after", "0.5"])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("consortium: error")]
    assert len(lines) == 1 and "--give-up-after" in lines[0] and "Traceback" not in err
