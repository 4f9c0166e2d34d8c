"""User data: declared schema (DP), distinct client ids and memory limits."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedshield.core.imports import CallableRef
from fedshield.data import UserDataSpec, load_user_data
from fedshield.errors import ConfigError, DataFileError


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def data_error(spec: UserDataSpec) -> str:
    with pytest.raises(DataFileError) as info:
        load_user_data(spec)
    assert info.value.exit_code == 10
    return str(info.value)


def declared_spec(path: Path, **kwargs: object) -> UserDataSpec:
    settings: dict[str, object] = {
        "label": "y",
        "declared": True,
        "classes": ("no", "yes", "rare"),
        "levels": {"color": ("red", "blue", "green")},
        "missing": ("age", "color"),
    }
    settings.update(kwargs)
    return UserDataSpec("csv", path, **settings)  # type: ignore[arg-type]


BASE = "age,color,y\n50,red,no\n61,blue,yes\n40,red,no\n"


# Declared schema ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra_row",
    [
        "55,green,no\n",  # a rare level
        ",red,no\n",  # a missing numeric cell
        "55,,no\n",  # a missing categorical cell
        "55,red,rare\n",  # a rare label
    ],
)
def test_declared_schema_does_not_depend_on_one_record(
    tmp_path: Path, extra_row: str
) -> None:
    plain = write(tmp_path / "plain.csv", BASE)
    odd = write(tmp_path / "odd.csv", BASE + extra_row)

    a = load_user_data(declared_spec(plain))
    b = load_user_data(declared_spec(odd))

    assert a.train.feature_names == b.train.feature_names
    assert a.train.input_shape == b.train.input_shape
    assert a.train.num_classes == b.train.num_classes == 3
    assert a.label_names == b.label_names == ("no", "yes", "rare")
    assert a.train.feature_names == (
        "age",
        "age_missing",
        "color=red",
        "color=blue",
        "color=green",
        "color=missing",
    )
    assert a.train.numeric_columns is not None
    assert a.train.numeric_columns.tolist() == [True, False, False, False, False, False]


def test_declared_schema_encodes_missing_cells(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "age,color,y\n,red,no\n3,,yes\n")

    data = load_user_data(declared_spec(path))

    x = data.train.x
    assert np.isnan(x[0, 0]) and x[0, 1] == 1.0
    np.testing.assert_array_equal(x[0, 2:], [1, 0, 0, 0])
    np.testing.assert_array_equal(x[1], [3, 0, 0, 0, 0, 1])


def test_declared_schema_is_the_same_for_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"age": [1.0, 2.0], "color": ["red", "blue"], "y": ["no", "no"]}),
        path,
    )
    csv_path = write(tmp_path / "d.csv", BASE)

    data = load_user_data(
        UserDataSpec(
            "parquet",
            path,
            label="y",
            declared=True,
            classes=("no", "yes", "rare"),
            levels={"color": ["red", "blue", "green"]},  # type: ignore[dict-item]
            missing=("age", "color"),
        )
    )

    assert data.train.feature_names == (
        load_user_data(declared_spec(csv_path)).train.feature_names
    )
    assert data.train.num_classes == 3


def test_declared_missing_columns_decide_the_indicators(tmp_path: Path) -> None:
    plain = write(tmp_path / "plain.csv", BASE)
    # No column may be missing: no indicator, whatever the records hold.
    data = load_user_data(declared_spec(plain, missing=None))
    assert data.train.feature_names == (
        "age",
        "color=red",
        "color=blue",
        "color=green",
    )
    gap = write(tmp_path / "gap.csv", BASE + ",red,no\n")
    message = data_error(declared_spec(gap, missing=None))
    assert "line 5" in message and "'age'" in message and "data.missing" in message
    # Declared without DP: the same width as under DP.
    undeclared = load_user_data(
        UserDataSpec(
            "csv",
            gap,
            label="y",
            missing=("age",),
            levels={"color": ("red", "blue", "green")},
        )
    )
    assert undeclared.train.feature_names == (
        "age",
        "age_missing",
        "color=red",
        "color=blue",
        "color=green",
    )


def test_declared_classification_needs_classes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.classes") as info:
        declared_spec(tmp_path / "d.csv", classes=None)

    assert not isinstance(info.value, DataFileError)


def test_declared_regression_needs_no_classes(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "age,color,y\n1,red,2.5\n2,blue,3\n")

    data = load_user_data(declared_spec(path, classes=None, task="regression"))

    assert data.train.num_classes == 1
    assert data.train.feature_names[:2] == ("age", "age_missing")


def test_declared_categorical_needs_levels(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.levels") as info:
        declared_spec(tmp_path / "d.csv", categorical=("color", "size"))

    assert "'size'" in str(info.value)
    assert "'color'" not in str(info.value)


def test_declared_label_outside_classes_names_file_line_and_value(
    tmp_path: Path,
) -> None:
    path = write(tmp_path / "d.csv", BASE + "55,red,maybe\n")

    message = data_error(declared_spec(path))

    assert str(path) in message
    assert "line 5" in message
    assert "'maybe'" in message
    assert "data.classes" in message


def test_declared_test_label_outside_classes_says_declared(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE)
    test_path = write(tmp_path / "t.csv", "age,color,y\n1,red,maybe\n")

    message = data_error(declared_spec(path, test_path=test_path))

    assert "t.csv" in message and "line 2" in message and "'maybe'" in message
    assert "declared data.classes" in message


def test_declared_text_in_a_numeric_column(tmp_path: Path) -> None:
    # Without levels for it, "age" is numeric, however many texts it holds.
    path = write(tmp_path / "d.csv", "age,color,y\nold,red,no\nyoung,red,no\n")

    message = data_error(declared_spec(path))

    assert str(path) in message
    assert "'age'" in message
    assert "line 2" in message
    assert "'old'" in message
    assert "data.levels" in message


def test_declared_level_outside_the_levels(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE + "55,purple,no\n")

    message = data_error(declared_spec(path))

    assert str(path) in message
    assert "'color'" in message
    assert "line 5" in message
    assert "'purple'" in message
    assert "'red', 'blue', 'green'" in message


def test_declared_level_outside_the_levels_in_the_test_file(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE)
    test_path = write(tmp_path / "t.csv", "age,color,y\n1,pink,no\n")

    message = data_error(declared_spec(path, test_path=test_path))

    assert "t.csv" in message and "'pink'" in message and "line 2" in message


def test_levels_without_declared_fix_the_levels(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.csv", "code,y\n3,0\n")
    write(tmp_path / "d" / "b.csv", "code,y\n4,1\n")
    spec = UserDataSpec("csv", tmp_path / "d", label="y", levels={"code": [4, 3, 5]})  # type: ignore[dict-item]

    data = load_user_data(spec)

    # Exactly the declared levels in their order (no union of the files);
    # without ``declared`` the missing column and the classes stay derived.
    assert data.train.feature_names == ("code=4", "code=3", "code=5")
    assert data.label_names == ("0", "1")
    np.testing.assert_array_equal(data.train.x, [[0, 1, 0], [1, 0, 0]])


def test_levels_without_declared_refuse_other_values(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", "code,y\n3,0\n9,1\n")

    message = data_error(UserDataSpec("csv", path, label="y", levels={"code": ["3"]}))  # type: ignore[dict-item]

    assert "'code'" in message and "line 3" in message and "'9'" in message


def test_levels_name_a_column_that_does_not_exist(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE)

    message = data_error(declared_spec(path, levels={"colour": ("red",)}))

    assert "data.levels names 'colour'" in message
    assert str(path) in message
    assert "Did you mean 'color'?" in message


def test_levels_of_the_label_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE)

    message = data_error(
        declared_spec(path, levels={"color": ("red",), "y": ("no", "yes")})
    )

    assert "data.levels names 'y'" in message and "not among the features" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"levels": {"color": ()}}, "distinct and non-empty"),
        ({"levels": {"color": ("a", "a")}}, "distinct and non-empty"),
        ({"levels": {"color": ("a", "missing")}}, "missing cell"),
        ({"levels": {"color": ("a", "NA")}}, "missing cell"),
        ({"levels": {"color": "abc"}}, "lists of levels"),
        ({"levels": ["color"]}, "must map column names"),
        ({"kind": "npz", "levels": {"color": ("a",)}}, "data.levels applies"),
    ],
)
def test_levels_validation(kwargs: dict[str, Any], fragment: str) -> None:
    settings: dict[str, Any] = {
        "kind": "csv",
        "path": Path("x"),
        "label": "y",
        **kwargs,
    }

    with pytest.raises(ConfigError, match="invalid data spec") as info:
        UserDataSpec(**settings)

    assert fragment in str(info.value)


def test_spec_with_levels_pickles_and_hashes() -> None:
    spec = UserDataSpec("csv", Path("x"), label="y", levels={"c": ["a", "b"]})  # type: ignore[dict-item]

    assert spec.levels == {"c": ("a", "b")}
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))


def test_without_declared_the_schema_is_still_derived(tmp_path: Path) -> None:
    path = write(tmp_path / "d.csv", BASE)

    data = load_user_data(UserDataSpec("csv", path, label="y"))

    assert data.train.feature_names == ("age", "color=blue", "color=red")
    assert data.label_names == ("no", "yes")


# Distinct client ids ------------------------------------------------------------


def test_factory_client_ids_equal_as_text_are_refused(tmp_path: Path) -> None:
    write(
        tmp_path / "ids.py",
        "import numpy as np\n"
        "def load():\n"
        "    pair = (np.ones((1, 2)), np.array([0]))\n"
        "    return {1: pair, '1': pair}\n",
    )
    spec = UserDataSpec("python", factory=CallableRef("ids.py:load", base_dir=tmp_path))

    message = data_error(spec)

    assert "1 and '1'" in message
    assert "ids.py:load" in message


@pytest.mark.parametrize("kind", ["csv", "npz"])
def test_client_files_with_the_same_stem_are_refused(tmp_path: Path, kind: str) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for name in (f"a.{kind}", f"a.{kind.upper()}"):
        if kind == "csv":
            write(folder / name, "x,y\n1,0\n")
        else:
            with (folder / name).open("wb") as fh:
                np.savez(fh, x=np.ones((1, 2)), y=np.array([0]))
    if len(list(folder.iterdir())) < 2:
        pytest.skip("case-insensitive file system")

    message = data_error(UserDataSpec(kind, folder, label="y"))

    assert f"a.{kind}" in message and f"a.{kind.upper()}" in message
    assert "client 'a'" in message


# Images: decoded size -----------------------------------------------------------


def write_png(path: Path, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_image_over_the_decoded_limit_is_refused_before_decoding(
    tmp_path: Path,
) -> None:
    write_png(tmp_path / "i" / "cat" / "big.png", (200, 100))  # 100x200 RGB
    # Resizing does not help: the decoder needs the full size.
    spec = UserDataSpec("images", tmp_path / "i", image_size=(2, 2), max_file_mb=0.2)

    message = data_error(spec)

    assert "big.png" in message
    assert "100x200 pixels" in message
    assert "234.4 KB" in message
    assert "0.2 MB" in message and "data.max_file_mb" in message
    assert not message.startswith("cannot read")


def test_decompression_bomb_is_a_data_file_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    write_png(tmp_path / "i" / "cat" / "bomb.png", (20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # error above 200

    message = data_error(UserDataSpec("images", tmp_path / "i"))

    assert "bomb.png" in message and "decompression bomb" in message


def test_decompression_bomb_warning_is_left_to_the_size_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    write_png(tmp_path / "i" / "cat" / "a.png", (20, 15))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200)  # warns at 300 pixels

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data = load_user_data(UserDataSpec("images", tmp_path / "i"))

    assert data.train.input_shape == (3, 15, 20)


def test_decoded_images_total_is_limited(tmp_path: Path) -> None:
    for k in range(3):
        write_png(tmp_path / "i" / "cat" / f"{k}.png", (10, 10))  # 1200 bytes
    spec = UserDataSpec("images", tmp_path / "i", max_file_mb=3000 / 2**20)

    message = data_error(spec)

    assert "2.png" in message
    assert "decoded images total 3.5 KB" in message
    assert "3 images so far" in message
    assert "each image alone is within it" in message
    assert not message.startswith("cannot read")


def test_decoded_images_total_counts_the_resized_size(tmp_path: Path) -> None:
    for k in range(3):
        write_png(tmp_path / "i" / "cat" / f"{k}.png", (10, 10))
    # Each full image (1200 bytes) fits; resized to 2x2 all three do.
    spec = UserDataSpec(
        "images", tmp_path / "i", image_size=(2, 2), max_file_mb=1500 / 2**20
    )

    data = load_user_data(spec)

    assert data.train.x.shape == (3, 12)


# NPZ and Parquet: uncompressed sizes and the total -------------------------------


def test_npz_uncompressed_size_is_checked_before_loading(tmp_path: Path) -> None:
    path = tmp_path / "d.npz"
    np.savez_compressed(path, x=np.zeros((1000, 1000)), y=np.zeros(1000))
    assert path.stat().st_size < 2**20

    message = data_error(UserDataSpec("npz", path, max_file_mb=1))

    assert "d.npz" in message
    assert "uncompressed" in message
    assert "7.6 MB" in message
    assert "for one file" in message


def test_npz_folder_total_is_limited(tmp_path: Path) -> None:
    folder = tmp_path / "d"
    folder.mkdir()
    for name in ("a", "b"):
        np.savez(folder / f"{name}.npz", x=np.zeros((80_000, 1)), y=np.zeros(80_000))
    # Each file is about 1.2 MB uncompressed, the two 2.4 MB.

    message = data_error(UserDataSpec("npz", folder, max_file_mb=2))

    assert "b.npz" in message
    assert "total" in message and "2.4 MB" in message
    assert "each file alone is within it" in message


def test_npz_test_file_counts_in_the_total(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((80_000, 1)), y=np.zeros(80_000))
    np.savez(tmp_path / "t.npz", x=np.zeros((80_000, 1)), y=np.zeros(80_000))

    message = data_error(
        UserDataSpec(
            "npz", tmp_path / "d.npz", test_path=tmp_path / "t.npz", max_file_mb=2
        )
    )

    assert "t.npz" in message and "total" in message


def test_npz_that_is_not_a_zip_is_named(tmp_path: Path) -> None:
    path = write(tmp_path / "d.npz", "not a zip")

    message = data_error(UserDataSpec("npz", path))

    assert "d.npz" in message and "not a zip archive" in message


def test_npz_header_larger_than_the_member_is_counted(tmp_path: Path) -> None:
    import zipfile

    # A member whose .npy header claims 10**9 float64s but holds none.
    header = np.lib.format
    member = tmp_path / "x.npy"
    with member.open("wb") as fh:
        header.write_array_header_1_0(
            fh, {"descr": "<f8", "fortran_order": False, "shape": (10**9,)}
        )
    path = tmp_path / "d.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "x.npy")

    message = data_error(UserDataSpec("npz", path))

    assert "d.npz" in message and "7.5 GB" in message


def test_parquet_uncompressed_size_is_checked_before_reading(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "d.parquet"
    table = pa.table({"s": ["a" * 1000] * 2000, "y": [0] * 2000})
    pq.write_table(table, path, use_dictionary=False, compression="zstd")
    assert path.stat().st_size < 2**20

    message = data_error(UserDataSpec("parquet", path, label="y", max_file_mb=1))

    assert "d.parquet" in message
    assert "uncompressed" in message
    assert "for one file" in message


def test_csv_folder_total_is_limited(tmp_path: Path) -> None:
    write(tmp_path / "d" / "a.csv", "x,y\n" + "1,0\n" * 100)  # 404 bytes
    write(tmp_path / "d" / "b.csv", "x,y\n" + "1,0\n" * 100)

    message = data_error(
        UserDataSpec("csv", tmp_path / "d", label="y", max_file_mb=600 / 2**20)
    )

    assert "b.csv" in message and "total" in message
    assert "2 files so far" in message


def test_declared_classes_for_npz_fix_num_classes(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.ones((2, 2)), y=np.array([0, 1]))
    np.savez(tmp_path / "b.npz", x=np.ones((2, 2)), y=np.array([0, 7]))
    spec_a = UserDataSpec("npz", tmp_path / "a.npz", declared=True, classes=("0", "1"))

    assert load_user_data(spec_a).train.num_classes == 2
    message = data_error(
        UserDataSpec("npz", tmp_path / "b.npz", declared=True, classes=("0", "1"))
    )

    assert "b.npz" in message and "index 1" in message and "'7'" in message
    assert "declared data.classes" in message
