"""The Executor contract: where the clients of a round run."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from consortium.client.app import SiteClient
from consortium.messages import EvaluationResult, Result, Task

__all__ = ["Executor"]


@runtime_checkable
class Executor(Protocol):
    """Runs a round's tasks and yields results as they complete.

    ``fit`` receives every task of the round at once, so an implementation may batch them
    (vectorised), scatter them (Ray) or send them over the network (gRPC), and yields results
    in any order as they arrive. Implementations in this package: sequential; later:
    vectorised, Ray, remote.
    """

    name: str

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]) -> Iterator[Result]: ...

    def evaluate(
        self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]
    ) -> Iterator[EvaluationResult]: ...

    def close(self) -> None: ...
