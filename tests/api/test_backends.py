from __future__ import annotations

import json

import pytest
import torch

from fedshield.api import parse_config, simulate
from fedshield.api.backends import make_backend, resolve_backend
from fedshield.errors import ConfigError
from fedshield.models import TorchModel, build_module
from fedshield.simulation import (
    ProcessPoolBackend,
    SequentialBackend,
    VectorisedBackend,
)

TINY = {
    "run": {"rounds": 2, "seed": 2},
    "data": {"dataset": "digits", "partition": "dirichlet", "num_clients": 5},
    "model": {"kind": "mlp", "hidden": [16]},
}


def _dropout_model() -> TorchModel:
    return TorchModel(
        lambda: torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Dropout(0.5), torch.nn.Linear(64, 10)
        ),
        input_shape=(64,),
    )


def test_auto_picks_vectorised_when_the_model_allows_it():
    mlp = TorchModel(lambda: build_module("mlp", input_shape=(64,), num_classes=10))
    assert resolve_backend("auto", mlp) == "vectorised"
    assert resolve_backend("auto", _dropout_model()) == "sequential"
    assert resolve_backend("process", _dropout_model()) == "process"


def test_a_dp_run_with_a_deadline_never_times_clients_by_chunk():
    # The vectorised backend times a chunk of clients together: under DP one
    # client's data would decide whether others time out.
    mlp = TorchModel(lambda: build_module("mlp", input_shape=(64,), num_classes=10))
    assert resolve_backend("auto", mlp, privacy_mode="central", timeout_s=5.0) == (
        "sequential"
    )
    assert resolve_backend("auto", mlp, privacy_mode="central") == "vectorised"
    assert resolve_backend("auto", mlp, timeout_s=5.0) == "vectorised"
    with pytest.raises(ConfigError, match="timeout_s"):
        resolve_backend("vectorised", mlp, privacy_mode="local", timeout_s=5.0)


def test_vectorised_refuses_a_model_it_cannot_run_naming_layer_and_alternative():
    with pytest.raises(ConfigError) as info:
        resolve_backend("vectorised", _dropout_model())
    message = str(info.value)
    assert "Dropout" in message and "'sequential'" in message


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("sequential", SequentialBackend),
        ("vectorised", VectorisedBackend),
        ("process", ProcessPoolBackend),
    ],
)
def test_make_backend_builds_each(name, kind):
    backend = make_backend(name, workers=1)
    try:
        assert isinstance(backend, kind)
    finally:
        backend.close()


def test_every_backend_gives_the_sequential_result(tmp_path):
    results = {}
    for name in ("sequential", "vectorised", "process"):
        data = {**TINY, "run": {**TINY["run"], "backend": name, "workers": 2}}
        summary, out = simulate(
            parse_config(data), out=tmp_path / name, write_report=False
        )
        assert summary["backend"] == name
        results[name] = [
            {k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (out / "metrics.jsonl").read_text().splitlines()
        ]
    assert results["process"] == results["sequential"]  # bitwise
    for a, b in zip(results["vectorised"], results["sequential"], strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_ray_backend_without_ray_names_the_extra(tmp_path):
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['ray'] = None\n"
        "from fedshield.api.backends import make_backend\n"
        "try:\n    make_backend('ray')\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("ConfigError") and "fedshield[ray]" in out
