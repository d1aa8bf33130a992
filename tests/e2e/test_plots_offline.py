"""`dvc plots show` and `dvc plots diff` pages draw their charts offline, in a real headless
Chromium that cannot reach the network: the page template (.dvc/config `plots.html_template`,
written by `make install`: tools/offline_plots.py) carries vega, vega-lite and vega-embed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from helpers import chromium, plots_repo

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / ".dvc/plots/offline.html"
PLOT_IDS = ["val_loss_per_epoch", "val_cross_entropy_per_epoch", "accuracy_per_epoch",
            "weight_norm_vs_lambda", "test_accuracy_vs_lambda"]
pytestmark = pytest.mark.slow

# Pixels of a canvas that are drawn (not transparent, not white): marks, axes, legend.
DRAWN_PIXELS = """
const counts = [];
for (const id of arguments[0]) {
  const canvas = document.querySelector('#' + id + ' canvas');
  if (!canvas || !canvas.width) { counts.push(0); continue; }
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < data.length; i += 4) if (data[i + 3] > 0 && data[i] + data[i + 1] + data[i + 2] < 600) n++;
  counts.push(n);
}
return counts;
"""


def dvc(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).with_name("dvc")), *args], cwd=repo, check=True,
                          capture_output=True, text=True)


def write_plot_data(repo: Path, scale: float = 1.0) -> None:
    """plots/*.json as evaluate writes them, for two λ and three epochs."""
    epochs, accuracy, by_lambda = [], [], []
    for strength in (0.001, 0.1):
        lam = {"lambda": str(strength), "strength": strength}
        for epoch in range(3):
            loss = scale * (1.0 + strength) / (epoch + 1)
            epochs.append({**lam, "epoch": epoch, "val_loss": loss, "val_data_loss": loss * 0.9})
            for split, acc in (("train", 0.8 + 0.05 * epoch), ("validation", 0.78 + 0.04 * epoch)):
                accuracy.append({**lam, "epoch": epoch, "split": split, "accuracy": acc})
        by_lambda.append({**lam, "weight_norm": 10 - 50 * strength, "test_accuracy": 0.85 - strength})
    (repo / "plots").mkdir(exist_ok=True)
    for name, rows in (("epochs", epochs), ("accuracy", accuracy), ("by_lambda", by_lambda)):
        (repo / "plots" / f"{name}.json").write_text(json.dumps({name: rows}))


@pytest.fixture(scope="module")
def pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The repo's dvc.yaml, templates and .dvc/config in a scratch git+DVC repo; the pages of
    `dvc plots show` and of `dvc plots diff HEAD` after the workspace's losses changed."""
    if not TEMPLATE.is_file():
        pytest.skip(f"{TEMPLATE} missing: `make install` writes it (tools/offline_plots.py)")
    repo = plots_repo(tmp_path_factory.mktemp("plots-repo"))
    write_plot_data(repo)
    dvc(repo, "plots", "show", "-o", "show")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "plots"],
                   cwd=repo, check=True)
    write_plot_data(repo, scale=1.3)
    dvc(repo, "plots", "diff", "HEAD", "-o", "diff")
    spec = json.loads(dvc(repo, "plots", "diff", "HEAD", "--json").stdout)
    return {"show": repo / "show/index.html", "diff": repo / "diff/index.html",
            "diff_spec": spec["data"]["val_loss_per_epoch"][0]["content"]}


@pytest.fixture(scope="module")
def browser() -> Iterator["object"]:
    """Headless Chromium with every request sent to a dead proxy: no network."""
    with chromium("--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>") as chrome:
        yield chrome


@pytest.mark.parametrize("page", ["show", "diff"])
def test_every_chart_is_drawn_offline(pages, browser, page):
    from selenium.webdriver.support.ui import WebDriverWait

    html = pages[page].read_text()
    assert "cdn.jsdelivr" not in html and "<script src=" not in html
    browser.get(pages[page].as_uri())
    drawn = lambda b: b.execute_script(DRAWN_PIXELS, PLOT_IDS)  # noqa: E731
    WebDriverWait(browser, 30).until(lambda b: min(drawn(b)) > 2000)
    assert not [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]


def test_diff_legend_names_both_revisions(pages, browser):
    """The diff's legend tells the revisions apart (drawn as SVG here, so its text can be read)."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(pages["diff"].as_uri())
    browser.execute_script("const d = document.createElement('div'); d.id = 'svg-check';"
                           "document.body.appendChild(d); vegaEmbed('#svg-check', arguments[0], "
                           "{renderer: 'svg'});", pages["diff_spec"])
    texts = lambda b: b.execute_script(  # noqa: E731
        "return [...document.querySelectorAll('#svg-check .role-legend text')].map(t => t.textContent)")
    WebDriverWait(browser, 30).until(lambda b: "workspace" in texts(b))
    assert {"revision", "HEAD", "workspace", "λ", "0.001", "0.1"} <= set(texts(browser))
    symbols = browser.execute_script("""
        const legend = [...document.querySelectorAll('#svg-check .role-legend')].find(
            l => l.querySelector('.role-legend-title text').textContent === 'revision');
        return [...legend.querySelectorAll('.role-legend-symbol path')].map(
            p => [p.getAttribute('stroke'), p.getAttribute('stroke-dasharray') || 'solid']);""")
    assert len(symbols) == 2 and len({dash for _, dash in symbols}) == 2, symbols  # solid vs dashed
    assert not [stroke for stroke, _ in symbols if stroke in (None, "transparent", "none")], symbols
    ticks = browser.execute_script(
        "return [...document.querySelectorAll('#svg-check .role-axis[aria-label^=\"X-axis\"] "
        ".role-axis-label text')].map(t => t.textContent)")
    assert {"0", "1", "2"} <= set(ticks) and not [t for t in ticks if "." in t]  # whole epochs on x
