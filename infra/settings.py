"""Service settings: environment variables prefixed ``ROBUSTNESS_`` (or a ``.env`` file).

One data folder holds everything of the embedded default: the SQLite metadata database, the
embedded broker and the blob store. Distributed deployments point the URLs at PostgreSQL and
Redis and share ``blob_dir`` between the gateway and the workers.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1 << 20


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ROBUSTNESS_", env_file=".env", extra="ignore")

    data_dir: Path = Path("robustness-data")  # the embedded default keeps everything here
    # Left out, these three are derived from data_dir (by _derived_defaults, before validation)
    database_url: str  # default: sqlite:///<data_dir>/metadata.db
    broker_url: str  # default: the embedded SQLite broker, embedded+sqlite:///<data_dir>/broker.db
    blob_dir: Path  # default: <data_dir>/blobs

    # Workers on other machines (no folder shared with the gateway): a worker given
    # gateway_url fetches blobs from the gateway by sha256 into blob_dir (a cache of at most
    # blob_cache_mb) and sends what it writes back there, authenticated with worker_token; a
    # gateway given worker_token serves those /internal routes (and only to that token)
    gateway_url: str | None = None
    worker_token: str | None = Field(None, min_length=32)
    blob_cache_mb: int = Field(20_000, ge=1)
    # such a worker rides out a gateway restart or redeploy: a transfer the gateway does not
    # answer is tried again, with backoff, for up to this many seconds (its shard keeps its lease
    # and its attempt meanwhile); past it, the shard's attempt ends as an internal error
    gateway_retry_s: float = Field(120, gt=0)

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # With no API keys in the database the gateway refuses requests unless this is false and it
    # listens on loopback only (the embedded default).
    api_keys_required: bool = False

    # dashboard sign-ins: server-side sessions (the cookie holds an opaque token, never the key)
    session_lifetime_s: float = Field(12 * 3600, gt=0)
    # behind HTTPS (a TLS-terminating proxy): the session cookie is marked Secure
    https: bool = False

    max_body_bytes: int = Field(512 * MiB, ge=1024)  # any request; 413 before the handler runs
    max_model_bytes: int = Field(256 * MiB, ge=1024)
    # a model with data files past this keeps its large tensors in them (workers/onnxgrad/weights.py);
    # protobuf's 2 GiB limit, lowered only to try that path on small models
    inline_model_bytes: int = Field(2**31 - 1, ge=1024, le=2**31 - 1)
    max_dataset_bytes: int = Field(512 * MiB, ge=1024)  # the uploaded file
    max_dataset_decoded_bytes: int = Field(2048 * MiB, ge=1024)  # x and y once decoded
    max_samples: int = Field(200_000, ge=1)
    # uploads are validated in child processes (service/validation_pool.py), at most this many
    # at once, each stopped and refused past validation_cpu_s seconds of CPU
    validation_processes: int = Field(2, ge=1)
    validation_cpu_s: float = Field(30, gt=0)
    # a model whose Loops (nested ones multiplied) may run more iterations is refused; a Loop
    # without a constant trip count is refused too (its cost cannot be bounded at upload)
    max_loop_iterations: int = Field(100_000, ge=1)
    max_concurrent_jobs: int = Field(4, ge=1)  # per tenant: queued + running
    # Compute budgets (service/budgets.py): each attack parameter and the spec's size have a
    # bound; a job's cost is its estimated model calls x samples (workers/cost.py), bounded per
    # job and, summed over a tenant's queued and running jobs, by the tenant's quota
    max_steps: int = Field(10_000, ge=1)  # steps
    max_iterations: int = Field(10_000, ge=1)  # max_iter, search_steps, binary_search_steps, max_passes
    max_restarts: int = Field(100, ge=1)  # restarts, repeats
    max_queries: int = Field(100_000, ge=1)  # queries, square_queries
    max_eps_values: int = Field(64, ge=1)  # budgets in one attack's eps list
    max_attacks: int = Field(32, ge=1)  # attacks in a spec, its transfer attacks included
    max_job_cost: int = Field(10**9, ge=1)
    tenant_cost_quota: int = Field(4 * 10**9, ge=1)
    max_result_age_days: int = Field(0, ge=0)  # reserved: 0 keeps results forever

    # The gateway. Handlers run on request_threads threads; a request holds a pooled database
    # connection only while one of its threads runs, so a pool of twice the threads (and a few
    # for the reaper) never makes a request wait for a connection. Requests past that wait for
    # a thread holding nothing.
    request_threads: int = Field(24, ge=1, le=1000)
    db_pool_size: int | None = Field(None, ge=1)  # default: 2 * request_threads + 4
    db_pool_timeout_s: float = Field(30, gt=0)  # then the request answers 503 with Retry-After
    # an API key or dashboard session is looked up at most this often per gateway process: a
    # revoked one stops working within this many seconds
    auth_cache_s: float = Field(2.0, ge=0, le=60)
    # one evaluation's status is read from the database at most this often per gateway process
    status_cache_s: float = Field(0.25, ge=0, le=10)
    # long polls (?wait=S, at most max_status_wait_s): the states waited on are read this often;
    # past max_status_waiters concurrent long polls a request is answered at once, as a plain poll
    status_wait_interval_s: float = Field(0.05, gt=0, le=5)
    max_status_wait_s: float = Field(30, ge=0, le=30)
    max_status_waiters: int = Field(10_000, ge=0)

    worker_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # worker processes run at this nice level (0-19): on a machine shared with the gateway the
    # API stays responsive while evaluations compute; alone on a machine it costs them nothing
    worker_nice: int = Field(10, ge=0, le=19)
    # ONNX Runtime threads per worker process; default: the cores shared out among processes
    ort_threads: int | None = Field(None, ge=1)
    # memory one gradient call of a worker process may take: batches shrink to fit it (measured
    # per model, workers/memory_budget.py); default: half the memory available when the worker
    # starts, shared out among its processes
    worker_memory_mb: int | None = Field(None, ge=16)
    job_time_limit_s: float = Field(6 * 3600, gt=0)  # per shard: stopped, then failed as time_limit
    lease_s: float = Field(60, gt=0)  # a running shard renews its lease; an expired lease is reaped
    max_attempts: int = Field(3, ge=1)  # shard runs before a lost worker fails the job
    progress_interval_s: float = Field(2.0, ge=0)
    reaper_interval_s: float | None = Field(None, gt=0)  # default: lease_s / 3

    @model_validator(mode="before")
    @classmethod
    def _derived_defaults(cls, values: dict) -> dict:
        values = dict(values)
        data_dir = Path(values.get("data_dir") or "robustness-data").expanduser().resolve()
        values["data_dir"] = data_dir
        for name, derived in (("database_url", f"sqlite:///{data_dir / 'metadata.db'}"),
                              ("broker_url", f"embedded+sqlite:///{data_dir / 'broker.db'}"),
                              ("blob_dir", data_dir / "blobs")):
            if values.get(name) is None:
                values[name] = derived
        return values

    @property
    def threads_per_worker(self) -> int:
        return self.ort_threads or max(1, (os.cpu_count() or 1) // self.worker_concurrency)

    @property
    def worker_memory_budget(self) -> int:
        """Bytes one gradient call of a worker process may take."""
        if self.worker_memory_mb is not None:
            return self.worker_memory_mb << 20
        from workers.memory_budget import default_budget

        return default_budget(self.worker_concurrency)

    @property
    def pool_size(self) -> int:
        return self.db_pool_size or 2 * self.request_threads + 4

    @property
    def reaper_every_s(self) -> float:
        return self.reaper_interval_s or max(0.5, self.lease_s / 3)

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url.startswith(("embedded+", "sqla+"))

    def prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.blob_dir.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    settings = Settings()
    settings.prepare()
    return settings
