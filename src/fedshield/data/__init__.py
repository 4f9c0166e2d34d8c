"""Data sets, client partitions and partition summaries.

Loaders read only data already on the machine (fedshield never downloads);
partitioners split row indices among simulated clients (IID, Dirichlet and
shard label skew, quantity skew, natural groups). This layer imports numpy,
and scikit-learn only inside the loaders that need it; never torch.
"""

from fedshield.data.datasets import DATASETS, Dataset, load_dataset, split_test
from fedshield.data.partition import PARTITIONS, natural_client_names, partition
from fedshield.data.summary import PartitionSummary, summarize_partition

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "Dataset",
    "PartitionSummary",
    "load_dataset",
    "natural_client_names",
    "partition",
    "split_test",
    "summarize_partition",
]
