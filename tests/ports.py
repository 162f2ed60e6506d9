"""Ports for the servers that tests and benchmarks start.

A server binds its port only once its engine has loaded, seconds after the port was chosen. A port from
`bind(("127.0.0.1", 0))` lies in Linux's ephemeral range, where every outgoing connection takes its source port,
so any connection made in between (a pip download, a probe, another test's client) can take it first. Ports are
therefore drawn at random from below that range, where only explicit listeners bind; a listener that took the
same port in between is the one race left, and `launch` retries it with a fresh port.
"""

from __future__ import annotations

import random
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

LOW_PORT = 20000  # above the well-known and registered ports that local daemons tend to use
ADDRESS_IN_USE = "address already in use"  # uvicorn's and Prometheus' message for EADDRINUSE
_draw = random.SystemRandom()  # independent of any seed a test sets


def ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):  # not Linux: the IANA range
        return 49152, 65535


def free_port(host: str = "127.0.0.1") -> int:
    """A port on `host` that nothing listens on now, outside the ephemeral range."""
    low, high = ephemeral_range()
    start, top = (LOW_PORT, low) if low - LOW_PORT >= 1000 else (high + 1, 65536)
    for _ in range(200):
        port = _draw.randrange(start, top)
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {start}-{top - 1} on {host}")


def launch(
    start: Callable[[int], subprocess.Popen], log: Path, ready: Callable[[int], bool], timeout: float
) -> tuple[subprocess.Popen, int]:
    """Start a server with `start(port)` and wait until `ready(port)`; a server that exits because another
    listener took its port in between is started again on a fresh port (up to 3 tries). RuntimeError, with the
    log's tail, for any other exit or for `timeout` seconds without being ready."""
    for _ in range(3):
        port = free_port()
        proc = start(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if ready(port):
                return proc, port
            time.sleep(1)
        else:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"server not ready after {timeout} s:\n{tail(log)}")
        if ADDRESS_IN_USE not in tail(log).lower():
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail(log)}")
    raise RuntimeError(f"server lost its port three times:\n{tail(log)}")


def tail(log: Path, chars: int = 6000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else ""
