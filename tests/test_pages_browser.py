"""report.html and evaluation.html in a real browser (headless Chromium, network off, from file://):
no console error, no request but the page itself, every figure rendered with a size, the summary table's
numbers equal summary.json's / evaluation.json's, and a screenshot that is not blank.

Fails in CI (CI=true) when no browser is found; skips elsewhere. E1MIN_SCREENSHOTS=DIR keeps the screenshots.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

import tests.browser
from tests.browser import chromium, load, require_browser


@pytest.fixture(scope="module")
def browser():
    require_browser()
    with chromium() as driver:
        yield driver


@pytest.fixture(scope="module")
def evaluation_dir(run_dir, ensemble, tmp_path_factory):
    from e1min.predict import evaluate_records, read_input_fasta

    out = tmp_path_factory.mktemp("evaluation")
    recs = read_input_fasta(run_dir.parent / "data/ZN_train.fasta")[0]
    evaluate_records(ensemble, recs, out, progress=False)
    return out


def check_page(driver, page: Path) -> None:
    seen = load(driver, page)
    errors = [m for m in seen["console"] if m["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    assert seen["failed"] == [], seen["failed"]
    assert seen["requested"] == [page.resolve().as_uri()], seen["requested"]  # self-contained: nothing else is fetched
    sizes = driver.execute_script(
        "return Array.from(document.querySelectorAll('svg')).map(s => {const r = s.getBoundingClientRect(); return [r.width, r.height];})"
    )
    assert len(sizes) >= 4 and all(w > 100 and h > 100 for w, h in sizes), sizes
    images = driver.execute_script("return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight])")
    assert all(c and w > 0 and h > 0 for c, w, h in images), images


def screenshot(driver, name: str) -> np.ndarray:
    from PIL import Image

    png = driver.get_screenshot_as_png()
    img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    keep = os.environ.get("E1MIN_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / name).write_bytes(png)
    return img


def not_blank(img: np.ndarray) -> None:
    assert img.shape[0] > 200 and img.shape[1] > 200
    white = (img > 245).all(axis=2).mean()
    assert 0.3 < white < 0.995, white  # mostly page background, but text and figures drawn
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # curves in several colours, antialiased text


def table(driver) -> dict[str, dict[str, str]]:
    rows = driver.execute_script(
        "return Array.from(document.querySelectorAll('#summary tr[data-ion]')).map(r => "
        "[r.dataset.ion, Array.from(r.querySelectorAll('td[data-key]')).map(c => [c.dataset.key, c.textContent])])"
    )
    return {ion: dict(cells) for ion, cells in rows}


def test_run_report_in_a_browser(browser, run_dir):
    check_page(browser, run_dir / "report.html")
    summary = json.loads((run_dir / "summary.json").read_text())
    shown = table(browser)
    assert set(shown) == set(summary["ions"])
    for ion, m in summary["ions"].items():
        assert shown[ion]["positive_rate"] == f"{m['positive_rate']:.4f}"
        for key in ("auprc", "auroc", "hra", "f1", "mcc"):
            assert shown[ion][key] == f"{m[key]['mean']:.3f} ± {m[key]['std']:.3f}"
    not_blank(screenshot(browser, "report.png"))


def test_evaluation_page_in_a_browser(browser, evaluation_dir):
    check_page(browser, evaluation_dir / "evaluation.html")
    report = json.loads((evaluation_dir / "evaluation.json").read_text())
    shown = table(browser)
    assert set(shown) == set(report["ions"]) == {"ZN", "CA"}
    for ion, m in report["ions"].items():
        for key in ("auprc", "auroc", "hra"):
            assert shown[ion][key] == f"{m[key]:.3f}"
        for key in ("f1", "mcc", "precision", "recall"):
            assert shown[ion][f"saved_{key}"] == f"{m['at_saved'][key]:.3f}"
    worst = browser.execute_script("return document.querySelectorAll('table.worst tr[data-id]').length")
    assert worst > 0
    not_blank(screenshot(browser, "evaluation.png"))


def test_a_missing_browser_fails_in_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(tests.browser, "find_browser", lambda: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="headless Chromium"):
        require_browser()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_browser()
