"""The experiment configuration: TOML sections validated with pydantic.

Every key is documented in the README's configuration reference. Unknown keys
and bad values are refused before round 1 with a message that names the key,
the constraint and the value (and suggests the closest key for a misspelling).
"""

from __future__ import annotations

import difflib
import math
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    ValidationError,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError, core_schema

from fedshield.core.registry import Registry
from fedshield.data import DATASETS
from fedshield.errors import ConfigError, ConfigFileError
from fedshield.models.attacks import ATTACKS
from fedshield.simulation.backends import BACKENDS
from fedshield.strategies.robust import RULES

__all__ = [
    "ClientSection",
    "DataSection",
    "ExperimentConfig",
    "ModelSection",
    "RunSection",
    "StrategySection",
    "apply_overrides",
    "load_config",
    "parse_config",
]


@dataclass(frozen=True)
class _Named:
    """``Annotated[str, _Named(...)]``: a name registered in a registry.

    The registry is read when a value is checked and when the JSON schema is
    made (its ``enum``), so a part registered later is accepted and listed.

    Parameters
    ----------
    registry
        Returns the registry (called on use: a registry whose module is
        costly to import loads only when a value needs it).
    also
        Names accepted besides the registered ones (``"none"``), checked
        without loading the registry.
    """

    registry: Callable[[], Registry[Any]]
    also: tuple[str, ...] = ()

    def names(self) -> tuple[str, ...]:
        """Every accepted name."""
        return (*self.also, *self.registry().names())

    def check(self, name: str) -> str:
        if name in self.also or name in self.registry():
            return name
        message = self.registry().unknown(
            name, with_section=False, choices=self.names()
        )
        raise PydanticCustomError(_UNKNOWN_NAME, "{message}", {"message": message})

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> CoreSchema:
        return core_schema.no_info_after_validator_function(self.check, handler(source))

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        result = handler(schema)
        result["enum"] = list(self.names())
        return result


_UNKNOWN_NAME = "unknown_name"
"""The pydantic error type of :class:`_Named` (its message names the value)."""


def _mechanisms() -> Registry[Any]:
    # The DP strategy loads the accountant: only a DP run pays for it.
    from fedshield.strategies.dp import MECHANISMS

    return MECHANISMS


RuleName = Annotated[str, _Named(lambda: RULES)]
"""``[robust] rule``: a name in :data:`fedshield.strategies.robust.RULES`."""
AttackName = Annotated[str, _Named(lambda: ATTACKS)]
"""``[attack] kind``: a name in :data:`fedshield.models.attacks.ATTACKS`."""
BackendName = Annotated[str, _Named(lambda: BACKENDS)]
"""``run.backend``: a name in :data:`fedshield.simulation.backends.BACKENDS`."""
DatasetName = Annotated[str, _Named(lambda: DATASETS)]
"""``[data] dataset``: a name in :data:`fedshield.data.DATASETS`."""
PrivacyMode = Annotated[str, _Named(_mechanisms, also=("none",))]
"""``[privacy] mode``: ``"none"`` or a name in
:data:`fedshield.strategies.dp.MECHANISMS`."""


class _Section(BaseModel):
    # strict: `rounds = true` or `lr = "0.1"` are errors, not coerced;
    # allow_inf_nan=False: `lr = inf` is refused before round 1.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False
    )


class RunSection(_Section):
    """``[run]``: the run as a whole."""

    name: str = Field("fedshield-run", min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    rounds: int = Field(30, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0, lt=2**63)
    eval_every: int = Field(1, ge=1)
    # None: on, unless [privacy] is on (per-client evaluation is then
    # outside the guarantee, so a DP run evaluates only when asked).
    federated_eval: bool | None = None
    backend: BackendName = "auto"
    workers: int | None = Field(None, ge=1, le=1024)
    ray_address: str | None = None
    timeout_s: float | None = Field(None, gt=0)
    torch_threads: int = Field(1, ge=1, le=256)
    client_state: Literal["memory", "disk"] = "memory"
    report: bool = True
    # A round with fewer than strategy.min_clients valid updates: "stop" (the
    # default, None) ends the run with exit code 30, resumable from the last
    # round; "continue" records it (completed = false) and goes on from the
    # same model, as a deployed server would. None keeps older checkpoints'
    # fingerprints.
    on_failed_round: Literal["stop", "continue"] | None = None


EACH_ROUND = "fedshield.api.process:clients_given_each_round"
"""``data.factory`` of :func:`fedshield.fedavg`'s configuration: the arrays of
each round go to the user's model as given (no encoding, no schema)."""
TABULAR_KEYS = ("label", "features", "categorical", "client_column")
"""``[data]`` keys that name columns (``csv`` and ``parquet`` only)."""


class DataSection(_Section):
    """``[data]``: which data set and how it is split across clients.

    ``dataset`` is a bundled set (``digits``, ``breast_cancer``, ``heart``,
    ``fashion_mnist``) or the user's own: ``csv`` / ``parquet`` (``path`` a
    file, or a folder of one file per client whose stem is the client id;
    ``label`` the label column; ``features`` default every other column;
    ``categorical`` one-hot, string columns are categorical anyway;
    ``client_column`` a column naming each row's client), ``npz`` (arrays
    ``x``, ``y`` and optionally ``client``; or a folder of one file per
    client), ``images`` (``path/<client>/<class>/*.png`` or
    ``path/<class>/*.png``, resized to ``image_size``) or ``python``
    (``factory = "file.py:load"`` returning ``{client_id: (x, y)}``).
    ``partition`` unset: ``natural`` when the data names the clients, else
    ``iid``; ``num_clients`` unset: the data's clients, else 10.
    """

    dataset: DatasetName = "digits"
    partition: Literal["iid", "dirichlet", "shards", "quantity", "natural"] | None = (
        None
    )
    alpha: float = Field(0.5, gt=0)
    shards: int = Field(2, ge=1)
    sigma: float = Field(1.0, gt=0)
    num_clients: int | None = Field(None, ge=1)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    client_test_fraction: float = Field(0.2, ge=0, lt=1)
    min_samples: int = Field(2, ge=1)
    path: str | None = Field(None, min_length=1)
    label: str | None = Field(None, min_length=1)
    features: list[str] | None = Field(None, min_length=1)
    categorical: list[str] = Field(default_factory=list)
    client_column: str | None = Field(None, min_length=1)
    test_path: str | None = Field(None, min_length=1)
    classes: list[str] | None = Field(None, min_length=1)
    levels: dict[str, list[str]] | None = None
    missing: list[str] | None = None
    image_size: list[Annotated[int, Field(ge=1, le=4096)]] | None = Field(
        None, min_length=2, max_length=2
    )
    image_mode: Literal["L", "RGB"] = "RGB"
    factory: str | None = Field(None, min_length=3)
    max_file_mb: float = Field(1024.0, gt=0)
    standardize: bool = True

    @property
    def is_user_data(self) -> bool:
        """Whether the data set is the user's own (files or a factory)."""
        return "user" in DATASETS.tags(self.dataset)

    @property
    def partition_method(self) -> str:
        """``partition``, or its default (see the class docstring)."""
        if self.partition is not None:
            return self.partition
        return "natural" if self.names_clients else "iid"

    @property
    def names_clients(self) -> bool:
        """Whether the configuration says the data itself names the clients.

        True for ``client_column`` and the ``python`` factory; a ``path``
        that is a folder of per-client files is known only once read.
        """
        return self.client_column is not None or "factory" in DATASETS.tags(
            self.dataset
        )

    @model_validator(mode="after")
    def _keys_fit_dataset(self) -> DataSection:
        given = self._user_keys_given()
        tags = DATASETS.tags(self.dataset)
        if "bundled" in tags:
            if given:
                raise ValueError(
                    f"data.{sorted(given)[0]} applies to your own data "
                    f"(dataset = {' | '.join(DATASETS.names(tag='user'))}), not "
                    f"to the bundled data set {self.dataset!r}"
                )
            return self
        if "factory" in tags:
            extra = self._factory_extra(given)
        else:
            extra = self._files_extra(given, tags)
        if extra:
            key = sorted(extra)[0]
            raise ValueError(f"data.{key} does not apply to dataset = {self.dataset!r}")
        return self

    def _user_keys_given(self) -> set[str]:
        """The keys of the user's own data that are set."""
        keys = (
            "path",
            "label",
            "features",
            "client_column",
            "test_path",
            "classes",
            "levels",
            "missing",
            "image_size",
            "factory",
        )
        given = {key for key in keys if getattr(self, key) is not None}
        return given | ({"categorical"} if self.categorical else set())

    def _factory_extra(self, given: set[str]) -> set[str]:
        """The keys given that a factory (``dataset = "python"``) does not take."""
        if self.factory is None:
            raise ValueError(
                f'dataset = "{self.dataset}" needs factory = "file.py:load" (a '
                "function returning {client_id: (x, y)})"
            )
        return given - {"factory", "classes"}

    def _files_extra(self, given: set[str], tags: frozenset[str]) -> set[str]:
        """The keys given that the files' kind does not take."""
        d = self.dataset
        if self.factory is not None:
            raise ValueError(f'data.factory applies to dataset = "python", not {d!r}')
        if self.path is None:
            raise ValueError(
                f"dataset = {d!r} needs path (a file, or a folder of one file "
                "per client)"
                if "images" not in tags
                else f'dataset = "{d}" needs path (a folder of '
                "<client>/<class>/ or <class>/ image folders)"
            )
        if "tabular" in tags:
            if self.label is None:
                raise ValueError(
                    f'dataset = {d!r} needs label = "<column>" (the column '
                    "holding each row's label)"
                )
            return given & {"image_size"}
        extra = given & {*TABULAR_KEYS, "categorical", "levels", "missing"}
        if "images" not in tags:
            extra |= given & {"image_size"}
        return extra


class ModelSection(_Section):
    """``[model]``: the network trained.

    ``kind = "python"`` takes the user's own ``torch.nn.Module`` from
    ``factory`` (``"path/to/file.py:build"`` or ``"package.module:build"``,
    a callable with no arguments; relative paths resolve against the config
    file), with ``input_shape`` the shape of one example if the data's is not
    the one the model wants. ``task``: ``"classification"`` (cross-entropy;
    accuracy) or ``"regression"`` (mean squared error; RMSE and MAE).
    """

    kind: Literal["logistic", "mlp", "cnn", "python"] = "mlp"
    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: [64], max_length=16
    )
    factory: str | None = Field(None, min_length=3)
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, max_length=8
    )
    task: Literal["classification", "regression"] = "classification"

    @model_validator(mode="after")
    def _factory_for_python(self) -> ModelSection:
        if self.kind == "python" and self.factory is None:
            raise ValueError(
                'model.kind = "python" needs factory = "path/to/file.py:build" '
                "(a function returning a torch.nn.Module)"
            )
        if self.kind != "python" and self.factory is not None:
            raise ValueError(
                f'model.factory applies to kind = "python"; kind is {self.kind!r}'
            )
        return self


class ClientSection(_Section):
    """``[client]``: local training on each client."""

    epochs: int = Field(1, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


_STRATEGY_KEYS: dict[str, frozenset[str]] = {
    "fedavg": frozenset(),
    "fedprox": frozenset({"mu"}),
    "scaffold": frozenset(),
    "fedavgm": frozenset({"server_momentum"}),
    "fedadam": frozenset({"beta1", "beta2", "tau"}),
    "fedyogi": frozenset({"beta1", "beta2", "tau"}),
    "fedadagrad": frozenset({"beta1", "tau"}),
}
"""Which optional ``[strategy]`` keys each strategy takes."""


class StrategySection(_Section):
    """``[strategy]``: sampling, aggregation and the server step."""

    name: Literal[
        "fedavg", "fedprox", "scaffold", "fedavgm", "fedadam", "fedyogi", "fedadagrad"
    ] = "fedavg"
    fraction: float | None = Field(None, gt=0, le=1)
    clients_per_round: int | None = Field(None, ge=1)
    server_lr: float | None = Field(None, gt=0)
    min_clients: int = Field(1, ge=1)
    weighted: bool = True
    mu: float | None = Field(None, ge=0)
    server_momentum: float | None = Field(None, ge=0, lt=1)
    beta1: float | None = Field(None, ge=0, lt=1)
    beta2: float | None = Field(None, ge=0, lt=1)
    tau: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> StrategySection:
        if self.fraction is not None and self.clients_per_round is not None:
            raise ValueError(
                "set either fraction or clients_per_round, not both; "
                f"got fraction={self.fraction}, "
                f"clients_per_round={self.clients_per_round}"
            )
        allowed = _STRATEGY_KEYS[self.name]
        for key in ("mu", "server_momentum", "beta1", "beta2", "tau"):
            if getattr(self, key) is not None and key not in allowed:
                users = sorted(n for n, keys in _STRATEGY_KEYS.items() if key in keys)
                raise ValueError(
                    f"{key} does not apply to strategy {self.name!r} "
                    f"(it is a parameter of {', '.join(users)})"
                )
        return self


class PrivacySection(_Section):
    """``[privacy]``: differential privacy and its accountant.

    ``mode``: ``"none"`` (default), ``"central"`` (user-level DP-FedAvg: the
    server clips each client's update and adds Gaussian noise to the sum),
    ``"record"`` (DP-SGD inside each client), ``"local"`` (each client noises
    its own update) or ``"distributed"`` (each client adds its share of
    discrete Gaussian noise before secure aggregation masks its update; needs
    ``[secagg]``). ``distributed_bits`` and ``rounding_beta`` apply to
    distributed mode only.
    """

    mode: PrivacyMode = "none"
    clip_norm: float | None = Field(None, gt=0)
    noise_multiplier: float | None = Field(None, gt=0)
    target_epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    accountant: Literal["pld", "rdp"] = "pld"
    sampling: Literal["poisson", "fixed"] = "poisson"
    secure_rng: bool = False
    adaptive_clipping: bool = False
    target_quantile: float = Field(0.5, gt=0, lt=1)
    clip_learning_rate: float = Field(0.2, gt=0)
    clipped_count_stddev: float | None = Field(None, gt=0)
    distributed_bits: int = Field(20, ge=8, le=62)
    rounding_beta: float = Field(math.exp(-0.5), gt=0, lt=1)

    @model_validator(mode="after")
    def _complete(self) -> PrivacySection:
        if self.mode == "none":
            return self
        if self.clip_norm is None:
            raise ValueError(
                f"privacy.mode = {self.mode!r} needs clip_norm (the L2 bound of "
                "each client's update, or of each record's gradient in record "
                "mode), e.g. clip_norm = 1.0"
            )
        if self.noise_multiplier is None and self.target_epsilon is None:
            raise ValueError(
                f"privacy.mode = {self.mode!r} needs noise_multiplier, or "
                "target_epsilon to calibrate it from"
            )
        if self.mode == "record" and self.accountant == "rdp":
            raise ValueError(
                "record mode is accounted under replace-one, which only the PLD "
                'accountant supports for Poisson sampling: set accountant = "pld"'
            )
        if self.adaptive_clipping and self.mode != "central":
            raise ValueError(
                'privacy.adaptive_clipping applies to mode = "central" only'
            )
        return self


class SecAggSection(_Section):
    """``[secagg]``: secure aggregation (the server learns only the sum).

    ``threshold`` unset: ``ceil(2n/3)`` of a round's ``n`` clients, and with
    ``malicious`` the smallest ``t > 2n/3`` (Bonawitz et al. §6; see
    :class:`fedshield.simulation.secure.SecureAggregation`).
    """

    protocol: Literal["none", "secagg", "secagg+"] = "none"
    threshold: float | None = Field(None, gt=0)
    clip: float = Field(1.0, gt=0)
    precision_bits: int = Field(24, ge=8, le=40)
    neighbours: int | None = Field(None, ge=2)
    malicious: bool = False
    security_parameter: int = Field(40, ge=16, le=128)
    expected_dropout: float = Field(0.1, ge=0, lt=1)
    workers: Annotated[int, Field(ge=0, le=64)] | Literal["auto"] = "auto"
    allow_insecure_neighbours: bool = False

    @model_validator(mode="after")
    def _insecure_only_with_neighbours(self) -> SecAggSection:
        if self.allow_insecure_neighbours and (
            self.protocol != "secagg+" or self.neighbours is None
        ):
            raise ValueError(
                "secagg.allow_insecure_neighbours applies only to protocol = "
                '"secagg+" with an explicit neighbours; drop it'
            )
        return self


class RobustSection(_Section):
    """``[robust]``: a Byzantine-robust aggregation rule in place of the mean."""

    rule: RuleName = "fedavg"
    f: int | None = Field(None, ge=0)
    root_size: int = Field(100, ge=1)
    m: int | None = Field(None, ge=1)
    beta: float | None = Field(None, gt=0, lt=0.5)
    max_norm: float | None = Field(None, gt=0)
    noise_std: float | None = Field(None, ge=0)


class AttackSection(_Section):
    """``[attack]``: malicious clients (see :mod:`fedshield.models.attacks`)."""

    kind: AttackName = "none"
    fraction: float = Field(0.2, ge=0, lt=0.5)
    scale: float = Field(4.0, gt=0)
    std: float = Field(1.0, gt=0)
    target_label: int = Field(0, ge=0)
    boost: float | None = Field(None, gt=0)
    poison_fraction: float = Field(0.5, gt=0, le=1)
    epsilon: float = Field(0.5, gt=0)
    z: float | None = Field(None, gt=0)


class FaultsSection(_Section):
    """``[faults]``: injected failures, to watch a run recover."""

    dropout: float = Field(0.0, ge=0, lt=1)


class NetworkSection(_Section):
    """``[network]``: a deployment between organisations (``fedshield serve``).

    ``fedshield simulate`` ignores it. The server holds no data: the sites
    and the model's shape are configured here, not read from ``[data]``.
    """

    sites: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]] = (
        Field(default_factory=list)
    )
    input_shape: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, max_length=4
    )
    num_classes: int | None = Field(None, ge=1)
    max_examples: int | None = Field(None, ge=1)
    fit_timeout_s: float = Field(600.0, gt=0)
    stage_timeout_s: float = Field(60.0, gt=0)
    poll_s: float = Field(25.0, gt=0, le=60)
    heartbeat_s: float = Field(5.0, gt=0, le=60)
    offline_after: int = Field(3, ge=1, le=100)
    chunk_bytes: int = Field(1 << 20, ge=4096, le=4 << 20)
    max_upload_mb: float = Field(16384.0, gt=0)
    clock_skew_s: float = Field(120.0, gt=0, le=3600)
    wait_for_sites_s: float = Field(600.0, gt=0)


class ExperimentConfig(_Section):
    """A whole experiment: one TOML file."""

    run: RunSection = Field(default_factory=RunSection)
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    client: ClientSection = Field(default_factory=ClientSection)
    strategy: StrategySection = Field(default_factory=StrategySection)
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    secagg: SecAggSection = Field(default_factory=SecAggSection)
    robust: RobustSection = Field(default_factory=RobustSection)
    attack: AttackSection = Field(default_factory=AttackSection)
    faults: FaultsSection = Field(default_factory=FaultsSection)
    network: NetworkSection | None = None

    @property
    def runs_federated_eval(self) -> bool:
        """Whether the round's clients evaluate the new model (``federated_eval``).

        Unset, it is on without differential privacy and off with it: the
        clients' evaluation on their own data is not noised, so a DP run
        reports it only when the user asks (and says it is outside ε).
        """
        if self.run.federated_eval is not None:
            return self.run.federated_eval
        return self.privacy.mode == "none"

    @property
    def outside_guarantee(self) -> list[str]:
        """What a DP run releases that its ε does not cover (empty: nothing).

        ``"seeded_randomness"``: central or record mode without
        ``secure_rng``: the noise and the sample come from ``run.seed``,
        which ``config.toml`` records, so whoever holds it can remove the
        noise (ε holds only against someone who does not). ``"federated_eval"``:
        the clients' own evaluation, reported without noise. Record mode's
        record counts are not listed: they are public by construction, and
        its ε is accounted for one record replaced (neighbours of the same
        size), so the count is part of the neighbouring relation.
        """
        if self.privacy.mode == "none":
            return []
        outside = []
        if self.privacy.mode in ("central", "record") and not self.privacy.secure_rng:
            outside.append("seeded_randomness")
        if self.runs_federated_eval:
            outside.append("federated_eval")
        return outside

    @model_validator(mode="after")
    def _consistent(self) -> ExperimentConfig:
        self._check_aggregation()
        self._check_secure_sum()
        if self.privacy.mode != "none" and self.strategy.name == "scaffold":
            raise ValueError(
                "differential privacy does not compose with SCAFFOLD's control "
                "variates (they would leak unclipped, unnoised information); "
                "use another strategy, e.g. fedavg or fedadam"
            )
        if self.model.task == "regression":
            self._check_regression()
        if (
            self.privacy.mode != "none"
            and self.data.is_user_data
            # fs.fedavg: each round's arrays go to the user's model as given.
            and self.data.factory != EACH_ROUND
        ):
            self._check_declared_schema()
        num_clients = self.expected_num_clients
        if num_clients is None:  # the data names its clients: checked once read
            return self
        self.check_secagg_neighbours(num_clients)
        self.check_client_counts(num_clients)
        return self

    def _check_aggregation(self) -> None:
        """The robust rule against secure aggregation and differential privacy."""
        rule = self.robust.rule
        if self.secagg.protocol != "none" and "secagg" not in RULES.tags(rule):
            raise ValueError(
                f"robust.rule = {rule!r} needs the individual updates, "
                "which secure aggregation hides; only norm_bound (each client "
                "clips its own update) works with [secagg]: use rule = "
                '"norm_bound", or turn secure aggregation off'
            )
        if self.privacy.mode == "distributed":
            if self.secagg.protocol == "none":
                raise ValueError(
                    'privacy.mode = "distributed" needs secure aggregation: the '
                    "clients add their noise shares before masking; add [secagg] "
                    'protocol = "secagg" or "secagg+"'
                )
            if rule != "fedavg":
                raise ValueError(
                    f"robust.rule = {rule!r} with distributed DP: the "
                    "clients already clip their updates to privacy.clip_norm; drop "
                    "[robust]"
                )
        if self.secagg.protocol != "none" and self.robust.noise_std:
            raise ValueError(
                "robust.noise_std with [secagg] is not supported: use [privacy] "
                'mode = "central" for noise on the securely aggregated sum'
            )
        if rule != "fedavg" and self.privacy.mode == "central":
            raise ValueError(
                'privacy.mode = "central" sets its own aggregation (clipping and '
                'noise); drop [robust] or use privacy.mode = "local" or "record"'
            )
        if "server_data" in RULES.tags(rule) and self.privacy.mode != "none":
            raise ValueError(
                f'robust.rule = "{rule}" trains the server\'s model every round, '
                "without noise, on a root set drawn from the clients' own data, "
                "which differential privacy does not cover; use another rule "
                '(e.g. "norm_bound") or turn [privacy] off'
            )

    def _check_secure_sum(self) -> None:
        """What secure aggregation does not compose with."""
        if (
            self.privacy.mode == "central"
            and self.secagg.protocol != "none"
            and self.privacy.sampling == "poisson"
        ):
            raise ValueError(
                'privacy.mode = "central" with [secagg] needs privacy.sampling = '
                '"fixed" (and accountant = "rdp"): with Poisson sampling, whether '
                "the secure sum can run (it needs at least 2 clients, and its "
                "threshold follows the number sampled) reveals how many clients "
                "were sampled, which amplification by sampling assumes secret"
            )
        if self.secagg.protocol != "none" and self.strategy.name == "scaffold":
            raise ValueError(
                "secure aggregation hides the individual updates, and "
                "SCAFFOLD's control variates need them; use another strategy"
            )

    @property
    def expected_num_clients(self) -> int | None:
        """The number of clients, when the configuration alone says it.

        ``data.num_clients`` if set; else the number of ``[network]`` sites;
        else 10 for a bundled data set split by
        a partitioner; ``None`` when the user's data names its clients (a
        ``client_column``, a folder of per-client files, a factory): the
        count is known once the data is read.
        """
        if self.data.num_clients is not None:
            return self.data.num_clients
        if self.network is not None and self.network.sites:
            # A deployment (fedshield serve): the sites are the clients.
            return len(self.network.sites)
        if self.data.is_user_data or self.data.partition == "natural":
            return None
        return 10

    def check_client_counts(self, num_clients: int) -> None:
        """Refuse ``[strategy]`` counts above the federation's ``num_clients``.

        Raises
        ------
        ValueError
            Naming the key and both numbers.
        """
        sampled = self.strategy.clients_per_round
        if sampled is not None and sampled > num_clients:
            raise ValueError(
                f"strategy.clients_per_round ({sampled}) must be <= the number "
                f"of clients ({num_clients})"
            )
        if self.strategy.min_clients > num_clients:
            raise ValueError(
                f"strategy.min_clients ({self.strategy.min_clients}) must be <= "
                f"the number of clients ({num_clients})"
            )

    def _check_declared_schema(self) -> None:
        """Under DP the model's shape may not depend on the records.

        The class set (the output size), the categorical levels and which
        columns are categorical (the input width) must be declared: derived
        from the data, they would show whether some record holds a rare
        label or value, outside every mechanism.
        """
        d = self.data
        if self.model.task == "classification" and d.classes is None:
            raise ValueError(
                "under [privacy] declare the class set: data.classes = "
                '["no", "yes"] (labels as written in your data). Derived from '
                "the records, the model's output size would show whether some "
                "record has a rare label, outside the DP guarantee"
            )
        tags = DATASETS.tags(d.dataset)
        if "tabular" in tags:
            undeclared = sorted(set(d.categorical) - set(d.levels or {}))
            if undeclared:
                raise ValueError(
                    f"under [privacy] declare the levels of categorical column "
                    f"{undeclared[0]!r}: data.levels = {{ {undeclared[0]} = "
                    '["a", "b"] }} (the one-hot width must not depend on the '
                    "records)"
                )
        if "images" in tags and d.image_size is None:
            raise ValueError(
                "under [privacy] declare data.image_size = [height, width]: "
                "the images' own size would come from the records"
            )

    def _check_regression(self) -> None:
        if self.data.partition in ("dirichlet", "shards"):
            raise ValueError(
                f"data.partition = {self.data.partition!r} splits by class label, "
                'which model.task = "regression" has not; use "iid", "quantity" '
                'or "natural"'
            )
        if "label" in ATTACKS.tags(self.attack.kind):
            raise ValueError(
                f"attack.kind = {self.attack.kind!r} changes class labels, which "
                'model.task = "regression" has not; use a model-poisoning attack '
                '(e.g. "sign_flip", "gaussian", "alie", "ipm")'
            )
        if "bundled" in DATASETS.tags(self.data.dataset):
            raise ValueError(
                f'model.task = "regression" needs numeric labels; the bundled '
                f"data set {self.data.dataset!r} is a classification data set"
            )
        if self.data.classes is not None:
            raise ValueError('data.classes does not apply to model.task = "regression"')

    def check_secagg_neighbours(self, num_clients: int) -> None:
        """Refuse ``[secagg] neighbours`` below the secure minimum for a round.

        A round has the clients ``[strategy]`` samples (``clients_per_round``
        or ``fraction`` of ``num_clients``); the simulation checks each
        round's actual count again.
        """
        sa = self.secagg
        if sa.protocol != "secagg+" or sa.neighbours is None:
            return
        if sa.allow_insecure_neighbours:
            return
        from fedshield.api.experiment import client_sampler

        n = client_sampler(self).expected_count(num_clients)
        if n < 2 or sa.neighbours > n - 1:
            return  # refused before round 1 with its own message
        from fedshield.secagg.protocol import check_neighbours

        try:
            check_neighbours(
                sa.neighbours,
                n,
                security_parameter=sa.security_parameter,
                expected_dropout=sa.expected_dropout,
            )
        except ConfigError as err:
            raise ValueError(f"secagg.neighbours: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict with ``None`` values dropped (TOML has no null)."""

        def strip(value: Any) -> Any:
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items() if v is not None}
            return value

        result: dict[str, Any] = strip(self.model_dump(mode="json"))
        return result


_SECTIONS: dict[str, type[_Section]] = {
    name: field.annotation  # type: ignore[misc]
    for name, field in ExperimentConfig.model_fields.items()
    if name != "network"
}
_SECTIONS["network"] = NetworkSection


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _describe(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        loc = [str(p) for p in problem["loc"]]
        key = ".".join(loc) if loc else "(config)"
        if problem["type"] == "extra_forbidden":
            if len(loc) == 1:
                valid = list(_SECTIONS)
                lines.append(
                    f"[{loc[0]}]: unknown section{_suggest(loc[0], valid)} "
                    f"(sections: {', '.join(valid)})"
                )
            else:
                section = _SECTIONS.get(loc[0])
                valid = list(section.model_fields) if section else []
                lines.append(
                    f"{key}: unknown key{_suggest(loc[-1], valid)} "
                    f"(keys of [{loc[0]}]: {', '.join(valid)})"
                )
            continue
        value = problem.get("input")
        # An unknown name's message names the value already.
        named = isinstance(value, dict) or problem["type"] == _UNKNOWN_NAME
        shown = "" if named else f"; got {value!r}"
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"{key}: {message}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def parse_config(data: Mapping[str, Any]) -> ExperimentConfig:
    """Validate a configuration given as nested mappings.

    Raises
    ------
    ConfigError
        Naming every unknown key and invalid value.
    """
    try:
        return ExperimentConfig.model_validate(dict(data))
    except ValidationError as err:
        raise ConfigError(_describe(err)) from None


def _parse_value(text: str) -> Any:
    try:
        return tomllib.loads(f"value = {text}")["value"]
    except tomllib.TOMLDecodeError:
        return text  # a bare word such as `heart` is taken as a string


ALTERNATIVES: dict[tuple[str, str], tuple[str, ...]] = {
    ("strategy", "fraction"): ("clients_per_round",),
    ("strategy", "clients_per_round"): ("fraction",),
}
"""Keys that exclude each other: a ``--set`` of one drops the file's other."""


def apply_overrides(
    data: Mapping[str, Any], overrides: Sequence[str]
) -> dict[str, Any]:
    """Apply ``key=value`` overrides (values parsed as TOML) to nested ``data``.

    An override replaces its alternative from ``data`` (:data:`ALTERNATIVES`):
    ``strategy.clients_per_round=10`` on a file that sets
    ``strategy.fraction`` drops the fraction. Two alternatives both given on
    the command line are still refused.

    Examples
    --------
    >>> apply_overrides({"model": {"kind": "mlp"}}, ["model.hidden=[64, 32]"])
    {'model': {'kind': 'mlp', 'hidden': [64, 32]}}
    >>> apply_overrides({"strategy": {"fraction": 0.5}},
    ...                 ["strategy.clients_per_round=10"])
    {'strategy': {'clients_per_round': 10}}
    """
    result: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()
    }
    overridden: set[tuple[str, ...]] = set()
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"--set expects key=value (for example run.rounds=5); got {item!r}"
            )
        *path, last = key.split(".")
        if not path:
            raise ConfigError(
                f"--set key must be section.key (for example run.rounds); got {key!r}"
            )
        node = result
        for part in path:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: {part!r} is not a section")
            node = child
        node[last] = _parse_value(text.strip())
        overridden.add((*path, last))
        if len(path) == 1:
            for other in ALTERNATIVES.get((path[0], last), ()):
                if (path[0], other) not in overridden:
                    node.pop(other, None)
    return result


def load_config(path: Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a TOML file, apply ``--set`` overrides and validate.

    Raises
    ------
    ConfigFileError
        If the file is missing, unreadable or not valid TOML.
    ConfigError
        If a key is unknown or a value invalid.
    """
    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text("utf-8")
        except FileNotFoundError:
            raise ConfigFileError(
                f"config file {str(path)!r} not found; see examples/quickstart.toml"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigFileError(
                f"cannot read config file {str(path)!r}: {err}"
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigFileError(f"{path} is not valid TOML: {err}") from None
        data = resolve_paths(data, Path(path).resolve().parent)
    return parse_config(resolve_paths(apply_overrides(data, overrides), Path.cwd()))


PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("data", "path"),
    ("data", "test_path"),
    ("data", "factory"),
    ("model", "factory"),
)
"""Keys holding a file path (or ``file.py:name``), resolved by :func:`resolve_paths`."""


def resolve_paths(data: Mapping[str, Any], base: Path) -> dict[str, Any]:
    """``data`` with the relative paths of :data:`PATH_KEYS` made absolute.

    A file's paths resolve against its own folder (so a config runs from any
    working directory, and its run folder's ``config.toml`` still points at
    the same files); ``--set`` values against the working directory. A
    ``"package.module:name"`` reference is left as it is.

    Examples
    --------
    >>> out = resolve_paths({"model": {"factory": "m.py:build"}}, Path("/cfg"))
    >>> out["model"]["factory"]
    '/cfg/m.py:build'
    >>> resolve_paths({"model": {"factory": "pkg.mod:build"}}, Path("/cfg"))
    {'model': {'factory': 'pkg.mod:build'}}
    """
    result: dict[str, Any] = {
        k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()
    }
    for section, key in PATH_KEYS:
        node = result.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value:
            continue
        target, sep, name = value.rpartition(":") if key == "factory" else ("", "", "")
        if key == "factory":
            if not (sep and target.endswith(".py")):
                continue
            node[key] = f"{_absolute(target, base)}:{name}"  # type: ignore[index]
        else:
            node[key] = _absolute(value, base)  # type: ignore[index]
    return result


def _absolute(path: str, base: Path) -> str:
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else base / expanded)
