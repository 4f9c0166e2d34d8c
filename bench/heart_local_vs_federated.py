"""Heart disease across 4 hospitals: FedAvg against each hospital alone.

Run: .venv/bin/python bench/heart_local_vs_federated.py [--seeds 5]

Each hospital's local-only model is the same logistic model trained with the
same local settings for as many epochs as FedAvg runs rounds (so it sees its
own data as often as in the federation), on the same train split, and
evaluated on the same pooled held-out test set.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from fedshield.api import build_federation, build_strategy, load_config
from fedshield.core import FitConfig, derive_rng
from fedshield.simulation import run_rounds

ROOT = Path(__file__).resolve().parents[1]


def compare(seed: int) -> dict[str, float]:
    config = load_config(
        ROOT / "examples" / "heart_hospitals.toml", [f"run.seed={seed}"]
    )
    federation = build_federation(config)
    strategy = build_strategy(config)
    init = federation.model.init_params(seed)
    state = run_rounds(
        strategy,
        strategy.init(init),
        rounds=config.run.rounds,
        client_fn=federation.client_fn,
        client_ids=federation.client_ids,
        seed=seed,
    )
    results = {"federated": federation.evaluate(state.params)["accuracy"]}
    c = config.client
    fit = FitConfig(
        round_idx=0,
        epochs=config.run.rounds * c.epochs,
        batch_size=c.batch_size,
        lr=c.lr,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
    )
    for cid in federation.client_ids:
        rows, _ = federation.client_fn.local_split(cid)
        x, y = federation.train.x[rows], federation.train.y[rows]
        params, _ = federation.model.train(
            init, x, y, fit, rng=derive_rng(seed, "local", cid)
        )
        results[cid] = federation.evaluate(params)["accuracy"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    runs = [compare(seed) for seed in range(args.seeds)]
    print(f"pooled held-out test accuracy, mean ± sd over {args.seeds} seeds")
    table = {}
    for key in runs[0]:
        values = [r[key] for r in runs]
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        table[key] = {"mean": statistics.fmean(values), "sd": sd}
        print(f"  {key:<15} {table[key]['mean']:.3f} ± {sd:.3f}")
    print(json.dumps(table))


if __name__ == "__main__":
    main()
