"""The audit head signed into every task, the sites' receipts, and the check of a log against them.

A hash chain has no secret: whoever holds the server's run directory can edit an entry and
re-hash everything after it, delete entries, or cut the log short, and
:func:`consortium.deploy.audit.verify` reports OK (issue 13, point 8). The remedy is to publish
the chain's head to parties the server does not control, as Certificate Transparency does with
its signed tree heads (RFC 6962 §3.5) and as Crosby and Wallach (2009, "Efficient data
structures for tamper-evident logging") do with commitments handed to auditors:

- the server signs its :class:`~consortium.deploy.audit.AuditHead` (entry count and newest
  hash) together with the task it sends (run id, site, round, task id, kind; see
  :func:`head_message`) with its provisioned ECDSA P-256 key (:class:`HeadSigner`), and sends
  its certificate at registration;
- every site checks that certificate against its consortium CA (:func:`server_public_key`),
  checks each head's signature, and appends a receipt per task to its own hash-chained
  :class:`ReceiptLog`: the signed head it was told and the digest of the update it sent (the
  same :func:`~consortium.deploy.audit.update_digest` the server's log records);
- :func:`verify_against` then holds the server's log to every receipt: the entry at each
  receipt's ``seq`` must carry the hash the site was told (an edited and re-hashed entry, or a
  deleted one, changes every hash after it), the log must reach the largest ``seq`` any site was
  told (truncation), and every result a site had accepted must be in the log with its digest.

What it cannot see: a change after the last head any site received (the final entries of a
run, or a log rewritten and never shown to a site again), and a result the server never
acknowledged. Heads are signed, so a site cannot forge a receipt that incriminates an honest
server; with ``--insecure`` there is no key and heads travel unsigned (the receipts say so).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from consortium.deploy.audit import (
    AUDIT_FILENAME,
    AuditError,
    AuditHead,
    AuditLog,
    AuditReport,
    canonical_bytes,
    verify,
)
from consortium.errors import ConsortiumError

__all__ = [
    "HEAD_CONTEXT",
    "MAX_CERTIFICATE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "RECEIPTS_FILENAME",
    "HeadSigner",
    "ReceiptLog",
    "ReceiptProblem",
    "ReceiptReport",
    "UntrustedServer",
    "head_message",
    "server_public_key",
    "verify_against",
    "verify_head",
]

log = logging.getLogger("consortium.audit")

HEAD_CONTEXT = b"consortium/audit-head/v1\n"
"""Prefixed to every signed head, so the signature cannot be replayed as any other message."""

MAX_CERTIFICATE_BYTES = 8 * 1024
"""Largest server certificate a site accepts; a provisioned one is about 700 bytes of PEM."""

MAX_SIGNATURE_BYTES = 256
"""Largest head signature accepted; an ECDSA P-256 signature in DER is at most 72 bytes."""

RECEIPTS_FILENAME = "receipts.jsonl"
"""The receipt log's name inside a site's ``--state`` folder."""

_HEX = frozenset("0123456789abcdef")


class UntrustedServer(ConsortiumError):
    """The server's audit certificate is not one the consortium CA issued to a server."""


def head_message(
    *, run_id: str, site: str, round: int, task_id: str, kind: str, seq: int, hash: str
) -> bytes:
    """The bytes the server signs: the head and the task it came with, as canonical JSON.

    Binding the task makes a receipt evidence that this server sent that task to that site
    at that point of its log; the context prefix keeps the signature from meaning anything
    else.
    """
    return HEAD_CONTEXT + canonical_bytes({
        "run_id": run_id, "site": site, "round": int(round), "task_id": task_id, "kind": kind,
        "seq": int(seq), "hash": hash,
    })


def is_hash(value: object) -> bool:
    """Whether ``value`` is 64 lowercase hex digits (a SHA-256 as the audit log writes it)."""
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX


class HeadSigner:
    """The server's provisioned key, signing audit heads (ECDSA P-256 with SHA-256, DER).

    Args:
        key_pem: the server's private key (``server/server.key``).
        certificate_pem: its certificate (``server/server.pem``), sent to the sites.
    """

    def __init__(self, key_pem: bytes, certificate_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConsortiumError("the server key is not an EC key; re-run `consortium provision`")
        self._key = key
        self.certificate = bytes(certificate_pem)

    @classmethod
    def from_certs(cls, certs_dir: Path | str) -> HeadSigner:
        """The signer of a provisioned server folder (``--certs``).

        Raises:
            ConfigError: the folder's credentials are missing or inconsistent.
        """
        from consortium.deploy.provision import load_server_credentials

        creds = load_server_credentials(certs_dir)
        return cls(creds.key_pem, creds.cert_pem)

    def sign(self, message: bytes) -> bytes:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        return bytes(self._key.sign(message, ec.ECDSA(hashes.SHA256())))


def server_public_key(
    certificate_pem: bytes, *, ca_pem: bytes | None = None, now: dt.datetime | None = None
) -> Any:
    """The public key of a server certificate, checked against the consortium CA if given.

    With ``ca_pem`` the certificate must be issued (and signed) by that CA, be valid now, carry
    the serverAuth extended key usage (a site's certificate cannot stand in for the server's)
    and hold a P-256 key. Without it (an auditor who took the certificate from a receipt the
    site already checked), only the key type is checked.

    Raises:
        UntrustedServer: which check failed.
    """
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    if not 0 < len(certificate_pem) <= MAX_CERTIFICATE_BYTES:
        raise UntrustedServer(
            f"the server certificate is empty or longer than {MAX_CERTIFICATE_BYTES} bytes"
        )
    try:
        cert = x509.load_pem_x509_certificate(bytes(certificate_pem))
    except ValueError as exc:
        raise UntrustedServer(f"the server certificate cannot be parsed: {exc}") from None
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise UntrustedServer("the server certificate's key is not ECDSA P-256")
    if ca_pem is None:
        return key
    ca = x509.load_pem_x509_certificate(bytes(ca_pem))
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as exc:  # another issuer or signature
        raise UntrustedServer(
            "the server certificate was not issued by this site's consortium CA "
            f"({type(exc).__name__}): another consortium's server, or a forged certificate"
        ) from None
    moment = now or dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise UntrustedServer(
            f"the server certificate is valid from {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}, not now: re-provision the server"
        )
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = x509.ExtendedKeyUsage([])
    if ExtendedKeyUsageOID.SERVER_AUTH not in list(usages):
        raise UntrustedServer(
            "the certificate the server sent is not a server certificate (no serverAuth usage)"
        )
    return key


def verify_head(public_key: Any, message: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is the server's ECDSA-SHA256 signature of ``message``."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    if not 0 < len(signature) <= MAX_SIGNATURE_BYTES:
        return False
    try:
        public_key.verify(bytes(signature), message, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def certificate_sha256(certificate_pem: bytes) -> str:
    """The SHA-256 of a certificate's PEM bytes, as the receipts name it."""
    return hashlib.sha256(bytes(certificate_pem)).hexdigest()


class ReceiptLog:
    """A site's own record of what the server told it and what it sent: hash-chained JSON
    lines (the audit log's format), one ``"server"`` entry per connection (the certificate
    the server presented) and one ``"receipt"`` entry per task.

    The file is opened for each entry and closed again (a few per round), so two site
    processes writing one file take turns under the audit log's lock instead of forking it.

    Args:
        path: the receipt file (``<state>/receipts.jsonl`` by default).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def server(self, *, run_id: str, site: str, certificate: bytes) -> dict[str, Any]:
        """Record the certificate the server signs heads with (empty: none, ``--insecure``)."""
        return self._append(
            "server", run_id=run_id, site=site,
            certificate=bytes(certificate).decode("ascii", "replace") if certificate else None,
            certificate_sha256=certificate_sha256(certificate) if certificate else None,
        )

    def record(
        self, *, run_id: str, site: str, round: int, task_id: str, kind: str,
        head: AuditHead | None, verified: bool | None, sent: str,
        update_sha256: str | None = None, accepted: bool | None = None, reason: str = "",
    ) -> dict[str, Any]:
        """Record one task: the head it came with (``verified``: its signature checked out;
        None: unsigned) and what went back (``sent``: ``"update"``, ``"error"``,
        ``"refused"``, ``"evaluation"``; ``accepted``: the server's acknowledgement, None if
        none came)."""
        return self._append(
            "receipt", run_id=run_id, site=site, round=int(round), task_id=task_id,
            task_kind=kind, head_seq=head.seq if head is not None else None,
            head_hash=head.hash if head is not None else None,
            head_signature=head.signature.hex() if head is not None else None,
            verified=verified, sent=sent, update_sha256=update_sha256, accepted=accepted,
            reason=reason[:500],
        )

    def _append(self, kind: str, **fields: Any) -> dict[str, Any]:
        with AuditLog(self.path, fsync=True, recover=True) as receipts:
            return receipts.append(kind, **fields)


# ----------------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class ReceiptProblem:
    """One disagreement between the server's log and a site's receipts."""

    site: str
    seq: int | None
    task_id: str
    message: str

    def line(self) -> str:
        at = f"seq {self.seq}" if self.seq is not None else "-"
        return f"site {self.site!r}, {at}, task {self.task_id or '-'}: {self.message}"


@dataclass(frozen=True)
class ReceiptReport:
    """The result of :func:`verify_against`.

    Attributes:
        log: the chain check of the server's log (:func:`~consortium.deploy.audit.verify`).
        receipts: receipts checked (those of this run).
        sites: the sites whose receipts were checked.
        unsigned: receipts whose head was not signed (``--insecure``): they bind the log only
            as far as the sites are trusted.
        latest_seq: the largest ``seq`` any site was told.
        skipped: receipts of other runs, ignored.
        problems: every disagreement, in ``seq`` order.
    """

    log: AuditReport
    receipts: int
    sites: tuple[str, ...]
    unsigned: int
    latest_seq: int
    skipped: int
    problems: tuple[ReceiptProblem, ...]

    @property
    def ok(self) -> bool:
        return self.log.ok and not self.problems and self.receipts > 0

    def summary(self, limit: int = 20) -> str:
        """A few lines for the command line."""
        lines = [self.log.summary()]
        told = (f"{self.receipts} receipts from {len(self.sites)} site(s) "
                f"({', '.join(self.sites) or 'none'}); latest head told: seq {self.latest_seq}"
                + (f"; {self.unsigned} unsigned (--insecure)" if self.unsigned else "")
                + (f"; {self.skipped} of other runs skipped" if self.skipped else ""))
        if self.receipts == 0:
            lines.append(f"{told}: NOTHING CHECKED — no receipt of this run")
        elif not self.problems:
            lines.append(f"{told}: every receipt matches the log")
        else:
            lines.append(f"{told}: {len(self.problems)} MISMATCH(ES)")
            lines += [f"  {p.line()}" for p in self.problems[:limit]]
            if len(self.problems) > limit:
                lines.append(f"  ... and {len(self.problems) - limit} more")
        return "\n".join(lines)


def verify_against(
    run_dir: Path | str, receipts: Path | str | Iterable[Path | str], *,
    server_cert: bytes | None = None,
) -> ReceiptReport:
    """Check a server's audit log against the sites' receipt logs.

    For each receipt of this run (its run id is in the log's ``"run"`` entries, or starts with
    the run directory's name): the head's signature must verify with the server certificate
    (``server_cert``, else the one the sites recorded, which each checked against its CA); the
    log must reach the head's ``seq`` and its entry there must carry the head's hash; the task
    must be in the log for that site; and a result the server accepted must be in the log with
    the digest the site computed. A receipt whose signature fails is reported (the site's
    receipt was altered or forged) and not held against the log.

    Args:
        run_dir: the server's run directory (or its ``audit.jsonl``).
        receipts: receipt files (``<site state>/receipts.jsonl``), one per site.
        server_cert: the server certificate (PEM) to check signatures with.

    Raises:
        AuditError: the log or a receipt file cannot be read.
    """
    run_dir = Path(run_dir)
    log_path = run_dir / AUDIT_FILENAME if run_dir.is_dir() else run_dir
    files = [Path(receipts)] if isinstance(receipts, (str, Path)) else [Path(r) for r in receipts]
    chain = verify(log_path)
    problems: list[ReceiptProblem] = []
    entries: list[dict[str, Any]] = []
    for path in files:
        found, broken = _read_receipts(path)
        entries += found
        if broken is not None:
            site = next((str(e.get("site", "")) for e in found), path.name)
            problems.append(ReceiptProblem(site, None, "", f"{path}: {broken}"))
    told = {e["head_seq"] for e in entries if isinstance(e.get("head_seq"), int)}
    index = _LogIndex.read(log_path, told)
    name = run_dir.name if run_dir.is_dir() else log_path.parent.name
    mine = [e for e in entries if e["kind"] == "receipt" and index.is_run(e.get("run_id"), name)]
    skipped = sum(1 for e in entries if e["kind"] == "receipt") - len(mine)
    key = _public_key(server_cert, entries, problems)
    unsigned = 0
    for receipt in mine:
        unsigned += not receipt.get("head_signature")
        problems += _check_receipt(receipt, index, key)
    problems.sort(key=lambda p: (p.seq if p.seq is not None else -1, p.site, p.task_id))
    return ReceiptReport(
        log=chain, receipts=len(mine), sites=tuple(sorted({str(e.get("site")) for e in mine})),
        unsigned=unsigned,
        latest_seq=max((int(e["head_seq"]) for e in mine if isinstance(e.get("head_seq"), int)),
                       default=0),
        skipped=skipped, problems=tuple(problems),
    )


def _read_receipts(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The entries of one receipt file, and what breaks its own chain (None: intact)."""
    if not path.is_file():
        raise AuditError(
            f"no receipt log at {path}; a site keeps it at <state>/{RECEIPTS_FILENAME} (or "
            "where its --receipts option says)"
        )
    report = verify(path)
    out = []
    for raw in path.read_bytes().splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if isinstance(entry, dict) and isinstance(entry.get("kind"), str):
            out.append(entry)
    broken = None
    if report.problem is not None:
        broken = (f"the receipt log itself is broken at line {report.problem.line} "
                  f"({report.problem.message}); its entries are still compared")
    return out, broken


def _public_key(
    server_cert: bytes | None, entries: Sequence[Mapping[str, Any]], problems: list[ReceiptProblem]
) -> Any:
    """The key to check heads with: the given certificate's, else the one the sites recorded."""
    if server_cert is not None:
        return server_public_key(server_cert)
    recorded: dict[str, str] = {}
    for e in entries:
        if e["kind"] == "server" and isinstance(e.get("certificate"), str):
            recorded.setdefault(e["certificate"], str(e.get("site")))
    if len(recorded) > 1:
        problems.append(ReceiptProblem(
            ",".join(sorted(set(recorded.values()))), None, "",
            f"the sites recorded {len(recorded)} different server certificates; pass the "
            "server's with --server-cert",
        ))
    for pem in recorded:
        try:
            return server_public_key(pem.encode("ascii"))
        except UntrustedServer:
            continue
    return None


@dataclass
class _LogIndex:
    """What the receipts are compared with, in one pass over the log: the hashes at the
    ``seq`` the sites were told (not every entry's: a long log stays cheap to check), the
    tasks and results by task id, the run ids."""

    hashes: dict[int, str]
    tasks: dict[str, tuple[str, int]]  # task id -> (site, seq)
    results: dict[str, tuple[str, int, str | None]]  # task id -> (site, seq, update_sha256)
    run_ids: set[str]
    last_seq: int

    @classmethod
    def read(cls, path: Path, told: set[int]) -> _LogIndex:
        index = cls({}, {}, {}, set(), 0)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise AuditError(f"cannot read the audit log {path}: {exc}") from exc
        for raw in data.splitlines():
            try:
                entry = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
                continue
            seq = entry["seq"]
            if seq in told:
                index.hashes.setdefault(seq, str(entry.get("hash")))
            index.last_seq = max(index.last_seq, seq)
            kind, task_id = entry.get("kind"), str(entry.get("task_id", ""))
            if kind == "task":
                index.tasks.setdefault(task_id, (str(entry.get("site")), seq))
            elif kind == "result":
                digest = entry.get("update_sha256")
                index.results.setdefault(
                    task_id, (str(entry.get("site")), seq, digest if isinstance(digest, str) else None)
                )
            elif kind == "run" and isinstance(entry.get("run_id"), str):
                index.run_ids.add(entry["run_id"])
        return index

    def is_run(self, run_id: object, run_name: str) -> bool:
        if not isinstance(run_id, str):
            return False
        # the name prefix holds even if the "run" entries were removed from a rewritten log
        return run_id in self.run_ids or run_id.startswith(f"{run_name}-")


def _check_receipt(receipt: Mapping[str, Any], index: _LogIndex, key: Any) -> list[ReceiptProblem]:
    site, task_id = str(receipt.get("site")), str(receipt.get("task_id", ""))
    seq, told = receipt.get("head_seq"), receipt.get("head_hash")
    if not isinstance(seq, int) or not is_hash(told):
        return [ReceiptProblem(site, None, task_id, "the task came without an audit head")]
    assert isinstance(told, str)

    def problem(message: str) -> ReceiptProblem:
        return ReceiptProblem(site, seq, task_id, message)

    signature = receipt.get("head_signature") or ""
    if signature:
        if key is None:
            return [problem("the head is signed but no server certificate is known to check it: "
                            "pass --server-cert")]
        message = head_message(
            run_id=str(receipt.get("run_id")), site=site, round=int(receipt.get("round", 0)),
            task_id=task_id, kind=str(receipt.get("task_kind")), seq=seq, hash=told,
        )
        try:
            raw = bytes.fromhex(str(signature))
        except ValueError:
            raw = b""
        if not verify_head(key, message, raw):
            return [problem("the head's signature does not verify: this receipt was altered or "
                            "forged (it is not held against the log)")]
    out = []
    if seq > index.last_seq:
        out.append(problem(f"the log ends at seq {index.last_seq}, but the site was told seq "
                           f"{seq}: the log was truncated"))
    elif index.hashes.get(seq) != told:
        out.append(problem(
            f"the log's entry seq {seq} has hash {str(index.hashes.get(seq))[:16]}…, the site was "
            f"told {told[:16]}…: the log was rewritten at or before seq {seq}"
        ))
    task = index.tasks.get(task_id)
    if seq <= index.last_seq and (task is None or task[0] != site):
        out.append(problem("the task sent to this site is not in the log"))
    if receipt.get("accepted") is True and receipt.get("task_kind") == "train":
        out += _check_result(receipt, index, problem)
    return out


def _check_result(receipt: Mapping[str, Any], index: _LogIndex, problem: Any) -> list[ReceiptProblem]:
    """The result the server acknowledged must be logged, with the site's digest."""
    logged = index.results.get(str(receipt.get("task_id", "")))
    if logged is None or logged[0] != receipt.get("site"):
        return [problem(f"the server accepted this site's result ({receipt.get('sent')}) but the "
                        "log has no result for the task")]
    if receipt.get("sent") == "update" and logged[2] != receipt.get("update_sha256"):
        return [problem(
            f"the log's result (seq {logged[1]}) has digest {str(logged[2])[:16]}…, the site "
            f"sent {str(receipt.get('update_sha256'))[:16]}…"
        )]
    return []
