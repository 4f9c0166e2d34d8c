"""What build_federation's per-client preprocessing lets out under DP."""

from __future__ import annotations

import numpy as np

from fedshield.api import build_federation, parse_config
from fedshield.data import load_dataset

HEART = {
    "data": {"dataset": "heart", "partition": "natural", "test_fraction": 0.3},
    "model": {"kind": "logistic"},
}


def _numeric(federation) -> np.ndarray:
    raw = load_dataset("heart")
    assert raw.numeric_columns is not None
    return np.flatnonzero(raw.numeric_columns)


def test_without_dp_test_rows_use_their_hospitals_training_statistics():
    federation = build_federation(parse_config(HEART))
    cols = _numeric(federation)
    # Scaled by the training rows' statistics: the test set's own mean is
    # not exactly 0.
    assert np.abs(federation.test.x[:, cols].mean(axis=0)).max() > 0.01


def test_under_dp_the_test_set_uses_its_own_statistics_only():
    config = parse_config(
        {**HEART, "privacy": {"mode": "central", "clip_norm": 1.0,
                              "noise_multiplier": 1.0}}
    )  # fmt: skip
    federation = build_federation(config)
    cols = _numeric(federation)
    test = federation.test.x[:, cols].astype(np.float64)
    np.testing.assert_allclose(test.mean(axis=0), 0.0, atol=1e-5)


def test_record_mode_uses_no_statistic_of_the_records():
    config = parse_config(
        {**HEART, "privacy": {"mode": "record", "clip_norm": 1.0,
                              "noise_multiplier": 1.0}}
    )  # fmt: skip
    federation = build_federation(config)
    raw = load_dataset("heart")
    cols = _numeric(federation)
    # The training rows are the raw values over the fixed public scales, a
    # missing value 0: no mean, median or deviation of any record.
    x = federation.train.x[:, cols]
    assert np.isfinite(x).all()
    values = set(np.round(raw.x[:, cols][~np.isnan(raw.x[:, cols])], 5).tolist())
    observed = set(np.round(x[x != 0], 5).tolist())
    assert observed <= values


def test_the_checkpoints_data_fingerprint_hashes_no_record_under_dp():
    from fedshield.api.run import data_fingerprint

    rng = np.random.default_rng(0)
    clients = {
        f"s{k}": (
            rng.normal(size=(20, 3)).astype(np.float32),
            rng.integers(0, 2, 20),
        )
        for k in range(3)
    }
    changed = {k: (x.copy(), y) for k, (x, y) in clients.items()}
    changed["s1"][0][4, 2] += 1.0  # one record's value

    def build(data):
        return build_federation(parse_config({}), clients=data)

    a, b = build(clients), build(changed)
    # Without DP the whole data is hashed (a changed file is caught on resume).
    assert data_fingerprint(a) != data_fingerprint(b)
    # Under DP only the partition (clients, sizes, label counts, already in
    # partition.json): a hash of the records would let a guess be tested.
    assert data_fingerprint(a, private=True) == data_fingerprint(b, private=True)
