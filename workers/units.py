"""The unit wire format: a unit of work, and what it computed (``UnitOutput``), which travels
between workers as an .npz without pickles; the same output always gives the same bytes."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


class UnitOutputError(Exception):
    """Bytes that are not a serialized UnitOutput: corrupt storage, an internal error."""


@dataclass(frozen=True)
class WorkUnit:
    """One piece of an evaluation, run by one worker process."""

    index: int  # position in the plan
    start: int  # the selected samples [start, stop)
    stop: int
    attacks: tuple[int, ...]  # indices into spec.attacks
    # "shard": clean pass and per-sample attacks; "whole": attacks that need every sample;
    # "transfer": spec.transfer's attacks (indices into spec.transfer.attacks) on every sample
    kind: str

    @property
    def samples(self) -> int:
        return self.stop - self.start


@dataclass
class RunOutput:
    """One attack at one budget on a unit's samples (arrays [n, ...])."""

    attack: int  # index into spec.attacks
    eps: float | None
    x_adv: np.ndarray
    logits: np.ndarray  # the model's logits at x_adv [n, K]
    success: np.ndarray
    queries: np.ndarray | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)  # the attack's extra arrays
    extra: dict[str, Any] = field(default_factory=dict)  # the attack's other extras, JSON values


@dataclass
class UnitOutput:
    """What a unit computed: everything ``finish`` needs, without re-running the model."""

    unit: WorkUnit
    clean_logits: np.ndarray | None  # [n, K]; None for a "whole" unit
    runs: list[RunOutput]
    document: dict[str, Any] | None = None  # JSON results of a unit that is not per-sample (transfer)
    # spec.certify on a shard's samples: "method@eps index" -> certified bool [n]; and per method
    # that could not run, why
    certified: dict[str, np.ndarray] = field(default_factory=dict)
    certify_unavailable: dict[str, str] = field(default_factory=dict)
    # seconds per stage; not part of the bytes (a redelivered unit must give the same bytes):
    # carry it beside them and hand it back to from_bytes
    timing: dict[str, float] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """An .npz without pickles; the same output always gives the same bytes."""
        arrays = {} if self.clean_logits is None else {"clean_logits": self.clean_logits}
        runs = []
        for i, run in enumerate(self.runs):
            arrays.update({f"runs/{i}/{name}": array for name, array in _run_arrays(run).items()})
            runs.append({"attack": run.attack, "eps": run.eps, "extra": run.extra,
                         "arrays": list(run.arrays), "queries": run.queries is not None})
        arrays.update({f"certify/{key}": mask for key, mask in self.certified.items()})
        meta = {"format": _FORMAT, "unit": asdict(self.unit), "runs": runs, "document": self.document,
                "certified": list(self.certified), "certify_unavailable": self.certify_unavailable}
        arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        return _write_npz(arrays)

    @classmethod
    def from_bytes(cls, data: bytes, *, timing: dict[str, float] | None = None) -> UnitOutput:
        if not data.startswith(b"PK\x03\x04"):
            raise UnitOutputError("not a serialized unit output: not an .npz (zip) archive")
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            meta = json.loads(arrays["meta"].tobytes())
            if meta.get("format") != _FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {_FORMAT!r}")
            unit = WorkUnit(**{**meta["unit"], "attacks": tuple(meta["unit"]["attacks"])})
            runs = [_run_from_arrays(run, arrays, f"runs/{i}/") for i, run in enumerate(meta["runs"])]
            return cls(unit=unit, clean_logits=arrays.get("clean_logits"), runs=runs,
                       document=meta.get("document"), timing=timing or {},
                       certified={key: arrays[f"certify/{key}"] for key in meta.get("certified", [])},
                       certify_unavailable=meta.get("certify_unavailable", {}))
        except KeyError as exc:
            raise UnitOutputError(f"not a serialized unit output: it lacks {exc}") from None
        except (OSError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
            raise UnitOutputError(f"not a serialized unit output: {exc}") from None


_FORMAT = "robustness-unit-output/1"


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # zip entries otherwise carry the time of writing


def _run_arrays(run: RunOutput) -> dict[str, np.ndarray]:
    arrays = {"x_adv": run.x_adv, "logits": run.logits, "success": run.success}
    if run.queries is not None:
        arrays["queries"] = run.queries
    arrays.update({f"extra/{name}": array for name, array in run.arrays.items()})
    return arrays


def _run_from_arrays(meta: dict, arrays: dict[str, np.ndarray], prefix: str) -> RunOutput:
    return RunOutput(
        attack=meta["attack"], eps=meta["eps"], x_adv=arrays[prefix + "x_adv"],
        logits=arrays[prefix + "logits"], success=arrays[prefix + "success"],
        queries=arrays[prefix + "queries"] if meta["queries"] else None,
        arrays={name: arrays[f"{prefix}extra/{name}"] for name in meta["arrays"]}, extra=meta["extra"])


def _write_npz(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, array in arrays.items():
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
            archive.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE), member.getvalue())
    return buffer.getvalue()
