"""The loader's S3 shard reader: botocore get_object streamed by a background thread, one shard ahead.

Against the loopback moto server (tests/s3_server.py): the bytes equal the object in both read
paths, a broken connection is resumed from the byte reached, errors are classified by botocore's
S3 error codes (not message text) and never carry credentials, botocore's signing lines are
redacted in logs, and streams closed early (or prefetched and never used) stop their threads.
"""

import logging
import os
import threading

import pytest

from mindeye_dist.data import pipeline as P
from mindeye_dist.data import s3
from mindeye_dist.data.errors import CorruptShardError, DataError, StorageError
from mindeye_dist.data.storage import open_shard, s3_filesystem
from mindeye_dist.distributed import free_port

SIZE = 3 * s3.CHUNK + 12345  # several pieces and a partial last one


@pytest.fixture
def blob(s3_server, s3_bucket):
    data = os.urandom(SIZE)
    s3_filesystem(s3_server.endpoint).pipe_file(f"{s3_bucket[5:]}/obj.bin", data)
    return f"{s3_bucket}/obj.bin", data


def _reader_threads() -> list:
    return [t for t in threading.enumerate() if t.name.startswith("s3-read-") and t.is_alive()]


@pytest.mark.parametrize("mode", ["botocore", "s3fs"])
def test_bytes_match_the_object(s3_server, blob, monkeypatch, mode):
    monkeypatch.setenv(s3.READER_ENV, mode)
    url, data = blob
    f = open_shard(url, s3_server.endpoint)
    got = b"".join(iter(lambda: f.read(100_003), b""))
    f.close()
    assert got == data


def test_connection_dropped_mid_body_is_resumed(s3_server, blob, monkeypatch):
    """The first body dies after two pieces (as botocore reports a broken stream); the reader
    asks again from that byte on, by default through botocore."""
    from botocore.exceptions import ResponseStreamingError

    monkeypatch.delenv(s3.READER_ENV, raising=False)
    offsets = []
    real = s3.get_body

    class Dying:
        def __init__(self, body):
            self.body, self.reads = body, 0

        def read(self, n):
            self.reads += 1
            if self.reads > 2:
                raise ResponseStreamingError(error="Connection broken: IncompleteRead")
            return self.body.read(n)

        def close(self):
            self.body.close()

    def get_body(url, endpoint, offset=0):
        offsets.append(offset)
        body = real(url, endpoint, offset)
        return Dying(body) if offset == 0 else body

    monkeypatch.setattr(s3, "get_body", get_body)
    url, data = blob
    with open_shard(url, s3_server.endpoint) as f:
        assert f.read() == data
    assert offsets == [0, 2 * s3.CHUNK]


def test_missing_object_is_a_missing_shard(s3_server, s3_bucket):
    seg = P.Segment(f"{s3_bucket}/nope.tar", "nope.tar", 0, 1, 1, s3_server.endpoint)
    with pytest.raises(CorruptShardError, match="nope.tar listed in meta.json is missing") as err:
        list(P.shard_samples(seg, ["voxels"]))
    assert isinstance(err.value, DataError) and "NoSuchKey" in str(err.value)


def test_unreachable_endpoint_does_not_leak_credentials(s3_server, blob):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    seg = P.Segment(blob[0], "obj.bin", 0, 1, 1, endpoint)
    with pytest.raises(StorageError, match="unreachable") as err:
        list(P.shard_samples(seg, ["voxels"]))
    text = str(err.value) + repr(err.value.__cause__)
    assert "Signature" not in text and "Credential" not in text and "testing" not in text


def test_errors_are_classified_by_s3_codes(s3_server, s3_bucket, blob):
    """Real answers of the server, classified by botocore exception type and S3 error code."""
    from botocore.exceptions import ClientError

    client = s3.client(s3_server.endpoint)
    with pytest.raises(ClientError) as no_key:
        client.get_object(Bucket=s3_bucket[5:], Key="nope")
    with pytest.raises(ClientError) as no_bucket:
        client.get_object(Bucket="no-such-bucket-here", Key="k")
    assert (s3.error_code(no_key.value), s3.error_code(no_bucket.value)) == ("NoSuchKey", "NoSuchBucket")
    assert s3.classify_error(no_key.value) == s3.classify_error(no_bucket.value) == "not_found"
    assert s3.head_object_size(f"{s3_bucket}/nope", s3_server.endpoint) is None
    assert s3.head_object_size(blob[0], s3_server.endpoint) == SIZE
    # the message text plays no part: a misleading message keeps its code's class
    fake = ClientError({"Error": {"Code": "AccessDenied", "Message": "connection refused; NoSuchKey"}}, "GetObject")
    assert s3.classify_error(fake) == "access" and "connection refused" not in s3.describe_error(fake)
    wrapped = PermissionError("x")  # what s3fs raises, with the ClientError as its cause
    wrapped.__cause__ = ClientError({"Error": {"Code": "SignatureDoesNotMatch"}}, "ListObjectsV2")
    assert s3.classify_error(wrapped) == "access"


def test_wrong_credentials_are_access_errors(s3_server, blob, s3_auth_enforced):
    from botocore.exceptions import ClientError

    seg = P.Segment(blob[0], "obj.bin", 0, 1, 1, s3_server.endpoint)
    with pytest.raises(StorageError, match="invalid credentials") as err:
        list(P.shard_samples(seg, ["voxels"]))
    assert "testing" not in str(err.value) and "InvalidAccessKeyId" in str(err.value)
    assert isinstance(err.value.__cause__, ClientError)


def test_signing_material_is_redacted_from_botocore_logs(s3_server, blob, caplog):
    url, data = blob
    with caplog.at_level(logging.DEBUG, logger="botocore"):
        body = s3.get_body(url, s3_server.endpoint)
        assert body.read() == data
    text = caplog.text
    assert "Credential=<redacted>" in text  # the filter saw botocore's real request lines
    assert "Credential=testing" not in text and "Signature=" not in text.replace("Signature=<redacted>", "")


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
    def one_sample(seg, fields, stream=None):
        yield {"seg": seg.name, "s": stream, "__pos__": 0}

    monkeypatch.setattr(P, "shard_samples", one_sample)
    segs = [P.Segment(f"{s3_bucket}/s{i}.bin", f"s{i}", 0, 1, 1, s3_server.endpoint) for i in range(4)]
    gen = P.read_segments(segs, ["voxels"], quota=None, on_corrupt="fail", skips=None, refill=False)
    first = next(gen)
    assert first["seg"] == "s0" and first["s"] is None  # the first shard is opened by shard_samples itself
    assert opened == [f"{s3_bucket}/s{i}.bin" for i in range(1, 1 + P.PREFETCH_SHARDS)]
    assert len(_reader_threads()) >= 1
    gen.close()
    assert not _reader_threads()
