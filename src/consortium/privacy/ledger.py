"""The privacy ledger: epsilon after every round, and every release recorded in privacy.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consortium.privacy.accountant import RoundMechanism, epsilon

__all__ = ["PrivacyLedger"]


class PrivacyLedger:
    """A callback that accounts each round's release and records it.

    It writes ``epsilon`` into the round's record (so ``metrics.jsonl`` has it) and appends
    one entry per release to ``privacy.json``: round, mechanism and its parameters, the
    sites whose updates went in, and the epsilon spent so far. On resume the file is read
    back and cut to the checkpointed round, so the ledger and the model always agree.
    """

    def __init__(
        self,
        mechanism: RoundMechanism,
        *,
        delta: float,
        accountant: str,
        path: str | Path | None = None,
    ) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.accountant = accountant
        self.path = Path(path) if path is not None else None
        self.entries: list[dict[str, Any]] = []

    def resume(self, round: int) -> None:
        """Reload the ledger written before a stop, keeping releases up to ``round``."""
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = [e for e in data.get("releases", []) if e["round"] <= round]
            self._write()

    def epsilon(self, rounds: int) -> float:
        return epsilon(self.mechanism, rounds, self.delta, self.accountant)

    def before_record(self, record: dict[str, Any], state: Any) -> None:
        rnd = int(record["round"])
        eps = self.epsilon(rnd)
        record["epsilon"] = eps
        m = self.mechanism
        self.entries.append(
            {
                "round": rnd,
                "mechanism": "gaussian (DP-FedAvg)",
                "noise_multiplier": m.noise_multiplier,
                "clip": record.get("dp_clip"),
                "sampling": m.sampling,
                "rate": m.rate if m.sampling == "poisson" else m.sample_size / m.population,
                "sites": list(getattr(state, "participants", [])),
                "epsilon": eps,
            }
        )
        self._write()

    def summary(self) -> dict[str, Any]:
        rounds = self.entries[-1]["round"] if self.entries else 0
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "accountant": self.accountant,
            "mechanism": "gaussian (DP-FedAvg)",
            "noise_multiplier": self.mechanism.noise_multiplier,
            "sampling": self.mechanism.sampling,
        }

    def _write(self) -> None:
        if self.path is None:
            return
        body = {
            "accountant": self.accountant,
            "delta": self.delta,
            "neighbouring": "add/remove one client"
            if self.mechanism.sampling == "poisson" else "replace one client",
            "releases": self.entries,
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
        tmp.replace(self.path)
