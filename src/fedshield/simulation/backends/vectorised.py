"""The vectorised backend: many clients of one model trained in lockstep.

Clients that are plain :class:`~fedshield.models.TorchClient` objects sharing
one :class:`~fedshield.models.TorchModel` are trained together by
:func:`fedshield.models.vectorised.train_many`, in chunks, in this process;
everything else runs as in the sequential backend. Results match the
sequential backend for the same seed up to floating-point rounding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fedshield.core import (
    ClientId,
    FitConfig,
    Params,
    derive_rng,
)
from fedshield.errors import ConfigError
from fedshield.privacy.records import wants_dp_sgd
from fedshield.simulation.backends.base import ClientFn
from fedshield.simulation.backends.sequential import run_client_stage
from fedshield.simulation.protocol import (
    ClientFailure,
    ClientSession,
    FailureKind,
    FitIns,
    StageReply,
    StageRequest,
    fit_reply,
)

if TYPE_CHECKING:
    from fedshield.models import TorchClient, TorchModel

__all__ = ["VectorisedBackend"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Group:
    """Clients that can train together: one model, one message."""

    model: TorchModel
    params: Params
    config: FitConfig
    members: list[tuple[ClientId, ClientSession, float, FitIns]] = field(
        default_factory=list
    )
    """(client id, its session, seconds to build it, its own message with its
    state)"""


class VectorisedBackend:
    """Trains the clients of a stage together, vectorised over clients.

    In stage ``"fit"``, clients that are exactly
    :class:`~fedshield.models.TorchClient` (not a subclass, which may change
    ``fit``), have training data, and share one
    :class:`~fedshield.models.TorchModel` instance and one :class:`FitIns`
    are trained by :func:`~fedshield.models.vectorised.train_many` in chunks
    of at most ``max_batch_clients``, each with the generator the sequential
    backend would give it, ``derive_rng(seed, "stage", "fit", round_idx,
    client_id)``. Every other client, and every other stage (``"evaluate"``,
    SecAgg's), runs one by one through
    :func:`~fedshield.simulation.run_client_stage`, exactly as in
    :class:`~fedshield.simulation.SequentialBackend`.

    Parameters
    ----------
    max_batch_clients
        Most clients trained in one lockstep chunk; memory grows with it
        (one copy of the parameters, the momentum and a batch of activations
        per client).

    Raises
    ------
    ConfigError
        If ``max_batch_clients`` < 1.

    Notes
    -----
    *Failures.* A client whose ``client_fn`` raises gets an ``error`` failure,
    as in the sequential backend. If a chunk's vectorised training raises,
    every client of that chunk is run again one by one (from fresh
    generators, so the results are still the sequential ones), so a faulty
    client is reported on its own and the others still reply. A model that
    cannot be vectorised (see
    :func:`~fedshield.models.vectorised.check_vectorisable`: random layers,
    BatchNorm, layers vmap cannot batch) is trained sequentially, with one
    warning naming the layer; call ``check_vectorisable`` before round 1 to
    refuse such a configuration instead.

    *Deadline.* The clients of a chunk run at the same time and all their
    results exist only when the chunk ends, so each one's running time is
    taken as the time to build it plus the wall time of its whole chunk, and
    it is a ``timeout`` failure when that exceeds ``request.timeout_s``. This
    is what a client in lockstep really experiences, and it is longer than
    the same client's own time in the sequential backend (a small client
    waits for the largest of its chunk; chunks run one after another, but
    each is timed from its own start, as if chunks ran in parallel). So near
    the deadline the two backends can disagree on which clients time out; set
    ``max_batch_clients`` lower for a finer-grained deadline. Clients that
    run one by one are timed individually, as in the sequential backend.

    Replies come back in the order of ``request.messages``, after the
    vectorised chunks have run, so a round aggregates them in the same order
    as the sequential backend.
    """

    def __init__(self, max_batch_clients: int = 64) -> None:
        if isinstance(max_batch_clients, bool) or int(max_batch_clients) < 1:
            raise ConfigError(
                "`max_batch_clients` of VectorisedBackend must be >= 1; got "
                f"{max_batch_clients!r}."
            )
        self._max_batch_clients = int(max_batch_clients)
        self._clients: dict[ClientId, ClientSession] = {}
        self._round: int | None = None
        # id(model) -> (model, can it be vectorised); the model is kept so
        # that its id cannot be reused by another object.
        self._verdicts: dict[int, tuple[TorchModel, bool]] = {}

    @property
    def max_batch_clients(self) -> int:
        """Most clients trained in one lockstep chunk."""
        return self._max_batch_clients

    def run_stage(
        self, request: StageRequest, *, client_fn: ClientFn, seed: int
    ) -> Iterator[StageReply]:
        """Yield one reply per client, in the order of ``request.messages``."""
        if request.round_idx != self._round:
            self._clients.clear()
            self._round = request.round_idx
        done = self._run_fit(request, client_fn, seed) if request.stage == "fit" else {}
        for client_id in request.messages:
            reply = done.get(client_id)
            if reply is None:
                reply = run_client_stage(
                    client_fn, client_id, request, seed=seed, cache=self._clients
                )
            yield reply

    def session(self, client_id: ClientId) -> ClientSession | None:
        """The client's session in the current round (None: not built)."""
        return self._clients.get(client_id)

    def end_round(self) -> None:
        """Drop the clients of the round."""
        self._clients.clear()
        self._round = None

    def close(self) -> None:
        """Nothing to release beyond the round's clients."""
        self.end_round()
        self._verdicts.clear()

    def __repr__(self) -> str:
        return f"VectorisedBackend(max_batch_clients={self._max_batch_clients})"

    def _run_fit(
        self, request: StageRequest, client_fn: ClientFn, seed: int
    ) -> dict[ClientId, StageReply]:
        """Replies of the clients that were built and trained vectorised.

        Clients missing from the result run one by one afterwards.
        """
        from fedshield.models import TorchClient

        replies: dict[ClientId, StageReply] = {}
        groups: list[_Group] = []
        for client_id, message in request.messages.items():
            started = time.perf_counter()
            session = self._clients.get(client_id)
            if session is None:
                try:
                    session = ClientSession(client_id, client_fn(client_id))
                except Exception as err:
                    replies[client_id] = _failed_build(client_id, request, err)
                    continue
                self._clients[client_id] = session
            client: Any = session.client
            if not (
                type(client) is TorchClient
                and isinstance(message, FitIns)
                and client.num_train_examples > 0
                and not wants_dp_sgd(message.config.options)  # per-record DP-SGD
                and self._can_vectorise(client.model)
            ):
                continue  # runs one by one
            built_s = time.perf_counter() - started
            _group_of(groups, client.model, message).members.append(
                (client_id, session, built_s, message)
            )
        size = self._max_batch_clients
        for group in groups:
            for start in range(0, len(group.members), size):
                chunk = group.members[start : start + size]
                replies.update(self._train_chunk(group, chunk, request, seed))
        return replies

    def _train_chunk(
        self,
        group: _Group,
        chunk: list[tuple[ClientId, ClientSession, float, FitIns]],
        request: StageRequest,
        seed: int,
    ) -> dict[ClientId, StageReply]:
        from fedshield.models import build_update, local_correction, train_many

        rngs = [
            derive_rng(seed, "stage", request.stage, request.round_idx, client_id)
            for client_id, _, _, _ in chunk
        ]
        started = time.perf_counter()
        try:
            results = train_many(
                group.model,
                group.params,
                [_torch(session).train_data for _, session, _, _ in chunk],
                group.config,
                rngs=rngs,
                max_batch_clients=len(chunk),
                corrections=[
                    local_correction(group.params, message.config)
                    for _, _, _, message in chunk
                ],
            )
        except Exception as err:
            if isinstance(err, ConfigError):
                self._refuse(group.model, err)
            logger.warning(
                "vectorised training of %d clients failed in round %d (%s: %s); "
                "running them one by one",
                len(chunk),
                request.round_idx,
                type(err).__name__,
                err,
                exc_info=logger.isEnabledFor(logging.DEBUG),
            )
            return {}
        elapsed = time.perf_counter() - started
        replies: dict[ClientId, StageReply] = {}
        for (client_id, session, built_s, message), (new, metrics) in zip(
            chunk, results, strict=True
        ):
            update = build_update(  # as TorchClient.fit builds it
                client_id,
                group.params,
                new,
                metrics,
                num_examples=_torch(session).num_train_examples,
                config=message.config,
            )
            running_s = built_s + elapsed
            if request.timeout_s is not None and running_s > request.timeout_s:
                failure = ClientFailure(
                    client_id,
                    request.stage,
                    FailureKind.TIMEOUT,
                    f"replied after {running_s:.3f} s (its chunk of {len(chunk)} "
                    f"clients took {elapsed:.3f} s); the deadline was "
                    f"{request.timeout_s} s",
                )
                replies[client_id] = StageReply(client_id, failure=failure)
            else:
                replies[client_id] = StageReply(
                    client_id, value=fit_reply(session, message, update)
                )
        return replies

    def _can_vectorise(self, model: TorchModel) -> bool:
        known = self._verdicts.get(id(model))
        if known is not None:
            return known[1]
        from fedshield.models.vectorised import check_vectorisable

        try:
            check_vectorisable(model)
        except ConfigError as err:
            self._refuse(model, err)
            return False
        except Exception:
            # The model is broken in a way the sequential path reports per client.
            self._verdicts[id(model)] = (model, False)
            return False
        self._verdicts[id(model)] = (model, True)
        return True

    def _refuse(self, model: TorchModel, err: ConfigError) -> None:
        if self._verdicts.get(id(model), (None, True))[1]:
            logger.warning("training %r sequentially: %s", model, err)
        self._verdicts[id(model)] = (model, False)


def _torch(session: ClientSession) -> TorchClient:
    """The session's client, known by now to be a plain TorchClient."""
    client: TorchClient = session.client  # type: ignore[assignment]
    return client


def _group_of(groups: list[_Group], model: TorchModel, message: FitIns) -> _Group:
    # Clients train together when everything but their own state matches.
    config = replace(message.config, state={})
    for group in groups:
        if (
            group.model is model
            and (group.params is message.params or group.params == message.params)
            and (group.config is config or group.config == config)
        ):
            return group
    group = _Group(model, message.params, config)
    groups.append(group)
    return group


def _failed_build(
    client_id: ClientId, request: StageRequest, err: Exception
) -> StageReply:
    # run_client_stage turns the error into its failure reply (and log line);
    # handing it the error avoids calling the failing client_fn twice.
    def reraise(_client_id: ClientId) -> Any:
        raise err

    return run_client_stage(reraise, client_id, request, seed=0)
