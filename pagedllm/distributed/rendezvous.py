"""Where the ranks of one engine meet: a free TCP port on rank 0's host.

The port is picked by the OS at start-up, never configured, so several engines
(and test runs) share a host. Between closing the probe socket and rank 0
binding the port another process could take it; torch.distributed then fails
at start-up with "address already in use", which a restart resolves.
"""

from __future__ import annotations

import socket


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def tcp_init_method(host: str) -> str:
    """A torch.distributed init_method URL on a port free right now on `host`."""
    port = free_port(host)
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"
