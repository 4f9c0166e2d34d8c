"""Local differential privacy: a client privatises its own update before sending.

The client clips its update to L2 norm ``C`` and adds ``N(0, σ²C²)`` to every
coordinate (the Gaussian mechanism with sensitivity ``2C`` on the client's
whole data set: any two clipped updates differ by at most ``2C``). The
server, and anyone who sees the update on its way, sees only the noised
vector. The strategy asks for it through :class:`~fedshield.core.FitConfig`
options (the keys below), so it runs wherever the client runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedshield.core import Params
from fedshield.errors import ConfigError

__all__ = ["LOCAL_CLIP", "LOCAL_SECURE", "LOCAL_SIGMA", "privatize", "wants_local_dp"]

LOCAL_CLIP = "local_dp/clip_norm"
"""FitConfig option: the L2 clip norm ``C`` of the update."""
LOCAL_SIGMA = "local_dp/noise_multiplier"
"""FitConfig option: ``σ``; the noise std is ``σ·C``."""
LOCAL_SECURE = "local_dp/secure_rng"
"""FitConfig option: draw the noise from the OS's cryptographic randomness."""


def wants_local_dp(options: Mapping[str, object]) -> bool:
    """Whether a round's options ask the client to privatise its update."""
    return LOCAL_CLIP in options


def privatize(
    delta: Params, options: Mapping[str, object], rng: np.random.Generator | None
) -> tuple[Params, dict[str, float]]:
    """Clip ``delta`` to ``C`` and add Gaussian noise of std ``σC``.

    Parameters
    ----------
    delta
        The client's update.
    options
        The round's FitConfig options (:data:`LOCAL_CLIP`, :data:`LOCAL_SIGMA`,
        :data:`LOCAL_SECURE`).
    rng
        Source of seeded noise (ignored with ``secure_rng``).

    Returns
    -------
    tuple of (Params, dict)
        The noised update, and ``{"local_dp/clipped": 0 or 1}`` (whether it
        was clipped; a client-side metric).

    Raises
    ------
    ConfigError
        If the options are not positive finite numbers, or no generator is
        given for seeded noise.
    """
    clip = _positive(options, LOCAL_CLIP)
    sigma = _positive(options, LOCAL_SIGMA)
    secure = bool(options.get(LOCAL_SECURE, False))
    if rng is None and not secure:
        raise ConfigError("local DP with seeded noise needs the client's generator")
    from fedshield.privacy.noise import make_noise

    norm = delta.norm()
    factor = 1.0 if norm <= clip else clip / norm
    noise = make_noise(secure, rng).sample(delta.spec.size, sigma * clip)
    noised = np.asarray(delta.flat, dtype=np.float64) * factor + noise
    out = Params.from_flat(noised.astype(np.float32), delta.spec, copy=False)
    return out, {"local_dp/clipped": float(norm > clip)}


def _positive(options: Mapping[str, object], key: str) -> float:
    value = options.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"local DP option {key!r} must be a number; got {value!r}")
    number = float(value)
    if not np.isfinite(number) or number <= 0:
        raise ConfigError(f"local DP option {key!r} must be > 0; got {number}")
    return number
