"""fedshield.secagg.crypto: agreement, AEAD, the mask PRG, signatures.

The mask PRG gets a second source: AES-256 in ECB mode over the counter blocks
0, 1, 2, ... computed here directly, which is what CTR mode must produce.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fedshield.errors import ProtocolError
from fedshield.secagg.crypto import (
    add_mask,
    agree,
    decrypt,
    encrypt,
    expand_mask,
    export_private,
    generate_keypair,
    generate_signing_key,
    import_private,
    random_seed,
    sign,
    verify,
)

FIXED_SEED = bytes(range(32))
INFO = b"fedshield/secagg/v1/mask" + (7).to_bytes(8, "big") + b"alice|bob"

# -- key agreement ---------------------------------------------------------------------


def test_agree_is_symmetric_and_32_bytes() -> None:
    a, b = generate_keypair(), generate_keypair()
    key_ab = agree(a.private, b.public, info=INFO)
    assert key_ab == agree(b.private, a.public, info=INFO)
    assert len(key_ab) == 32
    assert len(a.public) == 32


def test_agree_binds_info_and_peer() -> None:
    a, b, c = generate_keypair(), generate_keypair(), generate_keypair()
    key = agree(a.private, b.public, info=INFO)
    assert agree(a.private, b.public, info=INFO + b"x") != key
    assert agree(a.private, b.public, info=b"fedshield/secagg/v1/share") != key
    assert agree(a.private, c.public, info=INFO) != key
    assert agree(c.private, b.public, info=INFO) != key


def test_agree_rejects_malformed_and_low_order_keys() -> None:
    a = generate_keypair()
    with pytest.raises(ProtocolError, match="32 bytes"):
        agree(a.private, a.public[:31], info=INFO)
    with pytest.raises(ProtocolError, match="key agreement failed"):
        agree(a.private, bytes(32), info=INFO)  # the all-zero point has order 1


def test_private_key_export_import_round_trip() -> None:
    a, b = generate_keypair(), generate_keypair()
    raw = export_private(a.private)
    assert len(raw) == 32
    again = import_private(raw)
    assert agree(again, b.public, info=INFO) == agree(a.private, b.public, info=INFO)
    with pytest.raises(ProtocolError):
        import_private(raw[:-1])


# -- authenticated encryption ----------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=300), associated=st.binary(max_size=40))
def test_encrypt_decrypt_round_trip(plaintext: bytes, associated: bytes) -> None:
    key = os.urandom(32)
    ciphertext = encrypt(key, plaintext, associated_data=associated)
    assert len(ciphertext) == 12 + len(plaintext) + 16
    assert decrypt(key, ciphertext, associated_data=associated) == plaintext


def test_encryption_uses_a_fresh_nonce() -> None:
    key = os.urandom(32)
    first = encrypt(key, b"same", associated_data=b"ad")
    second = encrypt(key, b"same", associated_data=b"ad")
    assert first[:12] != second[:12]
    assert first != second


def test_any_tampered_byte_is_rejected() -> None:
    key = os.urandom(32)
    ciphertext = encrypt(key, b"share of a seed", associated_data=b"u->v round 3")
    for i in range(len(ciphertext)):
        tampered = bytearray(ciphertext)
        tampered[i] ^= 0x01
        with pytest.raises(ProtocolError, match="decryption failed"):
            decrypt(key, bytes(tampered), associated_data=b"u->v round 3")


def test_wrong_associated_data_key_or_length_is_rejected() -> None:
    key = os.urandom(32)
    ciphertext = encrypt(key, b"payload", associated_data=b"round 3")
    with pytest.raises(ProtocolError):
        decrypt(key, ciphertext, associated_data=b"round 4")
    with pytest.raises(ProtocolError):
        decrypt(os.urandom(32), ciphertext, associated_data=b"round 3")
    with pytest.raises(ProtocolError, match="shorter"):
        decrypt(key, ciphertext[:27], associated_data=b"round 3")
    with pytest.raises(ValueError):
        encrypt(key[:16], b"payload", associated_data=b"")


# -- the mask PRG ----------------------------------------------------------------------


def test_expand_mask_is_aes_256_ctr_from_counter_zero() -> None:
    length = 37
    counters = b"".join(i.to_bytes(16, "big") for i in range(-(-length * 8 // 16)))
    ecb = Cipher(algorithms.AES(FIXED_SEED), modes.ECB()).encryptor()
    keystream = ecb.update(counters) + ecb.finalize()
    reference = np.frombuffer(keystream[: 8 * length], dtype="<u8").astype(np.uint64)
    np.testing.assert_array_equal(expand_mask(FIXED_SEED, length, 64), reference)
    np.testing.assert_array_equal(
        expand_mask(FIXED_SEED, length, 40), reference & np.uint64(2**40 - 1)
    )


def test_expand_mask_is_deterministic_per_seed_and_seeds_differ() -> None:
    seed = random_seed()
    assert len(seed) == 32
    first = expand_mask(seed, 1000, 62)
    np.testing.assert_array_equal(first, expand_mask(seed, 1000, 62))
    other = expand_mask(random_seed(), 1000, 62)
    assert np.count_nonzero(first == other) < 5  # equal w.p. 2**-62 each
    # a prefix is a prefix: the stream does not depend on the length asked for
    np.testing.assert_array_equal(expand_mask(seed, 10, 62), first[:10])


@pytest.mark.parametrize("bits", [1, 2, 8, 31, 32, 33, 52, 62, 63, 64])
def test_expand_mask_values_are_in_range(bits: int) -> None:
    mask = expand_mask(FIXED_SEED, 20_000, bits)
    assert mask.dtype == np.uint64
    assert mask.shape == (20_000,)
    assert mask.flags.writeable
    top = np.uint64(2**bits - 1)
    assert int(mask.max()) <= int(top)
    # and the top bit is used: the range is not accidentally narrower
    assert int(mask.max()) >= 2 ** (bits - 1)


def test_expand_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        expand_mask(bytes(16), 10, 62)
    with pytest.raises(ValueError):
        expand_mask(FIXED_SEED, -1, 62)
    with pytest.raises(ValueError):
        expand_mask(FIXED_SEED, 10, 65)
    with pytest.raises(ValueError):
        expand_mask(FIXED_SEED, 10, 0)
    assert expand_mask(FIXED_SEED, 0, 62).shape == (0,)


@pytest.mark.parametrize("seed", [FIXED_SEED, b"\xff" * 32], ids=["counting", "ones"])
def test_expand_mask_top_bits_pass_chi_square(seed: bytes) -> None:
    bits = 62
    values = expand_mask(seed, 1_000_000, bits)
    buckets = (values >> np.uint64(bits - 8)).astype(np.int64)
    counts = np.bincount(buckets, minlength=256)
    assert counts.shape == (256,)
    _, p_value = stats.chisquare(counts)
    assert p_value > 1e-6, p_value
    # the low bits too (a PRG that only scrambled the top would fail here)
    low = np.bincount((values & np.uint64(255)).astype(np.int64), minlength=256)
    assert stats.chisquare(low)[1] > 1e-6


def test_expand_mask_chi_square_catches_a_biased_generator() -> None:
    # the test above can fail: a mask whose top byte avoids one value is caught
    values = expand_mask(FIXED_SEED, 1_000_000, 62)
    buckets = (values >> np.uint64(54)).astype(np.int64)
    buckets[buckets == 0] = 1
    assert stats.chisquare(np.bincount(buckets, minlength=256))[1] < 1e-6


def test_expand_mask_bits_are_balanced() -> None:
    bits = 62
    values = expand_mask(FIXED_SEED, 1_000_000, bits)
    ones = (
        np.array([np.count_nonzero(values & np.uint64(1 << k)) for k in range(bits)])
        / values.size
    )
    # 5 sigma for a fair coin over 10**6 draws: 5 * 0.5 / 1000
    assert np.all(np.abs(ones - 0.5) < 0.0025), ones
    assert np.count_nonzero(values >> np.uint64(bits)) == 0


def test_expand_mask_of_a_million_values_is_fast() -> None:
    seed = random_seed()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        expand_mask(seed, 1_000_000, 62)
        best = min(best, time.perf_counter() - start)
    assert best < 0.1, f"{best:.4f} s"  # measured ~0.01 s


# -- signatures ------------------------------------------------------------------------


def test_signature_verifies_and_any_flipped_bit_fails() -> None:
    key = generate_signing_key()
    message = b"round 3: survivors 1,2,5"
    signature = sign(key, message)
    assert len(signature) == 64
    assert len(key.public) == 32
    verify(key.public, message, signature)
    verify(key.private.public_key(), message, signature)
    assert sign(key.private, message) == signature  # Ed25519 is deterministic
    for i in range(len(message) * 8):
        flipped = bytearray(message)
        flipped[i // 8] ^= 1 << (i % 8)
        with pytest.raises(ProtocolError, match="signature"):
            verify(key.public, bytes(flipped), signature)
    for i in (0, 31, 32, 63):
        flipped = bytearray(signature)
        flipped[i] ^= 0x80
        with pytest.raises(ProtocolError, match="signature"):
            verify(key.public, message, bytes(flipped))


def test_signature_from_another_key_or_malformed_key_fails() -> None:
    key, other = generate_signing_key(), generate_signing_key()
    signature = sign(key, b"m")
    with pytest.raises(ProtocolError):
        verify(other.public, b"m", signature)
    with pytest.raises(ProtocolError):
        verify(key.public[:31], b"m", signature)
    with pytest.raises(ProtocolError):
        verify(key.public, b"m", signature[:63])


@pytest.mark.parametrize("bits", [1, 33, 62, 64])
def test_expanding_into_a_reused_buffer_gives_the_same_mask(bits: int) -> None:
    seed_a, seed_b = bytes(range(32)), bytes(range(1, 33))
    out = np.empty(1000, dtype=np.uint64)
    assert expand_mask(seed_a, 1000, bits, out=out) is out
    np.testing.assert_array_equal(out, expand_mask(seed_a, 1000, bits))
    expand_mask(seed_b, 1000, bits, out=out)  # the buffer is reused
    np.testing.assert_array_equal(out, expand_mask(seed_b, 1000, bits))
    with pytest.raises(ValueError, match="out must be"):
        expand_mask(seed_a, 1000, bits, out=np.empty(999, dtype=np.uint64))


@pytest.mark.parametrize("bits", [1, 7, 32, 36, 63, 64])
def test_add_mask_accumulates_the_masks_mod_2_to_the_b(bits: int) -> None:
    # Masks added as full 64-bit words and reduced once at the end equal the
    # b-bit masks added and subtracted one by one in Python integers.
    length = 1_001
    seeds = [random_seed() for _ in range(4)]
    start = np.random.default_rng(bits).integers(0, 2**63, length, dtype=np.uint64)
    total = start.copy()
    expected = [int(v) for v in start]
    for i, seed in enumerate(seeds):
        subtract = i % 2 == 1
        assert add_mask(seed, total, subtract=subtract) is total
        mask = expand_mask(seed, length, bits)
        sign = -1 if subtract else 1
        expected = [e + sign * int(m) for e, m in zip(expected, mask, strict=True)]
    reduced = total & np.uint64(2**bits - 1) if bits < 64 else total
    np.testing.assert_array_equal(
        reduced, np.array([e % 2**bits for e in expected], dtype=np.uint64)
    )


def test_add_mask_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        add_mask(bytes(16), np.zeros(4, dtype=np.uint64))
    with pytest.raises(ValueError, match="uint64"):
        add_mask(FIXED_SEED, np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="uint64"):
        add_mask(FIXED_SEED, np.zeros((2, 2), dtype=np.uint64))
    with pytest.raises(ValueError, match="uint64"):
        add_mask(FIXED_SEED, np.zeros(8, dtype=np.uint64)[::2])
    empty = np.zeros(0, dtype=np.uint64)
    assert add_mask(FIXED_SEED, empty).shape == (0,)
