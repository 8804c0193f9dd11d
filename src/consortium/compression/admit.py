"""The server's check of a compressed result as it arrives: a malformed one is rejected unused."""

from __future__ import annotations

from typing import Any

from consortium.compression.encoded import MalformedUpdate
from consortium.messages import Result
from consortium.types import Layout

__all__ = ["admit"]


def admit(result: Result, stages: Any, layout: Layout) -> Result:
    """``result``, or a rejected one (no update, ``error = "rejected: <why>"``) when its update's
    encoding does not decode for this run (wrong kind, indices out of range or repeated, a
    length that disagrees with its header, codes out of range ...), or it carries an encoding
    in a run that does not compress. A deployed server rejects a result that fails
    validation the same way (``deploy/hub.py``): the round goes on without it, the model never
    sees it."""
    from consortium.compression.stage import Compress

    update = result.update
    if update is None:
        return result
    stage = next((s for s in stages if isinstance(s, Compress)), None)
    try:
        if stage is not None:
            stage.decoded(update, layout)
        elif update.encoded is not None:
            raise MalformedUpdate(
                f"client {update.client_id!r} sent a compressed update; this run does not "
                "compress (compression.uplink = \"none\")"
            )
    except MalformedUpdate as exc:
        return Result(result.round, result.client_id, None, error=f"rejected: {exc}")
    return result
