"""The signed audit head and the sites' receipts: a server that rewrites, re-hashes or cuts its
audit log short is caught by what it told the sites (issue 13, point 8)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("grpc", reason="deployment needs: pip install 'consortium[deploy]'")
pytest.importorskip("cryptography", reason="deployment needs: pip install 'consortium[deploy]'")

from consortium.deploy.audit import AUDIT_FILENAME, AuditHead, AuditLog, update_digest, verify
from consortium.deploy.receipts import (
    HeadSigner,
    ReceiptLog,
    UntrustedServer,
    head_message,
    server_public_key,
    verify_against,
    verify_head,
)

SITES = ("north", "south")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from consortium.deploy.provision import provision

    root = tmp_path_factory.mktemp("pki")
    provision(SITES, root / "certs")
    provision(["x"], root / "other")  # another consortium
    return root


def _ca(pki: Path) -> bytes:
    return (pki / "certs" / "ca.pem").read_bytes()


# ------------------------------------------------------------------------------- signing heads


def test_a_signed_head_verifies_only_for_what_was_signed(pki: Path) -> None:
    signer = HeadSigner.from_certs(pki / "certs" / "server")
    key = server_public_key(signer.certificate, ca_pem=_ca(pki))
    told = dict(run_id="r-1", site="north", round=2, task_id="t7", kind="train", seq=9,
                hash="ab" * 32)
    signature = signer.sign(head_message(**told))
    assert verify_head(key, head_message(**told), signature)
    for field, other in [("seq", 8), ("hash", "cd" * 32), ("task_id", "t8"), ("site", "south"),
                         ("run_id", "r-2"), ("kind", "evaluate"), ("round", 3)]:
        assert not verify_head(key, head_message(**{**told, field: other}), signature), field
    assert not verify_head(key, head_message(**told), b"")
    assert not verify_head(key, head_message(**told), signature[:-1] + bytes([signature[-1] ^ 1]))


def test_a_site_accepts_only_its_consortiums_server_certificate(pki: Path) -> None:
    site_cert = (pki / "certs" / "sites" / "north" / "client.pem").read_bytes()
    with pytest.raises(UntrustedServer, match="not a server certificate"):
        server_public_key(site_cert, ca_pem=_ca(pki))
    foreign = (pki / "other" / "server" / "server.pem").read_bytes()
    with pytest.raises(UntrustedServer, match="not issued by this site's consortium CA"):
        server_public_key(foreign, ca_pem=_ca(pki))
    with pytest.raises(UntrustedServer, match="cannot be parsed"):
        server_public_key(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                          ca_pem=_ca(pki))


def test_the_head_travels_in_tasks_and_evaluation_tasks() -> None:
    from consortium.deploy.codec import (
        DecodeError,
        ParametersCache,
        TaskEnvelope,
        decode_work,
        encode_work,
    )
    from consortium.messages import Task
    from consortium.types import Layout, Parameters, TensorSpec

    params = Parameters(Layout((TensorSpec("w", (3,), torch.float32),)), torch.ones(3))
    head = AuditHead(12, "0f" * 32, b"\x30" * 70)
    for evaluate in (False, True):
        env = TaskEnvelope("t1", Task(round=2, client_id="north", parameters=params, seed=1),
                           evaluate=evaluate, head=head)
        for cache in (None, ParametersCache()):
            back = decode_work(encode_work(env, cache=cache))
            assert isinstance(back, TaskEnvelope) and back.head == head and back.evaluate == evaluate
    bad = TaskEnvelope("t1", Task(round=2, client_id="north", parameters=params, seed=1),
                       head=AuditHead(1, "not hex"))
    with pytest.raises(DecodeError, match="64 hex digits"):
        decode_work(encode_work(bad))
    plain = decode_work(encode_work(TaskEnvelope("t1", Task(round=2, client_id="north",
                                                            parameters=params, seed=1))))
    assert isinstance(plain, TaskEnvelope) and plain.head is None


def test_the_hub_signs_the_head_as_the_task_leaves(pki: Path, hub) -> None:
    from consortium.deploy.codec import TaskEnvelope
    from consortium.deploy.validate import ExpectedTask
    from consortium.messages import Task
    from consortium.types import Parameters

    hub.signer = HeadSigner.from_certs(pki / "certs" / "server")
    session = hub.register("north")
    hub.expect("north", 1, "t1", "train", ExpectedTask(site="north", round=1, task_id="t1"))
    task = Task(round=1, client_id="north", parameters=Parameters(hub.layout, torch.zeros(3)),
                seed=1)
    hub._sites["north"].queue.put_nowait(TaskEnvelope("t1", task))
    item = hub.loop.run_until_complete(hub.next_work(session, 1.0))
    assert item.head.seq == hub.audit.entries and item.head.hash == hub.audit.last_hash
    entries = [json.loads(line) for line in hub.audit.path.read_text().splitlines()]
    assert entries[item.head.seq - 1]["kind"] == "task"  # the head commits to the task itself
    key = server_public_key(hub.server_certificate, ca_pem=_ca(pki))
    assert verify_head(key, head_message(run_id=hub.run_id, site="north", round=1, task_id="t1",
                                         kind="train", seq=item.head.seq, hash=item.head.hash),
                       item.head.signature)


# ------------------------------------------------------------ a log and its receipts, by hand


def _run(tmp: Path, signer: HeadSigner | None, rounds: int = 3) -> tuple[Path, list[Path]]:
    """What a server and two sites write: for each task the server logs it, signs its head and
    the site keeps a receipt; then the server logs the result the site sent."""
    run = tmp / "run"
    log = AuditLog(run / AUDIT_FILENAME)
    run_id = "run-0a1b2c3d"
    log.append("run", run_id=run_id, resumed=False, signed=signer is not None)
    receipts = {s: ReceiptLog(tmp / s / "receipts.jsonl") for s in SITES}
    for site, r in receipts.items():
        r.server(run_id=run_id, site=site, certificate=signer.certificate if signer else b"")
    for rnd in range(1, rounds + 1):
        for site in SITES:
            task_id = f"{site}-{rnd}"
            log.append("task", site=site, round=rnd, task_id=task_id, task_kind="train")
            head = log.head()
            if signer is not None:
                head = AuditHead(head.seq, head.hash, signer.sign(head_message(
                    run_id=run_id, site=site, round=rnd, task_id=task_id, kind="train",
                    seq=head.seq, hash=head.hash)))
            digest, norm = update_digest(torch.full((4,), float(rnd)))
            log.append("result", site=site, round=rnd, task_id=task_id, update_sha256=digest,
                       norm=norm, weight=10.0)
            receipts[site].record(run_id=run_id, site=site, round=rnd, task_id=task_id,
                                  kind="train", head=head, verified=True if signer else None,
                                  sent="update", update_sha256=digest, accepted=True)
        log.append("round", round=rnd)
    log.close()
    return run, [tmp / s / "receipts.jsonl" for s in SITES]


def _rewrite(path: Path, change) -> None:
    """What a forger who knows the format does: change entries, then re-hash the whole chain
    so that `consortium audit verify` alone reports OK."""
    entries = change([json.loads(line) for line in path.read_text().splitlines()])
    prev = "0" * 64
    lines = []
    for seq, entry in enumerate(entries, start=1):
        body = {k: v for k, v in entry.items() if k != "hash"}
        body.update(seq=seq, prev=prev)
        canonical = json.dumps(body, sort_keys=True, separators=(",", ":"))
        prev = hashlib.sha256(canonical.encode()).hexdigest()
        lines.append(json.dumps({**body, "hash": prev}, sort_keys=True, separators=(",", ":")))
    path.write_text("\n".join(lines) + "\n")
    assert verify(path).ok  # the chain alone cannot tell


@pytest.fixture(scope="module")
def signer(pki: Path) -> HeadSigner:
    return HeadSigner.from_certs(pki / "certs" / "server")


def test_an_honest_log_matches_every_receipt(tmp_path: Path, signer: HeadSigner) -> None:
    run, receipts = _run(tmp_path, signer)
    report = verify_against(run, receipts)
    assert report.ok, report.summary()
    assert (report.receipts, report.sites, report.unsigned) == (6, SITES, 0)
    # seq 1 "run", then per round: task, result (north), task, result (south), round
    assert report.latest_seq == 14


def test_an_edited_and_rehashed_entry_is_found_at_the_first_head_after_it(
    tmp_path: Path, signer: HeadSigner
) -> None:
    run, receipts = _run(tmp_path, signer)

    def shrink_a_weight(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        entries[7]["weight"] = 0.0  # seq 8: round 2's first result (north's)
        return entries

    _rewrite(run / AUDIT_FILENAME, shrink_a_weight)
    report = verify_against(run, receipts)
    assert not report.ok
    # every head from seq 8 on differs; those before (2, 4, 7) still match
    assert sorted({p.seq for p in report.problems}) == [9, 12, 14]
    assert {p.site for p in report.problems} == set(SITES)
    assert all("rewritten at or before seq" in p.message for p in report.problems)
    assert "3 MISMATCH(ES)" in report.summary()


def test_a_deleted_entry_is_found(tmp_path: Path, signer: HeadSigner) -> None:
    run, receipts = _run(tmp_path, signer)
    _rewrite(run / AUDIT_FILENAME, lambda e: e[:9] + e[10:])  # seq 10: round 2's south result
    report = verify_against(run, receipts)
    assert [p.seq for p in report.problems if "rewritten" in p.message] == [12, 14]
    # and the result south was acknowledged for is gone
    assert any(p.task_id == "south-2" and "no result" in p.message for p in report.problems)


def test_a_truncated_log_is_found(tmp_path: Path, signer: HeadSigner) -> None:
    run, receipts = _run(tmp_path, signer)
    _rewrite(run / AUDIT_FILENAME, lambda e: e[:11])  # cut after round 2's south result
    report = verify_against(run, receipts)
    truncated = [p for p in report.problems if "truncated" in p.message]
    assert [(p.site, p.seq) for p in truncated] == [("north", 12), ("south", 14)]
    assert "the log ends at seq 11" in truncated[0].message


def test_a_result_changed_after_the_last_head_is_found_by_its_digest(
    tmp_path: Path, signer: HeadSigner
) -> None:
    run, receipts = _run(tmp_path, signer)

    def swap_last_update(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        entries[-2]["update_sha256"] = "f" * 64  # south's round-3 result, after every head
        return entries

    _rewrite(run / AUDIT_FILENAME, swap_last_update)
    report = verify_against(run, receipts)
    assert [(p.site, p.task_id) for p in report.problems] == [("south", "south-3")]
    assert "the site sent" in report.problems[0].message


def test_a_receipt_forged_by_a_site_is_refused_not_held_against_the_log(
    tmp_path: Path, signer: HeadSigner
) -> None:
    run, receipts = _run(tmp_path, signer)

    def claim_another_hash(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        entries[1]["head_hash"] = "e" * 64  # north's first receipt
        return entries

    _rewrite(receipts[0], claim_another_hash)  # a site that re-hashes its own receipt log
    report = verify_against(run, receipts)
    assert len(report.problems) == 1
    assert report.problems[0].site == "north" and report.problems[0].seq == 2
    assert "signature does not verify" in report.problems[0].message


def test_unsigned_heads_still_bind_the_log_and_say_so(tmp_path: Path) -> None:
    run, receipts = _run(tmp_path, None)
    assert verify_against(run, receipts).ok
    _rewrite(run / AUDIT_FILENAME, lambda e: e[:-3])
    report = verify_against(run, receipts)
    assert report.unsigned == 6 and "6 unsigned" in report.summary()
    assert [p.seq for p in report.problems if "truncated" in p.message] == [14]


def test_the_cli_checks_receipts_and_exits_1_on_a_mismatch(
    tmp_path: Path, signer: HeadSigner, capsys: pytest.CaptureFixture[str]
) -> None:
    from consortium.cli import main

    run, receipts = _run(tmp_path, signer)
    args = ["audit", "verify", str(run), "--against", *map(str, receipts)]
    assert main(args) == 0
    assert "every receipt matches the log" in capsys.readouterr().out
    _rewrite(run / AUDIT_FILENAME, lambda e: e[:5])
    assert main(args) == 1
    assert "the log was truncated" in capsys.readouterr().out
    cert = tmp_path / "server.pem"
    cert.write_bytes(signer.certificate)
    assert main([*args, "--server-cert", str(cert)]) == 1
    assert main(["audit", "verify", str(run), "--against", str(tmp_path / "nope.jsonl")]) == 2


# ------------------------------------------------------- a real deployment over gRPC, in-process


def _deploy(tmp_path: Path, *, secure: bool = True) -> tuple[Path, list[Path], Any]:
    """consortium server (TLS unless not ``secure``; 2 rounds) and two sites on 127.0.0.1, in
    threads; the run directory and the sites' receipt files."""
    from consortium.client.approval import manifest_hash
    from consortium.config import load_config
    from consortium.deploy.client import SiteRunner
    from consortium.deploy.provision import provision
    from consortium.deploy.server import serve
    from tests.deploy.test_e2e import EXPERIMENT, _write_sites

    _write_sites(tmp_path)
    exp = tmp_path / "exp.toml"
    exp.write_text(EXPERIMENT.replace("rounds = 4", "rounds = 2"))
    provision(SITES, tmp_path / "certs")
    port: list[int] = []
    listening = threading.Event()
    outcome: dict[str, Any] = {}

    def server() -> None:
        try:
            outcome["result"] = serve(
                exp, listen="127.0.0.1:0", certs=tmp_path / "certs" / "server" if secure else None,
                out=tmp_path / "run", min_sites=len(SITES), register_timeout=60,
                round_timeout=60, heartbeat_s=5, progress=False,
                on_listening=lambda p: (port.append(p), listening.set()),
            )
        except BaseException as exc:  # surfaced below
            outcome["error"] = exc
            listening.set()

    threads = torch.get_num_threads()  # serve() sets 1 for its process; this one goes on
    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    assert listening.wait(60) and port, outcome.get("error")
    approve = [manifest_hash(load_config(exp, []))]
    state = {s: tmp_path / "certs" / "sites" / s / "state" for s in SITES}
    runners = [SiteRunner(f"127.0.0.1:{port[0]}", site=s, data=tmp_path / f"{s}.csv",
                          certs=tmp_path / "certs" / "sites" / s if secure else None,
                          state_dir=state[s], approve=approve, poll_s=1, give_up_after_s=60)
               for s in SITES]
    sites = [threading.Thread(target=r.run, daemon=True) for r in runners]
    for t in sites:
        t.start()
    thread.join(120)
    for t in sites:
        t.join(30)
    torch.set_num_threads(threads)
    assert "error" not in outcome, outcome.get("error")
    return tmp_path / "run", [state[s] / "receipts.jsonl" for s in SITES], outcome["result"]


def test_a_real_deployment_writes_receipts_that_catch_a_rewritten_log(tmp_path: Path) -> None:
    started = time.monotonic()
    run, receipts, _ = _deploy(tmp_path)
    report = verify_against(run, receipts)
    assert report.ok, report.summary()
    assert report.unsigned == 0 and report.sites == SITES
    kinds = [json.loads(line)["task_kind"] for line in receipts[0].read_text().splitlines()
             if json.loads(line)["kind"] == "receipt"]
    assert kinds.count("train") == 2 and "evaluate" in kinds
    rows = [json.loads(line) for line in receipts[0].read_text().splitlines()]
    assert all(r["verified"] is True for r in rows if r["kind"] == "receipt")

    def lighter(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        first = next(i for i, e in enumerate(entries) if e["kind"] == "result")
        entries[first]["weight"] = 1.0
        return entries

    _rewrite(run / AUDIT_FILENAME, lighter)
    report = verify_against(run, receipts)
    assert not report.ok and report.problems
    assert time.monotonic() - started < 60


def test_an_insecure_deployment_keeps_unsigned_receipts_that_still_bind_the_log(
    tmp_path: Path,
) -> None:
    run, receipts, _ = _deploy(tmp_path, secure=False)
    rows = [json.loads(line) for line in receipts[1].read_text().splitlines()]
    assert rows[0]["kind"] == "server" and rows[0]["certificate"] is None
    told = [r for r in rows if r["kind"] == "receipt"]
    assert told and all(r["head_signature"] == "" and r["verified"] is None for r in told)
    report = verify_against(run, receipts)
    assert report.ok and report.unsigned == report.receipts, report.summary()
    _rewrite(run / AUDIT_FILENAME, lambda e: e[: told[0]["head_seq"] - 1])
    report = verify_against(run, receipts)
    assert any("truncated" in p.message and p.site == "south" for p in report.problems)


def test_a_deployed_checkpoint_replaced_after_the_run_is_refused_on_resume(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import load_file, save_file

    from consortium.cli import main

    run, _, _ = _deploy(tmp_path)
    entries = [json.loads(line) for line in (run / AUDIT_FILENAME).read_text().splitlines()]
    assert [e["round"] for e in entries if e["kind"] == "checkpoint"] == [1, 2]
    tensors = load_file(str(run / "checkpoint" / "tensors.safetensors"))
    tensors["params"] = tensors["params"] * 4  # finite, float32, right size: only the digest tells
    save_file(tensors, str(run / "checkpoint" / "tensors.safetensors"))
    capsys.readouterr()
    threads = torch.get_num_threads()
    code = main(["server", "--resume", str(run), "--certs", str(tmp_path / "certs" / "server"),
                 "--listen", "127.0.0.1:0", "--min-sites", "2", "--no-progress"])
    torch.set_num_threads(threads)
    err = capsys.readouterr().err
    refusal = [line for line in err.splitlines() if line.startswith("consortium: error:")]
    assert code == 2 and len(refusal) == 1, err
    assert "replaced or edited after it was written" in refusal[0]


def test_the_newest_checkpoint_entries_are_read_from_the_end(tmp_path: Path) -> None:
    from consortium.deploy.audit import last_entries

    with AuditLog(tmp_path / AUDIT_FILENAME) as log:
        for rnd in range(1, 5):
            log.append("checkpoint", round=rnd, sha256=f"{rnd:064x}")
            log.append("round", round=rnd)
    found = last_entries(tmp_path / AUDIT_FILENAME, "checkpoint", 2)
    assert [e["round"] for e in found] == [4, 3]
    lines = (tmp_path / AUDIT_FILENAME).read_text().splitlines()
    lines[6] = lines[6].replace('"round":4', '"round":9')  # edited, not re-hashed: vouches for nothing
    (tmp_path / AUDIT_FILENAME).write_text("\n".join(lines) + "\n")
    assert [e["round"] for e in last_entries(tmp_path / AUDIT_FILENAME, "checkpoint", 2)] == [3, 2]
    assert last_entries(tmp_path / "missing.jsonl", "checkpoint") == []
