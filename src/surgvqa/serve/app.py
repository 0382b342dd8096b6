"""``surgvqa app``: the local web page (gradio) where one asks a trained model about an endoscopy image.

Gradio, the convention of this field, draws the page; it is an optional extra (``pip install -e '.[app]'``).
Everything the app writes (uploads, batch results) stays under ``<run>/app/``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from PIL import Image

from surgvqa.core.config import Config
from surgvqa.core.formatting import NOT_AVAILABLE, percent
from surgvqa.serve.answer_service import Answer, AnswerService, NotAnImage, read_image

# Uploads older than a day are deleted every hour, and all of them when the server stops: app/uploads/ stays bounded.
UPLOAD_SWEEP_SECONDS = 3600
UPLOAD_MAX_AGE_SECONDS = 86400

# Every ASCII punctuation mark may be backslash-escaped in Markdown (CommonMark), which makes it literal text: an
# answer or reference of "<img ...>" or "**bold**" is then shown as written, never as an element or bold type.
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def plain(text: object) -> str:
    """Text from the data or the model, safe to put into Markdown: shown as written, never as markup."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def _format_confidence(value: float | None) -> str:
    return NOT_AVAILABLE if value is None else f"{percent(value)} %"


def _verdict(answer: Answer) -> str:
    if answer.error:
        return f"**Error:** {plain(answer.error)}"
    kind = f"{plain(answer.question_type)} · {plain(answer.mode)}"
    lines = [f"### {plain(answer.answer) if answer.answer else '(empty)'}",
             f"confidence **{_format_confidence(answer.confidence)}** · {kind}"]
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


def build_interface(service: AnswerService) -> Any:
    import gradio as gr

    def load_upload(path: str | None) -> tuple[Any, Any, list]:
        if not path:
            return None, None, []
        try:
            image = read_image(path)
        except NotAnImage as exc:
            raise gr.Error(str(exc)) from None
        return image, None, []

    def pick_from_gallery(event: gr.SelectData) -> tuple[Any, str, list, None]:
        path, img_id = service.gallery()[event.index]
        return read_image(path), img_id, service.test_questions(img_id), None  # the upload box is emptied

    # Gradio passes the selection by the parameter's annotation, which postponed annotations turn into a string.
    pick_from_gallery.__annotations__["event"] = gr.SelectData

    def ask_one(image: Image.Image | None, img_id: str | None, menu: str | None, free: str) -> tuple[str, dict]:
        question = (free or "").strip() or (menu or "").strip()
        if image is None:
            raise gr.Error("Upload an image or pick one from the test split first.")
        if not question:
            raise gr.Error("Choose a question from the menu or type one.")
        answer = service.ask(image, [question], img_id)[0]
        return _verdict(answer), answer.candidate_probabilities or {}

    def ask_all(image: Image.Image | None, img_id: str | None) -> list[list[Any]]:
        if image is None:
            raise gr.Error("Upload an image or pick one from the test split first.")
        answers = service.ask(image, service.questions, img_id)
        return [[a.question, a.answer, _format_confidence(a.confidence),
                 "" if a.reference is None else a.reference,
                 "" if a.correct is None else ("yes" if a.correct else "no")] for a in answers]

    # Gradio finds its progress tracker by this default value: the documented way to report progress.
    def run_batch(files: list[str] | None, progress: Any = gr.Progress()) -> tuple[str, str, str]:  # noqa: B008
        if not files:
            raise gr.Error("Add one or more image files first.")
        csv_path, jsonl_path = service.predict_files(list(files), service.questions, progress)
        return str(csv_path), str(jsonl_path), f"{len(files)} image(s) × {len(service.questions)} questions done"

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
                menu = gr.Dropdown(choices=service.questions, label="Question (the task's questions)",
                                   value=service.questions[0] if service.questions else None, elem_id="menu")
                free = gr.Textbox(label="…or type a question", elem_id="free-question")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                verdict = gr.Markdown(elem_id="answer", latex_delimiters=[])  # "$$" in an answer is text
                chart = gr.Label(label="Probability of each candidate", elem_id="candidates")
                references = gr.Dataframe(headers=["question", "reference"], label="This image's test questions",
                                          interactive=False, wrap=True, column_widths=["65%", "35%"],
                                          datatype="str", elem_id="references")  # "str": text, not markup
        with gr.Tab("Ask all"):
            ask_every = gr.Button("Ask every question about the current image", elem_id="ask-all")
            table = gr.Dataframe(headers=["question", "answer", "confidence", "reference", "correct"],
                                 interactive=False, datatype="str", elem_id="all-answers")
        with gr.Tab("Batch"):
            batch_files = gr.File(label="Image files", file_count="multiple", file_types=["image"], type="filepath",
                                  elem_id="batch-files")
            run = gr.Button("Predict every question for every image", elem_id="run-batch")
            batch_status = gr.Markdown(elem_id="batch-status")
            csv_out = gr.File(label="predictions.csv", elem_id="batch-csv")
            jsonl_out = gr.File(label="predictions.jsonl", elem_id="batch-jsonl")

        # `upload` fires on a user's upload only, not when picking from the gallery empties the box.
        upload.upload(load_upload, upload, [image_state, img_id_state, references]).then(
            lambda image: image, image_state, shown)
        gallery.select(pick_from_gallery, None, [image_state, img_id_state, references, upload]).then(
            lambda image: image, image_state, shown)
        ask.click(ask_one, [image_state, img_id_state, menu, free], [verdict, chart], api_name="ask_question")
        ask_every.click(ask_all, [image_state, img_id_state], table, api_name="ask_all")
        run.click(run_batch, batch_files, [csv_out, jsonl_out, batch_status], api_name="batch")

        def ask_api(path: str, question: str) -> dict[str, Any]:
            answer = service.ask(read_image(path), [question])[0]
            return {"answer": answer.answer, "confidence": answer.confidence, "error": answer.error,
                    "question_type": answer.question_type, "candidates": answer.candidate_probabilities,
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
    launch = {"server_name": host, "server_port": port, "prevent_thread_lock": not block, "quiet": not block,
              "allowed_paths": [str(config.run_dir.resolve())], "footer_links": ["api"]}
    for attempt in range(3):
        try:
            _, url, _ = page.launch(**launch)
            break
        except ValueError as exc:
            # Gradio checks its own server with one 3-second request and gives up on a busy machine: try again.
            if "localhost is not accessible" not in str(exc) or attempt == 2:
                raise
            page.close()
    return page, service, url
