"""Issue 19 over gRPC: ``[interpret]`` and ``[contribution]`` with deployed sites after the last round.

A real ``serve()`` on 127.0.0.1 (mutual TLS) with heart-disease hospitals as ``SiteRunner``
threads (the code behind ``consortium client``). Checked here:

- the federated permutation importance over gRPC equals the simulation's computation on the
  deployed final model and the hospitals' own test splits when the permutations are the same
  (the test alone replaces each site's CSPRNG-keyed generator by the simulation's seeded one),
  and the calibration (ECE per site and overall) equals ``interpret_model``'s;
- contribution over gRPC (exact Shapley, coalition models evaluated at the sites) ranks a
  label-shuffling fifth site last with a score ≤ 0;
- a hostile site whose interpret sums are impossible is refused with the reason and left out;
  the server finishes and writes the others' interpretation;
- the site's own rules against a hostile server (unit level, the site's real code): a SHAP
  sample or background of fewer than ``min_count`` rows is refused, a calibration bin below it
  suppressed, another model's digest, a second request, a policy's ``interpret = false`` and
  an oversized or mis-sized batch of coalition models refused.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.analytics import wire
from consortium.deploy import interpret_site
from consortium.deploy.codec import AnalysisResultEnvelope, AnalysisTaskEnvelope
from consortium.deploy.interpret import ContributionExpectation, InterpretExpectation
from consortium.deploy.interpret_site import InterpretSite, model_digest
from consortium.deploy.validate import RejectedResult
from consortium.seeds import derive_seed
from tests.deploy.inprocess import result_into, serve_into

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
BASE = ["rounds=3", "evaluation.baselines=[]", "seed=0"]
INTERPRET = ["interpret.importance=permutation", "interpret.repeats=2",
             "interpret.calibration=true", "interpret.coefficients=true"]


def _hospital(d: Path, site: str, *, shuffled_from: str | None = None) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    raw = (files("consortium.data") / "_heart_disease" / SITES[shuffled_from or site]).read_text()
    if shuffled_from:  # the same rows, the label column permuted
        rows = [line.split(",") for line in raw.splitlines() if line.strip()]
        labels = [r[-1] for r in rows]
        order = np.random.default_rng(7).permutation(len(rows))
        raw = "\n".join(",".join(r[:-1] + [labels[i]]) for r, i in zip(rows, order)) + "\n"
    path.write_text(raw)
    return path


def _seeded_rng(seed: int) -> Any:
    """The simulation's generators (tests only: a deployed site draws from its own CSPRNG)."""
    return lambda client, part, site: np.random.default_rng(
        derive_seed(seed, "interpret", part, site))


def _deploy(d: Path, overrides: list[str], files: dict[str, Path], *,
            runner: dict[str, type] | None = None) -> dict[str, Any]:
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.provision import provision

    provision(tuple(files), d / "certs")
    approve = (manifest_hash(load_config(None, overrides)),)
    ports: queue.Queue[int] = queue.Queue()
    out: dict[str, Any] = {"run": d / "run", "sites": {}}
    serve = serve_into(out, ports, certs=d / "certs" / "server", out=d / "run",
                       min_sites=len(files), overrides=overrides, register_timeout=60,
                       round_timeout=60, heartbeat_s=10)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(interpret_site, "_site_rng", _seeded_rng(0))
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {out.get('served')!r}"
        threads = []
        for name, path in files.items():
            cls = (runner or {}).get(name, SiteRunner)
            r = cls(f"127.0.0.1:{port}", site=name, data=path, certs=d / "certs" / "sites" / name,
                    approve=approve, poll_s=1, give_up_after_s=30, state_dir=d / "state" / name)
            t = threading.Thread(target=result_into(out["sites"], name, r.run), daemon=True)
            t.start()
            threads.append(t)
        server.join(timeout=300)
        for t in threads:
            t.join(timeout=30)
    assert not isinstance(out.get("served"), BaseException), out.get("served")
    out["summary"] = json.loads((d / "run" / "summary.json").read_text())
    return out


# ------------------------------------------------------------------ interpretation over gRPC


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("interpret-grpc")
    return _deploy(d, BASE + INTERPRET, {s: _hospital(d, s) for s in HOSPITALS})


def _simulated_interpretation(run: Path) -> dict[str, Any]:
    """``interpret_model`` (the simulation's) on the deployed final model and the hospitals'
    test splits as ``consortium run`` builds them."""
    import tomllib
    from safetensors.torch import load_file

    from consortium.config import ExperimentConfig
    from consortium.data import load_dataset
    from consortium.interpret import interpret_model
    from consortium.models.zoo import model_factory

    cfg = ExperimentConfig.from_dict(tomllib.loads((run / "config.toml").read_text()))
    data = load_dataset(cfg.data, seed=cfg.seed)
    module = model_factory(cfg.model.name, data.input_shape, data.num_classes,
                           hidden=cfg.model.hidden)()
    module.load_state_dict(load_file(str(run / "model.safetensors")))
    return interpret_model(cfg.interpret, module, data, seed=cfg.seed)


def test_importance_over_grpc_equals_the_simulations(interpreted: dict[str, Any]) -> None:
    it = interpreted["summary"]["interpret"]
    assert it["deployed"]["sites"] == sorted(HOSPITALS) and it["deployed"]["excluded"] == {}
    ref = _simulated_interpretation(interpreted["run"])
    assert it["features"] == ref["features"]
    got, want = it["permutation"], ref["permutation"]
    assert got["n"] == want["n"] == 231 and got["repeats"] == 2
    for kind in ("loss", "accuracy"):
        assert set(got[kind]) == set(want[kind])
        for f, v in want[kind].items():
            assert got[kind][f] == pytest.approx(v, abs=1e-9), (kind, f)
    for site, values in want["sites"].items():
        assert got["sites"][site] == pytest.approx(values, abs=1e-9)
    assert got["ranking"][:3] == want["ranking"][:3]
    assert it["coefficients"]["ranking"] == ref["coefficients"]["ranking"]


def _ece(*sites: list[dict[str, Any]], k: int = 5) -> float:
    """ECE by hand from the reliability bins of ``sites`` (as the simulation reports them),
    each site's bins under ``k`` rows left out (what a deployed site suppresses), added."""
    count, observed, predicted = np.zeros(10), np.zeros(10), np.zeros(10)
    for bins in sites:
        for j, b in enumerate(bins):
            if b["n"] >= k:
                count[j] += b["n"]
                observed[j] += b["n"] * b["observed"]
                predicted[j] += b["n"] * b["mean_predicted"]
    return float(np.abs(observed - predicted).sum() / count.sum())


def test_calibration_over_grpc_matches(interpreted: dict[str, Any]) -> None:
    cal = interpreted["summary"]["interpret"]["calibration"]
    ref = _simulated_interpretation(interpreted["run"])["calibration"]
    assert set(cal["sites"]) == set(ref["sites"]) == set(HOSPITALS)
    for site, want in ref["sites"].items():
        assert cal["sites"][site]["ece"] == pytest.approx(_ece(want["bins"]), abs=1e-12)
        small = [b for b, row in enumerate(want["bins"]) if 0 < row["n"] < 5]
        assert cal.get("suppressed", {}).get(site, []) == small
    assert cal["overall"]["ece"] == pytest.approx(
        _ece(*(w["bins"] for w in ref["sites"].values())), abs=1e-12)
    page = (interpreted["run"] / "report.html").read_text()
    assert "<h2>Feature importance</h2>" in page and "<h2>Calibration</h2>" in page


# ----------------------------------------------------- contribution, and a hostile site, over gRPC


def _hostile_runner() -> type:
    from consortium.deploy.client import SiteRunner

    class Hostile(SiteRunner):
        """Trains honestly; its interpret sums claim more correct rows than it holds."""

        def _interpreter(self, session: Any) -> Any:
            real = super()._interpreter(session)

            class Lying:
                def answer(self, task: AnalysisTaskEnvelope) -> AnalysisResultEnvelope:
                    got = real.answer(task)
                    if task.phase != "interpret" or got.error is not None:
                        return got
                    body = json.loads(got.body)
                    body["permutation"]["correct"] = {f: 10**9 for f in body["permutation"]["correct"]}
                    return AnalysisResultEnvelope(task.task_id, task.phase, wire.dumps(body))

                def respond(self, *args: Any, **kwargs: Any) -> Any:
                    return real.respond(*args, **kwargs)

            return Lying()

    return Hostile


def _csv(d: Path, site: str, *, shuffled_from: str | None = None) -> Path:
    """A hospital's file as a CSV table (the diagnosis as ``label`` = num > 0): a heart-disease
    deployment admits only the four hospitals' names, a table any site."""
    from consortium.data.heart_disease import COLUMNS

    rows = [r.split(",") for r in _hospital(d, site, shuffled_from=shuffled_from)
            .read_text().splitlines()]
    path = d / f"{site}.csv"
    path.write_text("\n".join([",".join((*COLUMNS[:-1], "label"))] + [
        ",".join(["" if v == "?" else v for v in r[:-1]] + [str(int(float(r[-1]) > 0))])
        for r in rows]) + "\n")
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("contribution-grpc")
    files = {s: _csv(d, s) for s in HOSPITALS}
    files["shuffled"] = _csv(d, "shuffled", shuffled_from="hungarian")
    over = ["rounds=4", "evaluation.baselines=[]", "seed=0", "sampling.clients_per_round=5",
            "data.dataset=csv", "data.target=label",
            "contribution.method=exact-shapley", "interpret.importance=permutation",
            "interpret.repeats=1"]
    return _deploy(d, over, files, runner={"va": _hostile_runner()})


def test_contribution_over_grpc_ranks_the_shuffled_site_last(scored: dict[str, Any]) -> None:
    c = scored["summary"]["contribution"]
    assert c["method"] == "exact-shapley" and c["rounds"] == 4
    assert c["ranking"][-1] == "shuffled" and c["scores"]["shuffled"] <= 0
    assert "shuffled" in c["flagged"]
    assert sum(c["scores"].values()) == pytest.approx(c["total"], abs=1e-9)
    assert c["deployed"]["models_evaluated"] > 0 and c["deployed"]["excluded"] == {}


def test_a_hostile_sites_impossible_sums_are_refused(scored: dict[str, Any]) -> None:
    it = scored["summary"]["interpret"]
    assert "va" in it["deployed"]["excluded"]
    assert "permutation.correct" in it["deployed"]["excluded"]["va"]
    assert it["deployed"]["sites"] == sorted({*HOSPITALS, "shuffled"} - {"va"})
    assert set(it["permutation"]["sites"]) == set(it["deployed"]["sites"])


# -------------------------------------------------------- the site's rules against its server


class _Split(SimpleNamespace):
    def __len__(self) -> int:
        return len(self.y)


def _site(rows: int = 40, *, policy: Any = None) -> tuple[InterpretSite, Any]:
    from consortium.client.environment import SiteEnvironment
    from consortium.config import load_config
    from consortium.privacy.randomness import SeededRandomness
    from consortium.types import Parameters

    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, 3, generator=g)
    y = (x[:, 0] > 0).long()
    factory = lambda: torch.nn.Linear(3, 2)
    client = SimpleNamespace(
        data=SimpleNamespace(train=_Split(x=x, y=y), test=_Split(x=x, y=y)),
        model_factory=factory, num_classes=2,
        environment=SiteEnvironment(randomness=SeededRandomness(1), run_id="r"))
    params = Parameters.from_module(factory())
    site = InterpretSite("north", client, ["a", "b", "c"], policy=policy,
                         cfg=load_config(None, []))
    site.saw(3, params)
    return site, params


def _ask(site: InterpretSite, **request: Any) -> AnalysisResultEnvelope:
    return site.answer(AnalysisTaskEnvelope("t", "interpret", wire.dumps(request)))


def _request(params: Any, **changes: Any) -> dict[str, Any]:
    return {"permutation": True, "shap": False, "calibration": True, "repeats": 2,
            "sample": 20, "background": 20, "bins": 10, "secure": False,
            "model_sha256": model_digest(params.vector), **changes}


def test_a_hostile_server_gets_no_per_record_value() -> None:
    site, params = _site()
    assert site.min_count == 5  # the analytics' default (DataSHIELD's nfilter)
    for bad, why in (({"shap": True, "sample": 1}, "SHAP values only over at least"),
                     ({"shap": True, "background": 1}, "SHAP values only over at least"),
                     ({"bins": 1}, "10 equal-width bins"),
                     ({"model_sha256": "0" * 64}, "not the one site 'north' evaluated last"),
                     ({"repeats": 10**6}, "repeats")):
        got = _ask(site, **_request(params, **bad))
        assert got.refused and why in (got.error or ""), (bad, got.error)
    got = _ask(site, **_request(params))
    assert got.error is None
    body = json.loads(got.body)
    cal = body["calibration"]
    for b, count in enumerate(cal["bin_n"]):  # every released bin holds ≥ min_count rows
        assert count == 0 or count >= 5
        if b in cal["suppressed"]:
            assert count == 0 and cal["bin_p"][b] == 0 and cal["bin_y"][b] == 0
    assert set(body["permutation"]["loss"]) == {"a", "b", "c"}
    again = _ask(site, **_request(params))  # one interpretation per run
    assert again.refused and "once per run" in (again.error or "")


def test_a_small_split_or_a_refusing_policy_answers_nothing() -> None:
    from consortium.privacy.policy import SitePolicy

    site, params = _site(rows=4)
    got = _ask(site, **_request(params))
    assert got.refused and "fewer test rows than its min_count" in (got.error or "")
    site, params = _site(policy=SitePolicy(interpret=False, contribution=False))
    got = _ask(site, **_request(params))
    assert got.refused and "interpret = false" in (got.error or "")
    models = wire.dumps({"count": 1, "size": params.vector.numel(), "models": ""})
    got = site.answer(AnalysisTaskEnvelope("t", "contribution", models))
    assert got.refused and "contribution = false" in (got.error or "")


def test_coalition_model_batches_are_checked() -> None:
    import base64

    site, params = _site()
    d = params.vector.numel()

    def ask(count: int, size: int, raw: bytes) -> AnalysisResultEnvelope:
        return site.answer(AnalysisTaskEnvelope("t", "contribution", wire.dumps(
            {"count": count, "size": size, "models": base64.b64encode(raw).decode()})))

    vectors = torch.stack([params.vector, torch.full((d,), float("nan"))])
    got = ask(2, d, vectors.numpy().astype("<f4").tobytes())
    assert got.error is None
    body = json.loads(got.body)
    assert body["n"] == 40 and body["loss"][1] == 100.0 * 40 and body["correct"][1] == 0
    assert ask(1, d + 1, b"\0" * 4 * (d + 1)).refused  # another model's size
    assert ask(2, d, b"\0" * 4 * d).refused  # fewer bytes than it says
    too_many = ask(interpret_site.MAX_CONTRIBUTION_MODELS, d, b"")
    assert too_many.refused and "at most" in (too_many.error or "")


def test_the_server_rejects_malformed_or_oversized_sums() -> None:
    from consortium.deploy.interpret import MAX_ANSWER_BYTES

    parts = {"permutation": True, "shap": False, "calibration": False}
    expect = InterpretExpectation("north", "t", parts, 2, secure=False)

    def check(body: bytes) -> Any:
        return expect.check(AnalysisResultEnvelope("t", "interpret", body))

    good = {"n": 10, "columns": ["a", "b"], "width": 2, "permutation": {
        "n": 10, "repeats": 2, "base_loss": 5.0, "base_correct": 7,
        "loss": {"a": 12.0, "b": 11.0}, "correct": {"a": 12, "b": 13}}}
    assert check(wire.dumps(good))["permutation"]["correct"] == {"a": 12, "b": 13}
    for broken in ({**good, "n": -1}, {**good, "extra": 1},
                   {**good, "permutation": {**good["permutation"], "correct": {"a": 21, "b": 0}}},
                   {**good, "permutation": {**good["permutation"], "loss": {"a": 1.0}}},
                   {**good, "permutation": {**good["permutation"], "repeats": 3}},
                   {**good, "columns": ["a"]}):
        with pytest.raises(RejectedResult, match="rejected interpret answer from site 'north'"):
            check(wire.dumps(broken))
    with pytest.raises(RejectedResult, match="over the limit"):
        check(b" " * (MAX_ANSWER_BYTES + 1))
    with pytest.raises(RejectedResult, match="not valid JSON"):
        check(b'{"n": NaN}')
    batch = ContributionExpectation("north", "t", 2)
    ok = batch.check(AnalysisResultEnvelope("t", "contribution", wire.dumps(
        {"n": 10, "loss": [1.0, 2.0], "correct": [3, 4]})))
    assert ok[0] == 10 and ok[2].tolist() == [3.0, 4.0]
    for broken in ({"n": 10, "loss": [1.0], "correct": [3, 4]},
                   {"n": 10, "loss": [1.0, -2.0], "correct": [3, 4]},
                   {"n": 10, "loss": [1.0, 2.0], "correct": [3, 11]}):
        with pytest.raises(RejectedResult, match="contribution answer"):
            batch.check(AnalysisResultEnvelope("t", "contribution", wire.dumps(broken)))


# ------------------------------------------------------- under secure aggregation: totals only


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("interpret-secagg")
    over = BASE + INTERPRET + ["secure_aggregation.enabled=true",
                               "secure_aggregation.threshold=0.67"]
    return _deploy(d, over, {s: _hospital(d, s) for s in HOSPITALS})


def test_under_secure_aggregation_the_server_reads_only_the_total(secure: dict[str, Any]) -> None:
    it = secure["summary"]["interpret"]
    assert it["deployed"]["secure_aggregation"] is True
    assert "per-site importances" in it["deployed"]["notes"][0]
    assert it["permutation"]["sites"] == {} and it["calibration"]["sites"] == {}
    ref = _simulated_interpretation(secure["run"])
    for kind in ("loss", "accuracy"):  # the total equals the pooled sums (fixed point 2^-40)
        for f, v in ref["permutation"][kind].items():
            assert it["permutation"][kind][f] == pytest.approx(v, abs=1e-9), (kind, f)
    # the total's bins under min_count are suppressed (the sites suppress nothing themselves)
    total = ref["calibration"]["overall"]["bins"]
    small = [b for b, row in enumerate(total) if 0 < row["n"] < 5]
    assert it["calibration"]["suppressed"] == ({"(secure total)": small} if small else {})
    assert it["calibration"]["overall"]["ece"] == pytest.approx(_ece(total), abs=1e-9)


def test_the_manifest_shows_what_interpret_and_contribution_ask() -> None:
    from consortium.client.approval import experiment_manifest, format_manifest, manifest_hash
    from consortium.config import load_config

    plain = load_config(None, [])
    cfg = load_config(None, INTERPRET + ["contribution.method=leave-one-out"])
    text = format_manifest(experiment_manifest(cfg))
    assert "permutation-importance sums per feature (2 shuffles" in text
    assert "per calibration bin (10)" in text and "nothing over fewer than 5 rows" in text
    assert "summed loss and correct count" in text and "contribution = false refuses" in text
    assert manifest_hash(cfg) != manifest_hash(plain)
    assert "after the last round" not in format_manifest(experiment_manifest(plain))


@pytest.mark.parametrize("method", ["gtg-shapley", "tmc-shapley", "exact-shapley"])
def test_batched_site_evaluation_scores_as_the_simulation(method: str) -> None:
    """The deployed scoring (coalition models batched to the sites: the real site and server
    checks, without the network) equals scoring with the pooled sites' data in process."""
    from consortium.contribution.recording import (
        ContributionRecorder,
        ModelUtility,
        RoundUpdates,
        Settings,
        combine_rounds,
        score_round,
    )
    from consortium.data.base import Split
    from consortium.deploy.interpret import deployed_contribution

    sites = {name: _site(rows)[0] for name, rows in (("north", 40), ("south", 30))}
    _, params = _site()
    g = torch.Generator().manual_seed(3)
    d = params.vector.numel()
    rounds = [RoundUpdates(r, torch.randn(d, generator=g), ("a", "b", "c", "d"),
                           torch.randn(4, d, generator=g), torch.tensor([1.0, 2.0, 3.0, 4.0],
                                                                        dtype=torch.float64))
              for r in (1, 2)]
    settings = Settings(method, utility="loss", permutations=12, seed=5)
    recorder = ContributionRecorder(settings, lambda v: 0.0, start=rounds[0].start,
                                    sites=["a", "b", "c", "d"], kept=list(rounds))

    class Asker:
        excluded: dict[str, str] = {}
        batches = 0

        def sites(self) -> list[str]:
            return sorted(sites)

        def ask(self, phase: str, requests: Any, expect: Any, *, answer_bytes: int) -> Any:
            Asker.batches += 1
            out = {}
            for name, request in requests.items():
                got = sites[name].answer(AnalysisTaskEnvelope("t", phase, request))
                out[name] = expect(name, "t").check(got)
            return out

    out = deployed_contribution(recorder, Asker(), {})  # type: ignore[arg-type]
    pooled = Split(torch.cat([s.client.data.test.x for s in sites.values()]),
                   torch.cat([s.client.data.test.y for s in sites.values()]))
    local = ModelUtility(lambda: torch.nn.Linear(3, 2), params, pooled, utility="loss")
    want = combine_rounds([score_round(r, local, settings) for r in rounds], recorder.sites,
                          settings)
    # the sites sum the cross-entropy in float64, ModelUtility averages it in float32
    assert out["scores"] == pytest.approx(want["scores"], rel=1e-5)
    assert out["flagged"] == want["flagged"]
    assert Asker.batches == 1  # every coalition the estimator needed, in one batch
    assert out["deployed"]["models_evaluated"] <= 2 * 2**4


def test_a_hostile_server_over_grpc_gets_no_per_record_value(tmp_path: Path) -> None:
    """The real ``SiteRunner`` against a scripted server (tests/deploy/hostile.py): after an
    evaluation task it asks for SHAP over 1 row, 1 calibration bin, another model, then a
    valid interpretation, then a second one."""
    from consortium.deploy.codec import EvaluationEnvelope, TaskEnvelope
    from consortium.messages import Task
    from tests.deploy.hostile import HostileServer
    from tests.deploy.test_hostile_server import BASE, _hash, _logistic_params, _runner, _Site

    config = BASE + '[interpret]\nimportance = "permutation"\ncalibration = true\n'
    with HostileServer(config) as hostile:
        site = _Site(_runner(hostile, tmp_path, approve=[_hash(config)]))
        assert hostile.service.described.wait(60), site.error
        params = _logistic_params(hostile.service.info)
        hostile.send(TaskEnvelope("e", Task(round=3, client_id="east", parameters=params,
                                            seed=0), evaluate=True))
        assert isinstance(hostile.upload(), EvaluationEnvelope)
        answers = []
        for changes in ({"shap": True, "sample": 1}, {"bins": 1}, {"model_sha256": "1" * 64},
                        {}, {}):
            request = wire.dumps(_request(params, **changes))
            hostile.send(AnalysisTaskEnvelope(f"a{len(answers)}", "interpret", request))
            answers.append(hostile.upload())
        hostile.finish()
        site.join()
    sample, bins, other, good, again = answers
    assert sample.refused and "SHAP values only over at least min_count = 5" in sample.error
    assert bins.refused and "10 equal-width bins" in bins.error
    assert other.refused and "evaluated last" in other.error
    assert again.refused and "once per run" in again.error
    body = json.loads(good.body)
    assert body["n"] == 20 and body["columns"] == ["f1", "f2", "f3", "f4"]
    assert all(c == 0 or c >= 5 for c in body["calibration"]["bin_n"])
    assert set(body) == {"n", "columns", "width", "permutation", "calibration"}


def test_a_site_answers_shap_with_per_feature_sums_only() -> None:
    """SHAP at a site: mean-|SHAP| sums per feature over the sample it drew itself, never a
    value per row; on a linear model whose logit difference depends on feature a alone, a
    dominates (|SHAP| of b and c is 0 up to the explainer's error)."""
    pytest.importorskip("shap")
    site, params = _site(rows=40)
    with torch.no_grad():  # logit difference = 2·a: only feature a moves the prediction
        weight = torch.zeros(2, 3)
        weight[1, 0] = 2.0
        module = torch.nn.Linear(3, 2)
        module.weight.copy_(weight)
        module.bias.zero_()
    from consortium.types import Parameters

    params = Parameters.from_module(module)
    site.saw(3, params)
    got = _ask(site, **_request(params, shap=True, permutation=False, calibration=False))
    assert got.error is None, got.error
    body = json.loads(got.body)
    shap_sums = body["shap"]
    assert shap_sums["n"] == 20  # the request's sample, drawn at the site
    assert set(shap_sums["abs_sum"]) == {"a", "b", "c"}
    for f in ("a", "b", "c"):  # a sum over rows, not a list of per-row values
        assert isinstance(shap_sums["abs_sum"][f], float)
        assert shap_sums["abs_sum"][f] >= abs(shap_sums["sum"][f]) - 1e-9
    assert shap_sums["abs_sum"]["a"] > 0.1
    assert shap_sums["abs_sum"]["b"] < 1e-6 * shap_sums["abs_sum"]["a"] + 1e-9
    assert shap_sums["abs_sum"]["c"] < 1e-6 * shap_sums["abs_sum"]["a"] + 1e-9
