"""``python -m sonic_rt serve``: a web page and an HTTP API over one loaded :class:`~sonic_rt.Runtime`.

A gradio app (optional extra ``ui``) mounted on a FastAPI app with a ``/healthz`` route, served by uvicorn:

* the page: portrait (upload or webcam), speech (upload or microphone), the options a person needs (built
  from :class:`~sonic_rt.AnimateOptions`' field metadata, same defaults), a progress bar fed from the
  runtime's ``events`` callback (windows done of steps x windows, with an ETA), the queue position while a
  job waits, a cancel button, the video (plays in the page, downloadable), a gallery of this server's results;
* the API: gradio's own, endpoint ``/animate`` (``docs/serve.md``: ``gradio_client`` and ``curl``);
* ``GET /healthz``: JSON for load balancers.

Jobs queue; ``--concurrency`` run at once (default 1: the runtime serialises its calls anyway). Bad input
shows the runtime's one-line message (:class:`~sonic_rt.SonicError`), never a traceback. Uploads, examples and
results live in one private temporary directory (mode 0700) that is removed on exit; gradio serves files
from it only. Binds to 127.0.0.1 unless ``--host`` says otherwise; no analytics, no share link, no web fonts.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: The :class:`~sonic_rt.AnimateOptions` fields shown in the page and taken by the API, in this order
#: (those the installed AnimateOptions lacks are left out).
UI_OPTIONS = ("steps", "dynamic_scale", "seed", "min_resolution", "crop", "interpolate", "paste_back")
GALLERY_SIZE = 12
DEMO_BANNER = (
    "**Demo model: the weights are RANDOM.** The video is structured noise, not a talking face; it "
    "checks the install. Start the server with `--model DIR` (the official Sonic checkpoints) for "
    "real results."
)


class Cancelled(Exception):
    """Raised in the runtime's ``events`` callback to stop a cancelled job (the output is never renamed
    into place, so nothing is left behind)."""


def add_parser(sub) -> None:
    """The ``serve`` subcommand (cheap: imports nothing heavy)."""
    p = sub.add_parser(
        "serve",
        help="serve a web page and an HTTP API over one loaded runtime (extra: ui)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve a gradio web page and HTTP API (endpoint /animate, health at /healthz) "
        "over one loaded runtime. Needs the 'ui' extra (pip install -e '.[ui]').",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="official-layout Sonic checkpoint (or engine) directory")
    src.add_argument(
        "--demo", action="store_true", help="use the random-weight demo checkpoint (install check; not a talking face)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument("--concurrency", type=int, default=1, help="jobs that run at once; the others queue")
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest speech accepted, seconds")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest upload accepted, MB")
    p.add_argument("--max-queue", type=int, default=64, help="jobs that may wait in the queue")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="as for animate")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoint pickles that need arbitrary code (only for files you trust)",
    )


# ------------------------------------------------------------------------------------------------------------
def _import_gradio():
    """gradio, with analytics off (set before the import); a one-line error when it is not installed."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_SSR_MODE", "False")
    try:
        import gradio as gr
    except ImportError as exc:
        from .errors import SonicError

        raise SonicError(f"serve needs gradio: pip install -e '.[ui]' ({exc})") from None
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


def _option_widgets(gr, runtime) -> dict:
    """One widget per :data:`UI_OPTIONS` field: label, default and help from the field's metadata."""
    from .pipeline.options import AnimateOptions

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
            value = info.default
            if value is None and info.name == "min_resolution":  # None: the model's own default, shown
                value = runtime.default_min_resolution
            widgets[info.name] = gr.Number(
                value=value,
                label=label,
                info=help_text,
                precision=0 if kind == "int" else None,
                elem_id=f"opt-{info.name}",
            )
    return {name: widgets[name] for name in UI_OPTIONS if name in widgets}


class Server:
    """The jobs over one runtime: checks, progress, cancellation, results, gallery.

    Args:
        runtime: the loaded :class:`~sonic_rt.Runtime`.
        workdir: the private temporary directory (results go to ``workdir/results``).
        max_audio_seconds: longest speech accepted.
        concurrency: worker threads (jobs that run at once).
    """

    def __init__(self, runtime, workdir: Path, *, max_audio_seconds: float, concurrency: int):
        self.runtime, self.workdir, self.max_audio_seconds = runtime, workdir, max_audio_seconds
        self.results = workdir / "results"
        self.results.mkdir(parents=True, exist_ok=True)
        self.executor = ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix="sonic-job")
        self.gallery: list[str] = []
        self.running = 0
        self.done = 0
        self._lock = threading.Lock()

    def health(self) -> dict:
        return {
            "status": "ok",
            "model": Path(self.runtime.source).name,
            "demo": bool(self.runtime.is_demo),
            "device": str(self.runtime.device),
            "backend": self.runtime.backend,
            "jobs_running": self.running,
            "jobs_done": self.done,
        }

    def check_audio(self, audio: str):
        """Decode the speech once: the limit on its length and the window count of the progress bar."""
        from . import media

        header = media.probe_audio(audio)
        if header.duration_s > self.max_audio_seconds:
            raise _user_error(
                f"the speech is {header.duration_s:.0f} s long; this server accepts up to {self.max_audio_seconds:g} s"
            )
        samples = media.load_audio(audio)
        seconds = len(samples) / 16000
        if seconds > self.max_audio_seconds:
            raise _user_error(
                f"the speech is {seconds:.0f} s long; this server accepts up to {self.max_audio_seconds:g} s"
            )
        return samples

    def run_job(self, image, audio, options, cancel: threading.Event, report) -> str:
        """One job on a worker thread: returns the mp4's path. ``report(done, total, text)`` gets the
        progress (windows done; the text says the step, the seconds of video written so far and the ETA);
        ``cancel`` stops the job at the next window (no file is left)."""
        from .audio_features import num_generated_frames
        from .sampling import window_starts

        samples = self.check_audio(audio)
        frames = num_generated_frames(len(samples))
        total = (
            options.steps * len(window_starts(max(frames, 1), options.frames_per_window, 0, options.shift_offset))
            if options.steps > 0
            else 1
        )
        job = self.results / uuid.uuid4().hex
        job.mkdir()
        out = job / "sonic.mp4"
        done, started, written = 0, time.perf_counter(), 0.0

        def events(kind: str, info: dict) -> None:
            nonlocal done, written
            if cancel.is_set():
                raise Cancelled("cancelled")
            if kind == "frames":  # a chunk is in the video (the wavefront writes from early on)
                written = info["video_seconds"]
            if kind == "window":
                done += 1
                elapsed = time.perf_counter() - started
                eta = elapsed / done * max(total - done, 0)
                video = f", {written:.1f} s of video written" if written else ""
                report(min(done, total), total, f"step {info['step'] + 1}/{options.steps}{video}, ETA {eta:.0f} s")

        with self._lock:
            self.running += 1
        try:
            report(0, total, "preparing")
            result = self.runtime.animate(image, audio, out, options, progress=False, events=events)
        except BaseException:
            shutil.rmtree(job, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self.running -= 1
        with self._lock:
            self.done += 1
            self.gallery = [str(result.path)] + self.gallery[: GALLERY_SIZE - 1]
        return str(result.path)


def _one_line(exc) -> str:
    """The runtime's one-line message, naming an uploaded file by its name, not its server path."""
    reason = getattr(exc, "reason", None)
    path = getattr(exc, "path", None)
    text = f"{Path(path).name}: {reason}" if path and reason else str(exc)
    return " ".join(text.split())


def _user_error(message: str):
    from .errors import InputError

    return InputError(message)


def build_app(
    runtime,
    workdir: Path,
    *,
    max_audio_seconds: float = 600.0,
    max_upload_mb: float = 50.0,
    concurrency: int = 1,
    max_queue: int = 64,
):
    """The gradio Blocks and its :class:`Server`.

    Returns:
        ``(blocks, server, theme, css)``.
    """
    gr = _import_gradio()

    server = Server(runtime, workdir, max_audio_seconds=max_audio_seconds, concurrency=concurrency)
    examples = write_examples(workdir / "examples")

    with gr.Blocks(title="Sonic talking head", analytics_enabled=False) as blocks:
        gr.Markdown("# Sonic: portrait + speech -> talking-head video")
        if runtime.is_demo:
            gr.Markdown(DEMO_BANNER, elem_id="demo-banner", elem_classes=["sonic-demo-banner"])
        gr.Markdown(
            f"Limits: speech up to **{max_audio_seconds:g} s**, uploads up to **{max_upload_mb:g} MB**; "
            f"{concurrency} job{'s' if concurrency != 1 else ''} at a time on `{runtime.device}`, the "
            f"others wait in the queue (up to {max_queue}). Model: `{Path(runtime.source).name}`.",
            elem_id="limits",
        )
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
                    widgets = _option_widgets(gr, runtime)
                with gr.Row():
                    generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    cancel = gr.Button("Cancel", variant="stop", elem_id="cancel")
            with gr.Column():
                video = gr.Video(
                    label="Result", elem_id="result", autoplay=True, buttons=["download"], interactive=False
                )
                gallery = gr.Gallery(
                    label="Made since the server started", columns=3, elem_id="gallery", interactive=False
                )
        if examples:
            gr.Examples(examples=examples, inputs=[portrait, speech], label="Example (click, then Generate)")

        names = list(widgets)
        animate = _animate_handler(gr, server, names)
        job = generate.click(
            animate,
            inputs=[portrait, speech, *widgets.values()],
            outputs=video,
            api_name="animate",
            concurrency_limit=concurrency,
            concurrency_id="sonic",
        )
        job.then(lambda: list(server.gallery), None, gallery, api_visibility="private", queue=False)
        cancel.click(None, None, None, cancels=[job], api_visibility="private", queue=False)
        blocks.load(lambda: list(server.gallery), None, gallery, api_visibility="private", queue=False)

    blocks.queue(max_size=max_queue, default_concurrency_limit=concurrency)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    css = ".sonic-demo-banner { background: #fde68a; border: 2px solid #b45309; padding: 0.5em 1em; }"
    return blocks, server, theme, css


def _animate_handler(gr, server: Server, names: list[str]):
    """The page's and API's job function: the portrait, the speech and the option values (in ``names`` order)
    in, the mp4 path out; its signature names the API's parameters after the options, with their defaults.
    Bad input becomes a one-line ``gr.Error``; a cancelled job stops at its next window and leaves nothing."""
    from .errors import SonicError
    from .pipeline.options import AnimateOptions

    defaults = AnimateOptions()

    async def animate(image, audio, *values):
        *values, progress = values  # gradio passes the Progress last (see the signature below)
        if not image:
            raise gr.Error("upload a portrait (or take one with the webcam)", print_exception=False)
        if not audio:
            raise gr.Error("upload or record some speech", print_exception=False)
        chosen = {}
        for name, value in zip(names, values):
            if value is None and getattr(defaults, name) is not None:
                value = getattr(defaults, name)  # an emptied field keeps the default
            if (
                isinstance(getattr(defaults, name), int)
                and not isinstance(getattr(defaults, name), bool)
                and value is not None
            ):
                value = int(value)
            chosen[name] = value
        options = dataclasses.replace(defaults, **chosen)
        stop = threading.Event()

        def report(done, total, text):
            progress((done, total), desc=text, unit="windows")

        loop = asyncio.get_running_loop()
        context = contextvars.copy_context()  # gr.Progress finds its job through context variables
        future = loop.run_in_executor(server.executor, context.run, server.run_job, image, audio, options, stop, report)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the job raises Cancelled at its next window; wait for it to clean up
            await asyncio.wait([future])
            raise
        except Cancelled:
            raise gr.Error("cancelled", print_exception=False) from None
        except SonicError as exc:
            raise gr.Error(_one_line(exc), print_exception=False) from None

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


def make_app(runtime, workdir: Path, **limits):
    """The FastAPI app: ``/healthz`` and the gradio app at ``/``; also returns the :class:`Server`."""
    gr = _import_gradio()
    from fastapi import FastAPI

    max_upload_mb = limits.get("max_upload_mb", 50.0)
    blocks, server, theme, css = build_app(runtime, workdir, **limits)
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/healthz")
    def healthz() -> dict:
        return server.health()

    app = gr.mount_gradio_app(
        app,
        blocks,
        path="/",
        allowed_paths=[str(workdir)],
        show_error=True,
        max_file_size=int(max_upload_mb * 1024 * 1024),
        ssr_mode=False,
        pwa=False,
        mcp_server=False,
        theme=theme,
        css=css,
        footer_links=["api"],
    )
    return app, server


def run(args: argparse.Namespace) -> int:
    """``serve``: load the runtime once, serve until interrupted, remove the temporary directory."""
    workdir = Path(tempfile.mkdtemp(prefix="sonic_rt-serve-"))  # mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(workdir / "gradio")  # uploads and gradio's copies
    try:
        _import_gradio()
        import uvicorn

        from .runtime import Runtime

        if args.demo:
            from .demo import ensure_demo_model

            model_dir = ensure_demo_model()
            print(
                f"using the RANDOM-WEIGHT demo checkpoint at {model_dir}: the video checks the install, "
                "it is not a talking face",
                file=sys.stderr,
            )
        else:
            model_dir = args.model
        runtime = Runtime(model_dir, device=args.device, dtype=args.dtype, trust_pickle=args.trust_pickle)
        app, server = make_app(
            runtime,
            workdir,
            max_audio_seconds=args.max_audio_seconds,
            max_upload_mb=args.max_upload_mb,
            concurrency=args.concurrency,
            max_queue=args.max_queue,
        )
        print(
            f"sonic_rt serve: http://{args.host}:{args.port}/ (API: /animate, health: /healthz; "
            f"files in {workdir}, removed on exit)",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        server.executor.shutdown(wait=True, cancel_futures=True)
        runtime.close()
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


__all__ = ["add_parser", "run", "make_app", "build_app", "Server", "Cancelled", "UI_OPTIONS", "write_examples"]
