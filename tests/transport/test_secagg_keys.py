"""SecAgg keys bound to the sites' certificates (malicious mode over a network).

A server that substitutes a site's key, or enrols a site of its own, is
caught by every honest site before it sends anything; without the binding
(clients that take the server's table) the same tampering goes through.
"""

from __future__ import annotations

import dataclasses

import pytest

from fedshield.errors import ProtocolError
from fedshield.secagg import crypto
from fedshield.simulation.secure_client import ClientTrust
from fedshield.transport.auth import load_identity
from fedshield.transport.secagg_keys import SiteKeys

from ..simulation.test_secure_trust import IDS, Client, _run, tampering  # noqa: F401
from .netutil import make_ca


@pytest.fixture(scope="module")
def identities(tmp_path_factory):
    root = tmp_path_factory.mktemp("pki")
    _, folders = make_ca(root, IDS)
    _, foreign = make_ca(root / "foreign", IDS)
    return (
        {cid: load_identity(folders[cid]) for cid in IDS},
        {cid: load_identity(foreign[cid]) for cid in IDS},
    )


def _clients(identities, run_id="run-1"):
    own, _ = identities
    return {
        cid: Client(cid, ClientTrust(keys=SiteKeys(own[cid], run_id, IDS)))
        for cid in IDS
    }


def test_a_round_with_certified_keys_completes(identities):
    result = _run(_clients(identities), malicious=True)
    assert result.metrics["secagg/aborted"] == 0.0
    assert result.metrics["secagg/survivors"] == 5.0


def _swap_key(cid, setup):
    forged = crypto.generate_signing_key().public
    return dataclasses.replace(setup, verify_keys={**setup.verify_keys, "1": forged})


def test_a_substituted_key_is_refused_by_every_honest_site(identities, tampering):  # noqa: F811
    tampering(_swap_key)
    result = _run(_clients(identities), malicious=True)
    assert result.metrics["secagg/aborted"] == 1.0  # nothing released
    refused = [f for f in result.failures if f.stage == "advertise_keys"]
    assert len(refused) == 5
    assert any("did not attest" in f.message for f in refused)


def test_without_the_binding_the_substitution_goes_through(tampering):  # noqa: F811
    tampering(_swap_key)
    result = _run({cid: Client(cid) for cid in IDS}, malicious=True)
    assert not any("attest" in f.message for f in result.failures)


def _enrol_sybil(cid, setup):
    forged = crypto.generate_signing_key().public
    keys = {**setup.verify_keys, "mallory": forged}
    return dataclasses.replace(setup, verify_keys=keys)


def test_a_site_the_plan_did_not_announce_is_refused(identities, tampering):  # noqa: F811
    tampering(_enrol_sybil)
    result = _run(_clients(identities), malicious=True)
    assert result.metrics["secagg/aborted"] == 1.0
    assert any("not a site of this run" in f.message for f in result.failures)


def test_check_table_refuses_foreign_certificates_other_runs_and_missing_proofs(
    identities,
):
    own, foreign = identities
    alice = SiteKeys(own["0"], "run-1", IDS)
    bob = SiteKeys(own["1"], "run-1", IDS)
    table = {"0": alice.announce("0")[0], "1": bob.announce("1")[0]}
    proofs = {"0": alice.announce("0")[1], "1": bob.announce("1")[1]}
    alice.check_table(table, proofs)  # the honest table passes
    with pytest.raises(ProtocolError, match="without its certificate"):
        alice.check_table(table, {"0": proofs["0"]})
    # A key attested for another run (a replay of an old attestation).
    old = SiteKeys(own["1"], "run-0", IDS)
    with pytest.raises(ProtocolError, match="did not attest"):
        alice.check_table(
            {**table, "1": old.announce("1")[0]}, {**proofs, "1": old.announce("1")[1]}
        )
    # A certificate from another CA, correctly self-consistent.
    stranger = SiteKeys(foreign["1"], "run-1", IDS)
    with pytest.raises(ProtocolError, match="not issued by this federation"):
        alice.check_table(
            {**table, "1": stranger.announce("1")[0]},
            {**proofs, "1": stranger.announce("1")[1]},
        )
    # Bob's certificate attesting a key for "2".
    with pytest.raises(ProtocolError, match=r"another's|did not attest"):
        alice.check_table({**table, "2": table["1"]}, {**proofs, "2": proofs["1"]})
    # Alice's own entry replaced.
    with pytest.raises(ProtocolError, match="not its own"):
        alice.check_table({**table, "0": table["1"]}, proofs)


def _victim_and_one(cid, setup):
    # A round of the victim "0" and one other, at threshold 2: the server
    # (with a Sybil on its roster) would learn the victim's update.
    keys = {k: v for k, v in setup.verify_keys.items() if k in ("0", "1")}
    config = dataclasses.replace(setup.config, threshold=2)
    return dataclasses.replace(setup, verify_keys=keys, config=config)


def _guarded_clients(identities):
    """Clients with certified keys, a floor of 3 and malicious mode's threshold."""
    from fedshield.simulation.secure import SecureAggregation

    own, _ = identities
    settings = SecureAggregation(protocol="secagg", malicious=True)
    return {
        cid: Client(
            cid,
            ClientTrust(
                keys=SiteKeys(own[cid], "run-1", IDS),
                min_clients=3,
                threshold_for=settings.threshold_for,
            ),
        )
        for cid in IDS
    }


def test_a_round_of_too_few_clients_or_a_low_threshold_is_refused(
    identities,
    tampering,  # noqa: F811
):
    clients = _guarded_clients(identities)
    tampering(_victim_and_one)
    result = _run(clients, malicious=True)
    assert result.metrics["secagg/aborted"] == 1.0
    assert any("at least 3" in f.message for f in result.failures)


def _low_threshold(cid, setup):
    return dataclasses.replace(
        setup, config=dataclasses.replace(setup.config, threshold=3)
    )


def test_a_threshold_below_the_clients_own_is_refused(identities, tampering):  # noqa: F811
    clients = _guarded_clients(identities)
    tampering(_low_threshold)  # 3 of 5; malicious mode's own is 4
    result = _run(clients, malicious=True)
    assert result.metrics["secagg/aborted"] == 1.0
    assert any("configuration gives 4" in f.message for f in result.failures)
