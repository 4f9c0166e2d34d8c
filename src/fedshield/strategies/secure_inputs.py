"""What a round's aggregation rule asks each client to do under secure aggregation.

Under secure aggregation the server never holds an individual update, so a
rule that transforms updates must have the clients transform their own
before masking. This module is the one place that says which rules do what
(:func:`secure_input`); the round reads the answer, never the rule's type.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DistributedDp

__all__ = ["SecureInput", "secure_input"]


@dataclass(frozen=True, slots=True)
class SecureInput:
    """How each client prepares its update for the secure sum.

    Parameters
    ----------
    kind
        ``"weighted"``: FedAvg's weight ``n_k / max_examples`` (with
        ``bound`` > 0, norm bounding first: Sun et al. 2019, the one robust
        rule that needs no individual update at the server); ``"clipped"``:
        central DP on top of secure aggregation, each client clips to
        ``bound`` and weighs 1, the server noises the unmasked sum;
        ``"distributed"``: distributed DP, each client clips, rotates, rounds
        and noises its own update.
    bound
        The norm bound or clip norm (0: none).
    distributed
        Distributed DP's mechanism.
    """

    kind: Literal["weighted", "clipped", "distributed"] = "weighted"
    bound: float = 0.0
    distributed: DistributedDp | None = None


def secure_input(rule: object) -> SecureInput:
    """What ``rule`` (a round's aggregator) asks of each client under SecAgg."""
    from fedshield.privacy.distributed import DistributedDp
    from fedshield.strategies.dp import DistributedSum, DpMean
    from fedshield.strategies.robust import NormBound

    if isinstance(rule, DistributedSum):
        mechanism = rule.distributed
        assert isinstance(mechanism, DistributedDp)
        return SecureInput("distributed", mechanism.clip_norm, mechanism)
    if isinstance(rule, DpMean):
        return SecureInput("clipped", float(rule.clip_norm))
    if isinstance(rule, NormBound):
        return SecureInput("weighted", float(rule.max_norm))
    return SecureInput()
