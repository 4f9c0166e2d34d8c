"""The round loop, protocol stages, backends, run folders and checkpoints."""

from fedshield.simulation.backends import (
    Backend,
    ClientFn,
    ProcessPoolBackend,
    SequentialBackend,
    VectorisedBackend,
    run_client_stage,
)
from fedshield.simulation.protocol import (
    ClientFailure,
    ClientSession,
    EvaluateIns,
    FailureKind,
    FitIns,
    FitReceipt,
    HoldUpdate,
    RoundProtocol,
    StageReply,
    StageRequest,
    execute_stage,
)
from fedshield.simulation.rounds import (
    FitRound,
    RoundOptions,
    RoundResult,
    StageObserver,
    StageView,
)
from fedshield.simulation.rundir import RunDirectory
from fedshield.simulation.runner import (
    EvaluateFn,
    RoundCallback,
    drive_round,
    run_round,
    run_rounds,
)
from fedshield.simulation.state_store import (
    ClientStateStore,
    DiskStateStore,
    StateStore,
)

__all__ = [
    "Backend",
    "ClientFailure",
    "ClientSession",
    "ClientStateStore",
    "DiskStateStore",
    "ClientFn",
    "EvaluateFn",
    "EvaluateIns",
    "FailureKind",
    "FitIns",
    "FitReceipt",
    "FitRound",
    "HoldUpdate",
    "RoundCallback",
    "RoundOptions",
    "RoundProtocol",
    "RoundResult",
    "RunDirectory",
    "ProcessPoolBackend",
    "SequentialBackend",
    "VectorisedBackend",
    "StageObserver",
    "StageReply",
    "StageView",
    "StageRequest",
    "StateStore",
    "drive_round",
    "execute_stage",
    "run_client_stage",
    "run_round",
    "run_rounds",
]
