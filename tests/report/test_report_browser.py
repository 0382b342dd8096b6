"""report.html opens in headless Chromium without console errors and shows the per-type table and plots.

Needs Debian's chromium (SURGVQA_CHROMIUM overrides the path): a missing browser FAILS this test, on purpose.
"""

import json
from pathlib import Path

from PIL import Image
from support.browser import CHROMIUM_ARGS, chromium_path

from surgvqa.core.config import EvaluateConfig
from surgvqa.stages.evaluate import run_on_file

CASES = [  # (type, template, question, answer, prediction, baseline prediction)
    ("yes_no", 1, "Is there text?", "yes", "yes", "no"),
    ("yes_no", 1, "Is there text?", "no", "yes", "yes"),
    ("yes_no", 16, "Does this image contain any finding?", "yes", "yes", "yes"),
    (
        "color",
        13,
        "What color is the abnormality? If more than one separate with ;",
        "pink; red",
        "red",
        "white",
    ),
    ("color", 13, "What color is the abnormality? If more than one separate with ;", "red", "red", "pink"),
    ("size_numeric", 9, "What is the size of the polyp?", "5-10mm", "<5mm", "none"),
    ("size_numeric", 9, "What is the size of the polyp?", "11-20mm", "11-20mm", ">20mm"),
    ("count_numeric", 11, "How many polyps are in the image?", "2", "1", "0"),
    ("count_numeric", 11, "How many polyps are in the image?", "1", "1", "1"),
    (
        "mcq",
        3,
        "What type of procedure is the image taken from?",
        "colonoscopy",
        "gastroscopy",
        "colonoscopy",
    ),
    ("mcq", 15, "Where in the image is the abnormality?", "center; center-left", "center", "upper-left"),
    ("open_ended", None, "Describe the image.", "a small polyp", "a polyp", "nothing"),
]


def _write_run(run_dir: Path) -> tuple[Path, Path]:
    images = run_dir / "images"
    images.mkdir(parents=True)
    rows, base_rows = [], []
    for i, (question_type, template, question, answer, prediction, base) in enumerate(CASES):
        Image.new("RGB", (96, 96), (40 + 15 * i, 120, 200 - 12 * i)).save(images / f"img{i}.png")
        row = {
            "id": f"q{i}",
            "img_id": f"img{i}",
            "image": f"images/img{i}.png",
            "question": question,
            "question_type": question_type,
            "template": template,
            "answer": answer,
            "prediction": prediction,
            "raw_text": prediction,
            "mode": "generate",
            "scores": None,
            "error": None,
            "multi_label": ";" in answer,
            "candidates": [],
        }
        base_rows.append(json.dumps({**row, "prediction": base, "raw_text": base}))
        # Confidence fields as predict writes them (temperature-scaled "confidence", conformal set, abstention).
        confidence = 0.95 - 0.06 * i
        row.update(confidence_raw=min(1.0, confidence + 0.04), confidence=confidence, abstained=i == len(CASES) - 2,
                   confidence_kind="sequence" if question_type == "open_ended" else "candidates",
                   answer_set=[prediction, answer] if question_type == "yes_no" else None)
        rows.append(json.dumps(row))
    rows.append("{broken json")
    predictions, baseline = run_dir / "predictions.jsonl", run_dir / "baseline.jsonl"
    predictions.write_text("\n".join(rows) + "\n")
    baseline.write_text("\n".join(base_rows) + "\n")
    (run_dir / "train_log.jsonl").write_text(
        "".join(json.dumps({"step": step, "loss": 3.0 / (1 + 0.2 * step)}) + "\n" for step in range(1, 40))
    )
    (run_dir / "config.resolved.yaml").write_text(
        "run_name: browser-test\nevaluate:\n  size_tolerance_mm: 5.0\n"
    )
    return predictions, baseline


def test_report_opens_in_headless_chromium(tmp_path):
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    run_dir = tmp_path / "run"
    predictions, baseline = _write_run(run_dir)
    metrics = run_on_file(
        predictions,
        run_dir / "eval",
        EvaluateConfig(bootstrap_samples=200),
        baseline=baseline,
        run_dir=run_dir,
        with_meteor=False,
    )
    report = Path(metrics["outputs"]["report"])
    assert {"plot_per_type", "plot_baseline", "plot_training_curve", "plot_confusion_yes_no",
            "plot_confidence_reliability", "plot_confidence_risk_coverage"} <= set(metrics["outputs"])
    assert metrics["confidence"]["n"] == len(CASES) and metrics["confidence"]["n_abstained"] == 1
    assert "## Confidence" in Path(metrics["outputs"]["markdown"]).read_text()
    source = report.read_text()
    assert "http://" not in source and "https://" not in source and "<script" not in source
    assert "run_name: browser-test" in source

    screenshot = tmp_path / "report.png"
    problems: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on(
                "console",
                lambda message: (
                    problems.append(f"console {message.type}: {message.text}")
                    if message.type == "error"
                    else None
                ),
            )
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", lambda request: problems.append(f"request failed: {request.url}"))
            page.goto(report.as_uri(), wait_until="load")

            table = page.locator("#per-type-table")
            assert table.is_visible()
            first_cells = table.locator("tbody tr td:first-child").all_inner_texts()
            assert first_cells[:6] == [
                "yes_no",
                "color",
                "size_numeric",
                "count_numeric",
                "mcq",
                "open_ended",
            ]
            assert "closed_all" in first_cells and "micro average" in first_cells
            assert page.locator("#baseline-table").is_visible()

            plot = page.locator("#plot-per-type")
            assert plot.is_visible()
            assert plot.evaluate("img => img.complete && img.naturalWidth > 0")
            loaded_images = page.evaluate(
                "Array.from(document.images).filter(i => i.naturalWidth > 0).length"
            )
            assert loaded_images >= 8  # plots + confusion matrices + thumbnails in the failure gallery
            assert page.locator(".case img").count() >= 1

            # The Confidence section: calibration table, reliability diagrams, risk-coverage, confident errors.
            assert page.locator("h2#confidence").inner_text() == "Confidence"
            confidence_rows = page.locator("#confidence-table tbody tr td:first-child").all_inner_texts()
            assert confidence_rows[0] == "yes_no" and confidence_rows[-1] == "all"
            for plot_id in ("#plot-reliability", "#plot-risk-coverage"):
                assert page.locator(plot_id).evaluate("img => img.complete && img.naturalWidth > 0")
            assert page.locator("#conformal-table").is_visible()
            confident_errors = page.locator("#confident-errors .case")
            assert confident_errors.count() >= 3
            # Each with its image, as the failure cases have theirs (the paths are relative to the predictions file).
            assert page.locator("#confident-errors .noimg").count() == 0
            assert page.locator("#confident-errors .case img").count() == confident_errors.count()
            page.screenshot(path=str(screenshot), full_page=True)

            # A thumbnail shown small opens larger on a click, over the page, and closes on a click elsewhere.
            thumbnail = page.locator(".case img").first
            small = thumbnail.bounding_box()
            thumbnail.click()
            enlarged = thumbnail.bounding_box()
            assert enlarged["width"] > 1.5 * small["width"], (small, enlarged)
            page.mouse.click(5, 5)
            assert thumbnail.bounding_box()["width"] == small["width"]

            # The confidence table says what it means in plain words, and at 800 px nothing runs off the page.
            assert page.locator("#confidence-in-words").inner_text().startswith("In plain words: on average the model")
            page.set_viewport_size({"width": 800, "height": 900})
            assert page.evaluate("document.documentElement.scrollWidth") <= 800
            assert page.evaluate("Array.from(document.querySelectorAll('.tablewrap'))"
                                 ".filter(d => d.scrollWidth > d.clientWidth + 1).length") == 0
            assert page.locator("#run-line").inner_text().startswith("model: ")
        finally:
            browser.close()
    assert not problems, problems
    assert screenshot.stat().st_size > 10_000
    print(f"report screenshot: {screenshot}")
