"""The user's own model for the Caravan example: a small MLP in PyTorch.

fedshield calls ``build()`` (named in ``caravan.toml`` as
``factory = "model.py:build"``) to get the ``torch.nn.Module``; the input
size is the 84 customer features, the output one logit per class
(``no``, ``yes``).
"""

from __future__ import annotations

import torch


def build() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(84, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 2),
    )
