"""Consortium credentials: a CA, server and site certificates, per-site tokens, and who may connect.

``provision`` creates everything a deployment needs to authenticate both ends of each
connection. The server proves its identity with a certificate for its host name. Each site
proves its identity with a client certificate (mutual TLS), with a bearer token, or with both.
The certificates follow the X.509 profile of RFC 5280 and are issued by a consortium CA made for
this one deployment. The server also keeps a registry of the provisioned sites (certificate
fingerprint, revoked flag), so revoking a site only means setting a flag, with no CRL to
distribute. The layout of the output folder::

    OUT/
    ├── ca.pem            the consortium CA certificate (public)
    ├── ca.key            the CA private key (0600): keep it offline, only here
    ├── README.txt        what to hand to whom
    ├── .gitignore        "*": keys and tokens never reach version control (also in server/
    │                     and each site folder, which travel on their own)
    ├── server/           copy to the server machine: --certs OUT/server
    │   ├── ca.pem  server.pem  server.key (0600)
    │   ├── sites.json    registry: site -> certificate fingerprint, revoked flag
    │   └── tokens.json   site -> SHA-256 of its token (never the token)
    └── sites/<name>/     hand to site <name> only: --certs OUT/sites/<name>
        └── ca.pem  client.pem  client.key (0600)  token (0600)

Keys are ECDSA P-256 (FIPS 186-4, RFC 5480). Python's ``ssl`` module and gRPC both accept P-256
everywhere; Ed25519 certificates are not accepted by every TLS stack.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import shutil
import stat
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from consortium.errors import ConfigError, ConsortiumError, MissingExtraError

try:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise MissingExtraError("Provisioning certificates", "deploy", "cryptography") from exc

__all__ = [
    "SITE_URI_PREFIX",
    "AuthenticationError",
    "ProvisionedConsortium",
    "Registry",
    "ServerCredentials",
    "SiteCredentials",
    "SiteRecord",
    "add_site",
    "authenticate",
    "certificate_fingerprint",
    "hash_token",
    "load_registry",
    "load_revocation_list",
    "load_server_credentials",
    "load_site_credentials",
    "provision",
    "revoke",
    "write_revocation_list",
]

SITE_URI_PREFIX = "consortium://site/"
"""A site's identity in its certificate's subjectAltName (RFC 5280 §4.2.1.6), besides the CN."""

# 64 = ub-common-name, RFC 5280 Appendix A.1; a letter or digit first, so that a name is never
# an option (`-rf`) or a hidden file (`.ssh`) where it becomes a folder or a command argument
_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DNS_NAME = re.compile(r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")
_RESERVED_NAMES = {"server", "ca", "sites"}
_CLOCK_SKEW = dt.timedelta(minutes=5)  # sites' clocks may lag; certificates start a bit early
_REGISTRY_FORMAT = 1
_FIX = "run `consortium provision --sites ... --out DIR` and pass --certs DIR/server"
_SITE_FIX = "hand the site its folder DIR/sites/<name> from `consortium provision`"


class AuthenticationError(ConsortiumError):
    """A connecting peer could not be identified as a provisioned, non-revoked site."""


@dataclass(frozen=True)
class SiteRecord:
    """One site in the server's registry.

    Attributes:
        name: the site name, also the certificate's CN and ``consortium://site/<name>`` URI.
        fingerprint: hex SHA-256 of the DER encoding of the site's certificate.
        revoked: the site is refused even with a valid certificate or token.
    """

    name: str
    fingerprint: str
    revoked: bool = False


@dataclass(frozen=True)
class Registry:
    """What the server needs to decide who is connecting (see :func:`authenticate`).

    Attributes:
        ca_pem: the consortium CA certificate that must have issued every site certificate.
        sites: site name -> :class:`SiteRecord`.
        token_hashes: site name -> hex SHA-256 of its token (:func:`hash_token`).
    """

    ca_pem: bytes
    sites: Mapping[str, SiteRecord]
    token_hashes: Mapping[str, str]


@dataclass(frozen=True)
class ServerCredentials:
    """The server's TLS material and site registry, read from a provisioned ``server/`` folder.

    ``ca_pem``, ``cert_pem`` and ``key_pem`` feed ``ssl.SSLContext`` or
    ``grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, ...)``.
    """

    directory: Path
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    registry: Registry


@dataclass(frozen=True)
class SiteCredentials:
    """One site's TLS material and token, read from its provisioned ``sites/<name>/`` folder.

    ``ca_pem`` is what the site trusts for the server; ``cert_pem``/``key_pem`` are its client
    certificate for mutual TLS, e.g. ``grpc.ssl_channel_credentials(ca_pem, key_pem, cert_pem)``;
    ``token`` is the bearer token for token authentication (send it only over TLS).
    """

    directory: Path
    site: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes
    token: str
    crl_pem: bytes | None = None
    """The consortium's certificate revocation list (``crl.pem`` in the site's folder, signed
    by the CA), or None: peers whose certificates it lists are refused in secure aggregation."""


@dataclass(frozen=True)
class ProvisionedConsortium:
    """Where :func:`provision` wrote everything.

    Attributes:
        root: the output folder (holds ``ca.key``: keep it offline).
        server_dir: the folder the server reads (``--certs``).
        site_dirs: site name -> the folder that site reads (``--certs``).
        ca_fingerprint: hex SHA-256 of the CA certificate, to compare out of band.
    """

    root: Path
    server_dir: Path
    site_dirs: Mapping[str, Path]
    ca_fingerprint: str


# --------------------------------------------------------------------------- provisioning


def provision(
    sites: Sequence[str],
    out: Path | str,
    *,
    server_names: Sequence[str] = ("localhost", "127.0.0.1"),
    days: int = 365,
    overwrite: bool = False,
) -> ProvisionedConsortium:
    """Create a consortium CA, a server certificate and, per site, a client certificate and token.

    The server certificate always covers ``localhost`` and ``127.0.0.1`` (for local runs) and
    each name in ``server_names`` (a DNS name or an IP address; the client checks the address it
    dials against them, RFC 6125). Each site certificate carries the site name as CN and as the
    URI ``consortium://site/<name>``, with the clientAuth extended key usage (RFC 5280 §4.2.1.12).

    Args:
        sites: site names: unique, 1-64 characters of ``A-Z a-z 0-9 . _ -``, not ``server``.
        out: the folder to create (layout in the module docstring).
        server_names: host names and IP addresses clients use to reach the server.
        days: validity of every certificate.
        overwrite: replace the credentials in an existing, non-empty ``out``.

    Raises:
        ConfigError: a bad site or server name, ``days < 1``, or ``out`` is not empty and
            ``overwrite`` is false.
    """
    names = _check_site_names(sites)
    hosts = _check_server_names(server_names)
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got days={days}")
    root = Path(out)
    _prepare_output(root, overwrite=overwrite)

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = _new_key()
    ca_cert = _ca_certificate(ca_key, now=now, days=days)
    ca_pem = _pem(ca_cert)
    _write_public(root / "ca.pem", ca_pem)
    _write_secret(root / "ca.key", _key_pem(ca_key))

    server_dir = _mkdir(root / "server")
    server_key = _new_key()
    server_cert = _server_certificate(server_key, hosts, ca_cert, ca_key, now=now, days=days)
    _write_public(server_dir / "ca.pem", ca_pem)
    _write_public(server_dir / "server.pem", _pem(server_cert))
    _write_secret(server_dir / "server.key", _key_pem(server_key))

    records: dict[str, SiteRecord] = {}
    token_hashes: dict[str, str] = {}
    site_dirs: dict[str, Path] = {}
    for name in names:
        site_dirs[name], records[name], token_hashes[name] = _issue_site(
            root, name, ca_cert, ca_key, now=now, days=days
        )
    _save_registry(server_dir, records, token_hashes)
    _write_public(root / "README.txt", _readme(names).encode())
    for folder in (root, server_dir):
        write_gitignore(folder)
    return ProvisionedConsortium(
        root=root,
        server_dir=server_dir,
        site_dirs=site_dirs,
        ca_fingerprint=certificate_fingerprint(ca_pem),
    )


def add_site(out: Path | str, site: str, *, days: int = 365) -> Path:
    """Issue credentials for one more site with an existing consortium CA; return its folder.

    Needs the top folder written by :func:`provision` (the one holding ``ca.key``); it updates
    ``server/sites.json`` and ``server/tokens.json`` there. Copy those two files to the server
    if it runs from a copy; a running server sees the site once it reloads its registry
    (:func:`load_registry`).

    Raises:
        ConfigError: a bad or already used site name, or ``out`` lacks ``ca.key``.
    """
    root = Path(out)
    server_dir = root / "server"
    records, token_hashes = _read_registry_files(server_dir)
    (name,) = _check_site_names([site])
    if name.lower() in {known.lower() for known in records}:
        raise ConfigError(
            f"site {name!r} is already provisioned in {server_dir / 'sites.json'}; "
            "choose another name (a revoked name is not reused, so old credentials stay refused)"
        )
    ca_cert = x509.load_pem_x509_certificate(_read(root / "ca.pem", fix=_FIX))
    ca_key = serialization.load_pem_private_key(_read(root / "ca.key", fix=_FIX), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(
            f"{root / 'ca.key'} is not an EC private key; re-run `consortium provision`"
        )
    now = dt.datetime.now(dt.timezone.utc)
    if days < 1:
        raise ConfigError(f"certificate validity must be at least 1 day, got days={days}")
    if ca_cert.not_valid_after_utc <= now:
        raise ConfigError(
            f"the consortium CA in {root / 'ca.pem'} expired on {ca_cert.not_valid_after_utc}; "
            "provision a new consortium with `consortium provision --overwrite`"
        )
    site_dir, records[name], token_hashes[name] = _issue_site(
        root, name, ca_cert, ca_key, now=now, days=days
    )
    _save_registry(server_dir, records, token_hashes)
    return site_dir


def revoke(certs_dir: Path | str, site: str) -> None:
    """Mark ``site`` revoked in the server registry, so :func:`authenticate` refuses it.

    Revoke in the folder the server reads (or copy ``sites.json`` there); a running server
    refuses the site once it reloads its registry (:func:`load_registry`).

    Args:
        certs_dir: the top folder from :func:`provision` or its ``server/`` folder.
        site: a provisioned site name.

    Raises:
        ConfigError: no registry in ``certs_dir``, or ``site`` is not in it.
    """
    server_dir = _server_dir(Path(certs_dir))
    records, token_hashes = _read_registry_files(server_dir)
    if site not in records:
        known = ", ".join(sorted(records)) or "none"
        raise ConfigError(
            f"cannot revoke {site!r}: it is not in {server_dir / 'sites.json'} "
            f"(provisioned sites: {known})"
        )
    records[site] = SiteRecord(site, records[site].fingerprint, revoked=True)
    _save_registry(server_dir, records, token_hashes)
    root = Path(certs_dir)
    if (root / "ca.key").exists():
        write_revocation_list(root, sorted(s for s, r in records.items() if r.revoked))


def write_revocation_list(root: Path | str, sites: Sequence[str]) -> Path:
    """Write the CA-signed revocation list of ``sites`` to ``root/crl.pem`` and into every
    site folder under ``root/sites/`` (what each site checks its secure-aggregation peers
    against; hand the updated ``crl.pem`` to the sites — it must not travel through the
    server, which could withhold it).

    Needs the top folder (``ca.key``) and the revoked sites' certificates (``sites/<name>/
    client.pem``) to read their serial numbers.

    Raises:
        ConfigError: no CA key, or a revoked site's certificate is missing.
    """
    root = Path(root)
    ca_cert = x509.load_pem_x509_certificate(_read(root / "ca.pem", fix=_FIX))
    ca_key = serialization.load_pem_private_key(_read(root / "ca.key", fix=_FIX), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{root / 'ca.key'} is not an EC private key; re-run `consortium provision`")
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=30))
    )
    for site in sites:
        cert = x509.load_pem_x509_certificate(_read(
            root / "sites" / site / "client.pem",
            fix="the revocation list needs the revoked site's certificate (its serial number)",
        ))
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(cert.serial_number)
            .revocation_date(now).build()
        )
    pem = builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    _write_public(root / "crl.pem", pem)
    for folder in sorted((root / "sites").glob("*")):
        if folder.is_dir():
            _write_public(folder / "crl.pem", pem)
    return root / "crl.pem"


def load_revocation_list(crl_pem: bytes, ca_pem: bytes, *, where: str = "crl.pem") -> frozenset[int]:
    """The serial numbers a CA-signed revocation list revokes.

    Raises:
        ConfigError: not a CRL, or not signed by this consortium's CA.
    """
    try:
        crl = x509.load_pem_x509_crl(crl_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{where} is not a PEM certificate revocation list: {exc}") from exc
    public = ca.public_key()
    if crl.issuer != ca.subject or not crl.is_signature_valid(public):  # type: ignore[arg-type]
        raise ConfigError(
            f"{where} is not signed by this consortium's CA; take crl.pem from the folder "
            "`consortium provision --revoke` wrote"
        )
    return frozenset(r.serial_number for r in crl)


# --------------------------------------------------------------------------- loading


def load_server_credentials(certs_dir: Path | str) -> ServerCredentials:
    """Read and check the server's folder (the top folder from :func:`provision` also works).

    Checks now what would otherwise fail obscurely in the first handshake: the server
    certificate is issued by the CA and matches the private key.

    Raises:
        ConfigError: a missing, unreadable or inconsistent file (named in the message).
    """
    directory = _server_dir(Path(certs_dir))
    ca_pem = _read(directory / "ca.pem", fix=_FIX)
    cert_pem = _read(directory / "server.pem", fix=_FIX)
    key_pem = _read(directory / "server.key", fix=_FIX, secret=True)
    _check_key_pair(
        directory / "server.pem", cert_pem, directory / "server.key", key_pem, ca_pem, fix=_FIX
    )
    return ServerCredentials(
        directory=directory,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        registry=load_registry(directory),
    )


def load_registry(certs_dir: Path | str) -> Registry:
    """Read the CA, ``sites.json`` and ``tokens.json`` (call again to see revocations).

    Raises:
        ConfigError: a file is missing or malformed.
    """
    directory = _server_dir(Path(certs_dir))
    records, token_hashes = _read_registry_files(directory)
    return Registry(
        ca_pem=_read(directory / "ca.pem", fix=_FIX), sites=records, token_hashes=token_hashes
    )


def load_site_credentials(certs_dir: Path | str, site: str | None = None) -> SiteCredentials:
    """Read and check a site's folder; the site name comes from its certificate.

    Args:
        certs_dir: the site's folder ``sites/<name>``, or the top folder with ``site`` given.
        site: the expected site name (required with the top folder; checked otherwise).

    Raises:
        ConfigError: a missing, unreadable or inconsistent file (named in the message), or a
            certificate for another site than ``site``.
    """
    directory = Path(certs_dir)
    if not (directory / "client.pem").exists() and (directory / "sites").is_dir():
        if site is None:
            raise ConfigError(
                f"{directory} holds every site's credentials; pass one site's folder "
                f"({directory / 'sites' / '<name>'}) as --certs"
            )
        directory = directory / "sites" / site
    ca_pem = _read(directory / "ca.pem", fix=_SITE_FIX)
    cert_pem = _read(directory / "client.pem", fix=_SITE_FIX)
    key_pem = _read(directory / "client.key", fix=_SITE_FIX, secret=True)
    token = _read(directory / "token", fix=_SITE_FIX, secret=True).decode().strip()
    _check_key_pair(
        directory / "client.pem", cert_pem, directory / "client.key", key_pem, ca_pem, fix=_SITE_FIX
    )
    name = _site_identity(x509.load_pem_x509_certificate(cert_pem))
    if site is not None and name != site:
        raise ConfigError(
            f"{directory / 'client.pem'} is the certificate of site {name!r}, not {site!r}; "
            "pass the folder provisioned for this site"
        )
    if not token:
        raise ConfigError(f"{directory / 'token'} is empty; {_SITE_FIX}")
    crl_pem = None
    if (directory / "crl.pem").exists():
        crl_pem = _read(directory / "crl.pem", fix=_SITE_FIX)
        load_revocation_list(crl_pem, ca_pem, where=str(directory / "crl.pem"))
    return SiteCredentials(
        directory=directory,
        site=name,
        ca_pem=ca_pem,
        cert_pem=cert_pem,
        key_pem=key_pem,
        token=token,
        crl_pem=crl_pem,
    )


# --------------------------------------------------------------------------- authentication


def authenticate(
    registry: Registry,
    *,
    peer_cert_pem: bytes | None,
    token: str | None,
    claimed_site: str | None = None,
    now: dt.datetime | None = None,
    require_token: bool = False,
) -> str:
    """Return the name of the site behind a connection, or refuse it.

    A certificate must be issued by the consortium CA (issuer name and signature, RFC 5280
    §6.1), be valid at ``now``, carry the clientAuth extended key usage, name one site, and be
    exactly the certificate provisioned for that site (its SHA-256 fingerprint is pinned in the
    registry, so a re-issued or forged certificate is refused even if the CA key leaked). A token
    is compared by its SHA-256 with every site's using ``hmac.compare_digest``. When both are
    given they must name the same site. A revoked site is refused either way.

    Args:
        registry: from :func:`load_registry` or :attr:`ServerCredentials.registry`.
        peer_cert_pem: the peer's certificate, PEM (gRPC's ``auth_context()["x509_pem_cert"]``)
            or DER (``ssl.SSLSocket.getpeercert(binary_form=True)``); ``None`` without one.
        token: the bearer token the peer sent, or ``None``.
        claimed_site: the sender a message claims to come from; refused if it differs.
        now: the time to check validity at (default: now, UTC).
        require_token: refuse a connection without the site's token even when its certificate
            checks out (``consortium server``: a stolen key alone is not enough).

    Raises:
        AuthenticationError: neither credential, an unknown or revoked site, a certificate not
            issued by the CA, expired, not yet valid or not for client authentication, a wrong
            token, credentials for two different sites, or a false ``claimed_site``.
    """
    if not peer_cert_pem and token is None:
        raise AuthenticationError(
            "the peer presented neither a client certificate nor a token; "
            "start the client with --certs pointing to its provisioned folder"
        )
    if require_token and token is None:
        raise AuthenticationError(
            "the peer presented no token; every site sends its provisioned token with its "
            "certificate (the `token` file in its folder)"
        )
    names: list[str] = []
    if peer_cert_pem:
        when = now if now is not None else dt.datetime.now(dt.timezone.utc)
        names.append(_authenticate_certificate(registry, peer_cert_pem, when))
    if token is not None:
        names.append(_authenticate_token(registry, token))
    if len(set(names)) > 1:
        raise AuthenticationError(
            f"the certificate belongs to site {names[0]!r} but the token to site {names[1]!r}"
        )
    site = names[0]
    if registry.sites[site].revoked:
        raise AuthenticationError(f"site {site!r} is revoked; its connections are refused")
    if claimed_site is not None and claimed_site != site:
        raise AuthenticationError(
            f"a message claims to come from {claimed_site!r} but the connection is site {site!r}'s"
        )
    return site


def certificate_fingerprint(cert: bytes | x509.Certificate) -> str:
    """Hex SHA-256 of a certificate's DER encoding (PEM or DER bytes, or a parsed certificate)."""
    parsed = cert if isinstance(cert, x509.Certificate) else _parse_certificate(cert)
    return parsed.fingerprint(hashes.SHA256()).hex()


def hash_token(token: str) -> str:
    """Hex SHA-256 of a token, the form the server stores.

    A plain hash suffices (no slow password KDF): tokens are 256 random bits, so the hash file
    cannot be inverted by guessing.
    """
    return hashlib.sha256(token.encode()).hexdigest()


def _authenticate_certificate(registry: Registry, cert_bytes: bytes, now: dt.datetime) -> str:
    try:
        cert = _parse_certificate(cert_bytes)
    except ValueError as exc:
        raise AuthenticationError(f"the peer's certificate cannot be parsed: {exc}") from exc
    ca = x509.load_pem_x509_certificate(registry.ca_pem)
    subject = cert.subject.rfc4514_string()
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthenticationError(
            f"the certificate {subject!r} was not issued by this consortium's CA "
            f"({ca.subject.rfc4514_string()}): {exc or type(exc).__name__}"
        ) from exc
    if now < cert.not_valid_before_utc:
        raise AuthenticationError(
            f"the certificate {subject!r} is not valid before {cert.not_valid_before_utc}; "
            "check the clocks of server and site"
        )
    if now > cert.not_valid_after_utc:
        raise AuthenticationError(
            f"the certificate {subject!r} expired on {cert.not_valid_after_utc}; "
            "issue new credentials with `consortium provision`"
        )
    if ExtendedKeyUsageOID.CLIENT_AUTH not in _extended_key_usages(cert):
        raise AuthenticationError(
            f"the certificate {subject!r} is not for client authentication (no clientAuth "
            "extended key usage); a site must use its client.pem"
        )
    try:
        site = _site_identity(cert)
    except ConfigError as exc:
        raise AuthenticationError(str(exc)) from exc
    record = registry.sites.get(site)
    if record is None:
        raise AuthenticationError(f"site {site!r} is not in the registry of provisioned sites")
    if not hmac.compare_digest(certificate_fingerprint(cert), record.fingerprint):
        raise AuthenticationError(
            f"the certificate for site {site!r} is not the one provisioned for it "
            f"(fingerprint {certificate_fingerprint(cert)[:16]}..., registered "
            f"{record.fingerprint[:16]}...); issue credentials only with `consortium provision`"
        )
    return site


def _authenticate_token(registry: Registry, token: str) -> str:
    digest = hash_token(token)
    found: str | None = None
    for site, expected in registry.token_hashes.items():
        # Compare against every site, without stopping early, so timing reveals nothing.
        if hmac.compare_digest(digest, expected):
            found = site
    if found is None or found not in registry.sites:
        raise AuthenticationError("the token does not belong to any provisioned site")
    return found


# --------------------------------------------------------------------------- certificates


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _validity(
    builder: x509.CertificateBuilder, now: dt.datetime, days: int, limit: dt.datetime | None = None
) -> x509.CertificateBuilder:
    end = now + dt.timedelta(days=days)
    if limit is not None:
        end = min(end, limit)  # a certificate must not outlive its issuer (RFC 5280 §6.1.3)
    return builder.not_valid_before(now - _CLOCK_SKEW).not_valid_after(end)


def _ca_certificate(
    key: ec.EllipticCurvePrivateKey, *, now: dt.datetime, days: int
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consortium"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"consortium CA {now:%Y-%m-%d %H:%M:%S}"),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        # RFC 5280 §4.2.1.9: critical CA=true; path length 0, the CA signs only end entities.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return _validity(builder, now, days).sign(key, hashes.SHA256())


def _server_certificate(
    key: ec.EllipticCurvePrivateKey,
    hosts: Sequence[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    return _end_entity(
        key,
        "consortium server",
        x509.SubjectAlternativeName(alt_names),
        ExtendedKeyUsageOID.SERVER_AUTH,
        ca_cert,
        ca_key,
        now=now,
        days=days,
    )


def _client_certificate(
    key: ec.EllipticCurvePrivateKey,
    site: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(SITE_URI_PREFIX + site)])
    return _end_entity(
        key, site, san, ExtendedKeyUsageOID.CLIENT_AUTH, ca_cert, ca_key, now=now, days=days
    )


def _end_entity(
    key: ec.EllipticCurvePrivateKey,
    common_name: str,
    san: x509.SubjectAlternativeName,
    usage: x509.ObjectIdentifier,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    now: dt.datetime,
    days: int,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "consortium"),
                    x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        # RFC 5280 §4.2.1.6: with a non-empty subject the SAN is not critical.
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    return _validity(builder, now, days, limit=ca_cert.not_valid_after_utc).sign(
        ca_key, hashes.SHA256()
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    # ECDSA keys sign (TLS 1.2 ECDHE and TLS 1.3 handshakes); only the CA signs certificates.
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _extended_key_usages(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    try:
        return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return []


def _site_identity(cert: x509.Certificate) -> str:
    """The site a certificate names: its ``consortium://site/`` URI, which must equal its CN."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = [
            u
            for u in san.get_values_for_type(x509.UniformResourceIdentifier)
            if u.startswith(SITE_URI_PREFIX)
        ]
    except x509.ExtensionNotFound:
        uris = []
    cns = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    subject = cert.subject.rfc4514_string()
    if len(uris) != 1:
        raise ConfigError(
            f"the certificate {subject!r} must name exactly one site as a "
            f"{SITE_URI_PREFIX}<name> subjectAltName, found {len(uris)}; use a site certificate "
            "from `consortium provision`"
        )
    site = uris[0].removeprefix(SITE_URI_PREFIX)
    if cns != [site]:
        raise ConfigError(
            f"the certificate {subject!r} names site {site!r} in its subjectAltName but "
            f"CN={cns!r}; use a site certificate from `consortium provision`"
        )
    return site


def _parse_certificate(data: bytes) -> x509.Certificate:
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # Unencrypted PKCS#8: gRPC and ssl load it without a passphrase prompt; file mode protects it.
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


EXPIRY_WARNING_DAYS = 30


def _check_dates(path: Path, cert: x509.Certificate, now: dt.datetime | None) -> None:
    """An expired or not yet valid certificate fails now (not as an obscure handshake error);
    one that expires within :data:`EXPIRY_WARNING_DAYS` days warns."""
    now = now if now is not None else dt.datetime.now(dt.timezone.utc)
    if now >= cert.not_valid_after_utc:
        raise ConfigError(
            f"{path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; issue new credentials "
            "(`consortium provision --overwrite`, or `--add-site` for one site) and hand them out"
        )
    if now < cert.not_valid_before_utc:
        raise ConfigError(
            f"{path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check "
            "this machine's clock"
        )
    left = cert.not_valid_after_utc - now
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        warnings.warn(
            f"{path} expires in {left.days} days ({cert.not_valid_after_utc:%Y-%m-%d}); issue "
            "new credentials before then", stacklevel=3,
        )


def _check_key_pair(
    cert_path: Path, cert_pem: bytes, key_path: Path, key_pem: bytes, ca_pem: bytes, *, fix: str,
    now: dt.datetime | None = None,
) -> None:
    """Fail at load time, not in the first handshake, on a wrong key, CA or file."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_path} is not a PEM certificate ({exc}); {fix}") from exc
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{key_path} is not an unencrypted PEM private key ({exc}); {fix}"
        ) from exc
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise ConfigError(f"{cert_path.parent / 'ca.pem'} is not a PEM certificate; {fix}") from exc
    if key.public_key() != cert.public_key():
        raise ConfigError(
            f"{key_path} is not the private key of {cert_path}; copy both from the same "
            "`consortium provision` output"
        )
    _check_dates(cert_path, cert, now)
    _check_dates(cert_path.parent / "ca.pem", ca, now)
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise ConfigError(
            f"{cert_path} was not issued by the CA in {cert_path.parent / 'ca.pem'}; copy both "
            "from the same `consortium provision` output"
        ) from exc


# --------------------------------------------------------------------------- files


def _issue_site(
    root: Path,
    name: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    now: dt.datetime,
    days: int,
) -> tuple[Path, SiteRecord, str]:
    site_dir = _mkdir(root / "sites" / name)
    key = _new_key()
    cert = _client_certificate(key, name, ca_cert, ca_key, now=now, days=days)
    token = secrets.token_urlsafe(32)
    _write_public(site_dir / "ca.pem", _pem(ca_cert))
    _write_public(site_dir / "client.pem", _pem(cert))
    _write_secret(site_dir / "client.key", _key_pem(key))
    _write_secret(site_dir / "token", (token + "\n").encode())
    write_gitignore(site_dir)
    return site_dir, SiteRecord(name, certificate_fingerprint(cert)), hash_token(token)


def _check_site_names(sites: Sequence[str]) -> list[str]:
    if isinstance(sites, str):
        raise ConfigError(f"sites must be a list of names, got the string {sites!r}")
    names = list(sites)
    if not names:
        raise ConfigError("provisioning needs at least one site, e.g. --sites a,b,c")
    for name in names:
        if not isinstance(name, str) or not _SITE_NAME.fullmatch(name) or set(name) == {"."}:
            raise ConfigError(
                f"invalid site name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if name.lower() in _RESERVED_NAMES:
            raise ConfigError(f"site name {name!r} is reserved; choose another name")
    folded = [n.lower() for n in names]
    duplicates = sorted({n for n in names if folded.count(n.lower()) > 1})
    if duplicates:
        raise ConfigError(
            f"site names must be unique (ignoring case, for case-insensitive file systems); "
            f"repeated: {', '.join(duplicates)}"
        )
    return names


def _check_server_names(server_names: Sequence[str]) -> list[str]:
    if isinstance(server_names, str):
        server_names = [server_names]
    hosts: list[str] = []
    for host in ["localhost", "127.0.0.1", *server_names]:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if not _DNS_NAME.fullmatch(host) or len(host) > 253:
                raise ConfigError(
                    f"invalid server name {host!r}: expected a DNS name such as "
                    "fl.example.org or an IP address"
                ) from None
            host = host.lower()
        if host not in hosts:
            hosts.append(host)
    return hosts


def _prepare_output(root: Path, *, overwrite: bool) -> None:
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} exists and is not a folder; choose another --out")
    if root.is_dir() and any(root.iterdir()):
        if not overwrite:
            raise ConfigError(
                f"{root} is not empty; refusing to overwrite existing credentials. Choose another "
                "--out, or pass --overwrite to replace them (every site then needs its new folder)"
            )
        # Only what provision writes is removed, never other files the user keeps there.
        for name in ("ca.pem", "ca.key", "README.txt"):
            (root / name).unlink(missing_ok=True)
        if _our_gitignore(root / ".gitignore"):
            (root / ".gitignore").unlink()
        for name in ("server", "sites"):
            if (root / name).is_dir():
                shutil.rmtree(root / name)
    _mkdir(root)


def _server_dir(path: Path) -> Path:
    if (path / "server.pem").exists() or (path / "sites.json").exists():
        return path
    if (path / "server").is_dir():
        return path / "server"
    raise ConfigError(
        f"{path} is not a provisioned server folder (no server.pem or sites.json); {_FIX}"
    )


def _read_registry_files(server_dir: Path) -> tuple[dict[str, SiteRecord], dict[str, str]]:
    sites_path, tokens_path = server_dir / "sites.json", server_dir / "tokens.json"
    try:
        raw_sites = json.loads(_read(sites_path, fix=_FIX))
        raw_tokens = json.loads(_read(tokens_path, fix=_FIX))
        records = {
            name: SiteRecord(name, str(entry["fingerprint"]), bool(entry.get("revoked", False)))
            for name, entry in raw_sites["sites"].items()
        }
        token_hashes = {str(name): str(digest) for name, digest in raw_tokens.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(
            f"{sites_path} or {tokens_path} is malformed ({type(exc).__name__}: {exc}); "
            "restore them from the `consortium provision` output"
        ) from exc
    return records, token_hashes


def _save_registry(
    server_dir: Path, records: Mapping[str, SiteRecord], token_hashes: Mapping[str, str]
) -> None:
    sites = {
        "format": _REGISTRY_FORMAT,
        "sites": {
            name: {"fingerprint": r.fingerprint, "revoked": r.revoked}
            for name, r in sorted(records.items())
        },
    }
    _write_json_atomic(server_dir / "sites.json", sites)
    _write_json_atomic(server_dir / "tokens.json", dict(sorted(token_hashes.items())))


def _write_json_atomic(path: Path, data: object) -> None:
    # Write then rename, so a server reloading the registry never reads half a file.
    tmp = path.with_name(f".{path.name}.tmp")
    _write_public(tmp, (json.dumps(data, indent=2) + "\n").encode())
    os.replace(tmp, path)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)  # the file may have existed with a wider mode
        os.write(fd, data)
    finally:
        os.close(fd)


def _read(path: Path, *, fix: str, secret: bool = False) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"missing credentials file {path}; {fix}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc.strerror}; {fix}") from exc
    if secret and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            warnings.warn(
                f"{path} is readable by other users (mode {mode:o}); run: chmod 600 {path}",
                stacklevel=3,
            )
    return data


GITIGNORE = (
    "# Written by `consortium provision`: private keys (ca.key, server.key, client.key) and\n"
    "# tokens must never reach version control, so git ignores this whole folder.\n"
    "*\n"
)


def write_gitignore(folder: Path) -> None:
    """Put a ``.gitignore`` that ignores everything into a credentials folder, so that a
    ``git add .`` in a project that holds ``certs/`` never commits a key; a ``.gitignore``
    the user wrote there is kept."""
    path = folder / ".gitignore"
    if not path.exists() or _our_gitignore(path):
        _write_public(path, GITIGNORE.encode())


def _our_gitignore(path: Path) -> bool:
    try:
        return path.read_text(encoding="utf-8") == GITIGNORE
    except (OSError, UnicodeDecodeError):
        return False


def _readme(sites: Sequence[str]) -> str:
    lines = [
        "Credentials made by `consortium provision`.",
        "",
        "ca.key      the consortium CA's private key. Keep it here, offline; it is needed only",
        "            to add sites. Whoever holds it can issue certificates.",
        "server/     copy to the server machine; the server takes --certs server/",
    ]
    lines += [
        f"sites/{name}/  give to site {name} only; its client takes --certs sites/{name}/"
        for name in sites
    ]
    lines += ["", "Each site folder holds only that site's key and token.",
              "Each folder's .gitignore keeps git from committing any of them."]
    return "\n".join(lines) + "\n"
