"""Issue 15 (2): with ``secure_aggregation.enabled`` a deployed site's encoding sums travel
through SecAgg+ (the analytics fixed-point encoding, :mod:`consortium.analytics.secure`), the
server receives none of them, and the encoding equals the clear merge's."""

from __future__ import annotations

import asyncio
import struct
import threading
import time
from importlib.resources import files
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.analytics.secure import LIMBS, decode, encode
from consortium.config import SecureAggregationConfig
from consortium.data.heart_disease import FEATURES, SITES, site_split
from consortium.data.preprocess import (
    Column,
    SiteSummary,
    fit_encoder,
    merge_summaries,
    summarize_site,
)
from consortium.deploy.client import SiteRunner
from consortium.deploy.codec import (
    ParametersCache,
    chunk_frames,
    decode_exchange,
    encode_work_parts,
    reassemble,
)
from consortium.deploy.hub import Hub, RemoteExecutor
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.secure_encoding import run_secure_encoding
from consortium.deploy.summary import (
    implausible_summary,
    schema_from_pb,
    secure_layout,
    secure_merge,
    summary_answer,
    summary_from_pb,
    summary_from_total,
    summary_to_pb,
)


def _hospitals() -> dict[str, SiteSummary]:
    out = {}
    for site, name in SITES.items():
        x_train, _, x_test, _ = site_split(str(files("consortium.data") / "_heart_disease" / name),
                                           site, seed=0)
        out[site] = summarize_site(x_train, columns=FEATURES, holdout=x_test)
    return out


def test_the_secure_merge_fits_the_clear_merges_encoder() -> None:
    summaries = _hospitals()
    clear = fit_encoder(FEATURES, merge_summaries([summaries[k] for k in sorted(summaries)]))
    secure = fit_encoder(FEATURES, secure_merge(summaries))
    assert secure.feature_names == clear.feature_names
    np.testing.assert_allclose(secure.mean, clear.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(secure.std, clear.std, rtol=0, atol=1e-9)
    np.testing.assert_array_equal(secure.indicator, clear.indicator)


def test_flags_follow_from_the_totals_and_categories_are_the_union() -> None:
    columns = [Column("x", "continuous"), Column("b", "binary"), Column("c", "categorical")]
    a = summarize_site(np.array([[1.5, 0, "red"], [np.nan, 1, "red"]], dtype=object),
                       columns=columns, min_count=1)
    b = summarize_site(np.array([[-2.25, 2, "blue"], [4.0, 1, "blue"]], dtype=object),
                       columns=[columns[0], Column("b", "continuous"), columns[2]], min_count=1)
    merged = secure_merge({"a": a, "b": b})
    clear = a + b
    np.testing.assert_array_equal(merged.count, clear.count)
    np.testing.assert_allclose(merged.total, clear.total, atol=1e-9)
    np.testing.assert_allclose(merged.total_sq, clear.total_sq, atol=1e-9)
    assert merged.has_missing.tolist() == [True, False, False]
    assert merged.binary.tolist() == [False, False, False]  # b holds a 2 at site b
    assert merged.categories == (frozenset(), frozenset(), frozenset({"red", "blue"}))


def test_a_sites_encoded_sums_decode_exactly() -> None:
    summary = _hospitals()["cleveland"]
    keys = secure_layout(len(FEATURES))
    vector = encode(summary_answer(summary, site="cleveland"), keys)
    back = summary_from_total(decode(vector, keys, 1), summary.categories)
    np.testing.assert_array_equal(back.count, summary.count)
    np.testing.assert_allclose(back.total, summary.total, rtol=1e-12)
    np.testing.assert_allclose(back.total_sq, summary.total_sq, rtol=1e-12)
    assert back.has_missing.tolist() == summary.has_missing.tolist()
    assert back.binary.tolist() == summary.binary.tolist()


def test_the_implausibility_checks_apply_to_the_total_not_to_a_site() -> None:
    summaries = _hospitals()
    name = sorted(summaries)[0]
    honest = summaries[name]
    # sums no real rows give (squares of 0 under large totals): refused alone, ...
    gross = SiteSummary(honest.count, honest.total + 1e9 * (honest.count > 0), honest.total_sq * 0,
                        honest.has_missing, honest.binary & False, honest.categories)
    assert implausible_summary(gross) is not None
    # ... and still visible in the total, which is what the server checks under SecAgg
    assert implausible_summary(secure_merge({**summaries, name: gross})) is not None
    # a subtler lie (squares 5% short) hides among the honest sites' sums
    subtle = SiteSummary(honest.count, honest.total, honest.total_sq * 0.95, honest.has_missing,
                         honest.binary & False, honest.categories)
    assert implausible_summary(subtle) is not None
    assert implausible_summary(secure_merge({**summaries, name: subtle})) is None


@pytest.mark.parametrize("sites", [1])
def test_one_site_has_no_secure_total(sites: int) -> None:
    from consortium.errors import DataError

    with pytest.raises(DataError, match="at least 2 sites"):
        secure_merge(dict(list(_hospitals().items())[:sites]))


# ------------------------------------------------------------------- the deployed encoding phase

class _Wire:
    """The gRPC stub's stand-in over a live :class:`Hub` (its event loop in a thread): every
    message crosses as serialized protobuf, and every one the server receives is kept."""

    def __init__(self, hub: Any, loop: asyncio.AbstractEventLoop, session: str,
                 received: list[bytes]) -> None:
        self.hub, self.loop, self.session, self.received = hub, loop, session, received

    def Summarize(self, msg: Any, **_: Any) -> Any:
        raw = msg.SerializeToString()
        self.received.append(raw)
        msg = pb.DataSummary.FromString(raw)
        refused = self.hub.submit_summary(self.session, summary_from_pb(msg), schema_from_pb(msg))
        return pb.Ack(accepted=refused is None, reason=refused or "")

    def Encoding(self, request: Any, **_: Any) -> Any:
        if self.hub.merge_error is not None:
            raise RuntimeError(self.hub.merge_error)
        if self.hub.merged is None:
            time.sleep(0.01)
            return pb.DataSummary(ready=False)
        return pb.DataSummary.FromString(
            summary_to_pb(self.hub.merged, schema=self.hub.schema).SerializeToString())

    def PullTask(self, request: Any, **_: Any) -> Any:
        item = asyncio.run_coroutine_threadsafe(
            self.hub.next_work(self.session, 0.2), self.loop).result()
        parts = encode_work_parts(item, cache=ParametersCache())
        return [pb.Chunk.FromString(f) for f in chunk_frames(parts, "s")]

    def Exchange(self, frames: Any, **_: Any) -> Any:
        raw = bytes(reassemble(frames, max_total_bytes=1 << 26))
        self.received.append(raw)
        ok, why = self.hub.deliver_exchange(self.session, decode_exchange(raw))
        return pb.Ack(accepted=ok, reason=why)


def _deploy(folder: Path, *, secure: bool) -> tuple[dict[str, Any], list[bytes], Any]:
    sites = ["north", "south", "east"]
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    hub = Hub(loop, config_toml="", run_id="t", max_result_bytes=1,
              summaries_expected=len(sites), secure_encoding=secure)
    cfg = SimpleNamespace(seed=0, data=SimpleNamespace(target="label", test_fraction=0.25),
                          analysis=SimpleNamespace(min_count=5),
                          secure_aggregation=SecureAggregationConfig(enabled=secure, threshold=0.67))
    out: dict[str, Any] = {}
    received: list[bytes] = []
    stop = threading.Event()
    driver = threading.Thread(target=run_secure_encoding, args=(hub, RemoteExecutor(hub), cfg),
                              kwargs={"stop": stop, "timeout_s": 30})
    if secure:
        driver.start()

    def site(name: str) -> None:
        runner = SiteRunner("127.0.0.1:1", site=name, data=folder / f"{name}.csv", certs=None)
        runner._run_id = "t"
        try:
            out[name] = runner._table(cfg, _Wire(hub, loop, hub.register(name), received), ())
        except Exception as exc:  # surfaced to the test
            out[name] = exc

    threads = [threading.Thread(target=site, args=(n,)) for n in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    stop.set()
    if secure:
        driver.join(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    return out, received, hub


def _site_summary(folder: Path, name: str) -> SiteSummary:
    from consortium.data.files import label_order, read_site_table
    from consortium.data.preprocess import category_min_count

    table = read_site_table(folder / f"{name}.csv", target="label", site=name)
    x_train, _, x_test, _ = table.split(classes=label_order(table.labels), seed=0,
                                        test_fraction=0.25)
    columns = [Column(c, "numeric" if n else "categorical")
               for c, n in zip(table.features, table.numeric)]
    return summarize_site(x_train, columns=columns, holdout=x_test,
                          min_count=category_min_count(analysis=5))


def test_the_server_receives_no_sites_sums_and_the_encoding_is_the_clear_ones(
    tmp_path: Path,
) -> None:
    from tests.deploy.test_category_release import _write

    _write(tmp_path)
    secure, received, hub = _deploy(tmp_path, secure=True)
    clear, _, clear_hub = _deploy(tmp_path, secure=False)
    for name in ("north", "south", "east"):
        assert not isinstance(secure[name], Exception), secure[name]
        for part in ("train", "test"):
            got = getattr(secure[name].clients[name], part).x
            want = getattr(clear[name].clients[name], part).x
            assert torch.allclose(got, want, atol=1e-6)
    columns = [Column("age", "numeric"), Column("colour", "categorical")]
    a, b = fit_encoder(columns, hub.merged), fit_encoder(columns, clear_hub.merged)
    assert a.feature_names == b.feature_names == ("age", "colour=blue", "colour=green",
                                                  "colour=red")
    np.testing.assert_allclose(a.mean, b.mean, rtol=0, atol=1e-9)
    np.testing.assert_allclose(a.std, b.std, rtol=0, atol=1e-9)
    # what the server received: 3 clear summaries and the SecAgg+ phases (keys, shares,
    # masked, unmask, end) from each site, none holding a site's count, sum or sum of squares
    kinds = {pb.DataSummary: 0, "exchange": 0}
    for raw in received:
        try:
            env = decode_exchange(raw)
            kinds["exchange"] += 1
            assert env.stage == "encoding"
        except Exception:
            msg = pb.DataSummary.FromString(raw)
            kinds[pb.DataSummary] += 1
            assert not any(msg.count) and not any(msg.total) and not any(msg.total_sq)
    assert kinds[pb.DataSummary] == 3 and kinds["exchange"] >= 3 * 4
    blob = b"".join(received)
    for name in ("north", "south", "east"):
        mine = _site_summary(tmp_path, name)
        assert mine.count[0] > 0
        for value in (mine.count[0], mine.total[0], mine.total_sq[0]):
            for packed in (struct.pack("<d", value), struct.pack("<f", value)):
                assert packed not in blob, (name, value)
            fixed = int(round(value * 2**40))  # the site's own fixed-point digits, in the clear
            digits = [(fixed >> (16 * j)) & 0xFFFF for j in range(LIMBS)]
            assert struct.pack("<" + "q" * LIMBS, *digits) not in blob, (name, value)


def test_the_manifest_says_how_the_sums_leave() -> None:
    from consortium.client.approval import leaves_site
    from consortium.config import ExperimentConfig

    secure = leaves_site(ExperimentConfig.from_dict({"secure_aggregation": {"enabled": True}}))
    plain = leaves_site(ExperimentConfig.from_dict({}))
    assert "training split (through secure aggregation" in secure[0]
    assert "training split (in the clear" in plain[0]
