"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against the real
stack (a beat scaler starting worker processes, the API, a scripted workload). The page
must draw the numbers the API reports, refuse a visitor without the token, and change the
fleet when a control is clicked."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import redis

from api.dashboard import SESSION_COOKIE, session_value
from common import keys
from tests.helpers import ApiProcess, BeatProcess, stop_fleet, wait_for

pytestmark = pytest.mark.timeout(240)

TOKEN = "dashboard-token-91c2"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# As root, without a sandbox; no background traffic (this machine has no internet).
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCALER = {
    "tick_interval_s": 0.5,
    "max_workers": 3,
    "target_load_per_instance": 64,
    "zero_scaling": {"scale_to_zero_delay": 120.0, "cold_start_strategy": "lazy",
                     "preload_popular_models": False},
}  # fmt: skip
REQUESTS = 240


def browser_or_skip() -> Any:
    """Playwright over Debian's Chromium; a missing browser fails under CI (it installs one)."""
    missing = None
    if not os.access(CHROMIUM, os.X_OK):
        missing = f"no Chromium at {CHROMIUM} (Debian's chromium; `make test` as root installs it)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("REQUIRE_BROWSER"):
            pytest.fail(missing)
        pytest.skip(f"{missing}: the dashboard's browser test did not run")
    return sync_playwright


class Stack:
    def __init__(self, api: ApiProcess, client: redis.Redis, log_dir: Path) -> None:
        self.api = api
        self.client = client
        self.log_dir = log_dir
        self.http = httpx.Client(base_url=api.url, timeout=30)

    def get(self, path: str) -> dict[str, Any]:
        response = self.http.get(path)
        assert response.status_code == 200, response.text
        return dict(response.json())


@pytest.fixture
def stack(tmp_path: Path, test_repo: Path, client: redis.Redis) -> Iterator[Stack]:
    config = tmp_path / "scaler.json"
    config.write_text(json.dumps(SCALER))
    env = {"MODEL_REPOSITORY": str(test_repo), "WORKER_REPORT_INTERVAL_S": "0.5"}
    beat = BeatProcess(
        "dash-beat", env={**env, "SCALER_CONFIG_FILE": str(config),
                          "SCALER_LOG_DIR": str(tmp_path)}, log_dir=tmp_path,
    )  # fmt: skip
    api = ApiProcess("dash-api", env={**env, "API_TOKEN": TOKEN}, log_dir=tmp_path)
    try:
        api.wait_ready()
        wait_for(
            lambda: client.exists(keys.REGISTRY) or beat.proc.poll() is not None,
            what="the scaler to publish the registry",
        )
        assert beat.proc.poll() is None, beat.log()
        yield Stack(api, client, tmp_path)
    finally:
        api.stop()
        beat.stop()
        stop_fleet(client)


def test_the_dashboard_draws_the_api_s_numbers_and_its_controls_scale(
    stack: Stack, tmp_path: Path
) -> None:
    sync_playwright = browser_or_skip()
    from tasks import predict

    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((8, 64)).astype(np.float32)
    results = [predict.delay("tiny_mlp", inputs[i % 8]) for i in range(REQUESTS)]
    for result in results:
        assert len(result.get(timeout=120)) == 10

    def reported() -> dict[str, Any] | None:
        m = stack.get("/autoscaler/metrics?window_seconds=300")
        tiny = m["models"].get("tiny_mlp/v1", {})
        # the scaler counts the cold start at the tick that sees the instance serving
        return m if (tiny.get("requests"), tiny.get("cold_starts")) == (REQUESTS, 1) else None

    metrics = wait_for(reported, timeout_s=30, what="the API to report the workload")

    # No token, a wrong token, a session call without the page's header: refused.
    assert stack.http.get("/dashboard").status_code == 401
    assert stack.http.get("/dashboard/assets/dashboard.js").status_code == 401
    assert stack.http.get("/dashboard", params={"token": "nope"}).status_code == 401
    cookie = {SESSION_COOKIE: session_value(TOKEN)}
    forged = httpx.post(
        stack.api.url + "/autoscaler/scale",
        params={"model_name": "tiny_mlp", "target_instances": 0},
        cookies=cookie,
    )
    assert forged.status_code == 403, forged.text

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1600})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            refused = page.goto(stack.api.url + "/dashboard")
            assert refused is not None and refused.status == 401
            assert "bearer token" in page.content()

            opened = page.goto(stack.api.url + f"/dashboard?token={TOKEN}")
            assert opened is not None and opened.status == 200
            assert page.url == stack.api.url + "/dashboard"  # the token left the address
            page.wait_for_function(
                "window.dashboard.metrics && window.dashboard.charts['tiny_mlp/v1']",
                timeout=30_000,
            )
            card = page.locator('[data-model="tiny_mlp/v1"]')
            shown = card.locator('[data-field="requests"]').inner_text()
            assert int(shown) == REQUESTS == metrics["models"]["tiny_mlp/v1"]["requests"]
            assert card.locator('[data-field="cold_starts"]').inner_text() == "1"
            # The drawn requests/s, times the step, add up to the API's count; the series
            # the page drew is the API's.
            drawn = page.evaluate(
                """() => {
                  const chart = window.dashboard.charts['tiny_mlp/v1'].rps;
                  return {rps: chart.data[1], step: window.dashboard.series.step_seconds};
                }"""
            )
            assert abs(sum(v or 0 for v in drawn["rps"]) * drawn["step"] - REQUESTS) < 0.5
            series = stack.get("/autoscaler/metrics/series?window_seconds=300&step_seconds=5")
            assert sum(series["models"]["tiny_mlp/v1"]["requests"]) == REQUESTS
            assert card.locator("canvas").count() == 3
            box = card.locator("canvas").first.bounding_box()
            assert box is not None and box["width"] > 200 and box["height"] > 100

            # The workers table lists what the API's workers endpoint reports.
            workers = stack.get("/autoscaler/workers")["workers"]
            serving = [n for n, w in workers.items() if w["models"]]
            assert serving
            # (the page polls every 2 s: its next poll sees what the API saw)
            row = page.locator(f'[data-worker="{serving[0]}"]', has_text="tiny_mlp/v1")
            row.wait_for(timeout=10_000)
            assert "no GPU" in row.inner_text()

            # A control click changes the fleet.
            page.select_option("#ctl-version", "tiny_mlp/v1")
            page.fill("#ctl-instances", "2")
            page.click("#ctl-scale")
            page.wait_for_selector('#ctl-result[data-status="200"]', timeout=10_000)
            wait_for(
                lambda: stack.get("/autoscaler/stats")["active_instances"].get("tiny_mlp/v1") == 2,
                timeout_s=90,
                what="a second tiny_mlp instance after the click",
            )
            card.locator('.now[data-active="2"]').wait_for(timeout=15_000)
            page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
            if target := os.environ.get("DASHBOARD_SCREENSHOT"):
                shutil.copy(tmp_path / "dashboard.png", target)
            assert not errors, errors
        finally:
            browser.close()
