"""Measure a tool's own command line from inside its training process, without changing what it does.

``run.py`` puts this folder on ``PYTHONPATH`` and sets ``PEER_PROBE_OUT``; Python imports ``sitecustomize`` at
start-up in every process of the command (``swift sft`` and ``trl sft`` start their trainer in a child process).
Every tool compared here trains through the Hugging Face ``Trainer`` loop, so when ``transformers.trainer`` is
first imported the probe wraps ``Trainer.get_batch_samples`` (where the loop takes each collated batch, labels
included) and adds a callback to every ``Trainer``. It records, per optimizer step, the wall-clock end time,
samples, non-padding tokens and supervised labels; the RSS when training begins; the process's peak RSS
(``ru_maxrss``) at exit. With ``PEER_PROBE_DUMP`` the first ``PEER_PROBE_DUMP_STEPS`` batches' input ids and
labels are written one sample per line, exactly as the tool's collator produced them.

Standard library at start-up (nothing is imported before the tool imports ``transformers`` itself), so start-up
times are the tool's own. A process that never builds a ``Trainer`` writes nothing.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import importlib.util
import json
import os
import resource
import sys
import time


def _current_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


class _Recorder:
    def __init__(self, out: str, dump: str | None, dump_steps: int):
        self.out = out
        self.dump_path = dump
        self.dump_steps = dump_steps
        self.dump = None
        self.steps: list[dict] = []
        self.pending: list[dict] = []
        self.batches_seen = 0
        self.fields: dict = {"process_start_unix": time.time(), "pid": os.getpid(), "argv": sys.argv}
        self.active = False

    def batch(self, batch: dict) -> None:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        self.pending.append({"samples": int(ids.shape[0]),
                             "tokens": int(mask.sum()) if mask is not None else int(ids.numel()),
                             "supervised": int((labels != -100).sum()) if labels is not None else 0,
                             "width": int(ids.shape[1])})
        if self.dump_path and self.batches_seen < self.dump_steps:
            if self.dump is None:
                self.dump = open(self.dump_path, "w", encoding="utf-8")  # noqa: SIM115 - closed at exit
            for row in range(ids.shape[0]):
                keep = mask[row].bool() if mask is not None else slice(None)
                self.dump.write(json.dumps({
                    "batch": self.batches_seen,
                    "input_ids": ids[row][keep].tolist(),
                    "labels": labels[row][keep].tolist() if labels is not None else None,
                }) + "\n")
        self.batches_seen += 1

    def step_end(self) -> None:
        row = {"end_unix": time.time(), "samples": 0, "tokens": 0, "supervised": 0, "width": 0}
        for batch in self.pending:
            for key in ("samples", "tokens", "supervised"):
                row[key] += batch[key]
            row["width"] = max(row["width"], batch["width"])
        self.pending = []
        self.steps.append(row)

    def write(self) -> None:
        if not self.active:
            return
        if self.dump is not None:
            self.dump.close()
        payload = {**self.fields, "steps": self.steps, "batches_seen": self.batches_seen,
                   "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                   "exit_unix": time.time()}
        with open(self.out, "w", encoding="utf-8") as handle:
            json.dump(payload, handle)


def _patch(trainer_module, recorder: _Recorder) -> None:
    import torch
    from transformers.trainer_callback import TrainerCallback

    trainer_class = trainer_module.Trainer

    class ProbeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, **_):
            recorder.active = True
            recorder.fields.update(train_begin_unix=time.time(), rss_before_train_mb=_current_rss_mb(),
                                   torch_threads=torch.get_num_threads(),
                                   transformers=sys.modules["transformers"].__version__)

        def on_step_end(self, args, state, control, **_):
            recorder.step_end()

        def on_train_end(self, args, state, control, **_):
            recorder.fields.update(train_end_unix=time.time(), rss_after_train_mb=_current_rss_mb())

    original_init = trainer_class.__init__
    original_get_batch_samples = trainer_class.get_batch_samples

    # functools.wraps keeps the signatures visible: ms-swift inspects Trainer.__init__'s parameters
    @functools.wraps(original_init)
    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(ProbeCallback())

    @functools.wraps(original_get_batch_samples)
    def get_batch_samples(self, *args, **kwargs):
        # Only the training loop takes batches this way (evaluation has its own loop); the model may still be in
        # eval mode here for the first batch, so its mode says nothing.
        batches, items = original_get_batch_samples(self, *args, **kwargs)
        for batch in batches:
            recorder.batch(batch)
        return batches, items

    trainer_class.__init__ = __init__
    trainer_class.get_batch_samples = get_batch_samples


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Lets ``transformers.trainer`` load normally, then wraps its ``Trainer`` before anyone uses it."""

    def __init__(self, recorder: _Recorder):
        self.recorder = recorder

    def find_spec(self, name, path=None, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)  # once: the real finders locate the module
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        recorder = self.recorder

        def exec_and_patch(module):
            exec_module(module)
            _patch(module, recorder)

        spec.loader.exec_module = exec_and_patch
        return spec


if os.environ.get("PEER_PROBE_OUT"):
    _recorder = _Recorder(f"{os.environ['PEER_PROBE_OUT']}.{os.getpid()}.json", os.environ.get("PEER_PROBE_DUMP"),
                          int(os.environ.get("PEER_PROBE_DUMP_STEPS", "0")))
    sys.meta_path.insert(0, _PatchOnImport(_recorder))
    atexit.register(_recorder.write)
