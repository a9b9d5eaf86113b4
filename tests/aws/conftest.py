"""Guards for the AWS tests: nothing in this process may leave loopback.

The fakes, the broker and botocore all run in the test process, so patching
``socket.connect`` catches any attempt to reach the real IMDS (169.254.169.254,
fd00:ec2::254), the ECS endpoint (169.254.170.2), Pod Identity (169.254.170.23)
or a real AWS/Google endpoint. The attempt is refused (as an unreachable
network would be) and recorded, and the test fails at teardown.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from typing import Any

import pytest

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex


def _loopback(address: Any) -> bool:
    try:
        return ipaddress.ip_address(str(address[0]).split("%")[0]).is_loopback
    except (ValueError, IndexError, TypeError):
        return False


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    attempts: list[str] = []

    def check(sock: socket.socket, address: Any) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address):
            attempts.append(repr(address))
            raise OSError(101, f"test guard: {address!r} is not loopback")  # ENETUNREACH

    def connect(sock: socket.socket, address: Any) -> None:
        check(sock, address)
        _real_connect(sock, address)

    def connect_ex(sock: socket.socket, address: Any) -> int:
        check(sock, address)
        return _real_connect_ex(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    yield attempts
    assert not attempts, f"the test tried to leave loopback: {attempts}"
