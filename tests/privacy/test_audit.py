"""The one-run audit's ε lower bound against independently worked values.

The reference values are ../shared/PRIVACY-EVAL.md §2.6 (exact binomial
arithmetic, computed outside this code), and a direct check of the pure-DP
case: with every guess right, p = q(ε)^r, so ε_lb solves q^r = β in closed
form.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedshield.errors import ConfigError
from fedshield.privacy.audit import (
    bonferroni,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)

REFERENCE = [
    # m, r, v, delta, eps_lb at 95 %, at 99 %
    (1000, 100, 100, 0.0, 3.4930, 3.0549),
    (1000, 100, 100, 1e-5, 3.4654, 2.9892),
    (1000, 100, 90, 1e-5, 1.6261, 1.4273),
    (1000, 100, 75, 1e-5, 0.6995, 0.5471),
    (1000, 200, 150, 1e-5, 0.8200, 0.7113),
    (1000, 1000, 600, 1e-5, 0.2972, 0.2531),
    (1000, 1000, 550, 1e-5, 0.0940, 0.0503),
    (1000, 50, 30, 1e-5, 0.0, 0.0),
    (10000, 1000, 1000, 1e-5, 5.5293, 4.2763),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "at95", "at99"), REFERENCE)
def test_matches_the_worked_values(m, r, v, delta, at95, at99):
    got95 = one_run_epsilon_lower_bound(m, r, v, delta=delta, beta=0.05)
    got99 = one_run_epsilon_lower_bound(m, r, v, delta=delta, beta=0.01)
    assert got95 == pytest.approx(at95, abs=1e-3)
    assert got99 == pytest.approx(at99, abs=1e-3)


def test_all_correct_pure_dp_has_a_closed_form():
    # q(ε)^r = β  ⇔  ε = logit(β^(1/r))
    for r in (10, 100, 500):
        q = 0.05 ** (1 / r)
        want = math.log(q / (1 - q))
        assert one_run_epsilon_lower_bound(10_000, r, r) == pytest.approx(want, 1e-6)


def test_the_bound_is_sound_for_randomised_response():
    # An ε-DP mechanism (randomised response on each canary's bit): the
    # certified ε stays below ε at 95 % confidence (checked on 200 runs).
    rng = np.random.default_rng(0)
    epsilon, m = 1.0, 1000
    q = math.exp(epsilon) / (1 + math.exp(epsilon))
    above = 0
    for _ in range(200):
        v = int(rng.binomial(m, q))
        if one_run_epsilon_lower_bound(m, m, v) > epsilon:
            above += 1
    assert above <= 200 * 0.05 + 6  # at most beta of the time, plus slack


def test_p_value_grows_with_epsilon():
    values = [one_run_p_value(1000, 100, 90, e, 1e-5) for e in (0, 0.5, 1, 2, 4)]
    assert values == sorted(values)


def test_bad_input_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="too large for m"):
        one_run_epsilon_lower_bound(10_000, 100, 100, delta=1e-4)
    with pytest.raises(ConfigError, match="v <= r"):
        one_run_epsilon_lower_bound(100, 10, 11)
    with pytest.raises(ConfigError, match="at most one each"):
        one_run_epsilon_lower_bound(10, 11, 1)
    with pytest.raises(ConfigError, match="at least one canary"):
        one_run_epsilon_lower_bound(0, 0, 0)
    assert bonferroni(0.05, 5) == pytest.approx(0.01)
