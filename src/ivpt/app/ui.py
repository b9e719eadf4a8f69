"""The ``ivpt app`` web page, built with Gradio: explore a trained model and switch its concepts off.

Gradio is an optional extra (``pip install 'ivpt[app]'``) imported only when the page is built. The page
works offline: Gradio's telemetry and version check are off, there is no share link, no server-side
rendering process, and every script, style sheet and font comes from the app itself; it listens on
127.0.0.1 unless told otherwise.

The page-independent pieces (HTML of the prediction and of the part shares, the figure as pixels) are
plain functions of an :func:`ivpt.viz.explain.explain` result, so tests can check them without a browser.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg

from ivpt.app.session import ExplorerSession
from ivpt.errors import IVPTError
from ivpt.model.intervention import PARTS_KEY
from ivpt.viz.explain import explanation_figure, load_image
from ivpt.viz.palette import to_hex

if TYPE_CHECKING:
    import gradio

# Gradio reads this before sending telemetry or checking for a newer version; the app never does either.
ANALYTICS_VARIABLE = "GRADIO_ANALYTICS_ENABLED"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
MAX_UPLOAD = "50mb"
GRADIO_MISSING = "ivpt app needs gradio, an optional extra: pip install 'ivpt[app]'"


# Compact tables in the prediction and part panels.
_CSS = """
#ivpt-prediction table, #ivpt-parts { border-collapse: collapse; font-size: 0.9em; }
#ivpt-prediction td, #ivpt-prediction th, #ivpt-parts td, #ivpt-parts th { padding: 2px 8px; white-space: nowrap; }
#ivpt-prediction p { margin: 0.2em 0; }
"""


def import_gradio() -> Any:
    """Import gradio with its telemetry switched off, or raise :class:`IVPTError` saying how to install it."""
    os.environ[ANALYTICS_VARIABLE] = "False"
    try:
        import gradio
    except ImportError:
        raise IVPTError(GRADIO_MISSING) from None
    return gradio


def format_probability(probability: float) -> str:
    """How the page writes a probability (tests read it back in this form)."""
    return f"{probability:.4f}"


def _class_line(entry: dict[str, Any], element: str) -> str:
    return (
        f"<b><span id='ivpt-{element}-class'>{html.escape(entry['name'])}</span></b><br>"
        f"p = <span id='ivpt-{element}-probability'>{format_probability(entry['probability'])}</span>, "
        f"logit {entry['logit']:.3f}"
    )


def prediction_html(result: dict[str, Any]) -> str:
    """The prediction, the top-5 and, under an intervention, the prediction before it.

    Element ids: ``ivpt-now-class`` / ``ivpt-now-probability`` (the model as intervened),
    ``ivpt-before-class`` / ``ivpt-before-probability`` (the plain model), ``ivpt-original-probability``
    (the plain model's class, scored after the intervention) and ``ivpt-disabled``.
    """
    intervention = result.get("intervention")
    lines = [f"<p>Prediction: {_class_line(result['predicted'], 'now')}</p>"]
    if intervention is not None and intervention["disabled"]:
        before = intervention["before"]["predicted"]
        original = intervention["after"]["original_class"]
        switched = "; ".join(f"{key} {', '.join(map(str, values))}" for key, values in intervention["disabled"].items())
        lines.append(f"<p>Switched off: <span id='ivpt-disabled'>{html.escape(switched)}</span></p>")
        lines.append(f"<p>Before: {_class_line(before, 'before')}</p>")
        lines.append(
            f"<p>'{html.escape(original['name'])}' now has<br>p = <span id='ivpt-original-probability'>"
            f"{format_probability(original['probability'])}</span>, logit {original['logit']:.3f}</p>"
        )
    else:
        lines.append("<p>Switched off: <span id='ivpt-disabled'>nothing</span></p>")
    rows = "".join(
        f"<tr><td>{rank + 1}</td><td>{html.escape(entry['name'])}</td>"
        f"<td style='text-align:right'>{format_probability(entry['probability'])}</td></tr>"
        for rank, entry in enumerate(result["top5"])
    )
    lines.append(f"<table id='ivpt-top5'><tr><th>#</th><th>top-5 class</th><th>p</th></tr>{rows}</table>")
    return "<div id='ivpt-prediction'>" + "\n".join(lines) + "</div>"


def parts_html(result: dict[str, Any], palette: np.ndarray | None) -> str:
    """Each final part's share of the predicted class's logit, as a table with bars.

    Element ids: ``ivpt-part-<n>`` holds part n's share (written with 3 decimals, "off" when disabled).
    """
    parts = result["parts"]
    if not parts:
        return f"<p>Method '{html.escape(result['method'])}' has no parts: only its prediction is shown.</p>"
    largest = max(abs(p["contribution"]) for p in parts) or 1.0
    rows = []
    for part in parts:
        n = part["part"]
        colour = to_hex(palette[n]) if palette is not None else "#888888"
        off = bool(part.get("disabled"))
        width = 0 if off else round(100 * abs(part["contribution"]) / largest)
        bar = f"<div style='background:{colour};height:0.8em;width:{width}%'></div>"
        value = "off" if off else f"{part['contribution']:+.3f}"
        rows.append(
            f"<tr><td><span style='color:{colour}'>&#9632;</span> part {n}</td>"
            f"<td style='text-align:right'><span id='ivpt-part-{n}'>{value}</span></td>"
            f"<td style='width:12em'>{bar}</td></tr>"
        )
    name = html.escape(result["predicted"]["name"])
    return (
        f"<p>Part evidence for '{name}' (shares of its logit; they add up to it)</p>"
        f"<table id='ivpt-parts'><tr><th>part</th><th>share</th><th></th></tr>{''.join(rows)}</table>"
    )


def figure_pixels(result: dict[str, Any]) -> np.ndarray:
    """The ``ivpt explain`` figure of ``result`` as ``(H, W, 3)`` uint8 pixels."""
    canvas = FigureCanvasAgg(explanation_figure(result))
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def disable_request(parts: Sequence[int] | None, stages: Sequence[Sequence[int] | None]) -> dict[str, list[int]]:
    """The ticked boxes as an :func:`ivpt.viz.explain.explain` ``disable`` mapping."""
    request = {PARTS_KEY: [int(p) for p in parts or []]}
    for stage, concepts in enumerate(stages):
        request[f"stage{stage + 1}"] = [int(c) for c in concepts or []]
    return request


def gallery_choices(session: ExplorerSession) -> list[tuple[str, str]]:
    """``(label, "stage:concept")`` for every concept of the model, background included."""
    num_stages = len(session.n_pro)
    choices = []
    for stage, names in enumerate(session.concept_names):
        where = "final" if stage == num_stages - 1 else f"stage {stage + 1}"
        for concept, name in enumerate(names):
            label = f"{where} background" if concept == len(names) - 1 else name
            choices.append((label, f"{stage}:{concept}"))
    return choices


def gallery_markdown(facts: dict[str, Any], has_strip: bool, top_k: int) -> str:
    """What the gallery says of one concept next to its crops."""
    lines = [
        f"**{facts['label']}**: claims {facts['mean_area']:.1%} of a test image on average, "
        f"present in {facts['presence']:.0%} of them."
    ]
    if facts["feeds"]:
        lines.append("Feeds " + ", ".join(f"{label} ({weight:.2f})" for label, weight in facts["feeds"]) + ".")
    lines.append(
        f"Its {top_k} most typical test crops (where its 3x3-smoothed map peaks highest)."
        if has_strip
        else "It never has a candidate image in the test set."
    )
    return "\n\n".join(lines)


def _header(session: ExplorerSession) -> str:
    loaded, m = session.loaded, session.cfg.model
    data = (
        f"test set: {session.num_test_images} images from `{session.cfg.data.root}`"
        if session.dataset is not None
        else f"no test set: {session.data_note}"
    )
    return (
        f"## ivpt app: `{loaded.source}`\n"
        f"{m.method} on {m.arch} at {m.img_size} px, prototypes per stage {list(session.n_pro)}, "
        f"{len(loaded.class_names)} classes; {data}. Pick or upload an image, then tick concepts or parts to "
        "switch them off (docs/app.md says what that does)."
    )


def build_app(session: ExplorerSession) -> gradio.Blocks:
    """The page as a :class:`gradio.Blocks` (not launched)."""
    gr = import_gradio()
    palette = session.palette[-1] if session.palette else None
    num_stages = len(session.n_pro)

    def render(current: dict[str, Any] | None, parts: list[int], *stages: list[int]) -> tuple[Any, ...]:
        if current is None:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            image = session.test_image(current["position"]) if current["kind"] == "test" else current["image"]
            result = session.explain(image, disable_request(parts, stages))
        except IVPTError as exc:
            raise gr.Error(str(exc)) from None
        return prediction_html(result), parts_html(result, palette), figure_pixels(result)

    def pick_test(position: int | None, *boxes: list[int]) -> tuple[Any, ...]:
        if position is None:
            return (gr.skip(),) * 5
        current = {"kind": "test", "position": int(position)}
        original = load_image(session.dataset.image_path(int(position)))
        return (current, original, *render(current, *boxes))

    def pick_upload(image: Any, *boxes: list[int]) -> tuple[Any, ...]:
        if image is None:
            return (gr.skip(),) * 4
        current = {"kind": "upload", "image": image.convert("RGB")}
        return (current, *render(current, *boxes))

    def reset(current: dict[str, Any] | None) -> tuple[Any, ...]:
        cleared = [[] for _ in range(num_stages)]
        return (*cleared, *render(current, *cleared))

    def show_concept(choice: str | None) -> tuple[Any, str]:
        if not choice:
            return None, ""
        stage, concept = (int(v) for v in choice.split(":"))
        try:
            strip, facts = session.gallery(stage, concept)
        except IVPTError as exc:
            raise gr.Error(str(exc)) from None
        return strip, gallery_markdown(facts, strip is not None, session.top_k)

    with gr.Blocks(title="ivpt app", analytics_enabled=False) as page:
        gr.Markdown(_header(session))
        current = gr.State(None)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=280):
                picker = gr.Dropdown(
                    choices=session.test_image_choices(),
                    value=None,
                    label="test image" if session.dataset is not None else "test image (no test set loaded)",
                    interactive=session.dataset is not None,
                    filterable=True,
                    elem_id="ivpt-test-image",
                )
                upload = gr.Image(
                    type="pil", sources=["upload"], label="or upload an image", height=200, elem_id="ivpt-upload"
                )
            with gr.Column(scale=1, min_width=320):
                prediction = gr.HTML("<p>Pick or upload an image.</p>", elem_id="ivpt-prediction-box")
            with gr.Column(scale=1, min_width=280):
                shares = gr.HTML("", elem_id="ivpt-parts-box")
                part_box = gr.CheckboxGroup(
                    choices=[(f"part {n}", n) for n in range(session.n_pro[-1] - 1)] if session.n_pro else [],
                    label="switch final parts off (their share leaves the logits)",
                    elem_id="ivpt-disable-parts",
                )
        figure = gr.Image(
            label="concept maps of every stage, part evidence and this image's fine-to-coarse grouping",
            show_label=False,
            interactive=False,
            type="numpy",
            elem_id="ivpt-figure",
        )
        with gr.Accordion("Switch concepts of the intermediate stages off", open=True):
            stage_boxes = [
                gr.CheckboxGroup(
                    choices=[(name, k) for k, name in enumerate(session.concept_names[stage][:-1])],
                    label=f"stage {stage + 1} concepts (they leave this stage's prompts)",
                    elem_id=f"ivpt-disable-stage{stage + 1}",
                )
                for stage in range(num_stages - 1)
            ]
            reset_button = gr.Button("switch everything back on", elem_id="ivpt-reset", size="sm")
        with gr.Accordion("Concept gallery: most typical test crops", open=False):
            with gr.Row():
                concept = gr.Dropdown(choices=gallery_choices(session), value=None, label="concept", scale=1)
                strip = gr.Image(label="typical crops", interactive=False, type="numpy", scale=3)
            facts = gr.Markdown("")

        boxes = [part_box, *stage_boxes]
        shown = [prediction, shares, figure]
        # Every event uses the one model: one queue for all of them, one request at a time.
        serial = {"concurrency_limit": 1, "concurrency_id": "model"}
        picker.input(pick_test, [picker, *boxes], [current, upload, *shown], **serial)
        upload.upload(pick_upload, [upload, *boxes], [current, *shown], **serial)
        for box in boxes:
            box.input(render, [current, *boxes], shown, **serial)
        reset_button.click(reset, [current], [*boxes, *shown], **serial)
        concept.input(show_concept, [concept], [strip, facts], **serial)
    return page


@dataclass
class RunningApp:
    """A launched app: its page and the address it listens on (``close()`` stops it)."""

    page: Any
    url: str

    def close(self) -> None:
        self.page.close(verbose=False)


def launch_app(
    session: ExplorerSession, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, block: bool = True
) -> RunningApp:
    """Serve the page for ``session``.

    Args:
        host: address to listen on; the default 127.0.0.1 keeps the app on this machine.
        port: TCP port.
        block: serve until interrupted (the command line); ``False`` returns at once with the server
            running in the background (tests, notebooks).

    Raises:
        IVPTError: gradio is not installed, or the port cannot be used.
    """
    page = build_app(session)
    page.queue(default_concurrency_limit=1)
    try:
        page.launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            prevent_thread_lock=True,
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            enable_monitoring=False,
            run_history=False,
            footer_links=[],
            show_error=True,
            quiet=True,
            max_file_size=MAX_UPLOAD,
            css=_CSS,
        )
    except OSError as exc:
        raise IVPTError(f"app: cannot listen on {host}:{port} ({exc}); choose another --port") from None
    running = RunningApp(page, str(page.local_url))
    if block:
        print(f"ivpt app: serving {session.loaded.source} at {running.url} (Ctrl-C stops it)", flush=True)
        try:
            page.block_thread()
        finally:
            running.close()
    return running


__all__ = [
    "ANALYTICS_VARIABLE",
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "RunningApp",
    "build_app",
    "disable_request",
    "figure_pixels",
    "format_probability",
    "gallery_choices",
    "gallery_markdown",
    "import_gradio",
    "launch_app",
    "parts_html",
    "prediction_html",
]
