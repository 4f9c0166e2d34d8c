from __future__ import annotations

import csv
import gzip
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest

import fedshield.data.datasets as datasets_module
from fedshield.data import DATASETS, Dataset, load_dataset, split_test
from fedshield.errors import ConfigError, DataUnavailableError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def toy_dataset(labels: list[int], **kwargs) -> Dataset:
    y = np.array(labels, dtype=np.int64)
    x = np.arange(len(y), dtype=np.float32).reshape(-1, 1)
    return Dataset(
        "toy", x, y, num_classes=int(y.max()) + 1, input_shape=(1,), **kwargs
    )


def heart_rows() -> list[dict[str, str]]:
    path = resources.files("fedshield.data").joinpath("files", "heart_disease_uci.csv")
    with path.open("r", encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


# Import cost ------------------------------------------------------------------


def test_import_fedshield_data_loads_neither_sklearn_nor_torch() -> None:
    code = (
        "import sys, fedshield.data; "
        "print('sklearn' in sys.modules, 'torch' in sys.modules)"
    )

    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )

    assert out.stdout.split() == ["False", "False"]


# load_dataset -------------------------------------------------------------------


def test_load_dataset_unknown_name_lists_choices_and_suggests() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("fashion-mnist")

    message = str(info.value)
    assert "got 'fashion-mnist'" in message
    for name in DATASETS.names(tag="bundled"):
        assert repr(name) in message
    assert "Did you mean 'fashion_mnist'?" in message


def test_load_dataset_unrelated_name_has_no_suggestion() -> None:
    with pytest.raises(ConfigError) as info:
        load_dataset("zzz")

    assert "Did you mean" not in str(info.value)


def test_load_dataset_digits_shapes_and_scale() -> None:
    ds = load_dataset("digits")

    assert ds.x.shape == (1797, 64)
    assert ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    assert ds.input_shape == (1, 8, 8)
    assert ds.num_classes == 10
    assert set(np.unique(ds.y).tolist()) == set(range(10))
    assert ds.x.min() == 0.0
    assert ds.x.max() == 1.0
    assert ds.groups is None
    assert ds.is_test is None


def test_load_dataset_breast_cancer_is_raw_with_every_column_numeric() -> None:
    ds = load_dataset("breast_cancer")

    assert ds.x.shape == (569, 30)
    assert ds.input_shape == (30,)
    assert ds.num_classes == 2
    assert np.bincount(ds.y).tolist() == [212, 357]
    assert len(ds.feature_names) == 30
    # Raw values: standardised later, per client (preprocess_per_client).
    assert ds.x[0, 0] == pytest.approx(17.99)
    assert ds.numeric_columns is not None
    assert ds.numeric_columns.all()
    assert np.isfinite(ds.x).all()


# heart ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heart() -> Dataset:
    return load_dataset("heart")


def test_heart_has_920_rows_four_hospitals_and_nan_only_in_numeric_columns(
    heart: Dataset,
) -> None:
    assert len(heart) == 920
    assert heart.x.shape[0] == 920
    assert heart.numeric_columns is not None
    assert np.isnan(heart.x[:, heart.numeric_columns]).any()
    assert np.isfinite(heart.x[:, ~heart.numeric_columns]).all()
    assert heart.x.dtype == np.float32
    assert heart.groups is not None
    names, sizes = np.unique(heart.groups, return_counts=True)
    assert dict(zip(names.tolist(), sizes.tolist(), strict=True)) == {
        "Cleveland": 304,
        "Hungary": 293,
        "VA Long Beach": 200,
        "Switzerland": 123,
    }
    assert heart.input_shape == (heart.x.shape[1],)
    assert len(heart.feature_names) == heart.x.shape[1]


def test_heart_label_is_num_greater_than_zero(heart: Dataset) -> None:
    expected = [int(int(r["num"]) > 0) for r in heart_rows()]

    assert heart.num_classes == 2
    assert heart.y.tolist() == expected
    assert np.bincount(heart.y).tolist() == [411, 509]


def test_heart_excludes_id_and_dataset_columns(heart: Dataset) -> None:
    for name in heart.feature_names:
        assert not name.startswith(("id", "dataset", "num"))


def test_heart_missing_indicators_match_raw_file(heart: Dataset) -> None:
    rows = heart_rows()
    col = {name: k for k, name in enumerate(heart.feature_names)}

    def missing(feature: str, zero_is_missing: bool = False) -> np.ndarray:
        return np.array(
            [
                r[feature] == "" or (zero_is_missing and float(r[feature]) == 0)
                for r in rows
            ]
        )

    chol_missing = missing("chol", zero_is_missing=True)
    assert chol_missing.sum() == 202  # 30 empty + 172 recorded as 0
    np.testing.assert_array_equal(heart.x[:, col["chol_missing"]], chol_missing)
    np.testing.assert_array_equal(
        heart.x[:, col["trestbps_missing"]], missing("trestbps", zero_is_missing=True)
    )
    np.testing.assert_array_equal(heart.x[:, col["ca_missing"]], missing("ca"))
    # oldpeak == 0 is a real measurement, not a missing value.
    np.testing.assert_array_equal(
        heart.x[:, col["oldpeak_missing"]], missing("oldpeak")
    )
    np.testing.assert_array_equal(heart.x[:, col["thal=missing"]], missing("thal"))


def test_heart_numeric_columns_are_raw_values_over_public_scales_nan_for_missing(
    heart: Dataset,
) -> None:
    rows = heart_rows()
    raw = np.array([float(r["chol"]) if r["chol"] else 0.0 for r in rows])
    # empty and 0 are missing; the scale (600) is a constant, not a statistic
    expected = np.where(raw > 0, raw, np.nan) / 600.0
    col = heart.feature_names.index("chol")

    np.testing.assert_allclose(heart.x[:, col], expected, rtol=1e-6)
    numeric = ("age", "trestbps", "chol", "thalch", "oldpeak", "ca")
    assert heart.numeric_columns is not None
    assert [
        n for n, m in zip(heart.feature_names, heart.numeric_columns, strict=True) if m
    ] == list(numeric)
    for name in numeric:
        column = heart.x[:, heart.feature_names.index(name)]
        missing = heart.x[:, heart.feature_names.index(f"{name}_missing")]
        np.testing.assert_array_equal(np.isnan(column), missing == 1.0)


def test_heart_categoricals_are_one_hot_with_missing_level(heart: Dataset) -> None:
    for feature in ("sex", "cp", "fbs", "restecg", "exang", "slope", "thal"):
        cols = [
            k for k, n in enumerate(heart.feature_names) if n.startswith(feature + "=")
        ]
        block = heart.x[:, cols]
        assert set(np.unique(block).tolist()) <= {0.0, 1.0}
        np.testing.assert_array_equal(block.sum(axis=1), 1.0)
    assert "sex=missing" not in heart.feature_names  # sex is never missing
    assert "slope=missing" in heart.feature_names


def test_heart_checksum_mismatch_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets_module, "_HEART_SHA256", "0" * 64)

    with pytest.raises(DataUnavailableError, match="sha256"):
        load_dataset("heart")


def test_heart_attribution_file_is_vendored() -> None:
    text = (
        resources.files("fedshield.data")
        .joinpath("files", "HEART_DISEASE_ATTRIBUTION.md")
        .read_text(encoding="utf-8")
    )

    assert "CC BY 4.0" in text
    assert "10.24432/C52P4X" in text
    assert datasets_module._HEART_SHA256 in text


# fashion_mnist ----------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        d.to_bytes(4, "big") for d in array.shape
    )
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_fake_fashion(directory: Path, *, num_train: int, num_test: int) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", num_train), ("t10k", num_test)):
        write_idx(
            directory / f"{split}-images-idx3-ubyte.gz",
            rng.integers(0, 256, size=(n, 28, 28)),
        )
        write_idx(directory / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)


def test_fashion_mnist_empty_dir_raises_with_install_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FEDSHIELD_FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(DataUnavailableError) as info:
        load_dataset("fashion_mnist")

    message = str(info.value)
    assert str(tmp_path) in message
    assert "sudo apt-get install dataset-fashion-mnist" in message
    assert "FEDSHIELD_FASHION_MNIST_DIR" in message
    assert "never downloads" in message
    assert "train-images-idx3-ubyte.gz" in message


def test_fashion_mnist_parses_idx_from_env_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path, num_train=12, num_test=5)
    monkeypatch.setenv("FEDSHIELD_FASHION_MNIST_DIR", str(tmp_path))

    ds = load_dataset("fashion_mnist")

    assert ds.x.shape == (17, 784)
    assert ds.x.dtype == np.float32
    assert ds.input_shape == (1, 28, 28)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0
    assert ds.y.tolist() == [*(np.arange(12) % 10), *(np.arange(5) % 10)]
    assert ds.is_test is not None
    assert ds.is_test.tolist() == [False] * 12 + [True] * 5
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz") as fh:
        first_test = np.frombuffer(fh.read()[16 : 16 + 784], dtype=np.uint8)
    np.testing.assert_allclose(ds.x[12], first_test / 255.0, rtol=1e-6)


def test_fashion_mnist_bad_magic_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path, num_train=3, num_test=2)
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + b"\0" * 12)
    monkeypatch.setenv("FEDSHIELD_FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(DataUnavailableError, match="not an unsigned-byte IDX"):
        load_dataset("fashion_mnist")


def test_fashion_mnist_truncated_file_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_fashion(tmp_path, num_train=3, num_test=2)
    with gzip.open(tmp_path / "t10k-images-idx3-ubyte.gz", "wb") as fh:
        fh.write(
            bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28))
        )
    monkeypatch.setenv("FEDSHIELD_FASHION_MNIST_DIR", str(tmp_path))

    with pytest.raises(DataUnavailableError, match="implies"):
        load_dataset("fashion_mnist")


def test_fashion_mnist_real_files_load(monkeypatch: pytest.MonkeyPatch) -> None:
    if not all((FASHION_DIR / name).is_file() for name in FASHION_NAMES):
        pytest.skip("dataset-fashion-mnist is not installed")
    monkeypatch.delenv("FEDSHIELD_FASHION_MNIST_DIR", raising=False)

    ds = load_dataset("fashion_mnist")

    assert ds.x.shape == (70_000, 784)
    assert ds.num_classes == 10
    assert ds.is_test is not None
    assert int(ds.is_test.sum()) == 10_000
    assert not ds.is_test[:60_000].any()
    assert np.bincount(ds.y[ds.is_test]).tolist() == [1000] * 10
    train, test = split_test(ds, test_fraction=0.5, rng=np.random.default_rng(0))
    assert (len(train), len(test)) == (60_000, 10_000)


# Dataset ----------------------------------------------------------------------


def test_dataset_subset_keeps_metadata_and_selects_rows() -> None:
    ds = toy_dataset(
        [0, 1, 2, 1],
        groups=np.array(["a", "b", "a", "b"]),
        is_test=np.array([False, True, False, True]),
    )

    sub = ds.subset(np.array([3, 0]))

    assert len(sub) == 2
    assert sub.x[:, 0].tolist() == [3.0, 0.0]
    assert sub.y.tolist() == [1, 0]
    assert sub.groups is not None and sub.groups.tolist() == ["b", "a"]
    assert sub.is_test is not None and sub.is_test.tolist() == [True, False]
    assert (sub.name, sub.num_classes, sub.input_shape) == ("toy", 3, (1,))


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"x": np.zeros((3, 2), dtype=np.float64)}, "x must be 2-D float32"),
        ({"y": np.array([0, 1, 1], dtype=np.int32)}, "y must be 1-D int64"),
        ({"y": np.array([0, 1], dtype=np.int64)}, "x has 3 rows but y has 2"),
        ({"y": np.array([0, 1, 2], dtype=np.int64)}, "labels must lie in 0..1"),
        ({"input_shape": (3,)}, "does not hold 2 features"),
        ({"feature_names": ("a",)}, "1 feature_names for 2 features"),
        ({"groups": np.array(["a"])}, "groups must have shape (3,)"),
        ({"is_test": np.array([0, 1, 0])}, "is_test must be bool"),
    ],
)
def test_dataset_inconsistent_fields_raise(kwargs, fragment) -> None:
    fields = {
        "name": "bad",
        "x": np.zeros((3, 2), dtype=np.float32),
        "y": np.array([0, 1, 1], dtype=np.int64),
        "num_classes": 2,
        "input_shape": (2,),
        **kwargs,
    }

    with pytest.raises(ConfigError) as info:
        Dataset(**fields)

    assert fragment in str(info.value)


# split_test -------------------------------------------------------------------


def test_split_test_is_stratified_disjoint_and_complete() -> None:
    ds = load_dataset("digits")

    train, test = split_test(ds, test_fraction=0.25, rng=np.random.default_rng(0))

    assert len(train) + len(test) == len(ds)
    assert len(test) == round(0.25 * len(ds))
    per_class = np.bincount(ds.y, minlength=10)
    test_per_class = np.bincount(test.y, minlength=10)
    assert np.all(np.abs(test_per_class - 0.25 * per_class) <= 1)
    # Rows are identified by their pixel content plus label.
    rows = {(*r.tobytes(), int(c)) for r, c in zip(ds.x, ds.y, strict=True)}
    split_rows = [
        (*r.tobytes(), int(c))
        for part in (train, test)
        for r, c in zip(part.x, part.y, strict=True)
    ]
    assert len(set(split_rows)) == len(rows)


def test_split_test_hand_computed_toy() -> None:
    ds = toy_dataset([0] * 6 + [1] * 4)

    train, test = split_test(ds, test_fraction=0.5, rng=np.random.default_rng(7))

    assert np.bincount(test.y).tolist() == [3, 2]
    assert np.bincount(train.y).tolist() == [3, 2]
    assert set(train.x[:, 0].tolist()).isdisjoint(test.x[:, 0].tolist())
    assert len(train) + len(test) == 10


def test_split_test_same_seed_same_split() -> None:
    ds = toy_dataset(list(np.arange(50) % 3))

    a = split_test(ds, test_fraction=0.3, rng=np.random.default_rng(5))[1]
    b = split_test(ds, test_fraction=0.3, rng=np.random.default_rng(5))[1]
    c = split_test(ds, test_fraction=0.3, rng=np.random.default_rng(6))[1]

    assert a.x[:, 0].tolist() == b.x[:, 0].tolist()
    assert a.x[:, 0].tolist() != c.x[:, 0].tolist()


def test_split_test_uses_official_split_when_present() -> None:
    is_test = np.array([False, False, True, False, True, False])
    ds = toy_dataset([0, 1, 0, 1, 1, 0], is_test=is_test)

    train, test = split_test(ds, test_fraction=0.9, rng=np.random.default_rng(0))

    assert test.x[:, 0].tolist() == [2.0, 4.0]
    assert train.x[:, 0].tolist() == [0.0, 1.0, 3.0, 5.0]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_test_fraction_out_of_range_raises(fraction: float) -> None:
    ds = toy_dataset([0, 1, 0, 1])

    with pytest.raises(ConfigError, match="`test_fraction` of split_test"):
        split_test(ds, test_fraction=fraction, rng=np.random.default_rng(0))


def test_split_test_empty_test_part_raises() -> None:
    ds = toy_dataset([0, 1, 0, 1])

    with pytest.raises(ConfigError, match="leaves 0 test rows"):
        split_test(ds, test_fraction=0.1, rng=np.random.default_rng(0))


def test_digits_read_without_importing_sklearn_equal_sklearn_loader() -> None:
    # Reference: scikit-learn's own loader.
    from sklearn.datasets import load_digits

    from fedshield.data import load_dataset

    ours = load_dataset("digits")
    bunch = load_digits()
    np.testing.assert_array_equal(ours.x, (bunch.data / 16.0).astype(np.float32))
    np.testing.assert_array_equal(ours.y, bunch.target)
    assert list(ours.feature_names) == list(bunch.feature_names)


def test_loading_digits_does_not_import_sklearn() -> None:
    import subprocess
    import sys

    code = (
        "import sys\nfrom fedshield.data import load_dataset\n"
        "load_dataset('digits')\nprint('sklearn' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
