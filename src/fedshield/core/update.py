"""What a client sends back after local training, and how it is checked."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedshield.core.params import Params, ParamSpec
from fedshield.errors import InvalidUpdateError

__all__ = ["ClientId", "ClientUpdate", "metric_problems", "validate_update"]

ClientId = str


@dataclass(frozen=True, slots=True)
class ClientUpdate:
    """A client's contribution to one round.

    Parameters
    ----------
    client_id
        Who sent it.
    delta
        New local parameters minus the global parameters the client received.
    num_examples
        Training examples behind the update (the FedAvg weight ``n_k``).
    metrics
        Scalar training metrics (``"loss"``, ``"accuracy"``, ...).
    extras
        Further tensors for the server, averaged separately (SCAFFOLD's
        control-variate change ``"scaffold/delta_c"``).
    state
        The client's new persistent state, to be kept for its next round
        (see :attr:`FitConfig.state`); never aggregated.
    """

    client_id: ClientId
    delta: Params
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    extras: Mapping[str, Params] = field(default_factory=dict)
    state: Mapping[str, Params] = field(default_factory=dict)


def metric_problems(metrics: object) -> list[str]:
    """Describe what is wrong with a client's metrics mapping (empty if fine).

    Metrics must map ``str`` names to finite real numbers (Python or numpy
    scalars, not booleans).

    Examples
    --------
    >>> metric_problems({"loss": 0.5})
    []
    >>> metric_problems({"loss": float("nan")})
    ["metric 'loss' must be a finite number; got nan"]
    """
    if not isinstance(metrics, Mapping):
        return [f"metrics must be a mapping; got {type(metrics).__name__}"]
    problems: list[str] = []
    for key, value in metrics.items():
        if not isinstance(key, str):
            problems.append(f"metric names must be strings; got {key!r}")
            continue
        if isinstance(value, bool | np.bool_) or not isinstance(
            value, numbers.Real | np.number
        ):
            problems.append(
                f"metric {key!r} must be a number; got {type(value).__name__}"
            )
            continue
        try:
            finite = math.isfinite(float(value))
        except (OverflowError, TypeError, ValueError):
            finite = False
        if not finite:
            problems.append(f"metric {key!r} must be a finite number; got {value!r}")
    return problems


def validate_update(
    update: object,
    spec: ParamSpec,
    *,
    max_examples: int | None = None,
) -> ClientUpdate:
    """Check a received update and return it, or raise naming every problem.

    Parameters
    ----------
    update
        What the client sent.
    spec
        The parameter layout of the global model (also of every tensor in
        ``extras`` and ``state``).
    max_examples
        Largest plausible ``num_examples`` (``None``: no upper bound).

    Returns
    -------
    ClientUpdate
        ``update`` itself, now known to be well formed.

    Raises
    ------
    InvalidUpdateError
        If it is not a :class:`ClientUpdate`, its arrays do not match ``spec``,
        any value is NaN or infinite, ``num_examples`` is out of range, or its
        metrics are not finite numbers by name.
    """
    if not isinstance(update, ClientUpdate):
        raise InvalidUpdateError(
            f"expected a ClientUpdate; got {type(update).__name__}"
        )
    problems: list[str] = []
    if not isinstance(update.delta, Params):
        problems.append(f"delta must be Params; got {type(update.delta).__name__}")
    else:
        problems.extend(spec.mismatches(update.delta.spec))
        if not problems and update.delta.flat.dtype != np.float32:
            problems.append(
                f"delta dtype must be float32; got {update.delta.flat.dtype}"
            )
        if not problems and not update.delta.is_finite():
            bad = int((~np.isfinite(update.delta.flat)).sum())
            problems.append(f"delta has {bad} NaN or infinite values")
    problems.extend(metric_problems(update.metrics))
    for kind, tensors in (("extras", update.extras), ("state", update.state)):
        if not isinstance(tensors, Mapping):
            problems.append(f"{kind} must be a mapping; got {type(tensors).__name__}")
            continue
        for key, value in tensors.items():
            if not isinstance(value, Params):
                problems.append(f"{kind}[{key!r}] must be Params")
            elif value.spec != spec:
                problems.append(
                    f"{kind}[{key!r}] does not match the model: "
                    + "; ".join(spec.mismatches(value.spec))
                )
            elif not value.is_finite():
                problems.append(f"{kind}[{key!r}] has NaN or infinite values")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n <= 0:
        problems.append(f"num_examples must be a positive integer; got {n!r}")
    elif max_examples is not None and n > max_examples:
        problems.append(f"num_examples must be <= {max_examples}; got {n}")
    if problems:
        raise InvalidUpdateError(
            f"update from client {update.client_id!r} rejected: " + "; ".join(problems)
        )
    return update
