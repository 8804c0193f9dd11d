"""Sites with their own table files encode them with every site's statistics, over the wire:
the result equals `consortium run` over all the files together (load_csv of the folder)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.data.files import load_csv
from consortium.deploy.client import SiteRunner
from consortium.deploy.hub import Hub
from consortium.deploy.proto import consortium_pb2 as pb
from consortium.deploy.summary import schema_from_pb, summary_from_pb, summary_to_pb

FILES = {
    # a numeric column with a missing value, a text column, labels a/b/c (one site lacks c)
    "north": "age,colour,label\n30,red,a\n41,blue,b\n,red,c\n52,green,a\n38,blue,b\n47,red,c\n",
    "south": "age,colour,label\n61,blue,a\n70,blue,b\n66,red,a\n58,green,b\n75,blue,a\n",
    "east": "age,colour,label\n22,green,c\n29,red,a\n35,red,c\n27,blue,b\n31,green,c\n24,red,a\n",
}


class _Wire:
    """A stand-in for the gRPC stub: every message crosses as serialized protobuf."""

    def __init__(self, hub: Hub, session: str) -> None:
        self.hub, self.session = hub, session
        self.closed = False

    def Summarize(self, msg: Any, **_: Any) -> Any:
        msg = pb.DataSummary.FromString(msg.SerializeToString())
        refused = self.hub.submit_summary(self.session, summary_from_pb(msg), schema_from_pb(msg))
        return pb.Ack(accepted=refused is None, reason=refused or "")

    def Encoding(self, request: Any, **_: Any) -> Any:
        if self.closed:
            raise ConnectionError("closed")
        if self.hub.merged is None:
            time.sleep(0.01)
            return pb.DataSummary(ready=False)
        reply = summary_to_pb(self.hub.merged, schema=self.hub.schema)
        return pb.DataSummary.FromString(reply.SerializeToString())


def _deploy(folder: Path, sites: list[str]) -> dict[str, Any]:
    hub = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=1,
              summaries_expected=len(sites))
    cfg = SimpleNamespace(seed=0, data=SimpleNamespace(target="label", test_fraction=0.25),
                          analysis=SimpleNamespace(min_count=5))
    out: dict[str, Any] = {}

    def site(name: str) -> None:
        runner = SiteRunner("127.0.0.1:1", site=name, data=folder / f"{name}.csv", certs=None)
        try:
            out[name] = runner._table(cfg, _Wire(hub, hub.register(name)), ())
        except Exception as exc:  # surfaced to the test
            out[name] = exc

    threads = [threading.Thread(target=site, args=(n,)) for n in sites]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return out


def test_the_deployed_encoding_is_the_simulations(tmp_path: Path) -> None:
    for name, text in FILES.items():
        (tmp_path / f"{name}.csv").write_text(text)
    simulated = load_csv(path=str(tmp_path), target="label", seed=0)
    deployed = _deploy(tmp_path, list(FILES))
    for name in FILES:
        mine = deployed[name]
        assert not isinstance(mine, Exception), mine
        assert mine.num_classes == simulated.num_classes == 3
        assert mine.input_shape == simulated.input_shape
        want, got = simulated.clients[name], mine.clients[name]
        for part in ("train", "test"):
            assert torch.allclose(getattr(got, part).x, getattr(want, part).x, atol=1e-6)
            assert torch.equal(getattr(got, part).y, getattr(want, part).y)


@pytest.mark.parametrize(("south", "reason"), [
    ("colour,age,label\nblue,61,a\nred,70,b\n", "same columns in another order"),
    ("age,size,label\n61,3,a\n70,4,b\n", "extra ['size'], lacking ['colour']"),
    ("age,colour,label\nold,blue,a\nyoung,red,b\n", "column 'age' holds only numbers at some"),
])
def test_sites_whose_files_disagree_are_refused_with_the_reason(
    tmp_path: Path, south: str, reason: str
) -> None:
    (tmp_path / "north.csv").write_text(FILES["north"])
    (tmp_path / "south.csv").write_text(south)
    hub = Hub(asyncio.new_event_loop(), config_toml="", run_id="t", max_result_bytes=1,
              summaries_expected=2)
    cfg = SimpleNamespace(seed=0, data=SimpleNamespace(target="label", test_fraction=0.25),
                          analysis=SimpleNamespace(min_count=5))
    wire = _Wire(hub, hub.register("north"))

    def north() -> None:
        runner = SiteRunner("127.0.0.1:1", site="north", data=tmp_path / "north.csv", certs=None)
        try:
            runner._table(cfg, wire, ())
        except ConnectionError:
            pass  # the test is over

    thread = threading.Thread(target=north)
    thread.start()
    while hub.schema is None:
        time.sleep(0.01)
    runner = SiteRunner("127.0.0.1:1", site="south", data=tmp_path / "south.csv", certs=None)
    with pytest.raises(Exception, match="refused this site's data summary") as info:
        runner._table(cfg, _Wire(hub, hub.register("south")), ())
    assert reason in str(info.value)
    wire.closed = True
    thread.join(timeout=10)
