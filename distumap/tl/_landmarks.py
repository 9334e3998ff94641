"""Landmark cells: the seeded sample that the UMAP model is fitted on."""

from __future__ import annotations

import numpy as np
import xarray as xr

from distumap import _config
from distumap._errors import InputError
from distumap._store import cell_coords

__all__ = ["landmarks"]


def landmarks(
    ds: xr.Dataset,
    n: int | None = None,
    *,
    stratify: str | None = None,
    seed: int | None = None,
    min_per_group: int | None = None,
) -> xr.DataArray:
    """Choose landmark cells: a seeded sample, uniform or stratified by a metadata column.

    Parameters
    ----------
    ds
        The store as a Dataset.
    n
        Number of landmarks (default ``distumap.landmarks``); all cells if ``n`` is not smaller.
    stratify
        A cell coordinate (e.g. ``subclass_label``). Each group gets
        ``min(group size, min_per_group)`` landmarks, and the rest are shared in proportion to
        group size, so rare populations are represented.
    seed
        Random seed (default ``distumap.seed``).
    min_per_group
        Landmarks guaranteed to each group when stratifying (default ``distumap.min-per-group``).

    Returns
    -------
    xarray.DataArray
        Boolean over ``cell``. Computes nothing but a sample of indices.

    Examples
    --------
    >>> is_landmark = distumap.tl.landmarks(ds, 20000, stratify="subclass_label")  # doctest: +SKIP
    """
    n_cells = ds.sizes["cell"]
    n = int(_config.get("landmarks", n))
    seed = int(_config.get("seed", seed))
    if n < 2:
        raise InputError(f"landmarks must be at least 2, not {n}")
    rng = np.random.default_rng(seed)
    if n >= n_cells:
        chosen = np.arange(n_cells)
    elif stratify is None:
        chosen = rng.choice(n_cells, size=n, replace=False)
    else:
        if stratify not in ds.coords:
            raise InputError(f"cannot stratify by {stratify!r}: no such cell coordinate")
        minimum = int(_config.get("min-per-group", min_per_group))
        chosen = _stratified(np.asarray(ds[stratify].values).astype(str), n, minimum, rng)
    mask = np.zeros(n_cells, dtype=bool)
    mask[chosen] = True
    return xr.DataArray(mask, dims=("cell",), coords=cell_coords(ds), name="landmark")


def _stratified(groups: np.ndarray, n: int, minimum: int, rng: np.random.Generator) -> np.ndarray:
    names, inverse, sizes = np.unique(groups, return_inverse=True, return_counts=True)
    quota = np.minimum(sizes, minimum)
    if quota.sum() > n:  # more groups than room: the smallest guarantees shrink evenly
        quota = np.minimum(sizes, max(1, n // len(names)))
    rest = n - quota.sum()
    spare = sizes - quota
    if rest > 0 and spare.sum() > 0:
        share = rest * spare / spare.sum()
        extra = np.floor(share).astype(np.int64)
        leftover = rest - extra.sum()
        extra[np.argsort(-(share - extra), kind="stable")[:leftover]] += 1
        quota = quota + np.minimum(extra, spare)
    chosen = []
    for group, k in enumerate(quota):
        members = np.flatnonzero(inverse == group)
        chosen.append(rng.choice(members, size=int(k), replace=False))
    return np.concatenate(chosen)
