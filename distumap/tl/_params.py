"""The embed stage's parameters, from the arguments and the ``distumap.*`` settings."""

from __future__ import annotations

from typing import Any

from distumap import _config
from distumap._errors import InputError
from distumap.tl._pca import PCA_FITS


def embed_params(*, use_rep: str | None = None, **given: Any) -> dict[str, Any]:
    """The embed stage's parameters: the values given, else the ``distumap.*`` settings,
    checked. ``pca_fit`` is recorded only when it is not the default (``landmarks``), so that
    stores embedded before it existed keep their record; ``use_rep`` (the obsm key of the
    store's representation, embedded as it is: ``pca`` 0, refined as PCs are) only when given."""
    names = {
        "landmarks": "landmarks",
        "pca": "pca",
        "n_neighbors": "n-neighbors",
        "min_dist": "min-dist",
        "seed": "seed",
        "transform_epochs": "transform-epochs",
        "refine_epochs": "refine-epochs",
    }
    params = {key: _config.get(option, given.get(key)) for key, option in names.items()}
    for key in ("landmarks", "pca", "n_neighbors", "seed", "refine_epochs"):
        params[key] = int(params[key])
    params["min_dist"] = float(params["min_dist"])
    params["stratify"] = given.get("stratify")
    if use_rep is not None:
        if given.get("pca") not in (None, 0) or given.get("pca_fit") not in (None, "landmarks"):
            raise InputError(
                f"--use-rep {use_rep}: a representation is embedded as it is; --pca and "
                "--pca-fit are for the genes' features"
            )
        params["pca"] = 0
        params["use_rep"] = use_rep
    if params["pca"] < 0 or params["n_neighbors"] < 2 or params["refine_epochs"] < 0:
        raise InputError("pca and refine_epochs must be >= 0 and n_neighbors >= 2")
    if params["pca"] == 0 and params["refine_epochs"] > 0 and use_rep is None:
        # the refinement searches every cell's features on every worker: principal components
        # are small enough for that, a cell's raw genes are not
        if given.get("refine_epochs") is not None:
            raise InputError("refine_epochs needs principal components (pca > 0)")
        params["refine_epochs"] = 0
    if params["transform_epochs"] is None:
        # the refinement's epochs continue from the transform's: fewer of these do
        refined = params["refine_epochs"] > 0
        params["transform_epochs"] = TRANSFORM_EPOCHS_REFINED if refined else TRANSFORM_EPOCHS
    params["transform_epochs"] = int(params["transform_epochs"])
    pca_fit = str(_config.get("pca-fit", given.get("pca_fit")))
    if use_rep is not None:  # no PCA: nothing to fit it on
        pca_fit = "landmarks"
    if pca_fit not in PCA_FITS:
        raise InputError(f"pca_fit must be one of {', '.join(PCA_FITS)}, not {pca_fit!r}")
    if pca_fit != "landmarks":
        if params["pca"] == 0:
            raise InputError("pca_fit='all' needs principal components (pca > 0)")
        params["pca_fit"] = pca_fit
    return params


#: the transform's SGD epochs by default, without and with the refinement after it (see the
#: ``transform-epochs`` setting in distumap._config for the measurements)
TRANSFORM_EPOCHS = 30
TRANSFORM_EPOCHS_REFINED = 10
