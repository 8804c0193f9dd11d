"""Compression of the updates clients send: sparsification, quantisation, low rank, error feedback.

The :class:`Compress` stage encodes each client's delta into an :class:`Encoded` (what travels,
counted byte for byte in ``bytes_up``) and decodes it at the server with the strict
:func:`decode`. :func:`compression_stage` builds it from an experiment's ``[compression]``
section and refuses the combinations that would break a guarantee. The broadcast model is
compressed by :class:`Downlink` (EF21-P: :mod:`consortium.compression.downlink`).
"""

from consortium.compression.build import compression_stage
from consortium.compression.downlink import Downlink, downlink_compressor
from consortium.compression.encoded import Encoded, MalformedUpdate, decode
from consortium.compression.stage import METHODS, RESIDUAL_KEY, Compress, compress

__all__ = [
    "METHODS",
    "RESIDUAL_KEY",
    "Compress",
    "Downlink",
    "Encoded",
    "MalformedUpdate",
    "compress",
    "compression_stage",
    "decode",
    "downlink_compressor",
]
