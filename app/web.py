"""Web views on the worker's port: Prometheus metrics, liveness and readiness probes, stats.

Faust's own table and router routes can dump table contents to anyone on the port; app.factory turns
them off unless WEB_TABLE_ROUTES_ENABLED=true. No view shows a secret or an event payload.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import time
from collections.abc import Callable
from typing import Any

from faust.sensors.prometheus import MS_LATENCY_BUCKETS, FaustMetrics, PrometheusMonitor
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, Histogram, generate_latest

from app import app, jobs, lag, metrics, settings
from app.deadletter import dlq_stats
from app.runtime import history, sink


def setup_prometheus_sensors(prefix: str = "faust") -> FaustMetrics:
    """Faust's Prometheus sensor (`prefix`_* metrics) and memsync's memory_sync_* metrics, on one
    registry, served at /metrics.

    What faust.sensors.prometheus.setup_prometheus_sensors does, with one change: Faust names its
    event-runtime histogram `<prefix>_events_runtime_ms`, which `promtool check metrics` rejects
    (abbreviated unit), so it is exported as `<prefix>_events_runtime_latency`, like Faust's other
    latency histograms (all of them in milliseconds, as their help says).
    """
    faust_metrics = FaustMetrics.create(metrics.registry, prefix)
    metrics.registry.unregister(faust_metrics.events_runtime_latency)
    faust_metrics = faust_metrics._replace(
        events_runtime_latency=Histogram(
            f"{prefix}_events_runtime_latency",
            "Events runtime in ms",
            buckets=MS_LATENCY_BUCKETS,
            registry=metrics.registry,
        )
    )
    app.monitor = PrometheusMonitor(metrics=faust_metrics)
    return faust_metrics


faust_metrics = setup_prometheus_sensors()

STARTED_AT = time.time()
PROBE_TIMEOUT_S = 3.0


async def _check(name: str, probe: Any) -> tuple[str, str | None]:
    try:
        await asyncio.wait_for(probe(), PROBE_TIMEOUT_S)
    except Exception as exc:
        return name, f"{type(exc).__name__}: {exc}"[:300]
    return name, None


async def _mongo_ping() -> None:
    from app.mongo import shared_client

    await shared_client().admin.command("ping")


async def readiness() -> dict[str, Any]:
    problems: dict[str, str] = {}
    if app.rebalancing:
        problems["kafka"] = "rebalancing"
    elif not app.tables.recovery.completed.is_set():
        problems["tables"] = "recovering table state from changelogs"
    checks = await asyncio.gather(_check("clickhouse", history().ping), _check("mongodb", _mongo_ping))
    problems.update({name: problem for name, problem in checks if problem})
    return {"ready": not problems, "problems": problems}


def stats() -> dict[str, Any]:
    from tables import processed

    assignment = sorted((tp.topic, tp.partition) for tp in app.consumer.assignment()) if app.consumer else []
    return {
        "worker_id": settings.worker_id,
        "uptime_s": round(time.time() - STARTED_AT, 1),
        "config": settings.describe(),
        "assignment": [f"{topic}[{partition}]" for topic, partition in assignment],
        "sink": sink().state.as_dict(),
        "counts": {
            "consumed": _counter_total(metrics.events_consumed),
            "consumed_by_topic": _counter_by_label(metrics.events_consumed_by_topic),
            "duplicates_skipped": _counter_total(metrics.duplicates_skipped),
            "duplicates_by_layer": _counter_by_label(metrics.duplicates_skipped),
            "dlq": _counter_total(metrics.dlq_events),
            "dlq_by_class": _counter_by_label(metrics.dlq_events_by_class),
            "rows_inserted": _counter_total(metrics.rows_inserted),
        },
        "lag": lag.latest,
        "lag_refreshed_at": metrics.registry.get_sample_value(
            "memory_sync_consumer_lag_refreshed_timestamp_seconds"
        )
        or None,
        "idempotency_table": processed.partition_stats(),
        "dlq": dlq_stats.as_dict(),
        "jobs": jobs.job_reports(),
    }


def _counter_total(counter: Any) -> int:
    return int(
        sum(sample.value for m in counter.collect() for sample in m.samples if sample.name.endswith("_total"))
    )


def _counter_by_label(counter: Any) -> dict[str, int]:
    return {
        next(iter(sample.labels.values()), ""): int(sample.value)
        for m in counter.collect()
        for sample in m.samples
        if sample.name.endswith("_total")
    }


@app.page("/metrics")
class Metrics(View):
    async def get(self, request: Request) -> Response:
        return self.bytes(generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


@app.page("/healthz")
class Healthz(View):
    async def get(self, request: Request) -> Response:
        return self.json({"status": "alive", "worker_id": settings.worker_id})


@app.page("/readyz")
class Readyz(View):
    async def get(self, request: Request) -> Response:
        report = await readiness()
        return self.json(report, status=200 if report["ready"] else 503)


async def stats_with_runs() -> dict[str, Any]:
    """stats() plus the last finished runs from the run store (any worker's or the CLI's)."""
    return {**stats(), "runs": await jobs.finished_runs()}


@app.page("/stats")
class Stats(View):
    async def get(self, request: Request) -> Response:
        if request.query.get("rescan") == "table":
            # The idempotency table's counts are a cached scan (tables/processed.py); wait for a fresh
            # one (run in a thread) instead of the next timed one.
            from tables import processed

            with contextlib.suppress(processed.ScanAborted):  # a rebalance began: the cached scan
                await processed.refresh_partition_stats()
        return self.json(await stats_with_runs())


@app.page("/stats/html")
class StatsPage(View):
    async def get(self, request: Request) -> Response:
        return self.html(render_stats_page(await stats_with_runs()))


def _ms(epoch_ms: float | None) -> str:
    """Epoch milliseconds as UTC time on the HTML page (the JSON keeps the numbers)."""
    if epoch_ms is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch_ms / 1000))


def render_stats_page(data: dict[str, Any]) -> str:
    def table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(cell))}</td>" for cell in row) + "</tr>" for row in rows
        )
        return f"<table><tr>{head}</tr>{body}</table>"

    sink_state = data["sink"]
    lag_rows = [(topic, p, v) for topic, parts in data["lag"].items() for p, v in sorted(parts.items())]
    table_rows = [
        (p, s.get("role"), s.get("entries"), s.get("expired_entries"), _ms(s.get("oldest_ms")),
         _ms(s.get("newest_ms")), _ms(s.get("scanned_at_ms")), s.get("marked_by_this_worker"))
        for p, s in data["idempotency_table"].items()
    ]  # fmt: skip
    count_rows = [
        row
        for name, value in data["counts"].items()
        for row in (
            [(f"{name}[{key}]", count) for key, count in sorted(value.items())]
            if isinstance(value, dict)
            else [(name, value)]
        )
    ]
    refreshed = data.get("lag_refreshed_at")
    lag_note = f"refreshed {_ms(refreshed * 1000)}" if refreshed else "not refreshed yet"
    dlq = data["dlq"]
    jobs = [(name, r.get("status"), r.get("run"), r.get("finished_at")) for name, r in data["jobs"].items()]
    runs = data.get("runs") or {"recent": [], "error": None}
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>memsync {
        html.escape(data["worker_id"])
    }</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:1.5em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}.waiting{{color:#b00}}</style></head><body>
<h1>memsync worker {html.escape(data["worker_id"])}</h1>
<p>Sink: <b class="{html.escape(sink_state["state"])}">{html.escape(sink_state["state"])}</b>
{html.escape(sink_state["reason"])}</p>
<h2>Counts</h2>{table(count_rows, ("metric", "value"))}
<h2>Consumer lag</h2><p>{html.escape(lag_note)}</p>{table(lag_rows, ("topic", "partition", "lag"))}
<h2>Idempotency table</h2>{
        table(
            table_rows,
            ("partition", "role", "entries", "expired", "oldest", "newest", "scanned", "marked here"),
        )
    }
<h2>Dead letters</h2>{table(sorted(dlq["by_error_class"].items()), ("error class", "count"))}
{
        table(
            [(e["error_class"], e["error"], e["source"], e["attempts"]) for e in dlq["latest"][-10:]],
            ("class", "error", "source", "attempts"),
        )
    }
<h2>Scheduled jobs on this worker</h2>{table(jobs, ("job", "status", "run", "finished"))}
<h2>Recent runs</h2>{render_runs(runs["recent"], runs["error"], table)}
</body></html>"""


def render_runs(
    runs: list[dict[str, Any]],
    error: str | None,
    table: Callable[[list[tuple[Any, ...]], tuple[str, ...]], str],
) -> str:
    """The finished runs of the run store, each with its per-collection (or per-data-type) counts as a
    table of its own."""
    out = [f'<p class="waiting">run store unreadable: {html.escape(error)}</p>'] if error else []
    if not runs:
        out.append("<p>no finished run recorded</p>")
    for run in runs:
        when = run.get("scheduled_for") or "manual"
        out.append(
            f"<h3>{html.escape(str(run.get('job')))} {html.escape(str(when))}: "
            f"{html.escape(str(run.get('state')))}</h3>"
            f"<p>run {html.escape(str(run.get('run')))}, started {html.escape(str(run.get('started_at')))}, "
            f"finished {html.escape(str(run.get('finished_at')))}"
            + (f", error: {html.escape(str(run['error']))}" if run.get("error") else "")
            + "</p>"
        )
        for key in ("collections", "data_types"):
            counts: dict[str, dict[str, Any]] = run.get(key) or {}
            if counts:
                header = tuple(next(iter(counts.values())))
                rows = [(name, *(values.get(h) for h in header)) for name, values in counts.items()]
                out.append(table(rows, (key.rstrip("s").replace("_", " "), *header)))
    return "\n".join(out)
