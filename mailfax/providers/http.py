"""What the HTTP providers share: an HTTP error status as a typed error, reading a
``Retry-After`` header."""

from __future__ import annotations

import time
from email.utils import parsedate_to_datetime

import httpx

from mailfax import reasons
from mailfax.providers.base import ProviderError

RETRY_AFTER_MAX = 3600.0  # an hour at most, whatever a server asks for


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta seconds or an HTTP date); None if absent
    or unreadable."""
    if not value or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - (now or time.time())
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX)


def http_detail(what: str, status: int, body: str = "") -> str:
    """``what: HTTP status`` and the start of the answer's body, on one line."""
    excerpt = " ".join(body.split())[:200]
    return f"{what}: HTTP {status}" + (f" {excerpt}" if excerpt else "")


def status_error(status: int, retry_after: str | None, what: str,
                 body: str = "") -> ProviderError:
    """An HTTP error status (not 2xx) as a typed error, before any body is interpreted.

    401/403: the credentials (or an IP allowlist) are refused, permanently. 429, 502, 503,
    504: overload or maintenance, transient, after ``Retry-After`` if given. Other 5xx: the
    service's own error, transient. Anything else refuses this very request: permanent."""
    detail = http_detail(what, status, body)
    if status in (401, 403):
        return ProviderError(reasons.reason("provider_auth", detail), transient=False)
    if status in (429, 502, 503, 504):
        return ProviderError(reasons.reason("provider_unavailable", detail), transient=True,
                             retry_after=parse_retry_after(retry_after))
    if status >= 500:
        return ProviderError(reasons.reason("provider_error", detail), transient=True,
                             retry_after=parse_retry_after(retry_after))
    return ProviderError(reasons.reason("provider_error", detail), transient=False)


# Statuses that say the request was not acted on: overload, a gateway that found no backend.
NOT_ACTED_ON = frozenset({429, 502, 503})


def request_may_have_arrived(error: httpx.HTTPError) -> bool:
    """Whether a request that failed with ``error`` may still have reached the server and
    been acted on: every failure after the connection was made (a timeout or a broken
    connection while uploading or waiting for the answer), not a failure to connect."""
    return not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout
                          | httpx.UnsupportedProtocol | httpx.InvalidURL)


def status_may_have_acted(status: int) -> bool:
    """Whether a 5xx answer may come after the request was acted on (500 and 504: an error or
    a timeout behind the front end); 429, 502 and 503 say it was not."""
    return status >= 500 and status not in NOT_ACTED_ON
