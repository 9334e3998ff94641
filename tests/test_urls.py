"""Object stores: the CSV, the metadata and the store as fsspec URLs.

``memory://`` runs the whole pipeline in-process (threaded scheduler); a moto S3 server on
127.0.0.1 serves ``s3://`` over HTTP (tests/test_cluster.py runs the CLI against it on worker
processes, which find it through ``AWS_ENDPOINT_URL_S3`` as a pod would find its object store).
"""

from __future__ import annotations

import io
import logging
import uuid

import dask
import fsspec
import h5py
import numpy as np
import pytest

import distumap
from distumap.testing import SyntheticSpec, write_dataset

SPEC = SyntheticSpec(400, 200, seed=7)
CHUNK = 64
EMBED = {"landmarks": 150, "pca": 5, "n_neighbors": 10, "transform_epochs": 30}
STORE_VARIABLES = ("counts", "zero_fraction", "selected", "X_umap", "landmark")
LOOM_DATASETS = (
    "matrix",
    "layers/log2p1",
    "col_attrs/X_umap",
    "col_attrs/CellID",
    "col_attrs/subclass_label",
    "row_attrs/Gene",
)


def _pipeline(matrix: str, metadata: str, store: str, *, embed: bool = True):
    ds = distumap.io.read_csv(matrix, store, metadata=metadata, chunk_cells=CHUNK)
    ds = distumap.pp.preprocess(ds)
    return distumap.tl.umap(ds, **EMBED) if embed else ds


def _loom_arrays(source) -> dict[str, np.ndarray]:
    with h5py.File(source, "r") as f:
        return {name: f[name][()] for name in LOOM_DATASETS}


def _assert_same_store(ds, reference, names=STORE_VARIABLES) -> None:
    for name in names:
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)
    for name in ("cell", "gene", "subclass_label", "size_factor"):
        np.testing.assert_array_equal(ds[name].values, reference[name].values, err_msg=name)


@pytest.fixture(scope="module", autouse=True)
def threads():
    """Everything here runs in this process: ``memory://`` exists only in it, and a distributed
    client left by another module must not pick up the reads."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    with dask.config.set(scheduler="threads"):
        yield


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """The dataset on local disk, and the reference result from local paths (threads)."""
    directory = tmp_path_factory.mktemp("urls")
    matrix, metadata = write_dataset(directory / "data", SPEC)
    ds = _pipeline(str(matrix), str(metadata), str(directory / "store.zarr"))
    distumap.io.write_loom(ds, directory / "embedding.loom")
    return {
        "matrix": matrix,
        "metadata": metadata,
        "ds": ds,
        "loom": _loom_arrays(directory / "embedding.loom"),
    }


def test_memory_urls_through_every_stage(local):
    fs = fsspec.filesystem("memory")
    root = f"distumap-test-{uuid.uuid4().hex[:8]}"
    fs.pipe(f"/{root}/matrix.csv", local["matrix"].read_bytes())
    fs.pipe(f"/{root}/metadata.csv", local["metadata"].read_bytes())
    url = f"memory://{root}"
    try:
        ds = _pipeline(f"{url}/matrix.csv", f"{url}/metadata.csv", f"{url}/out/store.zarr")
        written = distumap.io.write_loom(ds, f"{url}/out/embedding.loom")
        assert written == f"{url}/out/embedding.loom"
        # the store really is in the memory file system, with its markers
        assert fs.exists(f"/{root}/out/store.zarr/zarr.json")
        assert fs.exists(f"/{root}/out/store.zarr/_progress/embed/zarr.json")
        assert ds.encoding["distumap_store"] == f"{url}/out/store.zarr"
        reopened = distumap.io.open_store(f"{url}/out/store.zarr", require="embed")
        _assert_same_store(reopened, local["ds"])
        # the loom was written locally and copied to the remote target, whole
        loom = _loom_arrays(io.BytesIO(fs.cat(f"/{root}/out/embedding.loom")))
        for name, reference in local["loom"].items():
            np.testing.assert_array_equal(loom[name], reference, err_msg=name)
        # a re-run on the finished store skips every stage (the URL records match)
        again = _pipeline(f"{url}/matrix.csv", f"{url}/metadata.csv", f"{url}/out/store.zarr")
        assert again.attrs == reopened.attrs
    finally:
        fs.rm(f"/{root}", recursive=True)


# ---------------------------------------------------------------- S3 over HTTP (moto)


@pytest.fixture
def s3(s3_endpoint, local, monkeypatch):
    """A fresh bucket holding the dataset; s3fs in this process talks to the moto server."""
    import s3fs

    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    bucket = f"distumap-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.put_file(str(local["matrix"]), f"{bucket}/matrix.csv")
    fs.put_file(str(local["metadata"]), f"{bucket}/metadata.csv")
    yield fs, f"s3://{bucket}"
    fs.rm(bucket, recursive=True)
    s3fs.S3FileSystem.clear_instance_cache()


def test_s3_urls_in_process(s3, local):
    fs, url = s3
    ds = _pipeline(f"{url}/matrix.csv", f"{url}/metadata.csv", f"{url}/store.zarr")
    distumap.io.write_loom(ds, f"{url}/embedding.loom")
    bucket = url.removeprefix("s3://")
    assert fs.exists(f"{bucket}/store.zarr/counts/zarr.json")
    reopened = distumap.io.open_store(f"{url}/store.zarr", require="embed")
    _assert_same_store(reopened, local["ds"])
    params = reopened.attrs["distumap"]["stages"]["ingest"]["params"]
    assert params["matrix"] == f"{url}/matrix.csv"
    assert params["metadata"] == f"{url}/metadata.csv"
    loom = _loom_arrays(io.BytesIO(fs.cat(f"{bucket}/embedding.loom")))
    for name, reference in local["loom"].items():
        np.testing.assert_array_equal(loom[name], reference, err_msg=name)
