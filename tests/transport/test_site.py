"""Sites decide: policies refuse with a reason, the server hears a dropout.

``fedshield.api.network.serve`` runs in a thread of this process (insecure
loopback) and the sites are :class:`~fedshield.transport.site.SiteClient`
threads built by :func:`~fedshield.api.network.site_builder` from their
own data files, as ``fedshield join`` builds them.
"""

from __future__ import annotations

import json
import threading

import pytest

from fedshield.api.config import parse_config
from fedshield.api.network import _dp_options_check, load_site_data, serve, site_builder
from fedshield.core import FitConfig
from fedshield.errors import ConfigError
from fedshield.simulation.protocol import FitIns
from fedshield.transport.policy import SitePolicy
from fedshield.transport.site import SiteClient, SiteError, SiteRefusal, run_site

from .netutil import SITES, write_site_data

pytestmark = [pytest.mark.grpc, pytest.mark.timeout(180)]

CENTRAL = {
    "mode": "central",
    "clip_norm": 1.0,
    "noise_multiplier": 1.0,
    "sampling": "fixed",
    "accountant": "rdp",
}


def _config(**sections):
    config = {
        "run": {"name": "sites", "rounds": 3, "seed": 3, "federated_eval": True},
        "model": {"kind": "mlp", "hidden": [8]},
        "client": {"epochs": 1, "lr": 0.1},
        "network": {
            "sites": list(SITES),
            "input_shape": [64],
            "num_classes": 10,
            "poll_s": 2.0,
            "heartbeat_s": 1.0,
            "wait_for_sites_s": 60.0,
        },
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return parse_config(config)


def _serve_with_sites(tmp_path, config, policies):
    """Run ``config`` with the three sites; the server's outcome and the sites'."""
    data = write_site_data(tmp_path)
    ready = threading.Event()
    box: dict = {}

    def server():
        try:
            box["outcome"] = serve(
                config,
                ca_dir=None,
                state_dir=tmp_path / "state",
                listen="127.0.0.1:0",
                on_listening=lambda port: (box.update(port=port), ready.set()),
            )
        except BaseException as err:
            box["error"] = err
            ready.set()

    thread = threading.Thread(target=server, daemon=True)
    thread.start()
    assert ready.wait(60)
    assert "error" not in box, box.get("error")
    done: dict[str, object] = {}

    def site(name):
        build = site_builder(load_site_data(data[name]), policy=policies.get(name))
        client = SiteClient(
            f"127.0.0.1:{box['port']}", None, build, insecure=True, name=name
        )
        try:
            done[name] = run_site(client)
        except BaseException as err:
            done[name] = err

    sites = [threading.Thread(target=site, args=(n,), daemon=True) for n in SITES]
    for t in sites:
        t.start()
    thread.join(150)
    for t in sites:
        t.join(30)
    assert "error" not in box, box.get("error")
    return box["outcome"], done


def test_a_site_refuses_rounds_beyond_its_epsilon_and_the_server_hears_why(tmp_path):
    config = _config(privacy=CENTRAL, strategy={"min_clients": 2})
    # The site's own accountant (not the server's word): the cap sits
    # between the epsilon after 1 round and after 2.
    from fedshield.transport.policy import SiteGuard

    plan = config.to_dict()
    plan.pop("data")
    guard = SiteGuard(SitePolicy(), plan, list(SITES))
    cap = (guard.epsilon_after(1) + guard.epsilon_after(2)) / 2
    outcome, done = _serve_with_sites(
        tmp_path, config, {"gamma": SitePolicy(max_epsilon=cap)}
    )
    assert outcome.summary["status"] == "completed"
    records = [json.loads(x) for x in (tmp_path / "state/metrics.jsonl").open()]
    assert [r["federated_eval_clients"] for r in records] == [3, 2, 2]
    # The site's own accountant agrees with the server's.
    assert records[1]["epsilon"] == pytest.approx(guard.epsilon_after(2), rel=1e-9)
    failures = [json.loads(x) for x in (tmp_path / "state/failures.jsonl").open()]
    gamma = [f for f in failures if f["client_id"] == "gamma"]
    assert [(f["round"], f["stage"]) for f in gamma] == [
        (2, "fit"),
        (2, "evaluate"),
        (3, "fit"),
        (3, "evaluate"),
    ]
    assert all(f["kind"] == "dropped" for f in gamma)
    assert all("site policy: epsilon after round" in f["message"] for f in gamma)
    assert all(isinstance(v, int) for v in done.values()), done


def test_a_site_that_requires_secagg_refuses_a_plain_run_at_join(tmp_path):
    config = _config()
    data = write_site_data(tmp_path)
    build = site_builder(
        load_site_data(data["alpha"]), policy=SitePolicy(require_secagg=True)
    )
    plan = {"config": {k: v for k, v in config.to_dict().items() if k != "data"}}
    plan["sites"] = list(SITES)
    with pytest.raises(Exception, match=r"secure aggregation|secagg"):
        build(plan)


def test_a_fit_asking_for_less_local_noise_than_the_plan_is_refused():
    config = _config(
        privacy={"mode": "local", "clip_norm": 1.0, "noise_multiplier": 2.0},
    )
    check = _dp_options_check(config, len(SITES), dimension=600)
    assert check is not None
    honest = FitConfig(
        round_idx=0,
        options={"local_dp/clip_norm": 1.0, "local_dp/noise_multiplier": 2.0},
    )
    check("fit", FitIns(None, honest))  # type: ignore[arg-type]
    weaker = FitConfig(
        round_idx=0,
        options={"local_dp/clip_norm": 1.0, "local_dp/noise_multiplier": 0.1},
    )
    with pytest.raises(SiteRefusal, match="noise_multiplier"):
        check("fit", FitIns(None, weaker))  # type: ignore[arg-type]


def test_an_unreachable_server_is_named_after_the_retry_window():
    client = SiteClient(
        "127.0.0.1:9",  # discard port: nothing listens
        None,
        lambda plan: None,  # type: ignore[arg-type,return-value]
        insecure=True,
        name="alpha",
        connect_timeout_s=1.0,
    )
    with pytest.raises(SiteError) as info:
        client.run()
    client.close()
    assert info.value.exit_code == 40
    assert "unreachable" in str(info.value) and "fedshield serve" in str(info.value)


def test_a_site_file_holds_only_data(tmp_path):
    path = tmp_path / "site.toml"
    path.write_text('[data]\ndataset = "digits"\n[model]\nkind = "cnn"\n')
    with pytest.raises(ConfigError, match="only \\[data\\]"):
        load_site_data(path)
    path.write_text('[model]\nkind = "cnn"\n')
    with pytest.raises(ConfigError, match="no \\[data\\]"):
        load_site_data(path)


def test_the_ledger_answers_each_round_and_stage_once_and_never_backwards(tmp_path):
    from fedshield.transport.site import TaskLedger

    path = tmp_path / "ledger.json"
    ledger = TaskLedger(path)
    ledger.check("r", 0, "fit", "t0", cached=False)
    ledger.record("r", 0, "fit", "t0")
    # The same round's fit again with other parameters (another task id):
    # a second release for one round of the accountant, or two updates to
    # difference. Refused.
    with pytest.raises(SiteRefusal, match="once"):
        ledger.check("r", 0, "fit", "t0-other", cached=False)
    ledger.record("r", 3, "fit", "t3")
    with pytest.raises(SiteRefusal, match="do not go back"):
        ledger.check("r", 1, "fit", "t1", cached=False)
    ledger.record("r", 3, "evaluate", "e3")
    with pytest.raises(SiteRefusal, match="once"):
        ledger.check("r", 3, "evaluate", "e3-again", cached=False)
    # Kept on disk: after a restart the same task is not answered again
    # (the reply is no longer cached: it would be a new release).
    again = TaskLedger(path)
    with pytest.raises(SiteRefusal, match="restarted"):
        again.check("r", 3, "fit", "t3", cached=False)
    again.check("r", 4, "fit", "t4", cached=False)  # the next round is fine
    again.check("other-run", 0, "fit", "x", cached=False)  # another run


def test_the_plan_carries_no_seed():
    from fedshield.api.network import plan_of

    plan = plan_of(_config(privacy=CENTRAL), "run-1")
    assert "seed" not in plan["config"]["run"]
    assert "data" not in plan["config"]


def test_metrics_are_filtered_on_the_client_before_anything_is_held():
    from fedshield.api.network import _MetricsFilter
    from fedshield.core import ClientUpdate, Params

    class Client:
        trust = "mine"

        def fit(self, params, config, rng):
            return ClientUpdate("a", params, 3, metrics={"loss": 1.0, "secret": 2.0})

        def evaluate(self, params, config):
            return {"loss": 1.0, "secret": 2.0}

    def keep(metrics):
        return {k: v for k, v in metrics.items() if k == "loss"}

    filtered = _MetricsFilter(Client(), keep)
    params = Params({"w": __import__("numpy").zeros(2, "float32")})
    assert dict(filtered.fit(params, None, None).metrics) == {"loss": 1.0}
    assert filtered.evaluate(params, None) == {"loss": 1.0}
    assert filtered.trust == "mine"  # what the client knows passes through


def test_the_epsilon_cap_composes_the_sites_runs(tmp_path):
    # A server cannot reset a site's budget by starting a new run: the
    # ledger on the site's disk sums what its earlier runs spent.
    from types import SimpleNamespace

    import numpy as np

    from fedshield.core import ClientUpdate, Params
    from fedshield.simulation import wire
    from fedshield.simulation.protocol import StageRequest
    from fedshield.transport.site import SiteSetup, TaskLedger

    params = Params({"w": np.zeros(2, np.float32)})

    class Client:
        def fit(self, params, config, rng):
            return ClientUpdate("alpha", params, 3)

    ledger = TaskLedger(tmp_path / "ledger.json")
    setup = SiteSetup(
        lambda name: Client(), epsilon_after=lambda r: 1.0 * r, max_epsilon=3.5
    )

    def fit(run_id, round_idx):
        client = SiteClient(
            "127.0.0.1:9", None, lambda plan: setup, insecure=True, name="alpha",
            ledger=ledger,
        )  # fmt: skip
        client.setup, client.run_id = setup, run_id
        request = StageRequest(
            "fit", round_idx, {"alpha": FitIns(params, FitConfig(round_idx))}
        )
        payload = wire.encode_request(request, ["alpha"], 0)
        task = SimpleNamespace(
            stage="fit",
            round=round_idx,
            stage_seed=b"\1" * 32,
            task_id=f"{run_id}{round_idx}",
        )
        reply = wire.decode_reply(client._answer(task, payload))
        ledger.record(
            run_id, round_idx, "fit", task.task_id, client._cost("fit", round_idx)
        )
        client.close()
        return reply

    assert fit("run-1", 0).ok and fit("run-1", 1).ok  # ε 2 spent in run 1
    assert fit("run-2", 0).ok  # 2 + 1 = 3 <= 3.5
    refused = fit("run-2", 1)  # 2 + 2 = 4 > 3.5
    assert refused.failure is not None
    assert "over this site's runs would be 4" in refused.failure.message


def test_a_refused_task_costs_nothing_and_moves_no_round(tmp_path):
    from fedshield.transport.site import TaskLedger

    ledger = TaskLedger(tmp_path / "ledger.json")
    ledger.record("evil", 4_000_000_000, "fit", "t", None, ran=False)
    ledger.check("evil", 3, "fit", "t3", cached=False)  # no "going back"
    assert ledger.spent_elsewhere("other") == 0.0
    (tmp_path / "bad.json").write_text('{"r": {"answered": []}}')
    with pytest.raises(SiteError, match="unreadable"):
        TaskLedger(tmp_path / "bad.json")


def test_the_servers_seed_is_keyed_by_its_secret(tmp_path, monkeypatch):
    # Sites see values derived from the seed (stage seeds, the first model):
    # with a small run.seed they could try every value; keyed by a 256-bit
    # secret kept in the server's state they cannot.
    from fedshield.api.network import _server_seed
    from fedshield.transport.store import ServerStore

    monkeypatch.delenv("FEDSHIELD_SERVER_SECRET", raising=False)
    config = _config()
    a = _server_seed(config, ServerStore(tmp_path / "a"))
    b = _server_seed(config, ServerStore(tmp_path / "b"))
    assert a != b and a.bit_length() > 200
    assert _server_seed(config, ServerStore(tmp_path / "a")) == a  # kept
    monkeypatch.setenv("FEDSHIELD_SERVER_SECRET", "11" * 32)
    c = _server_seed(config, ServerStore(tmp_path / "c"))
    d = _server_seed(config, ServerStore(tmp_path / "d"))
    assert c == d  # reproducible when the operator asks for it
