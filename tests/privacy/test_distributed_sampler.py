"""The discrete Gaussian sampler is exact (issue 11, item 8).

The old sampler ran Canonne, Kamath and Steinke's algorithm in floating
point on 52-bit uniforms: about ``5.5 t 2^-52`` off in total variation per
geometric draw, far more than the ``2^-50`` per draw its docstring added to
δ. The sampler now decides each draw from an interval that contains the
exact value and, where the floats cannot decide, finishes it in exact
arithmetic with more random bits.
"""

from __future__ import annotations

import math
from decimal import Decimal, localcontext
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from fedshield.errors import ConfigError
from fedshield.privacy import distributed as ddg


def _bytes(seed: int):  # type: ignore[no-untyped-def]
    return np.random.default_rng(seed).bytes


class Script:
    """random_bytes that returns given bytes first, then a seeded stream's."""

    def __init__(self, first: bytes, seed: int = 0) -> None:
        self.first, self.rest, self.used = first, _bytes(seed), 0

    def __call__(self, n: int) -> bytes:
        self.used += n
        head, self.first = self.first[:n], self.first[n:]
        return head + self.rest(n - len(head))


def _word(cell: int) -> bytes:
    return (cell << 12).to_bytes(8, "little")


def _exact_geometric(u: Fraction, t: int) -> int:
    with localcontext() as ctx:
        ctx.prec = 80
        value = -(Decimal(u.numerator) / Decimal(u.denominator)).ln() * t
    return math.floor(value)


@pytest.mark.parametrize("fill", [0x00, 0xFF])
def test_a_cell_that_straddles_a_geometric_step_is_finished_with_more_bits(fill):
    # sigma 1.5: t = 2. The 52-bit cell k holds exp(-7/2), where G1 = ⌊2 E1⌋
    # steps from 6 to 7: the floats cannot tell which, the next bits can.
    sigma, t, j = 1.5, 2, 7
    k = math.floor(math.exp(-j / t) * 2**52)
    low, high = Fraction(k, 2**52), Fraction(k + 1, 2**52)
    assert _exact_geometric(high, t) == j - 1 and _exact_geometric(low, t) == j
    g2_cell = 2**51  # U2 near 1/2: G2 = ⌊2 ln 2⌋ = 1, far from a step
    # U3 in the first cell: E3 > 36 accepts any small Y.
    script = Script(_word(k) + _word(g2_cell) + _word(0) + bytes([fill]) * 8)

    draw = int(ddg.discrete_gaussian(1, sigma, script)[0])

    bits = 52 + 64
    refined = k * 2**64 + (0 if fill == 0 else 2**64 - 1)
    u1 = Fraction(refined, 2**bits)
    assert draw == _exact_geometric(u1, t) - 1
    assert draw == (j - 1 if fill == 0 else j - 2)


@pytest.mark.parametrize("sigma", [0.5, 1.5, 37.2, 1190.0, 2.0**31])
def test_the_fast_path_agrees_with_exact_arithmetic(sigma):
    # Every attempt the floats decide is decided the same way by the exact
    # path from the same cells: the float margins are never too thin.
    rng = np.random.default_rng(int(sigma * 10) % 2**32)
    t = math.floor(sigma) + 1
    cells = rng.integers(1, 2**52, size=(300, 3), dtype=np.uint64)
    for c1, c2, c3 in cells.tolist():
        script = Script(b"".join(_word(c) for c in (c1, c2, c3)))
        fast = ddg.discrete_gaussian(1, sigma, script)
        y, accepted = ddg._exact_attempt((c1, c2, c3), t, sigma, _bytes(1))
        if accepted:  # the first attempt's draw
            assert int(fast[0]) == y
        else:  # the first attempt was rejected: a second one drew more bytes
            assert script.used > 24


def test_the_exact_path_alone_samples_the_discrete_gaussian(monkeypatch):
    # Margins so wide that the floats decide almost nothing: the draws go
    # through the exact path, whose distribution must be N_Z(0, sigma^2).
    monkeypatch.setattr(ddg, "_REACH", 1.0)
    exact, attempts = ddg._exact_attempt, []

    def counting(*args):  # type: ignore[no-untyped-def]
        attempts.append(exact(*args))
        return attempts[-1]

    monkeypatch.setattr(ddg, "_exact_attempt", counting)
    sigma = 1.5
    draws = ddg.discrete_gaussian(6_000, sigma, _bytes(7))
    assert sum(accepted for _, accepted in attempts) >= 0.9 * draws.size
    support = np.arange(-8, 9)
    pmf = np.exp(-(support.astype(float) ** 2) / (2 * sigma**2))
    pmf /= pmf.sum()
    observed = np.array([np.count_nonzero(draws == k) for k in support])
    assert observed.sum() == draws.size
    assert stats.chisquare(observed, pmf * draws.size).pvalue > 1e-3


def test_numpys_log_is_within_the_error_the_fast_path_assumes():
    rng = np.random.default_rng(0)
    cells = np.concatenate(
        [
            rng.integers(1, 2**52, size=4000, dtype=np.uint64),
            np.arange(1, 200, dtype=np.uint64),
            2**52 - np.arange(1, 200, dtype=np.uint64),
            (2 ** rng.uniform(0, 52, size=2000)).astype(np.uint64),
        ]
    )
    log_u, _ = ddg._log_midpoints(cells)
    worst = 0.0
    with localcontext() as ctx:
        ctx.prec = 50
        for cell, value in zip(cells.tolist(), log_u.tolist(), strict=True):
            exact = ((Decimal(cell) + Decimal("0.5")) / Decimal(2**52)).ln()
            worst = max(worst, abs(float((Decimal(value) - exact) / exact)))
    # 4 ulp is numpy's documented worst; the fast path allows 16 times that.
    assert worst <= ddg.LOG_RELATIVE_ERROR / 16


def test_large_sigma_stays_fast_and_right():
    draws = ddg.discrete_gaussian(200_000, ddg.MAX_SIGMA, _bytes(9))
    assert abs(draws.mean()) < 5 * ddg.MAX_SIGMA / math.sqrt(draws.size)
    assert draws.std() == pytest.approx(ddg.MAX_SIGMA, rel=0.01)


def test_a_source_of_zeros_is_refused_rather_than_looped_on():
    # Zeros put every uniform in the first cell forever: no exact answer.
    with pytest.raises(ConfigError, match="not return uniform random bytes"):
        ddg.discrete_gaussian(1, 1.5, lambda n: bytes(n))
