"""Ray is an optional extra: nothing imports it until a RayBackend is built."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_importing_the_simulation_layer_loads_neither_ray_nor_torch():
    code = (
        "import sys, fedshield.simulation, fedshield.simulation.backends.ray; "
        "assert 'ray' not in sys.modules, 'ray'; "
        "assert 'torch' not in sys.modules, 'torch'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


def test_missing_ray_names_the_extra(monkeypatch):
    from fedshield.simulation.backends.ray import RayBackend

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(ImportError) as info:
        RayBackend()
    assert str(info.value) == "the Ray backend needs Ray: pip install 'fedshield[ray]'"
    assert info.value.name == "ray"
