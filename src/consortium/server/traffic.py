"""What a round's interactive messages weigh: the bytes behind ``bytes_up`` and ``bytes_down``.

A task and a result carry tensors, and :attr:`Task.nbytes` / :attr:`Result.nbytes` count
them. Secure aggregation moves its values in protocol phases instead (public keys, encrypted
shares, the masked vector, unmask shares), through ``RoundContext.exchange``; under it a
result carries no values at all, so without this module ``bytes_up`` read 0 (issue 14).
:class:`ExchangeTraffic` wraps the round's exchange and adds up every message the server
sends (down) and every reply it receives (up), in simulation and in a deployment alike.

The size is the message's content as the wire format carries it (``deploy/codec.py``): raw
tensor bytes at their dtype (a message whose wire form is not its dtype says so with a
``wire_nbytes()`` method: a masked vector travels as uint32, 4 bytes a coordinate), byte strings
and UTF-8 text at their length, integers at their minimal big-endian length (a Shamir share's
521-bit value: 66 bytes), floats at 8 bytes, plus the envelope's stage, phase and client
names and its round. Protobuf's own framing (a tag and a length, 2 to 6 bytes a field) is
left out: for the phases that matter (a masked vector of d coordinates) it is below 0.1 %
(tests/server/test_traffic.py compares with the real encoding).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from consortium.aggregation.base import Exchange

__all__ = ["ExchangeTraffic", "payload_nbytes"]

_ROUND_BYTES = 8


def payload_nbytes(obj: Any) -> int:
    """The bytes ``obj`` (a protocol message, or any field of one) fills on the wire,
    without protobuf framing (see the module docstring).

    Raises:
        TypeError: a value that no wire message can hold.
    """
    if obj is None:
        return 0
    if isinstance(obj, bool):
        return 1
    if isinstance(obj, int):
        return max(1, (obj.bit_length() + 7) // 8)
    if isinstance(obj, float):
        return 8
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return len(obj)
    if isinstance(obj, str):
        return len(obj.encode("utf-8"))
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(payload_nbytes(k) + payload_nbytes(v) for k, v in obj.items())
    if isinstance(obj, (tuple, list, set, frozenset)):
        return sum(payload_nbytes(v) for v in obj)
    wire_nbytes = getattr(obj, "wire_nbytes", None)
    if callable(wire_nbytes) and not isinstance(obj, type):  # its wire form is not its dtype
        return int(wire_nbytes())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(payload_nbytes(getattr(obj, f.name)) for f in dataclasses.fields(obj))
    raise TypeError(f"cannot size a {type(obj).__name__} as a wire message; expected bytes, "
                    "text, numbers, tensors, or dataclasses, mappings and sequences of them")


class ExchangeTraffic:
    """Counts the bytes one round's exchange moves: ``down`` (server to clients) and ``up``.

    Wrap the exchange the stages see (outside any simulated dropouts: the server sends each
    phase to every client it still counts on, whether or not the client then answers).
    """

    def __init__(self) -> None:
        self.up = 0
        self.down = 0

    def wrap(self, exchange: Exchange) -> Exchange:
        """``exchange``, counting every message handed to it and every reply it yields."""

        def counted(stage: str, phase: str, messages: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
            envelope = len(stage.encode()) + len(phase.encode()) + _ROUND_BYTES
            self.down += sum(envelope + payload_nbytes(cid) + payload_nbytes(m)
                             for cid, m in messages.items())
            for cid, reply in exchange(stage, phase, messages):
                self.up += envelope + payload_nbytes(cid) + payload_nbytes(reply)
                yield cid, reply

        return counted
