"""Membership inference: the ROC against scikit-learn's, and the loss attack
against an overfit non-private model (AUC >= 0.60, the issue's bar)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from fedshield.core import FitConfig
from fedshield.errors import ConfigError
from fedshield.models.membership import dp_ceiling, loss_scores, roc

pytest.importorskip("torch")


def test_roc_auc_matches_scikit_learn():
    from sklearn.metrics import roc_auc_score, roc_curve

    rng = np.random.default_rng(0)
    for shift in (0.0, 0.5, 2.0):
        inside = rng.normal(shift, 1, 300)
        outside = rng.normal(0, 1, 400)
        inside[:20] = outside[:20]  # ties across the classes
        got = roc(inside, outside)
        labels = np.r_[np.ones(300), np.zeros(400)]
        scores = np.r_[inside, outside]
        assert got.auc == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        fpr, tpr, _ = roc_curve(labels, scores)
        for target in (0.001, 0.01, 0.1):
            want = tpr[fpr <= target].max()
            assert got.tpr_at(target) == pytest.approx(want, abs=1e-12)


def test_the_dp_ceiling():
    fpr = np.array([0.0, 0.01, 0.1, 0.5, 1.0])
    ceiling = dp_ceiling(fpr, 1.0, 1e-5)
    assert ceiling[0] == pytest.approx(1e-5)
    assert ceiling[1] == pytest.approx(np.e * 0.01 + 1e-5)
    assert (ceiling <= 1).all() and (np.diff(ceiling) >= 0).all()


def test_the_loss_attack_finds_the_members_of_an_overfit_model():
    from sklearn.datasets import load_digits

    from fedshield.models import TorchModel, build_module
    from fedshield.models.client import TorchClient

    x, y = load_digits(return_X_y=True)
    x = (x / 16).astype(np.float32)
    rng = np.random.default_rng(3)
    order = rng.permutation(len(y))
    members, others = order[:100], order[100:400]
    build = functools.partial(
        build_module, "mlp", input_shape=(64,), num_classes=10, hidden=(128,)
    )
    model = TorchModel(build, input_shape=(64,))
    params = model.init_params(0)
    client = TorchClient("a", model, x_train=x[members], y_train=y[members])
    config = FitConfig(round_idx=0, epochs=60, batch_size=16, lr=0.2)
    update = client.fit(params, config, np.random.default_rng(0))
    trained = params + update.delta
    curve = roc(
        loss_scores(model, trained, x[members], y[members]),
        loss_scores(model, trained, x[others], y[others]),
    )
    assert curve.auc >= 0.60  # the bar on an overfit non-private model
    # A model that saw nothing gives the attack nothing.
    blind = roc(
        loss_scores(model, params, x[members], y[members]),
        loss_scores(model, params, x[others], y[others]),
    )
    assert abs(blind.auc - 0.5) < 0.1


def test_empty_or_nan_scores_are_refused():
    with pytest.raises(ConfigError, match="members and non-members"):
        roc(np.array([]), np.array([1.0]))
    with pytest.raises(ConfigError, match="NaN"):
        roc(np.array([np.nan]), np.array([1.0]))
