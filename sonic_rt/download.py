"""``python -m sonic_rt download [DIR]``: the real model from the Hugging Face hub, and nothing else.

The official instructions download three whole repositories (``LeonJoe13/Sonic``,
``stabilityai/stable-video-diffusion-img2vid-xt``, ``openai/whisper-tiny``), most of whose files the pipeline never
reads (SVD-xt alone holds its own UNet twice and two monolithic checkpoints). :data:`MANIFEST` lists exactly the
files the runtime opens, in the official layout (``docs/download.md``; ``tests/test_download.py`` checks the list
against the files the loader opens). The transfer itself is ``huggingface_hub``'s: ``hf_hub_download`` into the
official layout, its progress bars, its atomic ``.incomplete``-then-rename writes, its retries.

What this module adds around it:

1. Before anything is written: the hub's listing of each repository at the asked revision (sizes from its file
   metadata, the commit pinned for every later request), an access check of each repository (a gated SVD-xt
   fails here, with one line saying what to accept and where to put the token), and a free-disk check.
2. The downloads, file by file (finished files are never fetched again: ``huggingface_hub`` finds them by the
   pinned commit). Partial files left by a killed run (``*.incomplete``, which ``huggingface_hub`` >= 1.18 never
   reuses) are removed.
3. After: optionally ``convert`` to safetensors, then the strict loader checks every key and shape, and the
   ``animate`` line to run next is printed.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SonicError
from .layout import PICKLED_CHECKPOINTS, SVD_DIR, WHISPER_DIR

SONIC_REPO = "LeonJoe13/Sonic"
SVD_REPO = "stabilityai/stable-video-diffusion-img2vid-xt"
WHISPER_REPO = "openai/whisper-tiny"
#: The hub's own address: where a gated repository's licence is accepted, whatever mirror serves the files.
HUB_URL = "https://huggingface.co"
DEFAULT_DIR = "checkpoints"
#: Placeholders of the printed ``animate`` line (README quick start).
NEXT_IMAGE, NEXT_AUDIO, NEXT_OUT = "portrait.png", "speech.wav", "out.mp4"
_YOLO_FILENAME = "yoloface_v5m.pt"  # sonic_rt.face.YOLO_FILENAME (not imported: it pulls OpenCV in)


class DownloadError(SonicError):
    """The model cannot be downloaded: hub unreachable, repository gated or missing, revision or file not on the
    hub, not enough disk space, another download running into the same directory. The message names the
    repository or directory and says what to do."""


@dataclass(frozen=True)
class HubFiles:
    """The files of one hub repository that the runtime loads.

    Attributes:
        repo_id: the model repository on the hub.
        subdir: where its files go, relative to the model directory (``""``: the directory itself).
        files: paths in the repository, kept as they are below ``subdir`` (the official layout).
        optional: files fetched when the repository has them (the runtime runs without them).
    """

    repo_id: str
    subdir: str
    files: tuple[str, ...]
    optional: tuple[str, ...] = ()


#: Every file the runtime reads, by repository (docs/download.md). Sonic's weights are the pickles that
#: ``convert`` rewrites (sonic_rt.checkpoint.PICKLED_CHECKPOINTS); the YOLO face detector is optional (OpenCV's
#: Haar cascade otherwise). Of SVD-xt only the UNet's config is read (its weights come from Sonic/unet.pth), the
#: fp16 variants of the VAE and CLIP image encoder (official ``variant="fp16"``) and the scheduler config; its
#: ``feature_extractor/`` is not read (the runtime builds ``CLIPImageProcessor()`` with its defaults, as the
#: official code does). Of whisper-tiny: the config, the safetensors weights and the feature-extractor config.
MANIFEST: tuple[HubFiles, ...] = (
    HubFiles(SONIC_REPO, "", PICKLED_CHECKPOINTS, optional=(_YOLO_FILENAME,)),
    HubFiles(
        SVD_REPO,
        SVD_DIR,
        (
            "unet/config.json",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
            "image_encoder/config.json",
            "image_encoder/model.fp16.safetensors",
            "scheduler/scheduler_config.json",
        ),
    ),
    HubFiles(WHISPER_REPO, WHISPER_DIR, ("config.json", "model.safetensors", "preprocessor_config.json")),
)


def manifest_paths() -> list[str]:
    """Every path of :data:`MANIFEST` (optional files included), relative to the model directory, ``/``-separated."""
    return [
        "/".join(p for p in (group.subdir, name) if p) for group in MANIFEST for name in group.files + group.optional
    ]


@dataclass(frozen=True)
class PlannedFile:
    """One file to have in the model directory.

    Attributes:
        repo_id: its repository.
        filename: its path in the repository.
        local_dir: the directory ``hf_hub_download`` writes it under (the model directory or its subdirectory).
        size: its size in bytes, from the hub's metadata.
    """

    repo_id: str
    filename: str
    local_dir: Path
    size: int

    @property
    def path(self) -> Path:
        """Where the file ends up."""
        return self.local_dir / self.filename

    def is_complete(self) -> bool:
        """Whether the file is already there at the hub's size."""
        return self.path.is_file() and self.path.stat().st_size == self.size


@dataclass
class DownloadPlan:
    """What :func:`plan_download` found on the hub: the files, their sizes, the pinned commits.

    Attributes:
        root: the model directory (absolute).
        endpoint: the hub or mirror address the files come from.
        commits: repository -> the commit every file is fetched at (the asked revision, resolved once).
        files: the files to have, in :data:`MANIFEST` order.
        absent_optional: ``(repo, path)`` of optional files the repository does not hold.
    """

    root: Path
    endpoint: str
    commits: dict[str, str]
    files: list[PlannedFile]
    absent_optional: list[tuple[str, str]] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        """Bytes of every planned file."""
        return sum(f.size for f in self.files)

    def missing(self) -> list[PlannedFile]:
        """The files not yet in the directory at their hub size."""
        return [f for f in self.files if not f.is_complete()]


def resolve_endpoint(mirror: str | None = None) -> str:
    """The hub address: ``mirror`` (``--mirror``), else ``$HF_ENDPOINT``, else https://huggingface.co (the variable
    ``huggingface_hub`` reads, read here at call time)."""
    endpoint = mirror or os.environ.get("HF_ENDPOINT") or HUB_URL
    return endpoint.rstrip("/")


def parse_revisions(values: list[str] | None) -> dict[str, str]:
    """``--revision`` values as repository -> revision. ``REV`` alone is Sonic's repository (LeonJoe13/Sonic);
    ``REPO=REV`` names another repository of :data:`MANIFEST`; the others stay at ``main``.

    Raises:
        DownloadError: an unknown repository or an empty revision.
    """
    repos = [group.repo_id for group in MANIFEST]
    revisions = dict.fromkeys(repos, "main")
    for value in values or []:
        repo, sep, rev = value.rpartition("=")
        repo = repo if sep else SONIC_REPO
        if repo not in revisions:
            raise DownloadError(f"unknown repository (the model comes from {', '.join(repos)})", f"--revision {value}")
        if not rev:
            raise DownloadError("empty revision", f"--revision {value}")
        revisions[repo] = rev
    return revisions


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path``, or would hold it (the nearest existing parent)."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    return shutil.disk_usage(Path.cwd()).free


def _hf_cache_dirs(root: Path) -> list[Path]:
    """The ``.cache/huggingface/download`` folders ``hf_hub_download(local_dir=...)`` keeps under each local dir."""
    return [root / group.subdir / ".cache" / "huggingface" / "download" for group in MANIFEST]


def stale_partials(root: Path) -> list[Path]:
    """Partial downloads left by a killed run (``*.incomplete``). ``huggingface_hub`` >= 1.18 writes each download
    to a name unique to that attempt and never reads one back, so no later run can reuse them."""
    return sorted(p for d in _hf_cache_dirs(root) if d.is_dir() for p in d.rglob("*.incomplete") if p.is_file())


def plan_download(
    root: str | os.PathLike, *, endpoint: str, token: str | None = None, revisions: dict[str, str] | None = None
) -> DownloadPlan:
    """Ask the hub what to download; writes nothing.

    For each repository of :data:`MANIFEST`: its listing at the revision (``HfApi.model_info(files_metadata=True)``:
    commit and file sizes), every needed file present in it, and an access check (a ``HEAD`` of the file's
    ``/resolve/`` URL, as ``hf_hub_download`` makes first), so that a gated or private repository fails before any
    file is written.

    Args:
        root: the model directory (need not exist).
        endpoint: hub or mirror address (:func:`resolve_endpoint`).
        token: hub token; None: ``$HF_TOKEN`` or the token of ``hf auth login``, as ``huggingface_hub`` finds them.
        revisions: repository -> branch, tag or commit (default ``main``; :func:`parse_revisions`).

    Raises:
        DownloadError: hub unreachable, repository gated, private or missing, revision or file not on the hub.
    """
    from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

    root = Path(root).expanduser().resolve()
    revisions = revisions or parse_revisions(None)
    api = HfApi(endpoint=endpoint, token=token)
    plan = DownloadPlan(root=root, endpoint=endpoint, commits={}, files=[])
    for group in MANIFEST:
        repo, revision = group.repo_id, revisions[group.repo_id]
        try:
            info = api.model_info(repo, revision=revision, files_metadata=True)
        except Exception as exc:
            raise hub_error(exc, repo, endpoint, revision=revision) from None
        commit = info.sha or revision
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        absent = [name for name in group.files if name not in sizes]
        if absent:
            raise DownloadError(
                f"{', '.join(absent)} not in the repository at revision {revision} on {endpoint} (the runtime needs "
                "them)",
                repo,
            )
        names = list(group.files) + [name for name in group.optional if name in sizes]
        plan.absent_optional += [(repo, name) for name in group.optional if name not in sizes]
        local_dir = root / group.subdir if group.subdir else root
        for k, name in enumerate(names):
            size = sizes[name]
            if k == 0 or size is None:  # the access check, and the size where the listing has none
                try:
                    meta = get_hf_file_metadata(
                        hf_hub_url(repo, name, revision=commit, endpoint=endpoint), token=token, endpoint=endpoint
                    )
                except Exception as exc:
                    raise hub_error(exc, repo, endpoint, revision=revision, filename=name) from None
                size = size if size is not None else meta.size
            if size is None:
                raise DownloadError(f"the hub gives no size for {name}", repo)
            plan.files.append(PlannedFile(repo, name, local_dir, int(size)))
        plan.commits[repo] = commit
    return plan


def check_disk_space(plan: DownloadPlan, *, convert: bool = False) -> int:
    """Raise unless the model directory's file system has room for what is still missing.

    Needed: the hub sizes of the missing files, plus (``convert``) a safetensors copy of each official pickle
    (about its size) that has none yet. Available: the free bytes plus those of stale partial downloads, which
    are removed before downloading. Returns the bytes needed.

    Raises:
        DownloadError: not enough space, with both numbers.
    """
    needed = sum(f.size for f in plan.missing())
    if convert:
        sizes = {f.path: f.size for f in plan.files}
        for rel in PICKLED_CHECKPOINTS:
            path = plan.root / rel
            if not path.with_suffix(".safetensors").is_file():
                needed += sizes.get(path, 0)
    available = free_disk_bytes(plan.root) + sum(p.stat().st_size for p in stale_partials(plan.root))
    if needed > available:
        raise DownloadError(
            f"not enough free disk space: the download needs {needed:,} bytes ({_gb(needed)}), "
            f"{available:,} bytes ({_gb(available)}) are free there",
            plan.root,
        )
    return needed


def fetch(plan: DownloadPlan, *, token: str | None = None, log: Callable[[str], None] = print) -> None:
    """Download every file of ``plan`` with ``hf_hub_download`` (its progress bar per file), at the pinned commits.

    Files already there are not fetched again; a dropped connection is resumed by ``huggingface_hub`` with a
    ``Range`` request; each file is written to a temporary ``.incomplete`` name and renamed when complete, so
    the directory never holds a partial file under its real name. Holds a lock on the directory for the run
    and first removes the stale partial downloads of killed runs.

    Raises:
        DownloadError: another download into the directory is running, or the hub fails (message per
            :func:`hub_error`).
    """
    from filelock import FileLock, Timeout
    from huggingface_hub import hf_hub_download

    lock_path = plan.root / ".cache" / "huggingface" / "sonic_rt-download.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise DownloadError("another download into this directory is running", plan.root) from None
    try:
        stale = stale_partials(plan.root)
        if stale:
            freed = sum(p.stat().st_size for p in stale)
            for p in stale:
                p.unlink(missing_ok=True)
            log(f"removed {len(stale)} partial download(s) of an earlier, killed run ({_gb(freed)})")
        missing = plan.missing()
        for k, f in enumerate(plan.files, 1):
            if f not in missing:
                continue
            log(f"[{k}/{len(plan.files)}] {f.repo_id}: {f.filename} ({_gb(f.size)})")
            try:
                hf_hub_download(
                    f.repo_id,
                    f.filename,
                    revision=plan.commits[f.repo_id],
                    local_dir=f.local_dir,
                    endpoint=plan.endpoint,
                    token=token,
                )
            except Exception as exc:
                raise hub_error(exc, f.repo_id, plan.endpoint, filename=f.filename) from None
    finally:
        lock.release()


def hub_error(
    exc: Exception, repo_id: str, endpoint: str, *, revision: str | None = None, filename: str | None = None
) -> DownloadError:
    """One :class:`DownloadError` line for an exception of ``huggingface_hub`` (or its HTTP client).

    A gated repository (``GatedRepoError``: the hub answers 401 without a usable token, 403 when the token's
    account has not been granted access) says where to accept the licence and how to pass the token.
    """
    from huggingface_hub import errors

    what = f"{filename}: " if filename else ""
    if isinstance(exc, errors.GatedRepoError):
        status = exc.response.status_code if exc.response is not None else None
        sent = exc.response is not None and "authorization" in exc.response.request.headers
        reason = (
            "this token's account has not been granted access"
            if status == 403
            else ("the token was refused" if sent else "no token was sent")
        )
        return DownloadError(
            f"gated repository ({reason}): accept its licence at {HUB_URL}/{repo_id} while logged in, then pass "
            "that account's token (--token, HF_TOKEN or `hf auth login`)",
            repo_id,
        )
    if isinstance(exc, errors.RepositoryNotFoundError):
        return DownloadError(
            f"repository not found on {endpoint} (a private one needs a token: --token, HF_TOKEN or `hf auth login`)",
            repo_id,
        )
    if isinstance(exc, errors.RevisionNotFoundError):
        return DownloadError(f"revision {revision or '?'} not found on {endpoint}", repo_id)
    if isinstance(exc, errors.RemoteEntryNotFoundError):
        return DownloadError(f"{what}not in the repository on {endpoint}", repo_id)
    if isinstance(exc, errors.HfHubHTTPError) and exc.response is not None:
        detail = str(exc.server_message or exc.response.reason_phrase or "").strip().splitlines()
        return DownloadError(
            f"{what}the hub answered HTTP {exc.response.status_code}"
            + (f" ({detail[0]})" if detail else "")
            + "; run the same command again to continue",
            repo_id,
        )
    if isinstance(exc, errors.LocalEntryNotFoundError | errors.HTTPError):
        cause = exc.__cause__ or exc
        return DownloadError(
            f"{what}cannot reach {endpoint} ({type(cause).__name__}: {_first_line(cause)}); check the network, "
            "or pass --mirror; run the same command again to continue",
            repo_id,
        )
    if isinstance(exc, OSError):  # e.g. huggingface_hub's size consistency check, a full disk
        return DownloadError(f"{what}{_first_line(exc)}; run the same command again to continue", repo_id)
    return DownloadError(f"{what}{type(exc).__name__}: {_first_line(exc)}", repo_id)


def check_model_dir(root: Path, *, trust_pickle: bool = False) -> None:
    """Load every model of ``root`` with the runtime's strict loader on the CPU (every key and shape), and the
    YOLO face detector when present; raises :class:`~sonic_rt.errors.CheckpointError` as the loader does.

    The weights are read into host memory once (for the real model about 8 GB, Sonic's UNet in fp32)."""
    import torch

    from .checkpoint import resolve_model_dir
    from .face import load_face_detector
    from .loading import load_models

    paths = resolve_model_dir(root)
    models = load_models(paths, torch.device("cpu"), torch.float32, trust_pickle=trust_pickle)
    del models
    load_face_detector(paths.root)


def next_command(model_dir: str, *, trust_pickle: bool = False) -> str:
    """The ``animate`` line to run next (printed at the end; the README's quick start shows it for the default
    directory)."""
    line = (
        f"python -m sonic_rt animate --model {shlex.quote(str(model_dir))} --image {NEXT_IMAGE} --audio {NEXT_AUDIO} "
        f"--out {NEXT_OUT}"
    )
    return line + (" --trust-pickle" if trust_pickle else "")


def run(
    model_dir: str = DEFAULT_DIR,
    *,
    mirror: str | None = None,
    token: str | None = None,
    revisions: list[str] | None = None,
    convert: bool = False,
    trust_pickle: bool = False,
    log: Callable[[str], None] = print,
) -> str:
    """The ``download`` command: plan, check the disk, fetch, optionally convert, check with the strict loader.

    Args:
        model_dir: the model directory as the user wrote it (created if needed; printed as is in the next line).
        mirror: hub address (``--mirror``); default ``$HF_ENDPOINT`` or https://huggingface.co.
        token: hub token (``--token``); default ``$HF_TOKEN`` or the ``hf auth login`` token.
        revisions: ``--revision`` values (:func:`parse_revisions`).
        convert: rewrite the official pickles as safetensors (``convert``) before the check.
        trust_pickle: allow pickles that need arbitrary code (for the check and ``convert``).
        log: where progress lines go.

    Returns:
        The ``animate`` line to run next (also logged last).

    Raises:
        DownloadError: see :func:`plan_download`, :func:`check_disk_space`, :func:`fetch`.
        CheckpointError: the downloaded directory does not load (key, shape or pickle problem).
    """
    endpoint = resolve_endpoint(mirror)
    root = Path(model_dir).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DownloadError("not a directory", root)
    plan = plan_download(root, endpoint=endpoint, token=token, revisions=parse_revisions(revisions))
    needed = check_disk_space(plan, convert=convert)
    for repo, name in plan.absent_optional:
        log(f"note: {repo} has no {name}; faces will be found with OpenCV's Haar cascade instead")
    done = len(plan.files) - len(plan.missing())
    log(
        f"{len(plan.files)} files, {plan.total_bytes:,} bytes ({_gb(plan.total_bytes)}) from {endpoint} into {root}"
        + (f"; {done} already there" if done else "")
        + f"; {_gb(needed)} to write, {_gb(free_disk_bytes(root))} free"
    )
    fetch(plan, token=token, log=log)
    if convert:
        from .checkpoint import convert_checkpoints

        for path in convert_checkpoints(root, trust_pickle=trust_pickle):
            log(f"wrote {path}")
    log("checking every key and shape with the runtime's strict loader ...")
    check_model_dir(root, trust_pickle=trust_pickle)
    line = next_command(model_dir, trust_pickle=trust_pickle and not convert)
    log(f"the model in {root} loads. Next (with your portrait and speech recording):")
    log(line)
    return line


def add_parser(sub) -> None:
    """The ``download`` subcommand (sonic_rt.cli)."""
    p = sub.add_parser(
        "download",
        help="download the real model from the Hugging Face hub (only the files the runtime loads)",
        description="Download the files of LeonJoe13/Sonic, stabilityai/stable-video-diffusion-img2vid-xt (gated: "
        "accept its licence on the hub and pass a token) and openai/whisper-tiny that the runtime loads, into DIR "
        "in the official layout; check it with the strict loader; print the animate line to run next. A "
        "rerun fetches only the files still missing.",
    )
    p.add_argument(
        "dir", nargs="?", default=DEFAULT_DIR, metavar="DIR", help=f"model directory (default {DEFAULT_DIR})"
    )
    p.add_argument("--token", default=None, help="hub token (default: $HF_TOKEN, else the `hf auth login` token)")
    p.add_argument(
        "--revision",
        action="append",
        metavar="[REPO=]REV",
        help=f"branch, tag or commit: REV for {SONIC_REPO}, REPO=REV for another repository (repeatable; default main)",
    )
    p.add_argument(
        "--mirror", default=None, metavar="URL", help="hub address, like $HF_ENDPOINT (default: $HF_ENDPOINT or hub)"
    )
    p.add_argument("--convert", action="store_true", help="then rewrite the .pth/.pkl files as .safetensors")
    p.add_argument(
        "--trust-pickle", action="store_true", help="allow pickles that need arbitrary code (only for files you trust)"
    )


def main(args) -> int:
    """Run the parsed ``download`` arguments; 0 when the directory loads, 130 when interrupted (finished files
    are kept: the same command continues). Other errors propagate to the CLI's one-line handler."""
    try:
        run(
            args.dir,
            mirror=args.mirror,
            token=args.token,
            revisions=args.revision,
            convert=args.convert,
            trust_pickle=args.trust_pickle,
        )
    except KeyboardInterrupt:
        print("interrupted: finished files are kept; run the same command again to continue", file=sys.stderr)
        return 130
    return 0


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
