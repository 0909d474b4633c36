"""Upload validators run in child processes, each under a CPU-time bound.

Parsing, checking and shape-inferring a hostile model (deeply nested ``If`` graphs, huge
constant folds), or decoding a zip of PNGs, can take a core for many seconds; in the
gateway's own process it would hold the GIL and stall every request. Here each validation is
a fresh process forked from a forkserver that has the validators imported (a few ms to
start), with RLIMIT_CPU set to ``cpu_s``: past it the kernel stops the child and the upload
is refused with a 422 naming the bound. At most ``processes`` validations run at once; the
others wait in the event loop, holding no thread and no connection. One child's death costs
only its own upload.
"""

from __future__ import annotations

import math
import multiprocessing
import resource
import signal
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import anyio

from workers.errors import UserError

_PRELOAD = ["service.model_admission", "workers.dataset_files"]


class ValidationTooCostly(UserError):
    status = 422
    type = "too_costly"


def _context():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _child(connection: Connection, validate: Callable[..., Any], args: tuple, cpu_s: float) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = math.ceil(cpu_s) if hard == resource.RLIM_INFINITY else min(math.ceil(cpu_s), hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))  # past soft: SIGXCPU, which ends it
    try:
        outcome = ("ok", validate(*args))
    except UserError as exc:
        outcome = ("user_error", exc)
    except Exception as exc:  # noqa: BLE001 - handed to the parent, which logs and answers 500
        outcome = ("error", f"{type(exc).__name__}: {exc}")
    connection.send(outcome)
    connection.close()


class ValidationPool:
    def __init__(self, processes: int, cpu_s: float):
        self.cpu_s = cpu_s
        self.limiter = anyio.CapacityLimiter(processes)
        self._context: Any = None  # the forkserver's, made on first use

    async def run(self, what: str, validate: Callable[..., Any], *args: Any) -> Any:
        """``validate(*args)`` in a child process: its result, or the UserError it raised."""
        return await anyio.to_thread.run_sync(self._run_blocking, what, validate, args, limiter=self.limiter)

    def _run_blocking(self, what: str, validate: Callable[..., Any], args: tuple) -> Any:
        if self._context is None:
            self._context = _context()
        receiving, sending = self._context.Pipe(duplex=False)
        child = self._context.Process(target=_child, args=(sending, validate, args, self.cpu_s), daemon=True)
        child.start()
        sending.close()
        try:
            # the CPU bound stops a busy child; this wall bound one that sleeps or waits
            answered = receiving.poll(3 * self.cpu_s + 30)
            outcome = receiving.recv() if answered else ("timeout", None)
        except EOFError:  # the child died without answering
            outcome = ("died", None)
        finally:
            receiving.close()
            child.join(timeout=5)
            if child.is_alive():
                child.kill()
                child.join()
        kind, value = outcome
        if kind == "ok":
            return value
        if kind == "user_error":
            assert isinstance(value, UserError)
            raise value
        if kind == "error":
            raise RuntimeError(f"validating the {what} failed: {value}")
        if kind == "timeout" or child.exitcode == -signal.SIGXCPU:
            raise ValidationTooCostly(
                f"validating the {what} takes more than {self.cpu_s:g} s of CPU (ROBUSTNESS_VALIDATION_CPU_S "
                f"on the server), so it is refused: "
                + ("upload fewer or smaller images" if what == "dataset" else
                   f"simplify the {what} (fewer nested If or Loop graphs, smaller constants)")
            )
        if child.exitcode == -signal.SIGKILL:  # the kernel's out-of-memory killer, most likely
            raise ValidationTooCostly(
                f"validating the {what} ran out of memory, so it is refused: make it smaller"
            )
        raise RuntimeError(f"validating the {what} stopped its process (exit code {child.exitcode})")
