"""The web page (gradio, optional extra ``ui``): one more client of the job layer (:class:`~sonic_rt.serving.jobs.Jobs`).

Portrait (upload or webcam), speech (upload or microphone), the options a person needs (built from
:class:`~sonic_rt.AnimateOptions`' field metadata, same defaults), a progress bar fed by the job's progress events
(windows done of steps x windows, seconds of video written, ETA), the queue position while the job waits, a cancel
button, a live player that starts with the first finished seconds and keeps playing while the rest is made, the
finished video beside it (downloadable), and a gallery of this server's recent results. gradio's own API endpoint
``/animate`` (``gradio_client``) runs the same job and returns the mp4. A job made here is a prediction like any
other: it has an id, a record, the same limits and the same one-line errors.

The live player is gradio's streaming video player (``gr.Video(streaming=True)``: hls.js where the browser has Media
Source Extensions) pointed at the job's own HLS stream (:mod:`sonic_rt.serving.live`), the stream API clients get:
the runtime writes it in-process with PyAV, so no segment is re-encoded, copied or held in memory for the page, and
no ``ffmpeg`` program is needed (gradio's chunk-by-chunk streaming runs ``ffmpeg``/``ffprobe`` on every chunk).
"""

from __future__ import annotations

import asyncio
import inspect
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
CSS = (
    ".sonic-demo-banner { background: #fde68a; border: 2px solid #b45309; padding: 0.5em 1em; }"
    # gradio lays its progress overlay over every output of a running event; the live player must stay visible
    # (the same progress shows on the result below it)
    " #live [data-testid=status-tracker] { display: none; }"
)


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
                live = gr.Video(
                    label="Live: plays while the video is made",
                    elem_id="live",
                    streaming=True,  # gradio's HLS player; its value is set to the job's playlist (see page_handler)
                    autoplay=True,
                    buttons=[],
                    interactive=False,
                    visible=False,
                )
                video = gr.Video(
                    label="Result", elem_id="result", autoplay=False, buttons=["download"], interactive=False
                )
                gallery = gr.Gallery(
                    label="Recent results of this server", columns=3, elem_id="gallery", interactive=False
                )
        if examples:
            gr.Examples(examples=examples, inputs=[portrait, speech], label="Example (click, then Generate)")

        names = list(widgets)
        inputs = [portrait, speech, *widgets.values()]
        job = generate.click(
            page_handler(gr, jobs, names),
            inputs=inputs,
            outputs=[live, video],
            api_name="generate",
            api_visibility="private",
            concurrency_limit=concurrency,
            concurrency_id="sonic",
        )
        # gradio's API endpoint /animate: the same job, the mp4 only (the live player is for the page)
        api = gr.Button(visible=False, elem_id="api-animate")
        api.click(
            animate_handler(gr, jobs, names),
            inputs=inputs,
            outputs=video,
            api_name="animate",
            concurrency_limit=concurrency,
            concurrency_id="sonic",
        )
        recent = lambda: jobs.recent_outputs(GALLERY_SIZE)
        job.then(recent, None, gallery, api_visibility="private", queue=False)
        cancel.click(
            lambda: gr.update(value=None, visible=False),
            None,
            live,
            cancels=[job],
            api_visibility="private",
            queue=False,
        )

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


def _job_runner(gr, jobs, names: list[str]):
    """``(submit, follow, defaults)``: create the prediction from the page's values, and follow its events into gradio's
    progress bar, yielding the live playlist's URL once its first segment is finished and raising the one-line
    ``gr.Error`` of a job that did not succeed; ``follow`` cancels the prediction when gradio cancels the event."""
    from ..pipeline.options import AnimateOptions
    from .inputs import BadInput, parse_input
    from .jobs import NewPrediction, QueueFull, Unavailable
    from .store import SUCCEEDED

    defaults = AnimateOptions()

    async def submit(image, audio, values, request):
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
        # links (the live stream's, the output's) on the address this browser reached the page at
        base_url = str(request.request.base_url) if request is not None and request.request is not None else ""
        try:
            parsed = parse_input(
                raw,
                Path(image).parent,
                max_file_bytes=jobs.settings.max_upload_bytes,
                uploads={"image": Path(image), "audio": Path(audio)},
            )
            pred, _ = await jobs.create(NewPrediction(id=None, parsed=parsed, base_url=base_url))
        except (BadInput, QueueFull, Unavailable) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return pred, parsed.options.get("steps", defaults.steps)

    async def follow(pred, steps, progress):
        try:
            async for event, data, _ in jobs.events(pred.id):
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
                elif event == "output" and data.get("kind") == "segment" and data["index"] == 0:
                    yield data["playlist"]
        except asyncio.CancelledError:
            await jobs.cancel(pred.id)  # gradio's Cancel: the job stops after its current UNet call
            raise
        final = jobs.get(pred.id)
        if final.status != SUCCEEDED:
            raise gr.Error(final.error or final.status, print_exception=False)

    return submit, follow, defaults


def _signature(gr, names: list[str], defaults) -> inspect.Signature:
    """The handlers' parameters as gradio reads them: the files, the options by name with their defaults (the API's
    parameter names), the request and gradio's progress."""
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("image", kind), inspect.Parameter("audio", kind)]
    params += [inspect.Parameter(name, kind, default=getattr(defaults, name)) for name in names]
    params.append(inspect.Parameter("request", kind, default=None, annotation=gr.Request))
    params.append(inspect.Parameter("progress", kind, default=gr.Progress()))
    return inspect.Signature(params)


def animate_handler(gr, jobs, names: list[str]):
    """gradio's API endpoint ``/animate``: the portrait, the speech and the option values (in ``names`` order) in,
    the mp4 path out. It creates a prediction, follows its events into gradio's progress bar, and cancels it when
    gradio cancels the event. Bad input becomes a one-line ``gr.Error``."""
    submit, follow, defaults = _job_runner(gr, jobs, names)

    async def animate(image, audio, *values):
        *values, request, progress = values  # gradio passes the request and the progress last (the signature)
        pred, steps = await submit(image, audio, values, request)
        async for _playlist in follow(pred, steps, progress):
            pass
        return str(jobs.output_path(jobs.get(pred.id)))

    animate.__signature__ = _signature(gr, names, defaults)
    animate.__annotations__ = {"request": gr.Request}  # gradio finds the request parameter by its type hint
    return animate


def page_handler(gr, jobs, names: list[str]):
    """The page's Generate button: as :func:`animate_handler`, but a generator of ``(live, result)`` updates: the
    live player is cleared, then shown playing the job's HLS playlist (:mod:`sonic_rt.serving.live`) as soon as its
    first segment is finished, and the mp4 goes to the result at the end (the live player stays, so whoever is
    watching it is not cut off). A job that fails or is canceled takes the live player away with its segments."""
    from gradio.data_classes import FileData

    submit, follow, defaults = _job_runner(gr, jobs, names)

    async def generate(image, audio, *values):
        *values, request, progress = values
        hidden = gr.update(value=None, visible=False)
        yield hidden, None
        pred, steps = await submit(image, audio, values, request)
        try:
            async for playlist in follow(pred, steps, progress):
                # gradio's streaming player takes a stream as a FileData marked is_stream: it plays its url with hls.js
                stream = FileData(path=playlist, url=playlist, is_stream=True, orig_name="live.m3u8")
                yield gr.update(value=stream, visible=True), gr.update()
        except gr.Error:
            yield hidden, gr.update()
            raise
        yield gr.update(), str(jobs.output_path(jobs.get(pred.id)))

    generate.__signature__ = _signature(gr, names, defaults)
    generate.__annotations__ = {"request": gr.Request}  # gradio finds the request parameter by its type hint
    return generate  # not named "animate": gradio names an event after its function, and /animate is the API's


def _portrait_preprocess(component):
    """gradio's Image preprocess opens the upload with PIL first (a corrupt file would fail there with a
    generic error); this passes the uploaded file's path on as it is, so the runtime checks it."""
    original = component.preprocess

    def preprocess(payload):
        if payload is not None and getattr(payload, "path", None) and not str(payload.url or "").startswith("data:"):
            return str(payload.path)
        return original(payload)

    return preprocess


__all__ = [
    "build_page",
    "animate_handler",
    "page_handler",
    "import_gradio",
    "write_examples",
    "limits_text",
    "UI_OPTIONS",
]
