"""Reading S3 objects with botocore: a streaming reader one shard ahead, HEADs, and errors
classified by botocore's exception types and S3 error codes.

Shard bytes come from ``get_object()["Body"]`` (botocore signs, retries and parses errors), read
by a background thread in 1 MB pieces; a connection dropped mid-body is resumed with a ranged GET
from the byte reached. Measured against the hand-written signed-GET client this replaces and
against s3fs with the same loader benchmark (interleaved epochs; see the data benchmark), so
nothing here is hand-written HTTP. ``MINDEYE_S3_READER=s3fs`` reads through s3fs instead (for
comparison).

Credentials come from the standard AWS chain (environment, config files, instance roles). They
never reach an error message (errors carry the S3 error code, not the server's text) nor a log
line (botocore's own debug lines about signing are redacted, :func:`redact_credentials_in_logs`).
"""

from __future__ import annotations

import io
import logging
import os
import queue
import re
import threading
from typing import Optional

from mindeye_dist.data.errors import DataError


CHUNK = 1 << 20
"""Bytes per read of a body: 8 MB reads cost 2.5x the CPU per MB of 1 MB ones on the CI machine
(each is a fresh mmapped buffer, page-faulted and zeroed); 256 KB was no cheaper."""
READER_ENV = "MINDEYE_S3_READER"
"""``botocore`` (default) or ``s3fs``: what streams shard bytes."""
_CLIENTS: dict[tuple[int, Optional[str]], object] = {}
_CLIENTS_LOCK = threading.Lock()

# S3 error codes (ClientError.response["Error"]["Code"]; HEAD answers carry only the status)
_ACCESS_CODES = frozenset({
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
    "InvalidClientTokenId", "AccountProblem", "AllAccessDisabled", "RequestTimeTooSkewed", "InvalidSecurity", "403",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})


def client(endpoint: Optional[str]):
    """This process's botocore S3 client for ``endpoint`` (clients are thread-safe, not fork-safe)."""
    key = (os.getpid(), endpoint)
    with _CLIENTS_LOCK:  # reader threads and check_shards' HEAD threads may ask at once
        if key not in _CLIENTS:
            _CLIENTS[key] = _new_client(endpoint)
    return _CLIENTS[key]


def _new_client(endpoint: Optional[str]):
    import botocore.session
    from botocore.config import Config

    cfg = Config(
        signature_version="s3v4", s3={"addressing_style": "path"} if endpoint else {},
        # an unreachable endpoint fails in seconds with a clear message, not after minutes
        connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
        max_pool_connections=16,  # the HEADs of check_shards run 16 at a time
        # shards carry our own SHA-256 (integrity.py); botocore's CRC of each body would be a
        # second full pass over the bytes
        response_checksum_validation="when_required",
    )
    redact_credentials_in_logs()
    return botocore.session.get_session().create_client("s3", endpoint_url=endpoint, config=cfg)


def _reset_lock_in_child() -> None:
    global _CLIENTS_LOCK
    _CLIENTS_LOCK = threading.Lock()  # a fork while another thread held it would leave it locked


os.register_at_fork(after_in_child=_reset_lock_in_child)


def split_url(url: str) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    return bucket, key


def get_body(url: str, endpoint: Optional[str], offset: int = 0):
    """The streaming body of ``s3://bucket/key`` from byte ``offset`` (botocore StreamingBody)."""
    bucket, key = split_url(url)
    kw = {"Range": f"bytes={offset}-"} if offset else {}
    resp = client(endpoint).get_object(Bucket=bucket, Key=key, **kw)
    if offset and resp.get("ContentRange") is None:  # a resume got the whole object again: bytes would repeat
        resp["Body"].close()
        raise OSError(f"{url}: the server ignored the Range header of a resumed read")
    return resp["Body"]


def head_object_size(url: str, endpoint: Optional[str]) -> Optional[int]:
    """Size of an object from one HEAD, or None if it does not exist."""
    from botocore.exceptions import ClientError

    bucket, key = split_url(url)
    try:
        return int(client(endpoint).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except ClientError as err:
        if error_code(err) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


# --------------------------------------------------------------------------------------------
# Errors


def _chain(err: Optional[BaseException]):
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def error_code(err: BaseException) -> Optional[str]:
    """The S3 error code of a botocore ClientError (``NoSuchKey``, ``AccessDenied``, ``404``, ...)."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return None if code is None else str(code)
    return None


def classify_error(err: BaseException) -> str:
    """``unreachable``, ``access``, ``not_found`` or ``other``, from the exception types along the
    chain (botocore's, and the builtins s3fs translates S3 codes into) and S3 error codes;
    never from message text."""
    import socket

    from botocore.exceptions import (
        ClientError, ConnectTimeoutError, EndpointConnectionError, NoCredentialsError, PartialCredentialsError,
        ProxyConnectionError,
    )

    for e in _chain(err):
        if isinstance(e, ClientError):
            code = error_code(e)
            return "access" if code in _ACCESS_CODES else "not_found" if code in _NOT_FOUND_CODES else "other"
        if isinstance(e, (EndpointConnectionError, ConnectTimeoutError, ProxyConnectionError, ConnectionRefusedError,
                          socket.gaierror)):
            return "unreachable"
        if isinstance(e, (NoCredentialsError, PartialCredentialsError, PermissionError)):
            return "access"
        if isinstance(e, FileNotFoundError):
            return "not_found"
    return "other"


def describe_error(err: BaseException) -> str:
    """Short text of an exception chain for messages: S3 errors by code and HTTP status only
    (never the server's text), others by type and message (no credentials reach those)."""
    parts = []
    for e in _chain(err):
        code = error_code(e)
        if code is not None:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")  # type: ignore[attr-defined]
            parts.append(f"S3 error {code}" + (f" (HTTP {status})" if status else ""))
            break  # the causes below a ClientError add nothing
        parts.append(f"{type(e).__name__}: {e}")
        if len(parts) == 3:
            break
    return " <- ".join(parts)


class _RedactCredentials(logging.Filter):
    """Removes the access key id, signatures and session tokens from botocore's debug lines."""

    _PATTERNS = (
        (re.compile(r"(Credential=)[^/,\s'\"]+"), r"\1<redacted>"),
        (re.compile(r"(Signature[=:]\s*)[0-9a-f]{16,}"), r"\1<redacted>"),
        (re.compile(r"((?:X-Amz-Security-Token|x-amz-security-token)['\"]?[=:]\s*b?['\"]?)[^\s&,'\"]+"), r"\1<redacted>"),
    )

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        redacted = text
        for pattern, repl in self._PATTERNS:
            redacted = pattern.sub(repl, redacted)
        if redacted != text:
            record.msg, record.args = redacted, ()
        return True


def redact_credentials_in_logs() -> None:
    """Install the redaction on the loggers that print signing material at debug level."""
    for name in ("botocore.auth", "botocore.endpoint", "botocore.hooks", "botocore.httpsession", "urllib3.connectionpool"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactCredentials) for f in logger.filters):
            logger.addFilter(_RedactCredentials())


# --------------------------------------------------------------------------------------------
# The streaming reader


class PipelinedReader(io.RawIOBase):
    """An S3 object read by a background thread in 1 MB pieces, at most ``ahead_bytes`` ahead of
    the consumer.

    The loader's workers decode one shard while the next one's bytes arrive (the loader opens the
    next shard as it starts one, ``pipeline.PREFETCH_SHARDS``): without it every GET's latency
    stalls the worker, which measured 0.66 s of waiting per epoch of 58 shards on a loopback
    server, and real S3's first byte takes tens of milliseconds. Errors in the thread are raised
    by the consumer's next read; :meth:`wait_open` raises the opening's (not found, denied).
    """

    def __init__(self, url: str, endpoint: Optional[str], ahead_bytes: int = 16 << 20) -> None:
        super().__init__()
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, ahead_bytes // CHUNK))
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(url, endpoint), daemon=True,
                                        name=f"s3-read-{url.rsplit('/', 1)[-1]}")
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, url: str, endpoint: Optional[str]) -> None:
        reader = os.environ.get(READER_ENV) or "botocore"
        use_s3fs = reader == "s3fs"
        try:
            if reader not in ("botocore", "s3fs"):
                raise DataError(f"{READER_ENV}={reader!r}: use botocore (the default) or s3fs")
            if use_s3fs:
                from mindeye_dist.data.storage import s3_filesystem

                body = s3_filesystem(endpoint).open(url, "rb", block_size=8 << 20, cache_type="readahead")
            else:
                body = get_body(url, endpoint)
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._open_error = err
            self._opened.set()
            return
        self._opened.set()
        try:
            self._stream(body, url, endpoint, resumes=0 if use_s3fs else 2)
        except BaseException as err:  # noqa: BLE001 - raised by the consumer's next read
            self._put(err)

    def _stream(self, body, url: str, endpoint: Optional[str], resumes: int) -> None:
        """The body in ``CHUNK`` pieces into the queue; a connection dropped mid-body is resumed
        from the byte reached (a ranged GET), at most ``resumes`` times."""
        from botocore.exceptions import ConnectionClosedError, IncompleteReadError, ReadTimeoutError, ResponseStreamingError

        offset = 0
        try:
            while not self._stop.is_set():
                try:
                    data = body.read(CHUNK)
                except (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError) as err:
                    if resumes <= 0:
                        raise ConnectionError(f"reading {url} broke off at byte {offset}: {type(err).__name__}") from err
                    resumes -= 1
                    body.close()
                    body = get_body(url, endpoint, offset)
                    continue
                if not self._put(data) or not data:
                    return
                offset += len(data)
        finally:
            body.close()  # after a complete read urllib3 has already returned the connection to the pool

    def wait_open(self) -> None:
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        if self.closed:
            raise ValueError("read from a closed PipelinedReader")
        while not self._buf:
            if self._eof:
                return 0
            self.wait_open()
            item = self._queue.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            if not item:
                self._eof = True
                return 0
            self._buf = memoryview(item)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n

    def close(self) -> None:
        if not self.closed:
            self._stop.set()
            while True:  # unblock a producer waiting on a full queue
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._thread.join(timeout=5)
        super().close()
