"""Issue 13, point 6: one malicious site against secure aggregation, over gRPC on 127.0.0.1.

A real ``serve()`` (in a thread of this process) with ``[secure_aggregation] enabled = true``
and mutual TLS (the sites sign their keys: the authenticated protocol with its consistency
round), and the four heart-disease hospitals as real ``SiteRunner`` threads. "va" is
malicious: it runs the real client code, but the client half of secure aggregation
(:meth:`SecureAggregation.respond <consortium.secagg.stage.SecureAggregation.respond>`) is
patched for its site name only (all four sites share this process) to attack one round each:

- its quantised input pushed beyond the quantisation range before it is masked (it wraps
  the modular sum): the server's *range check* aborts the round;
- its weight slot inflated to the slot's ceiling, lowered so that the summed weight (the
  divisor) nearly vanishes (the review's ×5,900 amplification), or wrapped to "level -1":
  the *weight check* (the sum against the roster's declared sizes) aborts the round;
- a shifted Shamir share revealed in the unmasking phase. With the e2e tests' threshold 0.67
  (3 of a site's 3 neighbours) there is no spare share: the commitment check finds that the
  shares do not reconstruct the committed seed and the round aborts. With threshold 2/3
  (2 of 3, the sites' own floor) one shifted share is left out, the holder is named
  (``secagg_corrupted_shares``) and the unmasked sum is exactly the honest inputs' sum: for a
  surviving peer's self-mask seed, and for the mask key of a peer that dropped out.

For each: the server keeps running, an aborted round names its check in metrics.jsonl's
``aborted`` and leaves the global model bit for bit as it was, and the honest hospitals
finish the run. The reference is the same federation with "va" honest: every round completes.

Rounds at deployed sites are not repeatable bit for bit across runs (each site rounds with
its own CSPRNG), so "the honest sum" is checked within a run: every site's quantised input is
recorded before it is masked (the attacker's before it tampers), and the sum the server
unmasked (:meth:`SecAggServer.finish <consortium.secagg.protocol.SecAggServer.finish>`) must
equal the contributors' inputs summed modulo 2**32.
"""

from __future__ import annotations

import dataclasses
import json
import queue
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.errors import PipelineError
from consortium.secagg.shamir import PRIME, Share

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
MALICIOUS = "va"
PEER = "cleveland"  # the surviving peer whose seed share the attacker shifts
DROPPER = "switzerland"  # an honest site that drops out before its masked input
BITS, CLIP, WEIGHT_BOUND = 16, 1.0, 1000.0  # [secure_aggregation]'s defaults
LEVELS = (1 << BITS) - 1
STEP = 2 * CLIP / LEVELS  # quantization_step(clip=1, bits=16)
MODULUS = 1 << 32


# --------------------------------------------------------------------------------- the attacks


@dataclass(frozen=True)
class Seen:
    """What the attacker knows when it tampers: its own quantised input (a copy it may edit)
    and the weights the server checks the sum against (the roster's declared sizes, which
    the sites could also learn from one another)."""

    vector: torch.Tensor
    known: Mapping[str, float]


def wrap_a_coordinate(seen: Seen) -> torch.Tensor:
    """Coordinate 1 moved by 2**31 levels: far beyond the quantisation range, masked like any
    value, so the modular sum wraps."""
    v = seen.vector
    v[1] = (v[1] + (1 << 31)) % MODULUS
    return v


def inflate_the_weight(seen: Seen) -> torch.Tensor:
    """The weight slot at the ceiling: weight_bound (1000) for its ~150 declared examples."""
    v = seen.vector
    v[-1] = LEVELS
    return v


def shrink_the_divisor(seen: Seen) -> torch.Tensor:
    """The slot at minus the others' weights (plus 1/5,900 of them): the summed weight, by
    which the server divides ``Σ w·Δ``, nearly vanishes and the aggregate is amplified
    ×5,900 (the review's attack), all within the slot's legal range."""
    others = sum(w for c, w in seen.known.items() if c != MALICIOUS)
    claimed = -others * (1 - 1 / 5900) / WEIGHT_BOUND
    v = seen.vector
    v[-1] = round((claimed + CLIP) / STEP)
    return v


def wrap_the_weight_negative(seen: Seen) -> torch.Tensor:
    """The slot at "level -1" (2**32 - 1): the sum's slot wraps back into the honest range
    and the weight it decodes to is below -weight_bound."""
    v = seen.vector
    v[-1] = MODULUS - 1
    return v


def shift_share(kind: str, owner: str) -> Callable[[Any], Any]:
    """The unmask reply with the attacker's share of ``owner``'s secret (``"b"``: the
    self-mask seed of a survivor; ``"s"``: the mask key of a dropped site) shifted by one."""

    def tamper(reply: Any) -> Any:
        field_name = "b_shares" if kind == "b" else "s_shares"
        shares = dict(getattr(reply, field_name))
        old = shares[owner]  # KeyError: the attacker does not hold it (a harness bug)
        shares[owner] = Share(old.index, (old.value + 1) % PRIME)
        return dataclasses.replace(reply, **{field_name: shares})

    return tamper


@dataclass(frozen=True)
class Attack:
    """One round's attack: ``masked`` edits the attacker's quantised input before the real
    client masks it, ``unmask`` edits the reply it reveals; ``drop`` makes the honest
    :data:`DROPPER` drop out before its masked input that round; ``expect``: a text the
    round's ``aborted`` must hold, or None when the round must complete (corrected)."""

    name: str
    round: int
    masked: Callable[[Seen], torch.Tensor] | None = None
    unmask: Callable[[Any], Any] | None = None
    drop: bool = False
    expect: str | None = None
    corrupted: tuple[str, str, str] | None = None  # (holder, owner, kind) named when corrected


# threshold 0.67 (the e2e tests' config): t = ceil(0.67·3) = 3 of each site's 3 neighbours
ABORTED = (
    Attack("input wrapped past the quantisation range", 1, masked=wrap_a_coordinate,
           expect="range check: 1 coordinate(s)"),
    Attack("weight slot inflated to weight_bound", 2, masked=inflate_the_weight,
           expect="weight check: the securely summed weight"),
    Attack("weight slot lowered: the divisor ×1/5,900", 3, masked=shrink_the_divisor,
           expect="weight check: the securely summed weight"),
    Attack("weight slot wrapped negative (level -1)", 4, masked=wrap_the_weight_negative,
           expect="is not positive"),
    Attack("a shifted seed share, no spare share (t = 3 of 3)", 5,
           unmask=shift_share("b", PEER), expect=f"the 'b' shares of the secret of client '{PEER}', revealed by ["),
)
ROUNDS = 6  # round 6 is honest: the run goes on after five aborted rounds
THRESHOLD = "0.67"

# threshold 2/3 (the sites' own floor): t = 2 of 3, one share per secret to spare
CORRECTED = (
    Attack("a shifted seed share of a surviving peer", 1, unmask=shift_share("b", PEER),
           corrupted=(MALICIOUS, PEER, "b")),
    Attack("a shifted key share of a dropped peer", 2, unmask=shift_share("s", DROPPER),
           drop=True, corrupted=(MALICIOUS, DROPPER, "s")),
)
SPARE_ROUNDS = 2
SPARE_THRESHOLD = repr(2 / 3)


def overrides(rounds: int, threshold: str) -> list[str]:
    """Every site every round; evaluation only after the last round (it is not the subject)."""
    return [f"rounds={rounds}", "evaluation.baselines=[]", f"evaluation.every={rounds}",
            "sampling.fraction=1.0", "secure_aggregation.enabled=true",
            f"secure_aggregation.threshold={threshold}"]


# ------------------------------------------------------------------------------------ the runs


@dataclass
class Run:
    out: Path
    models: dict[int, torch.Tensor] = field(default_factory=dict)  # round -> model after it
    layout: Any = None  # the model's, to read the saved final model
    inputs: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # honest inputs
    sums: dict[int, tuple[torch.Tensor, tuple[str, ...]]] = field(default_factory=dict)
    tampered: list[tuple[int, str]] = field(default_factory=list)  # (round, phase) done
    served: Any = None  # serve()'s result, or the exception it raised
    honest: dict[str, Any] = field(default_factory=dict)  # site -> tasks answered, or exception
    seconds: float = 0.0

    def records(self) -> dict[int, dict[str, Any]]:
        lines = (self.out / "metrics.jsonl").read_text().splitlines()
        return {r["round"]: r for r in map(json.loads, lines)}


def _hospital(d: Path, site: str) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    if not path.exists():
        path.write_bytes((files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes())
    return path


def _patch(patch: pytest.MonkeyPatch, run: Run, attacks: tuple[Attack, ...]) -> None:
    """Tamper with the attacker's client half of secure aggregation (its site name only),
    and record what the test checks against: every site's quantised input before it is
    masked, the sum the server unmasks, the model each round's tasks carry."""
    from consortium.deploy import client as site_module
    from consortium.secagg.protocol import SecAggServer
    from consortium.secagg.stage import SecureAggregation, SecureSum

    plan = {a.round: a for a in attacks}
    known: dict[str, float] = {}
    respond, finish, aggregate, fit = (SecureAggregation.respond, SecAggServer.finish,
                                       SecureSum.aggregate, site_module._Site.fit)

    def tampered_respond(self: Any, phase: str, message: Any, ctx: Any) -> Any:
        attack = plan.get(ctx.round)
        session = ctx.session.get(self.name)
        if phase == "masked" and getattr(session, "vector", None) is not None:
            run.inputs[(ctx.round, ctx.client_id)] = session.vector.clone()
            if attack and attack.drop and ctx.client_id == DROPPER:
                raise PipelineError(f"{DROPPER} drops out before its masked input (the test)")
            if attack and attack.masked and ctx.client_id == MALICIOUS:
                session.vector = attack.masked(Seen(session.vector.clone(), dict(known)))
                run.tampered.append((ctx.round, phase))
        reply = respond(self, phase, message, ctx)
        if phase == "unmask" and attack and attack.unmask and ctx.client_id == MALICIOUS:
            reply = attack.unmask(reply)
            run.tampered.append((ctx.round, phase))
        return reply

    def seen_aggregate(self: Any, updates: Any, *, ctx: Any) -> Any:
        known.update(dict(self.weights))  # the roster's sizes: the attacker's estimate of them
        return aggregate(self, updates, ctx=ctx)

    def seen_finish(self: Any, responses: Any) -> Any:
        result = finish(self, responses)
        run.sums[self.config.round] = (result.sum.clone(), tuple(result.contributors))
        return result

    def seen_fit(self: Any, task: Any) -> Any:
        run.models.setdefault(task.round - 1, task.parameters.vector.clone())
        run.layout = task.parameters.layout
        return fit(self, task)

    patch.setattr(SecureAggregation, "respond", tampered_respond)
    patch.setattr(SecureSum, "aggregate", seen_aggregate)
    patch.setattr(SecAggServer, "finish", seen_finish)
    patch.setattr(site_module._Site, "fit", seen_fit)


def _federation(d: Path, name: str, rounds: int, threshold: str,
                attacks: tuple[Attack, ...]) -> Run:
    """One run of the real server (a thread) and the four hospitals (``SiteRunner`` threads),
    with ``attacks`` played by :data:`MALICIOUS`."""
    from safetensors.torch import load_file

    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy import server as server_module
    from consortium.deploy.client import SiteRunner

    run = Run(d / name)
    settings = overrides(rounds, threshold)
    approve = (manifest_hash(load_config(None, settings)),)
    ports: queue.Queue[int] = queue.Queue()

    def serve() -> None:
        try:
            run.served = server_module.serve(
                None, listen="127.0.0.1:0", certs=d / "certs" / "server", out=run.out,
                min_sites=len(HOSPITALS), overrides=settings, register_timeout=60,
                round_timeout=30, heartbeat_s=5, on_listening=ports.put, progress=False,
            )
        except BaseException as exc:
            run.served = exc
            ports.put(0)

    def site(name_: str, port: int) -> None:
        try:
            run.honest[name_] = SiteRunner(
                f"127.0.0.1:{port}", site=name_, data=_hospital(d, name_),
                certs=d / "certs" / "sites" / name_, approve=approve, poll_s=2,
                give_up_after_s=30, state_dir=d / f"state-{name}" / name_,
            ).run()
        except BaseException as exc:
            run.honest[name_] = exc

    start = time.monotonic()
    with pytest.MonkeyPatch.context() as patch:
        _patch(patch, run, attacks)
        server = threading.Thread(target=serve, name=f"secagg-server-{name}", daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {run.served!r}"
        threads = [threading.Thread(target=site, args=(s, port), daemon=True) for s in HOSPITALS]
        for t in threads:
            t.start()
        server.join(timeout=240)
        for t in threads:
            t.join(timeout=60)
    run.seconds = time.monotonic() - start
    if run.layout is not None and (run.out / "model.safetensors").exists():
        run.models[rounds] = run.layout.flatten(load_file(str(run.out / "model.safetensors")))
    return run


@pytest.fixture(scope="module")
def consortium_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from consortium.deploy.provision import provision

    d = tmp_path_factory.mktemp("hostile-secagg")
    provision(list(HOSPITALS), d / "certs")
    return d


@pytest.fixture(scope="module")
def reference(consortium_dir: Path) -> Run:
    return _federation(consortium_dir, "reference", ROUNDS, THRESHOLD, ())


@pytest.fixture(scope="module")
def attacked(consortium_dir: Path) -> Run:
    return _federation(consortium_dir, "attacked", ROUNDS, THRESHOLD, ABORTED)


@pytest.fixture(scope="module")
def spare(consortium_dir: Path) -> Run:
    return _federation(consortium_dir, "spare-share", SPARE_ROUNDS, SPARE_THRESHOLD, CORRECTED)


# ------------------------------------------------------------------------------------- checks


def _the_run_finished(run: Run, rounds: int) -> dict[int, dict[str, Any]]:
    """The server returned, every hospital answered every round's task (and the final
    evaluation), and each round has its record: the run went on whatever happened."""
    assert not isinstance(run.served, BaseException), repr(run.served)
    assert run.served is not None, "the server did not finish"
    assert run.honest == dict.fromkeys(HOSPITALS, rounds + 1), run.honest
    records = run.records()
    assert sorted(records) == list(range(1, rounds + 1))
    assert sorted(run.models) == list(range(rounds + 1))
    return records


def _the_sum_is_the_honest_inputs(run: Run, rnd: int) -> tuple[str, ...]:
    """The unmasked sum of round ``rnd`` is its contributors' quantised inputs (the
    attacker's as it computed them honestly) summed modulo 2**32, exactly."""
    total, contributors = run.sums[rnd]
    inputs = torch.stack([run.inputs[(rnd, c)].to(torch.int64) for c in contributors])
    assert torch.equal(total.reshape(-1).to(torch.int64), inputs.sum(0) % MODULUS), rnd
    return contributors


def test_the_reference_with_the_site_honest_completes_every_round(reference: Run) -> None:
    records = _the_run_finished(reference, ROUNDS)
    for rnd, record in records.items():
        assert "aborted" not in record, record["aborted"]
        assert record["secagg_clients"] == len(HOSPITALS) and record["secagg_authenticated"]
        assert "secagg_corrupted_shares" not in record
        assert _the_sum_is_the_honest_inputs(reference, rnd) == HOSPITALS
        assert not torch.equal(reference.models[rnd], reference.models[rnd - 1]), rnd
    assert not reference.tampered


def test_the_server_and_the_honest_sites_finish_the_attacked_run(attacked: Run) -> None:
    records = _the_run_finished(attacked, ROUNDS)
    assert attacked.tampered == [(a.round, "masked" if a.masked else "unmask") for a in ABORTED]
    last = records[ROUNDS]  # after five aborted rounds, an honest one lands
    assert "aborted" not in last and last["secagg_clients"] == len(HOSPITALS)
    assert _the_sum_is_the_honest_inputs(attacked, ROUNDS) == HOSPITALS
    assert not torch.equal(attacked.models[ROUNDS], attacked.models[ROUNDS - 1])


@pytest.mark.parametrize("attack", ABORTED, ids=[a.name for a in ABORTED])
def test_each_attack_aborts_its_round_naming_the_check_and_the_model_stays(
    attacked: Run, attack: Attack,
) -> None:
    record = attacked.records()[attack.round]
    assert attack.expect is not None
    assert attack.expect in record.get("aborted", ""), record
    rnd = attack.round
    assert torch.equal(attacked.models[rnd], attacked.models[rnd - 1]), (
        f"round {rnd} was aborted, but the global model changed")


def test_with_a_spare_share_a_shifted_share_is_corrected_and_its_holder_named(spare: Run) -> None:
    records = _the_run_finished(spare, SPARE_ROUNDS)
    assert spare.tampered == [(a.round, "unmask") for a in CORRECTED]
    for attack in CORRECTED:
        record = records[attack.round]
        assert "aborted" not in record, record["aborted"]
        assert record["secagg_corrupted_shares"] == [list(attack.corrupted or ())]
        contributors = _the_sum_is_the_honest_inputs(spare, attack.round)
        assert contributors == tuple(s for s in HOSPITALS if not (attack.drop and s == DROPPER))
        assert record["secagg_dropped"] == ([DROPPER] if attack.drop else [])
        assert not torch.equal(spare.models[attack.round], spare.models[attack.round - 1])


def test_the_plan_is_well_formed() -> None:
    """One attack per round, each doing one thing; the threshold really leaves a spare share
    in the corrected runs and none in the aborted one."""
    import math

    for attacks, rounds in ((ABORTED, ROUNDS), (CORRECTED, SPARE_ROUNDS)):
        assert len({a.round for a in attacks}) == len(attacks)
        assert all(1 <= a.round <= rounds for a in attacks)
        assert all((a.masked is None) != (a.unmask is None) for a in attacks)
    neighbours = len(HOSPITALS) - 1
    assert math.ceil(float(THRESHOLD) * neighbours) == neighbours
    assert math.ceil(float(SPARE_THRESHOLD) * neighbours) == neighbours - 1
