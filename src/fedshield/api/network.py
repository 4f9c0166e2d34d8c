"""A federation between organisations: ``fedshield serve`` and ``fedshield join``.

:func:`serve` runs the same rounds as :func:`~fedshield.api.run.simulate`
(strategies, DP modes, SecAgg/SecAgg+, robust rules) with a
:class:`~fedshield.transport.backend.GrpcBackend` in place of the
simulator's: the clients are sites that join over mutual TLS. The server
holds no data: ``[network]`` names the sites (the names in their
certificates) and the model's input shape and classes. Its ``--state``
folder ends with the same outputs as a simulation's run folder
(``summary.json``, ``metrics.jsonl``, ``report.html``, ``checkpoint.npz``)
plus ``state.db`` and ``blobs/``; the same command on the same folder
resumes, mid-stage, with the decisions it had made.

:func:`site_builder` is the site's half: from the plan the server announces
(its configuration without ``[data]``) and the site's own ``[data]``
section, it builds the site's client on its own data and its own copy of
the model code, and its policy's checks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sqlite3
import time
import tomllib
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedshield.api.config import ExperimentConfig, load_config, parse_config
from fedshield.api.experiment import build_strategy, secure_settings
from fedshield.core import ServerState
from fedshield.errors import ConfigError, FedShieldError, PrivacyBudgetExceeded
from fedshield.simulation import RoundOptions, RunDirectory, run_rounds
from fedshield.simulation.rundir import CONFIG, SUMMARY

__all__ = ["ServeOutcome", "plan_of", "serve", "site_builder"]

logger = logging.getLogger(__name__)

SIMULATION_ONLY = ("attack", "faults")


@dataclass(frozen=True)
class _Shape:
    """The model's input shape and classes, from ``[network]`` (no data here)."""

    input_shape: tuple[int, ...]
    num_classes: int


def _check_serveable(config: ExperimentConfig) -> Any:
    net = config.network
    if net is None or not net.sites:
        raise ConfigError(
            "fedshield serve needs a [network] section naming the sites: "
            'sites = ["hospital-a", "hospital-b", ...] (the names in their '
            "certificates), with input_shape and num_classes"
        )
    if net.input_shape is None or net.num_classes is None:
        raise ConfigError(
            "[network] needs input_shape (e.g. [13]) and num_classes: the server "
            "holds no data to read them from"
        )
    if len(set(net.sites)) != len(net.sites):
        raise ConfigError("[network] sites must be distinct")
    if config.attack.kind != "none" or config.faults.dropout:
        raise ConfigError(
            "[attack] and [faults] are simulated; a deployment has real sites. "
            "Remove them from the server's configuration"
        )
    if config.robust.rule == "fltrust":
        raise ConfigError(
            "robust.rule = 'fltrust' needs a root data set at the server, which "
            "a deployment's server does not hold; use another rule"
        )
    if config.privacy.mode == "record":
        raise ConfigError(
            'privacy.mode = "record" accounts with every site\'s record count, '
            "which the server does not know; use central, local or distributed DP"
        )
    return net


def plan_of(config: ExperimentConfig, run_id: str) -> dict[str, Any]:
    """What a site learns when it joins: the configuration without ``[data]``."""
    sections = config.to_dict()
    sections.pop("data", None)
    # The run's seed stays with the server: the central-DP noise, the sample
    # and every site's stage seed derive from it (a site that knew it could
    # subtract the noise, or compute another site's randomness).
    sections.get("run", {}).pop("seed", None)
    net = sections.get("network", {})
    return {
        "run_id": run_id,
        "config": sections,
        "sites": list(net.get("sites", [])),
        "rounds": config.run.rounds,
    }


def _model(config: ExperimentConfig) -> Any:
    from fedshield.api.experiment import _build_model

    net = config.network
    assert net is not None and net.input_shape and net.num_classes
    shape = _Shape(tuple(net.input_shape), int(net.num_classes))
    return _build_model(config, shape, None)  # type: ignore[arg-type]


@dataclass
class ServeOutcome:
    """How :func:`serve` ended."""

    summary: dict[str, Any]
    state_dir: Path
    port: int
    events: list[tuple[float, str, str, str]] = field(default_factory=list)


def serve(
    config_path: Path | ExperimentConfig,
    *,
    ca_dir: Path | None,
    state_dir: Path,
    listen: str,
    port_file: Path | None = None,
    on_round: Callable[[ServerState, Mapping[str, Any]], None] | None = None,
    on_listening: Callable[[int], None] | None = None,
) -> ServeOutcome:
    """Serve the run ``config_path`` describes until its last round.

    ``ca_dir`` None is ``--insecure`` (refused unless ``listen`` is a
    loopback address). A ``state_dir`` that holds a run resumes it.

    Raises
    ------
    FedShieldError
        Configuration, certificate, state or round failures (exit codes as
        for ``simulate``; 40-48 for the transport's).
    """
    config = (
        config_path
        if isinstance(config_path, ExperimentConfig)
        else load_config(Path(config_path))
    )
    started = time.perf_counter()
    run = _Served.build(config, ca_dir=ca_dir, state_dir=Path(state_dir), listen=listen)
    port = run.start(port_file)
    if on_listening is not None:
        on_listening(port)
    status, error = "completed", None
    try:
        run.rounds(on_round)
    except PrivacyBudgetExceeded as err:
        status, error = "budget_exhausted", str(err)
    except (OSError, sqlite3.OperationalError) as err:
        from fedshield.transport.store import disk_full

        full = disk_full(err, run.state_dir)
        if full is None:
            raise
        status, error = "failed", str(full)
        raise full from err
    except FedShieldError as err:
        status, error = "failed", str(err)
        raise
    except KeyboardInterrupt:
        status, error = "interrupted", "interrupted by the operator"
        raise
    finally:
        summary, events = run.finish(status, error, started)
    return ServeOutcome(summary, run.state_dir, port, events)


def _check_network_security(
    config: ExperimentConfig, ca_dir: Path | None, listen: str
) -> None:
    secagg = config.secagg
    if ca_dir is not None and secagg.protocol != "none" and not secagg.malicious:
        raise ConfigError(
            "over a network, secure aggregation runs in malicious mode: set "
            "[secagg] malicious = true (every protocol message is signed with a "
            "key each site's certificate attests, so the server can neither "
            "substitute a site's key nor enrol one of its own; without it a "
            "server that swaps advertised keys can unmask a site's update)"
        )
    if ca_dir is None and not _is_loopback(listen):
        raise ConfigError(
            f"--insecure is for loopback only (127.0.0.1 / localhost); {listen} is "
            "not: give --ca CA_DIR"
        )


def _checked_strategy(
    config: ExperimentConfig, model: Any, sites: tuple[str, ...]
) -> Any:
    """The strategy for ``sites``, checked as ``simulate`` checks it."""
    strategy = build_strategy(config, num_clients=len(sites))
    mode = config.privacy.mode
    if mode != "none":
        from fedshield.strategies.dp import DpFedAvg

        assert isinstance(strategy, DpFedAvg)
        strategy.check(len(sites), dimension=model.spec.size)
    else:
        strategy.check(len(sites))
    secure = secure_settings(config)
    if secure is not None:
        from fedshield.api.experiment import client_sampler
        from fedshield.simulation.secure import EXTRA_WORDS

        distributed = (
            strategy.privacy.distributed()  # type: ignore[union-attr]
            if mode == "distributed"
            else None
        )
        expected = client_sampler(config).expected_count(len(sites))
        secure.check(expected, model.spec.size + EXTRA_WORDS, distributed=distributed)
    return strategy


def _server_seed(config: ExperimentConfig, store: Any) -> int:
    """The run's seed as the server uses it: ``run.seed`` keyed by a secret.

    Every site sees values derived from the seed (its stage seeds, the
    first model); a small ``run.seed`` could be found by trying them all,
    and with it the central-DP noise and the sample. Keyed by a 256-bit
    secret kept in the state (``FEDSHIELD_SERVER_SECRET`` reproduces it),
    the seed is out of reach; the same state gives the same run.
    """
    digest = hashlib.blake2b(
        str(config.run.seed).encode(), key=store.secret("seed"), digest_size=32
    ).digest()
    return int.from_bytes(digest, "little")


def _run_id(config: ExperimentConfig, store: Any, state_dir: Path) -> str:
    """The run's id, kept in the store; refuse a state of another config."""
    from fedshield.api.run import config_fingerprint

    fingerprint = config_fingerprint(config)
    recorded = store.meta("fingerprint")
    if recorded is not None and recorded != fingerprint:
        raise ConfigError(
            f"{state_dir} holds a run of another configuration (fingerprint "
            f"{recorded}, this one {fingerprint}); only run.rounds may change on "
            "resume; use a new --state folder"
        )
    store.set_meta("fingerprint", fingerprint)
    run_id = store.meta("run_id")
    if run_id is None:
        # Fresh for every state folder (never derived from a configured
        # secret): a site keeps what it answered per run id.
        run_id = f"{config.run.name}-{uuid.uuid4().hex[:12]}"
        store.set_meta("run_id", run_id)
    return str(run_id)


@dataclass
class _Served:
    """One served run: what was built for it, and its steps."""

    config: ExperimentConfig
    net: Any
    sites: tuple[str, ...]
    model: Any
    strategy: Any
    state_dir: Path
    run_dir: RunDirectory
    store: Any
    run_id: str
    state: ServerState
    server: Any
    mailbox: Any
    reply_cap: int
    ca_dir: Path | None
    seed: int

    @classmethod
    def build(
        cls,
        config: ExperimentConfig,
        *,
        ca_dir: Path | None,
        state_dir: Path,
        listen: str,
    ) -> _Served:
        """Check everything, open (or resume) the state, make the server."""
        from fedshield.transport.backend import Mailbox
        from fedshield.transport.server import FleetServer, ServerSettings
        from fedshield.transport.store import ServerStore

        net = _check_serveable(config)
        _check_network_security(config, ca_dir, listen)
        sites = tuple(net.sites)
        model = _model(config)
        strategy = _checked_strategy(config, model, sites)
        run_dir = RunDirectory(state_dir)
        resume = (state_dir / "state.db").exists() and run_dir.has_run()
        run_dir.prepare(resume=resume, overwrite=False)
        store = ServerStore(state_dir)
        run_id = _run_id(config, store, state_dir)
        seed = _server_seed(config, store)
        state = _initial_state(config, run_dir, model, strategy, resume, seed)
        import tomli_w

        run_dir.write_text(CONFIG, tomli_w.dumps(config.to_dict()))
        mailbox = Mailbox(store, offline_after_s=net.heartbeat_s * net.offline_after)
        settings = ServerSettings(
            listen=listen,
            sites=sites,
            run_id=run_id,
            plan_json=json.dumps(plan_of(config, run_id), sort_keys=True).encode(),
            ca_dir=Path(ca_dir) if ca_dir is not None else None,
            poll_s=net.poll_s,
            heartbeat_s=net.heartbeat_s,
            chunk_bytes=net.chunk_bytes,
            max_upload_bytes=int(net.max_upload_mb * (1 << 20)),
            clock_skew_s=net.clock_skew_s,
        )
        # Nothing a site sends for this model is larger than its update with
        # the codec's overhead (a SecAgg masked vector packs <= 8 bytes a word).
        reply_cap = 16 * model.spec.size + (16 << 20)
        server = FleetServer(settings, mailbox, max_reply_bytes=reply_cap)
        return cls(
            config, net, sites, model, strategy, state_dir, run_dir, store,
            run_id, state, server, mailbox, reply_cap, ca_dir, seed,
        )  # fmt: skip

    def start(self, port_file: Path | None) -> int:
        """Listen; write the port file once listening; return the port."""
        port = int(self.server.start())
        if port_file is not None:
            tmp = Path(port_file).with_suffix(".tmp")
            tmp.write_text(f"{port}\n")
            tmp.replace(port_file)
        mode = "mTLS" if self.ca_dir else "insecure"
        logger.info("serving %s on port %d (%s)", self.run_id, port, mode)
        return port

    def rounds(
        self, on_round: Callable[[ServerState, Mapping[str, Any]], None] | None
    ) -> None:
        """Wait for the sites, then run the rounds through the gRPC backend."""
        from fedshield.transport.backend import GrpcBackend

        config, net = self.config, self.net
        here = self.mailbox.wait_for_sites(list(self.sites), net.wait_for_sites_s)
        logger.info("%d of %d sites joined; starting", len(here), len(self.sites))

        def remember(new_state: ServerState, record: Mapping[str, Any]) -> None:
            self.state = new_state
            # The committed state, uncharged for the next round (see
            # _initial_state): what a replayed round starts from.
            RunDirectory(self.state_dir / COMMITTED).save_checkpoint(new_state)
            if on_round is not None:
                on_round(new_state, record)

        backend = GrpcBackend(
            self.mailbox,
            self.store,
            fit_timeout_s=net.fit_timeout_s,
            stage_timeout_s=net.stage_timeout_s,
            max_reply_bytes=self.reply_cap,
        )
        options = RoundOptions(
            federated_eval=config.runs_federated_eval,
            timeout_s=config.run.timeout_s,
            max_examples=net.max_examples,
            secure=secure_settings(config),
            on_failed_round=config.run.on_failed_round or "continue",
            server_secret=self.store.secret("secagg"),
        )
        try:
            self.state = run_rounds(
                self.strategy,
                self.state,
                rounds=config.run.rounds,
                client_fn=_no_clients,
                client_ids=list(self.sites),
                seed=self.seed,
                backend=backend,
                options=options,
                evaluate_fn=None,
                eval_every=config.run.eval_every,
                run_dir=self.run_dir,
                on_round=remember,
            )
        finally:
            backend.close()

    def finish(
        self, status: str, error: str | None, started: float
    ) -> tuple[dict[str, Any], list[tuple[float, str, str, str]]]:
        """Tell the sites, stop serving, write the summary and the report."""
        self.mailbox.finish()
        time.sleep(0.5)  # the sites' long polls hear "finished" before it stops
        self.server.stop()
        summary = _write_summary(
            self.config, self.run_dir, self.state, status, error, started, self.model
        )
        events = self.store.events()
        self.store.close()
        return summary, events


def _no_clients(client_id: str) -> Any:
    raise AssertionError("the server builds no clients: the sites do")


COMMITTED = "committed"
"""Subfolder of ``--state`` holding the last committed round's state."""


def _replay_is_identical(config: ExperimentConfig) -> bool:
    """Whether a replayed round releases exactly what the interrupted one did.

    True without DP, and for central DP whose noise comes from the run's
    seed: the server redraws the same noise, and the sites answer the
    replayed tasks from their caches. With noise from the operating system
    (``secure_rng``, local and distributed DP) a replay may release other
    noise, so the interrupted round stays charged as well (the simulator's
    rule: every release counted).
    """
    p = config.privacy
    return p.mode == "none" or (p.mode == "central" and not p.secure_rng)


def _initial_state(
    config: ExperimentConfig,
    run_dir: RunDirectory,
    model: Any,
    strategy: Any,
    resume: bool,
    seed: int,
) -> ServerState:
    from fedshield.api.run import config_fingerprint

    if resume:
        state: ServerState = run_dir.load_checkpoint()
        committed = RunDirectory(run_dir.path / COMMITTED)
        if _replay_is_identical(config) and committed.has_run():
            # The checkpoint was charged for the round the crash cut short
            # (before its clients trained). The replay releases exactly what
            # that round would have (the same seeded noise, the sites' same
            # cached answers): charging it again would count one release
            # twice. Resume from the round's uncharged start instead.
            start = committed.load_checkpoint()
            if start.round_idx == state.round_idx:
                state = start
        run_dir.truncate_records(state.round_idx)
        logger.info("resuming %s after round %d", run_dir.path, state.round_idx)
        return state
    params = model.init_params(seed % 2**63)  # init_params takes 63 bits
    state = strategy.init(params).evolve(
        metadata={"fingerprint": config_fingerprint(config)}
    )
    run_dir.save_checkpoint(state)
    return state


def _write_summary(
    config: ExperimentConfig,
    run_dir: RunDirectory,
    state: ServerState,
    status: str,
    error: str | None,
    started: float,
    model: Any,
) -> dict[str, Any]:
    from fedshield.api.run import _summary, _write_report

    summary = _summary(
        config,
        None,
        state,
        run_dir.read_metrics(),
        status=status,
        wall_seconds=time.perf_counter() - started,
        error=error,
    )
    net = config.network
    assert net is not None
    if summary.get("accuracy") is None:
        # The server holds no test set: the headline is the sites' own
        # evaluation (federated), when the run asks for it.
        last: dict[str, Any] = next(
            (
                r
                for r in reversed(run_dir.read_metrics())
                if r.get("federated_accuracy") is not None
            ),
            {},
        )
        summary["accuracy"] = last.get("federated_accuracy")
        summary["loss"] = last.get("federated_loss")
        summary["accuracy_source"] = "federated" if last else None
    summary["num_clients"] = len(net.sites)
    summary["dataset"] = "sites"
    summary["backend"] = "grpc"
    summary["num_parameters"] = model.spec.size
    run_dir.write_json(SUMMARY, summary)
    if config.run.report:
        _write_report(run_dir.path, None)
    return summary


def _is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    return host in ("127.0.0.1", "localhost", "::1")


# ---------------------------------------------------------------------------
# The site's half
# ---------------------------------------------------------------------------


def load_site_data(path: Path) -> dict[str, Any]:
    """The ``[data]`` section of a site's ``SITE.toml`` (paths made absolute).

    Raises
    ------
    ConfigError
        If the file is missing, not TOML, or has no ``[data]``.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path} is not valid TOML: {err}") from None
    data = doc.get("data")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path} has no [data] section; a site's file holds its [data] "
            '(e.g. dataset = "csv", path = "my.csv", label = "target")'
        )
    extra = sorted(set(doc) - {"data"})
    if extra:
        raise ConfigError(
            f"{path}: only [data] belongs in a site's file (found {extra}); the "
            "rest of the configuration comes from the server"
        )
    data = dict(data)
    for key in ("path", "test_path"):
        value = data.get(key)
        if isinstance(value, str) and not Path(value).is_absolute():
            data[key] = str((path.parent / value).resolve())
    factory = data.get("factory")
    if isinstance(factory, str) and ":" in factory:
        file, _, fn = factory.rpartition(":")
        if not Path(file).is_absolute():
            data["factory"] = f"{(path.parent / file).resolve()}:{fn}"
    return data


def site_builder(
    site_data: Mapping[str, Any],
    *,
    policy: Any = None,
    model_source: Path | None = None,
    identity: Any = None,
) -> Callable[[dict[str, Any]], Any]:
    """The site's ``build(plan)``: its client on its own data, and its checks.

    ``policy`` is a :class:`~fedshield.transport.policy.SitePolicy` (None:
    take part in anything). ``model_source``: the site's own copy of a
    Python model factory (``[model] kind = "python"``), whose hash the
    policy checks; the site never runs code the server sent. ``identity``
    (the site's certificate, :class:`~fedshield.transport.auth.Identity`)
    binds its SecAgg keys in malicious mode
    (:class:`~fedshield.transport.secagg_keys.SiteKeys`).
    """
    from fedshield.transport.site import SiteSetup

    def build(plan: dict[str, Any]) -> SiteSetup:
        config, own_config, num_sites = _site_configs(plan, site_data, model_source)
        federation = _site_federation(config, own_config, plan)
        guard = None
        if policy is not None:
            from fedshield.transport.policy import SiteGuard

            source = model_source.read_bytes() if model_source is not None else None
            guard = SiteGuard(
                policy,
                plan["config"],
                plan.get("sites", []),
                factory_source=source,
                num_records=len(federation.train.y),
                dimension=federation.model.spec.size,
            )
            guard.check_run()
            logger.info("site policy: %s", guard.describe())
        trust = _site_trust(config, num_sites, _site_keys(config, plan, identity))
        if trust is not None and trust.keys is not None:
            from dataclasses import replace as _replace

            secure = secure_settings(config)
            floor = max(
                2,
                config.strategy.min_clients,
                getattr(policy, "min_clients", None) or 0,
            )
            trust = _replace(
                trust,
                min_clients=floor,
                threshold_for=secure.threshold_for if secure is not None else None,
            )
        return SiteSetup(
            _site_client_fn(federation, own_config, trust, guard),
            check_task=guard.check_task if guard is not None else None,
            filter_metrics=guard.filter_metrics if guard is not None else None,
            check_message=_dp_options_check(
                config, num_sites, federation.model.spec.size
            ),
            epsilon_after=guard.epsilon_after if guard is not None else None,
            max_epsilon=policy.max_epsilon if policy is not None else None,
        )

    return build


def _site_configs(
    plan: dict[str, Any], site_data: Mapping[str, Any], model_source: Path | None
) -> tuple[ExperimentConfig, ExperimentConfig, int]:
    """The plan validated as the server's configuration, and the site's own."""
    if not isinstance(plan, dict) or not isinstance(plan.get("config"), dict):
        raise ConfigError("the server's plan is malformed (no configuration)")
    sections = {k: dict(v) for k, v in plan["config"].items() if isinstance(v, dict)}
    for name in SIMULATION_ONLY:
        sections.pop(name, None)
    if model_source is not None and sections.get("model", {}).get("kind") == "python":
        fn = str(sections["model"].get("factory", ":build")).rpartition(":")[2]
        sections["model"]["factory"] = f"{model_source.resolve()}:{fn}"
    num_sites = max(1, len(plan.get("sites", [])))
    # The whole plan, validated as the server's configuration is (the data
    # section stands for the federation's sites)...
    config = parse_config(
        {**sections, "data": {"dataset": "digits", "num_clients": num_sites}}
    )
    # ... and this site's own data, as one client of its own.
    data = dict(site_data)
    data.setdefault("partition", "iid")
    data["num_clients"] = 1
    own = {"run": sections.get("run", {}), "model": sections.get("model", {})}
    return config, parse_config({**own, "data": data}), num_sites


def _site_federation(
    config: ExperimentConfig, own_config: ExperimentConfig, plan: dict[str, Any]
) -> Any:
    """The site's data and model; refuse data that does not fit the run."""
    from fedshield.api.experiment import build_federation

    federation = build_federation(own_config)
    import torch

    # As simulate does: small models train fastest single-threaded ([run]
    # torch_threads, default 1); more threads mostly synchronise.
    torch.set_num_threads(config.run.torch_threads)
    net = plan["config"].get("network", {})
    shape = list(federation.train.input_shape)
    if net.get("input_shape") and list(net["input_shape"]) != shape:
        raise ConfigError(
            f"this site's data has input shape {shape}; the run expects "
            f"{net['input_shape']} (check the site's features)"
        )
    classes = federation.train.num_classes
    if net.get("num_classes") and int(net["num_classes"]) != classes:
        raise ConfigError(
            f"this site's data has {classes} classes; the run expects "
            f"{net['num_classes']} (set classes in the site's [data])"
        )
    return federation


def _site_keys(config: ExperimentConfig, plan: dict[str, Any], identity: Any) -> Any:
    """Malicious-mode SecAgg: the site's key, attested by its certificate."""
    if config.secagg.protocol == "none" or not config.secagg.malicious:
        return None
    if identity is None:
        logger.warning(
            "malicious-mode SecAgg without a certificate (--insecure): this site "
            "cannot check the server's key table"
        )
        return None
    from fedshield.transport.secagg_keys import SiteKeys

    return SiteKeys(identity, str(plan.get("run_id", "")), plan.get("sites", []))


def _site_client_fn(
    federation: Any, own_config: ExperimentConfig, trust: Any, guard: Any
) -> Callable[[str], Any]:
    """Builds the site's one client, named as its certificate names it."""
    rows = federation.client_fn.parts[federation.client_ids[0]]
    built: dict[str, Any] = {}

    def client_fn(name: str) -> Any:
        if name not in built:
            from fedshield.api.experiment import DatasetClients

            built.clear()
            built[name] = DatasetClients(
                federation.model,
                federation.train,
                {name: rows},
                client_test_fraction=own_config.data.client_test_fraction,
                seed=own_config.run.seed,
            )
            built[name].trust = trust
        client = built[name](name)
        if guard is not None:
            client = _MetricsFilter(client, guard.filter_metrics)
        return client

    return client_fn


class _MetricsFilter:
    """A site's client whose metrics pass its policy before anything leaves.

    Filtering here, not on the reply, covers secure aggregation too: there
    the update (with its metrics) is held and encoded into the masked sum.
    """

    def __init__(self, client: Any, keep: Callable[[Mapping[str, float]], Any]):
        self._client = client
        self._keep = keep

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def fit(self, params: Any, config: Any, rng: Any) -> Any:
        from dataclasses import replace

        update = self._client.fit(params, config, rng)
        return replace(update, metrics=self._keep(update.metrics))

    def evaluate(self, params: Any, config: Any) -> Any:
        return self._keep(self._client.evaluate(params, config))


def _dp_options_check(
    config: ExperimentConfig, num_sites: int, dimension: int
) -> Callable[[str, Any], None] | None:
    """The site's check that a ``fit`` asks for the DP the plan announced.

    Under local DP the site clips and noises its own update with the clip
    norm and noise multiplier the task's options carry: a server could ask
    for less noise than the plan (and the site's accountant) assumes. The
    site computes the options from the plan itself and refuses a task whose
    options differ.
    """
    if config.privacy.mode == "none":
        return None
    from fedshield.strategies.dp import DpFedAvg
    from fedshield.transport.site import SiteRefusal

    strategy = build_strategy(config, num_clients=num_sites)
    assert isinstance(strategy, DpFedAvg)
    strategy.check(num_sites, dimension=dimension)
    expected = dict(strategy.mechanism.client_options(strategy) or {})
    if not expected:
        return None

    def check(stage: str, message: Any) -> None:
        if stage != "fit":
            return
        options = getattr(getattr(message, "config", None), "options", {})
        for key, want in expected.items():
            if options.get(key) != want:
                raise SiteRefusal(
                    f"the task asks for {key} = {options.get(key)!r}; the plan "
                    f"this site accounts for says {want!r}"
                )

    return check


def _site_trust(config: ExperimentConfig, num_sites: int, keys: Any = None) -> Any:
    """What the site checks a secure round's setup against (its own config)."""
    if config.secagg.protocol == "none":
        return None
    from fedshield.simulation.secure_client import ClientTrust
    from fedshield.strategies.secure_inputs import SecureInput

    if config.privacy.mode == "distributed":
        strategy = build_strategy(config, num_clients=num_sites)
        distributed = strategy.privacy.distributed()  # type: ignore[union-attr]
        transform = SecureInput("distributed", distributed.clip_norm, distributed)
    elif config.privacy.mode == "central":
        transform = SecureInput("clipped")
    else:
        transform = SecureInput("weighted")
    max_examples = config.network.max_examples if config.network else None
    return ClientTrust(keys=keys, transform=transform, max_examples=max_examples)


def factory_digest(path: Path) -> str:
    """``sha256:<hex>`` of a model factory's source, as a policy lists it."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()
