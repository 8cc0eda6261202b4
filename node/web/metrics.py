"""Prometheus metrics, read from the database at each scrape (workers are other processes)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from node.db import Delivery, Instance, Job
from node.ingest import spool
from node.jobs import counts_by_state
from node.web.view import NodeView

#: Bucket bounds (seconds) of the stage duration histograms.
BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800)
#: Stage durations are taken from this many most recent jobs.
RECENT_JOBS = 5000


class _Collector:
    def __init__(self, view: NodeView):
        self.view = view

    def collect(self) -> Iterator[Metric]:
        with self.view.sessions() as db:
            received = db.execute(select(func.count(Instance.id))).scalar_one()
            counts = counts_by_state(db)
            stages = (
                db.execute(select(Job.stage_seconds).order_by(Job.id.desc()).limit(RECENT_JOBS))
                .scalars()
                .all()
            )
            histories = db.execute(select(Delivery.history)).scalars().all()
        c = CounterMetricFamily(
            "idaics_instances_received", "DICOM instances received and recorded"
        )
        c.add_metric([], received)
        yield c
        g = GaugeMetricFamily("idaics_jobs", "Jobs by state", labels=["state"])
        for state, n in counts.items():
            g.add_metric([state], n)
        yield g
        h = HistogramMetricFamily(
            "idaics_stage_duration_seconds", "Time jobs spent in each state", labels=["stage"]
        )
        per_stage: dict[str, list[float]] = {}
        for st in stages:
            for stage, seconds in (st or {}).items():
                per_stage.setdefault(stage, []).append(float(seconds))
        for stage, values in sorted(per_stage.items()):
            buckets = [(str(float(b)), sum(v <= b for v in values)) for b in BUCKETS] + [
                ("+Inf", len(values))
            ]
            h.add_metric([stage], buckets, sum(values))
        yield h
        f = CounterMetricFamily("idaics_send_failures", "Failed C-STORE attempts to destinations")
        f.add_metric(
            [], sum(1 for hist in histories for a in (hist or []) if "ok" in a and not a["ok"])
        )
        yield f
        q = GaugeMetricFamily("idaics_queue_depth", "Jobs waiting for a worker")
        q.add_metric([], counts["QUEUED"])
        yield q
        d = GaugeMetricFamily("idaics_spool_free_bytes", "Free space on the spool's disk")
        d.add_metric([], spool.free_mb(self.view.settings.spool_dir) * 2**20)
        yield d
        r = GaugeMetricFamily("idaics_receiver_up", "1 while the DICOM listener is listening")
        r.add_metric([], 1 if self.view.receiver_listening() else 0)
        yield r


def metrics_text(view: NodeView) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(view))
    return generate_latest(registry)
