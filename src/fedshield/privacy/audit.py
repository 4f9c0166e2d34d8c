"""The ε lower bound of a one-run privacy audit (Steinke, Nasr, Jagielski 2023).

The game: ``m`` canaries, each included in training by a fair coin; after
one training run an auditor scores every canary and guesses "in" or "out"
for the ``r`` it is most sure of, abstaining on the rest; ``v`` guesses are
right. If the training is (ε, δ)-DP, the number of right guesses is
dominated by a binomial with success probability ``q(ε) = e^ε / (1 + e^ε)``
(randomised response's accuracy), up to a term in ``δ``:

    P[W >= v] <= f(v) + 2 m δ · max_{1 <= i <= v} (f(v - i) - f(v)) / i,
    f(u) = P[Bin(r, q(ε)) >= u].

:func:`one_run_epsilon_lower_bound` returns the largest ε the observed
``v`` rules out at confidence ``1 - beta``: with that confidence the run is
not (ε', δ)-DP for any ε' below it. The number of guesses ``r`` must be
fixed before the guesses are scored (choosing it after seeing which were
right is data snooping); :func:`bonferroni` splits ``beta`` over several
pre-registered choices.

The binomial tails come from SciPy; the root is found by bracketing and
Brent's method.
"""

from __future__ import annotations

import math

from fedshield.errors import ConfigError

__all__ = ["bonferroni", "one_run_epsilon_lower_bound", "one_run_p_value"]


def _check(m: int, r: int, v: int, delta: float, beta: float) -> None:
    for name, value in (("m", m), ("r", r), ("v", v)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{name} must be an integer >= 0; got {value!r}")
    if m < 1:
        raise ConfigError("an audit needs at least one canary (m >= 1)")
    if r > m:
        raise ConfigError(f"r = {r} guesses for m = {m} canaries: at most one each")
    if v > r:
        raise ConfigError(f"v = {v} right guesses of r = {r}: v <= r")
    if not 0 < beta < 1:
        raise ConfigError(f"beta (1 - confidence) must be in (0, 1); got {beta!r}")
    if not 0 <= delta < 1:
        raise ConfigError(f"delta must be in [0, 1); got {delta!r}")
    if 2 * m * delta >= 1:
        raise ConfigError(
            f"delta = {delta:g} is too large for m = {m} canaries: the bound's "
            f"delta term carries 2·m·delta = {2 * m * delta:.3g} >= 1, which "
            "leaves the audit nothing to certify; use fewer canaries or a "
            "smaller delta (keep 2·m·delta well below beta)"
        )


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """``P[W >= v]``'s bound for an (ε, δ)-DP run: the audit's p-value at ε."""
    from scipy.stats import binom

    if v == 0:
        return 1.0
    q = 1.0 / (1.0 + math.exp(-epsilon))  # e^ε / (1 + e^ε), overflow-free
    # f(u) = P[Bin(r, q) >= u] = sf(u - 1)
    f_v = float(binom.sf(v - 1, r, q))
    if delta == 0:
        return min(1.0, f_v)
    worst = 0.0
    for i in range(1, v + 1):
        f_lower = float(binom.sf(v - i - 1, r, q)) if v - i > 0 else 1.0
        worst = max(worst, (f_lower - f_v) / i)
    return min(1.0, f_v + 2 * m * delta * worst)


def one_run_epsilon_lower_bound(
    m: int, r: int, v: int, *, delta: float = 0.0, beta: float = 0.05
) -> float:
    """The ε a one-run audit certifies at confidence ``1 - beta`` (0: none).

    ``m`` canaries, ``r`` guesses (fixed in advance), ``v`` of them right,
    for a run claimed (ε, ``delta``)-DP.

    Raises
    ------
    ConfigError
        For impossible counts, or a ``delta`` too large for ``m`` canaries
        (``2·m·delta >= 1``: nothing could be certified). A result of 0
        means the guesses certify nothing at this confidence.

    Examples
    --------
    >>> round(one_run_epsilon_lower_bound(1000, 100, 100), 4)
    3.493
    """
    _check(m, r, v, delta, beta)
    from scipy.optimize import brentq

    def excess(epsilon: float) -> float:
        return one_run_p_value(m, r, v, epsilon, delta) - beta

    if excess(0.0) >= 0:
        return 0.0
    high = 1.0
    while excess(high) < 0:
        high *= 2
        if high > 1e3:  # every ε is ruled out: only a broken count gets here
            return math.inf
    return float(brentq(excess, 0.0, high, xtol=1e-10, rtol=1e-12))


def bonferroni(beta: float, choices: int) -> float:
    """``beta`` for each of ``choices`` pre-registered guess counts."""
    if isinstance(choices, bool) or not isinstance(choices, int) or choices < 1:
        raise ConfigError(f"choices must be an integer >= 1; got {choices!r}")
    return beta / choices
