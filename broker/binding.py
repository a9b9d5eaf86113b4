"""The listening sockets, bound and owned by the daemon rather than by aiohttp's sites.

A SIGHUP reload that keeps its addresses hands the new listeners duplicates of these
very sockets (``Listening.dup``) and only then closes the old listeners' copies. One
kernel socket serves throughout: nothing is refused, and nothing waiting in its accept
queue is reset. Closing a socket and binding the address again, as aiohttp's own
sites would, refused or reset two or three of ~1,100 connections per reload (measured
by tests/test_signals.py::test_a_reload_drops_no_connection), and a refused connection
is what makes gcloud cache "not on GCE".
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from aiohttp import web

from broker.errors import ConfigError
from broker.settings import Address

# Every agent on a node may ask at once when a pod starts. One value for every socket:
# asyncio listens again with the site's backlog anyway (serve_on).
BACKLOG = 1024


@dataclass(frozen=True)
class Listening:
    """The sockets of the metadata listener(s) and of the admin listener."""

    metadata: tuple[socket.socket, ...]
    admin: tuple[socket.socket, ...]

    def dup(self) -> Listening:
        """New descriptors for the same sockets: the same port and the same accept queue."""
        return Listening(tuple(s.dup() for s in self.metadata), tuple(s.dup() for s in self.admin))

    def close(self) -> None:
        """Close these descriptors (a no-op for those a stopped site has closed already)."""
        for sock in (*self.metadata, *self.admin):
            sock.close()


def display(address: object) -> str:
    """A bound address (a socket's getsockname()) as HOST:PORT, IPv6 in brackets."""
    return str(Address(*host_port(address))) if isinstance(address, tuple) else str(address)


def host_port(address: object) -> tuple[str, int]:
    assert isinstance(address, tuple)
    return str(address[0]), int(address[1])


async def bind(host: str, port: int, setting: str) -> tuple[socket.socket, ...]:
    """Bind and listen on every address ``host`` resolves to, as asyncio's create_server
    does. A port in use or an address this host does not have is a configuration error
    naming the setting (one line, exit 2), not a traceback."""
    loop = asyncio.get_running_loop()
    bound: list[socket.socket] = []
    try:
        infos = await loop.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        for family, kind, proto, _, address in dict.fromkeys(infos):  # resolvers repeat entries
            sock = socket.socket(family, kind, proto)
            bound.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "::" means IPv6 only, as with asyncio
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for sock in bound:
            sock.close()
        raise ConfigError(setting, f"cannot listen on {Address(host, port)}: {exc.strerror or exc}") from None
    return tuple(bound)


async def bind_all(metadata: list[tuple[str, int]], admin: tuple[str, int]) -> Listening:
    """Admin first (its bind error is the one reported), then each metadata address."""
    admin_socks = await bind(*admin, "admin-listen")
    metadata_socks: list[socket.socket] = []
    try:
        for host, port in metadata:
            metadata_socks.extend(await bind(host, port, "listen"))
    except BaseException:
        Listening(tuple(metadata_socks), admin_socks).close()
        raise
    return Listening(tuple(metadata_socks), admin_socks)


async def serve_on(runner: web.AppRunner, socks: tuple[socket.socket, ...]) -> None:
    """One site per socket (asyncio calls listen() again, with the site's backlog)."""
    for sock in socks:
        await web.SockSite(runner, sock, backlog=BACKLOG).start()
