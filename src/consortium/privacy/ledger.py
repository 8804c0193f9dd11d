"""The privacy ledger: epsilon after every round, and every release recorded in privacy.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consortium.privacy.accountant import RoundMechanism, epsilon

__all__ = ["LocalPrivacyLedger", "PrivacyLedger"]


def write_ledger(
    path: Path | None, accountant: str, delta: float, relation: str, entries: list[dict[str, Any]]
) -> None:
    """Write ``privacy.json`` atomically (a stop mid-write leaves the previous version)."""
    if path is None:
        return
    body = {"accountant": accountant, "delta": delta, "neighbouring": relation, "releases": entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    tmp.replace(path)


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
        relation = (
            "add/remove one client" if self.mechanism.sampling == "poisson" else "replace one client"
        )
        write_ledger(self.path, self.accountant, self.delta, relation, self.entries)


class LocalPrivacyLedger:
    """Per-site accounting for local DP-SGD (Abadi et al. 2016).

    Every local step of site ``i`` is ``PoissonSampledDpEvent(q_i, GaussianDpEvent(z))`` with
    ``q_i = batch_size / n_i``; the site's epsilon composes all the steps it has taken in the
    run. The round's ``epsilon`` is the largest over sites (the guarantee every site has);
    ``privacy.json`` lists each site's steps and epsilon after every round.
    """

    def __init__(
        self,
        site_sizes: dict[str, int],
        *,
        batch_size: int,
        noise_multiplier: float,
        delta: float,
        accountant: str,
        path: str | Path | None = None,
    ) -> None:
        self.rates = {cid: min(1.0, batch_size / n) for cid, n in site_sizes.items()}
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self.path = Path(path) if path is not None else None
        self.steps: dict[str, int] = {}
        self.entries: list[dict[str, Any]] = []

    def site_epsilon(self, cid: str) -> float:
        mechanism = RoundMechanism(self.noise_multiplier, "poisson", rate=self.rates[cid])
        return epsilon(mechanism, self.steps.get(cid, 0), self.delta, self.accountant)

    def resume(self, round: int) -> None:
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = [e for e in data.get("releases", []) if e["round"] <= round]
            for entry in self.entries:
                for cid, steps in entry["steps"].items():
                    self.steps[cid] = self.steps.get(cid, 0) + int(steps)
            self._write()

    def before_record(self, record: dict[str, Any], state: Any) -> None:
        taken = dict(getattr(state, "participant_steps", {}))
        for cid, steps in taken.items():
            self.steps[cid] = self.steps.get(cid, 0) + steps
        spent = {cid: self.site_epsilon(cid) for cid in self.steps}
        record["epsilon"] = max(spent.values(), default=0.0)
        self.entries.append(
            {
                "round": int(record["round"]),
                "mechanism": "DP-SGD (local, per site)",
                "noise_multiplier": self.noise_multiplier,
                "steps": taken,
                "site_epsilon": spent,
                "epsilon": record["epsilon"],
            }
        )
        self._write()

    def summary(self) -> dict[str, Any]:
        spent = {cid: self.site_epsilon(cid) for cid in self.steps}
        return {
            "epsilon": max(spent.values(), default=0.0),
            "delta": self.delta,
            "accountant": self.accountant,
            "mechanism": "DP-SGD (local, per site)",
            "noise_multiplier": self.noise_multiplier,
            "site_epsilon": spent,
        }

    def _write(self) -> None:
        relation = "add/remove one example at a site"
        write_ledger(self.path, self.accountant, self.delta, relation, self.entries)
