"""The iterative-process API: ``state, metrics = process.next(state, data)``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fedshield.core import Client, ClientId, FitConfig, ServerState
from fedshield.errors import ConfigError, RoundFailedError
from fedshield.simulation import ClientStateStore, SequentialBackend, run_round
from fedshield.strategies import FedAvg, Scaffold, ServerSgd

if TYPE_CHECKING:
    import torch

    from fedshield.models import TorchModel

__all__ = ["ClientData", "FederatedProcess", "fedavg"]

ClientData = (
    Sequence[tuple[np.ndarray, np.ndarray]]
    | Mapping[ClientId, tuple[np.ndarray, np.ndarray]]
    | Sequence[Client]
    | Mapping[ClientId, Client]
)
"""One round's participants: ``(x, y)`` arrays or :class:`Client` objects,
as a list (ids ``"0"``, ``"1"``, ...) or keyed by client id."""


class FederatedProcess:
    """A federated algorithm as an initialize/next pair (TFF's iterative process).

    Each :meth:`next` runs one round over exactly the clients it is given,
    through the same round loop, validation and aggregation as
    ``fedshield simulate``.

    Parameters
    ----------
    model
        The model adapter.
    strategy
        The assembled strategy (its sampler is ignored: every given client
        takes part).
    seed
        Seeds initialisation and every client's local shuffling.
    """

    def __init__(
        self, model: TorchModel, strategy: FedAvg | Scaffold, *, seed: int = 0
    ) -> None:
        self.model = model
        self.strategy = strategy
        self.seed = seed
        self._backend = SequentialBackend()
        # Stateful strategies (SCAFFOLD): the clients' state between rounds,
        # kept here as the clients' own disks would keep it.
        self.client_states = ClientStateStore() if strategy.is_stateful else None

    def initialize(self) -> ServerState:
        """The state before round 0 (parameters initialised from ``seed``)."""
        return self.strategy.init(self.model.init_params(self.seed))

    def _clients(self, client_data: ClientData) -> dict[ClientId, Client]:
        from fedshield.models import TorchClient

        items: list[tuple[ClientId, Any]] = (
            [(str(k), v) for k, v in client_data.items()]
            if isinstance(client_data, Mapping)
            else [(str(i), v) for i, v in enumerate(client_data)]
        )
        if not items:
            raise ConfigError("client_data must hold at least one client; got none")
        clients: dict[ClientId, Client] = {}
        for cid, value in items:
            if isinstance(value, Client):
                # A client object signs its updates with its own id.
                own = getattr(value, "client_id", None)
                keyed = isinstance(client_data, Mapping)
                if own is not None and keyed and str(own) != cid:
                    raise ConfigError(
                        f"client_data[{cid!r}] is a client whose client_id is "
                        f"{own!r}; key it by its own id"
                    )
                if own is not None:
                    cid = str(own)
                if cid in clients:
                    raise ConfigError(f"two clients in client_data have id {cid!r}")
                clients[cid] = value
            elif isinstance(value, tuple) and len(value) == 2:
                x, y = value
                clients[cid] = TorchClient(
                    cid, self.model, x_train=np.asarray(x), y_train=np.asarray(y)
                )
            else:
                raise ConfigError(
                    f"client_data[{cid!r}] must be an (x, y) tuple or a Client; "
                    f"got {type(value).__name__}"
                )
        return clients

    def next(
        self, state: ServerState, client_data: ClientData
    ) -> tuple[ServerState, dict[str, Any]]:
        """Run one round with ``client_data``; return the new state and metrics.

        Raises
        ------
        RoundFailedError
            If fewer than ``min_clients`` clients return a valid update.
        """
        clients = self._clients(client_data)
        # A client may not claim more examples than the largest data set here.
        sizes = [getattr(c, "num_train_examples", None) for c in clients.values()]
        known = [n for n in sizes if isinstance(n, int)]
        result = run_round(
            self.strategy,
            state,
            client_fn=clients.__getitem__,
            client_ids=list(clients),
            seed=self.seed,
            backend=self._backend,
            max_examples=max(known) if known and len(known) == len(sizes) else None,
            client_states=self.client_states,
        )
        if not result.completed:
            details = "; ".join(
                f"{f.client_id} ({f.kind}): {f.message}" for f in result.failures[:5]
            )
            raise RoundFailedError(f"{result.message}. Failures: {details}")
        metrics = dict(result.metrics)
        metrics["failures"] = [f.to_json() for f in result.failures]
        return result.state, metrics

    def evaluate(
        self, state: ServerState, x: np.ndarray, y: np.ndarray
    ) -> dict[str, float]:
        """Evaluate the global model of ``state`` on ``(x, y)``."""
        return dict(self.model.evaluate(state.params, np.asarray(x), np.asarray(y)))


def fedavg(
    model_fn: Callable[[], torch.nn.Module],
    *,
    epochs: int = 1,
    batch_size: int = 32,
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    server_lr: float = 1.0,
    min_clients: int = 1,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
) -> FederatedProcess:
    """Federated averaging of a PyTorch model, as an iterative process.

    Parameters
    ----------
    model_fn
        Builds the ``torch.nn.Module`` (called once).
    epochs, batch_size, lr, momentum, weight_decay
        Local SGD on each client.
    server_lr
        Server learning rate (1 is plain FedAvg).
    min_clients
        Fewest valid updates for a round to count.
    input_shape
        Shape of one example when inputs arrive flattened.
    seed
        Seeds initialisation and local shuffling.

    Examples
    --------
    >>> import fedshield as fs, torch, numpy as np
    >>> process = fs.fedavg(lambda: torch.nn.Linear(4, 2), lr=0.1)
    >>> state = process.initialize()
    >>> rng = np.random.default_rng(0)
    >>> data = [(rng.normal(size=(20, 4)).astype("float32"),
    ...          rng.integers(0, 2, 20)) for _ in range(3)]
    >>> state, metrics = process.next(state, data)
    >>> state.round_idx, metrics["num_clients"]
    (1, 3)
    """
    from fedshield.models import TorchModel

    strategy = FedAvg(
        server_opt=ServerSgd(server_lr),
        local=FitConfig(
            round_idx=0,
            epochs=epochs,
            batch_size=batch_size,
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
        ),
        min_clients=min_clients,
    )
    return FederatedProcess(
        TorchModel(model_fn, input_shape=input_shape), strategy, seed=seed
    )
