"""The embedding-quality measures (distumap.testing): perfect for a rigid motion of the features,
clearly worse for an embedding that has lost the cells' order."""

from __future__ import annotations

import numpy as np
import pytest

from distumap.testing import (
    class_distance_correlation,
    class_means_preservation,
    distance_correlation,
    knn_preservation,
    label_agreement,
    sample_cells,
    trustworthiness,
)


@pytest.fixture(scope="module")
def clustered():
    """12 classes of different sizes in 6 dimensions, centres far apart, cells spread within."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(10, 80, size=12)
    labels = np.repeat(np.arange(12), sizes)
    centres = rng.normal(scale=6.0, size=(12, 6))
    features = centres[labels] + rng.normal(size=(len(labels), 6))
    return features, labels


def rigid_motion(features: np.ndarray) -> np.ndarray:
    rotation, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(features.shape[1],) * 2))
    return features @ rotation + 5.0


def test_a_rigid_motion_keeps_everything(clustered):
    features, labels = clustered
    moved = rigid_motion(features)
    sample = sample_cells(len(features), 200, seed=2)
    assert trustworthiness(features, moved, sample) == pytest.approx(1.0)
    assert knn_preservation(features, moved, sample) == pytest.approx(1.0)
    assert class_means_preservation(features, moved, labels) == pytest.approx(1.0)
    assert class_distance_correlation(features, moved, labels) == pytest.approx(1.0)
    assert distance_correlation(features, moved, sample) == pytest.approx(1.0)
    assert label_agreement(moved, labels) == pytest.approx(label_agreement(features, labels))
    assert label_agreement(moved, labels) > 0.9


def test_shuffled_cells_lose_the_structure(clustered):
    features, labels = clustered
    shuffled = rigid_motion(features)[np.random.default_rng(4).permutation(len(features))]
    sample = sample_cells(len(features), 200, seed=2)
    assert trustworthiness(features, shuffled, sample) < 0.7
    assert knn_preservation(features, shuffled, sample) < 0.1
    assert class_means_preservation(features, shuffled, labels, k=3) < 0.6
    assert abs(class_distance_correlation(features, shuffled, labels)) < 0.5
    assert abs(distance_correlation(features, shuffled, sample)) < 0.2
    assert label_agreement(shuffled, labels) < 0.3


def test_a_projection_keeps_some():
    """A 2-D projection of 6-D data sits between the two extremes, as a real embedding does."""
    rng = np.random.default_rng(5)
    features = rng.normal(size=(400, 6))
    sample = sample_cells(len(features), 150, seed=0)
    assert 0.08 < knn_preservation(features, features[:, :2], sample) < 0.5
    assert 0.5 < trustworthiness(features, features[:, :2], sample) < 0.99


def test_duplicates_do_not_count_a_cell_as_its_own_neighbour():
    points = np.zeros((5, 2))
    sample = np.arange(5)
    # every cell ties with every other at distance 0; none may name itself among its 4
    from distumap.testing._quality import nearest_others

    found = nearest_others(points, sample, 4)
    assert not (found == sample[:, None]).any()
    assert sorted(found[0]) == [1, 2, 3, 4]


def test_sample_cells_is_seeded_and_capped():
    assert np.array_equal(sample_cells(1000, 50, seed=7), sample_cells(1000, 50, seed=7))
    assert np.array_equal(sample_cells(30, 50), np.arange(30))
