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

TEST_AWS_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def restore_env(saved: dict[str, Optional[str]]) -> None:
    """Put environment variables back as ``saved`` recorded them (None = was unset)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value




@contextlib.contextmanager
def local_s3_server() -> Iterator[str]:
    """Start ``ThreadedMotoServer`` on 127.0.0.1 with test credentials; yields the endpoint URL.

    AWS_PROFILE and AWS_ENDPOINT_URL are unset meanwhile so nothing reaches a real account.
    """
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    saved = {k: os.environ.get(k) for k in [*TEST_AWS_ENV, "AWS_PROFILE", "AWS_ENDPOINT_URL"]}
    os.environ.update(TEST_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
        restore_env(saved)
