"""Local DP: the update is clipped and noised on the client, before it leaves."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedshield.core import FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models import TorchClient, TorchModel, build_module
from fedshield.privacy.local import LOCAL_CLIP, LOCAL_SECURE, LOCAL_SIGMA, privatize


def _delta(values: np.ndarray) -> Params:
    return Params({"w": values.astype(np.float32)})


def test_the_noise_has_std_sigma_times_clip() -> None:
    delta = _delta(np.zeros(100_000))
    options = {LOCAL_CLIP: 0.5, LOCAL_SIGMA: 3.0}
    out, extra = privatize(delta, options, np.random.default_rng(0))
    values = np.asarray(out.flat, np.float64)
    n = values.size
    assert abs(values.mean()) < 5 * 1.5 / math.sqrt(n)
    assert abs(values.std() - 1.5) < 5 * 1.5 / math.sqrt(2 * n)
    assert extra == {"local_dp/clipped": 0.0}


def test_a_large_update_is_clipped_before_the_noise() -> None:
    big = np.full(400, 10.0)
    options = {LOCAL_CLIP: 1.0, LOCAL_SIGMA: 1e-9}  # noise negligible
    out, extra = privatize(_delta(big), options, np.random.default_rng(0))
    assert out.norm() == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(out.flat, big / np.linalg.norm(big), rtol=1e-4)
    assert extra == {"local_dp/clipped": 1.0}


def test_seeded_noise_repeats_and_secure_noise_does_not() -> None:
    delta = _delta(np.ones(50))
    seeded = {LOCAL_CLIP: 1.0, LOCAL_SIGMA: 1.0}
    a, _ = privatize(delta, seeded, np.random.default_rng(4))
    b, _ = privatize(delta, seeded, np.random.default_rng(4))
    assert a == b
    secure = {**seeded, LOCAL_SECURE: True}
    c, _ = privatize(delta, secure, None)
    d, _ = privatize(delta, secure, None)
    assert c != d


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
        privatize(_delta(np.ones(3)), options, np.random.default_rng(0))


def test_the_client_sends_the_noised_update() -> None:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    model = TorchModel(
        lambda: build_module("logistic", input_shape=(64,), num_classes=10)
    )
    client = TorchClient("a", model, x_train=x[:200], y_train=y[:200])
    params = model.init_params(0)
    plain = client.fit(params, FitConfig(round_idx=0), np.random.default_rng(1))
    config = FitConfig(round_idx=0, options={LOCAL_CLIP: 0.1, LOCAL_SIGMA: 1.0})
    noised = client.fit(params, config, np.random.default_rng(1))
    # same training (same generator), then clipping to 0.1 and noise of std 0.1
    clipped = plain.delta * min(1.0, 0.1 / plain.delta.norm())
    gap = np.asarray((noised.delta - clipped).flat, np.float64)
    assert abs(gap.std() - 0.1) < 5 * 0.1 / math.sqrt(2 * gap.size)
    assert noised.metrics["local_dp/clipped"] == float(plain.delta.norm() > 0.1)


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
