"""mailfax's small HTTP endpoint: provider status pushes and health checks."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from aiohttp import web

from mailfax.providers.base import Provider

log = logging.getLogger(__name__)


def build_web_app(providers: Mapping[str, Provider]) -> web.Application:
    async def push(request: web.Request) -> web.StreamResponse:
        provider = providers.get(request.match_info["account"])
        if provider is None:
            raise web.HTTPNotFound()
        handle = getattr(provider, "handle_push", None)
        if handle is None:
            raise web.HTTPNotFound()
        response: web.StreamResponse = await handle(request, request.match_info["tail"])
        return response

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application(client_max_size=8 * 1024 * 1024)
    app.router.add_route("*", "/push/{account}/{tail:.*}", push)
    app.router.add_get("/healthz", healthz)
    return app


async def start_web(app: web.Application, host: str, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner
