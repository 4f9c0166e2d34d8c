"""The user's own model: check_user_model and user_torch_model."""

from __future__ import annotations

import pickle
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fedshield.core import FitConfig
from fedshield.core.imports import CallableRef
from fedshield.errors import ConfigError
from fedshield.models import TorchModel, check_user_model, user_torch_model

HEADER = "import torch\nfrom torch import nn\n\n"


def _ref(tmp_path: Path, body: str, name: str = "build") -> CallableRef:
    """A factory written to a file of its own, referenced as 'file.py:name'."""
    path = tmp_path / f"user_{abs(hash(body))}.py"
    path.write_text(HEADER + textwrap.dedent(body))
    return CallableRef(f"{path.name}:{name}", base_dir=tmp_path, what="model.factory")


def _refused(fn: object, **kwargs: object) -> str:
    args: dict[str, object] = {"input_shape": (64,), "num_classes": 10}
    args.update(kwargs)
    with pytest.raises(ConfigError) as info:
        check_user_model(fn, **args)  # type: ignore[arg-type]
    assert info.value.exit_code == 10
    return str(info.value)


# --- models that pass -------------------------------------------------------


def test_a_good_file_factory_passes_and_trains(tmp_path: Path) -> None:
    ref = _ref(
        tmp_path,
        """
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc1 = nn.Linear(64, 16)
                self.norm = nn.LayerNorm(16)
                self.fc2 = nn.Linear(16, 10)

            def forward(self, x):
                return self.fc2(torch.relu(self.norm(self.fc1(x))))

        def build():
            return Net()
        """,
    )
    model = user_torch_model(
        ref, input_shape=(64,), num_classes=10, privacy_mode="record"
    )
    assert model.task == "classification"
    params = model.init_params(0)
    x = np.random.default_rng(0).random((20, 64), dtype=np.float32)
    y = np.arange(20) % 10
    _, metrics = model.train(
        params, x, y, FitConfig(round_idx=0), rng=np.random.default_rng(0)
    )
    assert set(metrics) == {"loss", "accuracy"}
    # A CallableRef factory ships to worker processes: the model pickles.
    again = pickle.loads(pickle.dumps(model))
    assert again.spec == model.spec
    assert np.array_equal(again.init_params(0).flat, params.flat)


def test_lambdas_and_image_shapes_pass() -> None:
    check_user_model(
        lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(144, 3)),
        input_shape=(1, 8, 8),
        num_classes=3,
    )


def test_the_global_generator_is_left_alone() -> None:
    torch.manual_seed(5)
    before = torch.get_rng_state()
    check_user_model(
        lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.5)),
        input_shape=(64,),
        num_classes=10,
    )
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("out", [1, None])
def test_regression_takes_one_value_per_example(out: int | None) -> None:
    def build() -> nn.Module:
        if out is None:
            return nn.Sequential(nn.Linear(5, 1), nn.Flatten(0))
        return nn.Linear(5, out)

    model = user_torch_model(build, input_shape=(5,), num_classes=0, task="regression")
    assert model.task == "regression"


def test_dropout_is_fine_without_record_mode() -> None:
    for mode in ("none", "central", "local", "distributed"):
        check_user_model(
            lambda: nn.Sequential(nn.Linear(64, 10), nn.Dropout(0.1)),
            input_shape=(64,),
            num_classes=10,
            privacy_mode=mode,
        )


# --- one message per problem ------------------------------------------------


def test_a_factory_that_raises_says_so(tmp_path: Path) -> None:
    ref = _ref(tmp_path, "def build():\n    raise ValueError('no weights file')\n")
    message = _refused(ref)
    assert "model.factory = " in message
    assert "raised ValueError" in message
    assert "no weights file" in message


def test_a_factory_wanting_arguments_says_it_is_called_without(
    tmp_path: Path,
) -> None:
    ref = _ref(tmp_path, "def build(width):\n    return nn.Linear(64, width)\n")
    message = _refused(ref)
    assert "TypeError" in message and "called with no arguments" in message


def test_a_missing_function_keeps_callable_refs_message(tmp_path: Path) -> None:
    ref = _ref(tmp_path, "def other():\n    return nn.Linear(64, 10)\n")
    message = _refused(ref)
    assert "has no 'build'" in message and "other" in message


@pytest.mark.parametrize(
    ("returned", "expected"),
    [
        (None, "returned NoneType None (a missing `return`?)"),
        ({"net": 1}, "returned dict"),
        (nn.Linear, "returned the class Linear itself"),
    ],
)
def test_not_a_module_is_named(returned: object, expected: str) -> None:
    message = _refused(lambda: returned)
    assert "must return a torch.nn.Module" in message
    assert expected in message


def test_no_trainable_parameters() -> None:
    assert "no parameters" in _refused(lambda: nn.ReLU())
    frozen = nn.Linear(64, 10).requires_grad_(False)
    assert "none of them trainable" in _refused(lambda: frozen)


def test_parameters_not_float32() -> None:
    message = _refused(lambda: nn.Linear(64, 10).double())
    assert "not float32" in message
    assert "weight (float64)" in message and ".float()" in message


def test_batchnorm_buffers_suggest_group_or_layer_norm(tmp_path: Path) -> None:
    ref = _ref(
        tmp_path,
        """
        def build():
            return nn.Sequential(nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Linear(8, 10))
        """,
    )
    message = _refused(ref)
    assert "layer '1' (BatchNorm1d) has buffers" in message
    assert "running_mean" in message
    assert "GroupNorm or LayerNorm" in message


def test_other_buffers_are_refused_too() -> None:
    class WithBuffer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)
            self.register_buffer("scale", torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.fc(x) * self.scale
            return out

    message = _refused(WithBuffer)
    assert "layer '(root)' (WithBuffer) has buffers ['scale']" in message


def test_a_failing_forward_pass_names_the_shape_and_layer(tmp_path: Path) -> None:
    ref = _ref(
        tmp_path,
        """
        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.hidden = nn.Linear(784, 32)
                self.out = nn.Linear(32, 10)

            def forward(self, x):
                return self.out(torch.relu(self.hidden(x)))

        def build():
            return Net()
        """,
    )
    message = _refused(ref)
    assert "forward pass of a zero batch of shape (2, 64)" in message
    assert "input_shape (64,)" in message
    assert "layer 'hidden' (Linear(in_features=784" in message
    assert "which expects 784 input features" in message
    assert "RuntimeError" in message and "784" in message


def test_a_forward_returning_a_tuple() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self.fc(x), x

    assert "must return one tensor; it returned tuple" in _refused(Pair)


def test_wrong_number_of_classes() -> None:
    message = _refused(lambda: nn.Linear(64, 5))
    assert "outputs 5 values per example, but the data has 10 classes" in message
    message = _refused(lambda: nn.Sequential(nn.Linear(64, 10), nn.Flatten(0)))
    assert "outputs shape (20,)" in message and "(2, 10)" in message


def test_regression_wants_one_output() -> None:
    message = _refused(lambda: nn.Linear(64, 3), task="regression", num_classes=0)
    assert "outputs shape (2, 3)" in message
    assert "one value per example, shape (2, 1) or (2,)" in message


def test_record_mode_names_the_layer_dp_sgd_cannot_handle(tmp_path: Path) -> None:
    ref = _ref(
        tmp_path,
        """
        def build():
            return nn.Sequential(nn.Linear(64, 16), nn.Dropout(0.2), nn.Linear(16, 10))
        """,
    )
    check_user_model(ref, input_shape=(64,), num_classes=10)  # fine without DP
    message = _refused(ref, privacy_mode="record")
    assert "privacy.mode = 'record'" in message
    assert "layer '1' (Dropout)" in message


def test_bad_arguments() -> None:
    assert "model.task" in _refused(lambda: nn.Linear(64, 10), task="ranking")
    assert "input_shape" in _refused(lambda: nn.Linear(64, 10), input_shape=())
    assert "at least 2 classes" in _refused(lambda: nn.Linear(64, 1), num_classes=1)


def test_user_torch_model_uses_the_tasks_loss() -> None:
    model = user_torch_model(
        lambda: nn.Linear(2, 1), input_shape=(2,), num_classes=0, task="regression"
    )
    params = model.init_params(0)
    x = np.ones((4, 2), np.float32)
    metrics = model.evaluate(params, x, np.full(4, 0.5, np.float32))
    assert set(metrics) == {"loss", "rmse", "mae", "num_examples"}
    assert isinstance(model, TorchModel)
