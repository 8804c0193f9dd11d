"""Thread targets for tests that run a real ``serve()`` and its sites in one process.

Every in-process gRPC test starts the server on a thread that hands its port over a queue and
keeps what ``serve()`` returned — or the exception it raised — for the test to check, and runs
each site the same way. These two helpers are that start-up, written once.
"""

from __future__ import annotations

import queue
from collections.abc import Callable
from typing import Any


def serve_into(
    out: dict[str, Any], ports: queue.Queue[int], /, **kwargs: Any
) -> Callable[[], None]:
    """A thread target running ``serve(None, **kwargs)`` on ``127.0.0.1:0`` (unless ``listen``
    is given), without progress bars, putting its port on ``ports``; ``out["served"]`` gets the
    result, or the exception (and ``ports`` a 0, so the test's wait ends). ``out`` and ``ports``
    are positional only: ``serve()`` takes an ``out`` of its own (the run directory)."""
    from consortium.deploy import server as server_module

    kwargs.setdefault("listen", "127.0.0.1:0")
    kwargs.setdefault("progress", False)

    def serve() -> None:
        try:
            out["served"] = server_module.serve(None, on_listening=ports.put, **kwargs)
        except BaseException as exc:
            out["served"] = exc
            ports.put(0)

    return serve


def result_into(results: dict[str, Any], name: str, call: Callable[[], Any]) -> Callable[[], None]:
    """A thread target storing ``call()``'s result, or the exception it raised, as ``results[name]``."""

    def run() -> None:
        try:
            results[name] = call()
        except BaseException as exc:
            results[name] = exc

    return run
