r"""Who sent a request, and whether it is fresh: signatures, nonces, clocks.

Every Fleet request starts with an ``Envelope``: the sender's id, 16 random
bytes (the nonce), the time it was sent and an ECDSA P-256 signature, made
with the key of the site's certificate, over

    ``b"fedshield/fleet/v1\\0" || method || b"\\0" || SHA-256(request)``

where ``request`` is the whole request serialised deterministically with the
signature field empty. The server checks, before anything else
(:class:`RequestGuard`):

1. the TLS peer's certificate is the federation CA's, valid, for client
   authentication and not revoked (:func:`fedshield.transport.ca.verify`,
   re-read on every request, so a revocation applies at once);
2. its common name equals ``envelope.client_id``;
3. the signature verifies with the certificate's key, so the request was
   made by the holder of the site's private key for this method and this
   body (a captured request cannot be replayed against another method or
   with another body);
4. ``sent_at_ms`` is within the allowed clock skew of the server's clock
   (the error names the offset);
5. the nonce was not seen before with another body in the window: the same
   nonce with the same body is a byte-identical retry, which is harmless
   because every write is idempotent (:mod:`fedshield.transport.server`).

Under ``--insecure`` (loopback only) there is no certificate: the envelope's
id is taken at its word and nothing is signed. It exists for tests.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedshield.errors import ConfigError, FedShieldError

__all__ = [
    "AuthError",
    "Identity",
    "RequestGuard",
    "Signer",
    "body_digest",
    "load_identity",
]

DOMAIN = b"fedshield/fleet/v1\0"
NONCE_BYTES = 16


class AuthError(FedShieldError):
    """A request that does not prove who sent it, or is stale (exit 42)."""

    exit_code = 42

    def __init__(self, message: str, *, code: str = "unauthenticated") -> None:
        super().__init__(message)
        self.code = code
        """``unauthenticated`` or ``permission_denied`` (the gRPC status)."""


def body_digest(request: Any) -> bytes:
    """SHA-256 of ``request`` serialised with its envelope's signature empty."""
    signature = request.envelope.signature
    request.envelope.signature = b""
    try:
        data = request.SerializeToString(deterministic=True)
    finally:
        request.envelope.signature = signature
    return hashlib.sha256(data).digest()


def _signed_bytes(method: str, digest: bytes) -> bytes:
    return DOMAIN + method.encode("ascii") + b"\0" + digest


@dataclass(frozen=True)
class Identity:
    """A site's credentials: its name, key, certificate and the CA's.

    ``fedshield ca request NAME --out DIR`` writes ``DIR/NAME.key``;
    ``fedshield ca approve`` writes ``DIR/NAME.crt`` and ``DIR/ca.crt``.
    """

    name: str
    key_pem: bytes
    cert_pem: bytes
    ca_pem: bytes


def load_identity(folder: Path) -> Identity:
    """The identity in ``folder``: one ``*.key`` with its ``.crt``, and ``ca.crt``.

    Raises
    ------
    ConfigError
        Saying what is missing and which command makes it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(
            f"--identity {folder} is not a folder; create it with `fedshield ca "
            f"request NAME --out {folder}`"
        )
    keys = sorted(p for p in folder.glob("*.key"))
    if len(keys) != 1:
        raise ConfigError(
            f"--identity {folder} must hold exactly one NAME.key (found "
            f"{len(keys)}); `fedshield ca request NAME --out {folder}` makes one"
        )
    name = keys[0].stem
    cert, ca = folder / f"{name}.crt", folder / "ca.crt"
    for path in (cert, ca):
        if not path.exists():
            raise ConfigError(
                f"{path} is missing: send {folder / (name + '.csr')} to the "
                f"operator and put what `fedshield ca approve` writes in {folder}"
            )
    identity = Identity(name, keys[0].read_bytes(), cert.read_bytes(), ca.read_bytes())
    certificate = x509.load_pem_x509_certificate(identity.cert_pem)
    key = serialization.load_pem_private_key(identity.key_pem, password=None)
    if key.public_key() != certificate.public_key():
        raise ConfigError(f"{cert} was not issued for {keys[0]}: the keys differ")
    return identity


class Signer:
    """Fills and signs a request's envelope with a site's key."""

    def __init__(self, client_id: str, key_pem: bytes | None) -> None:
        self.client_id = client_id
        self._key: ec.EllipticCurvePrivateKey | None = None
        if key_pem is not None:
            key = serialization.load_pem_private_key(key_pem, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError("the site's key is not an EC private key")
            self._key = key
        self.offset_ms = 0
        """Server clock minus this clock, learned at ``Join``."""

    def sign(self, method: str, request: Any) -> Any:
        """Fill ``request.envelope`` for ``method`` and sign it; return it."""
        env = request.envelope
        env.client_id = self.client_id
        env.nonce = os.urandom(NONCE_BYTES)
        env.sent_at_ms = int(time.time() * 1000) + self.offset_ms
        env.signature = b""
        if self._key is not None:
            digest = body_digest(request)
            env.signature = self._key.sign(
                _signed_bytes(method, digest), ec.ECDSA(hashes.SHA256())
            )
        return request


class RequestGuard:
    """The server's checks on every request (see the module docstring).

    Parameters
    ----------
    ca_dir
        The federation's CA folder (None: ``--insecure``, nothing checked
        but the claimed id's form).
    skew_s
        Largest difference between the request's time and the server's.
    """

    def __init__(self, ca_dir: Path | None, *, skew_s: float = 120.0) -> None:
        self._ca_dir = ca_dir
        self._skew_ms = int(skew_s * 1000)
        self._nonces: OrderedDict[bytes, tuple[bytes, int]] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, method: str, request: Any, peer_cert_pem: bytes | None) -> str:
        """The authenticated client id of ``request``; raise :class:`AuthError`."""
        env = request.envelope
        claimed = env.client_id
        if not claimed:
            raise AuthError("the request names no client (envelope.client_id)")
        if claimed == "server":
            raise AuthError("no site may call itself 'server'")
        if len(claimed) > 64:
            raise AuthError("a site's name has at most 64 characters")
        now_ms = int(time.time() * 1000)
        skew = env.sent_at_ms - now_ms
        if abs(skew) > self._skew_ms:
            raise AuthError(
                f"the request's clock is {skew / 1000:+.1f} s off the server's "
                f"(allowed ±{self._skew_ms / 1000:g} s); set the site's clock "
                "(NTP) or rejoin so the offset is learned again"
            )
        if len(env.nonce) != NONCE_BYTES:
            raise AuthError(f"the nonce must be {NONCE_BYTES} bytes")
        digest = body_digest(request)
        if self._ca_dir is not None:
            name, public = self._peer(peer_cert_pem)
            if name != claimed:
                raise AuthError(
                    f"the certificate is {name!r}'s but the request says it is "
                    f"from {claimed!r}",
                    code="permission_denied",
                )
            try:
                public.verify(
                    bytes(env.signature),
                    _signed_bytes(method, digest),
                    ec.ECDSA(hashes.SHA256()),
                )
            except InvalidSignature:
                raise AuthError(
                    f"the signature of {claimed!r}'s {method} request does not "
                    "verify (altered, or signed for another method)"
                ) from None
        self._fresh(bytes(env.nonce), digest, now_ms)
        return str(claimed)

    def _peer(self, cert_pem: bytes | None) -> tuple[str, ec.EllipticCurvePublicKey]:
        if not cert_pem:
            raise AuthError("no client certificate: this server requires mutual TLS")
        from fedshield.transport.ca import verify

        assert self._ca_dir is not None
        try:
            # Re-checked on every request: a revocation applies at once.
            name = verify(cert_pem, self._ca_dir)
        except ConfigError as err:
            raise AuthError(f"client certificate refused: {err}") from None
        public = x509.load_pem_x509_certificate(cert_pem).public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise AuthError("the client certificate's key is not an EC key")
        return name, public

    def _fresh(self, nonce: bytes, digest: bytes, now_ms: int) -> None:
        """Refuse a nonce seen with another body inside the window."""
        horizon = now_ms - 2 * self._skew_ms
        with self._lock:
            while self._nonces:
                oldest, (_, seen) = next(iter(self._nonces.items()))
                if seen >= horizon:
                    break
                del self._nonces[oldest]
            known = self._nonces.get(nonce)
            if known is not None and known[0] != digest:
                raise AuthError(
                    "a nonce was reused with another request (a replay); "
                    "refused, nothing changed"
                )
            if known is None:
                self._nonces[nonce] = (digest, now_ms)


def peer_certificate(context: Any) -> bytes | None:
    """The TLS peer's certificate (PEM) from a gRPC servicer context."""
    auth = context.auth_context()
    certs = auth.get("x509_pem_cert") if auth else None
    return bytes(certs[0]) if certs else None
