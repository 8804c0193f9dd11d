"""The local-only baseline in a deployment: each site trains alone at home and reports only
its metrics, if its policy lets them leave.

A real ``serve()`` on 127.0.0.1 (mutual TLS) and the four heart-disease hospitals as
``SiteRunner`` threads, with ``evaluation.baselines = ["local", "pooled"]``: the server skips
the pooled baseline with the reason, keeps the local one, and each site trains its own model
after the last round. Three sites' policies list the ``local_*`` metrics in ``send_metrics``;
the fourth (``va``) does not, and its numbers never reach the server. ``summary.json`` has
``baselines.local`` (the reporting sites' weighted metrics, the budget, who reported) and
``per_client[site]["local_accuracy"]``, and the local-only numbers do not leak into the
federated ones.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from tests.deploy.inprocess import result_into, serve_into

HOSPITALS = ("cleveland", "hungarian", "switzerland", "va")
SILENT = "va"  # its policy keeps the local-only metrics at home
ROUNDS = 3
OVERRIDES = [f"rounds={ROUNDS}", 'evaluation.baselines=["local", "pooled"]']
LOCAL = ["local_accuracy", "local_balanced_accuracy", "local_auc", "local_loss"]


def _hospital(d: Path, site: str) -> Path:
    from importlib.resources import files

    from consortium.data.heart_disease import SITES

    path = d / f"{site}.data"
    path.write_bytes((files("consortium.data") / "_heart_disease" / SITES[site]).read_bytes())
    return path


def _policy(d: Path, site: str) -> Path:
    allowed = [] if site == SILENT else LOCAL
    path = d / f"{site}-policy.toml"
    path.write_text('[default]\napprove = "matching"\nsend_metrics = '
                    + json.dumps(allowed) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from consortium.deploy import hub as hub_module
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.provision import provision

    d = tmp_path_factory.mktemp("local-baseline-grpc")
    provision(HOSPITALS, d / "certs")
    ports: queue.Queue[int] = queue.Queue()
    out: dict[str, Any] = {"run": d / "run", "sites": {}, "evaluations": []}
    serve = serve_into(
        out, ports, certs=d / "certs" / "server", out=d / "run", min_sites=len(HOSPITALS),
        overrides=OVERRIDES, register_timeout=60, round_timeout=60, heartbeat_s=10,
    )
    real = hub_module._keep_local_report
    import consortium.server.baselines as baselines
    from consortium.deploy import client as client_module

    real_alone, real_fit = baselines.train_alone, client_module._Site.fit

    def alone(*args: Any, **kwargs: Any) -> Any:  # the steps each site's own model trained
        out.setdefault("alone", {})[threading.current_thread().name] = kwargs.get("steps")
        return real_alone(*args, **kwargs)

    def fit(self: Any, task: Any) -> Any:  # the steps each site trained in the federation
        result = real_fit(self, task)
        fits = out.setdefault("fits", {}).setdefault(threading.current_thread().name, [])
        fits.append(int(result.update.metrics["steps"]))
        return result

    def recording(value: Any, reports: Any) -> Any:  # what each site's evaluation carried
        out["evaluations"].append((value.client_id, value.round, dict(value.metrics)))
        out.setdefault("sizes", {})[value.client_id] = value.num_examples
        return real(value, reports)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(hub_module, "_keep_local_report", recording)
        patch.setattr(baselines, "train_alone", alone)
        patch.setattr(client_module._Site, "fit", fit)
        server = threading.Thread(target=serve, daemon=True)
        server.start()
        port = ports.get(timeout=60)
        assert port, f"the server did not start: {out.get('served')!r}"
        runners = {
            name: SiteRunner(f"127.0.0.1:{port}", site=name, data=_hospital(d, name),
                             certs=d / "certs" / "sites" / name, policy=_policy(d, name),
                             poll_s=1, give_up_after_s=30)
            for name in HOSPITALS
        }
        threads = [threading.Thread(target=result_into(out["sites"], n, r.run), daemon=True,
                                    name=n) for n, r in runners.items()]
        for t in threads:
            t.start()
        server.join(timeout=300)
        for t in threads:
            t.join(timeout=30)
    return out


def test_the_sites_report_their_local_baseline_and_the_summary_keeps_it(
    deployed: dict[str, Any],
) -> None:
    assert not isinstance(deployed.get("served"), BaseException), deployed.get("served")
    summary = json.loads((deployed["run"] / "summary.json").read_text())
    baselines = summary["baselines"]
    assert set(baselines) == {"local"}  # pooled: skipped, no empty entry
    local = baselines["local"]
    assert local["reported"] == {"sites": 3, "of": 4}
    # evaluation.baseline_budget = "matched" (the default): each site's own model trained the
    # steps that site trained in the federation (here every round: rounds × its steps)
    assert local["budget"]["mode"] == "matched" and "site" in local["budget"]["where"]
    assert set(deployed["alone"]) == set(HOSPITALS)
    for site, steps in deployed["alone"].items():
        fits = deployed["fits"][site]
        assert len(fits) == ROUNDS and steps == sum(fits) > 0, (site, steps, fits)
    assert 0.0 <= local["accuracy"] <= 1.0 and local["loss"] > 0
    for site in HOSPITALS:
        entry = summary["per_client"][site]
        if site == SILENT:
            assert not any(k.startswith("local_") for k in entry), entry
        else:
            assert 0.0 <= entry["local_accuracy"] <= 1.0
    # the weighted mean over the reporting sites' test splits, as the federated metrics
    from consortium.client.evaluation import summarise_clients

    reported = {s: {k[6:]: v for k, v in m.items() if k.startswith("local_")}
                for s, r, m in deployed["evaluations"] if r == ROUNDS and s != SILENT}
    assert set(reported) == set(HOSPITALS) - {SILENT}
    expected = summarise_clients(reported, {s: deployed["sizes"][s] for s in reported})
    for name in ("accuracy", "loss", "auc", "accuracy_min"):
        assert local[name] == pytest.approx(expected[name], abs=1e-12), name


def test_only_the_last_evaluation_carries_it_and_the_silent_site_sends_none(
    deployed: dict[str, Any],
) -> None:
    evaluations = deployed["evaluations"]
    assert evaluations
    for site, rnd, metrics in evaluations:
        has = any(k.startswith("local_") for k in metrics)
        assert has == (rnd == ROUNDS and site != SILENT), (site, rnd, sorted(metrics))


def test_the_local_numbers_stay_out_of_the_federated_ones(deployed: dict[str, Any]) -> None:
    summary = json.loads((deployed["run"] / "summary.json").read_text())
    assert not any(k.startswith("local_") for k in summary["final"])
    lines = (deployed["run"] / "metrics.jsonl").read_text().splitlines()
    assert not any("local_" in line for line in lines)


@pytest.mark.parametrize(("name", "value"), [("local_accuracy", 7.0), ("local_auc", -0.5),
                                             ("local_loss", -1.0)])
def test_a_site_cannot_report_an_impossible_local_metric(name: str, value: float) -> None:
    """A hostile site's local-only number out of its range would pull the baseline anywhere."""
    from consortium.deploy.codec import EvaluationEnvelope
    from consortium.deploy.validate import ExpectedTask, RejectedResult, validate_evaluation
    from consortium.messages import EvaluationResult

    good = EvaluationResult(3, "north", 10, {"accuracy": 0.5, "local_accuracy": 0.7})
    expected = ExpectedTask(site="north", round=3, task_id="t1")
    validate_evaluation(EvaluationEnvelope("t1", good), expected=expected, max_bytes=1 << 20,
                        seen_task_ids=set())
    bad = EvaluationResult(3, "north", 10, {"accuracy": 0.5, name: value})
    with pytest.raises(RejectedResult, match=name):
        validate_evaluation(EvaluationEnvelope("t1", bad), expected=expected, max_bytes=1 << 20,
                            seen_task_ids=set())


def test_the_server_keeps_a_sites_local_numbers_apart() -> None:
    from consortium.deploy.hub import _keep_local_report
    from consortium.messages import EvaluationResult

    reports: dict[str, Any] = {}
    value = EvaluationResult(3, "north", 12, {"accuracy": 0.5, "local_accuracy": 0.75,
                                              "local_loss": 0.4})
    kept = _keep_local_report(value, reports)
    assert kept.metrics == {"accuracy": 0.5}
    assert reports == {"north": (12, {"accuracy": 0.75, "loss": 0.4})}
    plain = EvaluationResult(3, "south", 5, {"accuracy": 0.6})
    assert _keep_local_report(plain, reports) is plain and "south" not in reports
