r"""Secure aggregation's keys bound to the sites' certificates.

In malicious mode every SecAgg message is signed, and a client checks the
signatures against a table of verification keys that the server relays. A
server that can put a key of its own in the table (for a real site, or for
a site that does not exist) can impersonate it and, in SecAgg+, unmask a
victim. In simulation the table is checked against a key directory
(:class:`~fedshield.simulation.secure_client.KeyDirectory`); over a network
:class:`SiteKeys` checks it against the federation's certificates:

- each site makes a signing key for the run and *attests* it: its
  certificate, and an ECDSA signature with its certificate's key over
  ``b"fedshield/secagg-key/v1\\0" || run_id || b"\\0" || site || b"\\0" ||
  verify_key``; the attestation travels in the site's receipt and the
  server relays every site's attestation with the round's setup;
- before taking part, each site checks every entry of the table: the
  certificate was issued by the federation's CA (the ``ca.crt`` the site
  holds), is valid now and names the entry's site; the signature covers
  this run and exactly the key in the table; and the site is on the run's
  roster (the plan's ``sites``), so the server can neither substitute a key
  nor enrol a site of its own (the round's roster is authenticated).

A server that also runs the CA could issue certificates for invented
sites; the roster check limits those to names the plan announced, which
each site's policy sees at join.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.errors import ConfigError, ProtocolError
from fedshield.transport.auth import Identity
from fedshield.transport.ca import check_site_certificate

__all__ = ["SiteKeys"]

DOMAIN = b"fedshield/secagg-key/v1\0"


def _statement(run_id: str, site: str, verify_key: bytes) -> bytes:
    return DOMAIN + run_id.encode() + b"\0" + site.encode() + b"\0" + verify_key


def _pack(cert_der: bytes, signature: bytes) -> bytes:
    return len(cert_der).to_bytes(4, "big") + cert_der + signature


def _unpack(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 4:
        raise ProtocolError("an attestation is truncated")
    n = int.from_bytes(data[:4], "big")
    if n <= 0 or 4 + n >= len(data) or len(data) > 8192:
        raise ProtocolError("an attestation is malformed")
    return data[4 : 4 + n], data[4 + n :]


class SiteKeys:
    """A site's SecAgg signing key for a run, attested by its certificate.

    Used as a :class:`~fedshield.simulation.secure_client.ClientTrust`'s
    ``keys``: :meth:`signing_key`, :meth:`announce` and :meth:`check_table`.
    """

    def __init__(self, identity: Identity, run_id: str, roster: Sequence[str]) -> None:
        from fedshield.secagg import crypto

        self.identity = identity
        self.run_id = run_id
        self.roster = frozenset(roster)
        self._key = crypto.generate_signing_key()
        cert = x509.load_pem_x509_certificate(identity.cert_pem)
        self._cert_der = cert.public_bytes(serialization.Encoding.DER)
        tls_key = serialization.load_pem_private_key(identity.key_pem, password=None)
        assert isinstance(tls_key, ec.EllipticCurvePrivateKey)
        self._attestation = _pack(
            self._cert_der,
            tls_key.sign(
                _statement(run_id, identity.name, self._key.public),
                ec.ECDSA(hashes.SHA256()),
            ),
        )
        self._ca = x509.load_pem_x509_certificate(identity.ca_pem)

    def signing_key(self, client_id: str) -> Any:
        """The site's own signing key (it holds no other)."""
        if client_id != self.identity.name:
            raise ProtocolError(
                f"this site is {self.identity.name!r}; it holds no key for "
                f"{client_id!r}"
            )
        return self._key

    def announce(self, client_id: str) -> tuple[bytes, bytes]:
        """The verification key and its attestation, for the receipt."""
        self.signing_key(client_id)
        return self._key.public, self._attestation

    def check_table(
        self,
        table: Mapping[str, bytes],
        attestations: Mapping[str, bytes] | None = None,
    ) -> None:
        """Refuse a key table any entry of which the certificates do not back.

        Raises
        ------
        ProtocolError
            Naming the entry and what is wrong with it.
        """
        attestations = attestations or {}
        for site, key in table.items():
            if site not in self.roster:
                raise ProtocolError(
                    f"the server's key table names {site!r}, which is not a site "
                    "of this run"
                )
            if site == self.identity.name and key != self._key.public:
                raise ProtocolError(
                    "the server's key table gives this site a key that is not its own"
                )
            attestation = attestations.get(site)
            if not attestation:
                raise ProtocolError(
                    f"the server's key table gives {site!r} a key without its "
                    "certificate's attestation"
                )
            self._check_one(site, key, attestation)

    def _check_one(self, site: str, key: bytes, attestation: bytes) -> None:
        cert_der, signature = _unpack(attestation)
        try:
            cert = x509.load_der_x509_certificate(cert_der)
        except ValueError:
            raise ProtocolError(
                f"{site!r}'s attestation holds no certificate"
            ) from None
        try:
            name = check_site_certificate(cert, self._ca)
        except ConfigError as err:
            reason = str(err).replace("this CA", "this federation's CA")
            raise ProtocolError(f"{site!r}'s attestation: {reason}") from None
        if name != site:
            raise ProtocolError(
                f"the certificate attesting {site!r}'s key is another's"
            )
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise ProtocolError(f"{site!r}'s certificate key is not an EC key")
        try:
            public.verify(
                signature,
                _statement(self.run_id, site, key),
                ec.ECDSA(hashes.SHA256()),
            )
        except InvalidSignature:
            raise ProtocolError(
                f"the server's key table gives {site!r} a key its certificate did "
                "not attest for this run"
            ) from None
