"""The distributed discrete Gaussian's accounting against independent numbers.

The bound (:func:`fedshield.privacy.accounting.ddg_rdp`) must hold for the
exact Rényi divergence of a sum of discrete Gaussians, computed here by
convolving their probability mass functions; for large noise it must agree
with ``dp-accounting``'s Gaussian mechanism.
"""

from __future__ import annotations

import dataclasses
import json
import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedshield.errors import ConfigError, UnsupportedEventError
from fedshield.privacy.accounting import (
    DpEventSpec,
    PrivacyLedger,
    ddg_rdp,
    ddg_tau,
    epsilon,
)

SUPPORT = 40  # each client's noise, truncated at +-40: mass beyond is < 1e-300


def _sum_pmf(sigma: float, n: int) -> np.ndarray:
    k = np.arange(-SUPPORT, SUPPORT + 1, dtype=np.float64)
    one = np.exp(-(k**2) / (2 * sigma**2))
    one /= one.sum()
    out = one
    for _ in range(n - 1):
        out = np.convolve(out, one)
    return out


def _shift(p: np.ndarray, by: int) -> np.ndarray:
    q = np.zeros_like(p)
    if by >= 0:
        q[by:] = p[: p.size - by]
    else:
        q[:by] = p[-by:]
    return q


def _exact_rdp(p: np.ndarray, q: np.ndarray, alpha: float) -> float:
    """D_alpha(p || q) over the points where both are representable."""
    both = (p > 1e-280) & (q > 1e-280)
    logs = alpha * np.log(p[both]) + (1 - alpha) * np.log(q[both])
    top = logs.max()
    return float((top + math.log(np.exp(logs - top).sum())) / (alpha - 1))


GRID = [
    (sigma, n, shift, alpha)
    for sigma in (0.5, 0.6, 0.8, 1.0, 1.5)
    for n in (1, 2, 3, 5, 8)
    for shift in (1, 2, 3)
    for alpha in (1.5, 2.0, 5.0, 20.0)
]


def test_bound_holds_for_the_exact_divergence_of_small_sums():
    worse_than_gaussian = 0
    for sigma, n, shift, alpha in GRID:
        p = _sum_pmf(sigma, n)
        exact = max(
            _exact_rdp(p, _shift(p, shift), alpha),
            _exact_rdp(p, _shift(p, -shift), alpha),
        )
        bound = ddg_rdp(
            [alpha],
            num_clients=n,
            noise_std_per_client=sigma,
            l2_sensitivity=shift,
            dimension=1,
        )[0]
        assert exact <= bound * (1 + 1e-9), (sigma, n, shift, alpha, exact, bound)
        gaussian = alpha * shift**2 / (2 * n * sigma**2)
        worse_than_gaussian += exact > gaussian * (1 + 1e-6)
    # The grid holds sums whose divergence exceeds the Gaussian approximation's,
    # so a bound without tau would fail the assertion above.
    assert worse_than_gaussian >= 3


@pytest.mark.parametrize("shift", [(1, 1), (2, 1), (1, 0)])
def test_bound_holds_in_two_dimensions(shift):
    sigma, n, alpha = 0.55, 4, 3.0
    p = _sum_pmf(sigma, n)
    # Independent coordinates: the divergence of the product is the sum.
    exact = sum(_exact_rdp(p, _shift(p, s), alpha) for s in shift)
    bound = ddg_rdp(
        [alpha],
        num_clients=n,
        noise_std_per_client=sigma,
        l2_sensitivity=math.hypot(*shift),
        dimension=2,
    )[0]
    assert exact <= bound


def test_tau_is_zero_for_one_client_and_vanishes_with_noise():
    assert ddg_tau(1, 0.5) == 0.0
    assert ddg_tau(100, 5.0) < 1e-100
    assert ddg_tau(3, 0.5) == pytest.approx(
        10 * (math.exp(-(math.pi**2) * 0.25) + math.exp(-2 * math.pi**2 * 0.25 * 2 / 3))
    )


@pytest.mark.parametrize("rounds", [1, 30])
def test_large_noise_matches_dp_accounting_gaussian(rounds):
    spec = DpEventSpec.distributed_discrete_gaussian(
        num_clients=10,
        noise_std_per_client=2.0e4,
        l2_sensitivity=5.0e4,
        dimension=8192,
        count=rounds,
    )
    reference = rdp.RdpAccountant()
    event = dp_accounting.GaussianDpEvent(math.sqrt(10) * 2.0e4 / 5.0e4)
    reference.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    assert epsilon([spec], 1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_small_noise_costs_more_than_its_gaussian_approximation():
    spec = DpEventSpec.distributed_discrete_gaussian(
        num_clients=20, noise_std_per_client=0.6, l2_sensitivity=3.0, dimension=100
    )
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.GaussianDpEvent(spec.noise_multiplier))
    assert epsilon([spec], 1e-5) > 2 * reference.get_epsilon(1e-5)


def test_ledger_composes_rounds_and_survives_json():
    ledger = PrivacyLedger("pld", 1e-5)
    for round_idx, n in enumerate([10, 9, 10, 8]):
        ledger.record(
            round_idx,
            DpEventSpec.distributed_discrete_gaussian(
                num_clients=n,
                noise_std_per_client=3.0,
                l2_sensitivity=12.0,
                dimension=64,
            ),
        )
    restored = PrivacyLedger.from_json(json.loads(json.dumps(ledger.to_json())))
    assert restored.epsilon() == ledger.epsilon() > 0
    orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    curve = sum(
        ddg_rdp(
            orders,
            num_clients=n,
            noise_std_per_client=3.0,
            l2_sensitivity=12.0,
            dimension=64,
        )
        for n in [10, 9, 10, 8]
    )
    expected, _ = rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, 1e-5)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-12)


def test_distributed_events_are_refused_where_they_do_not_apply():
    ddg = DpEventSpec.distributed_discrete_gaussian(
        num_clients=5, noise_std_per_client=2.0, l2_sensitivity=4.0, dimension=8
    )
    with pytest.raises(UnsupportedEventError, match="own ledger"):
        epsilon([ddg, DpEventSpec(1.0)], 1e-5)
    with pytest.raises(UnsupportedEventError, match="epsilon"):
        ddg.to_dp_event()
    with pytest.raises(ConfigError, match="amplification"):
        DpEventSpec.distributed_discrete_gaussian(
            num_clients=5,
            noise_std_per_client=2.0,
            l2_sensitivity=4.0,
            dimension=8,
            sampling="poisson",
            sampling_rate=0.1,
        )
    with pytest.raises(ConfigError, match="1/2"):
        DpEventSpec.distributed_discrete_gaussian(
            num_clients=5, noise_std_per_client=0.4, l2_sensitivity=4.0, dimension=8
        )


def test_worst_epsilon_is_the_largest_of_each_partys_composition():
    from fedshield.privacy.accounting import ddg_worst_epsilon

    events = [
        DpEventSpec.distributed_discrete_gaussian(
            num_clients=n, noise_std_per_client=2.0, l2_sensitivity=6.0, dimension=16
        )
        for n in (5, 8, 12)
    ]
    counts = np.array([[1, 0, 2], [3, 1, 0], [0, 0, 0], [3, 1, 0]])
    each = [
        epsilon(
            [
                dataclasses.replace(e, count=int(c))
                for e, c in zip(events, row, strict=True)
                if c
            ],
            1e-5,
        )
        for row in counts
        if row.any()
    ]
    assert ddg_worst_epsilon(events, counts, 1e-5) == pytest.approx(
        max(each), rel=1e-12
    )
    assert ddg_worst_epsilon(events, np.zeros((2, 3)), 1e-5) == 0.0
    with pytest.raises(ConfigError, match="events"):
        ddg_worst_epsilon(events, np.ones((2, 2)), 1e-5)
