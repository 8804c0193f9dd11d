"""The sequential executor: every client in this process, one after another."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from consortium.client.app import SiteClient
from consortium.executors.base import exchange_in_process
from consortium.messages import EvaluationResult, Result, Task

__all__ = ["SequentialExecutor"]


class SequentialExecutor:
    """Runs tasks in order in this process, reusing one scratch model per model factory.

    Args:
        device: where the scratch models live (``executor.device``); each batch goes there and
            the update comes back to the CPU (:mod:`consortium.executors.device`).
    """

    name = "sequential"

    def __init__(self, *, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._scratch: dict[int, torch.nn.Module] = {}

    def _module(self, client: SiteClient) -> torch.nn.Module:
        key = id(client.model_factory)
        if key not in self._scratch:
            self._scratch[key] = client.model_factory().to(self.device)
        return self._scratch[key]

    def fit(self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]) -> Iterator[Result]:
        for task in tasks:
            client = clients[task.client_id]
            yield client.fit(task, module=self._module(client))

    def evaluate(
        self, tasks: Sequence[Task], clients: Mapping[str, SiteClient]
    ) -> Iterator[EvaluationResult]:
        for task in tasks:
            client = clients[task.client_id]
            yield client.evaluate(task, module=self._module(client))

    def exchange(
        self, stage_name: str, phase: str, messages: Mapping[str, Any],
        clients: Mapping[str, SiteClient], *, round: int,
    ) -> Iterator[tuple[str, Any]]:
        """Interactive phases run in this process, where the clients' sessions are."""
        return exchange_in_process(stage_name, phase, messages, clients, round=round)

    def close(self) -> None:
        self._scratch.clear()
