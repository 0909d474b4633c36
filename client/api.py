"""A small synchronous client for the robustness service's HTTP API (everything under /v1).

    with RobustnessClient("http://localhost:8000", api_key="...") as api:
        model, _ = api.ensure_model("model.onnx")
        data, _ = api.ensure_dataset("test.npz")
        evaluation = api.submit(spec, model["id"], data["id"], idempotency_key="ci-1234")
        final = api.wait(evaluation["id"], on_progress=print)
        document = api.result(final["id"])

Every method returns the JSON the server sent (ModelPublic, DatasetPublic, EvaluationPublic,
the EvaluationResult document) as plain dicts. A 4xx/5xx answer raises `ApiError` with the
server's ``type`` and ``detail``; a server that cannot be reached raises `ServerUnreachable`
(an `ApiError` with status 0).

Retries: requests that are safe to repeat (GETs, uploads - the server deduplicates them by
sha256 -, cancel, and a submit that carries an Idempotency-Key) are retried on connection
errors and on 502/503/504, with backoff 0.5 s, 1 s, 2 s, ... up to 8 s. Any request answered 429
is retried after the server's Retry-After (at most 120 s). Other requests are sent once. A
request is retried 4 times, except that under a deadline a 429 is retried until the deadline,
and `RobustnessClient.wait` treats no answer and 502/503/504 as an outage to wait out: it
retries until its deadline, or without one for up to ``max_outage`` seconds (5 minutes).

Deadlines: a client given a ``deadline`` (a `time.monotonic` value), and `RobustnessClient.wait`
with a ``timeout``, bound every request by the time left: its connect, read and write timeouts
are cut to that time plus `GRACE_S`, and no retry is made that would start after it.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import httpx

from schemas.api import upload_digest

READ_TIMEOUT_S, CONNECT_TIMEOUT_S = 30.0, 5.0
GRACE_S = 2.0  # a request's timeouts reach this far past the deadline, so an answer due at it arrives
MAX_BACKOFF_S = 8.0  # the backoff doubles up to this
DEFAULT_TIMEOUT = httpx.Timeout(READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S)
RETRY_STATUSES = frozenset({502, 503, 504})
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
CHUNK = 1 << 20


class ApiError(Exception):
    """The server answered with an error: ``status`` (0: no answer), ``type``, ``detail``, and
    the client's ``hint`` at the cause, if it has one."""

    def __init__(self, status: int, type: str, detail: str, hint: str = ""):
        super().__init__(detail)
        self.status = status
        self.type = type
        self.detail = detail
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.detail} (HTTP {self.status} {self.type})" + (f"; {self.hint}" if self.hint else "")


class ServerUnreachable(ApiError):
    """No HTTP answer at all: refused connection, DNS failure, timeout."""

    def __init__(self, url: str, reason: str):
        super().__init__(0, "unreachable", f"cannot reach the robustness server at {url} ({reason})")
        self.url = url

    def __str__(self) -> str:
        return self.detail


class WaitTimeout(TimeoutError):
    """`RobustnessClient.wait` gave up; the evaluation keeps running on the server. ``cause``:
    why the last state is older than the deadline (the server stopped answering), if it is."""

    def __init__(self, evaluation: dict, timeout: float, cause: ApiError | None = None):
        self.evaluation = evaluation
        self.timeout = timeout
        self.cause = cause
        progress = evaluation.get("progress") or {}
        stage = f", stage {progress['stage']} {progress.get('done', 0)}/{progress.get('total', 0)}" \
            if progress.get("stage") else ""
        last = f"; then the server stopped answering: {cause}" if cause is not None else ""
        super().__init__(f"evaluation {evaluation['id']} did not finish within {timeout:g}s "
                         f"(state {evaluation['state']}{stage}{last}); it keeps running on the server")


def _processing_record(processing: dict) -> dict | None:
    """resize / center_crop / color / classes as the server records them ("224" -> 224 for resize,
    the shorter side; [224, 224] for a square crop; "HxW" -> [H, W]; classes only where given);
    None for what it cannot read, which then matches no record."""
    record: dict = {"resize": None, "center_crop": None, "color": processing.get("color")}
    if processing.get("classes") is not None:
        record["classes"] = list(processing["classes"])
    for field in ("resize", "center_crop"):
        value = processing.get(field)
        if value is None:
            continue
        sides = str(value).lower().replace(",", "x").split("x")
        if not all(side.strip().isdigit() for side in sides) or len(sides) > 2:
            return None
        numbers = [int(side) for side in sides]
        if len(numbers) == 1:
            record[field] = numbers[0] if field == "resize" else numbers * 2
        else:
            record[field] = numbers
    return record


def sha256_file(path: str | os.PathLike) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def parse_error(response: httpx.Response) -> ApiError:
    """The `ApiError` for an error response: the contract's {"type", "detail"} body when there
    is one, else the status line and the start of the body (a proxy's HTML page, say)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # a framework-level validation error: [{"loc", "msg"}, ...]
            detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}"
                               if isinstance(d, dict) else str(d) for d in detail)
        kind = body.get("type") or response.reason_phrase.lower().replace(" ", "_") or "http_error"
        return ApiError(response.status_code, str(kind), str(detail))
    text = " ".join(response.text.split())[:200] if response.content else ""
    kind = response.reason_phrase.lower().replace(" ", "_") or "http_error"
    return ApiError(response.status_code, kind,
                    f"HTTP {response.status_code} {response.reason_phrase}" + (f": {text}" if text else ""))


def retry_after_seconds(response: httpx.Response, default: float) -> float:
    """Retry-After as seconds: either a number or an HTTP date."""
    value = response.headers.get("Retry-After")
    if value is None:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return default
    return max(0.0, when.timestamp() - time.time())


class RobustnessClient:
    """The /v1 API over one `httpx.Client`. ``transport`` replaces the network (tests pass an
    `httpx.MockTransport`, an `httpx.WSGITransport` or Starlette's TestClient transport)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 transport: httpx.BaseTransport | None = None, *, retries: int = 4, backoff: float = 0.5,
                 max_retry_after: float = 120.0, deadline: float | None = None, max_outage: float = 300.0):
        self.base_url = base_url.rstrip("/").removesuffix("/v1")
        self.retries = retries  # extra attempts after the first, for requests safe to repeat
        self.backoff = backoff  # seconds before the first retry, doubled each time
        self.max_retry_after = max_retry_after  # a longer Retry-After is cut to this
        self.deadline = deadline  # time.monotonic() after which no request waits or is retried
        self.max_outage = max_outage  # wait() without a deadline retries a silent server this long
        headers = {"User-Agent": "robustness-client/0.1", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RobustnessClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------ transport

    def _send(self, method: str, path: str, *, retry: bool, stream: bool = False,
              rewind: Sequence[IO[bytes]] = (), deadline: float | None = None, patient: bool = False,
              timeout: httpx.Timeout | None = None, **kwargs) -> httpx.Response:
        """One request, retried per the policy in the module docstring; raises `ApiError` on
        an error status. With ``stream`` the caller reads and closes a successful response.
        ``deadline`` (or the client's, whichever is sooner) bounds its timeouts and retries;
        a ``patient`` request retries an outage until then, or for ``max_outage`` seconds."""
        deadline = _sooner(self.deadline, deadline)
        outage_end = time.monotonic() + self.max_outage if deadline is None else deadline
        attempt = 0

        def again(delay: float, uncapped: bool = False) -> bool:
            """Whether a retry after ``delay`` seconds is within the retry cap (unless ``uncapped``)
            and starts before the deadline."""
            return (attempt < self.retries or uncapped) and (deadline is None
                                                             or time.monotonic() + delay < deadline)

        while True:
            for handle in rewind:
                handle.seek(0)
            delay = min(self.backoff * 2 ** attempt, MAX_BACKOFF_S)
            try:
                request = self._http.build_request(method, path, timeout=self._bounded(timeout, deadline),
                                                   **kwargs)
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                if retry and again(delay, uncapped=patient and time.monotonic() + delay < outage_end):
                    attempt += 1
                    time.sleep(delay)
                    continue
                raise ServerUnreachable(self.base_url, _describe(exc)) from None
            if response.is_success:
                return response
            if stream:
                response.read()
                response.close()
            if response.status_code == 429:
                delay = min(retry_after_seconds(response, delay), self.max_retry_after)
            # a 429 changed nothing and says when to come back: until the deadline, if there is one
            uncapped = (response.status_code == 429 and deadline is not None) or (
                patient and response.status_code in RETRY_STATUSES and time.monotonic() + delay < outage_end)
            if again(delay, uncapped) and (
                    response.status_code == 429 or (retry and response.status_code in RETRY_STATUSES)):
                attempt += 1
                time.sleep(delay)
                continue
            error = parse_error(response)
            if response.status_code == 404 and _no_such_route(response):
                error.hint = (f"the server URL {self.base_url} is probably wrong: it should be the gateway's "
                              "base URL, the one /v1 lies under, e.g. http://host:8000")
            raise error

    def _bounded(self, timeout: httpx.Timeout | None, deadline: float | None) -> httpx.Timeout:
        """``timeout`` (else the client's) with each part cut to the time left plus `GRACE_S`."""
        timeout = timeout or self._http.timeout
        if deadline is None:
            return timeout
        cap = max(deadline - time.monotonic(), 0.0) + GRACE_S
        return httpx.Timeout(connect=_sooner(timeout.connect, cap), read=_sooner(timeout.read, cap),
                             write=_sooner(timeout.write, cap), pool=_sooner(timeout.pool, cap))

    def _json(self, method: str, path: str, *, retry: bool, **kwargs) -> Any:
        response = self._send(method, path, retry=retry, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ApiError(response.status_code, "invalid_response",
                           f"{method} {path}: the server did not answer with JSON") from None

    def _get(self, path: str, params: dict | None = None) -> Any:
        return self._json("GET", path, retry=True,
                          params={k: v for k, v in (params or {}).items() if v is not None})

    def _upload(self, path: str, file: str | os.PathLike, name: str | None,
                data_files: Sequence[Path] = (), fields: dict | None = None) -> dict:
        file = Path(file)
        with ExitStack() as stack:  # httpx streams the handles in chunks
            handles = [stack.enter_context(f.open("rb")) for f in (file, *data_files)]
            parts = [("file" if i == 0 else "data", (f.name, h, "application/octet-stream"))
                     for i, (f, h) in enumerate(zip((file, *data_files), handles, strict=True))]
            form = {k: str(v) for k, v in {"name": name, **(fields or {})}.items() if v is not None}
            return self._json("POST", path, retry=True, rewind=handles, files=parts, data=form or None)

    # ------------------------------------------------------------------------ models

    def upload_model(self, path: str | os.PathLike, name: str | None = None) -> dict:
        """Upload an .onnx file -> ModelPublic (the existing record if the sha256 is known),
        with its external data files when they lie next to it (``data_files_of``); a .zip or
        .tar.gz bundle of a model and its data files goes as it is."""
        return self._upload("/v1/models", path, name, data_files_of(Path(path)))

    def find_model(self, sha256: str) -> dict | None:
        items = self._get("/v1/models", {"sha256": sha256})["items"]
        return items[0] if items else None

    def get_model(self, model_id: str) -> dict:
        return self._get(f"/v1/models/{model_id}")

    def ensure_model(self, path: str | os.PathLike, name: str | None = None,
                     sha256: str | None = None) -> tuple[dict, bool]:
        """The server's record of this file, uploading it only if the server lacks it; returns
        (ModelPublic, uploaded). A plain .onnx is looked up by its sha256; a bundle (.zip /
        .tar.gz), or a model with data files next to it, by the digest of what would be sent
        (schemas.api.upload_digest), since the server stores the self-contained model they make."""
        digest = sha256 or sha256_file(path)
        data = {file.name: sha256_file(file) for file in data_files_of(Path(path))}
        if data:
            found = self.find_model_made_from(upload_digest(digest, data))
        else:  # a plain model is stored as sent; a bundle is what it was made from
            found = self.find_model(digest) or self.find_model_made_from(digest)
        return (found, False) if found else (self.upload_model(path, name), True)

    def find_model_made_from(self, source_sha256: str) -> dict | None:
        items = self._get("/v1/models", {"source_sha256": source_sha256})["items"]
        return items[0] if items else None

    # ------------------------------------------------------------------------ datasets

    def upload_dataset(self, path: str | os.PathLike, name: str | None = None, *,
                       resize: int | str | None = None, center_crop: int | str | None = None,
                       color: str | None = None, classes: Sequence[str] | None = None) -> dict:
        """Upload an .npz (x, y) or a .zip of PNG / JPEG class folders -> DatasetPublic. For a
        zip, ``resize`` (N: the shorter side, or "HxW"), ``center_crop`` (N or "HxW") and
        ``color`` ("rgb" or "grayscale") are applied by the server, once, at upload; ``classes``,
        the model's class names in output order, label each folder by its name's position."""
        return self._upload("/v1/datasets", path, name,
                            fields={"resize": resize, "center_crop": center_crop, "color": color,
                                    "classes": None if classes is None else "\n".join(classes)})

    def find_dataset(self, sha256: str) -> dict | None:
        items = self._get("/v1/datasets", {"sha256": sha256})["items"]
        return items[0] if items else None

    def get_dataset(self, dataset_id: str) -> dict:
        return self._get(f"/v1/datasets/{dataset_id}")

    def ensure_dataset(self, path: str | os.PathLike, name: str | None = None,
                       sha256: str | None = None, **processing) -> tuple[dict, bool]:
        """Like `ensure_model`: (DatasetPublic, uploaded). With ``processing`` (upload_dataset's
        resize, center_crop, color, classes) the record found is the one the server made from this zip
        with the same processing."""
        declared = {k: v for k, v in processing.items() if v is not None}
        digest = sha256 or sha256_file(path)
        found = self.find_processed_dataset(digest, declared) if declared else self.find_dataset(digest)
        return (found, False) if found else (self.upload_dataset(path, name, **declared), True)

    def find_processed_dataset(self, source_sha256: str, processing: dict) -> dict | None:
        """The dataset the server made from the upload ``source_sha256`` with ``processing``."""
        wanted = _processing_record(processing)
        items = self._get("/v1/datasets", {"source_sha256": source_sha256})["items"]
        return next((item for item in items if item.get("processing") == wanted), None)

    # ------------------------------------------------------------------------ evaluations

    def submit(self, spec: dict, model_id: str, dataset_id: str, idempotency_key: str | None = None) -> dict:
        """Start an evaluation -> EvaluationPublic. With an ``idempotency_key`` the same key and
        body return the same evaluation, so the request is retried like a GET."""
        if hasattr(spec, "model_dump"):  # an EvaluationSpec
            spec = spec.model_dump(mode="json")
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._json("POST", "/v1/evaluations", retry=idempotency_key is not None, headers=headers,
                          json={**spec, "model_id": model_id, "dataset_id": dataset_id})

    def get_evaluation(self, evaluation_id: str, wait: float = 0, deadline: float | None = None,
                       patient: bool = False) -> dict:
        """The evaluation's status; with ``wait`` seconds (<= 30), a long poll that answers
        when its state changes or after that long. ``deadline``, ``patient``: see `_send`."""
        if wait <= 0:
            return self._json("GET", f"/v1/evaluations/{evaluation_id}", retry=True, deadline=deadline,
                              patient=patient)
        wait = round(min(wait, 30), 3)
        return self._json("GET", f"/v1/evaluations/{evaluation_id}", retry=True, params={"wait": wait},
                          deadline=deadline, patient=patient,
                          timeout=httpx.Timeout(wait + READ_TIMEOUT_S, connect=CONNECT_TIMEOUT_S))

    def list_evaluations(self, state: str | None = None, model_id: str | None = None) -> list[dict]:
        return self._get("/v1/evaluations", {"state": state, "model_id": model_id})["items"]

    def result(self, evaluation_id: str) -> dict:
        """The EvaluationResult document; `ApiError` 409 until the evaluation succeeded."""
        return self._get(f"/v1/evaluations/{evaluation_id}/result")

    def report(self, evaluation_id: str) -> str:
        """The self-contained HTML report; `ApiError` 409 until the evaluation succeeded."""
        response = self._send("GET", f"/v1/evaluations/{evaluation_id}/report", retry=True)
        return response.text

    def cancel(self, evaluation_id: str) -> dict:
        return self._json("POST", f"/v1/evaluations/{evaluation_id}/cancel", retry=True)

    def artifacts(self, evaluation_id: str) -> list[dict]:
        """[{"name", "size"}] of the arrays an evaluation wrote (e.g. universal perturbations)."""
        return self._get(f"/v1/evaluations/{evaluation_id}/artifacts")["items"]

    def download_artifact(self, evaluation_id: str, name: str, dest_path: str | os.PathLike) -> Path:
        """Stream one artifact (.npz) to ``dest_path``; a partial download leaves no file."""
        dest = Path(dest_path)
        partial = dest.with_name(dest.name + ".part")
        response = self._send("GET", f"/v1/evaluations/{evaluation_id}/artifacts/{name}", retry=True,
                              stream=True)
        try:
            with partial.open("wb") as out:
                for chunk in response.iter_bytes(CHUNK):
                    out.write(chunk)
            partial.replace(dest)
        except httpx.TransportError as exc:
            raise ServerUnreachable(self.base_url, _describe(exc)) from None
        finally:
            response.close()
            partial.unlink(missing_ok=True)
        return dest

    def wait(self, evaluation_id: str, poll_interval: float = 1.0, timeout: float | None = None,
             on_progress: Callable[[dict], None] | None = None) -> dict:
        """Poll until the evaluation succeeded, failed or was cancelled and return its final
        EvaluationPublic; ``on_progress`` sees every polled one. `WaitTimeout` after ``timeout``
        seconds (the evaluation is not cancelled). Each poll after the first is a long poll of
        up to ``poll_interval`` seconds, which the server answers as soon as the state changes;
        a server that answers sooner with the same state (an older one) is polled at that pace.
        A server that does not answer is waited for: see the module docstring."""
        deadline = _sooner(self.deadline, None if timeout is None else time.monotonic() + timeout)
        evaluation = self._poll({"id": evaluation_id, "state": "not known yet"}, 0, deadline, timeout)
        while True:
            if on_progress is not None:
                on_progress(evaluation)
            if evaluation["state"] in TERMINAL_STATES:
                return evaluation
            wait = poll_interval
            if deadline is not None and timeout is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    raise WaitTimeout(evaluation, timeout)
            asked = time.monotonic()
            previous, evaluation = evaluation, self._poll(evaluation, wait, deadline, timeout)
            early = wait - (time.monotonic() - asked)
            if evaluation["state"] == previous["state"] and early > 0:
                time.sleep(early)

    def _poll(self, last: dict, wait: float, deadline: float | None, timeout: float | None) -> dict:
        """`wait`'s next status of the evaluation ``last``, waiting out an outage (no answer,
        429, 502-504); one that lasts until the deadline is `WaitTimeout`, with ``last`` as the
        last state, and without a deadline, one longer than ``max_outage`` is its error."""
        try:
            return self.get_evaluation(last["id"], wait=wait, deadline=deadline, patient=True)
        except ApiError as exc:
            if timeout is None or not _transient(exc):
                raise
            raise WaitTimeout(last, timeout, cause=exc) from None  # retried up to the deadline


def _sooner(a: float | None, b: float | None) -> float | None:
    """The smaller of two optional bounds (None: no bound)."""
    return b if a is None else a if b is None else min(a, b)


def _transient(error: ApiError) -> bool:
    """No answer, or an answer that says to come back later (429, 502, 503, 504)."""
    return error.status in (0, 429, *RETRY_STATUSES)


def _no_such_route(response: httpx.Response) -> bool:
    """A 404 for the path itself (the gateway's bare "Not Found", another server's page), not
    for a record the path names."""
    try:
        body = response.json()
    except ValueError:
        return True
    return not isinstance(body, dict) or body.get("detail") in (None, "Not Found")


def _describe(exc: httpx.TransportError) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out: {exc}" if str(exc) not in ("", "timed out") else "timed out"
    if isinstance(exc, httpx.ConnectError):
        return f"connection failed: {exc}" if str(exc) else "connection failed"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def data_files_of(model: Path) -> list[Path]:
    """The external data files next to an .onnx file: the names the model gives, read with the
    onnx package when it is installed (the server extra), else PyTorch's convention
    ``<model>.onnx.data``. The server checks every name and offset either way."""
    if model.suffix != ".onnx":
        return []
    try:
        import onnx
    except ImportError:
        names = [f"{model.name}.data"]
    else:
        try:
            loaded = onnx.load(model, load_external_data=False)
        except Exception:  # not ONNX: the server says what is wrong with it
            return []
        names = sorted({entry.value for tensor in _external(loaded.graph)
                        for entry in tensor.external_data if entry.key == "location"})
    plain = [n for n in names if "/" not in n and "\\" not in n]
    return [model.parent / n for n in plain if (model.parent / n).is_file()]


def _external(graph):
    for tensor in graph.initializer:
        if tensor.external_data:
            yield tensor
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.t.external_data:
                yield attribute.t
            for sub in (attribute.g, *attribute.graphs):
                yield from _external(sub)
