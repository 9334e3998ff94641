"""Distributed for real: the CLI on a multi-process loopback cluster, as a job pod runs it.

One loopback cluster (``dask scheduler`` + two ``dask worker`` processes under nannies) serves the
module. Its workers preload a small module that pads every parse and transform task with a short
sleep before and after the real work, so that each stage lasts a few seconds whatever the load
of the machine and a test can kill a process while some, but not all, blocks are written. The
sleeps change no result; nothing here asserts a duration.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from distumap._store import progress_array
from distumap.io import open_store
from distumap.testing import SyntheticSpec, write_dataset

pytestmark = pytest.mark.cluster

SPEC = SyntheticSpec(3000, 2000, seed=5)
CHUNK = 100
N_BLOCKS = -(-SPEC.n_cells // CHUNK)
LANDMARKS = 600
#: seconds of sleep before and after each parse and transform task on the loopback workers
BLOCK_DELAY = 0.05
STORE_VARIABLES = ("counts", "zero_fraction", "selected", "X_umap", "landmark")
LOOM_DATASETS = ("matrix", "col_attrs/X_umap", "col_attrs/CellID", "row_attrs/Gene")
#: the store variable each stage's per-block markers vouch for
STAGE_DATA = {"ingest": "counts", "embed": "X_umap"}

PRELOAD = """\
import functools
import os
import time

from distumap.io import _ingest
from distumap.tl import _embed

DELAY = float(os.environ.get("DISTUMAP_TEST_BLOCK_DELAY", "0"))


def _padded(task):
    @functools.wraps(task)
    def padded(*args, **kwargs):
        time.sleep(DELAY)
        result = task(*args, **kwargs)
        time.sleep(DELAY)
        return result

    return padded


# tasks refer to these functions by module and name, so the workers run the padded ones
_ingest._read_block = _padded(_ingest._read_block)
_embed._transform_task = _padded(_embed._transform_task)
"""


# ---------------------------------------------------------------- helpers


def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    command = [sys.executable, "-m", "distumap.cli", *args]
    # worker processes, whatever the input's size: these tests kill them and watch them
    # come back (a small input's command would otherwise run its workers as threads)
    environment = {
        **os.environ,
        "DISTUMAP_TRACEBACK": "1",
        "DASK_DISTUMAP__IN_PROCESS_BELOW": "0",
        **(env or {}),
    }
    environment.pop("DASK_SCHEDULER_ADDRESS", None)
    return command, environment


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command, environment = _cli(*args, env=env)
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=540)
    assert done.returncode == 0, f"{' '.join(args)}\n{done.stdout}\n{done.stderr[-4000:]}"
    return done


def _run_args(data: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(data["matrix"]),
        "--metadata",
        str(data["metadata"]),
        "--out",
        str(out),
        "--chunk-cells",
        str(CHUNK),
        "--pca",
        "10",
        "--no-progress",
        *extra,
    ]


def _results(out: Path) -> dict[str, np.ndarray]:
    ds = open_store(out / "store.zarr", require="embed")
    result = {name: ds[name].values for name in (*STORE_VARIABLES, "cell", "gene")}
    with h5py.File(out / "embedding.loom", "r") as f:
        result.update({f"loom:{name}": f[name][()] for name in LOOM_DATASETS})
    return result


def _assert_same(out: Path, reference: dict[str, np.ndarray]) -> None:
    result = _results(out)
    assert result.keys() == reference.keys()
    for name, values in reference.items():
        np.testing.assert_array_equal(result[name], values, err_msg=name)
    assert int(result["landmark"].sum()) == LANDMARKS


def _stage_record(store: Path, stage: str) -> dict:
    """The stage's record as `distumap info STORE --json` prints it."""
    from distumap.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["info", str(store), "--json"]) == 0
    return json.loads(printed.getvalue())[stage]


def _worker_pids(cluster) -> list[int]:
    """PIDs of the worker processes (not their nannies), asked of the workers themselves."""
    with cluster.client() as client:
        return sorted(client.run(os.getpid).values())


class BlockWatch:
    """Polls a store's per-block markers and remembers, for every block seen finished, the
    modification times of its data chunk and of its marker; a block written again after its
    marker was set would change them."""

    def __init__(self, store: Path):
        self.store = store
        self.seen: dict[str, dict[int, tuple[int | None, int | None]]] = {s: {} for s in STAGE_DATA}

    def markers(self, stage: str) -> np.ndarray | None:
        for _ in range(5):
            try:
                return progress_array(self.store, stage, mode="r")[:]
            except Exception:  # not created yet, or a marker chunk caught mid-write
                time.sleep(0.02)
        return None

    def _mtimes(self, stage: str, block: int) -> tuple[int | None, int | None]:
        def mtime(path: Path) -> int | None:
            try:
                return path.stat().st_mtime_ns
            except FileNotFoundError:
                return None

        return (
            mtime(self.store / STAGE_DATA[stage] / "c" / str(block) / "0"),
            mtime(self.store / "_progress" / stage / "c" / str(block)),
        )

    def poll(self) -> dict[str, np.ndarray | None]:
        state = {}
        for stage in STAGE_DATA:
            markers = state[stage] = self.markers(stage)
            if markers is None:
                continue
            for block in np.flatnonzero(markers):
                self.seen[stage].setdefault(int(block), self._mtimes(stage, int(block)))
        return state

    def assert_written_once(self) -> None:
        for stage, blocks in self.seen.items():
            for block, first in blocks.items():
                assert first[0] is not None and first[1] is not None, (stage, block)
                assert self._mtimes(stage, block) == first, f"{stage} block {block} rewritten"


def _kill_mid_stage(
    proc: subprocess.Popen,
    watch: BlockWatch,
    stage: str,
    pid: int,
    deadline: float,
    *,
    markers: str | None = None,
) -> int:
    """SIGKILL ``pid`` once some but not all of ``stage``'s blocks are written (by the first
    ``N_BLOCKS`` of the ``markers`` progress array instead, where given); returns how many
    were written at the moment of the kill."""
    name = markers or stage

    def written() -> np.ndarray | None:
        state = watch.markers(name)
        return None if state is None or len(state) < N_BLOCKS else state[:N_BLOCKS]

    while True:
        assert proc.poll() is None, f"the run ended before the {stage} kill: {proc.returncode}"
        assert time.monotonic() < deadline, f"the {stage} stage did not start in time"
        watch.poll()
        done = written()
        if done is not None and N_BLOCKS // 5 <= done.sum() < N_BLOCKS:
            os.kill(pid, signal.SIGKILL)
            after = written()
            assert after is not None and not after.all(), f"{stage} finished before the kill"
            return int(done.sum())
        time.sleep(0.03)


def _start_cli(args: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`distumap` in the background, its stderr to ``log``."""
    command, environment = _cli(*args, env=env)
    with open(log, "wb") as stderr:
        return subprocess.Popen(command, env=environment, stderr=stderr)


def _watch_until_exit(proc: subprocess.Popen, watch: BlockWatch, timeout: float = 400) -> None:
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "the run did not finish in time"
        watch.poll()
        time.sleep(0.05)


def _replacement_pids(cluster, killed: set[int], timeout: float = 120) -> list[int]:
    """The worker pids once the nannies replaced every killed worker."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = _worker_pids(cluster)
        if len(pids) == 2 and not killed & set(pids):
            return pids
        time.sleep(0.2)
    raise AssertionError(f"the nannies did not replace the killed workers {killed}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    matrix, metadata = write_dataset(tmp_path_factory.mktemp("cluster-data"), SPEC)
    return {"matrix": matrix, "metadata": metadata}


@pytest.fixture(scope="module")
def embedded_run(data, tmp_path_factory):
    """The reference run, started first and left to run beside the cluster's start: `distumap
    run` on its embedded cluster of two worker processes. The landmark count comes from the
    flag, which overrides the environment's setting."""
    out = tmp_path_factory.mktemp("embedded")
    args = _run_args(data, out, "--landmarks", str(LANDMARKS), "--n-workers", "2")
    args += ["--memory-limit", "2GiB", "--dashboard-address", ":0"]
    proc = _start_cli(args, out.parent / "embedded.log", env={"DASK_DISTUMAP__LANDMARKS": "50"})
    yield proc, out
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def cluster(embedded_run, s3_environment, tmp_path_factory):
    from conftest import start_loopback_cluster, stop_loopback_cluster

    directory = tmp_path_factory.mktemp("cluster")
    preload = directory / "distumap_test_padding.py"
    preload.write_text(PRELOAD)
    env = {
        **(s3_environment or {}),
        "DISTUMAP_TEST_BLOCK_DELAY": str(BLOCK_DELAY),
        # conftest's `preload` goes to the scheduler; workers take theirs from dask's config
        "DASK_DISTRIBUTED__WORKER__PRELOAD": repr([str(preload)]),
    }
    started = start_loopback_cluster(directory, n_workers=2, memory_limit="2GiB", env=env)
    yield started
    stop_loopback_cluster(started)


@pytest.fixture(scope="module")
def loopback(cluster, data, tmp_path_factory) -> Path:
    """`distumap run --scheduler-file` on the loopback cluster, undisturbed; the landmark count
    comes from the environment only."""
    out = tmp_path_factory.mktemp("loopback")
    _run_cli(
        *_run_args(data, out, "--scheduler-file", str(cluster.scheduler_file)),
        env={"DASK_DISTUMAP__LANDMARKS": str(LANDMARKS)},
    )
    return out


@pytest.fixture(scope="module")
def embedded(embedded_run) -> dict:
    proc, out = embedded_run
    proc.wait(timeout=540)
    assert proc.returncode == 0, (out.parent / "embedded.log").read_text()[-4000:]
    return {"out": out, "results": _results(out)}


# ---------------------------------------------------------------- tests


@pytest.mark.slow
def test_scheduler_file_run_equals_embedded_run(loopback, embedded):
    _assert_same(loopback, embedded["results"])
    ds = open_store(loopback / "store.zarr", require="embed")
    assert ds["counts"].data.chunks[0] == (CHUNK,) * N_BLOCKS
    np.testing.assert_array_equal(ds["counts"].values, SPEC.counts())  # and equals the CSV


@pytest.mark.slow
def test_settings_come_from_the_environment_and_flags_override_them(loopback, embedded):
    # DASK_DISTUMAP__LANDMARKS=600 and no flag: the environment configures the run
    assert _stage_record(loopback / "store.zarr", "embed")["params"]["landmarks"] == LANDMARKS
    # DASK_DISTUMAP__LANDMARKS=50 and --landmarks 600: the flag wins
    assert (
        _stage_record(embedded["out"] / "store.zarr", "embed")["params"]["landmarks"] == LANDMARKS
    )
    assert _stage_record(loopback / "store.zarr", "ingest")["params"]["chunk_cells"] == CHUNK


@pytest.mark.slow
def test_run_with_s3_urls_on_the_cluster(cluster, s3_endpoint, tmp_path, monkeypatch):
    """A job pod's run against an object store: the CSV, the metadata and every output are
    s3:// URLs, read and written by the worker processes (and the loom uploaded by the client)."""
    import s3fs

    for name, value in s3_endpoint.items():
        monkeypatch.setenv(name, value)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem()
    spec = SyntheticSpec(400, 200, seed=7)
    matrix, metadata = write_dataset(tmp_path, spec)
    bucket = "distumap-cluster"
    fs.mkdir(bucket)
    fs.put_file(str(matrix), f"{bucket}/matrix.csv")
    fs.put_file(str(metadata), f"{bucket}/metadata.csv")
    url = f"s3://{bucket}"
    try:
        _run_cli(
            "run", f"{url}/matrix.csv", "--metadata", f"{url}/metadata.csv", "--out", f"{url}/out",
            "--chunk-cells", "64", "--landmarks", "150", "--pca", "5", "--no-progress",
            "--scheduler-file", str(cluster.scheduler_file),
            env=s3_endpoint,
        )  # fmt: skip
        assert not (Path.cwd() / "s3:").exists()
        assert {Path(name).name for name in fs.ls(f"{bucket}/out")} == {
            "store.zarr", "embedding.loom", "embedding.h5ad", "umap.png", "umap.html"
        }  # fmt: skip
        # read back what landed in S3 through the filesystem that wrote the inputs: a fresh s3fs
        # instance in this process sometimes finds no credentials (seen once in three runs)
        local = tmp_path / "from-s3.zarr"
        fs.get(f"{bucket}/out/store.zarr", str(local), recursive=True)
        ds = open_store(local, require="embed")
        assert ds.attrs["distumap"]["stages"]["ingest"]["params"]["matrix"] == f"{url}/matrix.csv"
        counts = spec.counts()
        np.testing.assert_array_equal(ds["counts"].values, counts)
        zeros = (counts == 0).sum(axis=0) / spec.n_cells
        np.testing.assert_array_equal(ds["zero_fraction"].values, zeros.astype(np.float32))
        np.testing.assert_array_equal(ds["selected"].values, zeros < 0.5)
        assert int(ds["landmark"].sum()) == 150 and np.isfinite(ds["X_umap"].values).all()
        assert progress_array(local, "embed", mode="r")[:].all()
        with h5py.File(io.BytesIO(fs.cat(f"{bucket}/out/embedding.loom")), "r") as f:
            np.testing.assert_array_equal(f["matrix"][()], counts[:, zeros < 0.5].T)
            np.testing.assert_array_equal(f["col_attrs/X_umap"][()], ds["X_umap"].values)
            assert f["col_attrs/CellID"].asstr()[()].tolist() == spec.cell_names().tolist()
        with h5py.File(io.BytesIO(fs.cat(f"{bucket}/out/embedding.h5ad")), "r") as f:
            np.testing.assert_array_equal(f["obsm/X_umap"][()], ds["X_umap"].values)
    finally:
        fs.rm(bucket, recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.mark.slow
def test_killed_client_resumes_with_the_same_command(cluster, data, embedded, tmp_path):
    out = tmp_path / "out"
    store = out / "store.zarr"
    args = _run_args(
        data, out, "--landmarks", str(LANDMARKS), "--scheduler-file", str(cluster.scheduler_file)
    )
    watch = BlockWatch(store)
    proc = _start_cli(args, tmp_path / "killed-client.log")
    try:
        transformed = _kill_mid_stage(
            proc, watch, "embed", proc.pid, time.monotonic() + 300, markers="embed-refine"
        )
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    print(f"killed with {transformed} of {N_BLOCKS} blocks written")
    assert 0 < transformed < N_BLOCKS
    before = {stage: dict(blocks) for stage, blocks in watch.seen.items()}
    token = _stage_record(store, "embed")["token"]
    model = store / "umap_model" / "landmark_embedding" / "c" / "0" / "0"
    fitted = model.stat().st_mtime_ns  # the fit finished before the transform began

    _run_cli(*args)  # the same command again

    _assert_same(out, embedded["results"])
    # it resumed: the same fit, and the blocks written before the kill were not written again
    assert _stage_record(store, "embed")["params"]["landmarks"] == LANDMARKS
    assert _stage_record(store, "embed")["token"] == token
    assert model.stat().st_mtime_ns == fitted  # not fitted again
    watch.seen = before
    watch.assert_written_once()


@pytest.mark.slow
def test_workers_killed_mid_ingest_and_mid_transform_are_replaced(
    cluster, data, embedded, tmp_path
):
    out = tmp_path / "out"
    store = out / "store.zarr"
    watch = BlockWatch(store)
    first = _worker_pids(cluster)
    args = _run_args(
        data, out, "--landmarks", str(LANDMARKS), "--scheduler-file", str(cluster.scheduler_file)
    )
    log = tmp_path / "run.log"
    proc = _start_cli(args, log)
    try:
        deadline = time.monotonic() + 300
        ingested = _kill_mid_stage(proc, watch, "ingest", first[0], deadline)
        # the other original worker, which is busy: its partner may still be restarting. The
        # transform's blocks are the first markers of the embed stage's steps (the stage's own
        # markers are set by the refinement's last epoch, too quick a window to aim at)
        transformed = _kill_mid_stage(
            proc, watch, "embed", first[1], deadline, markers="embed-refine"
        )
        _watch_until_exit(proc, watch)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    print(f"killed with {ingested} and {transformed} of {N_BLOCKS} blocks written")
    assert 0 < ingested < N_BLOCKS and 0 < transformed < N_BLOCKS
    # the nannies replaced both killed workers
    assert not set(first) & set(_replacement_pids(cluster, set(first)))
    # the same result as the undisturbed run: no block missing
    _assert_same(out, embedded["results"])
    # ... and none written twice: every block seen finished kept its chunk and marker untouched
    watch.poll()
    assert len(watch.seen["ingest"]) == len(watch.seen["embed"]) == N_BLOCKS
    watch.assert_written_once()


def test_killed_worker_error_names_the_stage_and_the_block():
    import dask
    from distributed import Client, LocalCluster

    from distumap._compute import run

    # os._exit is importable everywhere: the task kills whichever worker process runs it
    task = dask.delayed(os._exit, pure=False)(1, dask_key_name="parse-csv-block-0123abcd-7")
    with (
        dask.config.set({"distributed.scheduler.allowed-failures": 1}),
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit="1GiB",
            dashboard_address=":0",
        ) as local,
        Client(local) as client,
    ):
        with pytest.raises(RuntimeError) as caught:
            run([task], stage="ingest: parse blocks")
        message = str(caught.value)
        assert message.startswith("ingest: parse blocks: Dask gave up on task")
        assert "'parse-csv-block-0123abcd-7'" in message and "(parse-csv-block)" in message
        assert "Re-running the same command resumes" in message
        # the nanny kept replacing the worker it killed
        client.wait_for_workers(1, timeout=60)


# ---------------------------------------------------------------- every stage alone


def _stage_commands(data: dict[str, Path], out: Path, *cluster: str) -> list[list[str]]:
    store = str(out / "store.zarr")
    common = ["--no-progress", *cluster]
    return [
        [
            "ingest",
            str(data["matrix"]),
            store,
            "--metadata",
            str(data["metadata"]),
            "--chunk-cells",
            str(CHUNK),
            *common,
        ],
        ["preprocess", store, *common],
        ["embed", store, "--landmarks", str(LANDMARKS), "--pca", "10", *common],
        ["export", store, str(out / "embedding.loom"), *common],
    ]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "loopback"])
def test_each_stage_alone_on_a_fresh_cluster_equals_run(where, data, embedded, tmp_path):
    """Each CLI stage in its own process, on a cluster whose workers never imported distumap:
    a fresh worker unpickling a stage's task function is a fresh interpreter."""
    from conftest import start_loopback_cluster, stop_loopback_cluster

    from distumap._format import check_store

    out = tmp_path / "out"
    out.mkdir()
    for number, command in enumerate(_stage_commands(data, out)):
        if where == "embedded":
            args, environment = _cli(*command, "--n-workers", "2", "--dashboard-address", ":0")
            done = subprocess.run(
                args, env=environment, capture_output=True, text=True, timeout=300
            )
        else:
            fresh = start_loopback_cluster(tmp_path / f"cluster-{number}", n_workers=2)
            try:
                args, environment = _cli(*command, "--scheduler-file", str(fresh.scheduler_file))
                done = subprocess.run(
                    args, env=environment, capture_output=True, text=True, timeout=300
                )
            finally:
                stop_loopback_cluster(fresh)
        assert done.returncode == 0, f"{command[0]}: {done.stderr[-3000:]}"
        assert check_store(open_store(out / "store.zarr", require=None)) == []
    _assert_same(out, embedded["results"])


# ---------------------------------------------------------------- a cluster that vanishes


def _close_every_worker(log: Path) -> None:
    """Close every worker of the cluster whose address the CLI printed to ``log``, nannies
    included, as a cluster that loses its machines does (an embedded cluster's nannies live in
    the CLI process and would restart killed worker processes)."""
    from distributed import Client

    line = next(x for x in log.read_text().splitlines() if "Dask scheduler at" in x)
    with Client(line.rsplit(" ", 1)[1], timeout=30) as client:
        client.run_on_scheduler(
            lambda dask_scheduler: [dask_scheduler.close_worker(w) for w in dask_scheduler.workers]
        )


def _add_workers(cluster, directory: Path, n: int) -> None:
    """Start ``n`` more `dask worker` processes (each with its nanny) for ``cluster``."""
    from conftest import _dask_command

    for i in range(n):
        cluster.workers.append(
            subprocess.Popen(
                _dask_command(
                    "worker",
                    "--scheduler-file",
                    str(cluster.scheduler_file),
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    "2GiB",
                    "--host",
                    "127.0.0.1",
                    "--local-directory",
                    str(directory / f"late-worker-{i}"),
                ),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )
    with cluster.client() as client:
        client.wait_for_workers(n, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["embedded", "loopback"])
def test_losing_every_worker_exits_in_bounded_time_and_resumes(where, data, embedded, tmp_path):
    from conftest import start_loopback_cluster, stop_loopback_cluster

    out, store = tmp_path / "out", tmp_path / "out" / "store.zarr"
    preload = tmp_path / "distumap_test_padding.py"
    preload.write_text(PRELOAD)
    env = {
        "DASK_DISTUMAP__NO_WORKERS_TIMEOUT": "4s",
        "DISTUMAP_TEST_BLOCK_DELAY": "0.1",
        "DASK_DISTRIBUTED__WORKER__PRELOAD": repr([str(preload)]),
        "DISTUMAP_TRACEBACK": "",  # the one line a user sees
    }
    fresh = None
    if where == "loopback":
        fresh = start_loopback_cluster(tmp_path / "cluster", n_workers=2, env=env)
        cluster_args = ["--scheduler-file", str(fresh.scheduler_file)]
    else:
        cluster_args = ["--n-workers", "2", "--dashboard-address", ":0"]
    args = [*_run_args(data, out, "--landmarks", str(LANDMARKS)), *cluster_args]
    watch = BlockWatch(store)
    log = tmp_path / "lost.log"
    proc = _start_cli(args, log, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:  # until some, not all, blocks are ingested
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "the ingest did not start in time"
            markers = watch.poll()["ingest"]
            if markers is not None and N_BLOCKS // 5 <= markers.sum() < N_BLOCKS // 2:
                break
            time.sleep(0.03)
        if fresh is not None:
            for worker in fresh.workers:  # each `dask worker` group: nanny and worker
                os.killpg(worker.pid, signal.SIGKILL)
        else:
            _close_every_worker(log)
        proc.wait(timeout=120)  # bounded: the timeout, a poll, and closing the cluster
        watch.poll()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, log.read_text()[-3000:]
    errors = [line for line in log.read_text().splitlines() if line.startswith("distumap: error")]
    assert len(errors) == 1 and errors[0].startswith("distumap: error: ClusterError: ingest")
    assert "no Dask worker was available for 4" in errors[0] and "resumable" in errors[0]
    assert _stage_record(store, "ingest")["status"] == "started"
    written = int(watch.markers("ingest").sum())
    assert 0 < written < N_BLOCKS
    try:
        if fresh is not None:  # the same command resumes once workers are back
            _add_workers(fresh, tmp_path / "cluster", 2)
        rerun = _start_cli(args, tmp_path / "resumed.log", env=env)
        _watch_until_exit(rerun, watch)
        assert rerun.returncode == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    finally:
        if fresh is not None:
            stop_loopback_cluster(fresh)
    _assert_same(out, embedded["results"])
    watch.assert_written_once()  # the blocks ingested before the loss were not parsed again
