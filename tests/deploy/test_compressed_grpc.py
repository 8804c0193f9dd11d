"""Issue 17 over gRPC: compressed updates travel as their encodings, and bad ones are refused.

The unit tests check the pieces: every kind's :class:`~consortium.compression.Encoded`
round-trips through the codec's ``EncodedUpdate`` with a few bytes of framing; the server's
validation decodes it strictly and rejects, with the reason, indices out of range, repeated
indices, a length that disagrees with its header, codes out of range, an encoding larger than
its kind allows for the model, a dense delta in a compressed run and an encoding in a run that
does not compress; a malformed ``EncodedUpdate`` is a :class:`DecodeError`.

The acceptance runs (about 10 s in all) use a real ``serve()`` on 127.0.0.1 (mutual TLS)
with the four heart-disease hospitals as ``SiteRunner`` threads (the harness of
``test_personal_grpc.py``): with top-k 1 %, int8 and fp16 the bytes the server receives per
update (the reassembled upload frames, measured at its decoder) are ``bytes_up`` per update
plus a framing of under 400 bytes, and shrink by the compression ratio against the run without
compression. A hostile hospital (a raw gRPC site, :mod:`tests.deploy.hostile_site`) then sends
top-k updates with indices out of range, duplicated indices and a header/length mismatch, one
a round: each is rejected with its reason and the global model is bit for bit the one of the
run in which that hospital refuses every task (the honest sites' aggregate alone). With error
feedback each site's residual is in its ``--state`` file after the run.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.compression import Compress, Encoded, compress
from consortium.compression.codecs import (
    encode_cast,
    encode_int,
    encode_qsgd,
    encode_randk,
    encode_sign,
    encode_topk,
)
from consortium.deploy.codec import DecodeError, ResultEnvelope, decode_upload, encode_upload
from consortium.deploy.validate import (
    ExpectedTask,
    RejectedResult,
    max_encoded_bytes,
    validate_result,
)
from consortium.messages import Result
from consortium.types import Layout, TensorSpec, Update
from tests.deploy.inprocess import serve_into

D = 1000
LAYOUT = Layout((TensorSpec("w", (10, 90), torch.float32), TensorSpec("b", (100,), torch.float32)))


def _uniform(n: int) -> torch.Tensor:
    return torch.rand(n, generator=torch.Generator().manual_seed(1))


def _encodings() -> dict[str, tuple[Compress, Encoded]]:
    v = torch.randn(D, generator=torch.Generator().manual_seed(0))
    return {
        "topk": (compress("topk", fraction=0.01), encode_topk(v, 0.01)),
        "randk": (compress("randk", fraction=0.05), encode_randk(v, 0.05, 12345)),
        "qsgd": (compress("qsgd", bits=3), encode_qsgd(v, bits=3, chunk=512, uniform=_uniform)),
        "int8": (compress("int8"), encode_int(v, bits=8, chunk=512, uniform=_uniform)),
        "fp16": (compress("fp16"), encode_cast(v, "fp16")),
        "bf16": (compress("bf16"), encode_cast(v, "bf16")),
        "sign": (compress("sign"), encode_sign(v)),
        "sparse": (compress("topk", fraction=0.01, values="fp16", indices="rice"),
                   encode_topk(v, 0.01, values="fp16", indices="rice")),
        "lowrank": (compress("powersgd", rank=2, error_feedback=True), _lowrank(v)),
    }


def _lowrank(v: torch.Tensor) -> Encoded:
    from consortium.compression.lowrank import encode_lowrank, q_length

    shapes = [s.shape for s in LAYOUT.specs]
    values, _ = encode_lowrank(v, shapes, 2, torch.randn(q_length(shapes, 2)))
    return Encoded("lowrank", D, (2,), values=values)


def _envelope(enc: Any, *, delta: torch.Tensor | None = None, client: str = "north") -> ResultEnvelope:
    update = Update(client, torch.zeros(0) if delta is None else delta, 10.0, {"steps": 2.0},
                    encoded=enc)
    return ResultEnvelope("t1", Result(3, client, update))


def _wire(envelope: ResultEnvelope) -> ResultEnvelope:
    back = decode_upload(encode_upload(envelope))
    assert isinstance(back, ResultEnvelope)
    return back


def _check(envelope: ResultEnvelope, stage: Compress | None, **kwargs: Any) -> torch.Tensor | None:
    expected = ExpectedTask(site="north", round=3, task_id="t1", compression=stage, **kwargs)
    return validate_result(envelope, expected=expected, layout=LAYOUT, max_bytes=1 << 20,
                           seen_task_ids=set())


# ------------------------------------------------------------------------------ unit: the pieces


@pytest.mark.parametrize("method", list(_encodings()))
def test_every_kind_round_trips_as_its_encoding_with_a_small_framing(method: str) -> None:
    from consortium.compression import decode

    stage, enc = _encodings()[method]
    raw = encode_upload(_envelope(enc))
    back = _wire(_envelope(enc))
    got = back.result.update
    assert got is not None and isinstance(got.encoded, Encoded) and got.delta.numel() == 0
    assert (got.encoded.kind, got.encoded.size, got.encoded.header) == (enc.kind, enc.size, enc.header)
    for name in ("indices", "values", "codes", "scales"):
        a, b = getattr(enc, name), getattr(got.encoded, name)
        assert (a is None) == (b is None), name
        if a is not None:
            assert a.dtype == b.dtype and torch.equal(a, b), name
    assert back.result.nbytes == enc.nbytes  # what bytes_up counts for this update
    assert 0 < len(raw) - enc.nbytes < 120, len(raw) - enc.nbytes  # ids, weight, tags
    dense = _check(back, stage)  # accepted; the decoded delta is returned for the audit log
    shapes = [s.shape for s in LAYOUT.specs]  # PowerSGD's: the server's own layout
    assert dense is not None and torch.equal(dense, decode(enc, size=D, shapes=shapes))


def _topk(indices: list[int], values: list[float], k: int | None = None) -> Encoded:
    return Encoded("topk", D, (len(indices) if k is None else k,),
                   indices=torch.tensor(indices, dtype=torch.int32),
                   values=torch.tensor(values, dtype=torch.float32))


@pytest.mark.parametrize(("enc", "reason"), [
    (_topk([0, 5, D + 7], [1.0, 2.0, 3.0]), rf"indices outside \[0, {D}\) \(found 0 \.\. {D + 7}\)"),
    (_topk([-1, 5, 9], [1.0, 2.0, 3.0]), r"indices outside"),
    (_topk([0, 5, 5], [1.0, 2.0, 3.0]), "indices repeat or are not in increasing order"),
    (_topk([0, 5, 9], [1.0, 2.0, 3.0], k=4), r"indices hold \(3,\) values where the header says 4"),
    (_topk([0, 5, 9], [1.0, 2.0, 3.0], k=D + 1), rf"k = {D + 1} outside \[1, {D}\]"),
    (Encoded("topk", D + 1, (1,), indices=torch.tensor([0], dtype=torch.int32),
             values=torch.ones(1)), f"it stands for {D + 1} values, the model has {D}"),
    (_topk([0, 5, 9], [1.0, float("nan"), 3.0]), "values are not all finite"),
    (Encoded("fp16", D, (), values=torch.ones(D, dtype=torch.float16)), "this run expects 'topk'"),
    (Encoded("topk", D, (1000,), indices=torch.arange(1000, dtype=torch.int32),
             values=torch.ones(1000), scales=torch.ones(D)), r"12020 bytes, more than the 8020"),
])
def test_a_malformed_topk_update_is_rejected_with_its_reason(enc: Encoded, reason: str) -> None:
    with pytest.raises(RejectedResult, match=reason):
        _check(_wire(_envelope(enc)), compress("topk", fraction=0.01))


def _sparse(**changes: Any) -> Encoded:
    import dataclasses

    v = torch.randn(D, generator=torch.Generator().manual_seed(0))
    enc = encode_topk(v, 0.01, values="fp16", indices="rice")
    if "codes" in changes and isinstance(changes["codes"], list):
        changes["codes"] = torch.tensor(changes["codes"], dtype=torch.uint8)
    return dataclasses.replace(enc, **changes)


def _sparse_codes() -> list[int]:
    codes = _sparse().codes
    assert codes is not None
    return [int(c) for c in codes]


def _bit(codes: list[int], byte: int, bit: int) -> list[int]:
    out = list(codes)
    out[byte] ^= 1 << bit
    return out


@pytest.mark.parametrize(("enc", "reason"), [
    # k = 10 of 1000: b = 6, 60 bits of remainders in 8 bytes (4 padding bits), then the unary
    (_sparse(codes=_bit(_sparse_codes(), 7, 7)), "padding bits after the remainders"),
    (_sparse(codes=[*_sparse_codes(), 1]), "holds 11 quotients, expected k = 10"),
    (_sparse(codes=_bit(_sparse_codes(), -1, 7)), "quotients, expected k = 10"),
    # eight more zeros before the first quotient's end: every index moves by 8 · 64
    (_sparse(codes=[*_sparse_codes()[:8], 0, *_sparse_codes()[8:]]), "index 1421 is not below"),
    (_sparse(codes=[*_sparse_codes()[:8], 0x80, 0x80, 0x80, *_sparse_codes()[8:]]),
     "the stream has"),  # more unary bytes than 10 indices below 1000 allow
    (_sparse(header=(10, 6)), "the header has 2 integers, expected 1"),  # b does not travel
    (_sparse(values=torch.full((10,), float("inf"), dtype=torch.float16)), "not all finite"),
    (_sparse(values=torch.ones(10)), "compression.values = 'fp16'"),
    (_sparse(codes=torch.zeros(1 << 16, dtype=torch.uint8)), "more than the"),  # size cap
    (encode_topk(torch.randn(D), 0.02, values="fp16", indices="rice"), "this run keeps k = 10"),
])
def test_a_malformed_sparse_update_is_rejected_with_its_reason(enc: Encoded, reason: str) -> None:
    stage = compress("topk", fraction=0.01, values="fp16", indices="rice")
    _check(_wire(_envelope(_sparse())), stage)  # the honest one passes
    with pytest.raises(RejectedResult, match=reason):
        _check(_wire(_envelope(enc)), stage)


def test_codes_out_of_range_and_lengths_that_disagree_are_rejected() -> None:
    int8 = compress("int8")
    codes = torch.full((D,), 255, dtype=torch.uint8)  # 255 > 2 * 127: no honest code
    bad = Encoded("int", D, (8, 512), codes=codes, scales=torch.ones(2))
    with pytest.raises(RejectedResult, match="codes exceed the largest valid code 254"):
        _check(_wire(_envelope(bad)), int8)
    short = Encoded("int", D, (8, 512), codes=torch.zeros(D - 1, dtype=torch.uint8),
                    scales=torch.ones(2))
    with pytest.raises(RejectedResult, match=rf"codes hold \({D - 1},\) values where the header says {D}"):
        _check(_wire(_envelope(short)), int8)
    scales = Encoded("int", D, (8, 512), codes=torch.zeros(D, dtype=torch.uint8),
                     scales=torch.ones(3))
    with pytest.raises(RejectedResult, match="scales hold"):
        _check(_wire(_envelope(scales)), int8)
    four = Encoded("int", D, (4, 512), codes=torch.zeros(D // 2, dtype=torch.uint8),
                   scales=torch.ones(2))
    with pytest.raises(RejectedResult, match="this run expects int8"):
        _check(_wire(_envelope(four)), int8)
    # one scale "repeated over a chunk of 2**40": refused before the decoder allocates it
    vast = Encoded("int", D, (8, 1 << 40), codes=torch.zeros(D, dtype=torch.uint8),
                   scales=torch.ones(1))
    with pytest.raises(RejectedResult, match=r"chunk length 1099511627776 is not this run's"):
        _check(_wire(_envelope(vast)), int8)
    qsgd = Encoded("qsgd", D, (2, 512), codes=torch.zeros(375, dtype=torch.uint8),
                   scales=torch.ones(2))
    with pytest.raises(RejectedResult, match="2-bit QSGD levels; this run's compression.bits = 3"):
        _check(_wire(_envelope(qsgd)), compress("qsgd", bits=3))


def test_a_dense_delta_in_a_compressed_run_and_an_encoding_in_a_plain_one_are_rejected() -> None:
    dense = _wire(ResultEnvelope("t1", Result(3, "north", Update("north", torch.zeros(D), 10.0))))
    with pytest.raises(RejectedResult, match="this run compresses every update"):
        _check(dense, compress("topk", fraction=0.01))
    _check(dense, None)  # the same delta in a run that does not compress is fine
    _, enc = _encodings()["topk"]
    with pytest.raises(RejectedResult, match="this run does not compress"):
        _check(_wire(_envelope(enc)), None)
    with pytest.raises(RejectedResult, match="this run does not compress"):
        _check(_wire(_envelope(enc)), None, secure=True)


def test_an_absurd_decoded_delta_is_refused_like_a_dense_one() -> None:
    huge = _topk([3], [1e30])
    with pytest.raises(RejectedResult, match="absurd magnitude"):
        _check(_wire(_envelope(huge)), compress("topk", fraction=0.001), max_norm=1e6)


def test_under_a_personalised_algorithm_the_personal_coordinates_must_decode_to_zero() -> None:
    shared = Layout(LAYOUT.specs[:1])  # "b" (the last 100 values) is personal
    stage = compress("topk", fraction=0.003)
    ok = _topk([0, 5, 899], [1.0, 2.0, 3.0])
    dense = _check(_wire(_envelope(ok)), stage, shared=shared)
    assert dense is not None and float(dense[899]) == 3.0
    leaky = _topk([0, 5, 900], [1.0, 2.0, 3.0])
    with pytest.raises(RejectedResult, match="personal tensors' coordinates"):
        _check(_wire(_envelope(leaky)), stage, shared=shared)


def test_a_malformed_encoded_update_message_is_a_decode_error() -> None:
    from consortium.deploy.proto import consortium_pb2 as pb

    def upload(fill: Any) -> bytes:
        msg = pb.Upload()
        msg.result.round, msg.result.task_id, msg.result.client_id = 3, "t1", "north"
        msg.result.update.weight = 1.0
        fill(msg.result.update)
        return msg.SerializeToString()

    def both(u: Any) -> None:
        u.encoded.kind = "fp16"
        u.delta.dtype = "float32"

    def long_header(u: Any) -> None:
        u.encoded.kind = "topk"
        u.encoded.header.extend(range(9))

    def matrix(u: Any) -> None:
        u.encoded.kind = "topk"
        u.encoded.values.dtype, u.encoded.values.data = "float32", bytes(16)
        u.encoded.values.shape.extend([2, 2])

    def lying_length(u: Any) -> None:
        u.encoded.kind = "topk"
        u.encoded.values.dtype, u.encoded.values.data = "float32", bytes(12)
        u.encoded.values.shape.extend([4])

    for fill, reason in [(both, "both a delta and an encoding"), (long_header, "9 header integers"),
                         (matrix, r"values of shape \[2, 2\], expected flat"),
                         (lying_length, "needs 16 bytes, found 12")]:
        with pytest.raises(DecodeError, match=reason):
            decode_upload(upload(fill))


def test_the_bound_on_encoded_bytes_is_what_each_kind_needs_at_most() -> None:
    for method, (_, enc) in _encodings().items():
        assert enc.nbytes <= max_encoded_bytes(enc.kind, D, enc.header), method
    full = encode_topk(torch.randn(D), 1.0)  # every coordinate kept: the most top-k sends
    assert full.nbytes == max_encoded_bytes("topk", D, full.header)


def test_error_feedback_residual_is_kept_in_the_site_state_file(tmp_path: Path) -> None:
    """The residual lives in the client-state store entry that ``--state`` saves."""
    from consortium.client.state import ClientStateStore
    from consortium.compression import RESIDUAL_KEY

    store = ClientStateStore()
    store.get("north")[RESIDUAL_KEY] = torch.arange(4, dtype=torch.float32)
    back = ClientStateStore.from_flat(store.to_flat())
    assert torch.equal(back.get("north")[RESIDUAL_KEY], torch.arange(4, dtype=torch.float32))


# ------------------------------------------------------------------------- the acceptance runs

BASE = ["rounds=2", "model.name=mlp", "model.hidden=[256]", "evaluation.baselines=[]"]
METHODS = {
    "none": [],
    "topk": ["compression.uplink=topk", "compression.fraction=0.01"],
    "int8": ["compression.uplink=int8"],
    "fp16": ["compression.uplink=fp16"],
    "compact": ["compression.uplink=topk", "compression.fraction=0.01", "compression.values=fp16",
                "compression.indices=rice"],
    "powersgd": ["compression.uplink=powersgd", "compression.rank=2",
                 "compression.error_feedback=true"],
}
MIN_RATIO = {"topk": 40.0, "int8": 3.9, "fp16": 1.99, "compact": 100.0, "powersgd": 6.5}
FRAMING = 400


@pytest.fixture(scope="module")
def measured(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """Per method: the raw upload sizes the server received and the run's metrics."""
    from tests.deploy.test_personal_grpc import _deploy

    out: dict[str, dict[str, Any]] = {}
    for method, extra in METHODS.items():
        d = tmp_path_factory.mktemp(f"compressed-{method}")
        run = _deploy(d, BASE + extra, restart=False)
        assert all(isinstance(n, int) for n in run["sites"].values()), run["sites"]
        assert not isinstance(run.get("served"), BaseException), run.get("served")
        records = [json.loads(line) for line in (d / "run" / "metrics.jsonl").read_text().splitlines()]
        out[method] = {"results": run["wire"].results, "records": records, "dir": d}
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_the_bytes_received_per_update_are_bytes_up_plus_framing(
    measured: dict[str, dict[str, Any]], method: str,
) -> None:
    run = measured[method]
    records = run["records"]
    assert len(records) == 2 and all(r["clients"] == 4 for r in records), records
    for r in records:
        per_update = r["bytes_up"] / r["clients"]
        got = [len(x["raw"]) for x in run["results"] if x["round"] == r["round"]]
        assert len(got) == 4, got
        for size in got:
            assert 0 < size - per_update < FRAMING, (method, size, per_update)


@pytest.mark.parametrize("method", [m for m in METHODS if m != "none"])
def test_the_bytes_received_shrink_by_the_compression_ratio(
    measured: dict[str, dict[str, Any]], method: str,
) -> None:
    plain, packed = measured["none"], measured[method]
    ratio = plain["records"][0]["bytes_up"] / packed["records"][0]["bytes_up"]
    assert ratio >= MIN_RATIO[method], ratio
    raw_plain = max(len(x["raw"]) for x in plain["results"])
    for x in packed["results"]:
        # raw = encoded + framing, raw_plain = ratio · encoded + framing': the difference is
        # one framing less a ratio-th of the other, never more
        assert 0 < len(x["raw"]) - raw_plain / ratio < FRAMING, (method, len(x["raw"]), ratio)


HONEST = ("cleveland", "hungarian", "switzerland")
HOSTILE = "va"
TOPK = ["rounds=3", "model.name=mlp", "evaluation.baselines=[]",
        "compression.uplink=topk", "compression.fraction=0.01"]
ATTACKS = {  # round -> (what the hostile site sends, the reason the server must give)
    1: ("out of range", r"indices outside \[0, \d+\)"),
    2: ("duplicated", "indices repeat or are not in increasing order"),
    3: ("header/length", r"indices hold \(4,\) values where the header says 5"),
}


def _malformed(what: str, d: int) -> Encoded:
    values = torch.full((5,), 0.5)
    if what == "out of range":
        indices = [0, 1, 2, 3, d + 10]
    elif what == "duplicated":
        indices = [0, 1, 1, 2, 3]
    else:
        indices, values = [0, 1, 2, 3], torch.full((4,), 0.5)
    return Encoded("topk", d, (5,), indices=torch.tensor(indices, dtype=torch.int32),
                   values=values)


def _hostile_run(d: Path, name: str, *, attack: bool, overrides: list[str] = TOPK,
                 attacks: dict[int, tuple[str, str]] = ATTACKS,
                 malformed: Any = _malformed) -> dict[str, Any]:
    """The real server with the three honest hospitals and the hostile one, which refuses
    every task (the reference) or sends one malformed update a round (``attack``: round →
    ``malformed(what, d)`` of ``attacks``) in a run of ``overrides``."""
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.codec import EvaluationEnvelope, ExchangeEnvelope
    from consortium.messages import EvaluationResult
    from tests.deploy.hostile_site import HostileSite
    from tests.deploy.test_hostile_grpc import Run, _hospital, _join

    out: dict[str, Any] = {"models": {}, "answers": {}, "honest": {}}
    ports: queue.Queue[int] = queue.Queue()
    approve = (manifest_hash(load_config(None, overrides)),)

    serve = serve_into(
        out, ports,
        certs=d / "certs" / "server", out=d / name,
        min_sites=4, overrides=overrides, register_timeout=60, round_timeout=60,
        heartbeat_s=10,
    )

    def honest(site: str, port: int) -> None:
        try:
            out["honest"][site] = SiteRunner(
                f"127.0.0.1:{port}", site=site, data=_hospital(d, site),
                certs=d / "certs" / "sites" / site, approve=approve, poll_s=1,
                give_up_after_s=30, state_dir=d / f"state-{name}" / site,
            ).run()
        except BaseException as exc:
            out["honest"][site] = exc

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    port = ports.get(timeout=60)
    assert port, f"the server did not start: {out.get('served')!r}"
    threads = [threading.Thread(target=honest, args=(s, port), daemon=True) for s in HONEST]
    for t in threads:
        t.start()
    try:
        with HostileSite(f"127.0.0.1:{port}", HOSTILE, certs=d / "certs" / "sites" / HOSTILE) as site:
            num_train, num_test = _join(site, _hospital(d, HOSTILE), Run(d / name), attack=False)
            for item in site.work():
                if isinstance(item, ExchangeEnvelope):
                    continue
                rnd = item.task.round
                if item.evaluate:  # the model after the round's aggregation
                    out["models"][rnd] = item.task.parameters.vector.clone()
                    site.push(EvaluationEnvelope(item.task_id, EvaluationResult(
                        rnd, HOSTILE, num_test, {"accuracy": 0.5, "loss": 0.7})))
                    continue
                if attack and rnd in attacks:
                    size = int(item.task.parameters.vector.numel())
                    update = Update(HOSTILE, torch.zeros(0), float(num_train), {"steps": 1.0},
                                    encoded=malformed(attacks[rnd][0], size))
                    out["answers"][rnd] = site.push(ResultEnvelope(item.task_id, Result(
                        rnd, HOSTILE, update)))
                else:
                    out["answers"][rnd] = site.push(ResultEnvelope(item.task_id, Result(
                        rnd, HOSTILE, None, error="not this round", refused=True)))
    finally:
        server.join(timeout=180)
        for t in threads:
            t.join(timeout=30)
    return out


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    from consortium.deploy.provision import provision

    d = tmp_path_factory.mktemp("compressed-hostile")
    provision([*HONEST, HOSTILE], d / "certs")
    return _hostile_run(d, "reference", attack=False), _hostile_run(d, "attacked", attack=True)


@pytest.mark.parametrize("rnd", sorted(ATTACKS))
def test_a_malformed_compressed_update_is_rejected_and_the_model_is_untouched(
    hostile_runs: tuple[dict[str, Any], dict[str, Any]], rnd: int,
) -> None:
    reference, attacked = hostile_runs
    for run in hostile_runs:
        assert not isinstance(run.get("served"), BaseException), run.get("served")
        assert all(isinstance(n, int) for n in run["honest"].values()), run["honest"]
    answer = attacked["answers"][rnd]
    assert not answer.accepted
    assert re.search(ATTACKS[rnd][1], answer.reason), answer.reason
    assert reference["answers"][rnd].accepted  # the honest refusal
    assert torch.equal(attacked["models"][rnd], reference["models"][rnd])  # bit for bit


def test_each_sites_error_feedback_residual_is_saved_in_its_state(tmp_path: Path) -> None:
    """Top-k with error feedback over gRPC: what a site's update lost (``v − C(v)``) is in its
    ``--state`` file after the run, with the model's length, as its other client state; and
    the sites' receipts match the server's audit log (``consortium audit verify --against``)."""
    from safetensors.torch import load_file

    from consortium.compression import RESIDUAL_KEY
    from tests.deploy.test_personal_grpc import HOSPITALS, _deploy

    run = _deploy(tmp_path, BASE + METHODS["topk"] + ["compression.error_feedback=true"],
                  restart=False)
    assert all(isinstance(n, int) for n in run["sites"].values()), run["sites"]
    size = 256 * 32 + 256 + 2 * 256 + 2  # the MLP on the hospitals' 32 encoded features
    for site in HOSPITALS:
        (state,) = (tmp_path / "state" / site).rglob("*.safetensors")
        saved = {k: v for k, v in load_file(str(state)).items()
                 if k.endswith(RESIDUAL_KEY) and k.startswith(site)}
        (residual,) = saved.values()
        assert residual.numel() == size and bool(residual.abs().sum() > 0), site
    # the sites' receipts digest the decoded delta, as the server's audit log does
    from consortium.deploy.receipts import verify_against

    report = verify_against(tmp_path / "run", sorted((tmp_path / "state").rglob("receipts.jsonl")))
    assert report.receipts >= 4 * 2 and report.ok, report.summary()


# --------------------------------------------- compact top-k and PowerSGD over the real service

SPARSE = [*TOPK, "compression.values=fp16", "compression.indices=rice"]
SPARSE_ATTACKS = {  # the mlp's d = 2242: k = 22, b = 6, 132 bits of remainders (4 padding)
    1: ("padding", "the padding bits after the remainders are not zero"),
    2: ("long", r"the stream has \d+ bytes; 22 indices below 2242 with b = 6 take 17 bytes"),
    3: ("beyond d", "an index 2242 is not below d = 2242"),
}


def _malformed_sparse(what: str, d: int) -> Encoded:
    import numpy as np

    from consortium.compression.codecs import keep_count
    from consortium.compression.rice import encode_gaps, remainder_bytes, rice_parameter

    k = keep_count(d, 0.01)
    b = rice_parameter(d, k)
    last = d if what == "beyond d" else d - 1
    codes = encode_gaps(np.array([*range(0, (k - 1) * 50, 50), last]), b)
    if what == "padding":
        codes[remainder_bytes(k, b) - 1] |= 0x80
    elif what == "long":  # a stream far longer than k indices below d can need
        codes = np.concatenate([codes, np.full(4 * d, 0xFF, dtype=np.uint8)])
    return Encoded("sparse", d, (k,), values=torch.full((k,), 0.5, dtype=torch.float16),
                   codes=torch.from_numpy(codes))


@pytest.fixture(scope="module")
def hostile_sparse_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Any], dict[str, Any]]:
    from consortium.deploy.provision import provision

    d = tmp_path_factory.mktemp("sparse-hostile")
    provision([*HONEST, HOSTILE], d / "certs")
    kw: dict[str, Any] = {"overrides": SPARSE, "attacks": SPARSE_ATTACKS,
                          "malformed": _malformed_sparse}
    return (_hostile_run(d, "reference", attack=False, **kw),
            _hostile_run(d, "attacked", attack=True, **kw))


@pytest.mark.parametrize("rnd", sorted(SPARSE_ATTACKS))
def test_a_malformed_sparse_update_over_grpc_is_rejected_and_the_model_is_untouched(
    hostile_sparse_runs: tuple[dict[str, Any], dict[str, Any]], rnd: int,
) -> None:
    reference, attacked = hostile_sparse_runs
    for run in hostile_sparse_runs:
        assert not isinstance(run.get("served"), BaseException), run.get("served")
        assert all(isinstance(n, int) for n in run["honest"].values()), run["honest"]
    answer = attacked["answers"][rnd]
    assert not answer.accepted
    assert re.search(SPARSE_ATTACKS[rnd][1], answer.reason), answer.reason
    assert reference["answers"][rnd].accepted
    assert torch.equal(attacked["models"][rnd], reference["models"][rnd])  # bit for bit


def test_compact_topk_sends_its_exact_bytes(measured: dict[str, dict[str, Any]]) -> None:
    """fp16 values and Rice-coded gaps: 2 bytes a value, about b + 2 bits an index."""
    from consortium.compression.codecs import keep_count
    from consortium.compression.rice import max_unary_bytes, remainder_bytes, rice_parameter

    size = 256 * 32 + 256 + 2 * 256 + 2
    k = keep_count(size, 0.01)
    b = rice_parameter(size, k)
    least = len("sparse") + 8 * 2 + 2 * k + remainder_bytes(k, b) + (k + 7) // 8
    most = least - (k + 7) // 8 + max_unary_bytes(size, k, b)
    for r in measured["compact"]["records"]:
        per_update = r["bytes_up"] / r["clients"]
        assert least <= per_update <= most, (least, per_update, most)


def test_powersgd_over_grpc_sends_its_factors_and_keeps_q_and_the_residual(
    measured: dict[str, dict[str, Any]],
) -> None:
    """PowerSGD (rank 2, error feedback) over the real service: each update is the factors
    the site computed with its own layout (``lowrank`` of exactly :func:`lowrank_length`
    floats), the server decodes it with its own layout, the digests the sites keep in their
    receipts match the server's audit log (both decode the same delta), and each site's
    ``--state`` holds its warm-start ``Q`` and its residual. (The final model cannot equal a
    simulation's bit for bit: a deployed site draws its first ``Q`` from its own CSPRNG.)"""
    from safetensors.torch import load_file

    from consortium.compression import RESIDUAL_KEY
    from consortium.compression.lowrank import lowrank_length, q_length
    from consortium.compression.stage import Q_KEY
    from consortium.deploy.receipts import verify_against
    from tests.deploy.test_personal_grpc import HOSPITALS

    run = measured["powersgd"]
    shapes = [(256, 32), (256,), (2, 256), (2,)]  # the MLP on the hospitals' 32 features
    size = sum(int(torch.Size(s).numel()) for s in shapes)
    per_update = len("lowrank") + 8 * 2 + 4 * lowrank_length(shapes, 2)
    assert lowrank_length(shapes, 2) == (256 + 32) * 2 + 256 + 2 * 256 + 2  # 2 × 256 raw
    assert [r["bytes_up"] for r in run["records"]] == [r["clients"] * per_update
                                                     for r in run["records"]]
    d: Path = run["dir"]
    for site in HOSPITALS:
        (state,) = (d / "state" / site).rglob("*.safetensors")
        saved = load_file(str(state))
        (q,) = [v for k, v in saved.items() if k.startswith(site) and k.endswith(Q_KEY)]
        assert q.numel() == q_length(shapes, 2) == 32 * 2, site  # the one factorised layer
        (residual,) = [v for k, v in saved.items()
                       if k.startswith(site) and k.endswith(RESIDUAL_KEY)]
        assert residual.numel() == size and bool(residual.abs().sum() > 0), site
    report = verify_against(d / "run", sorted((d / "state").rglob("receipts.jsonl")))
    assert report.receipts >= 4 * 2 and report.ok, report.summary()
