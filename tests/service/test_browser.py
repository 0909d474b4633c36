"""A real headless Chromium against the running service: the dashboard lists a finished
evaluation, its report opens, every image decoded, the console stayed clean, and hostile
names show as text. Screenshots go to test-artifacts/ (or $ROBUSTNESS_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DATA, MODEL, ROOT, Worker, free_port, upload, wait_for

XSS = "<script>alert(1)</script>"
ARTIFACTS = Path(os.environ.get("ROBUSTNESS_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SPEC = {
    "samples": 40,
    "attacks": [{"name": "fgsm", "eps": [0.05, 0.1, 0.2]}, {"name": "deepfool"}],
    "gates": [{"metric": "robust_accuracy", "attack": "fgsm", "eps": 0.1, "min": 0.2}],
}


def chromium():
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip(
            "chromium and chromedriver are not installed (tests/install-browser.sh installs them as root)"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,1600",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def running_service(settings, tmp_path):
    import uvicorn

    from service.app import create_app

    worker = Worker(settings, tmp_path / "worker.log")
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="error")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        worker.stop()


def test_dashboard_and_report_in_a_real_browser(running_service):
    browser = chromium()
    url = running_service
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        with httpx.Client(base_url=url, timeout=30) as api:
            model = upload(api, "models", MODEL, name=XSS).json()
            dataset = upload(api, "datasets", DATA, name="digits " + XSS).json()
            job = api.post(
                "/v1/evaluations", json={**SPEC, "model_id": model["id"], "dataset_id": dataset["id"]}
            )
            job = wait_for(api, job.json()["id"], timeout=180)
            assert job["state"] == "succeeded", job
        browser.get(url + "/")
        assert job["id"] in browser.page_source
        cells = browser.find_elements("tag name", "td")
        assert any(cell.text == XSS for cell in cells)  # shown as text, never run
        browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        browser.find_element("link text", "report").click()
        assert "/report" in browser.current_url
        images = browser.find_elements("tag name", "img")
        assert images, "the report has no images"
        widths = browser.execute_script(
            "return Array.from(document.images).map(i => i.complete && i.naturalWidth)"
        )
        assert all(w and w > 0 for w in widths), widths
        assert XSS in browser.find_element("tag name", "body").text
        browser.save_screenshot(str(ARTIFACTS / "report.png"))
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1280, min(int(height) + 100, 12000))
        browser.save_screenshot(str(ARTIFACTS / "report-full.png"))
        errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == [], errors
    finally:
        browser.quit()
