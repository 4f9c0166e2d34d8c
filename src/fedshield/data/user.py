"""Load the user's own data: CSV, Parquet, NPZ, image folders or a Python factory.

:func:`load_user_data` reads the files a :class:`UserDataSpec` names and
returns a :class:`UserData`: the training rows (with the client of each row
when the data defines clients), an optional test set and the class names.
Every problem with the files is reported as a
:class:`~fedshield.errors.DataFileError` before any training starts, naming
the file and, where it applies, the column, the row and the value.

Tabular files are encoded like the bundled ``heart`` data: numeric columns
keep their raw values (NaN where missing; they are imputed and standardised
per client later, see :mod:`fedshield.data.preprocess`) followed by a 0/1
``<col>_missing`` indicator when any value is missing; categorical columns
become one-hot ``<col>=<level>`` columns. Nothing is downloaded and nothing
is unpickled.

By default this schema (which columns are categorical, their levels, which
columns get a missing indicator, the class set) is derived from the records,
so the model's input width and output size can reveal a rare value, a
missing cell or a rare label. Under differential privacy the caller sets
:attr:`UserDataSpec.declared`: the schema then comes from the spec alone
(``classes``, ``levels``) and every record is checked against it.

``max_file_mb`` bounds the memory the data takes: each file (CSV on disk,
Parquet and NPZ uncompressed, each image decoded to float32) and the total
over all files read, training and test together (factor 1: the same
number of MiB bounds one file and the sum).
"""

from __future__ import annotations

import csv
import difflib
import importlib
import math
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import numpy as np

from fedshield.core.imports import CallableRef
from fedshield.data.datasets import DATASETS, TASKS, Dataset
from fedshield.errors import ConfigError, DataFileError

__all__ = ["USER_DATA_KINDS", "UserData", "UserDataSpec", "load_user_data"]

_FILES: Final = frozenset({"user", "files"})
_TABULAR: Final = _FILES | {"tabular"}


def _with_path(
    load: Callable[[UserDataSpec, Path], UserData],
) -> Callable[[UserDataSpec], UserData]:
    def read(spec: UserDataSpec) -> UserData:
        assert spec.path is not None  # checked by UserDataSpec
        return load(spec, spec.path)

    return read


def _register_user_kinds() -> tuple[str, ...]:
    """Register the user's data kinds in :data:`DATASETS`; their names.

    Tags: ``"user"``; ``"files"``, read from ``path``; ``"tabular"``, named
    columns (``label``, ``features``, ``categorical``, ``levels``...);
    ``"images"``, resized to ``image_size``; ``"factory"``, from a Python
    function.
    """
    DATASETS.add(
        "csv",
        _with_path(_load_tabular),
        "your CSV file, or a folder of one file per client; label names the "
        "label column",
        tags=_TABULAR,
    )
    DATASETS.add(
        "parquet",
        _with_path(_load_tabular),
        "your Parquet file, or a folder of one file per client (pip install "
        "'fedshield[parquet]')",
        tags=_TABULAR,
    )
    DATASETS.add(
        "npz",
        _with_path(_load_npz),
        "your NumPy .npz arrays x, y and optionally client, or one file per client",
        tags=_FILES,
    )
    DATASETS.add(
        "images",
        _with_path(_load_images),
        "your image folders: path/<client>/<class>/*.png or path/<class>/*.png",
        tags=_FILES | {"images"},
    )
    DATASETS.add(
        "python",
        _load_python,
        'your Python function, factory = "file.py:load", returning {client_id: (x, y)}',
        tags={"user", "factory"},
    )
    return DATASETS.names(tag="user")


_IMAGE_SUFFIXES: Final = frozenset({".png", ".jpg", ".jpeg"})
_IMAGE_MODES: Final = ("L", "RGB")
_MISSING_TOKENS: Final = frozenset({"", "na", "n/a", "nan", "null"})
_MISSING_LEVEL: Final = "missing"
_MAX_LISTED: Final = 12
_PARQUET_HINT: Final = "pip install 'fedshield[parquet]'"


@dataclass(frozen=True)
class UserDataSpec:
    """Where the user's data is and how to read it.

    Parameters
    ----------
    kind
        A kind of :data:`USER_DATA_KINDS`: ``"csv"``, ``"parquet"``, ``"npz"``,
        ``"images"`` or ``"python"``.
    path
        The data file or folder, already resolved against the configuration
        file's folder (not used by ``"python"``). A folder holds one file
        per client (``<client>.csv``, ``<client>.parquet``, ``<client>.npz``)
        or, for images, ``<client>/<class>/*.png`` or ``<class>/*.png``.
    label
        Label column (CSV and Parquet; required for them).
    features
        Feature columns, in this order; default every column except
        ``label`` and ``client_column``.
    categorical
        Columns to one-hot encode. A column none of whose non-empty cells is
        a number is categorical anyway.
    client_column
        Column naming each row's client (natural clients of a single file;
        the column is not a feature). In a test file it names the client
        each test row belongs to.
    test_path
        A separate test file (or folder of class folders for images), in
        the same format.
    task
        ``"classification"`` or ``"regression"``.
    classes
        The label set, in label order (compared as strings); default the
        sorted labels of the training files.
    image_size
        ``(height, width)`` to resize every image to; required when the
        images differ in size.
    image_mode
        ``"L"`` (grey) or ``"RGB"``.
    factory
        ``"python"``: a reference to a function returning
        ``{client_id: (x, y)}`` or ``({client_id: (x, y)}, (x_test, y_test))``.
    max_file_mb
        Memory limit in MiB, checked before anything is decoded. It applies
        to each file (a CSV file's size on disk; a Parquet file's
        uncompressed row groups; an NPZ file's uncompressed arrays; an
        image's decoded float32 pixels, height x width x channels x 4 bytes
        at its full size, which the decoder needs) and, with the same
        number, to the total over all files read, training and test
        together (images: their float32 pixels after ``image_size``).
    declared
        Whether the encoding must not depend on the records (set under
        differential privacy): classification needs ``classes``; a column is
        categorical exactly when ``levels`` declares its levels (every
        ``categorical`` column must), else numeric; the columns that may
        hold missing cells are those of ``missing`` (none if unset). A
        label outside ``classes``, a level outside ``levels``, a text in a
        numeric column or a missing cell in a column not in ``missing`` is
        a :class:`~fedshield.errors.DataFileError`. When False the schema
        is derived from the records.
    levels
        Declared levels of categorical columns (CSV and Parquet), in
        one-hot order: ``{column: (level, ...)}``, compared as strings. Such
        a column is encoded with exactly these levels (with or without
        ``declared``); a value outside them is a
        :class:`~fedshield.errors.DataFileError`. ``"missing"`` and the
        texts read as a missing cell (``""``, ``NA``, ...) are not levels.
    missing
        The columns that may hold missing cells (CSV and Parquet): each
        numeric one gets its ``<col>_missing`` indicator and each
        categorical one its ``<col>=missing`` column, whether or not a cell
        is missing; a missing cell in another column is a
        :class:`~fedshield.errors.DataFileError`. Unset: derived from the
        records (any column with a missing cell), or none under
        ``declared``.

    Raises
    ------
    ConfigError
        If a field is invalid or a field the kind needs is missing.
    """

    kind: str
    path: Path | None = None
    label: str | None = None
    features: tuple[str, ...] | None = None
    categorical: tuple[str, ...] = ()
    client_column: str | None = None
    test_path: Path | None = None
    task: str = "classification"
    classes: tuple[str, ...] | None = None
    image_size: tuple[int, int] | None = None
    image_mode: str = "RGB"
    factory: CallableRef | None = None
    max_file_mb: float = 1024.0
    declared: bool = False
    # Not hashed (a mapping); equal specs still hash alike.
    levels: Mapping[str, tuple[str, ...]] | None = field(default=None, hash=False)
    missing: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Paths may be given as strings (the Python API); kept as Path.
        for name in ("path", "test_path"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, Path(value))
        for name in ("features", "categorical", "classes", "missing"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        problems: list[str] = []
        if self.levels is not None:
            object.__setattr__(
                self, "levels", _normalised_levels(self.levels, problems)
            )
        kinds = DATASETS.names(tag="user")
        if self.kind not in kinds:
            problems.append(f"kind must be one of {kinds}; got {self.kind!r}")
        if self.task not in TASKS:
            problems.append(f"task must be one of {TASKS}; got {self.task!r}")
        if self.kind == "python":
            if self.factory is None:
                problems.append("kind 'python' needs a factory ('file.py:function')")
        elif self.path is None:
            problems.append(f"kind {self.kind!r} needs a path")
        if self.kind in ("csv", "parquet") and not self.label:
            problems.append(f"kind {self.kind!r} needs the label column (label)")
        if self.kind == "images" and self.task == "regression":
            problems.append(
                "kind 'images' takes its labels from class folders; "
                "task must be 'classification'"
            )
        if self.image_mode not in _IMAGE_MODES:
            problems.append(
                f"image_mode must be one of {_IMAGE_MODES}; got {self.image_mode!r}"
            )
        if self.image_size is not None and (
            len(self.image_size) != 2 or min(self.image_size) < 1
        ):
            problems.append(
                f"image_size must be (height, width) >= 1; got {self.image_size!r}"
            )
        if not (math.isfinite(self.max_file_mb) and self.max_file_mb > 0):
            problems.append(f"max_file_mb must be > 0; got {self.max_file_mb!r}")
        if self.classes is not None and (
            not self.classes or len(set(self.classes)) != len(self.classes)
        ):
            problems.append(
                f"classes must be distinct and non-empty; got {self.classes!r}"
            )
        problems += self._schema_problems()
        if problems:
            raise ConfigError("invalid data spec: " + "; ".join(problems))

    def _schema_problems(self) -> list[str]:
        """Problems with ``declared`` and ``levels``."""
        problems: list[str] = []
        if self.levels and self.kind not in ("csv", "parquet"):
            problems.append(
                f"data.levels applies to kind 'csv' and 'parquet', not {self.kind!r}"
            )
        if self.missing is not None and self.kind not in ("csv", "parquet"):
            problems.append(
                f"data.missing applies to kind 'csv' and 'parquet', not {self.kind!r}"
            )
        if not self.declared:
            return problems
        if self.task == "classification" and self.classes is None:
            problems.append(
                "a declared schema (differential privacy) needs the class set in "
                "data.classes: it may not be read from the records"
            )
        undeclared = [c for c in self.categorical if c not in (self.levels or {})]
        if undeclared:
            problems.append(
                f"a declared schema (differential privacy) needs the levels of "
                f"every categorical column in data.levels; "
                f"{_listed(undeclared)} (data.categorical) "
                f"{'has' if len(undeclared) == 1 else 'have'} none"
            )
        return problems


def _normalised_levels(
    levels: object, problems: list[str]
) -> Mapping[str, tuple[str, ...]]:
    """``levels`` as a new dict of string tuples (picklable); problems appended."""
    if not isinstance(levels, Mapping):
        problems.append(
            f"levels must map column names to lists of levels; got "
            f"{type(levels).__name__}"
        )
        return {}
    out: dict[str, tuple[str, ...]] = {}
    for column, values in levels.items():
        if not isinstance(column, str) or isinstance(values, str | bytes):
            problems.append(
                f"levels must map column names to lists of levels; got "
                f"{column!r}: {values!r}"
            )
            continue
        if not isinstance(values, Iterable):
            problems.append(f"levels of {column!r} must be a list; got {values!r}")
            continue
        texts = tuple(_label_text(v) for v in values)
        if not texts or len(set(texts)) != len(texts):
            problems.append(
                f"levels of {column!r} must be distinct and non-empty; got {texts!r}"
            )
        reserved = [t for t in texts if t == _MISSING_LEVEL or _is_missing(t)]
        if reserved:
            problems.append(
                f"levels of {column!r} include {_listed(reserved)}, which "
                f"{'stands' if len(reserved) == 1 else 'stand'} for a missing "
                f"cell (the column {column}={_MISSING_LEVEL}); leave it out"
            )
        out[column] = texts
    return out


@dataclass(frozen=True)
class UserData:
    """The user's data, loaded and encoded.

    Parameters
    ----------
    train
        The training rows; ``groups`` holds each row's client when the data
        defines clients, else ``None``.
    test
        The test set from ``test_path`` or the factory, or ``None`` (the
        caller then splits ``train``).
    client_ids
        The clients the data defines, sorted; ``None`` when the caller
        partitions the rows itself.
    label_names
        Class names in label order (classification); ``()`` for regression.
    """

    train: Dataset
    test: Dataset | None
    client_ids: tuple[str, ...] | None
    label_names: tuple[str, ...]


def load_user_data(spec: UserDataSpec) -> UserData:
    r"""Read and encode the data a spec names.

    Parameters
    ----------
    spec
        What to read.

    Returns
    -------
    UserData
        Training rows, optional test set, clients and class names.

    Raises
    ------
    DataFileError
        If a file or folder is missing, too large, unreadable or malformed
        (the message names the file, and the column, row and value where
        they apply), or the factory returns something malformed.
    ConfigError
        If reading Parquet needs pyarrow and it is not installed.

    Examples
    --------
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "data.csv").write_text(
    ...     "site,age,smoker,sick\nA,50,yes,1\nA,,no,0\nB,61,no,1\n"
    ... )
    >>> data = load_user_data(
    ...     UserDataSpec("csv", folder / "data.csv", label="sick", client_column="site")
    ... )
    >>> data.client_ids, data.label_names, data.train.feature_names
    (('A', 'B'), ('0', '1'), ('age', 'age_missing', 'smoker=no', 'smoker=yes'))
    >>> data.train.x.tolist()[1]
    [nan, 1.0, 1.0, 0.0]
    """
    data: UserData = DATASETS.get(spec.kind)(spec)
    return data


# --------------------------------------------------------------------------
# Shared helpers


def _name_of(spec: UserDataSpec) -> str:
    if spec.path is not None:
        return spec.path.stem or "user"
    return "user"


def _size_text(num_bytes: int) -> str:
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.1f} GB"
    if num_bytes >= 2**20:
        return f"{num_bytes / 2**20:.1f} MB"
    return f"{num_bytes / 2**10:.1f} KB"


_RAISE_LIMIT: Final = (
    "fedshield holds the whole data set in memory, so the limit applies to "
    "each file and to the total of all files (splitting the data into one "
    "file per client does not lift it). Raise data.max_file_mb if the machine "
    "has the memory"
)


def _limit_bytes(spec: UserDataSpec) -> float:
    return spec.max_file_mb * 2**20


def _file_over_limit(spec: UserDataSpec, subject: str, size: int) -> DataFileError:
    return DataFileError(
        f"{subject} is {_size_text(size)}, larger than the limit of "
        f"{spec.max_file_mb:g} MB (data.max_file_mb) for one file; {_RAISE_LIMIT}"
    )


def _check_size(path: Path, spec: UserDataSpec) -> int:
    """The file's size on disk; a DataFileError if it is over the limit."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise DataFileError(f"cannot read {str(path)!r}: {err}") from err
    if size > _limit_bytes(spec):
        raise _file_over_limit(spec, repr(str(path)), size)
    return size


@dataclass
class _Budget:
    """Running total of the bytes the data takes, against data.max_file_mb.

    ``what`` names the things counted (``"csv files"``, ``"decoded
    images"``), ``item`` one of them and ``unit`` how their size is
    measured.
    """

    spec: UserDataSpec
    what: str
    item: str = "file"
    unit: str = ""
    total: int = 0
    count: int = 0

    def add(self, path: Path, size: int) -> None:
        """Count one file; a DataFileError if it or the total is over the limit."""
        limit = _limit_bytes(self.spec)
        unit = f" {self.unit}" if self.unit else ""
        if size > limit:
            raise _file_over_limit(self.spec, f"{str(path)!r}{unit}", size)
        self.total += size
        self.count += 1
        if self.total > limit:
            raise DataFileError(
                f"the {self.what} total {_size_text(self.total)}{unit} with "
                f"{str(path)!r} ({self.count} {self.item}s so far, training and "
                f"test together), over the limit of {self.spec.max_file_mb:g} MB "
                f"(data.max_file_mb) for the total; each {self.item} alone is "
                f"within it. {_RAISE_LIMIT}"
            )


def _require_exists(path: Path, what: str, expected: str) -> None:
    if not path.exists():
        raise DataFileError(f"{what} {str(path)!r} does not exist; expected {expected}")


def _listed(items: Iterable[str]) -> str:
    values = list(items)
    shown = ", ".join(repr(v) for v in values[:_MAX_LISTED])
    more = f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else ""
    return shown + more


def _label_text(value: object) -> str:
    """A label or client id as a string: ``1``, ``1.0`` and ``"1"`` all give "1"."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return str(int(value))
    return str(value).strip()


def _class_text(value: object) -> str:
    """A class label as a string; numbers in one form ("10.0" and 10 give "10")."""
    text = _label_text(value)
    number = _as_number(text)
    if number is None:
        return text
    return str(int(number)) if number.is_integer() else repr(number)


def _is_missing(cell: object) -> bool:
    if cell is None:
        return True
    if isinstance(cell, float | np.floating):
        return bool(np.isnan(cell))
    if isinstance(cell, str):
        return cell.strip().lower() in _MISSING_TOKENS
    return False


def _as_number(cell: object) -> float | None:
    """The cell as a finite float, or None when it is not one."""
    if isinstance(cell, bool | np.bool_):
        return None
    if isinstance(cell, int | float | np.integer | np.floating):
        value = float(cell)
    else:
        try:
            value = float(str(cell).strip())
        except ValueError:
            return None
    return value if math.isfinite(value) else None


def _class_names(labels: Iterable[str], declared: tuple[str, ...] | None) -> list[str]:
    if declared is not None:
        return list(declared)
    names = set(labels)
    if names and all(_as_number(n) is not None for n in names):
        return sorted(names, key=lambda n: (float(n), n))
    return sorted(names)


def _encode_classes(
    labels: Sequence[str],
    index: Mapping[str, int],
    where: Callable[[int], str],
    *,
    is_test: bool,
    declared: bool,
) -> np.ndarray:
    codes = np.empty(len(labels), dtype=np.int64)
    for i, value in enumerate(labels):
        code = index.get(value)
        if code is None:
            if declared:
                reason = "is not one of the declared data.classes"
            else:  # classes from the training labels: only a test label misses
                reason = "does not occur in any training file"
            known = _listed(index) if declared or is_test else ""
            raise DataFileError(
                f"{where(i)}: label {value!r} {reason} (classes: {known})"
            )
        codes[i] = code
    return codes


def _encode_targets(
    labels: Sequence[object], where: Callable[[int], str], column: str
) -> np.ndarray:
    out = np.empty(len(labels), dtype=np.float32)
    for i, value in enumerate(labels):
        number = _as_number(value)
        if number is None:
            raise DataFileError(
                f"{where(i)}: label {column} holds {value!r}, not a finite "
                "number; regression labels must be numeric"
            )
        out[i] = number
    if not np.isfinite(out).all():
        i = int(np.flatnonzero(~np.isfinite(out))[0])
        raise DataFileError(f"{where(i)}: label {labels[i]!r} overflows float32")
    return out


@dataclass
class _Labelled:
    """Rows of one source before encoding labels: raw label values and places."""

    x: np.ndarray
    labels: list[object]
    where: Callable[[int], str]
    client: str | None = None
    groups: np.ndarray | None = None


def _labelled_datasets(
    spec: UserDataSpec,
    train: Sequence[_Labelled],
    test: _Labelled | None,
    *,
    input_shape: tuple[int, ...],
    feature_names: tuple[str, ...] = (),
    numeric_columns: np.ndarray | None = None,
    label_column: str = "y",
) -> tuple[Dataset, Dataset | None, tuple[str, ...]]:
    """Encode labels and build the train (and test) data sets."""
    name = _name_of(spec)
    width = int(np.prod(input_shape))
    common: dict[str, Any] = {
        "input_shape": input_shape,
        "feature_names": feature_names,
        "numeric_columns": numeric_columns,
        "task": spec.task,
    }
    if spec.task == "regression":
        ys = [_encode_targets(s.labels, s.where, label_column) for s in train]
        test_y = (
            None
            if test is None
            else _encode_targets(test.labels, test.where, label_column)
        )
        label_names: tuple[str, ...] = ()
        num_classes = 1
    else:
        for source in [*train, *([test] if test is not None else [])]:
            _check_no_missing_label(source, label_column)
        texts = [[_class_text(v) for v in s.labels] for s in train]
        names = _class_names((t for ts in texts for t in ts), spec.classes)
        index = {_class_text(n): k for k, n in enumerate(names)}
        declared = spec.classes is not None
        ys = [
            _encode_classes(t, index, s.where, is_test=False, declared=declared)
            for t, s in zip(texts, train, strict=True)
        ]
        test_y = (
            None
            if test is None
            else _encode_classes(
                [_class_text(v) for v in test.labels],
                index,
                test.where,
                is_test=True,
                declared=declared,
            )
        )
        label_names = tuple(names)
        num_classes = len(names)
    groups: np.ndarray | None = None
    if all(s.client is not None for s in train):
        groups = np.concatenate(
            [np.full(len(s.labels), s.client, dtype=object) for s in train]
        ).astype(np.str_)
    elif all(s.groups is not None for s in train):
        groups = np.concatenate([s.groups for s in train if s.groups is not None])
    train_x = (
        np.concatenate([s.x for s in train]) if train else np.zeros((0, width))
    ).astype(np.float32, copy=False)
    train_ds = Dataset(
        name,
        train_x,
        np.concatenate(ys),
        num_classes=num_classes,
        groups=groups,
        **common,
    )
    test_ds = None
    if test is not None:
        assert test_y is not None
        test_ds = Dataset(
            f"{name}-test",
            test.x.astype(np.float32, copy=False),
            test_y,
            num_classes=num_classes,
            groups=test.groups,
            **common,
        )
    return train_ds, test_ds, label_names


def _check_no_missing_label(source: _Labelled, column: str) -> None:
    for i, value in enumerate(source.labels):
        if _is_missing(value):
            raise DataFileError(
                f"{source.where(i)}: label {column} is missing ({value!r}); "
                "every row needs a label"
            )


def _user_data(
    train: Dataset, test: Dataset | None, label_names: tuple[str, ...]
) -> UserData:
    client_ids = None
    if train.groups is not None:
        client_ids = tuple(sorted(set(train.groups.tolist())))
    return UserData(train, test, client_ids, label_names)


# --------------------------------------------------------------------------
# CSV and Parquet


@dataclass
class _Table:
    """One file's cells, column by column, and each row's place in the file."""

    path: Path
    columns: list[str]
    cells: dict[str, list[object]]
    places: list[int]
    row_word: str
    client: str | None = None

    def __len__(self) -> int:
        return len(self.places)

    def where(self, i: int) -> str:
        return f"{str(self.path)!r} {self.row_word} {self.places[i]}"


def _read_csv(path: Path) -> _Table:
    try:
        with path.open("r", encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataFileError(
                    f"{str(path)!r} is empty; expected a header line of column names"
                )
            columns = [h.strip() for h in header]
            _check_header(path, columns)
            cells: dict[str, list[object]] = {c: [] for c in columns}
            places: list[int] = []
            for row in reader:
                if not row or all(not c.strip() for c in row):
                    continue
                if len(row) != len(columns):
                    raise DataFileError(
                        f"{str(path)!r} line {reader.line_num} has {len(row)} "
                        f"fields; the header has {len(columns)}"
                    )
                for column, cell in zip(columns, row, strict=True):
                    cells[column].append(cell)
                places.append(reader.line_num)
    except UnicodeDecodeError as err:
        raise DataFileError(
            f"{str(path)!r} is not UTF-8 text ({err}); save it as UTF-8 CSV"
        ) from err
    except csv.Error as err:
        raise DataFileError(f"{str(path)!r} is not valid CSV: {err}") from err
    except OSError as err:
        raise DataFileError(f"cannot read {str(path)!r}: {err}") from err
    return _Table(path, columns, cells, places, "line")


def _read_parquet(path: Path) -> _Table:
    pq = _parquet_module(path)
    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises its own error types
        raise DataFileError(
            f"cannot read {str(path)!r} as Parquet: {type(err).__name__}: {err}"
        ) from err
    columns = [str(c) for c in table.column_names]
    _check_header(path, columns)
    cells = {str(c): list(table.column(i).to_pylist()) for i, c in enumerate(columns)}
    return _Table(path, columns, cells, list(range(1, table.num_rows + 1)), "row")


def _check_header(path: Path, columns: list[str]) -> None:
    seen: set[str] = set()
    for k, column in enumerate(columns):
        if not column:
            raise DataFileError(f"{str(path)!r}: column {k + 1} has no name")
        if column in seen:
            raise DataFileError(f"{str(path)!r}: column {column!r} appears twice")
        seen.add(column)


def _tabular_files(spec: UserDataSpec, path: Path) -> list[tuple[Path, str | None]]:
    suffix = f".{spec.kind}"
    _require_exists(
        path,
        "data.path",
        f"a {spec.kind} file or a folder of per-client *{suffix} files",
    )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == suffix)
        files = [p for p in files if p.is_file()]
        if not files:
            raise DataFileError(
                f"folder {str(path)!r} holds no *{suffix} files; expected one "
                f"file per client, named <client>{suffix}"
            )
        found: list[tuple[Path, str | None]] = list(_client_files(files))
    else:
        found = [(path, None)]
    return found


def _client_files(files: Sequence[Path]) -> list[tuple[Path, str]]:
    """Each per-client file with its client id, the stem; ids must be distinct."""
    seen: dict[str, Path] = {}
    for file in files:
        other = seen.setdefault(file.stem, file)
        if other != file:
            raise DataFileError(
                f"{str(other)!r} and {str(file)!r} both name client "
                f"{file.stem!r} (a client is its file's name without the "
                "extension); rename one"
            )
    return [(file, file.stem) for file in files]


def _parquet_module(path: Path) -> Any:
    try:
        return importlib.import_module("pyarrow.parquet")
    except ImportError:
        raise ConfigError(
            f"reading Parquet ({str(path)!r}) needs pyarrow: {_PARQUET_HINT}"
        ) from None


def _parquet_size(path: Path) -> int:
    """Uncompressed size of a Parquet file's row groups, from its footer."""
    pq = _parquet_module(path)
    try:
        metadata = pq.read_metadata(path)
        return sum(
            int(metadata.row_group(i).total_byte_size)
            for i in range(metadata.num_row_groups)
        )
    except Exception as err:  # pyarrow raises its own error types
        raise DataFileError(
            f"cannot read {str(path)!r} as Parquet: {type(err).__name__}: {err}"
        ) from err


def _tabular_size(spec: UserDataSpec, path: Path) -> int:
    """The memory a CSV or Parquet file takes: on disk, or uncompressed."""
    size = _check_size(path, spec)
    if spec.kind == "parquet":
        size = max(size, _parquet_size(path))
    return size


def _load_tabular(spec: UserDataSpec, path: Path) -> UserData:
    reader = _read_csv if spec.kind == "csv" else _read_parquet
    files = _tabular_files(spec, path)
    if spec.test_path is not None:
        _require_exists(spec.test_path, "data.test_path", f"a {spec.kind} file")
        if spec.test_path.is_dir():
            raise DataFileError(
                f"data.test_path {str(spec.test_path)!r} is a folder; expected "
                f"one {spec.kind} file"
            )
    # Every size is known before any file is read.
    budget = _Budget(
        spec,
        f"{spec.kind} files",
        unit="uncompressed" if spec.kind == "parquet" else "",
    )
    for file in [*(f for f, _ in files), *filter(None, [spec.test_path])]:
        budget.add(file, _tabular_size(spec, file))
    tables: list[_Table] = []
    for file, client in files:
        table = reader(file)
        table.client = client
        if not len(table):
            who = f"client {client!r}" if client is not None else "it"
            raise DataFileError(
                f"{str(file)!r} has a header but no data rows, so {who} has "
                "no data; remove the file or add rows"
            )
        tables.append(table)
    test_table = None
    if spec.test_path is not None:
        test_table = reader(spec.test_path)
        if not len(test_table):
            raise DataFileError(
                f"{str(spec.test_path)!r} (data.test_path) has a header but no "
                "data rows"
            )
    return _encode_tabular(spec, tables, test_table)


def _closest(name: str, columns: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, list(columns), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_columns(
    spec: UserDataSpec, tables: Sequence[_Table], test: _Table | None
) -> list[str]:
    """Check the columns the spec names; return the feature columns."""
    first = tables[0]
    columns = first.columns
    for table in tables[1:]:
        missing = [c for c in columns if c not in table.cells]
        extra = [c for c in table.columns if c not in first.cells]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"lacks {_listed(missing)}")
            if extra:
                parts.append(f"has extra {_listed(extra)}")
            raise DataFileError(
                f"{str(table.path)!r} {' and '.join(parts)} compared with "
                f"{str(first.path)!r}; every client file must have the same "
                "columns"
            )
    label = spec.label
    assert label is not None  # checked by UserDataSpec
    where = str(first.path)
    if label not in first.cells:
        raise DataFileError(
            f"{where!r} has no label column {label!r} (data.label); its columns "
            f"are {_listed(columns)}.{_closest(label, columns)}"
        )
    # With one file per client the file names the client: client_column may
    # then be absent from the client files (it names the test rows' owners).
    per_client_files = all(t.client is not None for t in tables)
    named = (
        [("data.client_column", spec.client_column)]
        if spec.client_column and not per_client_files
        else []
    )
    named += [("data.features", c) for c in spec.features or ()]
    named += [("data.categorical", c) for c in spec.categorical]
    named += [("data.levels", c) for c in spec.levels or {}]
    for what, column in named:
        if column is not None and column not in first.cells:
            raise DataFileError(
                f"{what} names {column!r}, which is not a column of {where!r} "
                f"(columns: {_listed(columns)}).{_closest(column, columns)}"
            )
    excluded = {label, spec.client_column}
    if spec.features is not None:
        features = list(spec.features)
        bad = [c for c in features if c in excluded]
        if bad:
            raise DataFileError(
                f"data.features names {_listed(bad)}, the label or client column "
                f"of {where!r}; they cannot be features"
            )
    else:
        features = [c for c in columns if c not in excluded]
    for what, names in (
        ("data.categorical", spec.categorical),
        ("data.levels", tuple(spec.levels or {})),
    ):
        not_feature = [c for c in names if c not in features]
        if not_feature:
            raise DataFileError(
                f"{what} names {_listed(not_feature)}, which "
                f"{'is' if len(not_feature) == 1 else 'are'} not among the "
                f"features of {where!r} ({_listed(features)})"
            )
    if not features:
        raise DataFileError(f"{where!r} has no feature columns besides the label")
    if test is not None:
        missing = [c for c in [*features, label] if c not in test.cells]
        if missing:
            raise DataFileError(
                f"the test file {str(test.path)!r} lacks {_listed(missing)}, "
                f"which the training file {where!r} has"
            )
    return features


@dataclass
class _Column:
    """How one feature column is encoded."""

    name: str
    numeric: bool
    levels: list[str] = field(default_factory=list)
    has_missing: bool = False


def _spec_column(spec: UserDataSpec, name: str, sources: Sequence[_Table]) -> _Column:
    """How to encode a feature column: declared, or inferred from the records."""
    levels = (spec.levels or {}).get(name)
    allowed = (
        spec.missing if spec.missing is not None else (() if spec.declared else None)
    )
    if levels is not None:
        column = _declared_levels(name, sources, levels)
    elif spec.declared:
        column = _declared_numeric(name, sources)
    else:
        column = _infer_column(name, sources, name in spec.categorical)
    if allowed is not None:
        # Which columns carry a missing indicator is declared, not found.
        if name not in allowed:
            _refuse_missing(name, sources)
        column.has_missing = name in allowed
    return column


def _refuse_missing(name: str, sources: Sequence[_Table]) -> None:
    for table in sources:
        for i, cell in enumerate(table.cells[name]):
            if _is_missing(cell):
                raise DataFileError(
                    f"{table.where(i)}, column {name!r}: the cell is missing, but "
                    "the column is not in data.missing (the columns that may "
                    "hold missing values, declared so that the model's inputs "
                    "do not depend on the records); add it there or fill the cell"
                )


def _declared_levels(
    name: str, sources: Sequence[_Table], levels: tuple[str, ...]
) -> _Column:
    """A categorical column with the levels of data.levels; others are refused.

    Its ``<name>=missing`` column is there when a cell is missing, unless
    ``data.missing`` (or a declared schema) decides it.
    """
    known = frozenset(levels)
    has_missing = False
    for table in sources:
        for i, cell in enumerate(table.cells[name]):
            if _is_missing(cell):
                has_missing = True
            elif _label_text(cell) not in known:
                raise DataFileError(
                    f"{table.where(i)}, column {name!r}: {cell!r} is not one of "
                    f"the column's declared levels ({_listed(levels)}) in "
                    "data.levels; add it there or fix the value (leave the cell "
                    "empty if it is missing)"
                )
    return _Column(name, False, list(levels), has_missing)


def _declared_numeric(name: str, sources: Sequence[_Table]) -> _Column:
    """A numeric column of a declared schema: every value a number."""
    for table in sources:
        for i, cell in enumerate(table.cells[name]):
            if not _is_missing(cell) and _as_number(cell) is None:
                raise DataFileError(
                    f"{table.where(i)}, column {name!r}: {cell!r} is not a number; "
                    "under a declared schema (differential privacy) a column is "
                    "numeric unless its levels are declared: fix the value (leave "
                    "the cell empty if it is missing) or declare the column's "
                    "levels in data.levels"
                )
    return _Column(name, True, [], has_missing=False)


def _infer_column(name: str, sources: Sequence[_Table], categorical: bool) -> _Column:
    numbers = others = 0
    first_other: tuple[_Table, int, object] | None = None
    has_missing = False
    levels: set[str] = set()
    for table in sources:
        for i, cell in enumerate(table.cells[name]):
            if _is_missing(cell):
                has_missing = True
                continue
            levels.add(_label_text(cell))
            if _as_number(cell) is not None:
                numbers += 1
            else:
                others += 1
                if first_other is None:
                    first_other = (table, i, cell)
    if categorical or numbers == 0 or numbers < others:
        return _Column(name, False, _class_names(levels, None), has_missing)
    if first_other is not None:
        table, i, cell = first_other
        raise DataFileError(
            f"{table.where(i)}, column {name!r}: {cell!r} is not a number, but "
            f"{numbers} of the column's {numbers + others} non-empty cells are; "
            "fix the value (leave the cell empty if it is missing) or list the "
            "column in data.categorical"
        )
    return _Column(name, True, [], has_missing)


def _encode_table(table: _Table, columns: Sequence[_Column]) -> np.ndarray:
    blocks: list[np.ndarray] = []
    for col in columns:
        cells = table.cells[col.name]
        if col.numeric:
            values = np.array(
                [np.nan if _is_missing(c) else _as_number(c) for c in cells],
                dtype=np.float64,
            )
            blocks.append(values[:, None])
            if col.has_missing:
                blocks.append(np.isnan(values)[:, None].astype(np.float64))
        else:
            levels = [*col.levels, *([_MISSING_LEVEL] if col.has_missing else [])]
            index = {level: k for k, level in enumerate(levels)}
            codes = [
                index[_MISSING_LEVEL] if _is_missing(c) else index[_label_text(c)]
                for c in cells
            ]
            blocks.append(np.eye(len(levels))[np.asarray(codes, dtype=np.int64)])
    return np.concatenate(blocks, axis=1)


def _column_names(columns: Sequence[_Column]) -> tuple[tuple[str, ...], np.ndarray]:
    names: list[str] = []
    numeric: list[bool] = []
    for col in columns:
        if col.numeric:
            names.append(col.name)
            numeric.append(True)
            if col.has_missing:
                names.append(f"{col.name}_missing")
                numeric.append(False)
        else:
            levels = [*col.levels, *([_MISSING_LEVEL] if col.has_missing else [])]
            names += [f"{col.name}={level}" for level in levels]
            numeric += [False] * len(levels)
    return tuple(names), np.array(numeric, dtype=np.bool_)


def _row_clients(table: _Table, column: str) -> np.ndarray:
    out: list[str] = []
    for i, cell in enumerate(table.cells[column]):
        if _is_missing(cell):
            raise DataFileError(
                f"{table.where(i)}: the client column {column!r} is empty; "
                "every row needs its client"
            )
        out.append(_label_text(cell))
    return np.array(out, dtype=np.str_)


def _table_labels(table: _Table, label: str) -> list[object]:
    cells = table.cells[label]
    for i, cell in enumerate(cells):
        if _is_missing(cell):
            raise DataFileError(
                f"{table.where(i)}: the label column {label!r} is empty; every "
                "row needs a label (remove the row or fill it in)"
            )
    return cells


def _encode_tabular(
    spec: UserDataSpec, tables: list[_Table], test: _Table | None
) -> UserData:
    features = _check_columns(spec, tables, test)
    sources = [*tables, *([test] if test is not None else [])]
    columns = [_spec_column(spec, name, sources) for name in features]
    names, numeric = _column_names(columns)
    label = spec.label
    assert label is not None
    client_column = spec.client_column
    train: list[_Labelled] = []
    for table in tables:
        train.append(
            _Labelled(
                _encode_table(table, columns),
                _table_labels(table, label),
                table.where,
                client=table.client,
                groups=(
                    _row_clients(table, client_column)
                    if client_column and table.client is None
                    else None
                ),
            )
        )
    test_rows = None
    if test is not None:
        owner = None
        if client_column and client_column in test.cells:
            owner = _row_clients(test, client_column)
        test_rows = _Labelled(
            _encode_table(test, columns),
            _table_labels(test, label),
            test.where,
            groups=owner,
        )
    train_ds, test_ds, label_names = _labelled_datasets(
        spec,
        train,
        test_rows,
        input_shape=(len(names),),
        feature_names=names,
        numeric_columns=numeric if numeric.any() else None,
        label_column=repr(label),
    )
    return _user_data(train_ds, test_ds, label_names)


# --------------------------------------------------------------------------
# NPZ


def _npz_size(path: Path, spec: UserDataSpec) -> int:
    """The memory an .npz file's arrays take, from its zip directory.

    Each member counts its uncompressed size, or the size its ``.npy``
    header declares when that is larger; nothing is decompressed beyond
    the headers.
    """
    size = _check_size(path, spec)
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                member = info.file_size
                if info.filename.endswith(".npy") and member > 0:
                    with archive.open(info) as fh:
                        member = max(member, _npy_bytes(fh))
                total += member
    except zipfile.BadZipFile as err:
        raise DataFileError(
            f"cannot read {str(path)!r} as .npz: it is not a zip archive ({err}); "
            "save the arrays with numpy.savez"
        ) from err
    except Exception as err:  # zlib, OSError, NotImplementedError ...
        raise DataFileError(
            f"cannot read {str(path)!r} as .npz: {type(err).__name__}: {err}"
        ) from err
    return max(size, total)


def _npy_bytes(fh: IO[bytes]) -> int:
    """Bytes of the array an ``.npy`` header declares (0 if unreadable)."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = fmt.read_array_header_2_0(fh)
        else:
            return 0
    except Exception:  # np.load reports a malformed header
        return 0
    return math.prod(int(d) for d in shape) * int(dtype.itemsize)


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            missing = [k for k in ("x", "y") if k not in keys]
            if missing:
                raise DataFileError(
                    f"{str(path)!r} has no array {_listed(missing)}; it holds "
                    f"{_listed(keys) or 'no arrays'} (expected x of shape (n, ...), "
                    "y of shape (n,) and optionally client of shape (n,))"
                )
            arrays = {k: archive[k] for k in ("x", "y", "client") if k in keys}
    except DataFileError:
        raise
    except ValueError as err:
        raise DataFileError(
            f"{str(path)!r} holds object arrays, which need pickle ({err}); save "
            "plain numeric (or string) arrays with numpy.savez"
        ) from err
    except Exception as err:
        raise DataFileError(
            f"cannot read {str(path)!r} as .npz: {type(err).__name__}: {err}"
        ) from err
    return arrays


def _check_xy(
    x: np.ndarray, y: np.ndarray, source: str, *, client: np.ndarray | None = None
) -> np.ndarray:
    """Validate one source's arrays; return ``x`` flattened to 2-D."""
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataFileError(f"{source}: x holds no rows (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataFileError(f"{source}: x must be numeric; got dtype {x.dtype}")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataFileError(
            f"{source}: y must have shape ({x.shape[0]},), one label per row of "
            f"x {x.shape}; got {y.shape}"
        )
    if client is not None and client.shape != y.shape:
        raise DataFileError(
            f"{source}: client must have shape {y.shape}; got {client.shape}"
        )
    # float32 is what the model sees; a value beyond its range becomes inf.
    with np.errstate(over="ignore", invalid="ignore"):
        flat = x.reshape(x.shape[0], -1).astype(np.float32)
    bad = ~np.isfinite(flat)
    if bad.any():
        row = int(np.flatnonzero(bad.any(axis=1))[0])
        raise DataFileError(
            f"{source}: x[{row}] holds NaN or infinity (or a value beyond "
            "float32's range); x must be finite"
        )
    return flat


def _load_npz(spec: UserDataSpec, path: Path) -> UserData:
    _require_exists(
        path, "data.path", "an .npz file or a folder of per-client *.npz files"
    )
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".npz")
        if not files:
            raise DataFileError(
                f"folder {str(path)!r} holds no *.npz files; expected one file "
                "per client, named <client>.npz"
            )
        found: list[tuple[Path, str | None]] = list(_client_files(files))
    else:
        found = [(path, None)]
    if spec.test_path is not None:
        _require_exists(spec.test_path, "data.test_path", "an .npz file")
    # Every size is known before any array is read.
    budget = _Budget(spec, "npz files", unit="uncompressed")
    for file in [*(f for f, _ in found), *filter(None, [spec.test_path])]:
        budget.add(file, _npz_size(file, spec))
    loaded = [(file, client, _npz_arrays(file)) for file, client in found]
    train: list[_Labelled] = []
    shape: tuple[int, ...] | None = None
    first = ""
    for file, client, arrays in loaded:
        source = repr(str(file))
        x, y = arrays["x"], arrays["y"]
        owner = arrays.get("client") if client is None else None
        flat = _check_xy(x, y, source, client=owner)
        row_shape = tuple(int(d) for d in x.shape[1:]) or (1,)
        if shape is None:
            shape, first = row_shape, source
        elif row_shape != shape:
            raise DataFileError(
                f"{source}: x rows have shape {row_shape} but {first} has {shape}"
            )
        train.append(
            _Labelled(
                flat,
                y.tolist(),
                _index_where(source),
                client=client,
                groups=None if owner is None else _client_strings(owner),
            )
        )
    assert shape is not None
    test = None
    if spec.test_path is not None:
        arrays = _npz_arrays(spec.test_path)
        source = repr(str(spec.test_path))
        owner = arrays.get("client")
        flat = _check_xy(arrays["x"], arrays["y"], source, client=owner)
        row_shape = tuple(int(d) for d in arrays["x"].shape[1:]) or (1,)
        if row_shape != shape:
            raise DataFileError(
                f"{source}: x rows have shape {row_shape} but {first} has {shape}"
            )
        test = _Labelled(
            flat,
            arrays["y"].tolist(),
            _index_where(source),
            groups=None if owner is None else _client_strings(owner),
        )
    train_ds, test_ds, names = _labelled_datasets(spec, train, test, input_shape=shape)
    return _user_data(train_ds, test_ds, names)


def _index_where(source: str) -> Callable[[int], str]:
    def where(i: int) -> str:
        return f"{source} index {i}"

    return where


def _client_strings(values: np.ndarray) -> np.ndarray:
    return np.array([_label_text(v) for v in values.tolist()], dtype=np.str_)


# --------------------------------------------------------------------------
# Image folders


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(
        p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")
    )


_PER_CLIENT = "per-client layout <path>/<client>/<class>/*.png"
_CLASSES = "class-folder layout <path>/<class>/*.png"


def _image_layout(path: Path) -> tuple[bool, list[Path]]:
    """``(per_client, top folders)`` of an image tree, or a DataFileError."""
    expected = f"the {_PER_CLIENT} or the {_CLASSES}"
    _require_exists(path, "data.path", f"a folder in {expected}")
    if not path.is_dir():
        raise DataFileError(
            f"data.path {str(path)!r} is a file; expected a folder in {expected}"
        )
    top = _subfolders(path)
    if not top:
        loose = _images_in(path)
        what = f"images ({loose[0].name}, ...) but no" if loose else "no"
        raise DataFileError(
            f"folder {str(path)!r} holds {what} subfolders; expected {expected}"
        )
    with_images = [d for d in top if _images_in(d)]
    if len(with_images) == len(top):
        return False, top
    if not with_images:
        return True, top
    without = [d for d in top if d not in with_images]
    raise DataFileError(
        f"folder {str(path)!r} mixes layouts: {str(with_images[0])!r} holds images "
        f"(the {_CLASSES}) but {str(without[0])!r} holds none (the "
        f"{_PER_CLIENT}); use one layout"
    )


@dataclass
class _ImageReader:
    """Reads images one by one, checking each one's and the total memory.

    Before an image is decoded, its size from the header is checked: the
    decoded float32 pixels at full size (height x width x channels x 4
    bytes, which bounds what the decoder needs) may not exceed
    ``max_file_mb``; the float32 pixels kept (after ``image_size``) of all
    images read, training and test, may not exceed it either.
    """

    spec: UserDataSpec
    layout: str
    size: tuple[int, int] | None = None  # (height, width) of the first image
    first: Path | None = None
    budget: _Budget = field(init=False)

    def __post_init__(self) -> None:
        self.budget = _Budget(
            self.spec,
            "decoded images",
            item="image",
            unit="as float32 (height x width x channels x 4)",
        )

    def _check_pixels(self, file: Path, height: int, width: int) -> None:
        channels = len(self.spec.image_mode)
        decoded = height * width * channels * 4
        if decoded > _limit_bytes(self.spec):
            raise DataFileError(
                f"image {str(file)!r} is {height}x{width} pixels (height x width); "
                f"decoded as {self.spec.image_mode} float32 it takes "
                f"{_size_text(decoded)}, larger than the limit of "
                f"{self.spec.max_file_mb:g} MB (data.max_file_mb) for one image "
                "(the decoder needs the full size, whatever data.image_size). "
                "Shrink the image, or raise data.max_file_mb if the machine has "
                "the memory"
            )
        kept_height, kept_width = self.spec.image_size or (height, width)
        self.budget.add(file, kept_height * kept_width * channels * 4)

    def read(self, file: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        _check_size(file, self.spec)
        try:
            # PIL warns above Image.MAX_IMAGE_PIXELS; the size is checked
            # here against data.max_file_mb instead, before decoding.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                opened = Image.open(file)
            with opened as image:
                width, height = image.size
                self._check_pixels(file, int(height), int(width))
                converted = image.convert(self.spec.image_mode)
                if self.spec.image_size is not None:
                    height, width = self.spec.image_size
                    converted = converted.resize((width, height))
                pixels = np.asarray(converted, dtype=np.float32) / np.float32(255.0)
        except Image.DecompressionBombError as err:
            raise DataFileError(
                f"image {str(file)!r} is refused as a possible decompression bomb: "
                f"{err} (PIL's Image.MAX_IMAGE_PIXELS)"
            ) from err
        except DataFileError:
            raise
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise DataFileError(
                f"cannot read image {str(file)!r} ({self.layout}): "
                f"{type(err).__name__}: {err}"
            ) from err
        size = (int(pixels.shape[0]), int(pixels.shape[1]))
        if self.size is None:
            self.size, self.first = size, file
        elif size != self.size:
            raise DataFileError(
                f"image {str(file)!r} is {size[0]}x{size[1]} (height x width) but "
                f"{str(self.first)!r} is {self.size[0]}x{self.size[1]} "
                f"({self.layout}); set data.image_size = [height, width] to "
                "resize every image"
            )
        # (H, W) grey or (H, W, C) colour -> channels first.
        pixels = pixels[None] if pixels.ndim == 2 else np.moveaxis(pixels, 2, 0)
        return pixels.reshape(-1)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        assert self.size is not None
        return (len(self.spec.image_mode), *self.size)


def _read_class_folders(
    reader: _ImageReader, folders: Sequence[Path], client: str | None, layout: str
) -> _Labelled:
    rows: list[np.ndarray] = []
    labels: list[object] = []
    places: list[str] = []
    for folder in folders:
        images = _images_in(folder)
        if not images:
            raise DataFileError(
                f"class folder {str(folder)!r} holds no .png/.jpg/.jpeg images "
                f"({layout})"
            )
        for file in images:
            rows.append(reader.read(file))
            labels.append(folder.name)
            places.append(repr(str(file)))
    return _Labelled(np.stack(rows), labels, places.__getitem__, client=client)


def _load_images(spec: UserDataSpec, path: Path) -> UserData:
    per_client, top = _image_layout(path)
    reader = _ImageReader(spec, _PER_CLIENT if per_client else _CLASSES)
    train: list[_Labelled] = []
    if per_client:
        for client_dir in top:
            classes = _subfolders(client_dir)
            if not classes:
                raise DataFileError(
                    f"client folder {str(client_dir)!r} holds no class folders "
                    f"({_PER_CLIENT}); it would be an empty client"
                )
            train.append(
                _read_class_folders(reader, classes, client_dir.name, _PER_CLIENT)
            )
    else:
        train.append(_read_class_folders(reader, top, None, _CLASSES))
    test = None
    if spec.test_path is not None:
        _require_exists(spec.test_path, "data.test_path", "a folder of class folders")
        folders = _subfolders(spec.test_path) if spec.test_path.is_dir() else []
        if not folders:
            raise DataFileError(
                f"data.test_path {str(spec.test_path)!r} holds no class folders; "
                "expected <test_path>/<class>/*.png"
            )
        test = _read_class_folders(reader, folders, None, "test folder")
    train_ds, test_ds, names = _labelled_datasets(
        spec, train, test, input_shape=reader.input_shape
    )
    return _user_data(train_ds, test_ds, names)


# --------------------------------------------------------------------------
# Python factory


def _load_python(spec: UserDataSpec) -> UserData:
    factory = spec.factory
    assert factory is not None
    what = f"data.factory {factory.spec!r}"
    function = factory.resolve()
    try:
        result = function()
    except Exception as err:
        raise DataFileError(f"{what} raised {type(err).__name__}: {err}") from err
    clients_obj: object = result
    test_obj: object = None
    if isinstance(result, tuple):
        if len(result) != 2:
            raise DataFileError(
                f"{what} returned a tuple of {len(result)} items; expected "
                "{client_id: (x, y)} or ({client_id: (x, y)}, (x_test, y_test))"
            )
        clients_obj, test_obj = result
    if not isinstance(clients_obj, Mapping) or not clients_obj:
        raise DataFileError(
            f"{what} returned {type(clients_obj).__name__}; expected a non-empty "
            "dict {client_id: (x, y)} of numpy arrays (optionally paired with a "
            "test set: (clients, (x_test, y_test)))"
        )
    keys: dict[str, object] = {}
    for key in clients_obj:
        other = keys.setdefault(str(key), key)
        if other is not key:
            raise DataFileError(
                f"{what} returned client ids {other!r} and {key!r}, which are both "
                f"{str(key)!r} as text (client ids are strings); make them distinct"
            )
    train: list[_Labelled] = []
    shape: tuple[int, ...] | None = None
    for client_id in sorted(keys):
        key = keys[client_id]
        source = f"{what}, client {client_id!r}"
        x, y = _pair(clients_obj[key], source)
        flat = _check_xy(x, y, source)
        row_shape = tuple(int(d) for d in x.shape[1:]) or (1,)
        if shape is None:
            shape = row_shape
        elif row_shape != shape:
            raise DataFileError(
                f"{source}: x rows have shape {row_shape}; other clients' have {shape}"
            )
        train.append(
            _Labelled(flat, y.tolist(), _index_where(source), client=client_id)
        )
    assert shape is not None
    test = None
    if test_obj is not None:
        source = f"{what}, test set"
        x, y = _pair(test_obj, source)
        flat = _check_xy(x, y, source)
        row_shape = tuple(int(d) for d in x.shape[1:]) or (1,)
        if row_shape != shape:
            raise DataFileError(
                f"{source}: x rows have shape {row_shape}; the clients' have {shape}"
            )
        test = _Labelled(flat, y.tolist(), _index_where(source))
    train_ds, test_ds, names = _labelled_datasets(spec, train, test, input_shape=shape)
    return _user_data(train_ds, test_ds, names)


def _pair(value: object, source: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise DataFileError(
            f"{source}: expected a pair (x, y) of numpy arrays; got "
            f"{type(value).__name__}"
        )
    arrays = []
    for name, item in zip(("x", "y"), value, strict=True):
        if not isinstance(item, np.ndarray):
            raise DataFileError(
                f"{source}: {name} must be a numpy array; got {type(item).__name__}"
            )
        if item.dtype == object:
            raise DataFileError(f"{source}: {name} has dtype object; use numbers")
        arrays.append(item)
    return arrays[0], arrays[1]


USER_DATA_KINDS: tuple[str, ...] = _register_user_kinds()
"""Values of :attr:`UserDataSpec.kind`: the data set kinds of
:data:`~fedshield.data.DATASETS` tagged ``"user"``."""
