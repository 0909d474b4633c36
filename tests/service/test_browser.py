"""A real headless Chromium against the running service: the dashboard lists a finished
evaluation, its report opens, every image decoded, the console stayed clean, and hostile
names show as text. Screenshots go to test-artifacts/ (or $ROBUSTNESS_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DATA, MODEL, ROOT, Worker, upload, uvicorn_gateway, wait_for

XSS = "<script>alert(1)</script>"
ARTIFACTS = Path(os.environ.get("ROBUSTNESS_TEST_ARTIFACTS", ROOT / "test-artifacts"))
SPEC = {
    "samples": 40,
    "attacks": [{"name": "fgsm", "eps": [0.05, 0.1, 0.2]}, {"name": "deepfool"}],
    "gates": [{"metric": "robust_accuracy", "attack": "fgsm", "eps": 0.1, "min": 0.2}],
}


def chromium(*extra_flags: str):
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
        *extra_flags,
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


@pytest.fixture
def running_service(settings, tmp_path):
    worker = Worker(settings, tmp_path / "worker.log")
    try:
        with uvicorn_gateway(settings) as url:
            yield url
    finally:
        worker.stop()


def test_the_api_docs_render_offline(settings):
    """/docs with every other host unreachable: Swagger UI comes from the app itself."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium("--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
    try:
        with uvicorn_gateway(settings) as url:
            browser.get(f"{url}/docs")
            WebDriverWait(browser, 30).until(lambda b: b.find_elements(By.CSS_SELECTOR, ".opblock"))
            paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(ARTIFACTS / "docs.png"))
            errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        browser.quit()
    expected = {"/v1/evaluations", "/v1/evaluations/{evaluation_id}", "/v1/models", "/v1/datasets"}
    assert expected <= paths, paths
    assert not errors, errors


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
