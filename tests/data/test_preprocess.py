from __future__ import annotations

import numpy as np
import pytest

from fedshield.data import Dataset, load_dataset, natural_client_names, partition
from fedshield.data.preprocess import preprocess_per_client
from fedshield.errors import ConfigError


def make(x: list[list[float]], *, numeric: list[bool] | None, **kwargs) -> Dataset:
    arr = np.array(x, dtype=np.float32)
    return Dataset(
        "toy",
        arr,
        np.zeros(len(arr), dtype=np.int64),
        num_classes=1,
        input_shape=(arr.shape[1],),
        numeric_columns=None if numeric is None else np.array(numeric),
        **kwargs,
    )


def test_statistics_are_per_client_not_pooled() -> None:
    # Client b's values are a's shifted by +100: pooled statistics would put
    # a below 0 and b above; per-client statistics give both mean 0.
    values = [1.0, 2.0, 3.0, 4.0]
    ds = make(
        [[v, 7.0] for v in values] + [[v + 100.0, 7.0] for v in values],
        numeric=[True, False],
    )
    parts = {"a": np.arange(4), "b": np.arange(4, 8)}

    train, _ = preprocess_per_client(ds, parts, ds.subset(np.arange(2)))

    for idx in parts.values():
        column = train.x[idx, 0]
        assert abs(float(column.mean())) < 1e-6
        assert abs(float(column.std()) - 1.0) < 1e-5
    np.testing.assert_array_equal(train.x[:, 0][:4], train.x[:, 0][4:])
    np.testing.assert_array_equal(train.x[:, 1], 7.0)  # other columns untouched
    assert train.numeric_columns is None
    assert train.x.dtype == np.float32


def test_median_imputation_uses_only_the_clients_own_rows() -> None:
    ds = make(
        [[1.0], [2.0], [10.0], [np.nan], [500.0], [600.0], [700.0]],
        numeric=[True],
    )
    parts = {"a": np.arange(4), "b": np.arange(4, 7)}

    train, _ = preprocess_per_client(
        ds, parts, ds.subset(np.array([0])), standardize=False
    )

    # a's median is 2 (of 1, 2, 10); the pooled median would be 10.
    assert train.x[3, 0] == 2.0
    np.testing.assert_array_equal(train.x[4:, 0], [500.0, 600.0, 700.0])
    assert np.isfinite(train.x).all()


def test_client_without_observed_values_gets_zero() -> None:
    ds = make(
        [[np.nan, 1.0], [np.nan, 3.0], [5.0, 4.0], [7.0, 6.0]], numeric=[True, True]
    )
    parts = {"a": np.array([0, 1]), "b": np.array([2, 3])}

    train, _ = preprocess_per_client(ds, parts, ds.subset(np.array([2])))

    np.testing.assert_array_equal(train.x[:2, 0], 0.0)
    np.testing.assert_allclose(train.x[:2, 1], [-1.0, 1.0])


def test_constant_column_stays_finite() -> None:
    ds = make([[3.0], [3.0], [3.0]], numeric=[True])

    train, _ = preprocess_per_client(ds, {"a": np.arange(3)}, ds.subset(np.array([0])))

    np.testing.assert_array_equal(train.x[:, 0], 0.0)


def test_test_rows_use_their_owners_statistics() -> None:
    ds = make([[0.0], [2.0], [100.0], [104.0]], numeric=[True])
    parts = {"a": np.array([0, 1]), "b": np.array([2, 3])}
    test = make([[2.0], [100.0], [np.nan]], numeric=[True])

    _, out = preprocess_per_client(ds, parts, test, np.array(["a", "b", "b"]))

    # a: mean 1, std 1; b: mean 102, std 2, median 102 for the missing value.
    np.testing.assert_allclose(out.x[:, 0], [1.0, -1.0, 0.0])
    assert out.numeric_columns is None


def test_test_without_owner_uses_its_own_statistics() -> None:
    ds = make([[0.0], [2.0]], numeric=[True])
    test = make([[50.0], [np.nan], [70.0]], numeric=[True])

    _, out = preprocess_per_client(ds, {"a": np.arange(2)}, test)

    # Own median 60 fills the gap; own mean 60, std sqrt(200/3).
    expected = (np.array([50.0, 60.0, 70.0]) - 60.0) / np.sqrt(200.0 / 3.0)
    np.testing.assert_allclose(out.x[:, 0], expected, rtol=1e-6)


def test_unknown_test_owner_raises_naming_it() -> None:
    ds = make([[0.0], [2.0]], numeric=[True])

    with pytest.raises(ConfigError, match="'zz'"):
        preprocess_per_client(ds, {"a": np.arange(2)}, ds, np.array(["a", "zz"]))


def test_rows_in_no_part_end_finite() -> None:
    ds = make([[1.0], [3.0], [np.nan]], numeric=[True])

    train, _ = preprocess_per_client(ds, {"a": np.array([0, 1])}, ds.subset([0]))

    assert train.x[2, 0] == 0.0
    assert np.isfinite(train.x).all()


def test_dataset_without_numeric_columns_passes_through() -> None:
    ds = make([[1.0], [2.0]], numeric=None)
    test = ds.subset(np.array([0]))

    train, out = preprocess_per_client(ds, {"a": np.arange(2)}, test)

    assert train is ds
    assert out is test


def test_mismatched_test_columns_raise() -> None:
    ds = make([[1.0, 2.0]], numeric=[True, False])
    test = make([[1.0]], numeric=[True])

    with pytest.raises(ConfigError, match="must match"):
        preprocess_per_client(ds, {"a": np.arange(1)}, test)


def test_nan_outside_numeric_columns_is_refused_by_dataset() -> None:
    with pytest.raises(ConfigError, match="outside numeric_columns"):
        make([[1.0, np.nan]], numeric=[True, False])


def test_heart_per_hospital_means_are_zero_after_preprocessing() -> None:
    heart = load_dataset("heart")
    assert heart.groups is not None and heart.numeric_columns is not None
    names = natural_client_names(heart.groups)
    parts = partition(
        heart.y,
        len(names),
        method="natural",
        rng=np.random.default_rng(0),
        groups=heart.groups,
    )
    mapping = dict(zip(names, parts, strict=True))

    train, test = preprocess_per_client(
        heart, mapping, heart.subset(np.arange(50)), heart.groups[:50]
    )

    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()
    cols = np.flatnonzero(heart.numeric_columns)
    for name, idx in mapping.items():
        block = train.x[np.ix_(idx, cols)].astype(np.float64)
        np.testing.assert_allclose(block.mean(axis=0), 0.0, atol=1e-5, err_msg=name)
    # A test row owned by a hospital equals that hospital's transform of it.
    np.testing.assert_array_equal(test.x, train.x[:50])
    # Pooled statistics would not centre each hospital: the raw hospital
    # means of age differ by years (age is stored as years / 100).
    age = heart.feature_names.index("age")
    raw_means = [float(np.nanmean(heart.x[idx, age])) * 100 for idx in parts]
    assert max(raw_means) - min(raw_means) > 3.0


def test_fit_none_uses_no_statistic_of_any_record() -> None:
    # Record-level DP: changing one record must leave every other row as it
    # was (a client median or mean would move them all).
    base = [[1.0], [3.0], [np.nan], [5.0]]
    other = [[1000.0], [3.0], [np.nan], [5.0]]
    outs = []
    for rows in (base, other):
        ds = make(rows, numeric=[True])
        train, _ = preprocess_per_client(
            ds, {"a": np.arange(4)}, ds.subset(np.arange(1)), fit="none"
        )
        outs.append(train.x[:, 0])
    np.testing.assert_array_equal(outs[0][1:], outs[1][1:])
    assert outs[0][2] == 0.0  # missing becomes 0; its indicator says so
    # With the clients' statistics, one record moves the others.
    moved = []
    for rows in (base, other):
        ds = make(rows, numeric=[True])
        train, _ = preprocess_per_client(ds, {"a": np.arange(4)}, ds.subset([0]))
        moved.append(train.x[:, 0])
    assert not np.array_equal(moved[0][1:], moved[1][1:])


def test_own_test_statistics_do_not_depend_on_training_rows() -> None:
    # Under DP the server's evaluation must not see the clients' training
    # statistics: the test rows are scaled with their owners' test rows.
    test = make([[2.0], [4.0], [10.0], [20.0]], numeric=[True])
    owner = np.array(["a", "a", "b", "b"])
    results = []
    for shift in (0.0, 500.0):
        train = make([[1.0 + shift], [3.0], [7.0], [9.0]], numeric=[True])
        parts = {"a": np.array([0, 1]), "b": np.array([2, 3])}
        _, out = preprocess_per_client(train, parts, test, owner, test_statistics="own")
        results.append(out.x.copy())
        _, by_owner = preprocess_per_client(train, parts, test, owner)
        results.append(by_owner.x.copy())
    own_0, owner_0, own_1, owner_1 = results
    np.testing.assert_array_equal(own_0, own_1)
    assert not np.array_equal(owner_0, owner_1)
