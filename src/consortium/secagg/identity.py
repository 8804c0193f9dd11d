"""Signing identities for secure aggregation: a site's provisioned key signs its SecAgg+ keys, the consortium CA vouches for its peers.

Against a malicious server, Bonawitz et al. 2017 (§4, Fig. 4, "active adversary") have every
client sign its public keys and its view of the survivors with a key a PKI vouches for, so that
the server can neither substitute keys nor tell clients different stories. Our PKI is the one
``consortium provision`` makes (:mod:`consortium.deploy.provision`): a consortium CA and one
ECDSA P-256 certificate per site naming it (CN and a ``consortium://site/<name>`` URI). The same
certificate that authenticates a site to the server over mutual TLS authenticates its keys to
its peers here.

- :class:`SecAggIdentity`: a site's private key and certificate; signs (ECDSA-SHA256).
- :class:`TrustAnchor`: the consortium CA; checks that a peer's certificate was issued by it, is
  valid now and names the peer, then checks the peer's signature.
- :class:`SiteIdentity`: both, what a site holds (``SiteEnvironment.identity``); made from
  provisioned credentials by :func:`site_identity`.
- :class:`SimulatedAuthority` / :func:`simulated_identities`: an in-memory CA with certificates
  of the same shape, for simulation, tests and benchmarks (never for a deployment).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from consortium.errors import ConfigError, ConsortiumError
from consortium.secagg.floor import SecAggFloor

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID
except ImportError as exc:  # pragma: no cover - depends on the environment
    from consortium.errors import MissingExtraError

    raise MissingExtraError("Secure aggregation", "secagg", "cryptography") from exc

from consortium.deploy.provision import (
    _ca_certificate,
    _client_certificate,
    _extended_key_usages,
    _parse_certificate,
    _site_identity,
)

__all__ = [
    "MAX_CERTIFICATE_BYTES",
    "MAX_SIGNATURE_BYTES",
    "SecAggFloor",
    "SecAggIdentity",
    "SimulatedAuthority",
    "SiteIdentity",
    "TrustAnchor",
    "UntrustedPeer",
    "simulated_identities",
    "site_identity",
]

MAX_CERTIFICATE_BYTES = 8 * 1024
"""Largest certificate (DER or PEM) a peer may present; a provisioned one is about 500 bytes."""

MAX_SIGNATURE_BYTES = 256
"""Largest signature accepted; an ECDSA P-256 signature in DER is at most 72 bytes."""

_CURVE = ec.SECP256R1
_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551  # of P-256
_SIM_LABEL = b"consortium/secagg/simulated-pki/v1"


class UntrustedPeer(ConsortiumError):
    """A peer's certificate or signature did not verify (the message says which check failed)."""


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# -------------------------------------------------------------------------------------- identity


@dataclass(frozen=True)
class SecAggIdentity:
    """A site's signing key and the certificate the consortium CA issued for it.

    Args:
        key: the site's ECDSA P-256 private key (provision's ``client.key``).
        certificate: its certificate, PEM or DER (provision's ``client.pem``).

    Attributes:
        client_id: the site the certificate names (``_site_identity`` of provisioning).
        certificate_der: the certificate in DER, what goes on the wire.

    Raises:
        ConfigError: a key that is not P-256, a certificate that does not name one site, or a
            certificate for another key.
    """

    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: bytes
    client_id: str = field(init=False)
    certificate_der: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, ec.EllipticCurvePrivateKey) or not isinstance(
            self.key.curve, _CURVE
        ):
            raise ConfigError(
                f"expected an ECDSA P-256 private key, found {type(self.key).__name__}; use the "
                "site key from `consortium provision` (client.key)"
            )
        try:
            cert = _parse_certificate(bytes(self.certificate))
        except ValueError as exc:
            raise ConfigError(f"the site certificate cannot be parsed: {exc}") from exc
        if cert.public_key() != self.key.public_key():
            raise ConfigError(
                f"the certificate {cert.subject.rfc4514_string()!r} is for another key than the "
                "site's private key; pass the client.pem and client.key of one site"
            )
        object.__setattr__(self, "client_id", _site_identity(cert))
        object.__setattr__(self, "certificate_der", cert.public_bytes(serialization.Encoding.DER))

    @classmethod
    def from_pem(cls, key_pem: bytes, cert_pem: bytes) -> SecAggIdentity:
        """An identity from provision's ``client.key`` and ``client.pem`` bytes.

        Raises:
            ConfigError: an unreadable key, or see the class.
        """
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"the site key cannot be loaded: {exc}") from exc
        return cls(key, cert_pem)  # type: ignore[arg-type]

    def sign(self, data: bytes) -> bytes:
        """ECDSA-SHA256 signature (DER) of ``data``, with a fresh nonce from the OS CSPRNG."""
        return self.key.sign(bytes(data), ec.ECDSA(hashes.SHA256()))


# ---------------------------------------------------------------------------------------- trust


@dataclass(frozen=True)
class _Peer:
    site: str
    public_key: ec.EllipticCurvePublicKey
    not_before: dt.datetime
    not_after: dt.datetime


class TrustAnchor:
    """The consortium CA as a site's peers see it: checks peer certificates and signatures.

    A certificate is accepted for client ``client_id`` when the CA signed it (issuer name and
    signature, RFC 5280 §6.1), it is valid now, it is for client authentication (a site
    certificate, not the server's), its public key is P-256, and the site it names
    (``consortium://site/<name>`` URI equal to its CN, as provisioning checks) is
    ``client_id``: a valid certificate of site B cannot speak for site C. Certificates that
    passed are cached by the SHA-256 of their bytes (a client checks its ``k`` neighbours every
    round); the validity dates and the name are checked again at every use.

    Revocation: the server refuses revoked sites from its registry; a site refuses peers whose
    certificates the consortium's CA-signed revocation list names (``crl.pem``, written by
    ``consortium provision --revoke`` into every site folder and handed to the sites out of
    band, not through the server). Without a list a revoked certificate verifies here until it
    expires.

    Args:
        ca_pem: the consortium CA certificate (provision's ``ca.pem``).
        clock: the current time (UTC); for tests.
        revoked: serial numbers of revoked certificates (from ``load_revocation_list``).

    Raises:
        ConfigError: ``ca_pem`` is not a certificate.
    """

    def __init__(
        self, ca_pem: bytes, *, clock: Callable[[], dt.datetime] | None = None,
        revoked: frozenset[int] = frozenset(),
    ) -> None:
        try:
            self.ca = _parse_certificate(bytes(ca_pem))
        except ValueError as exc:
            raise ConfigError(f"the consortium CA certificate cannot be parsed: {exc}") from exc
        self._clock = clock or _now
        self.revoked = frozenset(revoked)
        self._verified: dict[str, _Peer] = {}
        self._lock = threading.Lock()

    def verify(self, client_id: str, certificate: bytes, data: bytes, signature: bytes) -> None:
        """Check that ``certificate`` is ``client_id``'s and that it signed ``data``.

        Raises:
            UntrustedPeer: with the failed check (unparsable, another CA, expired or not yet
                valid, not a site certificate, another site's, or a bad signature).
        """
        peer = self.peer(client_id, certificate)
        if not isinstance(signature, (bytes, bytearray)) or not 0 < len(signature) <= (
            MAX_SIGNATURE_BYTES
        ):
            raise UntrustedPeer(
                f"the signature of {client_id!r} is missing or longer than "
                f"{MAX_SIGNATURE_BYTES} bytes"
            )
        try:
            peer.public_key.verify(bytes(signature), bytes(data), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise UntrustedPeer(
                f"the signature of {client_id!r} does not verify with its certificate: the "
                "signed data were altered or signed by another key"
            ) from None

    def peer(self, client_id: str, certificate: bytes) -> _Peer:
        """The checked certificate of ``client_id`` (see the class for the checks).

        Raises:
            UntrustedPeer: the certificate fails a check.
        """
        if not isinstance(certificate, (bytes, bytearray)) or not 0 < len(certificate) <= (
            MAX_CERTIFICATE_BYTES
        ):
            raise UntrustedPeer(
                f"the certificate of {client_id!r} is missing or longer than "
                f"{MAX_CERTIFICATE_BYTES} bytes"
            )
        fingerprint = hashlib.sha256(certificate).hexdigest()
        peer = self._verified.get(fingerprint)
        if peer is None:
            peer = self._check_certificate(bytes(certificate))
            with self._lock:
                self._verified[fingerprint] = peer
        now = self._clock()
        if not peer.not_before <= now <= peer.not_after:
            raise UntrustedPeer(
                f"the certificate of site {peer.site!r} is valid from {peer.not_before} to "
                f"{peer.not_after}, not now ({now}); check the clocks, or issue new credentials"
            )
        if peer.site != client_id:
            raise UntrustedPeer(
                f"a certificate of site {peer.site!r} was presented for {client_id!r}; a site "
                "can sign only for itself"
            )
        return peer

    def _check_certificate(self, data: bytes) -> _Peer:
        try:
            cert = _parse_certificate(data)
        except ValueError as exc:
            raise UntrustedPeer(f"a peer certificate cannot be parsed: {exc}") from exc
        try:
            cert.verify_directly_issued_by(self.ca)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise UntrustedPeer(
                f"the certificate {cert.subject.rfc4514_string()!r} was not issued by this "
                f"consortium's CA ({self.ca.subject.rfc4514_string()}): "
                f"{exc or type(exc).__name__}"
            ) from exc
        if cert.serial_number in self.revoked:
            raise UntrustedPeer(
                f"the certificate {cert.subject.rfc4514_string()!r} is revoked (the consortium's "
                "revocation list)"
            )
        if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_key_usages(cert):
            raise UntrustedPeer(
                f"the certificate {cert.subject.rfc4514_string()!r} is not a site certificate"
            )
        try:
            site = _site_identity(cert)
        except ConfigError as exc:
            raise UntrustedPeer(str(exc)) from exc
        public_key = cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
            public_key.curve, _CURVE
        ):
            raise UntrustedPeer(
                f"the certificate {cert.subject.rfc4514_string()!r} does not hold a P-256 key"
            )
        return _Peer(site, public_key, cert.not_valid_before_utc, cert.not_valid_after_utc)


# ---------------------------------------------------------------------------------------- sites


@dataclass(frozen=True)
class SiteIdentity:
    """What a site holds for authenticated secure aggregation: its own identity and the CA.

    This is ``SiteEnvironment.identity`` (``ClientContext.site.identity``) at a deployed site.
    """

    identity: SecAggIdentity
    trust: TrustAnchor = field(repr=False)

    @property
    def client_id(self) -> str:
        return self.identity.client_id


def site_identity(credentials: Any, site: str | None = None) -> SiteIdentity:
    """The signing identity of a provisioned site, from ``load_site_credentials(...)``.

    Args:
        credentials: a :class:`consortium.deploy.provision.SiteCredentials` (``key_pem``,
            ``cert_pem``, ``ca_pem``).
        site: the expected site name (checked against the certificate).

    Raises:
        ConfigError: unreadable material, or a certificate naming another site.
    """
    identity = SecAggIdentity.from_pem(credentials.key_pem, credentials.cert_pem)
    if site is not None and identity.client_id != site:
        raise ConfigError(
            f"the certificate names site {identity.client_id!r}, not {site!r}; pass the "
            "credentials provisioned for this site"
        )
    revoked: frozenset[int] = frozenset()
    crl_pem = getattr(credentials, "crl_pem", None)
    if crl_pem:
        from consortium.deploy.provision import load_revocation_list

        revoked = load_revocation_list(crl_pem, credentials.ca_pem)
    return SiteIdentity(identity, TrustAnchor(credentials.ca_pem, revoked=revoked))


# ----------------------------------------------------------------------------------- simulation


class SimulatedAuthority:
    """An in-memory consortium CA issuing site certificates on demand (simulation only).

    Certificates have provisioning's shape (``_client_certificate``), so :class:`TrustAnchor`
    checks them with the same code as a deployment's. Keys derive from ``seed`` (32 random bytes
    by default) and the CA's name and dates from the creation time: the authority pickles as
    those two and rebuilds the same CA and site keys in another process, so certificates issued
    by a copy verify with the original's trust anchor. Whoever holds the seed holds every key,
    which is fine where the simulator plays every party and nowhere else.
    """

    def __init__(
        self, seed: bytes | None = None, *, days: int = 30, created: dt.datetime | None = None
    ) -> None:
        self.seed = secrets.token_bytes(32) if seed is None else bytes(seed)
        self.days = days
        self.created = (created or _now()).replace(microsecond=0)
        self._lock = threading.RLock()
        self._identities: dict[str, SiteIdentity] = {}
        self._ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None = None
        self._trust: TrustAnchor | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"seed": self.seed, "days": self.days, "created": self.created}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["seed"], days=state["days"], created=state["created"]
        )

    @property
    def trust(self) -> TrustAnchor:
        """The trust anchor of this authority's CA."""
        self._ensure_ca()
        assert self._trust is not None
        return self._trust

    def identity(self, client_id: str) -> SiteIdentity:
        """Site ``client_id``'s identity (issued on first use, the same object afterwards)."""
        found = self._identities.get(client_id)
        if found is not None:
            return found
        ca_key, ca_cert = self._ensure_ca()
        with self._lock:
            found = self._identities.get(client_id)
            if found is None:
                key = self._key(b"site", client_id.encode())
                cert = _client_certificate(
                    key, client_id, ca_cert, ca_key, now=self.created, days=self.days
                )
                pem = cert.public_bytes(serialization.Encoding.PEM)
                found = SiteIdentity(SecAggIdentity(key, pem), self.trust)
                self._identities[client_id] = found
        return found

    def _ensure_ca(self) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        with self._lock:
            if self._ca is None:
                key = self._key(b"ca", b"")
                self._ca = key, _ca_certificate(key, now=self.created, days=self.days)
                self._trust = TrustAnchor(self._ca[1].public_bytes(serialization.Encoding.PEM))
            return self._ca

    def _key(self, kind: bytes, name: bytes) -> ec.EllipticCurvePrivateKey:
        digest = hashlib.sha512(
            _SIM_LABEL + len(kind).to_bytes(4, "big") + kind + name + self.seed
        ).digest()
        return ec.derive_private_key(1 + int.from_bytes(digest, "big") % (_ORDER - 1), _CURVE())


def simulated_identities(
    client_ids: Iterable[str], *, seed: bytes | None = None
) -> tuple[dict[str, SecAggIdentity], TrustAnchor]:
    """An in-memory CA and one certificate per client (simulation, tests, benchmarks).

    Returns:
        client id -> its :class:`SecAggIdentity`, and the :class:`TrustAnchor` of the CA.
    """
    authority = SimulatedAuthority(seed)
    identities = {cid: authority.identity(cid).identity for cid in client_ids}
    return identities, authority.trust
