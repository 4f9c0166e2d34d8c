"""The committed Fleet modules are what fleet.proto generates (make proto)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PROTO = "fedshield/transport/proto/fleet.proto"


def test_generated_modules_match_the_schema(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc")
    target = tmp_path / "fedshield/transport/proto"
    target.mkdir(parents=True)
    shutil.copy(SRC / PROTO, target / "fleet.proto")
    code = protoc.main(
        [
            "protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(tmp_path / PROTO),
        ]
    )
    assert code == 0
    for name in ("fleet_pb2.py", "fleet_pb2_grpc.py", "fleet_pb2.pyi"):
        want = (target / name).read_text()
        got = (SRC / "fedshield/transport/proto" / name).read_text()
        assert got == want, f"{name} is stale: run `make proto`"
