"""`dvc plots show` of a comparison of kinds draws every chart offline, one line per (kind,
strength): the plot data as `evaluate` writes it (:func:`l2sweep.reporting.dvc_data.plot_data`)
through the repo's dvc.yaml and templates, in headless Chromium."""

from __future__ import annotations

import json

import pytest

from l2sweep.reporting import dvc_data, summaries
from helpers import plots_repo
from test_plots_offline import DRAWN_PIXELS, PLOT_IDS, TEMPLATE, browser, dvc  # noqa: F401

pytestmark = pytest.mark.slow
#: kind -> its grid; two seeds each.
GRIDS = {"l2": (0.001, 0.01), "dropout": (0.1, 0.3), "none": (0.0,)}
LABELS = {"l2-0.001", "l2-0.01", "dropout-0.1", "dropout-0.3", "none"}


def comparison() -> tuple[dict, list[dict]]:
    """An evaluation and its histories: every (kind, strength, seed), three epochs."""
    entries, histories = {}, []
    for kind, grid in GRIDS.items():
        for strength in grid:
            for seed in (1, 2):
                ce = 0.4 + strength + 0.01 * seed + (0.2 if kind == "none" else 0.0)
                metrics = {"val_loss": [ce + 0.2, ce + 0.1, ce], "val_data_loss": [ce + 0.1, ce, ce],
                           "accuracy": [0.7, 0.8, 0.85], "val_accuracy": [0.68, 0.75, 0.8],
                           "weight_norm/hidden": [3.0, 3.5, 4.0 - strength]}
                histories.append({"regularizer": kind, "strength": strength, "seed": seed,
                                  "status": "FINISHED", "epochs": [0, 1, 2], "metrics": metrics})
                entries[f"{kind}-{strength:g}-s{seed}"] = {
                    "regularizer": kind, "strength": strength, "seed": seed, "fold": None,
                    "status": "finished", "val_data_loss": ce, "val_accuracy": 0.8,
                    "test_accuracy": 0.85 - strength / 2, "test_loss": ce,
                    "weight_norm": {"total": 4.0 - strength, "hidden": 4.0 - strength}}
    return {"sweep": {}, "runs": entries, **summaries.summarize(entries)}, histories


def test_a_comparison_draws_a_line_per_kind_and_strength(tmp_path, browser):  # noqa: F811
    from selenium.webdriver.support.ui import WebDriverWait

    if not TEMPLATE.is_file():
        pytest.skip(f"{TEMPLATE} missing: `make install` writes it (tools/offline_plots.py)")
    repo = plots_repo(tmp_path / "repo")
    (repo / "plots").mkdir()
    for name, rows in dvc_data.plot_data(*comparison()).items():
        (repo / "plots" / name).write_text(json.dumps(dvc_data.json_safe(rows)))
    spec = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    for plot_id in PLOT_IDS:
        values = spec[plot_id][0]["content"]["data"]["values"]
        assert {row["lambda"] for row in values} == LABELS, plot_id
    dvc(repo, "plots", "show", "-o", "show")
    browser.get((repo / "show/index.html").as_uri())
    drawn = lambda b: b.execute_script(DRAWN_PIXELS, PLOT_IDS)  # noqa: E731
    WebDriverWait(browser, 30).until(lambda b: min(drawn(b)) > 2000)
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
