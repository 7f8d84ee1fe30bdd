"""The ASGI app both modes serve (one process, :mod:`sonic_rt.serving.server`; the Ray ingress,
:mod:`sonic_rt.serving.ray_app`), and the settings both read from the ``serve`` flags.

:func:`build_app` puts the routes of :mod:`sonic_rt.serving.predictions` (the app holds their ``jobs`` and
``api_key``), the gradio page (optional) and the error handlers together, inside
:class:`~sonic_rt.serving.security.SafetyMiddleware` (body limits, safe headers) and
:class:`~sonic_rt.serving.metrics.RejectionCounter` (every refusal counted and logged). Importing this module
imports nothing heavy (FastAPI and gradio are imported when the app is built).
"""

from __future__ import annotations

import argparse
import math
from contextlib import asynccontextmanager
from pathlib import Path

API_KEY_ENV = "SONIC_RT_API_KEY"


def default_workdir() -> Path:
    """``$SONIC_RT_CACHE/serve`` (``~/.cache/sonic_rt/serve``)."""
    from ..demo import default_cache_dir

    return default_cache_dir() / "serve"


def max_body_bytes(max_upload_bytes: int) -> int:
    """The largest request body: two file inputs as base64 ``data:`` URLs (4/3 of their size) plus 1 MiB for the
    rest of the request and multipart framing."""
    return math.ceil(2 * max_upload_bytes * 4 / 3) + 1024 * 1024


def settings_from_args(args: argparse.Namespace, concurrency: int):
    """The :class:`~sonic_rt.serving.jobs.Settings` the ``serve`` flags give (``concurrency`` decided by the mode)."""
    from .jobs import Settings

    return Settings(
        concurrency=concurrency,
        max_queue=args.max_queue,
        max_audio_seconds=args.max_audio_seconds,
        max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
        keep_outputs_s=args.keep_outputs,
        keep_records_s=args.keep_records,
        fetch_timeout_s=args.fetch_timeout,
        allow_private_urls=args.allow_private_urls,
        public_url=(args.public_url.rstrip("/") + "/") if args.public_url else None,
    )


def build_app(
    jobs,
    *,
    api_key: str | None = None,
    page: bool = True,
    demo: bool = False,
    upload_dir: Path | None = None,
    max_upload_mb: float = 50.0,
):
    """The ASGI app: the API's routes (with ``/healthz`` and ``/metrics``), the page (unless ``page`` is False),
    inside :class:`~sonic_rt.serving.security.SafetyMiddleware` and
    :class:`~sonic_rt.serving.metrics.RejectionCounter`. Its lifespan starts and closes ``jobs``.

    Args:
        jobs: the :class:`~sonic_rt.serving.jobs.Jobs` (not started yet).
        api_key: the key of a shared server (Bearer on the API and ``/metrics``, the page's login password), or None.
        page: mount the gradio page at ``/``.
        demo: the page shows the random-weights banner from the start.
        upload_dir: gradio's upload folder and the page's example (a private temporary directory).
        max_upload_mb: the page's stated and enforced upload limit.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from fastapi.routing import APIRoute

    from .metrics import RejectionCounter
    from .predictions import BadRequest, router
    from .security import SafetyMiddleware, page_login

    @asynccontextmanager
    async def lifespan(_app):
        await jobs.start()
        try:
            yield
        finally:
            await jobs.close()

    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.jobs, app.state.api_key = jobs, api_key
    app.include_router(router)

    @app.exception_handler(BadRequest)
    async def bad_request(_request, exc: BadRequest):
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(405)
    async def method_not_allowed(request, _exc):
        # every method of the path, not only those of the first route whose path matched (RFC 9110 15.5.6)
        allowed = sorted(
            {
                m
                for r in app.routes
                if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                for m in r.methods
            }
        )
        return JSONResponse({"detail": "Method Not Allowed"}, status_code=405, headers={"Allow": ", ".join(allowed)})

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0]  # the same one-line form as the input's checks: "path.prediction_id: ..."
        where = ".".join(str(p) for p in first.get("loc", ())) or "request"
        return JSONResponse({"detail": f"{where}: {first.get('msg', 'invalid')}"}, status_code=422)

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
    safe = SafetyMiddleware(app, max_body_bytes=max_body_bytes(int(max_upload_mb * 1024 * 1024)))
    return RejectionCounter(safe, jobs.metrics)


__all__ = ["build_app", "default_workdir", "max_body_bytes", "settings_from_args", "API_KEY_ENV"]
