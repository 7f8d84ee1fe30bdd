"""The server's Prometheus metrics: one table of names (:data:`METRICS`), recorded by the job layer and served at
``GET /metrics`` in Prometheus' text format (``prometheus_client``, a registry per server).

Under ``serve --ray`` the ingress records the same metrics twice: in its own registry (its ``/metrics``) and
through Ray Serve's metrics API (``ray.serve.metrics``), which Ray exports from every node's metrics port with its
``ray_`` namespace in front (``ray_sonic_rt_predictions_total``) and the Serve tags ``deployment``, ``replica`` and
``application`` added, so one Prometheus scrape of the cluster sees them.

Rejected requests are counted by :class:`RejectionCounter`, an ASGI middleware around the whole app, from the status
of each answer, so a refusal is counted wherever it is made (the body limit, the key, the checks, the queue).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Buckets, seconds: a 64 px demo job takes about 1 s on a CPU, a 25-step 512 px one minutes to hours.
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
RATE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 25, 50, 100)
BYTES_BUCKETS = tuple(2**k for k in range(26, 38))  # 64 MiB .. 128 GiB
# The statuses counted as rejected requests (label ``code``), on every path but those whose 503 is an answer, not a
# refusal (a load balancer's probe while the model loads).
REJECTED = (401, 411, 413, 422, 429, 503)
NOT_REFUSALS = ("/healthz",)


@dataclass(frozen=True)
class Metric:
    """One metric: its Prometheus name (a counter's ends with ``_total``), kind (``counter``, ``gauge``,
    ``histogram``), help text, label names and histogram buckets."""

    name: str
    kind: str
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


METRICS = (
    Metric(
        "sonic_rt_predictions_total",
        "counter",
        "predictions that ended, by final status (succeeded, failed, canceled)",
        ("status",),
    ),
    Metric("sonic_rt_queue_depth", "gauge", "predictions waiting to run"),
    Metric("sonic_rt_jobs_running", "gauge", "predictions running now"),
    Metric(
        "sonic_rt_queue_wait_seconds",
        "histogram",
        "seconds from creation (or the restart that queued it again) to the start of its run",
        buckets=SECONDS_BUCKETS,
    ),
    Metric(
        "sonic_rt_run_seconds",
        "histogram",
        "seconds from the start of a run to its end (Cog's predict_time), every final status",
        buckets=SECONDS_BUCKETS,
    ),
    Metric(
        "sonic_rt_stage_seconds",
        "histogram",
        "seconds per stage of a succeeded job: load (the server fetching and checking the inputs) and the runtime's "
        "stages (preprocess, audio_features, image_encode, audio_adapters, denoise, decode, interpolate, encode)",
        ("stage",),
        SECONDS_BUCKETS,
    ),
    Metric(
        "sonic_rt_windows_per_second",
        "histogram",
        "denoised windows (steps x windows) per second of the denoise stage, per succeeded job",
        buckets=RATE_BUCKETS,
    ),
    Metric(
        "sonic_rt_realtime_factor",
        "histogram",
        "seconds of video produced per second of run time, per succeeded job (1: real time)",
        buckets=RATE_BUCKETS,
    ),
    Metric(
        "sonic_rt_peak_memory_bytes",
        "histogram",
        "peak memory of a job, bytes: the GPU's allocated memory on cuda, the process's resident memory on cpu",
        ("device",),
        BYTES_BUCKETS,
    ),
    Metric(
        "sonic_rt_webhook_deliveries_total",
        "counter",
        "webhook events by result: delivered, failed (retries spent or a 4xx answer), refused (address rule)",
        ("event", "result"),
    ),
    Metric(
        "sonic_rt_rejected_requests_total",
        "counter",
        "requests refused, by HTTP status: 401 key, 411 no length, 413 too large, 422 invalid, 429 queue full, "
        "503 not ready or stopping",
        ("code",),
    ),
)


class Metrics:
    """The metrics of one server: a ``prometheus_client`` registry of :data:`METRICS`, and with ``ray`` the same
    names through ``ray.serve.metrics``.

    Args:
        ray: also record through Ray Serve's metrics API (in a Serve replica).
    """

    def __init__(self, *, ray: bool = False):
        import prometheus_client as prom

        self.registry = prom.CollectorRegistry()
        kinds = {"counter": prom.Counter, "gauge": prom.Gauge, "histogram": prom.Histogram}
        self._prom: dict[str, Any] = {}
        for m in METRICS:
            extra = {"buckets": m.buckets} if m.kind == "histogram" else {}
            self._prom[m.name] = kinds[m.kind](m.name, m.help, m.labels, registry=self.registry, **extra)
        self._ray: dict[str, Any] = {}
        if ray:
            from ray.serve import metrics as serve_metrics

            for m in METRICS:
                kind = {"counter": serve_metrics.Counter, "gauge": serve_metrics.Gauge}.get(m.kind)
                if kind is not None:
                    self._ray[m.name] = kind(m.name, description=m.help, tag_keys=m.labels)
                else:
                    self._ray[m.name] = serve_metrics.Histogram(
                        m.name, description=m.help, boundaries=list(m.buckets), tag_keys=m.labels
                    )

    def inc(self, name: str, **labels: str) -> None:
        """Add one to the counter ``name``."""
        self._child(name, labels).inc()
        if name in self._ray:
            self._ray[name].inc(1, tags=labels or None)

    def set(self, name: str, value: float) -> None:
        """Set the gauge ``name``."""
        self._child(name, {}).set(value)
        if name in self._ray:
            self._ray[name].set(value)

    def observe(self, name: str, value: float, **labels: str) -> None:
        """Record ``value`` in the histogram ``name``."""
        self._child(name, labels).observe(value)
        if name in self._ray:
            self._ray[name].observe(value, tags=labels or None)

    def _child(self, name: str, labels: dict[str, str]):
        metric = self._prom[name]
        return metric.labels(**labels) if labels else metric

    def exposition(self) -> tuple[bytes, str]:
        """The text format of every metric now, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RejectionCounter:
    """ASGI middleware: counts every answer whose status is in :data:`REJECTED` (``code`` label) and logs it as a
    ``refused`` event (:func:`sonic_rt.serving.logs.refused`) with the path, the prediction id a path names and the
    answer's ``detail``.

    Args:
        app: the ASGI app.
        metrics: where to count (a :class:`Metrics`).
    """

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path") in NOT_REFUSALS:
            return await self.app(scope, receive, send)
        status: list[int] = []
        body = bytearray()

        async def observed(message):
            if message["type"] == "http.response.start":
                status.append(message["status"])
            elif message["type"] == "http.response.body" and status and status[0] in REJECTED and len(body) < 4096:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, observed)
        finally:
            if status and status[0] in REJECTED:
                from .logs import refused

                self.metrics.inc("sonic_rt_rejected_requests_total", code=str(status[0]))
                refused(status[0], scope.get("method", ""), scope.get("path", ""), _detail(bytes(body)))


def _detail(body: bytes) -> str:
    import json

    try:
        detail = json.loads(body).get("detail", "")
    except (ValueError, AttributeError):
        return ""
    return detail if isinstance(detail, str) else json.dumps(detail)


__all__ = ["METRICS", "Metric", "Metrics", "RejectionCounter", "REJECTED"]
