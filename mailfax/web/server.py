"""mailfax's small HTTP endpoints: provider status pushes, and health checks with metrics.

Both can be served by one listener (``[web] listen``), or the health checks and metrics by a
listener of their own (``[web] health_listen``) so the public push listener, behind a
reverse proxy, serves pushes only."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mailfax.providers.base import Provider
from mailfax.store.base import Store
from mailfax.web.health import not_ready_text
from mailfax.web.metrics import Metrics

log = logging.getLogger(__name__)


def build_web_app(providers: Mapping[str, Provider], store: Store | None = None,
                  metrics: Metrics | None = None,
                  warnings: Callable[[], list[str]] = lambda: [],
                  problems: Callable[[], Awaitable[list[str]]] | None = None, *,
                  push_routes: bool = True, health_routes: bool = True) -> web.Application:
    """``warnings``: what /readyz adds below "ready" (a reconstructed WSDL): the service
    works, but an operator should look. ``problems``: why it is not ready (503); without
    it, /readyz asks the store only. ``push_routes``/``health_routes``: which of the two
    sets of routes this listener serves."""

    async def push(request: web.Request) -> web.StreamResponse:
        """``/push/{account}/…``: the account's adapter checks the token (bound to its
        provider, the account and the job) and that the job is the account's, and at most
        wakes the tracker. No access log is written, so no token is logged here."""
        provider = providers.get(request.match_info["account"])
        if provider is None:
            raise web.HTTPNotFound()
        handle = getattr(provider, "handle_push", None)
        if handle is None:
            raise web.HTTPNotFound()
        response: web.StreamResponse = await handle(request, request.match_info["tail"])
        return response

    async def healthz(request: web.Request) -> web.Response:
        """The process answers."""
        return web.Response(text="ok\n")

    reported: list[str] = []  # the problems last logged

    async def readyz(request: web.Request) -> web.Response:
        """Mail can be taken and faxed (503 with the reasons otherwise)."""
        if problems is not None:
            found = await problems()
            if found != reported:  # logged when it changes, not at every probe
                if found:
                    log.warning("not ready: %s", "; ".join(found))
                else:
                    log.info("ready again")
                reported[:] = found
            if found:
                return web.Response(status=503, text=not_ready_text(found))
            return web.Response(text=ready_text(warnings()))
        if store is None:
            return web.Response(text="ready\n")
        try:
            async with asyncio.timeout(5):
                await store.outbox_depth()
        except Exception as error:  # any failure means: not ready
            log.warning("not ready: store: %s", type(error).__name__)
            return web.Response(status=503, text="store unavailable\n")
        return web.Response(text=ready_text(warnings()))

    async def prometheus(request: web.Request) -> web.Response:
        if metrics is None or store is None:
            raise web.HTTPNotFound()
        body = await metrics.render(store)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application(client_max_size=8 * 1024 * 1024)
    if push_routes:
        app.router.add_route("*", "/push/{account}/{tail:.*}", push)
    if health_routes:
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/readyz", readyz)
        app.router.add_get("/metrics", prometheus)
    return app


def ready_text(warnings: list[str]) -> str:
    """"ready", and each warning on a line of its own ("warning: ...")."""
    if not warnings:
        return "ready\n"
    return "ready, with warnings\n" + "".join(f"warning: {line}\n" for line in warnings)


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner


def runner_url(runner: web.AppRunner) -> str:
    """``http://host:port`` of a started runner, with the port the system gave (port 0)."""
    host, port = runner.addresses[0][:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"
