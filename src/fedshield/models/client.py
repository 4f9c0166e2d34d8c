"""A federated client that trains a :class:`TorchModel` on its own data."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedshield.core import ClientId, ClientUpdate, EvalConfig, FitConfig, Params
from fedshield.core.client import (
    CLIENT_CONTROL,
    CONTROL_DELTA,
    SCAFFOLD,
    SERVER_CONTROL,
)
from fedshield.errors import ConfigError
from fedshield.models.torch_model import TorchModel
from fedshield.privacy.local import LOCAL_NUM_EXAMPLES, privatize, wants_local_dp
from fedshield.privacy.records import (
    DP_SGD_CLIP,
    DP_SGD_SECURE,
    DP_SGD_SIGMA,
    wants_dp_sgd,
)

__all__ = ["TorchClient", "build_update", "local_correction"]


class TorchClient:
    """A :class:`~fedshield.core.Client` holding local data and a shared model.

    Parameters
    ----------
    client_id
        The client's identifier.
    model
        The model adapter; clients in one process may share it (it holds no
        parameters), but not across threads.
    x_train, y_train
        Local training inputs and integer labels (real targets when the
        model's ``task`` is ``"regression"``). Converted once to
        C-contiguous ``float32`` / ``int64`` (``float32`` targets for
        regression) so every round uses them without copying. May be empty;
        :meth:`fit` then raises.
    x_test, y_test
        Optional local test split (both or neither).

    Raises
    ------
    ConfigError
        If only one of ``x_test`` and ``y_test`` is given, or inputs and labels
        have different numbers of rows.

    Examples
    --------
    >>> import functools, numpy as np
    >>> from fedshield.core import FitConfig
    >>> from fedshield.models import TorchModel, build_module
    >>> model = TorchModel(functools.partial(
    ...     build_module, "logistic", input_shape=(2,), num_classes=2))
    >>> x = np.array([[0.0, 1.0], [1.0, 0.0]]); y = np.array([0, 1])
    >>> client = TorchClient("a", model, x_train=x, y_train=y)
    >>> update = client.fit(model.init_params(0), FitConfig(round_idx=0),
    ...                     np.random.default_rng(0))
    >>> update.num_examples, sorted(update.metrics)
    (2, ['accuracy', 'loss'])
    """

    __slots__ = (
        "_model",
        "_x_test",
        "_x_train",
        "_y_test",
        "_y_train",
        "client_id",
        "trust",
    )

    def __init__(
        self,
        client_id: ClientId,
        model: TorchModel,
        *,
        x_train: np.ndarray,
        y_train: np.ndarray,
        x_test: np.ndarray | None = None,
        y_test: np.ndarray | None = None,
    ) -> None:
        if (x_test is None) != (y_test is None):
            raise ConfigError(
                f"`x_test` and `y_test` of client {client_id!r} must be given "
                "together or not at all."
            )
        self.client_id = client_id
        # What the client checks a secure round's server against (a
        # simulation.secure_client.ClientTrust), attached by whoever runs it.
        self.trust: Any = None
        self._model = model
        regression = getattr(model, "task", "classification") == "regression"
        self._x_train = _as_inputs(x_train)
        self._y_train = _as_labels(y_train, regression=regression)
        self._x_test = None if x_test is None else _as_inputs(x_test)
        self._y_test = (
            None if y_test is None else _as_labels(y_test, regression=regression)
        )
        problems = [
            f"`x_{split}` has {len(x)} rows but `y_{split}` has {len(y)}"
            for split, x, y in (
                ("train", self._x_train, self._y_train),
                ("test", self._x_test, self._y_test),
            )
            if x is not None and y is not None and len(x) != len(y)
        ]
        if problems:
            raise ConfigError(
                f"data of client {client_id!r} is inconsistent: "
                + "; ".join(problems)
                + "."
            )

    @property
    def model(self) -> TorchModel:
        """The model adapter this client trains (shared, not copied)."""
        return self._model

    @property
    def train_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The local training inputs and labels, as :meth:`fit` uses them.

        The arrays themselves, not copies: callers must not write to them.
        """
        return self._x_train, self._y_train

    @property
    def nbytes(self) -> int:
        """Bytes of local data the client holds (train and test)."""
        arrays = (self._x_train, self._y_train, self._x_test, self._y_test)
        return sum(a.nbytes for a in arrays if a is not None)

    @property
    def num_train_examples(self) -> int:
        """Number of local training examples."""
        return int(self._y_train.shape[0])

    def fit(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> ClientUpdate:
        """Train locally from ``params`` and return the update.

        Parameters
        ----------
        params
            The global parameters.
        config
            Local training settings (see :meth:`TorchModel.train`).
        rng
            Source of all randomness of this round's local training.

        Returns
        -------
        ClientUpdate
            ``delta = new - params``, ``num_examples`` = local training set
            size, and the training ``"loss"`` and ``"accuracy"`` (for
            regression ``"loss"``, ``"rmse"`` and ``"mae"``); with
            record-level DP-SGD none of these, only what the DP step spent;
            with local DP the noised delta alone (see :func:`build_update`).

        Raises
        ------
        ValueError
            If the client has no training examples.
        """
        if self.num_train_examples == 0:
            raise ValueError(
                f"client {self.client_id!r} has no training examples; it cannot fit"
            )
        if wants_dp_sgd(config.options):
            new, metrics = self._fit_dp_sgd(params, config, rng)
        else:
            new, metrics = self._model.train(
                params,
                self._x_train,
                self._y_train,
                config,
                rng=rng,
                correction=local_correction(params, config),
            )
        return build_update(
            self.client_id,
            params,
            new,
            metrics,
            num_examples=self.num_train_examples,
            config=config,
        )

    def _fit_dp_sgd(
        self, params: Params, config: FitConfig, rng: np.random.Generator
    ) -> tuple[Params, dict[str, float]]:
        """Record-level DP-SGD on the local data, as the round's options ask."""
        from fedshield.models.dp_sgd import DpSgdConfig, train_dp_sgd
        from fedshield.privacy.noise import make_noise

        options = config.options
        secure = bool(options.get(DP_SGD_SECURE, False))
        new, metrics, event = train_dp_sgd(
            self._model,
            params,
            self._x_train,
            self._y_train,
            config,
            rng=rng,
            dp=DpSgdConfig(
                clip_norm=float(options[DP_SGD_CLIP]),
                noise_multiplier=float(options[DP_SGD_SIGMA]),
            ),
            noise=make_noise(secure, rng),
        )
        # The client's own record of what it spent this round (the server
        # accounts the same event from the client's size, which record mode
        # treats as public). The training metrics (loss and accuracy, or
        # loss, RMSE and MAE for regression) are all left out: they are
        # computed from the records without noise, so they would reach the
        # server outside the records' guarantee.
        del metrics
        return new, {
            "dp_sgd/sampling_rate": float(event.sampling_rate or 0.0),
            "dp_sgd/steps": float(event.count),
        }

    def evaluate(self, params: Params, config: EvalConfig) -> dict[str, float]:
        """Evaluate ``params`` on the local test split.

        Parameters
        ----------
        params
            Parameters to evaluate.
        config
            ``batch_size`` is used for the forward passes.

        Returns
        -------
        dict
            The metrics of :meth:`TorchModel.evaluate`; ``{"num_examples":
            0.0}`` when the client has no test split.
        """
        if self._x_test is None or self._y_test is None:
            return {"num_examples": 0.0}
        return self._model.evaluate(
            params, self._x_test, self._y_test, batch_size=config.batch_size
        )

    def __repr__(self) -> str:
        n_test = 0 if self._y_test is None else int(self._y_test.shape[0])
        return (
            f"TorchClient({self.client_id!r}, train={self.num_train_examples}, "
            f"test={n_test})"
        )


def _as_inputs(x: np.ndarray) -> np.ndarray:
    return np.require(x, dtype=np.float32, requirements=["C", "W"])


def _as_labels(y: np.ndarray, *, regression: bool = False) -> np.ndarray:
    labels = np.asarray(y)
    kind = labels.dtype.kind
    if regression:
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels.reshape(-1)
        if kind in "iuf":
            return np.require(labels, dtype=np.float32, requirements=["C", "W"])
        return labels  # TorchModel rejects it on first use, naming the dtype
    if kind in "iu" or (kind == "f" and bool(np.all(np.mod(labels, 1) == 0))):
        return np.require(labels, dtype=np.int64, requirements=["C", "W"])
    return labels  # TorchModel rejects it on first use, naming the dtype


def _controls(params: Params, config: FitConfig) -> tuple[Params, Params]:
    try:
        c = config.tensors[SERVER_CONTROL]
    except KeyError:
        raise ConfigError(
            f"SCAFFOLD needs the server control variate in "
            f"FitConfig.tensors[{SERVER_CONTROL!r}]"
        ) from None
    c_i = config.state.get(CLIENT_CONTROL)
    if c_i is None:  # a client's first round: c_i = 0
        c_i = Params.zeros(params.spec)
    return c, c_i


def local_correction(params: Params, config: FitConfig) -> Params | None:
    """SCAFFOLD's gradient correction ``c - c_i``; ``None`` for other strategies.

    Parameters
    ----------
    params
        The global parameters (for the layout of a first-round ``c_i = 0``).
    config
        This client's fit config (``options["scaffold"]``, ``tensors``,
        ``state``).

    Returns
    -------
    Params or None
        The vector to add to every local gradient.

    Raises
    ------
    ConfigError
        If SCAFFOLD is asked for but the server control variate is missing.
    """
    if not config.options.get(SCAFFOLD):
        return None
    c, c_i = _controls(params, config)
    return c - c_i


def build_update(
    client_id: str,
    params: Params,
    new: Params,
    metrics: dict[str, float],
    *,
    num_examples: int,
    config: FitConfig,
) -> ClientUpdate:
    """The update a client sends after training from ``params`` to ``new``.

    When the round asks for local differential privacy (its options hold
    :data:`fedshield.privacy.local.LOCAL_CLIP`), ``delta`` is clipped and
    noised here (:func:`fedshield.privacy.local.privatize`, noise from the
    OS-keyed keystream, never from the seed) and it is all that leaves the
    client: the update reports
    :data:`~fedshield.privacy.local.LOCAL_NUM_EXAMPLES` examples instead of
    ``num_examples`` and no ``metrics`` (the count, the training loss and
    accuracy and whether the update was clipped would reach the server
    un-noised); the strategy weights local-DP updates equally.

    When the round asks for record-level DP-SGD and the trained model is
    not finite (the noised steps diverged), the update is all zeros: a
    function of the noised steps alone, so it costs nothing more, and the
    server never sees (and rejects) a NaN or infinite update, whose
    rejection would tell whether training diverged. Local DP treats a
    non-finite update the same way (:func:`~fedshield.privacy.local.privatize`).

    For SCAFFOLD (Karimireddy et al., ICML 2020, Algorithm 1, option II) it
    also computes the new client control variate
    ``c_i+ = c_i - c + (x - y_i) / (K lr)``, with ``K`` the number of local
    steps, returns ``c_i+ - c_i`` in ``extras`` and ``c_i+`` as the client's
    new ``state``. With momentum the option II estimate is approximate (it
    assumes plain SGD steps).
    """
    delta = new - params
    reported = num_examples
    if wants_dp_sgd(config.options) and not delta.is_finite():
        delta = Params.zeros(delta.spec)  # post-processing of the noised steps
    if wants_local_dp(config.options):
        # Local DP: only the clipped and noised update leaves the client.
        delta = privatize(delta, config.options)
        reported, metrics = LOCAL_NUM_EXAMPLES, {}
    if not config.options.get(SCAFFOLD):
        return ClientUpdate(
            client_id, delta=delta, num_examples=reported, metrics=metrics
        )
    c, c_i = _controls(params, config)
    steps = config.epochs * math.ceil(num_examples / config.batch_size)
    c_i_new = c_i - c - delta * (1.0 / (steps * config.lr))
    return ClientUpdate(
        client_id,
        delta=delta,
        num_examples=reported,
        metrics=metrics,
        extras={CONTROL_DELTA: c_i_new - c_i},
        state={CLIENT_CONTROL: c_i_new},
    )
