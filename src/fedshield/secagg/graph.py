"""The SecAgg+ neighbour graph, its per-neighbourhood threshold, and the choice of k.

SecAgg (Bonawitz et al., CCS 2017) pairs every client with every other: the
complete graph. SecAgg+ (Bell, Bonawitz, Gascón, Lepoint and Raykova,
"Secure Single-Server Aggregation with (Poly)Logarithmic Overhead", CCS 2020)
pairs each client only with its neighbours in a random graph of degree
``k = O(log n)``: pairwise masks, key agreements and Shamir shares are
exchanged along edges only, so a client's work is ``O(k d + k^2)`` instead of
``O(n d + n^2)``.

The graph
    An Erdős–Rényi graph ``G(n, p)`` with ``p = k / (n - 1)`` (expected
    degree ``k``), the graph Bell et al. analyse. It is derived from a public
    32-byte ``graph_seed`` and the sorted list of client ids, with integer
    arithmetic only (:func:`build_graph`), so the server and every client
    compute the same graph without trusting one another: a client never takes
    its neighbour list from the server. The pair ``(i, j)``, ``i < j``, is an
    edge when its 32-bit word of an AES-CTR keystream
    (:func:`fedshield.secagg.crypto.expand_mask`) is below
    ``ceil(p * 2**32)``. Deriving the graph costs ``n (n - 1) / 2`` words of
    keystream: milliseconds at ``n = 10**3``, about a second at ``n = 10**4``.
    The seed must come from randomness no single party can bias: a server
    free to grind seeds could look for one that helps clients it colludes
    with. :mod:`fedshield.secagg.protocol` derives it from a server
    commitment and a client's advertisement, after both are fixed, and
    says what is left of the server's influence ("Who picks the graph").
The per-neighbourhood threshold
    Client ``u`` Shamir-shares its secrets among its neighbourhood ``N[u]``
    (itself and its neighbours, ``m_u = deg(u) + 1`` holders) with threshold
    ``t_u = min(m_u, max(2, ceil(m_u * t / n)))`` (:func:`local_threshold`):
    the fraction ``t / n`` the configuration asks of the whole population is
    asked of every neighbourhood. Because ``t > n / 2``, ``t_u`` is a strict
    majority of ``N[u]``, which is what keeps the malicious-server argument
    of Bonawitz et al. §6 (two disjoint sets of honest holders cannot both
    reach the threshold) true per neighbourhood. On the complete graph
    ``t_u = t``: SecAgg is SecAgg+ with ``k = n - 1``. ``t_u`` depends on the
    graph, never on who dropped, so dropouts cannot lower it.

Choosing k (:func:`choose_neighbours`). Bell et al. show that a random graph
of degree ``k = O(log n)`` (for fixed σ and dropout rate) suffices when two
events fail only with negligible probability: the graph on the honest
surviving clients is disconnected (security), or some client keeps fewer
live neighbours than its threshold (correctness). Their exact constants
depend on their threshold and corruption parameters; here each event gets
its own conservative union bound for ``G(n, p)`` with independent dropouts
at rate ``δ``, and ``k`` is the larger of the two requirements:

Security (σ): the surviving clients stay connected.
    The server learns the sum over each connected component of the graph
    induced on the survivors ``U3``; only if that graph is connected is the
    sum all it learns. With ``n' = floor((1 - δ) n)`` survivors (each set of
    survivors induces a ``G(n', p)``), a component ``S`` with ``|S| = s <=
    n' / 2`` has no edge to the rest with probability ``(1 - p)^(s (n' -
    s))``, so::

        P[disconnected] <= sum_{s=1}^{n'/2} C(n', s) (1 - p)^(s (n' - s)) <= 2^-σ

    :func:`connectivity_failure_bound` evaluates the sum; ``k_sec`` is the
    smallest ``k`` that meets it (:func:`secure_neighbours`). A ``k`` given
    explicitly below ``k_sec`` is refused unless the configuration says
    ``allow_insecure_neighbours`` (see
    :class:`~fedshield.secagg.protocol.SecAggConfig`). (The clients also
    check connectivity themselves before they reveal any share, see
    ``protocol.py``, so with honest clients a disconnected survivor set
    aborts the round rather than leak partial sums; the bound then bounds the
    abort probability. Bell et al.'s corrupted-client fraction γ is not part
    of this bound.)
Correctness (η = ``correctness_parameter``): every neighbourhood can be unmasked.
    Unmasking client ``u`` (or removing its masks if it dropped) needs
    ``t_u`` of its ``m_u`` holders alive. Each potential neighbour is a
    holder with probability ``p`` and survives with probability ``1 - δ``;
    with ``α = t / n`` and ``D = KL(α || 1 - δ)`` (Bernoulli relative
    entropy), the Chernoff bound gives ``P[fewer than α m_u holders alive] <=
    e^-D (1 - p (1 - e^-D))^(n - 1) <= exp(-D - k (1 - e^-D))``; an isolated
    client adds ``(1 - p)^(n-1) <= e^-k``. A union bound over the ``n``
    clients asks ``2 n exp(-k (1 - e^-D)) <= 2^-η``::

        k_cor = ceil((η ln 2 + ln(2 n)) / (1 - exp(-D)))

``k = min(n - 1, max(k_sec, k_cor))``. Both terms grow like ``log n`` (plus
σ or η), as in Bell et al. For ``σ = 40``, ``η = 20``, ``δ = 0.1`` and ``t =
n / 2 + 1`` this gives ``k`` = 50 for ``n = 100``, 54 for ``n = 10**3``,
60 for ``n = 10**4`` and 71 for ``n = 10**6``. Failing the correctness event
only aborts a round (no privacy is lost), which is why its parameter η is
smaller than σ.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import numpy.typing as npt

from fedshield.errors import ConfigError
from fedshield.secagg.crypto import expand_mask

__all__ = [
    "DEFAULT_CORRECTNESS_PARAMETER",
    "NeighbourGraph",
    "build_graph",
    "choose_neighbours",
    "connectivity_failure_bound",
    "local_threshold",
    "secure_neighbours",
]

DEFAULT_CORRECTNESS_PARAMETER = 20
"""η: the neighbour count makes a round abort for lack of shares w.p. <= 2**-η."""

_PAIRS_PER_BLOCK = 1 << 22
_GRAPH_DOMAIN = b"fedshield/secagg/v1/graph"


def choose_neighbours(
    num_clients: int,
    *,
    security_parameter: int = 40,
    expected_dropout: float = 0.1,
    threshold_fraction: float = 0.5,
    correctness_parameter: int = DEFAULT_CORRECTNESS_PARAMETER,
) -> int:
    """The SecAgg+ neighbour count ``k`` for ``n`` clients (Bell et al. 2020).

    ``k = min(n - 1, max(k_sec, k_cor))``: ``k_sec`` keeps the surviving
    clients connected except with probability ``2**-security_parameter``,
    ``k_cor`` leaves every neighbourhood enough live share holders except with
    probability ``2**-correctness_parameter``; the module docstring derives
    both.

    Parameters
    ----------
    num_clients
        ``n >= 2``.
    security_parameter
        σ: statistical security parameter, ``>= 1``.
    expected_dropout
        δ in ``[0, 1)``: the fraction of clients expected to drop in a round.
    threshold_fraction
        ``t / n`` of the configuration, in ``[0.5, 1)``: each neighbourhood
        needs this fraction of its holders alive.
    correctness_parameter
        η, ``>= 1``.

    Returns
    -------
    int
        ``k`` in ``[1, n - 1]``; ``n - 1`` is the complete graph (SecAgg).

    Raises
    ------
    ConfigError
        If an argument is out of range, or ``threshold_fraction >= 1 -
        expected_dropout`` (on average fewer clients survive than the
        threshold needs: no ``k`` helps).

    Examples
    --------
    >>> choose_neighbours(10**4, security_parameter=40, expected_dropout=0.1)
    60
    >>> choose_neighbours(10, security_parameter=40, expected_dropout=0.1)
    9
    """
    _check_int("num_clients", num_clients, low=2)
    _check_int("security_parameter", security_parameter, low=1)
    _check_int("correctness_parameter", correctness_parameter, low=1)
    if not (isinstance(expected_dropout, float | int) and 0 <= expected_dropout < 1):
        raise ConfigError(
            f"expected_dropout must be in [0, 1), got {expected_dropout!r}"
        )
    if not (
        isinstance(threshold_fraction, float | int) and 0.5 <= threshold_fraction < 1
    ):
        raise ConfigError(
            "threshold_fraction (t / n) must be in [0.5, 1), got "
            f"{threshold_fraction!r}"
        )
    alive = 1.0 - expected_dropout
    if threshold_fraction >= alive:
        raise ConfigError(
            f"threshold_fraction={threshold_fraction:.3g} is not below the expected "
            f"survival rate 1 - expected_dropout = {alive:.3g}: on average too few "
            "clients survive to unmask, whatever the number of neighbours"
        )
    return _choose_neighbours(
        num_clients,
        security_parameter,
        float(expected_dropout),
        float(threshold_fraction),
        correctness_parameter,
    )


@lru_cache(maxsize=256)
def _choose_neighbours(
    n: int,
    security_parameter: int,
    expected_dropout: float,
    threshold_fraction: float,
    correctness_parameter: int,
) -> int:
    """:func:`choose_neighbours` for checked arguments, cached.

    Every client and the server of every round ask for ``k`` (about 4 ms of
    bound evaluations at ``n = 1000``); the answer depends only on these
    public numbers.
    """
    alive = 1.0 - expected_dropout
    if n == 2:
        return 1
    divergence = _bernoulli_kl(threshold_fraction, alive)
    gain = 1.0 if math.isinf(divergence) else -math.expm1(-divergence)
    k_cor = math.ceil((correctness_parameter * math.log(2) + math.log(2 * n)) / gain)

    k_sec = _secure_neighbours(n, security_parameter, expected_dropout)
    return min(n - 1, max(k_sec, k_cor))


def secure_neighbours(
    num_clients: int, *, security_parameter: int = 40, expected_dropout: float = 0.1
) -> int:
    """``k_sec``: the fewest neighbours that keep the survivors connected.

    The smallest ``k`` for which the union bound of the module docstring
    gives ``P[the n' = floor((1 - δ) n) survivors are disconnected] <=
    2**-σ``. :func:`choose_neighbours` never picks fewer; an explicit ``k``
    below it is insecure.

    Parameters
    ----------
    num_clients
        ``n >= 2``.
    security_parameter
        σ, ``>= 1``.
    expected_dropout
        δ in ``[0, 1)``.

    Returns
    -------
    int
        ``k_sec`` in ``[1, n - 1]``.

    Raises
    ------
    ConfigError
        If an argument is out of range.

    Examples
    --------
    >>> secure_neighbours(1000, security_parameter=40, expected_dropout=0.1)
    38
    """
    _check_int("num_clients", num_clients, low=2)
    _check_int("security_parameter", security_parameter, low=1)
    if not (isinstance(expected_dropout, float | int) and 0 <= expected_dropout < 1):
        raise ConfigError(
            f"expected_dropout must be in [0, 1), got {expected_dropout!r}"
        )
    return _secure_neighbours(num_clients, security_parameter, float(expected_dropout))


@lru_cache(maxsize=256)
def _secure_neighbours(n: int, security_parameter: int, expected_dropout: float) -> int:
    if n == 2:
        return 1
    survivors = max(2, math.floor((1.0 - expected_dropout) * n))
    log_target = -security_parameter * math.log(2)
    low, high = 1, n - 1  # high always satisfies the bound (p = 1)
    while low < high:
        mid = (low + high) // 2
        if connectivity_failure_bound(survivors, mid / (n - 1), log=True) <= log_target:
            high = mid
        else:
            low = mid + 1
    return low


def connectivity_failure_bound(
    num_survivors: int, edge_probability: float, *, log: bool = False
) -> float:
    """Union bound on ``P[G(n', p) is disconnected]``.

    ``sum_{s=1}^{floor(n'/2)} C(n', s) (1 - p)^(s (n' - s))``: a disconnected
    graph has a component of at most half the vertices with no edge leaving it.

    Parameters
    ----------
    num_survivors
        ``n' >= 1``.
    edge_probability
        ``p`` in ``[0, 1]``.
    log
        Return the natural logarithm of the bound instead.

    Returns
    -------
    float
        The bound (not capped at 1), or its logarithm.

    Examples
    --------
    >>> round(connectivity_failure_bound(3, 0.5), 12)  # 3 * (1/2)**2
    0.75
    """
    if num_survivors < 2:
        return -math.inf if log else 0.0
    if not 0.0 <= edge_probability <= 1.0:
        raise ValueError(f"edge_probability must be in [0, 1], got {edge_probability}")
    if edge_probability == 1.0:
        return -math.inf if log else 0.0
    n = num_survivors
    sizes = np.arange(1, n // 2 + 1, dtype=np.float64)
    log_binom = np.cumsum(np.log(n - sizes + 1) - np.log(sizes))
    log_terms = log_binom + sizes * (n - sizes) * math.log1p(-edge_probability)
    peak = float(log_terms.max())
    total = peak + math.log(float(np.exp(log_terms - peak).sum()))
    return total if log else math.exp(total)


def local_threshold(neighbourhood_size: int, threshold: int, num_clients: int) -> int:
    """Shamir threshold of ``m`` holders: ``min(m, max(2, ceil(m t / n)))``.

    Parameters
    ----------
    neighbourhood_size
        ``m_u``: the client itself plus its neighbours.
    threshold
        The configuration's ``t``.
    num_clients
        ``n``.

    Returns
    -------
    int
        ``t_u``; ``t`` on the complete graph (``m = n``).

    Examples
    --------
    >>> local_threshold(100, 51, 100), local_threshold(41, 51, 100)
    (51, 21)
    """
    m = neighbourhood_size
    return min(m, max(2, -(-m * threshold // num_clients)))


@dataclass(frozen=True, eq=False)
class NeighbourGraph:
    """Who pairs with whom in one round.

    Attributes
    ----------
    clients
        Sorted client ids; client ``clients[i]`` has share position ``i + 1``.
    is_complete
        Whether every client neighbours every other (SecAgg); the adjacency
        is then implicit.
    adjacency
        ``adjacency[i]``: sorted indices of client ``i``'s neighbours; empty
        for the complete graph.
    """

    clients: tuple[str, ...]
    is_complete: bool
    adjacency: tuple[npt.NDArray[np.int64], ...] = ()

    @property
    def num_clients(self) -> int:
        """``n``."""
        return len(self.clients)

    def index(self, client_id: str) -> int:
        """Position of ``client_id`` in :attr:`clients` (share position minus one)."""
        i = bisect.bisect_left(self.clients, client_id)
        if i == len(self.clients) or self.clients[i] != client_id:
            raise KeyError(client_id)
        return i

    def neighbour_indices(self, index: int) -> npt.NDArray[np.int64]:
        """Sorted indices of the neighbours of client ``index`` (never itself)."""
        if self.is_complete:
            return np.delete(np.arange(len(self.clients), dtype=np.int64), index)
        return self.adjacency[index]

    def degree(self, client_id: str) -> int:
        """Number of neighbours of ``client_id``."""
        if self.is_complete:
            return len(self.clients) - 1
        return int(self.adjacency[self.index(client_id)].size)

    def neighbours_of(self, client_id: str) -> tuple[str, ...]:
        """The neighbours of ``client_id`` (never itself), sorted."""
        i = self.index(client_id)
        if self.is_complete:
            return self.clients[:i] + self.clients[i + 1 :]
        return tuple(self.clients[j] for j in self.adjacency[i].tolist())

    def threshold_of(self, client_id: str, threshold: int) -> int:
        """``t_u`` (:func:`local_threshold`) for ``client_id``'s neighbourhood."""
        return local_threshold(self.degree(client_id) + 1, threshold, len(self.clients))

    def is_connected(self, members: Iterable[str]) -> bool:
        """Whether the graph induced on ``members`` is connected (True if empty)."""
        indices = np.array(sorted({self.index(c) for c in members}), dtype=np.int64)
        if indices.size <= 1 or self.is_complete:
            return True
        inside = np.zeros(len(self.clients), dtype=bool)
        inside[indices] = True
        seen = np.zeros(len(self.clients), dtype=bool)
        seen[indices[0]] = True
        frontier = indices[:1]
        count = 1
        while frontier.size:
            reached = np.concatenate([self.adjacency[i] for i in frontier.tolist()])
            reached = np.unique(reached[inside[reached] & ~seen[reached]])
            seen[reached] = True
            count += int(reached.size)
            frontier = reached
        return count == indices.size


def build_graph(clients: Sequence[str], neighbours: int, seed: bytes) -> NeighbourGraph:
    """Derive the round's neighbour graph from public data (see module docstring).

    Parameters
    ----------
    clients
        The round's client ids, sorted and distinct.
    neighbours
        ``k`` in ``[1, n - 1]``; ``n - 1`` gives the complete graph without
        drawing anything.
    seed
        The public 32-byte graph seed.

    Returns
    -------
    NeighbourGraph
        The same graph for the same arguments, on every machine.
    """
    ids = tuple(clients)
    n = len(ids)
    if list(ids) != sorted(set(ids)):
        raise ValueError("clients must be sorted and distinct")
    if not 1 <= neighbours <= n - 1:
        raise ValueError(f"neighbours must be in [1, {n - 1}], got {neighbours}")
    if len(seed) != 32:
        raise ValueError(f"graph seed must be 32 bytes, got {len(seed)}")
    if neighbours == n - 1:
        return NeighbourGraph(clients=ids, is_complete=True)
    everyone = np.arange(n, dtype=np.int64)

    # Edge iff word < ceil(k * 2**32 / (n - 1)), i.e. probability >= k / (n - 1).
    cutoff = np.uint32(-(-(neighbours << 32) // (n - 1)))
    num_pairs = n * (n - 1) // 2
    row_start = everyone * n - everyone * (everyone + 1) // 2  # pairs before row i
    digest = hashlib.sha256(
        _GRAPH_DOMAIN
        + len(ids).to_bytes(8, "big")
        + seed
        + b"".join(len(c.encode()).to_bytes(4, "big") + c.encode() for c in ids)
    ).digest()
    edges: list[npt.NDArray[np.int64]] = []
    for block, start in enumerate(range(0, num_pairs, _PAIRS_PER_BLOCK)):
        size = min(_PAIRS_PER_BLOCK, num_pairs - start)
        block_seed = hashlib.sha256(digest + block.to_bytes(8, "big")).digest()
        stream = expand_mask(block_seed, -(-size // 2), 64).astype("<u8").tobytes()
        words = np.frombuffer(stream, dtype="<u4")[:size]
        edges.append(np.flatnonzero(words < cutoff).astype(np.int64) + start)
    flat = np.concatenate(edges)
    rows = np.searchsorted(row_start, flat, side="right") - 1
    cols = rows + 1 + (flat - row_start[rows])
    sources = np.concatenate([rows, cols])
    targets = np.concatenate([cols, rows])
    order = np.lexsort((targets, sources))
    sources, targets = sources[order], targets[order]
    bounds = np.searchsorted(sources, np.arange(n + 1))
    adjacency = tuple(targets[bounds[i] : bounds[i + 1]] for i in range(n))
    return NeighbourGraph(clients=ids, is_complete=False, adjacency=adjacency)


def _bernoulli_kl(a: float, q: float) -> float:
    """``KL(Bernoulli(a) || Bernoulli(q))``; ``inf`` when ``q == 1 > a``."""
    out = a * math.log(a / q)
    if a < 1:
        out += math.inf if q == 1 else (1 - a) * math.log((1 - a) / (1 - q))
    return out


def _check_int(name: str, value: object, *, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
