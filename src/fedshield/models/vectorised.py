"""Train many clients of one :class:`TorchModel` in lockstep, vectorised.

:func:`train_many` runs the local training of ``K`` clients that share one
model as one computation over stacked parameters ``(K, ...)``: each step
evaluates every client's gradient, then applies ``K`` SGD updates with a few
whole-tensor operations. The gradient comes from one of three steps
(:func:`_make_step`): plain chains of ``Linear`` layers and activations (the
built-in logistic and MLP models) are differentiated by hand with batched
matrix products; convolutional chains (``Conv2d``, ``MaxPool2d`` and
activations, then such a chain: the built-in CNN) run their convolutional
layers client by client in the channels-last layout with ATen's own backward
kernels and the rest batched; any other module goes through
``torch.func.vmap`` of :func:`torch.func.functional_call` and one autograd
backward. It computes the same thing as calling :meth:`TorchModel.train` once
per client with the same generators, up to floating-point rounding (batched
kernels sum in a different order), which is what makes many small clients
cheap to simulate on one machine.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional

from fedshield.core import FitConfig, Params
from fedshield.errors import ConfigError
from fedshield.models.torch_model import (
    _SEED_BOUND,
    LossFn,
    TorchModel,
    _proximal_mu,
    _regression_metrics,
    regression_loss,
)

__all__ = ["check_vectorisable", "train_many"]

_IGNORE_INDEX = -100
# Gather all steps' batches in one copy when it takes at most this many bytes.
_PREGATHER_BYTES = 32 * 2**20
_FALLBACK = "use backend = 'sequential' or 'process' instead"

# Layers that draw from torch's generator while training: vmap cannot replay
# the draws a sequential run makes (and refuses random ops by default).
_RANDOM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.dropout._DropoutNd,
    nn.RReLU,
)
# Layers whose output for one example depends on the other examples of the
# batch: padding a client's batch would change their statistics.
_BATCH_MIXING_LAYERS: tuple[type[nn.Module], ...] = (nn.modules.batchnorm._BatchNorm,)

# step(params, x, y, mask) -> (gradients, outputs, each client's mean loss)
_StepFn = Callable[
    [dict[str, Tensor], Tensor, Tensor, Tensor],
    tuple[dict[str, Tensor], Tensor, Tensor],
]


def check_vectorisable(model: TorchModel) -> None:
    """Raise unless :func:`train_many` can train ``model``.

    Checks every layer of the module (all problems in one error): no buffers,
    no random layers (``Dropout`` and its kin, ``RReLU``) and no layers that
    mix examples of a batch (``BatchNorm``). When the model knows its
    ``input_shape`` it also runs one vectorised gradient step on a dummy
    batch, so that a layer ``torch.func.vmap`` cannot batch (data-dependent
    control flow, ``.item()``, an operator without a batching rule that
    fails) is found now rather than in round 1.

    Parameters
    ----------
    model
        The model adapter.

    Raises
    ------
    ConfigError
        Naming each offending layer and saying which backend can train the
        model instead. Problems :class:`TorchModel` itself refuses (such as
        BatchNorm's running statistics, which :class:`~fedshield.core.Params`
        cannot carry) are raised with :class:`TorchModel`'s own message: no
        backend can train such a module.

    Notes
    -----
    Without ``input_shape`` only the static checks run; a layer vmap cannot
    batch is then reported by the first :func:`train_many` call, still as a
    :class:`ConfigError` naming the layer.
    """
    module = model._get_bound().module
    problems = _static_problems(module)
    if problems:
        raise _refusal(module, problems)
    shape = model._input_shape
    if shape is None:
        return
    stacked = {
        name: p.detach().unsqueeze(0).expand(2, *p.shape).clone()
        for name, p in module.named_parameters()
    }
    x = torch.zeros((2, 2, *shape), dtype=torch.float32)
    y = model._dummy_targets(2, 2)
    mask = torch.ones((2, 2), dtype=torch.bool)
    step = _make_step(module, model._loss_fn)
    module.train()
    try:
        step(stacked, x, y, mask)
    except Exception as err:
        refusal = _diagnose(module, model._loss_fn, stacked, x, y, mask, err)
        if refusal is not None:
            raise refusal from err
        # The plain, unbatched step fails too on this dummy batch (a loss that
        # wants other targets, say): nothing to blame on vmap, so training will
        # report whatever is really wrong.


def train_many(
    model: TorchModel,
    params: Params,
    datasets: Sequence[tuple[np.ndarray, np.ndarray]],
    config: FitConfig,
    *,
    rngs: Sequence[np.random.Generator],
    max_batch_clients: int = 64,
    corrections: Sequence[Params | None] | None = None,
) -> list[tuple[Params, dict[str, float]]]:
    """Train one local copy of ``params`` per data set, vectorised over clients.

    The result for data set ``k`` is what ``model.train(params, *datasets[k],
    config, rng=rngs[k])`` returns, up to floating-point rounding; the
    generators are advanced exactly as :meth:`TorchModel.train` advances them.

    Parameters
    ----------
    model
        The model adapter (see :func:`check_vectorisable` for what it must
        satisfy).
    params
        Starting parameters, the same for every client; not modified.
    datasets
        ``(x, y)`` of each client, as :meth:`TorchModel.train` takes them.
        Sizes may differ.
    config
        Local training settings, the same for every client (see
        :meth:`TorchModel.train`, including ``options["proximal_mu"]``).
    rngs
        One generator per data set, the source of that client's shuffles.
    max_batch_clients
        At most this many clients train together; more are trained in
        consecutive chunks, bounding memory to about ``max_batch_clients``
        copies of the parameters, momentum and one batch of activations.

    Returns
    -------
    list of (Params, dict)
        Per data set, in order: the trained parameters and ``{"loss",
        "accuracy"}`` over the examples of the last epoch (``{"loss",
        "rmse", "mae"}`` for a regression model, as :meth:`TorchModel.train`).

    Raises
    ------
    ConfigError
        If the model cannot be vectorised (see :func:`check_vectorisable`:
        the message names the layer and the backend to use instead),
        ``params`` do not match the model, ``proximal_mu`` is invalid,
        ``max_batch_clients`` < 1 or ``rngs`` and ``datasets`` differ in
        length.
    ValueError
        If a data set is empty or its ``x`` and ``y`` do not fit together
        (the message gives its index).

    Notes
    -----
    Client ``k`` draws its two seeds from ``rngs[k]`` and shuffles each epoch
    with a ``torch.Generator`` seeded by the first, exactly as
    :meth:`TorchModel.train`, so its batch at every step is the same set of
    examples in the same order. Step ``t`` stacks each client's ``t``-th
    batch; a shorter batch (the last of an epoch) is padded and the padding
    masked, so that the gradient is the mean over the real examples, as the
    sequential mean loss gives: cross-entropy (the default ``loss_fn``)
    marks padded targets with ``ignore_index``, the regression loss
    (:func:`~fedshield.models.torch_model.regression_loss`) averages the
    masked squared errors; any other ``loss_fn`` is
    evaluated per example (inner vmap over batches of one) and averaged as
    ``sum(mask * loss) / count``, so it must be a mean of per-example terms.
    The reported loss is ``loss_fn`` of each client's unpadded batch, as
    sequential training computes it. A client whose steps have run out takes
    no part in later steps: they run on the active clients only, and its
    parameters and momentum are left untouched (a zero learning rate would
    not do: weight decay and momentum would still move them).

    The update is ``torch.optim.SGD``'s (dampening 0, no Nesterov):
    ``g = grad + mu (w - w_global) + weight_decay w``; ``buf = g`` on the
    first step, then ``buf = momentum buf + g``; ``w -= lr buf``. The
    proximal term ``mu (w - w_global)`` is FedProx's (Li et al., MLSys 2020,
    Sec. 3), added as :meth:`TorchModel.train` adds it. Parameters with
    ``requires_grad=False``, and parameters the forward pass does not use
    when ``mu`` is 0, stay fixed, as the sequential optimizer skips them.

    The second seed drawn from each generator seeds torch's global generator
    in sequential training, which only random layers read; those are refused
    here, so it is drawn and not used.

    Examples
    --------
    >>> import functools
    >>> from fedshield.models import build_module
    >>> model = TorchModel(functools.partial(
    ...     build_module, "logistic", input_shape=(2,), num_classes=2))
    >>> params = model.init_params(0)
    >>> data = [(np.eye(2, dtype=np.float32), np.array([0, 1])),
    ...         (np.ones((3, 2), np.float32), np.array([1, 1, 0]))]
    >>> config = FitConfig(round_idx=0, batch_size=2, momentum=0.9)
    >>> many = train_many(model, params, data, config,
    ...                   rngs=[np.random.default_rng(k) for k in range(2)])
    >>> one, _ = model.train(params, *data[1], config, rng=np.random.default_rng(1))
    >>> bool(np.allclose(many[1][0].flat, one.flat, rtol=1e-5, atol=1e-6))
    True
    """
    if isinstance(max_batch_clients, bool) or int(max_batch_clients) < 1:
        raise ConfigError(
            f"`max_batch_clients` of train_many must be >= 1; got "
            f"{max_batch_clients!r}."
        )
    if len(rngs) != len(datasets):
        raise ConfigError(
            f"`rngs` of train_many must have one generator per data set; got "
            f"{len(rngs)} generators for {len(datasets)} data sets."
        )
    bound = model._get_bound()
    # Only the static checks: a layer vmap cannot batch is diagnosed, and named,
    # when the first step fails (check_vectorisable's dummy step costs a few ms).
    problems = _static_problems(bound.module)
    if problems:
        raise _refusal(bound.module, problems)
    mu = _proximal_mu(config)
    bound.load(params)  # validates params against the model's spec
    tensors: list[tuple[Tensor, Tensor]] = []
    for k, (x, y) in enumerate(datasets):
        try:
            xt, yt = model._tensors(x, y)
        except ValueError as err:
            raise ValueError(f"data set {k}: {err}") from err
        if int(yt.shape[0]) == 0:
            raise ValueError(f"data set {k}: cannot train on 0 examples")
        tensors.append((xt, yt))
    # Draw every client's seeds up front, in TorchModel.train's order.
    seeds = [int(rng.integers(_SEED_BOUND, size=2)[0]) for rng in rngs]
    shifts: list[Tensor | None] = [None] * len(tensors)
    if corrections is not None:
        if len(corrections) != len(tensors):
            raise ValueError(
                f"got {len(corrections)} corrections for {len(tensors)} data sets"
            )
        for k, corr in enumerate(corrections):
            if corr is not None:
                if corr.spec != params.spec:
                    raise ConfigError(
                        f"correction {k} does not match the model: "
                        + "; ".join(params.spec.mismatches(corr.spec))
                    )
                shifts[k] = torch.from_numpy(np.array(corr.flat, dtype=np.float32))
    trainer = _Trainer(
        model, params, config, mu=mu, has_shift=any(v is not None for v in shifts)
    )
    results: list[tuple[Params, dict[str, float]]] = []
    chunk = int(max_batch_clients)
    for start in range(0, len(tensors), chunk):
        results.extend(
            trainer.run(
                tensors[start : start + chunk],
                seeds[start : start + chunk],
                shifts[start : start + chunk],
            )
        )
    return results


class _Trainer:
    """Lockstep SGD of one chunk of clients (the body of :func:`train_many`)."""

    def __init__(
        self,
        model: TorchModel,
        params: Params,
        config: FitConfig,
        *,
        mu: float,
        has_shift: bool = False,
    ) -> None:
        self.has_shift = has_shift
        bound = model._get_bound()
        self.module = bound.module
        self.loss_fn = model._loss_fn
        self.regression = model.is_regression
        self.config = config
        self.mu = mu
        self.spec = params.spec
        named = list(self.module.named_parameters())
        self.names = [name for name, _ in named]
        self.shapes = [tuple(p.shape) for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.start = torch.from_numpy(np.array(params.flat, dtype=np.float32))
        self.step_fn = _make_step(self.module, self.loss_fn)
        self._frozen = [not p.requires_grad for _, p in named]
        # Elements the optimizer never moves; found on the first chunk.
        self.fixed: Tensor | None = None
        self._fixed_known = False

    def _fixed_mask(self, x: Tensor, y: Tensor) -> Tensor | None:
        # Sequential SGD skips a parameter whose .grad is None: frozen ones,
        # and (without the proximal term, which would give it a gradient)
        # ones the forward pass does not reach. func.grad returns zeros for
        # those, so find them once with autograd on one example.
        skip = list(self._frozen)
        # Every parameter of a plain chain reaches the output.
        reaches_all = (
            _linear_chain(self.module) is not None
            or _conv_chain(self.module) is not None
        )
        if self.mu == 0 and not self.has_shift and not reaches_all:
            params = {
                name: p.detach().clone().requires_grad_(True)
                for name, p in self.module.named_parameters()
            }
            out = functional_call(self.module, params, (x[:1],))
            loss = self.loss_fn(out, y[:1])
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            skip = [s or g is None for s, g in zip(skip, grads, strict=True)]
        if not any(skip):
            return None
        return torch.cat(
            [
                torch.full((n,), s, dtype=torch.bool)
                for n, s in zip(self.sizes, skip, strict=True)
            ]
        )

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        k = flat.shape[0]
        views: dict[str, Tensor] = {}
        offset = 0
        for name, shape, n in zip(self.names, self.shapes, self.sizes, strict=True):
            views[name] = flat[:, offset : offset + n].view(k, *shape)
            offset += n
        return views

    def run(
        self,
        tensors: Sequence[tuple[Tensor, Tensor]],
        seeds: Sequence[int],
        shifts: Sequence[Tensor | None],
    ) -> list[tuple[Params, dict[str, float]]]:
        config = self.config
        k_all = len(tensors)
        batch = config.batch_size
        epochs = config.epochs
        counts_n = [int(y.shape[0]) for _, y in tensors]
        steps = [math.ceil(n / batch) for n in counts_n]
        total = epochs * max(steps)
        # table[k, t] = client k's row indices (into the concatenated data)
        # at step t, -1 for padding; each client shuffles every epoch with a
        # torch.Generator seeded as TorchModel.train seeds it.
        table = np.full((k_all, total, batch), -1, dtype=np.int64)
        offset = 0
        for k, (n, s, seed) in enumerate(zip(counts_n, steps, seeds, strict=True)):
            generator = torch.Generator().manual_seed(seed)
            padded = np.full((epochs, s * batch), -1, dtype=np.int64)
            for e in range(epochs):
                padded[e, :n] = torch.randperm(n, generator=generator).numpy() + offset
            table[k, : epochs * s] = padded.reshape(epochs * s, batch)
            offset += n
        mask_np = table >= 0
        counts_np = mask_np.sum(axis=2)  # (K, T) real examples per step
        # Rows past a client's examples in a batch are padding; real rows come
        # first, so step t needs only the first widths[t] columns.
        widths = counts_np.max(axis=0)
        steps_np = np.asarray(steps).reshape(-1, 1)
        t_idx = np.arange(total)
        in_last_np = (t_idx >= (epochs - 1) * steps_np) & (t_idx < epochs * steps_np)
        x_cat = torch.cat([x for x, _ in tensors])
        y_cat = torch.cat([y for _, y in tensors])
        # Padding reads row 0 (masked out). Every step's batch is gathered at
        # once when that copy is small (one kernel instead of two per step),
        # else each step gathers its own.
        gather = torch.from_numpy(np.where(mask_np, table, 0))
        gathered = gather.numel() * x_cat[:1].numel() * x_cat.element_size()
        x_steps: Tensor | None = None
        y_steps: Tensor | None = None
        if gathered <= _PREGATHER_BYTES:
            x_steps = x_cat.index_select(0, gather.view(-1)).view(
                k_all, total, batch, *x_cat.shape[1:]
            )
            y_steps = y_cat.index_select(0, gather.view(-1)).view(k_all, total, batch)
        mask = torch.from_numpy(mask_np)
        counts = torch.from_numpy(counts_np)
        if not self._fixed_known:
            self.fixed = self._fixed_mask(x_cat, y_cat)
            self._fixed_known = True

        flat = self.start.unsqueeze(0).expand(k_all, -1).clone()
        shift_all: Tensor | None = None
        if any(v is not None for v in shifts):
            shift_all = torch.stack(
                [torch.zeros_like(self.start) if v is None else v for v in shifts]
            )
        momentum_buf: Tensor | None = None
        # Each step's mean loss and correct predictions (regression: sums of
        # squared and absolute errors) per client, kept for the steps of the
        # last epoch (TorchModel.train's metrics).
        step_loss = torch.zeros((k_all, total), dtype=torch.float32)
        step_stats = torch.zeros(
            (k_all, total, 2 if self.regression else 1), dtype=torch.float64
        )
        anchor = self.start
        lr, momentum, wd, mu = config.lr, config.momentum, config.weight_decay, self.mu
        active_np = counts_np > 0
        plain = (
            mu == 0
            and wd == 0
            and momentum == 0
            and shift_all is None
            and self.fixed is None
        )
        flat_views: dict[str, Tensor] | None = None
        for t in range(total):
            width = int(widths[t])
            if active_np[:, t].all():
                who = None
                k = k_all
                w = flat
                mask_t = mask[:, t, :width]
                if x_steps is not None and y_steps is not None:
                    xb, yb = x_steps[:, t, :width], y_steps[:, t, :width]
                else:
                    rows_t = gather[:, t, :width].reshape(-1)
                    xb = x_cat.index_select(0, rows_t).view(k, width, *x_cat.shape[1:])
                    yb = y_cat.index_select(0, rows_t).view(k, width)
            else:
                # A client whose steps have run out takes no part.
                who = torch.from_numpy(np.flatnonzero(active_np[:, t]))
                k = int(who.numel())
                w = flat.index_select(0, who)
                mask_t = mask[who, t, :width]
                if x_steps is not None and y_steps is not None:
                    xb, yb = x_steps[who, t, :width], y_steps[who, t, :width]
                else:
                    rows_t = gather[who, t, :width].reshape(-1)
                    xb = x_cat.index_select(0, rows_t).view(k, width, *x_cat.shape[1:])
                    yb = y_cat.index_select(0, rows_t).view(k, width)
            # Plain SGD updates ``flat`` in place, so its views stay valid.
            if plain and who is None:
                if flat_views is None:
                    flat_views = self._views(flat)
                views_w = flat_views
            else:
                views_w = self._views(w)
            try:
                grads, out, losses = self.step_fn(views_w, xb, yb, mask_t)
            except Exception as err:
                refusal = _diagnose(
                    self.module, self.loss_fn, self._views(w), xb, yb, mask_t, err
                )
                if refusal is not None:
                    raise refusal from err
                raise
            if plain and who is None:
                # Plain SGD, every client active: w -= lr g, in place,
                # parameter by parameter (no concatenated gradient).
                for name in self.names:
                    views_w[name].add_(grads[name], alpha=-lr)
                step_loss[:, t] = losses
                step_stats[:, t] = _step_stats(out, yb, mask_t, self.regression)
                continue
            g = torch.cat([grads[name].reshape(k, -1) for name in self.names], dim=1)
            if mu > 0:
                # d/dw [mu/2 ||w - w_global||^2] = mu (w - w_global), in
                # TorchModel's order of operations.
                g = g.add(w, alpha=mu).sub(anchor, alpha=mu)
            if shift_all is not None:
                # SCAFFOLD's c - c_i, after the proximal term as in TorchModel.
                g = g.add(shift_all if who is None else shift_all.index_select(0, who))
            if wd != 0:
                g = g.add(w, alpha=wd)
            if momentum != 0:
                if momentum_buf is None:
                    # Step 0: every client is active (each has >= 1 example).
                    momentum_buf = g.clone()
                    g = momentum_buf
                else:
                    buf = momentum_buf if who is None else momentum_buf[who]
                    g = buf.mul(momentum).add(g)
                    if who is None:
                        momentum_buf = g
                    else:
                        momentum_buf.index_copy_(0, who, g)
            w_new = w.add(g, alpha=-lr)
            if self.fixed is not None:
                w_new = torch.where(self.fixed, w, w_new)
            stats = _step_stats(out, yb, mask_t, self.regression)
            if who is None:
                flat = w_new
                step_loss[:, t] = losses
                step_stats[:, t] = stats
            else:
                flat.index_copy_(0, who, w_new)
                step_loss[who, t] = losses
                step_stats[who, t] = stats

        # Metrics of the last epoch, as TorchModel.train accumulates them:
        # each batch's float32 mean loss times its size, summed in float64.
        in_last = torch.from_numpy(in_last_np)
        weighted = (step_loss * counts.to(torch.float32)).to(torch.float64)
        loss_sum = torch.where(in_last, weighted, 0.0).sum(dim=1).tolist()
        sums = torch.where(in_last.unsqueeze(2), step_stats, 0.0).sum(dim=1).tolist()
        trained = flat.numpy()
        results: list[tuple[Params, dict[str, float]]] = []
        for k, n in enumerate(counts_n):
            new = Params.from_flat(trained[k].copy(), self.spec, copy=False)
            if self.regression:
                sq_sum, abs_sum = sums[k]
                metrics = _regression_metrics(loss_sum[k], sq_sum, abs_sum, n)
            else:
                metrics = {"loss": loss_sum[k] / n, "accuracy": sums[k][0] / n}
            results.append((new, metrics))
        return results


def _step_stats(out: Tensor, y: Tensor, mask: Tensor, regression: bool) -> Tensor:
    """Per client, ``(K, 1)`` correct predictions or ``(K, 2)`` error sums.

    For regression the sums of squared and of absolute errors over the real
    (unmasked) examples, in float64, as :meth:`TorchModel.train` adds them.
    """
    if regression:
        diff = out.reshape(y.shape).to(torch.float64) - y.to(torch.float64)
        diff = torch.where(mask, diff, 0.0)
        return torch.stack([diff.square().sum(dim=1), diff.abs().sum(dim=1)], dim=1)
    hits = (_predictions(out) == y).logical_and_(mask).sum(dim=1)
    return hits.to(torch.float64).unsqueeze(1)


def _predictions(out: Tensor) -> Tensor:
    # TorchModel's _num_correct, with a leading client dimension.
    if out.ndim == 3 and out.shape[2] > 1:
        return out.argmax(dim=2)
    return (out.reshape(out.shape[0], -1) > 0).to(torch.int64)


def _masked_mean_loss(
    loss_fn: LossFn, *, batched: bool
) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``loss(out, y, mask)``: the mean of ``loss_fn`` over the real examples.

    Cross-entropy marks padding with ``ignore_index``: its mean then divides
    the sum over the real examples by their count, and each real example's
    gradient weight is ``1 / count``, as in the unpadded batch. Another loss
    is taken per example (a mean over one example is that example's loss)
    and averaged under the mask; ``batched=False`` loops instead of using
    vmap (for diagnosing a vmap failure).
    """
    if loss_fn is functional.cross_entropy:

        def cross_entropy(out: Tensor, y: Tensor, mask: Tensor) -> Tensor:
            target = torch.where(mask, y, _IGNORE_INDEX)
            return functional.cross_entropy(out, target, ignore_index=_IGNORE_INDEX)

        return cross_entropy

    if loss_fn is regression_loss:

        def squared_error(out: Tensor, y: Tensor, mask: Tensor) -> Tensor:
            weights = mask.to(out.dtype)
            diff = out.reshape(y.shape) - y
            return (diff * diff * weights).sum() / weights.sum().clamp(min=1.0)

        return squared_error

    def one(out: Tensor, y: Tensor) -> Tensor:
        return loss_fn(out.unsqueeze(0), y.unsqueeze(0))

    def loop(out: Tensor, y: Tensor) -> Tensor:
        return torch.stack([one(out[i], y[i]) for i in range(out.shape[0])])

    per_example: Callable[[Tensor, Tensor], Tensor] = vmap(one) if batched else loop

    def masked(out: Tensor, y: Tensor, mask: Tensor) -> Tensor:
        weights = mask.to(out.dtype)
        # sum(mask * loss) / count: the mean over the real examples only.
        return (per_example(out, y) * weights).sum() / weights.sum().clamp(min=1.0)

    return masked


def _make_step(module: nn.Module, loss_fn: LossFn) -> _StepFn:
    """The vectorised gradient step for ``module`` and ``loss_fn``.

    A plain chain of ``Linear`` layers and elementwise activations under
    cross-entropy (the built-in logistic and MLP models) or the regression
    loss gets a hand-batched step (:func:`_chain_step`), and so does a chain
    that starts with ``Conv2d``, ``MaxPool2d`` and activations before its
    first ``Flatten`` (the built-in CNN, see :func:`_conv_chain`); anything
    else the general ``vmap`` one.
    """
    if loss_fn is not functional.cross_entropy and loss_fn is not regression_loss:
        return _vmap_step(module, loss_fn)
    regression = loss_fn is regression_loss
    layers = _linear_chain(module)
    if layers is not None:
        return _chain_step(layers, regression=regression)
    conv = _conv_chain(module)
    if conv is not None:
        spatial, head = conv
        return _chain_step(head, regression=regression, spatial=spatial)
    return _vmap_step(module, loss_fn)


def _vmap_step(module: nn.Module, loss_fn: LossFn) -> _StepFn:
    masked_loss = _masked_mean_loss(loss_fn, batched=True)

    def client_loss(
        params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor
    ) -> tuple[Tensor, Tensor]:
        out = functional_call(module, params, (x,))
        return masked_loss(out, y, mask), out

    forward = vmap(client_loss)

    def step(
        params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        # vmap the forward pass only, then one backward pass of the sum of
        # the clients' losses: client k's loss depends on its own parameter
        # slice alone, so the gradient's slice k is exactly dL_k/dθ_k. (Same
        # values as vmap(grad(...)), without torch.func.grad, whose use of
        # torch._dynamo costs about a second of import on the first call.)
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        losses, out = forward(leaves, x, y, mask)
        grads = torch.autograd.grad(
            losses.sum(), list(leaves.values()), allow_unused=True
        )
        return (
            {
                n: torch.zeros_like(leaf) if g is None else g
                for (n, leaf), g in zip(leaves.items(), grads, strict=True)
            },
            out.detach(),
            losses.detach(),
        )

    return step


# Activations whose derivative the chain step computes by hand, from the
# layer's output (ReLU, Tanh, Sigmoid) or input (LeakyReLU).
_CHAIN_ACTIVATIONS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
)
# (kind, parameter-name prefix, layer): kind is "linear", "flatten" or "act".
_ChainLayer = tuple[str, str, nn.Module]


def _linear_chain(module: nn.Module) -> list[_ChainLayer] | None:
    """``module`` as a list of layers if it is a plain chain, else None.

    A plain chain is an ``nn.Sequential`` of ``Linear`` layers, activations
    of :data:`_CHAIN_ACTIVATIONS` (exact types: a subclass may change
    ``forward``) and ``Flatten()`` of everything after the batch dimension,
    without hooks: the model :func:`_chain_step` differentiates by hand.
    """
    if type(module) is not nn.Sequential or _has_hooks(module):
        return None
    layers: list[_ChainLayer] = []
    for name, sub in module.named_children():
        if _has_hooks(sub) or list(sub.named_buffers()):
            return None
        if type(sub) is nn.Linear:
            layers.append(("linear", name, sub))
        elif type(sub) is nn.Flatten:
            if sub.start_dim != 1 or sub.end_dim != -1:
                return None
            layers.append(("flatten", name, sub))
        elif type(sub) in _CHAIN_ACTIVATIONS:
            layers.append(("act", name, sub))
        else:
            return None
    return layers


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _activation_grad(
    layer: nn.Module, inp: Tensor, out: Tensor, grad: Tensor
) -> Tensor:
    """The gradient at an activation's input, given the one at its output."""
    if isinstance(layer, nn.ReLU):
        relu_grad: Tensor = torch.ops.aten.threshold_backward(grad, out, 0.0)
        return relu_grad
    if isinstance(layer, nn.LeakyReLU):
        return torch.where(inp > 0, grad, grad * layer.negative_slope)
    if isinstance(layer, nn.Tanh):
        return grad * (1 - out * out)
    if isinstance(layer, nn.Sigmoid):
        return grad * (out * (1 - out))
    return grad  # Identity


def _chain_step(
    layers: Sequence[_ChainLayer],
    *,
    regression: bool = False,
    spatial: Sequence[_ChainLayer] = (),
) -> _StepFn:
    """Gradient step of a plain chain, batched over clients and derived by hand.

    Forward: each ``Linear`` of client ``k`` is a batched matrix product
    with its own weight slice, ``z[k] = h[k] @ W[k].T + b[k]`` (a ``Linear``
    over the last axis of a higher-rank input is the same product over the
    flattened leading axes); activations are elementwise, so they apply to
    every client at once. Loss: client ``k``'s mean cross-entropy over its
    real (unmasked) examples, as ``F.cross_entropy`` of its unpadded batch.
    Backward, written out: ``dz = (softmax(z) - onehot(y)) * mask / count``,
    then per ``Linear`` ``dW = dz.T @ h``, ``db = sum(dz)``, ``dh = dz @ W``,
    and per activation its derivative (:func:`_activation_grad`). The same
    gradient as autograd through the ``vmap`` step (tested against
    sequential training), with a few batched kernels per layer instead of
    ``vmap``'s per-operator dispatch and autograd's graph (about 5x less time
    per step for the built-in MLP), and without importing the
    decompositions ``vmap`` of cross-entropy needs (a third of a second at
    start-up). An output of another rank than (clients, batch, classes)
    falls back to the ``vmap`` step.

    With ``regression`` the loss is the mean squared error of the one output
    per example, ``mean((z - y)^2)`` over the real examples, and ``dz = 2 (z -
    y) * mask / count``; an output with more than one column falls back to
    the ``vmap`` step (which then reports the shape mismatch).

    With ``spatial`` (the convolutional part of :func:`_conv_chain`), the
    chain's input first goes through those layers client by client
    (:func:`_spatial_forward`), ``layers`` then starts at the ``Flatten``
    that ends them, and the gradient at that ``Flatten`` goes back through
    them client by client (:func:`_spatial_backward`).
    """
    fallback: list[_StepFn] = []
    # The Flatten that ends the spatial layers is done by _spatial_forward.
    head = list(layers[1:]) if spatial else list(layers)

    def step(
        params: dict[str, Tensor], x: Tensor, y: Tensor, mask: Tensor
    ) -> tuple[dict[str, Tensor], Tensor, Tensor]:
        k = x.shape[0]
        spatial_saved: list[list[tuple[Tensor, Tensor, Tensor | None]]] = []
        h = _spatial_forward(spatial, params, x, spatial_saved) if spatial else x
        saved: list[tuple[Tensor, Tensor]] = []  # (input, output) per layer
        for kind, name, layer in head:
            if kind == "linear":
                weight = params[f"{name}.weight"]
                bias = params.get(f"{name}.bias")
                flat_in = h.reshape(k, -1, h.shape[-1])
                wt = weight.transpose(1, 2)
                z = (
                    torch.bmm(flat_in, wt)
                    if bias is None
                    else torch.baddbmm(bias.unsqueeze(1), flat_in, wt)
                )
                out = z.view(*h.shape[:-1], weight.shape[1])
            elif kind == "flatten":
                out = h.flatten(2)
            else:
                out = layer(h)
            saved.append((h, out))
            h = out
        if h.ndim != 3 or (regression and h.shape[-1] != 1):
            if not fallback:
                fallback.append(
                    _vmap_step(
                        nn.Sequential(*[lay for _, _, lay in (*spatial, *layers)]),
                        regression_loss if regression else functional.cross_entropy,
                    )
                )
            return fallback[0](params, x, y, mask)
        # scale[k, i] = 1 / (client k's real examples) for a real example, 0
        # for padding (whose label, read from a real row, is a valid index).
        scale = mask / mask.sum(dim=1, keepdim=True).clamp_(min=1)
        if regression:
            diff = h.squeeze(-1) - y
            losses = (diff * diff * scale).sum(dim=1)
            # d(sum_k loss_k)/d z = 2 (z - y) * scale
            dz = (diff * scale).mul_(2.0).unsqueeze(-1)
        else:
            log_probs = torch.log_softmax(h, dim=-1)
            target = y.unsqueeze(-1)
            picked = log_probs.gather(-1, target).squeeze(-1)
            losses = (picked * scale).sum(dim=1).neg_()
            # d(sum_k loss_k)/d logits = (softmax - onehot) * scale
            dz = log_probs.exp_()
            dz.scatter_add_(-1, target, torch.full(target.shape, -1.0, dtype=h.dtype))
            dz.mul_(scale.unsqueeze(-1))
        grads, grad_in = _chain_backward(
            head, params, saved, dz, k, input_grad=bool(spatial)
        )
        if spatial:
            assert grad_in is not None
            grads.update(_spatial_backward(spatial, params, spatial_saved, grad_in))
        return {n: grads[n] for n in params}, h, losses

    return step


def _chain_backward(
    layers: Sequence[_ChainLayer],
    params: dict[str, Tensor],
    saved: Sequence[tuple[Tensor, Tensor]],
    dz: Tensor,
    k: int,
    *,
    input_grad: bool = False,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """Per-client gradients of a chain, from the gradient ``dz`` at its output.

    Returns the gradients of the chain's parameters and, with
    ``input_grad``, the gradient at the chain's input (else None).
    """
    grads: dict[str, Tensor] = {}
    grad = dz
    for index in range(len(layers) - 1, -1, -1):
        kind, name, layer = layers[index]
        inp, out = saved[index]
        if kind == "linear":
            weight = params[f"{name}.weight"]
            g3 = grad.reshape(k, -1, grad.shape[-1])
            in3 = inp.reshape(k, -1, inp.shape[-1])
            grads[f"{name}.weight"] = torch.bmm(g3.transpose(1, 2), in3)
            if f"{name}.bias" in params:
                grads[f"{name}.bias"] = g3.sum(dim=1)
            if index > 0 or input_grad:
                grad = torch.bmm(g3, weight).view(inp.shape)
        elif kind == "flatten":
            grad = grad.view(inp.shape)
        else:
            grad = _activation_grad(layer, inp, out, grad)
    return grads, (grad if input_grad else None)


def _conv_chain(
    module: nn.Module,
) -> tuple[list[_ChainLayer], list[_ChainLayer]] | None:
    """``module`` as ``(spatial, head)`` if it is a convolutional chain, else None.

    A convolutional chain is an ``nn.Sequential`` (without hooks or buffers)
    whose layers up to its first ``Flatten()`` are ``Conv2d`` (zero padding
    given as numbers, any stride, dilation and groups), ``MaxPool2d``
    (without ``return_indices``) and activations of
    :data:`_CHAIN_ACTIVATIONS`, with at least one ``Conv2d``; from that
    ``Flatten`` on it is a plain chain (:func:`_linear_chain`). Exact types
    only: a subclass may change ``forward``. ``spatial`` lists the layers
    before the ``Flatten`` (kinds ``"conv"``, ``"pool"``, ``"act"``),
    ``head`` the ``Flatten`` and the rest. The built-in CNN is one.
    """
    if type(module) is not nn.Sequential or _has_hooks(module):
        return None
    children = list(module.named_children())
    ends = [i for i, (_, sub) in enumerate(children) if type(sub) is nn.Flatten]
    if not ends:
        return None
    end = ends[0]
    spatial: list[_ChainLayer] = []
    for name, sub in children[:end]:
        if _has_hooks(sub) or list(sub.named_buffers()):
            return None
        if type(sub) is nn.Conv2d and _plain_conv(sub):
            spatial.append(("conv", name, sub))
        elif type(sub) is nn.MaxPool2d and not sub.return_indices:
            spatial.append(("pool", name, sub))
        elif type(sub) in _CHAIN_ACTIVATIONS:
            spatial.append(("act", name, sub))
        else:
            return None
    if not any(kind == "conv" for kind, _, _ in spatial):
        return None
    head = _linear_chain(nn.Sequential(OrderedDict(children[end:])))
    if head is None:
        return None
    return spatial, head


def _plain_conv(conv: nn.Conv2d) -> bool:
    """Whether :func:`_spatial_backward` can differentiate ``conv`` by hand."""
    return (
        conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)  # "same" may pad unevenly
        and not conv.transposed
    )


def _channels_last(t: Tensor) -> Tensor:
    """A channels-last copy of a 4-D tensor (also when it has one channel).

    ``Tensor.contiguous(memory_format=...)`` returns a one-channel tensor as
    it is (its strides are ambiguous), and oneDNN then keeps the whole
    network in the default layout.
    """
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t)


def _spatial_forward(
    spatial: Sequence[_ChainLayer],
    params: dict[str, Tensor],
    x: Tensor,
    saved: list[list[tuple[Tensor, Tensor, Tensor | None]]],
) -> Tensor:
    """The convolutional layers, client by client; ``(K, N, features)`` out.

    Client ``k`` runs its own ``Conv2d`` weights (``F.conv2d``, one call per
    client: grouping the clients into one grouped convolution, as ``vmap``
    does, was 1.2-8x slower per client with oneDNN on the CPU here), its
    activations and pools, in the channels-last layout (oneDNN's fast
    path; ``MaxPool2d`` on the default layout was ~10x slower on 32 x 16 x
    28 x 28). The output of the last layer is flattened in the default
    ``(C, H, W)`` order, as ``nn.Flatten`` does. For each client,
    ``saved`` gets ``(input, output, aux)`` per layer: ``aux`` is the
    channels-last weight of a ``Conv2d`` and the indices of a ``MaxPool2d``.
    """
    k = x.shape[0]
    flat: list[Tensor] = []
    for c in range(k):
        h = _channels_last(x[c])
        record: list[tuple[Tensor, Tensor, Tensor | None]] = []
        for kind, name, layer in spatial:
            aux: Tensor | None = None
            if kind == "conv":
                assert isinstance(layer, nn.Conv2d)
                aux = _channels_last(params[f"{name}.weight"][c])
                bias = params.get(f"{name}.bias")
                out = functional.conv2d(
                    h,
                    aux,
                    None if bias is None else bias[c],
                    layer.stride,
                    layer.padding,  # a string is refused by _plain_conv
                    layer.dilation,
                    layer.groups,
                )
            elif kind == "pool":
                assert isinstance(layer, nn.MaxPool2d)
                out, aux = torch.ops.aten.max_pool2d_with_indices(h, *_pool_args(layer))
            else:
                out = layer(h)
            record.append((h, out, aux))
            h = out
        saved.append(record)
        flat.append(h.reshape(h.shape[0], -1))
    return torch.stack(flat)


def _pool_args(
    pool: nn.MaxPool2d,
) -> tuple[list[int], list[int], list[int], list[int], bool]:
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a ``MaxPool2d``."""

    def pair(value: Any) -> list[int]:
        return (
            [int(v) for v in value]
            if isinstance(value, tuple | list)
            else [int(value)] * 2
        )

    stride = pool.stride if pool.stride is not None else pool.kernel_size
    return (
        pair(pool.kernel_size),
        pair(stride),
        pair(pool.padding),
        pair(pool.dilation),
        bool(pool.ceil_mode),
    )


def _spatial_backward(
    spatial: Sequence[_ChainLayer],
    params: dict[str, Tensor],
    saved: Sequence[Sequence[tuple[Tensor, Tensor, Tensor | None]]],
    grad_flat: Tensor,
) -> dict[str, Tensor]:
    """Gradients of the convolutional layers' parameters, client by client.

    ``grad_flat`` is the gradient at the flattened output of
    :func:`_spatial_forward`, ``(K, N, features)``. Each layer's backward is
    ATen's own kernel (``convolution_backward``,
    ``max_pool2d_with_indices_backward``, the activation's derivative), in
    the forward's channels-last layout; nothing is propagated below the
    first ``Conv2d``.
    """
    first = min(i for i, (kind, _, _) in enumerate(spatial) if kind == "conv")
    grads: dict[str, Tensor] = {}
    for kind, name, _ in spatial:
        if kind == "conv":
            for suffix in ("weight", "bias"):
                key = f"{name}.{suffix}"
                if key in params:
                    grads[key] = torch.empty_like(
                        params[key], memory_format=torch.contiguous_format
                    )
    for c, record in enumerate(saved):
        out_shape = record[-1][1].shape
        grad = _channels_last(grad_flat[c].view(out_shape))
        for index in range(len(spatial) - 1, first - 1, -1):
            kind, name, layer = spatial[index]
            inp, out, aux = record[index]
            if kind == "conv":
                assert isinstance(layer, nn.Conv2d) and aux is not None
                bias_key = f"{name}.bias"
                has_bias = bias_key in params
                grad_in, grad_w, grad_b = torch.ops.aten.convolution_backward(
                    grad,
                    inp,
                    aux,
                    [aux.shape[0]] if has_bias else None,
                    list(layer.stride),
                    list(layer.padding),  # a string is refused by _plain_conv
                    list(layer.dilation),
                    False,
                    [0, 0],
                    layer.groups,
                    [index > first, True, has_bias],
                )
                grads[f"{name}.weight"][c].copy_(grad_w)
                if has_bias:
                    grads[bias_key][c].copy_(grad_b)
                grad = grad_in
            elif kind == "pool":
                assert isinstance(layer, nn.MaxPool2d) and aux is not None
                grad = torch.ops.aten.max_pool2d_with_indices_backward(
                    grad, inp, *_pool_args(layer), aux
                )
            else:
                grad = _activation_grad(layer, inp, out, grad)
    return grads


def _diagnose(
    module: nn.Module,
    loss_fn: LossFn,
    params: Mapping[str, Tensor],
    x: Tensor,
    y: Tensor,
    mask: Tensor,
    err: Exception,
) -> ConfigError | None:
    """Blame ``err`` of a vectorised step on a layer, or return None.

    ``None`` when the same step fails without vmap too: then the fault is in
    the data or the model, and ``err`` itself says more.
    """
    masked_loss = _masked_mean_loss(loss_fn, batched=False)

    def client_loss(p: dict[str, Tensor], k: int) -> Tensor:
        return masked_loss(functional_call(module, p, (x[k],)), y[k], mask[k])

    for k in range(x.shape[0]):
        try:
            grad(client_loss)({n: v[k] for n, v in params.items()}, k)
        except Exception:
            return None
    with _layer_trace(module) as entered:
        try:
            vmap(lambda p, xb: functional_call(module, p, (xb,)))(dict(params), x)
        except Exception:
            pass
        else:
            entered.clear()
    reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if entered:
        name = entered[-1]
        layer = module.get_submodule(name) if name else module
        where = f"layer {name or '(root)'!r} ({type(layer).__name__})"
        what = f"torch.func.vmap cannot batch {where} over clients ({reason})"
    else:
        what = (
            "torch.func.vmap cannot batch the loss or the backward pass over "
            f"clients ({reason})"
        )
    return _refusal(module, [what])


@contextmanager
def _layer_trace(module: nn.Module) -> Iterator[list[str]]:
    """Record the stack of layers entered and not yet left in a forward pass."""
    entered: list[str] = []
    handles = []
    for name, sub in module.named_modules():

        def pre(_m: nn.Module, _args: Any, name: str = name) -> None:
            entered.append(name)

        def post(_m: nn.Module, _args: Any, _out: Any) -> None:
            entered.pop()

        handles.append(sub.register_forward_pre_hook(pre))
        handles.append(sub.register_forward_hook(post))
    try:
        yield entered
    finally:
        for handle in handles:
            handle.remove()


def _static_problems(module: nn.Module) -> list[str]:
    problems: list[str] = []
    for name, sub in module.named_modules():
        where = f"layer {name or '(root)'!r} ({type(sub).__name__})"
        if isinstance(sub, _RANDOM_LAYERS):
            problems.append(
                f"{where} draws random numbers in training, and vmap cannot "
                "replay the draws of sequential training"
            )
        if isinstance(sub, _BATCH_MIXING_LAYERS):
            problems.append(
                f"{where} normalises with statistics of the whole batch, which "
                "padding clients' batches to one size would change"
            )
        buffers = [b for b, _ in sub.named_buffers(recurse=False)]
        if buffers:
            problems.append(
                f"{where} has buffers {buffers}, which are not parameters and "
                "would not be stacked per client"
            )
    return problems


def _refusal(module: nn.Module, problems: list[str]) -> ConfigError:
    return ConfigError(
        f"module {type(module).__name__} cannot be trained by the vectorised "
        "backend: " + "; ".join(problems) + f"; {_FALLBACK}."
    )
