"""Per-client sizes and label counts of a partition, for reports and checks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedshield.errors import ConfigError

__all__ = ["PartitionSummary", "summarize_partition"]


@dataclass(frozen=True, slots=True, eq=False)
class PartitionSummary:
    """How many rows, and of which labels, each client holds.

    Parameters
    ----------
    method
        The partition method that produced it (see ``PARTITIONS``).
    num_classes
        Number of classes (columns of ``label_counts``).
    client_ids
        One id per client, in client order.
    num_samples
        Rows held by each client.
    label_counts
        ``int64`` array of shape ``(num_clients, num_classes)``; row ``k``
        counts client ``k``'s rows per label and sums to ``num_samples[k]``.

    Raises
    ------
    ConfigError
        If the fields disagree in length, shape or totals.

    Examples
    --------
    >>> import numpy as np
    >>> s = PartitionSummary("iid", 2, ("a", "b"), (2, 1), np.array([[1, 1], [0, 1]]))
    >>> PartitionSummary.from_json(s.to_json()) == s
    True
    >>> s.to_json()["clients"][1]
    {'client_id': 'b', 'num_samples': 1, 'label_counts': [0, 1]}
    """

    method: str
    num_classes: int
    client_ids: tuple[str, ...]
    num_samples: tuple[int, ...]
    label_counts: np.ndarray

    def __post_init__(self) -> None:
        counts = self.label_counts
        problems: list[str] = []
        if counts.shape != (len(self.client_ids), self.num_classes):
            problems.append(
                f"label_counts must have shape ({len(self.client_ids)}, "
                f"{self.num_classes}); got {counts.shape}"
            )
        elif counts.dtype != np.int64:
            problems.append(f"label_counts must be int64; got {counts.dtype}")
        elif counts.size and counts.min() < 0:
            problems.append("label_counts must be >= 0")
        elif counts.sum(axis=1).tolist() != list(self.num_samples):
            problems.append(
                f"label_counts rows sum to {counts.sum(axis=1).tolist()} but "
                f"num_samples is {list(self.num_samples)}"
            )
        if len(self.num_samples) != len(self.client_ids):
            problems.append(
                f"{len(self.num_samples)} num_samples for "
                f"{len(self.client_ids)} client_ids"
            )
        if len(set(self.client_ids)) != len(self.client_ids):
            problems.append("client_ids must be distinct")
        if problems:
            raise ConfigError("invalid PartitionSummary: " + "; ".join(problems))

    @property
    def num_clients(self) -> int:
        """Number of clients."""
        return len(self.client_ids)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartitionSummary):
            return NotImplemented
        return (
            self.method == other.method
            and self.num_classes == other.num_classes
            and self.client_ids == other.client_ids
            and self.num_samples == other.num_samples
            and np.array_equal(self.label_counts, other.label_counts)
        )

    __hash__ = None  # type: ignore[assignment]

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-ready dict of plain Python values.

        Returns
        -------
        dict
            ``{"method", "num_clients", "num_classes", "clients": [{"client_id",
            "num_samples", "label_counts": [...]}, ...]}``.
        """
        return {
            "method": self.method,
            "num_clients": self.num_clients,
            "num_classes": self.num_classes,
            "clients": [
                {
                    "client_id": cid,
                    "num_samples": size,
                    "label_counts": row,
                }
                for cid, size, row in zip(
                    self.client_ids,
                    self.num_samples,
                    self.label_counts.tolist(),
                    strict=True,
                )
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PartitionSummary:
        """Rebuild a summary from :meth:`to_json`'s output.

        Parameters
        ----------
        data
            A mapping as produced by :meth:`to_json` (e.g. after ``json.load``).

        Returns
        -------
        PartitionSummary
            The equal summary.

        Raises
        ------
        ConfigError
            If keys are missing or values are inconsistent.
        """
        try:
            clients = list(data["clients"])
            num_classes = int(data["num_classes"])
            summary = cls(
                method=str(data["method"]),
                num_classes=num_classes,
                client_ids=tuple(str(c["client_id"]) for c in clients),
                num_samples=tuple(int(c["num_samples"]) for c in clients),
                label_counts=np.array(
                    [list(c["label_counts"]) for c in clients], dtype=np.int64
                ).reshape(len(clients), num_classes),
            )
        except (KeyError, TypeError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"malformed PartitionSummary JSON: {err!r}") from err
        if int(data.get("num_clients", summary.num_clients)) != summary.num_clients:
            raise ConfigError(
                f"PartitionSummary JSON says num_clients={data['num_clients']} "
                f"but lists {summary.num_clients} clients"
            )
        return summary


def summarize_partition(
    parts: Sequence[np.ndarray],
    labels: np.ndarray,
    *,
    num_classes: int,
    client_ids: Sequence[str],
    method: str,
) -> PartitionSummary:
    """Count each client's rows per label.

    Parameters
    ----------
    parts
        One index array per client (as returned by ``partition``).
    labels
        Label of every row, values in ``0 .. num_classes-1``; or float
        regression targets, which are all counted in one bin (then
        ``num_classes`` must be 1).
    num_classes
        Number of classes (1 for regression).
    client_ids
        One id per client, in the order of ``parts``.
    method
        Name of the partition method, recorded in the summary.

    Returns
    -------
    PartitionSummary
        Sizes and per-label counts of each client.

    Raises
    ------
    ConfigError
        If ``client_ids`` and ``parts`` differ in length or a label is out of
        range.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.array([0, 1, 1, 2])
    >>> s = summarize_partition(
    ...     [np.array([0, 1]), np.array([2, 3])],
    ...     labels,
    ...     num_classes=3,
    ...     client_ids=["a", "b"],
    ...     method="iid",
    ... )
    >>> s.num_samples, s.label_counts.tolist()
    ((2, 2), [[1, 1, 0], [0, 1, 1]])

    Regression targets fill one bin:

    >>> summarize_partition(
    ...     [np.array([0]), np.array([1, 2])],
    ...     np.array([0.5, 2.0, -1.0]),
    ...     num_classes=1,
    ...     client_ids=["a", "b"],
    ...     method="iid",
    ... ).label_counts.tolist()
    [[1], [2]]
    """
    labels = np.asarray(labels)
    if len(client_ids) != len(parts):
        raise ConfigError(
            f"`client_ids` must have one id per part ({len(parts)}); "
            f"got {len(client_ids)}"
        )
    if np.issubdtype(labels.dtype, np.floating):
        if num_classes != 1:
            raise ConfigError(
                "`labels` are floats (regression targets); num_classes must be "
                f"1; got {num_classes}"
            )
        labels = np.zeros(labels.shape, dtype=np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ConfigError(
            f"`labels` must lie in 0..{num_classes - 1}; "
            f"got {labels.min()}..{labels.max()}"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for k, part in enumerate(parts):
        counts[k] = np.bincount(labels[np.asarray(part)], minlength=num_classes)
    return PartitionSummary(
        method=method,
        num_classes=num_classes,
        client_ids=tuple(client_ids),
        num_samples=tuple(len(p) for p in parts),
        label_counts=counts,
    )
