"""Benchmark: streaming WeightedMean against one BLAS ``w @ M`` (gemv).

The streaming rule adds each client's update into one float32 accumulator as
it arrives; the baseline has every update stacked in a matrix already and
multiplies once. Both read the same 100 x 1,000,000 float32 values (400 MB),
so the baseline is the memory-bandwidth bound the streaming rule should get
close to. Run with ``make bench`` (``pytest -q -m bench bench -s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedshield.core import ClientUpdate, Params, ParamSpec, WeightedMean

K = 100  # client updates
D = 1_000_000  # values per update
REPEATS = 10  # best of N
MIN_RATIO = 0.70  # throughput(stream) / throughput(gemv), the bar


def _blas_threads() -> str:
    """BLAS thread counts, to read the figures by (threadpoolctl if present)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover - comes with scikit-learn
        return "unknown"
    pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    return ", ".join(
        f"{p.get('prefix', '?')} {p.get('version', '?')}: {p['num_threads']}"
        for p in pools
    )


def _best_of_interleaved(
    funcs: dict[str, Callable[[], np.ndarray]], repeats: int
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    # Blocks alternate, so both sides see the same machine load over time.
    # After a multi-threaded call, an OpenBLAS pool's threads keep spinning
    # for a while (OpenBLAS's THREAD_TIMEOUT, about 2**28 cycles) and take
    # the cores from whatever runs next -- numpy and SciPy each load their own
    # OpenBLAS -- so each block waits for that to pass and starts with an
    # untimed call.
    outs = {name: func() for name, func in funcs.items()}  # warm-up
    best = dict.fromkeys(funcs, float("inf"))
    for _ in range(repeats):
        for name, func in funcs.items():
            time.sleep(0.3)
            outs[name] = func()  # settle
            for _ in range(2):
                start = time.perf_counter()
                outs[name] = func()
                best[name] = min(best[name], time.perf_counter() - start)
    return best, outs


@pytest.mark.bench
def test_weighted_mean_throughput_close_to_gemv() -> None:
    # Prepare: the updates stacked once, and their weights (example counts).
    rng = np.random.default_rng(0)
    matrix = rng.random((K, D), dtype=np.float32)
    matrix += 0.5  # values in [0.5, 1.5): no cancellation, rtol is meaningful
    counts = rng.integers(1, 1000, size=K)
    weights = counts.astype(np.float32)
    spec = ParamSpec((("w", (D,)),))

    # A row of a C-contiguous float32 matrix is taken over without a copy.
    row = Params.from_flat(matrix[0], spec, copy=False)
    assert np.shares_memory(row.flat, matrix), "from_flat(copy=False) copied a row"
    assert matrix.flags.writeable

    def gemv() -> np.ndarray:
        out: np.ndarray = (weights @ matrix) * np.float32(1.0 / weights.sum())
        return out

    def stream() -> np.ndarray:
        acc = WeightedMean().begin(spec, rng=rng)
        for k in range(K):
            delta = Params.from_flat(matrix[k], spec, copy=False)
            update = ClientUpdate(f"client-{k}", delta, int(counts[k]))
            acc.add(update, float(weights[k]))
        return acc.result().delta.flat

    # Execute
    best, outs = _best_of_interleaved({"gemv": gemv, "stream": stream}, REPEATS)
    t_gemv, t_stream = best["gemv"], best["stream"]
    ratio = t_gemv / t_stream

    # Report
    gb = K * D * 4 / 1e9
    print(
        f"\nWeightedMean {K} x {D:,} float32, best of {REPEATS}: "
        f"gemv {t_gemv * 1e3:.1f} ms ({gb / t_gemv:.1f} GB/s), "
        f"stream {t_stream * 1e3:.1f} ms ({gb / t_stream:.1f} GB/s), "
        f"ratio t_gemv/t_stream = {ratio:.2f} (bar {MIN_RATIO:.2f}); "
        f"BLAS threads: {_blas_threads()}"
    )

    # Assert
    assert_allclose(outs["stream"], outs["gemv"], rtol=1e-4, atol=0)
    assert ratio >= MIN_RATIO, (
        f"streaming WeightedMean runs at {ratio:.2f} of gemv's throughput "
        f"(gemv {t_gemv * 1e3:.1f} ms, stream {t_stream * 1e3:.1f} ms); "
        f"the bar is {MIN_RATIO:.2f}"
    )
