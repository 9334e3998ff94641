"""The distumap page on the Dask dashboard, in a real browser during a loopback-cluster run.

Headless Chromium (Debian's ``chromium`` and ``chromium-driver``) driven by selenium opens
``/distumap`` before the run, watches it while ``read_csv``, ``preprocess`` and ``umap`` run on
a ``dask scheduler --preload distumap.dashboard`` cluster, and checks what Bokeh rendered: the
stage text in the document, points in the scatter's data source, coloured pixels in a
screenshot, and the page's entry in the dashboard's navigation bar. Skips, saying why, where
the browser, its driver or selenium is missing.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import start_loopback_cluster, stop_loopback_cluster

from distumap.testing import SyntheticSpec, write_dataset

CHROMEDRIVER = "/usr/bin/chromedriver"
SPEC = SyntheticSpec(3000, 2000, seed=5)
CHUNK_CELLS = 500
LANDMARKS = 600

#: flags for a headless Chromium that reaches nothing but loopback (the env notes' list)
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1400,1300",
)


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _browser_or_skip(user_data_dir: Path):
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install selenium)")
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    driver_path = CHROMEDRIVER if os.path.exists(CHROMEDRIVER) else shutil.which("chromedriver")
    if driver_path is None:
        pytest.skip(f"no chromedriver at {CHROMEDRIVER} (apt-get install chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={user_data_dir}"):
        options.add_argument(flag)
    # the system driver, never one that selenium would download
    return webdriver.Chrome(service=Service(executable_path=driver_path), options=options)


# what the page's Bokeh document holds, read in the browser
_DOCUMENT_STATE = """
if (typeof Bokeh === 'undefined' || !Bokeh.documents || Bokeh.documents.length === 0) {
  return null;
}
const doc = Bokeh.documents[0];
const stages = doc.get_model_by_name('distumap-stages');
const points = doc.get_model_by_name('distumap-points');
const figure = doc.get_model_by_name('distumap-embedding');
if (stages === null || points === null || figure === null) { return null; }
return {
  stages: stages.text,
  points: points.data.get ? points.data.get('x').length : points.data.x.length,
  labels: Array.from(new Set(points.data.get ? points.data.get('label') : points.data.label)),
  title: figure.title.text,
};
"""


def _document_state(driver) -> dict | None:
    return driver.execute_script(_DOCUMENT_STATE)


def _wait_for_document(driver, predicate, timeout: float, seen: list[str] | None = None) -> dict:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state = _document_state(driver)
        if state is not None:
            if seen is not None:
                seen.append(state["stages"])
            if predicate(state):
                return state
        time.sleep(0.25)
    raise AssertionError(f"the page did not get there in {timeout} s; last state: {state}")


def _row_text(table: str, row_id: str) -> str | None:
    """The text cell of one row of the stage table (its HTML, as the document holds it)."""
    match = re.search(rf'<tr id="{re.escape(row_id)}">.*?<td class="text"[^>]*>(.*?)</td>', table)
    return html.unescape(match.group(1)) if match else None


def _coloured_pixels(png: bytes) -> int:
    """Pixels of a screenshot in a saturated colour (points, not text, axes or background)."""
    import io

    from matplotlib.image import imread

    image = imread(io.BytesIO(png), format="png")[..., :3]
    saturation = image.max(axis=-1) - image.min(axis=-1)
    return int((saturation > 0.25).sum())


def _run_pipeline(matrix: Path, metadata: Path, store: Path, errors: list) -> None:
    try:
        from distumap import io, pp, tl

        ds = io.read_csv(matrix, store, metadata=metadata, chunk_cells=CHUNK_CELLS)
        ds = pp.preprocess(ds)
        # the transform tasks send their points, coloured by the colour column
        tl.umap(ds, landmarks=LANDMARKS, color="subclass_label")
    except BaseException as error:  # reported by the main thread
        errors.append(error)


@pytest.mark.cluster
@pytest.mark.slow
def test_page_in_headless_chromium_during_a_run(tmp_path):
    driver = _browser_or_skip(tmp_path / "chromium-profile")
    cluster = None
    try:
        matrix, metadata = write_dataset(tmp_path / "data", SPEC)
        cluster = start_loopback_cluster(
            tmp_path / "cluster", n_workers=2, memory_limit="2GiB", preload="distumap.dashboard"
        )
        driver.set_page_load_timeout(60)
        driver.get(cluster.dashboard + "/distumap")
        state = _wait_for_document(driver, lambda s: "ingest" in s["stages"], timeout=60)
        assert "not started" in state["stages"]
        # listed in the dashboard's navigation bar, like Dask's own pages, here and on /status
        assert driver.find_element("css selector", 'a[href="distumap"]').text == "Distumap"

        store = tmp_path / "store.zarr"
        seen: list[str] = []
        errors: list[BaseException] = []
        with cluster.client():
            run = threading.Thread(
                target=_run_pipeline, args=(matrix, metadata, store, errors), daemon=True
            )
            run.start()
            # the page follows the run live, over Bokeh's websocket, without a reload
            _wait_for_document(
                driver, lambda s: _row_text(s["stages"], "stage-embed") == "done", 400, seen
            )
            run.join(timeout=60)
            assert not errors, errors
            assert not run.is_alive()

            # the transform tasks' points: every cell of 3,000 (under the 20,000 cap)
            state = _wait_for_document(driver, lambda s: s["points"] == 3000, timeout=60)

        stages = state["stages"]
        assert "3,000 of 3,000 cells ingested" in stages
        # the embed's steps under it, each in its own unit
        assert _row_text(stages, "stage-transform") == "3,000 of 3,000 cells"
        assert _row_text(stages, "stage-refine").endswith(" epochs")
        # the embed runs while its steps do (test_dashboard checks which, event by event)
        embed_texts = {_row_text(text, "stage-embed") for text in seen}
        assert any(text.startswith("running: ") for text in embed_texts if text), embed_texts
        assert "genes kept" in stages and "of 2,000 genes kept" in stages
        assert "done in" in stages  # the UMAP fit's time, and the stages' times
        assert any("running" in text for text in seen), "never saw a stage running"
        assert len(state["labels"]) > 3  # coloured by subclass_label
        assert "3,000 points drawn of 3,000 cells" in state["title"]

        time.sleep(1.0)  # the canvas repaints after the last stream
        png = driver.get_screenshot_as_png()
        (tmp_path / "distumap-page.png").write_bytes(png)
        if os.environ.get("DISTUMAP_SCREENSHOTS"):
            target = Path(os.environ["DISTUMAP_SCREENSHOTS"])
            target.mkdir(parents=True, exist_ok=True)
            (target / "distumap-page.png").write_bytes(png)
        assert _coloured_pixels(png) > 2_000, "no points drawn in the screenshot"

        driver.get(cluster.dashboard + "/status")
        assert driver.find_element("css selector", 'a[href="distumap"]').text == "Distumap"
    finally:
        driver.quit()
        if cluster is not None:
            stop_loopback_cluster(cluster)


def test_coloured_pixels_counts_colour_not_grey():
    import io

    from matplotlib.image import imsave

    image = np.ones((20, 20, 3))
    image[:5, :5] = [0.12, 0.47, 0.71]  # tab10 blue
    image[10:, 10:] = 0.3  # grey text and axes
    buffer = io.BytesIO()
    imsave(buffer, image, format="png")
    assert _coloured_pixels(buffer.getvalue()) == 25
