"""S3 faults through a fault-injecting proxy in front of the moto server, and a full local disk.

Transient faults (5xx, dropped connections, delays) are retried and the save commits; a store
that stays down fails the save with a clear error and the previous checkpoint stays authoritative.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy, S3Store, read_latest, verify_checkpoint
from mamba_training.errors import FencedError, StoreError
from tests.checkpoint.conftest import BUCKET, make_bucket
from tests.checkpoint.tiny import build, same, train, weights
from tests.integration.faults import FaultProxy


@pytest.fixture
def proxy(aws: str, monkeypatch: pytest.MonkeyPatch):
    make_bucket()
    with FaultProxy(aws) as fault_proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.url)
        yield fault_proxy


def s3_manager(tmp_path: Path, **store_kwargs) -> CheckpointManager:
    store = S3Store(BUCKET, "runs/faulty", **store_kwargs)
    return CheckpointManager(store, policy=CheckpointPolicy(keep_last=5), cache_dir=tmp_path / "cache")


def test_transient_errors_drops_and_delays_are_retried_and_the_save_commits(proxy: FaultProxy, tmp_path: Path) -> None:
    state = build()
    mgr = s3_manager(tmp_path)
    proxy.add("status", method="PUT", contains=".safetensors", times=1, status=503)
    proxy.add("status", method="PUT", contains=".json", times=1, status=500)
    proxy.add("drop", method="PUT", contains="manifest.json", times=1)
    proxy.add("delay", method="PUT", contains="latest.json", times=1, seconds=0.3)
    proxy.add("drop", method="GET", contains="latest.json", times=1)
    train(state, 2)
    mgr.save(2, 8, state)
    assert mgr.flush().step == 2
    assert all(rule.hits == rule.times for rule in proxy.rules), [(r.action, r.contains, r.hits) for r in proxy.rules]
    proxy.clear()
    fresh = build()
    assert CheckpointManager(mgr.store, cache_dir=tmp_path / "fresh").restore(fresh).step == 2
    assert same(weights(fresh), weights(state))


def test_a_commit_whose_response_was_lost_is_not_mistaken_for_a_lost_race(proxy: FaultProxy, tmp_path: Path) -> None:
    """S3 applies the manifest and latest.json PUTs but the responses are lost: botocore retries with
    the same condition, gets 412, and the store sees its own bytes there: committed, not fenced."""
    state = build()
    mgr = s3_manager(tmp_path)
    train(state, 1)
    mgr.save(1, 4, state)
    mgr.flush()
    proxy.add("drop_after", method="PUT", contains="manifest.json", times=1)
    proxy.add("drop_after", method="PUT", contains="latest.json", times=1)
    train(state, 1)
    mgr.save(2, 8, state)
    assert mgr.flush().step == 2
    assert [r.hits for r in proxy.rules] == [1, 1]
    assert read_latest(mgr.store)["step"] == 2
    train(state, 1)
    mgr.save(3, 12, state)  # still the writer: its ETag is the one S3 holds
    assert mgr.flush().step == 3


def test_lost_response_then_409_then_412_is_our_own_write_not_a_lost_race(proxy: FaultProxy, tmp_path: Path) -> None:
    """S3 applies the PUT but the response is lost; botocore's retry meets a 409 (a conditional
    write in progress), which botocore does not retry; the store's own retry then gets 412 on a
    fresh attempt (botocore reports no retry): the object holds this writer's bytes, so it won."""
    state = build()
    mgr = s3_manager(tmp_path)
    train(state, 1)
    mgr.save(1, 4, state)
    mgr.flush()
    for name in ("manifest.json", "latest.json"):
        proxy.add("drop_after", method="PUT", contains=name, times=1)
        proxy.add("status", method="PUT", contains=name, times=1, status=409)
    train(state, 1)
    mgr.save(2, 8, state)
    assert mgr.flush().step == 2
    assert [r.hits for r in proxy.rules] == [1, 1, 1, 1]
    puts = [path for method, path in proxy.requests if method == "PUT" and path.endswith("latest.json")]
    assert len(puts) == 4  # the applied one, botocore's retry (409), the store's retry (412), step 3 below
    assert read_latest(mgr.store)["step"] == 2
    train(state, 1)
    mgr.save(3, 12, state)  # still the writer: its ETag is the one S3 holds
    assert mgr.flush().step == 3


def test_a_real_other_writer_still_fences_through_409s_and_lost_responses(proxy: FaultProxy) -> None:
    store = S3Store(BUCKET, "runs/faulty")
    seen = store.put_if("latest.json", b'{"step": 1, "writer_id": "a"}', None)
    store.put_if("latest.json", b'{"step": 2, "writer_id": "b"}', seen)  # another writer moves it
    proxy.add("drop", method="PUT", contains="latest.json", times=1)  # lost before it reached S3
    proxy.add("status", method="PUT", contains="latest.json", times=1, status=409)
    with pytest.raises(FencedError, match="latest.json was changed by another writer: this writer stops"):
        store.put_if("latest.json", b'{"step": 2, "writer_id": "a"}', seen)
    assert [r.hits for r in proxy.rules] == [1, 1]
    assert store.get_bytes("latest.json") == b'{"step": 2, "writer_id": "b"}'


def test_409s_are_retried_a_bounded_number_of_times(proxy: FaultProxy) -> None:
    store = S3Store(BUCKET, "runs/faulty")
    proxy.add("status", method="PUT", contains="latest.json", times=3, status=409)
    etag = store.put_if("latest.json", b'{"step": 1}', None)
    assert store.read_with_etag("latest.json") == (b'{"step": 1}', etag)
    proxy.add("status", method="PUT", contains="latest.json", status=409)  # for ever
    with pytest.raises(StoreError, match=r"latest.json: conditional write kept conflicting \(409\) 6 times"):
        store.put_if("latest.json", b'{"step": 2}', etag)
    assert store.get_bytes("latest.json") == b'{"step": 1}'


def test_a_multipart_upload_survives_a_dropped_part(proxy: FaultProxy, tmp_path: Path) -> None:
    state = build(width=100_000)  # ~16 MB of weights and moments: four 5 MiB parts
    mgr = s3_manager(tmp_path, part_size=5 * 1024 * 1024)
    proxy.add("drop", method="PUT", contains="partNumber=2", times=1)
    proxy.add("status", method="PUT", contains="partNumber=3", times=1, status=503)
    train(state, 1)
    mgr.save(1, 4, state)
    assert mgr.flush().step == 1
    assert [r.hits for r in proxy.rules] == [1, 1]
    verify_checkpoint(mgr.store, 1, tmp_path / "verify")


def test_store_down_fails_clearly_and_the_previous_checkpoint_stays_authoritative(
        proxy: FaultProxy, tmp_path: Path) -> None:
    state = build()
    mgr = s3_manager(tmp_path, max_attempts=2)
    train(state, 1)
    mgr.save(1, 4, state)
    mgr.flush()
    expected = weights(state)
    proxy.add("status", method="PUT", contains="checkpoints/step_00000002/", status=503)
    train(state, 1)
    mgr.save(2, 8, state)
    with pytest.raises(StoreError, match=r"S3 error on s3://ckpt-test/runs/faulty/checkpoints/step_00000002/.*SlowDown"):
        mgr.flush()
    proxy.clear()
    assert read_latest(mgr.store)["step"] == 1
    fresh = build()
    assert CheckpointManager(mgr.store, cache_dir=tmp_path / "fresh").restore(fresh).step == 1
    assert same(weights(fresh), expected)
    mgr.save(2, 8, state)  # the store is back: the next save commits
    assert mgr.flush().step == 2


def test_access_denied_names_the_object(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.add("status", method="GET", contains="latest.json", status=403)
    with pytest.raises(StoreError, match=f"access denied to s3://{BUCKET}/runs/faulty/latest.json"):
        s3_manager(tmp_path).restore(build())


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 2 MiB tmpfs: a real ENOSPC (this suite runs as root; see docs/checkpoints.md)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_full_local_disk_is_a_clear_error_and_earlier_checkpoints_stay_intact(tiny_disk: Path) -> None:
    run = tiny_disk / "run"
    state = build()
    mgr = CheckpointManager(str(run), policy=CheckpointPolicy(keep_last=5), cache_dir=tiny_disk / "cache")
    train(state, 1)
    mgr.save(1, 4, state)
    mgr.flush()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    filler = tiny_disk / "filler"
    with open(filler, "wb") as fh:  # leave 8 KiB: less than one checkpoint (~25 KiB)
        fh.write(b"\0" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize - 8 * 1024))
    train(state, 1)
    mgr.save(2, 8, state)
    with pytest.raises(StoreError, match="no space left on device|No space left on device"):
        mgr.flush()
    assert json.loads((run / "latest.json").read_bytes())["step"] == 1
    assert all(p.read_bytes() == data for p, data in before.items())
    assert not list(run.glob("checkpoints/step_00000002/manifest.json"))
    filler.unlink()
    fresh = build()
    assert CheckpointManager(str(run), cache_dir=tiny_disk / "cache").restore(fresh).step == 1


def test_cli_access_denied_is_one_line_exit_1(proxy: FaultProxy, capsys) -> None:
    from mamba_training.cli.main import main

    proxy.add("status", method="GET", status=403)
    capsys.readouterr()  # only the command's own output counts
    with pytest.raises(SystemExit) as exit_info:
        main(["checkpoints", "list", f"s3://{BUCKET}/runs/faulty"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith(f"error: access denied to s3://{BUCKET}/runs/faulty")
    assert err.count("\n") == 1 and "Traceback" not in err
