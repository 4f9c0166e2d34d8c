from __future__ import annotations

import importlib

import pytest
import torch

import fedshield.models
from fedshield.errors import ConfigError
from fedshield.models import MODEL_KINDS, build_module


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def test_all_names_exist() -> None:
    for module_name in (
        "fedshield.models",
        "fedshield.models.builtin",
        "fedshield.models.torch_model",
        "fedshield.models.client",
        "fedshield.models.factory",
    ):
        module = importlib.import_module(module_name)
        for name in module.__all__:
            assert hasattr(module, name), f"{module_name}.{name}"
    assert set(fedshield.models.__all__) == {
        "MODEL_KINDS",
        "TASKS",
        "DpSgdConfig",
        "TorchClient",
        "TorchModel",
        "build_module",
        "build_update",
        "check_dp_sgd",
        "check_user_model",
        "check_vectorisable",
        "local_correction",
        "regression_loss",
        "train_dp_sgd",
        "train_many",
        "user_torch_model",
    }


@pytest.mark.parametrize(
    ("kind", "input_shape"),
    [("logistic", (5,)), ("mlp", (2, 3)), ("cnn", (3, 8, 6))],
)
def test_build_module_any_kind_outputs_one_logit_per_class(
    kind: str, input_shape: tuple[int, ...]
) -> None:
    # Prepare
    module = build_module(kind, input_shape=input_shape, num_classes=4)
    x = torch.zeros(7, *input_shape)

    # Execute
    out = module(x)

    # Assert
    assert kind in MODEL_KINDS
    assert tuple(out.shape) == (7, 4)
    assert list(module.buffers()) == []


def test_build_module_logistic_is_one_linear_layer() -> None:
    module = build_module("logistic", input_shape=(2, 3), num_classes=2, hidden=(9,))

    assert _shapes(module) == {"linear.weight": (2, 6), "linear.bias": (2,)}


def test_build_module_mlp_has_one_layer_per_width() -> None:
    module = build_module("mlp", input_shape=(5,), num_classes=3, hidden=(8, 4))

    assert _shapes(module) == {
        "hidden0.weight": (8, 5),
        "hidden0.bias": (8,),
        "hidden1.weight": (4, 8),
        "hidden1.bias": (4,),
        "out.weight": (3, 4),
        "out.bias": (3,),
    }


def test_build_module_cnn_default_channels_are_16_and_32() -> None:
    module = build_module("cnn", input_shape=(1, 8, 8), num_classes=10)

    shapes = _shapes(module)
    assert shapes["conv0.weight"] == (16, 1, 3, 3)
    assert shapes["conv1.weight"] == (32, 16, 3, 3)
    assert shapes["out.weight"] == (10, 32 * 2 * 2)


def test_build_module_cnn_two_widths_set_the_channels() -> None:
    module = build_module("cnn", input_shape=(3, 9, 8), num_classes=2, hidden=(4, 6))

    shapes = _shapes(module)
    assert shapes["conv0.weight"] == (4, 3, 3, 3)
    assert shapes["conv1.weight"] == (6, 4, 3, 3)
    assert shapes["out.weight"] == (2, 6 * 2 * 2)


def test_build_module_unknown_kind_lists_choices() -> None:
    with pytest.raises(ConfigError, match="'logistic', 'mlp', 'cnn'; got 'resnet'"):
        build_module("resnet", input_shape=(4,), num_classes=2)


@pytest.mark.parametrize("input_shape", [(64,), (8, 8), (1, 1, 8, 8)])
def test_build_module_cnn_non_3d_input_raises(input_shape: tuple[int, ...]) -> None:
    with pytest.raises(ConfigError, match="must be 3-D"):
        build_module("cnn", input_shape=input_shape, num_classes=10)


def test_build_module_cnn_tiny_image_raises() -> None:
    with pytest.raises(ConfigError, match="at least 4x4"):
        build_module("cnn", input_shape=(1, 3, 8), num_classes=10)


def test_build_module_cnn_three_widths_raises() -> None:
    with pytest.raises(ConfigError, match="two conv channel counts"):
        build_module("cnn", input_shape=(1, 8, 8), num_classes=10, hidden=(4, 4, 4))


def test_build_module_reports_every_problem_at_once() -> None:
    with pytest.raises(ConfigError) as info:
        build_module("mlp", input_shape=(0,), num_classes=0, hidden=(-3,))

    message = str(info.value)
    assert "`input_shape`" in message
    assert "`num_classes`" in message
    assert "`hidden`" in message


def test_one_output_is_a_regression_head() -> None:
    module = build_module("mlp", input_shape=(5,), num_classes=1, hidden=(8,))
    assert module(torch.zeros(3, 5)).shape == (3, 1)
