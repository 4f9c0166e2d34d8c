"""Split a data set's rows among simulated clients.

Every partitioner returns one sorted ``int64`` index array per client; each
row index ``0 .. n-1`` lands in exactly one client. All randomness comes from
the ``rng`` argument, so the same seed gives the same partition.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import numpy as np

from fedshield.errors import ConfigError, PartitionError

__all__ = ["PARTITIONS", "natural_client_names", "partition"]

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "quantity", "natural")
"""Methods :func:`partition` accepts."""

_DIRICHLET_MAX_TRIES: Final = 10
"""How many Dirichlet draws :func:`partition` makes before giving up."""

_MAX_LISTED: Final = 5
_LABEL_SKEW: Final = frozenset({"dirichlet", "shards"})


@dataclass(frozen=True, slots=True)
class _Request:
    labels: np.ndarray
    num_clients: int
    rng: np.random.Generator
    alpha: float
    shards_per_client: int
    sigma: float
    groups: np.ndarray | None
    min_samples: int


def partition(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    rng: np.random.Generator,
    alpha: float = 0.5,
    shards_per_client: int = 2,
    sigma: float = 1.0,
    groups: np.ndarray | None = None,
    min_samples: int = 1,
) -> list[np.ndarray]:
    """Partition the rows of a labelled data set among ``num_clients`` clients.

    Parameters
    ----------
    labels
        Integer class label of each row, shape ``(n,)``; or float regression
        targets, which only the label-free methods (``"iid"``,
        ``"quantity"``, ``"natural"``) accept.
    num_clients
        Number of clients, ``1 <= num_clients <= n``.
    method
        One of :data:`PARTITIONS`:

        ``"iid"``
            Shuffle, then split as evenly as possible (sizes differ by <= 1).
        ``"dirichlet"``
            Label skew: for each class, client shares are drawn from
            ``Dir(alpha * 1_K)`` and the class's shuffled rows are cut in those
            proportions [1]_. Smaller ``alpha`` gives more skew.
        ``"shards"``
            Label skew: rows sorted by label are cut into
            ``num_clients * shards_per_client`` contiguous shards and each
            client gets ``shards_per_client`` random shards [2]_.
        ``"quantity"``
            Quantity skew with IID labels: client sizes are proportional to
            ``LogNormal(0, sigma)`` draws, each at least ``min_samples``.
        ``"natural"``
            One client per distinct value of ``groups`` (e.g. the hospital),
            in sorted order of the group name (see
            :func:`natural_client_names`); ``rng`` is unused.
    rng
        Source of all randomness.
    alpha
        Dirichlet concentration, ``> 0`` (``"dirichlet"`` only).
    shards_per_client
        Shards per client, ``>= 1`` (``"shards"`` only).
    sigma
        Log-normal spread of client sizes, ``>= 0`` (``"quantity"`` only).
    groups
        Natural client of each row, shape ``(n,)`` (required for
        ``"natural"``, ignored by the other methods).
    min_samples
        Smallest acceptable client size, ``>= 0``.

    Returns
    -------
    list of numpy.ndarray
        ``num_clients`` sorted ``int64`` arrays of row indices that together
        cover ``0 .. n-1`` exactly once.

    Raises
    ------
    ConfigError
        If an argument is invalid: ``num_clients`` not in ``1..n``, ``alpha``
        not > 0, ``sigma`` < 0, ``shards_per_client`` < 1 or more shards than
        rows, an unknown ``method``, ``"natural"`` without ``groups`` or with
        ``num_clients`` different from the number of groups, or a label-skew
        method (``"dirichlet"``, ``"shards"``) on regression targets.
    PartitionError
        If a client would get fewer than ``min_samples`` rows. The message
        names the client, its size and what to change.

    Notes
    -----
    ``"dirichlet"`` may leave a client nearly empty for small ``alpha``. It
    then draws again from the same ``rng`` stream, at most
    ``_DIRICHLET_MAX_TRIES`` (10) times in all, and raises
    :class:`~fedshield.errors.PartitionError` if no draw gives every client
    ``min_samples`` rows. The result stays deterministic for a given seed,
    and the draw that is returned is an unconditioned Dirichlet sample only
    when the first try succeeds.

    References
    ----------
    .. [1] T.-M. H. Hsu, H. Qi, M. Brown, "Measuring the Effects of
       Non-Identical Data Distribution for Federated Visual Classification",
       arXiv:1909.06335, 2019, Section 3.
    .. [2] H. B. McMahan et al., "Communication-Efficient Learning of Deep
       Networks from Decentralized Data", AISTATS 2017, Section 3.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([0, 0, 1, 1, 2, 2, 3])
    >>> parts = partition(labels, 3, method="iid", rng=np.random.default_rng(0))
    >>> [len(p) for p in parts]
    [3, 2, 2]
    >>> sorted(np.concatenate(parts).tolist()) == list(range(7))
    True
    """
    labels = np.asarray(labels)
    groups = None if groups is None else np.asarray(groups)
    _validate(
        labels,
        num_clients,
        method=method,
        alpha=alpha,
        shards_per_client=shards_per_client,
        sigma=sigma,
        groups=groups,
        min_samples=min_samples,
    )
    request = _Request(
        labels=labels,
        num_clients=int(num_clients),
        rng=rng,
        alpha=float(alpha),
        shards_per_client=int(shards_per_client),
        sigma=float(sigma),
        groups=groups,
        min_samples=int(min_samples),
    )
    parts = _METHODS[method](request)
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def natural_client_names(groups: np.ndarray) -> list[str]:
    """Return the client names of a ``"natural"`` partition, in client order.

    Parameters
    ----------
    groups
        Natural client of each row (e.g. ``Dataset.groups``).

    Returns
    -------
    list of str
        The distinct group values as strings, sorted; client ``k`` of
        ``partition(..., method="natural")`` holds the rows of name ``k``.

    Examples
    --------
    >>> natural_client_names(np.array(["VA", "Cleveland", "VA", "Hungary"]))
    ['Cleveland', 'Hungary', 'VA']
    """
    names: list[str] = np.unique(np.asarray(groups).astype(np.str_)).tolist()
    return names


def _validate(
    labels: np.ndarray,
    num_clients: int,
    *,
    method: str,
    alpha: float,
    shards_per_client: int,
    sigma: float,
    groups: np.ndarray | None,
    min_samples: int,
) -> None:
    problems: list[str] = []
    n = labels.shape[0] if labels.ndim == 1 else 0
    if labels.ndim == 1 and np.issubdtype(labels.dtype, np.floating):
        if method in _LABEL_SKEW:
            problems.append(
                f"method {method!r} skews class labels, but these labels are "
                "regression targets (floats); use 'iid', 'quantity' or 'natural'"
            )
    elif labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        problems.append(
            "`labels` must be a 1-D integer (or, for regression, float) array; "
            f"got {labels.ndim}-D {labels.dtype}"
        )
    if method not in _METHODS:
        close = difflib.get_close_matches(str(method), PARTITIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        choices = ", ".join(repr(m) for m in PARTITIONS)
        problems.append(f"`method` must be one of {choices}; got {method!r}{hint}")
    if num_clients < 1:
        problems.append(f"`num_clients` must be >= 1; got {num_clients}")
    elif num_clients > n:
        problems.append(
            f"`num_clients` must be <= the number of rows ({n}); got {num_clients}"
        )
    if not (math.isfinite(alpha) and alpha > 0):
        problems.append(f"`alpha` must be finite and > 0; got {alpha}")
    if not (math.isfinite(sigma) and sigma >= 0):
        problems.append(f"`sigma` must be finite and >= 0; got {sigma}")
    if shards_per_client < 1:
        problems.append(f"`shards_per_client` must be >= 1; got {shards_per_client}")
    elif method == "shards" and 1 <= num_clients <= n < num_clients * shards_per_client:
        problems.append(
            "`num_clients * shards_per_client` must be <= the number of rows "
            f"({n}); got {num_clients} * {shards_per_client}"
        )
    if min_samples < 0:
        problems.append(f"`min_samples` must be >= 0; got {min_samples}")
    if method == "natural":
        problems += _natural_problems(groups, n, num_clients)
    if problems:
        raise ConfigError("invalid partition arguments: " + "; ".join(problems) + ".")


def _natural_problems(groups: np.ndarray | None, n: int, num_clients: int) -> list[str]:
    if groups is None:
        return [
            "`groups` is required for method 'natural' (this data set has no "
            "natural clients; use 'dirichlet' or 'shards')"
        ]
    if groups.shape != (n,):
        return [f"`groups` must have shape ({n},) like `labels`; got {groups.shape}"]
    names = natural_client_names(groups)
    if num_clients != len(names):
        return [
            f"`num_clients` must equal the number of groups ({len(names)}: "
            f"{', '.join(names)}) for method 'natural'; got {num_clients}"
        ]
    return []


def _check_sizes(
    parts: list[np.ndarray], request: _Request, *, fix: str, names: list[str] | None
) -> None:
    sizes = [len(p) for p in parts]
    small = [k for k, size in enumerate(sizes) if size < request.min_samples]
    if not small:
        return
    listed = ", ".join(
        f"{_client_label(k, names)} gets {sizes[k]}" for k in small[:_MAX_LISTED]
    )
    more = f" and {len(small) - _MAX_LISTED} more" if len(small) > _MAX_LISTED else ""
    raise PartitionError(
        f"{len(small)} of {request.num_clients} clients would get fewer than "
        f"min_samples={request.min_samples} rows ({listed}{more}); {fix}."
    )


def _client_label(k: int, names: list[str] | None) -> str:
    return f"client {k}" if names is None else f"client {k} ({names[k]!r})"


def _apportion(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``total``, proportional to ``weights``.

    Largest remainder method; ties go to the lower index.
    """
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(np.int64)
    order = np.argsort(-(exact - counts), kind="stable")
    counts[order[: total - int(counts.sum())]] += 1
    out: np.ndarray = counts
    return out


def _split_by_counts(indices: np.ndarray, counts: np.ndarray) -> list[np.ndarray]:
    assert int(counts.sum()) == len(indices), "counts must cover every index"
    return np.split(indices, np.cumsum(counts)[:-1])


def _iid(request: _Request) -> list[np.ndarray]:
    n = len(request.labels)
    parts = np.array_split(request.rng.permutation(n), request.num_clients)
    _check_sizes(
        parts,
        request,
        fix=(
            f"use at most {n // max(request.min_samples, 1)} clients or a smaller "
            "min_samples"
        ),
        names=None,
    )
    return parts


def _dirichlet_once(request: _Request) -> list[np.ndarray]:
    labels, k, rng = request.labels, request.num_clients, request.rng
    buckets: list[list[np.ndarray]] = [[] for _ in range(k)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        shares = rng.dirichlet(np.full(k, request.alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for bucket, piece in zip(buckets, np.split(members, cuts), strict=True):
            bucket.append(piece)
    return [np.concatenate(b) for b in buckets]


def _dirichlet(request: _Request) -> list[np.ndarray]:
    fix = (
        f"no draw in {_DIRICHLET_MAX_TRIES} tries gave every client enough rows; "
        f"use fewer clients, a larger alpha (got {request.alpha}) or a smaller "
        "min_samples"
    )
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts = _dirichlet_once(request)
        if all(len(p) >= request.min_samples for p in parts):
            return parts
    _check_sizes(parts, request, fix=fix, names=None)
    raise AssertionError("unreachable: _check_sizes raises")  # pragma: no cover


def _shards(request: _Request) -> list[np.ndarray]:
    labels, k, rng = request.labels, request.num_clients, request.rng
    per_client = request.shards_per_client
    # Shuffle first so rows of one class are in random order within the sort.
    shuffled = rng.permutation(len(labels))
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]
    shards = np.array_split(by_label, k * per_client)
    owner = rng.permutation(k * per_client).reshape(k, per_client)
    parts = [np.concatenate([shards[s] for s in row]) for row in owner]
    _check_sizes(
        parts, request, fix="use fewer clients or a smaller min_samples", names=None
    )
    return parts


def _quantity(request: _Request) -> list[np.ndarray]:
    n, k, floor = len(request.labels), request.num_clients, request.min_samples
    if k * floor > n:
        raise PartitionError(
            f"{k} clients with min_samples={floor} need {k * floor} rows but "
            f"there are only {n}, so some client (at best client {k - 1}) gets "
            f"at most {n // k}; use at most {n // max(floor, 1)} clients or a "
            "smaller min_samples."
        )
    weights = request.rng.lognormal(mean=0.0, sigma=request.sigma, size=k)
    # Each client gets the floor first; the rest follows the log-normal weights.
    counts = floor + _apportion(n - k * floor, weights)
    return _split_by_counts(request.rng.permutation(n), counts)


def _natural(request: _Request) -> list[np.ndarray]:
    assert request.groups is not None  # checked by _validate
    names, codes = np.unique(request.groups.astype(np.str_), return_inverse=True)
    codes = codes.reshape(-1)
    parts = [np.flatnonzero(codes == k) for k in range(len(names))]
    _check_sizes(
        parts,
        request,
        fix="use a smaller min_samples or merge small groups",
        names=names.tolist(),
    )
    return parts


_METHODS: Final[Mapping[str, Callable[[_Request], list[np.ndarray]]]] = {
    "iid": _iid,
    "dirichlet": _dirichlet,
    "shards": _shards,
    "quantity": _quantity,
    "natural": _natural,
}
assert tuple(_METHODS) == PARTITIONS
