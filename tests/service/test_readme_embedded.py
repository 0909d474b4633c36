"""The README's main command on a fresh virtual environment, then one real evaluation over
HTTP with `robustness submit` from that environment: the embedded default end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import ROOT, free_port


def readme_main_command() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run it", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, re.S).group(1).strip()


def copy_checkout(target: Path) -> None:
    """What a fresh clone has: the files git tracks or would track, nothing ignored."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode != 0:
        pytest.skip("not a git checkout: cannot tell a fresh clone's files")
    for name in listed.stdout.splitlines():
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def test_readme_main_command_serves_and_a_submitted_evaluation_passes(tmp_path):
    command = readme_main_command()
    assert command.endswith("robustness serve") and "pip install '.[server]'" in command
    checkout = tmp_path / "checkout"
    copy_checkout(checkout)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ROBUSTNESS_", "VIRTUAL_ENV"))}
    env.update(ROBUSTNESS_PORT=str(port), PIP_DISABLE_PIP_VERSION_CHECK="1")
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        ["bash", "-c", command],
        cwd=checkout,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 900  # the install dominates
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the README command exited:\n{(tmp_path / 'serve.log').read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(1)
        banner = (tmp_path / "serve.log").read_text()
        assert f"robustness service at {url}" in banner and "OPEN" in banner and "loopback only" in banner
        submitted = subprocess.run(
            [
                str(checkout / ".venv" / "bin" / "robustness"),
                "submit",
                "examples/digits-cnn.onnx",
                "examples/digits-test.npz",
                "--spec",
                "examples/spec.yaml",
                "--server",
                url,
                "--wait",
                "--json",
                "result.json",
                "--junit",
                "result.xml",
                "--html",
                "report.html",
            ],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        result = json.loads((checkout / "result.json").read_text())
        assert result["passed"] is True and result["clean_accuracy"] > 0.9
        assert "<testcase" in (checkout / "result.xml").read_text()
        assert 'id="examples"' in (checkout / "report.html").read_text()
        site = next((checkout / ".venv" / "lib").glob("python*/site-packages"))
        assert not (site / "torch").exists()  # the service does not need PyTorch
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
