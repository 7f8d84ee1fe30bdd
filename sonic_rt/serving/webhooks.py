"""Cog's webhooks (docs/http.md "Webhooks"): the prediction object POSTed to the client's URL as it changes.

One :class:`WebhookSender` per prediction posts its events in order from one task: ``start`` and ``completed`` at
once; ``output`` and ``logs`` at most once per :data:`THROTTLE_S` (an event inside the interval is dropped, as
Cog's response throttler does: the next one, and ``completed``, carry the newer state), except the ``output`` of the
finished video, which a live segment's ``output`` may have just preceded and which is always sent. Only the event
types in the prediction's ``webhook_events_filter`` are sent. A failed POST (connection error, timeout, HTTP 408,
429 or 5xx) is retried with exponential backoff: ``completed`` up to :data:`TERMINAL_ATTEMPTS` times, the others
:data:`ATTEMPTS` times; another 4xx, or an address refused by the public-address rule, ends the tries at once. Each
event's result (``delivered``, ``failed``, ``refused``) goes to the sender's ``on_result`` callback (the job layer
counts it, logs a failure and remembers a delivered ``start`` or ``completed``). The receiver may be on a private
network only with ``--allow-private-urls`` (a webhook that the rule refuses is refused when the prediction is
created, :mod:`sonic_rt.serving.predictions`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

from .. import __version__
from .security import RefusedAddress, checked_address, pinned_transport

THROTTLE_S = 0.5  # seconds between two `output` or two `logs` webhooks (Cog: 500 ms, not configurable)
ATTEMPTS = 3  # tries of a non-terminal event
TERMINAL_ATTEMPTS = 8  # tries of `completed`: 0.5 + 1 + 2 + ... + 32 s of backoff, about a minute
BACKOFF_S = 0.5  # first wait between tries, doubled after each
TIMEOUT_S = 10.0  # one POST, seconds
THROTTLED = ("output", "logs")


class WebhookSender:
    """Posts one prediction's webhook events in order.

    Args:
        url: the ``webhook`` URL (http or https).
        events: the event types to send (``webhook_events_filter``).
        allow_private: let the URL resolve to private, loopback or link-local addresses.
        on_result: called with ``(event, result, problem)`` once per event: ``result`` ``delivered``, ``failed``
            (retries spent, or a 4xx answer) or ``refused`` (the address rule); ``problem`` the last error ("").
    """

    def __init__(
        self,
        url: str,
        events: set[str],
        *,
        allow_private: bool = False,
        on_result: Callable[[str, str, str], None] | None = None,
    ):
        self.url, self.events, self.allow_private = url, set(events), allow_private
        self.on_result = on_result
        self._queue: asyncio.Queue[tuple[str, dict] | None] = asyncio.Queue()
        self._last: dict[str, float] = {}
        self._task = asyncio.create_task(self._run(), name="sonic-webhook")
        self._drained: list[Callable[[], None]] = []
        self.sent: list[tuple[str, int]] = []  # (event, HTTP status) of each delivered POST

    def offer(self, event: str, render: Callable[[], dict[str, Any]], *, force: bool = False) -> bool:
        """Queue ``event`` with the prediction as ``render()`` gives it now, unless filtered out or throttled
        (``force``: not throttled; the finished video's ``output``, which a segment's may have just preceded).
        Returns whether it was queued."""
        if event not in self.events or self._task.done():
            return False
        if event in THROTTLED and force:
            self._last[event] = time.monotonic()
        elif event in THROTTLED:
            now = time.monotonic()
            if now - self._last.get(event, -THROTTLE_S) < THROTTLE_S:
                return False
            self._last[event] = now
        self._queue.put_nowait((event, render()))
        return True

    def close(self) -> None:
        """No more events: the task ends once the queued ones are delivered (or given up)."""
        self._queue.put_nowait(None)

    def on_drained(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` when the queue is delivered after :meth:`close`."""
        if self._task.done():
            callback()
        else:
            self._task.add_done_callback(lambda _t: callback())

    async def drain(self) -> None:
        """Wait until every queued event is delivered or given up."""
        await asyncio.wait([self._task])

    async def stop(self) -> None:
        """Give up what is still queued or being tried (the server is closing), and wait until it has stopped."""
        self._task.cancel()
        await asyncio.wait([self._task])

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            await self._post(*item)

    async def _post(self, event: str, body: dict[str, Any]) -> None:
        import httpx

        attempts = TERMINAL_ATTEMPTS if event == "completed" else ATTEMPTS
        problem, result = "", "failed"
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                parts = httpx.URL(self.url)
                port = parts.port or (443 if parts.scheme == "https" else 80)
                address = await checked_address(parts.host, port, self.allow_private)
                async with httpx.AsyncClient(
                    transport=pinned_transport(address), timeout=TIMEOUT_S, trust_env=False
                ) as client:
                    response = await client.post(self.url, json=body, headers={"User-Agent": f"sonic_rt/{__version__}"})
            except RefusedAddress as exc:
                problem, result = str(exc), "refused"
                break
            except (httpx.HTTPError, OSError) as exc:
                problem = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code < 300:
                self.sent.append((event, response.status_code))
                problem, result = "", "delivered"
                break
            problem = f"HTTP {response.status_code}"
            if response.status_code < 500 and response.status_code not in (408, 429):
                break
        if self.on_result is not None:
            self.on_result(event, result, problem and f"not delivered to {self.url}: {problem}")


__all__ = ["WebhookSender", "THROTTLE_S", "ATTEMPTS", "TERMINAL_ATTEMPTS", "BACKOFF_S"]
