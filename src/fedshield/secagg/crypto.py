"""Cryptographic primitives of secure aggregation, all from ``cryptography``.

=====================  ======================================================
:func:`agree`          X25519 Diffie-Hellman, then HKDF-SHA256 to a 32-byte key
:func:`encrypt`        AES-256-GCM with a random 96-bit nonce (share transport)
:func:`expand_mask`    AES-256-CTR keystream from a 32-byte seed -> mask words
:func:`add_mask`       the same mask added to (subtracted from) a sum in place
:func:`sign`           Ed25519 (the malicious-server variant of the protocol)
=====================  ======================================================

Nothing here is home-made and nothing draws from a statistical generator:
keys, nonces and seeds come from the operating system (:func:`os.urandom`
through ``cryptography`` or :mod:`secrets`).

Key agreement is symmetric only if both sides pass the same ``info``: build it
from the context and the two client ids in a canonical order (for instance
``b"fedshield/secagg/v1/mask" + round + min(u, v) + max(u, v)``), so that a key
agreed for one round, purpose or pair is useless for any other.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedshield.errors import ProtocolError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "SEED_BYTES",
    "TAG_BYTES",
    "KeyPair",
    "SigningKey",
    "add_mask",
    "agree",
    "decrypt",
    "encrypt",
    "expand_mask",
    "export_private",
    "generate_keypair",
    "derive_signing_key",
    "export_signing_key",
    "generate_signing_key",
    "import_signing_key",
    "import_private",
    "random_seed",
    "sign",
    "verify",
]

KEY_BYTES = 32
"""Length of agreed keys, AES keys and raw X25519/Ed25519 public keys."""
SEED_BYTES = 32
"""Length of a mask seed."""
NONCE_BYTES = 12
"""AES-GCM nonce length; the nonce is prepended to every ciphertext."""
TAG_BYTES = 16
"""AES-GCM authentication tag length."""

_RAW = serialization.Encoding.Raw
_RAW_PUBLIC = serialization.PublicFormat.Raw
_RAW_PRIVATE = serialization.PrivateFormat.Raw
_SHA256 = hashes.SHA256()  # stateless: one instance serves every HKDF
_COUNTER_ZERO = modes.CTR(bytes(16))  # CTR mode from counter block 0 (immutable)


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair.

    Attributes
    ----------
    private
        The private key; never leaves the client except as Shamir shares.
    public
        The raw 32-byte public key, as sent to the server and the peers.
    """

    private: X25519PrivateKey
    public: bytes


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 signing key pair.

    Attributes
    ----------
    private
        The private signing key.
    public
        The raw 32-byte verification key.
    """

    private: Ed25519PrivateKey
    public: bytes


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the operating system's randomness."""
    private = X25519PrivateKey.generate()
    return KeyPair(
        private=private, public=private.public_key().public_bytes(_RAW, _RAW_PUBLIC)
    )


def export_private(private: X25519PrivateKey) -> bytes:
    """The raw 32 bytes of an X25519 private key (to Shamir-share it)."""
    return private.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption())


def import_private(data: bytes) -> X25519PrivateKey:
    """Rebuild an X25519 private key from :func:`export_private`'s 32 bytes.

    Raises
    ------
    ProtocolError
        If ``data`` is not 32 bytes.
    """
    if len(data) != KEY_BYTES:
        raise ProtocolError(
            f"an X25519 private key is {KEY_BYTES} bytes, got {len(data)}"
        )
    return X25519PrivateKey.from_private_bytes(bytes(data))


def agree(private: X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    """Agree on a 32-byte key with a peer: X25519, then HKDF-SHA256.

    ``agree(a.private, b.public, info=i) == agree(b.private, a.public, info=i)``.

    Parameters
    ----------
    private
        This side's private key.
    peer_public
        The peer's raw 32-byte public key.
    info
        Context bound into the key (HKDF ``info``): protocol version,
        purpose, round and the pair of ids in canonical order. Different
        ``info`` gives an independent key.

    Returns
    -------
    bytes
        32 bytes of key material.

    Raises
    ------
    ProtocolError
        If the peer key is not 32 bytes or is a low-order point (the shared
        secret would be all zeros).
    """
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(
            f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public)}"
        )
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:  # low-order point: all-zero shared secret
        raise ProtocolError(f"key agreement failed: {exc}") from exc
    hkdf = HKDF(algorithm=_SHA256, length=KEY_BYTES, salt=None, info=info)
    return hkdf.derive(shared)


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt and authenticate with AES-256-GCM.

    Parameters
    ----------
    key
        A 32-byte key (from :func:`agree`). The random 96-bit nonce makes
        reuse of the key for up to about ``2**32`` messages safe.
    plaintext
        The message.
    associated_data
        Authenticated but not encrypted (sender, recipient, round, stage):
        :func:`decrypt` fails unless it is given the same bytes.

    Returns
    -------
    bytes
        ``nonce (12 bytes) || ciphertext || tag (16 bytes)``.
    """
    _check_key(key)
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, plaintext, associated_data)


def decrypt(key: bytes, ciphertext: bytes, *, associated_data: bytes) -> bytes:
    """Check and decrypt a message made by :func:`encrypt`.

    Raises
    ------
    ProtocolError
        If the message is too short, was tampered with, or the key or the
        associated data differ from those used to encrypt it.
    """
    _check_key(key)
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise ProtocolError(
            f"ciphertext of {len(ciphertext)} bytes is shorter than nonce and tag "
            f"({NONCE_BYTES + TAG_BYTES} bytes)"
        )
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return AESGCM(bytes(key)).decrypt(nonce, body, associated_data)
    except InvalidTag as exc:
        raise ProtocolError(
            "decryption failed: ciphertext tampered with, or wrong key or "
            "associated data"
        ) from exc


def random_seed() -> bytes:
    """32 bytes from the operating system's randomness (a mask seed)."""
    return os.urandom(SEED_BYTES)


def expand_mask(
    seed: bytes,
    length: int,
    modulus_bits: int,
    *,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` words uniform in ``[0, 2**modulus_bits)``.

    The generator is AES-256 in counter mode keyed by the seed (counter block
    starting at zero): a cryptographic PRG, so the mask is indistinguishable
    from uniform to anyone without the seed. Each output word is 8 keystream
    bytes read little-endian and masked to its low ``modulus_bits`` bits,
    which keeps it exactly uniform because ``2**modulus_bits`` divides
    ``2**64``. The same seed always gives the same mask: use a seed for one
    mask only (the protocol derives a fresh one per round and pair).

    Parameters
    ----------
    seed
        32 bytes (from :func:`random_seed` or :func:`agree`).
    length
        Number of words, ``>= 0``.
    modulus_bits
        ``b`` in ``[1, 64]``; the mask lives in the integers mod ``2**b``.

    out
        Write the mask into this ``uint64`` array of shape ``(length,)``
        instead of a new one (the same values); for callers that expand many
        masks of one size in a row.

    Returns
    -------
    numpy.ndarray
        A writable ``uint64`` array of shape ``(length,)`` (``out`` if given).

    Raises
    ------
    ValueError
        If the seed is not 32 bytes, ``length < 0`` or ``modulus_bits`` is
        outside ``[1, 64]``.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if not 1 <= modulus_bits <= 64:
        raise ValueError(f"modulus_bits must be in [1, 64], got {modulus_bits}")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(bytes(16))).encryptor()
    if out is not None:
        if (
            out.dtype != np.uint64
            or out.shape != (length,)
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be a contiguous uint64 array of shape ({length},)"
            )
        # Encrypt zeros into a reused scratch buffer and copy: no fresh
        # pages per mask (allocating 8 MB per neighbour costs more in page
        # faults than the AES itself).
        zeros, scratch = _buffers(8 * length)
        written = encryptor.update_into(zeros, scratch)
        encryptor.finalize()
        out[:] = np.frombuffer(scratch, dtype="<u8", count=written // 8)
        if modulus_bits < 64:
            np.bitwise_and(out, np.uint64((1 << modulus_bits) - 1), out=out)
        return out
    stream = encryptor.update(bytes(8 * length))
    encryptor.finalize()  # CTR mode: nothing buffered, returns b""
    words = np.frombuffer(stream, dtype="<u8")
    if modulus_bits == 64:
        return words.astype(np.uint64)
    mask: np.ndarray = np.bitwise_and(
        words, np.uint64((1 << modulus_bits) - 1), dtype=np.uint64
    )
    return mask


def add_mask(seed: bytes, total: np.ndarray, *, subtract: bool = False) -> np.ndarray:
    """Add (or subtract) the mask of ``seed`` to ``total`` in place, mod ``2**64``.

    The words added are the full 64-bit keystream words that
    :func:`expand_mask` reads before masking them to ``modulus_bits``, so once
    the caller reduces ``total`` mod ``2**b`` (``total &= 2**b - 1``, for any
    ``b`` in ``[1, 64]``) it holds ``total ± expand_mask(seed, len(total), b)
    mod 2**b``: ``2**b`` divides ``2**64``, so reducing each word first or the
    sum at the end gives the same residue. Summing many masks this way costs
    one keystream and one add per mask, with no temporary vector.

    Parameters
    ----------
    seed
        32 bytes (from :func:`random_seed` or :func:`agree`).
    total
        A contiguous, writable ``uint64`` vector; updated in place.
    subtract
        Subtract the mask instead of adding it.

    Returns
    -------
    numpy.ndarray
        ``total``.

    Raises
    ------
    ValueError
        If the seed is not 32 bytes or ``total`` is not a contiguous
        one-dimensional ``uint64`` array.
    """
    if len(seed) != SEED_BYTES:
        raise ValueError(f"a mask seed is {SEED_BYTES} bytes, got {len(seed)}")
    if total.dtype != np.uint64 or total.ndim != 1 or not total.flags.c_contiguous:
        raise ValueError("total must be a contiguous one-dimensional uint64 array")
    length = int(total.size)
    encryptor = Cipher(algorithms.AES(bytes(seed)), _COUNTER_ZERO).encryptor()
    zeros, scratch = _buffers(8 * length)
    written = encryptor.update_into(zeros, scratch)
    encryptor.finalize()
    words = np.frombuffer(scratch, dtype="<u8", count=written // 8)
    if subtract:
        np.subtract(total, words, out=total)
    else:
        np.add(total, words, out=total)
    return total


def _signing_key(private: Ed25519PrivateKey) -> SigningKey:
    return SigningKey(
        private=private, public=private.public_key().public_bytes(_RAW, _RAW_PUBLIC)
    )


def generate_signing_key() -> SigningKey:
    """A fresh Ed25519 signing key pair."""
    private = Ed25519PrivateKey.generate()
    return _signing_key(private)


def derive_signing_key(secret: bytes, label: bytes) -> SigningKey:
    """The Ed25519 key pair that ``secret`` issues to ``label``.

    HKDF-SHA256 of ``secret`` with ``label`` as its ``info`` gives the
    32-byte private seed: the same secret and label always give the same
    key, and a party without the secret cannot compute it (a simulated
    public-key directory issuing each client its long-term key).
    """
    if len(secret) < KEY_BYTES:
        raise ValueError(f"the secret must hold at least {KEY_BYTES} bytes")
    hkdf = HKDF(algorithm=_SHA256, length=KEY_BYTES, salt=None, info=label)
    private = Ed25519PrivateKey.from_private_bytes(hkdf.derive(secret))
    return _signing_key(private)


def export_signing_key(key: SigningKey) -> bytes:
    """The raw 32-byte private seed of a signing key (it stays with its owner)."""
    return key.private.private_bytes(_RAW, _RAW_PRIVATE, serialization.NoEncryption())


def import_signing_key(raw: bytes) -> SigningKey:
    """The signing key whose private seed is ``raw`` (see :func:`export_signing_key`).

    Raises
    ------
    ProtocolError
        If ``raw`` is not 32 bytes.
    """
    if len(raw) != KEY_BYTES:
        raise ProtocolError(f"a signing key is {KEY_BYTES} bytes; got {len(raw)}")
    private = Ed25519PrivateKey.from_private_bytes(raw)
    return _signing_key(private)


def sign(key: SigningKey | Ed25519PrivateKey, message: bytes) -> bytes:
    """Sign a message with Ed25519; returns the 64-byte signature."""
    private = key.private if isinstance(key, SigningKey) else key
    return private.sign(message)


def verify(public: bytes | Ed25519PublicKey, message: bytes, signature: bytes) -> None:
    """Check an Ed25519 signature.

    Parameters
    ----------
    public
        The signer's raw 32-byte verification key (or the key object).
    message
        The signed message.
    signature
        The 64-byte signature.

    Raises
    ------
    ProtocolError
        If the signature does not verify or the key is malformed.
    """
    try:
        key = (
            public
            if isinstance(public, Ed25519PublicKey)
            else Ed25519PublicKey.from_public_bytes(bytes(public))
        )
        key.verify(bytes(signature), message)
    except (InvalidSignature, ValueError) as exc:
        raise ProtocolError("signature verification failed") from exc


def _check_key(key: bytes) -> None:
    if len(key) != KEY_BYTES:
        raise ValueError(f"an AES-256-GCM key is {KEY_BYTES} bytes, got {len(key)}")


_LOCAL = threading.local()


def _buffers(size: int) -> tuple[bytes, bytearray]:
    """A zero input and a scratch output of ``size`` bytes, reused per thread."""
    zeros: bytes | None = getattr(_LOCAL, "zeros", None)
    if zeros is None or len(zeros) != size:
        zeros = bytes(size)
        _LOCAL.zeros = zeros
        _LOCAL.scratch = bytearray(size + 16)  # update_into wants a block spare
    scratch: bytearray = _LOCAL.scratch
    return zeros, scratch
