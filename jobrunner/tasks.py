"""Celery tasks: thin wrappers that pass ids to jobrunner.shards.

Policy, stated where the task is declared: late acknowledgement and requeue when the worker
process dies (a shard is idempotent: claimed by a conditional update, its output keyed by
job and shard), no automatic retries (an error in a model or a spec fails again; a lost
worker is handled by the lease reaper), soft and hard time limits above the job limit that
the runner enforces itself by stopping ONNX Runtime.
"""

from __future__ import annotations

import os

from celery.signals import worker_process_init
from threadpoolctl import threadpool_limits

from infra.broker import QUEUE, UNIT_TASK, celery_app
from infra.settings import get_settings
from jobrunner.shards import run_shard

_settings = get_settings()


@celery_app().task(
    name=UNIT_TASK,
    queue=QUEUE,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=0,
    ignore_result=True,
    soft_time_limit=_settings.job_time_limit_s + 60,
    time_limit=_settings.job_time_limit_s + 120,
)
def run_unit(job_id: str, position: int) -> None:
    run_shard(job_id, position)


@worker_process_init.connect
def _limit_threads(**_) -> None:
    """Worker processes share the cores: BLAS gets the same share as ONNX Runtime, or the
    attack loops' numpy calls oversubscribe them; and they yield to the gateway."""
    threadpool_limits(limits=_settings.threads_per_worker)
    os.nice(max(0, _settings.worker_nice - os.nice(0)))
