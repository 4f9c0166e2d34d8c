"""Per-client imputation and standardisation of a data set's numeric columns.

A real federation cannot pool statistics across sites: each client imputes
and scales its own rows with its own medians, means and standard deviations.
:func:`preprocess_per_client` does exactly that for the columns a
:class:`~fedshield.data.datasets.Dataset` marks in ``numeric_columns``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedshield.data.datasets import Dataset
from fedshield.errors import ConfigError

__all__ = ["preprocess_per_client"]


@dataclass(frozen=True, slots=True)
class _Stats:
    """One client's statistics over the numeric columns (float64 vectors)."""

    fill: np.ndarray
    mean: np.ndarray
    std: np.ndarray


def preprocess_per_client(
    train: Dataset,
    parts: Mapping[str, np.ndarray],
    test: Dataset,
    test_owner: np.ndarray | None = None,
    *,
    standardize: bool = True,
    fit: str = "client",
    test_statistics: str = "owner",
) -> tuple[Dataset, Dataset]:
    """Impute and standardise the numeric columns with each client's statistics.

    Parameters
    ----------
    train
        The training rows of every client. Only the columns in
        ``train.numeric_columns`` are touched; the others pass unchanged.
    parts
        Client id to that client's row indices into ``train``.
    test
        The test set, with the same columns as ``train``.
    test_owner
        Client id of each test row (e.g. ``test.groups`` for a natural
        partition): each row is transformed with its owner's training
        statistics. ``None``: the test set is the server's own site and is
        transformed with statistics computed over the test set itself.
    standardize
        Whether to z-score after imputing (``False``: impute only).
    fit
        ``"client"``: each client's own statistics, as above. ``"none"``:
        no statistic of any record is used: a missing value becomes 0 (its
        ``<column>_missing`` indicator says it was missing) and nothing is
        scaled. Record-level DP needs this: a client's median, mean or
        standard deviation depends on every one of its records, so scaling
        by them would let one record change how all the others are
        trained on, which the DP-SGD analysis does not cover.
    test_statistics
        With ``test_owner``: ``"owner"`` transforms each test row with its
        owner's *training* statistics (as the site itself would);
        ``"own"`` with the statistics of the owner's *test* rows, so that
        what the server's evaluation releases does not depend on any
        client's training data (what a DP run needs).

    Returns
    -------
    tuple of Dataset
        ``(train, test)`` with finite ``float32`` features and
        ``numeric_columns`` cleared to ``None`` (the work is done). A data set
        without ``numeric_columns`` is returned unchanged.

    Raises
    ------
    ConfigError
        If ``train`` and ``test`` have different columns, ``test_owner`` has
        the wrong length or names a client not in ``parts``, or a part holds
        an index out of range.

    Notes
    -----
    For each client and each numeric column: missing values (NaN) are
    replaced by the median of the client's observed values; then, if
    ``standardize``, the column is z-scored with the client's mean and
    standard deviation after imputation (a standard deviation of 0 counts
    as 1). A client with no observed value in a column gets 0 there, the
    value a standardised column has at its mean. Rows in no part are not
    used for any statistic; their missing values become 0.

    Examples
    --------
    >>> import numpy as np
    >>> ds = Dataset(
    ...     "toy",
    ...     np.array([[1.0], [3.0], [np.nan], [101.0], [103.0]], dtype=np.float32),
    ...     np.zeros(5, dtype=np.int64),
    ...     num_classes=1,
    ...     input_shape=(1,),
    ...     numeric_columns=np.array([True]),
    ... )
    >>> parts = {"a": np.array([0, 1, 2]), "b": np.array([3, 4])}
    >>> test = ds.subset(np.array([3]))
    >>> train, test = preprocess_per_client(ds, parts, test, np.array(["b"]))
    >>> [round(float(v), 3) for v in train.x[:, 0]], test.x.tolist()
    ([-1.225, 1.225, 0.0, -1.0, 1.0], [[-1.0]])
    """
    mask = train.numeric_columns
    if mask is None:
        return train, test
    if test.x.shape[1] != train.x.shape[1] or (
        test.numeric_columns is not None
        and not np.array_equal(test.numeric_columns, mask)
    ):
        raise ConfigError(
            f"preprocess_per_client: the test set {test.name!r} has "
            f"{test.x.shape[1]} columns (numeric: "
            f"{_count(test.numeric_columns)}) but the training set has "
            f"{train.x.shape[1]} (numeric: {_count(mask)}); they must match"
        )
    if fit not in ("client", "none") or test_statistics not in ("owner", "own"):
        raise ConfigError(
            "preprocess_per_client: fit must be 'client' or 'none' and "
            "test_statistics 'owner' or 'own'; got "
            f"fit={fit!r}, test_statistics={test_statistics!r}"
        )
    cols = np.flatnonzero(mask)
    if fit == "none":
        x, tx = train.x.astype(np.float64), test.x.astype(np.float64)
        x[:, cols] = np.nan_to_num(x[:, cols], nan=0.0)
        tx[:, cols] = np.nan_to_num(tx[:, cols], nan=0.0)
        return _with_x(train, x), _with_x(test, tx)
    stats: dict[str, _Stats] = {}
    x = train.x.astype(np.float64)
    covered = np.zeros(len(train), dtype=np.bool_)
    for client_id, indices in parts.items():
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= len(train)):
            raise ConfigError(
                f"preprocess_per_client: part {client_id!r} holds row indices "
                f"{idx.min()}..{idx.max()} outside 0..{len(train) - 1}"
            )
        block = x[np.ix_(idx, cols)]
        stats[str(client_id)] = _fit(block, standardize=standardize)
        x[np.ix_(idx, cols)] = _apply(block, stats[str(client_id)])
        covered[idx] = True
    _zero_missing(x, np.flatnonzero(~covered), cols)

    tx = test.x.astype(np.float64)
    if test_owner is None:
        block = tx[:, cols]
        tx[:, cols] = _apply(block, _fit(block, standardize=standardize))
    elif test_statistics == "own":
        owner = np.asarray(test_owner).astype(np.str_)
        if owner.shape != (len(test),):
            raise ConfigError(
                f"preprocess_per_client: test_owner must have shape ({len(test)},)"
                f" (one client id per test row); got {owner.shape}"
            )
        for client_id in np.unique(owner).tolist():
            rows = np.flatnonzero(owner == client_id)
            block = tx[np.ix_(rows, cols)]
            tx[np.ix_(rows, cols)] = _apply(block, _fit(block, standardize=standardize))
    else:
        _apply_owned(tx, cols, np.asarray(test_owner), stats, test)
    return _with_x(train, x), _with_x(test, tx)


def _count(mask: np.ndarray | None) -> int:
    return 0 if mask is None else int(mask.sum())


def _fit(block: np.ndarray, *, standardize: bool) -> _Stats:
    """Statistics of one client's rows (``block``: rows x numeric columns)."""
    width = block.shape[1]
    observed = ~np.isnan(block)
    has_any = observed.any(axis=0)
    fill = np.zeros(width)
    mean = np.zeros(width)
    std = np.ones(width)
    for j in np.flatnonzero(has_any):
        fill[j] = np.median(block[observed[:, j], j])
    if standardize and block.shape[0]:
        imputed = np.where(observed, block, fill)
        mean = np.where(has_any, imputed.mean(axis=0), 0.0)
        spread = imputed.std(axis=0)
        std = np.where(has_any & (spread > 0), spread, 1.0)
    return _Stats(fill=fill, mean=mean, std=std)


def _apply(block: np.ndarray, stats: _Stats) -> np.ndarray:
    imputed = np.where(np.isnan(block), stats.fill, block)
    out: np.ndarray = (imputed - stats.mean) / stats.std
    return out


def _zero_missing(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
    if rows.size:
        block = x[np.ix_(rows, cols)]
        x[np.ix_(rows, cols)] = np.where(np.isnan(block), 0.0, block)


def _apply_owned(
    tx: np.ndarray,
    cols: np.ndarray,
    owner: np.ndarray,
    stats: Mapping[str, _Stats],
    test: Dataset,
) -> None:
    if owner.shape != (len(test),):
        raise ConfigError(
            f"preprocess_per_client: test_owner must have shape ({len(test)},) "
            f"(one client id per test row); got {owner.shape}"
        )
    owner = owner.astype(np.str_)
    unknown = sorted(set(np.unique(owner).tolist()) - set(stats))
    if unknown:
        row = int(np.flatnonzero(owner == unknown[0])[0])
        raise ConfigError(
            f"preprocess_per_client: test row {row} belongs to client "
            f"{unknown[0]!r}, which has no training rows (clients: "
            f"{', '.join(sorted(stats))}); unknown owners: {unknown}"
        )
    for client_id in np.unique(owner).tolist():
        rows = np.flatnonzero(owner == client_id)
        tx[np.ix_(rows, cols)] = _apply(tx[np.ix_(rows, cols)], stats[client_id])


def _with_x(ds: Dataset, x: np.ndarray) -> Dataset:
    out = x.astype(np.float32)
    if not np.isfinite(out).all():
        row, col = (int(v[0]) for v in np.nonzero(~np.isfinite(out)))
        raise ConfigError(
            f"preprocess_per_client: {ds.name!r} row {row} column {col} is not "
            "finite after preprocessing (a value overflows float32)"
        )
    return dataclasses.replace(ds, x=out, numeric_columns=None)
