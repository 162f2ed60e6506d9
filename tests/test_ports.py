"""tests/ports.py: ports outside the ephemeral range, and a server that loses its port is started again."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from tests import ports


def test_free_port_is_outside_the_ephemeral_range_and_bindable():
    low, high = ports.ephemeral_range()
    for _ in range(50):
        port = ports.free_port()
        assert not low <= port <= high
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_launch_retries_on_a_fresh_port_when_the_first_is_taken(tmp_path):
    log = tmp_path / "server.log"
    taken = socket.socket()
    taken.bind(("127.0.0.1", ports.free_port()))
    taken.listen()
    taken_port = taken.getsockname()[1]
    tried: list[int] = []

    def spawn(port: int) -> subprocess.Popen:
        # the first start finds its port taken, as when another listener binds it during the engine's load
        tried.append(port)
        bind = taken_port if len(tried) == 1 else port
        with open(log, "wb") as out:
            cmd = [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(bind)]
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path)

    def ready(port: int) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        proc, port = ports.launch(spawn, log, ready, timeout=30)
    finally:
        taken.close()
    try:
        assert len(tried) == 2 and port == tried[1] != taken_port
        assert ready(port)
    finally:
        proc.terminate()
        proc.wait(10)


def test_launch_reports_any_other_exit(tmp_path):
    log = tmp_path / "server.log"

    def spawn(port: int) -> subprocess.Popen:
        with open(log, "wb") as out:
            cmd = [sys.executable, "-c", "raise SystemExit('engine failed to load')"]
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    with pytest.raises(RuntimeError, match="engine failed to load"):
        ports.launch(spawn, log, lambda port: False, timeout=30)
