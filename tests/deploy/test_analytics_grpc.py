"""Issue 15 over gRPC: ``consortium server --analyze`` with deployed sites on 127.0.0.1.

A real ``serve_analysis()`` (the server behind ``consortium server --analyze``) runs in a thread
of this process, the four heart-disease hospitals as real ``SiteRunner`` threads (the code
behind ``consortium client``), each reading its own hospital file. Checked here:

- the deployed analysis equals ``consortium analyze`` in process (counts exactly, means to
  1e-9), without and with secure aggregation (mutual TLS: the authenticated variant);
- with secure aggregation, every message the server receives is captured (the hub's upload and
  exchange handlers): no per-site sum or count is among them;
- a hostile site (:class:`tests.deploy.hostile_site.HostileSite`, the real wire protocol)
  sending a malformed, oversized, out-of-layout (an extra category) or negative answer is
  refused with the reason, left out of the analysis, and the server finishes;
- a site's own rules: its policy's ``min_count`` above the query's, its own DP ledger and
  budget, and refusals that carry no row value.
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.analytics import secure, wire
from consortium.analytics.analysis import analyze
from consortium.analytics.sources import heart_disease_tables
from consortium.config import load_config
from consortium.deploy.analysis_site import (
    LEDGER_FILENAME,
    AnalysisSite,
    analysis_manifest_hash,
    ready_info,
)
from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
SECURE = ["secure_aggregation.enabled=true", "secure_aggregation.threshold=0.67"]


# ------------------------------------------------------------------------------- the harness


@dataclass
class Run:
    out: Path
    served: Any = None  # the Analysis, or the exception serve_analysis raised
    sites: dict[str, Any] = field(default_factory=dict)  # site -> tasks answered, or exception
    hostile: Any = None  # what the hostile site's script returned, or its exception

    @property
    def result(self) -> dict[str, Any]:
        assert not isinstance(self.served, BaseException), self.served
        return json.loads((self.out / "analysis.json").read_text())


def _hospital(d: Path, site: str) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    if not path.exists():
        path.write_bytes((files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes())
    return path


def _federation(
    d: Path, name: str, *, overrides: Sequence[str] = (), certs: Path | None = None,
    honest: Sequence[str] = HOSPITALS, hostile: Callable[[int], Any] | None = None,
    policies: dict[str, str] | None = None, round_timeout: float = 20.0,
) -> Run:
    """One analysis: the real server (a thread), the ``honest`` hospitals (``SiteRunner``
    threads) and, if given, ``hostile(port)`` in a thread of its own."""
    from consortium.deploy.analytics import serve_analysis
    from consortium.deploy.client import SiteRunner

    run = Run(d / name)
    approve = (analysis_manifest_hash(load_config(None, list(overrides))),)
    ports: queue.Queue[int] = queue.Queue()

    def serve() -> None:
        try:
            run.served = serve_analysis(
                None, listen="127.0.0.1:0", certs=certs / "server" if certs else None,
                out=run.out, min_sites=len(honest) + (hostile is not None),
                overrides=overrides, register_timeout=30, round_timeout=round_timeout,
                heartbeat_s=5, on_listening=ports.put,
            )
        except BaseException as exc:
            run.served = exc
            ports.put(0)

    def site(name_: str, port: int) -> None:
        policy = None
        if policies and name_ in policies:
            policy = d / f"{name}-{name_}-policy.toml"
            policy.write_text(policies[name_])
        try:
            run.sites[name_] = SiteRunner(
                f"127.0.0.1:{port}", site=name_, data=_hospital(d, name_),
                certs=certs / "sites" / name_ if certs else None, approve=approve, poll_s=2,
                give_up_after_s=20, policy=policy, state_dir=d / "state" / name_,
            ).run()
        except BaseException as exc:
            run.sites[name_] = exc

    def attack(port: int) -> None:
        assert hostile is not None
        try:
            run.hostile = hostile(port)
        except BaseException as exc:
            run.hostile = exc

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = ports.get(timeout=60)
    assert port, f"the server did not start: {run.served!r}"
    threads = [threading.Thread(target=site, args=(s, port), daemon=True) for s in honest]
    if hostile is not None:
        threads.append(threading.Thread(target=attack, args=(port,), daemon=True))
    for t in threads:
        t.start()
    server.join(timeout=120)
    for t in threads:
        t.join(timeout=30)
    assert not server.is_alive(), "the server did not finish"
    return run


def _in_process(overrides: Sequence[str] = (), sites: Sequence[str] = HOSPITALS) -> dict[str, Any]:
    tables = {s: t for s, t in heart_disease_tables().items() if s in sites}
    return analyze(load_config(None, list(overrides)), tables=tables).result


def _same_table(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Counts exactly, means and the rest to 1e-9."""
    assert got["n"] == want["n"]
    assert got["columns"].keys() == want["columns"].keys()
    for name, w in want["columns"].items():
        g = got["columns"][name]
        if "counts" in w:
            assert g == w, name
            continue
        assert g["missing"] == w["missing"], name
        for stat in ("mean", "sd", "median", "q1", "q3"):
            assert (g[stat] is None) == (w[stat] is None), (name, stat)
            if w[stat] is not None:
                assert g[stat] == pytest.approx(w[stat], rel=1e-9, abs=1e-9), (name, stat)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("analytics-grpc")


@pytest.fixture(scope="module")
def certs(folder: Path) -> Path:
    from consortium.deploy.provision import provision

    provision(list(HOSPITALS), folder / "certs")
    return folder / "certs"


# -------------------------------------------------------------------------- the honest path


def test_four_hospitals_over_grpc_equal_the_in_process_analysis(folder: Path) -> None:
    run = _federation(folder, "plain")
    assert run.sites == dict.fromkeys(HOSPITALS, 2)  # profile and describe, nothing else
    got, want = run.result, _in_process()
    _same_table(got["table1"]["overall"], want["table1"]["overall"])
    assert got["table1"]["sites"].keys() == want["table1"]["sites"].keys()
    for site in HOSPITALS:
        _same_table(got["table1"]["sites"][site], want["table1"]["sites"][site])
    assert got["sites"] == {"answered": list(HOSPITALS), "excluded": {}}
    for name in ("table1.csv", "analysis.html", "config.toml", "audit.jsonl"):
        assert (run.out / name).is_file(), name
    audit = [json.loads(line) for line in (run.out / "audit.jsonl").read_text().splitlines()]
    assert sum(e.get("task_kind") == "analysis" for e in audit) == 8  # 4 sites × 2 phases


@dataclass
class Captured:
    """Every upload and exchange the server received, and each site's plaintext sums."""

    uploads: list[tuple[str, Any]] = field(default_factory=list)
    exchanges: list[tuple[str, Any]] = field(default_factory=list)
    plain: dict[str, Any] = field(default_factory=dict)  # site -> its encoded sums
    answers: dict[str, Any] = field(default_factory=dict)  # site -> its Answer


def _capture(patch: pytest.MonkeyPatch) -> Captured:
    from consortium.analytics import site as site_module
    from consortium.deploy.hub import Hub

    seen = Captured()
    deliver, exchange, encode, describe = (Hub.deliver, Hub.deliver_exchange, secure.encode,
                                           site_module.describe)

    def spy_deliver(self: Hub, session: str, upload: Any) -> Any:
        seen.uploads.append((self.site_of(session), upload))
        return deliver(self, session, upload)

    def spy_exchange(self: Hub, session: str, envelope: Any) -> Any:
        seen.exchanges.append((self.site_of(session), envelope))
        return exchange(self, session, envelope)

    def keep(answer: Any, keys: Any) -> Any:
        vector = encode(answer, keys)
        seen.plain[answer.site] = vector.clone()
        return vector

    def keep_answer(data: Any, schema: Any) -> Any:
        answer = describe(data, schema)
        seen.answers[answer.site] = answer
        return answer

    patch.setattr(Hub, "deliver", spy_deliver)
    patch.setattr(Hub, "deliver_exchange", spy_exchange)
    patch.setattr(secure, "encode", keep)
    patch.setattr(site_module, "describe", keep_answer)
    return seen


def test_secure_aggregation_over_mutual_tls_shows_the_server_no_site_sums(
    folder: Path, certs: Path,
) -> None:
    with pytest.MonkeyPatch.context() as patch:
        seen = _capture(patch)
        run = _federation(folder, "secure", overrides=SECURE, certs=certs)
    got, want = run.result, _in_process(SECURE)
    _same_table(got["table1"]["overall"], want["table1"]["overall"])
    assert got["table1"]["sites"] == {}
    assert got["sites"]["secure_aggregation"]["authenticated"] is True  # signed keys (TLS certs)
    assert got["sites"]["secure_aggregation"]["contributors"] == list(HOSPITALS)

    # what came up as uploads: profiles without a row count, "ready" for the sums
    assert {site for site, _ in seen.uploads} == set(HOSPITALS)
    for site, upload in seen.uploads:
        assert isinstance(upload, AnalysisResultEnvelope) and upload.error is None
        body = json.loads(upload.body)
        if upload.phase == "profile":
            assert body["n"] is None
        else:
            assert upload.phase == "describe" and set(body) == {"ready", "size"}
    # what came up in the exchanges: keys, shares, signatures, and masked sums
    masked = [(s, e.message.vector) for s, e in seen.exchanges if e.phase == "masked"]
    assert sorted(s for s, _ in masked) == list(HOSPITALS)
    tensors = [e for _, e in seen.exchanges if e.phase != "masked" and e.message is not None
               and hasattr(e.message, "vector")]
    assert tensors == []  # no other exchange carries a vector
    keys = wire.expected_layout(run.served.schema)
    at = [k for k, _ in keys].index("all|n") * secure.LIMBS
    counts = {s: a.values["all|n"].item() for s, a in seen.answers.items()}
    assert sorted(counts.values()) == [123.0, 200.0, 294.0, 303.0]
    for sender, vector in masked:
        for site, plain in seen.plain.items():
            assert (vector == plain).float().mean().item() < 0.01, (sender, site)
        # read as plaintext, a masked vector gives no site's row count
        as_plain = secure.decode(vector, keys, 1)
        assert as_plain.values["all|n"].item() not in counts.values()
        assert vector[at:at + secure.LIMBS].tolist() not in [
            p[at:at + secure.LIMBS].tolist() for p in seen.plain.values()]
    # nor do the audit entries hold a site's count
    for line in (run.out / "audit.jsonl").read_text().splitlines():
        entry = json.loads(line)
        assert not any(v in counts.values() for v in entry.values()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)), entry


# ------------------------------------------------------------------------- a hostile site


def _honest_answer(task: AnalysisTaskEnvelope, cfg_overrides: Sequence[str] = ()) -> Any:
    site = AnalysisSite(site="va", cfg=load_config(None, list(cfg_overrides)),
                        table=heart_disease_tables()["va"], run_id="r")
    return site.answer(task)


def _hostile(tamper: Callable[[AnalysisTaskEnvelope, AnalysisResultEnvelope], bytes]) -> Callable[[int], Any]:
    """A site "va" that answers the profile honestly and its describe with ``tamper``'s body;
    returns the server's Ack to the tampered answer."""
    from tests.deploy.hostile_site import HostileSite

    def play(port: int) -> Any:
        with HostileSite(f"127.0.0.1:{port}", "va") as site:
            site.register()
            assert site.describe(ready_info().input_shape, 2, 0, 0).accepted
            ack = None
            for item in site.work(wait_s=2):
                if not isinstance(item, AnalysisTaskEnvelope):
                    continue
                honest = _honest_answer(item)
                if item.phase != "describe":
                    assert site.push(honest).accepted
                    continue
                body = tamper(item, honest)
                ack = site.push(AnalysisResultEnvelope(item.task_id, item.phase, body))
            return ack

    return play


def _malformed(task: Any, honest: Any) -> bytes:
    return honest.body[: len(honest.body) // 2]  # cut in the middle: not JSON


def _oversized(task: Any, honest: Any) -> bytes:
    return b" " * (3 << 20) + honest.body  # valid JSON, over the answer's byte limit


def _extra_category(task: Any, honest: Any) -> bytes:
    data = json.loads(honest.body)
    data["values"]["all|sex|counts"].append(5.0)  # a category the schema does not hold
    data["values"]["all|sex=alien|counts"] = [5.0]
    return wire.dumps(data)


def _negative_count(task: Any, honest: Any) -> bytes:
    data = json.loads(honest.body)
    data["values"]["all|n"] = [-1000.0]
    return wire.dumps(data)


@pytest.mark.parametrize(("attack", "reason"), [
    (_malformed, "is not valid JSON"),
    (_oversized, "above the limit"),
    (_extra_category, "which the schema does not ask for"),
    (_negative_count, "negative"),
])
def test_a_hostile_sites_answer_is_refused_and_the_analysis_goes_on(
    folder: Path, attack: Any, reason: str,
) -> None:
    honest = ("cleveland", "hungarian", "switzerland")
    run = _federation(folder, f"hostile-{attack.__name__}", honest=honest,
                      hostile=_hostile(attack), round_timeout=4)
    assert not isinstance(run.hostile, BaseException), run.hostile
    ack = run.hostile
    assert not ack.accepted and reason in ack.reason, ack.reason  # refused, with the reason
    got = run.result  # the server finished and wrote the analysis of the honest sites
    assert got["sites"]["answered"] == list(honest)
    assert set(got["sites"]["excluded"]) == {"va"}
    assert run.sites == dict.fromkeys(honest, 2)
    # the refused answer reached no statistic: the overall table is the three honest sites'
    # (the schema was agreed with va's honest profile, so compare what does not depend on it)
    want = _in_process(sites=honest)["table1"]["overall"]
    assert got["table1"]["overall"]["n"] == want["n"] == 303 + 294 + 123
    assert got["table1"]["overall"]["columns"]["sex"] == want["columns"]["sex"]
    assert got["table1"]["overall"]["columns"]["age"]["mean"] == pytest.approx(
        want["columns"]["age"]["mean"], rel=1e-12)


# --------------------------------------------------------------------- the site's own rules


def test_a_sites_min_count_above_the_querys_is_applied(folder: Path) -> None:
    run = _federation(folder, "min-count", policies={
        "switzerland": '[default]\napprove = "matching"\nmin_count = 20\n'})
    got = run.result
    assert got["protection"]["min_count"] == 5  # the query's, which the other sites apply
    swiss = got["table1"]["sites"]["switzerland"]["columns"]
    released = [v for c in swiss.values() if "counts" in c for v in c["counts"].values()]
    released += [c["missing"] for c in swiss.values()]
    assert all(v is None or v == 0 or v >= 20 for v in released), released
    # cells the query's min_count of 5 releases (in process) are withheld there
    assert swiss["sex"]["counts"]["0"] is None  # 10 women
    assert swiss["fbs"]["counts"]["1"] is None  # 5 with high fasting sugar
    assert _in_process()["table1"]["sites"]["switzerland"]["columns"]["sex"]["counts"]["0"] == 10
    # another site keeps the query's: Cleveland's cells of 5 to 19 are released
    cle = got["table1"]["sites"]["cleveland"]["columns"]
    assert cle["thal"]["counts"]["6"] == 18 and cle["num"]["counts"]["4"] == 13


DP = ["analysis.epsilon=1.0", 'analysis.columns=["age", "sex"]',
      'analysis.bounds=["age: 0, 120"]', 'analysis.categories=["sex: 0, 1"]']


def test_dp_over_grpc_charges_each_sites_own_ledger(folder: Path) -> None:
    policy = '[default]\napprove = "matching"\nmax_epsilon = 3.0\n'
    tight = '[default]\napprove = "matching"\nmax_epsilon = 1.2\n'
    policies = {s: policy for s in HOSPITALS} | {"va": tight}
    first = _federation(folder, "dp-1", overrides=DP, policies=policies)
    got = first.result
    assert got["protection"]["differential_privacy"]["epsilon"] == 1.0
    assert got["noise_sd"]["count"] > 0
    assert got["sites"]["answered"] == list(HOSPITALS)
    assert got["table1"]["overall"]["n"] == pytest.approx(920, abs=60)  # noisy, not far
    for site in HOSPITALS:
        ledger = json.loads((folder / "state" / site / LEDGER_FILENAME).read_text())
        (entry,) = ledger[site]["releases"]
        assert entry["epsilon"] == 1.0 and entry["mechanism"] == "gaussian"
        assert ledger[site]["delta"] == 1e-5  # the site's policy's δ, not the server's
    # a second query (1.46 in all, RDP): va's own max_epsilon (1.2) refuses it, the others answer
    second = _federation(folder, "dp-2", overrides=DP, policies=policies)
    got = second.result
    assert "va" in got["sites"]["excluded"] and "max_epsilon" in got["sites"]["excluded"]["va"]
    assert got["sites"]["answered"] == ["cleveland", "hungarian", "switzerland"]
    va = json.loads((folder / "state" / "va" / LEDGER_FILENAME).read_text())
    assert len(va["va"]["releases"]) == 1  # refused before anything was computed or charged
    cle = json.loads((folder / "state" / "cleveland" / LEDGER_FILENAME).read_text())
    assert len(cle["cleveland"]["releases"]) == 2


def _task(phase: str, request: dict[str, Any]) -> AnalysisTaskEnvelope:
    return AnalysisTaskEnvelope("t", phase, wire.dumps(request))


def _site(overrides: Sequence[str] = (), **kwargs: Any) -> AnalysisSite:
    return AnalysisSite(site="va", cfg=load_config(None, list(overrides)),
                        table=heart_disease_tables()["va"], run_id="r", **kwargs)


def _query(**fields: Any) -> dict[str, Any]:
    from consortium.analytics.query import Query

    return wire.query_to_json(Query(**fields))


@pytest.mark.parametrize(("query", "says", "hides"), [
    (_query(where="age >= 50 and (sex == 1"), "filter", None),
    (_query(where="__import__('os').system('id')"), "filter", None),
    (_query(where="weight > 3"), "no column 'weight'", None),
    (_query(columns=("age", "height")), "no column 'height'", None),
    # orders a numeric column against text: the site's error would quote its data; the server
    # is told only that the site could not answer
    (_query(where="age < 'abc'"), "could not answer", "abc"),
    (_query(min_count=300, suppress="refuse"), "below its min_count", "200"),
])
def test_the_site_refuses_what_breaks_its_rules_without_row_values(
    query: dict[str, Any], says: str, hides: str | None,
) -> None:
    answer = _site().answer(_task("profile", query))
    assert answer.error is not None and says in answer.error, answer.error
    assert not answer.body
    if hides is not None:
        assert hides not in answer.error


def test_the_site_refuses_weaker_protection_than_it_approved() -> None:
    secure_site = _site(SECURE)
    answer = secure_site.answer(_task("profile", _query()))
    assert answer.refused and "without secure aggregation" in (answer.error or "")
    dp_site = _site(DP)  # DP approved: no profile, and describe needs the approved DP
    answer = dp_site.answer(_task("profile", _query(columns=("age", "sex"))))
    assert answer.refused and "without differential privacy" in (answer.error or "")


def test_under_dp_the_site_computes_its_own_noise_plan(tmp_path: Path) -> None:
    from dataclasses import replace

    from consortium.analytics.analysis import DPRequest, dp_schema
    from consortium.analytics.dp import parse_bounds, parse_categories
    from consortium.analytics.query import Query

    cfg = load_config(None, DP)
    request = DPRequest(1.0, 1e-5, "gaussian", parse_bounds(cfg.analysis.bounds),
                        parse_categories(cfg.analysis.categories))
    query, schema = dp_schema(Query(columns=("age", "sex")), request, ["age", "sex"])
    site = _site(DP, state_dir=tmp_path)
    honest = site.answer(_task("describe", wire.schema_to_json(schema)))
    assert honest.error is None, honest.error
    # a server asking for a tenth of the noise (claiming the same ε) is refused
    weak = replace(query, dp=replace(query.dp, noise_multiplier=query.dp.noise_multiplier / 10))
    answer = site.answer(_task("describe", wire.schema_to_json(replace(schema, query=weak))))
    assert answer.refused and "noise plan" in (answer.error or "")
    # and so is a schema whose bounds are not the approved public ones
    narrow = dp_schema(Query(columns=("age", "sex")), replace(
        request, bounds={"age": (60.0, 61.0)}), ["age", "sex"])[1]
    answer = site.answer(_task("describe", wire.schema_to_json(narrow)))
    assert answer.refused and "public declaration" in (answer.error or "")
    ledger = json.loads((tmp_path / LEDGER_FILENAME).read_text())
    assert len(ledger["va"]["releases"]) == 1  # only the honest query was charged


def test_a_second_secure_total_in_one_run_is_refused() -> None:
    from consortium.analytics.query import Query
    from consortium.analytics.server import agree
    from consortium.analytics.site import SiteData, profile

    site = _site(SECURE)
    q = Query(columns=("age",), secure=True)
    schema = agree([profile(SiteData(heart_disease_tables()["va"], q))], q)
    request = _task("describe", wire.schema_to_json(schema))
    assert site.answer(request).error is None
    site._total._masked = True  # as after its masked input left
    answer = site.answer(request)
    assert answer.refused and "second secure total" in (answer.error or "")


def test_answers_are_checked_against_the_schemas_layout() -> None:
    """The wire layout is describe()'s, for queries that use every kind of key."""
    from consortium.analytics.query import Query
    from consortium.analytics.server import agree
    from consortium.analytics.site import SiteData, describe, profile

    tables = heart_disease_tables()
    queries = [
        Query(),
        Query(columns=("age", "sex", "cp"), group_by="sex", crosstabs=(("sex", "cp"),),
              correlation=("age", "chol"), bands=(("age", (40.0, 60.0)),)),
        Query(columns=("age",), survival=("age", "sex", "cp"), where="age > 30"),
        Query(columns=("age", "thalach"), secure=True),
    ]
    for q in queries:
        schema = agree([profile(SiteData(t, q)) for t in tables.values()], q)
        for t in tables.values():
            answer = describe(SiteData(t, q), schema)
            assert secure.layout(answer) == wire.expected_layout(schema)
            back = wire.answer_from_json(json.loads(wire.dumps(wire.answer_to_json(answer))),
                                         site=t.site, schema=schema)
            for key, value in answer.values.items():
                np.testing.assert_array_equal(back.values[key], value)
                np.testing.assert_array_equal(back.withheld[key], answer.withheld[key])


def test_an_answer_outside_the_schemas_layout_is_refused() -> None:
    from consortium.analytics.query import Query
    from consortium.analytics.server import agree
    from consortium.analytics.site import SiteData, describe, profile

    t = heart_disease_tables()["va"]
    q = Query(columns=("age", "sex"))
    schema = agree([profile(SiteData(t, q))], q)
    good = wire.answer_to_json(describe(SiteData(t, q), schema))
    wire.answer_from_json(good, site="va", schema=schema)

    def changed(key: str, value: Any) -> dict[str, Any]:
        return {**good, "values": {**good["values"], key: value}}

    cases = {
        "an extra cell": changed("all|sex|counts", [*good["values"]["all|sex|counts"], 1.0]),
        "a missing key": {**good, "values": {k: v for k, v in good["values"].items()
                                             if k != "all|age|s1"}},
        "a fractional count": changed("all|n", [199.5]),
        "a huge sum": changed("all|age|s1", [1e200]),
        "a negative sum of squares": changed("all|age|s2", [-1.0]),
        "text for a number": changed("all|age|count", ["200"]),
        "a withheld position out of range": {**good, "withheld": {"all|n": [3]}},
    }
    for what, bad in cases.items():
        with pytest.raises(wire.WireError):
            wire.answer_from_json(bad, site="va", schema=schema)
            pytest.fail(what)
    from dataclasses import replace

    secure_schema = replace(schema, query=replace(q, secure=True))
    with pytest.raises(wire.WireError, match="withholds nothing|must be empty"):
        wire.answer_from_json({**good, "withheld": {"all|n": [0]}}, site="va",
                              schema=secure_schema)


def test_the_wire_refuses_what_is_not_plain_bounded_data() -> None:
    from consortium.analytics.query import Query

    good = wire.query_to_json(Query(columns=("age",), where="age > 1", quantiles=(0.9,)))
    assert wire.query_from_json(json.loads(wire.dumps(good))) == Query(
        columns=("age",), where="age > 1", quantiles=(0.9,))
    bad: list[Any] = [
        {**good, "bins": 10**9}, {**good, "bins": True}, {**good, "min_count": 0},
        {**good, "columns": ["a"] * 2}, {**good, "quantiles": [1.5]}, {**good, "extra": 1},
        {**good, "where": "x" * 5000}, {**good, "survival": ["t"]},
        {**good, "dp": {"mechanism": "exponential", "epsilon": 1, "delta": 0, "statistics": 1,
                        "noise_multiplier": 1}},
        "a query",
    ]
    for item in bad:
        with pytest.raises(wire.WireError):
            wire.query_from_json(item)
    for raw in (b'{"a": NaN}', b'{"a": 1e999}', b"[" * 100_000, b"\xff", b'{"a": Infinity}'):
        with pytest.raises(wire.WireError):
            value = wire.loads(raw, limit=1 << 20, what="test")
            wire.dumps(value)  # 1e999 parses to inf: refused when it is used
    with pytest.raises(wire.WireError, match="over the limit"):
        wire.loads(b"1" * 11, limit=10, what="test")


def test_profiles_from_the_wire_are_checked() -> None:
    from consortium.analytics.query import Query

    q = Query(columns=("age",), secure=True)
    good = {"n": None, "answers": True, "numeric": {"age": True}, "levels": {"age": False},
            "categories": {}, "ranges": {"age": [20.0, 80.0]}, "survival_times": []}
    assert wire.profile_from_json(good, site="x", query=q).ranges == {"age": (20.0, 80.0)}
    for change in ({"n": 303}, {"numeric": {"age": True, "zip": True}},
                   {"ranges": {"age": [80.0, 20.0]}}, {"ranges": {"age": [0.0, 1e300]}},
                   {"categories": {"age": [[1]]}}, {"levels": {"bmi": True}}):
        with pytest.raises(wire.WireError):
            wire.profile_from_json({**good, **change}, site="x", query=q)


def test_the_run_checks_its_config_before_listening(folder: Path) -> None:
    from consortium.deploy.analytics import serve_analysis
    from consortium.errors import ConfigError

    with pytest.raises(ConfigError, match="only totals"):
        serve_analysis(None, listen="127.0.0.1:0", certs=None, out=folder / "never", bias=True,
                       overrides=SECURE, min_sites=2)
    with pytest.raises(ConfigError, match="training's"):
        serve_analysis(None, listen="127.0.0.1:0", certs=None, out=folder / "never",
                       overrides=['privacy.mode="central"', 'privacy.noise_multiplier=1.0'], min_sites=2)



# ------------------------------------------------------------------------------- the hub


def test_the_hub_matches_analysis_answers_to_analysis_tasks(hub: Any) -> None:
    """An analysis task answered with a training result (or the reverse) is refused, and an
    accepted answer cannot be replayed."""
    import torch

    from consortium.deploy.analytics import AnalysisExpectation
    from consortium.deploy.codec import ResultEnvelope, decode_upload, encode_upload
    from consortium.deploy.hub import SiteInfo
    from consortium.deploy.validate import ExpectedTask, RejectedResult
    from consortium.messages import Result
    from consortium.types import Update

    session = hub.register("a")
    hub.describe(session, SiteInfo((1,), 2, 0, 0))
    columns = AnalysisResultEnvelope("t1", "columns", wire.dumps({"columns": ["age"]}))

    future = hub.expect("a", 1, "t1", "analysis", AnalysisExpectation("a", "t1", "columns"))
    training = decode_upload(encode_upload(ResultEnvelope("t1", Result(1, "a", Update(
        "a", torch.zeros(3), 1.0)))))
    accepted, why = hub.deliver(session, training)
    assert not accepted and "for an analysis task" in why
    assert isinstance(future.result(timeout=1), RejectedResult)

    future = hub.expect("a", 1, "t2", "train", ExpectedTask(site="a", round=1, task_id="t2"))
    accepted, why = hub.deliver(session, AnalysisResultEnvelope("t2", "columns", b"{}"))
    assert not accepted and "for a train task" in why
    assert future.result(timeout=1).update is None

    future = hub.expect("a", 1, "t1", "analysis", AnalysisExpectation("a", "t1", "columns"))
    assert hub.deliver(session, columns) == (True, "")
    assert future.result(timeout=1) == ("age",)
    accepted, why = hub.deliver(session, columns)  # the same answer again
    assert not accepted and "no such task open" in why


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_consortium_server_analyze_with_four_client_processes(tmp_path: Path) -> None:
    """The commands of the README: ``consortium server --analyze`` and four ``consortium
    client`` processes (``--insecure``), the result that of ``consortium analyze``."""
    import os
    import re
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root / "src"), OMP_NUM_THREADS="1")
    approve = analysis_manifest_hash(load_config(None, []))

    def cli(*args: str, **kwargs: Any) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "consortium.cli", *args], env=env,
                                text=True, **kwargs)

    server = cli("server", "--analyze", "--insecure", "--listen", "127.0.0.1:0", "--min-sites",
                 "4", "--out", str(tmp_path / "out"), "--register-timeout", "120",
                 stderr=subprocess.PIPE, stdout=subprocess.PIPE)
    assert server.stderr is not None
    port = 0
    while not port:
        line = server.stderr.readline()
        assert line, "the server did not start"
        match = re.search(r"\(port (\d+)\)", line)
        port = int(match.group(1)) if match else 0
    clients = [cli("client", "--server", f"127.0.0.1:{port}", "--site", site, "--insecure",
                   "--data", str(_hospital(tmp_path, site)), "--approve", approve,
                   "--give-up-after", "60", stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
               for site in HOSPITALS]
    try:
        out, _ = server.communicate(timeout=240)
        assert server.returncode == 0
        assert "overall (n = 920)" in out and "wrote analysis.json" in out
        for c in clients:
            assert c.wait(timeout=60) == 0
    finally:
        for p in (server, *clients):
            if p.poll() is None:
                p.kill()
    got = json.loads((tmp_path / "out" / "analysis.json").read_text())
    _same_table(got["table1"]["overall"], _in_process()["table1"]["overall"])


def test_a_csv_site_answers_with_its_own_harmonised_file(tmp_path: Path) -> None:
    """A CSV site (``--data``, ``--harmonize``): its codes are mapped before anything is
    computed, so its profile names only the common codes."""
    from consortium.data.harmonize import load_harmonization
    from consortium.deploy.analysis_site import analysis_site

    rows = ["age,sex,label"] + [f"{40 + i % 30},{'M' if i % 3 else 'F'},{i % 2}"
                                for i in range(60)]
    data = tmp_path / "north.csv"
    data.write_text("\n".join(rows) + "\n")
    spec = tmp_path / "harmonize.toml"
    spec.write_text('[map.sex]\nM = "male"\nF = "female"\n')
    cfg = load_config(None, ['data.dataset="csv"', 'data.target="label"'])
    site = analysis_site(cfg, site="north", data=data, run_id="r", policy=None,
                         state_dir=None, identity=None, floor=None,
                         harmonize=load_harmonization(spec))
    answer = site.answer(_task("profile", _query(columns=("age", "sex"))))
    assert answer.error is None, answer.error
    profile = json.loads(answer.body)
    assert profile["n"] == 60 and profile["categories"]["sex"] == ["female", "male"]
    assert profile["numeric"] == {"age": True, "sex": False}
