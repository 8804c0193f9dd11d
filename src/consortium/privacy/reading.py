"""What a privacy setting means: δ against the number protected, and a plain reading of ε.

A (ε, δ) guarantee with δ ≥ 1/n is met by a mechanism that publishes one of the n protected
units (a record, or a site) outright, so δ must lie well below 1/n (Dwork and Roth, The
Algorithmic Foundations of Differential Privacy, 2014, §2.3). The reading guide for ε (at
most 1 strong, at most 10 moderate, beyond that weak) follows the same book and NIST SP
800-226 (Near et al. 2025); the report uses the same bounds
(:data:`consortium.reporting.clinical_report.EPSILON_GUIDE`).
"""

from __future__ import annotations

from collections.abc import Sequence

from consortium.errors import ConfigError

__all__ = ["WEAK_EPSILON", "check_delta", "epsilon_reading"]

WEAK_EPSILON = 10.0
"""Beyond this ε the guarantee says little (ε ≤ 1 strong, ≤ 10 moderate)."""


def check_delta(mode: str, delta: float, *, sites: int, records: Sequence[int]) -> None:
    """Refuse ``privacy.delta`` ≥ 1/n, n the units that ``mode`` protects: the ``sites`` for
    central and distributed DP (a site's whole contribution), the training ``records`` of the
    largest site for local DP (one record at each site, each site accounting its own).

    Raises:
        ConfigError: δ ≥ 1/n, naming n and a δ that fits.
    """
    if mode in ("central", "distributed"):
        n, unit = sites, f"the {sites} sites that {mode} DP protects (one site's contribution each)"
    elif mode == "local" and len(records):
        n = max(records)
        unit = f"the {n} training records of the largest site (local DP protects one record)"
    else:
        return
    if n > 0 and delta * n >= 1:
        raise ConfigError(
            f"privacy.delta = {delta:g} is at least 1/n = 1/{n}, n being {unit}: a mechanism "
            "that publishes one of them outright meets such a guarantee; set privacy.delta well "
            f"below 1/n, for example privacy.delta = {_suggest(n):g}"
        )


def _suggest(n: int) -> float:
    """A power of ten at most 1/(10 n), and at most the default 1e-5."""
    suggestion = 1e-5
    while suggestion * n * 10 > 1:
        suggestion /= 10
    return suggestion


def epsilon_reading(epsilon: float | None) -> str | None:
    """A sentence on how strong ε is, with the fix when it is weak; ``None`` without DP."""
    if epsilon is None:
        return None
    if epsilon <= 1:
        return f"ε = {epsilon:.3g}: strong protection (ε ≤ 1)"
    if epsilon <= WEAK_EPSILON:
        return f"ε = {epsilon:.3g}: moderate protection (1 < ε ≤ 10)"
    return (f"ε = {epsilon:.3g} is weak protection (beyond 10 the guarantee says little; "
            "ε ≤ 1 is strong, ≤ 10 moderate): add noise (privacy.noise_multiplier), train "
            "fewer rounds, or set privacy.target_epsilon")
