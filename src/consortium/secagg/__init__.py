"""Secure-aggregation primitives (SecAgg+, Bell et al. 2020; Bonawitz et al. 2017).

Quantisation to integers, ChaCha20 mask expansion, Shamir sharing of 32-byte secrets, and
X25519 / HKDF / AES-GCM for the keys and encrypted shares, and the SecAgg+ client and server state
machines built on them (:mod:`consortium.secagg.protocol`), optionally authenticated against a
malicious server with the sites' provisioned certificates (:mod:`consortium.secagg.identity`)
and each site's own floor (:class:`SecAggFloor`). Needs the ``cryptography`` package.
"""

from consortium.secagg.crypto import (
    DecryptionError,
    KeyPair,
    decrypt,
    encrypt,
    generate_keypair,
    public_bytes,
    shared_key,
)
from consortium.secagg.floor import SecAggFloor
from consortium.secagg.identity import (
    SecAggIdentity,
    SimulatedAuthority,
    SiteIdentity,
    TrustAnchor,
    UntrustedPeer,
    simulated_identities,
    site_identity,
)
from consortium.secagg.masks import apply_mask, expand_mask, mask_sign, pairwise_seed
from consortium.secagg.protocol import (
    SecAggAbort,
    SecAggClient,
    SecAggConfig,
    SecAggRefusal,
    SecAggResult,
    SecAggServer,
    run_secagg_round,
)
from consortium.secagg.quantize import (
    dequantize_sum,
    quantization_error_bound,
    quantization_step,
    quantize,
)
from consortium.secagg.shamir import Share, combine_shares, split_secret

__all__ = [
    "DecryptionError",
    "KeyPair",
    "SecAggAbort",
    "SecAggClient",
    "SecAggConfig",
    "SecAggFloor",
    "SecAggIdentity",
    "SecAggRefusal",
    "SecAggResult",
    "SecAggServer",
    "Share",
    "SimulatedAuthority",
    "SiteIdentity",
    "TrustAnchor",
    "UntrustedPeer",
    "apply_mask",
    "combine_shares",
    "decrypt",
    "dequantize_sum",
    "encrypt",
    "expand_mask",
    "generate_keypair",
    "mask_sign",
    "pairwise_seed",
    "public_bytes",
    "quantization_error_bound",
    "quantization_step",
    "quantize",
    "run_secagg_round",
    "shared_key",
    "simulated_identities",
    "site_identity",
    "split_secret",
]
