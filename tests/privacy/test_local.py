"""Local DP: the update is clipped and noised on the client, before it leaves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedshield.core import ClientUpdate, FitConfig, Params, validate_update
from fedshield.errors import ConfigError
from fedshield.models import TorchClient, TorchModel, build_module
from fedshield.privacy import noise as noise_module
from fedshield.privacy.local import (
    LOCAL_CLIP,
    LOCAL_NUM_EXAMPLES,
    LOCAL_SIGMA,
    privatize,
)
from fedshield.strategies import FedAvg
from fedshield.strategies.dp import DpFedAvg, PoissonSampler, PrivacySettings


def _delta(values: np.ndarray) -> Params:
    return Params({"w": values.astype(np.float32)})


def test_the_noise_has_std_sigma_times_clip() -> None:
    delta = _delta(np.zeros(100_000))
    options = {LOCAL_CLIP: 0.5, LOCAL_SIGMA: 3.0}
    values = np.asarray(privatize(delta, options).flat, np.float64)
    n = values.size
    assert abs(values.mean()) < 5 * 1.5 / math.sqrt(n)
    assert abs(values.std() - 1.5) < 5 * 1.5 / math.sqrt(2 * n)


def test_a_large_update_is_clipped_before_the_noise() -> None:
    big = np.full(400, 10.0)
    options = {LOCAL_CLIP: 1.0, LOCAL_SIGMA: 1e-9}  # noise negligible
    out = privatize(_delta(big), options)
    assert out.norm() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(out.flat, big / np.linalg.norm(big), rtol=1e-4)


def test_the_noise_is_always_secure(monkeypatch: pytest.MonkeyPatch) -> None:
    # The server holds the simulation's seed: the noise must not come from
    # any seeded generator, so it comes from the OS-keyed keystream.
    keys: list[int] = []
    real = noise_module.os.urandom

    def counting(n: int) -> bytes:
        keys.append(n)
        return real(n)

    monkeypatch.setattr(noise_module.os, "urandom", counting)
    delta = _delta(np.ones(50))
    options = {LOCAL_CLIP: 1.0, LOCAL_SIGMA: 1.0}
    assert privatize(delta, options) != privatize(delta, options)
    assert keys == [32, 16, 32, 16]  # one fresh AES key and counter per update


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_update_is_sent_as_a_noised_zero(bad: float) -> None:
    # Whether local training diverged depends on the data: it must not show
    # (an all-NaN vector, which the server rejects by name).
    values = np.zeros(20_000)
    values[:3] = (bad, 1.0, -2.0)
    out = privatize(_delta(values), {LOCAL_CLIP: 0.5, LOCAL_SIGMA: 2.0})
    sent = np.asarray(out.flat, np.float64)
    assert np.isfinite(sent).all()
    n = sent.size
    assert abs(sent.mean()) < 5 * 1.0 / math.sqrt(n)
    assert abs(sent.std() - 1.0) < 5 * 1.0 / math.sqrt(2 * n)
    validate_update(ClientUpdate("a", out, LOCAL_NUM_EXAMPLES), out.spec)


@pytest.mark.parametrize(
    "options",
    [
        {LOCAL_CLIP: 0.0, LOCAL_SIGMA: 1.0},
        {LOCAL_CLIP: 1.0, LOCAL_SIGMA: -1.0},
        {LOCAL_CLIP: "1", LOCAL_SIGMA: 1.0},
        {LOCAL_CLIP: 1.0, LOCAL_SIGMA: float("nan")},
    ],
)
def test_bad_options_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(ConfigError, match="local DP option"):
        privatize(_delta(np.ones(3)), options)


@pytest.fixture(scope="module")
def client() -> TorchClient:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = TorchModel(
        lambda: build_module("logistic", input_shape=(64,), num_classes=10)
    )
    return TorchClient("a", model, x_train=x[:200], y_train=y[:200])


def test_the_client_sends_the_noised_update(client: TorchClient) -> None:
    params = client.model.init_params(0)
    plain = client.fit(params, FitConfig(round_idx=0), np.random.default_rng(1))
    config = FitConfig(round_idx=0, options={LOCAL_CLIP: 0.1, LOCAL_SIGMA: 1.0})
    noised = client.fit(params, config, np.random.default_rng(1))
    # same training (same generator), then clipping to 0.1 and noise of std 0.1
    clipped = plain.delta * min(1.0, 0.1 / plain.delta.norm())
    gap = np.asarray((noised.delta - clipped).flat, np.float64)
    assert abs(gap.std() - 0.1) < 5 * 0.1 / math.sqrt(2 * gap.size)


def test_the_same_seed_gives_different_local_noise(client: TorchClient) -> None:
    # Two runs with the same seed train alike, but their noise differs: the
    # server, which knows the seed, cannot subtract it.
    params = client.model.init_params(0)
    config = FitConfig(round_idx=0, options={LOCAL_CLIP: 0.1, LOCAL_SIGMA: 1.0})
    first = client.fit(params, config, np.random.default_rng(1))
    again = client.fit(params, config, np.random.default_rng(1))
    gap = np.asarray((first.delta - again.delta).flat, np.float64)
    # The difference of two independent noises of std 0.1 has std 0.1 * sqrt 2.
    assert abs(gap.std() - 0.1 * math.sqrt(2)) < 0.1 * 5 / math.sqrt(gap.size)


def test_the_server_sees_no_clip_bit_no_count_and_no_metrics(
    client: TorchClient,
) -> None:
    params = client.model.init_params(0)
    plain = client.fit(params, FitConfig(round_idx=0), np.random.default_rng(1))
    assert plain.num_examples == 200 and set(plain.metrics) == {"loss", "accuracy"}
    for clip in (1e-3, 1e3):  # clipped and not clipped look alike
        config = FitConfig(round_idx=0, options={LOCAL_CLIP: clip, LOCAL_SIGMA: 1.0})
        update = client.fit(params, config, np.random.default_rng(1))
        assert update.num_examples == LOCAL_NUM_EXAMPLES == 1
        assert dict(update.metrics) == {}
        assert update.extras == {} and update.state == {}


def test_a_client_whose_training_diverges_sends_a_valid_update(
    client: TorchClient,
) -> None:
    params = client.model.init_params(0)
    diverging = FitConfig(round_idx=0, lr=1e38, epochs=3)
    plain = client.fit(params, diverging, np.random.default_rng(1))
    assert not plain.delta.is_finite()  # what training alone gives
    config = FitConfig(
        round_idx=0, lr=1e38, epochs=3, options={LOCAL_CLIP: 0.1, LOCAL_SIGMA: 1.0}
    )
    update = client.fit(params, config, np.random.default_rng(1))
    validate_update(update, params.spec)  # accepted, like any other
    assert update.num_examples == LOCAL_NUM_EXAMPLES and dict(update.metrics) == {}


def test_the_server_weights_local_updates_equally() -> None:
    strategy = DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(mode="local", clip_norm=1.0, noise_multiplier=1.0),
        sampler=PoissonSampler(0.5),
        num_clients=10,
    )
    delta = _delta(np.ones(3))
    small = ClientUpdate("a", delta, num_examples=3)
    large = ClientUpdate("b", delta, num_examples=3000)
    assert strategy.weight(small) == strategy.weight(large) == 1.0


def test_a_run_without_privacy_never_imports_the_accountant() -> None:
    # dp-accounting costs about a second of start-up: only [privacy] loads it.
    import subprocess
    import sys

    code = (
        "import sys, fedshield.cli.main, fedshield.api.run, fedshield.models, "
        "fedshield.strategies, fedshield.simulation.backends.vectorised; "
        "print('dp_accounting' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_two_local_runs_with_one_seed_differ_and_say_the_noise_was_secure(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    from fedshield.api import parse_config, simulate
    from fedshield.simulation import RunDirectory

    config = parse_config(
        {
            "run": {"name": "local", "rounds": 1, "seed": 3},
            "data": {"dataset": "digits", "num_clients": 20, "min_samples": 1},
            "model": {"kind": "logistic"},
            "strategy": {"clients_per_round": 5},
            "privacy": {
                "mode": "local",
                "clip_norm": 0.5,
                "noise_multiplier": 1.0,
                "accountant": "rdp",
                "delta": 1e-3,
            },
        }
    )
    finals = []
    for name in ("a", "b"):
        summary, run_dir = simulate(config, out=tmp_path / name, write_report=False)
        assert summary["privacy"]["secure_rng"] is True  # though not asked for
        finals.append(RunDirectory(run_dir).load_checkpoint().params)
    # Same seed, same clients, same training: only the noise differs.
    assert finals[0] != finals[1]
