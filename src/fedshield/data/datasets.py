"""Real data sets that work offline, and a stratified train/test split.

Every loader reads data that is already on the machine: scikit-learn's bundled
sets, a hash-pinned CSV vendored in ``fedshield/data/files`` and the Debian
package ``dataset-fashion-mnist``. fedshield never downloads data and caches
nothing on disk; scikit-learn is imported only inside the loaders that use it.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import importlib.util
import io
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Final

import numpy as np

from fedshield.core.registry import Registry
from fedshield.errors import ConfigError, DataUnavailableError

__all__ = ["DATASETS", "TASKS", "Dataset", "load_dataset", "split_test"]

TASKS: tuple[str, ...] = ("classification", "regression")
"""Values of :attr:`Dataset.task`."""

DATASETS: Registry[Callable[..., Any]] = Registry("data set", "[data] dataset")
"""The data set kinds by name: what ``[data] dataset`` accepts.

Tag ``"bundled"``: a data set that ships with fedshield, its value the loader
:func:`load_dataset` calls (no arguments, returns a :class:`Dataset`); tag
``"user"``: the user's own data (:mod:`fedshield.data.user`), its value the
reader :func:`~fedshield.data.load_user_data` calls with the spec. The
bundled ones are registered at the end of this module."""


@dataclass(frozen=True, slots=True, eq=False)
class Dataset:
    """A labelled data set held in memory, features flattened to 2-D.

    Parameters
    ----------
    name
        The data set's name (a bundled one of :data:`DATASETS`, or the user's).
    x
        ``float32`` features of shape ``(n, num_features)``.
    y
        ``int64`` labels of shape ``(n,)`` with values in ``0 .. num_classes-1``
        (classification), or finite ``float32`` targets of shape ``(n,)``
        (regression).
    num_classes
        Number of classes; 1 for regression.
    input_shape
        Shape of one example as a model sees it, e.g. ``(1, 28, 28)`` for
        images or ``(num_features,)`` for tabular data; its product must be
        ``num_features``.
    feature_names
        One name per column of ``x``, or empty when the columns are unnamed.
    groups
        The natural client of each row (a string array), e.g. the hospital in
        ``heart``; ``None`` when the data set has no natural clients.
    is_test
        Boolean mask of an official test split (``fashion_mnist``); ``None``
        when the data set has none.
    task
        ``"classification"`` or ``"regression"``.
    numeric_columns
        Boolean mask over the columns of ``x``: the columns that
        :func:`~fedshield.data.preprocess.preprocess_per_client` imputes and
        standardises per client. They may hold NaN (missing); every other
        column must be finite. ``None`` when no column needs it.

    Raises
    ------
    ConfigError
        If the arrays' shapes, dtypes or label range are inconsistent.

    Examples
    --------
    >>> import numpy as np
    >>> ds = Dataset(
    ...     "toy",
    ...     np.zeros((4, 2), dtype=np.float32),
    ...     np.array([0, 1, 0, 1]),
    ...     num_classes=2,
    ...     input_shape=(2,),
    ... )
    >>> len(ds), len(ds.subset(np.array([1, 3])))
    (4, 2)
    """

    name: str
    x: np.ndarray
    y: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    feature_names: tuple[str, ...] = ()
    groups: np.ndarray | None = None
    is_test: np.ndarray | None = None
    task: str = "classification"
    numeric_columns: np.ndarray | None = None

    def __post_init__(self) -> None:
        problems = _dataset_problems(self)
        if problems:
            raise ConfigError(
                f"Dataset {self.name!r} is inconsistent: " + "; ".join(problems)
            )

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, indices: np.ndarray) -> Dataset:
        """Return the rows ``indices`` (integer indices or a boolean mask).

        Parameters
        ----------
        indices
            Row indices into this data set, or a boolean mask of length ``n``.

        Returns
        -------
        Dataset
            A new data set with the selected rows of ``x``, ``y``, ``groups``
            and ``is_test``; name, classes, shapes, feature names, task and
            ``numeric_columns`` are kept.
        """
        idx = np.asarray(indices)
        return Dataset(
            self.name,
            self.x[idx],
            self.y[idx],
            num_classes=self.num_classes,
            input_shape=self.input_shape,
            feature_names=self.feature_names,
            groups=None if self.groups is None else self.groups[idx],
            is_test=None if self.is_test is None else self.is_test[idx],
            task=self.task,
            numeric_columns=self.numeric_columns,
        )


def _dataset_problems(ds: Dataset) -> list[str]:
    problems: list[str] = []
    if ds.x.ndim != 2 or ds.x.dtype != np.float32:
        problems.append(f"x must be 2-D float32; got {ds.x.ndim}-D {ds.x.dtype}")
    if ds.task not in TASKS:
        problems.append(f"task must be one of {TASKS}; got {ds.task!r}")
    elif ds.task == "regression":
        problems += _regression_label_problems(ds)
    else:
        problems += _class_label_problems(ds)
    if ds.x.shape[:1] != ds.y.shape[:1]:
        problems.append(f"x has {ds.x.shape[0]} rows but y has {ds.y.shape[0]}")
    if ds.x.ndim == 2 and int(np.prod(ds.input_shape)) != ds.x.shape[1]:
        problems.append(
            f"input_shape {ds.input_shape} does not hold {ds.x.shape[1]} features"
        )
    if ds.feature_names and ds.x.ndim == 2 and len(ds.feature_names) != ds.x.shape[1]:
        problems.append(
            f"{len(ds.feature_names)} feature_names for {ds.x.shape[1]} features"
        )
    for field_name, extra in (("groups", ds.groups), ("is_test", ds.is_test)):
        if extra is not None and extra.shape != ds.y.shape:
            problems.append(
                f"{field_name} must have shape {ds.y.shape}; got {extra.shape}"
            )
    if ds.is_test is not None and ds.is_test.dtype != np.bool_:
        problems.append(f"is_test must be bool; got {ds.is_test.dtype}")
    problems += _finite_problems(ds)
    return problems


def _class_label_problems(ds: Dataset) -> list[str]:
    if ds.y.ndim != 1 or ds.y.dtype != np.int64:
        return [f"y must be 1-D int64; got {ds.y.ndim}-D {ds.y.dtype}"]
    if ds.num_classes < 1:
        return [f"num_classes must be >= 1; got {ds.num_classes}"]
    if ds.y.size and (ds.y.min() < 0 or ds.y.max() >= ds.num_classes):
        return [
            f"labels must lie in 0..{ds.num_classes - 1}; "
            f"got {ds.y.min()}..{ds.y.max()}"
        ]
    return []


def _regression_label_problems(ds: Dataset) -> list[str]:
    problems: list[str] = []
    if ds.y.ndim != 1 or ds.y.dtype != np.float32:
        problems.append(
            f"y must be 1-D float32 for regression; got {ds.y.ndim}-D {ds.y.dtype}"
        )
    elif not np.isfinite(ds.y).all():
        problems.append(
            f"regression targets must be finite; row {_first(~np.isfinite(ds.y))} "
            "is not"
        )
    if ds.num_classes != 1:
        problems.append(f"num_classes must be 1 for regression; got {ds.num_classes}")
    return problems


def _finite_problems(ds: Dataset) -> list[str]:
    if ds.x.ndim != 2:
        return []
    mask = ds.numeric_columns
    if mask is not None:
        if mask.dtype != np.bool_ or mask.shape != (ds.x.shape[1],):
            return [
                f"numeric_columns must be a bool mask of shape ({ds.x.shape[1]},); "
                f"got {mask.dtype} {mask.shape}"
            ]
        others = ds.x[:, ~mask]
    else:
        others = ds.x
    if others.size and not np.isfinite(others).all():
        bad = ~np.isfinite(ds.x)
        if mask is not None:
            bad[:, mask] = False
        row, col = (int(v[0]) for v in np.nonzero(bad))
        name = ds.feature_names[col] if ds.feature_names else f"column {col}"
        return [
            f"x holds a non-finite value (row {row}, {name!r}) outside "
            "numeric_columns; only numeric_columns may hold NaN"
        ]
    return []


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def load_dataset(name: str) -> Dataset:
    """Load one of the bundled data sets by name.

    Parameters
    ----------
    name
        A bundled data set of :data:`DATASETS`: ``"digits"`` (scikit-learn 8x8 digits),
        ``"breast_cancer"`` (WDBC, raw values), ``"heart"`` (UCI Heart
        Disease, four hospitals as natural clients) or ``"fashion_mnist"``
        (from the Debian package ``dataset-fashion-mnist``).

    Returns
    -------
    Dataset
        The whole data set; use :func:`split_test` to hold out a test split.

    Raises
    ------
    ConfigError
        If ``name`` is not a known data set.
    DataUnavailableError
        If the data set's files are absent, unreadable or fail their hash check.

    Examples
    --------
    >>> ds = load_dataset("digits")
    >>> ds.x.shape, ds.input_shape, ds.num_classes
    ((1797, 64), (1, 8, 8), 10)
    """
    bundled = DATASETS.names(tag="bundled")
    if name not in bundled:
        close = difflib.get_close_matches(str(name), bundled, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        choices = ", ".join(repr(d) for d in bundled)
        raise ConfigError(
            f"`name` of load_dataset must be one of {choices}; got {name!r}.{hint}"
        )
    dataset: Dataset = DATASETS.get(name)()
    return dataset


def split_test(
    dataset: Dataset, *, test_fraction: float, rng: np.random.Generator
) -> tuple[Dataset, Dataset]:
    """Split a data set into train and test parts, stratified by label.

    Regression data (``task == "regression"``) is split plainly at random.

    Parameters
    ----------
    dataset
        The data set to split.
    test_fraction
        Fraction of rows to hold out, in ``(0, 1)``. Ignored (but still
        validated) when ``dataset.is_test`` marks an official test split.
    rng
        Source of randomness for choosing the held-out rows.

    Returns
    -------
    tuple of Dataset
        ``(train, test)``; each keeps the original row order.

    Raises
    ------
    ConfigError
        If ``test_fraction`` is not in ``(0, 1)``, or if either part would be
        empty.

    Notes
    -----
    Each class ``c`` with ``n_c`` rows contributes about ``n_c * test_fraction``
    rows to the test part; the per-class counts are rounded by largest
    remainder so the total is ``round(n * test_fraction)``.

    Examples
    --------
    >>> import numpy as np
    >>> ds = Dataset(
    ...     "toy",
    ...     np.zeros((10, 1), dtype=np.float32),
    ...     np.array([0] * 6 + [1] * 4),
    ...     num_classes=2,
    ...     input_shape=(1,),
    ... )
    >>> train, test = split_test(ds, test_fraction=0.5, rng=np.random.default_rng(0))
    >>> np.bincount(test.y).tolist(), np.bincount(train.y).tolist()
    ([3, 2], [3, 2])
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(
            f"`test_fraction` of split_test must be in (0, 1); got {test_fraction!r}"
        )
    if dataset.is_test is not None:
        test_mask = dataset.is_test.copy()
    elif dataset.task == "regression":
        test_mask = np.zeros(len(dataset), dtype=np.bool_)
        num = round(len(dataset) * test_fraction)
        test_mask[rng.permutation(len(dataset))[:num]] = True
    else:
        test_mask = _stratified_test_mask(dataset.y, test_fraction, rng)
    num_test = int(test_mask.sum())
    if num_test == 0 or num_test == len(dataset):
        raise ConfigError(
            f"split_test of {dataset.name!r} ({len(dataset)} rows) with "
            f"test_fraction={test_fraction!r} leaves {num_test} test rows and "
            f"{len(dataset) - num_test} train rows; both must be > 0"
        )
    return dataset.subset(np.flatnonzero(~test_mask)), dataset.subset(
        np.flatnonzero(test_mask)
    )


def _stratified_test_mask(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> np.ndarray:
    classes, class_sizes = np.unique(labels, return_counts=True)
    exact = class_sizes * test_fraction
    num_test = np.floor(exact).astype(np.int64)
    short = round(len(labels) * test_fraction) - int(num_test.sum())
    # Largest remainder; a stable sort breaks ties by class order.
    order = np.argsort(-(exact - num_test), kind="stable")
    num_test[order[: max(short, 0)]] += 1
    mask = np.zeros(len(labels), dtype=np.bool_)
    for cls, count in zip(classes, num_test, strict=True):
        members = np.flatnonzero(labels == cls)
        mask[rng.permutation(members)[:count]] = True
    return mask


# --------------------------------------------------------------------------
# scikit-learn bundled sets


def _sklearn_data_file(name: str) -> Path | None:
    """Path of a data file scikit-learn bundles, found without importing it.

    Importing ``sklearn.datasets`` costs most of a second of start-up; the
    bundled files themselves are plain CSV. ``None`` when not found.
    """
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = Path(root) / "datasets" / "data" / name
        if path.is_file():
            return path
    return None


def _load_digits() -> Dataset:
    path = _sklearn_data_file("digits.csv.gz")
    if path is not None:
        # The file load_digits reads: 64 pixel columns (0..16), then the label.
        with gzip.open(path, "rt") as handle:
            table = np.loadtxt(handle, delimiter=",", dtype=np.float32)
        pixels, target = table[:, :-1], table[:, -1].astype(np.int64)
        names = tuple(f"pixel_{r}_{c}" for r in range(8) for c in range(8))
    else:  # pragma: no cover - other layouts of scikit-learn
        from sklearn.datasets import load_digits

        bunch = load_digits()
        pixels = np.asarray(bunch.data, dtype=np.float32)
        target = np.asarray(bunch.target, dtype=np.int64)
        names = tuple(str(f) for f in bunch.feature_names)
    x = (pixels / np.float32(16.0)).astype(np.float32)
    return Dataset(
        "digits",
        x,
        target,
        num_classes=10,
        input_shape=(1, 8, 8),
        feature_names=names,
    )


def _load_breast_cancer() -> Dataset:
    """Load WDBC with its raw feature values.

    Every column is marked in ``numeric_columns``: it is standardised per
    client by :func:`~fedshield.data.preprocess.preprocess_per_client`, with
    each client's own statistics (nothing pooled across clients).
    """
    from sklearn.datasets import load_breast_cancer

    bunch = load_breast_cancer()
    raw = np.asarray(bunch.data, dtype=np.float32)
    return Dataset(
        "breast_cancer",
        raw,
        np.asarray(bunch.target, dtype=np.int64),
        num_classes=2,
        input_shape=(raw.shape[1],),
        feature_names=tuple(str(f) for f in bunch.feature_names),
        numeric_columns=np.ones(raw.shape[1], dtype=np.bool_),
    )


# --------------------------------------------------------------------------
# UCI Heart Disease (vendored, hash-pinned)

_HEART_FILE: Final = "heart_disease_uci.csv"
_HEART_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
_HEART_COLUMNS: Final = [
    "id", "age", "sex", "dataset", "cp", "trestbps", "chol", "fbs",
    "restecg", "thalch", "exang", "oldpeak", "slope", "ca", "thal", "num",
]  # fmt: skip
# Features in file order: None for a numeric column, else the categorical levels.
_HEART_FEATURES: Final[Mapping[str, tuple[str, ...] | None]] = {
    "age": None,
    "sex": ("Female", "Male"),
    "cp": ("asymptomatic", "atypical angina", "non-anginal", "typical angina"),
    "trestbps": None,
    "chol": None,
    "fbs": ("FALSE", "TRUE"),
    "restecg": ("lv hypertrophy", "normal", "st-t abnormality"),
    "thalch": None,
    "exang": ("FALSE", "TRUE"),
    "oldpeak": None,
    "slope": ("downsloping", "flat", "upsloping"),
    "ca": None,
    "thal": ("fixed defect", "normal", "reversable defect"),
}
# In this data set a recorded 0 for these means "not measured" (172 of the
# Switzerland/VA cholesterol values are 0); oldpeak == 0 is a real value.
_ZERO_MEANS_MISSING: Final = frozenset({"trestbps", "chol"})
_MISSING: Final = "missing"


def _read_heart_bytes() -> bytes:
    path = resources.files("fedshield.data").joinpath("files", _HEART_FILE)
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataUnavailableError(
            f"cannot read the vendored heart data {_HEART_FILE!r}: {err}; "
            "reinstall fedshield"
        ) from err


def _load_heart() -> Dataset:
    """Load UCI Heart Disease (Cleveland, Hungary, VA Long Beach, Switzerland).

    Label: ``num > 0`` (any disease) is 1, else 0. ``groups`` is the hospital
    (the ``dataset`` column); ``id`` and ``dataset`` are not features.

    Features, in file order: each numeric column (age, trestbps, chol,
    thalch, oldpeak, ca) becomes its value divided by a fixed public scale
    (age / 100, trestbps / 200, chol / 600, thalch / 200, oldpeak / 5,
    ca / 3: not a statistic of the data), NaN where missing, followed
    by a 0/1 ``<name>_missing`` indicator; each categorical column (sex, cp,
    fbs, restecg, exang, slope, thal) becomes one-hot ``<name>=<level>``
    columns, plus ``<name>=missing`` when the column has missing values.
    Empty cells are missing, and so are ``trestbps == 0`` and ``chol == 0``.

    Notes
    -----
    The six numeric value columns are marked in ``numeric_columns``:
    :func:`~fedshield.data.preprocess.preprocess_per_client` imputes
    (median) and standardises them with each hospital's own statistics, so
    no statistic is pooled across clients (under record-level DP it uses no
    statistic at all, and the fixed scales keep the features of order 1).
    """
    raw = _read_heart_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != _HEART_SHA256:
        raise DataUnavailableError(
            f"the vendored heart data {_HEART_FILE!r} has sha256 {digest}, "
            f"expected {_HEART_SHA256}; the file is corrupt or was modified, "
            "reinstall fedshield"
        )
    rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
    if not rows or rows[0] != _HEART_COLUMNS:
        raise DataUnavailableError(f"unexpected header in {_HEART_FILE!r}")
    table = {name: [row[i] for row in rows[1:]] for i, name in enumerate(rows[0])}

    blocks: list[np.ndarray] = []
    names: list[str] = []
    for feature, levels in _HEART_FEATURES.items():
        cells = table[feature]
        if levels is None:
            value, is_missing = _heart_numeric(feature, cells)
            blocks += [value, is_missing.astype(np.float64)]
            names += [feature, f"{feature}_missing"]
        else:
            onehot, level_names = _heart_onehot(feature, cells, levels)
            blocks.append(onehot)
            names += [f"{feature}={level}" for level in level_names]
    x = np.column_stack(blocks).astype(np.float32)
    y = (np.array([int(v) for v in table["num"]]) > 0).astype(np.int64)
    numeric = {f for f, levels in _HEART_FEATURES.items() if levels is None}
    return Dataset(
        "heart",
        x,
        y,
        num_classes=2,
        input_shape=(x.shape[1],),
        feature_names=tuple(names),
        groups=np.array(table["dataset"], dtype=np.str_),
        numeric_columns=np.array([n in numeric for n in names], dtype=np.bool_),
    )


# Fixed, public scales of the numeric columns (round upper ends of their
# clinical ranges in the UCI data dictionary), not statistics of the data:
# every site can apply them alone, and record-level DP, which may use no
# statistic of the records, still gets features of order 1.
_HEART_SCALES: Final[Mapping[str, float]] = {
    "age": 100.0,
    "trestbps": 200.0,
    "chol": 600.0,
    "thalch": 200.0,
    "oldpeak": 5.0,
    "ca": 3.0,
}


def _heart_numeric(feature: str, cells: Sequence[str]) -> tuple[np.ndarray, ...]:
    values = np.array([float(c) if c else np.nan for c in cells])
    if feature in _ZERO_MEANS_MISSING:
        values[values == 0.0] = np.nan
    is_missing = np.isnan(values)
    if is_missing.all():
        raise DataUnavailableError(f"column {feature!r} has no observed values")
    return values / _HEART_SCALES[feature], is_missing


def _heart_onehot(
    feature: str, cells: Sequence[str], levels: tuple[str, ...]
) -> tuple[np.ndarray, tuple[str, ...]]:
    unknown = sorted({c for c in cells if c and c not in levels})
    if unknown:
        raise DataUnavailableError(
            f"column {feature!r} of {_HEART_FILE!r} has unexpected values {unknown}"
        )
    all_levels = (*levels, _MISSING) if "" in cells else levels
    codes = np.array([all_levels.index(c or _MISSING) for c in cells])
    onehot: np.ndarray = np.eye(len(all_levels))[codes]
    return onehot, all_levels


# --------------------------------------------------------------------------
# Fashion-MNIST (Debian package dataset-fashion-mnist)

_FASHION_ENV: Final = "FEDSHIELD_FASHION_MNIST_DIR"
_FASHION_DEFAULT_DIR: Final = "/usr/share/datasets/fashion-mnist"
_FASHION_INSTALL_HINT: Final = (
    "install it with `sudo apt-get install dataset-fashion-mnist` "
    "(Debian/Ubuntu) or place the four IDX .gz files in a directory and set "
    "FEDSHIELD_FASHION_MNIST_DIR; fedshield never downloads data"
)
_FASHION_FILES: Final = {
    (split, kind): f"{split}-{kind}-ubyte.gz"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
}
_IDX_UBYTE: Final = 0x08


def _fashion_dir() -> Path:
    return Path(os.environ.get(_FASHION_ENV) or _FASHION_DEFAULT_DIR)


def _read_idx(path: Path, *, ndim: int) -> np.ndarray:
    """Read a gzipped IDX file of unsigned bytes (LeCun's MNIST format).

    The header is two zero bytes, a type code (0x08 = unsigned byte), the
    number of dimensions, then each dimension as a big-endian uint32.
    """
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as err:
        raise DataUnavailableError(
            f"cannot read Fashion-MNIST file {str(path)!r}: {err}; "
            + _FASHION_INSTALL_HINT
        ) from err
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise DataUnavailableError(f"{str(path)!r} is too short to be an IDX file")
    zeros, dtype_code, file_ndim = data[0:2], data[2], data[3]
    if zeros != b"\0\0" or dtype_code != _IDX_UBYTE or file_ndim != ndim:
        raise DataUnavailableError(
            f"{str(path)!r} is not an unsigned-byte IDX file with {ndim} "
            f"dimension(s) (magic {data[:4].hex()})"
        )
    dims = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    expected = header_size + int(np.prod(dims))
    if len(data) != expected:
        raise DataUnavailableError(
            f"{str(path)!r} holds {len(data)} bytes; its header {dims} "
            f"implies {expected}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)


def _load_fashion_mnist() -> Dataset:
    """Load Fashion-MNIST's 60,000 train and 10,000 test images.

    Rows are the train images followed by the test (``t10k``) images;
    ``is_test`` marks the latter. Pixels are scaled to ``[0, 1]``.
    """
    directory = _fashion_dir()
    paths = {key: directory / name for key, name in _FASHION_FILES.items()}
    absent = [p.name for p in paths.values() if not p.is_file()]
    if absent:
        raise DataUnavailableError(
            f"Fashion-MNIST not found in {str(directory)!r} (missing: "
            f"{', '.join(absent)}); " + _FASHION_INSTALL_HINT
        )
    images, labels = [], []
    for split in ("train", "t10k"):
        imgs = _read_idx(paths[split, "images-idx3"], ndim=3)
        labs = _read_idx(paths[split, "labels-idx1"], ndim=1)
        if imgs.shape[1:] != (28, 28) or imgs.shape[0] != labs.shape[0]:
            raise DataUnavailableError(
                f"Fashion-MNIST {split} files disagree: images {imgs.shape}, "
                f"labels {labs.shape}; expected (n, 28, 28) and (n,)"
            )
        images.append(imgs.reshape(imgs.shape[0], -1))
        labels.append(labs)
    x = np.concatenate(images).astype(np.float32)
    x /= np.float32(255.0)
    y = np.concatenate(labels).astype(np.int64)
    if y.max() > 9:
        raise DataUnavailableError(f"Fashion-MNIST labels exceed 9 in {directory}")
    is_test = np.zeros(len(y), dtype=np.bool_)
    is_test[len(labels[0]) :] = True
    return Dataset(
        "fashion_mnist",
        x,
        y,
        num_classes=10,
        input_shape=(1, 28, 28),
        is_test=is_test,
    )


_BUNDLED = frozenset({"bundled"})
DATASETS.add(
    "digits",
    _load_digits,
    "scikit-learn's 8x8 handwritten digits, 10 classes",
    tags=_BUNDLED,
)
DATASETS.add(
    "breast_cancer",
    _load_breast_cancer,
    "Wisconsin diagnostic breast cancer (WDBC), 30 features, 2 classes",
    tags=_BUNDLED,
)
DATASETS.add(
    "heart",
    _load_heart,
    "UCI Heart Disease, its four hospitals as natural clients",
    tags=_BUNDLED,
)
DATASETS.add(
    "fashion_mnist",
    _load_fashion_mnist,
    "Fashion-MNIST 28x28 clothing images, 10 classes (Debian package "
    "dataset-fashion-mnist)",
    tags=_BUNDLED,
)
