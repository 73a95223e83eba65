"""The checkpoint engine: commit protocol, async save, verified restore, fallback, retention, fencing."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from mamba_training.checkpoint import (
    CheckpointManager,
    CheckpointPolicy,
    list_checkpoints,
    open_store,
    prefetch_latest,
    read_latest,
    verify_checkpoint,
)
from mamba_training.checkpoint.protocol import wait_for_prefetch
from mamba_training.checkpoint.store import LocalStore
from mamba_training.errors import CheckpointError, FencedError, StoreError
from tests.checkpoint.tiny import build, same, train, weights


def manager(url: str, tmp_path: Path, **kwargs) -> CheckpointManager:
    policy = kwargs.pop("policy", CheckpointPolicy(every_steps=1, keep_last=10))
    return CheckpointManager(url, policy=policy, cache_dir=tmp_path / f"cache-{len(list(tmp_path.iterdir()))}",
                             config={"model": {"width": 16}}, config_hash="abc", **kwargs)


def save_steps(mgr: CheckpointManager, state: dict, steps: list[int]) -> None:
    for step in steps:
        train(state, step - state["trainer"].step)
        mgr.save(step, state["trainer"].tokens_seen, state)
    mgr.flush()
    mgr.settle()  # retention too: the tests tamper with the store next


def data_file(store, step: int) -> str:
    manifest = json.loads(store.get_bytes(f"checkpoints/step_{step:08d}/manifest.json"))
    return f"checkpoints/step_{step:08d}/{manifest['tensors']}"


def test_restore_then_continue_is_bitwise_identical_to_never_stopping(store_url: str, tmp_path: Path) -> None:
    straight = build()
    train(straight, 3)
    mgr = manager(store_url, tmp_path)
    mgr.save(3, 12, straight)
    train(straight, 4)  # the optimizer step waits for the background copy: the checkpoint is step 3
    commit = mgr.flush()
    assert commit is not None and commit.step == 3 and commit.tokens_seen == 12
    assert 0 < commit.stall_seconds <= commit.seconds and commit.bytes > 0

    resumed = build(seed=0)
    info = manager(store_url, tmp_path).restore(resumed)  # empty cache: downloads from S3
    assert info is not None and (info.step, info.tokens_seen, info.world_size) == (3, 12, 1)
    assert resumed["trainer"].step == 3 and resumed["sampler"].position == 12
    train(resumed, 4)
    assert same(weights(straight), weights(resumed))
    assert resumed["optimizer"].state_dict()["state"][0]["exp_avg"].equal(
        straight["optimizer"].state_dict()["state"][0]["exp_avg"])
    assert resumed["scheduler"].last_epoch == straight["scheduler"].last_epoch


def test_commit_writes_data_then_manifest_then_latest(store_url: str, tmp_path: Path) -> None:
    state = build()
    mgr = manager(store_url, tmp_path, writer_id="writer-a")
    order: list[str] = []
    for name in ("put_file", "put_bytes", "put_if"):
        original = getattr(mgr.store, name)
        setattr(mgr.store, name, lambda key, *a, _o=original, **k: (order.append(key), _o(key, *a, **k))[1])
    save_steps(mgr, state, [2])
    assert [k.rsplit("/", 1)[-1].split("-")[0] for k in order] == ["state", "state", "manifest.json", "latest.json"]
    store = open_store(store_url)
    manifest = json.loads(store.get_bytes("checkpoints/step_00000002/manifest.json"))
    assert {"format_version", "step", "tokens_seen", "world_size", "config_hash", "writer_id", "time",
            "files", "model_shapes", "config"} <= set(manifest)
    assert (manifest["step"], manifest["writer_id"], manifest["config_hash"]) == (2, "writer-a", "abc")
    assert manifest["model_shapes"]["0.weight"] == [16, 8]
    for name, meta in manifest["files"].items():
        assert len(meta["sha256"]) == 64 and meta["size"] == len(store.get_bytes(f"checkpoints/step_00000002/{name}"))
    assert read_latest(store)["step"] == 2 and read_latest(store)["writer_id"] == "writer-a"


def test_tampered_file_is_never_loaded_and_restore_falls_back(store_url: str, tmp_path: Path, caplog) -> None:
    state = build()
    save_steps(manager(store_url, tmp_path), state, [1, 2])
    expected = build()
    train(expected, 1)
    store = open_store(store_url)
    key = data_file(store, 2)
    data = bytearray(store.get_bytes(key))
    data[-1] ^= 0xFF  # same size, one flipped bit
    store.put_bytes(key, bytes(data))

    with pytest.raises(CheckpointError, match=f"{key} fails its sha256 check"):
        manager(store_url, tmp_path).restore(build(), step=2)
    fresh = build()
    with caplog.at_level(logging.WARNING):
        info = manager(store_url, tmp_path).restore(fresh)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert info.step == 1 and len(warnings) == 1, warnings  # which checkpoint and why, in one line
    assert "step_00000001, the newest that verifies: step 2 skipped" in warnings[0]
    assert f"{key} fails its sha256 check" in warnings[0]
    assert same(weights(fresh), weights(expected))


def test_truncated_file_and_corrupt_manifest_are_refused_naming_them(store_url: str, tmp_path: Path) -> None:
    save_steps(manager(store_url, tmp_path), build(), [1, 2])
    store = open_store(store_url)
    key = data_file(store, 2)
    store.put_bytes(key, store.get_bytes(key)[:100])
    with pytest.raises(CheckpointError, match=f"{key} is 100 bytes, manifest says"):
        verify_checkpoint(store, 2, tmp_path / "c1")
    store.put_bytes("checkpoints/step_00000001/manifest.json", b'{"files": ')
    with pytest.raises(CheckpointError, match="step_00000001/manifest.json is corrupt"):
        verify_checkpoint(store, 1, tmp_path / "c2")


def test_nothing_verifiable_raises_and_leaves_the_state_untouched(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(), [1, 2])
    store = open_store(url)
    for step in (1, 2):
        key = data_file(store, step)
        store.put_bytes(key, b"X" + store.get_bytes(key)[1:])
    victim = build(seed=5)
    before = weights(victim)
    with pytest.raises(CheckpointError, match="no checkpoint in .* passes verification"):
        manager(url, tmp_path).restore(victim)
    assert same(before, weights(victim)) and victim["trainer"].step == 0


@pytest.mark.parametrize("pointer", [None, b"{not json", b'{"step": 7}'])
def test_missing_or_bad_latest_falls_back_to_newest_verified(store_url: str, tmp_path: Path, pointer) -> None:
    state = build()
    save_steps(manager(store_url, tmp_path), state, [1, 2, 3])
    store = open_store(store_url)
    store.put_bytes("checkpoints/step_00000009/state-x.safetensors", b"incomplete: no manifest")
    if pointer is None:
        store.delete(["latest.json"])
    else:
        store.put_bytes("latest.json", pointer)
    fresh = build()
    info = manager(store_url, tmp_path).restore(fresh)
    assert info.step == 3 and same(weights(fresh), weights(state))


def test_empty_store_restores_nothing(store_url: str, tmp_path: Path) -> None:
    assert manager(store_url, tmp_path).restore(build()) is None


def test_another_model_shape_is_refused_naming_the_tensor(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(width=16), [1])
    wider = build(width=32)
    before = weights(wider)
    with pytest.raises(CheckpointError, match=r"0.weight has shape \(16, 8\) there but \(32, 8\) here"):
        manager(url, tmp_path).restore(wider)
    assert same(before, weights(wider))


def test_a_state_that_refuses_to_load_rolls_back_the_others(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(seed=0), [2])
    other = build(seed=0)
    other["sampler"].seed = 99  # Sampler.load_state_dict rejects another seed
    with pytest.raises(CheckpointError, match="sampler state does not load: sampler seed 0 != 99"):
        manager(url, tmp_path).restore(other)
    assert other["trainer"].step == 0 and same(weights(other), weights(build(seed=0)))


def test_retention_keeps_last_k_and_every_mth_and_drops_stale_incomplete(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    store = LocalStore(url)
    store.put_bytes("checkpoints/step_00000002/state-dead.safetensors", b"left by a killed writer")
    mgr = manager(url, tmp_path, policy=CheckpointPolicy(every_steps=1, keep_last=2, keep_every=4))
    save_steps(mgr, build(), [1, 3, 4, 5, 6, 7])
    mgr.close()  # retention runs after the commit; close() waits for it
    assert sorted(s.step for s in list_checkpoints(store)) == [4, 6, 7]
    assert all(s.committed for s in list_checkpoints(store))


def test_async_save_reports_background_failure_and_keeps_the_previous_commit(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    mgr = manager(url, tmp_path)
    state = build()
    save_steps(mgr, state, [1])
    original = mgr.store.put_bytes
    mgr.store.put_bytes = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("the store broke"))
    train(state, 1)
    mgr.save(2, 8, state)
    with pytest.raises(CheckpointError, match="checkpoint step 2 failed: RuntimeError: the store broke"):
        mgr.flush()
    assert read_latest(open_store(url))["step"] == 1
    mgr.store.put_bytes = original
    mgr.save(2, 8, state)  # the failure was reported once; the next save works
    assert mgr.flush().step == 2


def test_stale_writer_is_fenced_and_stops_for_good(store_url: str, tmp_path: Path) -> None:
    old = manager(store_url, tmp_path, writer_id="old")
    state = build()
    save_steps(old, state, [1])
    new = manager(store_url, tmp_path, writer_id="new")
    resumed = build()
    new.restore(resumed)
    save_steps(new, resumed, [2])
    train(state, 2)
    old.save(3, 12, state)
    with pytest.raises(FencedError, match="latest.json was advanced to step 2 by new"):
        old.flush()
    with pytest.raises(FencedError):
        old.save(4, 16, state)
    store = open_store(store_url)
    assert read_latest(store)["writer_id"] == "new"
    assert not store.exists("checkpoints/step_00000003/manifest.json")


def test_racing_first_commits_exactly_one_wins(store_url: str, tmp_path: Path) -> None:
    """Two writers that both start on an empty run commit the same step: one wins, one is fenced."""
    a, b = manager(store_url, tmp_path, writer_id="a"), manager(store_url, tmp_path, writer_id="b")
    sa, sb = build(seed=1), build(seed=2)
    a._check_not_fenced(), b._check_not_fenced()  # both read "no latest.json" before either commits
    a.save(1, 4, sa)
    b.save(1, 4, sb)
    outcomes = []
    for mgr in (a, b):
        try:
            mgr.flush()
            outcomes.append("won")
        except FencedError:
            outcomes.append("fenced")
    assert sorted(outcomes) == ["fenced", "won"]
    assert read_latest(open_store(store_url))["writer_id"] == "ab"[outcomes.index("won")]
    # The step restores consistently (every file verified) to one writer's state. Which one is not
    # fixed: the loser may replace the winner's manifest before it is fenced (docs/checkpoints.md).
    restored = []
    for candidate in (sa, sb):
        fresh = build(seed=candidate["sampler"].seed)
        try:
            manager(store_url, tmp_path).restore(fresh)
        except CheckpointError:
            continue  # the other writer's sampler seed
        restored.append(same(weights(fresh), weights(candidate)))
    assert restored == [True]


def test_manifest_left_by_a_dead_writer_is_replaced(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    state = build()
    save_steps(manager(url, tmp_path), state, [1])
    store = open_store(url)
    # A writer died after writing step 2's manifest but before moving latest.json.
    store.put_bytes("checkpoints/step_00000002/manifest.json", b'{"orphan": true}')
    mgr = manager(url, tmp_path)
    mgr.restore(build())
    save_steps(mgr, state, [2])
    assert read_latest(store)["step"] == 2
    fresh = build()
    assert manager(url, tmp_path).restore(fresh).step == 2 and same(weights(fresh), weights(state))


def test_other_ranks_write_nothing_and_policy_by_steps(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    mgr = manager(url, tmp_path, rank=1, world_size=2, policy=CheckpointPolicy(every_steps=5))
    mgr.save(5, 20, build())
    assert mgr.flush() is None and LocalStore(url).list() == []
    assert [s for s in range(1, 12) if mgr.should_save(s)] == [5, 10]
    now = [1000.0]
    timed = manager(url, tmp_path, policy=CheckpointPolicy(every_steps=0, every_minutes=2), clock=lambda: now[0])
    assert not timed.should_save(1)
    now[0] += 119.9
    assert not timed.should_save(2)
    now[0] += 0.1
    assert timed.should_save(3)
    timed.save(3, 12, build())
    assert not timed.should_save(4)  # the clock restarts at each save
    now[0] += 120
    assert timed.should_save(5)


@pytest.mark.parametrize(("every_steps", "every_minutes", "step", "seconds", "due"), [
    (5, None, 10, 0.0, True), (5, None, 11, 1e9, False), (0, None, 5, 1e9, False),
    (0, 1.5, 7, 89.9, False), (0, 1.5, 7, 90.0, True), (4, 1.5, 8, 0.0, True), (4, 1.5, 9, 90.0, True),
])
def test_policy_is_due_by_steps_or_by_minutes_since_the_last_save(
        every_steps: int, every_minutes: float | None, step: int, seconds: float, due: bool) -> None:
    assert CheckpointPolicy(every_steps=every_steps, every_minutes=every_minutes).due(step, seconds) is due


def test_sync_save_commits_before_returning_and_run_files_upload(store_url: str, tmp_path: Path) -> None:
    mgr = manager(store_url, tmp_path, async_save=False)
    state = build()
    mgr.save(1, 4, state)
    assert mgr.last_commit.step == 1 and read_latest(open_store(store_url))["step"] == 1
    (tmp_path / "rec" / "seg").mkdir(parents=True)
    (tmp_path / "rec" / "seg" / "metrics.jsonl").write_text("{}\n")
    mgr.upload_dir(tmp_path / "rec", "records")
    mgr.upload_run_file("config.yaml", tmp_path / "rec" / "seg" / "metrics.jsonl")
    store = open_store(store_url)
    assert store.get_bytes("records/seg/metrics.jsonl") == b"{}\n" and store.exists("config.yaml")


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(), [1])
    import pickle

    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("pickle.loads called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load called"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    assert manager(url, tmp_path).restore(build()).step == 1


def prefetched(s3_url: str, tmp_path: Path) -> tuple[dict, Path]:
    """A run with a checkpoint at step 2, prefetched into a replacement's empty cache."""
    state = build()
    save_steps(manager(s3_url, tmp_path), state, [2])
    cache = tmp_path / "replacement-cache"
    prefetch_latest(s3_url, cache)
    wait_for_prefetch(cache)
    return state, cache


def test_prefetched_checkpoint_restores_from_the_cache(s3_url: str, tmp_path: Path) -> None:
    """The CLI starts the download before torch is imported; the restore then reads the cache."""
    state, cache = prefetched(s3_url, tmp_path)
    store = open_store(s3_url)
    store.delete([data_file(store, 2)])  # only the cache holds the tensors now
    resumed = build(seed=0)
    info = CheckpointManager(s3_url, cache_dir=cache).restore(resumed)
    assert info is not None and info.step == 2
    assert same(weights(state), weights(resumed))


def test_a_cached_file_changed_after_the_prefetch_is_downloaded_again(s3_url: str, tmp_path: Path) -> None:
    state, cache = prefetched(s3_url, tmp_path)
    cached = next(p for p in cache.rglob("*.safetensors"))
    raw = bytearray(cached.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes: the digest remembered from the prefetch no longer holds
    before = cached.stat().st_mtime_ns
    cached.write_bytes(bytes(raw))
    os.utime(cached, ns=(before + 1_000_000, before + 1_000_000))  # a later mtime, whatever the clock's grain
    resumed = build(seed=0)
    assert CheckpointManager(s3_url, cache_dir=cache).restore(resumed).step == 2
    assert same(weights(state), weights(resumed))
    assert cached.read_bytes() != bytes(raw)  # replaced by a verified download


@pytest.mark.parametrize("case", ["empty run", "no such bucket"])
def test_a_prefetch_with_nothing_to_fetch_leaves_the_restore_to_report(case: str, s3_url: str, tmp_path: Path) -> None:
    url = s3_url if case == "empty run" else "s3://no-such-bucket-here/run"
    cache = tmp_path / "cache"
    prefetch_latest(url, cache)
    mgr = CheckpointManager(url, cache_dir=cache)
    if case == "empty run":
        assert mgr.restore(build()) is None
    else:
        with pytest.raises(StoreError, match="no-such-bucket-here"):
            mgr.restore(build())
