"""Storage helpers on local paths and on a real S3-speaking server (moto)."""

from __future__ import annotations

import pytest

from pipelines import storage
from pipelines.storage import S3Config, StorageError, StorageNotFoundError
from tests.support.services import free_port


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store"), None
    server = request.getfixturevalue("s3_server")
    bucket = server.make_bucket("storage-test")
    return f"s3://{bucket}/{tmp_path.name}", S3Config().resolved()


def test_put_read_list_delete_round_trip(root, tmp_path):
    base, s3 = root
    storage.put_bytes(storage.join(base, "a/x.tar"), b"x" * 10, s3=s3)
    src = tmp_path / "big.bin"
    src.write_bytes(b"y" * 3_000_000)
    storage.put_file(storage.join(base, "b.tar"), src, s3=s3)
    storage.put_bytes(storage.join(base, "c.json"), b"{}", s3=s3)
    listed = storage.list_files(base, s3=s3, suffixes=(".tar",))
    assert [f.uri for f in listed] == [storage.join(base, "a/x.tar"), storage.join(base, "b.tar")]
    assert [f.size for f in listed] == [10, 3_000_000]
    assert storage.read_bytes(storage.join(base, "b.tar"), s3=s3) == src.read_bytes()
    got = storage.download(storage.join(base, "a/x.tar"), tmp_path / "dl", s3=s3)
    assert got.read_bytes() == b"x" * 10
    assert storage.exists(storage.join(base, "c.json"), s3=s3)
    storage.delete(storage.join(base, "c.json"), s3=s3)
    storage.delete(storage.join(base, "c.json"), s3=s3)  # missing is fine
    assert not storage.exists(storage.join(base, "c.json"), s3=s3)


def test_missing_object_names_it(root):
    base, s3 = root
    missing = storage.join(base, "nope/missing.mp4")
    with pytest.raises(StorageNotFoundError, match=r"missing\.mp4"):
        storage.read_bytes(missing, s3=s3)


def test_local_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out" / "shard.tar"

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        storage._local_atomic_write(target, boom)
    assert not target.exists()
    assert list((tmp_path / "out").iterdir()) == []
    (tmp_path / "out" / ".shard.tar.tmp-dead").write_bytes(b"left by a SIGKILL")
    assert storage.remove_stale_temp_files(str(tmp_path / "out")) == 1


def test_unreachable_endpoint_retries_then_names_the_object():
    cfg = S3Config(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id="k",
        secret_access_key="s",
        max_attempts=3,
        backoff_s=0.01,
    )
    with pytest.raises(StorageError, match=r"s3://bucket/key\.tar failed after 3 attempt") as err:
        storage.read_bytes("s3://bucket/key.tar", s3=cfg)
    assert "secret" not in repr(cfg)
    assert "access_key" not in repr(cfg)
    assert "'s'" not in str(err.value)


def test_pyarrow_filesystem_reads_what_storage_wrote(s3_server):
    bucket = s3_server.make_bucket("pafs")
    s3 = S3Config().resolved()
    storage.put_bytes(f"s3://{bucket}/p/x.bin", b"hello", s3=s3)
    fs, path = storage.pyarrow_filesystem(f"s3://{bucket}/p/x.bin", s3=s3)
    with fs.open_input_stream(path) as fh:
        assert fh.read() == b"hello"
