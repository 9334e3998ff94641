"""Paths a worker cannot see are refused before any work (exit 2, naming the path and the worker).

The cluster here really has a worker without the client's files: worker 1 runs in a mount
namespace of its own (``unshare -m``) with an empty tmpfs over the ``hidden`` folder, as a
machine without the client's file system would be. Worker 0 sees everything, so the message
must name the right worker. Where ``unshare`` or the mount is not allowed, these tests skip.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import dask
import fsspec
import pytest
from conftest import LoopbackCluster, start_loopback_cluster, stop_loopback_cluster

import distumap
from distumap._errors import InputError
from distumap._shared_paths import check_workers_see
from distumap.cli import main
from distumap.testing import synthetic_counts, write_dataset

#: run the command after it in a mount namespace where the folder ``$0`` is an empty tmpfs
PRIVATE_MOUNT = 'mount -t tmpfs distumap-hidden "$0" && exec "$@"'


def _unshare(folder: Path) -> list[str]:
    return ["unshare", "-m", "--propagation", "private", "sh", "-c", PRIVATE_MOUNT, str(folder)]


def _why_no_private_mounts(folder: Path) -> str | None:
    """Why a process cannot be given a private mount here, or None when it can."""
    if shutil.which("unshare") is None:
        return "no unshare command (util-linux) to give a worker a mount namespace of its own"
    folder.mkdir(parents=True, exist_ok=True)
    probe = subprocess.run(
        [*_unshare(folder), "true"], capture_output=True, text=True, timeout=30, check=False
    )
    if probe.returncode != 0:
        return f"unshare -m with a tmpfs mount is not allowed here: {probe.stderr.strip()}"
    return None


@dataclass
class Walled:
    cluster: LoopbackCluster
    shown: Path  # the same folder for the client and both workers
    hidden: Path  # the client's files; worker 1 sees an empty folder of its own there
    hidden_worker: str  # worker 1's address

    def cli(self, *args: str) -> list[str]:
        return [*args, "--no-progress", "--scheduler-file", str(self.cluster.scheduler_file)]


@pytest.fixture(scope="module")
def walled(tmp_path_factory) -> Walled:
    root = tmp_path_factory.mktemp("walled")
    shown, hidden = root / "shown", root / "hidden"
    shown.mkdir()
    why = _why_no_private_mounts(hidden)
    if why:
        pytest.skip(why)
    cluster = start_loopback_cluster(
        root / "cluster",
        n_workers=2,
        memory_limit="1GiB",
        worker_prefix=lambda i: _unshare(hidden) if i == 1 else [],
    )
    try:
        (hidden / "here").touch()
        with cluster.client() as client:
            seen = client.run(os.path.exists, str(hidden / "here"))
        (hidden / "here").unlink()
        assert sorted(seen.values()) == [False, True], seen  # the wall stands
        yield Walled(cluster, shown, hidden, next(a for a, s in seen.items() if not s))
    finally:
        stop_loopback_cluster(cluster)


def _matrix(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return write_dataset(folder, synthetic_counts(60, 20, seed=5))[0]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.cluster
def test_an_input_a_worker_cannot_see_is_exit_2_before_any_work(walled, capsys):
    matrix = _matrix(walled.hidden / "input")
    store = walled.shown / "from-hidden.zarr"
    before = sorted(os.listdir(walled.shown))
    assert main(walled.cli("ingest", str(matrix), str(store))) == 2
    line = _error_line(capsys)
    assert line.startswith(f"distumap: error: {matrix}: worker {walled.hidden_worker} (host ")
    assert "cannot see it (no such file or folder there)" in line
    assert "a file system that every worker shares" in line and "object store URL" in line
    assert sorted(os.listdir(walled.shown)) == before  # no store, no probe left behind


@pytest.mark.cluster
def test_a_store_folder_a_worker_cannot_see_is_exit_2_and_nothing_is_made(walled, capsys):
    matrix = _matrix(walled.shown / "input")
    store = walled.hidden / "out" / "store.zarr"
    before = sorted(os.listdir(walled.hidden))
    assert main(walled.cli("ingest", str(matrix), str(store))) == 2
    line = _error_line(capsys)
    assert line.startswith(f"distumap: error: {store}: worker {walled.hidden_worker} (host ")
    # worker 1 has a writable folder of that name, but it is its own
    assert f"its {walled.hidden} is another folder" in line
    assert sorted(os.listdir(walled.hidden)) == before


@pytest.mark.cluster
def test_every_stage_of_the_api_refuses_a_store_a_worker_cannot_see(walled):
    matrix = _matrix(walled.shown / "input")
    store = walled.hidden / "made-by-threads.zarr"
    with dask.config.set(scheduler="threads"):  # in this process, which sees it
        distumap.pp.preprocess(distumap.io.read(str(matrix), store, chunk_cells=32))
    ds = distumap.io.open_store(store, require="preprocess")
    named = f"{store}: worker {walled.hidden_worker} .* cannot see it \\(no such folder there\\)"
    with walled.cluster.client():
        with pytest.raises(InputError, match=named):
            distumap.io.read(str(matrix), store, chunk_cells=32)  # a resume
        with pytest.raises(InputError, match=named):
            distumap.pp.preprocess(store)
        with pytest.raises(InputError, match=named):
            distumap.tl.umap(store, landmarks=30, pca=5)
        with pytest.raises(InputError, match=named):
            distumap.io.write(ds, walled.shown / "never.h5ad")
    assert not (walled.shown / "never.h5ad").exists()


@pytest.mark.cluster
def test_a_memory_store_with_workers_in_other_processes_is_refused(walled):
    matrix = _matrix(walled.shown / "input")
    url = "memory://distumap-walled/store.zarr"
    with walled.cluster.client():
        with pytest.raises(InputError, match=r"^memory://distumap-walled/store\.zarr: memory://"):
            distumap.io.read(str(matrix), url)
    assert not fsspec.filesystem("memory").exists("/distumap-walled")


def test_without_a_client_nothing_is_asked():
    check_workers_see(None, reads=["/no/such/file.csv"], store="memory://anything")


class _FakeClient:
    """A client whose one worker is this process: ``client.run`` runs here, after ``before``."""

    def __init__(self, before=None):
        self.before, self.calls = before, 0

    def run(self, function, *args, on_error="raise", callback_timeout=None):
        self.calls += 1
        if self.before is not None:
            self.before()
        return {"tcp://127.0.0.1:1": function(*args)}


def test_object_store_urls_ask_nothing():
    client = _FakeClient()
    check_workers_see(client, reads=["s3://bucket/matrix.csv"], store="gs://bucket/store.zarr")
    assert client.calls == 0


def test_memory_is_fine_for_workers_in_this_process(tmp_path):
    client = _FakeClient()  # as a LocalCluster(processes=False)
    check_workers_see(client, store="memory://in-this-process/store.zarr")
    check_workers_see(client, reads=[tmp_path], store=tmp_path / "new" / "store.zarr")
    assert client.calls == 2
    assert os.listdir(tmp_path) == []  # the client's file is gone, nothing else was made


def test_another_file_of_the_same_name_is_refused(tmp_path):
    matrix = tmp_path / "matrix.csv"
    matrix.write_text("cell,g1\nc1,1\n")
    client = _FakeClient(before=lambda: matrix.write_text("cell,g1\nc1,1\nc2,2\n"))
    with pytest.raises(InputError, match=r"another file is there: 18 bytes, the client sees 13"):
        check_workers_see(client, reads=[matrix])


def test_workers_that_do_not_answer_are_a_cluster_error(tmp_path):
    from distumap._errors import ClusterError

    class Silent:
        def run(self, function, *args, on_error="raise", callback_timeout=None):
            raise TimeoutError

    with pytest.raises(ClusterError, match=r"within 2 s .*distumap\.paths-check-timeout"):
        check_workers_see(Silent(), store=tmp_path / "store.zarr", timeout=2)
    assert os.listdir(tmp_path) == []


def test_a_worker_gone_as_it_was_asked_is_left_out(tmp_path):
    class Dying(_FakeClient):
        def run(self, function, *args, on_error="raise", callback_timeout=None):
            assert on_error == "return"  # one lost worker must not fail the command
            return {"tcp://gone:1": OSError("stream closed"), **super().run(function, *args)}

    client = Dying()
    check_workers_see(client, reads=[tmp_path])
    with pytest.raises(InputError, match=r"worker tcp://127\.0\.0\.1:1 \(host "):
        check_workers_see(client, reads=[tmp_path / "missing.csv"])
