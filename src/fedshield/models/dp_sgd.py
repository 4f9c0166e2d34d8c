"""Record-level DP-SGD inside one client (Abadi et al., CCS 2016).

:func:`train_dp_sgd` trains a :class:`~fedshield.models.TorchModel` on one
client's records with differentially private SGD: Poisson-sampled batches,
every example's gradient clipped to an L2 norm of at most ``clip_norm``, and
Gaussian noise added to the sum of the clipped gradients. It returns, beside
the trained parameters, the :class:`~fedshield.privacy.accounting.DpEventSpec`
of the mechanism that ran, for an accountant to compose; it does not account
itself.

Two ways to get the per-example gradients, chosen per model:

* a plain chain of ``Linear`` layers, elementwise activations and
  ``Flatten`` under cross-entropy (the built-in logistic and MLP models) or
  the regression loss (mean squared error of one output) is
  differentiated by hand, and never materialises a per-example gradient:
  per-example norms come from the layers' inputs and output gradients, and
  the clipped sum is one matrix product per layer (:func:`_chain_clipped_sum`);
* any other model gets per-example gradients from ``torch.func.vmap`` over
  :func:`torch.func.functional_call` (:func:`_general_clipped_sum`).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn import functional

from fedshield.core import FitConfig, Params
from fedshield.core.client import SCAFFOLD, SERVER_CONTROL
from fedshield.errors import ConfigError
from fedshield.models.torch_model import (
    LossFn,
    TorchModel,
    _Bound,
    _error_sums,
    _num_correct,
    _proximal_mu,
    _regression_metrics,
    regression_loss,
)
from fedshield.models.vectorised import (
    _BATCH_MIXING_LAYERS,
    _RANDOM_LAYERS,
    _activation_grad,
    _ChainLayer,
    _layer_trace,
    _linear_chain,
)
from fedshield.privacy.noise import SecureRandom
from fedshield.privacy.records import dp_sgd_rate

if TYPE_CHECKING:  # dp-accounting (a second of import) loads only when used
    from fedshield.privacy.accounting import DpEventSpec
    from fedshield.privacy.noise import GaussianNoise

__all__ = ["DpSgdConfig", "check_dp_sgd", "train_dp_sgd"]

# The clip factor is min(1, clip_norm / ((1 + _CLIP_MARGIN) *
# sqrt(norm**2 + _CLIP_EPS**2))): _CLIP_EPS keeps the division finite for a
# zero gradient; _CLIP_MARGIN keeps the norm of the float32 clipped gradient
# (each entry rounded once or twice, a relative error of at most 2 * 2**-24)
# strictly below clip_norm.
_CLIP_EPS = 1e-6
_CLIP_MARGIN = 1e-6

_PathChoice = Literal["auto", "chain", "general"]

# step(xb, yb) -> (outputs, per-example losses): one DP-SGD update on a batch.
_StepFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
# clipped_sum(xb, yb) -> (outputs, per-example losses, squared norms, factors);
# writes the sum of the clipped per-example gradients into the flat buffer.
_ClippedSumFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor, Tensor, Tensor]]


@dataclass(frozen=True, slots=True)
class DpSgdConfig:
    """Settings of record-level DP-SGD.

    Parameters
    ----------
    clip_norm
        Bound ``C > 0`` on the L2 norm of each example's gradient (over all
        trainable parameters together).
    noise_multiplier
        ``sigma >= 0``: the noise added to the sum of clipped gradients has
        standard deviation ``sigma * C`` per coordinate. 0 gives no privacy
        and is meant for tests and ablations only: :func:`train_dp_sgd`
        refuses it, as the configuration layer does.
    sample_rate
        Poisson sampling rate ``q`` in (0, 1]: the probability that a record
        takes part in a step. ``None`` (default) means ``batch_size / n``
        (capped at 1) for a client with ``n`` records, as
        :func:`fedshield.privacy.records.dp_sgd_rate` gives it (the server
        accounts a client's rounds with the same function).

    Raises
    ------
    ConfigError
        If a value is out of range or not finite.
    """

    clip_norm: float
    noise_multiplier: float
    sample_rate: float | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not _is_number(self.clip_norm) or not (
            math.isfinite(self.clip_norm) and self.clip_norm > 0
        ):
            problems.append(
                f"`clip_norm` must be a finite number > 0; got {self.clip_norm!r}"
            )
        if not _is_number(self.noise_multiplier) or not (
            math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0
        ):
            problems.append(
                "`noise_multiplier` must be a finite number >= 0; got "
                f"{self.noise_multiplier!r}"
            )
        if self.sample_rate is not None and (
            not _is_number(self.sample_rate) or not 0 < self.sample_rate <= 1
        ):
            problems.append(
                f"`sample_rate` must be None or in (0, 1]; got {self.sample_rate!r}"
            )
        if problems:
            raise ConfigError("invalid DpSgdConfig: " + "; ".join(problems) + ".")


def check_dp_sgd(model: TorchModel) -> None:
    """Raise unless :func:`train_dp_sgd` can compute ``model``'s per-example gradients.

    Checks every layer (all problems in one error): no layer that mixes the
    examples of a batch (``BatchNorm``: one example's gradient would depend
    on the others, so clipping it would bound nothing), no buffers (they are
    not parameters, and a running statistic is itself a release of the
    data), and no random layers (``Dropout`` and its kin, ``RReLU``: the
    per-example computation cannot replay the draws of a batched forward
    pass, so they are not supported yet). When the model knows its
    ``input_shape`` it also computes the per-example gradients of a dummy
    batch, so that a layer ``torch.func.vmap`` cannot batch is found now.

    Parameters
    ----------
    model
        The model adapter.

    Raises
    ------
    ConfigError
        Naming each offending layer and what to change.
    """
    try:
        module = model._get_bound().module
    except ConfigError as err:
        # TorchModel refuses the module (BatchNorm's running statistics are
        # buffers): name the layers if that is why, else let its message stand.
        problems, built = _problems_of_fresh(model)
        if problems and built is not None:
            raise _refusal(built, problems) from err
        raise
    problems = _static_problems(module)
    if problems:
        raise _refusal(module, problems)
    shape = model._input_shape
    if shape is None:
        return
    x = torch.zeros((2, *shape), dtype=torch.float32)
    y = model._dummy_targets(2)
    names = [n for n, p in module.named_parameters() if p.requires_grad]
    buffer = torch.zeros(sum(p.numel() for p in module.parameters()))
    clipped_sum = _general_clipped_sum(module, model._loss_fn, names, buffer, 1.0)
    module.train()
    try:
        _run_or_refuse(module, model._loss_fn, clipped_sum, x, y)
    except ConfigError:
        raise
    except Exception:
        # The plain forward pass and loss fail on this dummy batch too (a
        # loss that wants other targets, say): nothing to blame on vmap, so
        # training will report whatever is really wrong.
        return


def train_dp_sgd(
    model: TorchModel,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    *,
    rng: np.random.Generator,
    dp: DpSgdConfig,
    noise: GaussianNoise,
) -> tuple[Params, dict[str, float], DpEventSpec]:
    """Train ``params`` on one client's records with DP-SGD.

    Algorithm 1 of Abadi et al., "Deep Learning with Differential Privacy"
    (CCS 2016), with Poisson sampling and the fixed-denominator average of
    Opacus (Yousefpour et al., "Opacus: User-Friendly Differential Privacy
    Library in PyTorch", 2021). Each step ``t``:

    1. **Sample.** Every one of the ``n`` records joins the batch ``B_t``
       independently with probability ``q`` (uniforms drawn from ``rng``,
       or, with a secure noise source, from a
       :class:`~fedshield.privacy.noise.SecureRandom`). An empty batch is a
       valid step: its update is noise only.
    2. **Clip.** For each ``i`` in ``B_t``, the gradient ``g_i`` of
       ``loss_fn`` on example ``i`` alone (over all trainable parameters,
       flattened) is scaled to ``g_i * min(1, C / ||g_i||)``. In floating
       point the factor is ``min(1, C / ((1 + 1e-6) sqrt(||g_i||^2 +
       1e-12)))``: the tiny epsilon ``1e-6`` on the norm avoids a division
       by zero for a zero gradient, and the relative ``1e-6`` absorbs the
       float32 rounding of the scaled gradient; norms and factors are
       float64 (from the float32 gradients), so the clipped gradient's norm
       never exceeds ``C`` (it is at most about ``C (1 - 1e-6)``). An
       example whose gradient is not finite gets factor 0 (it is dropped:
       a contribution of norm 0 <= C).
    3. **Noise.** ``g = (sum_i clipped g_i + N(0, sigma^2 C^2 I)) / (q n)``,
       the noise drawn by ``noise.sample`` (float64, cast to float32) in one
       call per step for the whole parameter vector. The denominator is the
       *expected* batch size ``q n``, not ``|B_t|``: so one record changes
       ``g`` by at most ``C / (q n)`` whatever was sampled, and ``|B_t|`` is
       never used.
    4. **Update.** ``torch.optim.SGD``'s update with ``config.lr``,
       ``momentum`` and ``weight_decay`` (as :meth:`TorchModel.train`),
       after adding FedProx's proximal gradient ``mu (w - w_global)`` when
       ``options["proximal_mu"] = mu > 0``. All of this is post-processing
       of ``g`` and of public values (``w_global = params``), which costs no
       privacy.

    There are ``round(1 / q)`` steps per epoch (Python's ``round``, half to
    even; at least 1), so an epoch touches ``n`` records in expectation,
    and ``T = config.epochs * round(1 / q)`` steps in all.

    Parameters
    ----------
    model
        The model adapter; see :func:`check_dp_sgd` for what it must satisfy.
    params
        Starting parameters (the global model); not modified.
    x, y
        The client's records, as :meth:`TorchModel.train` takes them.
    config
        ``epochs``, ``batch_size`` (only for the default sampling rate),
        ``lr``, ``momentum``, ``weight_decay`` and ``options["proximal_mu"]``.
    rng
        The source of the Poisson sampling when ``noise`` is seeded. With a
        secure noise source (``noise.secure``) the sampling draws from a
        fresh :class:`~fedshield.privacy.noise.SecureRandom` instead and
        ``rng`` is not used: amplification by sampling assumes that which
        records took part is as secret as the noise, so a batch must not
        be a function of a seed.
    dp
        Clip norm, noise multiplier and sampling rate.
    noise
        The Gaussian noise source (:class:`~fedshield.privacy.noise.SeededGaussian`
        for reproducible simulations, ``SecureGaussian`` for deployments).

    Returns
    -------
    tuple of (Params, dict, DpEventSpec)
        The trained parameters; ``{"loss", "accuracy"}`` over the examples
        sampled in the last epoch (each counted once per step it took part
        in, computed before that step's update; ``nan`` when the last epoch
        sampled none), ``{"loss", "rmse", "mae"}`` for a regression model;
        and ``DpEventSpec(noise_multiplier=sigma,
        sampling="poisson", sampling_rate=q, count=T, replace_one=True)``,
        the event to compose (under replace-one neighbours: the number of
        records sets q and T, so it is public; PLD accountant only). The
        metrics are computed from the raw data and are **not**
        differentially private: do not release them where the model must be.

    Raises
    ------
    ConfigError
        If ``dp.noise_multiplier`` is 0 (no guarantee, which no
        ``DpEventSpec`` can describe: noiseless runs are for tests and
        ablations, through the private ``_train``, which returns ``None`` as
        the event), the model cannot be trained with per-example gradients
        (see :func:`check_dp_sgd`), ``params`` do not match it,
        ``proximal_mu`` is invalid, or SCAFFOLD is asked for (see Notes).
    ValueError
        If ``x`` and ``y`` do not fit together or there are no records.

    Notes
    -----
    Per-example gradients of a plain ``Linear``/activation/``Flatten``
    chain under cross-entropy whose ``Linear`` layers see one vector per
    example (the built-in logistic and MLP) are derived by hand and never
    materialised: a ``Linear`` with input ``h_i`` and output gradient
    ``dz_i`` has per-example weight gradient ``dz_i h_i^T``, whose squared
    Frobenius norm is ``||dz_i||^2 ||h_i||^2`` (plus ``||dz_i||^2`` for the
    bias), and the clipped sum ``sum_i c_i dz_i h_i^T = (c * dz)^T h`` is one
    matrix product, as in a plain backward pass. This is the per-example norm
    of Goodfellow, "Efficient Per-Example Gradient Computations" (2015),
    the idea "ghost clipping" (Li et al., "Large Language Models Can Be
    Strong Differentially Private Learners", ICLR 2022) extends to
    sequences. Other models use ``torch.func.vmap`` of the forward pass over
    examples, each with its own (expanded, stride-0) copy of the
    parameters, and one backward pass of the summed losses.

    SCAFFOLD is refused: its client control variate is computed from the
    number of local steps of ordinary training, and its privacy would rest
    on every control variate coming from DP outputs only, which this
    function cannot check. The proximal term of FedProx is supported.

    Every trainable parameter gets noise, whether the forward pass uses it
    or not (unlike :meth:`TorchModel.train`, which skips a parameter without
    a gradient); parameters with ``requires_grad=False`` stay fixed (their
    noise is drawn and discarded) and do not count in the norms. No random
    layers are allowed, so torch's global generator is never read: the
    result is a function of ``params``, the data, the draws of ``rng`` and
    those of ``noise`` (bitwise reproducible with a seeded noise source;
    with a secure one neither the batches nor the noise repeat).
    """
    if dp.noise_multiplier == 0:
        raise ConfigError(
            "`noise_multiplier` of DpSgdConfig is 0: the trained model would "
            "carry no privacy guarantee, and no DpEventSpec describes that; "
            "use noise_multiplier > 0."
        )
    new, metrics, event = _train(
        model, params, x, y, config, rng=rng, dp=dp, noise=noise, path="auto"
    )
    assert event is not None  # noise_multiplier > 0
    return new, metrics, event


def _train(
    model: TorchModel,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    config: FitConfig,
    *,
    rng: np.random.Generator,
    dp: DpSgdConfig,
    noise: GaussianNoise,
    path: _PathChoice,
) -> tuple[Params, dict[str, float], DpEventSpec | None]:
    """:func:`train_dp_sgd`, with the per-example gradient path selectable.

    ``noise_multiplier = 0`` is allowed here (tests, ablations): then no
    noise is drawn and the event is ``None``, which means *no guarantee at
    all*, never "no privacy loss".
    """
    if config.options.get(SCAFFOLD) or SERVER_CONTROL in config.tensors:
        raise ConfigError(
            "record-level DP-SGD does not support SCAFFOLD yet (its control "
            "variates would need their own privacy analysis); use FedAvg or "
            "FedProx with DP-SGD."
        )
    mu = _proximal_mu(config)
    bound = model._get_bound()
    problems = _static_problems(bound.module)
    if problems:
        raise _refusal(bound.module, problems)
    xt, yt = model._tensors(x, y)
    n = int(yt.shape[0])
    if n == 0:
        raise ValueError("cannot train on 0 examples")
    if dp.sample_rate is None:
        # The server accounts a client from its size by the same function.
        q, steps_per_epoch = dp_sgd_rate(n, config.batch_size)
    else:
        q, steps_per_epoch = dp.sample_rate, max(1, round(1.0 / dp.sample_rate))
    bound.load(params)
    step = _make_step(
        model,
        bound,
        config,
        dp,
        noise,
        denominator=q * n,
        anchor=bound.flat.clone() if mu > 0 else None,
        mu=mu,
        path=path,
        input_ndim=int(xt.ndim),
    )
    # A secure run's batches are as secret as its noise (not from the seed).
    sampler: np.random.Generator | SecureRandom = (
        SecureRandom() if noise.secure else rng
    )
    bound.module.train()
    regression = model.is_regression
    loss_sum = 0.0
    correct = 0
    sq_sum = abs_sum = 0.0
    seen = 0
    for _ in range(config.epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        sq_sum = abs_sum = 0.0
        for _ in range(steps_per_epoch):
            idx = torch.from_numpy(_poisson_sample(sampler, n, q))
            xb = xt.index_select(0, idx)
            yb = yt.index_select(0, idx)
            out, losses = step(xb, yb)
            if idx.numel():
                loss_sum += float(losses.to(torch.float64).sum())
                if regression:
                    sq, ab = _error_sums(out, yb)
                    sq_sum += float(sq)
                    abs_sum += float(ab)
                else:
                    correct += int(_num_correct(out, yb))
                seen += int(idx.numel())
    metrics: dict[str, float]
    if regression:
        metrics = _regression_metrics(loss_sum, sq_sum, abs_sum, seen)
    else:
        metrics = {
            "loss": loss_sum / seen if seen else math.nan,
            "accuracy": correct / seen if seen else math.nan,
        }
    event = None
    if dp.noise_multiplier > 0:
        from fedshield.privacy.accounting import DpEventSpec

        event = DpEventSpec(
            noise_multiplier=float(dp.noise_multiplier),
            sampling="poisson",
            sampling_rate=float(q),
            count=config.epochs * steps_per_epoch,
            replace_one=True,
        )
    return bound.read(), metrics, event


def _poisson_sample(
    rng: np.random.Generator | SecureRandom, n: int, rate: float
) -> np.ndarray:
    """Indices of the records in one Poisson-sampled batch (each w.p. ``rate``)."""
    return np.flatnonzero(rng.random(n) < rate)


def _make_step(
    model: TorchModel,
    bound: _Bound,
    config: FitConfig,
    dp: DpSgdConfig,
    noise: GaussianNoise,
    *,
    denominator: float,
    anchor: Tensor | None,
    mu: float,
    path: _PathChoice,
    input_ndim: int,
) -> _StepFn:
    """One DP-SGD update of ``bound``'s parameters in place, per batch."""
    module = bound.module
    params = dict(module.named_parameters())
    grad_flat = torch.zeros_like(bound.flat)
    frozen = [not p.requires_grad for p in bound.params]
    fixed: Tensor | None = None
    if any(frozen):
        fixed = torch.cat(
            [
                torch.full((p.numel(),), f)
                for p, f in zip(bound.params, frozen, strict=True)
            ]
        )
    clipped_sum = _choose_clipped_sum(
        model, params, grad_flat, dp.clip_norm, path=path, input_ndim=input_ndim
    )
    std = float(dp.noise_multiplier) * float(dp.clip_norm)
    lr, momentum, weight_decay = config.lr, config.momentum, config.weight_decay
    weights = bound.flat
    buffers: list[Tensor] = []

    def step(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            if xb.shape[0] == 0:
                grad_flat.zero_()
                out = torch.empty(0)
                losses = torch.empty(0)
            else:
                out, losses, _, _ = clipped_sum(xb, yb)
            if std > 0:
                draw = noise.sample(tuple(grad_flat.shape), std)
                grad_flat.add_(torch.from_numpy(np.asarray(draw, dtype=np.float32)))
            d_p = grad_flat.div_(denominator)
            if anchor is not None:
                # FedProx: d/dw [mu/2 ||w - w_global||^2] = mu (w - w_global)
                d_p.add_(weights, alpha=mu).sub_(anchor, alpha=mu)
            # torch.optim.SGD (dampening 0, no Nesterov), as TorchModel's _Sgd.
            if weight_decay != 0:
                d_p = d_p.add(weights, alpha=weight_decay)
            if momentum != 0:
                if not buffers:
                    buffers.append(torch.clone(d_p).detach())
                else:
                    buffers[0].mul_(momentum).add_(d_p, alpha=1.0)
                d_p = buffers[0]
            if fixed is not None:
                d_p = d_p.masked_fill(fixed, 0.0)
            weights.add_(d_p, alpha=-lr)
        return out, losses

    return step


def _choose_clipped_sum(
    model: TorchModel,
    params: dict[str, nn.Parameter],
    grad_flat: Tensor,
    clip_norm: float,
    *,
    path: _PathChoice,
    input_ndim: int,
) -> _ClippedSumFn:
    module = model._get_bound().module
    layers = _linear_chain(module)
    regression = model._loss_fn is regression_loss
    is_chain = (
        layers is not None
        and (model._loss_fn is functional.cross_entropy or regression)
        and _has_vector_inputs(layers, input_ndim)
        and (not regression or _single_output(layers))
    )
    if path == "chain" and not is_chain:
        raise ConfigError("the model is not a plain chain the fast path can handle")
    if is_chain and path != "general":
        assert layers is not None
        return _chain_clipped_sum(
            layers, params, grad_flat, clip_norm, regression=regression
        )
    names = [name for name, p in params.items() if p.requires_grad]
    general = _general_clipped_sum(module, model._loss_fn, names, grad_flat, clip_norm)

    def checked(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return _run_or_refuse(module, model._loss_fn, general, xb, yb)

    return checked


def _single_output(layers: Sequence[_ChainLayer]) -> bool:
    """Whether the chain's last ``Linear`` gives one output per example."""
    linears = [layer for kind, _, layer in layers if kind == "linear"]
    return (
        bool(linears)
        and isinstance(linears[-1], nn.Linear)
        and (linears[-1].out_features == 1)
    )


def _has_vector_inputs(layers: Sequence[_ChainLayer], input_ndim: int) -> bool:
    """Whether every ``Linear`` of the chain sees ``(batch, features)`` inputs."""
    ndim = input_ndim
    for kind, _, _ in layers:
        if kind == "linear" and ndim != 2:
            return False
        if kind == "flatten":
            ndim = 2
    return ndim == 2


def _clip_factors(sq_norms: Tensor, clip_norm: float) -> tuple[Tensor, bool]:
    """Clip factors ``min(1, C / ((1 + 1e-6) sqrt(||g_i||^2 + 1e-12)))``.

    That is ``min(1, C / ||g_i||)`` with a tiny epsilon (``1e-6`` on the
    norm, so that a zero gradient divides by no zero) and a relative margin
    of ``1e-6`` that keeps the float32 clipped gradient's norm below ``C``
    despite rounding. ``sq_norms`` (squared norms) and the factors are
    float64; a non-finite squared norm gets factor 0 (the example is
    dropped). The flag says whether every factor is > 0 (no example was
    dropped, so no row needs zeroing).
    """
    factors = (
        sq_norms.add(_CLIP_EPS * _CLIP_EPS)
        .rsqrt_()
        .mul_(clip_norm / (1.0 + _CLIP_MARGIN))
        .clamp_(max=1.0)
    )
    if factors.numel() == 0:
        return factors, True
    lowest = float(factors.amin())  # nan if any factor is nan
    if lowest > 0:
        return factors, True
    return torch.nan_to_num_(factors, nan=0.0), False


# Per Linear of a chain, what its backward pass needs: (layer index, weight,
# bias or None, weight slot, bias slot or None, weight trainable, bias
# trainable).
_LinearPlan = tuple[int, Tensor, Tensor | None, Tensor, Tensor | None, bool, bool]


def _chain_clipped_sum(
    layers: Sequence[_ChainLayer],
    params: dict[str, nn.Parameter],
    grad_flat: Tensor,
    clip_norm: float,
    *,
    regression: bool = False,
) -> _ClippedSumFn:
    """Clipped per-example gradient sum of a plain chain, derived by hand.

    Forward once on the batch keeping every layer's input and output; the
    per-example output gradient of cross-entropy is ``softmax(z_i) -
    onehot(y_i)`` (of the regression loss ``(z_i - y_i)^2``, with one
    output, ``2 (z_i - y_i)``); back through the chain (``dh = dz @ W``, activations by
    :func:`_activation_grad`) keeping each ``Linear``'s ``dz``. Squared
    per-example norms add up over layers as ``||dz_i||^2 (||h_i||^2 + 1)``
    (the 1 for a trainable bias), computed in float64; then per ``Linear``
    the clipped sums are ``(c * dz)^T h`` and ``sum_i c_i dz_i``, written
    into ``grad_flat`` (whose slots are laid out as the parameters).
    """
    slots = _slots(params, grad_flat)
    plans: dict[int, _LinearPlan] = {}
    for index, (kind, name, _) in enumerate(layers):
        if kind == "linear":
            weight = params[f"{name}.weight"]
            bias = params.get(f"{name}.bias")
            plans[index] = (
                index,
                weight,
                bias,
                slots[f"{name}.weight"],
                slots.get(f"{name}.bias"),
                weight.requires_grad,
                bias is not None and bias.requires_grad,
            )
    first_linear = min(plans)
    minus_one = torch.full((1, 1), -1.0)
    f64 = torch.float64

    def clipped_sum(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        saved: list[tuple[Tensor, Tensor]] = []
        h = xb
        for index, (kind, _, layer) in enumerate(layers):
            if kind == "linear":
                _, weight, bias, *_ = plans[index]
                out = functional.linear(h, weight, bias)
            elif kind == "flatten":
                out = h.flatten(1)
            else:
                out = layer(h)
            saved.append((h, out))
            h = out
        if regression:
            diff = h - yb.unsqueeze(1)  # (B, 1)
            losses = diff.square().squeeze(1)
            # d loss_i / d z_i = 2 (z_i - y_i), per example.
            grad = diff.mul(2.0)
        else:
            log_probs = torch.log_softmax(h, dim=1)
            losses = functional.nll_loss(log_probs, yb, reduction="none")
            # d loss_i / d logits_i = softmax(z_i) - onehot(y_i), per example.
            grad = log_probs.exp_()
            grad.scatter_add_(1, yb.unsqueeze(1), minus_one.expand(yb.shape[0], 1))
        sq_norms: Tensor | None = None
        kept: list[tuple[_LinearPlan, Tensor, Tensor]] = []  # (plan, dz, input)
        for index in range(len(layers) - 1, first_linear - 1, -1):
            kind, _, layer = layers[index]
            inp, out = saved[index]
            if kind == "linear":
                plan = plans[index]
                _, weight, _, _, _, has_weight, has_bias = plan
                if has_weight or has_bias:
                    # ||dz_i h_i^T||_F^2 = ||dz_i||^2 ||h_i||^2, +||dz_i||^2 (bias)
                    dz_sq = torch.linalg.vector_norm(grad, dim=1, dtype=f64).square_()
                    if has_weight:
                        h_sq = torch.linalg.vector_norm(inp, dim=1, dtype=f64).square_()
                        term = h_sq.add_(1.0) if has_bias else h_sq
                        if sq_norms is None:
                            sq_norms = term.mul_(dz_sq)
                        else:
                            sq_norms.addcmul_(dz_sq, term)
                    elif sq_norms is None:
                        sq_norms = dz_sq
                    else:
                        sq_norms.add_(dz_sq)
                kept.append((plan, grad, inp))
                if index > first_linear:
                    grad = grad.mm(weight)
            elif kind == "flatten":
                grad = grad.view(inp.shape)
            else:
                grad = _activation_grad(layer, inp, out, grad)
        if sq_norms is None:
            sq_norms = torch.zeros(xb.shape[0], dtype=f64)
        factors, all_kept = _clip_factors(sq_norms, clip_norm)
        scale = factors.to(torch.float32).unsqueeze(1)
        keep = None if all_kept else (factors > 0).unsqueeze(1)
        for (_, _, _, weight_slot, bias_slot, _, _), dz, inp in kept:
            scaled = dz * scale
            h_in = inp
            if keep is not None:
                # A dropped example (factor 0) must not bring inf * 0 = nan.
                scaled = torch.where(keep, scaled, 0.0)
                h_in = torch.where(keep, inp, 0.0)
            torch.mm(scaled.t(), h_in, out=weight_slot)
            if bias_slot is not None:
                torch.sum(scaled, dim=0, out=bias_slot)
        return h, losses, sq_norms, factors

    return clipped_sum


def _general_clipped_sum(
    module: nn.Module,
    loss_fn: LossFn,
    names: Sequence[str],
    grad_flat: Tensor,
    clip_norm: float,
) -> _ClippedSumFn:
    """Clipped per-example gradient sum of any model, through ``vmap``.

    Each trainable parameter is expanded (stride 0, no copy) to one copy per
    example and made a leaf; ``vmap`` runs the forward pass and ``loss_fn``
    of each example alone (a batch of one) with its own copy; one backward
    pass of the summed losses gives each copy's gradient, which is exactly
    that example's gradient (example ``i``'s loss depends on copy ``i``
    alone). The same values as ``vmap(grad(...))``, without
    ``torch.func.grad``'s import of ``torch._dynamo``. Norms are float64;
    the clipped sum is one vector-matrix product per parameter.
    """
    params = dict(module.named_parameters())
    slots = _slots(params, grad_flat)

    def one(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        out = functional_call(module, p, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0)), out.squeeze(0)

    per_example = vmap(one)

    def clipped_sum(xb: Tensor, yb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        batch = xb.shape[0]
        leaves = {
            n: p.detach().unsqueeze(0).expand(batch, *p.shape)
            for n, p in params.items()
        }
        for n in names:
            leaves[n].requires_grad_(True)
        with torch.enable_grad():
            losses, out = per_example(leaves, xb, yb)
            grads = torch.autograd.grad(
                losses.sum(), [leaves[n] for n in names], allow_unused=True
            )
        rows: dict[str, tuple[Tensor, list[int]]] = {}
        sq_norms = torch.zeros(batch, dtype=torch.float64)
        for n, g in zip(names, grads, strict=True):
            if g is None:
                continue
            rows[n] = _as_rows(g)
            norms = torch.linalg.vector_norm(rows[n][0], dim=1, dtype=torch.float64)
            sq_norms += norms.square_()
        factors, all_kept = _clip_factors(sq_norms, clip_norm)
        weights = factors.to(torch.float32)
        for n, slot in slots.items():
            if n not in rows:
                slot.zero_()
                continue
            g2, dims = rows[n]
            if not all_kept:
                g2 = torch.where((factors > 0).unsqueeze(1), g2, 0.0)
            summed = (weights @ g2).view([slot.shape[d - 1] for d in dims])
            slot.copy_(summed.permute(_inverse(dims)))
        return out.detach(), losses.detach(), sq_norms, factors

    return clipped_sum


def _as_rows(grad: Tensor) -> tuple[Tensor, list[int]]:
    """Per-example gradients ``(B, ...)`` as ``(B, size)`` rows, without a copy.

    Autograd may return a weight's per-example gradients transposed (strides
    of ``(B, in, out)`` for shape ``(B, out, in)``); the trailing dimensions
    are reordered by decreasing stride first, so that the reshape is a view
    of a dense tensor. Returns the rows and that order (1-based dimensions).
    """
    dims = sorted(range(1, grad.ndim), key=lambda d: grad.stride(d), reverse=True)
    return grad.permute(0, *dims).reshape(grad.shape[0], -1), dims


def _inverse(dims: Sequence[int]) -> list[int]:
    """The permutation undoing ``permute(*(d - 1 for d in dims))``."""
    inverse = [0] * len(dims)
    for position, dim in enumerate(dims):
        inverse[dim - 1] = position
    return inverse


def _slots(params: dict[str, nn.Parameter], grad_flat: Tensor) -> dict[str, Tensor]:
    """Views of ``grad_flat`` shaped as each parameter, in storage order."""
    slots: dict[str, Tensor] = {}
    offset = 0
    for name, p in params.items():
        slots[name] = grad_flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return slots


def _run_or_refuse(
    module: nn.Module,
    loss_fn: LossFn,
    clipped_sum: _ClippedSumFn,
    xb: Tensor,
    yb: Tensor,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``clipped_sum(xb, yb)``, a vmap failure turned into a ConfigError."""
    try:
        return clipped_sum(xb, yb)
    except Exception as err:
        try:  # the same forward pass and loss without vmap
            with torch.enable_grad():
                loss_fn(module(xb[:1]), yb[:1])
        except Exception:
            raise err from None  # not vmap's fault: the data or the model
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        with _layer_trace(module) as entered:
            try:
                vmap(lambda xi: module(xi.unsqueeze(0)))(xb)
            except Exception:
                pass
            else:
                entered.clear()
        if entered:
            name = entered[-1]
            layer = module.get_submodule(name) if name else module
            what = (
                f"torch.func.vmap cannot compute per-example gradients through "
                f"layer {name or '(root)'!r} ({type(layer).__name__}) ({reason})"
            )
        else:
            what = (
                "torch.func.vmap cannot compute per-example gradients of the "
                f"loss ({reason})"
            )
        raise _refusal(module, [what]) from err


def _static_problems(module: nn.Module) -> list[str]:
    problems: list[str] = []
    for name, sub in module.named_modules():
        where = f"layer {name or '(root)'!r} ({type(sub).__name__})"
        if isinstance(sub, _BATCH_MIXING_LAYERS):
            problems.append(
                f"{where} normalises with statistics of the whole batch, so one "
                "example's gradient depends on the others and clipping it bounds "
                "nothing (use GroupNorm or LayerNorm)"
            )
        if isinstance(sub, _RANDOM_LAYERS):
            problems.append(
                f"{where} draws random numbers in training, which per-example "
                "gradients cannot replay (remove it, or use eval-mode behaviour)"
            )
        buffers = [b for b, _ in sub.named_buffers(recurse=False)]
        if buffers and not isinstance(sub, _BATCH_MIXING_LAYERS):
            problems.append(
                f"{where} has buffers {buffers}, which are not parameters: they "
                "would be updated from the data without noise (remove them)"
            )
    return problems


def _problems_of_fresh(model: TorchModel) -> tuple[list[str], nn.Module | None]:
    """Static problems of a freshly built module (when TorchModel refuses it)."""
    try:
        with torch.random.fork_rng(devices=[]):
            module = model._module_fn()
    except Exception:
        return [], None
    if not isinstance(module, nn.Module):
        return [], None
    return _static_problems(module), module


def _refusal(module: nn.Module, problems: list[str]) -> ConfigError:
    return ConfigError(
        f"module {type(module).__name__} cannot be trained with record-level "
        "DP-SGD (per-example gradients): " + "; ".join(problems) + "."
    )


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
