"""Preprocess: exact values against numpy, laziness proved, parity across execution modes."""

from __future__ import annotations

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr

import distumap
from distumap import pp
from distumap._errors import IncompleteStoreError, InputError
from distumap.testing import synthetic_counts


class CountingScheduler:
    """A dask scheduler that counts computes and fails past ``max_computes`` (after xarray's)."""

    def __init__(self, max_computes: int = 0):
        self.total_computes = 0
        self.max_computes = max_computes

    def __call__(self, dsk, keys, **kwargs):
        self.total_computes += 1
        if self.total_computes > self.max_computes:
            raise RuntimeError(
                f"{self.total_computes} computes, at most {self.max_computes} allowed"
            )
        return dask.get(dsk, keys, **kwargs)


def _dataset(counts: np.ndarray, chunk: int | None) -> xr.Dataset:
    data = counts if chunk is None else da.from_array(counts, chunks=(chunk, -1))
    n_cells, n_genes = counts.shape
    return xr.Dataset(
        {"counts": (("cell", "gene"), data)},
        coords={
            "cell": [f"c{i}" for i in range(n_cells)],
            "gene": [f"g{j}" for j in range(n_genes)],
        },
    )


@pytest.fixture(scope="module")
def counts() -> np.ndarray:
    return synthetic_counts(701, 300, seed=3, zero_genes=7, zero_cells=5).counts


def _expected(counts: np.ndarray, threshold: float = 0.5):
    zero_fraction = (counts == 0).mean(axis=0)
    selected = zero_fraction < threshold
    return (
        zero_fraction.astype(np.float32),
        selected,
        np.log2(counts[:, selected] + 1.0).astype(np.float32),
    )


def test_building_the_graphs_computes_nothing(counts):
    ds = _dataset(counts, 64)
    with dask.config.set(scheduler=CountingScheduler(max_computes=0)):
        filtered = pp.filter_genes(ds, max_zero_fraction=0.5)
        zero_fraction = pp.zero_fraction(ds)
        selected = filtered["selected"].compute(scheduler="sync")  # the only compute, allowed below
    assert isinstance(filtered["zero_fraction"].data, da.Array)
    assert isinstance(zero_fraction.data, da.Array)
    ds = ds.assign(selected=selected)
    counter = CountingScheduler(max_computes=0)
    with dask.config.set(scheduler=counter):
        logged = pp.log2p1(ds)
    assert counter.total_computes == 0
    assert isinstance(logged.data, da.Array)
    assert logged.shape == (counts.shape[0], int(selected.sum()))


def test_task_names_tell_the_stage(counts):
    ds = _dataset(counts, 100)
    stats = pp.zero_counts(ds).data
    assert any(
        str(k[0] if isinstance(k, tuple) else k).startswith("gene-stats") for k in stats.dask
    )
    ds = ds.assign(selected=("gene", np.ones(counts.shape[1], bool)))
    logged = pp.log2p1(ds).data
    assert logged.name.startswith("log2p1-")


@pytest.mark.parametrize(
    "mode", ["numpy", "threads", pytest.param("processes-cluster", marks=pytest.mark.cluster)]
)
def test_parity_across_execution_modes(counts, mode, request):
    expected_zf, expected_sel, expected_log = _expected(counts)
    ds = _dataset(counts, None if mode == "numpy" else 97)  # a ragged last chunk
    if mode == "processes-cluster":
        client = request.getfixturevalue("local_client")
        compute = client.compute
        gather = client.gather
    else:
        compute = dask.compute if mode == "threads" else (lambda x: (x,))
        gather = None
    filtered = pp.filter_genes(ds)
    if mode == "numpy":
        zero_fraction, selected = filtered["zero_fraction"].values, filtered["selected"].values
    elif gather is None:
        zero_fraction, selected = dask.compute(
            filtered["zero_fraction"].data, filtered["selected"].data, scheduler="threads"
        )
    else:
        zero_fraction, selected = gather(
            compute([filtered["zero_fraction"].data, filtered["selected"].data])
        )
    np.testing.assert_array_equal(zero_fraction, expected_zf)
    np.testing.assert_array_equal(selected, expected_sel)
    logged = pp.log2p1(ds.assign(selected=("gene", selected)))
    values = logged.values if gather is None else gather(compute(logged.data))
    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, expected_log)


def test_threshold_is_strict_and_exact():
    # 4 cells: zero fractions 0.5, 0.25, 1.0; "under 50% zeros" keeps only the middle gene
    counts = np.array([[0, 0, 0], [0, 1, 0], [1, 1, 0], [2, 1, 0]], dtype=np.int32)
    filtered = pp.filter_genes(_dataset(counts, 2), max_zero_fraction=0.5)
    np.testing.assert_array_equal(filtered["selected"].values, [False, True, False])
    np.testing.assert_array_equal(filtered["zero_fraction"].values, np.float32([0.5, 0.25, 1.0]))
    with pytest.raises(InputError):
        pp.filter_genes(_dataset(counts, 2), max_zero_fraction=0.0)


def test_preprocess_stage_writes_the_store_and_skips_when_done(tmp_path, counts):
    from distumap.testing import write_dataset

    data = synthetic_counts(400, 250, seed=5, zero_genes=3, zero_cells=2)
    matrix, metadata = write_dataset(tmp_path / "in", data)
    store = tmp_path / "store.zarr"
    ds = distumap.io.read_csv(matrix, store, metadata=metadata, chunk_cells=64)
    with pytest.raises(InputError, match=r"lazy|preprocess"):
        pp.log2p1(pp.filter_genes(ds))
    out = pp.preprocess(ds)
    expected_zf, expected_sel, expected_log = _expected(data.counts)
    np.testing.assert_array_equal(out["zero_fraction"].values, expected_zf)
    np.testing.assert_array_equal(out["selected"].values, expected_sel)
    np.testing.assert_array_equal(pp.log2p1(out).values, expected_log)
    record = out.attrs["distumap"]["stages"]["preprocess"]
    assert record["status"] == "complete"
    assert record["genes_selected"] == int(expected_sel.sum())
    # same parameters: skipped (the record, with its timing, is untouched)
    again = pp.preprocess(str(store))
    assert again.attrs["distumap"]["stages"]["preprocess"] == record
    # other parameters: recomputed
    strict = pp.preprocess(str(store), max_zero_fraction=0.2)
    strict_sel = (data.counts == 0).mean(axis=0) < 0.2
    np.testing.assert_array_equal(strict["selected"].values, strict_sel)
    # the cache follows the new selection
    np.testing.assert_array_equal(strict["selected_counts"].values, data.counts[:, strict_sel])


def test_preprocess_caches_the_selected_genes_and_everything_reads_them(tmp_path):
    from distumap._format import check_store
    from distumap._store import progress_array
    from distumap.testing import write_dataset

    data = synthetic_counts(300, 200, seed=8, zero_genes=2)
    matrix, _ = write_dataset(tmp_path / "in", data)
    store = str(tmp_path / "store.zarr")
    distumap.io.read_csv(matrix, store, chunk_cells=64)
    out = pp.preprocess(store)
    _, selected, expected_log = _expected(data.counts)
    cache = out["selected_counts"]
    # the cache keeps the store's type: uint16, as every count fits
    assert cache.dims == ("cell", "selected_gene") and cache.dtype == out["counts"].dtype
    assert cache.dtype == np.uint16
    assert cache.data.chunks[0] == out["counts"].data.chunks[0]
    np.testing.assert_array_equal(cache.values, data.counts[:, selected])
    assert check_store(out) == []
    # log2p1 and the exporters' counts come from the cache: the full matrix is not needed
    without_counts = out.drop_vars("counts")
    np.testing.assert_array_equal(pp.log2p1(without_counts).values, expected_log)
    np.testing.assert_array_equal(
        pp.selected_counts(without_counts).compute(), data.counts[:, selected]
    )
    # other genes than the cached ones come from counts
    np.testing.assert_array_equal(
        pp.selected_counts(out, np.array([0, 5])).compute(), data.counts[:, [0, 5]]
    )

    # a preprocess interrupted while copying resumes: only the unmarked blocks are copied
    markers = progress_array(store, "preprocess", mode="r+")
    markers[2] = False
    from distumap._store import mark_stage, stage_record

    record = stage_record(store, "preprocess")
    mark_stage(store, "preprocess", "started", record["params"])
    import zarr

    zarr.open_array(store, path="selected_counts", mode="r+")[128:192] = 999  # torn: garbage
    again = pp.preprocess(store)
    np.testing.assert_array_equal(again["selected_counts"].values, data.counts[:, selected])
    assert again.attrs["distumap"]["stages"]["preprocess"]["status"] == "complete"


def test_preprocess_refuses_an_incomplete_ingest(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sample_name,a,b\nc1,1,2\nc2,1,x\n")
    with pytest.raises(InputError):
        distumap.io.read_csv(bad, tmp_path / "s.zarr", chunk_cells=1)
    with pytest.raises(IncompleteStoreError, match="ingest stage is incomplete"):
        pp.preprocess(str(tmp_path / "s.zarr"))


@pytest.mark.parametrize("reader", ["csv", "10x-h5", "mex-gz"])
def test_gene_statistics_come_from_the_ingest_blocks(tmp_path, reader):
    """The ingest counts each block's non-zero cells per gene while the block is in memory;
    the preprocess sums those rows instead of reading every count again."""
    import zarr

    from distumap._format import NONZERO
    from distumap._store import drop_arrays
    from distumap.testing import SyntheticSpec, write_10x_h5, write_matrix_csv, write_mex

    spec = SyntheticSpec(300, 120, seed=9)
    truth = spec.counts()
    source = tmp_path / {"csv": "m.csv", "10x-h5": "m.h5", "mex-gz": "mex"}[reader]
    {"csv": write_matrix_csv, "10x-h5": write_10x_h5, "mex-gz": write_mex}[reader](source, spec)
    store = str(tmp_path / "store.zarr")
    distumap.io.read(source, store, chunk_cells=64)
    rows = zarr.open_array(store, path=NONZERO, mode="r")[:]
    expected = [(truth[b : b + 64] != 0).sum(axis=0) for b in range(0, 300, 64)]
    np.testing.assert_array_equal(rows, expected)
    out = pp.preprocess(store)
    np.testing.assert_array_equal(out["zero_fraction"].values, _expected(truth)[0])

    # the statistics are those rows: one more non-zero cell for gene 0 shows in its fraction
    zarr.open_array(store, path=NONZERO, mode="r+")[0, 0] = rows[0, 0] + 1
    shifted = pp.preprocess(store, max_zero_fraction=0.4)["zero_fraction"].values
    assert shifted[0] == np.float32(((truth[:, 0] == 0).sum() - 1) / 300)
    # a store without them (written before they existed) reads the counts, same result
    drop_arrays(store, [NONZERO])
    again = pp.preprocess(store, max_zero_fraction=0.45)
    np.testing.assert_array_equal(again["zero_fraction"].values, _expected(truth)[0])


@pytest.mark.parametrize("dtype", ["int32", "int64", "uint16", "float32"])
def test_log2p1_values_follow_one_rule_bit_for_bit(dtype):
    """The table of small counts gives the bits of log2(x + 1.0) rounded once to float32, and
    values outside it (large, negative, fractional) are computed by that rule."""
    from distumap.pp._preprocess import log2p1_values

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
    values = [*range(5_000), 65535, 1_000_000, 2**31 - 1]  # every entry of the table, and past it
    if info is not None:
        values = [v for v in values if v <= info.max] + ([-1, -2, -5000] if info.min < 0 else [])
    else:
        values += [0.5, 3.25, -0.5]
    x = np.array(values * 3, dtype=dtype).reshape(3, -1)
    with np.errstate(divide="ignore", invalid="ignore"):  # log2(0) and log2 of a negative
        want = np.log2(x + 1.0).astype(np.float32)
        got = log2p1_values(x)
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_array_equal(got.view(np.int32), want.view(np.int32))
    assert log2p1_values(np.zeros((0, 4), dtype=dtype)).shape == (0, 4)
