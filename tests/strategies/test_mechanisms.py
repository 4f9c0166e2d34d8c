"""DP modes are mechanism objects, named in a registry (issue 13).

``PrivacySettings(mode=...)`` takes a registered name or a
:class:`DpMechanism`; either way ``DpFedAvg`` delegates every mode-dependent
step to the mechanism, and what it writes (the privacy record of the
checkpoint, ``.mode``) is the same as with the name.
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import numpy as np
import pytest

from fedshield.core import ClientUpdate, Params, ServerState
from fedshield.errors import ConfigError
from fedshield.strategies import CountSampler, FedAvg
from fedshield.strategies.dp import (
    MECHANISMS,
    CentralMechanism,
    DistributedMechanism,
    DistributedSum,
    DpFedAvg,
    DpMean,
    DpMechanism,
    LocalMechanism,
    PoissonSampler,
    PrivacySettings,
    RecordMechanism,
    mechanism_for,
)

N = 30
SIZES = {str(i): 100 + 10 * i for i in range(N)}
CLASSES = {
    "central": CentralMechanism,
    "record": RecordMechanism,
    "local": LocalMechanism,
    "distributed": DistributedMechanism,
}
# Each mode's own fields of the privacy record, after the common ones.
RECORD_KEYS = {
    "central": ["ledger"],
    "record": ["participation", "client_epsilon"],
    "local": ["participation"],
    "distributed": ["participation", "events"],
}
COMMON_KEYS = [
    "mode",
    "accountant",
    "delta",
    "noise_multiplier",
    "epsilon",
    "rounds",
    "clip_norm",
]


def _strategy(mode: str | DpMechanism, **privacy: Any) -> DpFedAvg:
    name = mode if isinstance(mode, str) else mode.name
    settings: dict[str, Any] = {
        "clip_norm": 1.0,
        "noise_multiplier": 1.1,
        "delta": 1e-4 if name == "record" else 1e-3,
        "accountant": "rdp" if name in ("distributed", "local") else "pld",
    }
    if name == "central":
        settings.update(target_quantile=0.5, clipped_count_stddev=3.0)
    if name == "distributed":
        settings.update(distributed_bits=16, noise_multiplier=2.0)
    settings.update(privacy)
    return DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(mode=mode, **settings),
        sampler=CountSampler(8) if name == "distributed" else PoissonSampler(0.3),
        num_clients=N,
        client_sizes=SIZES if name == "record" else None,
        threshold_for=(lambda n: math.ceil(2 * n / 3))
        if name == "distributed"
        else None,
    )


def _update(cid: str, values: np.ndarray) -> ClientUpdate:
    return ClientUpdate(
        client_id=cid,
        delta=Params({"w": values.astype(np.float32)}),
        num_examples=7,
        metrics={},
    )


def _rounds(strategy: DpFedAvg, rounds: int = 3, dim: int = 20) -> list[Any]:
    """What a few rounds with a fixed seed produce, every step recorded."""
    clients = [str(i) for i in range(strategy.num_clients)]
    state: ServerState = strategy.init(Params({"w": np.zeros(dim, np.float32)}))
    strategy.check(len(clients), dimension=dim)
    rng = np.random.default_rng(7)
    seen: list[Any] = [json.dumps(state.metadata["privacy"])]
    for _ in range(rounds):
        plan = strategy.configure(state, clients, rng=rng)
        charged = strategy.charge_before(state, plan)
        rule = plan.aggregator or strategy.aggregator
        updates = [_update(c, rng.normal(size=dim) * 0.2) for c in plan.clients]
        if isinstance(rule, DistributedSum):
            total = sum((u.delta.flat for u in updates), np.zeros(dim))
            assert strategy.threshold_for is not None
            p = rule.distributed.parameters(
                dimension=dim,
                num_clients=len(updates),
                threshold=strategy.threshold_for(len(updates)),
            )
            measured = {
                "secagg/survivors": len(updates),
                "ddp/noise_std": p.noise_std,
                "ddp/l2_sensitivity": p.l2_sensitivity,
                "ddp/padded_dimension": p.padded,
            }
            aggregate = rule.release(
                total,
                centred_unclipped=0.0,
                count=len(updates),
                spec=state.params.spec,
                rng=rng,
                measurements=measured,
            )
        else:
            acc = rule.begin(state.params.spec, rng=rng)
            for u in updates:
                acc.add(u, strategy.weight(u))
            aggregate = acc.result()
        state = strategy.apply(state, aggregate, plan=plan, rng=rng)
        seen += [
            plan.clients,
            plan.min_clients,
            repr(plan.aggregator),
            sorted(plan.fit_config.options.items()),
            json.dumps(charged.metadata["privacy"]),
            np.asarray(aggregate.delta.flat).tobytes(),
            sorted(strategy.released(aggregate.measurements).items()),
            np.asarray(state.params.flat).tobytes(),
            json.dumps(state.metadata["privacy"]),
        ]
    seen.append(rng.random())
    return seen


def test_the_registry_names_each_mode_with_a_description() -> None:
    assert MECHANISMS.names() == ("central", "record", "local", "distributed")
    for name, cls in CLASSES.items():
        assert MECHANISMS.get(name) is cls
        assert cls.name == name
        assert MECHANISMS.descriptions()[name]
    assert MECHANISMS.names(tag="client_side") == ("record", "local", "distributed")
    assert MECHANISMS.names(tag="needs_secagg") == ("distributed",)
    assert MECHANISMS.names(tag="amplified") == ("central",)


@pytest.mark.parametrize("name", list(CLASSES))
def test_each_registered_mechanism_builds_its_strategy(name: str) -> None:
    strategy = _strategy(name)
    assert isinstance(strategy.mechanism, CLASSES[name])
    assert strategy.mechanism is strategy.privacy.mechanism
    # .mode reads back the string, whatever the strategy was given.
    assert strategy.privacy.mode == name
    assert _strategy(CLASSES[name]()).privacy.mode == name
    state = strategy.init(Params({"w": np.zeros(3, np.float32)}))
    record = state.metadata["privacy"]
    assert list(record) == COMMON_KEYS + RECORD_KEYS[name]
    assert record["mode"] == name
    rule = strategy.aggregator
    if name == "central":
        assert isinstance(rule, DpMean)
    elif name == "distributed":
        assert isinstance(rule, DistributedSum)
    else:
        assert rule is strategy.base.aggregator


@pytest.mark.parametrize("name", list(CLASSES))
def test_the_name_and_the_object_give_the_same_strategy_and_rounds(
    name: str,
) -> None:
    by_name = _strategy(name)
    by_object = _strategy(CLASSES[name]())
    assert by_name.privacy == by_object.privacy
    assert by_name.sampler == by_object.sampler
    assert _rounds(by_name) == _rounds(by_object)


def test_an_unknown_mode_is_refused_with_the_registered_names() -> None:
    with pytest.raises(ConfigError) as err:
        PrivacySettings(mode="centrl", clip_norm=1.0, noise_multiplier=1.0)
    message = str(err.value)
    assert "unknown privacy mode 'centrl'" in message
    assert "did you mean 'central'?" in message
    assert "choose one of: central, record, local, distributed" in message
    with pytest.raises(ConfigError, match="choose one of"):
        mechanism_for("none")


def test_a_mechanism_object_is_used_as_it_is() -> None:
    local = LocalMechanism()
    assert mechanism_for(local) is local
    assert mechanism_for("local") == local


class _QuietLocal(LocalMechanism):
    """An unregistered mode: local DP that releases no metrics at all."""

    name: ClassVar[str] = "quiet-local"

    def released(self, metrics: Any) -> dict[str, Any]:
        return {}


def test_an_unregistered_mechanism_composes_with_the_strategy() -> None:
    quiet = _strategy(_QuietLocal(), accountant="rdp")
    loud = _strategy("local")
    assert quiet.privacy.mode == "quiet-local"
    assert quiet.released({"dp/x": 1.0, "accuracy": 0.5}) == {}
    assert loud.released({"dp/x": 1.0, "train_loss": 0.5}) == {"dp/x": 1.0}
    # Everything else is local mode's, to the bit (the record names its mode).
    renamed = [
        x.replace('"mode": "quiet-local"', '"mode": "local"')
        if isinstance(x, str)
        else x
        for x in _rounds(quiet)
    ]
    assert renamed == _rounds(loud)


def test_each_mechanism_says_what_its_summary_adds() -> None:
    settings = PrivacySettings(mode="distributed", clip_norm=1.0, noise_multiplier=1.0)
    assert settings.mechanism.summary(settings) == {
        "accountant": "rdp",
        "secure_rng": True,
        "distributed_bits": 20,
        "rounding_beta": settings.rounding_beta,
        "amplification_by_sampling": False,
    }
    local = PrivacySettings(mode="local", clip_norm=1.0, noise_multiplier=1.0)
    assert local.mechanism.summary(local) == {
        "secure_rng": True,
        "amplification_by_sampling": False,
    }
    for name in ("central", "record"):
        s = PrivacySettings(mode=name, clip_norm=1.0, noise_multiplier=1.0)
        assert s.mechanism.summary(s) == {}
