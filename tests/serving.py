"""The server as a real process on a free 127.0.0.1 port, for the server tests."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(folder, log_path, *args):
    """(url, process) of the server on a free loopback port, once /health answers."""
    port = free_port()
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "mlx_smolvlm.server", "--model", str(folder), "--port", str(port), *args]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, open(log.name).read()
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.seek(0)
        print(log.read()[-3000:])


@contextmanager
def serve(folder, log_path, *args):
    """The server's URL (see serve_process)."""
    with serve_process(folder, log_path, *args) as (url, _):
        yield url
