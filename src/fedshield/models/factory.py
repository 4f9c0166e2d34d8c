"""The user's own PyTorch model: a factory named in the configuration.

``[model] kind = "python"`` names a function (``factory = "file.py:build"``)
that returns a ``torch.nn.Module``. :func:`check_user_model` builds it once and
tries it on a dummy batch before round 1, so that a model the run cannot train
is refused with one message that says what is wrong and what to change,
instead of a stack trace from inside round 1 (or a silently wrong run).
:func:`user_torch_model` checks it and wraps it in a :class:`TorchModel`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from fedshield.core.imports import CallableRef
from fedshield.errors import ConfigError
from fedshield.models.torch_model import TASKS, TorchModel
from fedshield.models.vectorised import _layer_trace

__all__ = ["check_user_model", "user_torch_model"]

_BATCH = 2
_NORM_LAYERS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)


def check_user_model(
    module_fn: Callable[[], Any],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    task: str = "classification",
    privacy_mode: str = "none",
    what: str = "model.factory",
) -> None:
    """Raise unless the module ``module_fn`` builds can be trained as asked.

    Builds the module once (torch's global generator is left as it was) and
    runs it on a zero batch of shape ``(2, *input_shape)``. The first
    problem found is raised, alone, in this order:

    1. calling ``module_fn()`` raises (the message gives the exception's
       type and text);
    2. it returns something other than a ``torch.nn.Module`` (named);
    3. the module has no trainable parameters;
    4. a parameter is not ``float32``;
    5. a layer has buffers (BatchNorm's running statistics: buffers are not
       parameters, so they would stay local to each client; use GroupNorm or
       LayerNorm);
    6. the forward pass fails (the message gives the batch's shape, the
       innermost layer it was in and the error, such as a ``Linear``
       expecting 784 features given 64);
    7. the output is not a floating-point tensor of shape ``(2,
       num_classes)`` (classification) or ``(2, 1)`` / ``(2,)``
       (regression);
    8. with ``privacy_mode = "record"``, a layer record-level DP-SGD cannot
       train (:func:`~fedshield.models.check_dp_sgd`: Dropout, BatchNorm, a
       layer ``torch.func.vmap`` cannot batch). Other modes take any layer.

    Parameters
    ----------
    module_fn
        Called with no arguments; must return a fresh ``torch.nn.Module``.
        Typically a :class:`~fedshield.core.imports.CallableRef`.
    input_shape
        Shape of one example, as the model receives it.
    num_classes
        Classes in the data (classification); ignored for regression.
    task
        ``"classification"`` or ``"regression"``.
    privacy_mode
        ``privacy.mode`` of the run: ``"record"`` adds the DP-SGD check.
    what
        The configuration key that named the factory, for the messages.

    Raises
    ------
    ConfigError
        Describing the one problem found; also if ``task``, ``input_shape``
        or ``num_classes`` is invalid. A :class:`ConfigError` raised while
        resolving a :class:`~fedshield.core.imports.CallableRef` (missing
        file or function) passes through unchanged.

    Examples
    --------
    >>> check_user_model(lambda: nn.Linear(4, 3), input_shape=(4,), num_classes=3)
    >>> try:
    ...     check_user_model(lambda: nn.Linear(4, 2), input_shape=(4,),
    ...                      num_classes=3)
    ... except ConfigError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    model.factory (<lambda>) outputs 2 values per example, but the data has 3 ...
    """
    shape = _check_arguments(input_shape, num_classes, task)
    who = _describe(module_fn, what)
    module = _call(module_fn, who)
    _check_parameters(module, who)
    out = _forward(module, shape, who)
    _check_output(out, shape, num_classes, task, who)
    if privacy_mode == "record":
        from fedshield.models.dp_sgd import check_dp_sgd

        def same_module() -> nn.Module:
            return module

        try:
            check_dp_sgd(TorchModel(same_module, input_shape=shape, task=task))
        except ConfigError as err:
            raise ConfigError(
                f"{who} cannot be used with privacy.mode = 'record': {err} "
                "Other privacy modes train any layer."
            ) from None


def user_torch_model(
    module_fn: Callable[[], Any],
    *,
    input_shape: tuple[int, ...],
    num_classes: int,
    task: str = "classification",
    privacy_mode: str = "none",
    what: str = "model.factory",
) -> TorchModel:
    """Check the user's model (:func:`check_user_model`) and wrap it.

    Parameters
    ----------
    module_fn, input_shape, num_classes, task, privacy_mode, what
        As for :func:`check_user_model`.

    Returns
    -------
    TorchModel
        ``TorchModel(module_fn, input_shape=input_shape, task=task)``, with
        the task's loss (cross-entropy or mean squared error). It pickles
        when ``module_fn`` does (a ``CallableRef`` does, so process and Ray
        workers import the factory themselves).

    Raises
    ------
    ConfigError
        As :func:`check_user_model`.

    Examples
    --------
    >>> model = user_torch_model(lambda: nn.Linear(3, 1), input_shape=(3,),
    ...                          num_classes=0, task="regression")
    >>> model.task, model.spec.size
    ('regression', 4)
    """
    check_user_model(
        module_fn,
        input_shape=input_shape,
        num_classes=num_classes,
        task=task,
        privacy_mode=privacy_mode,
        what=what,
    )
    return TorchModel(module_fn, input_shape=tuple(input_shape), task=task)


def _check_arguments(
    input_shape: tuple[int, ...], num_classes: int, task: str
) -> tuple[int, ...]:
    if task not in TASKS:
        raise ConfigError(
            f"model.task must be one of {', '.join(map(repr, TASKS))}; got {task!r}."
        )
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or int(s) < 1 for s in shape):
        raise ConfigError(
            f"model.input_shape must be a non-empty list of positive sizes; got "
            f"{list(shape)}."
        )
    if task == "classification" and (
        isinstance(num_classes, bool) or int(num_classes) < 2
    ):
        raise ConfigError(
            f"a classification model needs at least 2 classes; the data has "
            f"{num_classes!r}."
        )
    return tuple(int(s) for s in shape)


def _describe(module_fn: Callable[[], Any], what: str) -> str:
    if isinstance(module_fn, CallableRef):
        return f"{what} = {module_fn.spec!r}"
    name = getattr(module_fn, "__qualname__", None) or type(module_fn).__name__
    return f"{what} ({name})"


def _call(module_fn: Callable[[], Any], who: str) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):
            module = module_fn()
    except ConfigError:
        raise  # CallableRef's own message: missing file, module or name
    except Exception as err:
        raise ConfigError(
            f"{who} raised {type(err).__name__} when called with no arguments: {err}"
        ) from err
    if isinstance(module, nn.Module):
        return module
    if isinstance(module, type) and issubclass(module, nn.Module):
        raise ConfigError(
            f"{who} must return a torch.nn.Module instance; it returned the class "
            f"{module.__name__} itself (return {module.__name__}(...))."
        )
    hint = " (a missing `return`?)" if module is None else ""
    raise ConfigError(
        f"{who} must return a torch.nn.Module; it returned "
        f"{type(module).__name__} {_short(module)}{hint}."
    )


def _check_parameters(module: nn.Module, who: str) -> None:
    kind = type(module).__name__
    named = list(module.named_parameters())
    if not any(p.requires_grad for _, p in named):
        has = "parameters, none of them trainable" if named else "no parameters"
        raise ConfigError(
            f"{who} built {kind} with {has}: federated training has nothing to "
            "learn (register layers as attributes of the module, e.g. "
            "self.fc = nn.Linear(...), and leave requires_grad on)."
        )
    wrong = [
        f"{n} ({str(p.dtype).removeprefix('torch.')})"
        for n, p in named
        if p.dtype != torch.float32
    ]
    if wrong:
        raise ConfigError(
            f"{who} built {kind} with parameters that are not float32: "
            f"{', '.join(wrong)}; build it in float32 (call .float() on it)."
        )
    for name, sub in module.named_modules():
        buffers = [b for b, _ in sub.named_buffers(recurse=False)]
        if not buffers:
            continue
        where = f"layer {name or '(root)'!r} ({type(sub).__name__})"
        if isinstance(sub, _NORM_LAYERS):
            fix = (
                "replace BatchNorm by GroupNorm or LayerNorm (or pass "
                "track_running_stats=False)"
            )
        else:
            fix = "make them parameters (requires_grad=False) or plain attributes"
        raise ConfigError(
            f"{who} built {kind}, whose {where} has buffers {buffers}: buffers "
            "are not parameters, so each client would keep its own and the "
            f"server would never average them; {fix}."
        )


def _forward(module: nn.Module, shape: tuple[int, ...], who: str) -> Any:
    x = torch.zeros((_BATCH, *shape), dtype=torch.float32)
    batch = (_BATCH, *shape)
    module.train()
    with (
        torch.no_grad(),
        torch.random.fork_rng(devices=[]),
        _layer_trace(module) as entered,
    ):
        try:
            return module(x)
        except Exception as err:
            where = ""
            if entered and entered[-1]:
                layer = module.get_submodule(entered[-1])
                text = (
                    repr(layer) if not list(layer.children()) else type(layer).__name__
                )
                where = f" in layer {entered[-1]!r} ({text})"
                if isinstance(layer, nn.Linear):
                    where += f", which expects {layer.in_features} input features"
            message = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(
                f"{who}: the forward pass of a zero batch of shape {batch} "
                f"(input_shape {shape}) failed{where}: {type(err).__name__}: "
                f"{message}; check that the model expects inputs of shape "
                f"{shape} (set model.input_shape if the data's shape differs)."
            ) from err


def _check_output(
    out: Any, shape: tuple[int, ...], num_classes: int, task: str, who: str
) -> None:
    if not isinstance(out, Tensor):
        raise ConfigError(
            f"{who}: the forward pass must return one tensor; it returned "
            f"{type(out).__name__} {_short(out)} (return the outputs alone)."
        )
    if not out.is_floating_point():
        raise ConfigError(
            f"{who}: the forward pass returned a {out.dtype} tensor; it must "
            "return floating-point outputs (logits or values)."
        )
    got = tuple(out.shape)
    if task == "regression":
        if got not in ((_BATCH, 1), (_BATCH,)):
            raise ConfigError(
                f"{who} outputs shape {got} for a batch of {_BATCH} examples; a "
                f"regression model must give one value per example, shape "
                f"({_BATCH}, 1) or ({_BATCH},): end with a Linear(..., 1)."
            )
        return
    k = int(num_classes)
    if got == (_BATCH, k):
        return
    if len(got) == 2 and got[0] == _BATCH:
        raise ConfigError(
            f"{who} outputs {got[1]} values per example, but the data has {k} "
            f"classes: the last layer must give {k} outputs (one logit per class)."
        )
    raise ConfigError(
        f"{who} outputs shape {got} for a batch of shape {(_BATCH, *shape)}, but "
        f"a classification model must give ({_BATCH}, {k}): one logit per class "
        f"(the data has {k} classes)."
    )


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
