"""Memory known before the work: a fit or a block that cannot fit in a worker is refused with
exit 2, the numbers and the flag that fixes it, before anything heavy runs; the store stays
resumable and the same command with the flag finishes."""

from __future__ import annotations

import os
import subprocess
import sys

import dask
import pytest
from distributed import Client, LocalCluster

from distumap import _memory
from distumap._errors import InputError
from distumap._store import stage_record
from distumap.testing import SyntheticSpec, write_dataset

GIB = 2**30


@pytest.fixture(scope="module")
def small_client():
    """One worker process with two threads and a 1 GiB memory limit."""
    cluster = LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        memory_limit="1GiB",
        dashboard_address=":0",
    )
    with cluster, Client(cluster) as client:
        yield client


def test_fit_estimate_grows_with_the_landmark_matrix_and_pca_costs_less():
    base = _memory.fit_bytes(20_000, 4_078, 50)
    assert _memory.fit_bytes(40_000, 4_078, 50) > base
    assert _memory.fit_bytes(20_000, 10_000, 50) > base
    assert _memory.fit_bytes(20_000, 4_078, 0) > base  # umap-learn on the genes themselves
    # the input itself (0.30 GiB) is part of what the fit holds
    assert base > 20_000 * 4_078 * 4


def test_workers_report_their_limit_and_threads(small_client):
    (worker,) = _memory.workers(small_client)
    assert worker["memory_limit"] == GIB and worker["nthreads"] == 2
    assert 0 < worker["memory"] < GIB


def test_blocks_are_fitted_to_the_workers_memory(small_client):
    # two tasks at once, each holding BLOCK_COPIES int32 copies of its block
    room = _memory.USABLE_SHARE * GIB - _memory.BLOCK_WORKER
    per_cell = _memory.BLOCK_COPIES * 50_281 * 4
    expected = int(room / 2 // per_cell) // 64 * 64
    assert 0 < expected < 1024
    assert _memory.fit_chunk_cells(small_client, 1024, 50_281) == expected
    assert _memory.fit_chunk_cells(small_client, 128, 50_281) == 128  # fits: unchanged
    assert _memory.fit_chunk_cells(small_client, 1024, 50_000_000) == 0  # nothing fits
    with pytest.raises(InputError, match=rf"re-ingest with --chunk-cells {expected}\b"):
        _memory.check_blocks(small_client, "preprocess", 1024, 50_281)
    _memory.check_blocks(small_client, "preprocess", expected, 50_281)
    with dask.config.set({"distumap.memory-check": False}):
        assert _memory.fit_chunk_cells(small_client, 1024, 50_281) == 1024
        _memory.check_blocks(small_client, "preprocess", 1024, 50_281)


def test_a_fit_too_large_names_the_flags_that_fix_it(small_client):
    with pytest.raises(InputError) as error:
        _memory.check_fit(small_client, 20_000, 4_078, 50, 30)
    message = str(error.value)
    assert "20,000 landmarks x 4,078 genes (50 PCs)" in message
    assert "memory limit is 1.0 GiB" in message
    flag = float(message.split("--memory-limit ")[1].split("GiB")[0])
    landmarks = int(message.split("--landmarks ")[1].split(")")[0])
    assert 1.0 < flag <= 3.0 and 1_000 <= landmarks < 20_000
    # what the message proposes does fit
    _memory.check_fit(small_client, landmarks, 4_078, 50, 30)
    _memory.check_fit(small_client, 2_000, 1_000, 50, 30)


def _refused_before_the_embed(matrix, out, options: list[str], *expected: str) -> list[str]:
    """``distumap run`` with ``options`` exits 2 with ``expected`` in its last line, the
    preprocess finished and the embed not started (the store resumable); returns the command."""
    command = [sys.executable, "-m", "distumap.cli", "run", str(matrix), "--out", str(out)]
    refused = subprocess.run([*command, *options], capture_output=True, text=True)
    assert refused.returncode == 2, refused.stderr[-2000:]
    last = refused.stderr.strip().splitlines()[-1]
    assert all(text in last for text in expected), last
    store = str(out / "store.zarr")
    assert stage_record(store, "preprocess")["status"] == "complete"
    assert stage_record(store, "embed") is None  # refused before the stage started
    return command


def test_run_refuses_the_fit_before_it_starts_and_resumes_with_the_flag(tmp_path):
    spec = SyntheticSpec(800, 200, seed=5)
    matrix, _ = write_dataset(tmp_path, spec)
    out = tmp_path / "out"
    cluster = ["--n-workers", "1", "--no-progress"]
    command = _refused_before_the_embed(
        matrix,
        out,
        [*cluster, "--memory-limit", "700MiB"],
        "embed: the UMAP fit on 800 landmarks",
        "--memory-limit",
    )
    enough = subprocess.run(
        [*command, *cluster, "--memory-limit", "2GiB"], capture_output=True, text=True
    )
    assert enough.returncode == 0, enough.stderr[-2000:]
    assert stage_record(str(out / "store.zarr"), "embed")["status"] == "complete"


def test_an_ingest_fits_its_chunks_to_the_workers_before_reading(tmp_path, small_client):
    from distumap import io
    from distumap.testing import write_10x_h5

    spec = SyntheticSpec(700, 50_281, seed=3, depth=0.02)
    h5 = tmp_path / "wide.h5"
    write_10x_h5(h5, spec)
    expected = _memory.fit_chunk_cells(small_client, 1024, 50_281)
    assert 0 < expected < 700
    with pytest.raises(InputError, match=rf"--chunk-cells {expected}\b"):
        io.read(h5, tmp_path / "asked.zarr", chunk_cells=1024, progress=False)
    assert stage_record(tmp_path / "asked.zarr", "ingest") is None  # refused before any work
    with pytest.warns(UserWarning, match=rf"using {expected:,} cells per chunk"):
        ds = io.read(h5, tmp_path / "fitted.zarr", progress=False)
    assert ds["counts"].data.chunks[0][0] == expected
    assert int(ds["counts"].sum()) == int(spec.counts().sum())
    # the finished store keeps its chunks whatever the workers have now
    with dask.config.set({"distumap.memory-check": False}):
        again = io.read(h5, tmp_path / "fitted.zarr", progress=False)
    assert again["counts"].data.chunks == ds["counts"].data.chunks


def test_refinement_estimate_grows_with_the_cells_and_the_features():
    base = _memory.refine_bytes(1_000_000, 50)
    assert _memory.search_passes(1_000_000, 50) == 1
    assert _memory.refine_bytes(500_000, 50) < base
    assert _memory.refine_bytes(1_000_000, 500) > base  # wide features: the search holds them
    # past one pass the search holds a range of buckets' features: ten million cells need
    # more (every cell's bucket and position) but not ten times more
    assert _memory.search_passes(10_000_000, 50) == 8
    assert base < _memory.refine_bytes(10_000_000, 50) < 1.5 * base
    # at a million cells it lies above the largest worker's peak measured there (1.08 GiB)
    assert _memory.WARMED_WORKER + base > 1.08 * GIB


def test_a_refinement_too_large_names_the_flags_that_fix_it(small_client):
    with pytest.raises(InputError) as error:
        _memory.check_refine(small_client, 2_000_000, 50)
    message = str(error.value)
    assert "refinement of 2,000,000 cells" in message and "memory limit is 1.0 GiB" in message
    assert "(--refine-epochs 0)" in message
    flag = float(message.split("--memory-limit ")[1].split("GiB")[0])
    need = _memory.WARMED_WORKER + _memory.refine_bytes(2_000_000, 50)
    # the proposed limit is the smallest tenth of a GiB under which the estimate fits
    assert need <= _memory.USABLE_SHARE * flag * GIB
    assert need > _memory.USABLE_SHARE * (flag - 0.1) * GIB
    _memory.check_refine(small_client, 200_000, 50)
    with dask.config.set({"distumap.memory-check": False}):
        _memory.check_refine(small_client, 2_000_000, 50)


def test_the_client_refuses_more_cells_than_its_machine_holds():
    import psutil

    too_many = 2 * psutil.virtual_memory().total // _memory.CLIENT_PER_CELL
    with pytest.raises(InputError, match=rf"^export: {too_many:,} cells need about"):
        _memory.check_client(too_many, "export")
    _memory.check_client(100_000, "export")
    with dask.config.set({"distumap.memory-check": False}):
        _memory.check_client(too_many, "export")


def test_run_refuses_a_refinement_too_large_before_the_embed_starts(tmp_path):
    # 450,000 cells of 60 genes: a fit of 300 landmarks on 50 components is small, the
    # refinement's search through every cell's 50 components is not, for workers of 0.75 GiB
    spec = SyntheticSpec(450_000, 60, seed=2, n_subclasses=3, depth=100)  # 54 genes kept
    matrix, _ = write_dataset(tmp_path, spec)
    options = ["--n-workers", "1", "--memory-limit", "0.75GiB", "--landmarks", "300"]
    options += ["--chunk-cells", "65536", "--no-progress"]  # few tasks: the refusal is tested
    _refused_before_the_embed(
        matrix,
        tmp_path / "out",
        options,
        "embed: the refinement of 450,000 cells",
        "--refine-epochs 0",
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_command_bounds_its_heap_unless_the_environment_says_otherwise():
    """The command's own process gets two heap arenas and an eager trim (the client's peak at
    1M cells fell 0.74 -> 0.60 GiB in RESULTS "The client's heap"); a variable the environment
    sets is left to glibc."""
    code = "from distumap._compute import tune_allocator; print(sorted(tune_allocator().items()))"

    def applied(**env: str) -> str:
        environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        done = subprocess.run(
            [sys.executable, "-c", code], env={**environment, **env}, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert applied() == "[('MALLOC_ARENA_MAX', 2), ('MALLOC_TRIM_THRESHOLD_', 65536)]"
    assert applied(MALLOC_ARENA_MAX="4") == "[('MALLOC_TRIM_THRESHOLD_', 65536)]"


def test_a_worker_cache_drops_its_oldest_value_before_building_a_new_one():
    """A pass's features replace the previous pass's: both at once would double the peak."""
    from distumap._workers import WorkerCache

    cache = WorkerCache(1)
    assert cache.get(("pass", 0), lambda: "first") == "first"
    assert cache.get(("pass", 0), lambda: "built again") == "first"
    held_while_building = cache.get(("pass", 1), lambda: len(cache._items))
    assert held_while_building == 0 and cache.get(("pass", 1), lambda: "again") == 0
