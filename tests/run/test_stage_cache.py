"""`surgvqa run`'s stage skipping: a stage is reused only while its key, its output and the outputs it read are
unchanged; the key holds the image folders prepare reads and leaves out the settings that cannot change a result.
The stages are cheap stand-ins writing small files, so every test runs in well under a second."""

import json
import os

import pytest

from surgvqa.core.config import load_config
from surgvqa.run import pipeline
from surgvqa.run.pipeline import STAGE_NAMES, run_pipeline, stage_keys

OUTPUT = {stage.name: stage.output for stage in pipeline.STAGES}


class StandIns:
    """Every stage replaced by a function that writes its output (a little longer each time, so that a rewrite is
    seen even where modification times are coarse); baseline and predict keep the pipeline's own prediction step
    with ``stages.predict.run`` replaced, so that their acceptance check is the real one."""

    def __init__(self, monkeypatch):
        import surgvqa.stages.predict

        self.calls: list[tuple[str, bool]] = []
        self.predict_calls: list[dict] = []
        self.rows_in_error = 0
        self.writes = 0
        for name in ("prepare", "diagnose", "overfit", "train", "evaluate"):
            monkeypatch.setitem(pipeline.RUNNERS, name, self._writer(name))
        monkeypatch.setitem(pipeline.RUNNERS, "baseline", self._predictor("baseline", "untrained"))
        monkeypatch.setitem(pipeline.RUNNERS, "predict", self._predictor("predict", "model"))
        monkeypatch.setattr(surgvqa.stages.predict, "run", self._run_predict)

    def _content(self, name: str) -> str:
        self.writes += 1
        return json.dumps({"made_by": name, "padding": "x" * self.writes})

    def _writer(self, name):
        def run(config, quiet, resume):
            self.calls.append((name, resume))
            target = config.run_dir / OUTPUT[name]
            if name == "train":
                target.mkdir(parents=True, exist_ok=True)
                (target / "adapter_model.safetensors").write_text(self._content(name))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(self._content(name))
        return run

    def _predictor(self, name, model_path):
        def run(config, quiet, resume):
            self.calls.append((name, resume))
            pipeline._predictions(config, config.run_dir / OUTPUT[name], model_path, quiet, resume)
        return run

    def _run_predict(self, config, out, model_path, quiet, restart, replace_other):
        self.predict_calls.append({"out": out.name, "restart": restart})
        rows = [{"id": f"r{index}", "prediction": None if index < self.rows_in_error else "yes",
                 "error": "ValueError: cannot read image" if index < self.rows_in_error else None,
                 "note": self._content("row")} for index in range(10)]
        out.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return out

    def ran(self) -> list[str]:
        names = [name for name, _ in self.calls]
        self.calls.clear()
        return names


@pytest.fixture
def stand_ins(monkeypatch):
    return StandIns(monkeypatch)


def _config(tmp_path, *overrides):
    return load_config(None, [f"output_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}", *overrides])


# -- 1. an output replaced by a manual command ------------------------------------------------------------------


def test_a_model_replaced_by_a_manual_train_reruns_train_and_the_stages_that_read_it(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    assert stand_ins.ran() == list(STAGE_NAMES)
    assert run_pipeline(config, quiet=True).ran == []

    # `surgvqa train --set train.max_steps=12` with the same run_name: model/ holds another model
    (config.run_dir / "model" / "adapter_model.safetensors").write_text("a model trained for 12 steps")
    outcome = run_pipeline(config, quiet=True)
    assert outcome.ran == ["train", "predict", "evaluate"]  # baseline reads the untrained model only
    assert stand_ins.predict_calls[-1] == {"out": "predictions.jsonl", "restart": True}
    assert run_pipeline(config, quiet=True).ran == []


def test_outputs_written_again_with_the_same_content_keep_the_chain_current(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    # A manual `surgvqa prepare` (or a SLURM chain's diagnose job) with the same config writes the same summary,
    # later; a manual predict with nothing left to do rewrites the same rows. Neither may cost a new training.
    for name in ("prepare", "predict"):
        output = config.run_dir / OUTPUT[name]
        content = output.read_bytes()
        output.unlink()
        output.write_bytes(content)
        os.utime(output, ns=(output.stat().st_atime_ns, output.stat().st_mtime_ns + 10**9))
    assert run_pipeline(config, quiet=True).ran == []


def test_a_source_under_the_home_folder_is_fingerprinted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    source, _ = _image_dataset(tmp_path / "kvasir", ".jsonl")
    config = load_config(None, ["data.source=~/kvasir/" + source.name, "data.image_root=/nonexistent"])
    first = stage_keys(config)["prepare"]
    source.write_text(source.read_text() + source.read_text())
    assert stage_keys(config)["prepare"] != first


def test_metrics_rewritten_by_a_manual_evaluate_are_made_again(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    (config.run_dir / "metrics.json").write_text('{"from": "evaluate --set evaluate.count_tolerance=0"}')
    assert run_pipeline(config, quiet=True).ran == ["evaluate"]
    assert "count_tolerance=0" not in (config.run_dir / "metrics.json").read_text()


def test_a_stage_rerun_in_an_earlier_run_invalidates_the_stages_after_it_that_did_not_run(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    # a manual `surgvqa predict` replaces the predictions; the run that redoes them stops at their check ...
    (config.run_dir / "predictions.jsonl").write_text("")
    stand_ins.rows_in_error = 3
    with pytest.raises(pipeline.GateFailed, match="3 of 10 predictions"):
        run_pipeline(config, quiet=True)
    # ... so evaluate, recorded as done under the same key, was made from the predictions before
    accepting = _config(tmp_path, "predict.max_error_rate=0.5")
    assert run_pipeline(accepting, quiet=True).ran == ["evaluate"]


def test_a_ledger_written_before_fingerprints_keeps_its_stages_and_gains_fingerprints(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    stand_ins.ran()
    ledger = config.run_dir / "stages.json"
    previous = pipeline.previous_version_keys(config)
    # the previous version's entries: whole sections in the keys, no version, no fingerprints
    entries = {name: {"key": previous[name], "status": "done", "seconds": 1.0} for name in STAGE_NAMES}
    entries["train"] = {"key": previous["train"], "status": "running"}  # killed while training
    ledger.write_text(json.dumps(entries))

    outcome = run_pipeline(config, quiet=True)
    assert outcome.ran == ["train", "predict", "evaluate"]
    assert ("train", True) in stand_ins.calls  # continued from its checkpoints, not started afresh
    written = json.loads(ledger.read_text())
    keys = stage_keys(config)
    assert all(written[name]["key"] == keys[name] and written[name]["output"] for name in STAGE_NAMES)
    assert written["baseline"]["inputs"] == {"prepare": written["prepare"]["output"]}
    assert run_pipeline(config, quiet=True).ran == []


# -- 2. the images a JSONL or CSV source names ------------------------------------------------------------------


def _image_dataset(folder, suffix):
    images = folder / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (images / name).write_bytes(b"\x89PNG " + name.encode())
    source = folder / f"vqa{suffix}"
    if suffix == ".csv":
        source.write_text("image,question,answer\nimages/a.png,Is there a polyp?,yes\n")
    else:
        source.write_text(json.dumps({"image": "images/a.png", "question": "Is there a polyp?", "answer": "yes"})
                          + "\n")
    return source, images


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_changed_image_of_a_jsonl_or_csv_source_reruns_prepare(tmp_path, suffix):
    source, images = _image_dataset(tmp_path / "data", suffix)
    # the run directory and the cache inside the dataset folder: their files are not the dataset's
    config = load_config(None, [f"data.source={source}", f"output_dir={tmp_path / 'data' / 'runs'}",
                                f"cache_dir={tmp_path / 'data' / 'cache'}"])
    first = stage_keys(config)["prepare"]
    (tmp_path / "data" / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "runs" / "demo" / "stages.json").write_text("{}")
    (tmp_path / "data" / "cache").mkdir()
    (tmp_path / "data" / "cache" / "tiny.bin").write_text("cached")
    assert stage_keys(config)["prepare"] == first

    image = images / "a.png"
    image.write_bytes(b"\x89PNG another image")
    rewritten = stage_keys(config)["prepare"]
    assert rewritten != first
    status = image.stat()  # the same size, rewritten later: a new modification time is enough
    os.utime(image, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))
    assert stage_keys(config)["prepare"] != rewritten
    touched = stage_keys(config)["prepare"]
    (images / "c.png").write_bytes(b"\x89PNG c")
    assert stage_keys(config)["prepare"] != touched


def test_images_under_data_image_root_and_data_images_are_in_prepares_key(tmp_path):
    source, images = _image_dataset(tmp_path / "rows", ".jsonl")
    moved = tmp_path / "elsewhere" / "images"
    moved.parent.mkdir()
    images.rename(moved)
    rooted = load_config(None, [f"data.source={source}", f"data.image_root={moved.parent}",
                                f"output_dir={tmp_path / 'runs'}"])
    before = stage_keys(rooted)["prepare"]
    (moved / "b.png").write_bytes(b"\x89PNG a new b")
    assert stage_keys(rooted)["prepare"] != before

    # x1: rows without images, joined by img_id to the files of data.images; the parquet itself as before
    rows = tmp_path / "x1.parquet"
    rows.write_bytes(b"PAR1 rows PAR1")
    x1 = load_config(None, ["task=kvasir-vqa-x1", f"data.source={rows}", f"data.images={moved}",
                            f"output_dir={tmp_path / 'runs'}"])
    before = stage_keys(x1)["prepare"]
    (moved / "a.png").write_bytes(b"\x89PNG a new a, longer")
    assert stage_keys(x1)["prepare"] != before


def test_sources_with_embedded_images_keep_the_keys_they_had(tmp_path):
    parquet = tmp_path / "kvasir.parquet"
    parquet.write_bytes(b"PAR1 rows PAR1")
    (tmp_path / "unrelated.png").write_bytes(b"not read: parquet rows embed their images")
    for config in (_config(tmp_path), _config(tmp_path, f"data.source={parquet}")):
        assert stage_keys(config)["prepare"] == pipeline.previous_version_keys(config)["prepare"]
        before = stage_keys(config)["prepare"]
        (tmp_path / "unrelated.png").write_bytes(b"changed")
        assert stage_keys(config)["prepare"] == before


# -- 3. settings that cannot change a result ------------------------------------------------------------------


BOOKKEEPING = ["train.save_steps=7", "train.logging_steps=3", "train.save_total_limit=9", "train.num_workers=2",
               "predict.max_error_rate=0.5", "model.gradient_checkpointing=true"]


@pytest.mark.parametrize("override", BOOKKEEPING)
def test_bookkeeping_settings_leave_every_stage_key_as_it_was(override):
    assert stage_keys(load_config(None, [override])) == stage_keys(load_config())


@pytest.mark.parametrize("override", ["train.per_device_batch_size=2", "train.grad_accum=3", "train.epochs=3",
                                      "train.max_steps=40", "train.group_by_length=true"])
def test_training_length_and_batches_change_train_and_after_but_not_the_overfit_gate(override):
    # the gate trains for sanity.max_steps at sanity.batch_size, without accumulation
    base, changed = stage_keys(load_config()), stage_keys(load_config(None, [override]))
    assert [name for name in STAGE_NAMES if changed[name] != base[name]] == ["train", "predict", "evaluate"]


@pytest.mark.parametrize("override", ["train.seed=1", "train.lr=1e-3", "train.warmup_ratio=0.1",
                                      "train.vision_lr=1e-5"])
def test_optimiser_settings_the_gate_shares_change_the_overfit_key_too(override):
    base, changed = stage_keys(load_config()), stage_keys(load_config(None, [override]))
    assert [name for name in STAGE_NAMES if changed[name] != base[name]] == ["overfit", "train", "predict",
                                                                              "evaluate"]


@pytest.mark.parametrize("override", ["sanity.max_steps=5", "sanity.batch_size=2", "sanity.lr=1e-3",
                                      "predict.max_new_tokens_open=8", "predict.group_by_image=false"])
def test_settings_the_overfit_gate_reads_change_its_key(override):
    assert stage_keys(load_config(None, [override]))["overfit"] != stage_keys(load_config())["overfit"]


def test_a_ledger_of_the_previous_version_keeps_its_overfit_gate(tmp_path, stand_ins):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    stand_ins.ran()
    ledger = config.run_dir / "stages.json"
    previous = pipeline.previous_version_keys(config, 2)
    assert previous["overfit"] != stage_keys(config)["overfit"]  # all of train and predict were in its key
    entries = json.loads(ledger.read_text())
    ledger.write_text(json.dumps({name: {**entry, "key": previous[name], "version": 2}
                                  for name, entry in entries.items()}))

    assert run_pipeline(config, quiet=True).ran == []
    assert json.loads(ledger.read_text())["overfit"]["key"] == stage_keys(config)["overfit"]
    longer = _config(tmp_path, "train.epochs=2")
    assert run_pipeline(longer, quiet=True).ran == ["train", "predict", "evaluate"]


def test_predict_batch_size_stays_in_the_prediction_keys():
    base, changed = stage_keys(load_config()), stage_keys(load_config(None, ["predict.batch_size=3"]))
    assert [name for name in STAGE_NAMES if changed[name] != base[name]] == ["overfit", "baseline", "predict",
                                                                              "evaluate"]


def test_lowering_save_steps_after_a_kill_continues_training_from_its_checkpoints(tmp_path, stand_ins,
                                                                                 monkeypatch):
    config = _config(tmp_path)
    run_pipeline(config, quiet=True)
    stand_ins.ran()

    def killed(config, quiet, resume):
        (config.run_dir / "checkpoints" / "checkpoint-200").mkdir(parents=True)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setitem(pipeline.RUNNERS, "train", killed)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(config, from_stage="train", quiet=True)

    run_pipeline(_config(tmp_path, "train.save_steps=20", "train.logging_steps=5"), quiet=True)
    assert ("train", True) in stand_ins.calls
    assert (config.run_dir / "checkpoints" / "checkpoint-200").is_dir()


def test_a_raised_max_error_rate_lets_a_stopped_chain_evaluate_without_predicting_again(tmp_path, stand_ins):
    stand_ins.rows_in_error = 2
    config = _config(tmp_path)
    with pytest.raises(pipeline.GateFailed, match=r"2 of 10 predictions .* not evaluated"):
        run_pipeline(config, quiet=True)
    assert stand_ins.ran() == ["prepare", "diagnose", "overfit", "train", "baseline"]

    outcome = run_pipeline(_config(tmp_path, "predict.max_error_rate=0.2"), quiet=True)
    assert outcome.ran == ["predict", "evaluate"]  # baseline's predictions accepted as they are
    assert [call["out"] for call in stand_ins.predict_calls] == ["predictions.untrained.jsonl", "predictions.jsonl"]

    # lowered again: the check runs on the skipped stage too, and the rerun retries the rows in error only
    stand_ins.predict_calls.clear()
    with pytest.raises(pipeline.GateFailed, match="2 of 10 predictions"):
        run_pipeline(config, quiet=True)
    assert stand_ins.predict_calls == [{"out": "predictions.untrained.jsonl", "restart": False}]
