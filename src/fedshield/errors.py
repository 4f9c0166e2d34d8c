"""The fedshield exception tree.

Every error fedshield raises on purpose derives from :class:`FedShieldError`
and carries an ``exit_code`` that the command line uses as its process exit
status. The codes are grouped by area (see the README's exit code table):

====  ==========================================================
code  meaning
====  ==========================================================
0     success
1     unexpected internal error (a bug: please report it)
2     command-line usage error
10    configuration invalid (:class:`ConfigError`); the user's own
      data files are malformed (:class:`DataFileError`)
11    configuration file missing or unreadable (:class:`ConfigFileError`)
12    data set not installed or unreadable (:class:`DataUnavailableError`)
13    partition cannot be built as asked (:class:`PartitionError`)
14    checkpoint missing, corrupt or from another run (:class:`CheckpointError`)
15    run folder cannot be written (:class:`RunDirectoryError`)
20    privacy budget exhausted (:class:`PrivacyBudgetExceeded`)
30    a round could not complete (:class:`RoundFailedError`)
31    protocol violation (:class:`ProtocolError`)
40    transport failure (:class:`TransportError`)
====  ==========================================================
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ClientError",
    "ConfigError",
    "ConfigFileError",
    "DataFileError",
    "DataUnavailableError",
    "FedShieldError",
    "InvalidUpdateError",
    "PartitionError",
    "PrivacyBudgetExceeded",
    "ProtocolError",
    "RoundFailedError",
    "RunDirectoryError",
    "TransportError",
    "UnsupportedEventError",
]


class FedShieldError(Exception):
    """Base class of every error fedshield raises deliberately."""

    exit_code: int = 1


class ConfigError(FedShieldError, ValueError):
    """Raised when a configuration value or combination is invalid.

    Raised before round 1: nothing has been trained or written when it is.
    """

    exit_code = 10


class ConfigFileError(ConfigError):
    """Raised when a configuration file is missing, unreadable or not TOML."""

    exit_code = 11


class DataFileError(ConfigError):
    """Raised when the user's own data files are missing or malformed.

    The message names the file and, where it applies, the column, the row
    and the offending value. Raised while loading, before any training.
    """

    exit_code = 10


class DataUnavailableError(FedShieldError):
    """Raised when a data set is not installed or cannot be read.

    The message says how to install it; fedshield never downloads data.
    """

    exit_code = 12


class PartitionError(FedShieldError, ValueError):
    """Raised when a partition cannot satisfy its constraints (``min_samples``)."""

    exit_code = 13


class CheckpointError(FedShieldError):
    """Raised when a checkpoint is missing, corrupt, or belongs to another run."""

    exit_code = 14


class RunDirectoryError(FedShieldError):
    """Raised when the run folder or one of its files cannot be written."""

    exit_code = 15


class InvalidUpdateError(FedShieldError, ValueError):
    """Raised when a client update is malformed (NaN/Inf, wrong shape or dtype).

    The round loop catches it, logs the client as rejected and goes on.
    """

    exit_code = 31


class ClientError(FedShieldError):
    """Raised (or recorded) when a client fails during a protocol stage.

    Parameters
    ----------
    client_id
        The client that failed.
    stage
        The protocol stage it was running (``"fit"``, ``"evaluate"``, ...).
    message
        What went wrong; the original exception is chained as ``__cause__``.
    """

    exit_code = 30

    def __init__(self, message: str, *, client_id: str, stage: str) -> None:
        super().__init__(f"client {client_id!r} failed in stage {stage!r}: {message}")
        self.client_id = client_id
        self.stage = stage


class RoundFailedError(FedShieldError):
    """Raised when fewer clients than ``min_clients`` complete a round.

    Also when the server step fails (non-finite parameters). ``state`` is
    then the state to keep: the old parameters with what the strategy
    recorded of the round's release (its privacy ledger), or None.
    """

    exit_code = 30

    def __init__(self, message: str, state: object | None = None) -> None:
        super().__init__(message)
        self.state = state


class ProtocolError(FedShieldError):
    """Raised when a protocol message is malformed, replayed or out of stage."""

    exit_code = 31


class PrivacyBudgetExceeded(FedShieldError):
    """Raised instead of a release that would exceed the privacy budget."""

    exit_code = 20


class UnsupportedEventError(FedShieldError, ValueError):
    """Raised when an accountant is given a DP event it cannot account."""

    exit_code = 10


class TransportError(FedShieldError):
    """Raised when a network transport fails."""

    exit_code = 40
