"""What a peer sends, made safe to log: sanitised text and rate-limited rejection records.

A site is another institution's process, so anything it says can be aimed at the operator: a
``client_version`` holding a newline forges a second log line, a terminal escape rewrites the
operator's screen, a megabyte of text floods the log, and a loop of garbage uploads grows the
audit log without end (about 1.2 GB an hour from one site before these limits, issue 13).
Every peer-supplied string therefore passes :func:`peer_text` before it reaches a log line or
the audit log, and :class:`RejectionLimiter` decides which rejections are written in full.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["MAX_PEER_TEXT", "MAX_REASON_CHARS", "RejectionLimiter", "peer_text"]

MAX_PEER_TEXT = 200
"""Characters of a peer's string kept in a log line (a site name, a version, a claimed id)."""

MAX_REASON_CHARS = 500
"""Characters of a rejection's reason kept in the log and the audit log."""


def peer_text(value: object, limit: int = MAX_PEER_TEXT) -> str:
    """``value`` as one printable line of at most about ``limit`` characters.

    Control characters, terminal escapes, line and paragraph separators, bidirectional
    overrides and every other non-printable character are written as their escape (``\\n``,
    ``\\x1b``, ``\\u202e``), so the operator sees that they were sent and nothing they do
    reaches the terminal or splits the line; a longer text is cut and says how much was cut.
    Only the first ``limit`` characters are ever looked at, so the cost does not grow with
    what the peer sent.
    """
    text = value if isinstance(value, str) else str(value)
    head = text[:limit]
    if not head.isprintable():
        head = "".join(c if c.isprintable() else _escape(c) for c in head)[:limit]
    if len(text) > limit:
        head += f"...[{len(text) - limit} more characters]"
    return head


def _escape(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


@dataclass
class _Window:
    start: float
    written: int = 0
    suppressed: int = 0
    sample: str = ""


@dataclass
class RejectionLimiter:
    """Which rejections of one site are written in full: the first ``per_window`` in each
    ``window_s`` seconds; the rest are only counted, and :meth:`flush` reports the count.

    A flood of garbage from one site thus costs the audit log at most ``per_window`` + 1
    entries per site per window (one ``suppressed`` entry with the count and a sample reason)
    whatever its rate, while the first rejections — the ones that tell the operator what is
    going on — keep their full reason.

    Args:
        per_window: rejections per site written in full in each window.
        window_s: the window's length in seconds.
        clock: seconds, monotonic (a test passes its own).
    """

    per_window: int = 10
    window_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    _windows: dict[str, _Window] = field(default_factory=dict, init=False, repr=False)

    def admit(self, site: str, reason: str) -> tuple[bool, tuple[str, int, str] | None]:
        """Whether this rejection of ``site`` is written in full, and the suppression count
        (site, count, sample reason) of its previous window if that ended with rejections
        unwritten (to be reported first)."""
        now = self.clock()
        ended = None
        window = self._windows.get(site)
        if window is not None and now - window.start >= self.window_s:
            del self._windows[site]
            if window.suppressed:
                ended = (site, window.suppressed, window.sample)
            window = None
        if window is None:
            window = self._windows[site] = _Window(now)
        if window.written < self.per_window:
            window.written += 1
            return True, ended
        window.suppressed += 1
        window.sample = reason
        return False, ended

    def flush(self, now: float | None = None) -> list[tuple[str, int, str]]:
        """Close every window older than ``window_s``; (site, suppressed, sample) for those
        that suppressed something. Call it now and then (the server does every window) so
        that the count of a site that stopped is reported too."""
        now = self.clock() if now is None else now
        ended = [s for s, w in self._windows.items() if now - w.start >= self.window_s]
        out = []
        for site in ended:
            window = self._windows.pop(site)
            if window.suppressed:
                out.append((site, window.suppressed, window.sample))
        return out
