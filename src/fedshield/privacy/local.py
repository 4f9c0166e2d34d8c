"""Local differential privacy: a client privatises its own update before sending.

The client clips its update to L2 norm ``C`` and adds ``N(0, σ²C²)`` to every
coordinate (the Gaussian mechanism with sensitivity ``2C`` on the client's
whole data set: any two clipped updates differ by at most ``2C``). The
server, and anyone who sees the update on its way, sees only the noised
vector. The strategy asks for it through :class:`~fedshield.core.FitConfig`
options (the keys below), so it runs wherever the client runs.

The guarantee holds against the server, so nothing the server could know
may predict the noise: it is always drawn from
:class:`~fedshield.privacy.noise.SecureGaussian` (an AES-CTR keystream keyed
from ``os.urandom``), never from the client's generator, which a simulation
derives from the run's seed, and whatever ``secure_rng`` says. Nothing else
computed from the client's data leaves un-noised either: the client that
builds the update (:func:`fedshield.models.build_update`) reports
:data:`LOCAL_NUM_EXAMPLES` examples and no training metrics, and the
strategy weights every update equally.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedshield.core import Params
from fedshield.errors import ConfigError

__all__ = [
    "LOCAL_CLIP",
    "LOCAL_NUM_EXAMPLES",
    "LOCAL_SIGMA",
    "privatize",
    "wants_local_dp",
]

LOCAL_CLIP = "local_dp/clip_norm"
"""FitConfig option: the L2 clip norm ``C`` of the update."""
LOCAL_SIGMA = "local_dp/noise_multiplier"
"""FitConfig option: ``σ``; the noise std is ``σ·C``."""
LOCAL_NUM_EXAMPLES = 1
"""The example count a local-DP update reports (the true one would be un-noised)."""


def wants_local_dp(options: Mapping[str, object]) -> bool:
    """Whether a round's options ask the client to privatise its update."""
    return LOCAL_CLIP in options


def privatize(delta: Params, options: Mapping[str, object]) -> Params:
    """Clip ``delta`` to ``C`` and add Gaussian noise of std ``σC``.

    A ``delta`` with a NaN or infinite value (local training diverged) is
    taken as the zero update, clipped and noised like any other: whether
    training diverged depends on the client's data, so it must not show
    (an all-NaN vector, which the server would reject by name).

    The noise comes from a fresh
    :class:`~fedshield.privacy.noise.SecureGaussian`: two calls never draw
    the same noise, whatever the run's seed.

    Parameters
    ----------
    delta
        The client's update.
    options
        The round's FitConfig options (:data:`LOCAL_CLIP`, :data:`LOCAL_SIGMA`).

    Returns
    -------
    Params
        The noised update, the only thing derived from the client's data
        that may leave the client (whether it was clipped is not returned:
        that bit would leave un-noised).

    Raises
    ------
    ConfigError
        If the options are not positive finite numbers.
    """
    clip = _positive(options, LOCAL_CLIP)
    sigma = _positive(options, LOCAL_SIGMA)
    from fedshield.privacy.noise import SecureGaussian

    values = np.asarray(delta.flat, dtype=np.float64)
    if np.isfinite(values).all():
        norm = delta.norm()
        factor = 1.0 if norm <= clip else clip / norm
    else:
        values, factor = np.zeros_like(values), 1.0
    noise = SecureGaussian().sample(delta.spec.size, sigma * clip)
    noised = values * factor + noise
    return Params.from_flat(noised.astype(np.float32), delta.spec, copy=False)


def _positive(options: Mapping[str, object], key: str) -> float:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"local DP option {key!r} must be a number; got {value!r}")
    number = float(value)
    if not np.isfinite(number) or number <= 0:
        raise ConfigError(f"local DP option {key!r} must be > 0; got {number}")
    return number
