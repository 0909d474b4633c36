"""Run one shard of an evaluation: claim it, run the engine with a lease and a deadline,
store its output, and hand the job on (to the aggregation, or to its final state).

The engine never sees the database: this module turns its progress callbacks into lease
renewals and turns a cancel or a deadline into a stop of ONNX Runtime.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections import OrderedDict
from functools import lru_cache

from sqlalchemy import select

from infra import jobs
from infra.blobs import BlobStore
from infra.broker import celery_app
from infra.database import session_factory
from infra.dispatch import dispatch
from infra.gateway_blobs import blob_store_of_worker
from infra.records import Job, Shard, StoredDataset, StoredModel
from infra.settings import get_settings
from schemas.evaluation import EvaluationResult, EvaluationSpec
from workers.artifacts import stored_artifact
from workers.dataset_files import load_dataset_file
from workers.datasets import Dataset
from workers.errors import UserError
from workers.evaluate import finish, run_unit
from workers.onnxgrad import InvalidModelError, weights
from workers.onnxgrad.prepare import load_model
from workers.plan import EvaluationCancelled, plan
from workers.report import render_report
from workers.runtime import RunsInterrupted, RuntimeOptions, interrupt_runs, resume_runs
from workers.subject import select_samples
from workers.units import UnitOutput

log = logging.getLogger("robustness.worker")


class _Cache(OrderedDict):
    def fetch(self, key, load, capacity: int = 2):
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = load()
        while len(self) > capacity:
            self.popitem(last=False)
        return value


_models = _Cache()
_datasets = _Cache()


@lru_cache
def _store() -> BlobStore:
    return blob_store_of_worker(get_settings())


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Watch(threading.Thread):
    """Renews the lease, records progress at most every few seconds, and stops ONNX Runtime
    when the job is cancelled elsewhere or the shard passes its deadline."""

    def __init__(self, sessions, claim: jobs.Claim, settings):
        super().__init__(daemon=True, name=f"lease-{claim.job_id}-{claim.position}")
        self.sessions, self.claim, self.settings = sessions, claim, settings
        self.deadline = time.monotonic() + settings.job_time_limit_s
        self.period = max(0.2, min(settings.lease_s / 3, settings.progress_interval_s or 1.0))
        self.stages: dict[str, int] = {}
        self.stage: str | None = None
        self.stop_reason: str | None = None
        self.finishing = False  # set once the job's result is stored: its end is not a stop
        self._closing = threading.Event()

    def progress(self, stage: str, done: int, total: int) -> None:
        """The engine's callback: runs between batches, so raising here stops the shard cleanly."""
        self.stage = stage
        self.stages[stage] = done
        if self.stop_reason is not None:
            raise EvaluationCancelled(self.stop_reason)

    def run(self) -> None:
        while not self._closing.wait(self.period):
            try:
                with self.sessions() as db:
                    state = jobs.heartbeat(
                        db,
                        self.claim,
                        self.settings.lease_s,
                        (self.stage, sum(self.stages.values())) if self.stage else None,
                    )
            except Exception as exc:  # a database hiccup must not kill the shard; the lease covers it
                log.warning("evaluation.heartbeat_failed job=%s error=%s", self.claim.job_id, exc)
                continue
            if state == "lease_lost":
                self._halt("lease_lost")
            elif state not in jobs.ACTIVE and not self.finishing:
                self._halt("cancelled")
            elif time.monotonic() > self.deadline:
                self._halt("time_limit")

    def _halt(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
            log.warning(
                "evaluation.stopping job=%s shard=%s reason=%s",
                self.claim.job_id,
                self.claim.position,
                reason,
            )
            interrupt_runs()

    def close(self) -> None:
        self._closing.set()
        self.join(timeout=10)


def run_shard(job_id: str, position: int) -> None:
    """Run the fairest queued shard (jobs.claim_next): the message for shard ``position`` of
    ``job_id`` is a ticket for one shard's worth of work, whichever tenant's it turns out to be."""
    settings = get_settings()
    sessions = session_factory(settings.database_url)
    with sessions() as db:
        claim = jobs.claim_next(db, worker_name(), settings.lease_s, settings.max_attempts)
    if claim is None:
        log.info("evaluation.ticket_unused job=%s shard=%s: no shard left to run", job_id, position)
        return
    job_id, position = claim.job_id, claim.position
    log.info("evaluation.shard_started job=%s shard=%s attempt=%s", job_id, position, claim.attempt)
    watch = _Watch(sessions, claim, settings)
    resume_runs()
    watch.start()
    try:
        _run_claimed(sessions, claim, watch, settings)
    except (EvaluationCancelled, RunsInterrupted):
        reason = watch.stop_reason or "cancelled"
        if reason == "lease_lost":  # another attempt owns the shard now: leave its row alone
            log.warning("evaluation.lease_lost job=%s shard=%s attempt=%s", job_id, position, claim.attempt)
            return
        with sessions() as db:
            if reason == "time_limit":
                jobs.fail_job(
                    db,
                    job_id,
                    "time_limit",
                    f"shard {position} ran past the time limit of {settings.job_time_limit_s:g} s "
                    "(ROBUSTNESS_JOB_TIME_LIMIT_S); use fewer samples, attacks or steps",
                )
            jobs.release_shard(db, claim, "cancelled" if reason == "cancelled" else "failed")
    except UserError as exc:  # the user's model, data or spec: it would fail again
        with sessions() as db:
            jobs.fail_job(db, job_id, "invalid_input", str(exc))
            jobs.release_shard(db, claim, "failed")
    except Exception as exc:  # ours: another attempt may succeed (a database or storage hiccup)
        log.exception("evaluation.shard_crashed job=%s shard=%s attempt=%s", job_id, position, claim.attempt)
        _retry_or_fail(sessions, claim, exc, settings)
    finally:
        watch.close()
        resume_runs()


def _retry_or_fail(sessions, claim: jobs.Claim, exc: Exception, settings) -> None:
    """An internal error (a gateway that did not answer for ROBUSTNESS_GATEWAY_RETRY_S among them):
    the shard runs again, up to ROBUSTNESS_MAX_ATTEMPTS runs, after which the job fails with
    internal_error."""
    with sessions() as db:
        if claim.attempt < settings.max_attempts and jobs.requeue_shard(db, claim):
            log.warning("evaluation.shard_retried job=%s shard=%s attempt=%s", claim.job_id, claim.position,
                        claim.attempt)
            retry = True
        else:
            jobs.fail_job(db, claim.job_id, "internal_error", _without_paths(
                f"{type(exc).__name__}: {exc} (after {claim.attempt} attempt(s))", settings))
            jobs.release_shard(db, claim, "failed")
            retry = False
    if retry:
        dispatch(sessions, celery_app(), claim.job_id, [claim.position])


def _inputs(db, claim: jobs.Claim, store):
    job = db.get(Job, claim.job_id)
    spec = EvaluationSpec.model_validate(job.spec)
    model = _models.fetch(job.model_sha256, lambda: store.get_bytes(job.model_sha256))
    value_range = spec.input.range
    dataset: Dataset = _datasets.fetch(
        (job.dataset_sha256, value_range),
        lambda: load_dataset_file(store.local_path(job.dataset_sha256), value_range),
    )
    return job, spec, _with_weights(store, model), dataset  # last: the most recently used in a cache


def _run_claimed(sessions, claim: jobs.Claim, watch: _Watch, settings) -> None:
    store = _store()
    with sessions() as db:
        job, spec, model, dataset = _inputs(db, claim, store)
        transfer_models = dict(job.models or {})
        options = RuntimeOptions(batch_size=spec.batch_size, intra_op_threads=settings.threads_per_worker,
                                 memory_budget=settings.worker_memory_budget)
        if claim.kind == jobs.FINISH:
            parts = db.execute(
                select(Shard.output_sha256, Shard.timing)
                .where(Shard.job_id == claim.job_id, Shard.kind != jobs.FINISH)
                .order_by(Shard.position)
            ).all()
            baselines = {k: EvaluationResult.model_validate(v) for k, v in (job.baselines or {}).items()}
            names = _record_names(db, job)
    if claim.kind == jobs.FINISH:
        outputs = [UnitOutput.from_bytes(store.get_bytes(sha), timing=timing) for sha, timing in parts]
        evaluation = finish(
            model, dataset, spec, outputs, progress=watch.progress, options=options, baselines=baselines
        )
        artifacts = {}
        clean = select_samples(dataset.x, dataset.y, spec.samples)[0]
        for name, array in evaluation.artifacts.items():
            stored_name, data = stored_artifact(name, array, clean)
            artifacts[stored_name] = {"sha256": store.put_bytes(data), "size": len(data)}
        result = evaluation.result.model_dump(mode="json")
        watch.finishing = True  # the job is about to succeed: that is no reason to stop
        with sessions() as db:
            succeeded = jobs.complete_job(db, claim, result, evaluation.result.passed, artifacts,
                                          verdict=evaluation.result.verdict)
        log.info("evaluation.succeeded job=%s verdict=%s", claim.job_id, evaluation.result.verdict)
        if succeeded:  # the report follows the result (GET /report waits for it)
            report = _report(evaluation, claim.job_id, names, store)
            with sessions() as db:
                jobs.attach_report(db, claim.job_id, report)
        return
    unit = plan(spec, len(dataset.y))[claim.position]
    models, fit_images = None, None
    if unit.kind == "transfer" or transfer_models and spec.defenses:
        models, fit_images = _load_extras(store, transfer_models, spec)
    output = run_unit(model, dataset, spec, unit, progress=watch.progress, options=options, models=models,
                      fit_images=fit_images)
    sha = store.put_bytes(output.to_bytes())
    with sessions() as db:
        ready = jobs.complete_shard(db, claim, sha, output.timing)
    log.info("evaluation.shard_succeeded job=%s shard=%s", claim.job_id, claim.position)
    if ready:
        with sessions() as db:
            positions = jobs.shards_to_dispatch(db, claim.job_id)
        dispatch(sessions, celery_app(), claim.job_id, positions)


def _record_names(db, job: Job) -> tuple[str | None, str | None]:
    model = db.get(StoredModel, job.model_id)
    dataset = db.get(StoredDataset, job.dataset_id)
    return (model.name if model else None, dataset.name if dataset else None)


def _report(evaluation, job_id: str, names: tuple, store) -> str | None:
    """Render the HTML report once, with the result; a report that fails to render is logged
    and left out, never failing the evaluation."""
    try:
        html = render_report(
            evaluation.result,
            evaluation.examples,
            model_name=names[0],
            dataset_name=names[1],
            evaluation_id=job_id,
        )
    except Exception:
        log.exception("evaluation.report_failed job=%s", job_id)
        return None
    return store.put_bytes(html.encode())


def _load_extras(store, stored: dict[str, str], spec: EvaluationSpec) -> tuple[dict, dict]:
    """A job's other inputs, kept by the job as key -> sha256 (DefenseSpec.fit_key() for a
    defense's fit dataset): (model bytes by name, fit images by the defense's key)."""
    models, fit_images = {}, {}
    fit_keys = {d.fit_key(): d.key for d in spec.defenses if d.fit_dataset is not None}
    for name, sha in stored.items():
        if name in fit_keys:
            fit_images[fit_keys[name]] = load_dataset_file(store.local_path(sha), spec.input.range).x
        else:
            models[name] = _with_weights(store, store.get_bytes(sha))
    return models, fit_images


def _with_weights(store: BlobStore, model: bytes) -> bytes:
    """``model``, with the data files of a model past protobuf's limit made local (fetched into a
    remote worker's cache) and the store's root made the weights folder that names them."""
    if not weights.might_have_external(model):
        return model
    for location in weights.locations(load_model(model)):
        blob = weights.blob_of(location)
        if blob is None:
            raise InvalidModelError("the stored model names external data that is not in the store; "
                                    "upload it again with its data files")
        root = store.local_path(blob).parents[1]
        if weights.folder() not in (None, root.resolve()):
            raise RuntimeError(f"a second weights folder {root} beside {weights.folder()}")
        weights.set_folder(root)
    return model


def _without_paths(message: str, settings) -> str:
    """Error messages reach users: no server paths or addresses in them (the log keeps the details)."""
    for path in sorted({str(settings.blob_dir), str(settings.data_dir)}, key=len, reverse=True):
        message = message.replace(path, "<store>")
    if settings.gateway_url:
        message = message.replace(settings.gateway_url.rstrip("/"), "<gateway>")
    return message



