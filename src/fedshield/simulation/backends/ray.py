"""The Ray backend: clients run in a fixed pool of Ray actors.

``pip install 'fedshield[ray]'``. Ray is imported only when a
:class:`RayBackend` is built, never when this module is, so
``fedshield.simulation`` stays importable without it.

Each actor is a Ray worker process that holds ``client_fn`` and builds
clients from it on demand, by id. Inside the actor every client runs through
:func:`run_client_stage`, the sequential backend's own code, so randomness,
errors and deadlines are handled exactly as there. The design follows
:class:`~fedshield.simulation.backends.process.ProcessPoolBackend`; only the
transport differs.

Design
------
Ray
    With ``address=None`` the backend starts a new local Ray the first time
    it is used (or uses the one this process already started with
    ``ray.init``): no dashboard, no usage statistics, worker output kept out
    of this process's terminal. ``address="auto"`` (which honours
    ``RAY_ADDRESS``), ``"host:port"`` or ``"ray://host:port"`` joins a
    running cluster instead. :meth:`close`
    shuts Ray down only if this backend started it (or connected to it).
    A local start costs about 2.5 s, plus about 0.2-0.5 s per actor and the
    time to load ``client_fn`` (1-2 s when that imports torch).
Actors
    ``num_workers`` actors (default: the CPUs Ray reports, divided by
    ``cpus_per_worker``), started on first use and only as many as a stage
    needs; never one per client, so memory stays bounded however many
    clients the federation has. ``client_fn`` is pickled once, put in the
    object store once, and unpickled once by each actor (again only when
    ``run_stage`` is given a different ``client_fn`` object). Each actor
    keeps the clients it built until :meth:`end_round`.
Routing
    Within a round a client always runs on the same actor, so a multi-stage
    protocol talks to one client object per round, as with the sequential
    backend. A client first asked in a round goes to the actor with the
    fewest clients in that stage (lowest index on a tie): stage one is dealt
    round-robin in request order. An actor gets its share of a stage's
    messages in one call, then one call per client, all submitted at once
    (Ray runs one caller's calls to an actor in order); so each client's
    reply is seen, and its deadline checked, on its own. A call costs about
    0.5 ms of Ray overhead, negligible beside real local training.
Ordering
    With ``ordered=True`` (the default) replies are yielded in request
    order, so aggregation adds updates in the sequential backend's order and
    the results are bitwise identical; ``ordered=False`` yields each reply
    as it arrives.
Failures
    An actor whose worker process dies (``os._exit``, a segfault, the OOM
    killer) costs only the client that killed it: that client gets a failure
    of kind ``error`` naming the dead Ray worker, and a new actor runs the
    rest. Ray returns a finished call's result asynchronously, so results
    not yet sent die with the worker and the culprit is not known at once:
    the new actor first reruns the unanswered clients one call at a time (a
    rerun gives the same reply, as a client draws only from its own rng; a
    client's side effects outside its process may happen twice), and the
    client that kills it too is the one that fails. A death that does not
    recur fails nobody. A worker that dies loading ``client_fn`` or a
    stage's messages fails that stage's clients on it. With a deadline
    ``timeout_s``, a client with no reply after ``timeout_s + grace_s``
    seconds of its own running time gets a failure of kind ``timeout``, and
    its actor is killed (``ray.kill``) and replaced the same way. Clients
    whose objects lived in an actor that died keep no state: in later stages
    of that round they get a failure of kind ``error`` rather than a
    silently rebuilt client.
Serialisation
    Ray carries bytes: an actor's share of a stage and each client's reply
    are :mod:`fedshield.simulation.wire` messages made by the backend
    itself, not by Ray's serialiser, so arrays arrive as owned copies,
    exactly as from the process backend. The driver reads a reply strictly:
    one that is not exactly a wire message (truncated, over
    ``max_reply_bytes``, another client's, not bytes) is a failure of kind
    ``rejected`` for its client and the round goes on; a reply the wire
    cannot carry (a metric that is not a number) fails its client in the
    actor. Nothing an actor returns is unpickled by this backend. The one
    pickle is ``client_fn``, the server's own code, pickled with Ray's
    cloudpickle (so closures and lambdas work too), put in the object store
    once and loaded by each actor: it travels from the driver to the actors
    only. (Ray's own transport between its processes is Ray's business:
    every node of a Ray cluster is trusted with the cluster, see
    ``docs/cluster.md``.)
Clusters
    Ray 2.60 starts a cluster (``ray start --head``) with token
    authentication when a token exists (``~/.ray/auth_token``, written by
    any earlier local ``ray.init``, or ``RAY_AUTH_TOKEN``); a driver that
    joins by address must then be told so: ``RAY_AUTH_MODE=token`` and the
    cluster's token (``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH`` or
    ``~/.ray/auth_token``). When joining fails, the :class:`TransportError`
    says which of these is missing; ``docs/cluster.md`` walks through a
    cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import pickle
import re
import time
import weakref
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fedshield.core import ClientId
from fedshield.errors import ConfigError, ProtocolError, TransportError
from fedshield.simulation import wire
from fedshield.simulation.backends._pool import (
    _check_deadlines,
    _check_reply_limit,
    _check_workers,
    _encode_reply,
    _encode_shares,
    _failing_client_fn,
    _failure,
    _load_client_fn,
    _pin_torch_threads,
    _pinning,
    _PoolBackend,
    _read_reply,
    _stage_failure,
)
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.backends.sequential import run_client_stage
from fedshield.simulation.protocol import (
    ClientSession,
    FailureKind,
    StageReply,
    StageRequest,
)

__all__ = ["RayBackend"]

logger = logging.getLogger(__name__)

RAY_EXTRA_MESSAGE = "the Ray backend needs Ray: pip install 'fedshield[ray]'"
"""The message of the ``ImportError`` raised when Ray is not installed."""


def _import_ray() -> Any:
    """Ray, imported now, quiet; ``ImportError`` naming the extra if missing."""
    # Ray reads these when it starts; the caller's own settings win.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as err:
        raise ImportError(RAY_EXTRA_MESSAGE, name="ray") from err
    return ray


# ---------------------------------------------------------------------------
# Actor side (runs in a Ray worker process)
# ---------------------------------------------------------------------------


_WHERE = "the Ray worker"


class _ClientActor:
    """One actor of the pool: builds clients lazily and runs their stages.

    Wrapped with ``ray.remote`` by the backend. Calls from the backend run
    one at a time, in the order they were submitted (one caller, default
    concurrency), which the stage protocol relies on: ``load`` before
    ``begin_stage`` before that stage's ``run_client`` calls.
    """

    def __init__(self, torch_threads: int) -> None:
        self.torch_threads = torch_threads
        self.client_fn: ClientFn = _failing_client_fn(
            "no client_fn was sent to the Ray worker"
        )
        self.cache: dict[ClientId, ClientSession] = {}
        self.seq = -1
        self.stage = ""
        self.request: StageRequest | None = None
        self.seed = 0
        self.stage_error: str | None = None

    def load(self, generation: int, payload: bytes) -> bytes:
        """Unpickle ``client_fn`` (the server's code); a wire ``worker_ready``."""
        self.client_fn, error = _load_client_fn(payload, _WHERE)
        del payload
        _pin_torch_threads(self.torch_threads)
        ready = wire.WorkerReady(generation, os.getpid(), _node_address(), error)
        return wire.encode_ready(ready)

    def begin_stage(self, seq: int, stage: str, payload: bytes) -> None:
        """Keep this actor's share of a stage (wire bytes, read strictly)."""
        self.seq = seq
        self.stage = stage
        try:
            self.request, self.seed = wire.decode_request(payload)
            self.stage_error = None
        except ProtocolError as err:
            self.request = None
            self.stage_error = f"{type(err).__name__}: {err}"

    def run_client(self, seq: int, client_id: ClientId) -> bytes:
        """Run one client of the current stage; its reply as wire bytes."""
        request = self.request
        if seq != self.seq or request is None:
            why = self.stage_error or "it was sent for another stage"
            return _stage_failure(client_id, self.stage, _WHERE, why)
        _pin_torch_threads(self.torch_threads)
        reply = run_client_stage(
            _pinning(self.client_fn, self.torch_threads),
            client_id,
            request,
            seed=self.seed,
            cache=self.cache,
        )
        return _encode_reply(reply, request.stage, _WHERE)

    def end_round(self) -> None:
        """Drop the clients of the round (and the last stage's messages)."""
        self.cache.clear()
        self.request = None


def _node_address() -> str:
    """The Ray node running this code, for messages: address and id prefix."""
    try:
        ray = _import_ray()
        node_id = str(ray.get_runtime_context().get_node_id())[:8]
        return f"{ray.util.get_node_ip_address()}, node {node_id}"
    except Exception:  # only for messages
        return "?"


# ---------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------


@dataclass(eq=False)
class _Call:
    """A call submitted to an actor whose result is not yet read."""

    ref: Any
    """The call's ``ObjectRef``."""
    kind: Literal["load", "begin", "client"]
    client_id: ClientId | None = None


@dataclass(eq=False)
class _Actor:
    """The driver's handle on one actor."""

    index: int
    handle: Any
    is_careful: bool = False
    """Submit one call at a time (to find which client kills the worker)."""
    generation: int | None = None
    """Which ``client_fn`` the actor holds (or is loading; ``None``: none)."""
    loaded_in: int | None = None
    """The stage (its sequence number) in which ``client_fn`` was last sent."""
    pid: int | None = None
    node: str | None = None
    inflight: deque[_Call] = field(default_factory=deque)
    """Calls submitted and not yet answered, in submission order."""
    clock: float = 0.0
    """When the first call in flight started running (as seen from here)."""
    batch: bytes | None = None
    """This actor's share of the open stage (wire bytes), until sent."""
    queue: deque[ClientId] = field(default_factory=deque)
    """Clients of the open stage not yet submitted, in order."""
    built: set[ClientId] = field(default_factory=set)
    """Clients whose objects this actor holds in the current round."""

    @property
    def is_busy(self) -> bool:
        return bool(self.inflight) or bool(self.queue)

    def pending_clients(self) -> list[ClientId]:
        """Clients of the open stage not yet answered, in order."""
        submitted = [c.client_id for c in self.inflight if c.client_id is not None]
        return submitted + list(self.queue)

    def describe(self) -> str:
        if self.pid is None:
            return f"Ray worker {self.index}"
        return f"Ray worker {self.index} (pid {self.pid} on {self.node})"


@dataclass(eq=False)
class _Session:
    """What the finalizer needs: Ray, whether this backend started it."""

    ray: Any = None
    owns_ray: bool = False


_EXIT_TYPE = re.compile(r"Worker exit type: (\w+)")
_EXIT_DETAIL = re.compile(r"Worker exit detail: ([^.]*)")


def _describe_death(err: BaseException) -> str:
    """A one-line reason from Ray's (long) actor-death error."""
    text = str(err)
    if "killed by `ray.kill`" in text:
        return "killed by ray.kill"
    kind = _EXIT_TYPE.search(text)
    detail = _EXIT_DETAIL.search(text)
    if kind and detail:
        return f"{kind.group(1)}: {detail.group(1).strip()}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:200] if lines else type(err).__name__


class RayBackend(_PoolBackend[_Actor]):
    """Runs clients in parallel in a fixed pool of Ray actors.

    Gives the same replies as :class:`SequentialBackend` for the same seed:
    each actor runs its clients with :func:`run_client_stage`, so a client's
    randomness comes from ``(seed, stage, round_idx, client_id)`` and errors
    and deadlines are handled identically. See the module docstring for how
    clients are routed, ordered and recovered when an actor dies or hangs.

    ``client_fn`` must be picklable by cloudpickle, and the modules its
    pickle names importable on every Ray node (on a cluster, ship code with
    ``runtime_env``). Ray starts (or is joined) on first use, or with
    :meth:`start`; close the backend (or use it as a context manager) to
    stop its actors.

    Parameters
    ----------
    address
        ``None`` (default): start a new local Ray, or use the one this
        process already started. ``"auto"`` (the cluster ``RAY_ADDRESS`` or
        ``ray start`` names), ``"host:port"`` or ``"ray://host:port"``: join
        that running cluster.
    num_workers
        Actors in the pool (default: the CPUs Ray reports divided by
        ``cpus_per_worker``); known as ``num_workers`` once started.
    torch_threads
        Intra-op threads torch uses in each actor, set as soon as the client
        code has loaded torch (actors never import it themselves).
    num_cpus
        CPUs of the local Ray this backend starts (default: Ray detects
        them); only with ``address=None``.
    cpus_per_worker, gpus_per_worker
        Ray resources each actor reserves.
    ordered
        Yield replies in request order, so results are bitwise identical to
        the sequential backend's (default); ``False`` yields them as they
        arrive.
    grace_s
        With a deadline, seconds beyond ``timeout_s`` a client may run before
        its actor is killed as hung.
    start_timeout_s
        Seconds a new actor may take to be scheduled, start and load
        ``client_fn``.
    runtime_env
        Ray runtime environment for the job (``working_dir``, ``pip``, ...),
        given to ``ray.init`` when this backend starts or joins Ray.
    log_to_driver
        Show the actors' output and logs in this process (default: only in
        Ray's log files).
    max_reply_bytes
        Largest reply read from an actor; a larger one is refused (a
        failure of kind ``rejected`` for its client).

    Raises
    ------
    ImportError
        If Ray is not installed (the message names the extra to install).
    ConfigError
        If a parameter is out of range.

    Examples
    --------
    >>> with RayBackend(num_workers=4) as backend:  # doctest: +SKIP
    ...     run_rounds(strategy, state, backend=backend, ...)
    """

    _worker_noun = "Ray worker"

    def __init__(
        self,
        address: str | None = None,
        *,
        num_workers: int | None = None,
        torch_threads: int = 1,
        num_cpus: int | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        ordered: bool = True,
        grace_s: float = 5.0,
        start_timeout_s: float = 300.0,
        runtime_env: Mapping[str, Any] | None = None,
        log_to_driver: bool = False,
        max_reply_bytes: int = wire.DEFAULT_MAX_BYTES,
    ) -> None:
        if address is not None and (not isinstance(address, str) or not address):
            raise ConfigError(
                f"`address` of RayBackend must be None or a non-empty string; "
                f"got {address!r}"
            )
        _check_workers(num_workers, torch_threads)
        if num_cpus is not None:
            if address is not None:
                raise ConfigError(
                    "`num_cpus` sizes the local Ray that RayBackend starts, so it "
                    f"needs address=None; got address={address!r}"
                )
            if num_cpus < 1:
                raise ConfigError(f"`num_cpus` must be >= 1; got {num_cpus}")
        if not cpus_per_worker >= 0:
            raise ConfigError(f"`cpus_per_worker` must be >= 0; got {cpus_per_worker}")
        if not gpus_per_worker >= 0:
            raise ConfigError(f"`gpus_per_worker` must be >= 0; got {gpus_per_worker}")
        _check_deadlines(grace_s, start_timeout_s)
        _check_reply_limit(max_reply_bytes)
        # Fail here, not at the first round, when the extra is missing.
        _import_ray()
        self.address = address
        self.num_workers = num_workers
        self.torch_threads = torch_threads
        self.num_cpus = num_cpus
        self.cpus_per_worker = float(cpus_per_worker)
        self.gpus_per_worker = float(gpus_per_worker)
        self.ordered = ordered
        self.grace_s = float(grace_s)
        self.start_timeout_s = float(start_timeout_s)
        self.runtime_env = None if runtime_env is None else dict(runtime_env)
        self.log_to_driver = log_to_driver
        self.max_reply_bytes = max_reply_bytes
        self._session = _Session()
        self._actor_class: Any = None
        self._actors: list[_Actor | None] = []
        self._slots = self._actors
        self._init_pool()
        self._client_fn_ref: Any = None
        self._stage: tuple[StageRequest, int] | None = None
        """The open stage's request and seed (to hand clients to a new actor)."""
        # Refers to the list and the session, not to self, so a dropped
        # backend is collected and its actors stopped.
        self._finalizer = weakref.finalize(self, _shutdown, self._actors, self._session)

    # -- starting --------------------------------------------------------------

    @property
    def is_started(self) -> bool:
        """Whether Ray is started (or joined) and the pool sized."""
        return self._session.ray is not None

    @property
    def owns_ray(self) -> bool:
        """Whether this backend started Ray (and so shuts it down on close)."""
        return self._session.owns_ray

    def start(self) -> None:
        """Start or join Ray and size the pool (done by the first stage anyway).

        Raises
        ------
        TransportError
            If the cluster at ``address`` cannot be reached.
        RuntimeError
            If the backend is closed.
        """
        if self._closed:
            raise RuntimeError("this RayBackend is closed")
        if self._session.ray is not None:
            return
        ray = _import_ray()
        started = time.perf_counter()
        if ray.is_initialized():
            if self.address is not None or self.num_cpus is not None:
                logger.warning(
                    "Ray is already running in this process; RayBackend uses it "
                    "and ignores address=%r, num_cpus=%r",
                    self.address,
                    self.num_cpus,
                )
        else:
            self._init_ray(ray)
            self._session.owns_ray = True
        self._session.ray = ray
        num_workers = self.num_workers or self._default_num_workers(ray)
        cpus = ray.cluster_resources().get("CPU", 0)
        if num_workers * self.cpus_per_worker > cpus:
            logger.warning(
                "%d Ray actors of %s CPU each need more than the %s CPUs Ray "
                "reports: some will wait for CPUs (at most start_timeout_s = %s s)",
                num_workers,
                self.cpus_per_worker,
                cpus,
                self.start_timeout_s,
            )
        self.num_workers = num_workers
        self._actors.extend([None] * num_workers)
        options: dict[str, Any] = {
            "num_cpus": self.cpus_per_worker,
            "max_restarts": 0,
            "max_task_retries": 0,
        }
        if self.gpus_per_worker:
            options["num_gpus"] = self.gpus_per_worker
        self._actor_class = ray.remote(**options)(_ClientActor)
        logger.info(
            "Ray %s in %.2f s; %d actors of %s CPU each",
            "started" if self.owns_ray and self.address is None else "joined",
            time.perf_counter() - started,
            num_workers,
            self.cpus_per_worker,
        )

    def _init_ray(self, ray: Any) -> None:
        kwargs: dict[str, Any] = {"ignore_reinit_error": True}
        if self.runtime_env is not None:
            kwargs["runtime_env"] = self.runtime_env
        if self.address is None or not self.address.startswith("ray://"):
            # A Ray Client (ray://) connection takes none of these.
            kwargs["log_to_driver"] = self.log_to_driver
        if self.address is None:
            # "local": a new Ray, whatever RAY_ADDRESS or a `ray start` left
            # in /tmp/ray says (address="auto" honours those).
            kwargs["address"] = "local"
            kwargs["include_dashboard"] = False
            if self.num_cpus is not None:
                kwargs["num_cpus"] = self.num_cpus
        else:
            kwargs["address"] = self.address
        refused: tuple[type[BaseException], ...] = (ConnectionError,)
        auth_error = getattr(ray.exceptions, "AuthenticationError", None)
        if isinstance(auth_error, type):
            refused += (auth_error,)
        try:
            ray.init(**kwargs)
        except refused as err:
            is_auth = auth_error is not None and isinstance(err, auth_error)
            message = _join_error(self.address, err, os.environ, is_auth=is_auth)
            raise TransportError(message) from err

    def _default_num_workers(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        counts = [int(resources.get("CPU", 1))]
        if self.cpus_per_worker > 0:
            counts.append(math.floor(resources.get("CPU", 1) / self.cpus_per_worker))
        if self.gpus_per_worker > 0:
            counts.append(math.floor(resources.get("GPU", 0) / self.gpus_per_worker))
        return max(1, min(counts))

    # -- the Backend protocol ------------------------------------------------

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Send ``request`` to the actors now; yield one reply per client.

        Raises
        ------
        ConfigError
            If ``client_fn`` cannot be pickled (actors need a copy).
        TransportError
            If the cluster at ``address`` cannot be reached.
        RuntimeError
            If the backend is closed.
        """
        if self._closed:
            raise RuntimeError("this RayBackend is closed")
        self.start()
        seq, order, early, groups = self._open_stage(request, client_fn)
        self._stage = (request, seed)
        shares, unsent = _encode_shares(request, groups, seed, _WHERE)
        for index, client_ids in groups.items():
            actor = self._actors[index]
            if actor is None:
                actor = self._start_actor(index)
            self._assign(actor, seq, client_ids, shares[index])
        return self._arrange(order, self._collect(request, seq, early + unsent))

    def close(self) -> None:
        """Stop every actor, and Ray if this backend started it (idempotent)."""
        super().close()

    def _release(self) -> None:
        self._client_fn_ref = None
        self._stage = None

    def __repr__(self) -> str:
        return (
            f"RayBackend(address={self.address!r}, num_workers={self.num_workers}, "
            f"torch_threads={self.torch_threads})"
        )

    # -- actors ----------------------------------------------------------------

    def _set_client_fn(self, client_fn: ClientFn) -> None:
        ray = self._session.ray
        try:
            payload = ray.cloudpickle.dumps(client_fn, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:
            raise ConfigError(
                "RayBackend ships `client_fn` to its actors, so it must be "
                f"picklable; {client_fn!r} is not: {type(err).__name__}: {err}"
            ) from err
        self._client_fn_ref = ray.put(payload)
        self._client_fn = client_fn
        self._generation += 1

    def _start_actor(self, index: int, *, is_careful: bool = False) -> _Actor:
        handle = self._actor_class.remote(self.torch_threads)
        actor = _Actor(index, handle, is_careful=is_careful)
        self._actors[index] = actor
        return actor

    def _assign(
        self,
        actor: _Actor,
        seq: int,
        client_ids: list[ClientId],
        share: bytes | None = None,
    ) -> None:
        """Give ``actor`` its share of the open stage and submit it."""
        if share is None:  # clients handed to a new actor: sent once before
            assert self._stage is not None
            request, seed = self._stage
            share = wire.encode_request(request, client_ids, seed)
        actor.batch = share
        actor.queue = deque(client_ids)
        self._advance(actor, seq)

    def _advance(self, actor: _Actor, seq: int) -> None:
        """Submit the actor's next calls (only one in flight if careful)."""
        while not (actor.is_careful and actor.inflight):
            call = self._next_call(actor, seq)
            if call is None:
                return
            if not actor.inflight:
                actor.clock = time.monotonic()
            actor.inflight.append(call)

    def _next_call(self, actor: _Actor, seq: int) -> _Call | None:
        """Load ``client_fn`` if the actor lacks it, then the stage, then a client."""
        handle = actor.handle
        if actor.generation != self._generation:
            actor.generation = self._generation
            actor.loaded_in = seq
            ref = handle.load.remote(self._generation, self._client_fn_ref)
            return _Call(ref, "load")
        if actor.batch is not None:
            assert self._stage is not None
            ref = handle.begin_stage.remote(seq, self._stage[0].stage, actor.batch)
            actor.batch = None
            return _Call(ref, "begin")
        if actor.queue:
            client_id = actor.queue.popleft()
            ref = handle.run_client.remote(seq, client_id)
            return _Call(ref, "client", client_id)
        return None

    def _discard(self, index: int) -> None:
        actor = self._actors[index]
        if actor is None:
            return
        self._actors[index] = None
        actor.inflight.clear()
        actor.queue.clear()
        actor.batch = None
        with contextlib.suppress(Exception):  # already dead is fine
            self._session.ray.kill(actor.handle, no_restart=True)

    def _end_round_on(self, slot: _Actor) -> None:
        with contextlib.suppress(Exception):  # a dead actor shows later
            slot.handle.end_round.remote()

    def _take_pending(self, slot: _Actor) -> list[ClientId]:
        # All at once: nothing is left to submit.
        failed = slot.pending_clients()
        slot.inflight.clear()
        slot.queue.clear()
        slot.batch = None
        return failed

    # -- collecting replies ---------------------------------------------------

    def _collect(
        self, request: StageRequest, seq: int, early: list[StageReply]
    ) -> Iterator[StageReply]:
        ray = self._session.ray
        try:
            yield from early
            while True:
                busy = [a for a in self._actors if a is not None and a.inflight]
                if not busy:
                    break
                now = time.monotonic()
                deadline = min(self._deadline(a, request) for a in busy)
                timeout = None if deadline == math.inf else max(0.0, deadline - now)
                ray.wait([a.inflight[0].ref for a in busy], timeout=timeout)
                for actor in busy:
                    yield from self._drain(actor, request, seq)
                now = time.monotonic()
                for actor in busy:
                    if actor.inflight and now >= self._deadline(actor, request):
                        yield from self._on_hang(actor, request, seq)
        finally:
            self._stage_done(seq)

    def _deadline(self, actor: _Actor, request: StageRequest) -> float:
        if actor.inflight[0].kind != "client":
            return actor.clock + self.start_timeout_s
        return self._client_deadline(actor.clock, request)

    def _drain(
        self, actor: _Actor, request: StageRequest, seq: int
    ) -> Iterator[StageReply]:
        """Yield what ``actor`` has answered so far, in order."""
        ray = self._session.ray
        while actor.inflight:
            call = actor.inflight[0]
            ready, _ = ray.wait([call.ref], timeout=0)
            if not ready:
                return
            try:
                value = ray.get(call.ref)
            except ray.exceptions.RayActorError as err:
                yield from self._on_death(actor, request, seq, err)
                return
            except ray.exceptions.RayError as err:
                if call.client_id is None:  # the actor cannot serve the stage
                    yield from self._on_death(actor, request, seq, err)
                    return
                actor.inflight.popleft()
                actor.clock = time.monotonic()
                actor.built.add(call.client_id)
                self._advance(actor, seq)
                yield _failure(
                    call.client_id,
                    request.stage,
                    FailureKind.ERROR,
                    f"Ray could not run this client on {actor.describe()}: "
                    f"{type(err).__name__}: {_describe_death(err)}",
                )
                continue
            actor.inflight.popleft()
            actor.clock = time.monotonic()
            if call.kind == "load":
                self._on_loaded(actor, value)
            self._advance(actor, seq)
            if call.client_id is not None:
                actor.built.add(call.client_id)
                yield self._read_reply(value, call.client_id, request.stage, actor)

    def _read_reply(
        self, data: object, client_id: ClientId, stage: str, actor: _Actor
    ) -> StageReply:
        return _read_reply(
            data, client_id, stage, actor.describe(), self.max_reply_bytes
        )

    def _on_loaded(self, actor: _Actor, data: object) -> None:
        try:
            if not isinstance(data, bytes):
                raise ProtocolError(f"a greeting is bytes; got {type(data).__name__}")
            ready = wire.decode_ready(data)
        except ProtocolError as err:
            logger.warning("%s sent a malformed greeting: %s", actor.describe(), err)
            return
        actor.pid, actor.node = ready.pid, ready.node
        logger.info("%s holds client_fn", actor.describe())
        if ready.error is not None:
            logger.warning(
                "%s could not load client_fn: %s", actor.describe(), ready.error
            )

    def _on_death(
        self, actor: _Actor, request: StageRequest, seq: int, err: BaseException
    ) -> Iterator[StageReply]:
        why = _describe_death(err)
        if not actor.is_careful:
            # Ray sends a finished call's result asynchronously, so results
            # that had not left the worker died with it: which call killed
            # it is unknown. Run every unanswered client again, one call at
            # a time, on a new actor; a client that kills that one too is
            # then known. (Clients draw from their own rng: a rerun gives
            # the same reply.)
            logger.info(
                "%s died (%s) in stage %r of round %d; rerunning its %d "
                "unanswered clients one at a time",
                actor.describe(),
                why,
                request.stage,
                request.round_idx,
                len(actor.pending_clients()),
            )
            yield from self._restart(actor, request, seq, f"died ({why})", True)
            return
        call = actor.inflight[0]
        if call.client_id is None:
            # A careful actor is new in this stage: it died loading client_fn
            # or reading this stage's messages, and so would every
            # replacement. Fail its clients; the next stage starts afresh.
            message = (
                f"the {actor.describe()} died while starting ({why}); "
                "it could not load client_fn or this stage's messages"
            )
            yield from self._fail_all(actor, request.stage, message)
            self._slot_lost(actor.index, f"died ({why})")
            return
        actor.inflight.popleft()
        actor.built.add(call.client_id)
        message = (
            f"the {actor.describe()} running this client died ({why}); "
            "it was replaced for the other clients"
        )
        logger.warning(
            "client %s: %s died in stage %r of round %d (%s)",
            call.client_id,
            actor.describe(),
            request.stage,
            request.round_idx,
            why,
        )
        yield _failure(call.client_id, request.stage, FailureKind.ERROR, message)
        yield from self._restart(actor, request, seq, f"died ({why})", False)

    def _on_hang(
        self, actor: _Actor, request: StageRequest, seq: int
    ) -> Iterator[StageReply]:
        # Without a death no result is lost: the first call in flight is the
        # one running.
        call = actor.inflight[0]
        if call.client_id is None:
            message = (
                f"the {actor.describe()} did not start and load client_fn within "
                f"{self.start_timeout_s} s"
            )
            yield from self._fail_all(actor, request.stage, message)
            self._slot_lost(actor.index, "did not start")
            return
        actor.inflight.popleft()
        actor.built.add(call.client_id)
        limit, message = self._hang_limit(request, f"its {actor.describe()} was killed")
        logger.warning(
            "client %s: no reply in stage %r of round %d within %.3f s; killing %s",
            call.client_id,
            request.stage,
            request.round_idx,
            limit,
            actor.describe(),
        )
        yield _failure(call.client_id, request.stage, FailureKind.TIMEOUT, message)
        yield from self._restart(actor, request, seq, "was killed as hung", False)

    def _restart(
        self,
        actor: _Actor,
        request: StageRequest,
        seq: int,
        why: str,
        is_careful: bool,
    ) -> Iterator[StageReply]:
        """Replace ``actor`` and hand it the clients it had not answered."""
        remaining = actor.pending_clients()
        failed, rerun = self._replace(actor, remaining, request.stage, why)
        yield from failed
        if rerun:
            fresh = self._start_actor(actor.index, is_careful=is_careful)
            self._assign(fresh, seq, rerun)


_AUTH_CLUES = (
    "InvalidAuthToken",
    "AuthenticationError",
    "Unauthenticated",
    "authentication token",
)
"""What Ray's errors (or their causes) say when token authentication refused."""


def _join_error(
    address: str | None,
    err: BaseException,
    environ: Mapping[str, str],
    *,
    is_auth: bool = False,
) -> str:
    """Why joining the cluster at ``address`` failed, and what to do about it.

    Ray 2.60's own error says only "Failed to connect to Ray cluster at ..."
    (after 20 s of retries); the cause, when token authentication refused
    the driver, is in the exception's chain and in its C++ log lines.
    """
    chain: list[BaseException] = []
    cause: BaseException | None = err
    while cause is not None and cause not in chain and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = " ".join(f"{type(e).__name__}: {e}" for e in chain)
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    token_mode = environ.get("RAY_AUTH_MODE", "").lower() == "token"
    get_token = (
        "the token is what `ray get-auth-token` prints on the head node; give it "
        "to this process as RAY_AUTH_TOKEN=<token>, or as a file named by "
        "RAY_AUTH_TOKEN_PATH or at ~/.ray/auth_token"
    )
    if is_auth or any(clue in text for clue in _AUTH_CLUES):
        if not token_mode:
            remedy = (
                "the cluster uses token authentication and this process sent no "
                "token. Run `export RAY_AUTH_MODE=token` (Ray never turns it on "
                "for an explicit address) with the cluster's token available: "
                + get_token
            )
        else:
            remedy = (
                "the cluster uses token authentication and this process's token "
                "is missing or not the cluster's: " + get_token
            )
    else:
        remedy = (
            "is a Ray cluster running there (`ray start --head --port=PORT` on the "
            "head node; `ray status --address=HOST:PORT` checks), and can this "
            "machine reach it?"
        )
        if not token_mode:
            remedy += (
                " If the cluster uses token authentication (Ray 2.60 turns it on "
                "when `ray start --head` finds a token, such as the "
                "~/.ray/auth_token an earlier local Ray run leaves), also run "
                "`export RAY_AUTH_MODE=token`; " + get_token
            )
    return (
        f"RayBackend could not join the Ray cluster at {address!r} ({first}): "
        f"{remedy}. See docs/cluster.md in the fedshield repository."
    )


def _shutdown(actors: list[_Actor | None], session: _Session) -> None:
    """Kill every actor; shut Ray down if the backend started it."""
    ray = session.ray
    if ray is None:
        return
    try:
        if ray.is_initialized():
            for actor in actors:
                if actor is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(actor.handle, no_restart=True)
            if session.owns_ray:
                ray.shutdown()
    finally:
        actors[:] = [None] * len(actors)
        session.ray = None
        session.owns_ray = False
