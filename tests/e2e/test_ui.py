"""`make ui` in a real headless browser: after a tiny sweep, its runs are on the experiment page.

The browser is Debian's chromium + chromium-driver (`make test` installs them as root),
driven by selenium. The screenshot is kept for people to look at:
``<pytest's base temp>/ui-screenshot.png``, i.e. /tmp/pytest-of-<user>/pytest-current/ui-screenshot.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from helpers import GRID, chromium, make_project, make_server, run_cli, sqlite_uri

REPO = Path(__file__).resolve().parents[2]
SWEEP = GRID[:2]
NAMES = [f"l2-{s}" for s in SWEEP]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sweep in the embedded (sqlite) store, as `dvc repro` would leave it."""
    root = make_project(tmp_path_factory.mktemp("ui-project"), sweep={"strengths": SWEEP},
                        train={"epochs": 1})
    run_cli(root, "l2sweep.train", "-m", "tracking.log_model=false")
    return root


@pytest.fixture(scope="module")
def ui(project: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make ui` for the project's store on a free loopback port; yields its URL."""
    log = tmp_path_factory.mktemp("ui-server") / "ui.log"
    with make_server("ui", log, 120, TRACKING_URI=sqlite_uri(project)) as url:
        yield url


@pytest.fixture
def browser() -> Iterator["object"]:
    with chromium() as chrome:
        yield chrome


def _shown(browser, text: str) -> bool:
    from selenium.webdriver.common.by import By

    return any(e.is_displayed() for e in browser.find_elements(By.XPATH, f"//*[normalize-space(text())='{text}']"))


def test_the_sweep_is_visible_in_the_ui(project, ui, browser, tmp_path_factory):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    client = MlflowClient(sqlite_uri(project))
    experiment = client.get_experiment_by_name("l2-sweep")
    (parent,) = [r for r in client.search_runs([experiment.experiment_id])
                 if "mlflow.parentRunId" not in r.data.tags]
    screenshot = tmp_path_factory.getbasetemp() / "ui-screenshot.png"
    try:
        # The experiment page as a user opens it: on the runs table, not MLflow's GenAI view.
        assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
        browser.get(f"{ui}/#/experiments/{experiment.experiment_id}?workflowType=machine_learning")
        WebDriverWait(browser, 60).until(lambda b: _shown(b, parent.info.run_name))
        for close in browser.find_elements(By.CSS_SELECTOR, "button[data-component-id='mlflow.assistant.chat_panel.close']"):
            if close.is_displayed():
                close.click()  # the assistant side panel hides half the table
        # The children are nested under the sweep's parent run: expand it.
        expand = browser.find_element(
            By.XPATH, f"//div[@row-id='{parent.info.run_id}']//div[contains(@col-id, 'Run Name')]//button")
        expand.click()
        WebDriverWait(browser, 30).until(lambda b: all(_shown(b, name) for name in NAMES))
    finally:
        browser.save_screenshot(str(screenshot))
        print(f"MLflow UI screenshot: {screenshot}")
    assert screenshot.stat().st_size > 10_000
