"""End to end: `surgvqa run` on the embedded default config, then a rerun that skips every stage."""

import json

import pytest
from typer.testing import CliRunner

from surgvqa.cli import app
from surgvqa.core.config import load_config
from surgvqa.run.pipeline import STAGE_NAMES, stage_keys

# The demo's chain with a shorter gate and training (3 minutes on 2 quiet cores, the full demo 8): every stage
# runs, the gate still has to pass, and training still has to beat the untrained model (+16 points on closed
# questions, 95 % interval [10, 22], against the full demo's +25).
pytestmark = pytest.mark.timeout(1800)
SHORTER = ["sanity.samples=16", "sanity.max_steps=150", "sanity.check_every=50", "train.epochs=3"]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, session_cache):
    overrides = [f"output_dir={tmp_path_factory.mktemp('pipeline')}", f"cache_dir={session_cache}", *SHORTER]
    args = [item for override in overrides for item in ("--set", override)]
    result = CliRunner().invoke(app, ["run", *args])
    return overrides, args, result


def test_run_completes_and_prints_the_table_and_report(demo_run):
    overrides, _, result = demo_run
    assert result.exit_code == 0, result.output[-3000:]
    run_dir = load_config(None, overrides).run_dir
    for name in ("prepared/train.jsonl", "diagnose.json", "sanity.json", "model", "predictions.untrained.jsonl",
                 "predictions.jsonl", "metrics.json", "report.html", "config.resolved.yaml"):
        assert (run_dir / name).exists(), name
    assert "Accuracy per question type" in result.output
    assert f"report: {(run_dir / 'report.html').resolve()}" in result.output
    ledger = json.loads((run_dir / "stages.json").read_text())
    assert list(ledger) == list(STAGE_NAMES)
    assert all(entry["status"] == "done" for entry in ledger.values())
    sanity = json.loads((run_dir / "sanity.json").read_text())
    assert sanity["passed"] and sanity["final_loss"] < sanity["loss_threshold"]
    # The gate ended at its last check, the first that passed (the answers were checked every 50 steps on the way).
    assert sanity["steps"] in (50, 100, 150) and sanity["checks"][-1] == [sanity["steps"], sanity["match"]]
    assert all(match < sanity["min_match"] for _, match in sanity["checks"][:-1])
    # Every test record predicted once, in order, by both models; the metrics count exactly those rows.
    test_ids = [json.loads(line)["id"] for line in (run_dir / "prepared/test.jsonl").read_text().splitlines()]
    for name in ("predictions.jsonl", "predictions.untrained.jsonl"):
        rows = [json.loads(line) for line in (run_dir / name).read_text().splitlines()]
        assert [row["id"] for row in rows] == test_ids and not any(row["error"] for row in rows), name
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["overall"]["n"] == len(test_ids)
    assert "<h2>Per question type</h2>" in (run_dir / "report.html").read_text(encoding="utf-8")


def test_training_beats_the_untrained_model_on_closed_questions(demo_run):
    overrides, _, result = demo_run
    assert result.exit_code == 0, result.output[-3000:]
    metrics = json.loads((load_config(None, overrides).run_dir / "metrics.json").read_text())
    closed = metrics["baseline"]["per_type"]["closed_all"]
    assert closed["run_strict"] > closed["baseline_strict"]
    assert closed["delta_strict_ci"][0] > 0, "the 95% interval of the improvement must exclude zero"


def test_second_run_skips_every_stage_and_a_change_reruns_only_what_depends_on_it(demo_run):
    _, args, first = demo_run
    assert first.exit_code == 0, first.output[-3000:]
    runner = CliRunner()
    again = runner.invoke(app, ["run", *args])
    assert again.exit_code == 0, again.output[-3000:]
    for name in STAGE_NAMES:
        assert f"{name}: up to date, skipped" in again.output
    assert "stages run: none" in again.output

    changed = runner.invoke(app, ["run", *args, "--set", "evaluate.count_tolerance=2"])
    assert changed.exit_code == 0, changed.output[-3000:]
    assert "stages run: evaluate;" in changed.output


def test_stage_keys_follow_their_inputs():
    base = stage_keys(load_config())
    lr = stage_keys(load_config(None, ["train.lr=1e-4"]))
    assert lr["prepare"] == base["prepare"] and lr["baseline"] == base["baseline"]
    assert lr["train"] != base["train"] and lr["predict"] != base["predict"] and lr["evaluate"] != base["evaluate"]
    data = stage_keys(load_config(None, ["data.synthetic.images=50"]))
    assert all(data[name] != base[name] for name in STAGE_NAMES)
    # prepare measures samples in tokens against masking.max_length with the model's pixel budget
    for override in ("masking.max_length=300", "model.max_pixels=6272"):
        assert stage_keys(load_config(None, [override]))["prepare"] != base["prepare"], override
    assert stage_keys(load_config(None, ["model.freeze_vision=true"]))["prepare"] == base["prepare"]


def test_unknown_from_stage_is_a_one_line_error():
    result = CliRunner().invoke(app, ["run", "--from", "tarin"])
    assert result.exit_code == 2
    assert "choose one of prepare, diagnose" in result.output
