"""What the page says: the stages as rows and as an HTML table, and the plain page served
where the scheduler has no Bokeh dashboard."""

from __future__ import annotations

import html
import time
from typing import Any

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


def _format_rate(rate: float, unit: str, per_unit: int = 1) -> str:
    """``1,234 cells/s``; below one unit a second, the time one takes (``2.5 s per epoch``)."""
    what = unit.split()[0]  # "cells ingested" -> cells
    rate = rate / max(per_unit, 1)
    if rate < 1:
        return f"{format_duration(1 / rate)} per {what.removesuffix('s')}"
    shown = f"{rate:,.0f}" if rate >= 10 else f"{rate:.2g}"
    return f"{shown} {what}/s"


def stage_rows(snapshot: dict[str, Any], now: float | None = None) -> list[dict[str, Any]]:
    """One row per stage and step, in the snapshot's order (the order a run executes them):
    ``key``, ``stage`` (its name), ``parent`` (the stage a step belongs to, or None),
    ``state``, ``text`` (what is done), ``fraction`` (None for results, the fit and stages
    made of steps: no bar) and ``detail`` (rate and time left, or time taken)."""
    now = time.time() if now is None else now
    rows = []
    tasks = snapshot.get("tasks", {})
    for key, info in snapshot["stages"].items():
        if info.get("kind") == "task":
            row = _fit_row(snapshot.get("fit") or {}, now)
        elif info["kind"] == "progress" and not info["total"] and _has_steps(snapshot, key):
            row = _parent_row(info)
        else:
            row = _stage_row(info, tasks)
        row.update(key=key, stage=info.get("name", key), parent=info.get("stage"))
        rows.append(row)
    return rows


def _has_steps(snapshot: dict[str, Any], key: str) -> bool:
    return any(info.get("stage") == key for info in snapshot["stages"].values())


def _took(info: dict[str, Any]) -> str:
    took = (info["updated"] or 0) - (info["started"] or 0)
    return f"done in {format_duration(took)}" if info["started"] and took > 0 else "done"


def _parent_row(info: dict[str, Any]) -> dict[str, Any]:
    """A stage made of steps (the embed, the exports): which step runs, or how long it took."""
    state, current = info["state"], info.get("current")
    row = {"fraction": None, "detail": "", "state": state}
    if state == "running":
        row["text"] = f"running: {current}" if current else "running"
        if current and info.get("seconds_left") is not None:
            row["detail"] = f"about {format_duration(info['seconds_left'])} left in {current}"
    elif state == "done":
        row["text"] = "done"
        row["detail"] = _took(info)
    elif state == "failed":
        row["text"] = "failed"
    else:
        row["text"] = "not started"
    return row


def _stage_row(info: dict[str, Any], tasks: dict[str, Any]) -> dict[str, Any]:
    unit, done, total = info["unit"], info["done"], info["total"]
    per_unit = info.get("per_unit") or 1
    state = info.get("state") or ("done" if info["complete"] else "idle")
    row = {"fraction": None, "detail": "", "state": state}
    if info["kind"] == "result":
        if info["updated"] is not None and info["complete"]:
            row["text"] = f"{done:,} of {total:,} {unit}"
            row["state"] = "done"
        elif state == "running" or tasks.get("gene-stats", {}).get("processing", 0):
            current = info.get("current")
            row["text"] = f"running: {current}" if current else "gene statistics running"
            row["state"] = "running"
        else:
            row["text"] = "not started"
            row["state"] = "idle"
        return row
    if not total:
        row["text"] = {"running": "started", "failed": "failed", "done": "done"}.get(
            state, "not started"
        )
        return row
    row["text"] = f"{done // per_unit:,} of {total // per_unit:,} {unit}"
    row["fraction"] = info["fraction"]
    rate = info.get("rate")
    if state == "done":
        parts = [_took(info)]
        if rate:
            parts.append(f"{_format_rate(rate, unit, per_unit)} on average")
        row["detail"] = " · ".join(parts)
    elif state == "failed":
        row["detail"] = "failed"
    elif info["complete"]:  # every block written, the step not ended (a file being closed)
        row["detail"] = "every block written; not finished yet"
    else:
        row["state"] = "running"
        parts = [_format_rate(rate, unit, per_unit)] if rate else ["measuring rate"]
        if info.get("seconds_left") is not None:
            parts.append(f"about {format_duration(info['seconds_left'])} left")
        row["detail"] = " · ".join(parts)
    return row


def _fit_row(fit: dict[str, Any], now: float) -> dict[str, Any]:
    state = fit.get("state", "not started")
    seconds = fit.get("seconds")
    row = {"fraction": None, "detail": "", "state": "idle"}
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
        row["text"] = {"waiting": "waiting to start", "stopped": "stopped"}.get(
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
        # a step sits under its stage, indented and not bold
        name_style = (
            "padding:0.3em 0.8em 0.3em 2em"
            if row.get("parent")
            else ("padding:0.3em 0.8em;font-weight:bold")
        )
        body.append(
            f'<tr id="stage-{esc(row["key"])}">'
            f'<td style="{name_style};color:{color}">'
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
