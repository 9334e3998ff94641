"""What the page says: the stages as rows and as an HTML table, and the plain page served
where the scheduler has no Bokeh dashboard."""

from __future__ import annotations

import html
import time
from typing import Any

from distumap.dashboard._state import FIT_STAGE

#: where the page lives on the dashboard server (the JSON is at ``ROUTE + "/progress.json"``)
ROUTE = "/distumap"

_REFRESH_SECONDS = 2


def format_duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(float(seconds), 0.0)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _format_rate(rate: float, unit: str) -> str:
    what = unit.split()[0]  # "cells ingested" -> cells
    shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
    return f"{shown} {what}/s"


def stage_rows(snapshot: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """One row per stage for the page: ``stage``, ``text`` (what is done), ``fraction`` (None
    for results and the fit: no bar), ``detail`` (rate and time left, or time taken)."""
    now = time.time() if now is None else now
    rows = []
    for stage, info in snapshot["stages"].items():
        if stage == FIT_STAGE:
            continue  # shown in the fit's row
        if stage == "embed":
            rows.append(_fit_row(snapshot.get("fit") or {}, now))
        rows.append(_stage_row(stage, info, snapshot.get("tasks", {})))
    return rows


def _stage_row(stage: str, info: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    unit, done, total = info["unit"], info["done"], info["total"]
    row = {"key": stage, "stage": stage, "fraction": None, "detail": "", "state": "idle"}
    if info["kind"] == "result":
        if info["updated"] is None:
            running = tasks.get("gene-stats", {}).get("processing", 0)
            row["text"] = "gene statistics running" if running else "not started"
            row["state"] = "running" if running else "idle"
        else:
            row["text"] = f"{done:,} of {total:,} {unit}"
            row["state"] = "done"
        return row
    if not total:
        row["text"] = "not started"
        return row
    row["text"] = f"{done:,} of {total:,} {unit}"
    row["fraction"] = info["fraction"]
    rate = info.get("rate")
    if info["complete"]:
        row["state"] = "done"
        took = (info["updated"] or 0) - (info["started"] or 0)
        parts = [f"done in {format_duration(took)}"] if took > 0 else ["done"]
        if rate:
            parts.append(f"{_format_rate(rate, unit)} on average")
        row["detail"] = " · ".join(parts)
    else:
        row["state"] = "running"
        parts = [_format_rate(rate, unit)] if rate else ["measuring rate"]
        if info.get("seconds_left") is not None:
            parts.append(f"about {format_duration(info['seconds_left'])} left")
        row["detail"] = " · ".join(parts)
    return row


def _fit_row(fit: dict[str, Any], now: float) -> dict[str, Any]:
    state = fit.get("state", "not started")
    seconds = fit.get("seconds")
    row = {"key": FIT_STAGE, "stage": "UMAP fit", "fraction": None, "detail": "", "state": "idle"}
    if state == "running":
        row["state"] = "running"
        row["text"] = "running" + (f" for {format_duration(seconds)}" if seconds else "")
    elif state == "done":
        row["state"] = "done"
        row["text"] = "done" + (f" in {format_duration(seconds)}" if seconds else "")
    elif state == "failed":
        row["state"] = "failed"
        row["text"] = "failed" + (f" after {format_duration(seconds)}" if seconds else "")
    else:
        row["text"] = {"waiting": "waiting for a worker", "stopped": "stopped"}.get(
            state, "not started"
        )
    if fit.get("steps_total"):
        step = f"step {fit['steps_done']} of {fit['steps_total']} finished"
        row["detail"] = step + (f": {fit['step']}" if fit.get("step") else "")
    elif state == "running":
        row["detail"] = "one task on one worker: umap-learn on the landmarks"
    return row


_STATE_COLORS = {"done": "#2e9d4f", "running": "#3b7dd8", "failed": "#c0392b", "idle": "#999"}


def render_table(snapshot: dict[str, Any], now: float | None = None) -> str:
    """The stages as an HTML table (bars only for progress; results and the fit as text)."""
    esc = html.escape
    body = []
    for row in stage_rows(snapshot, now):
        bar = ""
        if row["fraction"] is not None:
            percent = 100.0 * row["fraction"]
            fill = _STATE_COLORS["done" if row["state"] == "done" else "running"]
            bar = (
                '<div style="width:16em;height:0.9em;background:#e6e6e6">'
                f'<div class="fill" style="width:{percent:.1f}%;height:100%;background:{fill}">'
                f"</div></div>"
            )
        color = _STATE_COLORS.get(row["state"], "#999")
        body.append(
            f'<tr id="stage-{esc(row["key"])}">'
            f'<td style="padding:0.3em 0.8em;font-weight:bold;color:{color}">'
            f"{esc(row['stage'])}</td>"
            f'<td class="text" style="padding:0.3em 0.8em">{esc(row["text"])}</td>'
            f'<td style="padding:0.3em 0.8em">{bar}</td>'
            f'<td class="detail" style="padding:0.3em 0.8em;color:#555">{esc(row["detail"])}</td>'
            "</tr>"
        )
    return (
        '<table style="border-collapse:collapse;font-family:sans-serif;font-size:14px">'
        f"<tbody>{''.join(body)}</tbody></table>"
    )


def render_page(snapshot: dict[str, Any]) -> str:
    """A plain, self-refreshing HTML page of the stages, served at ``/distumap`` only where the
    scheduler has no Bokeh dashboard."""
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f'<meta http-equiv="refresh" content="{_REFRESH_SECONDS}">'
        "<title>distumap progress</title></head><body>"
        "<h1>distumap progress</h1>"
        f"{render_table(snapshot)}"
        f'<p><a href="{ROUTE}/progress.json">JSON</a></p>'
        "</body></html>\n"
    )
