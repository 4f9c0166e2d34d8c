"""Torch-free clients for testing the round loop."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedshield.core import ClientUpdate, EvalConfig, FitConfig, Params

SPEC_PARAMS = Params({"w": np.zeros((2, 2), np.float32), "b": np.zeros(3, np.float32)})


class MeanClient:
    """Moves the model to its own target: delta = target - params."""

    def __init__(self, client_id: str, target: float, n: int) -> None:
        self.client_id = client_id
        self.target = target
        self.n = n

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        target = Params.from_flat(np.full(params.spec.size, self.target), params.spec)
        return ClientUpdate(
            self.client_id, target - params, self.n, {"loss": self.target}
        )

    def evaluate(self, params: Params, config: EvalConfig) -> Mapping[str, float]:
        return {
            "accuracy": 1.0,
            "loss": float(np.abs(params.flat - self.target).mean()),
            "num_examples": self.n,
        }


class RaisingClient(MeanClient):
    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        raise RuntimeError("disk on fire")


class NanClient(MeanClient):
    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        flat = np.full(params.spec.size, np.nan, dtype=np.float32)
        return ClientUpdate(self.client_id, Params.from_flat(flat, params.spec), self.n)


class WrongShapeClient(MeanClient):
    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        return ClientUpdate(self.client_id, Params({"w": np.ones(7)}), self.n)


class ImpostorClient(MeanClient):
    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        update = super().fit(params, config, rng)
        return ClientUpdate("someone-else", update.delta, update.num_examples)


class RandomClient(MeanClient):
    """Uses its rng, so results show whether randomness is derived per client."""

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        noise = rng.standard_normal(params.spec.size).astype(np.float32)
        return ClientUpdate(
            self.client_id, Params.from_flat(noise, params.spec), self.n
        )
