"""Serving: everything that turns HTTP requests into :meth:`sonic_rt.Runtime.animate` calls.

A layer above the runtime (nothing in :mod:`sonic_rt.pipeline` or :mod:`sonic_rt.runtime` imports it):

* :mod:`.store`: the prediction record (Cog's prediction object) and its SQLite file,
* :mod:`.jobs`: :class:`~.jobs.Jobs`, predictions from creation to their end over a :class:`~.jobs.Runner`
  ("something that runs a job"),
* :mod:`.local`: :class:`~.local.LocalRunner`, the Runner over one Runtime in this process,
* :mod:`.live`: a job's live HLS stream, its segments announced as they are finished and served,
* :mod:`.inputs`: the input schema (from :class:`~sonic_rt.AnimateOptions`), its checks, data:/multipart/http(s) files,
* :mod:`.webhooks`: Cog's webhooks, throttled and retried,
* :mod:`.predictions`: Cog's HTTP routes (FastAPI) over a Jobs,
* :mod:`.security`: API keys, the public-address rule for outbound requests, safe response headers and limits,
* :mod:`.metrics`, :mod:`.logs`: the Prometheus metrics and the log line of each prediction event,
* :mod:`.page`: the gradio page, one more client of the Jobs,
* :mod:`.app`: the ASGI app both modes serve (and the settings both read from the flags),
* :mod:`.server`, :mod:`.draining`: ``python -m sonic_rt serve`` and its graceful stop on SIGTERM,
* :mod:`.ray_app`, :mod:`.batch`: ``serve --ray`` and ``python -m sonic_rt batch``.

docs/serve.md describes the API, its safety defaults and the flags.
"""
