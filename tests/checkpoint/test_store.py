"""Store semantics, identical for the local directory and S3 (moto server over HTTP)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from mamba_training.aws.session import client
from mamba_training.checkpoint import LocalStore, NotFound, S3Store, open_store
from mamba_training.errors import FencedError, StoreError
from tests.checkpoint.conftest import BUCKET


def test_bytes_round_trip_list_and_delete(store) -> None:
    store.put_bytes("a/one.json", b"1")
    store.put_bytes("a/b/two.bin", b"22")
    store.put_bytes("c.txt", b"333")
    assert store.get_bytes("a/b/two.bin") == b"22"
    assert store.exists("a/one.json") and not store.exists("a/zero.json")
    assert [(o.key, o.size) for o in store.list("a/")] == [("a/b/two.bin", 2), ("a/one.json", 1)]
    assert [o.key for o in store.list()] == ["a/b/two.bin", "a/one.json", "c.txt"]
    store.delete(["a/one.json", "a/b/two.bin"])
    assert [o.key for o in store.list()] == ["c.txt"]


def test_missing_key_is_not_found_naming_the_object(store) -> None:
    with pytest.raises(NotFound, match="nothing/here.json"):
        store.get_bytes("nothing/here.json")
    assert store.read_with_etag("nothing/here.json") is None
    with pytest.raises(NotFound, match="nothing/here.json"):
        store.get_file("nothing/here.json", Path("/tmp/never-written"))


def test_files_round_trip_with_progress(store, tmp_path: Path) -> None:
    source = tmp_path / "src.bin"
    source.write_bytes(bytes(range(256)) * 4099)
    seen: list[int] = []
    store.put_file("f/data.bin", source, progress=seen.append)
    assert sum(seen) == source.stat().st_size
    back: list[int] = []
    store.get_file("f/data.bin", tmp_path / "out" / "data.bin", progress=back.append)
    assert (tmp_path / "out" / "data.bin").read_bytes() == source.read_bytes()
    assert sum(back) == source.stat().st_size


def test_put_if_create_only_then_compare_and_swap(store) -> None:
    first = store.put_if("latest.json", b'{"step": 1}', None)
    with pytest.raises(FencedError, match="latest.json"):
        store.put_if("latest.json", b'{"step": 9}', None)
    second = store.put_if("latest.json", b'{"step": 2}', first)
    with pytest.raises(FencedError):
        store.put_if("latest.json", b'{"step": 3}', first)  # stale ETag
    assert store.read_with_etag("latest.json") == (b'{"step": 2}', second)


def test_racing_writers_exactly_one_wins(store) -> None:
    """Eight writers that all read the same ETag race to advance the pointer: one wins."""
    base = store.put_if("latest.json", b'{"step": 0}', None)
    results: list[str] = []
    barrier = threading.Barrier(8)

    def writer(i: int) -> None:
        barrier.wait()
        try:
            store.put_if("latest.json", f'{{"step": {i + 1}, "writer": {i}}}'.encode(), base)
            results.append(f"won {i}")
        except FencedError:
            results.append("fenced")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("fenced") == 7
    assert f'"writer": {winners[0].split()[1]}' in store.get_bytes("latest.json").decode()


def test_open_store_chooses_the_backend_by_url(tmp_path: Path, aws: str) -> None:
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert open_store(f"file://{tmp_path}/x").url == f"{tmp_path}/x"
    s3 = open_store("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Store) and s3.url == "s3://bucket/some/prefix"


@pytest.mark.parametrize("url, culprit", [("ftp://host/run", "ftp://host/run"), ("s3:///run", "s3:///run")])
def test_bad_store_url_is_a_usage_error_naming_it(url: str, culprit: str) -> None:
    with pytest.raises(StoreError, match=culprit) as info:
        open_store(url)
    assert info.value.exit_code == 2


def test_local_store_leaves_no_temp_or_lock_files_in_listings(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "run")
    etag = store.put_if("checkpoints/step_00000001/manifest.json", b"{}", None)
    store.put_if("checkpoints/step_00000001/manifest.json", b"{ }", etag)
    assert [o.key for o in store.list()] == ["checkpoints/step_00000001/manifest.json"]
    store.delete(["checkpoints/step_00000001/manifest.json"])
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_s3_large_files_go_up_in_parts(s3_url: str, tmp_path: Path) -> None:
    store = open_store(s3_url)
    store = S3Store(store.bucket, store.prefix, part_size=5 * 1024 * 1024, concurrency=4)
    source = tmp_path / "big.bin"
    source.write_bytes(b"\x01" * (11 * 1024 * 1024))
    store.put_file("big.bin", source)
    head = client("s3").head_object(Bucket=BUCKET, Key="runs/r1/big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # three parts
    store.get_file("big.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == source.read_bytes()


def test_s3_missing_bucket_is_one_line_naming_it(aws: str, tmp_path: Path) -> None:
    store = open_store("s3://no-such-bucket-here/run")
    for action in (lambda: store.get_bytes("latest.json"), lambda: store.list(),
                   lambda: store.put_bytes("x", b"1"), lambda: store.read_with_etag("latest.json")):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist") as info:
            action()
        assert "\n" not in str(info.value)
    (tmp_path / "f").write_bytes(b"x")
    with pytest.raises(StoreError, match="no-such-bucket-here"):
        store.put_file("f", tmp_path / "f")


def test_s3_unreachable_endpoint_names_the_object(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    store = S3Store(BUCKET, "run", max_attempts=2)  # the retries back off; two attempts prove the point
    with pytest.raises(StoreError, match=f"cannot reach S3 for s3://{BUCKET}/run/latest.json") as info:
        store.get_bytes("latest.json")
    assert "\n" not in str(info.value)
