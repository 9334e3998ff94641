"""The landmark model as plain arrays and JSON attributes, and on disk: a store is data.

The layout (``distumap._format.MODEL_ARRAYS`` and ``MODEL_SCALARS``) is a store's
``umap_model/``; every load is validated against it, and nothing is ever unpickled.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import numpy as np

from distumap._errors import InputError
from distumap._format import MODEL_ARRAYS, MODEL_GROUP, MODEL_SCALARS, check_model
from distumap._store import read_group, write_group
from distumap.tl._model import LandmarkModel

__all__ = ["from_arrays", "load_model", "save_model", "to_arrays"]


def to_arrays(model: LandmarkModel) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The model as plain float32 arrays and JSON attributes (``distumap._format.MODEL_ARRAYS``
    and ``MODEL_SCALARS``): the layout of ``umap_model/`` in a store. No code, no pickle."""
    arrays = {
        name: np.ascontiguousarray(getattr(model, name), dtype=np.float32)
        for name in MODEL_ARRAYS
        if getattr(model, name) is not None
    }
    attrs: dict[str, Any] = {
        name: kind(getattr(model, name)) for name, kind in MODEL_SCALARS.items()
    }
    attrs["params"] = json.loads(json.dumps(model.params, default=str))
    return arrays, attrs


def from_arrays(arrays: dict[str, np.ndarray], attrs: dict[str, Any], *, source: str = "model"):
    """Rebuild a :class:`LandmarkModel` from :func:`to_arrays`'s output, validating it first.

    Raises
    ------
    InputError
        The arrays or attributes do not follow the layout (missing, wrong dtype or shape, values
        that are not finite); the message names ``source`` and every problem.
    """
    problems = check_model(arrays, attrs)
    if problems:
        raise InputError(f"{source}: not a valid distumap UMAP model: {'; '.join(problems)}")
    return LandmarkModel(
        pca_mean=arrays.get("pca_mean"),
        pca_components=arrays.get("pca_components"),
        pca_variance=arrays.get("pca_variance"),
        pca_variance_ratio=arrays.get("pca_variance_ratio"),
        landmark_features=arrays["landmark_features"],
        landmark_embedding=arrays["landmark_embedding"],
        params=dict(attrs.get("params", {})),
        **{name: kind(attrs[name]) for name, kind in MODEL_SCALARS.items()},
    )


def save_model(model: LandmarkModel, path: str) -> None:
    """Write the model to ``path`` (a local path or an fsspec URL) as a zarr group of plain
    arrays and JSON attributes, the layout of a store's ``umap_model/``."""
    arrays, attrs = to_arrays(model)
    write_group(path, "", arrays, attrs)


def load_model(path: str) -> LandmarkModel:
    """Read and validate a model written by :func:`save_model` (a local path or an fsspec URL).

    Raises
    ------
    InputError
        Nothing at ``path`` is a model in distumap's layout (a pickle, say: never unpickled).
    """
    try:
        arrays, attrs = read_group(path, "")
    except FileNotFoundError:
        raise InputError(
            f"{path}: no distumap UMAP model here (save_model writes a zarr group)"
        ) from None
    return from_arrays(arrays, attrs, source=str(path))


# -- the model, by reference: in the store, read once per process --


def save_fitted(store: str, model: LandmarkModel, token: str) -> None:
    """The fitted model into the store, marked as this run's (``token``)."""
    arrays, attrs = to_arrays(model)
    write_group(store, MODEL_GROUP, arrays, {**attrs, "token": token})


@lru_cache(maxsize=2)
def load_fitted(store: str, token: str) -> LandmarkModel:
    """The fitted model, read and validated once per process (and per fit, through ``token``)."""
    arrays, attrs = read_group(store, MODEL_GROUP)
    if attrs.get("token") != token:
        raise RuntimeError(f"{store}: the stored UMAP model is not the one this run fitted")
    return from_arrays(arrays, attrs, source=f"{store}/{MODEL_GROUP}")


def fitted_saved(store: str, token: str) -> bool:
    """Whether the fit finished: the model of this run (``token``) is in the store."""
    try:
        return read_group(store, MODEL_GROUP)[1].get("token") == token
    except FileNotFoundError:
        return False
