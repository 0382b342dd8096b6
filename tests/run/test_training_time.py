"""The training-time estimate that `surgvqa slurm` prints and writes into the training script, and doctor checks
against slurm.time: steps x questions per step x tokens per question / tokens per second, grouping sharing the
image's prefix among its questions."""

import json
import math
import shutil
from collections import Counter

import pytest

from surgvqa.core.config import load_config
from surgvqa.data.records import read_records
from surgvqa.run import doctor, slurm
from surgvqa.run.slurm import render_slurm

RATE = 100.0  # tokens/s written into the overfit gate's log


@pytest.fixture
def measured_run(tmp_path, prepared_demo):
    """Settings of a run whose split is prepared and whose overfit gate logged RATE tokens/s (after a slower
    first window, which holds the start-up and is left out)."""

    def settings(*extra: str) -> list[str]:
        return [f"output_dir={tmp_path}", "run_name=timed", "train.per_device_batch_size=4", "train.grad_accum=4",
                "train.epochs=2", *extra]

    run_dir = load_config(None, settings()).run_dir
    shutil.copytree(prepared_demo, run_dir / "prepared")
    rows = [{"step": 1, "loss": 9.0, "tokens_per_s": 10.0}, {"step": 2, "loss": 8.0, "tokens_per_s": RATE},
            {"step": 3, "loss": 7.0, "tokens_per_s": RATE}]
    (run_dir / "sanity_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return settings


def test_grouping_divides_each_questions_cost_by_the_shared_prefix(measured_run, prepared_demo):
    counts = Counter(record.img_id for record in read_records(prepared_demo / "train.jsonl"))
    questions, images = sum(counts.values()), len(counts)
    separate = doctor.estimate_training_time(load_config(None, measured_run()))
    grouped = doctor.estimate_training_time(load_config(None, measured_run("train.group_by_image=true")))
    alone = 16 + doctor.TEXT_TOKENS_PER_SAMPLE  # the demo's max_pixels give 16 image tokens
    assert separate.tokens_per_s == grouped.tokens_per_s == RATE and "sanity_log.jsonl" in separate.rate_source
    assert separate.tokens_per_question == alone and separate.questions_per_step == 16
    assert separate.steps == math.ceil(2 * questions / 16)
    assert separate.seconds == pytest.approx(separate.steps * 16 * alone / RATE)
    # Every demo image fits one row (at most 10 questions of 40 tokens beside a 40-token prefix in 512): its
    # prefix runs once for all its questions.
    prefix = alone - doctor.SEGMENT_TOKENS_PER_QUESTION
    assert grouped.questions_per_image == pytest.approx(questions / images)
    assert grouped.tokens_per_question == pytest.approx(images * prefix / questions + doctor.SEGMENT_TOKENS_PER_QUESTION)
    assert grouped.seconds == pytest.approx(grouped.steps * grouped.questions_per_step * grouped.tokens_per_question
                                            / RATE)
    # An optimizer step holds about as many questions (whole images), so about as many steps run, each cheaper.
    assert grouped.steps == pytest.approx(separate.steps, rel=0.25)
    assert grouped.seconds < 0.7 * separate.seconds


def test_more_processes_share_the_steps(measured_run):
    one = doctor.estimate_training_time(load_config(None, measured_run()))
    four = doctor.estimate_training_time(load_config(None, measured_run("slurm.nodes=2", "slurm.gpus=2")))
    assert four.processes == 4 and four.questions_per_step == 4 * one.questions_per_step
    assert four.seconds == pytest.approx(one.seconds / 4, rel=0.05)  # the steps round up


def test_a_shorter_slurm_time_is_a_warning_with_the_limit_to_set(measured_run):
    config = load_config(None, measured_run())
    estimate = doctor.estimate_training_time(config).seconds
    assert 600 < estimate < 3600  # the limits below are chosen around it
    status, detail, fix = doctor.training_time_check(load_config(None, measured_run("slurm.time='02:00:00'")))
    assert status == "ok" and "within slurm.time 02:00:00" in detail and not fix
    short = doctor.slurm_time_seconds("00:10:00")
    status, detail, fix = doctor.training_time_check(load_config(None, measured_run("slurm.time='00:10:00'")))
    assert status == "warn"
    runs = math.ceil(estimate / (short - doctor.SAVE_LEAD_SECONDS))
    assert f"requeues itself about {runs - 1} time(s)" in detail
    assert f"slurm.time='{doctor.clock(estimate * doctor.TIME_MARGIN + doctor.SAVE_LEAD_SECONDS)}'" in fix


def test_no_prepared_split_means_no_estimate_yet(tmp_path):
    config = load_config(None, [f"output_dir={tmp_path}"])
    assert doctor.estimate_training_time(config) is None
    status, detail, _ = doctor.training_time_check(config)
    assert status == "ok" and detail.startswith("no prepared data yet")


@pytest.mark.parametrize(("limit", "seconds"), [
    ("30", 1800), ("30:15", 1815), ("48:00:00", 172800), ("2-0", 172800), ("1-12:30", 131400),
    ("1-00:00:05", 86405), ("UNLIMITED", math.inf), ("infinite", math.inf)])
def test_slurm_time_limits_in_every_spelling_sbatch_accepts(limit, seconds):
    assert doctor.slurm_time_seconds(limit) == seconds


def test_clock_writes_a_limit_sbatch_reads_back():
    for seconds in (59, 3600, 86399, 90061):
        assert doctor.slurm_time_seconds(doctor.clock(seconds)) == seconds


def test_the_lead_the_estimate_counts_is_the_scripts_signal_lead():
    assert doctor.SAVE_LEAD_SECONDS == slurm.USR1_LEAD_SECONDS


def test_surgvqa_slurm_prints_the_estimate_and_writes_it_into_the_training_script(
        measured_run, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    overrides = measured_run("train.group_by_image=true", "slurm.time='00:10:00'")
    scripts = {path.name: path for path in render_slurm(load_config(None, overrides), None, overrides)}
    printed = capsys.readouterr().err
    assert printed.startswith("training time: training about ") and "grouped by image" in printed
    assert "requeues itself" in printed and "-> set slurm.time=" in printed
    script = scripts["03_train.sbatch"].read_text()
    header = script[:script.index("#SBATCH")]
    assert "# Time estimate (surgvqa doctor, when rendered):" in header
    assert " ".join(line.removeprefix("#   ") for line in header.splitlines() if line.startswith("#   ")) == \
        printed.removeprefix("training time: ").strip()
