"""Data sets, the user's own data, client partitions and partition summaries.

Loaders read only data already on the machine (fedshield never downloads):
the bundled sets (:func:`load_dataset`) and the user's own CSV, Parquet, NPZ,
image folders or Python factory (:func:`load_user_data`). Partitioners split
row indices among simulated clients (IID, Dirichlet and shard label skew,
quantity skew, natural groups); :func:`preprocess_per_client` imputes and
standardises numeric columns with each client's own statistics. This layer
imports numpy, and scikit-learn, Pillow and pyarrow only inside the loaders
that need them; never torch.
"""

from fedshield.data.datasets import DATASETS, TASKS, Dataset, load_dataset, split_test
from fedshield.data.partition import PARTITIONS, natural_client_names, partition
from fedshield.data.preprocess import preprocess_per_client
from fedshield.data.summary import PartitionSummary, summarize_partition
from fedshield.data.user import USER_DATA_KINDS, UserData, UserDataSpec, load_user_data

__all__ = [
    "DATASETS",
    "PARTITIONS",
    "TASKS",
    "USER_DATA_KINDS",
    "Dataset",
    "PartitionSummary",
    "UserData",
    "UserDataSpec",
    "load_dataset",
    "load_user_data",
    "natural_client_names",
    "partition",
    "preprocess_per_client",
    "split_test",
    "summarize_partition",
]
