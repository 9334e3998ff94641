"""Reliability and safety: every module alone, nothing destroyed, no code in the store, names
settled at ingest, refused stages stay refused, and a store that xarray opens quietly.

The cluster-level checks (each CLI stage alone on a fresh cluster, a cluster that loses every
worker) live in ``test_cluster.py`` beside the reference run they compare with.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dask
import loompy
import numpy as np
import pytest
import xarray as xr
import zarr

import distumap
from distumap import io, pp, tl
from distumap._errors import IncompleteStoreError, InputError
from distumap._format import MODEL_GROUP, RESERVED_NAMES, check_loom, check_store
from distumap._store import mark_stage, progress_array, stage_record
from distumap.cli import main
from distumap.testing import SyntheticSpec, write_dataset
from distumap.tl import _model_io
from distumap.tl._model_io import load_model

ROOT = Path(distumap.__file__).parent
SPEC = SyntheticSpec(600, 400, seed=11)


def _modules() -> list[str]:
    names = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_every_module_imports_alone_in_a_fresh_interpreter():
    """A fresh worker process is exactly such an interpreter: an import cycle there is a hang."""
    modules = _modules()
    assert "distumap.pp._preprocess" in modules and "distumap.io.writers.loom" in modules

    def attempt(module: str) -> tuple[str, int, str]:
        done = subprocess.run(
            [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120
        )
        return module, done.returncode, done.stderr[-600:]

    with ThreadPoolExecutor(4) as pool:
        failures = [r for r in pool.map(attempt, modules) if r[1] != 0]
    assert failures == []


def _pickle_loading(module: str, name: str) -> list[str]:
    """Modules a fresh interpreter must import to unpickle ``module.name`` (as a worker does)."""
    code = (
        "import pickle, sys; before = set(sys.modules); "
        f"pickle.loads({pickle.dumps(getattr(sys.modules[module], name))!r}); "
        "print(sorted(m for m in set(sys.modules) - before if m.startswith('distumap')))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return eval(done.stdout)


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("distumap.pp._preprocess", "_zero_count_chunk"),
        ("distumap.pp._preprocess", "_log2p1_block"),
        ("distumap.pp._recipes", "_moments_block"),
        ("distumap.pp._recipes", "_normalize_log1p_block"),
        ("distumap.tl._embed", "_transform_task"),
        ("distumap.tl._refine_stage", "_refine_epoch_task"),
        ("distumap.io._ingest", "_read_block"),
        ("distumap.io.writers.loom", "_encode_block"),
        ("distumap._stage", "run_block"),
        ("distumap._shared_paths", "_look_here"),  # every worker runs it before a stage
    ],
)
def test_task_functions_unpickle_in_a_fresh_interpreter(module, name):
    __import__(module)
    assert module in _pickle_loading(module, name)


def test_a_reader_task_loads_no_writer_and_no_science():
    """``distumap.io`` imports its names on first use: a worker that unpickles the ingest's
    block task (every reader's) loads the readers and the store, not the writers, ``pp``, ``tl``
    or ``pl``."""
    import distumap.io._ingest  # noqa: F401

    loaded = _pickle_loading("distumap.io._ingest", "_read_block")
    assert "distumap.io._ingest" in loaded
    above = ("distumap.io.writers", "distumap.pp", "distumap.tl", "distumap.pl", "distumap.cli")
    assert [m for m in loaded if m.startswith(above)] == []


# ---------------------------------------------------------------- a small pipeline


@pytest.fixture
def data(tmp_path) -> dict[str, Path]:
    matrix, metadata = write_dataset(tmp_path / "data", SPEC)
    return {"matrix": matrix, "metadata": metadata}


def _quiet_open(store: Path) -> xr.Dataset:
    """``xr.open_zarr(store)`` as a user types it, with every warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return xr.open_zarr(store)


def _check_after_stage(store: Path) -> xr.Dataset:
    ds = _quiet_open(store)
    assert check_store(io.open_store(store, require=None)) == []
    return ds


def test_clashing_metadata_names_are_settled_at_ingest(data, tmp_path):
    """A metadata column named like an output is renamed at ingest with one warning, and the
    whole pipeline runs; before, `run` failed at the very end."""
    import pandas as pd

    meta = pd.read_csv(data["metadata"])
    meta["CellID"] = "id-" + meta["sample_name"]
    meta["Landmark"] = np.arange(len(meta)) % 2
    meta["landmark"] = "yes"
    meta["area/region"] = "M1"
    meta["area_region"] = "also"
    clashing = tmp_path / "metadata.csv"
    meta.to_csv(clashing, index=False)
    store = tmp_path / "store.zarr"
    with dask.config.set(scheduler="threads"):
        with pytest.warns(UserWarning, match="renamed") as caught:
            io.read_csv(data["matrix"], store, metadata=clashing, chunk_cells=128)
        assert len([w for w in caught if "renamed" in str(w.message)]) == 1
        ds = _check_after_stage(store)
        names = {n for n, c in ds.coords.items() if c.dims == ("cell",)}
        assert {"CellID_metadata", "Landmark_metadata", "landmark_metadata"} <= names
        assert {"area_region", "area_region_metadata"} <= names
        assert not (names - {"cell"}) & RESERVED_NAMES
        assert ds["CellID_metadata"].values.tolist() == ("id-" + meta["sample_name"]).tolist()
        pp.preprocess(str(store))
        _check_after_stage(store)
        tl.umap(str(store), landmarks=200, pca=10, n_neighbors=10)
        ds = _check_after_stage(store)
        assert set(ds) >= {"X_umap", "landmark", "zero_fraction", "selected"}
        loom = tmp_path / "embedding.loom"
        io.write_loom(io.open_store(store, require="embed"), loom)
    assert check_loom(loom) == []
    with loompy.connect(str(loom), "r") as f:
        assert list(f.ca["CellID_metadata"][:3]) == list(("id-" + meta["sample_name"])[:3])
        assert f.ca["CellID"][0] == meta["sample_name"][0]


@pytest.mark.cluster
def test_a_filter_that_keeps_no_gene_is_refused_every_time(data, tmp_path):
    store = tmp_path / "store.zarr"
    with dask.config.set(scheduler="threads"):
        io.read_csv(data["matrix"], store, chunk_cells=128)
        lowest = float(pp.zero_fraction(io.open_store(store)).min())
        for _ in range(2):  # refused, and refused again: never recorded complete
            with pytest.raises(InputError, match="no gene has a zero fraction below"):
                pp.preprocess(str(store), max_zero_fraction=lowest / 2 or 1e-9)
            assert stage_record(store, "preprocess")["status"] == "started"
        with pytest.raises(IncompleteStoreError, match="preprocess"):
            tl.umap(str(store))
        _check_after_stage(store)
    for threshold in ("0", "1.5"):
        assert main(["preprocess", str(store), "--max-zero-fraction", threshold]) == 2


def test_overwrite_replaces_only_distumap_stores(data, tmp_path, capsys):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("three years of work")
    assert main(["ingest", str(data["matrix"]), str(thesis), "--overwrite"]) == 2
    assert "not a distumap store" in capsys.readouterr().err
    assert (thesis / "chapter1.tex").read_text() == "three years of work"
    assert sorted(p.name for p in thesis.iterdir()) == ["chapter1.tex"]


@pytest.mark.parametrize("foreign", ["umap.png", "umap.html", "embedding.loom", "store.zarr/x"])
def test_run_refuses_outputs_it_did_not_write_before_any_work(data, tmp_path, capsys, foreign):
    out = tmp_path / "out"
    (out / foreign).parent.mkdir(parents=True)
    (out / foreign).write_bytes(b"made by another tool")
    assert main(["run", str(data["matrix"]), "--out", str(out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert foreign.split("/")[0] in error and "distumap" in error
    assert (out / foreign).read_bytes() == b"made by another tool"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == sorted(
        {foreign, foreign.split("/")[0]}
    )


# ---------------------------------------------------------------- the model is data


class _Planted:
    """A pickle that creates a file when it is loaded: what an attacker would plant."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_no_stage_unpickles_what_is_planted_in_the_store(data, tmp_path):
    store = tmp_path / "store.zarr"
    with dask.config.set(scheduler="threads"):
        io.read_csv(data["matrix"], store, chunk_cells=128)
        pp.preprocess(str(store))
        tl.umap(str(store), landmarks=200, pca=10, n_neighbors=10)
    # the model is plain arrays with JSON attributes, readable with zarr
    group = zarr.open_group(str(store / MODEL_GROUP), mode="r")
    assert {name for name, _ in group.arrays()} == {
        "landmark_features",
        "landmark_embedding",
        "pca_mean",
        "pca_components",
        "pca_variance",
        "pca_variance_ratio",
    }
    assert all(array.dtype == np.float32 for _, array in group.arrays())
    assert not any(p.name.endswith((".pkl", ".pickle")) for p in store.rglob("*"))

    # an attacker with write access replaces the model by a pickle, in the old place too
    proof = tmp_path / "pwned"
    payload = np.frombuffer(pickle.dumps(_Planted(str(proof))), dtype=np.uint8)
    root = zarr.open_group(str(store), mode="r+", use_consolidated=False)
    model = root[MODEL_GROUP]
    del model["landmark_features"]
    for group, name in ((model, "landmark_features"), (root["_progress"], "umap_model")):
        group.create_array(name, shape=payload.shape, dtype=payload.dtype, overwrite=True)
        group[name][...] = payload
    record = stage_record(store, "embed")
    mark_stage(store, "embed", "started", record["params"], token=record["token"])
    progress_array(store, "embed")[0] = False  # one block to transform again, with the model
    _model_io.load_fitted.cache_clear()
    with dask.config.set(scheduler="threads"), pytest.raises(InputError, match="dtype uint8"):
        tl.umap(str(store), landmarks=200, pca=10, n_neighbors=10)
    assert not proof.exists()
    with pytest.raises(InputError):
        load_model(str(store / "_progress" / "umap_model"))
    assert not proof.exists()


@pytest.mark.cluster
@pytest.mark.timeout(120)
def test_opening_a_store_waits_on_no_worker(data, tmp_path):
    """Opening a store computes nothing on the cluster (its per-gene values are read by the
    process that opens it, its per-cell ones stay lazy): a default client whose cluster has no
    worker (all lost) does not make `distumap info` or open_store wait forever."""
    from distributed import Client, LocalCluster

    store = tmp_path / "store.zarr"
    with dask.config.set(scheduler="threads"):
        io.read_csv(data["matrix"], store, metadata=data["metadata"], chunk_cells=128)
    with (
        LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as cluster,
        Client(cluster),
    ):
        ds = io.open_store(str(store))
        assert ds.sizes["cell"] == SPEC.n_cells and ds["gene"].values[0]
        assert ds["cell"].data.compute(scheduler="threads")[0]
        assert main(["info", str(store), "--json"]) == 0
