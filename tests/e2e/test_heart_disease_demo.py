"""Acceptance: the default demo across the four hospitals is worth federating."""

from __future__ import annotations

import consortium


def test_default_demo_reaches_pooled_accuracy() -> None:
    result = consortium.simulate()  # the embedded default: heart disease, four hospitals
    final = result.summary["final"]
    pooled = result.summary["baselines"]["pooled"]
    local = result.summary["baselines"]["local"]
    assert result.summary["clients"] == 4 and result.summary["rounds"] == 30
    assert final["accuracy"] >= 0.78, final
    assert abs(final["accuracy"] - pooled["accuracy"]) <= 0.02, (final, pooled)
    assert set(result.per_client) == {"cleveland", "hungarian", "switzerland", "va"}
    assert local["accuracy"] is not None and local["accuracy_min"] <= local["accuracy"]
    assert 0.5 < final["auc"] <= 1.0
