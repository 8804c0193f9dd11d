"""Byzantine-robust rules: hand-computed small rounds, properties over seeded random draws,
client-count checks, the registry, and the contract every buffered aggregator keeps."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from typing import Any

import pytest
import torch

from consortium.aggregation.base import Aggregate, Pipeline, RoundContext
from consortium.aggregation.robust import (
    RULES,
    bulyan,
    centered_clipping,
    flame,
    fltrust,
    geometric_median,
    krum,
    make_rule,
    median,
    multi_krum,
    norm_bound,
    trimmed_mean,
)
from consortium.aggregation.robust._krum import krum_scores
from consortium.errors import PipelineError
from consortium.types import Layout, TensorSpec, Update


def layout(d: int) -> Layout:
    return Layout((TensorSpec("w", (d,), torch.float32),))


def ctx(d: int, *, seed: int = 7, round: int = 1) -> RoundContext:
    return RoundContext(round=round, seed=seed, population=100, sampled=10, layout=layout(d))


def updates(rows: Any, weights: list[float] | None = None, *, prefix: str = "c") -> list[Update]:
    m = torch.as_tensor(rows, dtype=torch.float32)
    if m.ndim == 1:
        m = m[:, None]
    w = weights or [1.0] * m.shape[0]
    return [Update(f"{prefix}{i}", m[i].clone(), w[i]) for i in range(m.shape[0])]


def run(rule: Any, ups: list[Update], **kw: Any) -> Aggregate:
    d = ups[0].delta.numel()
    if hasattr(rule, "init"):
        agg, _ = rule.aggregate(ups, ctx=ctx(d, **kw), state=rule.init(layout(d)))
        return agg
    return rule.aggregate(ups, ctx=ctx(d, **kw))


def close(t: torch.Tensor, expected: list[float], tol: float = 1e-5) -> bool:
    return t.tolist() == pytest.approx(expected, abs=tol)


def draw(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# The example: four honest updates on a line, one far away, f = 1.
FIVE = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12], [100, -100, 50]]


# -- the five-update example ------------------------------------------------------------------


def test_median_of_the_five_updates() -> None:
    # per coordinate: (1,4,7,10,100) → 7; (2,5,8,11,−100) → 5; (3,6,9,12,50) → 9
    out = run(median(f=1), updates(FIVE))
    assert out.delta.tolist() == [7.0, 5.0, 9.0]
    assert out.delta.dtype == torch.float32
    assert (out.count, out.weight) == (5, 5.0)
    assert out.info["robust_rule"] == "median"
    # c4 is the largest or smallest in every coordinate: flagged, nothing of it kept
    assert "c4" in out.info["robust_flagged"] and "c4" not in out.info["robust_weights"]


def test_trimmed_mean_of_the_five_updates() -> None:
    # drop the largest and smallest per coordinate: (4,7,10) → 7; (2,5,8) → 5; (6,9,12) → 9
    out = run(trimmed_mean(f=1), updates(FIVE))
    assert out.delta.tolist() == [7.0, 5.0, 9.0]
    assert out.info["robust_trimmed"] == 1


def test_krum_scores_of_the_five_updates() -> None:
    # neighbouring honest updates differ by 3 per coordinate: squared distance 27; two apart
    # 108. With n − f − 2 = 2 neighbours: c0: 27 + 108, c1: 27 + 27, c2: 27 + 27, c3: 27 + 108.
    x = torch.tensor(FIVE, dtype=torch.float64)
    scores = krum_scores(torch.cdist(x, x) ** 2, 2)
    assert scores[:4].tolist() == pytest.approx([135.0, 54.0, 54.0, 135.0])
    assert float(scores[4]) > 10_000


def test_krum_of_the_five_updates_picks_the_smaller_id_of_the_tie() -> None:
    out = run(krum(f=1), updates(FIVE))
    assert out.delta.tolist() == [4.0, 5.0, 6.0]  # c1 and c2 tie at 54; c1 is the smaller id
    assert (out.count, out.weight) == (1, 1.0)
    assert out.info["robust_flagged"] == ["c0", "c2", "c3", "c4"]


def test_krum_scores_exactly_n_minus_f_minus_2_neighbours() -> None:
    # (0, 6, 12, 13, 14), f = 1, 2 neighbours: 0: 36+144, 6: 36+36, 12: 1+4, 13: 1+1, 14: 1+4
    # → 13. (With 3 neighbours 12 would win: 12: 1+4+36 = 41 < 13: 1+1+49 = 51.)
    assert run(krum(f=1), updates([0.0, 6.0, 12.0, 13.0, 14.0])).delta.tolist() == [13.0]


def test_krum_ties_follow_client_ids_not_arrival_order() -> None:
    ups = updates(FIVE)
    assert run(krum(f=1), list(reversed(ups))).delta.tolist() == [4.0, 5.0, 6.0]
    renamed = [replace(u, client_id={"c2": "a2"}.get(u.client_id, u.client_id)) for u in ups]
    assert run(krum(f=1), renamed).delta.tolist() == [7.0, 8.0, 9.0]


def test_multi_krum_of_the_five_updates_averages_the_honest_four() -> None:
    # default m = n − f = 4: the four lowest scores are the honest updates, mean (5.5, 6.5, 7.5)
    out = run(multi_krum(f=1), updates(FIVE))
    assert out.delta.tolist() == [5.5, 6.5, 7.5]
    assert (out.count, out.weight) == (4, 4.0)
    assert out.info["robust_flagged"] == ["c4"]


@pytest.mark.parametrize(
    ("m", "expected"),
    [
        (1, [4.0, 5.0, 6.0]),  # Krum
        (2, [5.5, 6.5, 7.5]),  # c1, c2: the same mean as the honest four, by symmetry
        (3, [4.0, 5.0, 6.0]),  # c1, c2 and c0 (c0 and c3 tie at 135; c0 is the smaller id)
        (4, [5.5, 6.5, 7.5]),  # the default n − f
        (5, [24.4, -14.8, 16.0]),  # everyone: the plain mean
    ],
)
def test_multi_krum_with_each_m(m: int, expected: list[float]) -> None:
    assert close(run(multi_krum(f=1, m=m), updates(FIVE)).delta, expected)


# -- median and trimmed mean -------------------------------------------------------------------


def test_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    out = run(median(f=1), updates([[1.0, -4.0], [2.0, 0.0], [3.0, 1.0], [10.0, 5.0]]))
    assert out.delta.tolist() == [2.5, 0.5]


@pytest.mark.parametrize("n", [3, 4, 5, 6, 9, 10])
def test_median_with_many_ties_matches_the_sorted_definition(n: int) -> None:
    x = torch.randint(0, 3, (n, 200), generator=draw(n)).float()
    s = x.double().sort(dim=0).values
    expected = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    assert torch.equal(run(median(f=1), updates(x)).delta.double(), expected)


def test_median_flags_from_evenly_spaced_coordinates(monkeypatch: pytest.MonkeyPatch) -> None:
    import consortium.aggregation.robust._coordinate as coordinate

    # coordinates 0, 2: c0 largest, c1 smallest; coordinates 1, 3: c0 smallest, c2 largest
    rows = [[9.0, 0.0, 9.0, 0.0], [0.0, 1.0, 0.0, 1.0], [1.0, 2.0, 1.0, 2.0]]
    monkeypatch.setattr(coordinate, "SAMPLE", 2)  # looks at coordinates 0 and 2 only
    assert run(median(f=1), updates(rows)).info["robust_flagged"] == ["c0", "c1"]
    monkeypatch.setattr(coordinate, "SAMPLE", 4)  # all four: c1 and c2 in a tail in 2 of 4
    assert run(median(f=1), updates(rows)).info["robust_flagged"] == ["c0"]


def test_trimmed_mean_with_f_2_by_hand() -> None:
    # column (−50, 1, 2, 4, 8, 90): drop −50, 1 and 8, 90 → (2 + 4) / 2 = 3
    # column (0, 0, 0, 3, 3, 3): drop 0, 0 and 3, 3 → 1.5
    rows = [[-50.0, 0.0], [1.0, 3.0], [2.0, 0.0], [4.0, 3.0], [8.0, 0.0], [90.0, 3.0]]
    assert run(trimmed_mean(f=2), updates(rows)).delta.tolist() == [3.0, 1.5]


def test_trimmed_mean_beta_trims_floor_of_beta_n() -> None:
    ups = updates(FIVE)
    assert run(trimmed_mean(0.2), ups).delta.tolist() == [7.0, 5.0, 9.0]  # ⌊0.2·5⌋ = 1
    assert close(run(trimmed_mean(0.1), ups).delta, [24.4, -14.8, 16.0])  # ⌊0.5⌋ = 0: the mean
    assert trimmed_mean(0.29).trimmed(100) == 29  # although 0.29 * 100 < 29 in floating point


def test_coordinate_rules_ignore_sample_weights() -> None:
    a = run(median(f=1), updates(FIVE, [1.0, 1.0, 1.0, 1.0, 1.0]))
    b = run(median(f=1), updates(FIVE, [9.0, 1.0, 3.0, 1.0, 50.0]))
    assert torch.equal(a.delta, b.delta) and b.weight == 64.0


@pytest.mark.parametrize("rule", [median(f=2), trimmed_mean(f=2), trimmed_mean(f=1)])
def test_coordinate_rules_stay_within_the_honest_range(rule: Any) -> None:
    f = rule.f
    for seed in range(20):
        g = draw(seed)
        n = 2 * f + 1 + seed % 4
        honest = torch.randn(n - f, 8, generator=g)
        # up to f rows of arbitrary values: huge, tiny, or just outside the honest range
        byzantine = (torch.rand(f, 8, generator=g) - 0.5) * 10 ** (seed % 7)
        rows = torch.cat([byzantine, honest])[torch.randperm(n, generator=g)]
        out = run(rule, updates(rows)).delta
        lo, hi = honest.min(dim=0).values, honest.max(dim=0).values
        assert bool((out >= lo - 1e-6).all() and (out <= hi + 1e-6).all()), seed


def test_a_client_in_the_tails_everywhere_is_flagged_with_what_was_kept() -> None:
    # c0 is the smallest in both coordinates (discarded in 2 of 2), c1 the largest in one of 2
    rows = [[-9.0, -9.0], [9.0, 0.5], [0.0, 0.0], [0.1, 9.0], [0.2, 0.2]]
    info = run(trimmed_mean(f=1), updates(rows)).info
    assert info["robust_flagged"] == ["c0"]
    assert info["robust_weights"] == {}  # nothing of c0 was kept; c1 and c3: 1 of 2 is no majority
    # in the five-update example c0 = (1, 2, 3) is the smallest in 2 of 3 coordinates
    info = run(trimmed_mean(f=1), updates(FIVE)).info
    assert info["robust_flagged"] == ["c0", "c4"]
    assert info["robust_weights"] == {"c0": 0.3333}


# -- Krum ------------------------------------------------------------------------------------------


def test_krum_selects_within_its_bound_of_the_honest_mean() -> None:
    """Krum's pick scores at most an honest update's score, ``(n−f−2)·D²`` (D: the largest honest
    pairwise distance), and at least ``n−2f−1 ≥ 1`` of its scored neighbours are honest, so it
    lies within ``√(n−f−2)·D`` of an honest update and ``√(n−f−2)·D + r`` of the honest mean (r:
    the honest radius). Colluders just outside r can win (they are close to each other), so r
    alone is not a bound; anything beyond the bound must never be picked."""
    for seed in range(30):
        g = draw(seed)
        f = 1 + seed % 3
        n = 2 * f + 3 + seed % 5
        honest = torch.randn(n - f, 6, generator=g) + 3.0
        mean = honest.mean(dim=0)
        r = float((honest - mean).norm(dim=1).max())
        pairwise = float(torch.cdist(honest, honest).max())
        direction = torch.randn(6, generator=g)
        direction /= direction.norm()
        # colluders stacked together at a distance from 0.5 r to 100 r, plus a little jitter
        spot = mean + direction * r * [0.5, 1.3, 2.0, 100.0][seed % 4]
        byzantine = spot + 0.01 * torch.randn(f, 6, generator=g)
        rows = torch.cat([honest, byzantine])
        out = run(krum(f=f), updates(rows)).delta
        bound = math.sqrt(n - f - 2) * pairwise + r
        assert float((out - mean).norm()) <= bound + 1e-4, seed
        if seed % 4 == 3:  # far beyond the bound: an honest update is picked
            assert any(torch.equal(out, h) for h in honest), seed


# -- Bulyan --------------------------------------------------------------------------------------


def test_bulyan_one_coordinate_by_hand() -> None:
    # n = 7, f = 1: θ = 5 picked by repeated Krum, then the β = 3 values closest to their median.
    # Picks (squared distances, n' − f − 2 neighbours, at least 1):
    #   n'=7, 4 nb: 0:90 1:63 2:46 6:46 7:63 8:90 100:…  → 2 (tie with 6, smaller id)
    #   n'=6, 3 nb: 0:86 1:62 6:30 7:38 8:54             → 6
    #   n'=5, 2 nb: 0:50 1:37 7:37 8:50                  → 1 (tie with 7)
    #   n'=4, 1 nb: 0:49 7:1 8:1 100:…                   → 7 (tie with 8)
    #   n'=3, 1 nb: 0:64 8:64 100:…                      → 0 (tie with 8)
    # selected (0, 1, 2, 6, 7), median 2; the 3 closest to 2 are (0, 1, 2): mean 1.
    out = run(bulyan(f=1), updates([0.0, 1.0, 2.0, 6.0, 7.0, 8.0, 100.0]))
    assert out.delta.tolist() == [1.0]
    assert (out.count, out.weight) == (5, 5.0)
    # c5 (8) and c6 (100) not selected; c3 (6) and c4 (7) outside the window
    assert out.info["robust_flagged"] == ["c3", "c4", "c5", "c6"]


def naive_bulyan(x: torch.Tensor, f: int) -> torch.Tensor:
    """Bulyan written the slow, obvious way, to check the vectorised one."""
    left = list(range(x.shape[0]))
    chosen = []
    for _ in range(x.shape[0] - 2 * f):
        k = min(max(len(left) - f - 2, 1), len(left) - 1)
        scores = []
        for i in left:
            d = sorted(float(((x[i] - x[j]) ** 2).sum()) for j in left if j != i)
            scores.append(sum(d[:k]))
        chosen.append(left.pop(scores.index(min(scores))))
    sel = x[sorted(chosen)].double()
    beta = sel.shape[0] - 2 * f
    out = []
    for col in sel.T.tolist():
        s = sorted(col)
        m = s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2
        closest = sorted(col, key=lambda v: (abs(v - m), v))[:beta]
        out.append(sum(closest) / beta)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(5))
def test_bulyan_matches_the_naive_version(seed: int) -> None:
    g = draw(seed)
    f = 1 + seed % 2
    n = 4 * f + 3 + seed % 3
    x = torch.randn(n, 9, generator=g)
    x[:f] *= 20.0
    # ids in row order: the late picks (one neighbour) tie between mutual nearest neighbours,
    # and ties go to the smaller id, as in the naive version's row order
    ups = [Update(f"c{i:02d}", x[i].clone(), 1.0) for i in range(n)]
    out = run(bulyan(f=f), ups)
    assert torch.allclose(out.delta.double(), naive_bulyan(x, f), atol=1e-5)


# -- geometric median ------------------------------------------------------------------------------


def test_geometric_median_of_a_square_is_its_center() -> None:
    out = run(geometric_median(), updates([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]))
    assert close(out.delta, [1.0, 1.0])


def test_geometric_median_of_a_flat_triangle_is_its_obtuse_vertex() -> None:
    # the angle at (0, 0) between (1, 0) and (−1, 0.1) is over 120°, so the Fermat point
    # (the geometric median of three points) is that vertex
    out = run(geometric_median(), updates([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.1]]))
    assert close(out.delta, [0.0, 0.0], tol=1e-4)


def test_geometric_median_uses_sample_weights_as_in_the_paper() -> None:
    # weights 1, 1, 5 on (0, 1, 2): the weighted median is 2 (5 > 1 + 1); unweighted it is 1
    ups = updates([0.0, 1.0, 2.0], [1.0, 1.0, 5.0])
    assert close(run(geometric_median(), ups).delta, [2.0], tol=1e-4)
    assert close(run(geometric_median(weighted=False), ups).delta, [1.0], tol=1e-4)


def test_geometric_median_in_one_dimension_is_the_median() -> None:
    for seed in range(10):
        x = torch.randn(2 * (seed % 4) + 3, generator=draw(seed)) * 5
        out = run(geometric_median(max_iterations=500), updates(x))
        assert float(out.delta[0]) == pytest.approx(float(x.median()), abs=1e-4), seed


def test_geometric_median_moves_with_a_translation() -> None:
    for seed in range(5):
        g = draw(seed)
        x = torch.randn(7, 12, generator=g)
        shift = torch.randn(12, generator=g) * 10
        a = run(geometric_median(), updates(x)).delta
        b = run(geometric_median(), updates(x + shift)).delta
        assert torch.allclose(b, a + shift, atol=1e-4), seed


def test_geometric_median_resists_one_far_update_and_flags_it() -> None:
    x = torch.randn(9, 5, generator=draw(0))
    x[4] = 1e6
    out = run(geometric_median(f=1), updates(x))
    assert float((out.delta - x[torch.arange(9) != 4].mean(dim=0)).norm()) < 2.0
    assert out.info["robust_flagged"] == ["c4"]
    assert out.info["robust_weights"]["c4"] < 1e-4
    assert 1 <= out.info["robust_iterations"] <= 100


# -- centered clipping -----------------------------------------------------------------------------


def test_centered_clipping_one_iteration_by_hand() -> None:
    # center 0, τ = 1: (3, 0) → (1, 0); (0, 0.5) stays; (−2, 0) → (−1, 0); mean (0, 1/6)
    rule = centered_clipping(tau=1.0, iterations=1)
    out, state = rule.aggregate(
        updates([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]]), ctx=ctx(2), state=rule.init(layout(2))
    )
    assert close(out.delta, [0.0, 1 / 6])
    assert close(state["center"], [0.0, 1 / 6])
    assert out.info["robust_flagged"] == ["c0", "c2"]
    assert out.info["robust_weights"] == {"c0": pytest.approx(1 / 3, abs=1e-3), "c2": 0.5}


def test_centered_clipping_default_radius_is_the_median_distance_by_hand() -> None:
    # center 0: distances 6, 1, 3 → τ = 3; (6, 0) → (3, 0); (0, 1) and (0, −3) stay (3 is not
    # above τ); mean ((3 + 0 + 0)/3, (0 + 1 − 3)/3) = (1, −2/3)
    rule = centered_clipping()
    assert rule.tau is None
    out, state = rule.aggregate(
        updates([[6.0, 0.0], [0.0, 1.0], [0.0, -3.0]]), ctx=ctx(2), state=rule.init(layout(2))
    )
    assert close(out.delta, [1.0, -2 / 3])
    assert out.info["robust_clip"] == 3.0
    assert out.info["robust_flagged"] == ["c0"] and out.info["robust_weights"] == {"c0": 0.5}
    # the same updates around the center (1, 1): distances, not norms, set τ
    shifted = updates([[7.0, 1.0], [1.0, 2.0], [1.0, -2.0]])
    out, _ = rule.aggregate(shifted, ctx=ctx(2), state={"center": torch.tensor([1.0, 1.0])})
    assert close(out.delta, [2.0, 1 / 3]) and out.info["robust_clip"] == 3.0
    # the round's τ is computed once, before the iterations: L = 2 from here by hand.
    # v₁ = (1, −2/3); distances to v₁: (5, 2/3) → 5.044 > 3, (−1, 5/3) → 1.944, (−1, −7/3) → 2.539
    out, _ = replace(rule, iterations=2).aggregate(
        updates([[6.0, 0.0], [0.0, 1.0], [0.0, -3.0]]), ctx=ctx(2), state=rule.init(layout(2))
    )
    step = torch.tensor([5.0, 2 / 3]) * (3 / math.hypot(5.0, 2 / 3))
    expected = torch.tensor([1.0, -2 / 3]) + (step + torch.tensor([-2.0, -2 / 3])) / 3
    assert close(out.delta, expected.tolist()) and out.info["robust_clip"] == 3.0


@pytest.mark.parametrize("seed", range(5))
def test_centered_clipping_default_radius_stays_within_the_honest_distances(seed: int) -> None:
    # With an honest majority the median distance lies between the smallest and the largest
    # honest distance, whatever the faulty clients send; every clipped term is at most τ long,
    # so the aggregate stays within the largest honest distance of the center. (The paper's
    # fixed τ = 10 lets the three attackers move it by up to 3·10/10 = 3, four times as far.)
    g = draw(seed)
    honest = torch.randn(7, 20, generator=g) * 0.1 + 0.05
    center = torch.randn(20, generator=g) * 0.05
    attack = -1e3 * honest.mean(dim=0) * torch.tensor([1.0, 2.0, 3.0])[:, None]
    x = torch.cat([honest, attack])
    rule = centered_clipping(iterations=1 + seed % 3, f=3)
    out, _ = rule.aggregate(updates(x), ctx=ctx(20), state={"center": center})
    dist = (honest - center).double().norm(dim=1)
    assert float(dist.min()) <= out.info["robust_clip"] <= float(dist.max())
    assert float((out.delta.double() - center.double()).norm()) <= float(dist.max()) * (1 + 1e-6)
    fixed, _ = centered_clipping(tau=10.0).aggregate(updates(x), ctx=ctx(20), state={"center": center})
    assert float((fixed.delta.double() - center.double()).norm()) > 2 * float(dist.max())


def naive_cclip(x: torch.Tensor, v: torch.Tensor, tau: float, iterations: int) -> torch.Tensor:
    x, v = x.double(), v.double()
    for _ in range(iterations):
        diff = x - v
        scale = torch.clamp(tau / diff.norm(dim=1).clamp_min(1e-300), max=1.0)
        v = v + (diff * scale[:, None]).mean(dim=0)
    return v


def test_centered_clipping_carries_its_center_across_rounds() -> None:
    rule = centered_clipping(tau=0.5, iterations=3, momentum=0.25)
    state = rule.init(layout(4))
    assert state["center"].dtype == torch.float32 and not state["center"].any()
    center = torch.zeros(4, dtype=torch.float64)
    for rnd in (1, 2, 3):
        x = torch.randn(5, 4, generator=draw(rnd)) + rnd
        kept = state["center"].clone()
        out, new = rule.aggregate(updates(x), ctx=ctx(4, round=rnd), state=state)
        assert torch.equal(state["center"], kept), "aggregate changed the state it was given"
        expected = naive_cclip(x, center, 0.5, 3)
        assert torch.allclose(out.delta.double(), expected, atol=1e-5)
        center = 0.25 * center + 0.75 * expected
        assert torch.allclose(new["center"].double(), center, atol=1e-5)
        assert new["center"].dtype == torch.float32
        state = new


def test_centered_clipping_with_infinite_tau_is_the_plain_mean() -> None:
    for seed in range(5):
        x = torch.randn(6, 10, generator=draw(seed)) * 100
        ups = updates(x, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
        out = run(centered_clipping(tau=math.inf, iterations=1 + seed % 3), ups)
        assert torch.allclose(out.delta, x.mean(dim=0), atol=1e-4)
        assert out.info["robust_flagged"] == []


def test_centered_clipping_refuses_a_center_of_the_wrong_size() -> None:
    rule = centered_clipping()
    with pytest.raises(PipelineError, match="expected a vector of 2 values"):
        rule.aggregate(updates([[1.0, 2.0]] * 3), ctx=ctx(2), state={"center": torch.zeros(3)})


# -- norm bounding ---------------------------------------------------------------------------------


def test_norm_bound_to_the_median_norm_by_hand() -> None:
    # norms 5, 1, 10 → median 5; (6, 8) is halved to (3, 4). Weighted mean with weights 1, 1, 2:
    # ((3, 4) + (0, 1) + 2·(3, 4)) / 4 = (2.25, 3.25)
    out = run(norm_bound(), updates([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [1.0, 1.0, 2.0]))
    assert close(out.delta, [2.25, 3.25])
    assert out.info["robust_clip"] == 5.0
    assert out.info["robust_flagged"] == ["c2"] and out.info["robust_weights"] == {"c2": 0.5}


def test_norm_bound_to_a_fixed_bound_by_hand() -> None:
    # all clipped to norm 1: (0.6, 0.8), (0, 1), (0.6, 0.8); weights 1, 1, 2 → (0.45, 0.85)
    out = run(norm_bound(1.0), updates([[3.0, 4.0], [0.0, 1.0], [6.0, 8.0]], [1.0, 1.0, 2.0]))
    assert close(out.delta, [0.45, 0.85])


def test_norm_bound_with_a_huge_bound_is_the_weighted_mean() -> None:
    for seed in range(5):
        g = draw(seed)
        x = torch.randn(5, 7, generator=g)
        w = (torch.rand(5, generator=g) * 10).tolist()
        out = run(norm_bound(1e9), updates(x, w))
        expected = (torch.tensor(w)[:, None] * x).sum(dim=0) / sum(w)
        assert torch.allclose(out.delta, expected, atol=1e-5)
        assert out.info["robust_flagged"] == []


# -- FLTrust ---------------------------------------------------------------------------------------


def test_fltrust_by_hand() -> None:
    # g0 = (1, 0). (2, 0): trust 1, scaled to (1, 0). (0, 3): cos 0, trust 0. (−1, 0): cos −1,
    # trust 0. (1, 1): trust 1/√2, scaled to (1/√2, 1/√2).
    # Σ tᵢ ĝᵢ / Σ tᵢ = ((1, 0) + (1/2, 1/2)) / (1 + 1/√2)
    rule = fltrust(lambda ctx: torch.tensor([1.0, 0.0]))
    out = run(rule, updates([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 1.0]]))
    s = 1 + 1 / math.sqrt(2)
    assert close(out.delta, [1.5 / s, 0.5 / s])
    assert out.info["robust_flagged"] == ["c1", "c2"]
    assert out.info["robust_weights"] == {"c3": pytest.approx(1 / math.sqrt(2), abs=1e-4)}
    assert (out.count, out.weight) == (2, 2.0)


def test_fltrust_gives_no_weight_to_an_update_opposite_the_root() -> None:
    for seed in range(5):
        g = draw(seed)
        root = torch.randn(8, generator=g)
        honest = root + 0.5 * torch.randn(4, 8, generator=g)
        rule = fltrust(lambda ctx, root=root: root)
        clean = run(rule, updates(honest))
        attacked = run(rule, updates(torch.cat([honest, -1e6 * root[None, :]])))
        assert torch.allclose(clean.delta, attacked.delta, atol=1e-6)
        assert attacked.info["robust_flagged"] == ["c4"]


def test_fltrust_trusting_no_one_gives_a_zero_update_and_zero_extras() -> None:
    rule = fltrust(lambda ctx: torch.tensor([1.0, 0.0]))
    ups = [replace(u, extras={"e": torch.ones(3)}) for u in updates([[-1.0, 0.0], [0.0, 1.0]])]
    out = run(rule, ups)
    assert out.delta.tolist() == [0.0, 0.0] and (out.count, out.weight) == (0, 0.0)
    assert out.extras["e"].tolist() == [0.0, 0.0, 0.0]


def test_fltrust_rejects_a_root_update_of_the_wrong_size_or_zero() -> None:
    with pytest.raises(PipelineError, match="returned 3 values, expected a vector of 2"):
        run(fltrust(lambda ctx: torch.zeros(3)), updates([[1.0, 0.0]]))
    with pytest.raises(PipelineError, match="root update is zero"):
        run(fltrust(lambda ctx: torch.zeros(2)), updates([[1.0, 0.0]]))


# -- FLAME -----------------------------------------------------------------------------------------


def flame_round(seed: int) -> tuple[torch.Tensor, list[int]]:
    g = draw(seed)
    u = torch.randn(30, generator=g)
    honest = u + 0.05 * torch.randn(7, 30, generator=g) * u.norm()
    honest *= 0.5 + torch.rand(7, 1, generator=g)  # different norms, same direction
    outliers = -u * 5 + 0.05 * torch.randn(3, 30, generator=g) * u.norm()
    order = torch.randperm(10, generator=g)
    x = torch.cat([honest, outliers])[order]
    return x, [i for i in range(10) if int(order[i]) >= 7]


def test_flame_excludes_a_cluster_of_clear_outliers() -> None:
    for seed in range(5):
        x, bad = flame_round(seed)
        out = run(flame(noise=0.0), updates(x))
        flagged = {int(c[1:]) for c in out.info["robust_flagged"]}
        assert set(bad) <= flagged, seed
        kept = [i for i in range(10) if i not in flagged]
        assert len(kept) > 5 and out.count == len(kept)
        norms = x.double().norm(dim=1)
        s = float(norms.sort().values[4:6].mean())  # the median of 10: mean of the middle two
        assert out.info["robust_clip"] == pytest.approx(s)
        clipped = x[kept].double() * torch.clamp(s / norms[kept], max=1.0)[:, None]
        assert torch.allclose(out.delta.double(), clipped.mean(dim=0), atol=1e-5), seed


def test_flame_noise_is_seeded_and_scaled_to_lambda_times_s() -> None:
    x = torch.randn(7, 20_000, generator=draw(1)) + 1.0
    quiet = run(flame(noise=0.0), updates(x)).delta
    a = run(flame(noise=0.01), updates(x), seed=3)
    b = run(flame(noise=0.01), updates(x), seed=3)
    c = run(flame(noise=0.01), updates(x), seed=4)
    assert torch.equal(a.delta, b.delta) and not torch.equal(a.delta, c.delta)
    std = a.info["robust_noise_std"]
    assert std == pytest.approx(0.01 * a.info["robust_clip"])
    assert float((a.delta - quiet).std()) == pytest.approx(std, rel=0.03)


# -- defaults that defend without being told f -----------------------------------------------------


def test_multi_krum_by_default_tolerates_the_most_the_round_allows() -> None:
    # 1-D: honest 0, 1, 2, 3, 4 and two attackers at 100. f = None → f = ⌊(7 − 3)/2⌋ = 2,
    # n − f − 2 = 3 neighbours: honest scores 14, 6, 6, 6, 14; each attacker's 0 + 96² + 97²;
    # m = n − f = 5 keeps the five honest: mean 2. The old default f = 1 averaged m = 6,
    # one attacker included: (0 + 1 + 2 + 3 + 4 + 100)/6.
    x = [[0.0], [1.0], [2.0], [3.0], [4.0], [100.0], [100.0]]
    out = run(multi_krum(), updates(x))
    assert close(out.delta, [2.0]) and out.info["robust_f"] == 2
    assert out.info["robust_flagged"] == ["c5", "c6"]
    assert close(run(multi_krum(f=1), updates(x)).delta, [110 / 6])
    assert run(krum(), updates(x)).info["robust_f"] == 2


def test_trimmed_mean_by_default_trims_a_quarter_from_each_end() -> None:
    # 8 values: ⌊0.25·8⌋ = 2 from each end → 2, 3, 4, 5 → 3.5; f = 1 (the old default) kept
    # one of the two attackers: (1 + 2 + 3 + 4 + 5 + 100)/6
    x = [[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [100.0], [100.0]]
    assert close(run(trimmed_mean(), updates(x)).delta, [3.5])
    assert run(trimmed_mean(), updates(x)).info["robust_trimmed"] == 2
    assert close(run(trimmed_mean(f=1), updates(x)).delta, [115 / 6])
    assert trimmed_mean() == trimmed_mean(0.25) and make_rule("trimmed-mean").beta == 0.25


@pytest.mark.parametrize(
    ("rule", "counts"),
    [
        (krum(), {3: 0, 4: 0, 5: 1, 6: 1, 7: 2, 100: 48}),
        (multi_krum(), {3: 0, 5: 1, 100: 48}),
        (multi_krum(m=60), {59: 0, 60: 28, 100: 48}),
        (bulyan(), {3: 0, 6: 0, 7: 1, 10: 1, 11: 2, 100: 24}),
    ],
)
def test_most_tolerated_f_by_hand(rule: Any, counts: dict[int, int]) -> None:
    assert rule.f is None and rule.min_clients() == max(3, getattr(rule, "m", 0) or 0)
    for n, f in counts.items():
        assert rule.most_tolerated(n) == f, n


def test_the_default_f_is_taken_after_non_finite_updates_are_dropped() -> None:
    # 7 updates, one NaN: 6 usable → f = ⌊(6 − 3)/2⌋ = 1, not the 2 of seven
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [5.0], [6.0]])
    x[6, 0] = float("nan")
    out = run(krum(), updates(x))
    assert out.info["robust_f"] == 1 and out.info["robust_non_finite"] == ["c6"]
    with pytest.raises(PipelineError, match=r"krum.*f = 0 needs at least 3 usable updates"):
        run(krum(), updates([[0.0], [1.0], [float("nan")]]))


# -- non-finite updates, client counts --------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["median", "trimmed-mean", "krum", "multi-krum", "geometric-median"]
)
def test_a_nan_update_is_dropped_and_f_drops_with_it(name: str) -> None:
    rows = torch.tensor(FIVE[:4] + [[1.0, 1.0, 1.0]], dtype=torch.float32)
    rows[4, 1] = float("nan")
    out = run(make_rule(name, f=1), updates(rows))
    assert out.info["robust_non_finite"] == ["c4"] and "c4" in out.info["robust_flagged"]
    # the four finite rows with f = 0 (for Krum, 4 rows would be too few at f = 1)
    alone = run(make_rule(name, f=0), updates(rows[:4]))
    assert torch.equal(out.delta, alone.delta)


def test_only_non_finite_updates_raise() -> None:
    with pytest.raises(PipelineError, match="got 0.*3 more dropped for NaN"):
        run(median(f=1), updates([[math.inf], [math.nan], [-math.inf]]))


@pytest.mark.parametrize(
    ("rule", "minimum"),
    [
        (median(f=2), 5),
        (trimmed_mean(f=2), 5),
        (trimmed_mean(0.3), 1),
        (krum(f=2), 7),
        (multi_krum(f=2), 7),
        (multi_krum(f=1, m=8), 8),
        (bulyan(f=2), 11),
        (geometric_median(f=2), 5),
        (centered_clipping(f=2), 5),
        (norm_bound(f=2), 5),
        (norm_bound(3.0, f=2), 1),
        (fltrust(lambda ctx: torch.ones(1)), 1),
        (flame(f=2), 5),
    ],
)
def test_min_clients(rule: Any, minimum: int) -> None:
    assert rule.min_clients() == minimum
    rule.check_clients(minimum)
    with pytest.raises(PipelineError, match=f"needs at least {minimum} clients per round"):
        rule.check_clients(minimum - 1)


def test_check_clients_names_the_rule_f_the_minimum_and_the_fix() -> None:
    with pytest.raises(PipelineError) as err:
        bulyan(f=2).check_clients(9)
    text = str(err.value)
    assert "'bulyan' with f = 2 needs at least 11" in text and "n ≥ 4f + 3" in text
    assert "raise the clients per round to 11 or more, or lower f to 1" in text
    with pytest.raises(PipelineError) as err:
        krum(f=0).check_clients(2)
    assert str(err.value).endswith("raise the clients per round to 3 or more")  # f is already 0


def test_a_round_with_too_few_updates_raises() -> None:
    with pytest.raises(PipelineError, match=r"needs at least 5 usable updates in round 1 .*got 4"):
        run(krum(f=1), updates(FIVE[:4]))


@pytest.mark.parametrize(
    ("ups", "complaint"),
    [
        ([Update("a", torch.ones(3), 1.0), Update("b", torch.ones(2), 1.0)], "sent 2 values"),
        ([Update("a", torch.ones(3), -1.0)], "weights must be finite and >= 0"),
    ],
)
def test_bad_updates_raise(ups: list[Update], complaint: str) -> None:
    with pytest.raises(PipelineError, match=complaint):
        median(f=0).aggregate(ups, ctx=ctx(3))


# -- the registry ----------------------------------------------------------------------------------


def test_registry_names() -> None:
    assert sorted(RULES) == sorted(
        [
            "median",
            "trimmed-mean",
            "krum",
            "multi-krum",
            "bulyan",
            "geometric-median",
            "centered-clipping",
            "norm-bound",
            "fltrust",
            "flame",
        ]
    )
    for name, factory in RULES.items():
        rule = factory(root_update=lambda ctx: torch.ones(1)) if name == "fltrust" else factory()
        assert rule.name == name


def test_make_rule_builds_with_parameters() -> None:
    assert make_rule("trimmed_mean", beta=0.1) == trimmed_mean(0.1)
    assert make_rule("Multi-Krum", f=2, m=5) == multi_krum(2, m=5)
    assert make_rule("geometric-median", **{"max-iterations": 7}).max_iterations == 7


@pytest.mark.parametrize(
    ("name", "params", "complaint"),
    [
        (
            "mean",
            {},
            "unknown robust aggregation rule 'mean'; known rules: bulyan, centered-clipping",
        ),
        ("krum", {"m": 3}, "'krum' has no parameter 'm'; it takes f"),
        ("fltrust", {}, "'fltrust' needs parameter 'root_update'"),
        ("krum", {"f": -1}, "f = -1 must be a whole number"),
        ("krum", {"f": 1.5}, "f = 1.5 must be a whole number"),
        ("trimmed-mean", {"beta": 0.5}, r"beta = 0.5 must be a fraction in \[0, 0.5\)"),
        ("trimmed-mean", {"beta": 0.1, "f": 1}, "give beta or f, not both"),
        ("multi-krum", {"m": 0}, "m = 0 must be a whole number >= 1"),
        ("centered-clipping", {"tau": 0}, "tau = 0 must be a number > 0"),
        ("centered-clipping", {"momentum": 1.0}, r"momentum = 1.0 must be in \[0, 1\)"),
        ("norm-bound", {"bound": -2}, "bound = -2 must be a number > 0"),
        ("flame", {"noise": -1}, "noise = -1 must be a number >= 0"),
        ("geometric-median", {"nu": 0}, "nu = 0 must be a number > 0"),
        ("fltrust", {"root_update": 3}, "root_update = 3 must be a function"),
    ],
)
def test_make_rule_rejects(name: str, params: dict[str, Any], complaint: str) -> None:
    with pytest.raises(PipelineError, match=complaint):
        make_rule(name, **params)


# -- the contract every rule keeps -----------------------------------------------------------------


def all_rules() -> dict[str, Any]:
    root = torch.linspace(-1, 1, 12)
    return {
        "median": median(f=1),
        "trimmed-mean": trimmed_mean(f=1),
        "krum": krum(f=1),
        "multi-krum": multi_krum(f=1),
        "bulyan": bulyan(f=1),
        "geometric-median": geometric_median(f=1),
        "centered-clipping": centered_clipping(tau=2.0, iterations=2),
        "norm-bound": norm_bound(),
        "fltrust": fltrust(lambda ctx: root),
        "flame": flame(),
    }


def contract_round(seed: int = 0) -> list[Update]:
    g = draw(seed)
    x = torch.randn(8, 12, generator=g) + 0.5
    x[3] = -40.0
    return [
        Update(f"k{i}", x[i].clone(), float(i + 1), extras={"e": torch.full((2,), float(i))})
        for i in range(8)
    ]


@pytest.mark.parametrize("name", sorted(RULES))
def test_every_rule_keeps_the_aggregator_contract(name: str) -> None:
    rule = all_rules()[name]
    ups = contract_round()
    kept = [u.delta.clone() for u in ups]
    out = run(rule, ups)
    assert all(torch.equal(u.delta, k) for u, k in zip(ups, kept)), "changed an update"
    assert out.delta.dtype == torch.float32 and out.delta.shape == (12,)
    assert bool(torch.isfinite(out.delta).all())
    # deterministic, and independent of the order the updates arrived in
    again = run(rule, random.Random(1).sample(contract_round(), 8))
    assert torch.equal(out.delta, again.delta) and out.info == again.info
    # the info record is JSON with the stable keys
    record = json.loads(json.dumps(out.info))
    assert record["robust_rule"] == name
    assert record["robust_flagged"] == sorted(record["robust_flagged"])
    assert all(0 < w < 1 for w in record["robust_weights"].values())
    # extras are summed, and weight totalled, over the same kept clients: client i has extras
    # (i, i) and weight i + 1, so over any kept set, weight = Σ extras + count
    assert out.extras["e"].dtype == torch.float32
    total = float(out.extras["e"][0])
    assert out.extras["e"].tolist() == [total, total]
    assert out.weight == total + out.count
    assert len(record["robust_flagged"]) >= 8 - out.count  # whoever was left out is flagged
    if out.count == 8:
        assert (out.weight, total) == (36.0, 28.0)
    # the far update k3 (−40 everywhere) does not drag the aggregate
    assert float(out.delta.abs().max()) < 5.0


def test_a_buffered_rule_runs_inside_a_pipeline() -> None:
    p = Pipeline(aggregator=median(f=1))
    out, _ = p.aggregate(iter(updates(FIVE)), p.init(layout(3)), ctx(3))
    assert out is not None and out.delta.tolist() == [7.0, 5.0, 9.0]


def test_huge_finite_updates_are_not_taken_for_non_finite() -> None:
    # each value is finite but their float32 sum overflows
    rows = [[3e38, 3e38], [1.0, 2.0], [2.0, 3.0], [3.0, 4.0], [4.0, 5.0]]
    out = run(median(f=1), updates(rows))
    assert "robust_non_finite" not in out.info and out.delta.tolist() == [3.0, 4.0]


def test_centered_clipping_state_travels_through_the_pipeline() -> None:
    rule = centered_clipping(tau=0.5, iterations=2)
    p = Pipeline(aggregator=rule)
    state = p.init(layout(4))
    assert torch.equal(state.aggregator["center"], torch.zeros(4))
    x = torch.randn(5, 4, generator=draw(0)) + 2.0
    out, state = p.aggregate(iter(updates(x)), state, ctx(4))
    assert out is not None
    assert torch.equal(state.aggregator["center"], out.delta)  # momentum 0: the last aggregate
    expected = naive_cclip(x, torch.zeros(4), 0.5, 2)
    assert torch.allclose(out.delta.double(), expected, atol=1e-5)
