"""sd_notify(3) for ``Type=notify``: tell systemd when mailfax is ready, reloading, stopping.

The protocol is one datagram of ``KEY=value`` lines to the unix socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` in the abstract namespace); without the variable
(not started by systemd) nothing is sent. A few lines, so no library is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(*fields: str) -> bool:
    """Send ``fields`` (e.g. "READY=1", "STATUS=…"); whether a socket was there to send to.
    A failure is logged, never raised: systemd's bookkeeping must not stop the service."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)  # a local datagram: sent at once or refused at once
            sock.connect(address)
            sock.send("\n".join(fields).encode())
    except OSError as error:
        log.warning("telling systemd %s failed: %s", fields[0], error)
        return False
    return True


def reloading_fields() -> tuple[str, str]:
    """"RELOADING=1" with the time systemd (253+, ``Type=notify-reload``) needs to match
    the READY=1 that ends the reload."""
    return "RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
