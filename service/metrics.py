"""Prometheus metrics, read from the metadata database at scrape time so every gateway
replica reports the same numbers."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from sqlalchemy import func, select
from starlette.responses import Response

from infra import jobs
from infra.records import Job, Shard

_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.jobs = Gauge("robustness_evaluations", "Evaluations by state", ["state"], registry=self.registry)
        self.queue = Gauge(
            "robustness_queue_depth", "Shards queued and not yet running", registry=self.registry
        )
        self.running = Gauge(
            "robustness_shards_running", "Shards running on a worker", registry=self.registry
        )
        self.duration = Histogram(
            "robustness_evaluation_seconds",
            "Wall time of the latest finished evaluations, submission to end",
            ["state"],
            buckets=_DURATION_BUCKETS,
            registry=self.registry,
        )
        self.submissions = Counter(
            "robustness_submissions", "Evaluations submitted to this gateway", registry=self.registry
        )
        self.status_polls = Counter(
            "robustness_status_polls", "Status polls answered: before routing (fast) or by the route",
            ["path"], registry=self.registry)
        self._seen: set[str] = set()

    def submitted(self) -> None:
        self.submissions.inc()

    def render(self, state) -> Response:
        with state.sessions() as db:
            counts = jobs.counts_by_state(db)
            for name in _STATES:
                self.jobs.labels(name).set(counts.get(name, 0))
            shard_states = dict(db.execute(select(Shard.state, func.count()).group_by(Shard.state)).all())
            self.queue.set(shard_states.get("queued", 0))
            self.running.set(shard_states.get("running", 0))
            finished = db.execute(
                select(Job.id, Job.state, Job.created_at, Job.finished_at)
                .where(Job.finished_at.is_not(None))
                .order_by(Job.finished_at.desc())
                .limit(500)
            ).all()
        for row in finished:
            if row.id not in self._seen:
                self._seen.add(row.id)
                self.duration.labels(row.state).observe((row.finished_at - row.created_at).total_seconds())
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)
