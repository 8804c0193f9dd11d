"""The ``[compression]`` section made into a stage, and the combinations it refuses.

Where compression sits (:func:`consortium.federation.client_stages`): after the central-DP
client half (clip) and before nothing else, so each client clips, then compresses; the server
decodes first (receive halves run in reverse) and central DP's ``receive`` then re-clips the
decoded update to ``C`` (issue 13), so the sum the noise is calibrated to still moves by at most
``C`` per client whatever the compressor (QSGD's unbiased noise, error feedback's residual) made
of the norm. Under local DP the noise is added during training: compressing afterwards is
post-processing and costs no privacy.

Refused, with the reason and the fix:

- **secure aggregation** (and distributed DP, which runs inside it): SecAgg masks a dense vector
  of field elements whose size ``secure_aggregation.bits`` sets; an encoding (indices, packed
  codes, half floats) cannot travel through the masked sum, and decoding first would send the
  dense vector anyway. The quantisation that does commute with the masked sum is SecAgg's own:
  lower ``secure_aggregation.bits`` to send fewer bytes.
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
    server decodes it while it validates the result); PowerSGD is refused there (its shapes
    payload does not travel yet).

    Raises:
        ConfigError: an invalid setting, or a combination listed in the module docstring.
    """
    c = cfg.compression
    if c.uplink == "none":
        return None
    method = c.uplink
    if deployed and method == "powersgd":
        raise ConfigError(
            "compression.uplink = \"powersgd\" works in simulation only for now: its clients "
            "learn the layers' shapes from a stage payload the gRPC task cannot carry yet; use "
            "topk, randk, qsgd, int8/int4/int2, fp16, bf16 or sign for a deployment"
        )
    if cfg.secure_aggregation.enabled or cfg.privacy.mode == "distributed":
        raise ConfigError(
            f"compression.uplink = {method!r} cannot combine with secure aggregation: SecAgg "
            "sums dense masked vectors of secure_aggregation.bits-bit integers, through which "
            "an encoded update cannot travel. Set compression.uplink = \"none\" and lower "
            "secure_aggregation.bits to send fewer bytes, or disable secure aggregation"
        )
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
            error_feedback=c.error_feedback, sign_lr=c.sign_lr,
        )
    except PipelineError as exc:
        raise ConfigError(str(exc)) from exc
