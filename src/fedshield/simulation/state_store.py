"""Where simulated clients keep their state between rounds.

Stateful algorithms (SCAFFOLD's client control variates) need each client to
remember something from the last round it took part in. A real client keeps
it on its own disk; simulated clients are built afresh every round, so the
simulation keeps their state here and hands it to them in
``FitConfig.state``. The store is saved with every checkpoint, so a resumed
run continues with exactly the state an uninterrupted one would have.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping

import numpy as np

from fedshield.core import ClientId, Params, ParamSpec
from fedshield.errors import CheckpointError

__all__ = ["ClientStateStore"]

_FORMAT = "fedshield.ClientStateStore/1"


class ClientStateStore:
    """In-memory store of each client's persistent tensors.

    Memory grows with the number of clients that have taken part times the
    size of their state (for SCAFFOLD, one model-sized vector per client).
    """

    def __init__(self) -> None:
        self._states: dict[ClientId, dict[str, Params]] = {}

    def get(self, client_id: ClientId) -> Mapping[str, Params]:
        """The client's state (empty before its first round)."""
        return self._states.get(client_id, {})

    def update(self, states: Mapping[ClientId, Mapping[str, Params]]) -> None:
        """Replace the state of each client in ``states``."""
        for client_id, state in states.items():
            self._states[client_id] = dict(state)

    def __len__(self) -> int:
        return len(self._states)

    def to_bytes(self) -> bytes:
        """Serialise (``.npz``, no pickle)."""
        index: list[list[object]] = []
        arrays: dict[str, np.ndarray] = {}
        for i, (client_id, state) in enumerate(sorted(self._states.items())):
            for j, (key, params) in enumerate(sorted(state.items())):
                name = f"a{i}_{j}"
                index.append([client_id, key, name, params.spec.to_json()])
                arrays[name] = np.asarray(params.flat)
        header = json.dumps({"format": _FORMAT, "index": index}).encode("utf-8")
        buffer = io.BytesIO()
        np.savez(buffer, header=np.frombuffer(header, dtype=np.uint8), **arrays)  # type: ignore[arg-type]
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> ClientStateStore:
        """Load a store written by :meth:`to_bytes`.

        Raises
        ------
        CheckpointError
            If the data is not a client state store or is corrupt.
        """
        store = cls()
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                header = json.loads(bytes(archive["header"]).decode("utf-8"))
                if header.get("format") != _FORMAT:
                    raise CheckpointError("not a fedshield client state store")
                for client_id, key, name, spec in header["index"]:
                    params = Params.from_flat(archive[name], ParamSpec.from_json(spec))
                    store._states.setdefault(str(client_id), {})[str(key)] = params
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"client state store is corrupt: {err}") from err
        return store
