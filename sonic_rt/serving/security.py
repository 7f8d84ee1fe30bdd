"""What keeps a shared server safe: who may call it, what it may reach, what it may serve back.

* **Binding**: anything but a loopback address needs an API key (``--api-key`` or ``SONIC_RT_API_KEY``) unless
  ``--insecure`` says otherwise (:func:`check_bind`). The API takes the key as ``Authorization: Bearer KEY``
  (:func:`require_api_key`), the page as the password of its login form (:func:`page_login`).
* **Outbound requests** (file inputs given as ``http(s)`` URLs, webhooks) go only to public addresses unless
  ``--allow-private-urls``: every address the host name resolves to is checked, the connection goes to the
  checked address (no second lookup an attacker's DNS could answer differently), and each redirect is checked
  again (:func:`checked_address`, :class:`PinnedTransport`).
* **Responses** (:class:`SafetyMiddleware`): request bodies over the limit are refused from their declared
  ``Content-Length`` before a byte is read (413), bodies without one are refused (411); every response says
  ``X-Content-Type-Options: nosniff``; HTML pages get a content security policy; files gradio serves from
  ``/gradio_api/file=`` are sent as downloads (``application/octet-stream``, ``attachment``, sandboxed) unless
  their type is a plain image, audio or video type, so an uploaded ``.html`` or ``.svg`` never runs as a page of
  this origin; gradio's routes that fetch other URLs for a client (``file=http...``, ``proxy=``) are refused.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import socket
from typing import Callable

from fastapi import HTTPException, Request

from ..errors import SonicError

# Media types a browser renders without running anything: the only ones served inline from gradio's file route.
SAFE_INLINE_TYPES = frozenset(
    {
        "image/png",
        "image/jpeg",
        "image/webp",
        "image/gif",
        "image/bmp",
        "audio/wav",
        "audio/x-wav",
        "audio/wave",
        "audio/mpeg",
        "audio/mp4",
        "audio/x-m4a",
        "audio/ogg",
        "audio/flac",
        "audio/x-flac",
        "audio/webm",
        "video/mp4",
        "video/webm",
        "video/ogg",
    }
)
# The page's content security policy. gradio's index.html carries inline scripts whose text changes with the app's
# config, hence 'unsafe-inline' for scripts; everything else is this origin only: no other site is contacted
# (connect-src), the page cannot be framed, no plugins, no foreign form targets.
PAGE_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; media-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "worker-src 'self' blob:; object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
)
# What a file served as a download may do if a browser opens it anyway: nothing (no scripts, no origin).
FILE_CSP = "default-src 'none'; sandbox"
GRADIO_FILE_PREFIXES = ("/gradio_api/file=", "/gradio_api/file/", "/file=")
GRADIO_FETCHING_PREFIXES = ("/gradio_api/proxy=", "/proxy=")
LOOPBACK_NAMES = ("localhost",)


class RefusedAddress(SonicError):
    """An outbound request to a private, loopback, link-local or otherwise non-public address was refused."""


class Unresolvable(RefusedAddress):
    """The host name of an outbound request does not resolve (now: DNS may answer later)."""


# ----------------------------------------------------------------------------------------------- binding, keys
def is_loopback_host(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> str | None:
    """The bind rule: loopback needs nothing; any other address needs an API key or ``--insecure``.

    Returns:
        None, or the warning to print (loudly) when ``--insecure`` opens a shared server without a key.

    Raises:
        SonicError: a non-loopback address without a key and without ``--insecure``.
    """
    if is_loopback_host(host) or api_key:
        return None
    if not insecure:
        raise SonicError(
            f"--host {host} shares this server with the network: give it a key (--api-key KEY or the "
            "SONIC_RT_API_KEY environment variable), or pass --insecure to serve anyone who can reach the port"
        )
    return (
        f"WARNING: --insecure: serving http://{host} WITHOUT AUTHENTICATION: anyone who can reach this port can "
        "run jobs, read every result and fill the disk"
    )


def key_matches(given: str | None, key: str) -> bool:
    """Constant-time comparison of a presented key with the server's."""
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


def require_api_key(request: Request) -> None:
    """The API's key check, a FastAPI dependency: refuses a request without ``Authorization: Bearer <key>`` (401,
    with ``WWW-Authenticate: Bearer``, RFC 6750) when the app has a key (``app.state.api_key``); lets every request
    through when it has none."""
    api_key = getattr(request.app.state, "api_key", None)
    if api_key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), api_key):
        raise HTTPException(
            401, "missing or wrong API key: send 'Authorization: Bearer <key>'", {"WWW-Authenticate": "Bearer"}
        )


def page_login(api_key: str) -> Callable[[str, str], bool]:
    """gradio's ``auth=`` callable: any user name, the API key as the password."""
    return lambda _user, password: key_matches(password, api_key)


# ----------------------------------------------------------------------------------------- outbound requests
def refusal(address: str) -> str | None:
    """Why ``address`` (an IP literal) is not a public address, or None when it is (IPv4-mapped IPv6 addresses
    are judged as the IPv4 address they carry)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for test, what in (
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_private", "a private address"),
        ("is_multicast", "a multicast address"),
        ("is_reserved", "a reserved address"),
        ("is_unspecified", "an unspecified address"),
    ):
        if getattr(ip, test):
            return what
    return None if ip.is_global else "not a public address"


async def checked_address(host: str, port: int, allow_private: bool) -> str:
    """Resolve ``host`` and return the address to connect to, after checking every address it resolves to.

    Raises:
        RefusedAddress: one of the addresses is not public (unless ``allow_private``).
        Unresolvable: the name does not resolve.
    """
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise Unresolvable(f"cannot resolve {host!r} ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise Unresolvable(f"{host!r} resolves to no address")
    if not allow_private:
        for address in addresses:
            why = refusal(address)
            if why:
                named = host if host == address else f"{host} ({address})"
                raise RefusedAddress(
                    f"refused: {named} is {why} (start the server with --allow-private-urls to reach private networks)"
                )
    return addresses[0]


async def destination_refusal(url: str, allow_private: bool) -> str | None:
    """Why the public-address rule refuses to reach ``url`` (an ``http(s)`` URL), or None: it is allowed, or it
    names no address now (its name does not resolve, or it does not parse: the request itself will say so). What a prediction's
    ``webhook`` and ``http(s)`` inputs are checked with when it is created."""
    import httpx

    if allow_private:
        return None
    try:
        parts = httpx.URL(url)
        host, port = parts.host, parts.port or (443 if parts.scheme == "https" else 80)
    except (httpx.InvalidURL, ValueError):
        return None  # nothing to connect to: the request itself fails and says so
    try:
        await checked_address(host, port, allow_private)
    except Unresolvable:
        return None
    except RefusedAddress as exc:
        return str(exc)
    return None


def pinned_transport(address: str):
    """An ``httpx`` transport that connects to ``address`` (checked by :func:`checked_address`) whatever host the
    URL names, keeping the URL's host in the ``Host`` header and as the TLS server name (certificates are checked
    against the host name, as usual)."""
    import httpx

    class PinnedTransport(httpx.AsyncHTTPTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            host = request.url.host
            request.url = request.url.copy_with(host=address)
            request.headers["Host"] = request.headers.get("Host", host)
            request.extensions = {**request.extensions, "sni_hostname": host}
            return await super().handle_async_request(request)

    return PinnedTransport(retries=0)


# ------------------------------------------------------------------------------------------------- responses
class SafetyMiddleware:
    """ASGI middleware around the whole app (API, page, files): body limits and safe response headers.

    Args:
        app: the ASGI app.
        max_body_bytes: the largest request body accepted, bytes (413 above it, from ``Content-Length``).
    """

    def __init__(self, app, *, max_body_bytes: int):
        self.app, self.max_body_bytes = app, int(max_body_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if _fetches_for_client(path):
            return await _send_json(send, 403, "this server does not fetch other URLs for its clients")
        if scope["method"] in ("POST", "PUT", "PATCH"):
            declared = headers.get("content-length")
            if declared is None and "chunked" in headers.get("transfer-encoding", ""):
                return await _send_json(send, 411, "send the request body with a Content-Length")
            try:
                size = int(declared or 0)
            except ValueError:
                return await _send_json(send, 400, "Content-Length is not a number")
            if size > self.max_body_bytes:
                return await _send_json(
                    send,
                    413,
                    f"the request body is {size} bytes; this server accepts up to {self.max_body_bytes} "
                    "(see --max-upload-mb)",
                )
        is_file = path.startswith(GRADIO_FILE_PREFIXES)

        async def guarded_send(message):
            if message["type"] == "http.response.start":
                message["headers"] = _safe_headers(list(message.get("headers", [])), is_file)
            await send(message)

        return await self.app(scope, receive, guarded_send)


def _fetches_for_client(path: str) -> bool:
    """Whether ``path`` asks gradio to fetch another URL (``/gradio_api/file=https://...``, ``proxy=``)."""
    if path.startswith(GRADIO_FETCHING_PREFIXES):
        return True
    for prefix in GRADIO_FILE_PREFIXES:
        if path.startswith(prefix):
            rest = path[len(prefix) :].lower()
            return rest.startswith(("http:", "https:", "//")) or "://" in rest
    return False


def _safe_headers(raw: list[tuple[bytes, bytes]], is_file: bool) -> list[tuple[bytes, bytes]]:
    """The response headers with nosniff, the page's CSP on HTML, and downloads for unsafe files."""
    names = {k.lower() for k, _ in raw}
    content_type = next((v.decode("latin-1") for k, v in raw if k.lower() == b"content-type"), "")
    media = content_type.split(";", 1)[0].strip().lower()
    drop = {b"x-content-type-options"}
    add = [(b"x-content-type-options", b"nosniff")]
    if b"referrer-policy" not in names:
        add.append((b"referrer-policy", b"no-referrer"))
    if is_file:
        drop |= {b"content-security-policy"}
        add.append((b"content-security-policy", FILE_CSP.encode()))
        if media not in SAFE_INLINE_TYPES:
            drop |= {b"content-type", b"content-disposition"}
            add += [(b"content-type", b"application/octet-stream"), (b"content-disposition", b"attachment")]
    elif media == "text/html":
        drop |= {b"content-security-policy", b"x-frame-options"}
        add += [(b"content-security-policy", PAGE_CSP.encode()), (b"x-frame-options", b"DENY")]
    return [(k, v) for k, v in raw if k.lower() not in drop] + add


async def _send_json(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"x-content-type-options", b"nosniff"),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


__all__ = [
    "SafetyMiddleware",
    "RefusedAddress",
    "Unresolvable",
    "destination_refusal",
    "check_bind",
    "require_api_key",
    "page_login",
    "key_matches",
    "is_loopback_host",
    "refusal",
    "checked_address",
    "pinned_transport",
    "SAFE_INLINE_TYPES",
    "PAGE_CSP",
    "FILE_CSP",
]
