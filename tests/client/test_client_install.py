"""The base install is the client alone: a fresh virtual environment with `pip install .`
runs `robustness submit` and lacks ONNX Runtime, FastAPI and Celery; the server commands say
how to get them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.service.test_readme_embedded import copy_checkout

SERVER_ONLY = ("onnxruntime", "fastapi", "celery", "numpy", "onnx", "sqlalchemy")


def test_the_base_install_is_the_client_without_the_engine_or_the_service(tmp_path):
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBUSTNESS_", "VIRTUAL_ENV"))}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, env=env)
    installed = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(checkout)],
                               capture_output=True, text=True, env=env)
    if installed.returncode != 0 and "No matching distribution" in installed.stderr:
        pytest.skip(f"no package index reachable: {installed.stderr.strip()[-300:]}")
    assert installed.returncode == 0, installed.stderr[-3000:]
    robustness = str(venv / "bin" / "robustness")
    helped = subprocess.run([robustness, "submit", "--help"], capture_output=True, text=True, env=env)
    assert helped.returncode == 0 and "--server" in helped.stdout, helped.stderr
    probe = f"import importlib.util as u; print([m for m in {SERVER_ONLY!r} if u.find_spec(m)])"
    found = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                           env=env, cwd=tmp_path)
    assert found.stdout.strip() == "[]", found.stdout + found.stderr
    evaluate = subprocess.run([robustness, "evaluate", "m.onnx", "d.npz", "--spec", "s.yaml"],
                              capture_output=True, text=True, env=env, cwd=tmp_path)
    assert evaluate.returncode == 2 and "pip install '.[server]'" in evaluate.stderr, evaluate.stderr
    offline = subprocess.run([robustness, "submit", "m.onnx", "d.npz", "--spec", "s.yaml", "--server",
                              "http://127.0.0.1:9"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert offline.returncode == 2 and "s.yaml: no such spec file" in offline.stderr, offline.stderr
