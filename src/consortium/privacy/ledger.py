"""The privacy ledger: epsilon after every round, and every release recorded in privacy.json.

Every epsilon it reports comes with the trust it rests on (``trust``: plain sentences): the
amplified figure needs a participation sample the adversary cannot see, the figure without
sampling only needs the noise to be added as stated, and nothing holds against whoever adds
the noise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.privacy.accountant import RoundMechanism, epsilon, epsilon_without_sampling

__all__ = ["SIMULATED_SAMPLE", "LocalPrivacyLedger", "PrivacyLedger", "SampleTrust"]


@dataclass(frozen=True)
class SampleTrust:
    """Whether the sites cannot know a round's participants, and the sentence that says why.

    ``secret`` False: the headline epsilon drops amplification by sampling.
    """

    secret: bool
    why: str


SIMULATED_SAMPLE = SampleTrust(
    True, "simulation: the sample is modelled as the server's secret (this process draws it "
    "from the run seed, as it draws everything)"
)

_NOT_THE_SERVER = (
    "nothing against the server itself: it sees the clipped updates before it adds the noise "
    "(secure aggregation hides single updates from it, not their sum)"
)


def write_ledger(
    path: Path | None, accountant: str, delta: float, relation: str, entries: list[dict[str, Any]],
    totals: dict[str, Any] | None = None,
) -> None:
    """Write ``privacy.json`` atomically (a stop mid-write leaves the previous version):
    the settings, ``totals`` (the epsilons so far and their ``trust``), then the releases."""
    if path is None:
        return
    body = {"accountant": accountant, "delta": delta, "neighbouring": relation,
            **(totals or {}), "releases": entries}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1), encoding="utf-8")
    tmp.replace(path)


class PrivacyLedger:
    """A callback that accounts each round's release and records it.

    It writes ``epsilon`` into the round's record (so ``metrics.jsonl`` has it) and appends
    one entry per release to ``privacy.json``: round, mechanism and its parameters, the
    sites whose updates went in, and the epsilon spent so far. On resume the file is read
    back and cut to the checkpointed round, so the ledger and the model always agree.

    ``epsilon`` is amplified by sampling (McMahan et al. 2018) only when ``sample.secret``;
    otherwise it is :func:`~consortium.privacy.accountant.epsilon_without_sampling` over every
    round, and the amplified figure is kept as ``epsilon_if_sample_secret``.
    """

    def __init__(
        self,
        mechanism: RoundMechanism,
        *,
        delta: float,
        accountant: str,
        path: str | Path | None = None,
        sample: SampleTrust = SIMULATED_SAMPLE,
    ) -> None:
        self.mechanism = mechanism
        self.delta = delta
        self.accountant = accountant
        self.path = Path(path) if path is not None else None
        self.sample = sample
        self.entries: list[dict[str, Any]] = []
        self.taken: dict[str, int] = {}  # rounds each site's update went into

    def resume(self, round: int) -> None:
        """Reload the ledger written before a stop, keeping releases up to ``round``."""
        if self.path is not None and self.path.exists():
            data = json.loads(self.path.read_text(encoding="utf-8"))
            self.entries = [e for e in data.get("releases", []) if e["round"] <= round]
            for entry in self.entries:
                self._took_part(entry["sites"])
            self._write()

    def epsilon(self, rounds: int) -> float:
        """The headline epsilon after ``rounds``: amplified only if the sample is secret."""
        if self.sample.secret:
            return self.amplified(rounds)
        return self.without_sampling(rounds)

    def amplified(self, rounds: int) -> float:
        return epsilon(self.mechanism, rounds, self.delta, self.accountant)

    def without_sampling(self, rounds: int) -> float:
        return epsilon_without_sampling(self.mechanism, rounds, self.delta, self.accountant)

    def before_record(self, record: dict[str, Any], state: Any) -> None:
        rnd = int(record["round"])
        eps = self.epsilon(rnd)
        record["epsilon"] = eps
        m = self.mechanism
        sites = list(getattr(state, "participants", []))
        self._took_part(sites)
        self.entries.append(
            {
                "round": rnd,
                "mechanism": "gaussian (DP-FedAvg)",
                "noise_multiplier": m.noise_multiplier,
                "clip": record.get("dp_clip"),
                "sampling": m.sampling,
                "rate": m.rate if m.sampling == "poisson" else m.sample_size / m.population,
                "sites": sites,
                "epsilon": eps,
            }
        )
        self._write()

    def summary(self) -> dict[str, Any]:
        return {
            **self._totals(),
            "mechanism": "gaussian (DP-FedAvg)",
            "noise_multiplier": self.mechanism.noise_multiplier,
            "sampling": self.mechanism.sampling,
        }

    def _took_part(self, sites: list[str]) -> None:
        for cid in sites:
            self.taken[cid] = self.taken.get(cid, 0) + 1

    def _totals(self) -> dict[str, Any]:
        """The epsilons after the last recorded round, and the trust each rests on."""
        rounds = self.entries[-1]["round"] if self.entries else 0
        most = max(self.taken.values(), default=0)
        out: dict[str, Any] = {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "accountant": self.accountant,
            "sample_secret": self.sample.secret,
            "epsilon_without_sampling": self.without_sampling(rounds),
            "epsilon_given_participants": self.without_sampling(most),
            "most_rounds_taken": most,
        }
        if self.sample.secret:
            headline = (
                "epsilon: the server adds the noise it states and keeps the sample secret; "
                "holds against anyone who sees only the released models, and against the "
                "sites unless they pool which of them were chosen (each task tells its site "
                "the cohort's size)"
            )
        else:
            out["epsilon_if_sample_secret"] = self.amplified(rounds)
            headline = (
                "epsilon (= epsilon_without_sampling, as the sample is not secret): the server "
                "adds the noise it states; holds against everyone but the server, the sites included. "
                "epsilon_if_sample_secret would hold only if no one but the server knew the sample"
            )
        out["trust"] = [
            self.sample.why,
            headline,
            "epsilon_without_sampling: the server adds the noise it states; holds against "
            f"anyone who knows who took part, whatever the sample (all {rounds} rounds composed)",
            f"epsilon_given_participants: the same over the {most} rounds the most-chosen site "
            "took part in (this run's sample); holds against anyone who knows who took part, "
            "for what each site's data contributed",
            "privacy.json lists each round's sites: whoever reads it knows who took part, and "
            "for them amplification by sampling is lost",
            _NOT_THE_SERVER,
        ]
        return out

    def _write(self) -> None:
        relation = (
            "add/remove one client" if self.mechanism.sampling == "poisson" else "replace one client"
        )
        write_ledger(self.path, self.accountant, self.delta, relation, self.entries, self._totals())


class LocalPrivacyLedger:
    """Per-site accounting for local DP-SGD (Abadi et al. 2016).

    Every local step of site ``i`` is ``PoissonSampledDpEvent(q_i, GaussianDpEvent(z))`` with
    ``q_i = batch_size / n_i``; the site's epsilon composes all the steps it has taken in the
    run. The round's ``epsilon`` is the largest over sites (the guarantee every site has);
    ``privacy.json`` lists each site's steps and epsilon after every round. The batches are
    each site's own draw, so the sample is secret from everyone else (``sample_secret``).
    """

    TRUST = (
        "epsilon: each site adds its own noise to every DP-SGD step; holds against the server, "
        "the other sites and anyone who sees the updates or the models, for each site's examples",
        "each site's Poisson batches amplify it only because the site draws them itself, from "
        "randomness no one else has, and shows them to no one (a simulation models them so)",
        "epsilon_without_sampling: each site adds its own noise; holds even against anyone who "
        "knows which examples every step used (the most steps any site took, composed)",
    )

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
        self.batch_size = batch_size
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.accountant = accountant
        self.path = Path(path) if path is not None else None
        self.steps: dict[str, int] = {}
        self.entries: list[dict[str, Any]] = []

    def admit(self, cid: str, num_train: int) -> None:
        """Account for a site that joined the run late (deploy/roster.py): its steps start
        at 0 and its rate is ``batch_size / num_train``, as for the sites that started."""
        if cid not in self.rates:
            self.rates[cid] = min(1.0, self.batch_size / max(int(num_train), 1))

    def site_epsilon(self, cid: str) -> float:
        mechanism = RoundMechanism(self.noise_multiplier, "poisson", rate=self.rates[cid])
        return epsilon(mechanism, self.steps.get(cid, 0), self.delta, self.accountant)

    def without_sampling(self) -> float:
        """Every site's noise is the same, so the site with the most steps has spent most."""
        mechanism = RoundMechanism(self.noise_multiplier, "poisson")
        most = max(self.steps.values(), default=0)
        return epsilon_without_sampling(mechanism, most, self.delta, self.accountant)

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
            **self._totals(spent),
            "mechanism": "DP-SGD (local, per site)",
            "noise_multiplier": self.noise_multiplier,
            "site_epsilon": spent,
        }

    def _totals(self, spent: dict[str, float]) -> dict[str, Any]:
        return {
            "epsilon": max(spent.values(), default=0.0),
            "delta": self.delta,
            "accountant": self.accountant,
            "sample_secret": True,
            "epsilon_without_sampling": self.without_sampling(),
            "trust": list(self.TRUST),
        }

    def _write(self) -> None:
        relation = "add/remove one example at a site"
        spent = {cid: self.site_epsilon(cid) for cid in self.steps}
        write_ledger(self.path, self.accountant, self.delta, relation, self.entries,
                     self._totals(spent))
