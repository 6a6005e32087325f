"""Starting the appliance's HTTP servers in tests: a free port, and `appliance ARGS --port P` until it answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.request

from tests.conftest import PY


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: list[str], port: int, env: dict, wait: float = 120) -> subprocess.Popen:
    """`python -m appliance ARGS --port PORT --threads 1`, once `/v1/models` answers (401 counts: a key is set).
    Stop it with SIGINT, as Ctrl-C stops it."""
    proc = subprocess.Popen([PY, "-m", "appliance", *args, "--port", str(port), "--threads", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + wait  # a bound on start-up, not a measurement
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            return proc
        except Exception as e:  # noqa: BLE001
            if getattr(e, "code", None) == 401:
                return proc
            time.sleep(0.3)
    proc.kill()
    raise AssertionError("server did not start")
