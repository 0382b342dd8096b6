"""``surgvqa app``: the local web page (gradio) where one asks a trained model about an endoscopy image.

Gradio, the convention of this field, draws the page; it is an optional extra (``pip install -e '.[app]'``).
Everything the app writes (uploads, batch results) stays under ``<run>/app/``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import sys
from typing import Any

from PIL import Image

from surgvqa.core.config import Config
from surgvqa.core.formatting import NOT_AVAILABLE, percent
from surgvqa.serve.answer_service import Answer, AnswerService, BatchResult, NotAnImage, read_image

log = logging.getLogger(__name__)

# Uploads older than a day are deleted every hour, and all of them when the server stops: app/uploads/ stays bounded.
UPLOAD_SWEEP_SECONDS = 3600
UPLOAD_MAX_AGE_SECONDS = 86400

# The gallery's captions are image ids: wrapped in full rather than cut to "synth_00...".
PAGE_CSS = "#gallery .caption-label { white-space: normal; overflow-wrap: anywhere; max-width: 100%; }"

ROW_HEIGHT_PX = 120  # the ask-all table's height per row at most: a question wrapped to four lines

# Every ASCII punctuation mark may be backslash-escaped in Markdown (CommonMark), which makes it literal text: an
# answer or reference of "<img ...>" or "**bold**" is then shown as written, never as an element or bold type.
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def plain(text: object) -> str:
    """Text from the data or the model, safe to put into Markdown: shown as written, never as markup."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def _format_confidence(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{percent(value)} %"


def _verdict(answer: Answer, source: str) -> str:
    """The answer as shown: first the question it answers and where that question came from."""
    lines = [f"Answered: **{plain(answer.question)}** ({source})"]
    if answer.error:
        return "\n\n".join([*lines, f"**Error:** {plain(answer.error)}"])
    kind = f"{plain(answer.question_type)} · {plain(answer.mode)}"
    lines += [f"### {plain(answer.answer) if answer.answer else '(empty)'}",
              f"confidence **{_format_confidence(answer.confidence)}** · {kind}"]
    if answer.multi_label:
        lines.append(MULTI_LABEL_NOTE + (RESCALED_NOTE if answer.rescaled else ""))
    if answer.abstained:
        lines.append("**not sure enough to answer**: below the confidence this run answers at")
    if answer.answer_set is not None:
        lines.append(f"answer set (conformal, guaranteed coverage): "
                     f"{plain(', '.join(answer.answer_set)) if answer.answer_set else '(empty)'}")
    if answer.reference is not None:
        verdict = "matches" if answer.correct else "differs from"
        lines.append(f"the answer **{verdict}** the reference: **{plain(answer.reference)}**")
    if answer.base_answer is not None:
        lines.append(f"untrained base model: {plain(answer.base_answer) if answer.base_answer else '(empty)'}")
    return "\n\n".join(lines)


# A multi-label answer's confidence (this exact set: its labels present, every other absent) is lower than any of
# its labels' own probabilities; without this line "red 19.8 %" beside a bar "red 44 %" reads as a contradiction.
MULTI_LABEL_NOTE = ("several labels may apply: the confidence is that of this exact set of labels (these and no "
                    "others); each bar is one label's own probability of being present")
# Where the run recalibrated set confidences (Platt scaling, fitted by `surgvqa predict`), the bars stay the model's.
RESCALED_NOTE = "; the confidence is recalibrated on the validation split, the bars are the model's own"
CHART_LABEL = "Probability of each candidate"
MULTI_LABEL_CHART_LABEL = "Each label's own probability of being present"


def batch_status(result: BatchResult, questions: int) -> str:
    """The batch's status line: files that could not be read counted apart from the images answered."""
    status = f"{result.images} image(s) × {questions} questions done"
    if result.unreadable:
        files = "1 file" if len(result.unreadable) == 1 else f"{len(result.unreadable)} files"
        status += f", {files} could not be read: {', '.join(result.unreadable)}"
    return status


def reachability(host: str, port: int) -> str:
    """How to open the app from another machine: Gradio's own hint (``share=True`` in ``launch()``) is advice to a
    Python caller, which a user of ``surgvqa app`` is not."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        return f"* Listening on {host}:{port}: anyone who can reach this machine on port {port} can use the app."
    return (f"* Open on this machine only. To open it from another: `surgvqa app --host 0.0.0.0` (then anyone who "
            f"can reach port {port} can use it), or there `ssh -L {port}:127.0.0.1:{port} <this machine>` and "
            f"http://127.0.0.1:{port}")


class _ServerLog(logging.StreamHandler):
    """The app's one-line messages on the terminal that runs it. ``sys.stderr`` is looked up at each line, as
    logging's own last-resort handler does, so that wherever stderr points now (a redirect, a capture) gets them."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("surgvqa app: %(message)s"))

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def _log_to_terminal() -> None:
    if not any(isinstance(handler, _ServerLog) for handler in log.handlers):
        log.addHandler(_ServerLog())
    log.setLevel(logging.INFO)
    log.propagate = False  # one line per event, whatever handlers the root logger has


def build_interface(service: AnswerService) -> Any:
    import gradio as gr

    def user_error(message: str, where: str) -> Exception:
        """A user's mistake (no image, an empty question, a file that is not an image): the page or the API caller
        gets the message, the server log one line. Tracebacks stay for the app's own faults."""
        log.info("refused (%s): %s", where, " ".join(message.split()))
        return gr.Error(message, print_exception=False)

    def load_upload(path: str | None) -> tuple[Any, Any, list]:
        if not path:
            return None, None, []
        try:
            image = read_image(path)
        except NotAnImage as exc:
            raise user_error(str(exc), "upload") from None
        return image, None, []

    def pick_from_gallery(event: gr.SelectData) -> tuple[Any, str, list, None]:
        path, img_id = service.gallery()[event.index]
        return read_image(path), img_id, service.test_questions(img_id), None  # the upload box is emptied

    # Gradio passes the selection by the parameter's annotation, which postponed annotations turn into a string.
    pick_from_gallery.__annotations__["event"] = gr.SelectData

    def ask_one(image: Image.Image | None, img_id: str | None, menu: str | None, typed: str) -> tuple[str, Any]:
        # The typed question wins; the answer says which question it answered, so neither choice is silent.
        typed, menu = (typed or "").strip(), (menu or "").strip()
        if image is None:
            raise user_error("Upload an image or pick one from the test split first.", "ask")
        if not (typed or menu):
            raise user_error("Choose a question from the menu or type one.", "ask")
        answer = service.ask(image, [typed or menu], img_id)[0]
        source = "your typed question" if typed else "the menu's question: the typed box is empty"
        chart_label = MULTI_LABEL_CHART_LABEL if answer.multi_label else CHART_LABEL
        return _verdict(answer, source), gr.update(value=answer.candidate_probabilities or {}, label=chart_label)

    def ask_all(image: Image.Image | None, img_id: str | None) -> list[list[Any]]:
        if image is None:
            raise user_error("Upload an image or pick one from the test split first.", "ask all")
        answers = service.ask(image, service.questions, img_id)
        return [[a.question, a.answer, _format_confidence(a.confidence),
                 "" if a.reference is None else a.reference,
                 "" if a.correct is None else ("yes" if a.correct else "no")] for a in answers]

    # Gradio finds its progress tracker by this default value: the documented way to report progress.
    def run_batch(files: list[str] | None, progress: Any = gr.Progress()) -> tuple[str, str, str]:  # noqa: B008
        if not files:
            raise user_error("Add one or more image files first.", "batch")
        result = service.predict_files(list(files), service.questions, progress)
        for name in result.unreadable:
            log.info("refused (batch): %s is not an image surgvqa can read", name)
        return str(result.csv), str(result.jsonl), plain(batch_status(result, len(service.questions)))

    with gr.Blocks(title="surgvqa", delete_cache=(UPLOAD_SWEEP_SECONDS, UPLOAD_MAX_AGE_SECONDS)) as page:
        gr.Markdown(f"## surgvqa · {service.config.run_name}\nModel: `{service.model_path}` · task "
                    f"`{service.task.name or 'kvasir-vqa'}` · mode `{service.mode}`")
        image_state = gr.State(None)
        img_id_state = gr.State(None)
        with gr.Tab("Ask"), gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Upload an image", file_types=["image"], type="filepath",
                                 elem_id="upload")
                shown = gr.Image(label="Image", interactive=False, type="pil", height=260, elem_id="shown-image")
                gallery = gr.Gallery(value=service.gallery(), label="…or pick one from the test split",
                                     columns=6, height=220, allow_preview=False, elem_id="gallery")
            with gr.Column(scale=1):
                menu = gr.Dropdown(choices=service.questions, label="Question from the task's list (asked when "
                                   "the box below is empty)",
                                   value=service.questions[0] if service.questions else None, elem_id="menu")
                free = gr.Textbox(label="…or type your own question (asked instead of the list's)",
                                  elem_id="free-question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                verdict = gr.Markdown(elem_id="answer", latex_delimiters=[])  # "$$" in an answer is text
                chart = gr.Label(label=CHART_LABEL, elem_id="candidates")
                references = gr.Dataframe(headers=["question", "reference"], label="This image's test questions",
                                          interactive=False, wrap=True, column_widths=["65%", "35%"],
                                          datatype="str", elem_id="references")  # "str": text, not markup
        with gr.Tab("Ask all"):
            ask_every = gr.Button("Ask every question about the current image", elem_id="ask-all")
            # Every question's row at once: the table's height is capped (500 px by default, a scroll box hiding
            # a third of the rows) only beyond what every row needs even when wrapped; each column is wide
            # enough for its header.
            table = gr.Dataframe(headers=["question", "answer", "confidence", "reference", "correct"],
                                 interactive=False, datatype="str", elem_id="all-answers", wrap=True,
                                 max_height=ROW_HEIGHT_PX * (len(service.questions) + 1),
                                 column_widths=["44%", "20%", "12%", "14%", "10%"])
        with gr.Tab("Batch"):
            batch_files = gr.File(label="Image files", file_count="multiple", file_types=["image"], type="filepath",
                                  elem_id="batch-files")
            run = gr.Button("Predict every question for every image", elem_id="run-batch")
            status_line = gr.Markdown(elem_id="batch-status")
            csv_out = gr.File(label="predictions.csv", elem_id="batch-csv")
            jsonl_out = gr.File(label="predictions.jsonl", elem_id="batch-jsonl")

        # `upload` fires on a user's upload only, not when picking from the gallery empties the box.
        upload.upload(load_upload, upload, [image_state, img_id_state, references]).then(
            lambda image: image, image_state, shown)
        gallery.select(pick_from_gallery, None, [image_state, img_id_state, references, upload]).then(
            lambda image: image, image_state, shown)
        ask.click(ask_one, [image_state, img_id_state, menu, free], [verdict, chart], api_name="ask_question")
        ask_every.click(ask_all, [image_state, img_id_state], table, api_name="ask_all")
        run.click(run_batch, batch_files, [csv_out, jsonl_out, status_line], api_name="batch")

        def ask_api(path: str | None, question: str | None) -> dict[str, Any]:
            if not path:
                raise user_error("Send an image file with the question.", "/answer")
            if not (question or "").strip():
                raise user_error("The question is empty: send the question to ask about the image.", "/answer")
            try:
                image = read_image(path)
            except NotAnImage as exc:
                raise user_error(str(exc), "/answer") from None
            answer = service.ask(image, [question])[0]
            return {"question": answer.question, "answer": answer.answer, "confidence": answer.confidence,
                    "error": answer.error, "question_type": answer.question_type,
                    "candidates": answer.candidate_probabilities, "multi_label": answer.multi_label,
                    "answer_set": answer.answer_set, "abstained": answer.abstained}

        api_image, api_question, api_out = gr.File(visible=False), gr.Textbox(visible=False), gr.JSON(visible=False)
        gr.Button(visible=False).click(ask_api, [api_image, api_question], api_out, api_name="answer")
    return page


def serve(config: Config, model_path: str | None = None, *, compare_base: bool = False, host: str = "127.0.0.1",
          port: int = 7860, block: bool = True) -> tuple[Any, AnswerService, str]:
    """Start the app; returns (gradio page, service, local URL). ``block=False`` returns once it serves."""
    out_dir = config.run_dir / "app"
    (out_dir / "uploads").mkdir(parents=True, exist_ok=True)
    # Gradio keeps uploads in its own temporary folder unless told otherwise: keep them in the run.
    os.environ["GRADIO_TEMP_DIR"] = str((out_dir / "uploads").resolve())
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    service = AnswerService(config, model_path, compare_base=compare_base)
    page = build_interface(service)
    page.queue(default_concurrency_limit=8)
    _log_to_terminal()
    # quiet: Gradio's start-up lines end with its "set `share=True` in `launch()`" hint; the CLI prints its own.
    launch = {"server_name": host, "server_port": port, "prevent_thread_lock": True, "quiet": True,
              "allowed_paths": [str(config.run_dir.resolve())], "footer_links": ["api"], "css": PAGE_CSS}
    for attempt in range(3):
        try:
            _, url, _ = page.launch(**launch)
            break
        except ValueError as exc:
            # Gradio checks its own server with one 3-second request and gives up on a busy machine: try again.
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            page.close()
    if block:
        print(reachability(host, port), flush=True)
        page.block_thread()
    return page, service, url
