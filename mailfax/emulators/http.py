"""What the emulators' HTTP servers share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web


@web.middleware
async def length_required(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
    """411 for a request body sent chunked: none of the providers' docs says it takes one, so
    the emulators read that pessimistically (``Content-Length`` or no body)."""
    if "chunked" in request.headers.get("Transfer-Encoding", "").lower():
        raise web.HTTPLengthRequired(text="a chunked request body is not taken")
    return await handler(request)
