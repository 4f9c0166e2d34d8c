"""``fedshield ca``: the federation's CA, as an operator and a site use it."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from fedshield.cli.main import app
from fedshield.errors import ConfigError
from fedshield.transport.ca import approve, init_ca, request, revoke, verify


def _site(tmp_path: Path, name: str = "hospital-a") -> tuple[Path, Path]:
    ca = tmp_path / "ca"
    init_ca(ca, "127.0.0.1")
    csr = request(name, tmp_path / name)
    cert = approve(csr, ca, tmp_path / f"{name}-signed")
    return ca, cert


def test_a_site_is_approved_and_verified(tmp_path: Path) -> None:
    ca, cert = _site(tmp_path)
    assert verify(cert.read_bytes(), ca) == "hospital-a"
    assert (cert.parent / "ca.crt").read_bytes() == (ca / "ca.crt").read_bytes()
    # The site's private key never left its own folder.
    assert not (cert.parent / "hospital-a.key").exists()
    key = tmp_path / "hospital-a" / "hospital-a.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE((ca / "ca.key").stat().st_mode) == 0o600


def test_a_revoked_site_is_refused(tmp_path: Path) -> None:
    ca, cert = _site(tmp_path)
    revoke("hospital-a", ca)
    with pytest.raises(ConfigError, match="revoked"):
        verify(cert.read_bytes(), ca)


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    ca, _ = _site(tmp_path / "one")
    _, foreign = _site(tmp_path / "two")
    with pytest.raises(ConfigError, match="not issued by this CA"):
        verify(foreign.read_bytes(), ca)


def test_an_expired_certificate_is_refused(tmp_path: Path) -> None:
    ca, cert = _site(tmp_path)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=5000)
    with pytest.raises(ConfigError, match="validity window"):
        verify(cert.read_bytes(), ca, now=later)


def test_the_servers_certificate_is_not_a_sites(tmp_path: Path) -> None:
    ca, _ = _site(tmp_path)
    with pytest.raises(ConfigError, match="client authentication"):
        verify((ca / "server.crt").read_bytes(), ca)


def test_a_tampered_or_duplicate_request_is_refused(tmp_path: Path) -> None:
    ca, _ = _site(tmp_path)
    again = request("hospital-a", tmp_path / "again")
    with pytest.raises(ConfigError, match="already issued"):
        approve(again, ca, tmp_path / "out")
    # A CSR whose name was changed after signing: its signature fails.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank")]))
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM)
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    at = bytes(der).find(b"bank")
    der[at : at + 4] = b"bunk"
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ok.csr").write_bytes(pem)
    (tmp_path / "forged.csr").write_bytes(forged)
    approve(tmp_path / "ok.csr", ca, tmp_path / "ok")
    with pytest.raises(ConfigError, match="signature is not valid"):
        approve(tmp_path / "forged.csr", ca, tmp_path / "forged")


def test_nothing_is_overwritten_and_bad_names_are_refused(tmp_path: Path) -> None:
    ca = tmp_path / "ca"
    init_ca(ca, "example.org")
    with pytest.raises(ConfigError, match="already holds a CA"):
        init_ca(ca, "example.org")
    request("a", tmp_path / "a")
    with pytest.raises(ConfigError, match="nothing was overwritten"):
        request("a", tmp_path / "a")
    for bad in ("../x", "server", "", "a b"):
        with pytest.raises(ConfigError, match="not allowed"):
            request(bad, tmp_path / "bad")
    with pytest.raises(ConfigError, match="no certificate was issued"):
        revoke("nobody", ca)


def test_the_commands_as_a_user_runs_them(tmp_path: Path) -> None:
    runner = CliRunner()
    ca, site, out = tmp_path / "ca", tmp_path / "site", tmp_path / "signed"
    steps = [
        ["ca", "init", str(ca), "--server-host", "127.0.0.1"],
        ["ca", "request", "clinic", "--out", str(site)],
        ["ca", "approve", str(site / "clinic.csr"), "--ca", str(ca), "--out", str(out)],
        ["ca", "revoke", "clinic", "--ca", str(ca)],
    ]
    for args in steps:
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    again = runner.invoke(app, steps[0])
    assert again.exit_code == 10 and "already holds a CA" in again.output
    with pytest.raises(ConfigError, match="revoked"):
        verify((out / "clinic.crt").read_bytes(), ca)
