from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedshield.data
from fedshield.data import PARTITIONS, natural_client_names, partition
from fedshield.errors import ConfigError, PartitionError

RANDOM_METHODS = ("iid", "dirichlet", "shards", "quantity")
PROPERTY_SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def partition_cases(draw: st.DrawFn) -> tuple[np.ndarray, int, str, int, dict]:
    n = draw(st.integers(min_value=1, max_value=150))
    num_classes = draw(st.integers(min_value=1, max_value=6))
    labels = np.array(
        draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)),
        dtype=np.int64,
    )
    method = draw(st.sampled_from(RANDOM_METHODS))
    num_clients = draw(st.integers(min_value=1, max_value=min(n, 12)))
    kwargs: dict = {"min_samples": 0}
    if method == "dirichlet":
        kwargs["alpha"] = draw(st.floats(min_value=0.01, max_value=100.0))
    elif method == "shards":
        kwargs["shards_per_client"] = draw(
            st.integers(min_value=1, max_value=max(1, min(3, n // num_clients)))
        )
    elif method == "quantity":
        kwargs["sigma"] = draw(st.floats(min_value=0.0, max_value=3.0))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    return labels, num_clients, method, seed, kwargs


def assert_exact_cover(parts: list[np.ndarray], n: int) -> None:
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "each part must be sorted without repeats"
    joined = np.concatenate(parts)
    assert len(joined) == n, "indices lost or duplicated"
    assert np.array_equal(np.sort(joined), np.arange(n))


# Properties -------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(partition_cases())
def test_partition_random_methods_cover_every_index_exactly_once(case) -> None:
    labels, num_clients, method, seed, kwargs = case

    parts = partition(
        labels, num_clients, method=method, rng=np.random.default_rng(seed), **kwargs
    )

    assert len(parts) == num_clients
    assert_exact_cover(parts, len(labels))


@PROPERTY_SETTINGS
@given(partition_cases())
def test_partition_same_seed_same_result(case) -> None:
    labels, num_clients, method, seed, kwargs = case

    a = partition(
        labels, num_clients, method=method, rng=np.random.default_rng(seed), **kwargs
    )
    b = partition(
        labels, num_clients, method=method, rng=np.random.default_rng(seed), **kwargs
    )

    assert len(a) == len(b)
    for pa, pb in zip(a, b, strict=True):
        assert np.array_equal(pa, pb)


@PROPERTY_SETTINGS
@given(partition_cases())
def test_partition_min_samples_is_met_or_raises(case) -> None:
    labels, num_clients, method, seed, kwargs = case
    kwargs["min_samples"] = 2

    try:
        parts = partition(
            labels,
            num_clients,
            method=method,
            rng=np.random.default_rng(seed),
            **kwargs,
        )
    except PartitionError as err:
        assert "min_samples=2" in str(err)
        assert "client" in str(err)
    else:
        assert min(len(p) for p in parts) >= 2
        assert_exact_cover(parts, len(labels))


@PROPERTY_SETTINGS
@given(
    n=st.integers(min_value=1, max_value=200),
    num_clients=st.integers(min_value=1, max_value=20),
    seed=st.integers(0, 2**16),
)
def test_partition_iid_sizes_differ_by_at_most_one(n, num_clients, seed) -> None:
    num_clients = min(num_clients, n)

    parts = partition(
        np.zeros(n, dtype=np.int64),
        num_clients,
        method="iid",
        rng=np.random.default_rng(seed),
        min_samples=0,
    )

    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


# Method-specific behaviour ----------------------------------------------------


def test_partition_different_seeds_differ() -> None:
    labels = np.arange(100) % 10

    a = partition(labels, 5, method="dirichlet", rng=np.random.default_rng(1))
    b = partition(labels, 5, method="dirichlet", rng=np.random.default_rng(2))

    assert any(not np.array_equal(pa, pb) for pa, pb in zip(a, b, strict=True))


def test_partition_dirichlet_small_alpha_skews_labels_more() -> None:
    labels = np.repeat(np.arange(10), 200)

    def mean_classes_per_client(alpha: float) -> float:
        parts = partition(
            labels,
            10,
            method="dirichlet",
            alpha=alpha,
            rng=np.random.default_rng(0),
            min_samples=0,
        )
        # Classes holding at least 5 % of a client's rows.
        return float(
            np.mean(
                [
                    np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p))
                    for p in parts
                    if len(p)
                ]
            )
        )

    assert mean_classes_per_client(0.05) < 3.0
    assert mean_classes_per_client(1000.0) == 10.0


def test_partition_dirichlet_large_alpha_is_near_uniform() -> None:
    labels = np.repeat(np.arange(4), 1000)

    parts = partition(
        labels, 4, method="dirichlet", alpha=1e4, rng=np.random.default_rng(0)
    )

    counts = np.array([np.bincount(labels[p], minlength=4) for p in parts])
    np.testing.assert_allclose(counts, 250, atol=25)


def test_partition_shards_two_per_client_gives_at_most_two_labels_each() -> None:
    labels = np.repeat(np.arange(10), 100)

    parts = partition(
        labels, 10, method="shards", shards_per_client=2, rng=np.random.default_rng(3)
    )

    # 20 shards of 50 rows each lie within one class.
    for p in parts:
        assert len(p) == 100
        assert len(np.unique(labels[p])) <= 2


def test_partition_quantity_sigma_zero_is_even_and_large_sigma_uneven() -> None:
    labels = np.zeros(1000, dtype=np.int64)

    even = partition(
        labels, 10, method="quantity", sigma=0.0, rng=np.random.default_rng(0)
    )
    skewed = partition(
        labels,
        10,
        method="quantity",
        sigma=2.0,
        min_samples=5,
        rng=np.random.default_rng(0),
    )

    assert [len(p) for p in even] == [100] * 10
    sizes = [len(p) for p in skewed]
    assert max(sizes) > 3 * min(sizes)
    assert min(sizes) >= 5


def test_partition_natural_follows_groups_in_sorted_name_order() -> None:
    groups = np.array(["b", "a", "c", "a", "b", "a"])
    labels = np.zeros(6, dtype=np.int64)

    parts = partition(
        labels, 3, method="natural", groups=groups, rng=np.random.default_rng(0)
    )

    assert natural_client_names(groups) == ["a", "b", "c"]
    assert [p.tolist() for p in parts] == [[1, 3, 5], [0, 4], [2]]


# Errors -----------------------------------------------------------------------


def test_partition_min_samples_error_names_client_size_and_fix() -> None:
    labels = np.zeros(10, dtype=np.int64)

    with pytest.raises(PartitionError) as info:
        partition(labels, 4, method="iid", rng=np.random.default_rng(0), min_samples=3)

    message = str(info.value)
    assert "client 2 gets 2" in message
    assert "min_samples=3" in message
    assert "use at most 3 clients" in message


def test_partition_dirichlet_tiny_alpha_raises_partition_error_with_fix() -> None:
    labels = np.arange(40) % 2

    with pytest.raises(PartitionError, match="larger alpha") as info:
        partition(
            labels, 20, method="dirichlet", alpha=0.001, rng=np.random.default_rng(0)
        )

    assert "gets 0" in str(info.value)


def test_partition_natural_small_group_error_names_group() -> None:
    groups = np.array(["big"] * 5 + ["tiny"])

    with pytest.raises(PartitionError, match=r"client 1 \('tiny'\) gets 1"):
        partition(
            np.zeros(6, dtype=np.int64),
            2,
            method="natural",
            groups=groups,
            rng=np.random.default_rng(0),
            min_samples=2,
        )


def test_partition_quantity_impossible_min_samples_raises() -> None:
    with pytest.raises(PartitionError, match="need 60 rows but there are only 50"):
        partition(
            np.zeros(50, dtype=np.int64),
            6,
            method="quantity",
            rng=np.random.default_rng(0),
            min_samples=10,
        )


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"num_clients": 0}, "`num_clients` must be >= 1; got 0"),
        ({"num_clients": 11}, "`num_clients` must be <= the number of rows (10)"),
        ({"alpha": 0.0}, "`alpha` must be finite and > 0; got 0.0"),
        ({"alpha": -1.0}, "`alpha` must be finite and > 0; got -1.0"),
        ({"alpha": float("nan")}, "`alpha` must be finite and > 0"),
        ({"sigma": -0.5}, "`sigma` must be finite and >= 0; got -0.5"),
        ({"min_samples": -1}, "`min_samples` must be >= 0; got -1"),
        ({"shards_per_client": 0}, "`shards_per_client` must be >= 1; got 0"),
        (
            {"method": "shards", "num_clients": 4, "shards_per_client": 3},
            "`num_clients * shards_per_client` must be <= the number of rows (10)",
        ),
        ({"method": "dirichlt"}, "did you mean 'dirichlet'?"),
        ({"method": "nope"}, "`method` must be one of 'iid', 'dirichlet'"),
        ({"method": "natural"}, "`groups` is required for method 'natural'"),
        (
            {"method": "natural", "groups": np.array(["a", "b"] * 5)},
            "`num_clients` must equal the number of groups (2: a, b)",
        ),
        (
            {"method": "natural", "groups": np.array(["a"] * 3), "num_clients": 1},
            "`groups` must have shape (10,)",
        ),
    ],
)
def test_partition_bad_arguments_raise_config_error(kwargs, fragment) -> None:
    args = {"num_clients": 3, "method": "iid", **kwargs}
    num_clients = args.pop("num_clients")

    with pytest.raises(ConfigError) as info:
        partition(
            np.zeros(10, dtype=np.int64),
            num_clients,
            rng=np.random.default_rng(0),
            **args,
        )

    assert fragment in str(info.value)


def test_partition_non_integer_labels_raise_config_error() -> None:
    with pytest.raises(ConfigError, match="1-D integer"):
        partition(np.array(["a"] * 5), 2, method="iid", rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="1-D integer"):
        partition(np.zeros((5, 2)), 2, method="iid", rng=np.random.default_rng(0))


@pytest.mark.parametrize("method", ["iid", "quantity"])
def test_partition_regression_targets_with_label_free_methods(method: str) -> None:
    targets = np.linspace(-1.0, 1.0, 20, dtype=np.float32)

    parts = partition(targets, 4, method=method, rng=np.random.default_rng(0))

    assert sorted(np.concatenate(parts).tolist()) == list(range(20))


def test_partition_regression_targets_natural() -> None:
    groups = np.array(["a", "b"] * 5)

    parts = partition(
        np.zeros(10, dtype=np.float32),
        2,
        method="natural",
        rng=np.random.default_rng(0),
        groups=groups,
    )

    assert [p.tolist() for p in parts] == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]


@pytest.mark.parametrize("method", ["dirichlet", "shards"])
def test_partition_label_skew_on_regression_targets_says_what_to_use(
    method: str,
) -> None:
    with pytest.raises(ConfigError) as info:
        partition(
            np.zeros(10, dtype=np.float32),
            2,
            method=method,
            rng=np.random.default_rng(0),
        )

    message = str(info.value)
    assert info.value.exit_code == 10
    assert "regression" in message
    assert "'iid', 'quantity' or 'natural'" in message


def test_partition_reports_every_bad_argument_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        partition(
            np.zeros(5, dtype=np.int64),
            0,
            method="iid",
            alpha=-1.0,
            rng=np.random.default_rng(0),
        )

    assert "num_clients" in str(info.value)
    assert "alpha" in str(info.value)


def test_partition_names_match_methods() -> None:
    assert PARTITIONS == ("iid", "dirichlet", "shards", "quantity", "natural")


def test_data_all_names_exist() -> None:
    for name in fedshield.data.__all__:
        assert hasattr(fedshield.data, name), name
