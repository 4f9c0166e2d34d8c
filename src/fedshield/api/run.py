"""Run a configured simulation end to end and write its run folder."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import tomli_w

from fedshield.api.backends import make_backend, resolve_backend
from fedshield.api.config import ExperimentConfig, load_config, parse_config
from fedshield.api.experiment import (
    Federation,
    UserClients,
    build_federation,
    build_strategy,
    client_sampler,
    secure_settings,
)
from fedshield.core import ServerState
from fedshield.errors import (
    CheckpointError,
    ConfigError,
    FedShieldError,
    PrivacyBudgetExceeded,
)
from fedshield.report.prefetch import PrefetchError, ReportPrefetch
from fedshield.simulation import (
    ProcessPoolBackend,
    RoundOptions,
    RunDirectory,
    run_rounds,
)
from fedshield.simulation.rundir import ATTACK, CONFIG, PARTITION, SUMMARY
from fedshield.simulation.secure import EXTRA_WORDS, Faults, SecureAggregation
from fedshield.simulation.state_store import new_client_states

if TYPE_CHECKING:
    from fedshield.privacy.distributed import DistributedDp

__all__ = ["config_fingerprint", "round_options", "simulate"]

logger = logging.getLogger(__name__)

StartCallback = Callable[[Federation, ServerState], None]
RoundCallback = Callable[[ServerState, Mapping[str, Any]], None]


def config_fingerprint(config: ExperimentConfig) -> str:
    """Hash of everything that determines the training (``run.rounds`` aside).

    A checkpoint records it; ``--resume`` refuses a checkpoint whose
    fingerprint differs, since the result would match neither run.
    """
    data = config.to_dict()
    data["run"].pop("rounds", None)
    text = json.dumps(data, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def data_fingerprint(federation: Federation, *, private: bool = False) -> str:
    """A hash of the federation's data: its clients, their sizes and labels.

    Stored in the checkpoint, so that ``--resume`` refuses data that changed
    under the same configuration (the user's files, or ``clients=``): the
    partition, and record-level DP's accounting, assumed the old data.

    With ``private`` only the partition's summary is hashed (the clients,
    their sizes and label counts, which ``partition.json`` holds already):
    under DP a hash of the records themselves would let whoever holds the
    checkpoint test a guess of any one record exactly, outside ε.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(federation.partition.to_json(), sort_keys=True).encode())
    if not private:
        for array in (federation.train.x, federation.train.y):
            digest.update(str(array.shape).encode())
            digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _summary(
    config: ExperimentConfig,
    federation: Federation | None,
    state: ServerState | None,
    records: list[dict[str, Any]],
    *,
    status: str,
    wall_seconds: float,
    error: str | None = None,
) -> dict[str, Any]:
    regression = config.model.task == "regression"
    headline = "rmse" if regression else "accuracy"
    last_eval: dict[str, Any] = next(
        (r for r in reversed(records) if r.get(headline) is not None), {}
    )
    num_clients = (
        len(federation.client_ids)
        if federation is not None
        else config.expected_num_clients
    )
    summary: dict[str, Any] = {
        "name": config.run.name,
        "status": status,
        "rounds": state.round_idx if state is not None else 0,
        "planned_rounds": config.run.rounds,
        "task": config.model.task,
        "accuracy": last_eval.get("accuracy"),
        "loss": last_eval.get("loss"),
        "wall_seconds": round(wall_seconds, 3),
        "dataset": (
            federation.dataset if federation is not None else config.data.dataset
        ),
        "partition": (
            federation.partition.method
            if federation is not None
            else config.data.partition_method
        ),
        "strategy": config.strategy.name,
        "model": config.model.kind,
        "num_clients": num_clients,
        # The sampling rule as resolved (a --set of clients_per_round
        # replaces the file's fraction, and the other way round).
        "fraction": config.strategy.fraction,
        "clients_per_round": (
            client_sampler(config).expected_count(num_clients)
            if num_clients is not None
            else config.strategy.clients_per_round
        ),
        "seed": config.run.seed,
    }
    if regression:
        summary["rmse"] = last_eval.get("rmse")
        summary["mae"] = last_eval.get("mae")
    if "roc_auc" in last_eval:
        summary["roc_auc"] = last_eval["roc_auc"]
    privacy = state.metadata.get("privacy") if state is not None else None
    if config.privacy.mode != "none":
        summary["privacy"] = _privacy_summary(config, privacy)
        summary["epsilon"] = summary["privacy"]["epsilon"]
        summary["delta"] = config.privacy.delta
    if federation is not None:
        summary["num_parameters"] = federation.model.spec.size
    if error:
        summary["error"] = error
    return summary


def _privacy_summary(config: ExperimentConfig, record: Any) -> dict[str, Any]:
    """What the privacy accountant says at the end of the run."""
    p = config.privacy
    record = record if isinstance(record, Mapping) else {}
    extra: dict[str, Any] = {}
    if p.mode == "distributed":
        extra = {
            # The distributed discrete Gaussian is always accounted by its RDP
            # bound (fedshield.privacy.accounting.ddg_rdp), whatever [privacy]
            # accountant says.
            "accountant": "rdp",
            "secure_rng": True,  # distributed mode always (see DistributedDp)
            "distributed_bits": p.distributed_bits,
            "rounding_beta": p.rounding_beta,
            "amplification_by_sampling": False,
        }
    elif p.mode == "local":
        # Local mode's noise is always secure (fedshield.privacy.local); its
        # client sample follows secure_rng but buys no amplification.
        extra = {"secure_rng": True, "amplification_by_sampling": False}
    epsilon = float(record.get("epsilon", 0.0))
    if not math.isfinite(epsilon):
        # Written as null (JSON has no Infinity); say why.
        extra["epsilon_unbounded"] = (
            f"the accountant gives no finite epsilon at delta = {p.delta:g}; "
            "raise delta or noise_multiplier"
        )
    return {
        "mode": p.mode,
        "epsilon": epsilon,
        "delta": p.delta,
        "accountant": p.accountant,
        "noise_multiplier": record.get("noise_multiplier", p.noise_multiplier),
        "clip_norm": record.get("clip_norm", p.clip_norm),
        "target_epsilon": p.target_epsilon,
        "sampling": p.sampling,
        "secure_rng": p.secure_rng,
        # Released by the run but not covered by epsilon (README, "What
        # leaves a DP run"): the seeded default, federated evaluation.
        "outside_guarantee": config.outside_guarantee,
        **extra,
    }


def simulate(
    config: ExperimentConfig | Mapping[str, Any] | str | Path,
    *,
    model_fn: Callable[[], Any] | None = None,
    clients: UserClients | None = None,
    test: tuple[Any, Any] | None = None,
    out: Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_start: StartCallback | None = None,
    on_round: RoundCallback | None = None,
    on_summary: Callable[[dict[str, Any]], None] | None = None,
    write_report: bool = True,
    prefetch_report: bool = False,
) -> tuple[dict[str, Any], Path]:
    """Run ``config`` and write its folder; return the summary and the folder.

    The folder (default ``runs/<run.name>``) receives ``config.toml``,
    ``partition.json``, ``metrics.jsonl``, ``checkpoint.npz``,
    ``summary.json`` and ``report.html``. A failed or interrupted run still
    writes its summary (``status`` says how it ended) and keeps its last
    checkpoint, so ``resume=True`` continues it. ``on_summary`` receives the
    summary however the run ends (also when it raises).

    Raises
    ------
    FedShieldError
        Any configuration, data, checkpoint or round failure (after the
        summary is written when the run had started).

    ``config`` is an :class:`ExperimentConfig`, a mapping of TOML sections
    (validated by the same schema, with the same messages) or the path of a
    TOML file. ``model_fn`` (a callable returning a ``torch.nn.Module``)
    replaces ``[model]``'s network, ``clients`` (``{client_id: (x, y)}``
    numpy arrays, each key a client) ``[data]``'s data set, with ``test =
    (x, y)`` the server's test set (default: ``data.test_fraction`` of the
    rows). Every other section applies as in ``fedshield simulate``:
    differential privacy, secure aggregation, robust rules, attacks.

    Notes
    -----
    With ``prefetch_report`` (what ``fedshield simulate`` does), the report
    is drawn by a helper process started now, which imports matplotlib on
    another core while this one imports PyTorch and trains (see
    :mod:`fedshield.report.prefetch`); if the helper fails, the report is
    written here as usual.
    """
    if isinstance(config, str | Path):
        config = load_config(Path(config))
    elif not isinstance(config, ExperimentConfig):
        sections = {
            k: dict(v) if isinstance(v, Mapping) else v for k, v in config.items()
        }
        if clients is not None:
            # The data is the clients given; a [data] naming files of its own
            # is refused by build_federation.
            from fedshield.api.process import IN_PYTHON

            data = sections.setdefault("data", {})
            if isinstance(data, dict) and "dataset" not in data:
                data.update(dataset="python", factory=IN_PYTHON)
        config = parse_config(sections)
    prefetch: ReportPrefetch | None = None
    if prefetch_report and write_report and config.run.report:
        prefetch = ReportPrefetch.start()
    try:
        return _simulate(
            config,
            model_fn=model_fn,
            clients=clients,
            test=test,
            out=out,
            resume=resume,
            overwrite=overwrite,
            on_start=on_start,
            on_round=on_round,
            on_summary=on_summary,
            write_report=write_report,
            prefetch=prefetch,
        )
    finally:
        if prefetch is not None:
            prefetch.close()


@dataclass(slots=True)
class _Run:
    """One simulation: what was built for it, where it writes, how it ended."""

    config: ExperimentConfig
    federation: Federation
    strategy: Any
    backend_name: str
    secure: SecureAggregation | None
    run_dir: RunDirectory
    data_print: str
    client_states: Any = None
    verify_keys: dict[str, bytes] | None = None
    secure_workers: int = 0
    final_state: ServerState | None = None
    status: str = "completed"
    error: str | None = None


@dataclass(frozen=True, slots=True)
class _Hooks:
    """What the caller asked to be told, and whether to write the report."""

    on_start: StartCallback | None
    on_round: RoundCallback | None
    on_summary: Callable[[dict[str, Any]], None] | None
    write_report: bool
    prefetch: ReportPrefetch | None
    python_model: bool


def _simulate(
    config: ExperimentConfig,
    *,
    model_fn: Callable[[], Any] | None,
    clients: UserClients | None,
    test: tuple[Any, Any] | None,
    out: Path | None,
    resume: bool,
    overwrite: bool,
    on_start: StartCallback | None,
    on_round: RoundCallback | None,
    on_summary: Callable[[dict[str, Any]], None] | None,
    write_report: bool,
    prefetch: ReportPrefetch | None,
) -> tuple[dict[str, Any], Path]:
    started = time.perf_counter()
    hooks = _Hooks(
        on_start, on_round, on_summary, write_report, prefetch, model_fn is not None
    )
    run_dir = RunDirectory(out if out is not None else Path("runs") / config.run.name)
    # Build (and so validate) everything before touching the folder.
    run = _build_run(config, run_dir, model_fn=model_fn, clients=clients, test=test)
    run_dir.prepare(resume=resume, overwrite=overwrite)
    state = _resumed_state(run) if resume else _fresh_state(run)
    _write_inputs(run, prefetch)
    if on_start is not None:
        on_start(run.federation, state)
    run.final_state = state
    try:
        _execute(run, state, on_round)
    finally:
        summary = _finish(run, hooks, started)
    return summary, run_dir.path


def _build_run(
    config: ExperimentConfig,
    run_dir: RunDirectory,
    *,
    model_fn: Callable[[], Any] | None,
    clients: UserClients | None,
    test: tuple[Any, Any] | None,
) -> _Run:
    """Build the federation, the strategy and the backend's name; check them all."""
    federation = build_federation(config, model_fn=model_fn, clients=clients, test=test)
    num_clients = len(federation.client_ids)
    mode = config.privacy.mode
    strategy = build_strategy(
        config,
        num_clients=num_clients,
        client_sizes=federation.train_sizes() if mode == "record" else None,
        federation=federation,
    )
    distributed: DistributedDp | None = None
    if mode != "none":  # DP-FedAvg: the budget fits a round
        from fedshield.strategies.dp import DpFedAvg

        assert isinstance(strategy, DpFedAvg)
        strategy.check(num_clients, dimension=federation.model.spec.size)
        if mode == "distributed":
            distributed = strategy.privacy.distributed()
    else:
        strategy.check(num_clients)
    backend_name = resolve_backend(
        config.run.backend,
        federation.model,
        privacy_mode=mode,
        timeout_s=config.run.timeout_s,
    )
    if mode == "record":
        from fedshield.models.dp_sgd import check_dp_sgd

        check_dp_sgd(federation.model)  # per-record gradients, before round 1
    secure = secure_settings(config)
    if secure is not None:
        # The round's clients: the expected sample (the threshold is a
        # fraction of whoever trained, so this checks the usual round).
        expected = client_sampler(config).expected_count(num_clients)
        secure.check(
            expected, federation.model.spec.size + EXTRA_WORDS, distributed=distributed
        )
        run_secure_workers = _secure_workers(config, backend_name, expected)
    # The bundled data sets are fixed (hash-checked or packaged): only the
    # user's data can change under the same configuration, so only it is
    # hashed whole (a fashion_mnist run would spend ~0.5 s hashing 200 MB).
    user_data = clients is not None or config.data.is_user_data
    data_print = data_fingerprint(federation, private=mode != "none" or not user_data)
    run = _Run(config, federation, strategy, backend_name, secure, run_dir, data_print)
    run.verify_keys = _give_clients_trust(run, distributed)
    if secure is not None:
        run.secure_workers = run_secure_workers
    return run


SECURE_POOL_MIN_CLIENTS = 32
"""From this many clients a round, on two or more cores, a secure round's
client halves are spread over a worker process (``[secagg] workers =
"auto"``)."""


def _secure_workers(config: ExperimentConfig, backend_name: str, expected: int) -> int:
    """Worker processes for the clients' halves of secure rounds (0: none).

    The clients' halves of SecAgg (key agreements, masks) run where the
    clients run: with an in-process backend, on one core. ``[secagg]
    workers`` (``auto``: one, from :data:`SECURE_POOL_MIN_CLIENTS` clients a
    round on two or more cores) hands every other client's half to that
    many worker processes after training
    (:class:`~fedshield.simulation.backends.offload.SecureOffload`).
    """
    workers = config.secagg.workers
    if config.secagg.protocol == "none" or backend_name not in (
        "sequential",
        "vectorised",
    ):
        return 0
    if workers == "auto":
        cores = os.cpu_count() or 1
        return 1 if cores >= 2 and expected >= SECURE_POOL_MIN_CLIENTS else 0
    return int(workers)


def _give_clients_trust(
    run: _Run, distributed: DistributedDp | None
) -> dict[str, bytes] | None:
    """Attach to the clients what they check the server's word against.

    Under secure aggregation each client knows, from its own configuration,
    what it is to do to its update (and, under distributed DP, with how much
    noise), and in malicious mode holds its long-term signing key from the
    simulation's key directory. The server's code gets only the directory's
    public table (returned).
    """
    from fedshield.simulation.secure_client import ClientTrust, KeyDirectory
    from fedshield.strategies.secure_inputs import SecureInput

    secure, config = run.secure, run.config
    client_fn = run.federation.client_fn
    if secure is None or not hasattr(client_fn, "trust"):
        return None
    if distributed is not None:
        transform = SecureInput("distributed", distributed.clip_norm, distributed)
    elif config.privacy.mode == "central":
        transform = SecureInput("clipped")
    else:
        transform = SecureInput("weighted")
    ids = run.federation.client_ids
    keys = KeyDirectory(ids) if secure.malicious else None
    client_fn.trust = ClientTrust(
        keys=keys, transform=transform, max_examples=run.federation.max_examples
    )
    return keys.public_table(ids) if keys is not None else None


def _resumed_state(run: _Run) -> ServerState:
    """The checkpoint's state, once it is known to belong to this run."""
    config, run_dir = run.config, run.run_dir
    state = run_dir.load_checkpoint()
    fingerprint = config_fingerprint(config)
    found = state.metadata.get("fingerprint")
    if found != fingerprint:
        raise CheckpointError(
            f"the checkpoint in {run_dir.path} was written by a different "
            f"configuration (fingerprint {found}, this one {fingerprint}); only "
            "run.rounds may change on resume"
        )
    found_data = state.metadata.get("data_fingerprint")
    if found_data is not None and found_data != run.data_print:
        # The config names files (or the data came from Python): they
        # changed. Record-level DP's accounting assumed the old sizes.
        raise CheckpointError(
            f"the checkpoint in {run_dir.path} was written for other data "
            f"(the clients, their sizes or labels differ: fingerprint "
            f"{found_data}, now {run.data_print}); resume with the same data"
        )
    if config.run.rounds < state.round_idx:
        raise ConfigError(
            f"run.rounds is {config.run.rounds} but the checkpoint in "
            f"{run_dir.path} has already completed {state.round_idx} rounds; "
            "resume needs run.rounds >= the rounds done"
        )
    run_dir.truncate_records(state.round_idx)
    if run.strategy.is_stateful:
        run.client_states = run_dir.load_client_states(
            config.run.client_state, state.round_idx
        )
    logger.info("resuming %s after round %d", run_dir.path, state.round_idx)
    return state


def _fresh_state(run: _Run) -> ServerState:
    """Round 0's state, checkpointed with the fingerprints a resume checks."""
    config, run_dir = run.config, run.run_dir
    if run.strategy.is_stateful:
        run.client_states = new_client_states(config.run.client_state, run_dir.path)
    params = run.federation.model.init_params(config.run.seed)
    state: ServerState = run.strategy.init(params).evolve(
        metadata={
            "fingerprint": config_fingerprint(config),
            "data_fingerprint": run.data_print,
        }
    )
    run_dir.write_json(PARTITION, run.federation.partition.to_json())
    run_dir.save_checkpoint(state, client_states=run.client_states)
    return state


def _write_inputs(run: _Run, prefetch: ReportPrefetch | None) -> None:
    """The run's configuration and attack, beside its records."""
    run.run_dir.write_text(CONFIG, tomli_w.dumps(run.config.to_dict()))
    if run.federation.attack is not None:
        run.run_dir.write_json(ATTACK, run.federation.attack.to_json())
    if prefetch is not None:
        try:
            prefetch.partition(run.run_dir.path)
        except PrefetchError as err:
            logger.debug("report helper unavailable: %s", err)


def round_options(config: ExperimentConfig, federation: Federation) -> RoundOptions:
    """How the rounds of ``config`` are carried out (``[run]``, ``[secagg]``...)."""
    attack = federation.attack
    return RoundOptions(
        federated_eval=config.runs_federated_eval,
        timeout_s=config.run.timeout_s,
        max_examples=federation.max_examples,
        secure=secure_settings(config),
        faults=Faults(config.faults.dropout) if config.faults.dropout else None,
        colluders=attack.malicious if attack else (),
        collude=_collusion(federation),
        on_failed_round=config.run.on_failed_round or "stop",
    )


def _execute(run: _Run, state: ServerState, on_round: RoundCallback | None) -> None:
    """Run the rounds; record in ``run`` how they ended (and re-raise)."""
    config, federation = run.config, run.federation

    def remember(new_state: ServerState, record: Mapping[str, Any]) -> None:
        run.final_state = new_state
        if on_round is not None:
            on_round(new_state, record)

    backend = make_backend(
        run.backend_name,
        workers=config.run.workers,
        ray_address=config.run.ray_address,
        torch_threads=config.run.torch_threads,
    )
    if run.secure_workers:
        from fedshield.simulation.backends.offload import SecureOffload

        pool = ProcessPoolBackend(run.secure_workers, torch_threads=1)
        auto = config.secagg.workers == "auto"
        least = SECURE_POOL_MIN_CLIENTS if auto else 2
        backend = SecureOffload(backend, pool, min_clients=least)
    import torch

    # Small models train fastest single-threaded; more threads mostly add
    # synchronisation (see BENCHMARKS.md). Restored when the run ends.
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.run.torch_threads)
    try:
        run.final_state = run_rounds(
            run.strategy,
            state,
            rounds=config.run.rounds,
            client_fn=federation.client_fn,
            client_ids=federation.client_ids,
            seed=config.run.seed,
            backend=backend,
            options=replace(
                round_options(config, federation), verify_keys=run.verify_keys
            ),
            evaluate_fn=federation.evaluate,
            eval_every=config.run.eval_every,
            run_dir=run.run_dir,
            on_round=remember,
            client_states=run.client_states,
        )
    except BaseException as err:
        _record_end(run, err)
    finally:
        backend.close()
        torch.set_num_threads(threads_before)


def _record_end(run: _Run, err: BaseException) -> None:
    """How the run ended on ``err``; re-raised unless it was a planned stop."""
    if isinstance(err, PrivacyBudgetExceeded):
        # A planned stop: the budget allows no further round.
        run.status, run.error = "budget_exhausted", str(err)
        logger.info("%s", err)
        return
    assert run.final_state is not None
    if isinstance(err, FedShieldError):
        run.status, run.error = "failed", str(err)
        spent = getattr(err, "state", None)
        if isinstance(spent, ServerState):  # a failed round's release, accounted
            run.final_state = spent
    elif isinstance(err, KeyboardInterrupt):
        run.status, run.error = "interrupted", "interrupted by the user"
        run.final_state = _charged_on_disk(run.run_dir, run.final_state)
    else:
        run.status = "failed"
        run.error = f"internal error: {type(err).__name__}: {err}"
        run.final_state = _charged_on_disk(run.run_dir, run.final_state)
    raise err


def _finish(run: _Run, hooks: _Hooks, started: float) -> dict[str, Any]:
    """Write the summary (and the report) however the run ended."""
    assert run.final_state is not None
    summary = _summary(
        run.config,
        run.federation,
        run.final_state,
        run.run_dir.read_metrics(),
        status=run.status,
        wall_seconds=time.perf_counter() - started,
        error=run.error,
    )
    summary["backend"] = run.backend_name
    if hooks.python_model:
        summary["model"] = "python"
    if run.federation.attack is not None:
        summary["attack"] = run.federation.attack.to_json()
    run.run_dir.write_json(SUMMARY, summary)
    if hooks.on_summary is not None:
        hooks.on_summary(summary)
    if hooks.write_report and run.config.run.report:
        _write_report(run.run_dir.path, hooks.prefetch)
    return summary


def _charged_on_disk(run_dir: RunDirectory, state: ServerState) -> ServerState:
    """The checkpoint's state when it charges the round that was cut short.

    A DP round is checkpointed charged before its clients train (see
    :func:`~fedshield.simulation.run_rounds`): a run stopped inside it has
    spent what that checkpoint says, which the summary reports.
    """
    try:
        saved = run_dir.load_checkpoint()
    except FedShieldError:
        return state
    if saved.round_idx != state.round_idx or "privacy" not in saved.metadata:
        return state
    return saved


def _write_report(path: Path, prefetch: ReportPrefetch | None) -> None:
    """Write ``report.html``: by the helper if there is one, else here."""
    if prefetch is not None:
        try:
            prefetch.write(path)
            return
        except PrefetchError as err:
            logger.debug("report helper failed (%s); writing the report here", err)
    from fedshield.report import write_report

    try:
        write_report(path)
    except Exception:  # the report must never hide the run's outcome
        logger.exception("could not write the report for %s", path)


def _collusion(federation: Federation) -> Any:
    """A colluding attack's rewrite of its clients' updates (None otherwise)."""
    attack = federation.attack
    if attack is None:
        return None
    from fedshield.models.attacks import ATTACKS, collude

    if ATTACKS.get(attack.spec.kind).collude is None:
        return None

    spec = attack.spec

    def rewrite(updates: list[Any], num_clients: int) -> list[Any]:
        return collude(updates, spec, num_clients=num_clients)

    return rewrite
