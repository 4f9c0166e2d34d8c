"""Secure aggregation: the server learns the sum of the client vectors, nothing more.

This package implements the building blocks of the secure aggregation
protocol of Bonawitz et al., "Practical Secure Aggregation for
Privacy-Preserving Machine Learning" (CCS 2017). Each client adds pairwise
masks (which cancel in the sum) and a self mask (removed by the server once
enough clients have revealed their shares of it) to its encoded update, so the
server sees only uniformly random vectors until it holds the sum.

Modules
-------
:mod:`fedshield.secagg.crypto`
    X25519 key agreement with HKDF, AES-GCM authenticated encryption, Ed25519
    signatures, and the AES-CTR pseudorandom generator that expands a 32-byte
    seed into a mask. All of it is the ``cryptography`` package; nothing here
    is home-made except Shamir sharing.
:mod:`fedshield.secagg.shamir`
    Shamir secret sharing over GF(2**130 - 5), with Lagrange coefficients
    precomputed once per set of surviving clients.
:mod:`fedshield.secagg.encoding`
    Fixed-point encoding of float updates into integers mod ``2**b`` with
    unbiased stochastic rounding and counted (never silent) clipping, and the
    modular arithmetic the masks live in.
:mod:`fedshield.secagg.protocol`
    The client and server state machines that drive the rounds.

This layer depends on numpy, the standard library and ``cryptography`` only;
it never imports torch. The modules are imported explicitly
(``from fedshield.secagg import shamir``); this file imports none of them.
"""
