"""``python -m sonic_rt serve --ray``: the predictions API as a Ray Serve application over many GPUs and machines.

Two Serve applications on one Ray cluster:

* ``sonic-model`` (deployment ``SonicModel``): the model. Each replica holds one loaded
  :class:`~sonic_rt.Runtime` behind a :class:`~sonic_rt.serving.local.LocalRunner` and runs one job at a time
  (``max_ongoing_requests=1``); ``ray_actor_options={"num_gpus": 1}`` gives each replica a GPU of its own. Its
  :meth:`SonicModel.run` is a generator: it yields the runtime's progress events as they happen, then the result.
* ``sonic`` (deployment ``SonicIngress``, one replica on the head node, route ``/``): the same Cog routes as the
  one-process server (:func:`sonic_rt.serving.app.build_app` without the page) over a
  :class:`~sonic_rt.serving.jobs.Jobs` whose runner is a :class:`RayRunner`: a
  :class:`~ray.serve.handle.DeploymentHandle` to ``SonicModel``.

The ingress owns the job records (``--workdir/jobs.sqlite`` on the head node): id, inputs, attempts, state. Ray
Serve does not run a request again when the replica running it dies (the caller gets ``ActorDiedError``), so
:class:`RayRunner` does: it sends the job again, up to ``--max-attempts`` times in all, and then fails it, naming
the cause. Each attempt writes into its own folder under ``OUTPUTS/.partial/``; the ingress renames the first
complete result into place with a hard link, which fails if the name exists, so an output is placed once and a
late duplicate is discarded. Cancelling a job cancels its Serve request, which reaches the replica running it
(Serve raises ``CancelledError`` in the replica's generator, and the runtime stops after its current UNet call).

Ray is optional (the ``cluster`` extra): this module imports it only inside functions, and :func:`import_ray`
says in one line how to install it. docs/serve.md "Many GPUs and machines" describes the flags and the failure
behaviour.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..errors import SonicError
from .app import API_KEY_ENV, build_app, default_workdir, settings_from_args

if TYPE_CHECKING:
    from .jobs import JobResult, JobSpec, Settings

MODEL_APP, MODEL_DEPLOYMENT = "sonic-model", "SonicModel"
API_APP, INGRESS_DEPLOYMENT = "sonic", "SonicIngress"
INSTALL_HINT = "pip install -e '.[cluster]'"
# A local cluster (``--ray`` with no address) stays on loopback: Ray reads this at import (see import_ray).
LOCAL_CLUSTER_ENV, LOOPBACK = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "127.0.0.1"
PARTIAL = ".partial"  # under the outputs folder: one folder per attempt, removed when the attempt ends
# The ingress: one replica serving every HTTP connection (a synchronous POST or an event stream stays open for
# the whole job, so it needs many at once). Past INGRESS_MAX_QUEUED requests waiting for it, Serve's proxy answers
# 503 with Retry-After (Serve's backpressure_config).
INGRESS_MAX_ONGOING = 1000
INGRESS_MAX_QUEUED = 200
INGRESS_RETRY_AFTER_S = 1.0


class ReplicaLost(SonicError):
    """A job's worker kept dying: it was sent ``attempts`` times (``--max-attempts``); the message names the last
    cause."""


def import_ray(address: str | None = None):
    """Import Ray (and Ray Serve); without them raise a one-line :class:`SonicError` naming the extra to install.

    Args:
        address: the ``--ray`` value this process will give :func:`init_ray`, when known. Where that starts a
            local cluster (empty, and no ``RAY_ADDRESS``) and Ray is not imported yet, the cluster is put on
            loopback here: Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` once, at import, and with ``0`` every
            process of a local cluster registers as, and listens on, 127.0.0.1 (otherwise they listen on every
            interface of the machine).

    Returns:
        the ``ray`` module.
    """
    if _starts_local_cluster(address) and "ray" not in sys.modules:
        os.environ[LOCAL_CLUSTER_ENV] = "0"  # inherited by the cluster's own processes (GCS, raylet, workers)
    try:
        import ray
        from ray import serve  # noqa: F401
    except ImportError:
        raise SonicError(f"--ray needs Ray, which is not installed here: {INSTALL_HINT}") from None
    return ray


def _starts_local_cluster(address: str | None) -> bool:
    return address == "" and not os.environ.get("RAY_ADDRESS")


def init_ray(address: str) -> str:
    """Connect this process to Ray for ``serve --ray`` and ``batch --ray``; returns one line saying how.

    Args:
        address: ``--ray``'s value. A cluster's address (``auto`` for the one running on this machine,
            ``HOST:6379``, ``ray://HOST:10001``) connects to it, as does an empty one with ``RAY_ADDRESS`` set.
            An empty one otherwise starts a local cluster for this process alone, on loopback: none of its ports
            is reachable from another machine, and no other machine can join it (``ray start`` on each node,
            then ``--ray ADDRESS``, makes a cluster that spans machines). Ray Serve's replicas still open their
            inter-deployment gRPC port on every interface (fixed in Ray Serve). The local cluster stops when this
            process exits; the SIGTERM handler this process had is kept (Ray's would stop the cluster at once).

    Raises:
        SonicError: Ray is not installed; the local cluster came up on another address than 127.0.0.1 (Ray was
            imported in this process before :func:`import_ray` could put it on loopback): it is shut down again.
    """
    ray = import_ray(address)
    if not _starts_local_cluster(address):
        ray.init(address=address or None, log_to_driver=False)
        return f"connected to the Ray cluster at {address or os.environ['RAY_ADDRESS']}"
    on_sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address="local", log_to_driver=False)
    if on_sigterm is not None and threading.current_thread() is threading.main_thread():  # where Ray set its own
        # Ray's handler for a cluster of this process's own kills it at once; ours lets the jobs drain first (serve
        # --ray) or unwinds like Ctrl-C (batch), and Ray's exit hook stops the cluster after that.
        signal.signal(signal.SIGTERM, on_sigterm)
    node = ray.util.get_node_ip_address()
    if node != LOOPBACK:
        ray.shutdown()
        raise SonicError(
            f"the local Ray cluster came up on {node}, not on loopback ({LOOPBACK}): Ray was imported before "
            f"{LOCAL_CLUSTER_ENV}=0 could be set; set it in the environment, or start a cluster with `ray start` "
            "and give --ray ADDRESS"
        )
    return (
        f"started a local Ray cluster on {LOOPBACK} (this machine only; for a cluster of several machines start "
        "it with `ray start` and give --ray ADDRESS)"
    )


# ------------------------------------------------------------------------------------------------ the model side
@dataclass(frozen=True)
class RuntimeLoader:
    """Builds the :class:`~sonic_rt.Runtime` of a replica or batch worker (pickled to the cluster's workers).

    Attributes:
        model: the checkpoint (or engine) directory as a path on every node (shared storage or the same path
            everywhere); None with ``demo``.
        demo: the random-weight demo checkpoint, written on each node at first use.
        device, dtype, trust_pickle, compile: as for :class:`~sonic_rt.Runtime` (no background compile on a
            cluster: ``auto`` uses what the node's cache holds, ``on`` compiles at a replica's first job).
        gpus: the GPUs Ray gives each replica or worker (``--gpus-per-replica``, ``--gpus-per-worker``); with more
            than one, its Runtime runs each video over all of them (:func:`replica_devices`).
    """

    model: str | None = None
    demo: bool = False
    device: str | None = None
    dtype: str | None = None
    trust_pickle: bool = False
    compile: str | None = None
    gpus: int = 1

    @property
    def name(self) -> str:
        return "demo" if self.demo else Path(self.model or "model").name

    def __call__(self):
        from ..runtime import Runtime

        if self.demo:
            from ..demo import ensure_demo_model

            model_dir = ensure_demo_model()
        else:
            model_dir = Path(self.model)
        from ..compiling import long_lived

        runtime = Runtime(
            model_dir,
            device=self.device,
            dtype=self.dtype,
            trust_pickle=self.trust_pickle,
            compile=self.compile,
            devices=replica_devices(self.gpus),
        )
        long_lived(runtime)  # a replica or batch worker makes many videos: loading a cached compiled shape pays
        return runtime


def replica_devices(gpus: int) -> list[str] | None:
    """The devices of a Ray replica or worker that owns ``gpus`` GPUs (None for one: the Runtime's default).

    Ray makes exactly the GPUs it gave the actor visible to it (``CUDA_VISIBLE_DEVICES``), so they are ``cuda:0`` ..
    ``cuda:{gpus-1}`` there. Where the GPUs are Ray's logical resources on a machine without CUDA (a CPU node
    started with ``--num-gpus``, the tests), the replica runs ``gpus`` CPU devices that split its cores instead,
    placed and scheduled as the GPUs would be."""
    if gpus <= 1:
        return None
    import torch

    if torch.cuda.is_available():
        return [f"cuda:{i}" for i in range(gpus)]
    return ["cpu"] * gpus


def placement() -> dict[str, Any]:
    """Where this Ray worker runs: its actor name (``SERVE_REPLICA::...`` for a Serve replica), node address and
    the GPU ids Ray gave it (``ray.get_gpu_ids()``; empty without GPUs)."""
    import ray

    context = ray.get_runtime_context()
    return {
        "replica": context.get_actor_name(),
        "node": ray.util.get_node_ip_address(),
        "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
    }


class SonicModel:
    """A replica of the model deployment: one Runtime, one job at a time (the Serve deployment ``SonicModel``).

    Args:
        load: builds the Runtime (a :class:`RuntimeLoader`, or any picklable callable); called once here, so the
            replica is ready only with its model loaded.
    """

    def __init__(self, load: Callable[[], Any]):
        from .local import LocalRunner

        self.runner = LocalRunner(load=load, name=getattr(load, "name", None))
        self.runner.setup()
        self.where = placement()

    def describe(self) -> dict[str, Any]:
        """The runtime's description (``model``, ``demo``, ``device``, ``backend``...) and this replica's
        :func:`placement`."""
        return {**self.runner.describe(), **self.where}

    async def run(self, request: dict[str, Any]) -> AsyncIterator[tuple[str, dict]]:
        """Run one job; a generator of ``(kind, info)`` events (Serve streams them to the caller as they come).

        Args:
            request: ``id``, ``attempt``, ``files`` (``{"image"|"audio": (file name, bytes)}``), ``out`` (the
                ``.mp4`` to write, in this attempt's own folder on the shared outputs storage), ``options``
                (:class:`~sonic_rt.AnimateOptions`), ``audio_samples`` (16 kHz samples).

        Yields:
            ``("started", placement)``; the runtime's events as :class:`~sonic_rt.serving.jobs.Runner` describes
            them (``plan``, ``window``, ``frames``, ``memory``); then ``("result", JobResult fields)``, or
            ``("failed", {"error": one line})`` for bad input. A cancelled request stops the runtime after its
            current UNet call and leaves no file.
        """
        from .jobs import JobSpec, one_line

        out = Path(request["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="sonic_rt-job-") as folder:
            paths = {}
            for name, (file_name, data) in request["files"].items():
                paths[name] = Path(folder) / Path(file_name).name
                paths[name].write_bytes(data)
            spec = JobSpec(
                request["id"], paths["image"], paths["audio"], out, request["options"], request["audio_samples"]
            )
            events: asyncio.Queue = asyncio.Queue()
            task = asyncio.create_task(self.runner.run(spec, lambda kind, info: events.put_nowait((kind, info))))
            try:
                yield "started", dict(self.where)
                while not (task.done() and events.empty()):
                    if not events.empty():
                        yield events.get_nowait()
                        continue
                    getter = asyncio.ensure_future(events.get())
                    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                    if getter.done():
                        yield getter.result()
                    else:
                        getter.cancel()
                try:
                    result = task.result()
                except SonicError as exc:
                    yield "failed", {"error": one_line(exc)}
                    return
                yield "result", dataclasses.asdict(result)
            finally:
                if not task.done():  # cancelled (or the caller went away): stop the runtime, wait for it
                    task.cancel()
                    await asyncio.wait([task])


# ---------------------------------------------------------------------------------------------- the ingress side
def place_once(produced: Path, out: Path) -> bool:
    """Put the finished ``produced`` file at ``out`` unless ``out`` exists: a hard link, which the file system
    refuses when the name exists, so two attempts of one job can never both place (nor overwrite) its output.
    ``produced`` is removed either way.

    Returns:
        True if ``produced`` is now at ``out``; False if ``out`` was already there (this result is a late duplicate
        and was discarded).

    Raises:
        OSError: neither could be done (``produced`` is missing, ``out``'s folder is not writable).
    """
    try:
        os.link(produced, out)
    except FileExistsError:
        placed = False
    except OSError:  # a file system without hard links: rename, unless the name is taken
        if out.exists():
            placed = False
        else:
            os.replace(produced, out)
            return True
    else:
        placed = True
    produced.unlink(missing_ok=True)
    return placed


class RayRunner:
    """The :class:`~sonic_rt.serving.jobs.Runner` of the ingress: each job goes to the model deployment through a
    Serve deployment handle, and again when the replica running it dies.

    Args:
        handle: a :class:`~ray.serve.handle.DeploymentHandle` of ``SonicModel``.
        outputs: the outputs folder (on storage every node reaches); attempts write under ``outputs/.partial``.
        max_attempts: times a job is sent at most (``--max-attempts``); then it fails naming the last cause.
        retry_backoff_s: seconds before the second attempt, doubled before each next one.

    A job is sent again when Ray says its replica is gone (``RayActorError``: ``ActorDiedError``,
    ``ActorUnavailableError``; ``WorkerCrashedError``, ``NodeDiedError``, ``OutOfMemoryError``, ``ObjectLostError``)
    or the deployment has no replica to take it (``DeploymentUnavailableError``).
    Backpressure (``BackPressureError``) is not an attempt: the job waits and is sent again. Bad input (the
    replica's ``failed`` event) fails the job with the runtime's one line; another error in the replica ends it as
    that error.
    """

    def __init__(self, handle, outputs: str | Path, *, max_attempts: int = 3, retry_backoff_s: float = 1.0):
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.handle, self.outputs = handle, Path(outputs)
        self.partial = self.outputs / PARTIAL
        self.max_attempts, self.retry_backoff_s = max_attempts, retry_backoff_s
        self.info: dict[str, Any] = {"model": MODEL_DEPLOYMENT}
        self.duplicates = 0  # late duplicate results discarded

    def setup(self) -> None:
        """Wait for a model replica and ask it what it runs (blocking; the ingress says ``STARTING`` meanwhile).
        Leftover attempt folders of an earlier ingress are removed (their jobs were marked lost)."""
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True, exist_ok=True)
        described = self.handle.describe.remote().result()
        self.info = {k: v for k, v in described.items() if k not in ("replica", "node", "gpu_ids")}
        self.info["serving"] = "ray"

    def describe(self) -> dict[str, Any]:
        return dict(self.info)

    async def run(self, job: JobSpec, report: Callable[[str, dict], None]) -> JobResult:
        files = {}
        for name, path in (("image", job.image), ("audio", job.audio)):
            files[name] = (path.name, await asyncio.to_thread(path.read_bytes))
        attempt = first = job.attempt  # a job run again after a restart goes on counting: its folders differ
        while True:
            folder = self.partial / f"{job.id}-{attempt}"
            produced = folder / job.out.name
            request = {
                "id": job.id,
                "attempt": attempt,
                "files": files,
                "out": str(produced),
                "options": job.options,
                "audio_samples": job.audio_samples,
            }
            try:
                result = await self._attempt(request, attempt, report)
                if not await asyncio.to_thread(place_once, produced, job.out):
                    self.duplicates += 1
                    report("log", {"line": "a second result of this job came in and was discarded"})
                return result
            except _Lost as lost:
                if attempt - first + 1 >= self.max_attempts:
                    raise ReplicaLost(
                        f"gave up after {attempt - first + 1} attempts (--max-attempts {self.max_attempts}): {lost}"
                    ) from None
                report("retry", {"reason": f"{lost}; sending it again"})
                await asyncio.sleep(self.retry_backoff_s * 2 ** (attempt - first))
                attempt += 1
            finally:
                await asyncio.to_thread(shutil.rmtree, folder, True)

    async def _attempt(self, request: dict, attempt: int, report: Callable[[str, dict], None]) -> JobResult:
        from ray.exceptions import (
            NodeDiedError,
            ObjectLostError,
            OutOfMemoryError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError

        from .jobs import JobResult

        waited = 0.0
        while True:
            stream = self.handle.options(stream=True).run.remote(request)
            replica = "a replica"
            try:
                async for kind, info in stream:
                    if kind == "started":
                        replica = info["replica"]
                        gpus = f", GPU {','.join(info['gpu_ids'])}" if info["gpu_ids"] else ""
                        report("log", {"line": f"attempt {attempt} runs on {replica} (node {info['node']}{gpus})"})
                    elif kind == "result":
                        return JobResult(**info)
                    elif kind == "failed":
                        raise SonicError(info["error"])
                    else:
                        report(kind, info)
                raise _Lost(f"{replica} ended the job without a result")
            except asyncio.CancelledError:
                stream.cancel()  # Serve cancels the request in the replica running it
                raise
            except BackPressureError as exc:
                delay = min(30.0, exc.retry_after_s or 1.0)
                if not waited:
                    report("log", {"line": f"the model replicas are all busy: waiting ({exc})"})
                waited += delay
                await asyncio.sleep(delay)
            except DeploymentUnavailableError:
                raise _Lost(f"the model deployment {MODEL_APP!r} is not running (stopped or failed)") from None
            except (RayActorError, WorkerCrashedError, NodeDiedError, OutOfMemoryError, ObjectLostError) as exc:
                raise _Lost(f"{replica} stopped: {_last_line(exc)}") from None
            except RequestCancelledError as exc:  # not by us (that is a CancelledError here): Serve dropped it
                raise _Lost(f"{replica} stopped: {_last_line(exc)}") from None
            except RayTaskError as exc:
                cause = exc.cause if isinstance(exc.cause, BaseException) else None
                raise (cause or RuntimeError(_last_line(exc))) from None


class _Lost(Exception):
    """One attempt ended because its replica (or the whole deployment) went away."""


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


class SonicIngress:
    """The ingress replica (the Serve deployment ``SonicIngress``, ``@serve.ingress``): the job records and the
    Cog routes, over a :class:`RayRunner` to the model deployment.

    Args:
        config: ``workdir`` (job records and inputs, on this node), ``outputs`` (shared), ``settings``
            (:class:`~sonic_rt.serving.jobs.Settings`), ``api_key``, ``max_upload_mb``, ``max_attempts``,
            ``retry_backoff_s``, ``model_app`` (the model's Serve application name), ``log_format``.

    Its metrics go to its ``/metrics`` and through Ray Serve's metrics API (:mod:`sonic_rt.serving.metrics`).
    Serve restarts a dead ingress on the head node: the new one runs the jobs its predecessor did not finish
    again, as a restarted one-process server does.
    """

    def __init__(self, config: dict[str, Any]):
        from ray import serve

        from . import logs
        from .jobs import Jobs
        from .metrics import Metrics

        self.config = config
        logs.configure(config.get("log_format", "text"))
        handle = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=config.get("model_app", MODEL_APP))
        runner = RayRunner(
            handle,
            config["outputs"],
            max_attempts=config.get("max_attempts", 3),
            retry_backoff_s=config.get("retry_backoff_s", 1.0),
        )
        metrics = Metrics(ray=True)
        self.jobs = Jobs(runner, config["workdir"], config["settings"], outputs=config["outputs"], metrics=metrics)

    def __serve_build_asgi_app__(self):
        """The ASGI app Serve runs (its lifespan starts and closes the Jobs)."""
        return build_app(
            self.jobs, api_key=self.config.get("api_key"), page=False, max_upload_mb=self.config["max_upload_mb"]
        )

    async def drain(self, grace_s: float) -> None:
        """Stop taking predictions and let the running ones finish for ``grace_s`` seconds (``serve --ray`` calls
        it through a deployment handle on SIGTERM, before it removes the applications)."""
        await self.jobs.drain(grace_s)


# ------------------------------------------------------------------------------------------------- deployment
@dataclass(frozen=True)
class ClusterOptions:
    """How the model deployment is laid out (the ``serve --ray`` flags).

    Attributes:
        replicas: model replicas (one Runtime each), without autoscaling.
        num_gpus: GPUs per replica (1 on GPU machines: one replica per GPU; 0 on CPU).
        num_cpus: CPUs per replica (Ray's logical CPUs; Ray also sets the replica's thread count from it).
        autoscaling: Serve's ``autoscaling_config`` (``min_replicas``, ``max_replicas``,
            ``target_ongoing_requests``, ...), passed through; None: a fixed ``replicas``.
        max_attempts: times a job is sent at most when its replica dies.
        retry_backoff_s: seconds before the second attempt, doubled each time.
        health_check_period_s, health_check_timeout_s, graceful_shutdown_timeout_s: Serve's settings of the model
            replicas (seconds; Serve's defaults 10, 30 and 20).
    """

    replicas: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    autoscaling: dict[str, Any] | None = None
    max_attempts: int = 3
    retry_backoff_s: float = 1.0
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0

    @property
    def max_replicas(self) -> int:
        if self.autoscaling:
            return int(self.autoscaling.get("max_replicas", self.autoscaling.get("min_replicas", 1)))
        return self.replicas

    def model_deployment(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment`` for ``SonicModel``."""
        layout = {"autoscaling_config": dict(self.autoscaling)} if self.autoscaling else {"num_replicas": self.replicas}
        return {
            "name": MODEL_DEPLOYMENT,
            "max_ongoing_requests": 1,  # the runtime runs one animate at a time
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            **layout,
        }


def deploy(
    load: Callable[[], Any],
    options: ClusterOptions,
    *,
    workdir: str | Path,
    outputs: str | Path,
    settings: Settings,
    api_key: str | None = None,
    max_upload_mb: float = 50.0,
    host: str = "127.0.0.1",
    port: int = 8000,
    log_format: str = "text",
) -> str:
    """Start Serve on the connected Ray cluster (HTTP on the head node at ``host:port``), deploy the model
    application (returns once every replica has loaded its Runtime), then the ingress (pinned to the head node,
    where ``workdir`` is). Returns the API's base URL.

    Raises:
        SonicError: an application failed to deploy (its last line, e.g. a model that does not load).
    """
    from ray import serve

    serve.start(proxy_location="HeadOnly", http_options={"host": host, "port": port})
    model = serve.deployment(**options.model_deployment())(SonicModel)
    _run_app(model.bind(load), MODEL_APP, None)
    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        num_replicas=1,  # it owns the job records: one per work directory
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_queued_requests=INGRESS_MAX_QUEUED,
        backpressure_config={"status_code": 503, "retry_after_s": INGRESS_RETRY_AFTER_S},
        ray_actor_options={"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}},
    )(serve.ingress()(SonicIngress))
    config = {
        "workdir": str(workdir),
        "outputs": str(outputs),
        "settings": settings,
        "api_key": api_key,
        "max_upload_mb": max_upload_mb,
        "max_attempts": options.max_attempts,
        "retry_backoff_s": options.retry_backoff_s,
        "model_app": MODEL_APP,
        "log_format": log_format,
    }
    _run_app(ingress.bind(config), API_APP, "/")
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


def _run_app(app, name: str, route_prefix: str | None) -> None:
    from ray import serve

    try:
        serve.run(app, name=name, route_prefix=route_prefix)
    except RuntimeError as exc:
        raise SonicError(f"the Serve application {name!r} failed to deploy: {_last_line(exc)}") from None


def remove(grace_s: float = 0.0) -> None:
    """Let the ingress drain for ``grace_s`` seconds (no new predictions; the running ones may finish), then delete
    both applications: what still runs or waits stays in the records and runs at the next start."""
    from ray import serve

    if grace_s > 0:
        try:
            serve.get_app_handle(API_APP).drain.remote(grace_s).result(timeout_s=grace_s + 30)
        except Exception as exc:  # the ingress is gone already: nothing to drain
            print(f"sonic_rt serve --ray: the ingress did not drain ({_last_line(exc)})", file=sys.stderr, flush=True)
    for name in (API_APP, MODEL_APP):
        serve.delete(name)


# -------------------------------------------------------------------------------------------------------- CLI
def add_flags(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` flags of the Ray mode."""
    g = parser.add_argument_group("Ray cluster (--ray; extra: cluster; docs/serve.md 'Many GPUs and machines')")
    g.add_argument(
        "--ray",
        nargs="?",
        const="",
        default=None,
        metavar="ADDRESS",
        help="serve on a Ray cluster: ADDRESS of a running one ('auto' for this machine's, 'HEAD:6379', "
        "'ray://HEAD:10001'), or none to start a local one for this server alone, on loopback",
    )
    g.add_argument("--replicas", type=int, default=1, help="model replicas, one Runtime each (with --ray)")
    gpus = g.add_mutually_exclusive_group()
    gpus.add_argument(
        "--num-gpus", type=float, default=None, help="GPUs per replica (default: 1 if the cluster has GPUs, else 0)"
    )
    gpus.add_argument(
        "--gpus-per-replica",
        type=int,
        default=None,
        metavar="N",
        help="give each replica N GPUs and run each video over all of them (one UNet replica per GPU, windows "
        "and guidance rows spread over them; the same video as on one GPU)",
    )
    g.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (Ray's logical CPUs)")
    g.add_argument(
        "--autoscaling",
        type=json.loads,
        default=None,
        metavar="JSON",
        help='Serve autoscaling_config instead of --replicas, e.g. \'{"min_replicas": 1, "max_replicas": 8}\'',
    )
    g.add_argument(
        "--outputs",
        type=Path,
        default=None,
        help="output folder every node can reach (shared storage; default: --workdir/outputs, one node only)",
    )
    g.add_argument(
        "--max-attempts", type=int, default=3, help="times a job is sent when its replica dies, then it fails"
    )


def run(args: argparse.Namespace) -> int:
    """``serve --ray``: connect to (or start) the cluster, deploy, serve until interrupted, then remove the
    applications."""
    from . import logs
    from .security import check_bind

    ray = import_ray(args.ray)
    args.api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    warning = check_bind(args.host, args.api_key, args.insecure)
    if args.gpus_per_replica is not None:
        args.num_gpus = float(args.gpus_per_replica)
    for name in ("replicas", "max_attempts", "max_queue", "gpus_per_replica"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise SonicError(f"--{name.replace('_', '-')} must be at least 1")
    if args.model is not None and not Path(args.model).is_dir():
        raise SonicError("not a directory (give an official-layout checkpoint folder)", args.model)
    cluster = init_ray(args.ray)
    logs.configure(args.log_format)
    gpus = ray.cluster_resources().get("GPU", 0)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    workdir = (Path(args.workdir) if args.workdir is not None else default_workdir()).resolve()
    if args.outputs is None and len(nodes) > 1:
        raise SonicError(
            f"this cluster has {len(nodes)} nodes: give --outputs DIR on storage every node reaches "
            "(docs/serve.md 'Many GPUs and machines')"
        )
    outputs = Path(args.outputs).resolve() if args.outputs is not None else workdir / "outputs"
    options = ClusterOptions(
        replicas=args.replicas,
        num_gpus=args.num_gpus if args.num_gpus is not None else (1.0 if gpus else 0.0),
        num_cpus=args.num_cpus,
        autoscaling=args.autoscaling,
        max_attempts=args.max_attempts,
    )
    settings = settings_from_args(args, args.concurrency or options.max_replicas)
    workdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    outputs.mkdir(parents=True, exist_ok=True)
    load = RuntimeLoader(
        str(Path(args.model).resolve()) if args.model else None,
        args.demo,
        args.device,
        args.dtype,
        args.trust_pickle,
        getattr(args, "compile", None),
        gpus=args.gpus_per_replica or 1,
    )
    layout = f"autoscaling {json.dumps(options.autoscaling)}" if options.autoscaling else f"{options.replicas}"
    print(
        f"sonic_rt serve --ray: {cluster}: {len(nodes)} node(s), {gpus:g} GPU(s); loading the model on {layout} replica(s) "
        f"({options.num_gpus:g} GPU, {options.num_cpus:g} CPU each)" + ("" if args.no_page else "; no page with --ray"),
        file=sys.stderr,
        flush=True,
    )
    url = deploy(
        load,
        options,
        workdir=workdir,
        outputs=outputs,
        settings=settings,
        api_key=args.api_key,
        max_upload_mb=args.max_upload_mb,
        host=args.host,
        port=args.port,
        log_format=args.log_format,
    )
    if warning:
        bar = "!" * min(len(warning), 100)
        print(f"{bar}\n{warning}\n{bar}", file=sys.stderr, flush=True)
    print(
        f"sonic_rt serve --ray: {url}/ (predictions: /predictions, health: /health-check; records in {workdir} on "
        f"the head node, outputs in {outputs}); Ctrl-C removes the applications",
        file=sys.stderr,
        flush=True,
    )
    grace = 0.0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM (the CLI turns it into one): drain first
        grace = args.grace_seconds
        print(
            f"sonic_rt serve --ray: stopping; the running jobs may finish for {grace:g} s", file=sys.stderr, flush=True
        )
    finally:
        remove(grace)
    return 0


__all__ = [
    "ClusterOptions",
    "RayRunner",
    "ReplicaLost",
    "RuntimeLoader",
    "SonicIngress",
    "SonicModel",
    "add_flags",
    "deploy",
    "import_ray",
    "init_ray",
    "place_once",
    "placement",
    "remove",
    "run",
    "MODEL_APP",
    "API_APP",
    "INSTALL_HINT",
]
