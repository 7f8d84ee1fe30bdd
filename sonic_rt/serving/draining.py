"""A graceful stop for ``serve``: :class:`DrainingServer`, uvicorn's server whose first SIGTERM or SIGINT drains
the job layer before it shuts down.

Orchestrators (Kubernetes, systemd, most others) send SIGTERM, wait a grace period (30 s by default) and then send
SIGKILL. On the first signal the server refuses new predictions (503 with ``Retry-After``; ``/health-check`` says
``STOPPING``, ``/healthz`` answers 503), lets the running jobs finish for ``--grace-seconds`` and exits with code 0;
a job still running then is interrupted, and the next start on the same ``--workdir`` runs it again under its id,
as it runs the jobs that were waiting (:class:`~sonic_rt.serving.jobs.Jobs`). A second signal stops at once, with
the same outcome.
"""

from __future__ import annotations

import asyncio
import signal
import sys

import uvicorn


class DrainingServer(uvicorn.Server):
    """uvicorn's server that drains ``jobs`` (:meth:`~sonic_rt.serving.jobs.Jobs.drain`) on the first SIGTERM or
    SIGINT, then shuts down; a second signal shuts down at once. It exits without re-raising the signal.

    Args:
        config: the ``uvicorn.Config``.
        jobs: the :class:`~sonic_rt.serving.jobs.Jobs` the app serves.
        grace_s: seconds the running jobs may take to finish (``--grace-seconds``).
    """

    def __init__(self, config: uvicorn.Config, jobs, grace_s: float):
        super().__init__(config)
        self.jobs, self.grace_s = jobs, grace_s
        self._draining: asyncio.Task | bool | None = None  # True from the signal until the task exists
        self._loop: asyncio.AbstractEventLoop | None = None

    def handle_exit(self, sig: int, frame) -> None:
        """uvicorn's signal handler: it only sets flags or hands the work to the event loop (a signal handler runs
        between two bytecodes of whatever the main thread was doing, the event loop's own code included)."""
        if self._draining is not None or self.should_exit:
            self.should_exit = self.force_exit = True
            return
        self._draining = True
        self._loop.call_soon_threadsafe(self._begin_drain, sig)

    def _begin_drain(self, sig: int) -> None:
        print(
            f"sonic_rt serve: {signal.Signals(sig).name}: taking no new predictions; the running ones may finish for "
            f"{self.grace_s:g} s (a second signal stops at once; nothing is lost)",
            file=sys.stderr,
            flush=True,
        )
        self._draining = asyncio.get_running_loop().create_task(self._drain())

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def _drain(self) -> None:
        try:
            await self.jobs.drain(self.grace_s)
        finally:
            self.should_exit = True


__all__ = ["DrainingServer"]
