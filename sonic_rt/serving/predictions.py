"""Cog's prediction API (docs/http.md) as FastAPI routes over a :class:`~sonic_rt.serving.jobs.Jobs`.

============================================  ===========================================================
``POST /predictions``                         create; waits for the end (sync) unless ``Prefer: respond-async``
                                              (202 at once) or ``Accept: text/event-stream`` (an SSE stream)
``PUT /predictions/{id}``                     the same with the client's id: idempotent (the id again returns
                                              that prediction and starts nothing)
``GET /predictions/{id}``                     the prediction now (polling; Cog has none, Replicate's API has),
                                              or its SSE stream with ``Accept: text/event-stream``
``POST /predictions/{id}/cancel``             cancel (waiting or running); 404 for an unknown id
``GET /health-check``                         Cog's health (``STARTING``, ``READY``, ``BUSY``, ``SETUP_FAILED``,
                                              ``UNHEALTHY``; setup timings)
``GET /openapi.json``                         this API, with ``Input`` generated from ``AnimateOptions``
``GET /outputs/{token}.mp4``                  a result (``video/mp4``, ``nosniff``); the token is unguessable
``GET /streams/{token}/live.m3u8``            the job's live HLS stream while it runs (and its files
                                              ``live_init.mp4``, ``live_NNNNN.m4s``), and ``{n}.mp4``: finished
                                              segment ``n`` as a self-contained mp4 (:mod:`.live`); the same token
============================================  ===========================================================

Request body (JSON): ``input`` (:mod:`sonic_rt.serving.inputs`), ``webhook``, ``webhook_events_filter``, and
``output_as`` (``"url"``, default, or ``"data_url"``: the mp4 inline, as Cog returns files); ``id`` in a POST
body names the prediction as PUT's path does. As ``multipart/form-data``: the file inputs as file parts named
``image`` and ``audio``, every other input as a form field (its value read as JSON when it parses, else as
text: ``steps=10``, ``crop=false``), and ``webhook``, ``webhook_events_filter`` (JSON list or comma-separated),
``output_as`` and ``id`` as fields of those names.

Statuses: 200 (sync, GET, cancel), 202 (async), 401 (shared server, no or wrong key), 404, 409 (a PUT id whose body
names another id), 413/411 (body too large / without length, :class:`~sonic_rt.serving.security.SafetyMiddleware`),
422 (bad request or input, before a job exists), 429 with ``Retry-After`` (the line is full), 503 (the model did
not load). The routes take every job-level decision from :class:`Jobs`, so a Ray Serve ingress can mount the same
router over a ``Jobs`` whose runner is a deployment handle.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .. import __version__
from . import inputs as input_files
from . import live as live_stream
from .jobs import Jobs, NewPrediction, QueueFull, Unavailable
from .security import bearer_guard
from .store import WEBHOOK_EVENTS

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
OUTPUT_AS = ("url", "data_url")
REQUEST_FIELDS = ("input", "webhook", "webhook_events_filter", "output_as", "id")
MAX_WEBHOOK_URL = 2048


class BadRequest(Exception):
    """A request the API refuses before a job exists (HTTP ``status``, 422 by default)."""

    def __init__(self, detail: str, status: int = 422, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail, self.status, self.headers = detail, status, headers


def wants_events(request) -> bool:
    """Whether the client asked for a server-sent event stream (``Accept: text/event-stream``)."""
    return "text/event-stream" in request.headers.get("accept", "")


def wants_async(request) -> bool:
    """Whether the client asked for an answer at once (``Prefer: respond-async``, RFC 7240)."""
    return any(p.strip().lower() == "respond-async" for p in request.headers.get("prefer", "").split(","))


def make_router(jobs: Jobs, *, api_key: str | None = None):
    """The API's routes over ``jobs``; the prediction routes need ``Authorization: Bearer <api_key>`` when
    ``api_key`` is set (health, schema and the unguessable output links do not)."""
    router = APIRouter()
    guarded = [Depends(bearer_guard(api_key))]
    create_doc = {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}},
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "description": "file parts image and audio; other inputs and request fields as form fields",
                    }
                },
            },
        }
    }
    prediction_doc = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}}
    responses = {200: {"description": "the prediction", **prediction_doc}}
    async_responses = {**responses, 202: {"description": "accepted (Prefer: respond-async)", **prediction_doc}}

    def error(exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    def answer(pred_id: str, status: int = 200):
        return JSONResponse(jobs.render(jobs.get(pred_id)), status_code=status)

    def stream(pred_id: str):
        async def body():
            async for event, data in jobs.events(pred_id):
                yield f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

        return StreamingResponse(
            body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    async def create(request: Request, path_id: str | None):
        try:
            body, uploads, folder = await _read_body(request, jobs)
        except BadRequest as exc:
            return error(exc)
        try:
            pred_id = _request_id(body, path_id)
            if pred_id is not None and jobs.get(pred_id) is not None:  # idempotent: the existing one, nothing new
                _discard(folder)
                return await respond(request, pred_id, created=False)
            webhook, events, output_as = _request_options(body)
            if folder is None:
                folder = jobs.input_folder()
            parsed = input_files.parse_input(
                body.get("input"), folder, max_file_bytes=jobs.settings.max_upload_bytes, uploads=uploads
            )
            new = NewPrediction(
                id=pred_id,
                parsed=parsed,
                folder=folder,
                webhook=webhook,
                webhook_events_filter=events,
                output_as=output_as,
                base_url=str(request.base_url),
            )
            pred, created = await jobs.create(new)
        except BadRequest as exc:
            _discard(folder)
            return error(exc)
        except input_files.BadInput as exc:
            _discard(folder)
            return error(BadRequest(str(exc)))
        except QueueFull as exc:
            return error(BadRequest(str(exc), 429, {"Retry-After": str(exc.retry_after_s)}))
        except Unavailable as exc:
            return error(BadRequest(str(exc), 503))
        return await respond(request, pred.id, created=created)

    async def respond(request: Request, pred_id: str, *, created: bool):
        if wants_events(request):
            return stream(pred_id)
        if wants_async(request):
            return answer(pred_id, 202)
        await jobs.wait(pred_id)  # the job goes on if this client goes away
        return answer(pred_id)

    @router.post("/predictions", dependencies=guarded, openapi_extra=create_doc, responses=async_responses)
    async def create_prediction(request: Request):
        """Create a prediction (sync; async with Prefer: respond-async; SSE with Accept: text/event-stream)."""
        return await create(request, None)

    @router.put(
        "/predictions/{prediction_id}", dependencies=guarded, openapi_extra=create_doc, responses=async_responses
    )
    async def create_prediction_idempotent(prediction_id: str, request: Request):
        """Create the prediction with this id, or return it if it exists (nothing starts twice)."""
        if not ID_PATTERN.match(prediction_id):
            return error(BadRequest("the prediction id must be 1-128 characters of A-Z, a-z, 0-9, _ and -"))
        return await create(request, prediction_id)

    @router.get("/predictions/{prediction_id}", dependencies=guarded, responses=responses)
    async def get_prediction(prediction_id: str, request: Request):
        """The prediction (polling), or its event stream with Accept: text/event-stream."""
        if jobs.get(prediction_id) is None:
            return error(BadRequest(f"no prediction {prediction_id!r}", 404))
        return stream(prediction_id) if wants_events(request) else answer(prediction_id)

    @router.post("/predictions/{prediction_id}/cancel", dependencies=guarded, responses=responses)
    async def cancel_prediction(prediction_id: str):
        """Cancel a waiting or running prediction; answers once it has stopped."""
        pred = await jobs.cancel(prediction_id)
        if pred is None:
            return error(BadRequest(f"no prediction {prediction_id!r}", 404))
        return answer(prediction_id)

    @router.get("/health-check")
    async def health_check():
        """Cog's health: always 200; the status is in the body."""
        return jobs.health()

    @router.get("/outputs/{token}.mp4", include_in_schema=True)
    async def output(token: str):
        """A result as video/mp4 (the link in a prediction's output), until it expires (404 after)."""
        path = jobs.output_file(token)
        if path is None:
            return error(BadRequest("no such output (it may have expired)", 404))
        return FileResponse(
            path,
            media_type="video/mp4",
            filename="sonic.mp4",
            content_disposition_type="inline",
            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
        )

    @router.get("/streams/{token}/{name}", include_in_schema=True)
    async def stream_file(token: str, name: str):
        """A job's live stream (the playlist, its init and media segments, or ``{n}.mp4``: finished segment n as a
        self-contained mp4), from the first finished segment until the output expires (404 before and after, and
        once the job failed or was canceled)."""
        found = jobs.stream_part(token, name)
        if found is None:
            return error(BadRequest("no such stream file (not finished yet, or removed)", 404))
        media_type, body = found
        # the playlist grows while the job runs; a finished segment never changes
        cache = "no-store" if media_type == live_stream.PLAYLIST_TYPE else "private, max-age=3600"
        headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": cache}
        if isinstance(body, Path):
            return FileResponse(body, media_type=media_type, headers=headers)
        return Response(body, media_type=media_type, headers=headers)

    @router.get("/openapi.json", include_in_schema=False)
    async def openapi():
        """This API as OpenAPI 3, its ``Input`` generated from AnimateOptions."""
        return openapi_document(router.routes)

    return router


# ------------------------------------------------------------------------------------------------------ bodies
async def _read_body(request, jobs: Jobs) -> tuple[dict[str, Any], dict[str, Path], Path | None]:
    """The request as a dict, the multipart file inputs stored in a new input folder, and that folder."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await _read_multipart(request, jobs)
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise BadRequest("the request body is not JSON (send application/json or multipart/form-data)") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object with an 'input' object")
    return body, {}, None


async def _read_multipart(request, jobs: Jobs) -> tuple[dict[str, Any], dict[str, Path], Path | None]:
    from starlette.datastructures import UploadFile

    limit = jobs.settings.max_upload_bytes
    try:
        form = await request.form(max_files=len(input_files.FILE_INPUTS), max_fields=64)
    except Exception as exc:  # starlette's MultiPartException and parser errors
        raise BadRequest(f"the multipart body cannot be read: {exc}") from None
    body: dict[str, Any] = {"input": {}}
    uploads: dict[str, Path] = {}
    folder = None
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in input_files.FILE_INPUTS:
                    raise BadRequest(f"file part {name!r}: only {', '.join(input_files.FILE_INPUTS)} are files")
                if value.size is not None and value.size > limit:
                    raise BadRequest(f"input.{name}: the file is {value.size} bytes; this server accepts up to {limit}")
                folder = folder or jobs.input_folder()
                path = folder / f"{name}{input_files.safe_suffix(value.filename)}"
                with open(path, "wb") as out:
                    shutil.copyfileobj(value.file, out)
                if path.stat().st_size > limit:
                    raise BadRequest(f"input.{name}: the file is larger than this server's {limit} bytes")
                uploads[name] = path
            elif name in ("webhook", "output_as", "id"):
                body[name] = value
            elif name == "webhook_events_filter":
                body[name] = _json_or(value, None) or [e.strip() for e in value.split(",") if e.strip()]
            elif name == "input":
                raise BadRequest("multipart: send the inputs as separate fields, not one 'input' field")
            else:
                body["input"][name] = _json_or(value, value)
    except BadRequest:
        _discard(folder)
        raise
    finally:
        await form.close()
    return body, uploads, folder


def _json_or(text: str, fallback: Any) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return fallback


def _request_id(body: dict[str, Any], path_id: str | None) -> str | None:
    body_id = body.get("id")
    if body_id is not None and (not isinstance(body_id, str) or not ID_PATTERN.match(body_id)):
        raise BadRequest("id must be 1-128 characters of A-Z, a-z, 0-9, _ and -")
    if path_id is not None and body_id is not None and body_id != path_id:
        raise BadRequest(f"the body's id {body_id!r} is not the path's {path_id!r}", 409)
    return path_id or body_id


def _request_options(body: dict[str, Any]) -> tuple[str | None, list[str] | None, str]:
    if "output_file_prefix" in body:
        raise BadRequest(
            "output_file_prefix is not supported: outputs are served by this server (output_as: url or data_url)"
        )
    unknown = sorted(set(body) - set(REQUEST_FIELDS))
    if unknown:
        raise BadRequest(f"unknown request field {unknown[0]!r}; known: {', '.join(REQUEST_FIELDS)}")
    if "input" not in body:
        raise BadRequest("the request has no 'input'")
    webhook = body.get("webhook")
    if webhook is not None:
        if not isinstance(webhook, str) or len(webhook) > MAX_WEBHOOK_URL:
            raise BadRequest("webhook must be an http(s) URL")
        scheme, _, rest = webhook.partition("://")
        if scheme.lower() not in ("http", "https") or not rest.split("/")[0]:
            raise BadRequest("webhook must be an http(s) URL")
    events = body.get("webhook_events_filter")
    if events is not None:
        if not isinstance(events, list) or any(e not in WEBHOOK_EVENTS for e in events):
            raise BadRequest(f"webhook_events_filter must be a list of {', '.join(WEBHOOK_EVENTS)}")
    output_as = body.get("output_as", "url")
    if output_as not in OUTPUT_AS:
        raise BadRequest(f"output_as must be one of {', '.join(OUTPUT_AS)}")
    return webhook, events, output_as


def _discard(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ schema
def openapi_document(routes) -> dict[str, Any]:
    """OpenAPI 3 of the routes, with Cog's component names: ``Input`` (from AnimateOptions, through
    :func:`sonic_rt.serving.inputs.input_schema`), ``Output``, ``Status``, ``PredictionRequest``,
    ``PredictionResponse``."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title="sonic_rt",
        version=__version__,
        description="Sonic talking-head predictions: Cog's HTTP API (portrait + speech -> mp4)",
        routes=routes,
    )
    statuses = ["starting", "processing", "succeeded", "failed", "canceled"]
    doc.setdefault("components", {}).setdefault("schemas", {}).update(
        {
            "Input": input_files.input_schema(),
            "Output": {
                "title": "Output",
                "type": "string",
                "format": "uri",
                "description": "the mp4 (H.264 + AAC; 25 fps, or 12.5 without interpolation): a link on this "
                "server, kept --keep-outputs, or a data: URL with output_as data_url",
            },
            "Status": {"title": "Status", "type": "string", "enum": statuses},
            "PredictionRequest": {
                "title": "PredictionRequest",
                "type": "object",
                "required": ["input"],
                "properties": {
                    "input": {"$ref": "#/components/schemas/Input"},
                    "id": {"type": "string", "pattern": ID_PATTERN.pattern},
                    "webhook": {"type": "string", "format": "uri"},
                    "webhook_events_filter": {
                        "type": "array",
                        "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                        "default": list(WEBHOOK_EVENTS),
                    },
                    "output_as": {"type": "string", "enum": list(OUTPUT_AS), "default": "url"},
                },
            },
            "PredictionResponse": {
                "title": "PredictionResponse",
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "status": {"$ref": "#/components/schemas/Status"},
                    "input": {"$ref": "#/components/schemas/Input"},
                    "output": {"anyOf": [{"$ref": "#/components/schemas/Output"}, {"type": "null"}]},
                    "error": {"type": ["string", "null"]},
                    "logs": {"type": "string"},
                    "metrics": {"type": "object", "properties": {"predict_time": {"type": "number"}}},
                    "created_at": {"type": "string", "format": "date-time"},
                    "started_at": {"type": ["string", "null"], "format": "date-time"},
                    "completed_at": {"type": ["string", "null"], "format": "date-time"},
                    "progress": {
                        "type": "object",
                        "properties": {
                            "windows_done": {"type": "integer"},
                            "windows_total": {"type": "integer"},
                            "video_seconds": {"type": "number"},
                            "eta_seconds": {"type": ["number", "null"]},
                        },
                    },
                    "attempts": {"type": "integer"},
                    "data_removed": {"type": "boolean"},
                    "stream": {
                        "description": "the live stream while the video is made: the HLS playlist and each "
                        "finished segment (a self-contained mp4) with the seconds of video it covers",
                        "anyOf": [
                            {
                                "type": "object",
                                "properties": {
                                    "playlist": {"type": "string", "format": "uri"},
                                    "segments": {
                                        "type": "array",
                                        "items": {
                                            "type": "object",
                                            "properties": {
                                                "index": {"type": "integer"},
                                                "url": {"type": "string", "format": "uri"},
                                                "start_seconds": {"type": "number"},
                                                "end_seconds": {"type": "number"},
                                            },
                                        },
                                    },
                                    "ended": {"type": "boolean"},
                                },
                            },
                            {"type": "null"},
                        ],
                    },
                    "urls": {"type": "object"},
                },
            },
        }
    )
    return doc


__all__ = ["make_router", "openapi_document", "wants_events", "wants_async", "BadRequest", "ID_PATTERN"]
