"""End to end with real processes on 127.0.0.1: ``fedshield serve`` and sites.

Three sites with their own certificates and data join a server over mutual
TLS. The cases: a whole run; a site killed mid-round (the round goes on
without it, SecAgg unmasks); the server killed mid-stage and restarted on
the same ``--state`` (the run ends with the model an uninterrupted run
gives); a revoked site.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from numpy.testing import assert_array_equal

from .netutil import (
    SITES,
    final_params,
    make_ca,
    processes,
    server_config,
    wait_all,
    wait_ready,
    write_site_data,
)

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    ca_dir, identities = make_ca(root, (*SITES, "delta"))
    data = write_site_data(root, (*SITES, "delta"))
    return root, ca_dir, identities, data


def _run(
    root, ca_dir, identities, data, config, state, *, site_faults=None, sites=SITES
):
    """Serve ``config`` to ``sites``; the exit codes and the processes."""
    site_faults = site_faults or {}
    with processes(root) as procs:
        server = procs.server(config, state, ca_dir)
        port = wait_ready(server, state, identities[SITES[0]])
        running = {
            name: procs.site(
                port, name, identities[name], data[name], fault=site_faults.get(name)
            )
            for name in sites
        }
        codes = wait_all({"server": server, **running}, timeout_s=240)
    return codes, procs


@pytest.fixture(scope="module")
def uninterrupted(federation):
    root, ca_dir, identities, data = federation
    config = server_config(root / "server.toml")
    state = root / "state-plain"
    codes, procs = _run(root, ca_dir, identities, data, config, state)
    assert codes == dict.fromkeys(["server", *SITES], 0), procs.log("server")
    return config, state


def test_three_sites_three_rounds_over_mutual_tls(uninterrupted):
    _, state = uninterrupted
    summary = json.loads((state / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["rounds"] == 3
    assert summary["backend"] == "grpc"
    records = [json.loads(line) for line in (state / "metrics.jsonl").open()]
    assert [r["num_clients"] for r in records] == [3, 3, 3]
    assert records[-1]["federated_accuracy"] > 0.2  # chance: 0.1
    for name in ("checkpoint.npz", "report.html", "config.toml", "state.db"):
        assert (state / name).exists(), name


def _crash_and_resume(root, ca_dir, identities, data, config, state, fault):
    """Serve until ``fault`` kills the server, restart it on the same state."""
    with processes(root) as procs:
        server = procs.server(config, state, ca_dir, fault=fault)
        port = wait_ready(server, state, identities[SITES[0]])
        sites = {
            name: procs.site(port, name, identities[name], data[name]) for name in SITES
        }
        assert server.wait(timeout=120) == 137, procs.log("server")  # killed
        # The same command on the same state (and address: the sites keep
        # retrying it) resumes where the server was.
        again = procs.server(config, state, ca_dir, name="server-2", port=port)
        wait_ready(again, state, identities[SITES[0]])
        codes = wait_all({"server": again, **sites}, timeout_s=240)
    assert codes == dict.fromkeys(["server", *SITES], 0), procs.log("server-2")
    return procs


def _same_run(state, plain):
    assert_array_equal(final_params(state), final_params(plain), strict=True)
    records = [json.loads(x) for x in (state / "metrics.jsonl").open()]
    want = [json.loads(x) for x in (plain / "metrics.jsonl").open()]
    strip = lambda rs: [{k: v for k, v in r.items() if k != "seconds"} for r in rs]  # noqa: E731
    assert strip(records) == strip(want)
    return records


def test_server_killed_mid_stage_resumes_to_the_same_model(federation, uninterrupted):
    root, ca_dir, identities, data = federation
    config, plain = uninterrupted
    state = root / "state-crash"
    # Each round accepts 6 replies (3 fits, 3 evaluations): the 8th is the
    # second fit of round 2, with the stage still open.
    _crash_and_resume(
        root, ca_dir, identities, data, config, state, "server.after_reply:8"
    )
    _same_run(state, plain)


def test_secure_dp_round_resumes_mid_protocol_with_the_same_model_and_epsilon(
    federation,
):
    # The hard case: SecAgg+ and central DP, the server killed inside the
    # secure protocol of round 2. The restarted server replays the round
    # with byte-identical requests (its SecAgg randomness comes from a
    # secret in its state), so no site is asked a question twice with other
    # words, and the run ends as an uninterrupted one: same model, same
    # records, the same epsilon (no round charged twice).
    root, ca_dir, identities, data = federation
    config = server_config(
        root / "secure-dp.toml",
        secagg={"protocol": "secagg+", "malicious": True},
        privacy={
            "mode": "central",
            "clip_norm": 1.0,
            "noise_multiplier": 1.0,
            "sampling": "fixed",
            "accountant": "rdp",
        },
        strategy={"min_clients": 2},
    )
    plain = root / "state-secure-plain"
    codes, procs = _run(root, ca_dir, identities, data, config, plain)
    assert codes == dict.fromkeys(["server", *SITES], 0), procs.log("server")
    # Per round: fit, advertise_keys, share_keys, masked_input, unmask and
    # evaluate, 3 replies each: reply 26 is the second of round 2's share_keys.
    state = root / "state-secure-crash"
    _crash_and_resume(
        root, ca_dir, identities, data, config, state, "server.after_reply:26"
    )
    records = _same_run(state, plain)
    assert records[-1]["epsilon"] > 0
    assert all(r["secagg/aborted"] == 0.0 for r in records)


def test_a_site_killed_mid_round_the_round_completes_under_secagg(federation):
    # Malicious-mode SecAgg (what a network runs) needs t > 2n/3: with four
    # sites, t = 3, so the round survives one site dying mid-round.
    root, ca_dir, identities, data = federation
    four = (*SITES, "delta")
    config = server_config(
        root / "secagg.toml",
        sites=four,
        secagg={"protocol": "secagg", "malicious": True},
        strategy={"min_clients": 3},
        network={"heartbeat_s": 1.0, "offline_after": 3},
    )
    state = root / "state-secagg-kill"
    codes, procs = _run(
        root,
        ca_dir,
        identities,
        data,
        config,
        state,
        site_faults={"gamma": "site.mid_fit:2"},
        sites=four,
    )
    assert codes["gamma"] == 137
    assert codes["server"] == 0, procs.log("server")
    assert codes["alpha"] == codes["beta"] == codes["delta"] == 0
    records = [json.loads(x) for x in (state / "metrics.jsonl").open()]
    assert len(records) == 3
    assert records[0]["num_clients"] == 4
    assert records[1]["num_clients"] == 3  # gamma died training round 2
    assert all(r["secagg/aborted"] == 0.0 for r in records)
    assert records[1]["secagg/survivors"] == 3.0
    failures = [json.loads(x) for x in (state / "failures.jsonl").open()]
    assert {(f["client_id"], f["kind"]) for f in failures} >= {("gamma", "dropped")}
    assert np.isfinite(final_params(state)).all()
