"""Server optimizers: how the aggregated update moves the global model."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import KW_ONLY, dataclass
from functools import partial
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from fedshield.core import Params, ParamSpec
from fedshield.errors import CheckpointError, ConfigError, InvalidUpdateError

__all__ = [
    "FedAdagrad",
    "FedAdam",
    "FedAvgM",
    "FedYogi",
    "ServerOptimizer",
    "ServerSgd",
]


class ServerOptimizer(Protocol):
    """Applies an aggregated client update to the global parameters.

    State (momentum, moments) lives in ``ServerState.optimizer_state`` so it
    is checkpointed with the model.
    """

    def init(self, params: Params) -> Mapping[str, Params]:
        """Initial optimizer state for ``params``."""

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """Return new parameters and optimizer state."""


@dataclass(frozen=True, slots=True)
class ServerSgd:
    """Plain server SGD on the pseudo-gradient: ``θ ← θ + server_lr · Δ``.

    With ``server_lr = 1`` and a weighted mean of deltas this is FedAvg
    (McMahan et al., AISTATS 2017, Algorithm 1).

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = ServerSgd(server_lr=0.5)
    >>> new, _ = opt.step(Params({"w": [1.0]}), Params({"w": [2.0]}), {})
    >>> new["w"].tolist()
    [2.0]
    """

    server_lr: float = 1.0

    def __post_init__(self) -> None:
        if not self.server_lr > 0:
            raise ConfigError(f"`server_lr` must be > 0; got {self.server_lr}")

    def init(self, params: Params) -> Mapping[str, Params]:
        """No state."""
        return {}

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """Move ``params`` by ``server_lr × delta``."""
        if self.server_lr == 1.0:
            return params + delta, state
        return params + delta * self.server_lr, state


@dataclass(frozen=True, slots=True)
class FedAvgM:
    """Server SGD with heavy-ball momentum on the pseudo-gradient (FedAvgM).

    Parameters
    ----------
    server_lr
        Server learning rate ``η``; must be finite and > 0.
    momentum
        Momentum ``β`` in ``[0, 1)``. With ``0`` this is :class:`ServerSgd`.

    Notes
    -----
    Hsu et al., "Measuring the Effects of Non-Identical Data Distribution for
    Federated Visual Classification", arXiv:1909.06335, 2019. With ``Δ_t`` the
    aggregated pseudo-gradient (mean client ``new - old``), each round does,
    exactly::

        m_t     = β · m_{t-1} + Δ_t          (m_{-1} = 0)
        x_{t+1} = x_t + η · m_t

    There is no dampening factor ``(1 - β)`` on ``Δ_t``, so a constant
    ``Δ`` moves the model by ``η / (1 - β) · Δ`` per round in the long run:
    keep ``η / (1 - β)`` in mind when comparing with :class:`ServerSgd`.
    Computed in ``float32`` with the same operations as :class:`ServerSgd`,
    so ``momentum=0`` reproduces it bit for bit. The state is
    ``{"m": momentum buffer}``.

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = FedAvgM(server_lr=1.0, momentum=0.5)
    >>> x, delta = Params({"w": [0.0]}), Params({"w": [1.0]})
    >>> state = opt.init(x)
    >>> x, state = opt.step(x, delta, state)
    >>> x, state = opt.step(x, delta, state)
    >>> x["w"].tolist(), state["m"]["w"].tolist()
    ([2.5], [1.5])
    """

    server_lr: float = 1.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _check_positive("server_lr", self.server_lr)
        _check_decay("momentum", self.momentum)

    def init(self, params: Params) -> Mapping[str, Params]:
        """Zero momentum buffer ``{"m": 0}`` shaped like ``params``."""
        return {"m": Params.zeros(params.spec)}

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """Update the momentum buffer with ``delta`` and move ``params`` by it.

        Raises
        ------
        InvalidUpdateError
            If ``delta`` does not match ``params``.
        CheckpointError
            If ``state`` was not made by :meth:`init` for these parameters.
        """
        _check_update(params, delta)
        (m_prev,) = _buffers(state, params.spec, ("m",), owner="FedAvgM")
        m = m_prev * self.momentum + delta
        return params + m * self.server_lr, {"m": m}


@dataclass(frozen=True, slots=True)
class FedAdagrad:
    """FedAdagrad: Adagrad on the pseudo-gradient (Reddi et al., Algorithm 2).

    Parameters
    ----------
    server_lr
        Server learning rate ``η``; finite and > 0.
    beta1
        First-moment (momentum) decay ``β1`` in ``[0, 1)``; ``0`` gives
        Adagrad without momentum.
    tau
        Adaptivity ``τ`` > 0: added to ``√v`` and the square root of the
        initial second moment.

    Notes
    -----
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2,
    with ``Δ_t`` the aggregated pseudo-gradient::

        m_t     = β1 · m_{t-1} + (1 - β1) · Δ_t
        v_t     = v_{t-1} + Δ_t²
        x_{t+1} = x_t + η · m_t / (√v_t + τ)

    See :class:`FedAdam` for the initial state, precision and what fedshield
    does not do (no bias correction). Defaults: ``β1 = 0.9`` as in the
    paper's experiments, ``τ = 1e-3`` and ``η = 0.1``, a learning rate of the
    order the paper found best for FedAdagrad (larger than for FedAdam, as
    ``v`` only grows); tune ``η`` and ``τ`` per task.

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = FedAdagrad(0.1, beta1=0.0, tau=3.0)
    >>> x = Params({"w": [0.0, 0.0]})
    >>> x, state = opt.step(x, Params({"w": [4.0, -4.0]}), opt.init(x))
    >>> state["v"]["w"].tolist()  # τ² + Δ²; step 0.1 · 4 / (√25 + 3)
    [25.0, 25.0]
    >>> [round(w, 6) for w in x["w"].tolist()]
    [0.05, -0.05]
    """

    server_lr: float = 0.1
    _: KW_ONLY
    beta1: float = 0.9
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_adaptive(self.server_lr, self.beta1, self.tau)

    def init(self, params: Params) -> Mapping[str, Params]:
        """State ``{"m": 0, "v": τ²}`` shaped like ``params``."""
        return _adaptive_init(params, tau=self.tau)

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """One FedAdagrad step; see :class:`FedAdam` for what it raises."""
        return _adaptive_step(
            params,
            delta,
            state,
            server_lr=self.server_lr,
            beta1=self.beta1,
            tau=self.tau,
            second_moment=_adagrad_moment,
            owner="FedAdagrad",
        )


@dataclass(frozen=True, slots=True)
class FedAdam:
    """FedAdam: Adam on the pseudo-gradient (Reddi et al., Algorithm 2).

    Parameters
    ----------
    server_lr
        Server learning rate ``η``; finite and > 0.
    beta1
        First-moment (momentum) decay ``β1`` in ``[0, 1)``.
    beta2
        Second-moment decay ``β2`` in ``[0, 1)``.
    tau
        Adaptivity ``τ`` > 0: added to ``√v`` and the square root of the
        initial second moment.

    Notes
    -----
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2,
    with ``Δ_t`` the aggregated pseudo-gradient (mean client ``new - old``),
    so the server moves along ``+m_t``; all operations are elementwise::

        m_t     = β1 · m_{t-1} + (1 - β1) · Δ_t
        v_t     = β2 · v_{t-1} + (1 - β2) · Δ_t²
        x_{t+1} = x_t + η · m_t / (√v_t + τ)

    Initial state ``m_{-1} = 0`` and ``v_{-1} = τ²``, the smallest value
    the paper's ``v_{-1} ≥ τ²`` allows. fedshield applies **no bias
    correction** (no division by ``1 - β1^t`` or ``1 - β2^t``), as in
    Algorithm 2, so early steps are shorter than textbook Adam's; and it keeps
    no step counter, so the state is exactly ``{"m": m_t, "v": v_t}``.

    Each step computes in ``float64`` from the ``float32`` inputs and stores
    ``float32`` results, so a step is a function of its ``float32`` inputs
    only: resuming from a checkpointed :class:`~fedshield.core.ServerState`
    gives bit-identical results to running on.

    Defaults ``β1 = 0.9``, ``β2 = 0.99`` are those of the paper's experiments;
    ``τ = 1e-3`` and ``η = 0.01`` are of the order the paper found best for
    FedAdam. They are starting points: tune ``η`` and ``τ`` per task.

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = FedAdam(0.1)
    >>> x = Params({"w": [0.0]})
    >>> x, state = opt.step(x, Params({"w": [1.0]}), opt.init(x))
    >>> sorted(state), round(float(x["w"][0]), 4)
    (['m', 'v'], 0.099)
    """

    server_lr: float = 0.01
    _: KW_ONLY
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_adaptive(self.server_lr, self.beta1, self.tau)
        _check_decay("beta2", self.beta2)

    def init(self, params: Params) -> Mapping[str, Params]:
        """State ``{"m": 0, "v": τ²}`` shaped like ``params``."""
        return _adaptive_init(params, tau=self.tau)

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """One FedAdam step.

        Raises
        ------
        InvalidUpdateError
            If ``delta`` does not match ``params``.
        CheckpointError
            If ``state`` was not made by :meth:`init` for these parameters.
        """
        return _adaptive_step(
            params,
            delta,
            state,
            server_lr=self.server_lr,
            beta1=self.beta1,
            tau=self.tau,
            second_moment=partial(_adam_moment, beta2=self.beta2),
            owner="FedAdam",
        )


@dataclass(frozen=True, slots=True)
class FedYogi:
    """FedYogi: Yogi on the pseudo-gradient (Reddi et al., Algorithm 2).

    Parameters
    ----------
    server_lr
        Server learning rate ``η``; finite and > 0.
    beta1
        First-moment (momentum) decay ``β1`` in ``[0, 1)``.
    beta2
        Second-moment rate ``β2`` in ``[0, 1)``.
    tau
        Adaptivity ``τ`` > 0: added to ``√v`` and the square root of the
        initial second moment.

    Notes
    -----
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2
    (Yogi: Zaheer et al., NeurIPS 2018)::

        m_t     = β1 · m_{t-1} + (1 - β1) · Δ_t
        v_t     = v_{t-1} - (1 - β2) · Δ_t² · sign(v_{t-1} - Δ_t²)
        x_{t+1} = x_t + η · m_t / (√v_t + τ)

    ``v`` moves towards ``Δ_t²`` by an additive ``(1 - β2) Δ_t²`` rather than
    FedAdam's multiplicative decay, and stays positive from ``v_{-1} = τ²``
    (``sign(0) = 0``). See :class:`FedAdam` for the initial state, precision
    and the absence of bias correction; defaults are FedAdam's.

    Examples
    --------
    >>> from fedshield.core import Params
    >>> opt = FedYogi(0.1)
    >>> x = Params({"w": [0.0]})
    >>> x, state = opt.step(x, Params({"w": [1.0]}), opt.init(x))
    >>> round(float(x["w"][0]), 4)
    0.099
    """

    server_lr: float = 0.01
    _: KW_ONLY
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _check_adaptive(self.server_lr, self.beta1, self.tau)
        _check_decay("beta2", self.beta2)

    def init(self, params: Params) -> Mapping[str, Params]:
        """State ``{"m": 0, "v": τ²}`` shaped like ``params``."""
        return _adaptive_init(params, tau=self.tau)

    def step(
        self, params: Params, delta: Params, state: Mapping[str, Params]
    ) -> tuple[Params, Mapping[str, Params]]:
        """One FedYogi step; see :class:`FedAdam` for what it raises."""
        return _adaptive_step(
            params,
            delta,
            state,
            server_lr=self.server_lr,
            beta1=self.beta1,
            tau=self.tau,
            second_moment=partial(_yogi_moment, beta2=self.beta2),
            owner="FedYogi",
        )


# ------------------------------------------------------------------ helpers

_Vector = NDArray[np.float64]
# (v_{t-1}, Δ_t²) -> v_t: the only line in which Reddi et al.'s Algorithm 2
# differs between FedAdagrad, FedAdam and FedYogi.
_SecondMoment = Callable[[_Vector, _Vector], _Vector]


def _adagrad_moment(v: _Vector, delta_sq: _Vector) -> _Vector:
    return v + delta_sq


def _adam_moment(v: _Vector, delta_sq: _Vector, *, beta2: float) -> _Vector:
    return beta2 * v + (1.0 - beta2) * delta_sq


def _yogi_moment(v: _Vector, delta_sq: _Vector, *, beta2: float) -> _Vector:
    return v - (1.0 - beta2) * delta_sq * np.sign(v - delta_sq)


def _adaptive_init(params: Params, *, tau: float) -> dict[str, Params]:
    v0 = np.full(params.spec.size, tau * tau, dtype=np.float32)
    return {
        "m": Params.zeros(params.spec),
        "v": Params.from_flat(v0, params.spec, copy=False),
    }


def _adaptive_step(
    params: Params,
    delta: Params,
    state: Mapping[str, Params],
    *,
    server_lr: float,
    beta1: float,
    tau: float,
    second_moment: _SecondMoment,
    owner: str,
) -> tuple[Params, dict[str, Params]]:
    _check_update(params, delta)
    m_prev, v_prev = _buffers(state, params.spec, ("m", "v"), owner=owner)
    d = delta.flat.astype(np.float64)
    m = beta1 * m_prev.flat.astype(np.float64) + (1.0 - beta1) * d
    v = second_moment(v_prev.flat.astype(np.float64), d * d)
    x = params.flat.astype(np.float64) + server_lr * m / (np.sqrt(v) + tau)
    spec = params.spec
    return _as_params(x, spec), {"m": _as_params(m, spec), "v": _as_params(v, spec)}


def _as_params(vector: _Vector, spec: ParamSpec) -> Params:
    return Params.from_flat(vector.astype(np.float32), spec, copy=False)


def _check_update(params: Params, delta: Params) -> None:
    if delta.spec != params.spec:
        raise InvalidUpdateError(
            "update does not match the parameters: "
            + "; ".join(params.spec.mismatches(delta.spec))
        )


def _buffers(
    state: Mapping[str, Params],
    spec: ParamSpec,
    names: tuple[str, ...],
    *,
    owner: str,
) -> tuple[Params, ...]:
    # A mismatch means the state came from another optimizer or model, e.g.
    # a checkpoint written by a run with a different ``server_opt``.
    problems = [f"missing buffer {name!r}" for name in names if name not in state]
    for name in names:
        if name in state and state[name].spec != spec:
            found = "; ".join(spec.mismatches(state[name].spec))
            problems.append(f"buffer {name!r} does not match the parameters ({found})")
    if problems:
        raise CheckpointError(
            f"optimizer state is not from {owner}.init for these parameters: "
            + "; ".join(problems)
        )
    return tuple(state[name] for name in names)


def _check_positive(name: str, value: float) -> None:
    if not 0.0 < value < math.inf:
        raise ConfigError(f"`{name}` must be finite and > 0; got {value}")


def _check_decay(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"`{name}` must be in [0, 1); got {value}")


def _check_adaptive(server_lr: float, beta1: float, tau: float) -> None:
    _check_positive("server_lr", server_lr)
    _check_decay("beta1", beta1)
    _check_positive("tau", tau)
