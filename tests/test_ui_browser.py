"""A real browser (Debian's headless Chromium, driven by Playwright) on the MLflow UI that
`orchestrate ui` serves and on the sweep's HTML report, after the shared `results_sweep`.

Screenshots are kept as test artifacts under pytest's temporary directory (the path is
printed; `pytest -s` shows it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import BrowserContext, expect, sync_playwright

from results_fixture import NAME, ORCHESTRATE, free_port, stop, wait_for_http

CHROMIUM = "/usr/bin/chromium"
# Root needs --no-sandbox; the rest keep a headless Chromium off the (closed) network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[BrowserContext]:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile,
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900},
        )
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_ui(results_sweep) -> Iterator[str]:
    """`orchestrate ui` on a free port, serving the sweep's tracking store."""
    port = free_port()
    process = subprocess.Popen(
        [
            str(ORCHESTRATE),
            "ui",
            "--port",
            str(port),
            "--tracking-uri",
            results_sweep.record.tracking_uri,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", process)
        yield url
    finally:
        stop(process)


def test_mlflow_ui_shows_the_trial_runs_and_their_exit_charts(
    results_sweep, mlflow_ui, browser, tmp_path
):
    record = results_sweep.record
    page = browser.new_page()
    # The link `launch` prints: the sweep's runs in MLflow's model-training view.
    page.goto(
        f"{mlflow_ui}/#/experiments/{record.experiment_id}/runs?workflowType=machine_learning"
    )
    parent = page.get_by_role("gridcell").filter(
        has=page.get_by_role("link", name=NAME, exact=True)
    )
    parent.get_by_role("button").click(timeout=60_000)  # expand the sweep's parent run
    for number in range(4):
        expect(page.get_by_role("link", name=f"trial-{number:03d}")).to_be_visible()
    page.screenshot(path=tmp_path / "mlflow-runs.png")

    page.get_by_role("link", name="trial-000").click()
    page.get_by_role("tab", name="Model metrics").click()
    page.get_by_role("searchbox", name="Search metric charts").fill("val/exit1/acc")
    expect(page.get_by_text("trial-000 (val/exit1/acc)")).to_be_visible(timeout=60_000)
    expect(page.get_by_role("heading", name="acc", exact=True)).to_be_visible()
    shot = tmp_path / "mlflow-trial-metrics.png"
    page.screenshot(path=shot)
    print(f"screenshots: {tmp_path}")
    assert shot.stat().st_size > 10_000
    page.close()


def test_report_images_all_load_in_the_browser(results_sweep, browser):
    report = results_sweep.record.directory / "report.html"
    page = browser.new_page()
    page.goto(report.as_uri())
    widths = page.eval_on_selector_all("img", "images => images.map(i => i.naturalWidth)")
    assert len(widths) >= 6 and all(width > 0 for width in widths), widths
    page.close()
