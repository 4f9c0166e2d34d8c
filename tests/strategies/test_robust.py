"""Byzantine-robust aggregation rules: hand-computed cases, slow references,
properties and the requirements on the number of updates."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numpy.testing import assert_allclose, assert_array_equal
from scipy.optimize import minimize

from fedshield.core import (
    Aggregate,
    Aggregator,
    ClientUpdate,
    Params,
    ParamSpec,
    WeightedMean,
    aggregate,
)
from fedshield.errors import ConfigError, InvalidUpdateError
from fedshield.strategies import robust
from fedshield.strategies.robust import (
    RULE_NAMES,
    Bulyan,
    CoordinateMedian,
    FLTrust,
    GeometricMedian,
    Krum,
    NormBound,
    TrimmedMean,
    make_robust,
)

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None)


def _spec(d: int) -> ParamSpec:
    # Two arrays, so results are checked through the flat layout too.
    head = min(d, 6)
    entries: list[tuple[str, tuple[int, ...]]] = [("w", (head,))]
    if d > head:
        entries.append(("b", (d - head,)))
    return ParamSpec(tuple(entries))


def _updates(matrix: np.ndarray) -> list[ClientUpdate]:
    spec = _spec(matrix.shape[1])
    return [
        ClientUpdate(f"c{i}", Params.from_flat(row.astype(np.float32), spec), 1)
        for i, row in enumerate(matrix)
    ]


def _run(
    rule: Aggregator,
    matrix: np.ndarray,
    weights: Sequence[float] | None = None,
    *,
    seed: int = 0,
) -> Aggregate:
    ups = _updates(matrix)
    ws = [1.0] * len(ups) if weights is None else list(weights)
    return aggregate(
        rule,
        zip(ups, ws, strict=True),
        _spec(matrix.shape[1]),
        rng=np.random.default_rng(seed),
    )


def _random(n: int, d: int, *, seed: int = 0, outliers: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    matrix = rng.normal(size=(n, d)).astype(np.float32)
    for i in range(outliers):
        matrix[i] = rng.normal(loc=20.0, scale=5.0, size=d)
    return matrix[rng.permutation(n)]


# --------------------------------------------------- slow reference versions
# Python loops over clients (and, where the rule is coordinate-wise, over
# coordinates); float64 throughout.


def _ref_krum_order(points: list[np.ndarray], neighbours: int) -> list[int]:
    """Indices by (score, score with one more neighbour, index)."""
    keys = []
    for i, p in enumerate(points):
        dists = sorted(
            float(np.sum((p - q) ** 2)) for j, q in enumerate(points) if j != i
        )
        keys.append((sum(dists[:neighbours]), sum(dists[: neighbours + 1]), i))
    return [key[2] for key in sorted(keys)]


def _ref_krum(matrix: np.ndarray, f: int, m: int) -> np.ndarray:
    points = [row.astype(np.float64) for row in matrix]
    order = _ref_krum_order(points, len(points) - f - 2)
    return np.asarray(sum(points[i] for i in order[:m]) / m)


def _ref_median(matrix: np.ndarray) -> np.ndarray:
    return np.array(
        [statistics.median(float(v) for v in column) for column in matrix.T]
    )


def _ref_trimmed_mean(matrix: np.ndarray, f: int) -> np.ndarray:
    out = []
    for column in matrix.T:
        kept = sorted(float(v) for v in column)[f : len(column) - f]
        out.append(sum(kept) / len(kept))
    return np.array(out)


def _ref_bulyan(matrix: np.ndarray, f: int) -> np.ndarray:
    points = [row.astype(np.float64) for row in matrix]
    remaining = list(range(len(points)))
    selected: list[int] = []
    while len(selected) < len(points) - 2 * f:
        r = len(remaining)
        neighbours = min(max(r - f - 2, 1), r - 1)
        order = _ref_krum_order([points[i] for i in remaining], neighbours)
        selected.append(remaining.pop(order[0]))
    keep = len(selected) - 2 * f
    out = []
    for j in range(matrix.shape[1]):
        values = [float(points[i][j]) for i in selected]
        med = statistics.median(values)
        closest = sorted(values, key=lambda v: abs(v - med))[:keep]
        out.append(sum(closest) / keep)
    return np.array(out)


def _ref_geomed(
    matrix: np.ndarray,
    weights: Sequence[float],
    *,
    max_iter: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-6,
) -> np.ndarray:
    points = [row.astype(np.float64) for row in matrix]
    alpha = [w / sum(weights) for w in weights]
    z = sum(a * p for a, p in zip(alpha, points, strict=True))
    for _ in range(max_iter):
        betas = [
            a / max(eps, float(np.linalg.norm(z - p)))
            for a, p in zip(alpha, points, strict=True)
        ]
        new = sum(b * p for b, p in zip(betas, points, strict=True)) / sum(betas)
        moved = float(np.linalg.norm(new - z))
        z = new
        dists = [
            float(np.linalg.norm(z - p))
            for a, p in zip(alpha, points, strict=True)
            if a > 0
        ]
        if moved <= tol * max(statistics.median(dists), eps):
            break
    return np.asarray(z)


def _ref_norm_bound(
    matrix: np.ndarray, weights: Sequence[float], max_norm: float
) -> np.ndarray:
    total = np.zeros(matrix.shape[1])
    for row, w in zip(matrix, weights, strict=True):
        norm = math.sqrt(sum(float(v) ** 2 for v in row))
        total += w * min(1.0, max_norm / norm) * row.astype(np.float64)
    return total / sum(weights)


def _ref_fltrust(matrix: np.ndarray, reference: np.ndarray) -> np.ndarray:
    g0 = reference.astype(np.float64)
    g0_norm = math.sqrt(sum(float(v) ** 2 for v in g0))
    total = np.zeros(matrix.shape[1])
    trust_sum = 0.0
    for row in matrix.astype(np.float64):
        norm = math.sqrt(sum(float(v) ** 2 for v in row))
        cosine = sum(float(a) * float(b) for a, b in zip(row, g0, strict=True)) / (
            norm * g0_norm
        )
        trust = max(0.0, cosine)
        total += trust * (g0_norm / norm) * row
        trust_sum += trust
    return total / trust_sum


# --------------------------------------------------------------------- Krum


def test_krum_hand_computed_example_selects_most_central_update() -> None:
    # Prepare: five 2-D updates, f = 1, so each is scored by its
    # n - f - 2 = 2 nearest others. Squared distances:
    #        a      b      c      d      e
    #   a    -      1      4      2    200      a=(0,0)  b=(1,0)  c=(0,2)
    #   b    1      -      5      1    181      d=(1,1)  e=(10,10)
    #   c    4      5      -      2    164
    #   d    2      1      2      -    162
    #   e  200    181    164    162      -
    # Scores (sum of the 2 smallest in each row):
    #   a: 1 + 2 = 3   b: 1 + 1 = 2   c: 2 + 4 = 6   d: 1 + 2 = 3
    #   e: 162 + 164 = 326
    matrix = np.array([[0, 0], [1, 0], [0, 2], [1, 1], [10, 10]], np.float32)

    # Execute
    krum = _run(Krum(f=1), matrix)
    multi = _run(Krum(f=1, m=3), matrix)  # b, then a and d (both score 3)

    # Assert
    assert_array_equal(krum.delta.flat, [1.0, 0.0])
    assert krum.measurements["krum/selected"] == 1.0
    assert krum.measurements["robust/rejected"] == 4.0
    assert krum.measurements["krum/score_min"] == pytest.approx(2.0)
    assert_allclose(multi.delta.flat, [2 / 3, 1 / 3], rtol=1e-6)
    assert multi.measurements["krum/selected"] == 3.0
    assert multi.num_updates == 5


def test_multi_krum_default_m_is_n_minus_f() -> None:
    matrix = _random(9, 5, seed=3, outliers=2)
    out = _run(Krum(f=2, m=None), matrix)
    assert out.measurements["krum/selected"] == 7.0
    assert_allclose(out.delta.flat, _ref_krum(matrix, 2, 7), rtol=1e-5, atol=1e-6)


def test_krum_ignores_weights() -> None:
    matrix = _random(7, 4, seed=1, outliers=1)
    plain = _run(Krum(f=1, m=3), matrix)
    weighted = _run(Krum(f=1, m=3), matrix, weights=[1, 500, 2, 3, 9, 1, 0])
    assert_array_equal(plain.delta.flat, weighted.delta.flat)


def test_krum_with_large_common_offset_matches_reference() -> None:
    # ‖a‖² + ‖b‖² − 2a·b cancels badly when updates share a large offset; the
    # float64 Gram keeps the selection exact.
    matrix = (1000.0 + 0.01 * _random(11, 300, seed=5)).astype(np.float32)
    matrix[4] += 0.05
    out = _run(Krum(f=3, m=4), matrix)
    assert_allclose(out.delta.flat, _ref_krum(matrix, 3, 4), rtol=1e-7)


@pytest.mark.parametrize(("n", "f"), [(6, 2), (4, 1), (2, 0), (0, 1)])
def test_krum_too_few_updates_raises_config_error_naming_n_and_f(
    n: int, f: int
) -> None:
    with pytest.raises(ConfigError, match=rf"f={f}.*n > 2f \+ 2.*n={n}"):
        Krum(f=f).check(n)
    if n:
        with pytest.raises(ConfigError, match=rf"n={n}"):
            _run(Krum(f=f), _random(n, 3))


def test_krum_smallest_allowed_n_aggregates() -> None:
    Krum(f=2).check(7)
    out = _run(Krum(f=2), _random(7, 3))
    assert out.num_updates == 7


def test_multi_krum_m_above_n_minus_f_raises() -> None:
    with pytest.raises(ConfigError, match=r"m=8.*n - f = 7"):
        Krum(f=2, m=8).check(9)


# ------------------------------------------------------ coordinate-wise rules


@st.composite
def _poisoned(draw: st.DrawFn) -> tuple[int, np.ndarray, np.ndarray]:
    """Up to f outliers (any finite float32), at any positions, among honest
    updates: more honest than outliers, and n > 2f."""
    f = draw(st.integers(0, 3))
    outlier_count = draw(st.integers(0, f))
    honest_count = draw(st.integers(max(f + 1, 2 * f + 1 - outlier_count), 2 * f + 4))
    d = draw(st.integers(1, 5))
    honest = draw(
        hnp.arrays(
            np.float32, (honest_count, d), elements=st.floats(-1e3, 1e3, width=32)
        )
    )
    outliers = draw(
        hnp.arrays(
            np.float32,
            (outlier_count, d),
            elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
        )
    )
    order = draw(st.permutations(range(honest_count + outlier_count)))
    matrix = np.concatenate([honest, outliers])[list(order)]
    return f, honest, matrix


@PROPERTY_SETTINGS
@given(_poisoned())
def test_median_stays_in_honest_range_with_minority_of_outliers(
    case: tuple[int, np.ndarray, np.ndarray],
) -> None:
    _, honest, matrix = case
    out = _run(CoordinateMedian(), matrix).delta.flat
    assert np.all(out >= honest.min(axis=0))
    assert np.all(out <= honest.max(axis=0))


@PROPERTY_SETTINGS
@given(_poisoned())
def test_trimmed_mean_stays_in_honest_range_with_at_most_f_outliers(
    case: tuple[int, np.ndarray, np.ndarray],
) -> None:
    f, honest, matrix = case
    out = _run(TrimmedMean(f), matrix).delta.flat
    assert np.all(out >= honest.min(axis=0))
    assert np.all(out <= honest.max(axis=0))


def test_median_hand_computed_even_and_odd() -> None:
    odd = np.array([[3, -1], [1, 7], [2, 100]], np.float32)
    even = np.array([[3, -1], [1, 7], [2, 100], [10, 0]], np.float32)
    assert_array_equal(_run(CoordinateMedian(), odd).delta.flat, [2.0, 7.0])
    assert_array_equal(_run(CoordinateMedian(), even).delta.flat, [2.5, 3.5])


def test_trimmed_mean_beta_trims_floor_of_fraction() -> None:
    matrix = _random(10, 6, seed=2, outliers=2)
    by_beta = _run(TrimmedMean(beta=0.25), matrix)  # floor(2.5) = 2
    assert by_beta.measurements["trimmed_mean/trimmed_per_coordinate"] == 4.0
    assert_allclose(by_beta.delta.flat, _ref_trimmed_mean(matrix, 2), rtol=1e-6)


@pytest.mark.parametrize(("n", "f"), [(4, 2), (2, 1), (1, 1)])
def test_trimmed_mean_too_few_updates_raises_config_error(n: int, f: int) -> None:
    with pytest.raises(ConfigError, match=rf"f={f}.*n > 2f.*n={n}"):
        TrimmedMean(f).check(n)
    with pytest.raises(ConfigError, match=rf"n={n}"):
        _run(TrimmedMean(f), _random(n, 3))


@pytest.mark.parametrize(
    "kwargs", [{}, {"f": 1, "beta": 0.1}, {"f": -1}, {"beta": 0.5}, {"beta": -0.1}]
)
def test_trimmed_mean_bad_parameters_raise(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="TrimmedMean"):
        TrimmedMean(**kwargs)  # type: ignore[arg-type]


# ------------------------------------------------------------------- Bulyan


@pytest.mark.parametrize(("n", "f"), [(6, 1), (10, 2), (2, 0)])
def test_bulyan_too_few_updates_raises_config_error_naming_n_and_f(
    n: int, f: int
) -> None:
    with pytest.raises(ConfigError, match=rf"f={f}.*n >= 4f \+ 3.*n={n}"):
        Bulyan(f=f).check(n)
    with pytest.raises(ConfigError, match=rf"n={n}"):
        _run(Bulyan(f=f), _random(n, 3))


def test_bulyan_rejects_far_outliers() -> None:
    # Prepare: 9 honest updates near 0, 2 far away (f = 2, n = 11 = 4f + 3).
    rng = np.random.default_rng(4)
    matrix = rng.normal(scale=0.1, size=(11, 8)).astype(np.float32)
    matrix[[2, 7]] = 50.0

    # Execute
    out = _run(Bulyan(f=2), matrix)

    # Assert
    assert np.abs(out.delta.flat).max() < 0.3
    assert out.measurements["bulyan/selected"] == 7.0
    assert out.measurements["robust/rejected"] == 4.0
    assert out.measurements["bulyan/kept_per_coordinate"] == 3.0


# --------------------------------------------------- each rule vs reference

_Reference = Callable[[np.ndarray, list[float]], np.ndarray]

# name: (rule, slow reference, number of updates)
_REFERENCE_CASES: dict[str, tuple[Aggregator, _Reference, int]] = {
    "krum": (Krum(f=2), lambda x, w: _ref_krum(x, 2, 1), 11),
    "multi_krum": (Krum(f=2, m=5), lambda x, w: _ref_krum(x, 2, 5), 11),
    "median": (CoordinateMedian(), lambda x, w: _ref_median(x), 11),
    "median_even": (CoordinateMedian(), lambda x, w: _ref_median(x), 10),
    "trimmed_mean": (TrimmedMean(3), lambda x, w: _ref_trimmed_mean(x, 3), 11),
    "bulyan": (Bulyan(f=2), lambda x, w: _ref_bulyan(x, 2), 11),
    "bulyan_even": (Bulyan(f=1), lambda x, w: _ref_bulyan(x, 1), 10),
    "bulyan_f0": (Bulyan(f=0), lambda x, w: _ref_bulyan(x, 0), 11),
    "geomed": (GeometricMedian(), lambda x, w: _ref_geomed(x, w), 11),
    "norm_bound": (
        NormBound(max_norm=4.0),
        lambda x, w: _ref_norm_bound(x, w, 4.0),
        11,
    ),
}


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("name", sorted(_REFERENCE_CASES))
def test_rule_matches_slow_reference(
    name: str, blocks: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: 10 or 11 updates (3 of them shifted outliers), random weights.
    # With "several", columns are read in blocks of 256, the last one partial.
    if blocks == "several":
        monkeypatch.setattr(robust, "_BLOCK_VALUES", 1)
    rule, reference, n = _REFERENCE_CASES[name]
    d = 40 if blocks == "one" else 700
    matrix = _random(n, d, seed=7, outliers=3)
    weights = list(np.random.default_rng(8).uniform(0.5, 3.0, size=n))

    # Execute
    out = _run(rule, matrix, weights)

    # Assert
    assert_allclose(out.delta.flat, reference(matrix, weights), rtol=1e-5, atol=2e-6)


def test_fltrust_matches_slow_reference() -> None:
    matrix = _random(9, 30, seed=11, outliers=2)
    matrix[3] = -matrix[3]
    reference = np.random.default_rng(12).normal(size=30).astype(np.float32)
    g0 = Params.from_flat(reference, _spec(30))
    out = _run(FLTrust(g0), matrix)
    assert_allclose(out.delta.flat, _ref_fltrust(matrix, reference), rtol=1e-5)


# ---------------------------------------------------------- shared contracts

_ALL_RULES: list[Aggregator] = [
    Krum(f=1),
    Krum(f=1, m=None),
    CoordinateMedian(),
    TrimmedMean(1),
    TrimmedMean(beta=0.2),
    Bulyan(f=1),
    GeometricMedian(),
    NormBound(max_norm=100.0),
    FLTrust(Params.from_flat(np.ones(5, np.float32), _spec(5))),
]


@pytest.mark.parametrize("rule", _ALL_RULES, ids=repr)
def test_rule_is_permutation_invariant(rule: Aggregator) -> None:
    matrix = _random(9, 5, seed=13, outliers=2)
    order = np.random.default_rng(14).permutation(9)
    out = _run(rule, matrix).delta.flat
    shuffled = _run(rule, matrix[order]).delta.flat
    assert_allclose(shuffled, out, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule", _ALL_RULES, ids=repr)
def test_rule_of_equal_updates_is_that_update(rule: Aggregator) -> None:
    row = np.abs(_random(1, 5, seed=15)[0]) + 0.5  # positive: FLTrust trusts it
    out = _run(rule, np.tile(row, (9, 1)))
    if isinstance(rule, FLTrust):  # FLTrust rescales to the reference's norm
        assert rule.reference is not None
        row = row * (rule.reference.norm() / np.linalg.norm(row))
    assert_allclose(out.delta.flat, row, rtol=1e-6)
    assert out.num_updates == 9


@pytest.mark.parametrize("rule", _ALL_RULES, ids=repr)
def test_rule_without_updates_raises(rule: Aggregator) -> None:
    acc = rule.begin(_spec(5), rng=np.random.default_rng(0))
    with pytest.raises(InvalidUpdateError, match="no update"):
        acc.result()


@pytest.mark.parametrize("rule", _ALL_RULES, ids=repr)
def test_rule_rejects_update_of_other_layout(rule: Aggregator) -> None:
    acc = rule.begin(_spec(5), rng=np.random.default_rng(0))
    with pytest.raises(InvalidUpdateError, match="does not match the model"):
        acc.add(ClientUpdate("x", Params({"w": np.ones(4, np.float32)}), 1), 1.0)


@pytest.mark.parametrize("rule", _ALL_RULES, ids=repr)
def test_rule_reports_norms_and_is_not_streaming_unless_o_d(rule: Aggregator) -> None:
    out = _run(rule, _random(9, 5, seed=16))
    assert out.measurements["robust/norm_max"] >= out.measurements["robust/norm_median"]
    assert all(isinstance(v, float) for v in out.measurements.values())
    assert rule.is_streaming == isinstance(rule, NormBound | FLTrust)


@pytest.mark.parametrize(
    "rule", [CoordinateMedian(), TrimmedMean(0), GeometricMedian()], ids=repr
)
def test_single_update_rules_return_it(rule: Aggregator) -> None:
    row = _random(1, 5, seed=17)
    assert_allclose(_run(rule, row).delta.flat, row[0], rtol=1e-6)


@pytest.mark.parametrize("rule", [Krum(f=0), Bulyan(f=0), TrimmedMean(1)], ids=repr)
def test_single_update_with_requirement_raises_config_error(rule: Aggregator) -> None:
    with pytest.raises(ConfigError, match="n=1"):
        _run(rule, _random(1, 5))


@pytest.mark.parametrize("rule", [GeometricMedian(), NormBound(1.0)], ids=repr)
def test_weighted_rules_refuse_negative_weight(rule: Aggregator) -> None:
    acc = rule.begin(_spec(3), rng=np.random.default_rng(0))
    update = _updates(_random(1, 3))[0]
    with pytest.raises(InvalidUpdateError, match="weight"):
        acc.add(update, -1.0)


# ----------------------------------------------------------------- NormBound


@PROPERTY_SETTINGS
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=2, max_dims=2, min_side=2, max_side=6),
        elements=st.floats(-1e6, 1e6, width=32),
    ),
    st.floats(0.01, 100.0),
    st.data(),
)
def test_norm_bound_no_update_contributes_beyond_max_norm(
    matrix: np.ndarray, max_norm: float, data: st.DataObject
) -> None:
    # Prepare: W·mean(all) − W₋ₖ·mean(all but k) is update k's contribution.
    n = matrix.shape[0]
    weights = data.draw(st.lists(st.floats(0.1, 10.0), min_size=n, max_size=n))
    rule = NormBound(max_norm=max_norm)

    # Execute
    full = _run(rule, matrix, weights).delta.flat.astype(np.float64)
    total = sum(weights)

    # Assert
    assert np.linalg.norm(full) <= max_norm * (1 + 1e-5)
    for k in range(n):
        rest = [w for i, w in enumerate(weights) if i != k]
        without = _run(rule, np.delete(matrix, k, axis=0), rest).delta.flat
        contribution = total * full - sum(rest) * without.astype(np.float64)
        assert np.linalg.norm(contribution) <= weights[k] * max_norm * (1 + 1e-4) + (
            1e-5 * total * max_norm
        )


def test_norm_bound_counts_clipped_and_leaves_small_updates() -> None:
    matrix = np.array([[3, 4], [0.3, 0.4], [0, -10]], np.float32)
    out = _run(NormBound(max_norm=1.0), matrix)
    assert out.measurements["norm_bound/clipped"] == 2.0
    assert_allclose(out.delta.flat, [(0.6 + 0.3) / 3, (0.8 + 0.4 - 1) / 3], rtol=1e-6)


def test_norm_bound_noise_is_seeded_and_has_requested_std() -> None:
    # Prepare: 40,000 coordinates: the sample std is within ~1 % of σ.
    matrix = _random(3, 40_000, seed=18) * 0.001
    rule = NormBound(max_norm=1e9, noise_std=0.05)
    clean = _run(NormBound(max_norm=1e9), matrix).delta.flat

    # Execute
    first = _run(rule, matrix, seed=5).delta.flat
    again = _run(rule, matrix, seed=5).delta.flat
    other = _run(rule, matrix, seed=6).delta.flat

    # Assert
    assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert np.std(first - clean) == pytest.approx(0.05, rel=0.03)


# ------------------------------------------------------------------- FLTrust


def _fltrust(reference: list[float]) -> FLTrust:
    return FLTrust(Params.from_flat(np.array(reference, np.float32), _spec(3)))


def test_fltrust_update_opposite_to_reference_gets_zero_trust() -> None:
    matrix = np.array([[1, 2, 0], [2, 1, 1], [-3, -6, 0]], np.float32)
    out = _run(_fltrust([1, 1, 0]), matrix)
    without = _run(_fltrust([1, 1, 0]), matrix[:2])
    assert out.measurements["robust/rejected"] == 1.0
    assert out.measurements["fltrust/trusted"] == 2.0
    assert_allclose(out.delta.flat, without.delta.flat, rtol=1e-6)


def test_fltrust_scaling_an_update_does_not_change_result() -> None:
    matrix = _random(6, 3, seed=19)
    matrix[:, 0] = np.abs(matrix[:, 0]) + 0.1  # all positively aligned
    scaled = matrix.copy()
    scaled[2] *= 1000.0
    scaled[4] *= 0.001
    rule = _fltrust([1, 0.2, -0.1])
    assert_allclose(
        _run(rule, scaled).delta.flat, _run(rule, matrix).delta.flat, rtol=1e-5
    )


def test_fltrust_result_norm_at_most_reference_norm() -> None:
    rule = _fltrust([3, 4, 0])
    out = _run(rule, _random(8, 3, seed=20) * 100)
    assert np.linalg.norm(out.delta.flat) <= 5.0 * (1 + 1e-6)


def test_fltrust_all_zero_trust_gives_zero_update_and_says_so() -> None:
    matrix = np.array([[-1, 0, 0], [0, 1, 0], [0, 0, 0]], np.float32)
    out = _run(_fltrust([1, 0, 0]), matrix)
    assert_array_equal(out.delta.flat, np.zeros(3, np.float32))
    assert out.measurements["fltrust/zero_trust"] == 1.0
    assert out.measurements["robust/rejected"] == 3.0


def test_fltrust_without_reference_refuses_to_begin() -> None:
    with pytest.raises(ConfigError, match="no reference update"):
        FLTrust().begin(_spec(3), rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="does not match"):
        _fltrust([1, 2, 3]).begin(_spec(4), rng=np.random.default_rng(0))
    reference = _fltrust([1, 2, 3]).reference
    assert reference is not None
    ready = FLTrust().with_reference(reference)
    assert ready.begin(_spec(3), rng=np.random.default_rng(0)) is not None


# ---------------------------------------------------------- geometric median


def _weiszfeld_objective(z: np.ndarray, points: np.ndarray, w: np.ndarray) -> float:
    return float(np.sum(w * np.linalg.norm(points - z, axis=1)))


def test_geometric_median_close_to_scipy_minimiser() -> None:
    # Prepare: 7 weighted points in 3-D; scipy minimises Σ w_k ‖z − x_k‖.
    rng = np.random.default_rng(21)
    points = rng.normal(size=(7, 3)).astype(np.float32)
    weights = rng.uniform(0.5, 2.0, size=7)
    p64 = points.astype(np.float64)
    best = minimize(
        _weiszfeld_objective,
        x0=p64.mean(axis=0),
        args=(p64, weights),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000},
    )

    # Execute
    tight = _run(GeometricMedian(max_iter=1000, tol=1e-10), points, list(weights))
    default = _run(GeometricMedian(), points, list(weights))

    # Assert
    assert_allclose(tight.delta.flat, best.x, atol=1e-5)
    assert tight.measurements["geomed/converged"] == 1.0
    ours = _weiszfeld_objective(default.delta.flat.astype(np.float64), p64, weights)
    assert ours <= best.fun * (1 + 1e-6)
    assert_allclose(default.delta.flat, best.x, atol=1e-3)


def test_geometric_median_robust_to_one_huge_outlier() -> None:
    # Prepare: 9 honest updates around 0 and one at 10⁶ in every coordinate.
    rng = np.random.default_rng(22)
    honest = rng.normal(size=(9, 4))
    matrix = np.vstack([honest, np.full((1, 4), 1e6)]).astype(np.float32)
    p64 = matrix.astype(np.float64)
    ones = np.ones(10)
    best = minimize(
        _weiszfeld_objective,
        x0=np.median(p64, axis=0),
        args=(p64, ones),
        method="Nelder-Mead",
        options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20_000},
    )

    # Execute
    out = _run(GeometricMedian(), matrix)

    # Assert: the mean moved by 10⁵; the geometric median stays with the
    # honest updates and agrees with scipy's.
    assert np.abs(out.delta.flat).max() < 2.0
    assert_allclose(out.delta.flat, best.x, atol=1e-3)
    assert out.measurements["geomed/converged"] == 1.0


def test_geometric_median_weight_equals_duplication() -> None:
    matrix = _random(5, 6, seed=23)
    doubled = np.vstack([matrix, matrix[:1]])
    weighted = _run(GeometricMedian(tol=1e-10, max_iter=1000), matrix, [2, 1, 1, 1, 1])
    duplicated = _run(GeometricMedian(tol=1e-10, max_iter=1000), doubled)
    assert_allclose(weighted.delta.flat, duplicated.delta.flat, atol=1e-6)


def test_geometric_median_all_zero_weights_raises() -> None:
    with pytest.raises(InvalidUpdateError, match="positive weight"):
        _run(GeometricMedian(), _random(3, 4), [0.0, 0.0, 0.0])


# ------------------------------------------------------------------ factory


@pytest.mark.parametrize(
    ("name", "kwargs", "expected"),
    [
        ("fedavg", {}, WeightedMean),
        ("krum", {"f": 1}, Krum),
        ("multi_krum", {"f": 1, "m": 3}, Krum),
        ("median", {}, CoordinateMedian),
        ("trimmed_mean", {"beta": 0.1}, TrimmedMean),
        ("bulyan", {"f": 1}, Bulyan),
        ("geomed", {"max_iter": 10}, GeometricMedian),
        ("norm_bound", {"max_norm": 2.0, "noise_std": 0.01}, NormBound),
        ("fltrust", {}, FLTrust),
    ],
)
def test_make_robust_builds_each_rule(
    name: str, kwargs: dict[str, object], expected: type
) -> None:
    rule = make_robust(name, **kwargs)  # type: ignore[arg-type]
    assert isinstance(rule, expected)
    assert isinstance(rule, Aggregator)


def test_make_robust_names_cover_every_rule() -> None:
    assert set(RULE_NAMES) == {
        "fedavg",
        "krum",
        "multi_krum",
        "median",
        "trimmed_mean",
        "bulyan",
        "geomed",
        "norm_bound",
        "fltrust",
    }
    assert make_robust("krum", f=2) == Krum(f=2, m=1)
    assert make_robust("multi_krum", f=2) == Krum(f=2, m=None)


def test_make_robust_unknown_name_lists_the_names() -> None:
    with pytest.raises(ConfigError, match=r"'krumm'.*krum, multi_krum, median"):
        make_robust("krumm", f=1)


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("krum", {}, r"'krum' needs `f`"),
        ("bulyan", {"f": 1, "m": 2}, r"does not use `m`"),
        ("median", {"f": 1}, r"does not use `f` \(it takes no parameters\)"),
        ("trimmed_mean", {}, r"exactly one of `f` and `beta`"),
        ("norm_bound", {"noise_std": 0.1}, r"needs `max_norm`"),
        ("krum", {"f": -1}, r"`f` of Krum must be an integer >= 0"),
        ("norm_bound", {"max_norm": 0.0}, r"`max_norm` of NormBound must be"),
    ],
)
def test_make_robust_bad_parameters_raise(
    name: str, kwargs: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make_robust(name, **kwargs)  # type: ignore[arg-type]
