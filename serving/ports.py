"""Whether a port can be listened on, in one line a user can act on. Standard library only: the
local deployer asks before it starts anything, the servers before they load their model."""
from __future__ import annotations

import errno
import socket


def port_in_use(host: str, port: int) -> str | None:
    """Why `port` on `host` cannot be bound ("port 8080 on 127.0.0.1 is in use"), or None if it can.
    SO_REUSEADDR as uvicorn's own bind, so a port in TIME_WAIT counts as free."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is in use"
            return f"cannot listen on {host}:{port}: {err.strerror or err}"
    return None
