"""``python -m sonic_rt serve``: the predictions API and the web page over one Runtime, in one process.

One FastAPI app (:func:`sonic_rt.serving.app.build_app`) served by uvicorn: Cog's prediction routes
(:mod:`sonic_rt.serving.predictions`), ``/healthz``, ``/metrics``, and the gradio page at ``/``
(:mod:`sonic_rt.serving.page`; left out with ``--no-page``), all over one :class:`~sonic_rt.serving.jobs.Jobs`
whose runner is a :class:`~sonic_rt.serving.local.LocalRunner`. The port answers at once; the model loads in the
background (``/health-check`` says ``STARTING``, then ``READY`` or ``SETUP_FAILED``).

SIGTERM (or Ctrl-C) stops it gracefully (:class:`~sonic_rt.serving.draining.DrainingServer`): new predictions get 503 with ``Retry-After``
and health says ``STOPPING``; the running job may finish for ``--grace-seconds``; then it exits 0, and whatever
still ran or waited runs at the next start on the same ``--workdir`` under the same ids. A second signal stops at
once (the same: nothing is lost). Logs: one line per prediction event (``--log-format``, :mod:`.logs`).

Files: job records, inputs and outputs in ``--workdir`` (default ``~/.cache/sonic_rt/serve``, mode 0700), kept
across restarts; gradio's uploads and the page's example in a private temporary directory removed on exit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

from ..errors import SonicError
from .app import API_KEY_ENV, build_app, default_workdir, settings_from_args
from .logs import LOG_FORMATS

GRACE_S = 25.0  # seconds the running job may take to finish after SIGTERM (orchestrators kill at 30 s by default)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """``"90"``, ``"90s"``, ``"30m"``, ``"1h"``, ``"7d"`` -> seconds (argparse type)."""
    match = _DURATION.match(text)
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (e.g. 90s, 30m, 1h, 7d)")
    return float(match[1]) * _UNITS[match[2]]


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
    p.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default="text",
        help="one line per prediction event on stderr: text (key=value) or json (one object per line)",
    )
    p.add_argument(
        "--grace-seconds",
        type=float,
        default=GRACE_S,
        help="after SIGTERM, seconds the running jobs may take to finish before the server exits (what still "
        "runs or waits then runs again at the next start)",
    )
    from .ray_app import add_flags as add_ray_flags  # imports no Ray

    add_ray_flags(p)


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

        from . import logs
        from .jobs import Jobs
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

        logs.configure(args.log_format)
        runner = LocalRunner(load=load, threads=args.concurrency, name=model_dir.name)
        jobs = Jobs(runner, workdir, settings_from_args(args, args.concurrency))
        if jobs.recovered:
            print(
                f"sonic_rt serve: {len(jobs.recovered)} prediction(s) a previous server did not finish run again",
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
            f"/health-check and /healthz, metrics: /metrics; records and outputs in {workdir}; uploads in {tmp}, "
            "removed on exit)",
            file=sys.stderr,
            flush=True,
        )
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=2)
        from .draining import DrainingServer

        DrainingServer(config, jobs, args.grace_seconds).run()
        return 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["add_parser", "run", "build_app", "duration", "default_workdir", "API_KEY_ENV", "GRACE_S"]
