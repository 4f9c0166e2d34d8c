"""The server's state between rounds: immutable and serialisable.

A checkpoint is exactly a serialised :class:`ServerState`, so resuming a run
is loading one and continuing the loop.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedshield.core.params import Params, ParamSpec
from fedshield.errors import CheckpointError

__all__ = ["ServerState"]

_FORMAT = "fedshield.ServerState/1"


@dataclass(frozen=True, slots=True)
class ServerState:
    """Everything the server carries from one round to the next.

    Parameters
    ----------
    round_idx
        Number of rounds completed (the next round to run, 0-based).
    params
        Global model parameters.
    optimizer_state
        Server-optimizer buffers (momentum, second moments), by name.
    metadata
        Small JSON-serialisable values (run fingerprint, accountant state, ...).
    """

    round_idx: int
    params: Params
    optimizer_state: Mapping[str, Params] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.round_idx < 0:
            raise ValueError(f"round_idx must be >= 0; got {self.round_idx}")

    def evolve(self, **changes: Any) -> ServerState:
        """Return a copy with ``changes`` applied (the state itself never changes)."""
        return replace(self, **changes)

    def to_bytes(self) -> bytes:
        """Serialise to an ``.npz`` archive (no pickle: safe to load)."""
        header = {
            "format": _FORMAT,
            "round_idx": self.round_idx,
            "spec": self.params.spec.to_json(),
            "optimizer_specs": {
                k: v.spec.to_json() for k, v in self.optimizer_state.items()
            },
            "metadata": self.metadata,
        }
        arrays: dict[str, np.ndarray] = {
            "header": np.frombuffer(
                json.dumps(_tag_floats(header), allow_nan=False).encode("utf-8"),
                dtype=np.uint8,
            ),
            "params": np.asarray(self.params.flat),
        }
        for i, key in enumerate(sorted(self.optimizer_state)):
            arrays[f"opt_{i}"] = np.asarray(self.optimizer_state[key].flat)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ServerState:
        """Load a state written by :meth:`to_bytes`.

        Raises
        ------
        CheckpointError
            If the data is not a fedshield server state or is corrupt.
        """
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = _untag_floats(
                    json.loads(
                        bytes(archive["header"]).decode("utf-8"),
                        parse_constant=_untagged_constant,
                    )
                )
                if header.get("format") != _FORMAT:
                    found = header.get("format")
                    raise CheckpointError(
                        f"not a fedshield server state (format {found!r})"
                    )
                params = Params.from_flat(
                    archive["params"], ParamSpec.from_json(header["spec"])
                )
                opt: dict[str, Params] = {}
                for i, key in enumerate(sorted(header["optimizer_specs"])):
                    opt[key] = Params.from_flat(
                        archive[f"opt_{i}"],
                        ParamSpec.from_json(header["optimizer_specs"][key]),
                    )
            metadata = header["metadata"]
            if not isinstance(metadata, dict):
                raise TypeError(f"metadata must be an object; got {metadata!r}")
            # Built inside the ``try``: a missing or invalid ``round_idx`` is
            # corruption too, not a KeyError or ValueError for the caller.
            state = cls(
                round_idx=int(header["round_idx"]),
                params=params,
                optimizer_state=opt,
                metadata=metadata,
            )
        except CheckpointError:
            raise
        except Exception as err:  # corrupt zip, missing key, bad JSON, ...
            raise CheckpointError(f"server state is corrupt: {err}") from err
        return state


# The header is strict JSON (no NaN or Infinity, which strict parsers
# refuse); a non-finite number in the metadata (an unbounded epsilon, say)
# is written as {"__float__": "inf" | "-inf" | "nan"} and read back as the float.
_FLOAT_TAG = "__float__"


def _tag_floats(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: repr(value)}
    if isinstance(value, Mapping):
        return {k: _tag_floats(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_tag_floats(v) for v in value]
    return value


def _untag_floats(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _FLOAT_TAG in value:
            return float(value[_FLOAT_TAG])
        return {k: _untag_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_untag_floats(v) for v in value]
    return value


def _untagged_constant(name: str) -> float:
    # Checkpoints written before the header was strict held bare Infinity.
    return float(name.replace("Infinity", "inf"))
