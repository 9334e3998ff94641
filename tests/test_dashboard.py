"""The distumap progress page on the scheduler's dashboard server."""

from __future__ import annotations

import json
import re
import time
import urllib.request
import uuid

import pytest
from conftest import start_loopback_cluster, stop_loopback_cluster

from distumap import _progress
from distumap.dashboard import TASK_PREFIXES, ProgressDashboard, install, render_page


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
    plugin.log_event(
        _progress.TOPIC, {"stage": "preprocess", "done": 100, "total": 500, "block": None}
    )
    plugin.log_event(
        _progress.TOPIC, {"stage": "preprocess", "done": 150, "total": 500, "block": None}
    )
    # other topics and malformed messages are ignored
    plugin.log_event("other-topic", {"stage": "ingest", "done": 5, "total": 4096, "block": 9})
    plugin.log_event(_progress.TOPIC, {"stage": "ingest"})
    plugin.log_event(_progress.TOPIC, "not a dict")

    stages = plugin.snapshot()["stages"]
    assert list(stages)[:4] == ["ingest", "preprocess", "embed", "export"]
    assert (stages["ingest"]["done"], stages["ingest"]["total"]) == (3072, 4096)
    assert stages["ingest"]["fraction"] == pytest.approx(0.75)
    assert stages["ingest"]["unit"] == "cells ingested"
    assert (stages["preprocess"]["done"], stages["preprocess"]["total"]) == (250, 500)
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
    page = render_page(plugin.snapshot())
    assert '<meta http-equiv="refresh" content="2">' in page
    assert "<b>odd</b>" not in page and "&lt;b&gt;odd&lt;/b&gt;" in page
    assert 'style="width:25.0%"' in page
    assert 'class="fill complete" style="width:100.0%"' in _page_row(page, "stage-export")
    assert "http://" not in page and "https://" not in page  # no external resources


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

            content_type, page = _get(base + "/distumap")
            assert content_type.startswith("text/html")
            assert '<meta http-equiv="refresh" content="2">' in page
            ingest = _page_row(page, "stage-ingest")
            assert "cells ingested" in ingest
            assert '<td class="num done">4,096</td>' in ingest
            assert 'style="width:100.0%"' in ingest
            embed = _page_row(page, "stage-embed")
            assert '<td class="num done">1,024</td>' in embed and 'style="width:25.0%"' in embed
            assert '<td class="num done">20,000</td>' in _page_row(page, "stage-preprocess")
            assert "<td>parse-csv-block</td>" in _page_row(page, "tasks-parse-csv-block")
            # a trailing slash reaches the same page
            assert _get(base + "/distumap/")[1].count('<tr id="stage-') == 4

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
    page = _get(base + "/distumap")[1]
    assert '<td class="num done">7</td>' in _page_row(page, f"stage-{stage}")
    names = client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.plugins))
    assert names.count("distumap-dashboard") == 1


def _finished_loom_blocks(dask_scheduler) -> int:
    prefix = dask_scheduler.task_prefixes.get("loom-block")
    return prefix.state_counts.get("memory", 0) if prefix is not None else 0
