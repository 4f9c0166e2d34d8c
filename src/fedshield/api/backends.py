"""Choosing and building the backend a configuration asks for."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from fedshield.errors import ConfigError
from fedshield.simulation import (
    Backend,
    ProcessPoolBackend,
    SequentialBackend,
    VectorisedBackend,
)
from fedshield.simulation.backends import BACKENDS

if TYPE_CHECKING:
    from fedshield.models import TorchModel

__all__ = ["BACKENDS", "make_backend", "resolve_backend"]

logger = logging.getLogger(__name__)


# Reasons already given for auto not picking vectorised (once per process).
_WARNED: set[str] = set()
_WARNED_LOCK = threading.Lock()


def _warn_once(reason: str) -> None:
    """Log at WARNING why ``auto`` falls back, once per distinct reason."""
    with _WARNED_LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    logger.warning(
        "run.backend = 'auto' uses 'sequential', not 'vectorised': %s", reason
    )


def resolve_backend(
    name: str,
    model: TorchModel,
    *,
    privacy_mode: str = "none",
    timeout_s: float | None = None,
) -> str:
    """The concrete backend for ``name`` (``auto``: vectorised if it can be).

    Record-level DP-SGD trains each client on its own (per-record clipping
    and noise), so ``auto`` is ``sequential`` then. So is a DP run with a
    stage deadline (``timeout_s``): the vectorised backend times a chunk of
    clients together, so one client's data would decide whether others
    time out, a coupling the DP analysis does not cover. When ``auto``
    cannot use ``vectorised`` because of the model (a layer vmap cannot
    batch, Dropout, BatchNorm) or the deadline, it says why in a WARNING
    log record, once per distinct reason in a process (a sweep of runs
    does not repeat it).

    Raises
    ------
    ConfigError
        If ``vectorised`` is asked for a model it cannot train (the message
        names the layer and the backend that will work), with record-level
        DP-SGD, or with a deadline under DP.
    """
    forced = _forced_by_privacy(name, privacy_mode, timeout_s)
    if forced is not None:
        return forced
    if name not in ("auto", "vectorised"):
        return name
    return _vectorised_if_possible(name, model)


def _forced_by_privacy(
    name: str, privacy_mode: str, timeout_s: float | None
) -> str | None:
    """``sequential`` where DP rules out ``vectorised`` for ``auto``, else None.

    Raises ConfigError where ``vectorised`` itself was asked for.
    """
    if privacy_mode != "none" and timeout_s is not None:
        if name == "vectorised":
            raise ConfigError(
                "run.backend = 'vectorised' with run.timeout_s under [privacy]: "
                "it times a chunk of clients together, so one client's training "
                "time would decide whether others time out; use backend = "
                "'auto', 'sequential', 'process' or 'ray', or drop timeout_s"
            )
        if name == "auto":
            _warn_once(
                "a DP run with run.timeout_s (the vectorised backend times a "
                "chunk of clients together)"
            )
            return "sequential"
    if privacy_mode == "record":
        if name == "vectorised":
            raise ConfigError(
                "run.backend = 'vectorised' cannot run record-level DP-SGD "
                "(privacy.mode = \"record\"); use backend = 'auto', 'sequential', "
                "'process' or 'ray'"
            )
        if name == "auto":
            return "sequential"
    return None


def _vectorised_if_possible(name: str, model: TorchModel) -> str:
    """``vectorised`` if ``model`` can be vmapped; else ``auto`` falls back.

    ``name`` is ``auto`` or ``vectorised``; the latter raises ConfigError
    (naming the layer) instead of falling back.
    """
    from fedshield.models import check_vectorisable

    try:
        check_vectorisable(model)
    except ConfigError as err:
        if name == "vectorised":
            raise ConfigError(f"run.backend = 'vectorised': {err}") from None
        _warn_once(str(err))
        return "sequential"
    return "vectorised"


def make_backend(
    name: str,
    *,
    workers: int | None = None,
    ray_address: str | None = None,
    torch_threads: int = 1,
) -> Backend:
    """Build a concrete backend (see :func:`resolve_backend`).

    Raises
    ------
    ConfigError
        For ``ray`` when Ray is not installed (names the extra to install).
    """
    if name == "sequential":
        return SequentialBackend()
    if name == "vectorised":
        return VectorisedBackend()
    if name == "process":
        return ProcessPoolBackend(workers, torch_threads=torch_threads)
    if name == "ray":
        try:
            from fedshield.simulation.backends.ray import RayBackend

            return RayBackend(
                ray_address, num_workers=workers, torch_threads=torch_threads
            )
        except ImportError as err:  # Ray not installed: name the extra
            raise ConfigError(f"run.backend = 'ray': {err}") from None
    raise ConfigError(BACKENDS.unknown(name))
