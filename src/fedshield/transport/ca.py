"""The federation's own certificate authority (``fedshield ca``).

The operator runs :func:`init_ca` once: the CA's key and certificate, and the
server's key and certificate for ``--server-host``. A site runs
:func:`request` on its own machine: its private key stays in its folder and
only a certificate signing request (CSR) leaves it. The operator checks and
signs it with :func:`approve`, which writes the site's certificate and the CA
certificate into a folder to hand back; :func:`revoke` puts a site's
certificate on the CA's revocation list (``ca.crl``). :func:`verify` is what a
server does with a peer's certificate: signed by this CA, in its validity
window, for client authentication, not revoked.

Keys are ECDSA P-256 (what TLS stacks, gRPC's included, all accept), written
with mode 0600; nothing here overwrites a key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedshield.errors import ConfigError

__all__ = [
    "CaPaths",
    "approve",
    "check_site_certificate",
    "init_ca",
    "request",
    "revoke",
    "verify",
]

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
"""A site's name: letters, digits, ``.``, ``_``, ``-``; at most 63."""

DAYS = 825
"""Validity of issued certificates, in days."""


@dataclass(frozen=True)
class CaPaths:
    """The files of a CA folder."""

    root: Path

    @property
    def key(self) -> Path:
        """The CA's private key (mode 0600)."""
        return self.root / "ca.key"

    @property
    def cert(self) -> Path:
        """The CA's certificate (every party's trust anchor)."""
        return self.root / "ca.crt"

    @property
    def crl(self) -> Path:
        """The CA's revocation list."""
        return self.root / "ca.crl"

    @property
    def index(self) -> Path:
        """Issued names, their serials and whether revoked."""
        return self.root / "index.json"

    @property
    def server_key(self) -> Path:
        """The server's private key (mode 0600)."""
        return self.root / "server.key"

    @property
    def server_cert(self) -> Path:
        """The server's certificate."""
        return self.root / "server.crt"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _check_name(name: str) -> None:
    if not NAME.match(name) or name == "server":
        raise ConfigError(
            f"site name {name!r} is not allowed: use 1-63 letters, digits, '.', "
            "'_' or '-', starting with a letter or digit (and not 'server')"
        )


def _load(paths: CaPaths) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not paths.key.exists() or not paths.cert.exists():
        raise ConfigError(
            f"{paths.root} is not a CA folder (no ca.key / ca.crt); create one "
            "with `fedshield ca init CA_DIR --server-host HOST`"
        )
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{paths.key} is not an EC private key")
    return key, x509.load_pem_x509_certificate(paths.cert.read_bytes())


_CERTS: dict[tuple[str, float], x509.Certificate] = {}


def _ca_cert(paths: CaPaths) -> x509.Certificate:
    """The CA's certificate (parsed once per file version)."""
    key = (str(paths.cert), paths.cert.stat().st_mtime)
    cert = _CERTS.get(key)
    if cert is None:
        cert = _CERTS[key] = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    return cert


_CRLS: dict[str, tuple[tuple[int, int], x509.CertificateRevocationList]] = {}


def _crl(paths: CaPaths) -> x509.CertificateRevocationList:
    """The revocation list, parsed again whenever the file changes."""
    stat = paths.crl.stat()
    version = (stat.st_mtime_ns, stat.st_size)
    found = _CRLS.get(str(paths.crl))
    if found is None or found[0] != version:
        found = (version, x509.load_pem_x509_crl(paths.crl.read_bytes()))
        _CRLS[str(paths.crl)] = found
    return found[1]


def _index(paths: CaPaths) -> dict[str, dict[str, object]]:
    if not paths.index.exists():
        return {}
    data = json.loads(paths.index.read_text(encoding="utf-8"))
    return dict(data)


def _save_index(paths: CaPaths, index: dict[str, dict[str, object]]) -> None:
    tmp = paths.index.with_suffix(".tmp")
    tmp.write_text(json.dumps(index, indent=2, sort_keys=True), encoding="utf-8")
    tmp.replace(paths.index)


def _issue(
    subject: str,
    public_key: ec.EllipticCurvePublicKey,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    usage: x509.ObjectIdentifier,
    host: str | None = None,
) -> x509.Certificate:
    now = _now()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.ExtendedKeyUsage([usage]), False)
    )
    if host is not None:
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host)
        builder = builder.add_extension(x509.SubjectAlternativeName([name]), False)
    return builder.sign(ca_key, hashes.SHA256())


def _write_crl(
    paths: CaPaths, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> None:
    now = _now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now)
        .next_update(now + dt.timedelta(days=DAYS))
    )
    for _name, entry in sorted(_index(paths).items()):
        if entry.get("revoked"):
            revoked = (
                x509.RevokedCertificateBuilder()
                .serial_number(int(str(entry["serial"])))
                .revocation_date(now)
                .build()
            )
            builder = builder.add_revoked_certificate(revoked)
    crl = builder.sign(key, hashes.SHA256())
    tmp = paths.crl.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    tmp.replace(paths.crl)


def init_ca(ca_dir: Path, server_host: str) -> CaPaths:
    """Create the federation's CA and the server's certificate in ``ca_dir``.

    Raises
    ------
    ConfigError
        If ``ca_dir`` already holds a CA (nothing is overwritten), or
        ``server_host`` is empty.
    """
    paths = CaPaths(Path(ca_dir))
    if not server_host.strip():
        raise ConfigError("--server-host must name the server (a host name or IP)")
    if paths.key.exists() or paths.cert.exists():
        raise ConfigError(
            f"{paths.root} already holds a CA (ca.key / ca.crt); nothing was "
            "overwritten. Use another folder, or remove it on purpose"
        )
    paths.root.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "fedshield federation CA")]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(paths.key, key)
    paths.cert.write_bytes(_pem(cert))
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _issue(
        "server",
        server_key.public_key(),
        key,
        cert,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
        host=server_host.strip(),
    )
    _write_key(paths.server_key, server_key)
    paths.server_cert.write_bytes(_pem(server_cert))
    _save_index(paths, {})
    _write_crl(paths, key, cert)
    return paths


def request(name: str, out_dir: Path) -> Path:
    """A site's key (kept in ``out_dir``) and its CSR; the CSR's path.

    Raises
    ------
    ConfigError
        If the name is not allowed or ``out_dir`` already holds a key.
    """
    _check_name(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key_path, csr_path = out / f"{name}.key", out / f"{name}.csr"
    if key_path.exists():
        raise ConfigError(f"{key_path} exists; nothing was overwritten")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    csr_path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return csr_path


def approve(csr_path: Path, ca_dir: Path, out_dir: Path) -> Path:
    """Sign a site's CSR; write its certificate and ``ca.crt`` into ``out_dir``.

    Raises
    ------
    ConfigError
        If the CSR is unreadable, its signature is wrong, its name is not
        allowed or already issued, or its key is not P-256.
    """
    paths = CaPaths(Path(ca_dir))
    ca_key, ca_cert = _load(paths)
    try:
        csr = x509.load_pem_x509_csr(Path(csr_path).read_bytes())
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot read the CSR {csr_path}: {err}") from None
    if not csr.is_signature_valid:
        raise ConfigError(f"{csr_path}: the CSR's signature is not valid; refused")
    names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError(f"{csr_path}: the CSR must name exactly one site")
    name = str(names[0].value)
    _check_name(name)
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or not isinstance(
        public.curve, ec.SECP256R1
    ):
        raise ConfigError(f"{csr_path}: the site's key must be ECDSA P-256")
    index = _index(paths)
    if name in index:
        raise ConfigError(
            f"a certificate for {name!r} was already issued"
            + (" and revoked" if index[name].get("revoked") else "")
            + "; a site keeps one name"
        )
    cert = _issue(name, public, ca_key, ca_cert, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert_path = out / f"{name}.crt"
    cert_path.write_bytes(_pem(cert))
    (out / "ca.crt").write_bytes(_pem(ca_cert))
    index[name] = {"serial": str(cert.serial_number), "revoked": False}
    _save_index(paths, index)
    return cert_path


def revoke(name: str, ca_dir: Path) -> None:
    """Revoke ``name``'s certificate: it is on ``ca.crl`` from now on.

    Raises
    ------
    ConfigError
        If no certificate was issued to ``name``.
    """
    paths = CaPaths(Path(ca_dir))
    key, cert = _load(paths)
    index = _index(paths)
    if name not in index:
        known = ", ".join(sorted(index)) or "none"
        raise ConfigError(f"no certificate was issued to {name!r} (issued: {known})")
    index[name]["revoked"] = True
    _save_index(paths, index)
    _write_crl(paths, key, cert)


def verify(cert_pem: bytes, ca_dir: Path, *, now: dt.datetime | None = None) -> str:
    """The site a certificate names, once it is known to be valid; else raise.

    Valid: signed by this CA, within its validity window, for client
    authentication, and not on the revocation list.

    Raises
    ------
    ConfigError
        Saying which check failed.
    """
    paths = CaPaths(Path(ca_dir))
    # The certificate and the revocation list only: a server that checks
    # its peers needs no signing key (it may run without ca.key).
    if not paths.cert.exists() or not paths.crl.exists():
        raise ConfigError(
            f"{paths.root} holds no ca.crt / ca.crl; copy them from the CA folder"
        )
    cert = x509.load_pem_x509_certificate(cert_pem)
    name = check_site_certificate(cert, _ca_cert(paths), now=now)
    crl = _crl(paths)
    if crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None:
        raise ConfigError("the certificate has been revoked")
    return name


def check_site_certificate(
    cert: x509.Certificate, ca_cert: x509.Certificate, *, now: dt.datetime | None = None
) -> str:
    """The site ``cert`` names, if ``ca_cert`` issued it for a site; else raise.

    Checks the issuer and its signature, the validity window and the purpose
    (client authentication); not revocation (:func:`verify` adds that).

    Raises
    ------
    ConfigError
        Saying which check failed.
    """
    ca_public = ca_cert.public_key()
    assert isinstance(ca_public, ec.EllipticCurvePublicKey)
    try:
        ca_public.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            ec.ECDSA(cert.signature_hash_algorithm or hashes.SHA256()),
        )
    except InvalidSignature:
        raise ConfigError("the certificate was not issued by this CA") from None
    if cert.issuer != ca_cert.subject:
        raise ConfigError("the certificate names another issuer")
    moment = now or _now()
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise ConfigError("the certificate is outside its validity window")
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        raise ConfigError("the certificate names no purpose") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise ConfigError("the certificate is not for client authentication")
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise ConfigError("the certificate must name exactly one site")
    return str(names[0].value)
