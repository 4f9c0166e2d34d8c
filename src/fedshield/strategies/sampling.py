"""Client samplers: which of the available clients take part in a round.

A sampler draws from the generator it is given: the round's seeded numpy
``Generator`` (reproducible), or a
:class:`~fedshield.privacy.noise.SecureRandom` (an AES-CTR keystream keyed
from the OS), which :class:`~fedshield.strategies.dp.DpFedAvg` passes with
``secure_rng`` so that who takes part is not a function of the seed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedshield.core import ClientId
from fedshield.errors import ConfigError
from fedshield.privacy.noise import SecureRandom

__all__ = ["ClientSampler", "CountSampler", "FractionSampler"]


class ClientSampler(Protocol):
    """Chooses the clients of one round."""

    def sample(
        self,
        available: Sequence[ClientId],
        *,
        round_idx: int,
        rng: np.random.Generator | SecureRandom,
    ) -> list[ClientId]:
        """Return the sampled clients, in the order they are asked."""

    def expected_count(self, num_available: int) -> int:
        """How many clients a round samples when ``num_available`` are online."""


def _choose(
    available: Sequence[ClientId], k: int, rng: np.random.Generator | SecureRandom
) -> list[ClientId]:
    if k >= len(available):
        return list(available)
    if isinstance(rng, SecureRandom):
        picks = rng.subset(len(available), k)
    else:
        picks = np.sort(rng.choice(len(available), size=k, replace=False))
    return [available[int(i)] for i in picks]


@dataclass(frozen=True, slots=True)
class FractionSampler:
    """Uniform sampling without replacement of ``ceil(fraction × available)`` clients.

    Parameters
    ----------
    fraction
        Share of the available clients asked each round, in (0, 1].
    """

    fraction: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"`fraction` of FractionSampler must be in (0, 1]; got {self.fraction}"
            )

    def expected_count(self, num_available: int) -> int:
        """``max(1, ceil(fraction × num_available))``."""
        return max(1, math.ceil(self.fraction * num_available - 1e-9))

    def sample(
        self,
        available: Sequence[ClientId],
        *,
        round_idx: int,
        rng: np.random.Generator | SecureRandom,
    ) -> list[ClientId]:
        """Sample ``expected_count(len(available))`` clients uniformly."""
        return _choose(available, self.expected_count(len(available)), rng)


@dataclass(frozen=True, slots=True)
class CountSampler:
    """Uniform sampling without replacement of a fixed number of clients.

    Parameters
    ----------
    count
        Clients per round (all of them when fewer are available).
    """

    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ConfigError(f"`clients_per_round` must be >= 1; got {self.count}")

    def expected_count(self, num_available: int) -> int:
        """``min(count, num_available)``."""
        return min(self.count, num_available)

    def sample(
        self,
        available: Sequence[ClientId],
        *,
        round_idx: int,
        rng: np.random.Generator | SecureRandom,
    ) -> list[ClientId]:
        """Sample ``count`` clients uniformly."""
        return _choose(available, self.count, rng)
