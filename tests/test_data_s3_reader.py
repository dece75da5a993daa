"""The loader's S3 shard reader: signed GETs streamed by a background thread, one shard ahead.

Against the loopback moto server (tests/s3_server.py): the bytes equal the object in both read
paths, a broken connection is resumed from the byte reached, errors name the shard but never
the signed URL, and streams closed early (or prefetched and never used) stop their threads.
"""

import os
import threading

import pytest

from mindeye_dist.data import pipeline as P
from mindeye_dist.data import storage
from mindeye_dist.data.errors import DataError, StorageError
from mindeye_dist.data.storage import open_shard, s3_filesystem
from mindeye_dist.distributed import free_port

SIZE = 3 * storage._HTTP_CHUNK + 12345  # several pieces and a partial last one


@pytest.fixture
def blob(s3_server, s3_bucket):
    data = os.urandom(SIZE)
    s3_filesystem(s3_server.endpoint).pipe_file(f"{s3_bucket[5:]}/obj.bin", data)
    return f"{s3_bucket}/obj.bin", data


def _reader_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("s3-read-") and t.is_alive()]


@pytest.mark.parametrize("mode", ["http", "s3fs"])
def test_bytes_match_the_object(s3_server, blob, monkeypatch, mode):
    monkeypatch.setenv(storage._S3_READER_ENV, mode)
    url, data = blob
    f = open_shard(url, s3_server.endpoint)
    got = b"".join(iter(lambda: f.read(100_003), b""))
    f.close()
    assert got == data


def test_http_path_is_used_by_default(s3_server, blob, monkeypatch):
    monkeypatch.delenv(storage._S3_READER_ENV, raising=False)
    calls = []
    real = storage._S3HttpGetter.get
    monkeypatch.setattr(storage._S3HttpGetter, "get", lambda self, u, offset=0: calls.append(offset) or real(self, u, offset))
    url, data = blob
    with open_shard(url, s3_server.endpoint) as f:
        assert f.read() == data
    assert calls == [0]


def test_connection_dropped_mid_body_is_resumed(s3_server, blob, monkeypatch):
    """The first response dies after two pieces; the reader asks again from that byte on."""
    import urllib3

    monkeypatch.delenv(storage._S3_READER_ENV, raising=False)
    offsets = []
    real = storage._S3HttpGetter.get

    class Dying:
        def __init__(self, resp):
            self.resp, self.reads = resp, 0

        def read(self, n):
            self.reads += 1
            if self.reads > 2:
                raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")
            return self.resp.read(n)

        def close(self):
            self.resp.close()

        def release_conn(self):
            self.resp.release_conn()

    def get(self, u, offset=0):
        offsets.append(offset)
        resp = real(self, u, offset)
        return Dying(resp) if offset == 0 else resp

    monkeypatch.setattr(storage._S3HttpGetter, "get", get)
    url, data = blob
    with open_shard(url, s3_server.endpoint) as f:
        assert f.read() == data
    assert offsets == [0, 2 * storage._HTTP_CHUNK]


def test_missing_object_is_not_found(s3_server, s3_bucket):
    seg = P.Segment(f"{s3_bucket}/nope.tar", "nope.tar", 0, 1, 1, s3_server.endpoint)
    with pytest.raises(DataError, match="not found"):
        list(P.shard_samples(seg, ["vox"]))


def test_unreachable_endpoint_does_not_leak_the_signed_url(s3_server, blob):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    seg = P.Segment(blob[0], "obj.bin", 0, 1, 1, endpoint)
    with pytest.raises(StorageError, match="unreachable") as err:
        list(P.shard_samples(seg, ["vox"]))
    text = str(err.value) + repr(err.value.__cause__)
    assert "X-Amz-Signature" not in text and "Credential" not in text and "testing" not in text


def test_early_close_and_unused_prefetch_stop_their_threads(s3_server, s3_bucket, monkeypatch):
    fs = s3_filesystem(s3_server.endpoint)
    data = os.urandom(SIZE)
    for i in range(4):
        fs.pipe_file(f"{s3_bucket[5:]}/s{i}.bin", data)
    f = open_shard(f"{s3_bucket}/s0.bin", s3_server.endpoint)
    assert f.read(10) == data[:10]
    f.close()
    assert not _reader_threads()
    # read_segments opens the next PREFETCH_SHARDS shards ahead; stopping early closes them all
    opened = []
    real_open = P.open_shard
    monkeypatch.setattr(P, "open_shard", lambda u, e=None: opened.append(u) or real_open(u, e))
    monkeypatch.setattr(P, "shard_samples", lambda seg, fields, stream=None: iter([{"seg": seg.name, "s": stream}]))
    segs = [P.Segment(f"{s3_bucket}/s{i}.bin", f"s{i}", 0, 1, 1, s3_server.endpoint) for i in range(4)]
    gen = P.read_segments(segs, ["vox"], quota=None, on_corrupt="fail", corrupt_counter=None, refill=False)
    first = next(gen)
    assert first["seg"] == "s0" and first["s"] is None  # the first shard is opened by shard_samples itself
    assert opened == [f"{s3_bucket}/s{i}.bin" for i in range(1, 1 + P.PREFETCH_SHARDS)]
    first_stream_threads = len(_reader_threads())
    assert first_stream_threads >= 1
    gen.close()
    assert not _reader_threads()


def test_signed_query_is_redacted_from_urllib3_logs(caplog):
    import logging

    storage._redact_signed_urls_in_logs()
    signed = "/b/k.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIDEXAMPLE%2F20261125&X-Amz-Signature=abc123"
    with caplog.at_level(logging.DEBUG, logger="urllib3.connectionpool"):
        logging.getLogger("urllib3.connectionpool").warning("Retrying after %s: %s", "boom", signed)
    assert "/b/k.tar?<signed query redacted>" in caplog.text
    assert "AKIDEXAMPLE" not in caplog.text and "abc123" not in caplog.text
