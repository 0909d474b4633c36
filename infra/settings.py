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

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    # With no API keys in the database the gateway refuses requests unless this is false and it
    # listens on loopback only (the embedded default).
    api_keys_required: bool = False

    max_body_bytes: int = Field(512 * MiB, ge=1024)  # any request; 413 before the handler runs
    max_model_bytes: int = Field(256 * MiB, ge=1024)
    max_dataset_bytes: int = Field(512 * MiB, ge=1024)  # the uploaded file
    max_dataset_decoded_bytes: int = Field(2048 * MiB, ge=1024)  # x and y once decoded
    max_samples: int = Field(200_000, ge=1)
    max_concurrent_jobs: int = Field(4, ge=1)  # per tenant: queued + running
    max_result_age_days: int = Field(0, ge=0)  # reserved: 0 keeps results forever

    worker_concurrency: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1)
    # ONNX Runtime threads per worker process; default: the cores shared out among processes
    ort_threads: int | None = Field(None, ge=1)
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
