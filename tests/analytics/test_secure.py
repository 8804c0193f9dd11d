"""Analytics through SecAgg+: the total equals the pooled computation, and the server's
messages hold no per-site value."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from consortium.analytics import secure
from consortium.analytics.analysis import analyze, in_process, run_query
from consortium.analytics.query import Query
from consortium.analytics.site import Answer
from consortium.analytics.sources import heart_disease_tables
from consortium.config import ExperimentConfig
from consortium.data._tables import numbers
from consortium.errors import ConfigError, DataError
from consortium.secagg import protocol


def test_encoding_sums_exactly_across_sites() -> None:
    rng = np.random.default_rng(0)
    answers = []
    for s in range(5):
        a = Answer(f"s{s}")
        a.put("all|n", float(rng.integers(0, 10**6)))
        a.put("all|x|s2", rng.normal(0, 1e9, 3) ** 2)
        a.put("all|x|s1", rng.normal(0, 1e4, (2, 3)))
        answers.append(a)
    keys = secure.layout(answers[0])
    total = sum(secure.encode(a, keys) for a in answers) % (1 << 32)
    got = secure.decode(torch.as_tensor(total), keys, len(answers))
    for key, _ in keys:
        expect = sum(a.values[key] for a in answers)
        np.testing.assert_allclose(got.values[key], expect, rtol=1e-15, atol=len(answers) * 2.0**-40)
    assert got.values["all|n"] == sum(a.values["all|n"] for a in answers)  # counts exact


def test_secure_table1_equals_pooled_and_has_no_site_tables() -> None:
    tables = heart_disease_tables()
    q = Query(secure=True)
    res = run_query(in_process(tables, q), q).result
    assert res["table1"]["sites"] == {}
    overall = res["table1"]["overall"]
    age = np.concatenate([numbers(t.columns["age"]) for t in tables.values()])  # type: ignore[misc]
    assert overall["n"] == 920
    assert overall["columns"]["age"]["mean"] == pytest.approx(age.mean(), rel=1e-12)
    assert overall["columns"]["age"]["sd"] == pytest.approx(age.std(ddof=1), rel=1e-9)
    cp = np.concatenate([numbers(t.columns["cp"]) for t in tables.values()])  # type: ignore[misc]
    # cp = 1 is below 5 at Switzerland: withheld there without SecAgg, released in the total
    assert overall["columns"]["cp"]["counts"]["1"] == int((cp == 1).sum())
    # a total below min_count is still withheld (restecg has 2 missing values in all)
    assert overall["columns"]["restecg"]["missing"] is None
    bound = res["quantile_bounds"]["overall"]["age"]["median"]
    assert abs(overall["columns"]["age"]["median"] - np.quantile(age, 0.5, method="inverted_cdf")) <= bound


def test_the_server_receives_only_masked_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    tables = heart_disease_tables()
    received: list[torch.Tensor] = []
    original = protocol.SecAggServer.collect_masked

    def spy(self: protocol.SecAggServer, messages):  # type: ignore[no-untyped-def]
        messages = list(messages)
        received.extend(m.vector.clone() for m in messages)
        return original(self, messages)

    plain: dict[str, torch.Tensor] = {}
    original_encode = secure.encode

    def keep(answer: Answer, keys):  # type: ignore[no-untyped-def]
        v = original_encode(answer, keys)
        plain[answer.site] = v
        return v

    monkeypatch.setattr(protocol.SecAggServer, "collect_masked", spy)
    monkeypatch.setattr(secure, "encode", keep)
    q = Query(secure=True)
    a = run_query(in_process(tables, q), q)
    assert len(received) == 4 and set(plain) == set(tables)
    keys = secure.layout(a.answers[0])
    at = [k for k, _ in keys].index("all|n") * secure.LIMBS
    for vec in received:
        for site, p in plain.items():
            same = (vec == p).float().mean().item()
            assert same < 0.01, (site, same)  # masked: agrees with no site's plaintext
        # read as plaintext, the masked vector does not give any site's row count
        n_digits = vec[at:at + secure.LIMBS]
        assert n_digits.tolist() not in [p[at:at + secure.LIMBS].tolist() for p in plain.values()]
    assert a.answers[0].site == "(secure total)" and len(a.answers) == 1
    # and nothing per site is in the profile either: no row counts
    assert all(p.n is None for p in a.profiles)


def test_one_site_cannot_be_securely_aggregated() -> None:
    t = {"cleveland": heart_disease_tables()["cleveland"]}
    q = Query(secure=True)
    with pytest.raises(DataError, match="at least 2 sites"):
        run_query(in_process(t, q), q)


def test_bias_report_is_refused_under_secure_aggregation() -> None:
    cfg = ExperimentConfig.from_dict({"secure_aggregation": {"enabled": True}})
    with pytest.raises(ConfigError, match="only totals"):
        analyze(cfg, bias=True)
