"""A real S3 HTTP server on 127.0.0.1 for the data tests (moto's server mode, as s3fs tests itself).

``s3_server`` (session): starts ``moto.server.ThreadedMotoServer`` on a random free loopback port
with AWS_ACCESS_KEY_ID/SECRET=testing set for the session only, and stops it at the end.
``s3_bucket`` (function): a fresh bucket, as ``s3://NAME``. ``s3_auth_enforced`` (function):
makes the server check credentials (unknown keys are rejected) for one test.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    """http://127.0.0.1:PORT"""


@pytest.fixture(scope="session")
def s3_server():
    pytest.importorskip("moto.server", reason="moto[server] is needed for the S3 tests (pip install -c constraints.txt 'moto[server]')")
    from mindeye_dist.data.local_s3 import local_s3_server

    with local_s3_server() as endpoint:
        yield S3Server(endpoint=endpoint)


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
