"""``python -m sonic_rt serve``: the predictions API and the web page over one Runtime, in one process.

One FastAPI app served by uvicorn: Cog's prediction routes (:mod:`sonic_rt.serving.predictions`), ``/healthz``
for load balancers, and the gradio page at ``/`` (:mod:`sonic_rt.serving.page`; left out with ``--no-page``), all
over one :class:`~sonic_rt.serving.jobs.Jobs` whose runner is a :class:`~sonic_rt.serving.local.LocalRunner`.
The port answers at once; the model loads in the background (``/health-check`` says ``STARTING``, then ``READY``
or ``SETUP_FAILED``). :class:`~sonic_rt.serving.security.SafetyMiddleware` wraps everything.

Files: job records, inputs and outputs in ``--workdir`` (default ``~/.cache/sonic_rt/serve``, mode 0700), kept
across restarts; gradio's uploads and the page's example in a private temporary directory removed on exit.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from ..errors import SonicError

API_KEY_ENV = "SONIC_RT_API_KEY"
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"7d"`` -> seconds (argparse type)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h, 7d)")
    return float(match[1]) * _UNITS[match[2]]


def default_workdir() -> Path:
    """``$SONIC_RT_CACHE/serve`` (``~/.cache/sonic_rt/serve``)."""
    from ..demo import default_cache_dir

    return default_cache_dir() / "serve"


def add_parser(sub) -> None:
    """The ``serve`` subcommand (cheap: imports nothing heavy)."""
    p = sub.add_parser(
        "serve",
        help="serve Cog's predictions API and a web page over one loaded runtime (extra: ui)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Serve Cog's HTTP predictions API (/predictions, /health-check, /openapi.json), /healthz and "
        "a gradio web page over one runtime. Needs the 'ui' extra (pip install -e '.[ui]'). docs/serve.md.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", type=Path, help="official-layout Sonic checkpoint (or engine) directory")
    src.add_argument(
        "--demo", action="store_true", help="use the random-weight demo checkpoint (install check; not a talking face)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback needs --api-key")
    p.add_argument("--port", type=int, default=7860, help="TCP port")
    p.add_argument(
        "--api-key",
        default=None,
        help=f"key for the API (Authorization: Bearer KEY) and the page's login (password); default: ${API_KEY_ENV}",
    )
    p.add_argument(
        "--insecure", action="store_true", help="serve a non-loopback --host without a key (anyone can run jobs)"
    )
    p.add_argument(
        "--allow-private-urls",
        action="store_true",
        help="let http(s) file inputs and webhooks reach private, loopback and link-local addresses",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="job records, inputs and outputs (None: $SONIC_RT_CACHE/serve, ~/.cache/sonic_rt/serve)",
    )
    p.add_argument("--keep-outputs", type=duration, default="1h", help="how long results are kept (90s, 30m, 1h, 7d)")
    p.add_argument(
        "--keep-records", type=duration, default="24h", help="how long finished job records (and their ids) are kept"
    )
    p.add_argument("--public-url", default=None, help="URL prefix of output links (default: the request's own)")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="jobs that run at once; the others queue (default: 1; with --ray: the replicas, or max_replicas)",
    )
    p.add_argument("--max-audio-seconds", type=float, default=600.0, help="longest speech accepted, seconds")
    p.add_argument("--max-upload-mb", type=float, default=50.0, help="largest file input accepted, MB")
    p.add_argument("--max-queue", type=int, default=64, help="jobs that may wait; one more gets 429")
    p.add_argument("--fetch-timeout", type=float, default=30.0, help="time limit of one http(s) input download, s")
    p.add_argument("--no-page", action="store_true", help="serve the API only (no gradio page; gradio not needed)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"], help="as for animate")
    p.add_argument(
        "--compile",
        default="auto",
        choices=("auto", "on", "off"),
        help="torch.compile of the UNet, as for animate. auto (default): on a CPU with a C++ compiler the server "
        "compiles its default square shape in a low-priority background process unless the on-disk cache already "
        "holds it; jobs run uncompiled until then and compiled after (no job waits for it); on: the first job of "
        "each shape compiles; off: never",
    )
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow checkpoint pickles that need arbitrary code (only for files you trust)",
    )
    from .ray_app import add_flags as add_ray_flags  # imports no Ray

    add_ray_flags(p)


def max_body_bytes(max_upload_bytes: int) -> int:
    """The largest request body: two file inputs as base64 ``data:`` URLs (4/3 of their size) plus 1 MiB for the
    rest of the request and multipart framing."""
    return math.ceil(2 * max_upload_bytes * 4 / 3) + 1024 * 1024


def build_app(
    jobs,
    *,
    api_key: str | None = None,
    page: bool = True,
    demo: bool = False,
    upload_dir: Path | None = None,
    max_upload_mb: float = 50.0,
):
    """The ASGI app: the API router, ``/healthz``, the page (unless ``page`` is False), inside
    :class:`~sonic_rt.serving.security.SafetyMiddleware`. Its lifespan starts and closes ``jobs``.

    Args:
        jobs: the :class:`~sonic_rt.serving.jobs.Jobs` (not started yet).
        api_key: the key of a shared server (Bearer on the API, the page's login password), or None.
        page: mount the gradio page at ``/``.
        demo: the page shows the random-weights banner from the start.
        upload_dir: gradio's upload folder and the page's example (a private temporary directory).
        max_upload_mb: the page's stated and enforced upload limit.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    from .predictions import make_router
    from .security import SafetyMiddleware, page_login

    @asynccontextmanager
    async def lifespan(_app):
        await jobs.start()
        try:
            yield
        finally:
            await jobs.close()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.include_router(make_router(jobs, api_key=api_key))

    @app.get("/healthz")
    def healthz():
        """For load balancers: 200 once the model is loaded (503 before, or if it failed)."""
        model = jobs.runner.describe()
        body = {
            "status": "ok" if jobs.ready else jobs.health()["status"].lower(),
            "model": model.get("model"),
            "demo": model.get("demo"),
            "device": model.get("device"),
            "backend": model.get("backend"),
            "jobs_running": jobs.running,
            "jobs_waiting": jobs.waiting,
            "jobs_done": jobs.done,
        }
        return JSONResponse(body, status_code=200 if jobs.ready else 503)

    if page:
        from .page import build_page, import_gradio

        gr = import_gradio()
        examples = upload_dir / "examples" if upload_dir is not None else None
        blocks, theme, css = build_page(jobs, demo=demo, max_upload_mb=max_upload_mb, examples_dir=examples)
        app = gr.mount_gradio_app(
            app,
            blocks,
            path="/",
            # only the results and the example are "allowed" (served inline); uploads stay gradio's own files,
            # which it serves as downloads unless their type is safe (and SafetyMiddleware makes sure of it)
            allowed_paths=[str(jobs.outputs)] + ([str(examples)] if examples is not None else []),
            auth=page_login(api_key) if api_key else None,
            auth_message="This server is shared: the password is its API key." if api_key else None,
            show_error=True,
            max_file_size=int(max_upload_mb * 1024 * 1024),
            ssr_mode=False,
            pwa=False,
            mcp_server=False,
            theme=theme,
            css=css,
            footer_links=["api"],
        )
    return SafetyMiddleware(app, max_body_bytes=max_body_bytes(int(max_upload_mb * 1024 * 1024)))


def run(args: argparse.Namespace) -> int:
    """``serve``: check the flags, open the work directory, serve until interrupted (the model loads meanwhile)."""
    from .security import check_bind

    if getattr(args, "ray", None) is not None:  # the API on a Ray cluster (sonic_rt/serving/ray_app.py)
        from .ray_app import run as run_on_ray

        return run_on_ray(args)
    if args.concurrency is None:
        args.concurrency = 1
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    warning = check_bind(args.host, args.api_key, args.insecure)
    for name in ("concurrency", "max_queue"):
        if getattr(args, name) < 1:
            raise SonicError(f"--{name.replace('_', '-')} must be at least 1")
    tmp = Path(tempfile.mkdtemp(prefix="sonic_rt-serve-"))  # mode 0700: gradio's uploads, the example
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    try:
        import uvicorn

        from .jobs import Jobs, Settings
        from .local import LocalRunner

        if not args.no_page:
            from .page import import_gradio

            import_gradio()  # a missing gradio fails now, in one line
        workdir = Path(args.workdir) if args.workdir is not None else default_workdir()
        workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if args.demo:
            from ..demo import ensure_demo_model

            model_dir = ensure_demo_model()
            print(
                f"using the RANDOM-WEIGHT demo checkpoint at {model_dir}: the video checks the install, "
                "it is not a talking face",
                file=sys.stderr,
            )
        else:
            model_dir = Path(args.model)
            if not model_dir.is_dir():
                raise SonicError("not a directory (give an official-layout checkpoint folder)", model_dir)

        def load():
            from ..compiling import warm_for_serving
            from ..runtime import Runtime

            runtime = Runtime(
                model_dir, device=args.device, dtype=args.dtype, trust_pickle=args.trust_pickle, compile=args.compile
            )
            warm_for_serving(runtime, lambda line: print(f"sonic_rt serve: {line}", file=sys.stderr, flush=True))
            return runtime

        settings = Settings(
            concurrency=args.concurrency,
            max_queue=args.max_queue,
            max_audio_seconds=args.max_audio_seconds,
            max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
            keep_outputs_s=args.keep_outputs,
            keep_records_s=args.keep_records,
            fetch_timeout_s=args.fetch_timeout,
            allow_private_urls=args.allow_private_urls,
            public_url=(args.public_url.rstrip("/") + "/") if args.public_url else None,
        )
        runner = LocalRunner(load=load, threads=args.concurrency, name=model_dir.name)
        jobs = Jobs(runner, workdir, settings)
        if jobs.lost:
            print(
                f"sonic_rt serve: {len(jobs.lost)} job(s) of a previous server were lost and are now 'failed'",
                file=sys.stderr,
            )
        app = build_app(
            jobs,
            api_key=args.api_key,
            page=not args.no_page,
            demo=args.demo,
            upload_dir=tmp,
            max_upload_mb=args.max_upload_mb,
        )
        if warning:
            bar = "!" * min(len(warning), 100)
            print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
        shared = "API key required" if args.api_key else "no key (loopback only)" if not warning else "NO KEY"
        print(
            f"sonic_rt serve: http://{args.host}:{args.port}/ ({shared}; predictions: /predictions, health: "
            f"/health-check and /healthz; records and outputs in {workdir}; uploads in {tmp}, removed on exit)",
            file=sys.stderr,
            flush=True,
        )
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["add_parser", "run", "build_app", "duration", "default_workdir", "max_body_bytes", "API_KEY_ENV"]
