"""The iterative-process API: ``state, metrics = process.next(state, data)``."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import BaseModel

from fedshield.api.config import (
    EACH_ROUND,
    ExperimentConfig,
    PrivacySection,
    parse_config,
)
from fedshield.core import Client, ClientId, ServerState
from fedshield.errors import ConfigError, RoundFailedError
from fedshield.simulation import ClientStateStore, SequentialBackend, run_round
from fedshield.strategies import FedAvg, PrivateRelease, Scaffold

if TYPE_CHECKING:
    import torch

    from fedshield.models import TorchModel

__all__ = ["ClientData", "FederatedProcess", "fedavg"]

_LINEAGE = "dp_lineage"
"""State metadata of a DP process's state: id, round charged to, and facts."""
_LINEAGES: dict[str, tuple[int, float]] = {}
"""Each DP lineage's latest charge in this Python session: (rounds, ε)."""
_LINEAGES_LOCK = threading.Lock()

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
        self,
        model: TorchModel,
        strategy: FedAvg | Scaffold | None = None,
        *,
        seed: int = 0,
        config: ExperimentConfig | None = None,
    ) -> None:
        if strategy is None and config is None:
            raise ConfigError("FederatedProcess needs a strategy or a config")
        self.model = model
        self.config = config
        self.seed = seed
        self._backend = SequentialBackend()
        # Under [privacy] the strategy depends on the population (the clients
        # the first round is given): built then, and kept.
        self._population: tuple[ClientId, ...] | None = None
        # Record mode: each client's record count, fixed by the first round
        # (the accountant's sampling rate of DP-SGD's batches is batch/count).
        self._sizes: dict[ClientId, int] | None = None
        # The privacy record of the last state a round produced (completed or
        # not): DP charges every round run, so no older state may continue.
        self._spent: Mapping[str, Any] | None = None
        self._checked = False
        self.strategy: Any = strategy
        if strategy is None:
            assert config is not None
            self.strategy = self._build(None)
        # Stateful strategies (SCAFFOLD): the clients' state between rounds,
        # kept here as the clients' own disks would keep it.
        self.client_states = ClientStateStore() if self.strategy.is_stateful else None

    @property
    def _private(self) -> bool:
        return self.config is not None and self.config.privacy.mode != "none"

    def _build(self, clients: Mapping[ClientId, Client] | None) -> Any:
        """The configured strategy for ``clients`` (None: before any round)."""
        from fedshield.api.experiment import build_strategy

        assert self.config is not None
        if self.config.robust.rule == "fltrust":
            raise ConfigError(
                'robust.rule = "fltrust" needs a root data set on the server, '
                "which fs.fedavg does not have; use fs.simulate or another rule"
            )
        if self._private and clients is None:
            # A placeholder of the right kind until the population is known.
            return build_strategy(
                self.config.model_copy(update={"privacy": PrivacySection()})
            )
        sizes = None
        if clients is not None and self.config.privacy.mode == "record":
            sizes = {cid: _num_examples(c) for cid, c in clients.items()}
            self._sizes = sizes
        strategy: Any = build_strategy(
            self.config,
            num_clients=len(clients) if clients is not None else None,
            client_sizes=sizes,
        )
        return strategy

    def _check(self, strategy: Any, clients: Mapping[ClientId, Client]) -> None:
        """The checks ``fedshield simulate`` runs before round 1, once."""
        if self._checked:
            return
        assert self.config is not None
        if self._private:
            strategy.check(len(clients), dimension=self.model.spec.size)
        else:
            strategy.check(len(clients))
        secure = self._secure()
        if secure is not None:
            from fedshield.api.experiment import client_sampler
            from fedshield.simulation.secure import EXTRA_WORDS

            distributed = (
                strategy.privacy.distributed()
                if self.config.privacy.mode == "distributed"
                else None
            )
            secure.check(
                client_sampler(self.config).expected_count(len(clients)),
                self.model.spec.size + EXTRA_WORDS,
                distributed=distributed,
            )
        self._checked = True

    def _secure(self) -> Any:
        from fedshield.api.experiment import secure_settings

        return secure_settings(self.config) if self.config is not None else None

    def initialize(self) -> ServerState:
        """The state before round 0 (parameters initialised from ``seed``)."""
        state: ServerState = self.strategy.init(self.model.init_params(self.seed))
        return state

    def _strategy_for(
        self, state: ServerState, clients: Mapping[ClientId, Client]
    ) -> tuple[Any, ServerState]:
        """The strategy for this round's clients, and the state it continues.

        Under differential privacy the first round's clients are the
        population: the accountant's sampling rate and δ < 1/N refer to it,
        so every later round must be given the same clients.
        """
        if not self._private:
            if self.config is not None:
                self._check(self.strategy, clients)
            return self.strategy, state
        self._fix_population(clients)
        self._check(self.strategy, clients)
        self._check_sizes(clients)
        if "privacy" not in state.metadata:
            state = self._open_ledger(state, clients)
        self._check_spent(state.metadata["privacy"])
        self._check_lineage(state, clients)
        return self.strategy, state

    def _fix_population(self, clients: Mapping[ClientId, Client]) -> None:
        """The first DP round's clients become the population; later, the same."""
        ids = tuple(sorted(clients))
        if self._population is None:
            self.strategy = self._build(clients)
            self._population = ids
        elif ids != self._population:
            raise ConfigError(
                "under [privacy] every round must be given the same clients "
                f"(the population of {len(self._population)} the accountant "
                f"assumes); got {len(ids)} clients, "
                f"{len(set(ids) ^ set(self._population))} of them different. "
                "Pass the whole population each round: fedshield samples from "
                "it (strategy.fraction or clients_per_round)"
            )

    def _check_sizes(self, clients: Mapping[ClientId, Client]) -> None:
        """Record mode: every client keeps the record count of the first round."""
        if self._sizes is None:
            return
        sizes = {cid: _num_examples(c) for cid, c in clients.items()}
        changed = sorted(c for c in sizes if sizes[c] != self._sizes.get(c))
        if changed:
            cid = changed[0]
            raise ConfigError(
                f"record-level DP: client {cid!r} has {sizes[cid]} records "
                f"this round but had {self._sizes.get(cid)} in the first; "
                "DP-SGD's sampling rate (batch / records) is accounted for "
                "the first round's counts, so each client's data must stay "
                "the same size"
            )

    def _open_ledger(
        self, state: ServerState, clients: Mapping[ClientId, Client]
    ) -> ServerState:
        """``state`` (round 0, no privacy record yet) with a fresh DP lineage."""
        if self._spent is not None:
            raise ConfigError(
                "this state is older than the last round this process ran "
                "(it has no privacy ledger; ε spent so far "
                f"{self._spent.get('epsilon')}): every round run is charged; "
                "continue from the latest state"
            )
        if state.round_idx != 0:
            raise ConfigError(
                "this state has no privacy ledger but is past round 0: "
                "start from this process's initialize()"
            )
        state = self.strategy.init(state.params)
        lineage = {
            **self._lineage_facts(clients),
            "id": uuid.uuid4().hex,
            "round_idx": state.round_idx,
        }
        return state.evolve(metadata={**state.metadata, _LINEAGE: lineage})

    def _lineage_facts(self, clients: Mapping[ClientId, Client]) -> dict[str, Any]:
        """What the accountant assumes besides σ: local training, record counts."""
        assert self.config is not None
        c = self.config.client
        facts: dict[str, Any] = {"batch_size": c.batch_size, "epochs": c.epochs}
        if self.config.privacy.mode == "record":
            facts["sizes"] = {cid: _num_examples(v) for cid, v in clients.items()}
        return facts

    def _check_lineage(
        self, state: ServerState, clients: Mapping[ClientId, Client]
    ) -> None:
        """Refuse a state this lineage has moved past, or changed under it.

        A DP state carries its lineage: an id, the round it was charged up
        to and what record mode's accounting assumed (batch size, epochs,
        each client's record count). Every process in this Python session
        knows how far each lineage has been charged, so no process (a new
        one included) can continue from an older state of it.
        """
        info = state.metadata.get(_LINEAGE)
        if not isinstance(info, Mapping):
            raise ConfigError(
                "this state's privacy record was not written by fs.fedavg's "
                "process (no lineage): continue it where it was made"
            )
        if int(info.get("round_idx", -1)) != state.round_idx:
            raise ConfigError(
                f"this state is at round {state.round_idx} but its privacy "
                f"record was charged up to round {info.get('round_idx')}: rounds "
                "ran outside the DP process (without noise or accounting)"
            )
        facts = self._lineage_facts(clients)
        for key, ours in facts.items():
            if info.get(key) != ours:
                raise ConfigError(
                    f"this state's ε was accounted with {key} = {info.get(key)!r}; "
                    f"this process has {ours!r}: record-level accounting depends "
                    "on it, so the state cannot be continued here"
                )
        record = state.metadata["privacy"]
        with _LINEAGES_LOCK:
            latest = _LINEAGES.get(str(info.get("id")))
        if latest is not None and (
            int(record.get("rounds", 0)) < latest[0]
            or float(record.get("epsilon") or 0.0) < latest[1]
        ):
            raise ConfigError(
                "this state is older than the last round run from it (its ε "
                f"{record.get('epsilon')}, spent so far {latest[1]}): every round "
                "run is charged, completed or not; continue from the latest state "
                "(after a failed round: RoundFailedError.state)"
            )

    def _stamp(self, state: ServerState) -> ServerState:
        """``state`` with its lineage brought up to this round's charge."""
        info = state.metadata.get(_LINEAGE)
        record = state.metadata.get("privacy")
        if not isinstance(info, Mapping) or not isinstance(record, Mapping):
            return state
        with _LINEAGES_LOCK:
            _LINEAGES[str(info["id"])] = (
                int(record.get("rounds", 0)),
                float(record.get("epsilon") or 0.0),
            )
        return state.evolve(
            metadata={
                **state.metadata,
                _LINEAGE: {**info, "round_idx": state.round_idx},
            }
        )

    def _check_spent(self, record: Mapping[str, Any]) -> None:
        """Refuse a state whose ε was spent under other noise settings.

        Whether it is the latest state of its lineage is
        :meth:`_check_lineage`'s part.
        """
        settings = self.strategy.privacy
        for key, ours in (
            ("mode", settings.mode),
            ("noise_multiplier", settings.noise_multiplier),
            ("accountant", settings.accountant),
            ("delta", settings.delta),
        ):
            if record.get(key) != ours:
                raise ConfigError(
                    f"this state's privacy record has {key} = {record.get(key)!r}, "
                    f"this process {ours!r}: its ε was spent under other settings "
                    "and cannot be continued here"
                )

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
        client_side = (
            self._private
            and self.config is not None
            and (self.config.privacy.mode in ("record", "local", "distributed"))
        )
        for cid, value in items:
            if client_side and not (
                isinstance(value, tuple)
                or (isinstance(value, TorchClient) and value.model is self.model)
            ):
                assert self.config is not None
                raise ConfigError(
                    f'privacy.mode = "{self.config.privacy.mode}" is enforced by '
                    "each client (its clipping and noise), so client_data must be "
                    "(x, y) arrays, which this process trains with its own model; "
                    f"client_data[{cid!r}] is a {type(value).__name__}"
                )
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
                if cid in clients:
                    raise ConfigError(
                        f"two clients in client_data have id {cid!r} (keys are "
                        "compared as strings: 1 and '1' are the same client)"
                    )
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
        strategy, state = self._strategy_for(state, clients)
        # A client may not claim more examples than the largest data set here.
        sizes = [getattr(c, "num_train_examples", None) for c in clients.values()]
        known = [n for n in sizes if isinstance(n, int)]
        result = run_round(
            strategy,
            state,
            client_fn=clients.__getitem__,
            client_ids=list(clients),
            seed=self.seed,
            backend=self._backend,
            max_examples=max(known) if known and len(known) == len(sizes) else None,
            client_states=self.client_states,
            secure=self._secure(),
        )
        new_state = self._stamp(result.state) if self._private else result.state
        spent = new_state.metadata.get("privacy")
        if isinstance(spent, Mapping):
            self._spent = spent
        central = (
            self._private
            and self.config is not None
            and (self.config.privacy.mode == "central")
        )
        if not result.completed:
            details = "; ".join(
                f"{f.client_id} ({f.kind}): {f.message}" for f in result.failures[:5]
            )
            raise RoundFailedError(
                # Central DP keeps who was sampled secret: no client named.
                result.message if central else f"{result.message}. Failures: {details}",
                state=new_state,
            )
        metrics = dict(result.metrics)
        if isinstance(strategy, PrivateRelease):
            # Only what the guarantee covers leaves a DP round.
            metrics = strategy.released(metrics)
        privacy = new_state.metadata.get("privacy")
        if isinstance(privacy, Mapping):
            metrics["epsilon"] = privacy.get("epsilon")
            metrics["delta"] = privacy.get("delta")
        if not central:
            # Central DP keeps who was sampled secret (amplification by
            # sampling assumes it), and a failure names a sampled client.
            metrics["failures"] = [f.to_json() for f in result.failures]
        return new_state, metrics

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
    server_lr: float | None = None,
    min_clients: int = 1,
    input_shape: tuple[int, ...] | None = None,
    seed: int = 0,
    task: str = "classification",
    rounds: int | None = None,
    strategy: Mapping[str, Any] | BaseModel | None = None,
    privacy: Mapping[str, Any] | BaseModel | None = None,
    secagg: Mapping[str, Any] | BaseModel | None = None,
    robust: Mapping[str, Any] | BaseModel | None = None,
) -> FederatedProcess:
    """Federated averaging of a PyTorch model, as an iterative process.

    Parameters
    ----------
    model_fn
        Builds the ``torch.nn.Module`` (called once).
    epochs, batch_size, lr, momentum, weight_decay
        Local SGD on each client (``[client]``).
    server_lr
        Server learning rate (default: 1, plain FedAvg; the server
        optimizer's own default for ``fedadam`` and the like).
    min_clients
        Fewest valid updates for a round to count.
    input_shape
        Shape of one example when inputs arrive flattened.
    seed
        Seeds initialisation and local shuffling; under ``privacy`` the noise
        and the client sample come from the operating system's cryptographic
        generator unless ``privacy={"secure_rng": False, ...}`` asks for the
        seed (reproducible, but then whoever knows the seed can remove the
        noise).
    task
        ``"classification"`` (cross-entropy; accuracy) or ``"regression"``
        (mean squared error; RMSE and MAE).
    rounds
        The rounds planned (``run.rounds``): what ``privacy.target_epsilon``
        is calibrated for.
    strategy, privacy, secagg, robust
        The TOML sections of the same names, as dicts (or the typed
        sections of :mod:`fedshield.api.config`), validated by the same
        schema with the same messages: sampling and the server optimizer,
        differential privacy (ε then comes back in every round's metrics),
        secure aggregation, a robust rule.

    Raises
    ------
    ConfigError
        If a key is unknown or a value invalid (naming it).

    Notes
    -----
    Under ``privacy``, the first :meth:`FederatedProcess.next` fixes the
    population: pass every client each round, and fedshield samples from
    them (``strategy.fraction`` or ``clients_per_round``, default every
    client), so that the accountant's sampling assumption holds.

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
    >>> private = fs.fedavg(lambda: torch.nn.Linear(4, 2), privacy={
    ...     "mode": "central", "clip_norm": 1.0, "noise_multiplier": 1.0})
    >>> state, metrics = private.next(private.initialize(), data)
    >>> metrics["epsilon"] > 0
    True
    """
    from fedshield.models import TorchModel

    sections: dict[str, Any] = {
        "run": {"seed": seed, **({"rounds": rounds} if rounds is not None else {})},
        "client": _local_sgd(epochs, batch_size, lr, momentum, weight_decay),
        "model": {"task": task},
        # The clients come with each round; the data section only says so.
        "data": {"dataset": "python", "factory": EACH_ROUND},
        "strategy": _strategy_section(server_lr, min_clients, strategy),
        **_optional_sections(privacy=privacy, secagg=secagg, robust=robust),
    }
    config = parse_config(sections)
    model = TorchModel(model_fn, input_shape=input_shape, task=config.model.task)
    return FederatedProcess(model, seed=seed, config=config)


def _local_sgd(
    epochs: int, batch_size: int, lr: float, momentum: float, weight_decay: float
) -> dict[str, Any]:
    """``fs.fedavg``'s ``[client]`` section: each client's local SGD."""
    return {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "momentum": momentum,
        "weight_decay": weight_decay,
    }


def _strategy_section(
    server_lr: float | None,
    min_clients: int,
    strategy: Mapping[str, Any] | BaseModel | None,
) -> dict[str, Any]:
    """``fs.fedavg``'s ``[strategy]``: its keywords, then the section given."""
    return {
        **({"server_lr": server_lr} if server_lr is not None else {}),
        "min_clients": min_clients,
        **_section("strategy", strategy),
    }


def _optional_sections(
    **given: Mapping[str, Any] | BaseModel | None,
) -> dict[str, dict[str, Any]]:
    """The sections given (of ``privacy``, ``secagg``, ``robust``), as dicts."""
    sections = {
        name: _section(name, value)
        for name, value in given.items()
        if value is not None
    }
    if "privacy" in sections:
        # The noise and the sample from the OS unless asked otherwise: seeded
        # noise is the same in every process with this seed, so two releases
        # on neighbouring data would cancel it (the TOML's default is the
        # seed, for reproducible studies, and its summary says so).
        sections["privacy"].setdefault("secure_rng", True)
    return sections


IN_PYTHON = "fedshield.api.process:clients_given_in_python"
"""``data.factory`` of a configuration whose clients Python hands over."""


def clients_given_in_python() -> None:
    """The data of a config whose clients come from Python, not from files.

    ``fs.fedavg``'s clients come with each ``next(state, client_data)``;
    ``fs.simulate(config, clients=...)`` takes them as an argument.

    Raises
    ------
    ConfigError
        Always: such a configuration has no data of its own.
    """
    raise ConfigError(
        "this configuration's clients are given from Python (each call to "
        "next(state, client_data), or fs.simulate(config, clients=...)); it "
        "has no data of its own to load"
    )


clients_given_each_round = clients_given_in_python


def _section(name: str, value: Mapping[str, Any] | BaseModel | None) -> dict[str, Any]:
    """A section given as a dict or a typed section, as a plain dict."""
    if value is None:
        return {}
    if isinstance(value, BaseModel):
        # Only what the caller set: the section's defaults are the schema's.
        return value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(
        f"{name}= must be a dict of [{name}] keys or a typed section; "
        f"got {type(value).__name__}"
    )


def _num_examples(client: Client) -> int:
    n = getattr(client, "num_train_examples", None)
    if not isinstance(n, int):
        raise ConfigError(
            "record-level DP needs each client's number of training examples "
            "(num_train_examples); give (x, y) arrays"
        )
    return n
