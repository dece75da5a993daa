"""Dataset locations: a local path, ``file://...`` or ``s3://bucket/prefix``, behind one small API.

On S3, listing, metadata and writes go through s3fs; shard bytes stream through botocore
(s3.py, the webdataset ``gopen`` handler registered for ``s3://`` here: webdataset 1.x has no s3
scheme of its own). Endpoint: the explicit argument (``DataConfig.s3_endpoint`` or CLI
``--s3-endpoint``), else the standard ``AWS_ENDPOINT_URL`` environment variable, else AWS.
Credentials come only from the standard AWS sources (environment, config files, instance
roles) via botocore; they are never passed around, logged or put into error messages. Errors are
classified by exception type and S3 error code (:func:`s3.classify_error`), never by message.

s3fs is not fork-safe (fsspec/s3fs #914, filesystem_spec #755), so there is one
``S3FileSystem`` (and one botocore client) per process and endpoint, created lazily in the
process that uses it.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Iterator, Optional

import webdataset as wds

from mindeye_dist.data.errors import DataError, StorageError
from mindeye_dist.data.s3 import PipelinedReader, classify_error, describe_error, head_object_size

__all__ = ["Storage", "classify_error", "describe_error", "gopen_s3", "head_object_size", "is_s3", "open_shard",
           "resolve_endpoint", "s3_filesystem", "set_process_s3_endpoint", "storage_errors", "wait_open"]

_S3_FILESYSTEMS: dict[tuple[int, Optional[str]], object] = {}
_PROCESS_ENDPOINT: dict[str, Optional[str]] = {"endpoint": None}
# 8 MB readahead blocks (AWS, "Best practices design patterns: optimizing Amazon S3 performance": 8-16 MB ranges)
_READ_BLOCK = 8 << 20


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
    """webdataset gopen handler for ``s3://``: an :class:`s3.PipelinedReader` (its thread starts
    downloading at once). Endpoint: the ``endpoint`` keyword, else the process default, else
    AWS_ENDPOINT_URL."""
    if mode not in ("rb",):
        raise ValueError(f"gopen_s3 only reads (mode 'rb'), got {mode!r}")
    return io.BufferedReader(PipelinedReader(url, endpoint or _PROCESS_ENDPOINT["endpoint"] or resolve_endpoint()),
                             buffer_size=1 << 16)


wds.gopen_schemes["s3"] = gopen_s3


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


@contextlib.contextmanager
def storage_errors(url: str, action: str, endpoint: Optional[str] = None) -> Iterator[None]:
    """Turn I/O, botocore and s3fs errors into StorageError/DataError with a fix-it hint, by
    exception type and S3 error code (:func:`s3.classify_error`)."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - classified below, re-raised with context
        kind, text = classify_error(err), describe_error(err)
        if not is_s3(url):
            if kind == "not_found":
                raise DataError(f"cannot {action} {url}: not found ({text}). Check the path or run prepare_data.py first.") from err
            if kind == "access":
                raise StorageError(f"cannot {action} {url}: permission denied ({text}); check the file permissions") from err
            raise StorageError(f"cannot {action} {url}: {text}") from err
        where = f"{url} (endpoint {endpoint or 'AWS default'})"
        if kind == "unreachable":
            raise StorageError(
                f"cannot {action} {where}: the S3 endpoint is unreachable ({text}). "
                "Check --s3-endpoint / data.s3_endpoint / AWS_ENDPOINT_URL and that the server is up."
            ) from err
        if kind == "access":
            raise StorageError(
                f"cannot {action} {where}: access denied or invalid credentials ({text}). "
                "Check the standard AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                "~/.aws/credentials) and the bucket policy."
            ) from err
        if kind == "not_found":
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

    def list_sizes(self) -> dict[str, int]:
        """Size of every object directly under an S3 root, from one listing (a request per
        1,000 objects); {} if there is none. PermissionError where listing is not allowed."""
        try:
            entries = self._fs().ls(self.root, detail=True, refresh=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e["size"]) for e in entries if e.get("type") == "file"}

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
