"""Image folders and Parquet files as a user would hand them to the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedshield.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
        check=False,
    )


def _draw(path: Path, bright: bool, rng: np.random.Generator, size: int) -> None:
    base = 200 if bright else 40
    pixels = np.clip(base + rng.normal(0, 20, (size, size)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, mode="L").save(path)


def test_per_client_image_folders_with_a_cnn(tmp_path):
    rng = np.random.default_rng(0)
    for client in ("clinic_a", "clinic_b", "clinic_c"):
        for label, bright in (("healthy", False), ("lesion", True)):
            folder = tmp_path / "images" / client / label
            folder.mkdir(parents=True)
            for i in range(12):
                # Sizes differ: image_size resizes them all.
                _draw(folder / f"{i}.png", bright, rng, 10 + i % 3)
    (tmp_path / "c.toml").write_text(
        '[run]\nname = "img"\nrounds = 10\n'
        '[data]\ndataset = "images"\npath = "images"\nimage_size = [8, 8]\n'
        'image_mode = "L"\n'
        '[model]\nkind = "cnn"\nhidden = [4, 4]\n'
        "[client]\nlr = 0.3\nbatch_size = 8\n"
    )
    out = tmp_path / "run"
    proc = _cli("simulate", "c.toml", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["partition"] == "natural" and summary["num_clients"] == 3
    assert summary["accuracy"] > 0.9  # bright against dark


def test_images_of_different_sizes_without_image_size_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    for label, bright in (("a", False), ("b", True)):
        folder = tmp_path / "images" / label
        folder.mkdir(parents=True)
        for i in range(4):
            _draw(folder / f"{i}.png", bright, rng, 8 + i)
    (tmp_path / "c.toml").write_text(
        '[data]\ndataset = "images"\npath = "images"\nnum_clients = 2\n'
    )
    proc = _cli("simulate", "c.toml", "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert proc.returncode == 10
    assert "image_size" in proc.stderr and not (tmp_path / "run").exists()


def test_a_parquet_file_split_by_a_client_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rng = np.random.default_rng(2)
    n = 240
    x = rng.normal(size=(n, 3))
    table = pa.table(
        {
            "f0": x[:, 0],
            "f1": x[:, 1],
            "f2": x[:, 2],
            "bank": rng.choice(["north", "south", "east"], size=n),
            "default": np.where(x[:, 0] + 0.5 * x[:, 1] > 0, "yes", "no"),
        }
    )
    pq.write_table(table, tmp_path / "loans.parquet")
    (tmp_path / "c.toml").write_text(
        '[run]\nname = "pq"\nrounds = 5\n'
        '[data]\ndataset = "parquet"\npath = "loans.parquet"\nlabel = "default"\n'
        'client_column = "bank"\n'
        '[model]\nkind = "logistic"\n[client]\nlr = 0.2\n'
    )
    out = tmp_path / "run"
    proc = _cli("simulate", "c.toml", "--out", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 3 and summary["accuracy"] > 0.8
    partition = json.loads((out / "partition.json").read_text())
    assert sorted(c["client_id"] for c in partition["clients"]) == [
        "east",
        "north",
        "south",
    ]
