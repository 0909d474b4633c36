"""The Celery app: broker from settings (Redis, or the embedded SQLite broker), no result
backend (job state lives in the metadata database, never in Celery's results)."""

from __future__ import annotations

from celery import Celery

from infra import embedded_broker
from infra.settings import Settings, get_settings

UNIT_TASK = "robustness.run_unit"
QUEUE = "evaluations"


def make_celery(settings: Settings) -> Celery:
    embedded_broker.register()
    app = Celery("robustness", broker=settings.broker_url, include=["jobrunner.tasks"])
    hard_limit = settings.job_time_limit_s + 120
    transport = {"visibility_timeout": int(hard_limit + 600)}  # above the hard limit (RELIABILITY.md)
    if settings.embedded_broker:
        transport = {}
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,  # a job on a worker that dies is not lost...
        task_reject_on_worker_lost=True,  # ...and goes back to the queue at once
        worker_prefetch_multiplier=1,  # one shard at a time per process: others stay for other workers
        task_ignore_result=True,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        worker_hijack_root_logger=False,
        worker_send_task_events=True,  # for flower
        task_send_sent_event=True,
    )
    return app


_app: Celery | None = None


def celery_app() -> Celery:
    global _app
    if _app is None:
        _app = make_celery(get_settings())
    return _app
