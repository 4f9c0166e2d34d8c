"""With ``secure_rng`` the client sample comes from the keystream, not the seed.

Amplification by sampling assumes that the sample is as secret as the
noise: a client sample (or a batch of records) that anyone holding the
run's seed can recompute gives no amplification against them.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from fedshield.core import Params
from fedshield.privacy.noise import SecureRandom
from fedshield.strategies import CountSampler, FedAvg, FractionSampler
from fedshield.strategies.dp import DpFedAvg, PoissonSampler, PrivacySettings

CLIENTS = [f"client-{i:03d}" for i in range(100)]


def _strategy(secure: bool, sampler: object, mode: str = "central") -> DpFedAvg:
    return DpFedAvg(
        base=FedAvg(),
        privacy=PrivacySettings(
            mode=mode,  # type: ignore[arg-type]
            clip_norm=1.0,
            noise_multiplier=1.0,
            accountant="rdp",
            secure_rng=secure,
        ),
        sampler=sampler,  # type: ignore[arg-type]
        num_clients=len(CLIENTS),
    )


def _sampled(strategy: DpFedAvg, seed: int) -> tuple[str, ...]:
    state = strategy.init(Params({"w": np.zeros(3, np.float32)}))
    plan = strategy.configure(state, CLIENTS, rng=np.random.default_rng(seed))
    return plan.clients


SAMPLERS = [PoissonSampler(0.3), CountSampler(10)]


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["poisson", "fixed"])
@pytest.mark.parametrize("mode", ["central", "local", "record"])
def test_secure_client_sampling_is_not_a_function_of_the_seed(
    sampler: object, mode: str
) -> None:
    if mode == "record":
        strategy = DpFedAvg(
            base=FedAvg(),
            privacy=PrivacySettings(
                mode="record",
                clip_norm=1.0,
                noise_multiplier=1.0,
                accountant="pld",  # record mode is replace-one: PLD only
                secure_rng=True,
                delta=1e-4,
            ),
            sampler=sampler,  # type: ignore[arg-type]
            num_clients=len(CLIENTS),
            client_sizes=dict.fromkeys(CLIENTS, 100),
        )
    else:
        strategy = _strategy(True, sampler, mode)
    # Same seed, same round: five samples, not all alike (two equal ones
    # have a chance below 1e-12 each).
    draws = {_sampled(strategy, seed=7) for _ in range(5)}
    assert len(draws) == 5


@pytest.mark.parametrize("sampler", SAMPLERS, ids=["poisson", "fixed"])
def test_seeded_client_sampling_is_reproducible(sampler: object) -> None:
    strategy = _strategy(False, sampler)
    assert _sampled(strategy, seed=7) == _sampled(strategy, seed=7)
    assert _sampled(strategy, seed=7) != _sampled(strategy, seed=8)


def test_secure_configure_never_reads_the_rounds_generator() -> None:
    class Untouchable(np.random.Generator):
        def random(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("drew from the seeded generator")

        def choice(self, *args: object, **kwargs: object) -> object:
            raise AssertionError("drew from the seeded generator")

    rng = Untouchable(np.random.PCG64(0))
    for sampler in SAMPLERS:
        strategy = _strategy(True, sampler)
        state = strategy.init(Params({"w": np.zeros(3, np.float32)}))
        assert strategy.configure(state, CLIENTS, rng=rng).clients


def test_poisson_sampling_from_the_keystream_has_its_rate() -> None:
    sampler = PoissonSampler(0.1)
    source = SecureRandom()
    sizes = [len(sampler.sample(CLIENTS, round_idx=0, rng=source)) for _ in range(2000)]
    # Binomial(100, 0.1) each: the sum over 2000 rounds is Binomial(2e5, 0.1).
    assert stats.binomtest(sum(sizes), 200_000, 0.1).pvalue > 1e-6


@pytest.mark.parametrize("sampler", [CountSampler(3), FractionSampler(0.3)])
def test_fixed_size_sampling_from_the_keystream_is_uniform(sampler: object) -> None:
    source = SecureRandom()
    available = CLIENTS[:10]
    counts = dict.fromkeys(available, 0)
    for r in range(3000):
        picked = sampler.sample(available, round_idx=r, rng=source)  # type: ignore[attr-defined]
        assert len(picked) == 3 == len(set(picked))
        assert [available.index(c) for c in picked] == sorted(
            available.index(c) for c in picked
        )
        for cid in picked:
            counts[cid] += 1
    assert stats.chisquare(list(counts.values())).pvalue > 1e-6
