"""An append-only, hash-chained audit log of every task and result, and its verification.

Each line of the log (``RUN_DIR/audit.jsonl``) is one JSON object (on disk its keys are sorted)::

    {"seq": 7, "time": "2025-01-01T12:00:00.000000+00:00", "kind": "result", "site": "a",
     "round": 3, "update_sha256": "9f...", "norm": 0.82, "prev": "<hash of entry 6>",
     "hash": "<SHA-256 of this entry without 'hash'>"}

``hash`` is the SHA-256 of the entry's canonical JSON without ``hash`` (sorted keys, no
whitespace, ASCII), and ``prev`` is the previous entry's ``hash`` (64 zeros for the first). The
whole history is thus committed to by the last hash, as in the tamper-evident logs of Schneier
and Kelsey (1999, "Secure audit logs to support computer forensics"): editing, deleting,
inserting or reordering any line breaks a link that :func:`verify` reports with its line number.

A plain hash chain has no secret, so it cannot tell a log rewritten in full, or cut short at
the end, from an honest one. Record the last hash somewhere else (the run report, a message to
the sites) and pass it to :func:`verify` as ``expected_last_hash`` to close that gap. A deployed
server does so with every task: it signs the chain's :class:`AuditHead` and each site keeps it
in its receipt log; :func:`verify_against` then checks the log against every site's receipts
(:mod:`consortium.deploy.receipts`).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import math
import os
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from consortium.errors import ConsortiumError

if TYPE_CHECKING:
    from consortium.deploy.receipts import ReceiptReport

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "AUDIT_FILENAME",
    "GENESIS_HASH",
    "AuditError",
    "AuditHead",
    "AuditLog",
    "AuditProblem",
    "AuditReport",
    "canonical_bytes",
    "last_entries",
    "update_digest",
    "verify",
    "verify_against",
    "verify_run",
]

AUDIT_FILENAME = "audit.jsonl"
"""The audit log's file name inside a run directory."""

GENESIS_HASH = "0" * 64
"""The ``prev`` of the first entry."""

_RESERVED = ("seq", "time", "kind", "prev", "hash")


class AuditError(ConsortiumError, RuntimeError):
    """The audit log cannot be opened, resumed or verified as asked."""


@dataclass(frozen=True)
class AuditHead:
    """Where the log stands: its number of entries (the newest ``seq``) and the newest hash,
    which commits to every entry before it; ``signature`` is the server's over the head and
    the task it came with (empty: unsigned, ``--insecure``). See :mod:`consortium.deploy.receipts`.
    """

    seq: int
    hash: str
    signature: bytes = b""


@dataclass(frozen=True)
class AuditProblem:
    """The first place the chain breaks: a 1-based line number and what is wrong there."""

    line: int
    message: str


@dataclass(frozen=True)
class AuditReport:
    """The result of :func:`verify`.

    Attributes:
        path: the log checked.
        entries: how many entries are intact (all of them when :attr:`ok`; otherwise those
            before :attr:`problem`).
        last_hash: the hash of the last intact entry (:data:`GENESIS_HASH` for none).
        kinds: entries per ``kind`` among the intact ones.
        problem: the first break, or ``None`` when the whole chain holds.
    """

    path: Path
    entries: int
    last_hash: str
    kinds: Mapping[str, int] = field(default_factory=dict)
    problem: AuditProblem | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None

    def summary(self) -> str:
        """One or two lines for the command line."""
        if self.problem is None:
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(self.kinds.items()))
            return (
                f"{self.path}: OK, {self.entries} entries ({counts or 'empty'}), "
                f"last hash {self.last_hash}"
            )
        return (
            f"{self.path}: BROKEN at line {self.problem.line}: {self.problem.message}\n"
            f"the {self.entries} entries before it are intact (last hash {self.last_hash})"
        )


def canonical_bytes(entry: Mapping[str, Any]) -> bytes:
    """The bytes an entry's hash covers: JSON with sorted keys, no whitespace, ASCII only."""
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def _entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(
        canonical_bytes({k: v for k, v in entry.items() if k != "hash"})
    ).hexdigest()


def update_digest(tensor: Any) -> tuple[str, float]:
    """Fingerprint an update for the log: (hex SHA-256 of its raw bytes, its L2 norm).

    The hash covers the tensor's elements in row-major order and native (little-endian on
    every platform we run on) byte order, not its shape or dtype; log those separately when
    they matter. The norm is accumulated in float64 and may be ``nan`` or ``inf`` for a
    malformed update (the log stores those as the strings ``"NaN"``, ``"Infinity"``).

    Neither is computed on a copy of the update: ``torch.linalg.vector_norm(x,
    dtype=torch.float64)`` casts the whole input first, and that float64 copy (2 MB for every
    1 MB update a server receives) left 0.5 MB of unusable heap behind each update a round
    holds (benchmarks/deployment/memory_probe.py).

    Args:
        tensor: a ``torch.Tensor`` (any device) or anything ``numpy.asarray`` accepts.
    """
    import numpy as np

    if hasattr(tensor, "detach"):  # torch.Tensor; torch is imported only when one is passed
        import torch

        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest = hashlib.sha256(flat.view(torch.uint8).numpy())  # the buffer, not a copy
        if flat.dtype == torch.bfloat16:  # numpy has no bfloat16: a copy, of a rare dtype
            norm = float(torch.linalg.vector_norm(flat, dtype=torch.float64))
        else:
            norm = _norm64(flat.numpy())
    else:
        array = np.ascontiguousarray(tensor)
        digest = hashlib.sha256(array.reshape(-1).data)
        norm = _norm64(array)
    return digest.hexdigest(), norm


def _norm64(array: Any) -> float:
    """The L2 norm of a numpy array, accumulated in float64 without a float64 copy of it
    (``einsum`` casts through its small internal buffer)."""
    import numpy as np

    flat = array.reshape(-1)
    return math.sqrt(float(np.einsum("i,i->", flat, flat, dtype=np.float64)))


class AuditLog:
    """Append entries to a hash-chained JSON-lines log; reopening resumes the chain.

    Opening an existing log checks its last entry's hash and continues after it; a full check
    is :func:`verify`. One process at a time may write a log (an exclusive ``flock`` on POSIX);
    within a process, :meth:`append` is thread-safe.

    Args:
        path: the log file, created with its folder if missing (``RUN_DIR/audit.jsonl``).
        fsync: force every entry to disk before :meth:`append` returns, so an entry the server
            acted on survives a power cut. Off, entries reach the OS at once but the disk later.
        recover: if the last line is incomplete (the process died while writing it), cut it
            off and log a ``"recovered"`` entry with its size and SHA-256. Without it such a
            log raises, so nothing is dropped silently.

    Raises:
        AuditError: the log is locked by another process, its last entry is corrupted, or its
            last line is incomplete and ``recover`` is false.
    """

    def __init__(self, path: Path | str, *, fsync: bool = True, recover: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._lock = threading.Lock()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            self._lock_file()
            dropped = self._drop_partial_tail(recover=recover)
            self._seq, self._last_hash = self._read_tail()
        except BaseException:
            os.close(self._fd)
            raise
        if dropped is not None:
            self.append(
                "recovered",
                dropped_bytes=len(dropped),
                dropped_sha256=hashlib.sha256(dropped).hexdigest(),
            )

    @property
    def last_hash(self) -> str:
        """The hash of the newest entry: it commits to the whole log so far."""
        return self._last_hash

    @property
    def entries(self) -> int:
        """How many entries the log holds (the newest entry's ``seq``)."""
        return self._seq

    def head(self) -> AuditHead:
        """The newest ``seq`` and hash, read together (unsigned)."""
        with self._lock:
            return AuditHead(self._seq, self._last_hash)

    def append(self, kind: str, /, **fields: Any) -> dict[str, Any]:
        """Add one entry and return it as written (with ``seq``, ``time``, ``prev``, ``hash``).

        Args:
            kind: what happened, e.g. ``"task"``, ``"result"``, ``"rejected"``, ``"round"``.
            **fields: JSON values (str, int, float, bool, None, lists, str-keyed dicts; numpy
                and torch scalars are converted): site, round, task_id, update_sha256, norm,
                reason ...

        Raises:
            ValueError: an empty ``kind``, or a field named seq, time, kind, prev or hash.
            TypeError: a field value JSON cannot represent.
            AuditError: the log was closed.
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"an audit entry needs a non-empty kind, got {kind!r}")
        clash = sorted(set(fields) & set(_RESERVED))
        if clash:
            raise ValueError(f"audit fields {clash} are set by the log itself; rename them")
        body = {name: _jsonable(value, name) for name, value in fields.items()}
        with self._lock:
            if self._fd < 0:
                raise AuditError(f"the audit log {self.path} is closed")
            entry: dict[str, Any] = {
                "seq": self._seq + 1,
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds"),
                "kind": kind,
                **body,
                "prev": self._last_hash,
            }
            entry["hash"] = _entry_hash(entry)
            self._write(canonical_bytes(entry) + b"\n")
            self._seq, self._last_hash = entry["seq"], entry["hash"]
        return entry

    def sync(self) -> None:
        """Force every entry written so far to disk (with ``fsync=False``, call it at the
        points that must survive a power cut, e.g. before a round's results are used)."""
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)

    def close(self) -> None:
        """Flush and close the file (idempotent); the lock is released."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # one write() per entry in practice; O_APPEND keeps concurrent lines whole
            view = view[os.write(self._fd, view) :]
        if self.fsync:
            os.fsync(self._fd)

    def _lock_file(self) -> None:
        if fcntl is None:  # pragma: no cover - Windows
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AuditError(
                f"another process is writing the audit log {self.path}; two writers would fork "
                "the chain. Stop the other server or use another run directory"
            ) from None

    def _drop_partial_tail(self, *, recover: bool) -> bytes | None:
        size = os.fstat(self._fd).st_size
        if size == 0 or _pread(self._fd, 1, size - 1) == b"\n":
            return None
        start = _last_line_start(self._fd, size)
        if not recover:
            raise AuditError(
                f"the last line of {self.path} (line {_count_lines(self._fd, start) + 1}) is "
                "incomplete: the writer stopped mid-entry. Check the rest with `consortium audit "
                "verify`, then reopen with recover=True to cut it off and log the cut"
            )
        dropped = _pread(self._fd, size - start, start)
        os.ftruncate(self._fd, start)
        return dropped

    def _read_tail(self) -> tuple[int, str]:
        size = os.fstat(self._fd).st_size
        if size == 0:
            return 0, GENESIS_HASH
        start = _last_line_start(self._fd, size - 1)  # size - 1: skip the final newline
        raw = _pread(self._fd, size - start, start)
        line = _count_lines(self._fd, start) + 1
        entry, problem = _parse_entry(raw.rstrip(b"\n"))
        if entry is not None:
            problem = _check_link(entry, seq=entry["seq"], prev=entry["prev"])
        if entry is None or problem is not None:
            raise AuditError(
                f"cannot resume the audit log {self.path}: the last entry (line {line}) is "
                f"corrupted ({problem}). Run `consortium audit verify` to find the first break; "
                "keep the damaged log as evidence and start a new run directory"
            )
        return int(entry["seq"]), str(entry["hash"])


def verify(path: Path | str, *, expected_last_hash: str | None = None) -> AuditReport:
    """Check every entry's hash, ``prev`` link and ``seq``; report the first break.

    What each break usually means: a hash that does not match its content is an edited
    field; a ``seq`` that jumps is a deleted line; a ``seq`` that goes back is a reordered or
    duplicated line; a ``prev`` that does not match (with hash and ``seq`` consistent) is a
    line forged or re-hashed; a last line without a newline is a crash while writing.

    Args:
        path: the log file.
        expected_last_hash: the last hash recorded elsewhere; a log cut short or rewritten in
            full then fails too.

    Raises:
        AuditError: the file does not exist or cannot be read.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuditError(
            f"no audit log at {path}; the server writes {AUDIT_FILENAME} into its run directory"
        ) from None
    except OSError as exc:
        raise AuditError(f"cannot read the audit log {path}: {exc.strerror}") from exc
    lines = data.split(b"\n")
    partial = lines.pop()  # b"" when the file ends with a newline, as a complete log does
    count, last_hash, kinds = 0, GENESIS_HASH, Counter[str]()

    def report(problem: AuditProblem | None) -> AuditReport:
        return AuditReport(path, count, last_hash, dict(kinds), problem)

    for number, raw in enumerate(lines, start=1):
        entry, problem = _parse_entry(raw)
        if entry is not None:
            problem = _check_link(
                entry,
                seq=count + 1,
                prev=last_hash,
                find_later=functools.partial(_find_seq, lines, after=number),
            )
        if problem is not None:
            return report(AuditProblem(number, problem))
        assert entry is not None  # _parse_entry returns one of the two
        count, last_hash = count + 1, entry["hash"]
        kinds[entry["kind"]] += 1
    if partial:
        return report(
            AuditProblem(
                len(lines) + 1,
                f"the last line is incomplete ({len(partial)} bytes, no newline): the writer "
                "stopped mid-entry (a crash); reopening the log with recover=True cuts it off",
            )
        )
    if expected_last_hash is not None and expected_last_hash != last_hash:
        return report(
            AuditProblem(
                len(lines),
                f"the last hash is {last_hash}, expected {expected_last_hash}: entries were "
                "removed from the end or the log was rewritten",
            )
        )
    return report(None)


def verify_run(run_dir: Path | str, *, expected_last_hash: str | None = None) -> AuditReport:
    """:func:`verify` the audit log of a run directory (``RUN_DIR/audit.jsonl``).

    Raises:
        AuditError: ``run_dir`` is not a folder or holds no audit log.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise AuditError(f"{run_dir} is not a folder; pass the run directory of a deployed run")
    if not (run_dir / AUDIT_FILENAME).is_file():
        raise AuditError(
            f"{run_dir} has no {AUDIT_FILENAME}; only deployed runs (a server with --certs or "
            "--insecure) keep an audit log. Check the run directory"
        )
    return verify(run_dir / AUDIT_FILENAME, expected_last_hash=expected_last_hash)


def verify_against(
    run_dir: Path | str, receipts: Path | str | Iterable[Path | str], *,
    server_cert: bytes | None = None,
) -> ReceiptReport:
    """Check a run's audit log against the sites' receipt logs: every signed head a site was
    told must be in the log, the log must reach the newest, and every result the server
    accepted must be there with the site's digest. See
    :func:`consortium.deploy.receipts.verify_against`, which this calls (signatures need the
    optional ``cryptography``, which this module does not import).

    Raises:
        AuditError: the log or a receipt file cannot be read.
    """
    from consortium.deploy.receipts import verify_against as verify_receipts

    return verify_receipts(run_dir, receipts, server_cert=server_cert)


def last_entries(path: Path | str, kind: str, count: int = 1) -> list[dict[str, Any]]:
    """The newest ``count`` entries of ``kind``, newest first, read from the end of the file
    (a resumed server looks up its last checkpoint without reading a long log in full).

    Entries whose hash does not match their content are skipped: an edited entry vouches for
    nothing. Returns fewer (or none) when the log holds fewer, or does not exist.
    """
    path = Path(path)
    if not path.is_file():
        return []
    needle = b'"kind":' + json.dumps(kind).encode()
    found: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        fd = fh.fileno()
        end = os.fstat(fd).st_size
        while end > 0 and len(found) < count:
            start = _last_line_start(fd, end - 1) if end > 1 else 0
            raw = _pread(fd, end - start, start).rstrip(b"\n")
            end = start
            if needle not in raw:
                continue
            entry, problem = _parse_entry(raw)
            if entry is not None and entry["kind"] == kind and _hash_matches(entry):
                found.append(entry)
    return found


def _hash_matches(entry: Mapping[str, Any]) -> bool:
    try:
        return bool(entry["hash"] == _entry_hash(entry))
    except ValueError:
        return False


def _parse_entry(raw: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """The entry on one line and ``None``, or ``None`` and what is wrong with the line."""
    if not raw.strip():
        return None, "an empty line (a line was blanked or an extra newline inserted)"
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        return None, f"not valid JSON ({exc}): the line was edited or corrupted"
    if not isinstance(entry, dict):
        return None, f"not a JSON object but {type(entry).__name__}"
    missing = [k for k in _RESERVED if k not in entry]
    if missing:
        return None, f"missing {', '.join(missing)}: not an entry this log wrote"
    if not isinstance(entry["seq"], int) or not isinstance(entry["hash"], str):
        return None, "seq is not an integer or hash not a string: not an entry this log wrote"
    if not isinstance(entry["kind"], str):
        return None, "kind is not a string: not an entry this log wrote"
    return entry, None


def _check_link(
    entry: Mapping[str, Any],
    *,
    seq: int,
    prev: str,
    find_later: Callable[[int], int | None] = lambda seq: None,
) -> str | None:
    """What is wrong with ``entry`` where entry ``seq`` following hash ``prev`` belongs."""
    try:
        actual = _entry_hash(entry)
    except ValueError as exc:  # NaN or Infinity literals, which the log never writes
        return f"content cannot be hashed canonically ({exc}): the line was edited"
    if entry["hash"] != actual:
        return (
            f"entry seq={entry['seq']}: its hash does not match its content, so a field was "
            "edited after it was written"
        )
    if entry["seq"] > seq:
        later = find_later(seq)
        if later is not None:
            return (
                f"seq jumps from {seq - 1} to {entry['seq']} and entry {seq} comes later, "
                f"on line {later}: lines were reordered"
            )
        missing = entry["seq"] - seq
        return (
            f"seq jumps from {seq - 1} to {entry['seq']}: "
            f"{missing} entr{'y' if missing == 1 else 'ies'} deleted before this line"
        )
    if entry["seq"] < seq:
        return f"seq goes back from {seq - 1} to {entry['seq']}: lines reordered or duplicated here"
    if entry["prev"] != prev:
        return (
            f"entry seq={entry['seq']}: prev does not match the hash of the entry before it, so "
            "this line or the one before was forged, replaced or re-hashed"
        )
    return None


def _find_seq(lines: list[bytes], seq: int, *, after: int) -> int | None:
    """The 1-based line after line ``after`` that holds entry ``seq``, if any."""
    for number in range(after + 1, len(lines) + 1):
        entry, _ = _parse_entry(lines[number - 1])
        if entry is not None and entry["seq"] == seq:
            return number
    return None


def _jsonable(value: Any, name: str) -> Any:
    """``value`` as plain JSON data; non-finite floats become strings (JSON has no NaN)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"audit field {name!r}: dict keys must be str, got {key!r}")
            out[key] = _jsonable(item, f"{name}.{key}")
        return out
    if isinstance(value, (list, tuple)):
        return [_jsonable(item, name) for item in value]
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return _jsonable(value.item(), name)  # a numpy scalar or 0-d torch tensor
    if isinstance(value, Path):
        return str(value)
    raise TypeError(
        f"audit field {name!r} is a {type(value).__name__}, which JSON cannot hold; pass a str, "
        "number, bool, None, list or dict (e.g. a hash instead of a tensor)"
    )


def _last_line_start(fd: int, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 if none): where the last line starts."""
    block = 8192
    pos = end
    while pos > 0:
        start = max(0, pos - block)
        chunk = _pread(fd, pos - start, start)
        index = chunk.rfind(b"\n")
        if index >= 0:
            return start + index + 1
        pos = start
    return 0


def _count_lines(fd: int, end: int) -> int:
    """Newlines in the first ``end`` bytes (for line numbers in messages only)."""
    count, pos = 0, 0
    while pos < end:
        chunk = _pread(fd, min(1 << 20, end - pos), pos)
        if not chunk:
            break
        count += chunk.count(b"\n")
        pos += len(chunk)
    return count


def _pread(fd: int, size: int, offset: int) -> bytes:
    """Read ``size`` bytes at ``offset`` (``os.pread`` is POSIX-only; appends ignore the seek)."""
    os.lseek(fd, offset, os.SEEK_SET)
    chunks = []
    while size > 0:
        chunk = os.read(fd, size)
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)
