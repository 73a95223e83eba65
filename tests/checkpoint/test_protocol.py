"""Commit-protocol corners: racing writers with their own managers, a corrupt manifest on restore,
copying checkpoints between stores with progress callbacks, retention plans."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from mamba_training.checkpoint import (
    CheckpointManager,
    CheckpointPolicy,
    download_checkpoint,
    latest_committed_step,
    list_checkpoints,
    open_store,
    read_latest,
    retention_plan,
    upload_checkpoint,
)
from mamba_training.errors import CheckpointError, FencedError
from tests.checkpoint.tiny import build, same, train, weights


def manager(url: str, cache: Path, **kwargs) -> CheckpointManager:
    return CheckpointManager(url, policy=CheckpointPolicy(every_steps=1, keep_last=10), cache_dir=cache, **kwargs)


def committed_run(url: str, tmp_path: Path, steps: list[int]) -> dict:
    state = build()
    mgr = manager(url, tmp_path / "writer-cache")
    for step in steps:
        train(state, step - state["trainer"].step)
        mgr.save(step, state["trainer"].tokens_seen, state)
    mgr.flush()
    mgr.close()
    return state


def test_racing_writers_with_their_own_managers_exactly_one_advances_latest(store_url: str, tmp_path: Path) -> None:
    """Four instances resume the same run and save at once: one commit, three fenced for good."""
    committed_run(store_url, tmp_path, [1])
    writers = []
    for i in range(4):
        state = build()
        mgr = manager(store_url, tmp_path / f"cache-{i}", writer_id=f"w{i}", async_save=False)
        assert mgr.restore(state).step == 1  # every writer read the same latest.json ETag
        train(state, i + 1)  # different states and different steps: 2, 3, 4, 5
        writers.append((mgr, state))
    barrier = threading.Barrier(len(writers))
    outcomes: dict[str, str] = {}

    def save(mgr: CheckpointManager, state: dict) -> None:
        barrier.wait()
        try:
            mgr.save(state["trainer"].step, state["trainer"].tokens_seen, state)
            outcomes[mgr.writer_id] = "won"
        except FencedError:
            outcomes[mgr.writer_id] = "fenced"

    threads = [threading.Thread(target=save, args=pair) for pair in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes.values()) == ["fenced", "fenced", "fenced", "won"], outcomes
    winner = next(w for w, o in outcomes.items() if o == "won")
    pointer = read_latest(open_store(store_url))
    assert pointer["writer_id"] == winner
    for mgr, state in writers:
        if mgr.writer_id != winner:  # a fenced writer stops: every later save raises, nothing is written
            train(state, 1)
            with pytest.raises(FencedError):
                mgr.save(state["trainer"].step, state["trainer"].tokens_seen, state)
    assert read_latest(open_store(store_url)) == pointer
    fresh = build()
    info = manager(store_url, tmp_path / "check").restore(fresh)
    winning_state = next(s for m, s in writers if m.writer_id == winner)
    assert info.step == pointer["step"] and info.writer_id == winner
    assert same(weights(fresh), weights(winning_state))


def test_corrupt_manifest_of_the_latest_falls_back_on_restore(store_url: str, tmp_path: Path) -> None:
    state = committed_run(store_url, tmp_path, [1, 2])
    expected = build()
    train(expected, 1)
    store = open_store(store_url)
    store.put_bytes("checkpoints/step_00000002/manifest.json", b'{"format_version": 1, "step": 2, "files": [')
    assert [s.committed for s in list_checkpoints(store)] == [False, True]
    fresh = build()
    assert manager(store_url, tmp_path / "c").restore(fresh).step == 1
    assert same(weights(fresh), weights(expected)) and not same(weights(fresh), weights(state))
    with pytest.raises(CheckpointError, match="step_00000002/manifest.json is corrupt"):
        manager(store_url, tmp_path / "c2").restore(build(), step=2)


def test_download_then_upload_moves_a_run_local_to_s3_with_progress(s3_url: str, tmp_path: Path) -> None:
    local = str(tmp_path / "run")
    state = committed_run(local, tmp_path, [1, 2])
    seen: dict[str, list] = {}

    def progress(description: str, total: int):
        seen[description] = [total, 0]
        return lambda n: seen[description].__setitem__(1, seen[description][1] + n)

    manifest = download_checkpoint(open_store(local), None, tmp_path / "copy", progress)
    assert manifest["step"] == 2 and sorted(p.name for p in (tmp_path / "copy").iterdir()) == sorted(
        [*manifest["files"], "manifest.json"])
    seen.clear()
    s3 = open_store(s3_url)
    assert upload_checkpoint(s3, tmp_path / "copy", progress) == 2
    assert {d: v for d, v in seen.items()} == {f"upload {n}": [m["size"], m["size"]]
                                               for n, m in manifest["files"].items()}
    assert read_latest(s3)["step"] == 2 and latest_committed_step(s3) == 2
    seen.clear()
    again = download_checkpoint(s3, 2, tmp_path / "back", progress)  # S3 -> local: progress per file
    assert again["files"] == manifest["files"]
    assert all(total == done and total > 0 for total, done in seen.values()) and len(seen) == 2
    fresh = build()
    assert manager(s3_url, tmp_path / "restore").restore(fresh).step == 2
    assert same(weights(fresh), weights(state))


def test_upload_of_a_tampered_folder_writes_nothing(s3_url: str, tmp_path: Path) -> None:
    local = str(tmp_path / "run")
    committed_run(local, tmp_path, [3])
    folder = tmp_path / "run" / "checkpoints" / "step_00000003"  # a local run's step folder works as is
    name = json.loads((folder / "manifest.json").read_text())["tensors"]
    data = bytearray((folder / name).read_bytes())
    data[50] ^= 1
    (folder / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{folder / name} is missing or does not match"):
        upload_checkpoint(open_store(s3_url), folder)
    assert open_store(s3_url).list() == []


def test_retention_plan_deletes_manifests_first_and_keeps_newer_incomplete(tmp_path: Path) -> None:
    url = str(tmp_path / "run")
    committed_run(url, tmp_path, [1, 2, 3, 4])
    store = open_store(url)
    store.put_bytes("checkpoints/step_00000009/state-partial.safetensors", b"still uploading")
    store.put_bytes("checkpoints/step_00000000/state-dead.json", b"a writer died here")
    plan = retention_plan(store, keep_last=1, keep_every=2)
    assert plan.steps == [0, 1, 3]
    manifests = [i for i, k in enumerate(plan.keys) if k.endswith("manifest.json")]
    assert manifests == list(range(len(manifests))) and len(manifests) == 2
    assert not any("step_00000009" in k for k in plan.keys)
