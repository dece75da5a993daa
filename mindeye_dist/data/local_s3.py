"""A loopback S3 server (moto's server mode) for tests and benchmarks, and env save/restore.

Never the real cloud: the server binds 127.0.0.1 on a free port, and the dummy credentials moto
accepts are set only while the server runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator, Optional

from mindeye_dist.distributed import free_port

SERVER_PIDS: dict[str, int] = {}
"""Endpoint -> pid of a server started with ``separate_process`` (the benchmark reads its CPU time)."""

TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def restore_env(saved: dict[str, Optional[str]]) -> None:
    """Put environment variables back as ``saved`` recorded them (None = was unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value




@contextlib.contextmanager
def local_s3_server(separate_process: bool = False, start_timeout_s: float = 60.0) -> Iterator[str]:
    """Start moto's S3 server on 127.0.0.1 with test credentials; yields the endpoint URL.

    By default ``ThreadedMotoServer`` runs in this process (cheap, for tests). With
    ``separate_process`` it runs as ``python -m moto.server`` in its own process, so serving
    does not share this process's GIL with the loader's consumer thread; the benchmark uses it
    (in-process serving measured 0.43x local disk, a property of the test rig, not of s3fs).
    AWS_PROFILE and AWS_ENDPOINT_URL are unset meanwhile so nothing reaches a real account.
    """
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in [*TEST_AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL"]}
    os.environ.update(TEST_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        if separate_process:
            with _moto_process(port, endpoint, start_timeout_s):
                yield endpoint
        else:
            from moto.server import ThreadedMotoServer

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
            server.start()
            try:
                yield endpoint
            finally:
                server.stop()
    finally:
        restore_env(saved)


@contextlib.contextmanager
def _moto_process(port: int, endpoint: str, start_timeout_s: float) -> Iterator[None]:
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    import tempfile

    errlog = tempfile.TemporaryFile()  # werkzeug logs every request to stderr; read only on failure
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=errlog, env=dict(os.environ))
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if proc.poll() is not None:
                errlog.seek(0)
                err = errlog.read().decode(errors="replace")[-2000:]
                raise RuntimeError(f"moto server exited with {proc.returncode} before serving:\n{err}")
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/data.json", timeout=2).close()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not answer on {endpoint} within {start_timeout_s:.0f} s") from None
                time.sleep(0.1)
        SERVER_PIDS[endpoint] = proc.pid
        yield
    finally:
        SERVER_PIDS.pop(endpoint, None)
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        errlog.close()
