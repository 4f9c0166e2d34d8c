"""Distributed DP's client cost against SecAgg's plain encoding (make bench).

For each (n, d): one client's encoding of its update for secure aggregation,
timed in this process, median of several repeats:

* plain: what a SecAgg client does without distributed DP, the fixed-point
  encoding of ``[w Δ, w, count]`` (``fedshield.secagg.encoding.encode``,
  b chosen from n);
* distributed: clip, pad, randomized Hadamard rotation, conditional
  stochastic rounding, discrete Gaussian noise, mod 2^20
  (``fedshield.privacy.distributed.encode``), with the seeded generator and
  with ``os.urandom``.

It prints the time ratio and the masked vector's size (words × bits) of
each, since distributed DP pads d to a power of two but needs fewer bits.
Masking and the protocol's other stages cost the same per word either way.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
import pytest

from fedshield.privacy import distributed as ddg
from fedshield.secagg.encoding import choose_encoding, encode

CASES = [(100, 10_000), (1_000, 10_000), (100, 1_000_000), (1_000, 1_000_000)]


def _median_time(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@pytest.mark.bench
@pytest.mark.parametrize(("n", "d"), CASES)
def test_distributed_dp_client_cost(n: int, d: int) -> None:
    rng = np.random.default_rng(0)
    delta = rng.normal(size=d) * (0.5 / np.sqrt(d))
    repeats = 15 if d <= 10_000 else 5
    enc = choose_encoding(n, 1.0, precision_bits=24)
    values = np.concatenate([delta, [1.0, 0.0]])
    plain = _median_time(lambda: encode(values, enc, rng), repeats)

    dp = ddg.DistributedDp(clip_norm=0.5, noise_multiplier=1.0)
    params = dp.parameters(dimension=d, num_clients=n, threshold=(2 * n + 2) // 3)

    def distributed(random_bytes: ddg.RandomBytes) -> None:
        ddg.encode(
            delta,
            params,
            clip_norm=0.5,
            rotation_seed=1,
            random_bytes=random_bytes,
        )

    seeded = _median_time(lambda: distributed(rng.bytes), repeats)
    secure = _median_time(lambda: distributed(os.urandom), repeats)
    plain_bits = (d + 2) * enc.modulus_bits
    ddp_bits = params.padded * params.modulus_bits
    print(
        f"\nn={n:,} d={d:,}: plain encode {plain * 1000:.2f} ms "
        f"({d + 2:,} words x {enc.modulus_bits} bits); distributed DP "
        f"{seeded * 1000:.2f} ms seeded = {seeded / plain:.1f}x, "
        f"{secure * 1000:.2f} ms os.urandom = {secure / plain:.1f}x "
        f"({params.padded:,} words x {params.modulus_bits} bits = "
        f"{ddp_bits / plain_bits:.2f}x the plain masked vector); "
        f"sensitivity inflation {params.l2_sensitivity * params.gamma / 0.5 - 1:.2e}"
    )
    assert params.l2_sensitivity * params.gamma >= 0.5
