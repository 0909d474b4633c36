"""The worker side: Celery tasks that run the units of evaluation jobs (shards.py), and the
watchdog that stops a worker whose pool lost a process."""
