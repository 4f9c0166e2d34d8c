"""The security bars on digits with 20 % malicious clients (``make bench``).

FedAvg loses ≥ 20 points under sign flipping while a robust rule (Krum)
stays within 3 points of the clean run; a backdoor reaches ASR ≥ 80 % with
FedAvg and ≤ 10 % with norm bounding plus weak noise (Sun et al. 2019), at
a main-task cost printed beside it. Configuration:
``examples/security/digits_attacks.toml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fedshield.api import load_config, simulate
from fedshield.simulation import RunDirectory

CONFIG = Path(__file__).parents[1] / "examples" / "security" / "digits_attacks.toml"
pytestmark = pytest.mark.bench


def _run(tmp: Path, name: str, *overrides: str) -> dict[str, Any]:
    config = load_config(CONFIG, list(overrides))
    summary, run_dir = simulate(config, out=tmp / name, write_report=False)
    last = RunDirectory(run_dir).read_metrics()[-1]
    return {"accuracy": summary["accuracy"], "asr": last.get("asr")}


def test_sign_flipping_breaks_fedavg_and_not_krum(tmp_path: Path) -> None:
    clean = _run(tmp_path, "clean")
    fedavg = _run(tmp_path, "fedavg", 'attack.kind="sign_flip"')
    krum = _run(
        tmp_path, "krum", 'attack.kind="sign_flip"', 'robust.rule="krum"', "robust.f=4"
    )
    print(
        f"\nsign flip, 20 % malicious: clean {clean['accuracy']:.3f}, FedAvg "
        f"{fedavg['accuracy']:.3f}, Krum {krum['accuracy']:.3f}"
    )
    assert clean["accuracy"] - fedavg["accuracy"] >= 0.20
    assert clean["accuracy"] - krum["accuracy"] <= 0.03


def test_a_backdoor_passes_fedavg_and_not_norm_bounding(tmp_path: Path) -> None:
    attack = ('attack.kind="backdoor"', "attack.poison_fraction=0.05")
    bound = (
        'robust.rule="norm_bound"',
        "robust.max_norm=0.15",
        "robust.noise_std=0.005",
    )
    clean = _run(tmp_path, "clean")
    fedavg = _run(tmp_path, "fedavg", *attack)
    bounded = _run(tmp_path, "bounded", *attack, *bound)
    clean_bounded = _run(tmp_path, "clean-bounded", *bound)
    print(
        f"\nbackdoor: FedAvg ASR {fedavg['asr']:.3f} "
        f"(accuracy {fedavg['accuracy']:.3f}); "
        f"norm bounding ASR {bounded['asr']:.3f} (accuracy {bounded['accuracy']:.3f}; "
        f"clean run {clean['accuracy']:.3f}, clean with the bound "
        f"{clean_bounded['accuracy']:.3f})"
    )
    assert fedavg["asr"] >= 0.80
    assert bounded["asr"] <= 0.10
