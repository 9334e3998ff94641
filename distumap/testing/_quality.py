"""How faithful an embedding is to its features, measured as the single-cell field measures it.

Local structure: trustworthiness (Venna & Kaski, as scikit-learn computes it) and k-NN
preservation (the share of each cell's k nearest cells in the features that are among its k
nearest in the embedding). Global structure, after Kobak & Berens (2019, "The art of using t-SNE
for single-cell transcriptomics"): the share of each class mean's k nearest class means that
stay its nearest in the embedding (KNC), the Spearman correlation of the distances between class
means, and the Spearman correlation of the distances between sampled cells (CPD). And the
agreement of a cell's nearest cells' labels with its own, which the benchmarks quoted first.

Every function takes arrays (cells are rows) and returns a float; the cell-level ones work on a
sample of cells against all cells, so that they stay exact and cheap at a million cells.

Examples
--------
>>> rng = np.random.default_rng(0)
>>> features = rng.normal(size=(300, 5))
>>> knn_preservation(features, features[:, :2], np.arange(0, 300, 3), k=10) < 1.0
True
"""

from __future__ import annotations

import numpy as np


def sample_cells(n_cells: int, size: int, *, seed: int = 0) -> np.ndarray:
    """``size`` distinct cell indices (all cells when there are fewer), sorted, seeded."""
    if size >= n_cells:
        return np.arange(n_cells)
    return np.sort(np.random.default_rng(seed).choice(n_cells, size=size, replace=False))


def nearest_others(
    points: np.ndarray, sample: np.ndarray, k: int, *, brute: bool = False
) -> np.ndarray:
    """Each sampled cell's ``k`` nearest *other* cells among all ``points``, nearest first.

    Exact (scikit-learn's ``NearestNeighbors``; ``brute=True`` forces the brute-force search,
    which high-dimensional features want). A cell is left out of its own neighbours even when a
    duplicate of it ties at distance 0 and comes back first.
    """
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1, algorithm="brute" if brute else "auto")
    found = index.fit(points).kneighbors(points[sample], return_distance=False)
    is_self = found == np.asarray(sample)[:, None]
    # where the cell itself is not among the k + 1 (k duplicates), drop the farthest instead
    is_self[~is_self.any(axis=1), -1] = True
    return found[~is_self].reshape(len(sample), k)


def trustworthiness(
    features: np.ndarray, embedding: np.ndarray, sample: np.ndarray, *, k: int = 15
) -> float:
    """scikit-learn's trustworthiness of the sampled cells' embedding among themselves.

    Notes
    -----
    Neighbourhoods are taken within the sample (the measure needs every rank in the features,
    quadratic in the cells), so a larger sample looks at finer neighbourhoods.
    """
    from sklearn.manifold import trustworthiness as sklearn_trustworthiness

    return float(sklearn_trustworthiness(features[sample], embedding[sample], n_neighbors=k))


def knn_preservation(
    features: np.ndarray, embedding: np.ndarray, sample: np.ndarray, *, k: int = 10
) -> float:
    """Share of each sampled cell's ``k`` nearest cells in the features (exact, among all cells)
    that are among its ``k`` nearest cells in the embedding (Kobak & Berens' KNN)."""
    in_features = nearest_others(features, sample, k, brute=True)
    in_embedding = nearest_others(embedding, sample, k)
    kept = [np.intersect1d(a, b).size for a, b in zip(in_features, in_embedding, strict=True)]
    return float(np.mean(kept) / k)


def class_means(points: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The mean of each class's points, classes in sorted label order."""
    _, inverse = np.unique(labels, return_inverse=True)
    sums = np.zeros((inverse.max() + 1, points.shape[1]))
    np.add.at(sums, inverse, points)
    return sums / np.bincount(inverse)[:, None]


def class_means_preservation(
    features: np.ndarray, embedding: np.ndarray, labels: np.ndarray, *, k: int = 10
) -> float:
    """Share of each class mean's ``k`` nearest class means in the features that are among its
    ``k`` nearest in the embedding (Kobak & Berens' KNC; ``k`` is capped at the classes - 1)."""
    in_features, in_embedding = class_means(features, labels), class_means(embedding, labels)
    k = min(k, len(in_features) - 1)
    every = np.arange(len(in_features))
    a = nearest_others(in_features, every, k, brute=True)
    b = nearest_others(in_embedding, every, k, brute=True)
    return float(np.mean([np.intersect1d(x, y).size for x, y in zip(a, b, strict=True)]) / k)


def class_distance_correlation(
    features: np.ndarray, embedding: np.ndarray, labels: np.ndarray
) -> float:
    """Spearman correlation of the distances between class means, features against embedding."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    far = pdist(class_means(features, labels)), pdist(class_means(embedding, labels))
    return float(spearmanr(*far).statistic)


def distance_correlation(features: np.ndarray, embedding: np.ndarray, sample: np.ndarray) -> float:
    """Spearman correlation of the distances between sampled cells (Kobak & Berens' CPD, which
    they compute on 1,000 cells)."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    return float(spearmanr(pdist(features[sample]), pdist(embedding[sample])).statistic)


def label_agreement(
    embedding: np.ndarray, labels: np.ndarray, *, k: int = 15, sample: np.ndarray | None = None
) -> float:
    """Share of each (sampled) cell's ``k`` nearest other cells in the embedding with its label."""
    sample = np.arange(len(embedding)) if sample is None else sample
    labels = np.asarray(labels)
    neighbours = nearest_others(embedding, sample, k)
    return float((labels[neighbours] == labels[sample, None]).mean())
