"""A site's own policy: what it will take part in, checked before every task.

A site (a hospital) runs ``fedshield join ... --policy POLICY.toml``. When
it joins, the server announces the run's plan: the experiment configuration
(:meth:`fedshield.api.config.ExperimentConfig.to_dict` without ``[data]``)
and the names of the expected sites. The server is not trusted: the site
reads the plan itself and computes its own privacy loss with the same
library functions the server's accountant uses
(:mod:`fedshield.strategies.dp`, :mod:`fedshield.privacy.accounting`,
:mod:`fedshield.privacy.records`), never the server's word on ε.

The policy file holds one ``[policy]`` table; every key is optional:

``max_epsilon`` (number >= 0)
    The largest ε this site spends over the run, at the run's ``δ``. The
    site refuses the task of a round after which its own ε would exceed it
    (a plan without differential privacy has ε = ∞: every task is refused).
    Unset: no cap.
``max_delta`` (number in [0, 1))
    The largest ``δ`` the site accepts; checked at join. A plan without
    differential privacy has no ``δ`` and is refused when it is set.
``require_secagg`` (bool, default false)
    Refuse a plan without secure aggregation (``[secagg] protocol``).
``require_dp`` (bool, default false)
    Refuse a plan without differential privacy (``[privacy] mode``).
``min_clients`` (int >= 1)
    The fewest clients per round the site accepts: the clients expected in
    a round (``[strategy] fraction`` or ``clients_per_round`` of the sites)
    and, under secure aggregation, its threshold (the fewest survivors
    whose sum is unmasked) must both reach it.
``models`` (list of strings)
    The models the site trains: built-in kinds (``"logistic"``, ``"mlp"``,
    ``"cnn"``) and ``"sha256:<64 hex digits>"``, the SHA-256 of a Python
    factory file (``[model] kind = "python"``) the site holds itself.
    Unset: any model.
``metrics`` (list of strings)
    The metric names allowed to leave the site (e.g. ``"loss"``,
    ``"accuracy"``, ``"num_examples"``). Unset: all; an empty list: none.

How ε is computed, per ``[privacy] mode``, for this site taking part in
every round so far (the worst case):

* ``central``: the round's Gaussian event amplified by client sampling
  (:meth:`fedshield.strategies.dp.CentralMechanism.event`), composed in a
  :class:`~fedshield.privacy.accounting.PrivacyLedger`, as the server does.
* ``local``: :meth:`fedshield.strategies.dp.LocalMechanism.client_epsilon`.
* ``record``: :meth:`fedshield.strategies.dp.RecordMechanism.client_epsilon`
  on the site's own number of training records (``num_records``).
* ``distributed``: every release a round of up to all the sites could make
  (:meth:`fedshield.strategies.dp.DistributedMechanism.releases`, the
  charge the server makes before a round), composed for this site
  (``DistributedMechanism.worst_epsilon``); needs the model's parameter
  count (``dimension``). It bounds what the server reports from above.

A plan without ``noise_multiplier`` (only ``target_epsilon``) has its
multiplier calibrated here as the server calibrates it
(:func:`~fedshield.privacy.accounting.calibrate_noise_multiplier`); record
mode calibrates from this site's own size (the server keeps the largest
multiplier of all sites', so the site's ε is never below the server's), and
distributed mode is not calibrated here (its ε is then unknown: ∞).

Use: build a :class:`SiteGuard` at join and call :meth:`SiteGuard.check_run`;
call :meth:`SiteGuard.check_task` before each task and
:meth:`SiteGuard.filter_metrics` on every metrics mapping leaving the site.
Each refusal raises :class:`PolicyRefusal` (exit code 43).

This module reads the plan's fields itself, with strict type checks: the
transport layer sits below :mod:`fedshield.api`, so it cannot call
:func:`fedshield.api.config.parse_config`; the caller (in the API or CLI
layer) should validate the announced plan with it first.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedshield.errors import ConfigError, ConfigFileError, FedShieldError

if TYPE_CHECKING:  # the accountant (dp-accounting) loads only when needed
    from fedshield.strategies.dp import DpFedAvg

__all__ = ["BUILTIN_MODELS", "PolicyRefusal", "SiteGuard", "SitePolicy"]

BUILTIN_MODELS = ("logistic", "mlp", "cnn")
"""The built-in model kinds a policy's ``models`` may name."""

_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_SITE = "site"
"""The client id this site's own accounting uses (record mode)."""


class PolicyRefusal(FedShieldError):
    """Raised when the site's policy refuses the run or a task.

    Parameters
    ----------
    reason
        A short sentence a site operator understands (also the message).
    """

    exit_code = 43

    def __init__(self, reason: str) -> None:
        super().__init__(f"this site's policy refuses: {reason}")
        self.reason = reason


# --- the policy file --------------------------------------------------------------


@dataclass(frozen=True)
class SitePolicy:
    """What a site will take part in (the ``[policy]`` table of its file).

    Every field is described in the module docstring
    (:mod:`fedshield.transport.policy`); ``None`` means no constraint.

    Parameters
    ----------
    max_epsilon
        Largest ε the site spends over the run, at the run's δ.
    max_delta
        Largest δ the site accepts.
    require_secagg
        Refuse a plan without secure aggregation.
    require_dp
        Refuse a plan without differential privacy.
    min_clients
        Fewest clients per round (expected count, and SecAgg's threshold).
    models
        Allowed models: built-in kinds or ``"sha256:<hex>"`` of a factory file.
    metrics
        Metric names allowed to leave the site (empty: none).
    """

    max_epsilon: float | None = None
    max_delta: float | None = None
    require_secagg: bool = False
    require_dp: bool = False
    min_clients: int | None = None
    models: tuple[str, ...] | None = None
    metrics: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "SitePolicy")

    @classmethod
    def load(cls, path: Path) -> SitePolicy:
        """Read a policy file (a TOML ``[policy]`` table).

        Raises
        ------
        ConfigFileError
            If the file is missing, unreadable or not TOML.
        ConfigError
            If a key is unknown (the closest is suggested), a value has the
            wrong type or is out of range; the message names file and key.
        """
        path = Path(path)
        try:
            text = path.read_text("utf-8")
        except FileNotFoundError:
            raise ConfigFileError(
                f"policy file {str(path)!r} not found; see examples/network/policy.toml"
            ) from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigFileError(
                f"cannot read policy file {str(path)!r}: {err}"
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigFileError(f"{path} is not valid TOML: {err}") from None
        extra = sorted(set(data) - {"policy"})
        if extra:
            raise ConfigError(
                f"{path}: unknown table [{extra[0]}]{_suggest(extra[0], ['policy'])} "
                "(a policy file holds one [policy] table)"
            )
        table = data.get("policy")
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: needs a [policy] table")
        return cls.from_mapping(table, source=str(path))

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], *, source: str) -> SitePolicy:
        """A policy from the keys of a ``[policy]`` table (``source`` names it).

        Raises
        ------
        ConfigError
            As :meth:`load`.
        """
        keys = [f.name for f in dataclasses.fields(cls)]
        for key in table:
            if key not in keys:
                raise ConfigError(
                    f"{source}: policy.{key}: unknown key{_suggest(key, keys)} "
                    f"(keys of [policy]: {', '.join(keys)})"
                )
        given = dict(table)
        for key in ("models", "metrics"):
            if isinstance(given.get(key), list):
                given[key] = tuple(given[key])
        try:
            return cls(**given)
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_fields(policy: SitePolicy, source: str) -> None:
    """Refuse wrong types and out-of-range values (ConfigError naming the key)."""
    for key in ("max_epsilon", "max_delta"):
        value = getattr(policy, key)
        if value is None:
            continue
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"policy.{key} must be a finite number >= 0; got {value!r}"
            )
    if policy.max_delta is not None and policy.max_delta >= 1:
        raise ConfigError(f"policy.max_delta must be below 1; got {policy.max_delta!r}")
    for key in ("require_secagg", "require_dp"):
        if not isinstance(getattr(policy, key), bool):
            raise ConfigError(
                f"policy.{key} must be true or false; got {getattr(policy, key)!r}"
            )
    mc = policy.min_clients
    if mc is not None and (not isinstance(mc, int) or isinstance(mc, bool) or mc < 1):
        raise ConfigError(f"policy.min_clients must be an integer >= 1; got {mc!r}")
    for key in ("models", "metrics"):
        value = getattr(policy, key)
        if value is None:
            continue
        if not isinstance(value, tuple) or not all(
            isinstance(v, str) and v for v in value
        ):
            raise ConfigError(
                f"policy.{key} must be a list of non-empty strings; got {value!r}"
            )
    for model in policy.models or ():
        if model not in BUILTIN_MODELS and not _HASH.match(model):
            raise ConfigError(
                f"policy.models: {model!r} is neither a built-in model "
                f"({', '.join(BUILTIN_MODELS)}) nor 'sha256:<64 lowercase hex "
                "digits>' of a factory file this site holds"
            )


# --- the announced plan -----------------------------------------------------------


class _Section:
    """Strict reads of one section of the announced plan."""

    def __init__(self, config: Mapping[str, Any], name: str) -> None:
        value = config.get(name, {})
        if not isinstance(value, Mapping):
            raise PolicyRefusal(f"the announced plan's [{name}] is not a table")
        self.name = name
        self.data = value

    def _get(self, key: str, default: Any) -> Any:
        return self.data.get(key, default)

    def _bad(self, key: str, what: str) -> PolicyRefusal:
        return PolicyRefusal(
            f"the announced plan's {self.name}.{key} must be {what}; got "
            f"{self.data.get(key)!r}"
        )

    def get_int(self, key: str, default: int | None, low: int = 1) -> int | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise self._bad(key, f"an integer >= {low}")
        return value

    def get_float(self, key: str, default: float | None) -> float | None:
        value = self._get(key, default)
        if value is None:
            return None
        if not _is_number(value) or not math.isfinite(value) or value <= 0:
            raise self._bad(key, "a finite number > 0")
        return float(value)

    def get_str(self, key: str, default: str | None, choices: Sequence[str]) -> str:
        value = self._get(key, default)
        if value not in choices or not isinstance(value, str):
            raise self._bad(key, f"one of {', '.join(map(repr, choices))}")
        return value

    def get_bool(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._bad(key, "true or false")
        return value


@dataclass(frozen=True)
class _Plan:
    """The fields of the announced plan the policy's checks read."""

    rounds: int
    model_kind: str
    epochs: int
    batch_size: int
    fraction: float | None
    clients_per_round: int | None
    min_clients: int
    mode: str
    clip_norm: float | None
    noise_multiplier: float | None
    target_epsilon: float | None
    delta: float
    accountant: str
    sampling: str
    distributed_bits: int
    rounding_beta: float
    protocol: str
    threshold: float | None
    malicious: bool

    @classmethod
    def read(cls, config: Mapping[str, Any]) -> _Plan:
        if not isinstance(config, Mapping):
            raise PolicyRefusal("the announced plan is not a mapping of sections")
        run = _Section(config, "run")
        model = _Section(config, "model")
        client = _Section(config, "client")
        strategy = _Section(config, "strategy")
        privacy = _Section(config, "privacy")
        secagg = _Section(config, "secagg")
        modes = ("none", "central", "record", "local", "distributed")
        mode = privacy.get_str("mode", "none", modes)
        plan = cls(
            rounds=_known(run.get_int("rounds", 30)),
            model_kind=model.get_str("kind", "mlp", (*BUILTIN_MODELS, "python")),
            epochs=_known(client.get_int("epochs", 1)),
            batch_size=_known(client.get_int("batch_size", 32)),
            fraction=strategy.get_float("fraction", None),
            clients_per_round=strategy.get_int("clients_per_round", None),
            min_clients=_known(strategy.get_int("min_clients", 1)),
            mode=mode,
            clip_norm=privacy.get_float("clip_norm", None),
            noise_multiplier=privacy.get_float("noise_multiplier", None),
            target_epsilon=privacy.get_float("target_epsilon", None),
            delta=_known(privacy.get_float("delta", 1e-5)),
            accountant=privacy.get_str("accountant", "pld", ("pld", "rdp")),
            sampling=privacy.get_str("sampling", "poisson", ("poisson", "fixed")),
            distributed_bits=_known(privacy.get_int("distributed_bits", 20, low=8)),
            rounding_beta=_known(privacy.get_float("rounding_beta", math.exp(-0.5))),
            protocol=secagg.get_str("protocol", "none", ("none", "secagg", "secagg+")),
            threshold=secagg.get_float("threshold", None),
            malicious=secagg.get_bool("malicious", False),
        )
        if plan.fraction is not None and plan.fraction > 1:
            raise strategy._bad("fraction", "in (0, 1]")
        if plan.fraction is not None and plan.clients_per_round is not None:
            raise PolicyRefusal(
                "the announced plan sets both strategy.fraction and "
                "strategy.clients_per_round"
            )
        if plan.delta >= 1:
            raise privacy._bad("delta", "in (0, 1)")
        if mode != "none" and plan.clip_norm is None:
            raise PolicyRefusal(
                f"the announced plan's privacy.mode = {mode!r} has no clip_norm"
            )
        if (
            mode != "none"
            and plan.noise_multiplier is None
            and plan.target_epsilon is None
        ):
            raise PolicyRefusal(
                f"the announced plan's privacy.mode = {mode!r} has neither "
                "noise_multiplier nor target_epsilon"
            )
        return plan


def _known(value: Any) -> Any:
    assert value is not None  # a default was given
    return value


def _network_sites(config: Mapping[str, Any]) -> list[str] | None:
    network = config.get("network")
    if network is None:
        return None
    if not isinstance(network, Mapping):
        raise PolicyRefusal("the announced plan's [network] is not a table")
    sites = network.get("sites")
    if sites is None:
        return None
    if not isinstance(sites, list) or not all(isinstance(s, str) for s in sites):
        raise PolicyRefusal("the announced plan's network.sites is not a list of names")
    return list(sites)


# --- the guard --------------------------------------------------------------------


class SiteGuard:
    """A site's policy applied to one announced plan.

    Parameters
    ----------
    policy
        The site's :class:`SitePolicy`.
    config
        The announced plan: the experiment configuration as nested mappings
        (``ExperimentConfig.to_dict()``, ``[data]`` left out). Read here:
        ``run.rounds``, ``model.kind``, ``client.epochs`` and ``batch_size``,
        ``strategy.fraction`` / ``clients_per_round`` / ``min_clients``,
        ``[privacy]`` (``mode``, ``clip_norm``, ``noise_multiplier``,
        ``target_epsilon``, ``delta``, ``accountant``, ``sampling``,
        ``distributed_bits``, ``rounding_beta``), ``[secagg]``
        (``protocol``, ``threshold``, ``malicious``) and ``network.sites``
        (must equal ``sites`` when present). Missing keys take the
        configuration's defaults.
    sites
        The names of the expected sites (the federation's ``N``).
    factory_source
        The bytes of the model factory file this site holds (``model.kind =
        "python"``): its SHA-256 must be listed in the policy's ``models``.
    num_records
        The number of records this site trains on (record mode's ε).
    dimension
        The model's parameter count (distributed mode's ε).

    Raises
    ------
    PolicyRefusal
        If the plan is malformed (a wrong type, a value out of range).
    """

    def __init__(
        self,
        policy: SitePolicy,
        config: Mapping[str, Any],
        sites: Sequence[str],
        *,
        factory_source: bytes | None = None,
        num_records: int | None = None,
        dimension: int | None = None,
    ) -> None:
        self.policy = policy
        self.plan = _Plan.read(config)
        names = list(sites)
        if not names or not all(isinstance(s, str) and s for s in names):
            raise PolicyRefusal("the announced list of sites is empty or malformed")
        if len(set(names)) != len(names):
            raise PolicyRefusal("the announced list of sites names a site twice")
        network = _network_sites(config)
        if network is not None and network and sorted(network) != sorted(names):
            raise PolicyRefusal(
                "the announced sites differ from the plan's network.sites"
            )
        self.sites = tuple(names)
        if (
            self.plan.mode == "record"
            and num_records is None
            and policy.max_epsilon is not None
        ):
            raise ValueError(
                "record mode: this site's epsilon needs its number of training "
                "records (SiteGuard(..., num_records=...))"
            )
        if num_records is not None and (
            not isinstance(num_records, int) or num_records < 1
        ):
            raise ValueError(
                f"num_records must be an integer >= 1; got {num_records!r}"
            )
        if dimension is not None and (not isinstance(dimension, int) or dimension < 1):
            raise ValueError(f"dimension must be an integer >= 1; got {dimension!r}")
        self.factory_source = factory_source
        self.num_records = num_records
        self.dimension = dimension
        self._strategy: DpFedAvg | None = None
        self._epsilons: dict[int, float] = {}

    # --- the checks ------------------------------------------------------------

    @property
    def num_sites(self) -> int:
        """``N``: the number of expected sites."""
        return len(self.sites)

    def expected_clients(self) -> int:
        """The clients expected in a round, as the server's sampler counts them."""
        return int(self._sampler().expected_count(self.num_sites))

    def _sampler(self) -> Any:
        """The server's client sampler for this plan (DP's when DP is on)."""
        from fedshield.strategies.dp import PoissonSampler
        from fedshield.strategies.sampling import CountSampler, FractionSampler

        plan, n = self.plan, self.num_sites
        try:
            if plan.mode in ("none", "record"):  # FedAvg's sampler
                if plan.clients_per_round is not None:
                    return CountSampler(plan.clients_per_round)
                fraction = plan.fraction if plan.fraction is not None else 1.0
                return FractionSampler(fraction)
            if plan.clients_per_round is not None:
                rate = min(1.0, plan.clients_per_round / n)
            else:
                rate = plan.fraction if plan.fraction is not None else 1.0
            if plan.sampling == "poisson":
                return PoissonSampler(rate)
            return CountSampler(
                plan.clients_per_round
                if plan.clients_per_round is not None
                else max(1, round(rate * n))
            )
        except ConfigError as err:
            raise PolicyRefusal(
                f"the plan's client sampling is invalid: {err}"
            ) from None

    def secagg_threshold(self) -> int | None:
        """SecAgg's threshold for a round of the expected clients (None: no SecAgg).

        Raises
        ------
        PolicyRefusal
            If the threshold cannot be built for that round.
        """
        plan = self.plan
        if plan.protocol == "none":
            return None
        try:
            return int(self._secure().threshold_for(self.expected_clients()))
        except ConfigError as err:
            raise PolicyRefusal(
                f"the plan's secure aggregation cannot run: {err}"
            ) from None

    def check_run(self) -> None:
        """The checks that hold for the whole run (call it at join).

        Model, secure aggregation, differential privacy, clients per round
        and δ. The ε cap is checked per task (:meth:`check_task`).

        Raises
        ------
        PolicyRefusal
            Naming the first check that fails.
        """
        p, plan = self.policy, self.plan
        self._check_model()
        if p.require_secagg and plan.protocol == "none":
            raise PolicyRefusal(
                "the plan has no secure aggregation, and this site's policy sets "
                "require_secagg = true"
            )
        if p.require_dp and plan.mode == "none":
            raise PolicyRefusal(
                "the plan has no differential privacy, and this site's policy sets "
                "require_dp = true"
            )
        if p.max_delta is not None:
            if plan.mode == "none":
                raise PolicyRefusal(
                    "the plan has no differential privacy (no delta), and this "
                    f"site's policy sets max_delta = {p.max_delta:g}"
                )
            if plan.delta > p.max_delta:
                raise PolicyRefusal(
                    f"the plan's delta = {plan.delta:g} is above this site's "
                    f"max_delta = {p.max_delta:g}"
                )
        if p.min_clients is not None:
            expected = self.expected_clients()
            if expected < p.min_clients:
                raise PolicyRefusal(
                    f"a round expects {expected} clients (of {self.num_sites} "
                    f"sites), below this site's min_clients = {p.min_clients}"
                )
            threshold = self.secagg_threshold()
            if threshold is not None and threshold < p.min_clients:
                raise PolicyRefusal(
                    f"secure aggregation unmasks a sum of {threshold} clients, "
                    f"below this site's min_clients = {p.min_clients}"
                )
        if p.max_epsilon is not None and not self._unaccountable():
            self._dp()  # a plan the accountant refuses is refused now

    def _unaccountable(self) -> bool:
        """No DP, or distributed DP this site cannot account (ε is then ∞)."""
        plan = self.plan
        return plan.mode == "none" or (
            plan.mode == "distributed"
            and (self.dimension is None or plan.noise_multiplier is None)
        )

    def _check_model(self) -> None:
        allowed = self.policy.models
        if allowed is None:
            return
        kind = self.plan.model_kind
        if kind != "python":
            if kind not in allowed:
                raise PolicyRefusal(
                    f"the plan's model {kind!r} is not in this site's models "
                    f"({', '.join(allowed) or 'none'})"
                )
            return
        if self.factory_source is None:
            raise PolicyRefusal(
                "the plan's model is a Python factory and this site holds no "
                "factory file to check against its models"
            )
        digest = "sha256:" + hashlib.sha256(self.factory_source).hexdigest()
        if digest not in allowed:
            raise PolicyRefusal(
                f"this site's model factory file ({digest[:19]}...) is not in "
                "this site's models"
            )

    def check_task(self, round_idx: int, stage: str) -> None:
        """Refuse a task this site's policy does not allow (call before each).

        Re-runs :meth:`check_run`, then refuses a round beyond the plan's
        ``run.rounds`` and, with ``max_epsilon``, a round after which this
        site's own ε (:meth:`epsilon_after`, ``round_idx + 1`` rounds) would
        exceed it.

        Parameters
        ----------
        round_idx
            The task's 0-based round index.
        stage
            The task's stage (``"fit"``, ``"evaluate"``, a SecAgg stage).

        Raises
        ------
        PolicyRefusal
            Naming the check that fails.
        """
        if (
            not isinstance(round_idx, int)
            or isinstance(round_idx, bool)
            or round_idx < 0
        ):
            raise PolicyRefusal(f"a task's round index must be >= 0; got {round_idx!r}")
        self.check_run()
        rounds = round_idx + 1
        if rounds > self.plan.rounds:
            raise PolicyRefusal(
                f"the {stage} task of round {rounds} is beyond the plan's "
                f"{self.plan.rounds} rounds"
            )
        cap = self.policy.max_epsilon
        if cap is None:
            return
        if self.plan.mode == "none":
            raise PolicyRefusal(
                "the plan has no differential privacy (epsilon is infinite), and "
                f"this site's policy sets max_epsilon = {cap:g}"
            )
        eps = self.epsilon_after(rounds)
        if eps > cap:
            shown = "unknown (infinite)" if math.isinf(eps) else f"{eps:.4g}"
            raise PolicyRefusal(
                f"epsilon after round {rounds} would be {shown}, above this "
                f"site's max_epsilon = {cap:g} (delta = {self.plan.delta:g}); "
                f"{stage} task refused"
            )

    # --- ε ---------------------------------------------------------------------

    def epsilon_after(self, rounds: int) -> float:
        """The site's ε after taking part in ``rounds`` rounds, at the plan's δ.

        0 for 0 rounds; ``inf`` for a plan without differential privacy, and
        for one this site cannot account (distributed mode without
        ``dimension`` or ``noise_multiplier``).

        Raises
        ------
        PolicyRefusal
            If the plan's privacy settings are refused by the accountant.
        ValueError
            Record mode without ``num_records``.
        """
        if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0; got {rounds!r}")
        if self.plan.mode == "none":
            return math.inf
        if rounds == 0:
            return 0.0
        if rounds not in self._epsilons:
            try:
                self._epsilons[rounds] = self._epsilon(rounds)
            except ConfigError as err:
                raise PolicyRefusal(
                    f"the plan's privacy cannot be accounted: {err}"
                ) from None
        return self._epsilons[rounds]

    def _epsilon(self, rounds: int) -> float:
        from fedshield.privacy.accounting import PrivacyLedger
        from fedshield.strategies.dp import (
            CentralMechanism,
            DistributedMechanism,
            LocalMechanism,
            RecordMechanism,
        )

        if self._unaccountable():
            return math.inf
        dp = self._dp()
        mechanism = dp.mechanism
        if isinstance(mechanism, CentralMechanism):
            ledger = PrivacyLedger(dp.privacy.accountant, dp.privacy.delta)
            event = mechanism.event(dp)
            for round_idx in range(rounds):
                ledger.record(round_idx, event)
            return ledger.epsilon()
        if isinstance(mechanism, LocalMechanism):
            return mechanism.client_epsilon(dp, rounds)
        if isinstance(mechanism, RecordMechanism):
            return mechanism.client_epsilon(dp, _SITE, rounds)
        assert isinstance(mechanism, DistributedMechanism)
        assert self.dimension is not None
        releases = mechanism.releases(
            dp, self.dimension, max(2, self.num_sites), strict=False
        )
        events = [spec.to_json() for spec in releases]
        histogram = {str(i): rounds for i in range(len(events))}
        return mechanism.worst_epsilon(dp, events, [histogram])

    def _secure(self) -> Any:
        from fedshield.simulation.secure import SecureAggregation

        plan = self.plan
        return SecureAggregation(
            protocol=plan.protocol,  # type: ignore[arg-type]
            threshold=plan.threshold,
            malicious=plan.malicious,
        )

    def _dp(self) -> DpFedAvg:
        """The server's DP strategy for this plan, built as the API builds it."""
        if self._strategy is None:
            try:
                self._strategy = self._build_dp()
            except ConfigError as err:
                raise PolicyRefusal(
                    f"the plan's privacy settings are invalid: {err}"
                ) from None
        return self._strategy

    def _build_dp(self) -> DpFedAvg:
        from fedshield.core import FitConfig
        from fedshield.strategies.dp import DpFedAvg, PrivacySettings
        from fedshield.strategies.fedavg import FedAvg

        plan, n = self.plan, self.num_sites
        assert plan.mode != "none" and plan.clip_norm is not None
        sizes: dict[str, int] | None = None
        if plan.mode == "record":
            assert self.num_records is not None  # checked in __init__
            sizes = {_SITE: self.num_records}
        sampler = self._sampler()
        sigma = plan.noise_multiplier
        if sigma is None:
            sigma = self._calibrate(sampler)
        secure = self._secure() if plan.protocol != "none" else None
        base = FedAvg(
            sampler=sampler,
            local=FitConfig(
                round_idx=0, epochs=plan.epochs, batch_size=plan.batch_size
            ),
            min_clients=plan.min_clients,
        )
        settings = PrivacySettings(
            mode=plan.mode,
            clip_norm=plan.clip_norm,
            noise_multiplier=sigma,
            delta=plan.delta,
            accountant=plan.accountant,  # type: ignore[arg-type]
            distributed_bits=plan.distributed_bits,
            rounding_beta=plan.rounding_beta,
        )
        return DpFedAvg(
            base=base,
            privacy=settings,
            sampler=sampler,
            num_clients=n,
            client_sizes=sizes,
            threshold_for=secure.threshold_for if secure is not None else None,
        )

    def _calibrate(self, sampler: Any) -> float:
        """σ from ``target_epsilon``, as the server calibrates it.

        Not for distributed mode, whose calibration needs the model and the
        secure sum's rounds: its ε is then ∞ (see :meth:`epsilon_after`).
        """
        from fedshield.privacy.accounting import calibrate_noise_multiplier
        from fedshield.privacy.records import dp_sgd_rate
        from fedshield.strategies.dp import PoissonSampler

        plan = self.plan
        assert plan.target_epsilon is not None
        kwargs: dict[str, Any]
        if plan.mode == "record":
            assert self.num_records is not None
            rate, steps = dp_sgd_rate(self.num_records, plan.batch_size)
            return calibrate_noise_multiplier(
                plan.target_epsilon,
                plan.delta,
                sampling_rate=rate,
                steps=steps * plan.epochs * plan.rounds,
                accountant=plan.accountant,  # type: ignore[arg-type]
                sampling="poisson",
                replace_one=True,
            )
        assert plan.mode != "distributed"  # not calibrated here (ε is ∞)
        if plan.mode == "local":
            kwargs = {"sampling": "none", "sampling_rate": None}
        elif isinstance(sampler, PoissonSampler):
            kwargs = {"sampling": "poisson", "sampling_rate": sampler.rate}
        else:
            kwargs = {
                "sampling": "fixed",
                "sampling_rate": None,
                "population": self.num_sites,
                "sample_size": min(sampler.count, self.num_sites),
            }
        sigma = calibrate_noise_multiplier(
            plan.target_epsilon,
            plan.delta,
            steps=plan.rounds,
            accountant=plan.accountant,  # type: ignore[arg-type]
            **kwargs,
        )
        if plan.mode == "local" or not isinstance(sampler, PoissonSampler):
            sigma *= 2.0  # sensitivity 2C against noise σC, as the server
        return float(sigma)

    # --- what leaves the site --------------------------------------------------

    def filter_metrics(self, metrics: Mapping[str, float]) -> dict[str, float]:
        """``metrics`` with only the names the policy lets leave the site."""
        allowed = self.policy.metrics
        if allowed is None:
            return dict(metrics)
        return {k: v for k, v in metrics.items() if k in allowed}

    def describe(self) -> str:
        """One line for the site's log: the policy and the plan it applies to."""
        p, plan = self.policy, self.plan
        parts = [
            f"max_epsilon={p.max_epsilon:g}"
            if p.max_epsilon is not None
            else "max_epsilon=none",
            f"max_delta={p.max_delta:g}"
            if p.max_delta is not None
            else "max_delta=none",
            f"require_secagg={str(p.require_secagg).lower()}",
            f"require_dp={str(p.require_dp).lower()}",
            f"min_clients={p.min_clients if p.min_clients is not None else 'none'}",
            "models=" + ("any" if p.models is None else ",".join(p.models) or "none"),
            "metrics="
            + ("all" if p.metrics is None else ",".join(p.metrics) or "none"),
        ]
        return (
            f"site policy {' '.join(parts)}; plan: {plan.rounds} rounds, "
            f"{self.num_sites} sites, model {plan.model_kind}, privacy {plan.mode}, "
            f"secagg {plan.protocol}"
        )
