"""report.html in a real browser: headless Chromium renders the results table and every plot.

The checks run as JavaScript inside the page (what a reader sees), not by parsing the HTML in
Python. Chromium is driven through selenium and Debian's chromedriver; selenium never downloads
a driver here because both the browser and the driver paths are given.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import ssl_pipeline
from conftest import TINY

QUICKSTART = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
# Small evaluation settings: the whole run takes seconds on 2 CPU cores.
EVAL_SMALL = [
    "stages=[pretrain, knn, linear_probe, few_shot, finetune]",
    "eval.seeds=2",
    "eval.linear_probe.epochs=3",
    "eval.finetune.epochs=1",
    "eval.finetune.label_fractions=[1.0]",
    "eval.few_shot.shots=[1, 2]",
    "eval.few_shot.seeds=2",
    "eval.knn.settings=[[5, 0.07]]",
]
# Keys of results.json that are not evaluation stages of the backbone.
NOT_STAGES = {"pretrain", "baselines", "provenance", "schema_version"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Runs in the page as an async script: waits until every <img> has decoded (or failed to), then
# returns the results-table rows as cell texts and each image's load state.
PAGE_CHECK_JS = """
const done = arguments[arguments.length - 1];
const images = Array.from(document.images);
Promise.allSettled(images.map((img) => img.decode())).then(() => done({
  tables: document.querySelectorAll("table#results").length,
  rows: Array.from(document.querySelectorAll("#results tr.result-row")).map(
    (tr) => Array.from(tr.cells).map((td) => td.textContent.trim())),
  images: images.map((img) => ({
    alt: img.alt, complete: img.complete, naturalWidth: img.naturalWidth,
    broken: !img.complete || img.naturalWidth === 0,
  })),
}));
"""


def _missing_prerequisite(message: str) -> None:
    """Skip locally, fail in CI (CI=true), which must run the browser tests."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def chromium():
    """A headless Chromium driven by selenium through the system chromedriver; always quit."""
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        _missing_prerequisite(
            "chromium or chromedriver not found on PATH; install the Debian packages: "
            "apt-get install chromium chromium-driver"
        )
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing_prerequisite('selenium is not installed; pip install -e ".[dev]"')
    options = webdriver.ChromeOptions()
    options.binary_location = browser  # with the driver path below: no selenium-manager download
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,2000"):
        options.add_argument(arg)  # --no-sandbox: Chromium refuses to run as root otherwise
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        session.set_page_load_timeout(60)
        session.set_script_timeout(60)
        yield session
    finally:
        session.quit()


def check_page(session, path: Path) -> dict:
    """Open ``path`` in the browser and return what PAGE_CHECK_JS found in the rendered page."""
    session.get(path.resolve().as_uri())
    return session.execute_async_script(PAGE_CHECK_JS)


def expected_rows(results: dict) -> list[tuple[str, str]]:
    """(subject, stage) pairs the results table must show, computed from results.json."""
    rows = [("backbone", stage) for stage, value in results.items()
            if stage not in NOT_STAGES and isinstance(value, dict)
            and ("top1" in value or "by_shots" in value)]
    for baseline, stages in (results.get("baselines") or {}).items():
        rows += [(baseline, stage) for stage in stages]
    return sorted(rows)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_report_renders_results_and_plots_in_chromium(chromium, tmp_path):
    overrides = [*TINY, *EVAL_SMALL, f"eval.cache_dir={tmp_path / 'cache'}"]
    run_dir = ssl_pipeline.run(QUICKSTART, overrides=overrides, out_dir=tmp_path / "run",
                               quiet=True).run_dir
    results = json.loads((run_dir / "results.json").read_text())
    expected = expected_rows(results)
    evals = {"knn", "linear_probe", "few_shot", "finetune"}
    # The table must cover the whole run, so an empty results.json cannot pass vacuously.
    assert {stage for subject, stage in expected if subject == "backbone"} == evals
    assert {subject for subject, _ in expected} == {"backbone", "random_init", "raw_pixels"}

    page = check_page(chromium, run_dir / "report.html")

    assert page["tables"] == 1
    assert all(len(cells) == 5 for cells in page["rows"]), page["rows"]
    assert sorted((cells[0], cells[1]) for cells in page["rows"]) == expected
    assert len(page["images"]) >= 1
    assert [img for img in page["images"] if img["broken"]] == []
    assert {img["alt"] for img in page["images"]} >= {"pretrain_loss_lr", "monitor", "confusion"}
    screenshot = run_dir / "report_screenshot.png"
    assert chromium.save_screenshot(str(screenshot))
    data = screenshot.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 1000


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_page_check_reports_a_broken_image(chromium, tmp_path):
    # A valid 1x1 PNG beside a data URI that is not an image: only the second is broken.
    good = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAA"
            "AABJRU5ErkJggg==")
    page_file = tmp_path / "broken.html"
    page_file.write_text(
        '<!DOCTYPE html><html><body><table id="results"><tbody>'
        '<tr class="result-row"><td>backbone</td><td>knn</td><td>0.5</td><td></td><td></td></tr>'
        f'</tbody></table><img src="data:image/png;base64,{good}" alt="good">'
        '<img src="data:image/png;base64,AAAA" alt="bad"></body></html>'
    )

    page = check_page(chromium, page_file)

    assert page["rows"] == [["backbone", "knn", "0.5", "", ""]]
    by_alt = {img["alt"]: img for img in page["images"]}
    assert by_alt["good"]["broken"] is False and by_alt["good"]["naturalWidth"] == 1
    assert by_alt["bad"]["broken"] is True and by_alt["bad"]["naturalWidth"] == 0
