from __future__ import annotations

import time

import pytest

SPEC_YAML = """\
samples: 100
attacks:
  - name: pgd
    eps: 0.3
    norm: linf
gates:
  - metric: clean_accuracy
    min: 0.9
  - metric: robust_accuracy
    attack: pgd
    eps: 0.3
    min: 0.5
"""


class FakeClock:
    """time.sleep records and advances time.monotonic instead of waiting."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in ("GITHUB_RUN_ID", "CI_PIPELINE_ID", "ROBUSTNESS_API_KEY", "ROBUSTNESS_SERVER"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(time, "sleep", fake.sleep)
    monkeypatch.setattr(time, "monotonic", fake.monotonic)
    return fake


@pytest.fixture
def inputs(tmp_path):
    """(model, data, spec) files; the client only hashes and uploads the first two."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07 not parsed by the client " * 100)
    data = tmp_path / "test.npz"
    data.write_bytes(b"PK\x03\x04 an npz, as far as the client knows " * 100)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML)
    return model, data, spec
