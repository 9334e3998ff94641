"""A small input's command: workers as threads of the command's process, the same bits as worker
processes, and no module the command does not use."""

from __future__ import annotations

import gc
import json
import multiprocessing
import os
import subprocess
import sys

import dask
import h5py
import numpy as np
import pytest
import zarr

from distumap.cli import _in_process, build_parser
from distumap.testing import SyntheticSpec, write_dataset

#: what an ingest of a CSV never needs in the command's process
NOT_FOR_AN_INGEST = (
    "anndata",
    "scanpy",
    "matplotlib",
    "umap",
    "pynndescent",
    "sklearn",
    "loompy",
    "distumap.pp",
    "distumap.tl",
    "distumap.pl",
    "distumap.io.writers",
)


def _args(*argv: str):
    return build_parser().parse_args(list(argv))


def test_only_small_local_inputs_of_ingest_and_run_run_in_process(tmp_path):
    small = tmp_path / "small.csv"
    small.write_bytes(b"x" * 1000)
    folder = tmp_path / "mex"
    folder.mkdir()
    for name in ("matrix.mtx", "features.tsv", "barcodes.tsv"):
        (folder / name).write_bytes(b"x" * 700)
    assert _in_process(_args("ingest", str(small), "s.zarr"))
    assert _in_process(_args("run", str(small), f"file://{small}", "--out", "o"))
    with dask.config.set({"distumap.in-process-below": 2000}):
        assert _in_process(_args("ingest", str(small), "s.zarr"))
        assert not _in_process(_args("ingest", str(small), str(small), "s.zarr"))  # 2000 bytes
        assert not _in_process(_args("ingest", str(folder), "s.zarr"))  # its files: 2100
    with dask.config.set({"distumap.in-process-below": 0}):
        assert not _in_process(_args("ingest", str(small), "s.zarr"))
    # a URL's size is not asked for, a missing file is the ingest's to report
    assert not _in_process(_args("ingest", str(small), "memory://other.csv", "s.zarr"))
    assert not _in_process(_args("ingest", str(tmp_path / "missing.csv"), "s.zarr"))
    # the later stages read a store: their workers stay processes
    assert not _in_process(_args("preprocess", "s.zarr"))
    assert not _in_process(_args("demo", "--out", str(tmp_path / "demo")))


@pytest.mark.cluster
def test_a_small_ingest_loads_no_science_no_writer_and_no_worker_process(tmp_path):
    """Run as a user runs it, in a fresh interpreter: the command's own imports are the ones
    it needs, and its workers are threads (no other process is started)."""
    matrix, _ = write_dataset(tmp_path / "in", SyntheticSpec(200, 300, seed=1))
    code = (
        "import json, multiprocessing, sys; from distumap.cli import main; "
        f"code = main(['ingest', {str(matrix)!r}, {str(tmp_path / 's.zarr')!r}, "
        "'--dashboard-address', ':0', '--no-progress']); "
        "print(json.dumps({'code': code, 'modules': sorted(sys.modules), "
        "'children': len(multiprocessing.active_children())}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["code"] == 0
    assert "the workers are threads of this process" in done.stderr
    loaded = [m for m in result["modules"] if m.split(".")[0] in NOT_FOR_AN_INGEST[:7]]
    loaded += [m for m in result["modules"] if m.startswith(NOT_FOR_AN_INGEST[7:])]
    assert loaded == []
    assert "distumap.io._ingest" in result["modules"]  # the check saw the ingest itself
    assert result["children"] == 0


def _run(matrix, metadata, out, env: dict[str, str]) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distumap.cli", "run", str(matrix), "--metadata"]
    command += [str(metadata), "--out", str(out), "--landmarks", "300", "--pca", "10"]
    command += ["--chunk-cells", "200", "--no-progress", "--dashboard-address", ":0"]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=900, env={**os.environ, **env}
    )


#: what differs between any two runs: the records' timings, run ids, tokens (of the store's
#: path) and the loom's creation date
RECORDS = ("CreationDate", "distumap", "token", "run")


def _datasets(path) -> dict[str, np.ndarray]:
    found = {}

    def keep(name, node):
        last = name.rsplit("/", 1)[-1]
        if isinstance(node, h5py.Dataset) and not (last in RECORDS or last.endswith("seconds")):
            found[name] = node[()]

    with h5py.File(path, "r") as file:
        file.visititems(keep)
    return found


def _arrays(group, prefix: str = "") -> dict[str, np.ndarray]:
    found = {prefix + name: array[...] for name, array in group.arrays()}
    for name, inner in group.groups():
        found.update(_arrays(inner, f"{prefix}{name}/"))
    return found


@pytest.mark.cluster
@pytest.mark.slow
def test_a_small_run_in_threads_writes_the_bits_of_a_run_in_processes(tmp_path):
    """Landmarks, PCA, fit, transform and refinement, the exports' matrices: the same bits
    whether the workers are threads here or processes (whose BLAS is one thread)."""
    matrix, metadata = write_dataset(tmp_path / "in", SyntheticSpec(900, 300, seed=4))
    threads = _run(matrix, metadata, tmp_path / "threads", {})
    processes = _run(
        matrix, metadata, tmp_path / "processes", {"DASK_DISTUMAP__IN_PROCESS_BELOW": "0"}
    )
    assert threads.returncode == 0, threads.stderr[-3000:]
    assert processes.returncode == 0, processes.stderr[-3000:]
    assert "the workers are threads of this process" in threads.stderr
    assert "the workers are threads" not in processes.stderr
    mine, theirs = (
        _arrays(zarr.open_group(tmp_path / run / "store.zarr", mode="r"))
        for run in ("threads", "processes")
    )
    assert "X_umap" in mine and sorted(mine) == sorted(theirs)
    for name, values in mine.items():
        np.testing.assert_array_equal(values, theirs[name], err_msg=f"store: {name}")
    for export in ("embedding.loom", "embedding.h5ad"):
        mine, theirs = (_datasets(tmp_path / run / export) for run in ("threads", "processes"))
        assert sorted(mine) == sorted(theirs)
        assert "col_attrs/X_umap" in mine or "obsm/X_umap" in mine
        for name, values in mine.items():
            np.testing.assert_array_equal(values, theirs[name], err_msg=f"{export}: {name}")


def _freeze_count_in_a_worker_process(queue) -> None:
    from distumap._workers import _freeze_if_worker_process

    _freeze_if_worker_process()
    queue.put(gc.get_freeze_count())


def test_only_a_process_that_ends_freezes_its_objects(tmp_path):
    """The command's process (``main()`` without arguments) and a closing worker process skip
    the collector's walk at their exit; a caller of ``main(argv)`` and the process of in-process
    workers go on, and keep a collected heap."""
    from distumap._workers import _freeze_if_worker_process
    from distumap.cli import main

    before = gc.get_freeze_count()
    assert main(["info", str(tmp_path / "no-store.zarr")]) != 0
    _freeze_if_worker_process()
    assert gc.get_freeze_count() == before
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_freeze_count_in_a_worker_process, args=(queue,))
    child.start()
    assert queue.get(timeout=300) > 0
    child.join(timeout=60)


@pytest.mark.cluster
def test_thread_workers_never_pause_for_the_memory_of_the_process_they_share():
    # a thread worker measures the whole process (client and scheduler included): one paused
    # above its share of the limit would wait forever, as no nanny restarts it
    import time

    import psutil

    from distumap import cluster

    limit = 200 * 2**20
    assert psutil.Process().memory_info().rss > 0.8 * limit  # a worker process would pause
    client = cluster.connect(n_workers=1, memory_limit=limit, processes=False, quiet=True)
    try:
        time.sleep(1)  # several rounds of a memory monitor, were one running
        assert client.submit(sum, [1, 2], pure=False).result(timeout=30) == 3
        (worker,) = client.scheduler_info()["workers"].values()
        assert worker["memory_limit"] == limit  # still there for distumap._memory's estimates
    finally:
        cluster.close(client)
