"""Prepare ItalyPowerDemand (UCR time-series archive) as plain CSV files.

Needs only the Python standard library. The data ship inside the aeon wheel
(BSD-3-Clause); aeon itself is not installed or imported:

    pip download --no-deps aeon==1.6.0 -d /tmp/prep
    python3 examples/iot/prepare.py --wheel /tmp/prep/aeon-1.6.0-py3-none-any.whl

Source members of ``aeon-1.6.0-py3-none-any.whl`` (pinned by sha256 below):
    aeon/datasets/data/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts   67 series
    aeon/datasets/data/ItalyPowerDemand/ItalyPowerDemand_TEST.ts  1,029 series
The ``.ts`` format is plain text: header lines start with ``#`` or ``@``, then
one case a line, 24 comma-separated values, ``:`` and the class label.

Output (under examples/iot/data/), columns ``h01``..``h24`` then ``season``:
    italy_power_train.csv         the archive's own split, 67 series
    italy_power_test.csv          the archive's own split, 1,029 series
    italy_power_pooled_train.csv  all 1,096 series pooled, stratified 75 %
    italy_power_pooled_test.csv   the remaining 25 %
67 training series are too few to spread over many federated clients, so the
examples train on the pooled split; results on it are not comparable with the
published results on the archive's split.

``season`` keeps the archive's labels ``1`` and ``2``: the archive says the
task is days from October to March versus April to September, but neither
the data file nor the aeon/UCR description states which code is which.
Values are copied as text, unchanged (each series is already z-normalised in
the archive). The pooled split is deterministic (random.Random(SEED), per
class: shuffle, first round(25 %) to test; rows keep source order: TRAIN
cases first, then TEST cases).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import math
import random
import sys
import zipfile
from pathlib import Path

WHEEL_NAME = "aeon-1.6.0-py3-none-any.whl"
WHEEL_SHA256 = "d05227086706f80111ac5fee8de4d5d3115bb3bcfd1c786c8629393055816409"
MEMBERS = {
    "train": (
        "aeon/datasets/data/ItalyPowerDemand/ItalyPowerDemand_TRAIN.ts",
        "341269cb7e6cef96846b30e774580beec79addb93848ba360145219115a74b7c",
    ),
    "test": (
        "aeon/datasets/data/ItalyPowerDemand/ItalyPowerDemand_TEST.ts",
        "26122451f87dd0387ef90b18bc8a86c041371b8a1c068004922b939971247144",
    ),
}
SERIES_LENGTH = 24
LABELS = ("1", "2")
SEED = 2024
TEST_FRACTION = 0.25
HEADER = [f"h{h:02d}" for h in range(1, SERIES_LENGTH + 1)] + ["season"]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def parse_ts(text: str, source: str) -> list[list[str]]:
    rows, in_data = [], False
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("@"):
            in_data = line.lower() == "@data"
            continue
        if not in_data:
            sys.exit(f"{source}:{lineno}: data line before @data")
        values, sep, label = line.rpartition(":")
        cells = values.split(",")
        if not sep or len(cells) != SERIES_LENGTH or label not in LABELS:
            sys.exit(
                f"{source}:{lineno}: expected {SERIES_LENGTH} values"
                f" and a label in {LABELS}"
            )
        for c in cells:
            if not math.isfinite(float(c)):
                sys.exit(f"{source}:{lineno}: non-finite value {c!r}")
        rows.append([*cells, label])
    return rows


def write_csv(path: Path, rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(HEADER)
        w.writerows(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--wheel", type=Path, required=True, help=f"path to {WHEEL_NAME}"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "data"
    )
    args = parser.parse_args(argv)

    wheel_bytes = args.wheel.read_bytes()
    if _sha256(wheel_bytes) != WHEEL_SHA256:
        sys.exit(
            f"{args.wheel}: sha256 {_sha256(wheel_bytes)} != pinned {WHEEL_SHA256}"
        )
    splits = {}
    with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
        for split, (member, pinned) in MEMBERS.items():
            data = zf.read(member)
            if _sha256(data) != pinned:
                sys.exit(f"{member}: sha256 {_sha256(data)} != pinned {pinned}")
            splits[split] = parse_ts(data.decode("utf-8"), member)
    assert len(splits["train"]) == 67 and len(splits["test"]) == 1029

    pooled = splits["train"] + splits["test"]
    rng = random.Random(SEED)
    is_test = [False] * len(pooled)
    for label in LABELS:
        stratum = [i for i, r in enumerate(pooled) if r[-1] == label]
        rng.shuffle(stratum)
        for i in stratum[: math.floor(len(stratum) * TEST_FRACTION + 0.5)]:
            is_test[i] = True

    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {
        "italy_power_train.csv": splits["train"],
        "italy_power_test.csv": splits["test"],
        "italy_power_pooled_train.csv": [
            r for r, t in zip(pooled, is_test, strict=True) if not t
        ],
        "italy_power_pooled_test.csv": [
            r for r, t in zip(pooled, is_test, strict=True) if t
        ],
    }
    for name, rows in outputs.items():
        write_csv(args.out / name, rows)
        counts = {label: sum(r[-1] == label for r in rows) for label in LABELS}
        print(
            f"{name:<30}{len(rows):>6}  "
            + "  ".join(f"{k}: {v}" for k, v in counts.items())
        )


if __name__ == "__main__":
    main()
