"""Landmark cells: the seeded sample that the UMAP model is fitted on."""

from __future__ import annotations

import numpy as np
import xarray as xr

from distumap import _config
from distumap._compute import as_blocks
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
        codes, n_groups = _group_codes(ds[stratify].data)
        chosen = _stratified(codes, n_groups, n, minimum, rng)
    mask = np.zeros(n_cells, dtype=bool)
    mask[chosen] = True
    return xr.DataArray(mask, dims=("cell",), coords=cell_coords(ds), name="landmark")


def _block_groups(block: np.ndarray) -> np.ndarray:
    return np.unique(np.asarray(block).astype(str))


def _block_codes(block: np.ndarray, names: np.ndarray) -> np.ndarray:
    return np.searchsorted(names, np.asarray(block).astype(str)).astype(np.int32)


def _group_codes(values) -> tuple[np.ndarray, int]:
    """Each cell's group (its value as text) as an index into the sorted group names, and the
    number of groups: the column is read and coded block by block where it lies, so that
    this process holds an int32 per cell, never the column's strings."""
    import dask

    blocks = as_blocks(values).to_delayed().ravel()
    token = dask.base.tokenize(*blocks)
    found, code = (dask.delayed(f, pure=True) for f in (_block_groups, _block_codes))
    parts = [found(b, dask_key_name=(f"landmark-names-{token}", i)) for i, b in enumerate(blocks)]
    names = dask.delayed(_sorted_union, pure=True)(parts, dask_key_name=f"landmark-groups-{token}")
    # one graph: each block is read once, for its names and then its codes
    keys = [(f"landmark-code-{token}", i) for i in range(len(blocks))]
    codes = [code(b, names, dask_key_name=key) for b, key in zip(blocks, keys, strict=True)]
    codes, names = dask.compute(codes, names)
    return np.concatenate(codes) if codes else np.zeros(0, np.int32), len(names)


def _sorted_union(parts: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=str)


def _stratified(
    inverse: np.ndarray, n_groups: int, n: int, minimum: int, rng: np.random.Generator
) -> np.ndarray:
    """``n`` landmarks, each group's ``min(size, minimum)`` and the rest in proportion to the
    groups' sizes; ``inverse``: each cell's group, in ``range(n_groups)``."""
    sizes = np.bincount(inverse, minlength=n_groups)
    quota = np.minimum(sizes, minimum)
    if quota.sum() > n:  # more groups than room: the smallest guarantees shrink evenly
        quota = np.minimum(sizes, max(1, n // n_groups))
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
