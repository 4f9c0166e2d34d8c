"""The one-run audit against the Gaussian release fedshield's DP adds.

Mechanism level (the full `fedshield audit` on a training run is issue 15's
next piece): m = 1,000 Dirac canaries (canary i is C in coordinate i, so
none interferes with another), each included by a fair coin; one release
of their sum with the project's Gaussian noise of std z·C; the auditor
guesses "in" for the 100 highest coordinates (fixed in advance). The
certified ε must never exceed the accountant's ε for that release, and a
mechanism that claims noise it does not add must be caught: certified ε
above the claim.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.privacy.accounting import DpEventSpec, PrivacyLedger
from fedshield.privacy.audit import one_run_epsilon_lower_bound
from fedshield.privacy.noise import SeededGaussian

M, GUESSES, DELTA, C = 1000, 100, 1e-5, 1.0


def _claimed(z: float) -> float:
    ledger = PrivacyLedger(accountant="pld", delta=DELTA)
    ledger.record(0, DpEventSpec(noise_multiplier=z, sampling="none"))
    return ledger.epsilon()


def _audit(noise_std: float, seed: int) -> float:
    rng = np.random.default_rng(seed)
    included = rng.integers(0, 2, M).astype(bool)
    release = np.where(included, C, 0.0)
    if noise_std > 0:
        release = release + SeededGaussian(rng).sample((M,), noise_std)
    top = np.argsort(-release, kind="stable")[:GUESSES]
    correct = int(included[top].sum())
    return one_run_epsilon_lower_bound(M, GUESSES, correct, delta=DELTA)


@pytest.mark.parametrize("z", [0.6, 1.0, 2.0])
def test_the_certified_epsilon_never_exceeds_the_accountants(z):
    claimed = _claimed(z)
    for seed in range(5):
        assert _audit(z * C, seed) <= claimed


def test_epsilon_eight_is_certified_at_least_one():
    assert _claimed(0.6) == pytest.approx(8.0, abs=0.05)
    assert min(_audit(0.6 * C, seed) for seed in range(5)) >= 1.0


def test_without_noise_1000_canaries_certify_at_least_three():
    assert _audit(0.0, 0) >= 3.0


def test_a_mechanism_that_claims_noise_it_does_not_add_is_caught():
    claimed = _claimed(3.0)  # what its accountant says
    assert claimed < 2
    assert _audit(0.0, 0) > claimed  # what the release shows
    assert _audit(3.0 * C, 0) <= claimed  # the honest one passes
