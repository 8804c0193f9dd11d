"""Signing identities: provisioned and simulated certificates, the trust anchor's checks, the floor."""

from __future__ import annotations

import datetime as dt
import pickle
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from consortium.errors import ConfigError
from consortium.secagg.floor import SecAggFloor
from consortium.secagg.identity import (
    SecAggIdentity,
    SimulatedAuthority,
    TrustAnchor,
    UntrustedPeer,
    simulated_identities,
    site_identity,
)

DATA = b"some bytes to sign"


def test_a_simulated_identity_signs_and_its_peers_verify() -> None:
    identities, trust = simulated_identities(["a", "b"])
    a = identities["a"]
    assert a.client_id == "a"
    trust.verify("a", a.certificate_der, DATA, a.sign(DATA))
    trust.verify("a", a.certificate, DATA, a.sign(DATA))  # PEM works too
    with pytest.raises(UntrustedPeer, match="does not verify"):
        trust.verify("a", a.certificate_der, DATA + b"!", a.sign(DATA))


def test_a_certificate_speaks_only_for_the_site_it_names() -> None:
    identities, trust = simulated_identities(["b", "c"])
    b = identities["b"]
    with pytest.raises(UntrustedPeer, match="certificate of site 'b' was presented for 'c'"):
        trust.verify("c", b.certificate_der, DATA, b.sign(DATA))
    # and the cache of checked certificates does not change that
    trust.verify("b", b.certificate_der, DATA, b.sign(DATA))
    with pytest.raises(UntrustedPeer, match="presented for 'c'"):
        trust.verify("c", b.certificate_der, DATA, b.sign(DATA))


def test_a_certificate_from_another_ca_is_refused() -> None:
    ours, trust = simulated_identities(["a"])
    theirs, _ = simulated_identities(["a"])  # another CA, a certificate with the same name
    with pytest.raises(UntrustedPeer, match="not issued by this consortium's CA"):
        trust.verify("a", theirs["a"].certificate_der, DATA, theirs["a"].sign(DATA))


@pytest.mark.parametrize(
    ("certificate", "signature", "match"),
    [
        (b"", b"x", "missing"),
        (b"x" * 9000, b"x", "longer than 8192"),
        (b"not a certificate", b"x", "cannot be parsed"),
        (None, b"", "signature of 'a' is missing"),
        (None, b"x" * 300, "longer than 256"),
    ],
)
def test_malformed_credentials_are_refused(
    certificate: bytes | None, signature: bytes, match: str
) -> None:
    identities, trust = simulated_identities(["a"])
    cert = identities["a"].certificate_der if certificate is None else certificate
    with pytest.raises(UntrustedPeer, match=match):
        trust.verify("a", cert, DATA, signature)


def test_validity_dates_are_checked_at_every_use() -> None:
    authority = SimulatedAuthority(b"\x01" * 32)
    now = dt.datetime.now(dt.timezone.utc)
    clock = [now]
    trust = TrustAnchor(authority.trust.ca.public_bytes(Encoding.PEM), clock=lambda: clock[0])
    a = authority.identity("a").identity
    trust.verify("a", a.certificate_der, DATA, a.sign(DATA))
    clock[0] = now + dt.timedelta(days=400)  # the cached certificate has expired since
    with pytest.raises(UntrustedPeer, match="not now"):
        trust.verify("a", a.certificate_der, DATA, a.sign(DATA))


def test_a_simulated_authority_rebuilds_the_same_keys_from_its_seed() -> None:
    authority = SimulatedAuthority(b"\x02" * 32)
    a = authority.identity("a")
    assert authority.identity("a") is a
    time.sleep(1.1)  # another second: the copy's CA must still carry the original's name
    copy = pickle.loads(pickle.dumps(authority))
    b = copy.identity("a")
    copy.trust.verify("a", a.identity.certificate_der, DATA, a.identity.sign(DATA))
    assert b.identity.key.private_numbers() == a.identity.key.private_numbers()
    # a certificate issued in the copied process verifies with the original's anchor
    authority.trust.verify("a", b.identity.certificate_der, DATA, b.identity.sign(DATA))


def test_provisioned_credentials_make_a_site_identity(tmp_path: Path) -> None:
    from consortium.deploy.provision import load_site_credentials, provision

    out = provision(["east", "west"], tmp_path / "pki")
    east = site_identity(load_site_credentials(out.site_dirs["east"]), "east")
    west = site_identity(load_site_credentials(out.site_dirs["west"]))
    assert east.client_id == "east" and west.client_id == "west"
    west.trust.verify("east", east.identity.certificate_der, DATA, east.identity.sign(DATA))
    with pytest.raises(ConfigError, match="names site 'east', not 'west'"):
        site_identity(load_site_credentials(out.site_dirs["east"]), "west")
    creds = load_site_credentials(out.site_dirs["east"])
    with pytest.raises(ConfigError, match="another key"):
        SecAggIdentity.from_pem(load_site_credentials(out.site_dirs["west"]).key_pem,
                                creds.cert_pem)


def test_the_floor_refuses_what_is_below_it_and_says_why() -> None:
    floor = SecAggFloor()
    assert floor.min_threshold == pytest.approx(2 / 3) and floor.min_neighbours == 128
    assert floor.refusal(threshold=14, neighbours=20, participants=21) is None
    assert "at least 14 of 20" in floor.refusal(threshold=13, neighbours=20, participants=21)
    assert "at least 67 of 100" in floor.refusal(threshold=1, neighbours=100, participants=101)
    # below 129 participants the graph must be complete
    assert "floor of 99" in floor.refusal(threshold=14, neighbours=20, participants=100)
    assert floor.refusal(threshold=86, neighbours=128, participants=1000) is None
    with pytest.raises(ConfigError, match="min_threshold"):
        SecAggFloor(min_threshold=1.5)
    with pytest.raises(ConfigError, match="min_cohort"):
        SecAggFloor(min_cohort=-1)


def test_a_revoked_peer_is_refused_by_the_sites_that_hold_the_revocation_list(tmp_path) -> None:
    """`consortium provision --revoke` writes a CA-signed crl.pem into every site folder: a
    site holding it refuses the revoked site's signed keys; others still verify."""
    from consortium.deploy.provision import (
        load_site_credentials,
        provision,
        revoke,
        write_revocation_list,
    )
    from consortium.errors import ConfigError
    from consortium.secagg.identity import UntrustedPeer, site_identity

    provision(["north", "south", "east"], tmp_path / "c")
    north = site_identity(load_site_credentials(tmp_path / "c" / "sites" / "north", "north"))
    south = site_identity(load_site_credentials(tmp_path / "c" / "sites" / "south", "south"))
    before = site_identity(load_site_credentials(tmp_path / "c" / "sites" / "east", "east"))
    data = b"keys"
    before.trust.verify("north", north.identity.certificate_der, data, north.identity.sign(data))
    revoke(tmp_path / "c", "north")
    assert (tmp_path / "c" / "sites" / "east" / "crl.pem").exists()
    east = site_identity(load_site_credentials(tmp_path / "c" / "sites" / "east", "east"))
    with pytest.raises(UntrustedPeer, match="revoked"):
        east.trust.verify("north", north.identity.certificate_der, data, north.identity.sign(data))
    east.trust.verify("south", south.identity.certificate_der, data, south.identity.sign(data))
    # a list signed by another consortium's CA is refused when the site starts
    provision(["north"], tmp_path / "other")
    write_revocation_list(tmp_path / "other", ["north"])
    (tmp_path / "c" / "sites" / "east" / "crl.pem").write_bytes(
        (tmp_path / "other" / "crl.pem").read_bytes())
    with pytest.raises(ConfigError, match="not signed by this consortium's CA"):
        load_site_credentials(tmp_path / "c" / "sites" / "east", "east")
