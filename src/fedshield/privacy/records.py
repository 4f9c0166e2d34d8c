"""Record-level DP-SGD inside each client: the round options and its DP event.

The strategy asks each client to train with DP-SGD (Abadi et al., CCS 2016)
through :class:`~fedshield.core.FitConfig` options (the keys below); the
client runs it (``fedshield.models.dp_sgd``) and the server accounts each
client's own data from the same rule, :func:`record_level_event`: Poisson
sampling of records at rate ``q = min(1, batch_size / n)``, ``round(1/q)``
steps per epoch, the Gaussian mechanism with multiplier ``σ`` at each step,
accounted under replace-one neighbours (the record count ``n`` is public)
by the PLD accountant.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from fedshield.errors import ConfigError

if TYPE_CHECKING:  # the accountant (dp-accounting) loads only when used
    from fedshield.privacy.accounting import DpEventSpec

__all__ = [
    "DP_SGD_CLIP",
    "DP_SGD_SECURE",
    "DP_SGD_SIGMA",
    "dp_sgd_rate",
    "record_level_event",
    "wants_dp_sgd",
]

DP_SGD_CLIP = "dp_sgd/clip_norm"
"""FitConfig option: the per-record gradient clip norm ``C``."""
DP_SGD_SIGMA = "dp_sgd/noise_multiplier"
"""FitConfig option: ``σ``; the noise std on the clipped sum is ``σ·C``."""
DP_SGD_SECURE = "dp_sgd/secure_rng"
"""FitConfig option: draw the noise from the OS's cryptographic randomness."""


def wants_dp_sgd(options: Mapping[str, object]) -> bool:
    """Whether a round's options ask the client to train with DP-SGD."""
    return DP_SGD_CLIP in options


def dp_sgd_rate(num_records: int, batch_size: int) -> tuple[float, int]:
    """``(q, steps per epoch)`` of DP-SGD over ``num_records`` records.

    Raises
    ------
    ConfigError
        If there are no records or ``batch_size`` < 1.

    Examples
    --------
    >>> dp_sgd_rate(1000, 32)
    (0.032, 31)
    >>> dp_sgd_rate(10, 32)
    (1.0, 1)
    """
    if num_records < 1 or batch_size < 1:
        raise ConfigError(
            f"DP-SGD needs >= 1 record and batch_size >= 1; got {num_records} "
            f"records and batch_size {batch_size}"
        )
    rate = min(1.0, batch_size / num_records)
    return rate, max(1, round(1.0 / rate))


def record_level_event(
    num_records: int,
    *,
    batch_size: int,
    epochs: int,
    noise_multiplier: float,
    rounds: int = 1,
) -> DpEventSpec:
    """The DP event of ``rounds`` rounds of a client's DP-SGD on its records.

    Examples
    --------
    >>> e = record_level_event(1000, batch_size=32, epochs=2, noise_multiplier=1.0)
    >>> e.sampling, e.sampling_rate, e.count, e.is_replace_one
    ('poisson', 0.032, 62, True)

    The event is accounted under replace-one neighbours: ``n`` is public
    (FedAvg's weight; it sets ``q`` and the steps), so neighbouring data sets
    differ in one record replaced, not one added or removed. Only the PLD
    accountant accounts it.
    """
    from fedshield.privacy.accounting import DpEventSpec

    rate, steps = dp_sgd_rate(num_records, batch_size)
    return DpEventSpec(
        noise_multiplier=noise_multiplier,
        sampling="poisson",
        sampling_rate=rate,
        count=steps * epochs * rounds,
        replace_one=True,
    )
