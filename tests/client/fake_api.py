"""An in-memory fake of the /v1 HTTP API (the contract's shapes, none of its work), served
through `httpx.MockTransport`. For the client's tests only; the real server has its own."""

from __future__ import annotations

import email.parser
import email.policy
import hashlib
import json

import httpx

CLEAN_ACCURACY = 0.97


def _error(status: int, kind: str, detail: str, headers: dict | None = None) -> httpx.Response:
    return httpx.Response(status, json={"type": kind, "detail": detail}, headers=headers)


def _multipart(request: httpx.Request) -> dict[str, tuple[str | None, bytes]]:
    """{field: (filename, bytes)} of a multipart/form-data body."""
    head = f"Content-Type: {request.headers['content-type']}\r\n\r\n".encode()
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + request.read())
    return {part.get_param("name", header="content-disposition"): (part.get_filename(),
                                                                   part.get_payload(decode=True))
            for part in message.iter_parts()}


class FakeApi:
    """``outcome``: how evaluations end - "pass" (every gate passes), "fail_gate" (the pgd
    gate fails), "inconclusive" (the pgd gate's bounds hold, but its attack shows signs of
    gradient masking), "error" (the evaluation fails), "never" (it stays running)."""

    def __init__(self, outcome: str = "pass"):
        self.outcome = outcome
        self.models: dict[str, dict] = {}
        self.datasets: dict[str, dict] = {}
        self.evaluations: dict[str, dict] = {}
        self.bodies: dict[str, dict] = {}
        self.keys: dict[str, str] = {}  # Idempotency-Key -> evaluation id
        self.uploads: list[tuple[str, str, str | None]] = []  # (collection, file name, name)
        self.requests: list[httpx.Request] = []
        self.faults: list[httpx.Response | Exception] = []  # answered (or raised) before routing
        self.artifact_bytes = b"PK\x03\x04 fake npz " * 1000

    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        request.read()  # consume an upload's stream even when answering with a fault
        if self.faults:
            fault = self.faults.pop(0)
            if isinstance(fault, Exception):
                raise fault
            return fault
        parts = request.url.path.strip("/").split("/")[1:]  # after "v1"
        method = request.method
        if parts[0] in ("models", "datasets"):
            store = self.models if parts[0] == "models" else self.datasets
            if method == "POST":
                return self._upload(parts[0], store, request)
            if len(parts) == 1:
                sha, source = request.url.params.get("sha256"), request.url.params.get("source_sha256")
                items = [r for r in store.values() if (sha is None or r["sha256"] == sha)
                         and (source is None or r.get("source_sha256") == source)]
                return httpx.Response(200, json={"items": items, "count": len(items)})
            return self._get(store, parts[1])
        if parts[0] == "evaluations":
            if method == "POST" and len(parts) == 1:
                return self._submit(request)
            if len(parts) == 1:
                items = [e for e in self.evaluations.values()
                         if request.url.params.get("state") in (None, e["state"])]
                return httpx.Response(200, json={"items": items, "count": len(items)})
            if parts[1] not in self.evaluations:
                return _error(404, "not_found", f"no evaluation {parts[1]}")
            evaluation = self.evaluations[parts[1]]
            if len(parts) == 2:
                self._advance(evaluation)
                return httpx.Response(200, json=evaluation)
            if parts[2] == "result":
                if evaluation["state"] != "succeeded":
                    return _error(409, "conflict", f"evaluation {parts[1]} is {evaluation['state']}")
                return httpx.Response(200, json=self._result(evaluation))
            if parts[2] == "cancel":
                evaluation["state"] = "cancelled"
                return httpx.Response(200, json=evaluation)
            if parts[2] == "artifacts" and len(parts) == 3:
                return httpx.Response(200, json={"items": [{"name": "universal.npz",
                                                            "size": len(self.artifact_bytes)}]})
            if parts[2] == "artifacts" and parts[3] == "universal.npz":
                return httpx.Response(200, content=self.artifact_bytes,
                                      headers={"Content-Type": "application/octet-stream"})
        return _error(404, "not_found", f"no route {method} {request.url.path}")

    def _get(self, store: dict, item_id: str) -> httpx.Response:
        if item_id not in store:
            return _error(404, "not_found", f"no record {item_id}")
        return httpx.Response(200, json=store[item_id])

    def _upload(self, collection: str, store: dict, request: httpx.Request) -> httpx.Response:
        fields = _multipart(request)
        filename, content = fields["file"]
        name = fields["name"][1].decode() if "name" in fields else None
        self.uploads.append((collection, filename, name))
        sha = hashlib.sha256(content).hexdigest()
        for record in store.values():
            if record["sha256"] == sha:
                return httpx.Response(200, json=record)
        prefix = "mdl" if collection == "models" else "ds"
        record = {"id": f"{prefix}_{sha[:32]}", "name": name or filename, "sha256": sha, "size": len(content),
                  "created_at": "2025-01-01T00:00:00Z"}
        store[record["id"]] = record
        return httpx.Response(201, json=record)

    def _submit(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.read())
        key = request.headers.get("idempotency-key")
        if key in self.keys:
            if self.bodies[self.keys[key]] != body:
                return _error(409, "conflict", "idempotency key reused with a different body")
            return httpx.Response(200, json=self.evaluations[self.keys[key]])
        if body.get("model_id") not in self.models:
            return _error(404, "not_found", f"no model {body.get('model_id')}")
        evaluation_id = f"ev_{len(self.evaluations):032x}"
        self.evaluations[evaluation_id] = {
            "id": evaluation_id, "model_id": body["model_id"], "dataset_id": body["dataset_id"],
            "state": "queued", "progress": {"stage": None, "done": 0, "total": 0, "eta_seconds": None},
            "created_at": "2025-01-01T00:00:00Z", "started_at": None, "finished_at": None,
            "error": None, "passed": None, "shards": 1}
        self.bodies[evaluation_id] = body
        if key:
            self.keys[key] = evaluation_id
        return httpx.Response(202, json=self.evaluations[evaluation_id])

    def _advance(self, evaluation: dict) -> None:
        """Each poll moves a job one step: queued, pgd 0/4, 2/4, 4/4, then its outcome."""
        progress = evaluation["progress"]
        if evaluation["state"] == "queued":
            evaluation["state"] = "running"
            progress.update(stage="pgd", done=0, total=4, eta_seconds=None)
        elif evaluation["state"] == "running" and progress["done"] < 4:
            progress.update(done=progress["done"] + 2, eta_seconds=1.0)
        elif evaluation["state"] == "running" and self.outcome == "error":
            evaluation["state"] = "failed"
            evaluation["error"] = {"code": "unsupported_operator",
                                   "message": "node quantise: Round has no gradient; use black-box attacks"}
        elif evaluation["state"] == "running" and self.outcome != "never":
            evaluation["state"] = "succeeded"
            evaluation["passed"] = self._result(evaluation)["passed"]

    def _result(self, evaluation: dict) -> dict:
        body = self.bodies[evaluation["id"]]
        spec = {k: v for k, v in body.items() if k not in ("model_id", "dataset_id")}
        robust = 0.31 if self.outcome == "fail_gate" else 0.62
        masked = ("pgd (linf, eps=0.3): the cross_entropy gradient is zero for 94% of the 97 correctly "
                  "classified samples probed; the evaluation may be masked")
        attacks = [{"attack": a.get("label") or a["name"], "name": a["name"], "kind": "iterative",
                    "norm": a.get("norm"), "eps": eps, "samples": 100, "robust_accuracy": robust,
                    "success_rate": round(1 - robust / CLEAN_ACCURACY, 4), "mean_l2": 1.5,
                    "mean_linf": eps, "median_l2": "Infinity"}  # as the server writes inf
                   for a in spec["attacks"] for eps in a["eps"]]
        gates = []
        for gate in spec["gates"]:
            value = CLEAN_ACCURACY if gate["metric"] == "clean_accuracy" else robust
            passed = ((gate["min"] is None or value >= gate["min"])
                      and (gate["max"] is None or value <= gate["max"]))
            verdict = "passed" if passed else "failed"
            if passed and self.outcome == "inconclusive" and gate["attack"] == "pgd":
                passed, verdict = False, "inconclusive"
            gates.append({k: gate.get(k) for k in ("metric", "attack", "eps", "norm", "min", "max")}
                         | {"value": value, "passed": passed, "verdict": verdict,
                            "reason": f"inconclusive: {masked}" if verdict == "inconclusive" else None})
        model = self.models[body["model_id"]]
        return {"model": {"sha256": model["sha256"]}, "dataset": {"samples": 100, "sha256": "d" * 64},
                "spec": spec, "device": "cpu", "clean_accuracy": CLEAN_ACCURACY, "attacks": attacks,
                "warnings": ["3 samples <are> & 'odd'"], "gates": gates,
                "passed": all(g["passed"] for g in gates), "fooling": None,
                "verdict": ("failed" if any(g["verdict"] == "failed" for g in gates) else "inconclusive"
                            if any(g["verdict"] == "inconclusive" for g in gates) else "passed"),
                "timing": {"total": 12.5, "pgd": 12.0}}
