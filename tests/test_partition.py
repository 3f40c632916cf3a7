import numpy as np
import pytest

from atoll.config import PartitionConfig
from atoll.data.partition import label_histogram, partition, split_local
from atoll.errors import DataError


def labels_of(n=3000, classes=3, seed=0):
    return np.random.default_rng(seed).integers(0, classes, size=n)


def check_cover(parts, n, minimum):
    joined = np.concatenate(parts)
    assert len(joined) == n and len(np.unique(joined)) == n, "disjoint and covering"
    assert min(len(p) for p in parts) >= minimum


@pytest.mark.parametrize("name", ["iid", "dirichlet", "shards", "quantity"])
def test_partitions_cover_disjointly(name):
    labels = labels_of()
    parts = partition(PartitionConfig(name=name), 20, labels, np.random.default_rng(1))
    check_cover(parts, len(labels), 4)


def skew(parts, labels):
    """Mean total-variation distance between client label distributions and the global one."""
    table = label_histogram(labels, parts, 3).astype(float)
    share = table / table.sum(1, keepdims=True)
    overall = np.bincount(labels, minlength=3) / len(labels)
    return float(np.abs(share - overall).sum(1).mean() / 2)


def test_dirichlet_skew_grows_as_alpha_shrinks():
    labels = labels_of()
    values = [
        skew(partition(PartitionConfig(name="dirichlet", alpha=a), 10, labels, np.random.default_rng(2)), labels) for a in (100.0, 1.0, 0.1)
    ]
    assert values[0] < 0.1 < values[1] < values[2]
    iid = partition(PartitionConfig(name="iid"), 10, labels, np.random.default_rng(2))
    assert skew(iid, labels) < 0.08


def test_shards_limit_labels_per_client():
    labels = np.sort(labels_of(1200))
    parts = partition(PartitionConfig(name="shards", shards_per_client=1), 6, labels, np.random.default_rng(0))
    # with one label-sorted shard each, a client sees at most 2 labels (a shard may straddle a boundary)
    assert max(len(np.unique(labels[p])) for p in parts) <= 2
    assert min(len(np.unique(labels[p])) for p in parts) == 1


def test_quantity_skew_gives_unequal_sizes():
    labels = labels_of(2000)
    sizes = [len(p) for p in partition(PartitionConfig(name="quantity", alpha=0.3), 10, labels, np.random.default_rng(0))]
    assert max(sizes) > 3 * min(sizes)


def test_natural_keeps_each_owner_on_one_client():
    owners = [f"user{i % 13}" for i in range(390)]
    labels = labels_of(390)
    parts = partition(PartitionConfig(name="natural", column="user"), 5, labels, np.random.default_rng(0), owners)
    check_cover(parts, 390, 4)
    for part in parts:
        for other in parts:
            if part is not other:
                assert not ({owners[i] for i in part} & {owners[i] for i in other})
    with pytest.raises(DataError, match="distinct values"):
        partition(PartitionConfig(name="natural"), 20, labels, np.random.default_rng(0), owners)


def test_impossible_requests_are_data_errors():
    labels = labels_of(30)
    with pytest.raises(DataError, match="clients x 4 examples"):
        partition(PartitionConfig(name="iid"), 10, labels, np.random.default_rng(0))
    with pytest.raises(DataError, match="needs class labels"):
        partition(PartitionConfig(name="dirichlet"), 2, np.full(30, -1), np.random.default_rng(0))


def test_partitions_are_seeded():
    labels = labels_of()
    a = partition(PartitionConfig(), 10, labels, np.random.default_rng(5))
    b = partition(PartitionConfig(), 10, labels, np.random.default_rng(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_local_split_keeps_training_data():
    train, test = split_local(np.arange(10), 0.2, np.random.default_rng(0))
    assert len(train) == 8 and len(test) == 2 and not set(train) & set(test)
    train, test = split_local(np.arange(1), 0.5, np.random.default_rng(0))
    assert len(train) == 1
