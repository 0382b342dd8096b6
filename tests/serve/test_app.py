"""`surgvqa app` on a trained run: driven in headless Chromium as a user would, and asked by 8 clients at once.

Needs Debian's chromium (SURGVQA_CHROMIUM overrides the path), as the report's browser test: a missing browser FAILS
this test. SURGVQA_SCREENSHOTS=<folder> keeps the screenshots of the main views (the README's come from here).
"""

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.browser import CHROMIUM_ARGS, chromium_path

import surgvqa.serve.answer_service
import surgvqa.serve.app
from surgvqa.core.config import load_config
from surgvqa.data.records import read_records, write_records
from surgvqa.inference.prediction_files import read_done
from surgvqa.stages.predict import run as run_predict

pytestmark = [pytest.mark.timeout(900), pytest.mark.usefixtures("one_torch_thread")]

TEMPLATE_QUESTION = "Is there text?"  # a closed single-label question: answered with a chart of its candidates
FREE_QUESTION = "Can you see a polyp in this picture?"


# The elements inside a selector whose content is cut by their own box (an ellipsis, a scroll box): what a user would
# see cut off. Table cells report no height of their own and are left to their rows.
CUT = """([selector, axes]) => [...document.querySelectorAll(selector + ' *')].filter(e => {
    const style = getComputedStyle(e);
    if (e.clientWidth === 0 || e.clientHeight === 0) return false;
    return (axes.includes('x') && style.overflowX !== 'visible' && e.scrollWidth > e.clientWidth + 1)
        || (axes.includes('y') && style.overflowY !== 'visible' && e.scrollHeight > e.clientHeight + 1);
}).map(e => e.tagName + ': ' + e.textContent.trim().slice(0, 60))"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(small_run, small_run_command):
    """The app on the small run's trained model, started once, with its model loads counted."""
    config = load_config(None, small_run_command.overrides(small_run.parent))
    loads = []
    original = surgvqa.serve.answer_service.load_for_prediction

    def counted(*args, **kwargs):
        loads.append(args[1])
        return original(*args, **kwargs)

    surgvqa.serve.answer_service.load_for_prediction = counted
    try:
        page, service, url = surgvqa.serve.app.serve(config, block=False, port=_free_port())
    finally:
        surgvqa.serve.answer_service.load_for_prediction = original
    assert url.startswith("http://127.0.0.1:")  # on this machine only, unless --host says otherwise
    yield config, service, url, loads
    page.close()


def test_the_app_answers_in_the_browser_with_confidence_and_candidates(served, small_run, tmp_path, capfd):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError
    from playwright.sync_api import expect, sync_playwright

    config, service, url, _ = served
    shots = Path(os.environ.get("SURGVQA_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    image = next((small_run / "prepared" / "images").iterdir())
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("these are my notes, not an endoscopy image")
    train = read_records(small_run / "prepared" / "train.jsonl")
    multi_label = next(q for q in service.questions[1:] if any(r.multi_label for r in train if r.question == q))
    capfd.readouterr()  # the server's log from here on: this test's user errors

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1360, "height": 1100})
        page.goto(url)
        page.locator("#upload input[type=file]").set_input_files(str(image))
        expect(page.locator("#shown-image img")).to_be_visible(timeout=60_000)

        # A typed question is asked instead of the menu's, and the answer says which question it answered.
        page.locator("#free-question textarea").fill(TEMPLATE_QUESTION)
        page.locator("#ask").click()
        answer = page.locator("#answer")
        expect(answer).to_contain_text("confidence", timeout=120_000)
        expect(answer).to_contain_text(f"Answered: {TEMPLATE_QUESTION} (your typed question)")
        expect(answer).to_contain_text("yes_no")
        assert "%" in answer.inner_text()  # a probability, not a dash
        chart = page.locator("#candidates")
        expect(chart).to_contain_text("yes")
        expect(chart).to_contain_text("no")
        expect(answer).to_contain_text("answer set (conformal, guaranteed coverage)")
        shown_confidence = answer.inner_text().split("confidence")[1].split("%")[0].strip()
        expect(chart).to_contain_text(f"{round(float(shown_confidence))}%")  # the chart at the same temperature
        page.screenshot(path=str(shots / "app-ask.png"), full_page=True)

        page.locator("#free-question textarea").fill(FREE_QUESTION)
        page.locator("#ask").click()
        expect(answer).to_contain_text(f"Answered: {FREE_QUESTION} (your typed question)", timeout=120_000)
        expect(answer).to_contain_text("confidence")

        # A blank typed question: the menu's question is asked, and the answer says so.
        page.locator("#free-question textarea").fill("   ")
        page.locator("#ask").click()
        expect(answer).to_contain_text(f"Answered: {service.questions[0]} (the menu's question: the typed box is "
                                       f"empty)", timeout=120_000)

        # Another question from the menu, a multi-label one: its confidence (the whole set's) is told apart from the
        # bars (each label's own probability).
        page.locator("#menu input").click()
        page.get_by_role("option", name=multi_label).click()
        page.locator("#ask").click()
        expect(answer).to_contain_text(f"Answered: {multi_label} (the menu's question", timeout=120_000)
        expect(answer).to_contain_text("the confidence is that of this exact set of labels")
        rescaled = service.ask(surgvqa.serve.answer_service.read_image(image), [multi_label])[0].rescaled
        assert ("recalibrated on the validation split" in answer.inner_text()) == rescaled
        expect(chart).to_contain_text("Each label's own probability")
        page.screenshot(path=str(shots / "app-multi-label.png"), full_page=True)

        page.locator("#gallery img").first.click()  # a test image: its questions and references are shown
        first = read_records(small_run / "prepared" / "test.jsonl")[0]  # the gallery's first image
        expect(page.locator("#references")).to_contain_text(first.question, timeout=60_000)
        expect(page.locator("#gallery")).to_contain_text(first.img_id)
        assert page.evaluate(CUT, ["#gallery", "x"]) == []  # captions in full, not "synth_00..."
        page.locator("#free-question textarea").fill(first.question)
        page.locator("#ask").click()
        expect(answer).to_contain_text("the reference", timeout=120_000)
        expect(page.locator("#references")).to_contain_text(first.answer)
        page.screenshot(path=str(shots / "app-gallery.png"), full_page=True)

        # Every question about the test image, with its references and whether each answer matches.
        page.get_by_role("tab", name="Ask all").click()
        page.locator("#ask-all").click()
        table = page.locator("#all-answers")
        expect(table).to_contain_text(service.questions[-1], timeout=180_000)
        expect(table).to_contain_text(TEMPLATE_QUESTION)
        expect(table).to_contain_text(first.answer)
        assert page.evaluate(CUT, ["#all-answers", "xy"]) == []  # every row shown, no column cut
        page.screenshot(path=str(shots / "app-ask-all.png"), full_page=True)

        page.reload()  # a fresh page: the upload box is empty again
        page.locator("#ask").click()
        expect(page.get_by_text("Upload an image or pick one from the test split first.")).to_be_visible(
            timeout=60_000)
        page.locator("#upload input[type=file]").set_input_files(str(not_an_image))
        expect(page.get_by_text("notes.png is not an image surgvqa can read")).to_be_visible(timeout=60_000)
        browser.close()

    # The API refuses an empty question and a file that is not an image, each with a message that says why.
    client = Client(url, verbose=False)
    with pytest.raises(AppError, match="The question is empty"):
        client.predict(handle_file(str(image)), "  ", api_name="/answer")
    with pytest.raises(AppError, match="notes.png is not an image surgvqa can read"):
        client.predict(handle_file(str(not_an_image)), TEMPLATE_QUESTION, api_name="/answer")

    # One line in the server's log per user error, no traceback.
    log = capfd.readouterr().err
    refused = [line for line in log.splitlines() if line.startswith("surgvqa app: refused")]
    assert len(refused) == 4, log
    assert "Traceback" not in log, log
    assert "(ask): Upload an image" in refused[0]
    assert "(upload): notes.png is not an image" in refused[1]
    assert "(/answer): The question is empty" in refused[2]
    assert "(/answer): notes.png is not an image" in refused[3]
    # Uploads stay inside the run directory.
    assert list((config.run_dir / "app" / "uploads").rglob("*.png"))


def test_the_start_up_advice_is_for_the_command_line_not_for_a_python_caller():
    local = surgvqa.serve.app.reachability("127.0.0.1", 7860)
    assert "surgvqa app --host 0.0.0.0" in local and "share=True" not in local
    assert "anyone who can reach this machine" in surgvqa.serve.app.reachability("0.0.0.0", 7860)


def test_eight_clients_at_once_get_the_answers_of_surgvqa_predict_from_one_model_load(served, small_run,
                                                                                       small_run_command, tmp_path):
    from gradio_client import Client, handle_file

    _, _, url, loads = served
    records = read_records(small_run / "prepared" / "test.jsonl")[:8]
    for record in records:
        record.image = str(small_run / "prepared" / record.image)
    data = tmp_path / "eight.jsonl"
    write_records(data, records)
    # One record per batch, as the app asks one question at a time: the same computation, so equal answers.
    single = load_config(None, [*small_run_command.overrides(small_run.parent), "predict.batch_size=1"])
    expected = {row["id"]: row["prediction"] for row in read_done(
        run_predict(single, data=data, out=tmp_path / "eight.predictions.jsonl", quiet=True))}

    def ask(record):
        client = Client(url, verbose=False)
        return record.id, client.predict(handle_file(record.image), record.question, api_name="/answer")

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = dict(pool.map(ask, records))
    assert {key: value["answer"] for key, value in answers.items()} == expected
    assert all(value["error"] is None for value in answers.values())
    assert len(loads) == 1  # one model instance served every client


def test_the_batch_tab_writes_every_answer_under_the_run_and_names_files_that_are_not_images(served, small_run,
                                                                                          tmp_path, monkeypatch):
    import csv
    import json

    config, service, _, _ = served
    images = sorted((small_run / "prepared" / "images").iterdir())[:2]
    notes = tmp_path / "notes.jpg"
    notes.write_text("not an image")
    result = service.predict_files([*map(str, images), str(notes)], service.questions[:3])
    csv_path, jsonl_path = result.csv, result.jsonl
    assert csv_path.parent == jsonl_path.parent == config.run_dir / "app"
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 2 * 3 + 1 and rows == [{k: "" if v is None else str(v) for k, v in json.loads(line).items()}
                                               for line in jsonl_path.read_text().splitlines()]
    assert all(row["answer"] and row["error"] == "" for row in rows[:6])
    assert rows[6]["image"] == "notes.jpg" and rows[6]["question"] == ""  # one row: it was never asked anything
    assert "notes.jpg is not an image" in rows[6]["error"]
    assert (result.images, result.unreadable) == (2, ["notes.jpg"])
    assert surgvqa.serve.app.batch_status(result, 3) == ("2 image(s) × 3 questions done, 1 file could not be read: "
                                                         "notes.jpg")

    # Batches within the same second (two browser sessions share the service) each keep their own files.
    monkeypatch.setattr(surgvqa.serve.answer_service.time, "strftime", lambda *_: "20261201-000000")
    later = [service.predict_files([str(image)], service.questions[:1]) for image in images]
    assert len({csv_path, *(batch.csv for batch in later)}) == 3
    for image, batch in zip(images, later):
        assert [row["image"] for row in csv.DictReader(batch.csv.open())] == [image.name]
        assert json.loads(batch.jsonl.read_text())["image"] == image.name


def test_the_untrained_base_model_answers_beside_the_trained_one(small_run, small_run_command):
    config = load_config(None, small_run_command.overrides(small_run.parent))
    service = surgvqa.serve.answer_service.AnswerService(config, compare_base=True)
    assert service.model_loads == 2
    record = read_records(small_run / "prepared" / "test.jsonl")[0]
    image = surgvqa.serve.answer_service.read_image(small_run / "prepared" / record.image)
    answer = service.ask(image, [record.question], record.img_id)[0]
    assert answer.base_answer and answer.answer and answer.reference == record.answer
    assert answer.base_answer in record.candidates or record.multi_label
