"""The ``[compression]`` section made into a stage, and the combinations it refuses.

Where compression sits (:func:`consortium.federation.client_stages`): after the central-DP
client half (clip) and before nothing else, so each client clips, then compresses; the server
decodes first (receive halves run in reverse) and central DP's ``receive`` then re-clips the
decoded update to ``C`` (issue 13), so the sum the noise is calibrated to still moves by at most
``C`` per client whatever the compressor (QSGD's unbiased noise, error feedback's residual) made
of the norm. Under local DP the noise is added during training: compressing afterwards is
post-processing and costs no privacy.

Refused, with the reason and the fix:

- **secure aggregation** (and distributed DP, which runs inside it), but for random-k: SecAgg
  sums masked vectors coordinate by coordinate, so only a linear compressor whose clients keep
  the same coordinates passes through it. ``randk`` does, with one coordinate set per round
  shared by every client (:mod:`consortium.compression.secure`; SecAgg's own stage then sends
  the ``k`` coordinates and no ``Compress`` stage is built); the others are refused there, as
  is randk with central or distributed DP.
- **sign** with central DP (its majority vote would run before the noise, and the ±1 vectors'
  norm √d exceeds any clip), with error feedback (the vote is not what the client's residual
  assumes), and with a robust aggregator (the vote is the aggregation rule itself).
"""

from __future__ import annotations

from typing import Any

from consortium.errors import ConfigError, PipelineError

__all__ = ["compression_stage"]


def compression_stage(cfg: Any, *, deployed: bool = False) -> Any:
    """The :class:`~consortium.compression.stage.Compress` stage ``cfg.compression`` asks
    for, or ``None`` when ``uplink = "none"``. ``deployed``: built by a site of a gRPC
    deployment, whose uploads carry the encoding itself (``EncodedUpdate`` in the proto; the
    server decodes it while it validates the result). PowerSGD works there too: the site
    factorises with its own layout's shapes, the server decodes with its own, and the warm
    start and residual are the site's persistent state (``--state``).

    Raises:
        ConfigError: an invalid setting, or a combination listed in the module docstring.
    """
    c = cfg.compression
    if c.uplink == "none":
        return None
    method = c.uplink
    if cfg.secure_aggregation.enabled or cfg.privacy.mode == "distributed":
        from consortium.compression.secure import check_secure

        check_secure(cfg)  # refuses all but randk (compression/secure.py says why)
        return None  # SecAgg's own stage sends the round's shared k coordinates
    if method == "sign":
        if cfg.privacy.mode == "central":
            raise ConfigError(
                "compression.uplink = \"sign\" cannot combine with central DP: the majority vote "
                "would replace the clipped sum the noise is calibrated to. Use topk/qsgd/int8 "
                "with central DP, or privacy.mode = \"local\" with sign"
            )
        if cfg.aggregation.rule != "mean":
            raise ConfigError(
                f"compression.uplink = \"sign\" aggregates by majority vote, which replaces "
                f"aggregation.rule = {cfg.aggregation.rule!r}; set aggregation.rule = \"mean\" "
                "(the vote is the sign of the mean of the clients' signs)"
            )
    from consortium.compression.stage import compress

    try:
        return compress(
            method, fraction=c.fraction, bits=c.bits, chunk=c.chunk, rank=c.rank,
            error_feedback=c.error_feedback, sign_lr=c.sign_lr, values=c.values,
            indices=c.indices,
        )
    except PipelineError as exc:
        raise ConfigError(str(exc)) from exc
