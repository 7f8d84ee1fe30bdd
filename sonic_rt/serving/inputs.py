"""A prediction's input: its schema (from :class:`~sonic_rt.AnimateOptions`), its checks, and its files.

* :func:`input_model`: the pydantic model of ``input``: ``image`` and ``audio`` (file inputs), every
  :class:`~sonic_rt.AnimateOptions` field a client may set (type, default, unit, source and allowed range from
  :data:`RANGES`), and the names of the Cog port of Sonic (``zsxkib/cog-sonic``'s ``predict.py``):
  ``inference_steps`` (= ``steps``) and ``keep_resolution`` (= ``paste_back``); ``image``, ``audio``,
  ``dynamic_scale``, ``min_resolution`` and ``seed`` are the same names in both. ``/openapi.json`` is built from it.
* :func:`parse_input`: a request's ``input`` -> the options to run with and the file sources, or
  :class:`BadInput` (HTTP 422) naming the field.
* File inputs (Cog docs/http.md "File inputs"): ``data:`` URLs (decoded and stored at once), multipart uploads
  (stored at once by the route), or ``http(s)`` URLs, fetched when the job starts by :func:`fetch` with a size cap,
  a time limit, and the public-address rule of :mod:`sonic_rt.serving.security`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import mimetypes
import re
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..pipeline.options import AnimateOptions
from .security import RefusedAddress, checked_address, pinned_transport

FILE_INPUTS = {
    "image": "the portrait: a data: URL, an http(s) URL or a multipart file (PNG, JPEG, WebP...; one face)",
    "audio": "the speech: a data: URL, an http(s) URL or a multipart file (wav, mp3, m4a, flac, ...)",
}
# zsxkib/cog-sonic's input names that differ from ours -> the AnimateOptions field they set.
COG_SONIC_NAMES = {"inference_steps": "steps", "keep_resolution": "paste_back"}
# AnimateOptions fields a client may not set: a server-side path (hls) and the server's own console output.
SERVER_ONLY_OPTIONS = ("hls", "progress", "return_frames")
# (minimum, maximum) of each option on this API. The minimums are the runtime's own checks (SamplingConfig for
# steps, frames_per_window and shift_offset; check_inputs for dynamic_scale and max_output_side; 64-pixel
# multiples for min_resolution) and tests/test_predictions.py checks that the runtime refuses one step below them.
# The maximums are this server's: cog-sonic's 1024 for min_resolution, four times the official 25 steps, 4096 px,
# and 32-bit seeds (exact in JSON numbers everywhere).
RANGES: dict[str, tuple[float | None, float | None]] = {
    "steps": (1, 100),
    "seed": (0, 2**32 - 1),
    "dynamic_scale": (0.0, None),
    "shift_offset": (0, 100),
    "frames_per_window": (1, 100),
    "min_resolution": (64, 1024),
    "max_output_side": (64, 4096),
}
MAX_REDIRECTS = 5
# What a file input or a webhook may be, as regular expressions (ECMA-262 and Python alike): the schema declares
# them (``/openapi.json``) and :func:`parse_input` and the routes check them, so the two cannot disagree.
# An http(s) URL: optional user info, a host name, an IPv4 address or a bracketed IPv6 address (RFC 4291 2.2's
# forms without an embedded IPv4 address), an optional port (0-65535), then any path, query and fragment.
_H4 = "[0-9A-Fa-f]{1,4}"
_IPV6 = "|".join(
    (
        f"(?:{_H4}:){{7}}{_H4}",
        f"(?:{_H4}:){{1,7}}:",
        *(f"(?:{_H4}:){{1,{6 - k}}}(?::{_H4}){{1,{k + 1}}}" for k in range(6)),
        f":(?:(?::{_H4}){{1,7}}|:)",
    )
)
_PORT = "(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
HTTP_URL = re.compile(
    rf"^https?://(?:[A-Za-z0-9._~%!$&'()*+,;=:-]*@)?(?:[A-Za-z0-9][A-Za-z0-9.-]*|\[(?:{_IPV6})\])(?::{_PORT})?"
    r"(?:[/?#][^\x00-\x20\x7f]*)?$"
)
# A data: URL (RFC 2397): base64 (valid base64, padded) or percent-encoded.
DATA_URL = re.compile(
    r"^data:[^,]*;base64,(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"
    r"|^data:[^,;]*(?:;(?!base64[;,])[^,;]*)*,[\s\S]*$"
)
FILE_URL = re.compile(f"(?:{DATA_URL.pattern})|(?:{HTTP_URL.pattern})")
_EXTENSIONS = {"image/jpeg": ".jpg", "audio/mpeg": ".mp3", "audio/wav": ".wav", "audio/x-wav": ".wav"}


class BadInput(InputError):
    """The request's input cannot be used (HTTP 422 before a job exists); the message names the field."""


class FetchError(InputError):
    """An ``http(s)`` file input could not be fetched (the prediction fails with this one-line message)."""


@dataclass
class ParsedInput:
    """A checked ``input``.

    Attributes:
        options: :class:`~sonic_rt.AnimateOptions` overrides, canonical names (only those the client set, plus a
            drawn seed when ``seed`` was null).
        files: per file input, ``{"path": local file}`` or ``{"url": http(s) URL to fetch when it starts}``.
        echo: the input as the client gave it, file contents shortened (the record's ``input``).
        notes: log lines about the input (a drawn seed).
    """

    options: dict[str, Any]
    files: dict[str, dict[str, str]]
    echo: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------------ schema
def _whole(value: Any) -> Any:
    """JSON Schema's integers include 25.0 (a number with no fraction); pydantic's strict int does not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _whole_int(name: str):
    """An int that also takes a whole float, with the range of option ``name`` (:data:`RANGES`) on the int itself
    (so that the schema of ``int | None`` carries it)."""
    from typing import Annotated

    from pydantic import BeforeValidator, Field

    return Annotated[int, Field(**_range(name)), BeforeValidator(_whole)]


def _python_type(info, name: str | None = None) -> Any:
    """The pydantic type of an option (ints with the range of ``name``, by default the option's own)."""
    base = info.type.removesuffix(" | None")
    if info.name == "face_box":
        from typing import Annotated

        from pydantic import Field as F

        return Annotated[list[float], F(min_length=4, max_length=4)] | str | None
    kind = {"int": _whole_int(name or info.name), "float": float, "bool": bool, "str": str}[base]
    return kind | None if info.type.endswith("| None") else kind


def _describe(info) -> str:
    parts = [info.help]
    if info.unit and info.unit not in ("x",):
        parts.append(f"unit: {info.unit}")
    if info.source:
        parts.append(f"official: {info.source}")
    return "; ".join(parts)


def _outer_range(info) -> dict[str, float]:
    """The range on the field (floats); an int carries its own (:func:`_whole_int`)."""
    return {} if info.type.removesuffix(" | None") == "int" else _range(info.name)


def _range(name: str) -> dict[str, float]:
    lo, hi = RANGES.get(name, (None, None))
    return {k: v for k, v in (("ge", lo), ("le", hi)) if v is not None}


@lru_cache(maxsize=1)
def input_model():
    """The pydantic model of a prediction's ``input`` (strict types, unknown names refused), built from
    :meth:`AnimateOptions.describe` so that its defaults, units and sources are the runtime's."""
    from pydantic import ConfigDict, Field, create_model, model_validator

    fields: dict[str, Any] = {
        name: (str, Field(description=text, json_schema_extra={"pattern": FILE_URL.pattern, "x-file": True}))
        for name, text in FILE_INPUTS.items()
    }
    for info in AnimateOptions.describe():
        if info.name in SERVER_ONLY_OPTIONS:
            continue
        kind, description = _python_type(info), _describe(info)
        if info.name == "seed":  # cog-sonic: an empty seed draws one
            kind, description = _whole_int("seed") | None, description + "; null: a random seed (said in the logs)"
        extra = {"x-unit": info.unit} if info.unit else {}
        fields[info.name] = (
            kind,
            Field(info.default, description=description, json_schema_extra=extra or None, **_outer_range(info)),
        )
    by_name = {info.name: info for info in AnimateOptions.describe()}
    for alias, target in COG_SONIC_NAMES.items():
        fields[alias] = (
            _python_type(by_name[target], target) | None,
            Field(
                None,
                description=f"cog-sonic's name for {target} (give one of the two)",
                **_outer_range(by_name[target]),
            ),
        )

    def one_name_each(cls, data):
        if isinstance(data, dict):
            for alias, target in COG_SONIC_NAMES.items():
                if data.get(alias) is not None and target in data:
                    raise ValueError(f"give {alias} (cog-sonic's name) or {target}, not both")
        return data

    # the same rule in the schema: not both names, unless cog-sonic's is null (null: not given)
    not_both = [
        {"not": {"required": [alias, target], "properties": {alias: {"not": {"type": "null"}}}}}
        for alias, target in COG_SONIC_NAMES.items()
    ]
    return create_model(
        "Input",
        __config__=ConfigDict(extra="forbid", strict=True, title="Input", json_schema_extra={"allOf": not_both}),
        __validators__={"one_name_each": model_validator(mode="before")(one_name_each)},
        **fields,
    )


def input_schema() -> dict[str, Any]:
    """The JSON schema of ``input`` (``/openapi.json``'s ``components.schemas.Input``)."""
    return input_model().model_json_schema()


# ------------------------------------------------------------------------------------------------------ parsing
def parse_input(raw: Any, folder: Path, *, max_file_bytes: int, uploads: dict[str, Path] | None = None) -> ParsedInput:
    """Check a request's ``input`` and store its ``data:`` files in ``folder``.

    Args:
        raw: the ``input`` object of the request body.
        folder: where decoded files go (``image.png``, ``audio.wav``...; created when needed).
        max_file_bytes: the largest file accepted, bytes (``--max-upload-mb``).
        uploads: file inputs already stored by a multipart request, by input name.

    Raises:
        BadInput: unknown name, wrong type, out of range, both a cog-sonic name and ours, a missing file input,
            an undecodable or oversized ``data:`` URL, an unsupported URL scheme.
    """
    from pydantic import ValidationError

    uploads = uploads or {}
    if not isinstance(raw, dict):
        raise BadInput("input must be a JSON object")
    given = dict(raw)
    for name in uploads:
        if name in given:
            raise BadInput(f"input.{name}: given twice (as a multipart file and as a field)")
        given[name] = "upload:"
    try:
        checked = input_model().model_validate(given)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(["input", *(str(p) for p in first["loc"])])
        raise BadInput(f"{where}: {first['msg']}") from None
    given = {name: getattr(checked, name) for name in checked.model_fields_set}
    given = {name: value for name, value in given.items() if not (name in COG_SONIC_NAMES and value is None)}
    options = {COG_SONIC_NAMES.get(name, name): value for name, value in given.items()}
    options = {k: v for k, v in options.items() if k not in FILE_INPUTS}
    notes = []
    if "seed" in options and options["seed"] is None:
        options["seed"] = secrets.randbelow(2**32)
        notes.append(f"seed {options['seed']} (drawn: the input's seed was null)")
    for name in COG_SONIC_NAMES.values():
        if name in options and options[name] is None:
            del options[name]
    if isinstance(options.get("face_box"), list):
        options["face_box"] = tuple(options["face_box"])
    files, echo = {}, dict(raw)
    for name in FILE_INPUTS:
        if name in uploads:
            files[name] = {"path": str(uploads[name])}
            echo[name] = f"upload:{uploads[name].name} ({uploads[name].stat().st_size} bytes)"
            continue
        value = getattr(checked, name)
        if DATA_URL.fullmatch(value):
            path, size = save_data_url(value, folder, name, max_file_bytes)
            files[name] = {"path": str(path)}
            echo[name] = f"{value[: value.find(',') + 1]}... ({size} bytes)"
        elif HTTP_URL.fullmatch(value):
            files[name] = {"url": value}
        else:
            scheme = value.split(":", 1)[0] if ":" in value else ""
            what = f"the URL scheme {scheme!r}" if scheme.lower() not in ("", "data", "http", "https") else "this value"
            raise BadInput(
                f"input.{name}: {what} is not supported (give a data: URL with valid base64 or percent-encoding, an "
                "http(s) URL, or a multipart file)"
            )
    return ParsedInput(options=options, files=files, echo=echo, notes=notes)


_DATA_URL = re.compile(r"^data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.IGNORECASE)


def save_data_url(url: str, folder: Path, name: str, max_bytes: int) -> tuple[Path, int]:
    """Decode a ``data:`` URL (RFC 2397, base64 or percent-encoded) into ``folder/<name><ext>``.

    Returns:
        the file and its size in bytes.

    Raises:
        BadInput: not a data URL, bad base64, or larger than ``max_bytes`` (judged from the encoded length first).
    """
    match = _DATA_URL.match(url)
    if not match:
        raise BadInput(f"input.{name}: not a data: URL (data:[<type>][;base64],<data>)")
    payload = url[match.end() :]
    is_base64 = any(p.strip().lower() == "base64" for p in match["params"].split(";"))
    if (len(payload) * 3 // 4 if is_base64 else len(payload) // 3) > max_bytes:
        raise BadInput(f"input.{name}: the file is larger than this server's {max_bytes} bytes (--max-upload-mb)")
    try:
        data = base64.b64decode(payload, validate=True) if is_base64 else urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise BadInput(f"input.{name}: the data: URL's base64 is invalid") from None
    if len(data) > max_bytes:
        raise BadInput(f"input.{name}: the file is {len(data)} bytes; this server accepts up to {max_bytes}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}{_extension(match['type'])}"
    path.write_bytes(data)
    return path, len(data)


def _extension(media_type: str, fallback: str = "") -> str:
    media_type = media_type.strip().lower()
    return _EXTENSIONS.get(media_type) or mimetypes.guess_extension(media_type) or fallback


def safe_suffix(filename: str | None) -> str:
    """The suffix of a client's file name, kept only when it is short and plain (``.png``, ``.wav``)."""
    suffix = Path(filename or "").suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else ""


# ------------------------------------------------------------------------------------------------------ fetching
async def fetch(
    url: str, folder: Path, name: str, *, max_bytes: int, timeout_s: float, allow_private: bool = False
) -> Path:
    """Download an ``http(s)`` file input into ``folder/<name><ext>``.

    Every hop (up to :data:`MAX_REDIRECTS` redirects) is checked by :func:`~sonic_rt.serving.security.checked_address`
    and connected to the address checked; the body is refused from ``Content-Length`` or once it passes
    ``max_bytes``; the whole download (every hop) must end within ``timeout_s``. No proxy from the environment
    is used (the check must see the real peer).

    Raises:
        FetchError: refused address, HTTP status other than 200, too large, too slow, too many redirects, or a
            connection error; the message starts with ``<name>: <url>``.
    """
    import httpx

    deadline = time.monotonic() + timeout_s
    folder.mkdir(parents=True, exist_ok=True)

    async def download() -> Path:
        current = url
        for _ in range(MAX_REDIRECTS + 1):
            parts = httpx.URL(current)
            if parts.scheme not in ("http", "https") or not parts.host:
                raise FetchError(f"{name}: {current}: only http(s) URLs can be fetched")
            try:
                address = await checked_address(
                    parts.host, parts.port or (443 if parts.scheme == "https" else 80), allow_private
                )
            except RefusedAddress as exc:
                raise FetchError(f"{name}: {current}: {exc}") from None
            timeout = httpx.Timeout(max(0.1, deadline - time.monotonic()))
            async with httpx.AsyncClient(
                transport=pinned_transport(address), timeout=timeout, trust_env=False
            ) as client:
                async with client.stream("GET", current, follow_redirects=False) as response:
                    if response.is_redirect and "location" in response.headers:
                        current = urllib.parse.urljoin(current, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise FetchError(f"{name}: {current}: HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > max_bytes:
                        raise FetchError(f"{name}: {current}: {declared} bytes; this server accepts up to {max_bytes}")
                    suffix = _extension(response.headers.get("content-type", "").split(";")[0])
                    path = folder / f"{name}{suffix or safe_suffix(parts.path)}"
                    size = 0
                    with open(path, "wb") as out:
                        async for chunk in response.aiter_bytes():
                            size += len(chunk)
                            if size > max_bytes:
                                raise FetchError(f"{name}: {current}: larger than this server's {max_bytes} bytes")
                            out.write(chunk)
                    return path
        raise FetchError(f"{name}: {url}: more than {MAX_REDIRECTS} redirects")

    try:
        return await asyncio.wait_for(download(), timeout=timeout_s)
    except asyncio.TimeoutError:
        raise FetchError(f"{name}: {url}: not fetched within {timeout_s:g} s") from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{name}: {url}: {type(exc).__name__}: {exc or 'connection failed'}") from None


__all__ = [
    "FILE_INPUTS",
    "COG_SONIC_NAMES",
    "SERVER_ONLY_OPTIONS",
    "RANGES",
    "BadInput",
    "FetchError",
    "ParsedInput",
    "input_model",
    "input_schema",
    "parse_input",
    "save_data_url",
    "safe_suffix",
    "fetch",
]
