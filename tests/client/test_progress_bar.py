"""The progress line of `robustness evaluate` (per stage) and `robustness submit` (job-wide)."""

from __future__ import annotations

import io

import pytest

from client import present
from client.present import ProgressBar


@pytest.fixture
def clock(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(present.time, "monotonic", lambda: now[0])
    return now


def test_a_server_job_s_bar_counts_the_time_since_submission_and_shows_the_server_s_eta(clock):
    """A server's done and total count the whole job while the stage shown changes: the final
    line is the job's elapsed time, not the last poll's."""
    stream = io.StringIO()
    bar = ProgressBar(stream, job_wide=True)
    bar("queued", 0, 1)
    clock[0] += 30
    bar("fgsm", 40, 191, 12.5)
    clock[0] += 60
    bar("pgd", 150, 191, 4.0)
    clock[0] += 8
    bar("done", 191, 191)
    assert stream.getvalue() == (
        "done               [########################] 191/191 elapsed  98.0s ETA   0.0s\n")


def test_a_local_bar_counts_each_stage_s_own_time(clock):
    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar("clean", 0, 10)
    clock[0] += 2
    bar("clean", 10, 10)
    clock[0] += 5
    bar("fgsm", 10, 10)
    assert stream.getvalue().splitlines() == [
        "clean              [########################] 10/10 elapsed   2.0s ETA   0.0s",
        "fgsm               [########################] 10/10 elapsed   5.0s ETA   0.0s",
    ]
