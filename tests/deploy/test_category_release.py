"""A deployed site names only the categories it holds at least min_count times (issue 15): a
rare value never leaves the site, the merged list is the union of what the sites named, a row
holding an unnamed value encodes as all-zero one-hot (not as missing), and the simulation of
the same files encodes exactly as the deployment does."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.data.files import load_csv
from consortium.data.heart_disease import FEATURES, SITES, site_split
from consortium.data.preprocess import (
    Column,
    category_min_count,
    encode_sites,
    summarize_site,
)
from consortium.deploy.client import SiteRunner
from consortium.deploy.hub import Hub
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.summary import schema_from_pb, summary_from_pb, summary_to_pb

RARE = "purple"  # held by 2 rows at north, nowhere else


def _site_rows(rng: np.random.Generator, colours: dict[str, int], shift: float) -> list[str]:
    values = [c for c, n in colours.items() for _ in range(n)]
    rng.shuffle(values)
    rows = []
    for colour in values:
        age = rng.normal(50 + shift, 8)
        label = "yes" if age + (6 if colour == "red" else 0) + rng.normal(0, 3) > 52 else "no"
        rows.append(f"{age:.2f},{colour},{label}")
    return ["age,colour,label", *rows]


def _write(folder: Path) -> None:
    rng = np.random.default_rng(7)
    counts = {
        "north": {"red": 14, "blue": 12, RARE: 2},
        "south": {"red": 10, "blue": 16, "green": 3},  # green: rare here ...
        "east": {"red": 12, "green": 9, "blue": 4},  # ... named here; blue 4 < 5 not named
    }
    for i, (site, colours) in enumerate(counts.items()):
        (folder / f"{site}.csv").write_text("\n".join(_site_rows(rng, colours, 2.0 * i)) + "\n")


class _Wire:
    """The gRPC stub's stand-in: every message crosses as serialized protobuf, and each site's
    Summarize message is kept as the server received it."""

    def __init__(self, hub: Hub, session: str, sent: dict[str, bytes], site: str) -> None:
        self.hub, self.session, self.sent, self.site = hub, session, sent, site

    def Summarize(self, msg: Any, **_: Any) -> Any:
        raw = msg.SerializeToString()
        self.sent[self.site] = raw
        msg = pb.DataSummary.FromString(raw)
        refused = self.hub.submit_summary(self.session, summary_from_pb(msg), schema_from_pb(msg))
        return pb.Ack(accepted=refused is None, reason=refused or "")

    def Encoding(self, request: Any, **_: Any) -> Any:
        if self.hub.merged is None:
            time.sleep(0.01)
            return pb.DataSummary(ready=False)
        return pb.DataSummary.FromString(
            summary_to_pb(self.hub.merged, schema=self.hub.schema).SerializeToString())


def _deploy(folder: Path, *, analysis_min_count: int = 5) -> tuple[dict[str, Any], dict[str, bytes]]:
    sites = ["north", "south", "east"]
    hub = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=1,
              summaries_expected=len(sites))
    cfg = SimpleNamespace(seed=0, data=SimpleNamespace(target="label", test_fraction=0.25),
                          analysis=SimpleNamespace(min_count=analysis_min_count))
    out: dict[str, Any] = {}
    sent: dict[str, bytes] = {}

    def site(name: str) -> None:
        runner = SiteRunner("127.0.0.1:1", site=name, data=folder / f"{name}.csv", certs=None)
        try:
            out[name] = runner._table(cfg, _Wire(hub, hub.register(name), sent, name), ())
        except Exception as exc:  # surfaced to the test
            out[name] = exc

    threads = [threading.Thread(target=site, args=(n,)) for n in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out, sent


def test_the_policy_floor_and_the_experiment_set_the_minimum() -> None:
    assert category_min_count() == 5  # neither asks: 5
    assert category_min_count(policy=0, analysis=3) == 5  # an unset policy is 5, not 0
    assert category_min_count(policy=8, analysis=5) == 8
    assert category_min_count(policy=2, analysis=7) == 7


def test_a_site_names_only_categories_held_min_count_times_train_and_test_together() -> None:
    col = [Column("c", "categorical")]
    train = np.array([["a"]] * 3 + [["b"]] * 4 + [["z"]], dtype=object)
    test = np.array([["a"]] * 2 + [[None]], dtype=object)  # a: 3 + 2 = 5 rows
    summary = summarize_site(train, columns=col, holdout=test, min_count=5)
    assert summary.categories == (frozenset({"a"}),)
    assert summary.has_missing.tolist() == [True]
    everything = summarize_site(train, columns=col, holdout=test)  # min_count=1: all named
    assert everything.categories == (frozenset({"a", "b", "z"}),)


def test_an_unnamed_value_encodes_as_zeros_and_is_not_missing() -> None:
    col = [Column("c", "categorical")]
    big = np.array([["a"]] * 6 + [["b"]] * 2, dtype=object)  # b: too rare to be named
    enc, (x,), _ = encode_sites([big], [big[:0]], columns=col, min_count=5)
    assert enc.feature_names == ("c=a",)  # no c_missing: nothing is missing
    assert x[:, 0].tolist() == [1.0] * 6 + [0.0] * 2
    holey = np.array([["a"]] * 6 + [["b"], [None]], dtype=object)
    enc, (x,), _ = encode_sites([holey], [holey[:0]], columns=col, min_count=5)
    assert enc.feature_names == ("c=a", "c_missing")
    assert x.tolist()[-2:] == [[0.0, 0.0], [0.0, 1.0]]  # b: present, unnamed; None: missing


def test_hospitals_name_no_category_their_sets_are_fixed_by_the_data_set() -> None:
    from importlib.resources import files

    fixed = {c.name for c in FEATURES if c.kind == "categorical"}
    assert fixed and all(c.categories for c in FEATURES if c.kind == "categorical")
    for site, name in SITES.items():
        path = files("consortium.data") / "_heart_disease" / name
        x_train, _, x_test, _ = site_split(str(path), site, seed=0)
        summary = summarize_site(x_train, columns=FEATURES, holdout=x_test,
                                 min_count=category_min_count())
        msg = summary_to_pb(summary)
        assert all(not e.text and not e.number for e in msg.categories), site


def test_a_rare_category_never_leaves_the_site_and_the_encoding_is_the_simulations(
    tmp_path: Path,
) -> None:
    _write(tmp_path)
    deployed, sent = _deploy(tmp_path)
    assert set(sent) == {"north", "south", "east"}
    assert RARE.encode() not in sent["north"]  # named nowhere in what the server received
    named = {site: set(summary_from_pb(pb.DataSummary.FromString(raw)).categories[1])
             for site, raw in sent.items()}
    assert named == {"north": {"red", "blue"}, "south": {"red", "blue"}, "east": {"red", "green"}}
    simulated = load_csv(path=str(tmp_path), target="label", seed=0)  # default min_count 5
    assert simulated.feature_names == ("age", "colour=blue", "colour=green", "colour=red")
    for name in ("north", "south", "east"):
        mine = deployed[name]
        assert not isinstance(mine, Exception), mine
        assert mine.input_shape == simulated.input_shape == (4,)
        want, got = simulated.clients[name], mine.clients[name]
        for part in ("train", "test"):
            assert torch.equal(getattr(got, part).x, getattr(want, part).x)
            assert torch.equal(getattr(got, part).y, getattr(want, part).y)
    # north's purple rows: present (no missing indicator exists), all-zero one-hot
    north = torch.cat([deployed["north"].clients["north"].train.x,
                       deployed["north"].clients["north"].test.x])
    assert int((north[:, 1:].sum(dim=1) == 0).sum()) == 2


def test_a_larger_experiment_minimum_names_fewer_and_simulation_follows(tmp_path: Path) -> None:
    _write(tmp_path)
    deployed, sent = _deploy(tmp_path, analysis_min_count=13)  # only north's red (14), south's blue (16)
    named = {site: set(summary_from_pb(pb.DataSummary.FromString(raw)).categories[1])
             for site, raw in sent.items()}
    assert named == {"north": {"red"}, "south": {"blue"}, "east": set()}
    simulated = load_csv(path=str(tmp_path), target="label", seed=0, min_count=13)
    assert simulated.feature_names == ("age", "colour=blue", "colour=red")
    for name in ("north", "south", "east"):
        assert torch.equal(deployed[name].clients[name].train.x, simulated.clients[name].train.x)


def test_the_model_trains_on_the_deployed_encoding(tmp_path: Path) -> None:
    """The deployed site's own client, built from the experiment as ``consortium client``
    builds it, fits rounds of FedAvg on its encoding (purple rows included): finite and
    falling loss, and the model beats the majority class."""
    from consortium.config import load_config
    from consortium.deploy.client import _Site
    from consortium.messages import Task
    from consortium.types import Parameters

    _write(tmp_path)
    deployed, _ = _deploy(tmp_path)
    cfg = load_config(None, overrides=['data.dataset="csv"', 'data.target="label"',
                                       "algorithm.lr=0.1", "algorithm.local_epochs=5"])
    site = _Site.build(cfg, "north", deployed["north"])
    params = Parameters.from_module(site.client.model_factory())
    losses = []
    for rnd in range(1, 6):
        result = site.fit(Task(rnd, "north", params, seed=rnd))
        assert result.update is not None, result.error
        losses.append(float(result.update.metrics["train_loss"]))
        params = params.replace(params.vector + result.update.delta)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    model = site.client.model_factory()
    params.load_into(model)
    test = deployed["north"].clients["north"].train
    accuracy = float((model(test.x).argmax(dim=1) == test.y).float().mean())
    majority = float(torch.bincount(test.y).max()) / len(test.y)
    assert accuracy > majority
