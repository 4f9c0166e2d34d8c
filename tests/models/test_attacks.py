"""Each attack changes the update the way it claims."""

from __future__ import annotations

import numpy as np
import pytest

from fedshield.core import FitConfig
from fedshield.errors import ConfigError
from fedshield.models import TorchClient, TorchModel, build_module
from fedshield.models.attacks import (
    AttackSpec,
    MaliciousClient,
    add_trigger,
    alie_z,
    choose_malicious,
    collude,
)


@pytest.fixture
def client(digits: tuple[np.ndarray, np.ndarray]) -> TorchClient:
    x, y = digits
    model = TorchModel(
        lambda: build_module("logistic", input_shape=(64,), num_classes=10)
    )
    return TorchClient("m", model, x_train=x[:200], y_train=y[:200])


def _attacked(client: TorchClient, kind: str, **extra: float) -> MaliciousClient:
    return MaliciousClient(
        client,
        AttackSpec(kind=kind, **extra),  # type: ignore[arg-type]
        num_classes=10,
        boost=5.0,
        max_examples=999,
    )


def _fit(c: object, seed: int = 0) -> object:
    model = c.model  # type: ignore[attr-defined]
    params = model.init_params(0)
    return c.fit(params, FitConfig(round_idx=0, lr=0.1), np.random.default_rng(seed))  # type: ignore[attr-defined]


def test_sign_flip_sends_minus_scale_times_the_honest_update(
    client: TorchClient,
) -> None:
    honest = _fit(client)
    flipped = _fit(_attacked(client, "sign_flip", scale=3.0))
    np.testing.assert_allclose(flipped.delta.flat, -3.0 * honest.delta.flat, rtol=1e-6)  # type: ignore[attr-defined]


def test_gaussian_sends_noise_of_the_given_std(client: TorchClient) -> None:
    update = _fit(_attacked(client, "gaussian", std=2.0))
    values = np.asarray(update.delta.flat)  # type: ignore[attr-defined]
    assert abs(values.std() - 2.0) < 5 * 2.0 / np.sqrt(2 * values.size)


def test_free_rider_sends_nothing_and_claims_the_most(client: TorchClient) -> None:
    update = _fit(_attacked(client, "free_rider"))
    assert not np.any(update.delta.flat)  # type: ignore[attr-defined]
    assert update.num_examples == 999  # type: ignore[attr-defined]


def test_label_flip_trains_on_flipped_labels(client: TorchClient) -> None:
    x, y = client.train_data
    flipped = TorchClient("m", client.model, x_train=x, y_train=9 - y)
    np.testing.assert_allclose(
        _fit(_attacked(client, "label_flip")).delta.flat,  # type: ignore[attr-defined]
        _fit(flipped).delta.flat,  # type: ignore[attr-defined]
        rtol=1e-5,
        atol=1e-7,
    )


def test_backdoor_boosts_a_poisoned_update(client: TorchClient) -> None:
    update = _fit(_attacked(client, "backdoor", poison_fraction=0.5))
    honest = _fit(client)
    ratio = update.delta.norm() / honest.delta.norm()  # type: ignore[attr-defined]
    assert 2.0 < ratio < 10.0  # boosted by 5, and trained on other data
    assert update.num_examples == client.num_train_examples  # type: ignore[attr-defined]


def test_the_trigger_is_a_corner_patch_on_images_and_a_pattern_on_rows() -> None:
    img = add_trigger(np.zeros((2, 64), np.float32)).reshape(2, 8, 8)
    assert img[:, -3:, -3:].min() == 1.0 and img[:, :-3, :].max() == 0.0
    rows = add_trigger(np.zeros((2, 13), np.float32))
    assert rows[:, -3:].min() == 1.0 and rows[:, :-3].max() == 0.0


def test_alie_and_ipm_rewrite_the_colluders_updates(client: TorchClient) -> None:
    updates = [_fit(client, seed) for seed in range(4)]
    mu = np.mean([u.delta.flat for u in updates], axis=0)  # type: ignore[attr-defined]
    sd = np.std([u.delta.flat for u in updates], axis=0)  # type: ignore[attr-defined]
    ipm = collude(updates, AttackSpec(kind="ipm", epsilon=0.5), num_clients=20)  # type: ignore[arg-type]
    np.testing.assert_allclose(ipm[0].delta.flat, -0.5 * mu, rtol=1e-5, atol=1e-8)
    alie = collude(updates, AttackSpec(kind="alie"), num_clients=20)  # type: ignore[arg-type]
    z = alie_z(20, 4)
    np.testing.assert_allclose(alie[0].delta.flat, mu - z * sd, rtol=1e-5, atol=1e-8)
    assert all(a.delta == alie[0].delta for a in alie)


def test_malicious_clients_are_drawn_from_the_seed() -> None:
    ids = [str(i) for i in range(50)]
    a = choose_malicious(ids, 0.2, seed=3)
    assert len(a) == 10 and a == choose_malicious(ids, 0.2, seed=3)
    assert a != choose_malicious(ids, 0.2, seed=4)
    with pytest.raises(ConfigError, match="fraction"):
        AttackSpec(kind="sign_flip", fraction=0.5)
