from __future__ import annotations

import pytest
import torch

from fedshield.models.torch_model import _Sgd


@pytest.mark.parametrize(
    ("momentum", "weight_decay"), [(0, 0), (0.9, 0), (0.9, 1e-3), (0, 1e-2)]
)
def test_sgd_is_bitwise_torch_optim_sgd(momentum, weight_decay):
    # Reference: torch.optim.SGD itself, on the same model and batches.
    torch.manual_seed(0)
    ours = torch.nn.Sequential(
        torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3)
    )
    ref = torch.nn.Sequential(
        torch.nn.Linear(10, 20), torch.nn.ReLU(), torch.nn.Linear(20, 3)
    )
    ref.load_state_dict(ours.state_dict())
    ref_opt = torch.optim.SGD(
        ref.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay
    )
    our_opt = _Sgd(
        tuple(ours.parameters()), lr=0.05, momentum=momentum, weight_decay=weight_decay
    )
    for _ in range(20):
        x, y = torch.randn(8, 10), torch.randint(0, 3, (8,))
        for model, opt in ((ref, ref_opt), (ours, our_opt)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        assert torch.equal(a, b)
