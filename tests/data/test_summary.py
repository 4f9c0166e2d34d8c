from __future__ import annotations

import json

import numpy as np
import pytest

from fedshield.data import PartitionSummary, partition, summarize_partition
from fedshield.errors import ConfigError


def test_summarize_partition_hand_computed_counts() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2])
    parts = [np.array([0, 2]), np.array([1, 3, 4, 5])]

    summary = summarize_partition(
        parts, labels, num_classes=4, client_ids=["x", "y"], method="iid"
    )

    assert summary.num_samples == (2, 4)
    assert summary.client_ids == ("x", "y")
    assert summary.num_clients == 2
    assert summary.label_counts.dtype == np.int64
    assert summary.label_counts.tolist() == [[1, 1, 0, 0], [1, 0, 3, 0]]


def test_summarize_partition_totals_match_labels() -> None:
    labels = np.arange(300) % 7
    parts = partition(labels, 5, method="dirichlet", rng=np.random.default_rng(4))

    summary = summarize_partition(
        parts,
        labels,
        num_classes=7,
        client_ids=[f"c{k}" for k in range(5)],
        method="dirichlet",
    )

    np.testing.assert_array_equal(
        summary.label_counts.sum(axis=0), np.bincount(labels, minlength=7)
    )
    assert sum(summary.num_samples) == 300


def test_partition_summary_json_round_trip_through_text() -> None:
    summary = PartitionSummary(
        method="shards",
        num_classes=3,
        client_ids=("a", "b"),
        num_samples=(3, 1),
        label_counts=np.array([[1, 2, 0], [0, 0, 1]], dtype=np.int64),
    )

    data = json.loads(json.dumps(summary.to_json()))
    back = PartitionSummary.from_json(data)

    assert data == {
        "method": "shards",
        "num_clients": 2,
        "num_classes": 3,
        "clients": [
            {"client_id": "a", "num_samples": 3, "label_counts": [1, 2, 0]},
            {"client_id": "b", "num_samples": 1, "label_counts": [0, 0, 1]},
        ],
    }
    assert back == summary
    assert back.label_counts.dtype == np.int64


def test_partition_summary_inequality_on_counts() -> None:
    a = PartitionSummary("iid", 2, ("a",), (2,), np.array([[1, 1]], dtype=np.int64))
    b = PartitionSummary("iid", 2, ("a",), (2,), np.array([[2, 0]], dtype=np.int64))

    assert a != b


def test_partition_summary_inconsistent_totals_raise() -> None:
    with pytest.raises(ConfigError, match="sum to"):
        PartitionSummary("iid", 2, ("a",), (5,), np.array([[1, 1]], dtype=np.int64))


def test_partition_summary_wrong_shape_raises() -> None:
    with pytest.raises(ConfigError, match="shape"):
        PartitionSummary("iid", 3, ("a",), (2,), np.array([[1, 1]], dtype=np.int64))


@pytest.mark.parametrize(
    "data",
    [
        {"method": "iid", "num_classes": 2},
        {"method": "iid", "num_classes": 2, "clients": [{"client_id": "a"}]},
        {
            "method": "iid",
            "num_clients": 3,
            "num_classes": 2,
            "clients": [{"client_id": "a", "num_samples": 1, "label_counts": [1, 0]}],
        },
        {
            "method": "iid",
            "num_classes": 2,
            "clients": [{"client_id": "a", "num_samples": 1, "label_counts": [1]}],
        },
    ],
)
def test_partition_summary_from_json_malformed_raises(data) -> None:
    with pytest.raises(ConfigError):
        PartitionSummary.from_json(data)


def test_summarize_partition_label_out_of_range_raises() -> None:
    with pytest.raises(ConfigError, match="labels"):
        summarize_partition(
            [np.array([0])],
            np.array([5]),
            num_classes=2,
            client_ids=["a"],
            method="iid",
        )


def test_summarize_partition_id_count_mismatch_raises() -> None:
    with pytest.raises(ConfigError, match="client_ids"):
        summarize_partition(
            [np.array([0]), np.array([1])],
            np.array([0, 1]),
            num_classes=2,
            client_ids=["a"],
            method="iid",
        )


def test_summarize_partition_regression_counts_every_row_in_one_bin() -> None:
    targets = np.array([0.5, -2.0, 3.25, 1.0, 7.0], dtype=np.float32)
    parts = [np.array([0, 1]), np.array([2, 3, 4])]

    summary = summarize_partition(
        parts, targets, num_classes=1, client_ids=["a", "b"], method="iid"
    )

    assert summary.num_samples == (2, 3)
    assert summary.label_counts.shape == (2, 1)
    assert summary.label_counts.tolist() == [[2], [3]]
    assert PartitionSummary.from_json(summary.to_json()) == summary


def test_summarize_partition_regression_needs_one_class() -> None:
    with pytest.raises(ConfigError, match="num_classes must be 1"):
        summarize_partition(
            [np.array([0])],
            np.array([0.5]),
            num_classes=2,
            client_ids=["a"],
            method="iid",
        )
