"""Adapter between :class:`~fedshield.core.Params` and a PyTorch ``nn.Module``.

A :class:`TorchModel` holds no model state of its own: every call receives the
parameters to use and returns new ones. Internally it builds its module once
and re-points every parameter into one contiguous ``float32`` tensor, so that
loading a :class:`Params` is a single ``memcpy`` of :attr:`Params.flat` and
reading the trained parameters back is one copy of that tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional

from fedshield.core import FitConfig, Params, ParamSpec
from fedshield.errors import ConfigError

__all__ = ["TASKS", "TorchModel", "regression_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets)`` returning the mean loss of a batch."""

TASKS: tuple[str, ...] = ("classification", "regression")
"""What a :class:`TorchModel` learns: class labels or one real value."""

_PROXIMAL_MU = "proximal_mu"
_SEED_BOUND = 2**63


def regression_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Mean squared error of one output per example: the regression loss.

    Parameters
    ----------
    outputs
        The model's outputs, ``(n, 1)`` or ``(n,)``; reshaped to the
        targets' shape ``(n,)``.
    targets
        ``float32`` targets, ``(n,)``.

    Returns
    -------
    Tensor
        ``mean((outputs - targets) ** 2)``, a scalar.

    Examples
    --------
    >>> float(regression_loss(torch.tensor([[1.0], [3.0]]), torch.tensor([0.0, 1.0])))
    2.5
    """
    return functional.mse_loss(outputs.reshape(targets.shape), targets)


class _Bound:
    """A built module whose parameters are views into one flat tensor."""

    __slots__ = ("flat", "flat_np", "module", "params", "spec")

    def __init__(self, module: nn.Module) -> None:
        named = list(module.named_parameters())
        self.spec = _spec_of(named)
        self.flat = torch.empty(self.spec.size, dtype=torch.float32)
        self.module = module
        self.params = tuple(p for _, p in named)
        offset = 0
        with torch.no_grad():
            for p in self.params:
                view = self.flat[offset : offset + p.numel()].view_as(p)
                view.copy_(p)
                # Re-point the parameter at its slot of the flat tensor; the
                # optimizer updates it in place, so the flat tensor always holds
                # the current weights.
                p.data = view
                offset += p.numel()
        self.flat_np: np.ndarray = self.flat.numpy()

    def load(self, params: Params) -> None:
        if params.spec != self.spec:
            raise ConfigError(
                "params do not match the model: "
                + "; ".join(self.spec.mismatches(params.spec))
                + "."
            )
        np.copyto(self.flat_np, params.flat)

    def read(self) -> Params:
        return Params.from_flat(self.flat_np.copy(), self.spec, copy=False)


class TorchModel:
    """A PyTorch module factory and loss, used as a stateless model.

    The parameters are always passed in: :meth:`train` and :meth:`evaluate`
    load them into one cached module instance, run, and (for training) return
    the new values as fresh :class:`~fedshield.core.Params`.

    Parameters
    ----------
    module_fn
        Builds the ``nn.Module`` (for example
        ``functools.partial(build_module, "mlp", input_shape=(64,),
        num_classes=10)``). Called once for the cached instance and once per
        :meth:`init_params`. Its module must have ``float32`` parameters and
        no buffers (no BatchNorm running statistics: use GroupNorm or
        LayerNorm), because buffers are not part of :class:`Params` and would
        silently stay local.
    loss_fn
        ``loss_fn(outputs, targets)`` giving the mean loss over a batch;
        targets are ``int64`` class labels (classification) or ``float32``
        values (regression; the outputs are then reshaped to the targets'
        shape ``(n,)`` before ``loss_fn`` sees them, so that an ``(n, 1)``
        output never broadcasts against them). Defaults to cross-entropy
        for classification and :func:`regression_loss` (mean squared error)
        for regression.
    input_shape
        Shape of one example. Inputs arriving flat, ``(n, d)`` with
        ``d = prod(input_shape)``, are reshaped (as a view) to
        ``(n, *input_shape)`` before the forward pass.
    task
        ``"classification"`` (integer class labels; metrics ``"loss"``
        and ``"accuracy"``) or ``"regression"`` (one real target per
        example, the module giving ``(n, 1)`` or ``(n,)`` outputs; metrics
        ``"loss"``, ``"rmse"`` and ``"mae"``).

    Raises
    ------
    ConfigError
        If ``input_shape`` has a non-positive size or ``task`` is not one
        of :data:`TASKS`. Problems with the module
        itself are raised (all together) on first use: :attr:`spec`,
        :meth:`init_params`, :meth:`train` or :meth:`evaluate`.

    Notes
    -----
    An instance is not thread-safe (it reuses one module); give each thread or
    process its own (instances pickle without their module when ``module_fn``
    and ``loss_fn`` are picklable, such as a ``functools.partial`` of
    :func:`~fedshield.models.build_module` and the default loss). No method
    changes torch's global state: the global generator is forked and restored
    wherever torch draws from it.
    """

    __slots__ = ("_bound", "_input_shape", "_loss_fn", "_module_fn", "_task")

    def __init__(
        self,
        module_fn: Callable[[], nn.Module],
        *,
        loss_fn: LossFn | None = None,
        input_shape: tuple[int, ...] | None = None,
        task: str = "classification",
    ) -> None:
        if task not in TASKS:
            raise ConfigError(
                f"`task` of TorchModel must be one of {', '.join(map(repr, TASKS))}; "
                f"got {task!r}."
            )
        if not callable(module_fn):
            raise ConfigError(
                f"`module_fn` of TorchModel must be callable; got {module_fn!r}."
            )
        if input_shape is not None:
            input_shape = tuple(input_shape)
            if len(input_shape) == 0 or any(
                isinstance(s, bool) or int(s) < 1 for s in input_shape
            ):
                raise ConfigError(
                    "`input_shape` of TorchModel must be a non-empty tuple of "
                    f"positive sizes; got {input_shape}."
                )
            input_shape = tuple(int(s) for s in input_shape)
        self._module_fn = module_fn
        self._task = task
        self._loss_fn: LossFn = _task_loss(task, loss_fn)
        self._input_shape = input_shape
        self._bound: _Bound | None = None

    @property
    def task(self) -> str:
        """``"classification"`` or ``"regression"``: what the model learns."""
        return self._task

    @property
    def is_regression(self) -> bool:
        """Whether :attr:`task` is ``"regression"``."""
        return self._task == "regression"

    @property
    def spec(self) -> ParamSpec:
        """Names and shapes of the module's parameters, in storage order."""
        return self._get_bound().spec

    def init_params(self, seed: int) -> Params:
        """Initial parameters, as the module initialises itself, seeded.

        Parameters
        ----------
        seed
            Seed for torch's generator while ``module_fn`` runs (0 <= seed <
            2**63). The same seed always gives the same parameters.

        Returns
        -------
        Params
            Fresh parameters laid out as :attr:`spec`.

        Raises
        ------
        ConfigError
            If ``seed`` is out of range or the module is unsupported.
        """
        if isinstance(seed, bool) or not 0 <= int(seed) < _SEED_BOUND:
            raise ConfigError(
                f"`seed` of init_params must be in [0, 2**63); got {seed!r}."
            )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            module = _build(self._module_fn)
        with torch.no_grad():
            vector = torch.cat([p.reshape(-1) for p in module.parameters()])
        params = Params.from_flat(
            vector.numpy(), _spec_of(list(module.named_parameters())), copy=False
        )
        if self._bound is None:
            self._bound = _Bound(module)
        elif params.spec != self._bound.spec:
            raise ConfigError(
                "`module_fn` of TorchModel built a different architecture on a "
                "second call: " + "; ".join(self._bound.spec.mismatches(params.spec))
            )
        return params

    def train(
        self,
        params: Params,
        x: np.ndarray,
        y: np.ndarray,
        config: FitConfig,
        *,
        rng: np.random.Generator,
        correction: Params | None = None,
    ) -> tuple[Params, dict[str, float]]:
        """Run local mini-batch SGD from ``params``.

        Parameters
        ----------
        params
            Starting parameters (the global model); not modified.
        x
            Inputs, ``(n, *input_shape)`` or ``(n, d)``; used without a copy
            when already C-contiguous, writable ``float32``.
        y
            Integer class labels, ``(n,)``; for regression real targets,
            ``(n,)`` or ``(n, 1)``.
        config
            ``epochs``, ``batch_size``, ``lr``, ``momentum`` and
            ``weight_decay`` of ``torch.optim.SGD``; ``options["proximal_mu"]``
            (default 0) adds the FedProx term (see Notes).
        rng
            Source of all randomness: two seeds are drawn from it, one for
            the per-epoch shuffles and one for torch's global generator
            (dropout and the like) during training.
        correction
            A fixed vector added to every step's gradient (SCAFFOLD's
            ``c - c_i``, Karimireddy et al., ICML 2020, Algorithm 1 line 10),
            after the proximal term and before weight decay and momentum.

        Returns
        -------
        tuple of (Params, dict)
            The trained parameters, and ``{"loss", "accuracy"}`` averaged over
            the examples of the last epoch (as seen during that epoch; the loss
            excludes the proximal term). For regression ``{"loss", "rmse",
            "mae"}`` instead: root mean squared and mean absolute error over
            the same examples.

        Raises
        ------
        ValueError
            If ``x`` and ``y`` do not fit together or there are no examples.
        ConfigError
            If ``params`` do not match :attr:`spec` or ``proximal_mu`` is not a
            finite number >= 0.

        Notes
        -----
        The optimizer (and its momentum) starts fresh on every call. The
        last batch of an epoch may be smaller than ``batch_size``.

        With ``mu = options["proximal_mu"] > 0`` each step minimises the
        FedProx local objective ``F_k(w) + mu/2 * ||w - w_global||^2``
        (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys
        2020, Sec. 3), with ``w_global = params``. The proximal gradient
        ``mu * (w - w_global)`` is added to the data gradient directly, which
        is exact and avoids building the term in the autograd graph.
        """
        bound = self._get_bound()
        xt, yt = self._tensors(x, y)
        n = int(yt.shape[0])
        if n == 0:
            raise ValueError("cannot train on 0 examples")
        mu = _proximal_mu(config)
        shuffle_seed, torch_seed = (int(s) for s in rng.integers(_SEED_BOUND, size=2))
        bound.load(params)
        anchors = _views(bound.flat.clone(), bound.params) if mu > 0 else ()
        shifts = _correction_views(correction, bound) if correction is not None else ()
        module = bound.module
        module.train()
        optimizer = _Sgd(
            bound.params,
            lr=config.lr,
            momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        generator = torch.Generator().manual_seed(shuffle_seed)
        batch_size = config.batch_size
        regression = self.is_regression
        loss_sum = torch.zeros((), dtype=torch.float64)
        correct = torch.zeros((), dtype=torch.int64)
        sq_sum = torch.zeros((), dtype=torch.float64)
        abs_sum = torch.zeros((), dtype=torch.float64)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(torch_seed)
            for _ in range(config.epochs):
                loss_sum.zero_()
                correct.zero_()
                sq_sum.zero_()
                abs_sum.zero_()
                order = torch.randperm(n, generator=generator)
                for start in range(0, n, batch_size):
                    idx = order[start : start + batch_size]
                    xb = xt.index_select(0, idx)
                    yb = yt.index_select(0, idx)
                    out = module(xb)
                    loss = self._loss_fn(out, yb)
                    optimizer.zero_grad(set_to_none=True)
                    torch.autograd.backward(loss)
                    if anchors:
                        _add_proximal_grad(bound.params, anchors, mu)
                    if shifts:
                        _add_correction(bound.params, shifts)
                    optimizer.step()
                    with torch.no_grad():
                        loss_sum += loss.detach() * idx.shape[0]
                        if regression:
                            sq, ab = _error_sums(out.detach(), yb)
                            sq_sum += sq
                            abs_sum += ab
                        else:
                            correct += _num_correct(out.detach(), yb)
        if regression:
            metrics = _regression_metrics(
                float(loss_sum), float(sq_sum), float(abs_sum), n
            )
        else:
            metrics = {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}
        return bound.read(), metrics

    def evaluate(
        self,
        params: Params,
        x: np.ndarray,
        y: np.ndarray,
        *,
        batch_size: int = 1024,
    ) -> dict[str, float]:
        """Evaluate ``params`` on labelled data (or targets, for regression).

        Parameters
        ----------
        params
            Parameters to evaluate.
        x
            Inputs, as for :meth:`train`.
        y
            Integer class labels, ``(n,)``, or regression targets, as for
            :meth:`train`.
        batch_size
            Examples per forward pass (does not change the result beyond
            floating-point rounding).

        Returns
        -------
        dict
            ``"loss"`` (mean of ``loss_fn``), ``"accuracy"`` and
            ``"num_examples"``; plus ``"roc_auc"`` when the model is binary
            (two output logits, scored by their difference, or one logit) and
            ``y`` holds both labels 0 and 1. For regression ``"loss"``,
            ``"rmse"``, ``"mae"`` and ``"num_examples"``. With no examples
            only ``{"num_examples": 0.0}``.

        Raises
        ------
        ValueError
            If ``x`` and ``y`` do not fit together.
        ConfigError
            If ``params`` do not match :attr:`spec` or ``batch_size`` < 1.
        """
        if isinstance(batch_size, bool) or int(batch_size) < 1:
            raise ConfigError(
                f"`batch_size` of evaluate must be >= 1; got {batch_size}."
            )
        bound = self._get_bound()
        xt, yt = self._tensors(x, y)
        n = int(yt.shape[0])
        if n == 0:
            return {"num_examples": 0.0}
        bound.load(params)
        module = bound.module
        module.eval()
        if self.is_regression:
            return self._evaluate_regression(module, xt, yt, int(batch_size))
        loss_sum = 0.0
        correct = 0
        scores: list[np.ndarray] = []
        is_binary = False
        with torch.inference_mode():
            for start in range(0, n, int(batch_size)):
                xb = xt[start : start + int(batch_size)]
                yb = yt[start : start + int(batch_size)]
                out = module(xb)
                loss_sum += float(self._loss_fn(out, yb)) * int(yb.shape[0])
                correct += int(_num_correct(out, yb))
                if start == 0:
                    is_binary = out.ndim == 1 or (out.ndim == 2 and out.shape[1] <= 2)
                if is_binary:
                    scores.append(_binary_score(out))
        metrics = {
            "loss": loss_sum / n,
            "accuracy": correct / n,
            "num_examples": float(n),
        }
        labels = yt.numpy()
        if is_binary and set(np.unique(labels).tolist()) == {0, 1}:
            from sklearn.metrics import roc_auc_score

            metrics["roc_auc"] = float(roc_auc_score(labels, np.concatenate(scores)))
        return metrics

    def _evaluate_regression(
        self, module: nn.Module, xt: Tensor, yt: Tensor, batch_size: int
    ) -> dict[str, float]:
        n = int(yt.shape[0])
        loss_sum = sq_sum = abs_sum = 0.0
        with torch.inference_mode():
            for start in range(0, n, batch_size):
                xb = xt[start : start + batch_size]
                yb = yt[start : start + batch_size]
                out = module(xb)
                loss_sum += float(self._loss_fn(out, yb)) * int(yb.shape[0])
                sq, ab = _error_sums(out, yb)
                sq_sum += float(sq)
                abs_sum += float(ab)
        metrics = _regression_metrics(loss_sum, sq_sum, abs_sum, n)
        metrics["num_examples"] = float(n)
        return metrics

    def _dummy_targets(self, *shape: int) -> Tensor:
        """Zero targets of the task's dtype (for checks on a dummy batch)."""
        dtype = torch.float32 if self.is_regression else torch.int64
        return torch.zeros(shape, dtype=dtype)

    def _get_bound(self) -> _Bound:
        if self._bound is None:
            self._bound = _Bound(_build(self._module_fn))
        return self._bound

    def _load_params(self, params: Params) -> None:
        self._get_bound().load(params)

    def _read_params(self) -> Params:
        return self._get_bound().read()

    def _tensors(self, x: np.ndarray, y: np.ndarray) -> tuple[Tensor, Tensor]:
        # np.require copies only when needed; torch.from_numpy then shares
        # memory (it needs a writable array, though it never writes to it).
        xa = np.require(x, dtype=np.float32, requirements=["C", "W"])
        ya = _targets(np.asarray(y), self._task)
        if xa.ndim < 1 or xa.shape[0] != ya.shape[0]:
            raise ValueError(
                f"x and y must have the same number of rows; got x {xa.shape} "
                f"and y {ya.shape}"
            )
        xt = torch.from_numpy(xa)
        shape = self._input_shape
        if shape is not None and tuple(xt.shape[1:]) != shape:
            if xt.ndim == 2 and xt.shape[1] == math.prod(shape):
                xt = xt.reshape(xt.shape[0], *shape)
            else:
                raise ValueError(
                    f"x must have shape (n, *{shape}) or (n, {math.prod(shape)}); "
                    f"got {tuple(xt.shape)}"
                )
        return xt, torch.from_numpy(ya)

    def __getstate__(self) -> dict[str, Any]:
        # The cached module is rebuilt on first use after unpickling.
        return {
            "module_fn": self._module_fn,
            "loss_fn": self._loss_fn,
            "input_shape": self._input_shape,
            "task": self._task,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._module_fn = state["module_fn"]
        self._loss_fn = state["loss_fn"]
        self._input_shape = state["input_shape"]
        self._task = state.get("task", "classification")
        self._bound = None

    def __repr__(self) -> str:
        task = "" if self._task == "classification" else f", task={self._task!r}"
        return f"TorchModel({self._module_fn!r}, input_shape={self._input_shape}{task})"


def _task_loss(task: str, loss_fn: LossFn | None) -> LossFn:
    if task != "regression":
        return functional.cross_entropy if loss_fn is None else loss_fn
    if loss_fn is None or loss_fn is regression_loss:
        return regression_loss
    return _FlatOutputs(loss_fn)


class _FlatOutputs:
    """A regression ``loss_fn`` given outputs shaped as the targets, ``(n,)``."""

    __slots__ = ("loss_fn",)

    def __init__(self, loss_fn: LossFn) -> None:
        self.loss_fn = loss_fn

    def __call__(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(outputs.reshape(targets.shape), targets)

    def __getstate__(self) -> LossFn:
        return self.loss_fn

    def __setstate__(self, state: LossFn) -> None:
        self.loss_fn = state

    def __repr__(self) -> str:
        return f"{self.loss_fn!r} (outputs as (n,))"


def _targets(ya: np.ndarray, task: str) -> np.ndarray:
    """``y`` as C-contiguous ``int64`` labels or ``float32`` regression targets."""
    if task == "regression":
        if ya.ndim == 2 and ya.shape[1] == 1:
            ya = ya.reshape(-1)
        if ya.ndim != 1:
            raise ValueError(
                "regression targets y must be one value per example, (n,) or "
                f"(n, 1); got shape {ya.shape}"
            )
        if ya.dtype.kind not in "iuf":
            raise ValueError(
                f"regression targets y must be numbers; got dtype {ya.dtype}"
            )
        out = np.require(ya, dtype=np.float32, requirements=["C", "W"])
        if not np.isfinite(out).all():
            bad = int(np.flatnonzero(~np.isfinite(out))[0])
            raise ValueError(
                f"regression targets y must be finite; row {bad} is {out[bad]}"
            )
        return out
    if ya.ndim != 1:
        raise ValueError(f"y must be one-dimensional; got shape {ya.shape}")
    if not _is_integral(ya):
        hint = (
            " (real-valued targets: use task = 'regression')"
            if ya.dtype.kind == "f"
            else ""
        )
        raise ValueError(
            f"y must hold integer class labels; got dtype {ya.dtype}{hint}"
        )
    return np.require(ya, dtype=np.int64, requirements=["C", "W"])


def _error_sums(out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Sums of squared and of absolute errors (float64) of regression outputs."""
    diff = out.reshape(y.shape).to(torch.float64) - y.to(torch.float64)
    return diff.square().sum(), diff.abs().sum()


def _regression_metrics(
    loss_sum: float, sq_sum: float, abs_sum: float, n: int
) -> dict[str, float]:
    """``{"loss", "rmse", "mae"}`` from sums over ``n`` examples."""
    if n == 0:
        return {"loss": math.nan, "rmse": math.nan, "mae": math.nan}
    return {
        "loss": loss_sum / n,
        "rmse": math.sqrt(sq_sum / n),
        "mae": abs_sum / n,
    }


def _build(module_fn: Callable[[], nn.Module]) -> nn.Module:
    module = module_fn()
    if not isinstance(module, nn.Module):
        raise ConfigError(
            "`module_fn` of TorchModel must return a torch.nn.Module; "
            f"got {type(module).__name__}."
        )
    problems: list[str] = []
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        problems.append(
            f"it has buffers {buffers}, which Params cannot carry "
            "(replace BatchNorm by GroupNorm or LayerNorm)"
        )
    named = list(module.named_parameters())
    if not named:
        problems.append("it has no parameters")
    wrong = [f"{n} ({p.dtype})" for n, p in named if p.dtype != torch.float32]
    if wrong:
        problems.append(f"parameters must be float32; got {wrong}")
    if problems:
        raise ConfigError(
            f"module {type(module).__name__} is not supported by TorchModel: "
            + "; ".join(problems)
            + "."
        )
    return module


def _is_integral(labels: np.ndarray) -> bool:
    if np.issubdtype(labels.dtype, np.integer):
        return True
    return np.issubdtype(labels.dtype, np.floating) and bool(
        np.all(np.mod(labels, 1) == 0)
    )


def _spec_of(named: list[tuple[str, nn.Parameter]]) -> ParamSpec:
    return ParamSpec(tuple((name, tuple(p.shape)) for name, p in named))


def _views(flat: Tensor, like: tuple[nn.Parameter, ...]) -> tuple[Tensor, ...]:
    views: list[Tensor] = []
    offset = 0
    for p in like:
        views.append(flat[offset : offset + p.numel()].view_as(p))
        offset += p.numel()
    return tuple(views)


def _proximal_mu(config: FitConfig) -> float:
    value = config.options.get(_PROXIMAL_MU, 0.0)
    if isinstance(value, bool | str) or not (
        math.isfinite(float(value)) and float(value) >= 0
    ):
        raise ConfigError(
            f"`options['{_PROXIMAL_MU}']` of FitConfig must be a finite number "
            f">= 0; got {value!r}."
        )
    return float(value)


def _add_proximal_grad(
    params: tuple[nn.Parameter, ...], anchors: tuple[Tensor, ...], mu: float
) -> None:
    # d/dw [mu/2 ||w - w_global||^2] = mu (w - w_global)
    with torch.no_grad():
        for p, anchor in zip(params, anchors, strict=True):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = (p - anchor).mul_(mu)
            else:
                p.grad.add_(p, alpha=mu).sub_(anchor, alpha=mu)


class _Sgd:
    """``torch.optim.SGD`` (dampening 0, no Nesterov), step for step.

    The same operations in the same order as torch's single-tensor SGD on the
    CPU, so results are bitwise those of ``torch.optim.SGD``; written out
    because ``torch.optim``'s first ``step()`` imports ``torch._dynamo``, about
    a second of start-up for every run.
    """

    def __init__(
        self,
        params: tuple[nn.Parameter, ...],
        *,
        lr: float,
        momentum: float,
        weight_decay: float,
    ) -> None:
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.buffers: list[Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d_p = p.grad
            if self.weight_decay != 0:
                d_p = d_p.add(p, alpha=self.weight_decay)
            if self.momentum != 0:
                buf = self.buffers[i]
                if buf is None:
                    buf = torch.clone(d_p).detach()
                    self.buffers[i] = buf
                else:
                    buf.mul_(self.momentum).add_(d_p, alpha=1.0)
                d_p = buf
            p.add_(d_p, alpha=-self.lr)


def _correction_views(correction: Params, bound: _Bound) -> tuple[Tensor, ...]:
    if correction.spec != bound.spec:
        raise ConfigError(
            "`correction` does not match the model: "
            + "; ".join(bound.spec.mismatches(correction.spec))
        )
    flat = torch.from_numpy(np.array(correction.flat, dtype=np.float32))
    return _views(flat, bound.params)


def _add_correction(
    params: tuple[nn.Parameter, ...], shifts: tuple[Tensor, ...]
) -> None:
    with torch.no_grad():
        for p, shift in zip(params, shifts, strict=True):
            if not p.requires_grad:
                continue
            if p.grad is None:
                p.grad = shift.clone()
            else:
                p.grad.add_(shift)


def _num_correct(out: Tensor, y: Tensor) -> Tensor:
    if out.ndim == 2 and out.shape[1] > 1:
        predicted = out.argmax(dim=1)
    else:
        predicted = (out.reshape(-1) > 0).to(torch.int64)
    return (predicted == y).sum()


def _binary_score(out: Tensor) -> np.ndarray:
    # For two logits, softmax(out)[:, 1] is increasing in out[:, 1] - out[:, 0],
    # so the difference ranks examples exactly as the probability does.
    if out.ndim == 2 and out.shape[1] == 2:
        score = out[:, 1] - out[:, 0]
    else:
        score = out.reshape(-1)
    result: np.ndarray = score.to(torch.float64).numpy().copy()
    return result
