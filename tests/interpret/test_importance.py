"""Federated permutation importance: equal to the pooled computation, feature groups, sums only."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from consortium.errors import DataError
from consortium.interpret import (
    SiteImportance,
    aggregate_importance,
    feature_groups,
    site_differences,
    site_permutation_importance,
)

NAMES = ["age", "cp=1", "cp=2", "cp=3", "chol", "chol_missing", "ca"]


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(len(NAMES), 8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 2))


def _site(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(NAMES), generator=g)
    cp = torch.randint(0, 3, (n,), generator=g)
    x[:, 1:4] = F.one_hot(cp, 3).float()
    y = ((x[:, 0] + cp.float() + 0.3 * torch.randn(n, generator=g)) > 1).long()
    return x, y


def test_feature_groups_join_one_hot_blocks_and_missing_indicators() -> None:
    assert feature_groups(NAMES, len(NAMES)) == {
        "age": [0], "cp": [1, 2, 3], "chol": [4, 5], "ca": [6]}
    assert feature_groups(["a_missing"], 1) == {"a_missing": [0]}  # no "a": its own feature
    assert feature_groups(None, 2) == {"x0": [0], "x1": [1]}
    with pytest.raises(DataError, match="feature_names"):
        feature_groups(["a"], 2)


def test_federated_equals_pooled_with_the_same_permutations() -> None:
    # float64 throughout, so that batching the forward passes differently changes no bit
    model, groups, repeats = _model().double(), feature_groups(NAMES, len(NAMES)), 3
    sites = {cid: (x.double(), y) for cid, (x, y) in
             {"a": _site(40, 1), "b": _site(17, 2), "c": _site(63, 3)}.items()}
    fed = aggregate_importance({
        cid: site_permutation_importance(model, x, y, groups, repeats=repeats,
                                         rng=np.random.default_rng(k))
        for k, (cid, (x, y)) in enumerate(sites.items())})
    # The pooled computation: all rows together, each repeat and feature shuffled by the
    # block permutation that keeps every site's rows among themselves (same draws, same order).
    x_all = torch.cat([x for x, _ in sites.values()])
    y_all = torch.cat([y for _, y in sites.values()])
    rngs = {cid: np.random.default_rng(k) for k, cid in enumerate(sites)}
    perms: dict[tuple[int, str], np.ndarray] = {}
    offsets = np.cumsum([0] + [len(x) for x, _ in sites.values()])
    per_site: dict[str, dict[tuple[int, str], np.ndarray]] = {cid: {} for cid in sites}
    for cid, (x, _) in sites.items():
        for r in range(repeats):
            for f in groups:
                per_site[cid][(r, f)] = rngs[cid].permutation(len(x))
    for r in range(repeats):
        for f in groups:
            perms[(r, f)] = np.concatenate(
                [per_site[cid][(r, f)] + offsets[k] for k, cid in enumerate(sites)])
    with torch.no_grad():
        base = F.cross_entropy(model(x_all).double(), y_all).item()
        base_acc = (model(x_all).argmax(1) == y_all).double().mean().item()
        for f, cols in groups.items():
            losses, accs = [], []
            for r in range(repeats):
                xp = x_all.clone()
                xp[:, cols] = x_all[torch.from_numpy(perms[(r, f)])][:, cols]
                out = model(xp).double()
                losses.append(F.cross_entropy(out, y_all).item())
                accs.append((out.argmax(1) == y_all).double().mean().item())
            assert fed["loss"][f] == pytest.approx(np.mean(losses) - base, rel=1e-12, abs=1e-12)
            assert fed["accuracy"][f] == pytest.approx(base_acc - np.mean(accs), abs=1e-12)
    assert fed["n"] == 120 and fed["repeats"] == repeats
    assert fed["ranking"][0] in ("age", "cp")  # the label is built from age and cp
    assert set(fed["sites"]) == {"a", "b", "c"}


def test_one_hot_block_is_shuffled_together() -> None:
    seen: list[torch.Tensor] = []

    class Spy(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.clone())
            return torch.zeros(len(x), 2)

    x, y = _site(30, 4)
    groups = feature_groups(NAMES, len(NAMES))
    site_permutation_importance(Spy(), x, y, groups, repeats=1, rng=np.random.default_rng(0))
    shuffled = seen[-1].reshape(len(groups), 30, len(NAMES))
    cp = shuffled[list(groups).index("cp")]
    assert torch.equal(cp[:, 1:4].sum(1), torch.ones(30))  # every row still one category
    assert torch.equal(cp[:, [0, 4, 5, 6]], x[:, [0, 4, 5, 6]])  # nothing else moved
    rows = {tuple(r.tolist()) for r in cp[:, 1:4]}
    assert rows <= {tuple(r.tolist()) for r in x[:, 1:4]}


def test_an_unused_feature_has_zero_importance() -> None:
    model = torch.nn.Linear(len(NAMES), 2)
    with torch.no_grad():
        model.weight[:, 6] = 0.0  # "ca" is ignored by the model
    x, y = _site(50, 5)
    s = site_permutation_importance(model, x, y, feature_groups(NAMES, len(NAMES)), repeats=2,
                                    rng=np.random.default_rng(1))
    imp = s.importance()
    assert abs(imp["loss"]["ca"]) < 1e-9 and imp["accuracy"]["ca"] == 0.0
    assert s.n == 50 and set(vars(s)) == {"n", "repeats", "base_loss", "base_correct", "loss",
                                          "correct"}  # sums only: no row leaves the site


def test_mismatched_repeats_are_refused() -> None:
    a = SiteImportance(3, 2, 1.0, 2, {"f": 1.0}, {"f": 1})
    b = SiteImportance(3, 5, 1.0, 2, {"f": 1.0}, {"f": 1})
    with pytest.raises(DataError, match="interpret.repeats"):
        aggregate_importance({"a": a, "b": b})


def test_site_differences_flag_a_feature_used_differently() -> None:
    per_site = {"a": {"f": 0.9, "g": 0.1}, "b": {"f": 0.5, "g": 0.5}, "c": {"f": 0.45, "g": 0.55}}
    out = site_differences(per_site, ratio=3.0, floor=0.1)
    assert [x["feature"] for x in out["flagged"]] == ["g"]
    assert out["flagged"][0]["most"] == "c" and out["flagged"][0]["least"] == "a"
    assert out["features"]["f"]["spread"] == pytest.approx(0.45)
    assert out["features"]["g"]["ratio"] == pytest.approx(5.5)


def test_a_small_difference_in_share_is_not_flagged() -> None:
    # shares .04 and .01: four times larger, but only 3 points of the site's importance
    per_site = {"a": {"f": 0.96, "g": 0.04}, "b": {"f": 0.99, "g": 0.01}}
    assert site_differences(per_site, ratio=3.0, floor=0.1)["flagged"] == []
