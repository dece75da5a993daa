"""Dataset locations: a local path, ``file://...`` or ``s3://bucket/prefix``, behind one small API.

S3 goes through s3fs. Endpoint: the explicit argument (``DataConfig.s3_endpoint`` or CLI
``--s3-endpoint``), else the standard ``AWS_ENDPOINT_URL`` environment variable, else AWS.
Credentials come only from the standard AWS sources (environment, config files, instance
roles) via botocore; they are never passed around, logged or put into error messages.

s3fs is not fork-safe (fsspec/s3fs #914, filesystem_spec #755), so there is one
``S3FileSystem`` per process and endpoint, created lazily in the process that uses it. The same
rule backs the webdataset ``gopen`` handler registered for ``s3://`` (webdataset 1.x has no
s3 scheme of its own).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import queue
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import IO, Iterator, Optional

import webdataset as wds

from mindeye_dist.data.errors import DataError, StorageError

log = logging.getLogger(__name__)

_S3_FILESYSTEMS: dict[tuple[int, Optional[str]], object] = {}
_PROCESS_ENDPOINT: dict[str, Optional[str]] = {"endpoint": None}
_READ_BLOCK = 8 << 20  # 8 MB readahead blocks: S3 guidance is 8-16 MB range GETs (perf notes A3)


def is_s3(url: str) -> bool:
    return str(url).startswith("s3://")


def resolve_endpoint(explicit: Optional[str] = None) -> Optional[str]:
    """Explicit endpoint, else ``AWS_ENDPOINT_URL``, else None (the AWS default)."""
    return explicit or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_filesystem(endpoint: Optional[str] = None):
    """This process's S3FileSystem for ``endpoint`` (never shared across a fork)."""
    import s3fs

    key = (os.getpid(), endpoint)
    fs = _S3_FILESYSTEMS.get(key)
    if fs is None:
        # Few retries and short connect timeout: an unreachable endpoint should fail in seconds
        # with a clear message, not after minutes (s3fs and botocore retries multiply, s3fs #541).
        config = {"connect_timeout": 5, "read_timeout": 60, "retries": {"max_attempts": 2, "mode": "standard"}}
        fs = s3fs.S3FileSystem(
            endpoint_url=endpoint, skip_instance_cache=True, config_kwargs=config, default_block_size=_READ_BLOCK
        )
        fs.retries = 2
        _S3_FILESYSTEMS[key] = fs
    return fs


def set_process_s3_endpoint(endpoint: Optional[str]) -> None:
    """Endpoint the ``s3://`` gopen handler uses in this process (set again in each worker)."""
    _PROCESS_ENDPOINT["endpoint"] = endpoint


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, endpoint: Optional[str] = None, **kw) -> IO[bytes]:
    """webdataset gopen handler for ``s3://``: a :class:`PipelinedReader` (its thread starts
    downloading at once). Endpoint: the ``endpoint`` keyword, else the process default, else
    AWS_ENDPOINT_URL."""
    if mode not in ("rb",):
        raise ValueError(f"gopen_s3 only reads (mode 'rb'), got {mode!r}")
    return io.BufferedReader(PipelinedReader(url, endpoint or _PROCESS_ENDPOINT["endpoint"] or resolve_endpoint()),
                             buffer_size=1 << 16)


wds.gopen_schemes["s3"] = gopen_s3


_HTTP_CHUNK = 1 << 20
"""Bytes per read of a plain GET's body: 8 MB reads cost 2.5x the CPU per MB of 1 MB ones on
the CI machine (each is a fresh mmapped buffer, page-faulted and zeroed); 256 KB was no cheaper."""
_S3_GETTERS: dict[tuple[int, Optional[str]], "_S3HttpGetter"] = {}
_S3_READER_ENV = "MINDEYE_S3_READER"
"""``http`` (default): shard bytes via presigned GETs on urllib3; ``s3fs``: through s3fs."""
_FALLBACK_CODES = ("PermanentRedirect", "AuthorizationHeaderMalformed", "AuthorizationQueryParametersError",
                   "IllegalLocationConstraintException", "TemporaryRedirect")


class _UseS3fs(Exception):
    """The presigned GET cannot work here (a bucket in another region): read through s3fs."""


class _S3HttpGetter:
    """Shard bytes over plain HTTP: botocore signs a GET URL (the standard AWS credential chain,
    as s3fs uses), urllib3 streams the body into preallocated buffers.

    Why not s3fs for the bulk bytes: on the 2-core CI machine s3fs spent 1.4-1.6 ms of client CPU
    per MB, this path 0.4 (1 MB reads; moto on 127.0.0.1, 4 MB shards); in a loader worker that
    CPU is taken from decoding. s3fs still
    does everything else (listing, metadata, writes). The signed URL carries a signature (and an
    STS token if one is in use): it is never put into an error message or a log line.
    """

    def __init__(self, endpoint: Optional[str]) -> None:
        import botocore.session
        import urllib3
        from botocore.config import Config

        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"} if endpoint else {})
        self.endpoint = endpoint
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, config=cfg)
        # No urllib3 retries: its retry warnings quote the signed URL. get() retries itself.
        self.pool = urllib3.PoolManager(num_pools=4, maxsize=4, retries=False,
                                        timeout=urllib3.Timeout(connect=5.0, read=60.0))
        _redact_signed_urls_in_logs()

    def get(self, url: str, offset: int = 0, attempts: int = 3):
        """An open urllib3 response for ``s3://bucket/key`` from byte ``offset``; a refused or
        dropped connection and 5xx answers are tried ``attempts`` times in all."""
        import urllib3

        bucket, _, key = url[len("s3://"):].partition("/")
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        failure = ""
        for attempt in range(attempts):
            if attempt:
                time.sleep(0.2 * 2 ** (attempt - 1))
            signed = self.client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=3600)
            try:
                resp = self.pool.request("GET", signed, headers=headers, preload_content=False, redirect=False)
            except urllib3.exceptions.HTTPError as err:
                # urllib3's messages quote the signed URL: keep only the kind of failure
                reason = getattr(err, "reason", None) or err
                failure = type(reason).__name__
                continue
            if resp.status in (500, 502, 503, 504) and attempt + 1 < attempts:
                resp.close()
                continue
            break
        else:
            # raised outside the except block, so no exception context carries the URL along
            raise ConnectionError(f"could not connect to the S3 endpoint for {url}: {failure} ({attempts} attempts)")
        if resp.status == 206 or (resp.status == 200 and not offset):
            return resp
        if resp.status == 200:  # a resume got the whole object again: the bytes would repeat
            resp.close()
            raise OSError(f"{url}: the server ignored the Range header of a resumed read")
        body = resp.read(4096, decode_content=True)
        resp.close()
        code = _xml_field(body, "Code") or f"HTTP {resp.status}"
        if resp.status == 404:
            raise FileNotFoundError(f"{url}: {code}")
        if resp.status == 403:
            raise PermissionError(f"{url}: {code} (AccessDenied)")
        if resp.status in (301, 307, 400) and code in _FALLBACK_CODES:
            raise _UseS3fs(code)
        raise OSError(f"{url}: {code} (HTTP {resp.status})")


class _RedactSignedUrl(logging.Filter):
    """Replaces the query of a signed URL (signature, credential scope, STS token) in a log record."""

    _QUERY = re.compile(r"\?[^\s'\"]*X-Amz-[^\s'\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        if "X-Amz-" in text:
            record.msg, record.args = self._QUERY.sub("?<signed query redacted>", text), ()
        return True


def _redact_signed_urls_in_logs() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "urllib3.util.retry", "urllib3.response"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _RedactSignedUrl) for f in logger.filters):
            logger.addFilter(_RedactSignedUrl())


def _xml_field(body: bytes, name: str) -> Optional[str]:
    text = body.decode("utf-8", errors="replace")
    start = text.find(f"<{name}>")
    end = text.find(f"</{name}>", start + 1)
    return text[start + len(name) + 2:end].strip() if start >= 0 and end > start else None


class _BotoBody:
    def __init__(self, body):
        self.body = body

    def read(self, n):
        return self.body.read(n)

    def close(self):
        self.body.close()

    def release_conn(self):
        self.body.close()


class _S3BotoGetter:
    """MEASUREMENT VARIANT: get_object()['Body'] streaming."""

    def __init__(self, endpoint: Optional[str]) -> None:
        import botocore.session
        from botocore.config import Config

        validation = os.environ.get("MINDEYE_S3_CHECKSUM", "when_supported")
        cfg = Config(signature_version="s3v4", s3={"addressing_style": "path"} if endpoint else {},
                     connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"},
                     response_checksum_validation=validation)
        self.client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint, config=cfg)

    def get(self, url: str, offset: int = 0, attempts: int = 3):
        bucket, _, key = url[len("s3://"):].partition("/")
        kw = {"Range": f"bytes={offset}-"} if offset else {}
        return _BotoBody(self.client.get_object(Bucket=bucket, Key=key, **kw)["Body"])


def _http_getter(endpoint: Optional[str]):
    """This process's getter (None when MINDEYE_S3_READER=s3fs or after a fallback)."""
    mode = os.environ.get(_S3_READER_ENV, "http")
    if mode == "s3fs":
        return None
    key = (os.getpid(), endpoint, mode)
    if key not in _S3_GETTERS:
        _S3_GETTERS[key] = _S3BotoGetter(endpoint) if mode.startswith("botocore") else _S3HttpGetter(endpoint)
    return _S3_GETTERS[key]


class PipelinedReader(io.RawIOBase):
    """An S3 object read by a background thread in 1 MB pieces, at most ``ahead_bytes`` ahead
    of the consumer.

    The loader's workers decode one shard while the next one's bytes arrive (the loader opens
    the next shard as it starts one, ``pipeline.PREFETCH_SHARDS``): without it every GET's
    latency stalls the worker, which measured 0.66 s of waiting per epoch of 58 shards on a
    loopback server, and real S3's first byte takes tens of milliseconds. The bytes come through
    :class:`_S3HttpGetter` (a signed GET on urllib3, about half of s3fs's CPU per MB), or through
    s3fs when ``MINDEYE_S3_READER=s3fs`` or the signed GET cannot work (a bucket in another
    region). Errors in the thread are raised by the consumer's next read; :meth:`wait_open`
    raises the opening's (not found, denied) where the caller classifies them.
    """

    def __init__(self, url: str, endpoint: Optional[str], chunk: int = _READ_BLOCK, ahead_bytes: int = 16 << 20) -> None:
        super().__init__()
        # pieces are _HTTP_CHUNK (plain GETs) or ``chunk`` bytes (s3fs): about ahead_bytes either way
        self._queue: queue.Queue = queue.Queue(maxsize=max(2, ahead_bytes // _HTTP_CHUNK))
        self._stop = threading.Event()
        self._opened = threading.Event()
        self._open_error: Optional[BaseException] = None
        self._buf = memoryview(b"")
        self._eof = False
        self._thread = threading.Thread(target=self._run, args=(url, endpoint, chunk), daemon=True,
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

    def _run(self, url: str, endpoint: Optional[str], chunk: int) -> None:
        getter = None
        try:
            getter = _http_getter(endpoint)
            if getter is not None:
                try:
                    resp = getter.get(url)
                except _UseS3fs as why:
                    log.warning("presigned GETs do not work for %s (%s): this process reads S3 through s3fs", url, why)
                    _S3_GETTERS[(os.getpid(), endpoint)] = None  # type: ignore[assignment]
                    getter = None
            if getter is None:
                f = s3_filesystem(endpoint).open(url, "rb", block_size=chunk, cache_type="readahead")
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            self._open_error = err
            self._opened.set()
            return
        self._opened.set()
        try:
            if getter is None:
                with f:
                    while not self._stop.is_set():
                        data = f.read(_HTTP_CHUNK)
                        if not self._put(data) or not data:
                            return
            else:
                self._stream_http(getter, resp, url)
        except BaseException as err:  # noqa: BLE001 - raised by the consumer's next read
            self._put(err)

    def _stream_http(self, getter: "_S3HttpGetter", resp, url: str, resumes: int = 2) -> None:
        """The body in ``_HTTP_CHUNK`` pieces into the queue; a connection dropped mid-body is
        resumed from the byte reached (a ranged GET), at most ``resumes`` times."""
        import urllib3

        offset, finished = 0, False
        try:
            while not self._stop.is_set():
                try:
                    data = resp.read(_HTTP_CHUNK)
                except (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError) as err:
                    resp.close()
                    broke = type(err).__name__
                else:
                    broke = ""
                if broke:
                    if resumes <= 0:  # raised outside the except block: no context quoting the URL
                        raise ConnectionError(f"reading {url} broke off at byte {offset}: {broke}")
                    resumes -= 1
                    resp = getter.get(url, offset)
                    continue
                if not self._put(data):
                    return
                if not data:
                    finished = True
                    return
                offset += len(data)
        finally:
            if finished:
                resp.release_conn()  # the connection goes back to the pool for the next shard
            else:
                resp.close()  # stopped mid-body: this connection cannot be reused

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


def open_shard(url: str, endpoint: Optional[str] = None) -> IO[bytes]:
    """A read stream for a shard through webdataset's ``gopen`` (``s3://`` is :func:`gopen_s3`,
    whose download starts at once: call it one shard ahead to overlap it with decoding). An S3
    opening's errors surface on the first read or :func:`wait_open`."""
    return wds.gopen(url, "rb", **({"endpoint": endpoint} if endpoint else {}))


def wait_open(stream: IO[bytes]) -> None:
    """Raise the opening's error of a stream from :func:`open_shard` (a no-op for local files)."""
    raw = getattr(stream, "raw", None)
    if isinstance(raw, PipelinedReader):
        raw.wait_open()


def _describe_exception(err: BaseException) -> str:
    """Short text of an exception chain (no credentials ever reach these messages)."""
    parts = []
    while err is not None and len(parts) < 3:
        parts.append(f"{type(err).__name__}: {err}")
        err = err.__cause__ or err.__context__
    return " <- ".join(parts)


@contextlib.contextmanager
def storage_errors(url: str, action: str, endpoint: Optional[str] = None) -> Iterator[None]:
    """Turn low-level I/O, botocore and s3fs errors into StorageError/DataError with a fix-it hint."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below, re-raised with context
        text = _describe_exception(err)
        low = text.lower()
        where = f"{url} (endpoint {endpoint or 'AWS default'})" if is_s3(url) else url
        if any(s in low for s in ("could not connect", "connection refused", "endpointconnectionerror", "connecttimeout", "name or service not known", "connect timeout")):
            raise StorageError(
                f"cannot {action} {where}: the S3 endpoint is unreachable ({text}). "
                "Check --s3-endpoint / data.s3_endpoint / AWS_ENDPOINT_URL and that the server is up."
            ) from err
        if any(s in low for s in ("invalidaccesskeyid", "signaturedoesnotmatch", "invalidclienttokenid", "access denied", "accessdenied", "forbidden", "permissionerror", "unable to locate credentials", "nocredentialserror")):
            raise StorageError(
                f"cannot {action} {where}: access denied or invalid credentials ({type(err).__name__}). "
                "Check the standard AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials) and the bucket policy."
            ) from err
        if isinstance(err, FileNotFoundError) or "nosuchbucket" in low or "nosuchkey" in low:
            raise DataError(f"cannot {action} {where}: not found ({text}). Check the URL or run prepare_data.py first.") from err
        raise StorageError(f"cannot {action} {where}: {text}") from err


class Storage:
    """A dataset root (local directory or S3 prefix) with atomic placement of whole files."""

    def __init__(self, url: str, s3_endpoint: Optional[str] = None) -> None:
        url = str(url)
        if not url:
            raise DataError("empty dataset URL: pass a local path, file://PATH or s3://bucket/prefix (data.url)")
        self.endpoint = resolve_endpoint(s3_endpoint)
        if is_s3(url):
            root = url[len("s3://"):].strip("/")
            if not root or root.split("/")[0] == "":
                raise DataError(f"S3 URL {url!r} has no bucket: use s3://bucket/prefix")
            self.root = root
            self.url = "s3://" + root
        else:
            if url.startswith("file://"):
                url = url[len("file://"):]
            elif "://" in url:
                raise DataError(f"unsupported URL scheme in {url!r}: use a local path, file://PATH or s3://bucket/prefix")
            self.root = str(Path(url).expanduser().absolute())
            self.url = self.root

    @property
    def remote(self) -> bool:
        return is_s3(self.url)

    def _fs(self):
        return s3_filesystem(self.endpoint)

    def child(self, name: str) -> str:
        """Full URL of ``name`` under the root (a local path or ``s3://bucket/prefix/name``)."""
        return f"{self.url}/{name}" if self.remote else os.path.join(self.root, name)

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def errors(self, action: str, name: str = ""):
        return storage_errors(self.child(name) if name else self.url, action, self.endpoint)

    def exists(self, name: str) -> bool:
        with self.errors("check", name):
            if self.remote:
                return bool(self._fs().exists(self._key(name)))
            return os.path.exists(self.child(name))

    def read_bytes(self, name: str) -> bytes:
        with self.errors("read", name):
            if self.remote:
                return self._fs().cat_file(self._key(name))
            with open(self.child(name), "rb") as f:
                return f.read()

    def open_read(self, name: str) -> IO[bytes]:
        """A read stream for ``name`` (the same opener the loader's gopen uses)."""
        with self.errors("open", name):
            if self.remote:
                return self._fs().open(self._key(name), "rb", block_size=_READ_BLOCK, cache_type="readahead")
            return open(self.child(name), "rb")

    def list_names(self) -> list[str]:
        """File names directly under the root ([] if it does not exist)."""
        with self.errors("list"):
            if self.remote:
                try:
                    entries = self._fs().ls(self.root, detail=False, refresh=True)
                except FileNotFoundError:
                    return []
                return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
            if not os.path.isdir(self.root):
                return []
            return sorted(os.listdir(self.root))

    def makedirs(self) -> None:
        """Create the local directory, or check that the bucket exists and is writable."""
        with self.errors("create"):
            if self.remote:
                bucket = self.root.split("/")[0]
                try:  # not fs.exists(): for buckets it answers False on connection errors too
                    self._fs().ls(bucket, detail=False, refresh=True)
                except FileNotFoundError as err:
                    raise DataError(f"bucket {bucket!r} of {self.url} does not exist; create it first (aws s3 mb s3://{bucket})") from err
            else:
                os.makedirs(self.root, exist_ok=True)

    def put_file(self, local_path: str, name: str) -> None:
        """Place a complete local file at ``name`` so readers never see a partial file.

        Local: copy to a hidden temporary name in the same directory, then ``os.replace`` (atomic).
        S3: one PUT (multipart for big files) of the finished file; S3 makes an object visible
        only once the upload completes, so the object is the rename.
        """
        with self.errors("write", name):
            if self.remote:
                self._fs().put_file(local_path, self._key(name))
            else:
                tmp = os.path.join(self.root, f".{name}.partial-{uuid.uuid4().hex[:8]}")
                try:
                    shutil.copyfile(local_path, tmp)
                    os.replace(tmp, self.child(name))
                finally:
                    if os.path.exists(tmp):
                        os.remove(tmp)

    def move_local_file(self, local_path: str, name: str) -> None:
        """Like put_file, but a local temporary already in the root is renamed (no copy)."""
        if not self.remote and os.path.dirname(os.path.abspath(local_path)) == self.root:
            with self.errors("write", name):
                os.replace(local_path, self.child(name))
        else:
            self.put_file(local_path, name)
            os.remove(local_path)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Atomically write a small file (meta.json, stats.npz)."""
        with self.errors("write", name):
            if self.remote:
                self._fs().pipe_file(self._key(name), data)
            else:
                tmp = os.path.join(self.root, f".{name}.partial-{uuid.uuid4().hex[:8]}")
                with open(tmp, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, self.child(name))

    def remove(self, name: str) -> None:
        """Delete ``name`` if it exists."""
        with self.errors("delete", name):
            if self.remote:
                if self._fs().exists(self._key(name)):
                    self._fs().rm_file(self._key(name))
            elif os.path.exists(self.child(name)):
                os.remove(self.child(name))

    def temp_dir(self) -> str:
        """Where shards are written before placement: inside the root locally (rename, no copy),
        a local temporary directory for S3."""
        import tempfile

        if self.remote:
            return tempfile.mkdtemp(prefix="mindeye_shards_")
        return self.root
