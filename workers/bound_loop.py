"""An attack's state in ONNX Runtime's buffers, batch by batch, between the calls of its loop.

A `BoundLoop` places named per-sample arrays (clean images, labels, iterates, best points, step
sizes...) on a session's device once, in the batches the classifier runs, and applies loop
graphs (workers/loop_graphs.py) to them with I/O binding: a graph's inputs are bound to the
current buffers, its outputs to spare buffers that then become the state, and the replaced
buffers become the spares of the next call. No array crosses between host and device during the
loop (scalars are placed once per value); `fetch` brings back what results need. On the CPU the
buffers are host memory and the arithmetic is the same as the numpy loop's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from workers.loop_graphs import LoopGraph


def padded(rows: np.ndarray, size: int) -> np.ndarray:
    """``rows`` padded to ``size`` rows with copies of the last one (a fixed-batch model's last
    batch; the padding's outputs are dropped)."""
    return np.concatenate([rows, np.repeat(rows[-1:], size - len(rows), axis=0)])


def chunks(n: int, size: int) -> list[slice]:
    """``n`` rows in slices of at most ``size``."""
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


@dataclass
class Traffic:
    """What crossed between host and device: arrays and bytes each way (to the device: of which
    ``scalars`` were 0-d scalars, such as a step size's new value), and the graph calls."""

    to_device: int = 0
    to_device_bytes: int = 0
    scalars: int = 0
    to_host: int = 0
    to_host_bytes: int = 0
    calls: int = 0


class BoundLoop:
    """Named per-sample state on ``device`` ("cpu" or "cuda"), in batches of ``batch`` rows
    (``pad``: the last batch padded to a full one, for a fixed-batch model). ``run`` is how a
    bound session is run (the classifier's: interruptible). ``traffic`` counts every array
    placed on the device or brought back (on the CPU the same placements happen, so the counts
    are the device's)."""

    def __init__(self, arrays: dict[str, np.ndarray], *, device: str, batch: int, pad: bool,
                 run: Callable[[ort.InferenceSession, ort.IOBinding], None]):
        self.device, self._run, self._batch, self._pad = device, run, batch, pad
        n = self._n = len(next(iter(arrays.values())))
        if any(len(a) != n for a in arrays.values()):
            raise ValueError("every state array needs one row per sample")
        self._rows: list[int] = []
        self._state: list[dict[str, ort.OrtValue]] = []
        self._spares: list[dict[str, ort.OrtValue]] = []  # a replaced buffer, written next
        self._scalars: dict[tuple, ort.OrtValue] = {}
        self._bindings: dict[int, tuple[ort.IOBinding, list[str]]] = {}
        self.traffic = Traffic()
        split = {name: self._split(array) for name, array in arrays.items()}
        for i in range(len(next(iter(split.values())))):
            # copies: a buffer is written by later calls and must never be the caller's array
            self._state.append({name: self._place(parts[i].copy()) for name, parts in split.items()})
            self._rows.append(min(self._batch, n - i * self._batch))
            self._spares.append({})

    def _split(self, array: np.ndarray) -> list[np.ndarray]:
        """``array``'s rows in this loop's batches (the last one padded where the model needs it)."""
        parts = [array[start:start + self._batch] for start in range(0, self._n, self._batch)]
        if self._pad and len(parts[-1]) < self._batch:
            parts[-1] = padded(parts[-1], self._batch)
        return parts

    def _place(self, array: np.ndarray) -> ort.OrtValue:
        self.traffic.to_device += 1
        self.traffic.to_device_bytes += array.nbytes
        # (np.ascontiguousarray would make a 0-d scalar 1-d)
        return ort.OrtValue.ortvalue_from_numpy(np.asarray(array, order="C"), self.device, 0)

    def _scalar(self, name: str, value) -> ort.OrtValue:
        array = np.asarray(value)
        key = (name, array.dtype.str, array.tobytes())
        if key not in self._scalars:
            self._scalars[key] = self._place(array)
            self.traffic.scalars += 1
        return self._scalars[key]

    def apply(self, session: ort.InferenceSession, graph: LoopGraph,
              scalars: Mapping[str, object] | None = None, sends: Mapping[str, np.ndarray] | None = None
              ) -> None:
        """One call of ``session`` (built from ``graph``) per batch: its inputs read the state,
        ``scalars`` (numpy scalars of the input's type) and ``sends`` (small per-sample arrays
        that change from call to call, such as an attack's random draws: sent with this call),
        and its outputs replace state."""
        placed = {name: self._scalar(name, value) for name, value in (scalars or {}).items()}
        sent = {name: [self._place(part) for part in self._split(np.asarray(array))]
                for name, array in (sends or {}).items()}
        if id(session) not in self._bindings:
            self._bindings[id(session)] = (session.io_binding(), [i.name for i in session.get_inputs()])
        binding, inputs = self._bindings[id(session)]
        for i, (state, spares) in enumerate(zip(self._state, self._spares, strict=True)):
            for name in inputs:
                value = placed[name] if name in placed else sent[name][i] if name in sent else state[name]
                binding.bind_ortvalue_input(name, value)
            targets = {}
            for output, name in graph.writes.items():
                old = state[name]
                target = spares.pop(name, None)
                if target is None:
                    target = ort.OrtValue.ortvalue_from_shape_and_type(old.shape(), _numpy_type(old),
                                                                       self.device, 0)
                binding.bind_ortvalue_output(output, target)
                targets[name] = target
            self._run(session, binding)
            self.traffic.calls += 1
            for name, target in targets.items():
                spares[name], state[name] = state[name], target
            for later, earlier in graph.shifts.items():  # `later` takes `earlier`'s replaced buffer
                spares[earlier], state[later] = state[later], spares[earlier]

    def fetch(self, name: str) -> np.ndarray:
        """The state ``name`` for every sample, as a host array."""
        parts = [state[name].numpy()[:rows] for state, rows in zip(self._state, self._rows, strict=True)]
        self.traffic.to_host += len(parts)
        self.traffic.to_host_bytes += sum(part.nbytes for part in parts)
        return np.concatenate(parts)


_NUMPY_TYPES = {
    "tensor(float)": np.float32, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float16)": np.float16,
}


def _numpy_type(value: ort.OrtValue):
    return _NUMPY_TYPES[value.data_type()]
