"""A real S3 HTTP server on 127.0.0.1 for the data tests (moto's server mode, as s3fs tests itself).

``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on a random free loopback port
with AWS_ACCESS_KEY_ID/SECRET=testing set for the session only, and stops it at the end.
``s3_bucket`` (function): a fresh bucket, as ``s3://NAME``. ``s3_auth_enforced`` (function):
makes the server check credentials (unknown keys are rejected) for one test.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from dataclasses import dataclass

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """http://127.0.0.1:PORT"""


_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests (pip install -c constraints.txt 'moto[server]')")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    saved = {k: os.environ.get(k) for k in [*_AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL"]}
    os.environ.update(_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield S3Server(endpoint=f"http://127.0.0.1:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    from mindeye_dist.data.storage import s3_filesystem

    name = f"test-{uuid.uuid4().hex[:12]}"
    s3_filesystem(s3_server.endpoint).mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_auth_enforced(s3_server):
    """The server verifies credentials for the duration of one test (our 'testing' key is unknown)."""
    import requests

    requests.post(f"{s3_server.endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
    try:
        yield s3_server
    finally:
        requests.post(f"{s3_server.endpoint}/moto-api/reset-auth", data=b"inf", timeout=10)
