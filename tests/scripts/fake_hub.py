"""A local HTTP server that serves model repositories the way the Hugging Face hub does, for the real
``huggingface_hub`` client (tests/test_download.py).

Two threaded servers on 127.0.0.1, each on a free port: the hub (``url``: what ``HF_ENDPOINT`` / ``--mirror``
point at) and a CDN (another origin, as the hub's LFS files live on cdn-lfs/xet hosts, so the client sends
no token there). What they answer, as the hub does (huggingface_hub ``hf_api.model_info``,
``file_download.get_hf_file_metadata`` / ``http_get``, ``utils/_http.hf_raise_for_status``):

- ``GET /api/models/{repo}[/revision/{rev}]`` (``?blobs=true``): the model info, with ``sha`` (the commit) and
  ``siblings`` (``rfilename``, ``size``, ``blobId``, and ``lfs`` for large files). Visible without a token for a
  gated repository too (only its files are gated).
- ``HEAD``/``GET /{repo}/resolve/{rev}/{path}``: a small file is served with ``ETag`` (its git blob id),
  ``X-Repo-Commit`` and ``Content-Length``; a large (LFS) file answers ``302`` to the CDN with ``X-Repo-Commit``,
  ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``. The CDN honours ``Range: bytes=N-`` with ``206``. File
  bodies carry the hub's ``Content-Disposition`` (the client's progress bar shows that name).
- Errors carry ``X-Error-Code`` and ``X-Error-Message`` as the hub's: an unknown repository ``401 RepoNotFound``,
  an unknown revision ``404 RevisionNotFound``, an unknown file ``404 EntryNotFound``, a gated file ``401
  GatedRepo`` without a token and ``403 GatedRepo`` with a token that was not granted access.

Fault injection: ``cut_once[path] = n`` makes the first CDN ``GET`` of ``path`` (a repo path) stop after ``n``
bytes and close the connection (a dropped download); ``fail_once[path] = status`` answers that status once to
the first CDN ``GET``. Every request is recorded in ``log`` (:class:`Request`).
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".pth", ".pkl", ".pt", ".safetensors", ".bin", ".h5", ".msgpack")


@dataclass(frozen=True)
class Request:
    """One request as the fake hub saw it: ``server`` is ``hub`` or ``cdn``; ``path`` the repo path of a file
    (``repo_id/filename``) for resolve and CDN requests, else the URL path."""

    server: str
    method: str
    path: str
    revision: str | None
    range: str | None
    authorization: str | None
    status: int


@dataclass
class Repo:
    """A repository: ``files`` maps paths to contents; ``allowed_tokens`` not None makes it gated."""

    repo_id: str
    files: dict[str, bytes]
    commit: str
    allowed_tokens: set[str] | None = None
    tags: dict[str, str] = field(default_factory=dict)

    def revision(self, rev: str) -> str | None:
        """The commit of ``rev`` (``main``, a tag, or the commit itself), None if unknown."""
        if rev in ("main", self.commit):
            return self.commit
        return self.tags.get(rev)


def git_blob_id(data: bytes) -> str:
    """The git object id of a blob (what the hub sends as a small file's ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str) -> bool:
    """Whether the fake hub stores ``path`` in LFS (large binary files), as the real repositories do."""
    return path.endswith(LFS_SUFFIXES)


def files_under(directory: Path) -> dict[str, bytes]:
    """Every file below ``directory`` as ``{relative posix path: bytes}``."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class FakeHub:
    """The two servers and their state; a context manager (started on enter, stopped on exit)."""

    def __init__(self, repos: list[Repo]):
        self.repos = {r.repo_id: r for r in repos}
        self.log: list[Request] = []
        self.cut_once: dict[str, int] = {}
        self.fail_once: dict[str, int] = {}
        self._lock = threading.Lock()
        self._by_sha: dict[str, tuple[str, bytes]] = {}
        for repo in repos:
            for name, data in repo.files.items():
                self._by_sha[hashlib.sha256(data).hexdigest()] = (f"{repo.repo_id}/{name}", data)
        self._servers = [ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, kind)) for kind in ("hub", "cdn")]
        for server in self._servers:
            server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._servers[0].server_address[1]}"
        self.cdn_url = f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def __enter__(self) -> FakeHub:
        for server in self._servers:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    def record(self, request: Request) -> None:
        with self._lock:
            self.log.append(request)

    def take(self, table: dict, path: str):
        """Pop a one-shot fault for ``path`` (thread-safe)."""
        with self._lock:
            return table.pop(path, None)

    def downloads(self, since: int = 0) -> list[Request]:
        """The file bodies sent (GETs answered 200 or 206 with content: small files by the hub, LFS files by the
        CDN), from ``log[since:]``."""
        return [
            r
            for r in self.log[since:]
            if r.method == "GET" and r.status in (200, 206) and (r.server == "cdn" or r.revision is not None)
        ]


def _disposition(path: str) -> dict[str, str]:
    """The hub's ``Content-Disposition`` of a file (the client shows its name on the progress bar)."""
    name = path.rsplit("/", 1)[-1]
    return {"Content-Disposition": f"inline; filename*=UTF-8''{name}; filename=\"{name}\";"}


def _handler(hub: FakeHub, kind: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the client expects

        def log_message(self, *args) -> None:  # quiet
            pass

        def do_HEAD(self) -> None:
            self._serve(body=False)

        def do_GET(self) -> None:
            self._serve(body=True)

        # --------------------------------------------------------------------------------------------
        def _serve(self, body: bool) -> None:
            url = urlsplit(self.path)
            path = unquote(url.path)
            if kind == "cdn":
                return self._cdn(path, body)
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path)
            if m and body:
                return self._model_info(m.group(1), m.group(2) or "main", "blobs=true" in url.query)
            m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3), body)
            self._send(404, b"", {}, body, record=(path, None))

        def _model_info(self, repo_id: str, rev: str, blobs: bool) -> None:
            repo = hub.repos.get(repo_id)
            where = (f"/api/models/{repo_id}", None)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found", True, where)
            commit = repo.revision(rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", True, where)
            siblings = []
            for name, data in sorted(repo.files.items()):
                s = {"rfilename": name}
                if blobs:
                    s.update(size=len(data), blobId=git_blob_id(data))
                    if is_lfs(name):
                        s["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                siblings.append(s)
            info = {
                "_id": hashlib.md5(repo_id.encode()).hexdigest()[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": commit,
                "private": False,
                "gated": "manual" if repo.allowed_tokens is not None else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, True, where)

        def _resolve(self, repo_id: str, rev: str, name: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            where = (f"{repo_id}/{name}", rev)
            if repo is None:
                return self._error(401, "RepoNotFound", "Repository not found", body, where)
            commit = repo.revision(rev)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}", body, where)
            if repo.allowed_tokens is not None:
                auth = self.headers.get("Authorization", "")
                token = auth.removeprefix("Bearer ").strip() if auth else None
                if not token:
                    return self._error(
                        401,
                        "GatedRepo",
                        f"Access to model {repo_id} is restricted. You must have access to it and be authenticated "
                        "to access it. Please log in.",
                        body,
                        where,
                    )
                if token not in repo.allowed_tokens:
                    return self._error(
                        403,
                        "GatedRepo",
                        f"Access to model {repo_id} is restricted and you are not in the authorized list. Visit "
                        f"https://huggingface.co/{repo_id} to ask for access.",
                        body,
                        where,
                    )
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found", body, where, {"X-Repo-Commit": commit})
            headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if is_lfs(name):
                sha = hashlib.sha256(data).hexdigest()
                headers.update(
                    {
                        "Location": f"{hub.cdn_url}/lfs/{sha}",
                        "ETag": f'"{git_blob_id(data)}"',
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(len(data)),
                    }
                )
                return self._send(302, b"", headers, body, where)
            headers.update({"ETag": f'"{git_blob_id(data)}"', **_disposition(name)})
            self._content(data, headers, body, where)

        def _cdn(self, path: str, body: bool) -> None:
            m = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
            entry = hub._by_sha.get(m.group(1)) if m else None
            if entry is None:
                return self._send(404, b"", {}, body, (path, None))
            repo_path, data = entry
            where = (repo_path, None)
            if body:
                status = hub.take(hub.fail_once, repo_path)
                if status is not None:
                    return self._send(status, b"injected failure", {}, body, where)
            cut = hub.take(hub.cut_once, repo_path) if body else None
            headers = {"ETag": f'"{m.group(1)}"', "Accept-Ranges": "bytes", **_disposition(repo_path)}
            self._content(data, headers, body, where, cut=cut)

        # --------------------------------------------------------------------------------------------
        def _content(self, data: bytes, headers: dict, body: bool, where, cut: int | None = None) -> None:
            rng = self.headers.get("Range")
            status, start = 200, 0
            if rng:
                m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
                if not m or int(m.group(1)) >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body, where)
                start = int(m.group(1))
                end = int(m.group(2)) + 1 if m.group(2) else len(data)
                status = 206
                headers = {**headers, "Content-Range": f"bytes {start}-{end - 1}/{len(data)}"}
                data = data[start:end]
            if cut is None:
                return self._send(status, data, headers, body, where)
            # A dropped connection: announce the whole length, send `cut` bytes, close.
            self._record(status, where)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:cut])
            self.wfile.flush()
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

        def _error(self, status, code, message, body, where, extra=None) -> None:
            headers = {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}
            self._send(status, json.dumps({"error": message}).encode(), {**headers, **(extra or {})}, body, where)

        def _record(self, status: int, where) -> None:
            hub.record(
                Request(
                    server=kind,
                    method=self.command,
                    path=where[0],
                    revision=where[1],
                    range=self.headers.get("Range"),
                    authorization=self.headers.get("Authorization"),
                    status=status,
                )
            )

        def _send(self, status: int, data: bytes, headers: dict, body: bool, where) -> None:
            self._record(status, where)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body and data:
                self.wfile.write(data)

    return Handler
