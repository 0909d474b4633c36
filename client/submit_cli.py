"""`robustness submit MODEL.onnx DATA.npz --spec SPEC.yaml --server URL`: evaluate on a server.

The spec is validated locally first. The model and the data are hashed (sha256) and uploaded
only when the server does not have them yet. The evaluation is submitted with an
Idempotency-Key derived from the two hashes, the server's ids for them, the canonical spec
JSON and a run id: ``--idempotency-key``, else $GITHUB_RUN_ID (GitHub Actions) or
$CI_PIPELINE_ID (GitLab CI). A retried CI job therefore gets the evaluation its first
attempt started, and so does a repeated local command (pass a new --idempotency-key to force
a fresh evaluation) - unless that evaluation failed or was cancelled: then the command submits
a new one under the key "<key>/after-<that evaluation's id>", the same for every retry, so
concurrent retries share the new evaluation and a chain of failures goes on the same way.

Without --wait the evaluation id is printed and the command exits 0. With --wait (implied by
--json and --junit) progress goes to stderr, the summary table to stdout, and the exit code
is 0 when every gate passed, 1 when a gate failed, 3 when none failed but one is
inconclusive (its attack showed signs of gradient masking; a gate with allow_inconclusive
accepts that), 2 when the evaluation failed, was cancelled or did not finish within
--timeout, and 2 on any bad input or server error. Ctrl-C (SIGINT) exits 130 and SIGTERM (a CI
job cancelled) 143, each with one line saying what was interrupted and, once the server has the
evaluation, that it keeps running and how to get its result. --timeout counts from the start of the
command and bounds every request and retry, so a server that stops answering cannot hold the
command past it by more than a few seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import threading
import time
from functools import partial
from pathlib import Path

from pydantic import ValidationError

from client.api import ApiError, RobustnessClient, WaitTimeout, sha256_file
from client.errors import CommandError
from client.junit import write_junit
from client.present import ProgressBar, exit_code, print_result
from client.spec_file import load_spec
from schemas.evaluation import EvaluationResult

RUN_ID_VARIABLES = ("GITHUB_RUN_ID", "CI_PIPELINE_ID")  # stable across retries of one CI run


class EvaluationFailed(Exception):
    """The evaluation ended failed or cancelled: exit 2 with the server's error."""


class Stopped(BaseException):
    """SIGTERM arrived (a cancelled CI job); like KeyboardInterrupt, not an error to catch."""


class Progress:
    """How far the command got, for its message when it stops early: what it is doing, and the
    evaluation's id once the server has it."""

    def __init__(self) -> None:
        self.doing = "starting"
        self.evaluation_id: str | None = None

    def interrupted(self, signal_name: str, server: str) -> str:
        """The one line for a signal that stops the command now."""
        message = f"interrupted ({signal_name}) while {self.doing}"
        if self.evaluation_id:
            where = "has finished" if self.doing == "fetching the result" else "keeps running on the server"
            return (f"{message}; evaluation {self.evaluation_id} {where}: run the same command again to get "
                    f"its result, or GET {server.rstrip('/')}/v1/evaluations/{self.evaluation_id}")
        if self.doing == "submitting the evaluation":
            return f"{message}; the server may have it: the same command, run again, finds it"
        return f"{message}; nothing was submitted"


def add_submit_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("submit", help="run an evaluation spec on a robustness server",
                                   description=__doc__.split("\n")[0])
    parser.add_argument("model", help="an .onnx image classifier")
    parser.add_argument("data", help="an .npz with x (images) and y (labels), or a .zip of PNG / JPEG "
                        "class folders")
    add_image_processing_arguments(parser)
    parser.add_argument("--spec", required=True, help="evaluation spec, YAML or JSON")
    parser.add_argument("--server", metavar="URL", default=os.environ.get("ROBUSTNESS_SERVER"),
                        help="the server's base URL (default: $ROBUSTNESS_SERVER)")
    parser.add_argument("--api-key", metavar="KEY", help="API key (default: $ROBUSTNESS_API_KEY)")
    parser.add_argument("--name", help="name for the uploaded model (default: its file name)")
    parser.add_argument("--wait", action="store_true", help="wait for the result and exit 1 if a gate fails")
    parser.add_argument("--json", metavar="OUT.json", help="write the result document here (implies --wait)")
    parser.add_argument("--junit", metavar="OUT.xml", help="write a JUnit XML report of the gates "
                                                          "(implies --wait)")
    parser.add_argument("--html", metavar="OUT.html", help="write the HTML report (implies --wait)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help="with --wait: give up (exit 2) this long after the command started, however "
                             "slow or silent the server; the evaluation keeps running")
    parser.add_argument("--poll", type=float, default=2.0, metavar="SECONDS",
                        help="with --wait: seconds between status requests (default 2)")
    parser.add_argument("--idempotency-key", metavar="KEY",
                        help="run id mixed into the Idempotency-Key (default: $GITHUB_RUN_ID or "
                             "$CI_PIPELINE_ID); a new value forces a new evaluation, as does an earlier "
                             "one that failed or was cancelled")
    parser.set_defaults(run=run_submit)
    return parser


def idempotency_key(model: dict, dataset: dict, spec_json: dict, run_id: str | None = None) -> str:
    """A key that is the same whenever the inputs and the run id are (see the module docstring)."""
    if run_id is None:
        run_id = next((os.environ[v] for v in RUN_ID_VARIABLES if os.environ.get(v)), "")
    material = {"model": [model["sha256"], model["id"]], "dataset": [dataset["sha256"], dataset["id"]],
                "spec": spec_json, "run": run_id}
    canonical = json.dumps(material, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "submit-" + hashlib.sha256(canonical.encode()).hexdigest()


def run_submit(args, transport=None) -> int:
    """The `submit` command; ``transport`` replaces the network (tests)."""
    progress = Progress()
    on_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _stop) if on_main_thread else None
    try:
        return _submit(args, transport, progress)
    except (KeyboardInterrupt, Stopped) as exc:
        sigint = isinstance(exc, KeyboardInterrupt)
        _note(progress.interrupted("SIGINT" if sigint else "SIGTERM", args.server or ""))
        return 128 + (signal.SIGINT if sigint else signal.SIGTERM)  # 130, 143: the shells' convention
    except (ApiError, EvaluationFailed, WaitTimeout, CommandError, OSError) as exc:
        message = " ".join(str(exc).split())
        if isinstance(exc, ApiError) and exc.status == 401:
            message += "; pass --api-key or set ROBUSTNESS_API_KEY"
        if isinstance(exc, ApiError) and exc.status == 429:
            message += (f"; the server stayed busy for all of --timeout {args.timeout:g}s: run the command "
                        "again later, or with a longer --timeout" if _has_deadline(args) else
                        "; the server is busy: run the command again later, or with --wait --timeout "
                        "SECONDS to keep retrying until then")
        if isinstance(exc, WaitTimeout):
            message += " (the same command, run again, waits for this evaluation)"
        elif isinstance(exc, ApiError) and progress.evaluation_id:  # the server stopped answering, say
            message += (f"; evaluation {progress.evaluation_id} keeps running on the server: the same "
                        "command, run again, waits for it")
        elif isinstance(exc, ApiError) and exc.status == 0 and progress.doing == "submitting the evaluation":
            message += "; the server may have the evaluation: the same command, run again, finds it"
        print(f"robustness: error: {message}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _stop(signum, frame) -> None:
    raise Stopped()


def _submit(args, transport, progress: Progress) -> int:
    if not args.server:
        raise CommandError("--server URL is required (or set ROBUSTNESS_SERVER)")
    if args.poll <= 0 or (args.timeout is not None and args.timeout <= 0):
        raise CommandError("--poll and --timeout must be positive numbers of seconds")
    spec = load_spec(args.spec)
    for path in (args.model, args.data):
        if not Path(path).is_file():
            raise CommandError(f"{path}: no such file")
    spec_json = spec.model_dump(mode="json")
    api_key = args.api_key or os.environ.get("ROBUSTNESS_API_KEY")
    waits = bool(args.wait or args.json or args.junit or args.html)
    deadline = time.monotonic() + args.timeout if _has_deadline(args) else None
    with RobustnessClient(args.server, api_key=api_key, transport=transport, deadline=deadline) as api:
        model = _ensure(api.ensure_model, args.model, args.name, "model", progress)
        dataset = _ensure(partial(api.ensure_dataset, resize=args.resize, center_crop=args.center_crop,
                                  color=args.color, classes=declared_classes(args.classes)),
                          args.data, None, "dataset", progress)
        key = idempotency_key(model, dataset, spec_json, args.idempotency_key)
        progress.doing = "submitting the evaluation"
        evaluation = api.submit(spec_json, model["id"], dataset["id"], idempotency_key=key)
        while evaluation["state"] in ("failed", "cancelled"):  # an earlier attempt's, which ended
            ended = evaluation
            evaluation = api.submit(spec_json, model["id"], dataset["id"],
                                    idempotency_key=f"{key}/after-{ended['id']}")
            if evaluation["id"] == ended["id"]:
                raise EvaluationFailed(f"the server returned evaluation {ended['id']}, {ended['state']}, "
                                       "for a new idempotency key; pass a new --idempotency-key")
            _note(f"evaluation {ended['id']}, an earlier attempt of this command, {ended['state']}; "
                  f"submitted a new one in its place")
        progress.evaluation_id = evaluation["id"]
        cost = evaluation.get("cost")
        _note(f"evaluation {evaluation['id']} ({evaluation['state']})"
              + (f", estimated cost {cost:,} model calls x samples" if cost is not None else ""))
        if not waits:
            print(evaluation["id"])
            return 0
        progress.doing = "waiting for the evaluation"
        bar = ProgressBar(job_wide=True)
        try:
            final = api.wait(evaluation["id"], poll_interval=args.poll, timeout=args.timeout,
                             on_progress=lambda ev: _show_progress(bar, ev))
        finally:
            bar.close()
        progress.doing = "fetching the result"
        if final["state"] != "succeeded":
            error = final.get("error") or {}
            what = f"evaluation {final['id']} {final['state']}"
            if error:
                what += f": {error.get('code', 'error')}: {error.get('message', '')}"
            raise EvaluationFailed(what)
        document = api.result(final["id"])
        if args.html:
            Path(args.html).write_text(api.report(final["id"]))
    return _report(args, final, document)


def _has_deadline(args) -> bool:
    """Whether the command has a deadline: --timeout, when it waits."""
    return args.timeout is not None and bool(args.wait or args.json or args.junit or args.html)


def add_image_processing_arguments(parser: argparse.ArgumentParser) -> None:
    """--resize, --center-crop and --color: how a zip of images becomes a dataset."""
    parser.add_argument("--resize", metavar="N|HxW",
                        help="a zip of images: scale each image's shorter side to N pixels (or to HxW)")
    parser.add_argument("--center-crop", metavar="N|HxW",
                        help="a zip of images: cut the central N x N pixels, after --resize")
    parser.add_argument("--color", choices=("rgb", "grayscale"), help="a zip of images: convert every image")
    parser.add_argument("--classes", metavar="FILE|a,b,c", help=(
        "a zip of images: the model's class names in output order (a file with one per line, or a "
        "comma-separated list); each folder is labelled by its name's position here, not among the "
        "zip's folders, so the zip may hold some classes only"))


def declared_classes(value: str | None) -> list[str] | None:
    """--classes: the names in a file, one per line, or in a comma-separated list."""
    if value is None:
        return None
    path = Path(value)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--classes {value}: cannot read it as UTF-8 text ({exc})") from None
        names = text.splitlines()
    else:
        names = value.split(",")
    names = [name.strip() for name in names if name.strip()]
    if not names:
        raise CommandError(f"--classes {value}: names no class; give a file with one class name per "
                           "line or a comma-separated list")
    return names


def _ensure(ensure, path: str, name: str | None, kind: str, progress: Progress) -> dict:
    """The server's record of a file, uploaded only if its sha256 is new to the server."""
    progress.doing = f"hashing the {kind} {path}"
    digest = sha256_file(path)
    progress.doing = f"uploading the {kind} {path}"
    record, uploaded = ensure(path, name, sha256=digest)
    where = f"uploaded as {record['id']}" if uploaded else f"already on the server as {record['id']}"
    if record.get("processing"):
        shape = "x".join(map(str, record.get("shape") or []))
        where += f", processed into {record.get('samples')} images of {shape}"
    _note(f"{kind} {path}: {where} (sha256 {record['sha256'][:12]})")
    return record


def _show_progress(bar: ProgressBar, evaluation: dict) -> None:
    progress = evaluation.get("progress") or {}
    if evaluation["state"] == "queued":
        bar("queued", 0, 1)
    elif progress.get("stage") and progress.get("total"):
        bar(progress["stage"], progress.get("done", 0), progress["total"], progress.get("eta_seconds"))


def _report(args, evaluation: dict, document: dict) -> int:
    if args.json:
        Path(args.json).write_text(json.dumps(document, indent=2))
    if args.junit:
        write_junit(args.junit, document, evaluation["id"])
    try:
        print_result(EvaluationResult.model_validate(document))
    except ValidationError as exc:  # a server newer than this client: the exit code still holds
        _note(f"warning: cannot show the summary table, the result document does not match this "
              f"client's schema ({exc.error_count()} differences); upgrade the client")
    gates = document.get("gates") or []
    passed = document.get("passed", evaluation.get("passed"))
    verdict = document.get("verdict") or evaluation.get("verdict") or ("passed" if passed else "failed")
    counts = {v: sum(1 for g in gates if _gate_verdict(g) == v) for v in ("failed", "inconclusive")}
    if verdict == "passed":
        _note(f"evaluation {evaluation['id']} succeeded: {len(gates)} gate(s) passed")
    elif verdict == "inconclusive":
        _note(f"evaluation {evaluation['id']} succeeded: {counts['inconclusive']} of {len(gates)} gate(s) "
              "inconclusive (their attacks showed signs of gradient masking; see the warnings), none failed")
    else:
        _note(f"evaluation {evaluation['id']} succeeded: {counts['failed']} of {len(gates)} gate(s) failed")
    return exit_code(verdict)


def _gate_verdict(gate: dict) -> str:
    return gate.get("verdict") or ("passed" if gate.get("passed") else "failed")


def _note(message: str) -> None:
    print(f"robustness: {message}", file=sys.stderr)
