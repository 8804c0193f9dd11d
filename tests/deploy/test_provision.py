"""Provisioning: the folder layout, the certificates, loading, authentication and real TLS."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from consortium.deploy.provision import (
    SITE_URI_PREFIX,
    AuthenticationError,
    ProvisionedConsortium,
    ServerCredentials,
    SiteCredentials,
    _client_certificate,
    add_site,
    authenticate,
    certificate_fingerprint,
    hash_token,
    load_registry,
    load_server_credentials,
    load_site_credentials,
    provision,
    revoke,
)
from consortium.errors import ConfigError

SITES = ("a", "b", "c")
POSIX = os.name == "posix"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedConsortium:
    out = tmp_path_factory.mktemp("consortium") / "certs"
    return provision(SITES, out, server_names=("fl.example.org", "10.0.0.7"))


@pytest.fixture(scope="module")
def other(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedConsortium:
    """A second consortium: its CA must not be trusted by the first."""
    return provision(["a"], tmp_path_factory.mktemp("other") / "certs")


@pytest.fixture(scope="module")
def server(made: ProvisionedConsortium) -> ServerCredentials:
    return load_server_credentials(made.server_dir)


def _site(made: ProvisionedConsortium, name: str) -> SiteCredentials:
    return load_site_credentials(made.site_dirs[name])


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


# --------------------------------------------------------------------------- layout


def test_layout_gives_each_party_only_its_own_secrets(made: ProvisionedConsortium) -> None:
    root = made.root
    assert {p.name for p in root.iterdir()} == {
        "ca.pem", "ca.key", "README.txt", "server", "sites", ".gitignore"}
    assert {p.name for p in made.server_dir.iterdir()} == {
        ".gitignore",
        "ca.pem",
        "server.pem",
        "server.key",
        "sites.json",
        "tokens.json",
    }
    assert set(made.site_dirs) == set(SITES)
    for name, site_dir in made.site_dirs.items():
        assert site_dir == root / "sites" / name
        assert {p.name for p in site_dir.iterdir()} == {
            ".gitignore",
            "ca.pem",
            "client.pem",
            "client.key",
            "token",
        }
    # The CA key lives only at the top; no token appears anywhere on the server side.
    assert [p for p in root.rglob("ca.key")] == [root / "ca.key"]
    server_text = "".join(p.read_text() for p in made.server_dir.iterdir())
    for site_dir in made.site_dirs.values():
        assert (site_dir / "token").read_text().strip() not in server_text


@pytest.mark.skipif(not POSIX, reason="file modes are POSIX")
def test_private_keys_and_tokens_are_owner_only(made: ProvisionedConsortium) -> None:
    secrets = [made.root / "ca.key", made.server_dir / "server.key"]
    for site_dir in made.site_dirs.values():
        secrets += [site_dir / "client.key", site_dir / "token"]
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_registry_pins_each_site_certificate_and_token_hash(made: ProvisionedConsortium) -> None:
    registry = load_registry(made.root)
    assert set(registry.sites) == set(SITES) == set(registry.token_hashes)
    for name, site_dir in made.site_dirs.items():
        record = registry.sites[name]
        assert not record.revoked
        assert record.fingerprint == certificate_fingerprint((site_dir / "client.pem").read_bytes())
        token = (site_dir / "token").read_text().strip()
        assert len(token) == 43  # 32 random bytes, urlsafe base64 without padding
        assert registry.token_hashes[name] == hash_token(token) != token
    tokens = {(d / "token").read_text() for d in made.site_dirs.values()}
    assert len(tokens) == len(SITES)


# --------------------------------------------------------------------------- certificates


def test_ca_is_a_self_signed_ca_that_signs_only_certificates(made: ProvisionedConsortium) -> None:
    ca = _cert(made.root / "ca.pem")
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and not usage.digital_signature
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert certificate_fingerprint(ca) == made.ca_fingerprint


def test_server_certificate_names_localhost_and_given_hosts(made: ProvisionedConsortium) -> None:
    cert = _cert(made.server_dir / "server.pem")
    cert.verify_directly_issued_by(_cert(made.root / "ca.pem"))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.7"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_site_certificate_names_the_site_in_cn_and_uri(made: ProvisionedConsortium) -> None:
    cert = _cert(made.site_dirs["b"] / "client.pem")
    cert.verify_directly_issued_by(_cert(made.root / "ca.pem"))
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)] == ["b"]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [SITE_URI_PREFIX + "b"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    now = dt.datetime.now(dt.timezone.utc)
    assert cert.not_valid_before_utc < now < cert.not_valid_after_utc
    assert dt.timedelta(days=364) < cert.not_valid_after_utc - now <= dt.timedelta(days=365)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "sites, found",
    [
        ([], "at least one site"),
        ("a,b", "list of names"),
        (["a", ""], "invalid site name ''"),
        (["a b"], "invalid site name 'a b'"),
        (["../x"], "invalid site name"),
        ([".."], "invalid site name '..'"),
        (["x" * 65], "invalid site name"),
        (["server"], "reserved"),
        (["a", "b", "A"], "repeated: A, a"),
    ],
)
def test_bad_site_names_are_refused(tmp_path: Path, sites: list[str], found: str) -> None:
    with pytest.raises(ConfigError, match=found):
        provision(sites, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_server_name_and_days_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid server name 'bad name'"):
        provision(["a"], tmp_path / "out", server_names=["bad name"])
    with pytest.raises(ConfigError, match="days=0"):
        provision(["a"], tmp_path / "out", days=0)


def test_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    first = provision(["a", "old"], out)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"{out} is not empty.*--overwrite"):
        provision(["a"], out)
    second = provision(["a"], out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"  # not ours: kept
    assert not (out / "sites" / "old").exists()
    assert second.ca_fingerprint != first.ca_fingerprint


# --------------------------------------------------------------------------- loading


def test_loaders_accept_the_top_folder_or_the_party_folder(made: ProvisionedConsortium) -> None:
    assert load_server_credentials(made.root).directory == made.server_dir
    site = load_site_credentials(made.root, site="c")
    assert site.site == "c" and site.directory == made.site_dirs["c"]
    assert site.token == (made.site_dirs["c"] / "token").read_text().strip()
    assert _site(made, "a").site == "a"
    with pytest.raises(ConfigError, match="holds every site's credentials"):
        load_site_credentials(made.root)
    with pytest.raises(ConfigError, match="certificate of site 'a', not 'b'"):
        load_site_credentials(made.site_dirs["a"], site="b")


@pytest.mark.parametrize("name", ["ca.pem", "client.pem", "client.key", "token"])
def test_missing_site_file_is_named_with_the_fix(
    made: ProvisionedConsortium, tmp_path: Path, name: str
) -> None:
    copy = tmp_path / "a"
    shutil.copytree(made.site_dirs["a"], copy)
    (copy / name).unlink()
    with pytest.raises(
        ConfigError, match=rf"missing credentials file {copy / name}.*consortium provision"
    ):
        load_site_credentials(copy)


def test_missing_server_folder_and_file_are_named(
    made: ProvisionedConsortium, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match=rf"{tmp_path} is not a provisioned server folder"):
        load_server_credentials(tmp_path)
    copy = tmp_path / "server"
    shutil.copytree(made.server_dir, copy)
    (copy / "tokens.json").unlink()
    with pytest.raises(ConfigError, match=rf"missing credentials file {copy / 'tokens.json'}"):
        load_server_credentials(copy)


def test_mismatched_key_or_foreign_certificate_is_caught_at_load(
    made: ProvisionedConsortium, other: ProvisionedConsortium, tmp_path: Path
) -> None:
    copy = tmp_path / "a"
    shutil.copytree(made.site_dirs["a"], copy)
    shutil.copy(made.site_dirs["b"] / "client.key", copy / "client.key")
    with pytest.raises(ConfigError, match="is not the private key of"):
        load_site_credentials(copy)
    shutil.copy(other.site_dirs["a"] / "client.key", copy / "client.key")
    shutil.copy(other.site_dirs["a"] / "client.pem", copy / "client.pem")
    with pytest.raises(ConfigError, match="was not issued by the CA"):
        load_site_credentials(copy)


def test_credentials_past_or_near_their_end_are_caught_at_load(made: ProvisionedConsortium) -> None:
    from cryptography import x509

    from consortium.deploy.provision import _check_key_pair

    folder = made.site_dirs["a"]
    files = [folder / "client.pem", (folder / "client.pem").read_bytes(), folder / "client.key",
             (folder / "client.key").read_bytes(), (folder / "ca.pem").read_bytes()]
    end = x509.load_pem_x509_certificate(files[1]).not_valid_after_utc
    with pytest.raises(ConfigError, match=r"client.pem expired on .*consortium provision"):
        _check_key_pair(*files, fix="", now=end + dt.timedelta(seconds=1))
    with pytest.warns(UserWarning) as caught:
        _check_key_pair(*files, fix="", now=end - dt.timedelta(days=9, hours=12))
    assert any("client.pem expires in 9 days" in str(w.message) for w in caught)
    with pytest.raises(ConfigError, match="not valid before.*clock"):
        _check_key_pair(*files, fix="", now=end - dt.timedelta(days=10_000))
    _check_key_pair(*files, fix="")  # today: fine, no warning (a year left)


@pytest.mark.skipif(not POSIX, reason="file modes are POSIX")
def test_a_key_readable_by_others_warns(made: ProvisionedConsortium, tmp_path: Path) -> None:
    copy = tmp_path / "a"
    shutil.copytree(made.site_dirs["a"], copy)
    (copy / "client.key").chmod(0o644)
    with pytest.warns(UserWarning, match="chmod 600"):
        load_site_credentials(copy)


# --------------------------------------------------------------------------- authentication


def test_a_site_is_recognised_by_certificate_token_or_both(
    made: ProvisionedConsortium, server: ServerCredentials
) -> None:
    registry = server.registry
    for name in SITES:
        site = _site(made, name)
        der = x509.load_pem_x509_certificate(site.cert_pem).public_bytes(serialization.Encoding.DER)
        assert authenticate(registry, peer_cert_pem=site.cert_pem, token=None) == name
        assert authenticate(registry, peer_cert_pem=der, token=None) == name
        assert authenticate(registry, peer_cert_pem=None, token=site.token) == name
        assert (
            authenticate(registry, peer_cert_pem=site.cert_pem, token=site.token, claimed_site=name)
            == name
        )


def test_missing_wrong_or_mixed_credentials_are_refused(
    made: ProvisionedConsortium, server: ServerCredentials
) -> None:
    registry = server.registry
    a, b = _site(made, "a"), _site(made, "b")
    with pytest.raises(AuthenticationError, match="neither a client certificate nor a token"):
        authenticate(registry, peer_cert_pem=None, token=None)
    with pytest.raises(AuthenticationError, match="token does not belong"):
        authenticate(registry, peer_cert_pem=None, token=a.token + "x")
    with pytest.raises(AuthenticationError, match="token does not belong"):
        authenticate(registry, peer_cert_pem=None, token="")
    with pytest.raises(
        AuthenticationError, match="certificate belongs to site 'a' but the token to site 'b'"
    ):
        authenticate(registry, peer_cert_pem=a.cert_pem, token=b.token)
    with pytest.raises(AuthenticationError, match="claims to come from 'b'"):
        authenticate(registry, peer_cert_pem=a.cert_pem, token=None, claimed_site="b")
    with pytest.raises(AuthenticationError, match="cannot be parsed"):
        authenticate(registry, peer_cert_pem=b"not a certificate", token=None)


def test_certificates_not_from_this_consortium_are_refused(
    made: ProvisionedConsortium, other: ProvisionedConsortium, server: ServerCredentials
) -> None:
    registry = server.registry
    foreign = (other.site_dirs["a"] / "client.pem").read_bytes()
    with pytest.raises(AuthenticationError, match="not issued by this consortium's CA"):
        authenticate(registry, peer_cert_pem=foreign, token=None)
    server_cert = (made.server_dir / "server.pem").read_bytes()  # right CA, wrong purpose
    with pytest.raises(AuthenticationError, match="not for client authentication"):
        authenticate(registry, peer_cert_pem=server_cert, token=None)


def test_certificates_outside_their_validity_are_refused(
    made: ProvisionedConsortium, server: ServerCredentials
) -> None:
    pem = _site(made, "a").cert_pem
    now = dt.datetime.now(dt.timezone.utc)
    with pytest.raises(AuthenticationError, match="expired on"):
        authenticate(
            server.registry, peer_cert_pem=pem, token=None, now=now + dt.timedelta(days=400)
        )
    with pytest.raises(AuthenticationError, match="not valid before"):
        authenticate(server.registry, peer_cert_pem=pem, token=None, now=now - dt.timedelta(days=1))


def test_ca_signed_certificates_that_were_not_provisioned_are_refused(
    made: ProvisionedConsortium, server: ServerCredentials
) -> None:
    """Pinning: even a certificate the CA signed is refused unless it is the registered one."""
    ca_cert = _cert(made.root / "ca.pem")
    ca_key = serialization.load_pem_private_key((made.root / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.timezone.utc)

    def issue(name: str) -> bytes:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _client_certificate(key, name, ca_cert, ca_key, now=now, days=1)
        return cert.public_bytes(serialization.Encoding.PEM)

    with pytest.raises(AuthenticationError, match="site 'zed' is not in the registry"):
        authenticate(server.registry, peer_cert_pem=issue("zed"), token=None)
    with pytest.raises(AuthenticationError, match="not the one provisioned for it"):
        authenticate(server.registry, peer_cert_pem=issue("a"), token=None)


def test_a_revoked_site_is_refused_by_certificate_and_token(tmp_path: Path) -> None:
    made = provision(["a", "b"], tmp_path / "certs")
    a = load_site_credentials(made.site_dirs["a"])
    revoke(made.root, "a")
    registry = load_registry(made.server_dir)
    assert registry.sites["a"].revoked and not registry.sites["b"].revoked
    with pytest.raises(AuthenticationError, match="site 'a' is revoked"):
        authenticate(registry, peer_cert_pem=a.cert_pem, token=None)
    with pytest.raises(AuthenticationError, match="site 'a' is revoked"):
        authenticate(registry, peer_cert_pem=None, token=a.token)
    assert (
        authenticate(
            registry, peer_cert_pem=None, token=load_site_credentials(made.site_dirs["b"]).token
        )
        == "b"
    )
    with pytest.raises(ConfigError, match=r"cannot revoke 'zed'.*provisioned sites: a, b"):
        revoke(made.server_dir, "zed")


def test_add_site_issues_a_new_site_with_the_same_ca(tmp_path: Path) -> None:
    made = provision(["a"], tmp_path / "certs")
    site_dir = add_site(made.root, "d")
    assert site_dir == made.root / "sites" / "d"
    d = load_site_credentials(site_dir)
    registry = load_registry(made.root)
    assert authenticate(registry, peer_cert_pem=d.cert_pem, token=d.token) == "d"
    assert (
        authenticate(
            registry, peer_cert_pem=None, token=load_site_credentials(made.site_dirs["a"]).token
        )
        == "a"
    )
    with pytest.raises(ConfigError, match="site 'A' is already provisioned"):
        add_site(made.root, "A")


# --------------------------------------------------------------------------- real TLS


def _server_context(
    creds: ServerCredentials, *, require_client_cert: bool = True
) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(creds.directory / "server.pem", creds.directory / "server.key")
    context.load_verify_locations(cadata=creds.ca_pem.decode())
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


def _client_context(ca_pem: bytes, site_dir: Path | None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # checks the server's name and chain
    context.load_verify_locations(cadata=ca_pem.decode())
    if site_dir is not None:
        context.load_cert_chain(site_dir / "client.pem", site_dir / "client.key")
    return context


def _handshake(
    server_context: ssl.SSLContext,
    client_context: ssl.SSLContext,
    registry: object,
    *,
    host: str = "localhost",
) -> tuple[str | Exception, bytes | Exception]:
    """Connect over 127.0.0.1; return (what the server saw, what the client received)."""
    outcome: list[str | Exception] = []
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    port = listener.getsockname()[1]

    def serve() -> None:
        conn: socket.socket | None = None
        try:
            conn, _ = listener.accept()
            conn.settimeout(5)
            with server_context.wrap_socket(conn, server_side=True) as tls:
                der = tls.getpeercert(binary_form=True)
                outcome.append(authenticate(registry, peer_cert_pem=der, token=None))  # type: ignore[arg-type]
                tls.sendall(b"ok")
        except Exception as exc:  # the test inspects it
            outcome.append(exc)
        finally:
            if conn is not None:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    received: bytes | Exception
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with client_context.wrap_socket(raw, server_hostname=host) as tls:
                received = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        received = exc
    finally:
        thread.join(5)
        listener.close()
    assert not thread.is_alive()
    return (outcome[0] if outcome else RuntimeError("server saw no connection")), received


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])
def test_mutual_tls_handshake_identifies_the_site(
    made: ProvisionedConsortium, server: ServerCredentials, host: str
) -> None:
    seen, received = _handshake(
        _server_context(server),
        _client_context(server.ca_pem, made.site_dirs["b"]),
        server.registry,
        host=host,
    )
    assert seen == "b" and received == b"ok"


def test_tls_refuses_a_client_from_another_ca_or_without_a_certificate(
    made: ProvisionedConsortium, other: ProvisionedConsortium, server: ServerCredentials
) -> None:
    foreign = _client_context(server.ca_pem, other.site_dirs["a"])
    seen, received = _handshake(_server_context(server), foreign, server.registry)
    assert isinstance(seen, ssl.SSLError) and "certificate verify failed" in str(seen)
    assert isinstance(received, Exception)

    anonymous = _client_context(server.ca_pem, None)
    seen, received = _handshake(_server_context(server), anonymous, server.registry)
    assert isinstance(seen, ssl.SSLError) and "certificate" in str(seen).lower()
    assert isinstance(received, Exception)


def test_tls_client_refuses_a_server_from_another_ca(
    made: ProvisionedConsortium, other: ProvisionedConsortium, server: ServerCredentials
) -> None:
    impostor = _server_context(load_server_credentials(other.server_dir))
    seen, received = _handshake(
        impostor, _client_context(server.ca_pem, made.site_dirs["a"]), server.registry
    )
    assert isinstance(received, ssl.SSLCertVerificationError)
    assert isinstance(seen, Exception)


def test_tls_client_refuses_a_name_the_server_certificate_lacks(
    made: ProvisionedConsortium, server: ServerCredentials
) -> None:
    _, received = _handshake(
        _server_context(server),
        _client_context(server.ca_pem, made.site_dirs["a"]),
        server.registry,
        host="elsewhere.example.org",
    )
    assert isinstance(received, ssl.SSLCertVerificationError)
    assert "elsewhere.example.org" in str(received)


# --------------------------------------------------------------------------- gRPC


@pytest.fixture
def grpc_server(server: ServerCredentials) -> Iterator[int]:
    """A gRPC server on 127.0.0.1 requiring client certificates; answers with the caller's site."""
    grpc = pytest.importorskip("grpc")
    from concurrent import futures

    def whoami(request: bytes, context: object) -> bytes:
        pem = dict(context.auth_context()).get("x509_pem_cert", [b""])[0]  # type: ignore[attr-defined]
        return authenticate(server.registry, peer_cert_pem=pem, token=None).encode()

    handler = grpc.method_handlers_generic_handler(
        "consortium.test.Identity", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
    )
    instance = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    instance.add_generic_rpc_handlers((handler,))
    credentials = grpc.ssl_server_credentials(
        [(server.key_pem, server.cert_pem)],
        root_certificates=server.ca_pem,
        require_client_auth=True,
    )
    port = instance.add_secure_port("127.0.0.1:0", credentials)
    instance.start()
    try:
        yield port
    finally:
        instance.stop(None)


def _call_whoami(port: int, site_dir: Path, ca_pem: bytes) -> bytes:
    import grpc

    site_key = (site_dir / "client.key").read_bytes()
    credentials = grpc.ssl_channel_credentials(
        ca_pem, site_key, (site_dir / "client.pem").read_bytes()
    )
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        result: bytes = channel.unary_unary("/consortium.test.Identity/WhoAmI")(b"", timeout=5)
        return result


def test_grpc_mutual_tls_accepts_the_provisioned_credentials(
    made: ProvisionedConsortium, server: ServerCredentials, grpc_server: int
) -> None:
    assert _call_whoami(grpc_server, made.site_dirs["c"], server.ca_pem) == b"c"


def test_grpc_refuses_a_client_from_another_ca(
    other: ProvisionedConsortium, server: ServerCredentials, grpc_server: int
) -> None:
    import grpc

    with pytest.raises(grpc.RpcError) as caught:
        _call_whoami(grpc_server, other.site_dirs["a"], server.ca_pem)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
