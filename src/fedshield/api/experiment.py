"""From a configuration to a runnable federation: data, clients, model."""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from fedshield.api.config import ExperimentConfig, StrategySection
from fedshield.core import ClientId, FitConfig, Params, ServerState, derive_rng
from fedshield.data import (
    Dataset,
    PartitionSummary,
    load_dataset,
    natural_client_names,
    partition,
    split_test,
    summarize_partition,
)
from fedshield.errors import ConfigError
from fedshield.simulation.secure import SecureAggregation
from fedshield.strategies import (
    CountSampler,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    FractionSampler,
    Scaffold,
    ServerOptimizer,
    ServerSgd,
)

if TYPE_CHECKING:
    from fedshield.data.user import UserDataSpec
    from fedshield.models import TorchClient, TorchModel
    from fedshield.models.attacks import AttackSpec
    from fedshield.strategies.dp import DpFedAvg, PoissonSampler, PrivacySettings

__all__ = ["Federation", "build_federation", "build_strategy"]


@dataclass(frozen=True)
class Attack:
    """The run's malicious clients and their attack (``[attack]``)."""

    spec: AttackSpec
    malicious: tuple[ClientId, ...]
    num_classes: int
    boost: float
    max_examples: int

    def to_json(self) -> dict[str, Any]:
        """What the run folder records (``attack.json``)."""
        return {
            "kind": self.spec.kind,
            "fraction": self.spec.fraction,
            "malicious": list(self.malicious),
            "boost": self.boost if self.spec.kind == "backdoor" else None,
        }


class DatasetClients:
    """Builds each client lazily from its slice of a shared data set.

    Picklable, so process and Ray backends can ship it. A client's local test
    split (for federated evaluation) is drawn from ``(seed, client_id)``.

    Clients built recently are kept for reuse (they hold only their rows, which
    never change), least recently used first out, up to ``cache_bytes`` of
    data: a client sampled again skips copying its rows. The cache is not
    pickled; each process keeps its own.
    """

    def __init__(
        self,
        model: TorchModel,
        train: Dataset,
        parts: Mapping[ClientId, np.ndarray],
        *,
        client_test_fraction: float,
        seed: int,
        cache_bytes: int = 64 * 2**20,
        attack: Attack | None = None,
    ) -> None:
        self.model = model
        self.train = train
        self.parts = dict(parts)
        self.client_test_fraction = client_test_fraction
        self.seed = seed
        self.cache_bytes = int(cache_bytes)
        self.attack = attack
        self._malicious = frozenset(attack.malicious if attack else ())
        self.trust: Any = None
        """What every client checks the server against under secure
        aggregation (a :class:`~fedshield.simulation.secure_client.
        ClientTrust`); attached to each client built."""
        self._init_cache()

    def _init_cache(self) -> None:
        self._cache: OrderedDict[ClientId, tuple[TorchClient, int]] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_cache", "_cached_bytes", "_lock"):
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_cache()

    def local_split(self, client_id: ClientId) -> tuple[np.ndarray, np.ndarray]:
        """Row indices of the client's local train and test splits.

        Raises
        ------
        KeyError
            If there is no such client.
        """
        try:
            indices = self.parts[client_id]
        except KeyError:
            raise KeyError(f"no client {client_id!r} in this federation") from None
        n_test = round(self.client_test_fraction * len(indices))
        n_test = min(n_test, len(indices) - 1)
        if n_test <= 0:  # every row trains: no shuffle to draw
            return np.sort(indices), indices[:0]
        order = derive_rng(self.seed, "local-split", client_id).permutation(indices)
        return np.sort(order[n_test:]), np.sort(order[:n_test])

    def __call__(self, client_id: ClientId) -> TorchClient:
        """The client ``client_id``."""
        with self._lock:
            hit = self._cache.get(client_id)
            if hit is not None:
                self._cache.move_to_end(client_id)
                hit[0].trust = self.trust  # the run's, not an earlier one's
                return hit[0]
        client = self._build(client_id)
        client.trust = self.trust
        size = client.nbytes
        if client_id in self._malicious:
            client = self._corrupt(client)
        if size <= self.cache_bytes:
            with self._lock:
                if client_id not in self._cache:
                    self._cache[client_id] = (client, size)
                    self._cached_bytes += size
                while self._cached_bytes > self.cache_bytes:
                    _, (_, old) = self._cache.popitem(last=False)
                    self._cached_bytes -= old
        return client

    def _corrupt(self, client: TorchClient) -> Any:
        from fedshield.models.attacks import ATTACKS, MaliciousClient

        assert self.attack is not None
        corrupt = MaliciousClient(
            client,
            self.attack.spec,
            num_classes=self.attack.num_classes,
            boost=self.attack.boost,
            max_examples=self.attack.max_examples,
        )
        corrupt.trust = self.trust  # type: ignore[attr-defined]
        # A simulated colluder shares its update with the coalition and
        # sends the coalition's rewrite (ALIE, IPM).
        colluding = ATTACKS.get(self.attack.spec.kind).collude is not None
        corrupt.colluding = colluding  # type: ignore[attr-defined]
        return corrupt

    def _build(self, client_id: ClientId) -> TorchClient:
        from fedshield.models import TorchClient

        train_idx, test_idx = self.local_split(client_id)
        x, y = self.train.x, self.train.y
        has_test = len(test_idx) > 0
        return TorchClient(
            client_id,
            self.model,
            x_train=x[train_idx],
            y_train=y[train_idx],
            x_test=x[test_idx] if has_test else None,
            y_test=y[test_idx] if has_test else None,
        )


@dataclass(frozen=True)
class Federation:
    """Everything a simulation needs besides the strategy.

    Parameters
    ----------
    model
        The model adapter shared by all clients.
    client_ids
        Every client, in order.
    client_fn
        Builds a client from its id (lazily).
    test
        The server's held-out test set (centralised evaluation).
    train
        The pooled training rows the clients' slices index into.
    partition
        Per-client sample counts and label histograms.
    dataset
        The data set's name.
    """

    model: TorchModel
    client_ids: tuple[ClientId, ...]
    client_fn: DatasetClients
    test: Dataset
    partition: PartitionSummary
    dataset: str
    train: Dataset
    attack: Attack | None = None

    def evaluate(self, params: Params) -> dict[str, float]:
        """Centralised evaluation on the held-out test set.

        Under a backdoor attack, also ``asr``: the share of the test inputs
        of other classes that the model assigns to the target class once the
        trigger is added (Bagdasaryan et al. 2020).
        """
        metrics = self.model.evaluate(params, self.test.x, self.test.y)
        out = {k: float(v) for k, v in metrics.items() if k != "num_examples"}
        if self.attack is not None and self.attack.spec.kind == "backdoor":
            from fedshield.models.attacks import add_trigger

            target = self.attack.spec.target_label
            keep = self.test.y != target
            if keep.any():
                triggered = add_trigger(self.test.x[keep])
                labels = np.full(int(keep.sum()), target, dtype=self.test.y.dtype)
                hit = self.model.evaluate(params, triggered, labels)
                out["asr"] = float(hit["accuracy"])
        return out

    @property
    def max_examples(self) -> int:
        """The largest ``num_examples`` any client can honestly claim."""
        return max(self.partition.num_samples)

    def train_sizes(self) -> dict[ClientId, int]:
        """Each client's number of local training records."""
        return {cid: len(self.client_fn.local_split(cid)[0]) for cid in self.client_ids}


UserClients = Mapping[Any, tuple[Any, Any]]
"""In-memory clients for :func:`build_federation`: ``{client_id: (x, y)}``."""


def build_federation(
    config: ExperimentConfig,
    *,
    model_fn: Callable[[], Any] | None = None,
    clients: UserClients | None = None,
    test: tuple[Any, Any] | None = None,
) -> Federation:
    """Load the data, partition it and build the model, as ``config`` says.

    Parameters
    ----------
    config
        The experiment.
    model_fn
        The user's model (a callable returning a ``torch.nn.Module``), in
        place of ``[model]``'s kind (the Python API's ``model_fn``).
    clients
        The user's data held in memory, ``{client_id: (x, y)}``, in place of
        ``[data]``'s data set; each key is a client.
    test
        ``(x, y)``: the server's test set for ``clients`` (default: a
        ``test_fraction`` of every client's rows).

    Raises
    ------
    ConfigError
        If the partition does not fit the data set (e.g. ``natural`` on a
        data set without natural clients, or the wrong number of clients),
        the user's data or model is malformed (the message names the file,
        column and row, or the layer).
    DataUnavailableError
        If the data set is not installed.
    PartitionError
        If a client would get fewer than ``min_samples`` examples.
    """
    split = _split_data(config, clients, test)
    client_ids = split.client_ids
    model = _build_model(config, split.train, model_fn)
    attack = _attack(config, client_ids, split.summary, split.train.num_classes)
    federation_clients = DatasetClients(
        model,
        split.train,
        split.parts,
        client_test_fraction=config.data.client_test_fraction,
        seed=config.run.seed,
        attack=attack,
    )
    return Federation(
        model=model,
        client_ids=client_ids,
        client_fn=federation_clients,
        test=split.test,
        partition=split.summary,
        dataset=config.data.dataset if clients is None else "python",
        train=split.train,
        attack=attack,
    )


@dataclass(frozen=True)
class _Split:
    """The data once split: the clients' rows, the server's test set."""

    train: Dataset
    test: Dataset
    client_ids: tuple[ClientId, ...]
    parts: dict[ClientId, np.ndarray]
    summary: PartitionSummary


def _split_data(
    config: ExperimentConfig,
    clients: UserClients | None,
    test: tuple[Any, Any] | None,
) -> _Split:
    """Load the data, hold out the test set, partition and preprocess the rest."""
    data, seed = config.data, config.run.seed
    dataset, test_set, names = _load_data(config, clients, test)
    if dataset.task != config.model.task:
        raise ConfigError(
            f'model.task = "{config.model.task}" but the data is a '
            f'{dataset.task} data set; set model.task = "{dataset.task}"'
        )
    if test_set is None:
        dataset, test_set = split_test(
            dataset,
            test_fraction=data.test_fraction,
            rng=derive_rng(seed, "test-split"),
        )
    method = _partition_method(config, names)
    client_ids = _client_ids(config, dataset, method, names)
    parts = partition(
        dataset.y,
        len(client_ids),
        method=method,
        rng=derive_rng(seed, "partition"),
        alpha=data.alpha,
        shards_per_client=data.shards,
        sigma=data.sigma,
        groups=dataset.groups,
        min_samples=data.min_samples,
    )
    by_client = dict(zip(client_ids, parts, strict=True))
    train, test_set = _preprocess(config, dataset, by_client, test_set, method)
    summary = summarize_partition(
        parts,
        train.y,
        num_classes=train.num_classes,
        client_ids=client_ids,
        method=method,
    )
    return _Split(train, test_set, tuple(client_ids), by_client, summary)


def _partition_method(config: ExperimentConfig, names: Sequence[str] | None) -> str:
    """``data.partition``; unset, ``natural`` if the data names its clients."""
    if config.data.partition is not None:
        return config.data.partition
    return "natural" if names is not None else "iid"


def _client_ids(
    config: ExperimentConfig,
    train: Dataset,
    method: str,
    names: Sequence[str] | None,
) -> Sequence[str]:
    """The clients' ids, checked against the counts the config sets."""
    if method == "natural":
        client_ids = _natural_ids(config, train, names)
    else:
        client_ids = _numbered_ids(config, method, names)
    if config.expected_num_clients is None:  # the count is known only now
        try:
            config.check_client_counts(len(client_ids))
            config.check_secagg_neighbours(len(client_ids))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return client_ids


def _natural_ids(
    config: ExperimentConfig, train: Dataset, names: Sequence[str] | None
) -> list[str]:
    """The clients the training rows name (the ``natural`` partition)."""
    data = config.data
    if train.groups is None:
        raise ConfigError(
            "data.partition = 'natural' needs data that names its clients; "
            f"{data.dataset!r} does not. Use another partition, or (your own "
            "data) a client_column or a folder of one file per client"
        )
    found = natural_client_names(train.groups)
    if names is not None and len(found) != len(names):
        missing = sorted(set(names) - set(found))
        raise ConfigError(
            f"client(s) {', '.join(missing)} have no training rows once the "
            "test rows are held out; give them more rows or lower "
            "data.test_fraction"
        )
    if data.num_clients is not None and data.num_clients != len(found):
        raise ConfigError(
            f"data.num_clients must be {len(found)} for the natural partition "
            f"of {data.dataset!r} ({', '.join(found[:12])}"
            f"{', ...' if len(found) > 12 else ''}); got {data.num_clients}, "
            "or leave it unset"
        )
    return found


def _numbered_ids(
    config: ExperimentConfig, method: str, names: Sequence[str] | None
) -> list[str]:
    """``"0"``, ``"1"``, ...: the clients a partitioner splits the data among."""
    data = config.data
    if names is not None:
        raise ConfigError(
            f"data.partition = {method!r}, but the data already names its "
            f"{len(names)} clients (a client_column, a folder of per-client "
            "files or a factory); drop data.partition, or give one file "
            "without client_column to be partitioned"
        )
    count = data.num_clients if data.num_clients is not None else 10
    return [str(i) for i in range(count)]


def _preprocess(
    config: ExperimentConfig,
    train: Dataset,
    by_client: dict[ClientId, np.ndarray],
    test_set: Dataset,
    method: str,
) -> tuple[Dataset, Dataset]:
    """Each client's rows (and the test set) encoded and scaled as ``[data]`` says."""
    from fedshield.data.preprocess import preprocess_per_client

    private = config.privacy.mode != "none"
    return preprocess_per_client(
        train,
        by_client,
        test_set,
        # Under DP the server's evaluation (released every round) must not
        # depend on the clients' training rows: the test set is then scaled
        # with its own statistics, as the server's own site (per owner, a
        # hospital with a handful of test rows would lose its signal).
        test_owner=test_set.groups if method == "natural" and not private else None,
        standardize=config.data.standardize,
        # Record-level DP protects each record: no statistic over a client's
        # records may shape how the others are trained (see preprocess).
        fit="none" if config.privacy.mode == "record" else "client",
    )


def _load_data(
    config: ExperimentConfig,
    clients: UserClients | None,
    test: tuple[Any, Any] | None,
) -> tuple[Dataset, Dataset | None, tuple[str, ...] | None]:
    """The whole data set, its test set if separate, and its clients' names.

    The names are ``None`` when the data does not name its clients (a
    partitioner splits it).
    """
    data = config.data
    if clients is not None:
        if data.is_user_data and data.path is not None:
            raise ConfigError(
                f"clients= and data.path = {data.path!r} both give the data; drop one"
            )
        user = _in_memory(
            clients,
            test,
            task=config.model.task,
            classes=tuple(data.classes) if data.classes else None,
            declared=config.privacy.mode != "none",
        )
    elif not data.is_user_data:
        if test is not None:
            raise ConfigError("test= applies only with clients= (your own data)")
        dataset = load_dataset(data.dataset)
        names = (
            tuple(natural_client_names(dataset.groups))
            if data.partition == "natural" and dataset.groups is not None
            else None
        )
        return dataset, None, names
    else:
        from fedshield.data.user import load_user_data

        user = load_user_data(_user_data_spec(config))
    return user.train, user.test, user.client_ids


def _user_data_spec(config: ExperimentConfig) -> UserDataSpec:
    """``[data]``'s own data (files or a factory) as the loader takes it."""
    from fedshield.core.imports import CallableRef
    from fedshield.data.user import UserDataSpec

    data = config.data
    return UserDataSpec(
        kind=data.dataset,
        path=Path(data.path).resolve() if data.path else None,
        label=data.label,
        features=tuple(data.features) if data.features else None,
        categorical=tuple(data.categorical),
        client_column=data.client_column,
        test_path=Path(data.test_path).resolve() if data.test_path else None,
        task=config.model.task,
        classes=tuple(data.classes) if data.classes else None,
        image_size=(
            (data.image_size[0], data.image_size[1]) if data.image_size else None
        ),
        image_mode=data.image_mode,
        factory=(
            CallableRef(data.factory, what="data.factory") if data.factory else None
        ),
        max_file_mb=data.max_file_mb,
        levels=({k: tuple(v) for k, v in data.levels.items()} if data.levels else None),
        missing=tuple(data.missing) if data.missing is not None else None,
        # Under DP nothing about the encoding may come from the
        # records (see ExperimentConfig._check_declared_schema).
        declared=config.privacy.mode != "none",
    )


class _GivenClients:
    """The Python API's ``clients=`` in the shape of a ``data.factory``.

    The arrays go through the same checks and encoding as a factory's
    return value (:func:`fedshield.data.user.load_user_data`).
    """

    spec = "clients="

    def __init__(self, value: Any) -> None:
        self.value = value

    def resolve(self) -> Callable[[], Any]:
        return lambda: self.value


def _in_memory(
    clients: UserClients,
    test: tuple[Any, Any] | None,
    *,
    task: str,
    classes: tuple[str, ...] | None,
    declared: bool,
) -> Any:
    """``clients`` (and ``test``) as the user data of ``dataset = "python"``."""
    from fedshield.core.imports import CallableRef
    from fedshield.data.user import UserDataSpec, load_user_data

    given = (dict(clients), test) if test is not None else dict(clients)
    factory = cast(CallableRef, _GivenClients(given))
    spec = UserDataSpec(
        kind="python", factory=factory, task=task, classes=classes, declared=declared
    )
    return load_user_data(spec)


def _build_model(
    config: ExperimentConfig, train: Dataset, model_fn: Callable[[], Any] | None
) -> TorchModel:
    """``[model]``'s network (or ``model_fn``) for ``train``'s shape and labels."""
    from fedshield.models import TorchModel, build_module

    m = config.model
    num_outputs = train.num_classes
    if model_fn is None and m.kind != "python":
        module_fn = functools.partial(
            build_module,
            m.kind,
            input_shape=train.input_shape,
            num_classes=num_outputs,
            hidden=tuple(m.hidden),
        )
        return TorchModel(module_fn, input_shape=train.input_shape, task=m.task)
    from fedshield.models.factory import user_torch_model

    if model_fn is None:
        from fedshield.core.imports import CallableRef

        assert m.factory is not None
        model_fn = CallableRef(m.factory, what="model.factory")
    shapes = [tuple(m.input_shape)] if m.input_shape else [train.input_shape]
    flat = (int(np.prod(train.input_shape)),)
    if not m.input_shape and flat != train.input_shape:
        shapes.append(flat)  # a model of flat inputs (e.g. Linear) on images
    first: ConfigError | None = None
    for shape in shapes:
        try:
            return user_torch_model(
                model_fn,
                input_shape=shape,
                num_classes=num_outputs,
                task=m.task,
                privacy_mode=config.privacy.mode,
            )
        except ConfigError as err:
            first = first or err
    assert first is not None
    raise first


def _attack(
    config: ExperimentConfig,
    client_ids: tuple[ClientId, ...],
    summary: PartitionSummary,
    num_classes: int,
) -> Attack | None:
    """``[attack]``: which clients are malicious (from the seed) and how."""
    a = config.attack
    if a.kind == "none" or a.fraction == 0:
        return None
    from fedshield.models.attacks import AttackSpec, choose_malicious

    spec = AttackSpec(
        kind=a.kind,
        fraction=a.fraction,
        scale=a.scale,
        std=a.std,
        target_label=a.target_label,
        boost=a.boost,
        poison_fraction=a.poison_fraction,
        epsilon=a.epsilon,
        z=a.z,
    )
    if a.kind == "backdoor" and a.target_label >= num_classes:
        raise ConfigError(
            f"attack.target_label {a.target_label} is not a class of the data set "
            f"(0..{num_classes - 1})"
        )
    per_round = client_sampler(config).expected_count(len(client_ids))
    return Attack(
        spec=spec,
        malicious=choose_malicious(client_ids, a.fraction, config.run.seed),
        num_classes=num_classes,
        boost=a.boost if a.boost is not None else float(per_round),
        max_examples=max(summary.num_samples),
    )


def _server_optimizer(s: StrategySection) -> ServerOptimizer:
    """The server optimizer ``[strategy]`` names, with its defaults where unset."""
    given = {
        key: value
        for key, value in (
            ("server_lr", s.server_lr),
            ("momentum", s.server_momentum),
            ("beta1", s.beta1),
            ("beta2", s.beta2),
            ("tau", s.tau),
        )
        if value is not None
    }
    factory: Any = {
        "fedavgm": FedAvgM,
        "fedadam": FedAdam,
        "fedyogi": FedYogi,
        "fedadagrad": FedAdagrad,
    }.get(s.name, ServerSgd)
    return cast(ServerOptimizer, factory(**given))


def client_sampler(config: ExperimentConfig) -> CountSampler | FractionSampler:
    """``[strategy]``'s sampler: ``clients_per_round`` clients, or ``fraction``."""
    s = config.strategy
    if s.clients_per_round is not None:
        return CountSampler(s.clients_per_round)
    return FractionSampler(s.fraction if s.fraction is not None else 1.0)


def build_strategy(
    config: ExperimentConfig,
    *,
    num_clients: int | None = None,
    client_sizes: Mapping[ClientId, int] | None = None,
    federation: Federation | None = None,
) -> FedAvg | Scaffold | DpFedAvg:
    """The strategy ``[strategy]`` and ``[client]`` describe.

    Every strategy is FedAvg's round (sample, train locally, weighted mean of
    the updates) with its own parts: ``fedprox`` adds the proximal term
    ``mu/2 ||w - w_global||^2`` to each client's local objective;
    ``scaffold`` corrects local gradients with control variates
    (Karimireddy et al., ICML 2020); ``fedavgm``, ``fedadam``, ``fedyogi``
    and ``fedadagrad`` replace the server step (Reddi et al., ICLR 2021).
    """
    s, c = config.strategy, config.client
    sampler = client_sampler(config)
    options: dict[str, float | int | str | bool] = {}
    if s.name == "fedprox":
        options["proximal_mu"] = s.mu if s.mu is not None else 0.01
    fedavg = FedAvg(
        sampler=sampler,
        aggregator=_aggregator(config),
        round_aggregator=_fltrust_rounds(config, federation),
        server_opt=_server_optimizer(s),
        local=FitConfig(
            round_idx=0,
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
            options=options,
        ),
        min_clients=s.min_clients,
        weighted=s.weighted,
    )
    if config.privacy.mode != "none":
        population = num_clients or config.expected_num_clients
        if population is None:
            raise ConfigError(
                "differential privacy needs the number of clients (its δ and "
                "sampling rate refer to them): pass num_clients, or build the "
                "federation first"
            )
        return _dp_strategy(
            config,
            fedavg,
            population,
            client_sizes,
            federation.model.spec.size if federation is not None else None,
        )
    return Scaffold(fedavg) if s.name == "scaffold" else fedavg


def _fltrust_rounds(config: ExperimentConfig, federation: Federation | None) -> Any:
    """FLTrust's per-round rule: the server's update on its root data.

    The root data set (``robust.root_size`` rows) is drawn from the training
    pool with the run's seed, as in Cao et al. (NDSS 2021), who sample it
    from the same distribution as the clients' data; it may overlap a
    client's rows. Each round the server trains one local round on it from
    the global model with the clients' settings, and that update is ``g_0``.
    """
    if config.robust.rule != "fltrust":
        return None
    if federation is None:
        raise ConfigError("robust.rule = 'fltrust' needs the federation's data")
    from fedshield.strategies.robust import FLTrust

    train = federation.train
    rng = derive_rng(config.run.seed, "fltrust", "root")
    size = min(config.robust.root_size, len(train.y))
    rows = np.sort(rng.choice(len(train.y), size=size, replace=False))
    x_root, y_root = train.x[rows], train.y[rows]
    c = config.client
    model = federation.model
    seed = config.run.seed

    def rule(state: ServerState) -> FLTrust:
        local = FitConfig(
            round_idx=state.round_idx,
            epochs=c.epochs,
            batch_size=c.batch_size,
            lr=c.lr,
            momentum=c.momentum,
            weight_decay=c.weight_decay,
        )
        new, _ = model.train(
            state.params,
            x_root,
            y_root,
            local,
            rng=derive_rng(seed, "fltrust", state.round_idx),
        )
        return FLTrust(None).with_reference(new - state.params)

    return rule


def _aggregator(config: ExperimentConfig) -> Any:
    """``[robust]``'s rule (FedAvg's weighted mean by default)."""
    from fedshield.core import WeightedMean

    r = config.robust
    if r.rule in ("fedavg", "fltrust"):  # FLTrust's rule is built per round
        return WeightedMean()
    from fedshield.strategies.robust import make_robust

    params: dict[str, Any] = {
        "f": r.f,
        "m": r.m,
        "beta": r.beta,
        "max_norm": r.max_norm,
        "noise_std": r.noise_std,
    }
    return make_robust(r.rule, **{k: v for k, v in params.items() if v is not None})


def secure_settings(config: ExperimentConfig) -> SecureAggregation | None:
    """``[secagg]`` as the round takes it (None: aggregate in the clear)."""
    sa = config.secagg
    if sa.protocol == "none":
        return None
    return SecureAggregation(
        protocol=sa.protocol,
        threshold=sa.threshold,
        clip=sa.clip,
        precision_bits=sa.precision_bits,
        neighbours=sa.neighbours,
        malicious=sa.malicious,
        security_parameter=sa.security_parameter,
        expected_dropout=sa.expected_dropout,
        workers=None if sa.workers == "auto" else sa.workers,
        allow_insecure_neighbours=sa.allow_insecure_neighbours,
    )


def _calibrate_distributed(
    config: ExperimentConfig,
    sampler: Any,
    num_clients: int,
    secure: SecureAggregation | None,
    dimension: int | None,
) -> float:
    """Distributed mode's noise multiplier for ``target_epsilon``.

    See :func:`fedshield.privacy.accounting.calibrate_distributed_noise`.
    """
    from fedshield.privacy.accounting import calibrate_distributed_noise
    from fedshield.privacy.distributed import DistributedDp

    p = config.privacy
    assert p.clip_norm is not None and p.target_epsilon is not None
    if secure is None or dimension is None:
        raise ConfigError(
            'privacy.mode = "distributed" calibrates noise_multiplier from the '
            "model and [secagg]; give noise_multiplier when building the strategy "
            "without them"
        )
    n = max(2, sampler.expected_count(num_clients))
    t = secure.threshold_for(n)
    clip = p.clip_norm

    def parameters(z: float) -> Any:
        dp = DistributedDp(clip, z, p.distributed_bits, p.rounding_beta)
        return dp.parameters(dimension=dimension, num_clients=n, threshold=t)

    return calibrate_distributed_noise(
        p.target_epsilon, p.delta, rounds=config.run.rounds, parameters=parameters
    )


def _dp_strategy(
    config: ExperimentConfig,
    fedavg: FedAvg,
    num_clients: int,
    client_sizes: Mapping[ClientId, int] | None = None,
    dimension: int | None = None,
) -> DpFedAvg:
    """DP-FedAvg (central or local) as ``[privacy]`` describes it.

    Clients are sampled by Poisson sampling at the rate ``clients_per_round
    / N`` (or ``fraction``) unless ``sampling = "fixed"``, which keeps
    FedAvg's fixed-size sampling and is accounted as sampling without
    replacement (RDP only). A missing ``noise_multiplier`` is calibrated
    from ``target_epsilon``, ``delta`` and ``run.rounds``.
    """
    from fedshield.strategies.dp import DpFedAvg

    p = config.privacy
    assert p.mode != "none" and p.clip_norm is not None
    if p.mode == "record":
        return _record_strategy(config, fedavg, num_clients, client_sizes)
    sampler = _dp_sampler(config, num_clients)
    sigma = p.noise_multiplier
    secure = secure_settings(config)
    if sigma is None and p.mode == "distributed":
        assert p.target_epsilon is not None
        sigma = _calibrate_distributed(config, sampler, num_clients, secure, dimension)
    if sigma is None:
        sigma = _calibrate_sampled(config, sampler, num_clients)
    return DpFedAvg(
        base=fedavg,
        privacy=_privacy_settings(config, sigma),
        sampler=sampler,
        num_clients=num_clients,
        threshold_for=secure.threshold_for if secure is not None else None,
    )


def _dp_sampler(
    config: ExperimentConfig, num_clients: int
) -> PoissonSampler | CountSampler:
    """DP's client sampler: Poisson, or fixed-size under ``sampling = "fixed"``.

    The rate is ``clients_per_round / N`` (or ``fraction``).
    """
    from fedshield.strategies.dp import PoissonSampler

    p, s = config.privacy, config.strategy
    if s.clients_per_round is not None:
        rate = min(1.0, s.clients_per_round / num_clients)
    else:
        rate = s.fraction if s.fraction is not None else 1.0
    if p.sampling == "poisson":
        return PoissonSampler(rate)
    return CountSampler(
        s.clients_per_round
        if s.clients_per_round is not None
        else max(1, round(rate * num_clients))
    )


def _calibrate_sampled(
    config: ExperimentConfig,
    sampler: PoissonSampler | CountSampler,
    num_clients: int,
) -> float:
    """Central or local mode's noise multiplier for ``target_epsilon``."""
    from fedshield.privacy.accounting import calibrate_noise_multiplier
    from fedshield.strategies.dp import PoissonSampler

    p = config.privacy
    assert p.target_epsilon is not None
    sampling: dict[str, Any]
    if p.mode == "local":  # one release per round taken part in
        sampling = {"sampling": "none", "sampling_rate": None}
    elif isinstance(sampler, PoissonSampler):
        sampling = {"sampling": "poisson", "sampling_rate": sampler.rate}
    else:
        sampling = {
            "sampling": "fixed",
            "sampling_rate": None,
            "population": num_clients,
            "sample_size": min(sampler.count, num_clients),
        }
    sigma = calibrate_noise_multiplier(
        p.target_epsilon,
        p.delta,
        steps=config.run.rounds,
        accountant=p.accountant,
        **sampling,
    )
    if p.mode == "local" or not isinstance(sampler, PoissonSampler):
        # Sensitivity 2C against noise σC: the calibrated multiplier is
        # σ/2 (local mode: any two clipped updates; fixed-size sampling:
        # replace-one, see DpFedAvg._central_event).
        sigma *= 2.0
    return sigma


def _privacy_settings(config: ExperimentConfig, sigma: float) -> PrivacySettings:
    """``[privacy]`` (central, local or distributed) with its noise multiplier."""
    from fedshield.strategies.dp import PrivacySettings

    p = config.privacy
    assert p.mode != "none" and p.clip_norm is not None
    return PrivacySettings(
        mode=p.mode,
        clip_norm=p.clip_norm,
        noise_multiplier=sigma,
        delta=p.delta,
        accountant=p.accountant,
        target_epsilon=p.target_epsilon,
        secure_rng=p.secure_rng,
        target_quantile=p.target_quantile if p.adaptive_clipping else None,
        clip_learning_rate=p.clip_learning_rate,
        clipped_count_stddev=p.clipped_count_stddev,
        distributed_bits=p.distributed_bits,
        rounding_beta=p.rounding_beta,
    )


def _record_strategy(
    config: ExperimentConfig,
    fedavg: FedAvg,
    num_clients: int,
    client_sizes: Mapping[ClientId, int] | None,
) -> DpFedAvg:
    """Record-level DP-SGD in every client; FedAvg's sampling and mean.

    A missing ``noise_multiplier`` is calibrated so that every client stays
    within ``target_epsilon`` even if it takes part in every round: one
    calibration per distinct client size, the largest σ kept, under
    replace-one neighbours (the record counts are public).
    """
    from fedshield.privacy.accounting import calibrate_noise_multiplier
    from fedshield.privacy.records import dp_sgd_rate
    from fedshield.strategies.dp import DpFedAvg, PrivacySettings

    p, c = config.privacy, config.client
    assert p.clip_norm is not None
    if not client_sizes:
        raise ConfigError("record mode needs the clients' sizes (build_federation)")
    sigma = p.noise_multiplier
    if sigma is None:
        assert p.target_epsilon is not None
        sigmas = []
        for size in sorted(set(client_sizes.values())):
            rate, steps = dp_sgd_rate(size, c.batch_size)
            sigmas.append(
                calibrate_noise_multiplier(
                    p.target_epsilon,
                    p.delta,
                    sampling_rate=rate,
                    steps=steps * c.epochs * config.run.rounds,
                    accountant=p.accountant,
                    sampling="poisson",
                    replace_one=True,
                )
            )
        sigma = max(sigmas)
    settings = PrivacySettings(
        mode="record",
        clip_norm=p.clip_norm,
        noise_multiplier=sigma,
        delta=p.delta,
        accountant=p.accountant,
        target_epsilon=p.target_epsilon,
        secure_rng=p.secure_rng,
    )
    return DpFedAvg(
        base=fedavg,
        privacy=settings,
        sampler=fedavg.sampler,
        num_clients=num_clients,
        client_sizes=dict(client_sizes),
    )
