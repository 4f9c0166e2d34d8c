from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from fedshield.core.imports import CallableRef
from fedshield.data import UserDataSpec, load_user_data, preprocess_per_client
from fedshield.errors import ConfigError, DataFileError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def csv_spec(path: Path, **kwargs) -> UserDataSpec:
    return UserDataSpec("csv", path, label=kwargs.pop("label", "y"), **kwargs)


def data_error(spec: UserDataSpec) -> str:
    with pytest.raises(DataFileError) as info:
        load_user_data(spec)
    assert info.value.exit_code == 10
    assert isinstance(info.value, ConfigError)
    return str(info.value)


# CSV happy paths ---------------------------------------------------------------


def test_csv_single_file_with_client_column(tmp_path: Path) -> None:
    path = write(
        tmp_path / "data.csv",
        "site,age,color,y\nA,50,red,yes\nB,61,blue,no\nA,,red,no\nC,40,,yes\n",
    )

    data = load_user_data(csv_spec(path, client_column="site"))

    assert data.client_ids == ("A", "B", "C")
    assert data.label_names == ("no", "yes")
    train = data.train
    assert train.feature_names == (
        "age",
        "age_missing",
        "color=blue",
        "color=red",
        "color=missing",
    )
    assert train.groups is not None
    assert train.groups.tolist() == ["A", "B", "A", "C"]
    assert train.y.tolist() == [1, 0, 0, 1]
    assert train.numeric_columns is not None
    assert train.numeric_columns.tolist() == [True, False, False, False, False]
    np.testing.assert_array_equal(
        train.x,
        np.array(
            [
                [50, 0, 0, 1, 0],
                [61, 0, 1, 0, 0],
                [np.nan, 1, 0, 1, 0],
                [40, 0, 0, 0, 1],
            ],
            dtype=np.float32,
        ),
    )
    assert data.test is None
    assert train.task == "classification"


def test_csv_directory_of_clients_one_hot_union_across_files(tmp_path: Path) -> None:
    write(tmp_path / "d" / "hospital_b.csv", "x,kind,y\n1,cat,0\n2,dog,1\n")
    write(tmp_path / "d" / "hospital_a.csv", "kind,y,x\nemu,1,NA\n")

    data = load_user_data(csv_spec(tmp_path / "d"))

    assert data.client_ids == ("hospital_a", "hospital_b")
    # Columns in the order of the first file (sorted by name): hospital_a.
    assert data.train.feature_names == (
        "kind=cat",
        "kind=dog",
        "kind=emu",
        "x",
        "x_missing",
    )
    assert data.train.groups is not None
    assert data.train.groups.tolist() == ["hospital_a", "hospital_b", "hospital_b"]
    np.testing.assert_array_equal(data.train.x[0, [0, 1, 2, 4]], [0, 0, 1, 1])
    assert np.isnan(data.train.x[0, 3])
    np.testing.assert_array_equal(data.train.x[2], [0, 1, 0, 2, 0])


def test_csv_numeric_labels_sort_numerically(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,10\n2,9\n3,2\n4,10.0\n")

    data = load_user_data(csv_spec(path))

    assert data.label_names == ("2", "9", "10")
    assert data.train.y.tolist() == [2, 1, 0, 2]
    assert data.client_ids is None
    assert data.train.groups is None


def test_csv_declared_classes_set_the_order(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,low\n2,high\n")

    data = load_user_data(csv_spec(path, classes=("low", "mid", "high")))

    assert data.label_names == ("low", "mid", "high")
    assert data.train.num_classes == 3
    assert data.train.y.tolist() == [0, 2]


def test_csv_features_and_categorical_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,b,code,y\n1,5,3,0\n2,6,4,1\n")

    data = load_user_data(csv_spec(path, features=("code", "a"), categorical=("code",)))

    assert data.train.feature_names == ("code=3", "code=4", "a")


def test_csv_regression_labels(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,price\n1,2.5\n2,-1e3\n")

    data = load_user_data(csv_spec(path, label="price", task="regression"))

    assert data.train.task == "regression"
    assert data.train.num_classes == 1
    assert data.train.y.dtype == np.float32
    assert data.train.y.tolist() == [2.5, -1000.0]
    assert data.label_names == ()


def test_csv_test_file_with_owners(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "site,a,y\nA,1,0\nB,2,1\nA,3,1\n")
    test_path = write(tmp_path / "test.csv", "site,a,y\nB,4,1\nA,5,0\n")

    data = load_user_data(csv_spec(path, client_column="site", test_path=test_path))

    assert data.test is not None
    assert data.test.y.tolist() == [1, 0]
    assert data.test.groups is not None
    assert data.test.groups.tolist() == ["B", "A"]
    assert data.test.feature_names == data.train.feature_names
    # The owners feed preprocess_per_client.
    parts = {c: np.flatnonzero(data.train.groups == c) for c in data.client_ids or ()}
    train, test = preprocess_per_client(data.train, parts, data.test, data.test.groups)
    assert np.isfinite(train.x).all() and np.isfinite(test.x).all()


def test_csv_missing_values_in_test_only_still_get_an_indicator(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "train.csv", "a,y\n1,0\n2,1\n")
    test_path = write(tmp_path / "test.csv", "a,y\n,1\n")

    data = load_user_data(csv_spec(path, test_path=test_path))

    assert data.train.feature_names == ("a", "a_missing")
    assert data.test is not None
    assert data.test.x[0, 1] == 1.0


# Parquet ----------------------------------------------------------------------


def write_parquet(path: Path, columns: dict[str, list]) -> Path:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_single_file_with_client_column(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "d.parquet",
        {
            "site": ["x", "y", "x"],
            "a": [1.0, None, 3.0],
            "kind": ["p", "q", None],
            "label": [1, 0, 1],
        },
    )

    data = load_user_data(
        UserDataSpec("parquet", path, label="label", client_column="site")
    )

    assert data.client_ids == ("x", "y")
    assert data.label_names == ("0", "1")
    assert data.train.feature_names == (
        "a",
        "a_missing",
        "kind=p",
        "kind=q",
        "kind=missing",
    )
    assert data.train.y.tolist() == [1, 0, 1]
    assert np.isnan(data.train.x[1, 0])


def test_parquet_directory_of_clients(tmp_path: Path) -> None:
    write_parquet(tmp_path / "d" / "a.parquet", {"f": [1.0, 2.0], "y": ["u", "v"]})
    write_parquet(tmp_path / "d" / "b.parquet", {"f": [3.0], "y": ["u"]})

    data = load_user_data(UserDataSpec("parquet", tmp_path / "d", label="y"))

    assert data.client_ids == ("a", "b")
    assert data.train.y.tolist() == [0, 1, 0]


def test_parquet_bad_value_names_file_column_and_row(tmp_path: Path) -> None:
    path = write_parquet(
        tmp_path / "d.parquet", {"a": ["1", "2", "x", "4"], "y": [0, 1, 0, 1]}
    )

    message = data_error(UserDataSpec("parquet", path, label="y"))

    assert str(path) in message
    assert "'a'" in message
    assert "row 3" in message
    assert "'x'" in message


def test_parquet_without_pyarrow_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A None entry in sys.modules makes the import raise ImportError.
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = tmp_path / "d.parquet"
    path.write_bytes(b"PAR1")

    with pytest.raises(ConfigError) as info:
        load_user_data(UserDataSpec("parquet", path, label="y"))

    assert "pip install 'fedshield[parquet]'" in str(info.value)
    assert info.value.exit_code == 10


# NPZ --------------------------------------------------------------------------


def test_npz_single_file_with_clients_and_images_shape(tmp_path: Path) -> None:
    x = np.arange(4 * 2 * 3 * 3, dtype=np.float32).reshape(4, 2, 3, 3)
    np.savez(
        tmp_path / "d.npz",
        x=x,
        y=np.array([3, 1, 3, 1]),
        client=np.array(["b", "a", "a", "b"]),
    )

    data = load_user_data(UserDataSpec("npz", tmp_path / "d.npz"))

    assert data.train.input_shape == (2, 3, 3)
    assert data.train.x.shape == (4, 18)
    np.testing.assert_array_equal(data.train.x, x.reshape(4, -1))
    assert data.label_names == ("1", "3")
    assert data.train.y.tolist() == [1, 0, 1, 0]
    assert data.client_ids == ("a", "b")


def test_npz_directory_of_clients_with_test_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "c1.npz", x=np.ones((2, 3)), y=np.array([0.5, 1.5]))
    np.savez(tmp_path / "d" / "c2.npz", x=np.zeros((1, 3)), y=np.array([2.0]))
    np.savez(tmp_path / "t.npz", x=np.zeros((1, 3)), y=np.array([9.0]))

    data = load_user_data(
        UserDataSpec(
            "npz", tmp_path / "d", task="regression", test_path=tmp_path / "t.npz"
        )
    )

    assert data.client_ids == ("c1", "c2")
    assert data.train.y.tolist() == [0.5, 1.5, 2.0]
    assert data.test is not None and data.test.y.tolist() == [9.0]


def test_npz_object_array_is_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(
        tmp_path / "d.npz",
        x=np.array([[1.0]]),
        y=np.array([{"a": 1}], dtype=object),
    )

    message = data_error(UserDataSpec("npz", tmp_path / "d.npz"))

    assert "d.npz" in message and "pickle" in message


def test_npz_missing_arrays_are_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", features=np.ones((2, 2)), y=np.array([0, 1]))

    message = data_error(UserDataSpec("npz", tmp_path / "d.npz"))

    assert "'x'" in message and "'features'" in message


def test_npz_shape_mismatch_is_named(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((3, 2)), y=np.array([0, 1]))

    message = data_error(UserDataSpec("npz", tmp_path / "d.npz"))

    assert "d.npz" in message and "(3,)" in message


def test_npz_nan_label_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.ones((2, 2)), y=np.array([0.0, np.nan]))

    message = data_error(UserDataSpec("npz", tmp_path / "d.npz"))

    assert "d.npz" in message and "index 1" in message


# Images -----------------------------------------------------------------------


def write_png(path: Path, size: tuple[int, int] = (4, 3), value: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def test_images_per_client_layout(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    write_png(root / "alice" / "cat" / "1.png", value=255)
    write_png(root / "alice" / "dog" / "2.png")
    write_png(root / "bob" / "cat" / "3.jpg", value=255)

    data = load_user_data(UserDataSpec("images", root))

    assert data.client_ids == ("alice", "bob")
    assert data.label_names == ("cat", "dog")
    assert data.train.input_shape == (3, 3, 4)  # (C, H, W); PIL size is (W, H)
    assert data.train.y.tolist() == [0, 1, 0]
    assert data.train.x.min() >= 0.0 and data.train.x.max() <= 1.0
    np.testing.assert_allclose(data.train.x[0], 1.0)
    assert data.train.groups is not None
    assert data.train.groups.tolist() == ["alice", "alice", "bob"]


def test_images_class_layout_grey_resized_with_test_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "0" / "a.png", size=(8, 8))
    write_png(tmp_path / "train" / "1" / "b.jpeg", size=(5, 7))
    write_png(tmp_path / "test" / "1" / "c.png", size=(2, 2))

    data = load_user_data(
        UserDataSpec(
            "images",
            tmp_path / "train",
            image_size=(2, 3),
            image_mode="L",
            test_path=tmp_path / "test",
        )
    )

    assert data.client_ids is None
    assert data.train.input_shape == (1, 2, 3)
    assert data.train.x.shape == (2, 6)
    assert data.test is not None and data.test.y.tolist() == [1]


def test_images_of_different_sizes_need_image_size(tmp_path: Path) -> None:
    write_png(tmp_path / "i" / "a" / "1.png", size=(4, 4))
    write_png(tmp_path / "i" / "b" / "2.png", size=(5, 4))

    message = data_error(UserDataSpec("images", tmp_path / "i"))

    assert "2.png" in message
    assert "image_size" in message
    assert "class-folder layout" in message


def test_images_mixed_layout_is_named(tmp_path: Path) -> None:
    write_png(tmp_path / "i" / "cat" / "1.png")
    write_png(tmp_path / "i" / "site" / "dog" / "2.png")

    message = data_error(UserDataSpec("images", tmp_path / "i"))

    assert "per-client layout" in message and "class-folder layout" in message
    assert "cat" in message and "site" in message


def test_images_empty_class_folder_names_layout(tmp_path: Path) -> None:
    write_png(tmp_path / "i" / "c1" / "cat" / "1.png")
    (tmp_path / "i" / "c1" / "dog").mkdir()

    message = data_error(UserDataSpec("images", tmp_path / "i"))

    assert "dog" in message and "per-client layout" in message


def test_images_corrupt_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "i" / "cat" / "bad.png", "not an image")

    message = data_error(UserDataSpec("images", tmp_path / "i"))

    assert "bad.png" in message


def test_images_test_class_unknown_to_training(tmp_path: Path) -> None:
    write_png(tmp_path / "train" / "cat" / "1.png")
    write_png(tmp_path / "test" / "cow" / "2.png")

    message = data_error(
        UserDataSpec("images", tmp_path / "train", test_path=tmp_path / "test")
    )

    assert "2.png" in message and "'cow'" in message


# Python factory ---------------------------------------------------------------


def test_python_factory_with_test_set(tmp_path: Path) -> None:
    write(
        tmp_path / "mydata.py",
        "import numpy as np\n"
        "def load():\n"
        "    clients = {\n"
        "        'b': (np.ones((2, 3)), np.array([1, 0])),\n"
        "        'a': (np.zeros((1, 3)), np.array([1])),\n"
        "    }\n"
        "    return clients, (np.ones((2, 3)), np.array([0, 1]))\n",
    )
    spec = UserDataSpec(
        "python", factory=CallableRef("mydata.py:load", base_dir=tmp_path)
    )

    data = load_user_data(spec)

    assert data.client_ids == ("a", "b")
    assert data.train.groups is not None
    assert data.train.groups.tolist() == ["a", "b", "b"]
    assert data.train.y.tolist() == [1, 1, 0]
    assert data.test is not None and data.test.y.tolist() == [0, 1]
    assert data.train.input_shape == (3,)


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ("return [1, 2]", "expected a non-empty dict"),
        ("return {}", "expected a non-empty dict"),
        ("return {'a': np.ones((2, 2))}", "expected a pair (x, y)"),
        ("return {'a': ([1.0], np.array([0]))}", "x must be a numpy array"),
        ("return {'a': (np.ones((2, 2)), np.array([0]))}", "y must have shape (2,)"),
        (
            "return {'a': (np.ones((1, 2)), np.array([0])), "
            "'b': (np.ones((1, 3)), np.array([0]))}",
            "client 'b'",
        ),
        ("raise RuntimeError('boom')", "RuntimeError: boom"),
        (
            "return {'a': (np.array([[np.nan]]), np.array([0]))}",
            "NaN or infinity",
        ),
    ],
)
def test_python_factory_bad_returns(tmp_path: Path, body: str, fragment: str) -> None:
    write(tmp_path / "bad.py", f"import numpy as np\ndef load():\n    {body}\n")
    spec = UserDataSpec("python", factory=CallableRef("bad.py:load", base_dir=tmp_path))

    message = data_error(spec)

    assert fragment in message
    assert "bad.py:load" in message


def test_python_factory_missing_file_is_a_config_error(tmp_path: Path) -> None:
    spec = UserDataSpec(
        "python", factory=CallableRef("nope.py:load", base_dir=tmp_path)
    )

    with pytest.raises(ConfigError, match=r"nope\.py"):
        load_user_data(spec)


# Bad inputs -------------------------------------------------------------------


def test_missing_path_says_what_was_expected(tmp_path: Path) -> None:
    message = data_error(csv_spec(tmp_path / "nothere.csv"))

    assert "nothere.csv" in message
    assert "does not exist" in message
    assert "per-client *.csv" in message


def test_directory_without_files_of_the_format(tmp_path: Path) -> None:
    write(tmp_path / "d" / "notes.txt", "hi")

    message = data_error(csv_spec(tmp_path / "d"))

    assert str(tmp_path / "d") in message and "no *.csv files" in message


def test_missing_label_column_lists_columns_and_suggests(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "age,diagnosis\n1,0\n")

    message = data_error(csv_spec(path, label="diagnosys"))

    assert str(path) in message
    assert "'diagnosys'" in message
    assert "'age', 'diagnosis'" in message
    assert "Did you mean 'diagnosis'?" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"features": ("age", "wieght")}, "data.features names 'wieght'"),
        ({"categorical": ("colour",)}, "data.categorical names 'colour'"),
        ({"client_column": "hospital"}, "data.client_column names 'hospital'"),
    ],
)
def test_named_columns_that_do_not_exist(
    tmp_path: Path, kwargs: dict, fragment: str
) -> None:
    path = write(tmp_path / "d.csv", "age,weight,color,y\n1,2,red,0\n")

    message = data_error(csv_spec(path, **kwargs))

    assert fragment in message
    assert str(path) in message


def test_client_file_with_different_columns(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.csv", "age,bmi,y\n1,2,0\n")
    write(tmp_path / "d" / "b.csv", "age,weight,y\n1,2,0\n")

    message = data_error(csv_spec(tmp_path / "d"))

    assert "b.csv" in message
    assert "lacks 'bmi'" in message
    assert "extra 'weight'" in message
    assert "a.csv" in message


def test_non_numeric_value_in_numeric_column(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "age,y\n30,0\n41,1\n4O,0\n52,1\n")

    message = data_error(csv_spec(path))

    assert str(path) in message
    assert "line 4" in message
    assert "'age'" in message
    assert "'4O'" in message
    assert "data.categorical" in message


def test_mostly_text_column_is_categorical(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "grade,y\nA,0\nB,1\n3,0\n")

    data = load_user_data(csv_spec(path))

    assert data.train.feature_names == ("grade=3", "grade=A", "grade=B")


def test_empty_label_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,0\n2,\n")

    message = data_error(csv_spec(path))

    assert str(path) in message and "line 3" in message and "'y'" in message


def test_nan_label_in_parquet_names_row(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "d.parquet", {"a": [1, 2], "y": [0.0, None]})

    message = data_error(UserDataSpec("parquet", path, label="y"))

    assert str(path) in message and "row 2" in message


def test_empty_client_file_is_named(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.csv", "a,y\n1,0\n")
    write(tmp_path / "d" / "b.csv", "a,y\n")

    message = data_error(csv_spec(tmp_path / "d"))

    assert "b.csv" in message and "no data rows" in message and "'b'" in message


def test_empty_client_column_cell(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "site,a,y\nA,1,0\n,2,1\n")

    message = data_error(csv_spec(path, client_column="site"))

    assert "line 3" in message and "'site'" in message


def test_test_label_unknown_to_training(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "a,y\n1,cat\n2,dog\n")
    test_path = write(tmp_path / "test.csv", "a,y\n1,cat\n2,cow\n")

    message = data_error(csv_spec(path, test_path=test_path))

    assert "test.csv" in message
    assert "line 3" in message
    assert "'cow'" in message
    assert "'cat', 'dog'" in message


def test_label_not_in_declared_classes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,cat\n2,dog\n")

    message = data_error(csv_spec(path, classes=("cat",)))

    assert "line 3" in message and "'dog'" in message and "data.classes" in message


def test_regression_label_not_numeric(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,price\n1,2.5\n2,cheap\n")

    message = data_error(csv_spec(path, label="price", task="regression"))

    assert str(path) in message
    assert "line 3" in message
    assert "'cheap'" in message
    assert "'price'" in message


def test_test_file_missing_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "train.csv", "a,b,y\n1,2,0\n")
    test_path = write(tmp_path / "test.csv", "a,y\n1,0\n")

    message = data_error(csv_spec(path, test_path=test_path))

    assert "test.csv" in message and "'b'" in message


def test_row_with_wrong_number_of_fields(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,0\n2,1,3\n")

    message = data_error(csv_spec(path))

    assert "line 3" in message and "3 fields" in message


def test_file_larger_than_limit_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "huge.csv"
    with path.open("wb") as fh:
        fh.truncate(4 * 2**30)  # sparse: takes no disk

    message = data_error(csv_spec(path))

    assert str(path) in message
    assert "4.0 GB" in message
    assert "1024 MB" in message
    assert "data.max_file_mb" in message
    assert "one file per client" in message


def test_test_file_larger_than_limit(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "a,y\n1,0\n")
    test_path = tmp_path / "t.csv"
    with test_path.open("wb") as fh:
        fh.truncate(3 * 2**20)

    message = data_error(csv_spec(path, test_path=test_path, max_file_mb=2))

    assert "t.csv" in message and "3.0 MB" in message and "2 MB" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"kind": "xls", "path": Path("x")}, "kind must be one of"),
        ({"kind": "csv", "path": Path("x")}, "needs the label column"),
        ({"kind": "python"}, "needs a factory"),
        ({"kind": "npz"}, "needs a path"),
        ({"kind": "npz", "path": Path("x"), "task": "ranking"}, "task must be"),
        ({"kind": "images", "path": Path("x"), "image_mode": "CMYK"}, "image_mode"),
        ({"kind": "npz", "path": Path("x"), "max_file_mb": 0}, "max_file_mb"),
    ],
)
def test_spec_validation(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match="invalid data spec") as info:
        UserDataSpec(**kwargs)

    assert fragment in str(info.value)


# Regression data sets ---------------------------------------------------------


def test_regression_dataset_validation_and_random_split() -> None:
    from fedshield.data import Dataset, split_test

    ds = Dataset(
        "r",
        np.zeros((10, 1), dtype=np.float32),
        np.linspace(0, 1, 10, dtype=np.float32),
        num_classes=1,
        input_shape=(1,),
        task="regression",
    )

    train, test = split_test(ds, test_fraction=0.3, rng=np.random.default_rng(0))

    assert (len(train), len(test)) == (7, 3)
    assert train.task == test.task == "regression"
    assert sorted([*train.y.tolist(), *test.y.tolist()]) == sorted(ds.y.tolist())
    with pytest.raises(ConfigError, match="finite"):
        Dataset(
            "r",
            np.zeros((1, 1), dtype=np.float32),
            np.array([np.nan], dtype=np.float32),
            num_classes=1,
            input_shape=(1,),
            task="regression",
        )
    with pytest.raises(ConfigError, match="num_classes must be 1"):
        Dataset(
            "r",
            np.zeros((1, 1), dtype=np.float32),
            np.array([0.5], dtype=np.float32),
            num_classes=2,
            input_shape=(1,),
            task="regression",
        )


def test_per_client_files_with_a_test_file_naming_owners(tmp_path):
    from fedshield.data import UserDataSpec, load_user_data

    folder = tmp_path / "clients"
    folder.mkdir()
    (folder / "a.csv").write_text("x,y\n1,0\n2,1\n3,0\n")
    (folder / "b.csv").write_text("x,y\n10,1\n20,0\n")
    test = tmp_path / "test.csv"
    test.write_text("x,y,site\n1.5,0,a\n15,1,b\n")
    data = load_user_data(
        UserDataSpec("csv", folder, label="y", test_path=test, client_column="site")
    )
    assert data.client_ids == ("a", "b")
    assert data.train.feature_names == ("x",)  # the client column is no feature
    assert data.test is not None and data.test.groups is not None
    assert data.test.groups.tolist() == ["a", "b"]
