"""The web page (gradio, optional extra ``ui``): one more client of the job layer (:class:`~sonic_rt.serving.jobs.Jobs`).

Portrait (upload or webcam), speech (upload or microphone), the options a person needs (built from
:class:`~sonic_rt.AnimateOptions`' field metadata, same defaults), a progress bar fed by the job's progress events
(windows done of steps x windows, seconds of video written, ETA), the queue position while the job waits, a cancel
button, the video (plays in the page, downloadable), and a gallery of this server's recent results. gradio's own API
endpoint ``/animate`` (``gradio_client``) is this page's Generate button. A job made here is a prediction like any
other: it has an id, a record, the same limits and the same one-line errors.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

#: The :class:`~sonic_rt.AnimateOptions` fields shown in the page and taken by its API, in this order.
UI_OPTIONS = ("steps", "dynamic_scale", "seed", "min_resolution", "crop", "interpolate", "paste_back")
GALLERY_SIZE = 12
DEMO_BANNER = (
    "**Demo model: the weights are RANDOM.** The video is structured noise, not a talking face; it "
    "checks the install. Start the server with `--model DIR` (the official Sonic checkpoints) for "
    "real results."
)
CSS = ".sonic-demo-banner { background: #fde68a; border: 2px solid #b45309; padding: 0.5em 1em; }"


def import_gradio():
    """gradio, with analytics off (set before the import); a one-line error when it is not installed."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    try:
        import gradio as gr
    except ImportError as exc:
        from ..errors import SonicError

        raise SonicError(
            f"the web page needs gradio: pip install -e '.[ui]', or serve with --no-page ({exc})"
        ) from None
    return gr


def write_examples(folder: Path) -> list[list[str]]:
    """A portrait (skimage's astronaut) and speech (espeak-ng) for the page's one-click example; [] where
    scikit-image or espeak-ng is missing."""
    try:
        from PIL import Image
        from skimage import data
    except ImportError:
        return []
    if shutil.which("espeak-ng") is None:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    image, speech = folder / "astronaut.png", folder / "hello.wav"
    try:
        Image.fromarray(data.astronaut()).save(image)
        subprocess.run(
            ["espeak-ng", "-w", str(speech), "Hello there. This is Sonic, a talking head."],
            check=True,
            capture_output=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    return [[str(image), str(speech)]]


def _option_widgets(gr) -> dict:
    """One widget per :data:`UI_OPTIONS` field: label, default and help from the field's metadata.
    ``min_resolution`` starts empty (the model's own default, filled in when the page loads)."""
    from ..pipeline.options import AnimateOptions

    widgets = {}
    for info in AnimateOptions.describe():
        if info.name not in UI_OPTIONS:
            continue
        label = info.name.replace("_", " ") + (f" ({info.unit})" if info.unit not in (None, "x", info.name) else "")
        help_text = info.help + (f"; official: {info.source}" if info.source else "")
        kind = info.type.removesuffix(" | None")
        if kind == "bool":
            widgets[info.name] = gr.Checkbox(
                value=info.default, label=label, info=help_text, elem_id=f"opt-{info.name}"
            )
        elif kind in ("int", "float"):
            widgets[info.name] = gr.Number(
                value=info.default,
                label=label,
                info=help_text,
                precision=0 if kind == "int" else None,
                elem_id=f"opt-{info.name}",
            )
    return {name: widgets[name] for name in UI_OPTIONS if name in widgets}


def limits_text(jobs, max_upload_mb: float) -> str:
    """The page's statement of its limits (and, once loaded, the model and device)."""
    s = jobs.settings
    model = jobs.runner.describe()
    where = f" on `{model['device']}`" if model.get("device") else ""
    return (
        f"Limits: speech up to **{s.max_audio_seconds:g} s**, uploads up to **{max_upload_mb:g} MB**; "
        f"{s.concurrency} job{'s' if s.concurrency != 1 else ''} at a time{where}, the others wait in the queue "
        f"(up to {s.max_queue}). Results are kept {s.keep_outputs_s / 3600:g} h. Model: `{model.get('model')}`."
    )


def build_page(jobs, *, demo: bool, max_upload_mb: float = 50.0, examples_dir: Path | None = None):
    """The gradio Blocks over ``jobs``.

    Args:
        jobs: the job layer (its runner may still be loading).
        demo: show the random-weights banner from the start (it also shows once a loaded model says it is the demo).
        max_upload_mb: the upload limit stated on the page.
        examples_dir: where to write the one-click example (None: no example).

    Returns:
        ``(blocks, theme, css)``.
    """
    gr = import_gradio()
    examples = write_examples(examples_dir) if examples_dir is not None else []
    concurrency, max_queue = jobs.settings.concurrency, jobs.settings.max_queue

    with gr.Blocks(title="Sonic talking head", analytics_enabled=False) as blocks:
        gr.Markdown("# Sonic: portrait + speech -> talking-head video")
        banner = gr.Markdown(DEMO_BANNER, elem_id="demo-banner", elem_classes=["sonic-demo-banner"], visible=demo)
        limits = gr.Markdown(limits_text(jobs, max_upload_mb), elem_id="limits")
        with gr.Row():
            with gr.Column():
                portrait = gr.Image(
                    label="Portrait (one face)",
                    sources=["upload", "webcam"],
                    type="filepath",
                    image_mode=None,
                    elem_id="portrait",
                )
                # The runtime reads the file itself (its checks and one-line errors), not gradio's PIL.
                portrait.preprocess = _portrait_preprocess(portrait)
                speech = gr.Audio(label="Speech", sources=["upload", "microphone"], type="filepath", elem_id="speech")
                with gr.Accordion("Options", open=True):
                    widgets = _option_widgets(gr)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                video = gr.Video(
                    label="Result", elem_id="result", autoplay=True, buttons=["download"], interactive=False
                )
                gallery = gr.Gallery(
                    label="Recent results of this server", columns=3, elem_id="gallery", interactive=False
                )
        if examples:
            gr.Examples(examples=examples, inputs=[portrait, speech], label="Example (click, then Generate)")

        names = list(widgets)
        job = generate.click(
            animate_handler(gr, jobs, names),
            inputs=[portrait, speech, *widgets.values()],
            outputs=video,
            api_name="animate",
            concurrency_limit=concurrency,
            concurrency_id="sonic",
        )
        recent = lambda: jobs.recent_outputs(GALLERY_SIZE)
        job.then(recent, None, gallery, api_visibility="private", queue=False)
        cancel.click(None, None, None, cancels=[job], api_visibility="private", queue=False)

        def on_load():
            model = jobs.runner.describe()
            resolution = widgets.get("min_resolution")
            updates = [gr.update(visible=demo or bool(model.get("demo"))), limits_text(jobs, max_upload_mb), recent()]
            if resolution is not None:
                updates.append(gr.update(value=model.get("default_min_resolution")))
            return updates

        outputs = [banner, limits, gallery] + ([widgets["min_resolution"]] if "min_resolution" in widgets else [])
        blocks.load(on_load, None, outputs, api_visibility="private", queue=False)

    blocks.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return blocks, theme, CSS


def animate_handler(gr, jobs, names: list[str]):
    """The page's and gradio API's job function: the portrait, the speech and the option values (in ``names``
    order) in, the mp4 path out. It creates a prediction, follows its events into gradio's progress bar, and
    cancels it when gradio cancels the event. Bad input becomes a one-line ``gr.Error``."""
    import inspect

    from ..pipeline.options import AnimateOptions
    from .inputs import BadInput, parse_input
    from .jobs import NewPrediction, QueueFull, Unavailable
    from .store import SUCCEEDED

    defaults = AnimateOptions()

    async def animate(image, audio, *values):
        *values, progress = values  # gradio passes the Progress last (see the signature below)
        if not image:
            raise gr.Error("upload a portrait (or take one with the webcam)", print_exception=False)
        if not audio:
            raise gr.Error("upload or record some speech", print_exception=False)
        raw = {}
        for name, value in zip(names, values):
            default = getattr(defaults, name)
            if value is None and default is not None:
                value = default  # an emptied field keeps the default
            if isinstance(default, int) and not isinstance(default, bool) and value is not None:
                value = int(value)
            if isinstance(default, float) and value is not None:
                value = float(value)
            raw[name] = value
        try:
            parsed = parse_input(
                raw,
                Path(image).parent,
                max_file_bytes=jobs.settings.max_upload_bytes,
                uploads={"image": Path(image), "audio": Path(audio)},
            )
            pred, _ = await jobs.create(NewPrediction(id=None, parsed=parsed))
        except (BadInput, QueueFull, Unavailable) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        steps = parsed.options.get("steps", defaults.steps)
        try:
            async for event, data in jobs.events(pred.id):
                if event == "start":
                    ahead = jobs.position(pred.id)
                    if ahead:
                        progress(0, desc=f"waiting: {ahead} job{'s' if ahead != 1 else ''} ahead")
                elif event == "progress" and data.get("windows_total"):
                    done, total = data["windows_done"], data["windows_total"]
                    step = min(done * steps // total + 1, steps)
                    video = f", {data['video_seconds']:.1f} s of video written" if data.get("video_seconds") else ""
                    eta = f", ETA {data['eta_seconds']:.0f} s" if data.get("eta_seconds") is not None else ""
                    progress((min(done, total), total), desc=f"step {step}/{steps}{video}{eta}", unit="windows")
        except asyncio.CancelledError:
            await jobs.cancel(pred.id)  # gradio's Cancel: the job stops after its current UNet call
            raise
        final = jobs.get(pred.id)
        if final.status != SUCCEEDED:
            raise gr.Error(final.error or final.status, print_exception=False)
        return str(jobs.output_path(final))

    # The API's parameter names and defaults: the option names (gradio reads the signature).
    params = [
        inspect.Parameter("image", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("audio", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    params += [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(defaults, name))
        for name in names
    ]
    params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=gr.Progress()))
    animate.__signature__ = inspect.Signature(params)
    return animate


def _portrait_preprocess(component):
    """gradio's Image preprocess opens the upload with PIL first (a corrupt file would fail there with a
    generic error); this passes the uploaded file's path on as it is, so the runtime checks it."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    return preprocess


__all__ = ["build_page", "animate_handler", "import_gradio", "write_examples", "limits_text", "UI_OPTIONS"]
