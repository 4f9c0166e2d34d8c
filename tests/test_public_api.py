"""Every exported name exists, and ``import fedshield`` stays light."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from types import ModuleType

import pytest

import fedshield


def _module_names() -> list[str]:
    names = ["fedshield"]
    for info in pkgutil.walk_packages(fedshield.__path__, prefix="fedshield."):
        # ``__main__`` modules run a program when imported.
        if info.name.rsplit(".", 1)[-1] != "__main__":
            names.append(info.name)
    return sorted(names)


MODULES = _module_names()


def test_package_walk_finds_the_core_modules() -> None:
    # Guards the parametrised test below against walking nothing.
    for name in (
        "fedshield.errors",
        "fedshield.core",
        "fedshield.core.params",
        "fedshield.strategies",
        "fedshield.strategies.fedavg",
    ):
        assert name in MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_name_in_all_exists(module_name: str) -> None:
    module: ModuleType = importlib.import_module(module_name)
    exported = getattr(module, "__all__", None)
    if exported is None:
        return

    assert len(exported) == len(set(exported)), f"duplicates in {module_name}.__all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert missing == [], f"{module_name}.__all__ lists missing names {missing}"


def test_top_level_dir_lists_all() -> None:
    assert dir(fedshield) == sorted(fedshield.__all__)


def test_top_level_unknown_attribute_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        fedshield.no_such_name  # noqa: B018


def test_import_fedshield_does_not_import_torch() -> None:
    code = (
        "import sys, fedshield, fedshield.core, fedshield.strategies;"
        "fedshield.Params; fedshield.WeightedMean; fedshield.ConfigError;"
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )

    assert result.returncode == 0, result.stderr
