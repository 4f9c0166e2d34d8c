"""The network demo's files (make demo-network) fit together.

server.toml parses with its [network] section, make_sites.py writes one
hospital per site, and every site's data, built as ``fedshield join``
builds it, has the input shape server.toml declares.
"""

from __future__ import annotations

import csv
import importlib.util
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from fedshield.api.config import load_config, parse_config
from fedshield.api.experiment import build_federation
from fedshield.transport.policy import PolicyRefusal, SiteGuard, SitePolicy

NETWORK = Path(__file__).parents[2] / "examples" / "network"
SERVER = NETWORK / "server.toml"
SITES = ("cleveland", "hungary", "va")
ROWS = {"cleveland": 304, "hungary": 293, "va": 200}
COLUMNS = [
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalch", "exang", "oldpeak", "slope", "ca", "thal", "target",
]  # fmt: skip


def _make_sites() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "demo_make_sites", NETWORK / "make_sites.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sites")
    assert _make_sites().main([str(out)]) == 0
    return out


def _server_sections() -> dict[str, Any]:
    return tomllib.loads(SERVER.read_text())


def test_server_toml_parses_with_network() -> None:
    config = load_config(SERVER)
    net = config.network
    assert net is not None
    assert net.sites == list(SITES)
    assert net.input_shape == [_make_sites().INPUT_WIDTH]
    assert net.num_classes == 2
    assert config.secagg.protocol == "secagg+"
    assert config.privacy.mode == "central"
    assert config.privacy.sampling == "fixed"
    assert config.privacy.accountant == "rdp"
    assert config.runs_federated_eval
    assert "data" not in _server_sections()  # the server holds no data


def test_make_sites_writes_one_csv_per_hospital(sites: Path) -> None:
    for site in SITES:
        with open(sites / site / f"{site}.csv", newline="") as f:
            rows = list(csv.reader(f))
        assert rows[0] == COLUMNS
        body = rows[1:]
        assert len(body) == ROWS[site]
        assert all(len(r) == len(COLUMNS) and any(r[:-1]) for r in body)
        assert {r[-1] for r in body} == {"0", "1"}
        # Missing values stay empty cells; a 0 that means "not measured" too.
        chol = [r[COLUMNS.index("chol")] for r in body]
        assert "0" not in chol
        data = tomllib.loads((sites / site / "site.toml").read_text())
        assert set(data) == {"data"}
        assert data["data"]["path"] == f"{site}.csv"
    va = (sites / "va" / "va.csv").read_text().splitlines()
    assert any(",," in line for line in va[1:])


def _site_config(sites: Path, site: str) -> Any:
    sections = _server_sections()
    sections.pop("network")
    data = tomllib.loads((sites / site / "site.toml").read_text())["data"]
    data["path"] = str(sites / site / data["path"])
    data["partition"] = "iid"
    data["num_clients"] = 1
    sections["data"] = data
    return parse_config(sections)


@pytest.mark.parametrize("site", SITES)
def test_each_site_has_the_declared_input_shape(sites: Path, site: str) -> None:
    federation = build_federation(_site_config(sites, site))
    net = load_config(SERVER).network
    assert net is not None
    assert list(federation.train.input_shape) == net.input_shape
    assert federation.train.num_classes == net.num_classes


def _plan() -> tuple[dict[str, Any], int]:
    config = load_config(SERVER)
    plan = config.to_dict()
    plan.pop("data")
    return plan, config.run.rounds


def test_demo_policy_accepts_the_plan() -> None:
    plan, rounds = _plan()
    guard = SiteGuard(SitePolicy.load(NETWORK / "demo_policy.toml"), plan, SITES)
    guard.check_run()
    guard.check_task(rounds - 1, "fit")  # the last round stays within max_epsilon
    assert guard.epsilon_after(rounds) == pytest.approx(9.482, abs=0.01)


def test_example_policy_accepts_the_malicious_plan_not_a_threshold_of_two() -> None:
    # Malicious-mode SecAgg (what the network runs) needs all 3 of 3 sites:
    # the shipped policy (min_clients = 3) accepts it; a semi-honest plan's
    # threshold of 2 it refuses.
    plan, _ = _plan()
    policy = SitePolicy.load(NETWORK / "policy.toml")
    SiteGuard(policy, plan, SITES).check_run()
    semi_honest = {**plan, "secagg": {**plan["secagg"], "malicious": False}}
    with pytest.raises(PolicyRefusal, match="min_clients = 3"):
        SiteGuard(policy, semi_honest, SITES).check_run()
