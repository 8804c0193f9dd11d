"""Per-client state that persists across rounds (SCAFFOLD's c_i, personal models, error feedback)."""

from __future__ import annotations

import torch

__all__ = ["ClientStateStore"]


class ClientStateStore:
    """Client id → named tensors. Owned by the client side; in simulation it is checkpointed
    with the run, in deployment each site keeps its own."""

    def __init__(self) -> None:
        self._states: dict[str, dict[str, torch.Tensor]] = {}

    def get(self, client_id: str) -> dict[str, torch.Tensor]:
        """The (mutable) state of ``client_id``, created empty on first use."""
        return self._states.setdefault(client_id, {})

    def peek(self, client_id: str) -> dict[str, torch.Tensor]:
        """The state of ``client_id`` to read, without creating it (empty if it has none)."""
        return self._states.get(client_id, {})

    def to_flat(self) -> dict[str, torch.Tensor]:
        return {
            f"{cid}\x1f{name}": t for cid, state in self._states.items() for name, t in state.items()
        }

    @classmethod
    def from_flat(cls, flat: dict[str, torch.Tensor]) -> ClientStateStore:
        store = cls()
        for key, t in flat.items():
            cid, name = key.split("\x1f", 1)
            store.get(cid)[name] = t.clone()
        return store

    def __len__(self) -> int:
        return len(self._states)
