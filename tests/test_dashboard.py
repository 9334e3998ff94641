"""The distumap progress page on the scheduler's dashboard server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
import uuid

import numpy as np
import pytest
from conftest import start_loopback_cluster, stop_loopback_cluster
from distributed.diagnostics.plugin import SchedulerPlugin

from distumap import _progress
from distumap._progress import POINTS_TOPIC, send_points
from distumap.dashboard import (
    TASK_PREFIXES,
    ProgressDashboard,
    install,
    render_page,
    render_table,
    stage_rows,
)


def _get(url: str) -> tuple[str, str]:
    assert url.startswith("http://127.0.0.1:"), url  # loopback only
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.headers.get("Content-Type", ""), response.read().decode()


def _progress_json(base: str) -> dict:
    content_type, body = _get(base + "/distumap/progress.json")
    assert content_type.startswith("application/json")
    return json.loads(body)


def _wait_for(base: str, predicate, timeout: float = 15.0) -> dict:
    """Poll the JSON until ``predicate`` holds: events reach the scheduler asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        data = _progress_json(base)
        if predicate(data) or time.monotonic() > deadline:
            return data
        time.sleep(0.1)


def _page_row(page: str, row_id: str) -> str:
    match = re.search(rf'<tr id="{re.escape(row_id)}">(.*?)</tr>', page)
    assert match, f"no row {row_id!r} on the page"
    return match.group(1)


def _base(dashboard_link: str) -> str:
    return re.match(r"(http://[^/]+)", dashboard_link).group(1).replace("localhost", "127.0.0.1")


# ---- counting rules, no cluster ---------------------------------------------------------------


def test_counting_rules():
    plugin = ProgressDashboard()
    for block in range(3):
        plugin.log_event(
            _progress.TOPIC, {"stage": "ingest", "done": 1024, "total": 4096, "block": block}
        )
    # a retried block replaces its count instead of adding to it
    plugin.log_event(_progress.TOPIC, {"stage": "ingest", "done": 1024, "total": 4096, "block": 1})
    # events without a block add up
    plugin.log_event(_progress.TOPIC, {"stage": "export", "done": 1, "total": 5, "block": None})
    plugin.log_event(_progress.TOPIC, {"stage": "export", "done": 2, "total": 5, "block": None})
    # ... except for a result (genes kept), which is the latest value: a re-run reports again
    for _ in range(2):
        plugin.log_event(
            _progress.TOPIC, {"stage": "preprocess", "done": 250, "total": 500, "block": None}
        )
    # other topics and malformed messages are ignored
    plugin.log_event("other-topic", {"stage": "ingest", "done": 5, "total": 4096, "block": 9})
    plugin.log_event(_progress.TOPIC, {"stage": "ingest"})
    plugin.log_event(_progress.TOPIC, "not a dict")

    stages = plugin.snapshot()["stages"]
    # the stages in the order a run executes them; the embed's steps under it, listed before
    # they begin, except the optional ones
    assert list(stages) == ["ingest", "preprocess", "embed", "fit", "transform", "export"]
    assert [stages[key]["stage"] for key in ("fit", "transform")] == ["embed", "embed"]
    assert (stages["ingest"]["done"], stages["ingest"]["total"]) == (3072, 4096)
    assert stages["ingest"]["fraction"] == pytest.approx(0.75)
    assert stages["ingest"]["unit"] == "cells ingested"
    assert (stages["preprocess"]["done"], stages["preprocess"]["total"]) == (250, 500)
    assert stages["preprocess"]["kind"] == "result"
    assert (stages["export"]["done"], stages["export"]["total"]) == (3, 5)
    assert (stages["embed"]["done"], stages["embed"]["total"]) == (0, 0)
    assert stages["embed"]["updated"] is None

    # a new total is a new run: the stage starts again from zero
    plugin.log_event(_progress.TOPIC, {"stage": "ingest", "done": 10, "total": 20, "block": 0})
    ingest = plugin.snapshot()["stages"]["ingest"]
    assert (ingest["done"], ingest["total"]) == (10, 20)


def test_page_escapes_and_draws_bars():
    plugin = ProgressDashboard()
    plugin.log_event(_progress.TOPIC, {"stage": "<b>odd</b>", "done": 1, "total": 4, "block": 0})
    plugin.log_event(_progress.TOPIC, {"stage": "export", "done": 7, "total": 7, "block": None})
    page = render_page(plugin.snapshot())  # the plain page, where Dask serves no Bokeh pages
    assert '<meta http-equiv="refresh" content="2">' in page
    assert "<b>odd</b>" not in page and "&lt;b&gt;odd&lt;/b&gt;" in page
    assert "width:25.0%" in _page_row(page, "stage-&lt;b&gt;odd&lt;/b&gt;")
    assert "width:100.0%" in _page_row(page, "stage-export")
    assert "http://" not in page and "https://" not in page  # no external resources


def test_genes_kept_is_a_number_not_a_bar():
    plugin = ProgressDashboard()
    plugin.log_event(
        _progress.TOPIC, {"stage": "preprocess", "done": 4059, "total": 50281, "block": None}
    )
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["preprocess"]["text"] == "4,059 of 50,281 genes kept"
    assert rows["preprocess"]["fraction"] is None and rows["preprocess"]["state"] == "done"
    row = _page_row(render_table(plugin.snapshot()), "stage-preprocess")
    assert "4,059 of 50,281 genes kept" in row and "width:" not in row
    # before the result: what runs, not a fraction
    assert stage_rows(ProgressDashboard().snapshot())[1]["text"] == "not started"


def test_rate_and_time_left():
    plugin = ProgressDashboard()
    start = 1_000.0
    for block in range(5):  # 1,000 cells every 2 seconds
        plugin._count(
            {"stage": "embed", "done": 1000, "total": 10_000, "block": block}, start + 2 * block
        )
    embed = plugin.snapshot(now=start + 8)["stages"]["embed"]
    assert embed["rate"] == pytest.approx(500.0)
    assert embed["seconds_left"] == pytest.approx(10.0)  # 5,000 cells at 500 a second
    later = plugin.snapshot(now=start + 12)["stages"]["embed"]
    assert later["seconds_left"] == pytest.approx(6.0)  # counts down between events
    row = {r["key"]: r for r in stage_rows(plugin.snapshot(now=start + 8), now=start + 8)}["embed"]
    assert row["text"] == "5,000 of 10,000 cells embedded" and row["fraction"] == 0.5
    assert row["detail"] == "500 cells/s · about 10 s left"
    for block in range(5, 10):
        plugin._count(
            {"stage": "embed", "done": 1000, "total": 10_000, "block": block}, start + 2 * block
        )
    row = {r["key"]: r for r in stage_rows(plugin.snapshot())}["embed"]
    assert row["state"] == "done" and row["detail"].startswith("done in 18 s")


def test_stage_time_starts_with_its_first_task():
    plugin = ProgressDashboard()
    plugin.transition("umap-transform-abc-0", "waiting", "processing", stimulus_id="s")
    first = plugin.first_task["transform"]
    event = {"stage": "embed", "step": "transform", "done": 5, "total": 10, "block": 0}
    plugin._count(event, first + 3)
    stages = plugin.snapshot()["stages"]
    assert stages["transform"]["started"] == first
    assert stages["embed"]["started"] == first  # the stage's time starts with its steps'
    # tasks of a running step do not move its start; tuple keys are read by their name
    plugin.transition(("umap-transform-abc", 1), "waiting", "processing", stimulus_id="s")
    assert "transform" not in plugin.first_task
    # a file's blocks and its graph's are steps of the export, each with its own clock
    plugin.transition(("h5ad-block-abc", 0), "waiting", "processing", stimulus_id="s")
    plugin.transition(("h5ad-graph-block-abc", 0), "waiting", "processing", stimulus_id="s")
    assert {"h5ad", "h5ad-graph"} <= set(plugin.first_task)
    assert plugin.snapshot()["stages"]["export"]["current"] in ("h5ad", "graph to h5ad")
    plugin.transition(("other-key", 0), "waiting", "processing", stimulus_id="s")
    plugin.transition(42, "waiting", "processing", stimulus_id="s")


def _event(stage, done, total, block=None, **named):
    return {"stage": stage, "done": done, "total": total, "block": block, **named}


def test_steps_their_statuses_and_the_stage_they_belong_to():
    plugin = ProgressDashboard()
    topic = _progress.TOPIC
    plugin.log_event(topic, {"stage": "embed", "status": "started"})
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["embed"]["text"] == "running" and "refine" not in rows  # optional: not begun
    # the PCA of all cells, counted from its tasks: the group the scheduler shows, then those
    # that finished (the sums after it are not its tasks)
    GRAM = "pca-all-gram-" + uuid.uuid4().hex  # a token, as dask names them
    for i in range(3):
        plugin.transition((GRAM, i, 0, 0), "released", "waiting", stimulus_id="s")
    plugin.transition((GRAM, 0, 0, 0), "waiting", "processing", stimulus_id="s")
    plugin.transition((GRAM, 0, 0, 0), "processing", "memory", stimulus_id="s")
    plugin.transition(
        (GRAM.replace("gram-", "gram-partial-"), 0), "released", "waiting", stimulus_id="s"
    )
    snapshot = plugin.snapshot()
    assert (snapshot["stages"]["pca"]["done"], snapshot["stages"]["pca"]["total"]) == (1, 3)
    rows = {row["key"]: row for row in stage_rows(snapshot)}
    assert rows["pca"]["text"] == "1 of 3 blocks" and rows["pca"]["parent"] == "embed"
    assert rows["embed"]["text"] == "running: PCA of all cells"
    for i in (1, 2):
        plugin.transition((GRAM, i, 0, 0), "waiting", "processing", stimulus_id="s")
        plugin.transition((GRAM, i, 0, 0), "processing", "memory", stimulus_id="s")
    assert plugin.snapshot()["stages"]["pca"]["state"] == "done"
    # epochs count cells, and show epochs: 1,000 cells an epoch, two tasks of 500
    for block in range(3):
        plugin.log_event(
            topic, _event("embed-refine", 500, 3000, block, step="refine", per_unit=1000)
        )
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["refine"]["text"] == "1 of 3 epochs" and rows["refine"]["fraction"] == 0.5
    assert rows["embed"]["text"] == "running: refinement"  # the step that began last
    assert list(rows).index("refine") > list(rows).index("transform")
    # the last epoch writes the stage's own markers: same block numbers, other blocks
    for block in range(3):
        plugin.log_event(topic, _event("embed", 500, 3000, block, step="refine", per_unit=1000))
    assert plugin.snapshot()["stages"]["refine"]["done"] == 3000
    plugin.log_event(topic, {"stage": "embed", "status": "complete"})
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["embed"]["state"] == "done" and rows["refine"]["text"] == "3 of 3 epochs"

    # a file's row runs from its start to its end, after its last block too
    plugin.log_event(topic, {"stage": "export", "status": "started", "step": "h5ad"})
    plugin.log_event(topic, _event("export", 1, 1, 0, step="h5ad"))
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["h5ad"]["state"] == "running" and rows["export"]["text"] == "running: h5ad"
    assert rows["h5ad"]["detail"] == "every block written; not finished yet"
    plugin.log_event(topic, {"stage": "export", "status": "failed", "step": "h5ad"})
    rows = {row["key"]: row for row in stage_rows(plugin.snapshot())}
    assert rows["h5ad"]["state"] == rows["export"]["state"] == "failed"
    # a new run of the embed starts its steps again
    plugin.log_event(topic, {"stage": "embed", "status": "started"})
    stages = plugin.snapshot()["stages"]
    assert "refine" not in stages and "pca" not in stages
    assert stages["embed"]["state"] == "running" and stages["fit"]["state"] == "idle"


def test_fit_state_from_the_scheduler_transitions():
    plugin = ProgressDashboard()
    assert plugin.snapshot()["fit"]["state"] == "not started"
    key = "umap-fit-0123abcd"
    plugin.transition(key, "released", "waiting", stimulus_id="s")
    assert plugin.snapshot()["fit"]["state"] == "waiting"
    plugin.transition(key, "waiting", "processing", stimulus_id="s")
    started = plugin.fit["started"]
    fit = plugin.snapshot(now=started + 83)["fit"]
    assert (fit["state"], fit["seconds"], fit["key"]) == ("running", 83.0, key)
    row = {r["key"]: r for r in stage_rows(plugin.snapshot(now=started + 83), now=started + 83)}
    assert row["fit"]["text"] == "running for 1 min 23 s"
    assert row["fit"]["fraction"] is None
    # finer steps, when the fit reports them
    plugin.log_event(_progress.TOPIC, {"stage": "fit", "done": 1, "total": 4, "block": 0})
    plugin.log_event(_progress.TOPIC, {"stage": "fit", "done": 1, "total": 4, "block": 1})
    row = {r["key"]: r for r in stage_rows(plugin.snapshot())}["fit"]
    assert row["detail"] == "step 2 of 4 finished: UMAP of the landmarks"
    plugin.fit["started"] = started - 100  # as if it ran for a while
    plugin.transition(key, "processing", "memory", stimulus_id="s")
    fit = plugin.snapshot()["fit"]
    assert fit["state"] == "done" and fit["seconds"] >= 100
    assert {r["key"]: r for r in stage_rows(plugin.snapshot())}["fit"]["text"].startswith(
        "done in 1 min"
    )
    # a new fit key is a new fit
    plugin.transition("umap-fit-ffff", "released", "erred", stimulus_id="s")
    assert plugin.snapshot()["fit"]["state"] == "failed"


def _points_event(block, n, *, total=1000, stride=1, labels=None):
    msg = {"stage": "embed", "block": block, "total": total, "stride": stride}
    msg["x"] = [float(i) for i in range(n)]
    msg["y"] = [float(-i) for i in range(n)]
    if labels is not None:
        msg["label"] = labels
    return msg


def test_points_are_kept_bounded_and_coloured_per_label():
    plugin = ProgressDashboard()
    plugin.log_event(POINTS_TOPIC, _points_event(0, 3, labels=["a", "b", ""]))
    plugin.log_event(POINTS_TOPIC, _points_event(1, 2, labels=["b", "c"]))
    plugin.log_event(POINTS_TOPIC, _points_event(1, 2, labels=["b", "c"]))  # again: replaced
    stage, points = plugin.latest_points()
    assert stage == "embed" and points.count == 5
    _, _, labels, colors = points.blocks[0]
    assert labels == ["a", "b", "(missing)"]
    assert colors[0] != colors[1] and colors[2] == "#c8c8c8"
    assert points.blocks[1][3][0] == colors[1]  # a label keeps its colour
    assert plugin.snapshot()["points"] == {"stage": "embed", "count": 5, "total": 1000, "stride": 1}
    # malformed events are ignored
    plugin.log_event(POINTS_TOPIC, {"stage": "embed", "block": 2})
    plugin.log_event(POINTS_TOPIC, {**_points_event(3, 2), "x": [1.0]})
    plugin.log_event(POINTS_TOPIC, "nope")
    assert plugin.latest_points()[1].count == 5
    # a new total is a new run
    plugin.log_event(POINTS_TOPIC, _points_event(0, 4, total=2000))
    assert plugin.latest_points()[1].count == 4
    # however much senders send, the scheduler keeps a bounded number of points
    for block in range(40):
        plugin.log_event(POINTS_TOPIC, _points_event(block, 5_000, total=10**7))
    assert plugin.latest_points()[1].count <= 50_000


def test_send_points_outside_a_worker_sends_nothing():
    assert send_points("embed", 0, np.zeros((10, 2)), ["a"] * 10, total=10) == 0


def test_dashboard_imports_alone_without_bokeh():
    """A worker unpickling send_points imports this module: alone, and without Bokeh."""
    code = (
        "import sys, distumap.dashboard, distumap._progress as p; "
        "assert 'bokeh' not in sys.modules, 'bokeh imported'; "
        "assert p.send_points('embed', 0, [[0.0, 1.0]], ['a']) == 0"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_dashboard_imports_without_xarray():
    """The scheduler preloads this module: it must not pull in xarray (nor the pl namespace)."""
    code = (
        "import sys, distumap.dashboard; "
        "loaded = sorted(m for m in ('xarray', 'distumap.pl') if m in sys.modules); "
        "assert not loaded, f'imported: {loaded}'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- on real schedulers -------------------------------------------------------------------------


@pytest.mark.cluster
def test_preload_page_on_loopback_cluster(tmp_path):
    cluster = start_loopback_cluster(
        tmp_path / "cluster", n_workers=1, memory_limit="1GiB", preload="distumap.dashboard"
    )
    try:
        base = cluster.dashboard
        with cluster.client() as client:
            # four ingest blocks of 1,024 cells out of 4,096, run as parse-csv-block tasks;
            # block 3 reports twice (a retry) and must count once
            report = _progress.report
            futures = [
                client.submit(report, "ingest", 1024, 4096, block=block, key=f"parse-csv-block-{n}")
                for n, block in enumerate([0, 1, 2, 3, 3])
            ]
            futures += [
                client.submit(report, "preprocess", 20000, 50281, key="gene-stats-0"),
                client.submit(report, "embed", 512, 4096, block=0, key="umap-transform-0"),
                client.submit(report, "embed", 512, 4096, block=1, key="umap-transform-1"),
            ]
            client.gather(futures)

            data = _wait_for(
                base,
                lambda d: (
                    d["stages"]["embed"]["done"] == 1024 and d["stages"]["ingest"]["done"] == 4096
                ),
            )
            stages = data["stages"]
            assert (stages["ingest"]["done"], stages["ingest"]["total"]) == (4096, 4096)
            assert stages["ingest"]["fraction"] == 1.0
            assert (stages["preprocess"]["done"], stages["preprocess"]["total"]) == (20000, 50281)
            assert (stages["embed"]["done"], stages["embed"]["total"]) == (1024, 4096)
            assert (stages["export"]["done"], stages["export"]["total"]) == (0, 0)

            tasks = data["tasks"]
            assert set(tasks) == set(TASK_PREFIXES)
            # the futures are still held, so the results sit in memory on the workers
            assert tasks["parse-csv-block"]["memory"] == 5
            assert tasks["parse-csv-block"]["finished"] == 5
            assert tasks["umap-transform"]["memory"] == 2
            assert tasks["gene-stats"]["finished"] == 1
            assert tasks["loom-block"]["finished"] == 0

            # the Bokeh page, served like Dask's own and listed in its navigation bar
            content_type, page = _get(base + "/distumap")
            assert content_type.startswith("text/html")
            assert "Bokeh" in page
            # a Bokeh application of its own at /distumap (bokeh's per-application route)
            assert json.loads(_get(base + "/distumap/metadata")[1])["url"].endswith("/distumap")
            assert '<a href="distumap">Distumap</a>' in page
            assert '<a href="distumap">Distumap</a>' in _get(base + "/status")[1]
            assert "Bokeh" in _get(base + "/distumap/")[1]  # a trailing slash too
            rows = {row["key"]: row for row in stage_rows(data)}
            assert rows["ingest"]["text"] == "4,096 of 4,096 cells ingested"
            assert rows["preprocess"]["text"] == "20,000 of 50,281 genes kept"
            assert rows["embed"]["text"] == "1,024 of 4,096 cells embedded"
            assert rows["embed"]["fraction"] == 0.25

            # points from tasks: an even sample of the whole embedding, whatever the blocks
            xy = np.stack([np.arange(4096.0), -np.arange(4096.0)], axis=1)
            sizes = [1000, 1096, 1000, 1000]
            starts = np.cumsum([0, *sizes[:-1]])
            sent = client.gather(
                [
                    client.submit(
                        send_points,
                        "embed",
                        block,
                        xy[first : first + size],
                        np.full(size, f"type {block}"),
                        first_cell=int(first),
                        total=4096,
                        max_points=100,
                        pure=False,
                    )
                    for block, (first, size) in enumerate(zip(starts, sizes, strict=True))
                ]
            )
            assert sum(sent) == 100  # 1 cell in ceil(4096 / 100) = 41
            points = _wait_for(base, lambda d: (d["points"] or {}).get("count") == 100)["points"]
            assert points == {"stage": "embed", "count": 100, "total": 4096, "stride": 41}
            # a lambda travels by value: the scheduler process cannot import the tests
            kept = client.run_on_scheduler(
                lambda dask_scheduler: [
                    x
                    for block in dask_scheduler.plugins["distumap-dashboard"]
                    .points["embed"]
                    .blocks.values()
                    for x in block[0]
                ]
            )
            assert sorted(kept) == [41.0 * i for i in range(100)]

            # the plugin came from the preload; installing it again from a client changes nothing
            assert install(client) == f"{base}/distumap"
            assert _progress_json(base)["stages"]["ingest"]["done"] == 4096
            names = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
            assert names.count("distumap-dashboard") == 1
    finally:
        stop_loopback_cluster(cluster)


@pytest.mark.cluster
def test_install_on_embedded_cluster(local_client):
    client = local_client
    base = _base(client.dashboard_link)
    # the session's embedded cluster is shared: a stage name of our own keeps counts apart
    stage = f"install-test-{uuid.uuid4().hex[:8]}"
    before = client.run_on_scheduler(_finished_loom_blocks)

    # logged before the page exists: the plugin replays the scheduler's event log
    client.submit(_progress.report, stage, 3, 10, key=f"loom-block-{uuid.uuid4().hex}").result()
    deadline = time.monotonic() + 10
    while not client.get_events(_progress.TOPIC) and time.monotonic() < deadline:
        time.sleep(0.05)

    url = install(client)
    assert url == client.dashboard_link.removesuffix("/status") + "/distumap"
    assert install(client) == url  # idempotent

    client.submit(_progress.report, stage, 4, 10, key=f"loom-block-{uuid.uuid4().hex}").result()
    data = _wait_for(base, lambda d: d["stages"].get(stage, {}).get("done") == 7)
    assert data["stages"][stage] == {
        **data["stages"][stage],
        "done": 7,
        "total": 10,
        "unit": "units",
    }
    assert data["stages"][stage]["fraction"] == pytest.approx(0.7)
    assert data["tasks"]["loom-block"]["finished"] - before == 2
    assert json.loads(_get(base + "/distumap/metadata")[1])["url"].endswith("/distumap")
    assert '<a href="distumap">Distumap</a>' in _get(base + "/status")[1]
    names = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert names.count("distumap-dashboard") == 1


def _finished_loom_blocks(dask_scheduler) -> int:
    prefix = dask_scheduler.task_prefixes.get("loom-block")
    return prefix.state_counts.get("memory", 0) if prefix is not None else 0


class _RowsAtEachStepEvent(SchedulerPlugin):
    """A scheduler plugin beside the page's: at every progress event of a step of the embed,
    the page's rows as they are then (the page's plugin, added first, has counted it)."""

    name = "distumap-dashboard-test-recorder"
    _EMBED_STEPS = frozenset({"pca", "transform", "graph", "union", "refine"})

    def __init__(self, page) -> None:
        self.page = page
        self.seen: list[tuple[str, list[dict]]] = []

    def log_event(self, topic: str, msg) -> None:
        step = msg.get("step") if topic == _progress.TOPIC and isinstance(msg, dict) else None
        if step in self._EMBED_STEPS and msg.get("status") is None:
            self.seen.append((step, stage_rows(self.page.snapshot())))


#: the page's rows of a refined embed with the PCA of all cells and an h5ad export, in the
#: order the run executes them: (key, name, the stage it belongs to, unit)
_EXECUTED = [
    ("ingest", "ingest", None, "cells ingested"),
    ("preprocess", "preprocess", None, "genes kept"),
    ("select", "selected genes copied", "preprocess", "cells"),
    ("embed", "embed", None, "cells embedded"),
    ("pca", "PCA of all cells", "embed", "blocks"),
    ("fit", "UMAP fit", "embed", "steps"),
    ("transform", "transform", "embed", "cells"),
    ("graph", "graph of all cells", "embed", "cells"),
    ("union", "graph made symmetric", "embed", "cells"),
    ("refine", "refinement", "embed", "epochs"),
    ("export", "export", None, "blocks exported"),
    ("h5ad-graph", "graph to h5ad", "export", "blocks"),
    ("h5ad", "h5ad", "export", "blocks"),
]


@pytest.mark.slow
def test_a_run_names_each_step_as_it_runs(local_client, tmp_path):
    """A real run on the embedded cluster: the refinement runs under the embed (which says so
    while it runs), each step on its own row with its own unit, in the order they ran."""
    from distumap import io, pp, tl
    from distumap.testing import SyntheticSpec, write_dataset

    client = local_client
    scheduler = client.cluster.scheduler  # the embedded cluster's scheduler: this process
    page = scheduler.plugins["distumap-dashboard"]
    recorder = _RowsAtEachStepEvent(page)
    scheduler.add_plugin(recorder, name=recorder.name)
    try:
        matrix, metadata = write_dataset(tmp_path / "data", SyntheticSpec(800, 150, seed=11))
        ds = io.read_csv(matrix, tmp_path / "store.zarr", metadata=metadata, chunk_cells=200)
        ds = pp.preprocess(ds)
        ds = tl.umap(ds, landmarks=200, pca=8, pca_fit="all", refine_epochs=3, n_neighbors=10)
        io.write(ds, tmp_path / "embedding.h5ad")
    finally:
        scheduler.remove_plugin(name=recorder.name)

    # while the embed's steps ran, the embed was running, and said which step ran
    by_step = {}
    for step, rows in recorder.seen:
        by_step.setdefault(step, []).append({row["key"]: row for row in rows})
    assert set(by_step) == {"transform", "graph", "union", "refine"}
    for step, snapshots in by_step.items():
        for rows in snapshots:
            assert rows["embed"]["state"] == "running", (step, rows["embed"])
            assert rows[step]["parent"] == "embed"
    during = [rows["embed"]["text"] for rows in by_step["refine"]]
    assert "running: refinement" in during, during
    first = by_step["refine"][0]
    assert first["refine"]["text"] == "1 of 3 epochs"  # one task per epoch at 800 cells
    assert first["refine"]["state"] == "running" and first["refine"]["fraction"] == pytest.approx(
        1 / 3
    )

    # once done, the page lists the steps in the order they ran, as what they are
    data = _wait_for(
        _base(client.dashboard_link),
        lambda d: d["stages"].get("h5ad", {}).get("state") == "done",
    )
    stages = data["stages"]
    listed = [key for key in stages if key in {key for key, *_ in _EXECUTED}]
    assert listed == [key for key, *_ in _EXECUTED]
    for key, name, parent, unit in _EXECUTED:
        assert (stages[key]["name"], stages[key]["stage"], stages[key]["unit"]) == (
            name,
            parent,
            unit,
        ), key
    assert stages["pca"]["done"] == stages["pca"]["total"] == 4  # four blocks of 200 cells
    assert (stages["refine"]["done"], stages["refine"]["per_unit"]) == (3 * 800, 800)
    rows = {row["key"]: row for row in stage_rows(data)}
    assert rows["embed"]["state"] == "done" and rows["embed"]["text"] == "done"
    # (the export's own state also depends on earlier tests' tasks on this shared cluster)
    assert rows["h5ad"]["state"] == rows["h5ad-graph"]["state"] == "done"
    assert rows["export"]["state"] != "idle"
    assert rows["refine"]["text"] == "3 of 3 epochs"
    assert rows["transform"]["text"] == "800 of 800 cells"
    assert rows["pca"]["text"] == "4 of 4 blocks"
    assert not [key for key, *_ in _EXECUTED if "units" in rows[key]["text"]]
