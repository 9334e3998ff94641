"""The numba kernels that the landmark model and the refinement share.

umap-learn's sigma search (:func:`bandwidth`), its gradient clipping (:func:`clip`), the random
stream that seeds every cell's negative samples (:func:`splitmix64`), and the bounded max-heap
that keeps a row's nearest candidates (:func:`heap_push`, :func:`heap_sift_down`). Each is
written once so that the transform and the refinement compute the same bits the same way.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = [
    "MIN_K_DIST_SCALE",
    "SIGMA_SEARCH_STEPS",
    "SMOOTH_K_TOLERANCE",
    "bandwidth",
    "clip",
    "heap_before",
    "heap_push",
    "heap_sift_down",
    "splitmix64",
]

# umap-learn's constants for the sigma search (umap/umap_.py), kept identical on purpose
SMOOTH_K_TOLERANCE = 1e-5
MIN_K_DIST_SCALE = 1e-3
SIGMA_SEARCH_STEPS = 64


@njit(cache=True, nogil=True)
def bandwidth(dists, first, rho, target):
    """umap-learn's binary search for a row's sigma: the sum over the finite ``dists[first:]``
    of ``exp(-(d - rho) / sigma)`` (1 where ``d <= rho``) within tolerance of ``target``.
    Shared by the transform's weights and the refinement's fit-time weights."""
    k = dists.shape[0]
    lo = 0.0
    hi = np.inf
    mid = 1.0
    for _ in range(SIGMA_SEARCH_STEPS):
        psum = 0.0
        for j in range(first, k):
            if not np.isfinite(dists[j]):
                continue
            d = dists[j] - rho
            psum += np.exp(-(d / mid)) if d > 0.0 else 1.0
        if np.fabs(psum - target) < SMOOTH_K_TOLERANCE:
            break
        if psum > target:
            hi = mid
            mid = (lo + hi) / 2.0
        else:
            lo = mid
            if hi == np.inf:
                mid *= 2.0
            else:
                mid = (lo + hi) / 2.0
    return mid


@njit(cache=True, nogil=True)
def splitmix64(state):
    """One step of the splitmix64 stream: the next state and its 64 mixed bits."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return state, z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def clip(value):
    """umap-learn's gradient clipping, to [-4, 4]."""
    if value > 4.0:
        return 4.0
    if value < -4.0:
        return -4.0
    return value


# ----------------------------------------------------------------------------- the heap
#
# A max-heap of (key, item) pairs in two arrays, ``keys[:size]`` and ``items[:size]``: the
# largest at 0, so that a row's k best candidates are kept by replacing the top. With
# ``by_item`` pairs are ordered by key, ties by item (the refinement ranks by (distance, cell));
# without, by key alone (the model's candidate estimates, whose ties its exact re-ranking
# settles). The refinement's pairs are distinct, so either order is a strict one there.


@njit(cache=True, nogil=True)
def heap_before(key1, item1, key2, item2, by_item):
    """Whether ``(key1, item1)`` ranks before ``(key2, item2)``."""
    return key1 < key2 or (by_item and key1 == key2 and item1 < item2)


@njit(cache=True, nogil=True)
def heap_push(keys, items, size, key, item, by_item):
    """Add ``(key, item)`` to the heap of ``size`` pairs (the arrays have room); return the
    new size."""
    pos = size
    while pos > 0:
        parent = (pos - 1) // 2
        if not heap_before(keys[parent], items[parent], key, item, by_item):
            break
        keys[pos] = keys[parent]
        items[pos] = items[parent]
        pos = parent
    keys[pos] = key
    items[pos] = item
    return size + 1


@njit(cache=True, nogil=True)
def heap_sift_down(keys, items, size, key, item, by_item):
    """Put ``(key, item)`` in the place of the top of the heap of ``size`` pairs and restore
    the heap: replaces the largest pair, or, with ``size`` one less, pops it (the caller moves
    the last pair in)."""
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            break
        child = left
        if left + 1 < size and heap_before(
            keys[left], items[left], keys[left + 1], items[left + 1], by_item
        ):
            child = left + 1
        if not heap_before(key, item, keys[child], items[child], by_item):
            break
        keys[pos] = keys[child]
        items[pos] = items[child]
        pos = child
    keys[pos] = key
    items[pos] = item
