"""Privacy accounting: describe each round's DP mechanism, compose, report ε.

Every number here comes from Google's ``dp-accounting`` library; this module
only translates a JSON-serialisable description of a round
(:class:`DpEventSpec`) into a ``dp_accounting.DpEvent`` and picks the
accountant. It re-derives no privacy math, with one exception that
``dp-accounting`` lacks: the Rényi-DP bound of the distributed discrete
Gaussian (:func:`ddg_rdp`, Kairouz, Liu and Steinke, ICML 2021), whose
composition is converted to (ε, δ) by ``dp-accounting``'s
``rdp_privacy_accountant.compute_epsilon``.

Accountants
-----------
``"pld"`` (the default)
    ``dp_accounting.pld.PLDAccountant`` with
    ``value_discretization_interval = PLD_VALUE_DISCRETIZATION_INTERVAL``
    (1e-3). Its pessimistic estimate is an upper bound on ε at any
    discretisation; 1e-3 is about 8 times faster than the library's default
    1e-4 and, on the table in ``tests/privacy/test_accounting.py``, at most
    about 2 % looser (0.796 instead of 0.783 for q = 0.001, σ = 0.8,
    10,000 steps, δ = 1e-5).

    The PLD's grid grows as ``1 / σ²`` (one release's privacy loss spans
    about ``1 / (2σ²)`` nats) and with the number of composed releases: at
    σ = 1e-4 the library would allocate hundreds of GiB. Before building
    it, :func:`pld_value_discretization_interval` sizes the grid from the
    library's own truncation bounds and coarsens the interval until one
    release holds at most :data:`PLD_MAX_RELEASE_POINTS` points and the
    composition at most :data:`PLD_MAX_POINTS` (a coarser pessimistic PLD
    is still an upper bound on ε, usually a looser one); if that would take an
    interval above :data:`PLD_MAX_INTERVAL`, accounting is refused with a
    :class:`~fedshield.errors.ConfigError` that names σ and suggests the RDP
    accountant. Every PLD accounting thus stays within a few hundred MB and
    a few seconds.

    The PLD accountant treats the tails it truncates (probability about
    1e-15 in all) as infinite privacy loss, so at a δ below that it reports
    ε = ``inf``: it cannot certify such a δ (the RDP accountant can).
``"rdp"``
    ``dp_accounting.rdp.RdpAccountant`` with the library's default orders
    (``dp_accounting.rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS``: 1.1 to
    10.9 in steps of 0.1, 11 to 63, 128, 256, 512, 1024). Looser than PLD for
    the subsampled Gaussian, but the only one that accounts fixed-size
    sampling without replacement.

Neighbouring relations
----------------------
Poisson sampling and no sampling are accounted under add-or-remove-one
unless the spec says ``replace_one=True`` (record mode, whose record counts
are public, so neighbouring data sets have the same size); fixed-size
sampling without replacement always under replace-one. Replace-one Poisson
sampling is accounted only by the PLD accountant (``dp-accounting``'s RDP
accountant refuses it; its PLD accountant models the replaced record's
contribution moving from +C to -C, with the same ``noise_multiplier``);
fixed-size sampling only by the RDP accountant. A composition never mixes
the two relations: a Gaussian event's ``noise_multiplier`` is relative to
the sensitivity under one relation, so reinterpreting it under the other
would be wrong. Mixing raises :class:`~fedshield.errors.UnsupportedEventError`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, SupportsFloat, SupportsIndex, TypeGuard, get_args

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from fedshield.errors import ConfigError, UnsupportedEventError

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "MIN_NOISE_MULTIPLIER",
    "PLD_MAX_INTERVAL",
    "PLD_MAX_POINTS",
    "PLD_MAX_RELEASE_POINTS",
    "PLD_VALUE_DISCRETIZATION_INTERVAL",
    "AccountantKind",
    "DpEventSpec",
    "Mechanism",
    "PrivacyLedger",
    "Sampling",
    "calibrate_noise_multiplier",
    "ddg_rdp",
    "ddg_round_events",
    "ddg_tau",
    "ddg_undominated",
    "ddg_undominated_releases",
    "ddg_worst_epsilon",
    "calibrate_distributed_noise",
    "epsilon",
    "epsilon_for",
    "make_accountant",
    "pld_value_discretization_interval",
]

AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed", "none"]
Mechanism = Literal["gaussian", "distributed_discrete_gaussian"]

PLD_VALUE_DISCRETIZATION_INTERVAL = 1e-3
"""``value_discretization_interval`` of every PLD accountant fedshield builds,
unless the grid would be too large (see :func:`pld_value_discretization_interval`)."""

PLD_MAX_RELEASE_POINTS = 2**17
"""Most grid points of one release's PLD (building it costs about 7 µs a point)."""

PLD_MAX_POINTS = 2**22
"""Most grid points of all composed PLDs together (about 75 bytes a point)."""

PLD_MAX_INTERVAL = 100.0
"""Coarsest ``value_discretization_interval`` fedshield uses; a PLD that needs
a coarser one is refused (its ε would be loose by up to this much a release)."""

_PLD_TAIL_MASS = 1e-15  # dp_accounting's tail_mass_truncation in self_compose

MAX_NOISE_MULTIPLIER = 1e4
"""Largest noise multiplier :func:`calibrate_noise_multiplier` will return."""

MIN_NOISE_MULTIPLIER = 0.1
"""Smallest noise multiplier :func:`calibrate_noise_multiplier` will return."""

_FIXED_WITH_PLD = (
    "fixed-size sampling is accounted only by the RDP accountant; use "
    'accountant = "rdp" or Poisson sampling'
)
_MIXED_RELATIONS = (
    "cannot compose events accounted under replace-one neighbours (fixed-size "
    "sampling, or replace_one=True as in record mode) with events accounted "
    "under add-or-remove-one neighbours: use one sampling scheme and one "
    "relation for the whole run"
)
_REPLACE_ONE_WITH_RDP = (
    "record mode is accounted under replace-one, which only the PLD accountant "
    'supports for Poisson sampling: set accountant = "pld"'
)
_MIXED_DDG = (
    "cannot compose distributed discrete Gaussian rounds with Gaussian events in "
    "one ledger: account each mode in its own ledger"
)
# How far a distributed discrete Gaussian's noise_multiplier may be from
# sqrt(num_clients) * noise_std_per_client / l2_sensitivity: float rounding only.
_DDG_REL_TOL = 1e-9


def _is_real(value: object) -> TypeGuard[SupportsFloat]:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> TypeGuard[SupportsIndex]:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive_finite(name: str, value: object, hint: str = "") -> float:
    if not _is_real(value):
        raise ConfigError(f"{name} must be a number; got {value!r}{hint}")
    number = float(value)
    if math.isnan(number) or number <= 0:
        raise ConfigError(f"{name} must be > 0; got {number!r}{hint}")
    if math.isinf(number):
        raise ConfigError(f"{name} must be finite; got {number!r}{hint}")
    return number


def _at_least(name: str, value: object, minimum: int, hint: str = "") -> int:
    if not _is_int(value):
        raise ConfigError(f"{name} must be an integer; got {value!r}{hint}")
    number = operator.index(value)
    if number < minimum:
        raise ConfigError(f"{name} must be >= {minimum}; got {number}{hint}")
    return number


def _check_delta(delta: object) -> float:
    if not _is_real(delta) or not 0.0 < float(delta) < 1.0:
        raise ConfigError(
            f"delta must be in (0, 1), typically below 1 / number of records "
            f"(e.g. 1e-5); got {delta!r}"
        )
    return float(delta)


def _check_kind(kind: object) -> AccountantKind:
    if kind == "pld":
        return "pld"
    if kind == "rdp":
        return "rdp"
    raise ConfigError(f'accountant must be "pld" or "rdp"; got {kind!r}')


def _check_sampling_rate(value: object) -> float:
    hint = "; set sampling_rate to the probability q in (0, 1] of each record"
    if not _is_real(value) or not 0.0 < float(value) <= 1.0:
        raise ConfigError(f"sampling_rate must be in (0, 1]; got {value!r}{hint}")
    return float(value)


@dataclass(frozen=True)
class DpEventSpec:
    """One release of a Gaussian mechanism, maybe subsampled, maybe repeated.

    A frozen, JSON-serialisable description of what one round (or one local
    training run of ``count`` DP-SGD steps) released;
    :meth:`to_dp_event` turns it into the ``dp_accounting`` event an
    accountant composes.

    Parameters
    ----------
    noise_multiplier
        σ: the noise standard deviation divided by the L2 sensitivity under
        the event's neighbouring relation (add-or-remove-one for ``"poisson"``
        and ``"none"`` unless ``replace_one``, replace-one for ``"fixed"``; for
        a sum of updates clipped to norm C the replace-one sensitivity is up
        to 2 C, which the accountants model themselves). Must be
        finite and > 0: a release without privacy loss needs no event at all.
    sampling
        ``"poisson"``: each record (client) takes part independently with
        probability ``sampling_rate``; ``"fixed"``: exactly ``sample_size`` of
        ``population`` records, drawn without replacement (RDP accountant
        only); ``"none"``: every record takes part.
    sampling_rate
        q in (0, 1]; required for ``"poisson"``, else ``None``.
    population
        Size of the population a ``"fixed"`` sample is drawn from, else ``None``.
    sample_size
        Size of a ``"fixed"`` sample, 1 to ``population``, else ``None``.
    count
        How many times the event is repeated (for example DP-SGD steps), >= 1.
    mechanism
        ``"gaussian"``: continuous Gaussian noise of std σ · sensitivity.
        ``"distributed_discrete_gaussian"``: each of ``num_clients`` clients
        adds discrete Gaussian noise of std ``noise_std_per_client`` (integer
        units after scaling) to its quantised update and secure aggregation
        reveals only the sum [Kairouz, Liu and Steinke, "The Distributed
        Discrete Gaussian Mechanism for Federated Learning with Secure
        Aggregation", ICML 2021, arXiv:2102.06387]. Build it with
        :meth:`distributed_discrete_gaussian`.
    num_clients
        Distributed discrete Gaussian only: the clients whose noise is summed.
    noise_std_per_client
        Distributed discrete Gaussian only: each client's noise std, in the
        integer units of the quantised update.
    l2_sensitivity
        Distributed discrete Gaussian only: the L2 sensitivity of the sum, in
        the same integer units (after scaling and rounding).
    dimension
        Distributed discrete Gaussian only: the model dimension d.
    replace_one
        Account a ``"poisson"`` or ``"none"`` Gaussian event under replace-one
        neighbours (one record replaced by another; the data set's size is
        public) instead of add-or-remove-one. Poisson replace-one is
        accounted by the PLD accountant only. ``"fixed"`` is always
        replace-one and leaves this ``False``. Written to JSON only when
        ``True``, so JSON without it reads as ``False``.

    Raises
    ------
    ConfigError
        When a field is missing, out of range or given for another sampling
        scheme or mechanism; the message says what to change.

    Notes
    -----
    The distributed discrete Gaussian is accounted by its own Rényi-DP
    bound (:func:`ddg_rdp`: the Gaussian's plus the term τ of Kairouz et
    al.'s Theorem 1, which accounts for a sum of discrete Gaussians not
    being a discrete Gaussian), composed by adding RDP curves and converted
    to (ε, δ) by ``dp-accounting``, whatever the ledger's accountant. It is
    accounted without sampling (``sampling = "none"``): the server that
    runs secure aggregation picks the clients, so amplification by
    sampling, which needs the sample hidden, is not claimed. Its
    ``noise_multiplier`` (the Gaussian approximation
    ``sqrt(num_clients) * noise_std_per_client / l2_sensitivity``) is kept
    for reporting only.
    """

    noise_multiplier: float
    sampling: Sampling = "none"
    sampling_rate: float | None = None
    population: int | None = None
    sample_size: int | None = None
    count: int = 1
    mechanism: Mechanism = "gaussian"
    num_clients: int | None = None
    noise_std_per_client: float | None = None
    l2_sensitivity: float | None = None
    dimension: int | None = None
    replace_one: bool = False

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.mechanism not in get_args(Mechanism):
            raise ConfigError(
                'mechanism must be "gaussian" or "distributed_discrete_gaussian"; '
                f"got {self.mechanism!r}"
            )
        nm = self.noise_multiplier
        if _is_real(nm) and math.isinf(float(nm)):
            raise ConfigError(
                "noise_multiplier must be finite; got inf. A release without "
                "privacy loss needs no event: record nothing for it"
            )
        set_(
            self,
            "noise_multiplier",
            _positive_finite(
                "noise_multiplier", nm, " (noise std / L2 sensitivity, e.g. 1.0)"
            ),
        )
        self._check_sampling()
        set_(self, "count", _at_least("count", self.count, 1))
        self._check_mechanism()
        self._check_replace_one()

    def _check_replace_one(self) -> None:
        if not isinstance(self.replace_one, bool):
            raise ConfigError(
                f"replace_one must be true or false; got {self.replace_one!r}"
            )
        if not self.replace_one:
            return
        if self.sampling == "fixed":
            raise ConfigError(
                'sampling = "fixed" is always accounted under replace-one; '
                "leave replace_one unset"
            )
        if self.mechanism != "gaussian":
            raise ConfigError(
                "replace_one applies to the Gaussian mechanism only; a "
                "distributed discrete Gaussian is accounted under add-or-remove-one"
            )

    def _check_sampling(self) -> None:
        set_ = object.__setattr__
        if self.sampling not in get_args(Sampling):
            raise ConfigError(
                f'sampling must be "poisson", "fixed" or "none"; got {self.sampling!r}'
            )
        if self.sampling == "poisson":
            if self.sampling_rate is None:
                raise ConfigError('sampling = "poisson" needs sampling_rate in (0, 1]')
            set_(self, "sampling_rate", _check_sampling_rate(self.sampling_rate))
        elif self.sampling_rate is not None:
            raise ConfigError(
                f'sampling_rate is only for sampling = "poisson"; remove it or '
                f'set sampling = "poisson" (sampling is {self.sampling!r})'
            )
        if self.sampling == "fixed":
            if self.population is None or self.sample_size is None:
                raise ConfigError(
                    'sampling = "fixed" needs population and sample_size '
                    "(sample_size of population drawn without replacement)"
                )
            population = _at_least("population", self.population, 1)
            sample_size = _at_least("sample_size", self.sample_size, 1)
            if sample_size > population:
                raise ConfigError(
                    f"sample_size ({sample_size}) must be <= population "
                    f"({population}); lower sample_size"
                )
            set_(self, "population", population)
            set_(self, "sample_size", sample_size)
        elif self.population is not None or self.sample_size is not None:
            raise ConfigError(
                'population and sample_size are only for sampling = "fixed"; '
                f"remove them (sampling is {self.sampling!r})"
            )

    def _check_mechanism(self) -> None:
        ddg = ("num_clients", "noise_std_per_client", "l2_sensitivity", "dimension")
        if self.mechanism == "gaussian":
            given = [name for name in ddg if getattr(self, name) is not None]
            if given:
                raise ConfigError(
                    f"{', '.join(given)} only apply to mechanism = "
                    '"distributed_discrete_gaussian"; remove them'
                )
            return
        missing = [name for name in ddg if getattr(self, name) is None]
        if missing:
            raise ConfigError(
                'mechanism = "distributed_discrete_gaussian" needs '
                f"{', '.join(missing)}; build it with "
                "DpEventSpec.distributed_discrete_gaussian(...)"
            )
        values = _check_ddg(
            self.num_clients,
            self.noise_std_per_client,
            self.l2_sensitivity,
            self.dimension,
        )
        for name, value in zip(ddg, values, strict=True):
            object.__setattr__(self, name, value)
        if values[1] < 0.5:
            raise ConfigError(
                "noise_std_per_client of a distributed discrete Gaussian must be "
                f">= 1/2 integer unit (Kairouz et al., Theorem 1); got {values[1]}"
            )
        if self.sampling != "none":
            raise ConfigError(
                'a distributed discrete Gaussian is accounted with sampling = "none": '
                "the server that runs secure aggregation knows who took part, so "
                "amplification by sampling is not claimed"
            )
        expected = _ddg_noise_multiplier(*values[:3])
        if not math.isclose(self.noise_multiplier, expected, rel_tol=_DDG_REL_TOL):
            raise ConfigError(
                "noise_multiplier of a distributed discrete Gaussian must be "
                "sqrt(num_clients) * noise_std_per_client / l2_sensitivity = "
                f"{expected!r}; got {self.noise_multiplier!r}. Build it with "
                "DpEventSpec.distributed_discrete_gaussian(...)"
            )

    @classmethod
    def distributed_discrete_gaussian(
        cls,
        *,
        num_clients: int,
        noise_std_per_client: float,
        l2_sensitivity: float,
        dimension: int,
        sampling: Sampling = "none",
        sampling_rate: float | None = None,
        population: int | None = None,
        sample_size: int | None = None,
        count: int = 1,
    ) -> DpEventSpec:
        """Describe a distributed discrete Gaussian round (see the class Notes).

        Parameters
        ----------
        num_clients
            Clients whose discrete Gaussian noise secure aggregation sums, >= 1.
        noise_std_per_client
            Each client's noise std in integer units after scaling, > 0.
        l2_sensitivity
            L2 sensitivity of the sum in the same integer units, > 0.
        dimension
            Model dimension d, >= 1.
        sampling, sampling_rate, population, sample_size, count
            As for :class:`DpEventSpec`.

        Returns
        -------
        DpEventSpec
            With ``noise_multiplier`` set to the Gaussian approximation
            ``sqrt(num_clients) * noise_std_per_client / l2_sensitivity``.

        Raises
        ------
        ConfigError
            When a value is out of range.
        """
        values = _check_ddg(
            num_clients, noise_std_per_client, l2_sensitivity, dimension
        )
        return cls(
            noise_multiplier=_ddg_noise_multiplier(*values[:3]),
            sampling=sampling,
            sampling_rate=sampling_rate,
            population=population,
            sample_size=sample_size,
            count=count,
            mechanism="distributed_discrete_gaussian",
            num_clients=values[0],
            noise_std_per_client=values[1],
            l2_sensitivity=values[2],
            dimension=values[3],
        )

    @property
    def is_replace_one(self) -> bool:
        """Whether the event is accounted under replace-one neighbours.

        Returns
        -------
        bool
            True for fixed-size sampling or ``replace_one``, False
            (add-or-remove-one) otherwise.
        """
        return self.sampling == "fixed" or self.replace_one

    def to_dp_event(self) -> dp_accounting.DpEvent:
        """The ``dp_accounting`` event this spec describes.

        Returns
        -------
        dp_accounting.DpEvent
            ``GaussianDpEvent(noise_multiplier)``, wrapped in
            ``PoissonSampledDpEvent(sampling_rate, ...)`` for Poisson or
            ``SampledWithoutReplacementDpEvent(population, sample_size, ...)``
            for fixed-size sampling, and in ``SelfComposedDpEvent(..., count)``
            when ``count > 1``.

        Raises
        ------
        UnsupportedEventError
            For a distributed discrete Gaussian, which ``dp-accounting`` has
            no event for (:func:`epsilon` accounts it by :func:`ddg_rdp`).
        """
        if self.mechanism == "distributed_discrete_gaussian":
            raise UnsupportedEventError(
                "dp-accounting has no event for the distributed discrete Gaussian; "
                "account it with fedshield.privacy.accounting.epsilon()"
            )
        event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(
            self.noise_multiplier
        )
        if self.sampling == "poisson":
            event = dp_accounting.PoissonSampledDpEvent(self.sampling_rate, event)
        elif self.sampling == "fixed":
            event = dp_accounting.SampledWithoutReplacementDpEvent(
                self.population, self.sample_size, event
            )
        if self.count > 1:
            event = dp_accounting.SelfComposedDpEvent(event, self.count)
        return event

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict; :meth:`from_json` restores an equal spec.

        Returns
        -------
        dict
            Every field that is not ``None``, and ``replace_one`` only when
            ``True`` (so an add-or-remove-one spec writes what it always did).
        """
        return {
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None
            and not (field.name == "replace_one" and not self.replace_one)
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DpEventSpec:
        """Rebuild a spec written by :meth:`to_json`, validating it.

        Parameters
        ----------
        data
            A mapping with ``noise_multiplier`` and any other field names.

        Returns
        -------
        DpEventSpec
            The spec, validated as by the constructor.

        Raises
        ------
        ConfigError
            When ``data`` is not a mapping, lacks ``noise_multiplier``, has an
            unknown key, or holds an invalid value.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a DP event spec must be a JSON object; got {type(data).__name__}"
            )
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(str(key) for key in data if key not in names)
        if unknown:
            raise ConfigError(
                f"unknown DP event spec keys {unknown}; known: {sorted(names)}"
            )
        if "noise_multiplier" not in data:
            raise ConfigError("a DP event spec needs noise_multiplier")
        return cls(**data)


def _check_ddg(
    num_clients: object,
    noise_std_per_client: object,
    l2_sensitivity: object,
    dimension: object,
) -> tuple[int, float, float, int]:
    return (
        _at_least("num_clients", num_clients, 1),
        _positive_finite("noise_std_per_client", noise_std_per_client),
        _positive_finite("l2_sensitivity", l2_sensitivity),
        _at_least("dimension", dimension, 1),
    )


def _ddg_noise_multiplier(
    num_clients: int, noise_std_per_client: float, l2_sensitivity: float
) -> float:
    # Gaussian approximation: the sum of num_clients independent noises of
    # std s has std sqrt(num_clients) * s.
    return math.sqrt(num_clients) * noise_std_per_client / l2_sensitivity


def ddg_tau(num_clients: int, noise_std_per_client: float) -> float:
    """τ of Kairouz, Liu and Steinke (ICML 2021), Theorem 1.

    ``τ = 10 Σ_{k=1}^{n-1} exp(-2π² σ² k / (k + 1))``: how far the sum of
    ``n`` independent discrete Gaussians ``N_Z(0, σ²)`` is from a discrete
    Gaussian. 0 for one client; negligible once ``σ`` is a few units.
    """
    k = np.arange(1, num_clients, dtype=np.float64)
    sigma_sq = noise_std_per_client**2
    return float(10.0 * np.sum(np.exp(-2.0 * math.pi**2 * sigma_sq * k / (k + 1.0))))


def ddg_rdp(
    orders: np.ndarray | Sequence[float],
    *,
    num_clients: int,
    noise_std_per_client: float,
    l2_sensitivity: float,
    dimension: int,
) -> np.ndarray:
    """Rényi-DP of one release of the distributed discrete Gaussian, per order.

    The sum over ``n = num_clients`` clients of their integer vectors plus
    each client's ``N_Z(0, σ²)`` noise per coordinate (``σ =
    noise_std_per_client``), where one client's vector changes by at most
    ``Δ = l2_sensitivity`` in L2 norm, in ``d = dimension`` coordinates,
    satisfies (α, ε(α))-RDP for every α >= 1 with

    ``ε(α) = min(α Δ² / (2 n σ²) + τ d,  (α / 2) (Δ / (sqrt(n) σ) + τ sqrt(d))²)``

    and τ from :func:`ddg_tau`: Kairouz, Liu and Steinke, "The Distributed
    Discrete Gaussian Mechanism for Federated Learning with Secure
    Aggregation", ICML 2021 (arXiv:2102.06387), Theorem 1 (the sum of
    discrete Gaussians is close to one) with Proposition 14 / Eq. 17 (RDP
    of the multi-dimensional discrete Gaussian); it requires ``σ >= 1/2``.
    ``tests/privacy/test_distributed_accounting.py`` checks it against the
    exact Rényi divergence of small sums, computed by convolution.
    """
    if noise_std_per_client < 0.5:
        raise ConfigError(
            "the distributed discrete Gaussian's bound needs noise_std_per_client "
            f">= 1/2 (integer units); got {noise_std_per_client}"
        )
    alpha = np.asarray(orders, dtype=np.float64)
    n, sigma, delta, d = (
        num_clients,
        noise_std_per_client,
        l2_sensitivity,
        dimension,
    )
    tau = ddg_tau(n, sigma)
    scale = delta / (math.sqrt(n) * sigma)
    first = alpha * scale**2 / 2.0 + tau * d
    second = alpha / 2.0 * (scale + tau * math.sqrt(d)) ** 2
    result: np.ndarray = np.minimum(first, second)
    return result


def ddg_round_events(parameters: Any) -> tuple[DpEventSpec, ...]:
    """Every release one distributed round can make: one per survivor count.

    ``parameters`` describes the round (a
    :class:`~fedshield.privacy.distributed.DdgParameters`: ``threshold``
    ``t``, ``num_clients``, ``noise_std``, ``l2_sensitivity``, ``padded``);
    it completes with any number ``n`` of survivors from ``t`` to
    ``num_clients``, and releases the sum of their ``n`` noise shares. ε is
    *not* monotone in ``n``: more shares lower the Gaussian term of
    :func:`ddg_rdp` but raise τ (the sum of ``n`` discrete Gaussians is
    further from one), which wins when the per-client noise is a few
    integer units at most. A budget must therefore hold for every ``n``.
    """
    return tuple(
        DpEventSpec.distributed_discrete_gaussian(
            num_clients=n,
            noise_std_per_client=parameters.noise_std,
            l2_sensitivity=parameters.l2_sensitivity,
            dimension=parameters.padded,
        )
        for n in range(int(parameters.threshold), int(parameters.num_clients) + 1)
    )


def _ddg_curves(orders: np.ndarray, events: Sequence[DpEventSpec]) -> np.ndarray:
    curves = np.zeros((len(events), orders.size))
    for row, spec in enumerate(events):
        if spec.mechanism != "distributed_discrete_gaussian":
            raise ConfigError(f"not a distributed discrete Gaussian event: {spec!r}")
        curves[row] = spec.count * ddg_rdp(orders, **_ddg_fields(spec))
    return curves


def ddg_undominated(events: Sequence[DpEventSpec]) -> tuple[DpEventSpec, ...]:
    """``events`` less those whose RDP curve another's bounds at every order.

    Composed after anything, a release whose curve (:func:`ddg_rdp` at the
    accountant's orders) lies nowhere above another's costs no more ε than
    that one, so a worst case over ``events`` (``then`` of
    :func:`ddg_worst_epsilon`) needs only the rest. Of equal curves, the
    first is kept; the order of ``events`` is kept.

    Raises
    ------
    ConfigError
        When an event is not a distributed discrete Gaussian.
    """
    if not events:
        return ()
    orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    curves = _ddg_curves(orders, events)
    # A curve that bounds another has a sum at least as large: visiting by
    # decreasing sum (stable), every curve that could bound one comes first.
    kept: list[int] = []
    for i in np.argsort(-curves.sum(axis=1), kind="stable"):
        if kept and bool((curves[kept] >= curves[i]).all(axis=1).any()):
            continue
        kept.append(int(i))
    return tuple(events[i] for i in sorted(kept))


def ddg_undominated_releases(
    parameters: Any, keep: Sequence[DpEventSpec] = ()
) -> tuple[DpEventSpec, ...]:
    """:func:`ddg_undominated` of ``keep`` and ``ddg_round_events(parameters)``.

    For a worst case over the releases of many rounds (one per number of
    clients that may finish training), without building every event: the
    round's RDP curves are computed at once, and a release that one of
    ``keep`` or of the round's own costliest releases (those on the
    pointwise maximum) bounds at every order, with a relative margin of
    1e-9 for rounding, is left out before the exact comparison.

    Raises
    ------
    ConfigError
        As :func:`ddg_rdp` (a noise share below 1/2 unit).
    """
    orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    low, high = int(parameters.threshold), int(parameters.num_clients)
    if low > high:
        return ddg_undominated(keep)

    def event(survivors: int) -> DpEventSpec:  # as ddg_round_events builds it
        return DpEventSpec.distributed_discrete_gaussian(
            num_clients=survivors,
            noise_std_per_client=parameters.noise_std,
            l2_sensitivity=parameters.l2_sensitivity,
            dimension=parameters.padded,
        )

    first = event(low)
    ddg_rdp(orders, **_ddg_fields(first))  # validates the noise share
    sigma, d = float(parameters.noise_std), int(parameters.padded)
    survivors = np.arange(low, high + 1)
    # ddg_rdp of every survivor count at once; τ (ddg_tau) from one cumsum.
    k = np.arange(1, high, dtype=np.float64)
    terms = np.exp(-2.0 * math.pi**2 * sigma**2 * k / (k + 1.0))
    tau = 10.0 * np.concatenate(([0.0], np.cumsum(terms)))[survivors - 1]
    scale = float(parameters.l2_sensitivity) / (np.sqrt(survivors) * sigma)
    curves = np.minimum(
        orders[None, :] * (scale**2 / 2.0)[:, None] + (tau * d)[:, None],
        orders[None, :] / 2.0 * ((scale + tau * math.sqrt(d)) ** 2)[:, None],
    )
    tops = np.unique(curves.argmax(axis=0))
    bounds = np.vstack([_ddg_curves(orders, keep), curves[tops]])
    above = curves * (1.0 + 1e-9)
    bounded: np.ndarray = np.any(
        np.all(bounds[:, None, :] >= above[None, :, :], axis=2), axis=0
    )
    bounded[tops] = False
    rest = [event(int(n)) for n, out in zip(survivors, bounded, strict=True) if not out]
    return ddg_undominated([*keep, *rest])


def ddg_worst_epsilon(
    events: Sequence[DpEventSpec],
    counts: np.ndarray,
    delta: float,
    *,
    then: Sequence[DpEventSpec] = (),
) -> float:
    """The largest ε among parties that each took part in some of ``events``.

    Row ``i`` of ``counts`` (parties × events) says how many times party
    ``i`` took part in each distributed discrete Gaussian release; its RDP
    curve is the count-weighted sum of the events' (:func:`ddg_rdp`,
    composition adds RDP), converted to ε at ``delta`` by ``dp-accounting``.
    One conversion per distinct row, so thousands of clients cost little.

    With ``then`` (for example :func:`ddg_round_events` of the next round),
    every party, including one that took part in nothing yet, takes part in
    one more release, which may be any one of ``then``: the largest ε over
    the parties *and* the alternatives. Each party's ε with the pointwise
    largest curve of ``then`` bounds its ε with any one of them, so only
    the parties whose bound exceeds the worst found so far are converted
    once per alternative.

    Raises
    ------
    ConfigError
        When an event is not a distributed discrete Gaussian or ``counts``
        has the wrong shape.
    """
    delta = _check_delta(delta)
    matrix = np.asarray(counts, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[1] != len(events):
        raise ConfigError(
            f"counts must be (parties, {len(events)} events); got {matrix.shape}"
        )
    if matrix.shape[0] == 0:
        return 0.0
    orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
    curves = _ddg_curves(orders, events)

    def eps(curve: np.ndarray) -> float:
        value, _ = rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, delta)
        return float(value)

    rows = np.unique(matrix, axis=0)
    if not then:
        return max((eps(row @ curves) for row in rows if row.any()), default=0.0)
    alternatives = _ddg_curves(orders, then)
    envelope = alternatives.max(axis=0)
    bounds = [(eps(row @ curves + envelope), row @ curves) for row in rows]
    worst = 0.0
    for bound, spent in sorted(bounds, key=lambda pair: -pair[0]):
        if bound <= worst:
            break
        worst = max(worst, max(eps(spent + extra) for extra in alternatives))
    return worst


def calibrate_distributed_noise(
    target_epsilon: float,
    delta: float,
    *,
    rounds: int,
    parameters: Callable[[float], Any],
) -> float:
    """The smallest noise multiplier z whose ``rounds`` distributed rounds fit.

    Each round is the distributed discrete Gaussian that ``parameters(z)``
    describes (a :class:`~fedshield.privacy.distributed.DdgParameters` for
    the expected round), completed by any number of survivors from its
    threshold to all its clients (:func:`ddg_round_events`): a round is
    charged the pointwise largest of their RDP curves, which bounds every
    mix of survivor counts over the rounds (ε is not monotone in the
    survivors; with more than a few integer units of noise per client the
    largest is the threshold's). A client is assumed to take part in every
    round, so the reported ε of any run with these settings stays within
    the target (a client sampled in fewer rounds spends less). ε decreases
    with z (the per-client noise grows and the sensitivity in integer units
    shrinks), so z is found by bisection on log z to a relative 1e-4,
    rounded up.

    Raises
    ------
    ConfigError
        When even ``MAX_NOISE_MULTIPLIER`` misses the target, or the
        parameters are impossible at every z (too few bits).
    """
    if not _is_real(target_epsilon) or not 0 < float(target_epsilon) < math.inf:
        raise ConfigError(
            f"target_epsilon must be a finite number > 0; got {target_epsilon!r}"
        )
    target = float(target_epsilon)
    delta = _check_delta(delta)
    rounds = _at_least("rounds", rounds, 1)

    def eps(z: float) -> float:
        try:
            p = parameters(z)
        except ConfigError:
            return math.inf  # e.g. a per-client noise below 1/2 unit
        orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
        envelope = _ddg_curves(orders, ddg_round_events(p)).max(axis=0)
        value, _ = rdp.rdp_privacy_accountant.compute_epsilon(
            orders, rounds * envelope, delta
        )
        return float(value)

    # Bracket from z = 1 by doubling or halving. Where no parameters exist
    # (noise too large for the modulus' float sampling), eps is inf too:
    # then the target cannot be reached with these bits.
    low, high = 1.0, 1.0
    if eps(1.0) > target:
        while True:
            low, high = high, 2.0 * high
            at_high = eps(high)
            if at_high <= target:
                break
            if high >= MAX_NOISE_MULTIPLIER or math.isinf(at_high):
                raise ConfigError(
                    f"target_epsilon={target!r} is unreachable in distributed "
                    f"mode: noise_multiplier {high:g} gives epsilon {at_high:.4g} "
                    f"over {rounds} rounds; raise target_epsilon, lower run.rounds, "
                    "or change distributed_bits"
                )
    else:
        while True:
            low, high = low / 2.0, low
            if eps(low) > target:
                break
            if low <= MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"target_epsilon={target!r} is met even with noise_multiplier "
                    f"{low:g}: a target this loose protects nothing worth "
                    "calibrating; lower it"
                )
    while high / low > 1 + 1e-4:
        mid = math.sqrt(low * high)
        if eps(mid) <= target:
            high = mid
        else:
            low = mid
    return high


def _ddg_fields(spec: DpEventSpec) -> dict[str, Any]:
    return {
        "num_clients": spec.num_clients,
        "noise_std_per_client": spec.noise_std_per_client,
        "l2_sensitivity": spec.l2_sensitivity,
        "dimension": spec.dimension,
    }


def make_accountant(
    kind: AccountantKind,
    *,
    replace_one: bool = False,
    value_discretization_interval: float = PLD_VALUE_DISCRETIZATION_INTERVAL,
) -> dp_accounting.PrivacyAccountant:
    """A fresh ``dp_accounting`` accountant, built the one way fedshield does.

    Parameters
    ----------
    kind
        ``"pld"``: ``PLDAccountant(neighboring_relation=...,
        value_discretization_interval=...)``;
        ``"rdp"``: ``RdpAccountant(orders=None (library defaults),
        neighboring_relation=...)``.
    replace_one
        Account under replace-one neighbours instead of add-or-remove-one:
        fixed-size sampling (RDP only) and ``replace_one`` specs (Poisson
        replace-one: PLD only; :func:`epsilon` checks which).
    value_discretization_interval
        The PLD's grid step (default
        :data:`PLD_VALUE_DISCRETIZATION_INTERVAL`); see
        :func:`pld_value_discretization_interval` for the one that keeps a
        composition's grid bounded.

    Returns
    -------
    dp_accounting.PrivacyAccountant
        An accountant with an empty ledger.

    Raises
    ------
    ConfigError
        When ``kind`` is neither ``"pld"`` nor ``"rdp"``.
    """
    kind = _check_kind(kind)
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if replace_one
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    if kind == "rdp":
        return rdp.RdpAccountant(neighboring_relation=relation)
    return pld.PLDAccountant(
        neighboring_relation=relation,
        value_discretization_interval=value_discretization_interval,
    )


def _pld_release(unit: DpEventSpec, total: int) -> tuple[float, float, int, bool]:
    """(σ, q, times, replace-one) of the PLD ``PLDAccountant`` builds for ``unit``.

    One PLD of the Gaussian with std σ, subsampled at q, self-composed
    ``times`` times, under replace-one or add-or-remove-one.
    """
    if unit.sampling == "poisson":
        assert unit.sampling_rate is not None
        return unit.noise_multiplier, unit.sampling_rate, total, unit.replace_one
    # A plain Gaussian repeated `total` times is one Gaussian of std σ/sqrt(total).
    return unit.noise_multiplier / math.sqrt(total), 1.0, 1, unit.replace_one


def _adjacencies(q: float, replace_one: bool = False) -> tuple[Any, ...]:
    kinds = pld.privacy_loss_mechanism.AdjacencyType
    if replace_one:
        return (kinds.REPLACE,)
    return (kinds.REMOVE,) if q == 1.0 else (kinds.REMOVE, kinds.ADD)


@functools.lru_cache(maxsize=256)
def _pld_release_width(sigma: float, q: float, replace_one: bool = False) -> float:
    """The span of one release's privacy loss (nats) in the library's PLD.

    The bounds ``from_gaussian_mechanism`` builds its grid between (its
    connect-the-dots bounds at its default tail truncation), without
    building the grid: ``width / interval + 1`` points.
    """
    widths: list[float] = []
    for adjacency in _adjacencies(q, replace_one):
        loss = pld.privacy_loss_mechanism.GaussianPrivacyLoss(
            sigma, sampling_prob=q, adjacency_type=adjacency
        )
        bounds = loss.connect_dots_bounds()
        assert bounds.epsilon_upper is not None and bounds.epsilon_lower is not None
        widths.append(float(bounds.epsilon_upper - bounds.epsilon_lower))
    return max(widths)


@functools.lru_cache(maxsize=256)
def _pld_composed_points(
    sigma: float, q: float, times: int, interval: float, replace_one: bool = False
) -> int:
    """Grid points of the PLD of ``times`` releases (both adjacencies).

    ``self_compose`` keeps only the range its Chernoff bound
    (``dp_accounting.pld.common.compute_self_convolve_bounds``) does not
    truncate; that range is computed here on the one release's PLD (at most
    :data:`PLD_MAX_RELEASE_POINTS` points) without the FFT. Never more than
    ``times`` times one release's points.
    """
    adjacencies = len(_adjacencies(q, replace_one))
    single = math.ceil(_pld_release_width(sigma, q, replace_one) / interval) + 2
    if times == 1 or (single - 1) * times + 1 <= PLD_MAX_POINTS // 2:
        return adjacencies * ((single - 1) * times + 1)
    relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if replace_one
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    )
    release = pld.privacy_loss_distribution.from_gaussian_mechanism(
        sigma,
        value_discretization_interval=interval,
        sampling_prob=q,
        neighboring_relation=relation,
    )
    points = 0
    for name in ("_pmf_remove", "_pmf_add")[:adjacencies]:
        probs = getattr(getattr(release, name, None), "_probs", None)
        if probs is None:
            # Not the dense PMF this was written against: the plain bound.
            points += (single - 1) * times + 1
            continue
        low, high = pld.common.compute_self_convolve_bounds(
            probs, times, _PLD_TAIL_MASS
        )
        points += high - low + 1
    return points


def pld_value_discretization_interval(events: Sequence[DpEventSpec]) -> float:
    """The PLD grid step fedshield uses to account ``events``.

    :data:`PLD_VALUE_DISCRETIZATION_INTERVAL` unless the grid would hold
    more than :data:`PLD_MAX_RELEASE_POINTS` points for one release or
    :data:`PLD_MAX_POINTS` for the composition (tiny noise multipliers, very
    many releases): then the smallest coarser step that fits, found from
    the grid sizes ``dp-accounting`` would use (never by building the large
    grid). A coarser pessimistic PLD still gives an upper bound on ε,
    usually a looser one (by at most about the step per release).

    Raises
    ------
    ConfigError
        If even :data:`PLD_MAX_INTERVAL` does not fit: the message names
        the noise multiplier and suggests the RDP accountant.
    """
    releases = [
        _pld_release(unit, total)
        for unit, total in _group(events).items()
        if unit.mechanism == "gaussian"
    ]
    interval = PLD_VALUE_DISCRETIZATION_INTERVAL
    if not releases:
        return interval
    widest = max(
        _pld_release_width(sigma, q, replace) for sigma, q, _, replace in releases
    )
    # ceil() at both ends of the grid adds up to two points.
    interval = max(interval, widest / (PLD_MAX_RELEASE_POINTS - 2))
    for _ in range(8):
        if interval > PLD_MAX_INTERVAL:
            break
        points = sum(
            _pld_composed_points(sigma, q, times, interval, replace)
            for sigma, q, times, replace in releases
        )
        if points <= PLD_MAX_POINTS:
            return interval
        interval *= 1.25 * points / PLD_MAX_POINTS
    smallest = min(unit.noise_multiplier for unit in _group(events))
    raise ConfigError(
        f"the PLD accountant cannot account noise_multiplier {smallest:g} "
        f"({sum(unit.count for unit in events)} releases) in bounded memory: one "
        f"release's privacy loss spans {widest:.3g} nats, so its grid would need "
        f"a step coarser than {PLD_MAX_INTERVAL:g} to stay under "
        f"{PLD_MAX_POINTS:,} points; use the RDP accountant (accountant = "
        '"rdp", --accountant rdp), or a larger noise multiplier'
    )


def _relation(specs: Iterable[DpEventSpec], kind: AccountantKind) -> bool:
    """Whether ``specs`` are accounted under replace-one; refuse what cannot be."""
    specs = list(specs)
    relations = {spec.is_replace_one for spec in specs}
    if len(relations) > 1:
        raise UnsupportedEventError(_MIXED_RELATIONS)
    if relations != {True}:
        return False
    if kind == "pld" and any(spec.sampling == "fixed" for spec in specs):
        raise UnsupportedEventError(_FIXED_WITH_PLD)
    if kind == "rdp" and any(spec.sampling != "fixed" for spec in specs):
        raise UnsupportedEventError(_REPLACE_ONE_WITH_RDP)
    return True


def _group(specs: Iterable[DpEventSpec]) -> dict[DpEventSpec, int]:
    """Identical specs, counted: ``{spec with count 1: total count}``."""
    groups: dict[DpEventSpec, int] = {}
    for spec in specs:
        unit = spec if spec.count == 1 else dataclasses.replace(spec, count=1)
        groups[unit] = groups.get(unit, 0) + spec.count
    return groups


def _epsilon_of_groups(
    groups: Mapping[DpEventSpec, int], delta: float, kind: AccountantKind
) -> float:
    if not groups:
        return 0.0
    distributed = [u for u in groups if u.mechanism == "distributed_discrete_gaussian"]
    if distributed:
        if len(distributed) != len(groups):
            raise UnsupportedEventError(_MIXED_DDG)
        orders = np.asarray(rdp.rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
        curve = sum(
            (
                total * ddg_rdp(orders, **_ddg_fields(unit))
                for unit, total in groups.items()
            ),
            np.zeros_like(orders),
        )
        eps, _ = rdp.rdp_privacy_accountant.compute_epsilon(orders, curve, delta)
        return float(eps)
    replace_one = _relation(groups, kind)
    interval = PLD_VALUE_DISCRETIZATION_INTERVAL
    if kind == "pld":
        interval = pld_value_discretization_interval(
            [dataclasses.replace(unit, count=total) for unit, total in groups.items()]
        )
    accountant = make_accountant(
        kind, replace_one=replace_one, value_discretization_interval=interval
    )
    for unit, total in groups.items():
        event = unit.to_dp_event()
        if total > 1:
            event = dp_accounting.SelfComposedDpEvent(event, total)
        try:
            accountant.compose(event)
        except dp_accounting.UnsupportedEventError as err:  # pragma: no cover
            raise UnsupportedEventError(str(err)) from err
    return float(accountant.get_epsilon(delta))


def epsilon(
    events: Sequence[DpEventSpec], delta: float, accountant: AccountantKind = "pld"
) -> float:
    """ε at ``delta`` of the composition of ``events``.

    Identical specs are grouped into one ``SelfComposedDpEvent`` (composition
    is commutative), so a thousand identical rounds cost one composition.

    Parameters
    ----------
    events
        The releases, in any order.
    delta
        Target δ in (0, 1).
    accountant
        ``"pld"`` or ``"rdp"`` (see :func:`make_accountant`).

    Returns
    -------
    float
        ε; 0.0 when ``events`` is empty; ``inf`` when the accountant
        certifies no ε at ``delta`` (the PLD accountant below about 1e-15).
        With PLD, on a grid :func:`pld_value_discretization_interval` keeps
        bounded.

    Raises
    ------
    ConfigError
        When ``delta`` or ``accountant`` is invalid, or the PLD grid would
        exceed its bounds even at :data:`PLD_MAX_INTERVAL` (noise
        multipliers around 1e-4 and below: use ``"rdp"``).
    UnsupportedEventError
        For fixed-size sampling with the PLD accountant, or fixed-size
        sampling mixed with Poisson or no sampling.
    """
    delta = _check_delta(delta)
    kind = _check_kind(accountant)
    for spec in events:
        if not isinstance(spec, DpEventSpec):
            raise ConfigError(f"events must be DpEventSpec; got {spec!r}")
    return _epsilon_of_groups(_group(events), delta, kind)


def epsilon_for(
    sampling_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    accountant: AccountantKind = "pld",
) -> float:
    """ε of ``steps`` Poisson-subsampled Gaussian releases (DP-SGD, DP-FedAvg).

    Parameters
    ----------
    sampling_rate
        q in (0, 1]: the probability that a record takes part in a step.
    noise_multiplier
        σ > 0: noise std / L2 sensitivity.
    steps
        Number of steps (or rounds), >= 1.
    delta
        Target δ in (0, 1).
    accountant
        ``"pld"`` or ``"rdp"``.

    Returns
    -------
    float
        ε at ``delta``.

    Raises
    ------
    ConfigError
        When a value is out of range; the message names it.
    """
    steps = _at_least("steps", steps, 1)
    spec = DpEventSpec(
        noise_multiplier,
        sampling="poisson",
        sampling_rate=sampling_rate,
        count=steps,
    )
    return epsilon([spec], delta, accountant)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    *,
    sampling_rate: float | None,
    steps: int,
    accountant: AccountantKind = "pld",
    sampling: Sampling = "poisson",
    population: int | None = None,
    sample_size: int | None = None,
    replace_one: bool = False,
) -> float:
    """The smallest σ whose ``steps`` releases stay within ``target_epsilon``.

    Brackets σ by doubling or halving from 1, then searches the bracket with
    ``dp_accounting.calibrate_dp_mechanism``, which returns a σ whose ε is
    at most the target, within 1e-4 (relative) of the smallest such σ.

    Parameters
    ----------
    target_epsilon
        ε to reach, finite and > 0.
    delta
        Target δ in (0, 1).
    sampling_rate
        q for Poisson sampling; ``None`` for fixed-size or no sampling.
    steps
        Releases to compose, >= 1.
    accountant
        ``"pld"`` or ``"rdp"``.
    sampling
        ``"poisson"``, ``"fixed"`` (with ``population`` and ``sample_size``;
        RDP only) or ``"none"``.
    population, sample_size
        For ``sampling="fixed"``.
    replace_one
        Account Poisson or no sampling under replace-one neighbours (see
        :class:`DpEventSpec`; Poisson replace-one needs the PLD accountant).

    Returns
    -------
    float
        σ in [``MIN_NOISE_MULTIPLIER``, ``MAX_NOISE_MULTIPLIER``].

    Raises
    ------
    ConfigError
        When a value is invalid, or the target needs σ above
        ``MAX_NOISE_MULTIPLIER`` (unreachable) or is met even below
        ``MIN_NOISE_MULTIPLIER`` (too loose to mean anything).
    UnsupportedEventError
        For fixed-size sampling with the PLD accountant, or Poisson
        replace-one with the RDP accountant.
    """
    if not _is_real(target_epsilon) or not 0 < float(target_epsilon) < math.inf:
        raise ConfigError(
            f"target_epsilon must be a finite number > 0; got {target_epsilon!r}"
        )
    target = float(target_epsilon)
    delta = _check_delta(delta)
    kind = _check_kind(accountant)
    steps = _at_least("steps", steps, 1)

    def spec_for(sigma: float) -> DpEventSpec:
        return DpEventSpec(
            sigma,
            sampling=sampling,
            sampling_rate=sampling_rate,
            population=population,
            sample_size=sample_size,
            count=steps,
            replace_one=replace_one,
        )

    relation = _relation([spec_for(1.0)], kind)

    def eps(sigma: float) -> float:
        return _epsilon_of_groups(_group([spec_for(sigma)]), delta, kind)

    at_max = eps(MAX_NOISE_MULTIPLIER)
    if at_max > target:
        raise ConfigError(
            f"target_epsilon={target!r} is unreachable: even noise_multiplier "
            f"{MAX_NOISE_MULTIPLIER:g} gives epsilon {at_max:.4g} at "
            f"delta={delta!r}; raise target_epsilon or delta, or lower steps or "
            "the sampling rate"
        )
    low, high = _bracket(eps, target)
    # The grid the smallest sigma of the bracket needs serves the whole
    # search (a larger sigma's is never coarser).
    interval = PLD_VALUE_DISCRETIZATION_INTERVAL
    if kind == "pld":
        interval = pld_value_discretization_interval([spec_for(low)])
    sigma = dp_accounting.calibrate_dp_mechanism(
        lambda: make_accountant(
            kind, replace_one=relation, value_discretization_interval=interval
        ),
        lambda value: spec_for(value).to_dp_event(),
        target,
        delta,
        bracket_interval=dp_accounting.ExplicitBracketInterval(low, high),
        tol=low * 1e-4,
    )
    # epsilon() sizes its own grid for sigma; should that grid differ from
    # the search's and give more than the target, fall back to the bracket's
    # high end, which epsilon() itself put within it.
    if eps(float(sigma)) > target:
        return high
    return float(sigma)


def _bracket(eps: Callable[[float], float], target: float) -> tuple[float, float]:
    """σ_low with ε above the target and σ_high with ε at or below it."""
    sigma = 1.0
    if eps(sigma) > target:
        while True:
            high = min(2 * sigma, MAX_NOISE_MULTIPLIER)
            if eps(high) <= target:
                return sigma, high
            sigma = high
    while True:
        low = max(sigma / 2, MIN_NOISE_MULTIPLIER)
        at_low = eps(low)
        if at_low > target:
            return low, sigma
        if low == MIN_NOISE_MULTIPLIER:
            raise ConfigError(
                f"target_epsilon={target!r} is met even with noise_multiplier "
                f"{MIN_NOISE_MULTIPLIER:g} (epsilon {at_low:.4g}): a target this "
                "loose protects nothing worth calibrating; lower target_epsilon"
            )
        sigma = low


class PrivacyLedger:
    """Every round's DP event, composed; serialisable into a checkpoint.

    Parameters
    ----------
    accountant
        ``"pld"`` or ``"rdp"`` (see :func:`make_accountant`).
    delta
        The δ at which :meth:`epsilon` reports ε, in (0, 1).
    events
        ``(round_idx, spec)`` pairs to record first, in order (as
        :meth:`from_json` does when a run resumes).

    Raises
    ------
    ConfigError
        When ``accountant``, ``delta`` or an event is invalid.
    UnsupportedEventError
        When ``events`` cannot be accounted together (see :meth:`record`).

    Notes
    -----
    The ledger keeps a count per distinct spec, so :meth:`epsilon` composes
    one ``SelfComposedDpEvent`` per distinct spec, whatever the number of
    rounds, and caches ε until the next :meth:`record`.
    """

    def __init__(
        self,
        accountant: AccountantKind = "pld",
        delta: float = 1e-5,
        events: Sequence[tuple[int, DpEventSpec]] = (),
    ) -> None:
        self._kind: AccountantKind = _check_kind(accountant)
        self._delta = _check_delta(delta)
        self._events: list[tuple[int, DpEventSpec]] = []
        self._groups: dict[DpEventSpec, int] = {}
        self._cached: float | None = None
        for round_idx, spec in events:
            self.record(round_idx, spec)

    @property
    def accountant(self) -> AccountantKind:
        """The accountant kind, ``"pld"`` or ``"rdp"``."""
        return self._kind

    @property
    def delta(self) -> float:
        """The δ at which ε is reported."""
        return self._delta

    @property
    def events(self) -> tuple[tuple[int, DpEventSpec], ...]:
        """Every recorded ``(round_idx, spec)``, in recording order."""
        return tuple(self._events)

    def __len__(self) -> int:
        """Number of recorded events."""
        return len(self._events)

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger(accountant={self._kind!r}, delta={self._delta!r}, "
            f"events={len(self._events)})"
        )

    def _check(self, spec: object) -> DpEventSpec:
        if not isinstance(spec, DpEventSpec):
            raise ConfigError(f"spec must be a DpEventSpec; got {spec!r}")
        mechanisms = {unit.mechanism for unit in self._groups} | {spec.mechanism}
        if len(mechanisms) > 1:
            raise UnsupportedEventError(_MIXED_DDG)
        _relation([*self._groups, spec], self._kind)
        return spec

    def record(self, round_idx: int, spec: DpEventSpec) -> None:
        """Add the release of round ``round_idx``; ledger unchanged on error.

        Parameters
        ----------
        round_idx
            0-based round index, >= the last recorded one (a round may
            record several events).
        spec
            What the round released.

        Raises
        ------
        ConfigError
            When ``round_idx`` is negative or goes back in rounds, or ``spec``
            is not a :class:`DpEventSpec`.
        UnsupportedEventError
            When ``spec`` uses fixed-size sampling and the ledger's accountant
            is PLD, or mixes fixed-size with Poisson or no sampling.
        """
        round_idx = _at_least("round_idx", round_idx, 0)
        if self._events and round_idx < self._events[-1][0]:
            raise ConfigError(
                f"round_idx {round_idx} goes back in rounds: the ledger already "
                f"holds round {self._events[-1][0]}"
            )
        spec = self._check(spec)
        self._events.append((round_idx, spec))
        unit = spec if spec.count == 1 else dataclasses.replace(spec, count=1)
        self._groups[unit] = self._groups.get(unit, 0) + spec.count
        self._cached = None

    def epsilon(self) -> float:
        """ε at :attr:`delta` of everything recorded.

        Returns
        -------
        float
            ε; 0.0 when nothing has been recorded.
        """
        if self._cached is None:
            self._cached = _epsilon_of_groups(self._groups, self._delta, self._kind)
        return self._cached

    def epsilon_if(self, spec: DpEventSpec) -> float:
        """ε after one more release ``spec``, without recording it.

        Parameters
        ----------
        spec
            The release being considered.

        Returns
        -------
        float
            ε at :attr:`delta` of everything recorded plus ``spec``.

        Raises
        ------
        ConfigError
            When ``spec`` is not a :class:`DpEventSpec`.
        UnsupportedEventError
            As for :meth:`record`.
        """
        spec = self._check(spec)
        groups = dict(self._groups)
        for unit, total in _group([spec]).items():
            groups[unit] = groups.get(unit, 0) + total
        return _epsilon_of_groups(groups, self._delta, self._kind)

    def to_json(self) -> dict[str, Any]:
        """A JSON-compatible dict; :meth:`from_json` restores an equal ledger.

        Returns
        -------
        dict
            ``{"format": "fedshield.privacy_ledger", "version": 1,
            "accountant", "delta", "events": [{"spec", "rounds"}, ...]}``,
            where each entry holds a run of consecutive identical specs and
            the round of each.
        """
        runs: list[dict[str, Any]] = []
        previous: DpEventSpec | None = None
        for round_idx, spec in self._events:
            if previous is not None and spec == previous:
                runs[-1]["rounds"].append(round_idx)
            else:
                runs.append({"spec": spec.to_json(), "rounds": [round_idx]})
            previous = spec
        return {
            "format": "fedshield.privacy_ledger",
            "version": 1,
            "accountant": self._kind,
            "delta": self._delta,
            "events": runs,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild a ledger written by :meth:`to_json`, validating it.

        Parameters
        ----------
        data
            The dict :meth:`to_json` returned (after a JSON round trip).

        Returns
        -------
        PrivacyLedger
            A ledger with the same accountant, δ and events, hence the same ε.

        Raises
        ------
        ConfigError
            When ``data`` is malformed or holds an invalid value.
        UnsupportedEventError
            When its events cannot be accounted together.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(
                f"a privacy ledger must be a JSON object; got {type(data).__name__}"
            )
        if data.get("format") != "fedshield.privacy_ledger" or data.get("version") != 1:
            raise ConfigError(
                "not a fedshield privacy ledger (version 1): format="
                f"{data.get('format')!r}, version={data.get('version')!r}"
            )
        missing = [k for k in ("accountant", "delta", "events") if k not in data]
        if missing:
            raise ConfigError(f"privacy ledger lacks {missing}")
        runs = data["events"]
        if not isinstance(runs, list):
            raise ConfigError("privacy ledger events must be a list")
        events: list[tuple[int, DpEventSpec]] = []
        for run in runs:
            if (
                not isinstance(run, Mapping)
                or set(run) != {"spec", "rounds"}
                or not isinstance(run["rounds"], list)
            ):
                raise ConfigError(
                    'each privacy ledger entry must be {"spec": ..., "rounds": '
                    f"[...]}}; got {run!r}"
                )
            spec = DpEventSpec.from_json(run["spec"])
            events.extend((round_idx, spec) for round_idx in run["rounds"])
        return cls(data["accountant"], data["delta"], events)
