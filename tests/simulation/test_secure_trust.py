"""A secure round's clients check the server's word, and the server checks theirs.

Each attack here is one a deviating server could mount on the round's setup
(a replacement input for an honest client, a key table of its own, weaker
distributed-DP noise). Each succeeds against a client that trusts the server
(no :class:`ClientTrust`) and is refused by one that checks; malformed
receipts are refused by the server and the round goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import numpy as np
import pytest

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.privacy.distributed import DistributedDp
from fedshield.simulation import FitReceipt, RoundOptions, StageView, run_round
from fedshield.simulation import rounds as rounds_module
from fedshield.simulation.secure import SecureAggregation, SecureSumRound
from fedshield.simulation.secure_client import (
    REJECTED_OWN_CHECK,
    ClientTrust,
    InputPlan,
    KeyDirectory,
    encode_input,
    plan_digest,
)
from fedshield.strategies import CountSampler, FedAvg
from fedshield.strategies.dp import DistributedSum, DpMean
from fedshield.strategies.secure_inputs import SecureInput

SPEC = Params({"w": np.zeros(6, np.float32)})
IDS = [str(i) for i in range(5)]


class Client:
    def __init__(self, cid: str, trust: Any = None, value: float = 0.1) -> None:
        self.client_id = cid
        self.trust = trust
        self.value = value
        self.colluding = False

    def fit(self, params: Params, config: FitConfig, rng: Any) -> Any:
        delta = np.full(SPEC.spec.size, self.value, np.float32)
        delta[0] += float(self.client_id)  # tells the clients apart
        return ClientUpdate(
            self.client_id, Params.from_flat(delta * 0.01, SPEC.spec), 10
        )

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, float]:
        return {"num_examples": 1.0}


def _run(
    clients: dict[str, Any],
    *,
    malicious: bool = False,
    verify_keys: Any = None,
    aggregator: Any = None,
    observers: tuple[Any, ...] = (),
) -> Any:
    strategy = FedAvg(sampler=CountSampler(len(clients)), aggregator=aggregator)
    secure = SecureAggregation(protocol="secagg", malicious=malicious)
    return run_round(
        strategy,
        strategy.init(SPEC),
        client_fn=clients.__getitem__,
        client_ids=sorted(clients),
        seed=1,
        options=RoundOptions(
            secure=secure, verify_keys=verify_keys, on_stage=observers
        ),
    )


@pytest.fixture
def tampering(monkeypatch):  # type: ignore[no-untyped-def]
    """Install a server that rewrites each client's setup with ``edit``."""

    def install(edit):  # type: ignore[no-untyped-def]
        class Tampering(SecureSumRound):
            def _next(self):  # type: ignore[no-untyped-def]
                if self._setups is not None:
                    self._setups = {
                        cid: edit(cid, setup) for cid, setup in self._setups.items()
                    }
                return super()._next()

        monkeypatch.setattr(rounds_module, "SecureSumRound", Tampering)

    return install


def _isolate_victim(cid: str, setup: Any) -> Any:
    # Everyone but the victim "0" sends zeros: the sum is the victim's update.
    if cid == "0":
        return setup
    return dataclasses.replace(setup, replacement=Params.zeros(SPEC.spec))


def test_honest_clients_refuse_a_replacement_input(tampering) -> None:  # type: ignore[no-untyped-def]
    tampering(_isolate_victim)
    result = _run({cid: Client(cid) for cid in IDS})
    assert result.metrics["secagg/aborted"] == 1.0  # nothing released
    refused = [f for f in result.failures if f.stage == "advertise_keys"]
    assert len(refused) == 4 and all(
        "only what it trained" in f.message for f in refused
    )


def test_the_replacement_attack_works_on_a_client_that_accepts_it(tampering) -> None:  # type: ignore[no-untyped-def]
    # The same server against clients that obey it (as colluders do): the
    # released mean is the victim's update over five, recovered exactly.
    tampering(_isolate_victim)
    clients = {cid: Client(cid) for cid in IDS}
    for client in clients.values():
        client.colluding = True
    result = _run(clients)
    assert result.metrics["secagg/aborted"] == 0.0
    victim = clients["0"].fit(SPEC, FitConfig(round_idx=0), None).delta.flat
    np.testing.assert_allclose(result.state.params.flat * 5, victim, atol=1e-5)


def _sybil_table(cid: str, setup: Any) -> Any:
    from fedshield.secagg import crypto

    forged = crypto.generate_signing_key().public
    return dataclasses.replace(setup, verify_keys={**setup.verify_keys, "1": forged})


def test_a_key_table_not_from_the_directory_is_refused(tampering) -> None:  # type: ignore[no-untyped-def]
    keys = KeyDirectory(IDS)
    trust = ClientTrust(keys=keys)
    tampering(_sybil_table)
    result = _run(
        {cid: Client(cid, trust) for cid in IDS},
        malicious=True,
        verify_keys=keys.public_table(IDS),
    )
    assert result.metrics["secagg/aborted"] == 1.0
    assert any("not its own" in f.message for f in result.failures)


def test_without_a_directory_the_servers_key_table_is_taken(tampering) -> None:  # type: ignore[no-untyped-def]
    # The receipts' keys: a client cannot tell a substituted key (the
    # protocol then runs with the server's table; this is the weakness the
    # directory closes, and over a network the certificates).
    tampering(_sybil_table)
    result = _run({cid: Client(cid) for cid in IDS}, malicious=True)
    assert not any("not its own" in f.message for f in result.failures)


def test_a_directory_signed_round_completes() -> None:
    keys = KeyDirectory(IDS)
    trust = ClientTrust(keys=keys)
    result = _run(
        {cid: Client(cid, trust) for cid in IDS},
        malicious=True,
        verify_keys=keys.public_table(IDS),
    )
    assert result.metrics["secagg/aborted"] == 0.0
    assert result.metrics["secagg/survivors"] == 5.0


def _with_plan(setup: Any, plan: Any) -> Any:
    # A consistent lie: the config binds the new plan (as a server would).
    config = dataclasses.replace(setup.config, context=plan_digest(plan))
    return dataclasses.replace(setup, plan=plan, config=config)


def _weak_noise(plan: Any) -> Any:
    return dataclasses.replace(plan, ddp=dataclasses.replace(plan.ddp, noise_std=1e-6))


@pytest.fixture
def lying_plan(monkeypatch):  # type: ignore[no-untyped-def]
    """Install a server that announces ``edit(plan)`` to every client (bound)."""

    def install(edit):  # type: ignore[no-untyped-def]
        class Lying(SecureSumRound):
            def _configure(self, n):  # type: ignore[no-untyped-def]
                config, plan = super()._configure(n)
                return config, edit(plan)

        monkeypatch.setattr(rounds_module, "SecureSumRound", Lying)

    return install


def _unbound_plan(cid: str, setup: Any) -> Any:
    # The plan changed without the config binding it.
    plan = dataclasses.replace(setup.plan, max_examples=2**40)
    return dataclasses.replace(setup, plan=plan)


def _isolating_plans(cid: str, setup: Any) -> Any:
    # Every client but the victim weighs its update ~0 (each plan bound).
    if cid == "0":
        return setup
    return _with_plan(setup, dataclasses.replace(setup.plan, max_examples=2**40))


def test_a_plan_the_config_does_not_bind_is_refused(tampering) -> None:  # type: ignore[no-untyped-def]
    tampering(_unbound_plan)
    result = _run({cid: Client(cid) for cid in IDS})
    assert result.metrics["secagg/aborted"] == 1.0
    assert all("does not bind" in f.message for f in result.failures)


def test_different_plans_for_different_clients_abort_a_malicious_round(  # type: ignore[no-untyped-def]
    tampering,
) -> None:
    keys = KeyDirectory(IDS)
    tampering(_isolating_plans)
    result = _run(
        {cid: Client(cid, ClientTrust(keys=keys)) for cid in IDS},
        malicious=True,
        verify_keys=keys.public_table(IDS),
    )
    # The victim's signature binds another plan than the others': no round.
    assert result.metrics["secagg/aborted"] == 1.0
    assert np.all(result.state.params.flat == 0)


def test_a_downgrade_to_semi_honest_is_refused(tampering) -> None:  # type: ignore[no-untyped-def]
    keys = KeyDirectory(IDS)

    def downgrade(cid: str, setup: Any) -> Any:
        config = dataclasses.replace(setup.config, malicious=False)
        return dataclasses.replace(setup, config=config, verify_keys={})

    tampering(downgrade)
    result = _run(
        {cid: Client(cid, ClientTrust(keys=keys)) for cid in IDS},
        malicious=True,
        verify_keys=keys.public_table(IDS),
    )
    assert result.metrics["secagg/aborted"] == 1.0
    assert any("malicious-mode rounds only" in f.message for f in result.failures)


def test_a_client_joins_a_rounds_secure_sum_once() -> None:
    trust = ClientTrust()
    clients = {cid: Client(cid, trust) for cid in IDS}
    first = _run(clients)
    assert first.metrics["secagg/aborted"] == 0.0
    # The same round again over the same updates (a server that would
    # subtract two sums): every client refuses.
    again = _run(clients)
    assert again.metrics["secagg/aborted"] == 1.0
    assert all("already joined" in f.message for f in again.failures)


@pytest.mark.parametrize("checks", [True, False])
def test_weaker_distributed_noise_is_refused_by_a_client_that_checks(  # type: ignore[no-untyped-def]
    lying_plan, checks
) -> None:
    mechanism = DistributedDp(clip_norm=1.0, noise_multiplier=1.0, secure_rng=False)
    trust = ClientTrust(transform=SecureInput("distributed", 1.0, mechanism))
    lying_plan(_weak_noise)
    result = _run(
        {cid: Client(cid, trust if checks else None) for cid in IDS},
        aggregator=DistributedSum(mechanism),
    )
    refused = any(
        "differs from this client's own" in f.message for f in result.failures
    )
    assert refused is checks
    assert (result.metrics["secagg/aborted"] == 1.0) is checks


@pytest.mark.parametrize("count", ["7", None, float("nan"), 2.5, True, 0, 10**12])
def test_a_receipt_with_a_bad_example_count_is_rejected(monkeypatch, count) -> None:  # type: ignore[no-untyped-def]
    from fedshield.simulation import secure_client

    original = secure_client.hold_update

    def lying(session, update, hold, spec):  # type: ignore[no-untyped-def]
        receipt = original(session, update, hold, spec)
        if session.client_id == "4":
            return dataclasses.replace(receipt, num_examples=count)
        return receipt

    monkeypatch.setattr("fedshield.simulation.protocol.hold_update", lying)
    strategy = FedAvg(sampler=CountSampler(5))
    clients = {cid: Client(cid) for cid in IDS}
    result = run_round(
        strategy,
        strategy.init(SPEC),
        client_fn=clients.__getitem__,
        client_ids=IDS,
        seed=1,
        options=RoundOptions(secure=SecureAggregation(), max_examples=100),
    )
    assert result.completed
    assert result.metrics["rejected_updates"] == 1
    assert result.metrics["secagg/survivors"] == 4.0


def test_a_refused_update_leaves_no_values_in_its_receipt() -> None:
    views: list[StageView] = []

    class Broken(Client):
        def fit(self, params, config, rng):  # type: ignore[no-untyped-def]
            update = super().fit(params, config, rng)
            flat = update.delta.flat.copy()
            flat[1] = np.nan
            return ClientUpdate(self.client_id, Params.from_flat(flat, SPEC.spec), 4321)

    clients: dict[str, Any] = {cid: Client(cid) for cid in IDS}
    clients["2"] = Broken("2")
    result = _run(clients, observers=(views.append,))
    receipt = next(
        r.value
        for v in views
        if v.stage == "fit"
        for r in v.replies
        if r.client_id == "2"
    )
    assert isinstance(receipt, FitReceipt)
    assert receipt.rejected == REJECTED_OWN_CHECK and receipt.num_examples == 1
    assert (
        "4321" not in str(result.failures) and "nan" not in str(result.failures).lower()
    )


def test_central_dp_clients_clip_below_the_norm_the_encoding_can_round_up() -> None:
    # A coarse encoding: the rounded update's norm must still be <= C.
    d, bits, clip = 20_000, 8, 1.0
    from fedshield.secagg.encoding import choose_encoding

    enc = choose_encoding(5, clip, precision_bits=bits)
    plan = InputPlan(
        "clipped",
        d,
        d + 6,
        enc_clip=enc.clip,
        enc_scale=enc.scale,
        modulus_bits=enc.modulus_bits,
        bound=clip,
    )
    rng = np.random.default_rng(0)
    spec = Params({"w": np.zeros(d, np.float32)}).spec
    worst = 0.0
    for _ in range(5):
        delta = rng.standard_normal(d).astype(np.float32)
        update = ClientUpdate("a", Params.from_flat(delta, spec), 1)
        words = encode_input(update, plan, rng)[:d].astype(np.int64)
        words[words >= 1 << (enc.modulus_bits - 1)] -= 1 << enc.modulus_bits
        worst = max(worst, float(np.linalg.norm(words / enc.scale)))
    assert worst <= clip


def test_a_dp_rule_given_as_the_strategys_aggregator_is_released(caplog) -> None:  # type: ignore[no-untyped-def]
    # The rule the clients obey and the rule that releases are the same one.
    caplog.set_level(logging.WARNING)
    rule = DpMean(clip_norm=1.0, noise_std=0.0, denominator=5.0)
    result = _run({cid: Client(cid) for cid in IDS}, aggregator=rule)
    assert result.metrics["secagg/aborted"] == 0.0
    assert "nothing released" not in caplog.text
    assert np.any(result.state.params.flat != 0)


@pytest.mark.parametrize("kind", ["ipm", "alie"])
def test_colluders_take_part_in_a_secure_round(tmp_path, kind) -> None:  # type: ignore[no-untyped-def]
    # The coalition's rewrite reaches the secure sum as it reaches the plain
    # mean: same survivors, nearly the same model (SecAgg only quantises).
    import fedshield as fs

    def config(secagg: bool) -> dict[str, Any]:
        raw: dict[str, Any] = {
            "run": {"name": "c", "rounds": 3, "seed": 2, "report": False},
            "data": {"dataset": "digits", "partition": "iid", "num_clients": 8},
            "model": {"kind": "logistic"},
            "strategy": {"clients_per_round": 8, "min_clients": 6},
            "attack": {"kind": kind, "fraction": 0.25},
        }
        if secagg:
            raw["secagg"] = {"protocol": "secagg", "clip": 4.0}
        return raw

    plain, _ = fs.simulate(config(False), out=tmp_path / "p", write_report=False)
    secure, path = fs.simulate(config(True), out=tmp_path / "s", write_report=False)
    import json

    rows = [json.loads(line) for line in (path / "metrics.jsonl").open()]
    assert all(r["secagg/survivors"] == 8.0 for r in rows), rows
    assert secure["accuracy"] == pytest.approx(plain["accuracy"], abs=0.03)


def _digits(malicious: bool, privacy: dict[str, Any] | None = None) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "run": {"name": "t", "rounds": 2, "seed": 4, "report": False},
        "data": {"dataset": "digits", "partition": "iid", "num_clients": 6},
        "model": {"kind": "logistic"},
        "strategy": {"clients_per_round": 6, "min_clients": 4},
        "secagg": {"protocol": "secagg", "malicious": malicious},
    }
    if privacy is not None:
        raw["privacy"] = privacy
    return raw


def _rows(path: Any, name: str) -> list[dict[str, Any]]:
    import json

    file = path / name
    return [json.loads(line) for line in file.open()] if file.exists() else []


def test_simulate_gives_its_clients_a_key_directory(tmp_path, tampering) -> None:  # type: ignore[no-untyped-def]
    import fedshield as fs

    _, honest = fs.simulate(_digits(True), out=tmp_path / "h", write_report=False)
    assert all(r["secagg/aborted"] == 0.0 for r in _rows(honest, "metrics.jsonl"))
    tampering(_sybil_table)
    _, path = fs.simulate(_digits(True), out=tmp_path / "t", write_report=False)
    assert all(r["secagg/aborted"] == 1.0 for r in _rows(path, "metrics.jsonl"))
    assert any("not its own" in f["message"] for f in _rows(path, "failures.jsonl"))


def test_simulate_gives_its_clients_their_own_noise(tmp_path, lying_plan) -> None:  # type: ignore[no-untyped-def]
    import fedshield as fs

    privacy = {"mode": "distributed", "noise_multiplier": 1.0, "clip_norm": 1.0}
    config = _digits(False, privacy)
    _, honest = fs.simulate(config, out=tmp_path / "h", write_report=False)
    assert _rows(honest, "failures.jsonl") == []
    lying_plan(_weak_noise)
    _, path = fs.simulate(config, out=tmp_path / "t", write_report=False)
    failures = _rows(path, "failures.jsonl")
    assert failures and all("differs" in f["message"] for f in failures)


def test_a_refused_protocol_reply_is_recorded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Client 3 answers share_keys with junk bytes: the protocol refuses it,
    # the round records a rejected failure and goes on without it.
    from fedshield.simulation import secure_client

    original = secure_client.run_secure_stage

    def junk(session, stage, message, rng):  # type: ignore[no-untyped-def]
        reply = original(session, stage, message, rng)
        if session.client_id == "3" and stage == "share_keys":
            return b"\x00junk"
        return reply

    monkeypatch.setattr("fedshield.simulation.protocol.run_secure_stage", junk)
    result = _run({cid: Client(cid) for cid in IDS})
    rejected = [f for f in result.failures if f.client_id == "3"]
    assert rejected and rejected[0].kind == "rejected"
    assert result.metrics["secagg/survivors"] == 4.0
