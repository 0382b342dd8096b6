"""Results that say what they mean (issue 28): collapsed predictions are named, a task's own headline leads, the
report names the model, date, commit and the prompt actually used."""

import html
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import PromptConfig
from surgvqa.evaluation.collapse import collapsed_types
from surgvqa.evaluation.scoring import PredictionRow
from surgvqa.stages.evaluate import code_commit
from surgvqa.tasks import get_task

X1_ANSWERS = ["Two polyps are visible.", "No text is visible.", "A tube can be seen in the lower left.",
              "The mucosa looks normal.", "One red polyp of 5-10 mm."]


def _x1_file(path: Path, prediction) -> Path:
    rows = [{"id": f"x{i}", "img_id": f"img{i % 7}", "question": f"Describe finding {i}.", "question_type": "open_ended",
             "template": None, "answer": X1_ANSWERS[i % len(X1_ANSWERS)], "prediction": prediction(i),
             "raw_text": prediction(i), "error": None, "task": "kvasir-vqa-x1",
             "meta": {"complexity": 1 + i % 3, "question_class": ["polyp count"], "original": json.dumps([{"q": "How many polyps are in the image?", "a": "2"}])}}
            for i in range(69)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _kvasir_file(path: Path) -> Path:
    rows = [{"id": f"k{i}", "question": "Is there text?", "question_type": "yes_no", "template": 1,
             "answer": "yes" if i % 2 else "no", "prediction": "yes" if i % 3 else "no", "error": None}
            for i in range(30)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _evaluate(tmp_path: Path, predictions: Path, *settings: str) -> tuple[str, str, dict]:
    out = tmp_path / "evaluation"
    args = ["evaluate", "--predictions", str(predictions), "--out", str(out), "--set", f"output_dir={tmp_path}",
            "--set", "evaluate.bootstrap_samples=50"]
    for setting in settings:
        args += ["--set", setting]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return " ".join(result.output.split()), (out / "report.html").read_text(encoding="utf-8"), metrics


def test_a_collapsed_x1_run_is_named_and_led_by_its_own_metrics(tmp_path):
    predictions = _x1_file(tmp_path / "collapsed.jsonl", lambda i: ".")
    printed, page, metrics = _evaluate(tmp_path, predictions, "task=kvasir-vqa-x1")

    assert metrics["collapse"] == [{"question_type": "open_ended", "n": 69, "answer": ".", "count": 69,
                                    "share": 1.0, "distinct_references": 5, "top_reference_share": 14 / 69}]
    warning = ("Predictions collapsed to one answer: open_ended: '.' is 69 of 69 predictions (100 %) while the "
               "references hold 5 distinct answers.")
    assert warning in printed
    assert re.search(r'<div class="banner" id="collapse-warning" role="alert">Predictions collapsed to one answer: '
                     r"open_ended: &#x27;\.&#x27; is 69 of 69 predictions \(100 %\)", page)

    # x1's own numbers lead, on the terminal and in the cards; Kvasir-VQA's accuracies do not.
    assert "atomic-fact recall" in printed and "ROUGE-L" in printed and "exact match" in printed
    assert "Accuracy per question type" not in printed and "micro average" not in printed
    assert "atomic-fact recall │ 0.0 │" in printed
    cards = page.split('id="summary"')[1].split("</div></div>")[0]
    assert [label for label in ("atomic-fact recall", "ROUGE-L", "exact match", "micro strict", "closed types strict")
            if f"<span>{label}</span>" in cards] == ["atomic-fact recall", "ROUGE-L", "exact match"]

    assert "<h2>Per question type</h2>" not in page and "<h2>Kvasir-VQA-x1: overall (%)</h2>" in page
    missed = page.split("<h2>Missed facts (a sample per atom type)</h2>")[1].split("</table>")[0]
    assert '<td class="l">Describe finding' in missed and '<td class="">Describe' not in missed  # text left-aligned
    # The prompt x1 actually asked with: its own system prompt (prompt.system unset) and the configured template.
    x1 = get_task("kvasir-vqa-x1")
    assert metrics["run"]["prompt"] == {"system": x1.system_text(PromptConfig()),
                                        "user_template": x1.user_template(PromptConfig())}
    kvasir_system = get_task("kvasir-vqa").system_text(PromptConfig())
    assert x1.system_text(PromptConfig()) != kvasir_system
    assert f'<pre id="prompt-system">{html.escape(x1.system_text(PromptConfig()))}</pre>' in page
    assert html.escape(kvasir_system) not in page


def test_a_healthy_file_gets_no_warning_and_kvasir_keeps_its_cards(tmp_path):
    printed, page, metrics = _evaluate(tmp_path, _kvasir_file(tmp_path / "healthy.jsonl"))
    assert metrics["collapse"] == []
    assert "collapsed" not in printed and "collapse-warning" not in page
    assert "micro average" in printed and "<span>closed types strict</span>" in page
    assert "<h2>Per question type</h2>" in page
    assert re.search(r'<div class="meta">k\d+ · healthy.jsonl:\d+</div>', page)  # a failure case: its id and line
    assert "headline" not in metrics


def test_an_unset_prompt_is_shown_as_the_task_asked_and_a_set_one_as_set(tmp_path):
    _, page, metrics = _evaluate(tmp_path, _kvasir_file(tmp_path / "a.jsonl"), "prompt.user_template='Q: {question}'")
    kvasir = get_task("kvasir-vqa")
    assert metrics["run"]["prompt"] == {"system": kvasir.system_text(PromptConfig()), "user_template": "Q: {question}"}
    assert '<pre id="prompt-user-template">Q: {question}</pre>' in page


def test_the_report_names_model_date_and_commit(tmp_path):
    _, page, metrics = _evaluate(tmp_path, _kvasir_file(tmp_path / "a.jsonl"), "model.name_or_path=my/base-model")
    commit = code_commit()
    assert commit and metrics["run"]["commit"] == commit and metrics["run"]["model"] == "my/base-model"
    line = re.search(r'<p class="meta" id="run-line">(.*?)</p>', page).group(1)
    assert "model: my/base-model" in line and f"commit: {html.escape(commit)}" in line
    assert re.search(r"evaluated: \d{4}-\d\d-\d\d \d\d:\d\d UTC", line)
    # The text metrics are NLTK's METEOR; METEOR 1.5 is named only where its jar ran.
    paragraph = page.split("<h2>Text metrics</h2>")[1].split("</p>")[0]
    assert "NLTK" in paragraph and ("METEOR 1.5" in paragraph) == (
        not isinstance(metrics["text_metrics"].get("meteor_1_5"), dict)
        and metrics["text_metrics"].get("meteor_1_5") is not None)


def _rows(predictions, references):
    return [PredictionRow(id=str(i), question_type="yes_no", reference=r, prediction=p)
            for i, (p, r) in enumerate(zip(predictions, references))]


@pytest.mark.parametrize(("predictions", "references", "collapsed"), [
    (["no"] * 8 + ["yes"] * 2, ["yes", "no"] * 5, True),  # 80 % one answer, references half and half
    (["no"] * 7 + ["yes"] * 3, ["yes", "no"] * 5, False),  # 70 %: a lean, not a collapse
    (["no"] * 9, ["yes", "no", "no"] * 3, False),  # 9 rows: too few to say
    (["no"] * 10, ["no"] * 8 + ["yes"] * 2, False),  # the references are 80 % "no" themselves
    (["no"] * 10, ["no"] * 10, False),  # one reference answer: nothing to vary
    (["No."] * 5 + ["no"] * 5, ["yes", "no"] * 5, True),  # compared normalised
])
def test_collapse_definition(predictions, references, collapsed):
    assert bool(collapsed_types(_rows(predictions, references))) == collapsed
