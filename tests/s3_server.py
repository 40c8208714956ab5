"""A real S3-compatible server for tests: moto's server in standalone mode, in its own OS process on loopback.

``moto_s3_server()`` starts it, waits until it answers HTTP, yields a ``S3Server`` (``endpoint``, ``env``,
``make_bucket``) and on exit terminates the process and waits for it, also when the test failed.

Single-threaded on purpose: ``python -m moto.server`` serves every request on its own thread, and moto's
``If-None-Match: *`` check (``moto/s3/responses.py``: look the key up, then store it) is not atomic, so two
racing conditional creates could both succeed. The launcher below runs the same application through
werkzeug's ``run_simple`` with ``threaded=False``: requests are handled one at a time (HTTP/1.0, one connection
each), which makes the conditional create atomic, as real S3 is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

LAUNCHER = (
    "import sys; from werkzeug.serving import run_simple; "
    "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app; "
    "run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False, "
    "request_handler=MotoRequestHandler)"
)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
START_SECONDS = 30.0


@dataclass
class S3Server:
    """A running moto server: its endpoint and the environment a client or worker process needs to reach it."""

    endpoint: str
    env: dict[str, str] = field(default_factory=dict)

    def make_bucket(self, name: str) -> str:
        """Create bucket ``name`` on the server; its URL ``s3://name``."""
        request = urllib.request.Request(f"{self.endpoint}/{name}", method="PUT")
        with urllib.request.urlopen(request, timeout=10):
            pass
        return f"s3://{name}"


def free_port() -> int:
    """A TCP port on loopback nobody listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_answering(process: subprocess.Popen, endpoint: str, log: Any) -> None:
    """Return once the server answers HTTP; ``RuntimeError`` when it exits or does not answer in time."""
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"moto server exited with {process.returncode}: {log.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {endpoint} did not answer within {START_SECONDS:.0f} s")


@contextlib.contextmanager
def moto_s3_server() -> Iterator[S3Server]:
    """Run a single-threaded moto S3 server on a free loopback port for the duration of the ``with`` block."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint, "AWS_ENDPOINT_URL": endpoint, "NO_PROXY": "127.0.0.1,localhost",
           "no_proxy": "127.0.0.1,localhost"}
    with tempfile.TemporaryFile() as log:  # a file, not a pipe: the request log must never fill a pipe and stall the server
        process = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(port)], stdout=subprocess.DEVNULL, stderr=log,
                                   env={**os.environ, **env, "MOTO_PORT": str(port)})
        try:
            wait_until_answering(process, endpoint, log)
            yield S3Server(endpoint=endpoint, env=env)
        finally:
            stop(process)


def stop(process: subprocess.Popen) -> None:
    """Terminate the server and wait for it (killed when it does not stop within 10 s)."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
