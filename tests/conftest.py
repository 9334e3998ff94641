"""Shared fixtures: a real multi-process cluster on loopback, and seeded temporary data."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

#: clusters started in this process so far: loopback clusters and in-process schedulers
_started: dict[str, int] = {"loopback": 0}
_CLUSTERS_BEFORE = pytest.StashKey[tuple[int, frozenset[str]]]()
_CLUSTERS_AFTER_CALL = pytest.StashKey[tuple[int, frozenset[str]]]()


def _clusters_started() -> tuple[int, frozenset[str]]:
    from distributed import Scheduler

    return _started["loopback"], frozenset(s.id for s in list(Scheduler._instances))


#: fixtures that start a cluster: a test that asks for one is a `cluster` test
CLUSTER_FIXTURES = frozenset({"loopback_cluster", "local_client", "small_client"})


def pytest_sessionstart(session):
    """Compile distumap's bytecode once. The commands, fresh interpreters and worker processes
    that the tests start import distumap from this tree, and where PYTHONDONTWRITEBYTECODE is
    set (as on the machines this project runs on) none of them keeps what it compiled: each
    would compile every module it imports again (about 0.2 s a process)."""
    import compileall
    import importlib.util

    package = Path(importlib.util.find_spec("distumap").origin).parent
    compileall.compile_dir(package, quiet=1)


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject's default): two processes per core, at most four. The cluster
    tests spend much of their time waiting (for a worker's death to be noticed, a command to
    time out): on 2 cores, on one fresh clone, 2 processes ran the suite in 699 s, 3 in 647 s
    and 4 in 579 s."""
    return max(1, min(2 * len(os.sched_getaffinity(0)), 4))


def pytest_collection_modifyitems(items):
    for item in items:
        if CLUSTER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    item.stash[_CLUSTERS_BEFORE] = _clusters_started()
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    try:
        return (yield)
    finally:
        item.stash[_CLUSTERS_AFTER_CALL] = _clusters_started()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    # A test that starts a cluster, or asks for one (request.getfixturevalue included: whether
    # it starts the shared one depends on the order tests run in), must carry the marker, so
    # that `-m "not cluster"` really runs without one. Checked once the fixtures are torn down.
    asked = CLUSTER_FIXTURES & set(getattr(item, "funcargs", {}))
    result = yield
    before = item.stash.get(_CLUSTERS_BEFORE, None)
    if before is not None and item.get_closest_marker("cluster") is None:
        seen = [item.stash.get(_CLUSTERS_AFTER_CALL, before), _clusters_started()]
        started = any(loop > before[0] or scheds - before[1] for loop, scheds in seen)
        if started or asked:
            pytest.fail(f"{item.nodeid} starts or uses a dask cluster but is not marked `cluster`")
    return result


#: util-linux's setpriv: the cluster's processes get SIGTERM when pytest dies, so a killed run
#: leaves no scheduler or worker behind (stop_loopback_cluster handles a run that ends)
_DIE_WITH_PYTEST = ["setpriv", "--pdeathsig", "TERM"] if shutil.which("setpriv") else []


def _dask_command(*args: str) -> list[str]:
    # `python -m dask` runs the same entry point as the `dask` script, in this interpreter
    return [*_DIE_WITH_PYTEST, sys.executable, "-m", "dask", *args]


@dataclass
class LoopbackCluster:
    """`dask scheduler` and `dask worker` processes on 127.0.0.1, joined by a scheduler file."""

    scheduler_file: Path
    address: str
    dashboard_port: int
    scheduler: subprocess.Popen
    workers: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def client(self):
        from distributed import Client

        return Client(scheduler_file=str(self.scheduler_file))

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes (the nannies' children)."""
        with self.client() as client:
            return sorted(client.run(os.getpid).values())


def start_loopback_cluster(
    directory: Path,
    *,
    n_workers: int = 2,
    memory_limit: str = "3GiB",
    preload: str | None = None,
    env: dict[str, str] | None = None,
    worker_prefix: Callable[[int], list[str]] | None = None,
) -> LoopbackCluster:
    """Start the cluster; ``preload`` goes to the scheduler (workers take theirs from ``env``,
    e.g. ``DASK_DISTRIBUTED__WORKER__PRELOAD``). ``worker_prefix(i)`` is put before worker
    ``i``'s command (``unshare ...`` that runs it in a mount namespace of its own, say)."""
    directory.mkdir(parents=True, exist_ok=True)
    _started["loopback"] += 1
    scheduler_file = directory / "scheduler.json"
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    log = open(directory / "scheduler.log", "wb")
    args = ["scheduler", "--host", "127.0.0.1", "--port", "0", "--dashboard-address", "127.0.0.1:0"]
    args += ["--scheduler-file", str(scheduler_file)]
    if preload:
        args += ["--preload", preload]
    scheduler = subprocess.Popen(
        _dask_command(*args),
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not scheduler_file.exists() or not scheduler_file.read_text().strip():
        if scheduler.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError((directory / "scheduler.log").read_text())
        time.sleep(0.1)
    time.sleep(0.2)
    info = json.loads(scheduler_file.read_text())
    cluster = LoopbackCluster(
        scheduler_file=scheduler_file,
        address=info["address"],
        dashboard_port=int(info["services"]["dashboard"]),
        scheduler=scheduler,
    )
    for i in range(n_workers):
        wlog = open(directory / f"worker-{i}.log", "wb")
        cluster.workers.append(
            subprocess.Popen(
                (worker_prefix(i) if worker_prefix else [])
                + _dask_command(
                    "worker",
                    "--scheduler-file",
                    str(scheduler_file),
                    "--nthreads",
                    "1",
                    "--memory-limit",
                    memory_limit,
                    "--host",
                    "127.0.0.1",
                    "--local-directory",
                    str(directory / f"worker-{i}"),
                ),
                stdout=wlog,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        )
    with cluster.client() as client:
        client.wait_for_workers(n_workers, timeout=120)
    return cluster


def stop_loopback_cluster(cluster: LoopbackCluster) -> None:
    for proc in [*cluster.workers, cluster.scheduler]:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in [*cluster.workers, cluster.scheduler]:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def loopback_cluster(tmp_path_factory) -> LoopbackCluster:
    """A session-wide multi-process cluster on 127.0.0.1: one scheduler and two worker processes."""
    cluster = start_loopback_cluster(tmp_path_factory.mktemp("loopback"))
    yield cluster
    stop_loopback_cluster(cluster)


@pytest.fixture(scope="session")
def s3_environment():
    """A moto S3 server on 127.0.0.1 and the environment that points s3fs at it (given to a
    cluster's processes as a pod's environment points them at an object store), or None where
    s3fs or moto is not installed: the tests that need S3 skip, the cluster they share does not."""
    try:
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer
    except ImportError:
        yield None
        return
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": f"http://{host}:{port}",
    }
    server.stop()


@pytest.fixture
def s3_endpoint(s3_environment):
    """The S3 environment, for a test that needs it; skips where s3fs or moto is missing."""
    if s3_environment is None:
        pytest.skip("s3fs and moto[server] are not installed (the test extra has them)")
    return s3_environment


@pytest.fixture(scope="session")
def local_client():
    """An embedded LocalCluster of two worker processes, as `distumap` starts by default."""
    from distumap.cluster import close, connect

    client = connect(n_workers=2, memory_limit="3GiB", dashboard_address=":0", quiet=True)
    yield client
    close(client)
