"""Rows that failed to predict are never scored silently: `run` refuses to evaluate them past
predict.max_error_rate, and `evaluate` says so in its output, its Markdown and its report."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import load_config
from surgvqa.run import pipeline


def _write_predictions(path: Path, rows: int, errors: int) -> None:
    lines = []
    for index in range(rows):
        failed = index < errors
        lines.append({"id": f"r{index}", "img_id": "i", "question": "Is there text?", "question_type": "yes_no",
                      "template": 1, "answer": "yes", "prediction": None if failed else "yes",
                      "error": "ValueError: r0: cannot read image x.png" if failed else None})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_the_pipeline_stops_before_evaluating_predictions_with_errors(tmp_path, monkeypatch, capsys):
    import surgvqa.stages.predict

    out = tmp_path / "predictions.jsonl"
    monkeypatch.setattr(surgvqa.stages.predict, "run", lambda config, out, **_: _write_predictions(out, 10, 1))
    config = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(pipeline.GateFailed, match=r"1 of 10 predictions .* the predictions are not evaluated"):
        pipeline._predictions(config, out, "model", True, False)
    accepting = load_config(None, [f"output_dir={tmp_path}", "predict.max_error_rate=0.1"])
    pipeline._predictions(accepting, out, "model", True, False)
    assert "1 of 10 rows in error, within predict.max_error_rate" in capsys.readouterr().out


def test_evaluate_puts_a_banner_with_the_error_count_in_its_output_and_report(tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    _write_predictions(predictions, 30, 3)
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(predictions), "--out", str(tmp_path),
                                      "--set", f"output_dir={tmp_path}"])
    assert result.exit_code == 0, result.output
    banner = "3 of 30 predictions (10.0 %) are errors, scored as wrong"
    assert banner in " ".join(result.output.split())  # the terminal may wrap the line
    assert banner in (tmp_path / "report.html").read_text()
    assert 'id="error-banner"' in (tmp_path / "report.html").read_text()
    assert f"**Warning:** {banner}" in (tmp_path / "metrics.md").read_text()


def test_a_changed_key_discards_the_predictions_and_the_shards_of_an_interrupted_multi_process_run(
        tmp_path, monkeypatch):
    import surgvqa.stages.predict

    out = tmp_path / "predictions.jsonl"
    _write_predictions(out, 4, 0)
    _write_predictions(tmp_path / "predictions.rank1.jsonl", 4, 0)  # left by a killed 2-process run
    options = []
    monkeypatch.setattr(surgvqa.stages.predict, "run",
                        lambda config, out, **given: options.append(given) or _write_predictions(out, 10, 0))
    pipeline._predictions(load_config(None, [f"output_dir={tmp_path}"]), out, "model", True, resume=False)
    assert options[0]["restart"] and options[0]["replace_other"]

    monkeypatch.undo()
    surgvqa.stages.predict._check_made_with(out, {"mode": "constrained"}, restart=True, replace_other=True, rank=0, world=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.made_with.json"]  # nothing left to merge back


def test_evaluating_other_predictions_leaves_the_runs_own_metrics_and_report_alone(tmp_path):
    run = load_config(None, [f"output_dir={tmp_path}"]).run_dir
    run.mkdir(parents=True)
    _write_predictions(run / "predictions.jsonl", 20, 0)
    settings = ["--set", f"output_dir={tmp_path}"]
    assert CliRunner().invoke(app, ["evaluate", *settings]).exit_code == 0
    own = {name: (run / name).read_bytes() for name in ("metrics.json", "report.html")}

    untrained = run / "predictions.untrained.jsonl"
    _write_predictions(untrained, 20, 5)
    result = CliRunner().invoke(app, ["evaluate", "--predictions", str(untrained), *settings])
    assert result.exit_code == 0, result.output
    assert {name: (run / name).read_bytes() for name in own} == own
    scored = json.loads((run / "predictions.untrained.evaluation" / "metrics.json").read_text())
    assert scored["overall"]["n"] == 20
