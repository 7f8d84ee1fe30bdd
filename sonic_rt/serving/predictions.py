"""Cog's prediction API (docs/http.md) as FastAPI routes over a :class:`~sonic_rt.serving.jobs.Jobs`.

============================================  ===========================================================
``POST /predictions``                         create; waits for the end (sync) unless ``Prefer: respond-async``
                                              (202 at once) or ``Accept: text/event-stream`` (an SSE stream)
``PUT /predictions/{id}``                     the same with the client's id: idempotent (the id again returns
                                              that prediction and starts nothing)
``GET /predictions/{id}``                     the prediction now (polling; Cog has none, Replicate's API has),
                                              or its SSE stream with ``Accept: text/event-stream`` (resumed after
                                              ``Last-Event-ID``; a comment every 15 s without an event)
``POST /predictions/{id}/cancel``             cancel (waiting or running); 404 for an unknown id
``GET /health-check``                         Cog's health (``STARTING``, ``READY``, ``BUSY``, ``SETUP_FAILED``,
                                              ``UNHEALTHY``, ``STOPPING``; setup timings)
``GET /healthz``                              for load balancers: 200 once the model is loaded, 503 otherwise
``GET /metrics``                              Prometheus' text format (:mod:`sonic_rt.serving.metrics`)
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

Every route is a module-level function; the app holds the shared state (``app.state.jobs``, ``app.state.api_key``,
set by :func:`sonic_rt.serving.app.build_app`), which the routes get through FastAPI dependencies (:func:`get_jobs`,
and :func:`~sonic_rt.serving.security.require_api_key` for the key). Every refusal answers ``{"detail": "<one
line naming the field>"}`` with its status, as ``/openapi.json`` declares: 400/411/413 (the body's length,
:class:`~sonic_rt.serving.security.SafetyMiddleware`), 401 (a shared server, no or wrong key), 404, 409 (a PUT id
whose body names another id), 422 (bad request or input, before a job exists: unknown names, wrong types, a
webhook filter with unknown events, a webhook or ``http(s)`` input the public-address rule refuses), 429 with
``Retry-After`` (the line is full), 503 with ``Retry-After`` (the model did not load, or the server is stopping).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from .. import __version__
from . import inputs as input_files
from . import live as live_stream
from .jobs import Jobs, NewPrediction, QueueFull, Stopping, Unavailable
from .security import destination_refusal, require_api_key
from .store import WEBHOOK_EVENTS

ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
TOKEN_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
OUTPUT_AS = ("url", "data_url")
REQUEST_FIELDS = ("input", "webhook", "webhook_events_filter", "output_as", "id")
MAX_WEBHOOK_URL = 2048
ALLOW_PRIVATE_HINT = "--allow-private-urls"


class BadRequest(Exception):
    """A request the API refuses before a job exists (HTTP ``status``, 422 by default); answered as
    ``{"detail": detail}`` by the handler :func:`sonic_rt.serving.app.build_app` installs."""

    def __init__(self, detail: str, status: int = 422, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.detail, self.status, self.headers = detail, status, headers


def wants_events(request) -> bool:
    """Whether the client asked for a server-sent event stream (``Accept: text/event-stream``)."""
    return "text/event-stream" in request.headers.get("accept", "")


def wants_async(request) -> bool:
    """Whether the client asked for an answer at once (``Prefer: respond-async``, RFC 7240)."""
    return any(p.strip().lower() == "respond-async" for p in request.headers.get("prefer", "").split(","))


def get_jobs(request: Request) -> Jobs:
    """The app's :class:`Jobs` (a FastAPI dependency)."""
    return request.app.state.jobs


JobsDep = Annotated[Jobs, Depends(get_jobs)]
KEY = [Depends(require_api_key)]
PredictionId = Annotated[str, PathParam(pattern=ID_PATTERN.pattern, description="1-128 of A-Z a-z 0-9 _ -")]
Prefer = Annotated[
    str | None, Header(description="respond-async: answer 202 at once instead of when it has ended (RFC 7240)")
]
LastEventId = Annotated[
    str | None,
    Header(
        alias="Last-Event-ID",
        description="with Accept: text/event-stream, the id of the last event received: the stream resumes after it",
    ),
]


# ---------------------------------------------------------------------------------------------- the documentation
def _error(description: str, retry_after: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if retry_after:
        doc["headers"] = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "integer"}}}
    return doc


_JSON_PREDICTION = {"application/json": {"schema": {"$ref": "#/components/schemas/PredictionResponse"}}}
_SSE = {"text/event-stream": {"schema": {"type": "string", "description": "server-sent events (docs/serve.md)"}}}
_LINKS = {
    "GetPrediction": {"operationId": "get_prediction", "parameters": {"prediction_id": "$response.body#/id"}},
    "CancelPrediction": {"operationId": "cancel_prediction", "parameters": {"prediction_id": "$response.body#/id"}},
}
UNAUTHORIZED = {401: _error("a shared server: no or wrong key (WWW-Authenticate: Bearer)")}
CREATE_RESPONSES = {
    200: {
        "description": "the prediction once it has ended, or its event stream",
        "content": {**_JSON_PREDICTION, **_SSE},
        "links": _LINKS,
    },
    202: {"description": "accepted (Prefer: respond-async)", "content": _JSON_PREDICTION, "links": _LINKS},
    400: _error("Content-Length is not a number"),
    **UNAUTHORIZED,
    409: _error("the body's id is not the path's"),
    411: _error("a body without Content-Length"),
    413: _error("the body is larger than this server accepts (--max-upload-mb)"),
    422: _error("a bad request or input, before a job exists; the detail names the field"),
    429: _error("the waiting line is full (--max-queue)", retry_after=True),
    503: _error("the model did not load, or the server is stopping", retry_after=True),
}
_EVENT = f"(?:{'|'.join(WEBHOOK_EVENTS)})"
_MULTIPART = {
    "type": "object",
    "required": ["image", "audio"],
    "properties": {
        **{
            name: {"type": "string", "format": "binary", "description": text}
            for name, text in input_files.FILE_INPUTS.items()
        },
        "id": {"type": "string", "pattern": ID_PATTERN.pattern},
        "webhook": {"type": "string", "pattern": input_files.HTTP_URL.pattern, "maxLength": MAX_WEBHOOK_URL},
        "webhook_events_filter": {
            "type": "string",
            "pattern": f"^(?:{_EVENT}(?:,{_EVENT})*)?$",
            "description": "comma-separated (a JSON list is read too)",
        },
        "output_as": {"type": "string", "enum": list(OUTPUT_AS)},
    },
    "additionalProperties": False,
    "description": "the file parts image and audio and the request's fields; every other input may follow as a form "
    "field of its name (its value read as JSON when it parses, else as text: steps=10, crop=false)",
}
CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/PredictionRequest"}},
            "multipart/form-data": {"schema": _MULTIPART},
        },
    }
}


# --------------------------------------------------------------------------------------------------- the routes
router = APIRouter()


@router.post(
    "/predictions",
    dependencies=KEY,
    openapi_extra=CREATE_BODY,
    responses=CREATE_RESPONSES,
    operation_id="create_prediction",
)
async def create_prediction(request: Request, jobs: JobsDep, prefer: Prefer = None):
    """Create a prediction (sync; async with Prefer: respond-async; SSE with Accept: text/event-stream)."""
    return await _create(request, jobs, None)


@router.put(
    "/predictions/{prediction_id}",
    dependencies=KEY,
    openapi_extra=CREATE_BODY,
    responses=CREATE_RESPONSES,
    operation_id="put_prediction",
)
async def put_prediction(prediction_id: PredictionId, request: Request, jobs: JobsDep, prefer: Prefer = None):
    """Create the prediction with this id, or return it if it exists (nothing starts twice)."""
    return await _create(request, jobs, prediction_id)


@router.get(
    "/predictions/{prediction_id}",
    dependencies=KEY,
    operation_id="get_prediction",
    responses={
        200: {"description": "the prediction, or its event stream", "content": {**_JSON_PREDICTION, **_SSE}},
        204: {"description": "Last-Event-ID was its completed event: nothing more (an EventSource stops)"},
        **UNAUTHORIZED,
        404: _error("no such prediction (never made, or its record expired: --keep-records)"),
        422: _error("not a prediction id"),
    },
)
async def get_prediction(
    prediction_id: PredictionId, request: Request, jobs: JobsDep, last_event_id: LastEventId = None
):
    """The prediction (polling), or its event stream with Accept: text/event-stream."""
    if jobs.get(prediction_id) is None:
        raise BadRequest(f"no prediction {prediction_id!r}", 404)
    if not wants_events(request):
        return _answer(jobs, prediction_id)
    if jobs.resumed_past_end(prediction_id, last_event_id):
        return Response(status_code=204)
    return _stream(jobs, prediction_id, last_event_id)


@router.post(
    "/predictions/{prediction_id}/cancel",
    dependencies=KEY,
    operation_id="cancel_prediction",
    responses={
        200: {"description": "the prediction, stopped (or as it ended)", "content": _JSON_PREDICTION},
        **UNAUTHORIZED,
        404: _error("no such prediction"),
        422: _error("not a prediction id"),
    },
)
async def cancel_prediction(prediction_id: PredictionId, jobs: JobsDep):
    """Cancel a waiting or running prediction; answers once it has stopped."""
    if await jobs.cancel(prediction_id) is None:
        raise BadRequest(f"no prediction {prediction_id!r}", 404)
    return _answer(jobs, prediction_id)


@router.get(
    "/health-check",
    operation_id="health_check",
    responses={
        200: {
            "description": "always; the status is in the body",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HealthCheck"}}},
        }
    },
)
async def health_check(jobs: JobsDep):
    """Cog's health: always 200; the status is in the body."""
    return jobs.health()


@router.get(
    "/healthz",
    operation_id="healthz",
    responses={
        200: {"description": "the model is loaded", "content": {"application/json": {"schema": {"type": "object"}}}},
        503: {
            "description": "not (yet) loaded, failed, or stopping",
            "content": {"application/json": {"schema": {"type": "object"}}},
        },
    },
)
async def healthz(jobs: JobsDep):
    """For load balancers: 200 once the model is loaded (503 before, if it failed, or while stopping)."""
    model = jobs.runner.describe()
    up = jobs.ready and jobs.stopping_until is None
    body = {
        "status": "ok" if up else jobs.health()["status"].lower(),
        "model": model.get("model"),
        "demo": model.get("demo"),
        "device": model.get("device"),
        "backend": model.get("backend"),
        "jobs_running": jobs.running,
        "jobs_waiting": jobs.waiting,
        "jobs_done": jobs.done,
    }
    return JSONResponse(body, status_code=200 if up else 503)


@router.get(
    "/metrics",
    dependencies=KEY,
    operation_id="metrics",
    responses={
        200: {
            "description": "Prometheus' text format (docs/serve.md 'Operations')",
            "content": {"text/plain": {"schema": {"type": "string"}}},
        },
        **UNAUTHORIZED,
    },
    response_class=Response,
)
async def metrics(jobs: JobsDep):
    """The server's metrics in Prometheus' text format."""
    body, content_type = jobs.metrics.exposition()
    return Response(body, media_type=content_type)


@router.get(
    "/outputs/{token}.mp4",
    operation_id="output",
    responses={
        200: {"description": "the mp4", "content": {"video/mp4": {"schema": {"type": "string", "format": "binary"}}}},
        404: _error("no such output (it may have expired)"),
        422: _error("not a token"),
    },
    response_class=Response,
)
async def output(token: str, jobs: JobsDep):
    """A result as video/mp4 (the link in a prediction's output), until it expires (404 after)."""
    path = jobs.output_file(token)
    if path is None:
        raise BadRequest("no such output (it may have expired)", 404)
    return FileResponse(
        path,
        media_type="video/mp4",
        filename="sonic.mp4",
        content_disposition_type="inline",
        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "private, max-age=3600"},
    )


@router.get(
    "/streams/{token}/{name}",
    operation_id="stream_file",
    responses={
        200: {
            "description": "a file of the live stream",
            "content": {
                live_stream.PLAYLIST_TYPE: {"schema": {"type": "string"}},
                live_stream.MP4_TYPE: {"schema": {"type": "string", "format": "binary"}},
                live_stream.SEGMENT_TYPE: {"schema": {"type": "string", "format": "binary"}},
            },
        },
        404: _error("no such stream file (not finished yet, or removed)"),
        422: _error("not a token or a file name"),
    },
    response_class=Response,
)
async def stream_file(token: str, name: str, jobs: JobsDep):
    """A job's live stream (the playlist, its init and media segments, or ``{n}.mp4``: finished segment n as a
    self-contained mp4), from the first finished segment until the output expires (404 before and after, and
    once the job failed or was canceled)."""
    found = jobs.stream_part(token, name)
    if found is None:
        raise BadRequest("no such stream file (not finished yet, or removed)", 404)
    media_type, body = found
    # the playlist grows while the job runs; a finished segment never changes
    cache = "no-store" if media_type == live_stream.PLAYLIST_TYPE else "private, max-age=3600"
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": cache}
    if isinstance(body, Path):
        return FileResponse(body, media_type=media_type, headers=headers)
    return Response(body, media_type=media_type, headers=headers)


@router.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request):
    """This API as OpenAPI 3, its ``Input`` generated from AnimateOptions."""
    return openapi_document(request.app.routes)


# ------------------------------------------------------------------------------------------------------ creating
def _answer(jobs: Jobs, pred_id: str, status: int = 200) -> JSONResponse:
    return JSONResponse(jobs.render(jobs.get(pred_id)), status_code=status)


def _stream(jobs: Jobs, pred_id: str, last_event_id: str | None = None) -> StreamingResponse:
    async def body():
        async for event, data, event_id in jobs.events(pred_id, last_event_id):
            if event == "heartbeat":
                yield ": heartbeat\n\n"
                continue
            head = f"id: {event_id}\n" if event_id else ""
            yield f"{head}event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


async def _create(request: Request, jobs: Jobs, path_id: str | None):
    body, uploads, folder = await _read_body(request, jobs)
    try:
        pred_id = _request_id(body, path_id)
        webhook, events, output_as = _request_options(body)
        if folder is None:
            folder = jobs.input_folder()
        parsed = input_files.parse_input(
            body.get("input"), folder, max_file_bytes=jobs.settings.max_upload_bytes, uploads=uploads
        )
        await _check_destinations(webhook, parsed, jobs.settings.allow_private_urls)
        if pred_id is not None and jobs.get(pred_id) is not None:  # idempotent: the existing one, nothing new
            _discard(folder)
            return await _respond(request, jobs, pred_id)
        new = NewPrediction(
            id=pred_id,
            parsed=parsed,
            folder=folder,
            webhook=webhook,
            webhook_events_filter=events,
            output_as=output_as,
            base_url=str(request.base_url),
        )
        pred, _ = await jobs.create(new)
    except BadRequest:
        _discard(folder)
        raise
    except input_files.BadInput as exc:
        _discard(folder)
        raise BadRequest(str(exc)) from None
    except QueueFull as exc:
        raise BadRequest(str(exc), 429, {"Retry-After": str(exc.retry_after_s)}) from None
    except Stopping as exc:
        raise BadRequest(str(exc), 503, {"Retry-After": str(exc.retry_after_s)}) from None
    except Unavailable as exc:
        raise BadRequest(str(exc), 503, {"Retry-After": "60"}) from None
    return await _respond(request, jobs, pred.id)


async def _respond(request: Request, jobs: Jobs, pred_id: str):
    if wants_events(request):
        return _stream(jobs, pred_id)
    if wants_async(request):
        return _answer(jobs, pred_id, 202)
    await jobs.wait(pred_id)  # the job goes on if this client goes away
    return _answer(jobs, pred_id)


async def _check_destinations(webhook: str | None, parsed: input_files.ParsedInput, allow_private: bool) -> None:
    """Refuse now (422) a webhook or ``http(s)`` input that the public-address rule would refuse later."""
    named = [("webhook", webhook)] if webhook else []
    named += [(f"input.{name}", source["url"]) for name, source in parsed.files.items() if "url" in source]
    for field, url in named:
        why = await destination_refusal(url, allow_private)
        if why:
            raise BadRequest(f"{field}: {why}")


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
    body_id = body.get("id")  # null: none
    if body_id is not None and (not isinstance(body_id, str) or not ID_PATTERN.fullmatch(body_id)):
        raise BadRequest("id: 1-128 characters of A-Z, a-z, 0-9, _ and -")
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
        if (
            not isinstance(webhook, str)
            or len(webhook) > MAX_WEBHOOK_URL
            or not input_files.HTTP_URL.fullmatch(webhook)
        ):
            raise BadRequest(f"webhook: not an http(s) URL of at most {MAX_WEBHOOK_URL} characters")
    events = body.get("webhook_events_filter")
    if events is not None:
        if not isinstance(events, list):
            raise BadRequest(f"webhook_events_filter: a list of {', '.join(WEBHOOK_EVENTS)}")
        unknown = [e for e in events if e not in WEBHOOK_EVENTS]
        if unknown:
            raise BadRequest(
                f"webhook_events_filter: unknown event {unknown[0]!r}; the events are {', '.join(WEBHOOK_EVENTS)}"
            )
    output_as = body.get("output_as")
    output_as = "url" if output_as is None else output_as
    if output_as not in OUTPUT_AS:
        raise BadRequest(f"output_as: one of {', '.join(OUTPUT_AS)}")
    return webhook, events, output_as


def _discard(folder: Path | None) -> None:
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ schema
def openapi_document(routes) -> dict[str, Any]:
    """OpenAPI 3 of the routes, with Cog's component names: ``Input`` (from AnimateOptions, through
    :func:`sonic_rt.serving.inputs.input_schema`), ``Output``, ``Status``, ``PredictionRequest``,
    ``PredictionResponse``, and ``Error`` (every refusal's body) and ``HealthCheck``."""
    from fastapi.openapi.utils import get_openapi

    doc = get_openapi(
        title="sonic_rt",
        version=__version__,
        description="Sonic talking-head predictions: Cog's HTTP API (portrait + speech -> mp4)",
        routes=routes,
    )
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_service_schemas())
    schemas.update(_prediction_schemas())
    return doc


def _service_schemas() -> dict[str, Any]:
    """``Input``, ``Error``, ``HealthCheck``."""
    return {
        "Input": input_files.input_schema(),
        "Error": {
            "title": "Error",
            "type": "object",
            "required": ["detail"],
            "properties": {"detail": {"type": "string", "description": "one line naming the field or the limit"}},
        },
        "HealthCheck": {
            "title": "HealthCheck",
            "type": "object",
            "required": ["status", "setup"],
            "properties": {
                "status": {"type": "string", "enum": list(HEALTH_STATUSES)},
                "setup": {
                    "type": "object",
                    "properties": {
                        "started_at": {"type": ["string", "null"]},
                        "completed_at": {"type": ["string", "null"]},
                        "status": {"type": "string"},
                        "logs": {"type": "string"},
                    },
                },
                "queue": {"type": "object"},
                "model": {"type": "object"},
            },
        },
    }


def _prediction_schemas() -> dict[str, Any]:
    """``Output``, ``Status``, ``PredictionRequest``, ``PredictionResponse``."""
    statuses = ["starting", "processing", "succeeded", "failed", "canceled"]
    return {
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
            "additionalProperties": False,
            "properties": {
                "input": {"$ref": "#/components/schemas/Input"},
                "id": {"type": ["string", "null"], "pattern": ID_PATTERN.pattern},
                "webhook": {
                    "type": ["string", "null"],
                    "pattern": input_files.HTTP_URL.pattern,
                    "maxLength": MAX_WEBHOOK_URL,
                    "description": "where the prediction is POSTed at each event; a public address unless the "
                    "server runs with --allow-private-urls (else 422)",
                },
                "webhook_events_filter": {
                    "type": ["array", "null"],
                    "items": {"type": "string", "enum": list(WEBHOOK_EVENTS)},
                    "default": list(WEBHOOK_EVENTS),
                },
                "output_as": {"type": ["string", "null"], "enum": [*OUTPUT_AS, None], "default": "url"},
            },
        },
        "PredictionResponse": {
            "title": "PredictionResponse",
            "type": "object",
            "required": ["id", "status", "input", "output", "error", "logs", "metrics", "created_at"],
            "properties": {
                "id": {"type": "string"},
                "status": {"$ref": "#/components/schemas/Status"},
                "input": {
                    "type": "object",
                    "description": "the input as sent, file contents shortened ('data:image/png;base64,... "
                    "(12345 bytes)')",
                },
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


HEALTH_STATUSES = ("STARTING", "READY", "BUSY", "SETUP_FAILED", "UNHEALTHY", "STOPPING")

__all__ = ["router", "get_jobs", "openapi_document", "wants_events", "wants_async", "BadRequest", "ID_PATTERN"]
