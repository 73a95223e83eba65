"""Bad checkpoints in a run: the restore falls back to the newest one that verifies and says which
and why in one log line; the writer then commits over the bad one (superseding it, fenced like any
commit) and retention never lets a bad checkpoint push a good one out."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from mamba_training.checkpoint import (
    CheckpointManager,
    CheckpointPolicy,
    list_checkpoints,
    open_store,
    read_latest,
    retention_plan,
    verify_checkpoint,
)
from mamba_training.errors import FencedError
from tests.checkpoint.tiny import build, same, train, weights


def manager(url: str, tmp_path: Path, keep_last: int = 10, **kwargs) -> CheckpointManager:
    cache = tmp_path / f"cache-{len(list(tmp_path.iterdir()))}"
    return CheckpointManager(url, policy=CheckpointPolicy(every_steps=1, keep_last=keep_last), cache_dir=cache,
                             **kwargs)


def save_steps(mgr: CheckpointManager, state: dict, steps: list[int]) -> None:
    for step in steps:
        train(state, step - state["trainer"].step)
        mgr.save(step, state["trainer"].tokens_seen, state)
        mgr.flush()
    mgr.close()  # retention too


def manifest_of(store, step: int) -> dict:
    return json.loads(store.get_bytes(f"checkpoints/step_{step:08d}/manifest.json"))


def damage(store, step: int, how: str) -> str:
    """Break checkpoint `step` in one of the ways a run can meet; return what the log must name."""
    prefix = f"checkpoints/step_{step:08d}"
    manifest = manifest_of(store, step)
    key = f"{prefix}/{manifest['tensors']}"
    if how == "corrupted data file":
        data = bytearray(store.get_bytes(key))
        data[100:104] = b"XXXX"
        store.put_bytes(key, bytes(data))
        return f"step {step} skipped: checkpoint file {store.describe(key)} fails its sha256 check"
    if how == "manifest sizes disagree":
        size = manifest["files"][manifest["tensors"]]["size"]
        manifest["files"][manifest["tensors"]]["size"] = size + 1
        store.put_bytes(f"{prefix}/manifest.json", json.dumps(manifest).encode())
        return f"step {step} skipped: checkpoint file {store.describe(key)} is {size} bytes, manifest says {size + 1}"
    if how == "latest names a missing step":
        store.delete([obj.key for obj in store.list(prefix + "/")])
    elif how == "unreadable manifest":
        store.put_bytes(f"{prefix}/manifest.json", b'{"files": ')
    return f"{store.describe('latest.json')} names step {step}, which has no readable manifest"


HOW = ["corrupted data file", "manifest sizes disagree", "latest names a missing step", "unreadable manifest"]


@pytest.mark.parametrize("how", HOW)
def test_a_bad_latest_falls_back_in_one_line_and_the_run_commits_past_it(
        how: str, store_url: str, tmp_path: Path, caplog) -> None:
    state = build()
    save_steps(manager(store_url, tmp_path), state, [1, 2, 3])
    store = open_store(store_url)
    at_2 = build()
    train(at_2, 2)
    why = damage(store, 3, how)

    resumed = build()
    mgr = manager(store_url, tmp_path)
    with caplog.at_level(logging.INFO, logger="mamba_training.checkpoint"):
        info = mgr.restore(resumed)
    assert info.step == 2 and same(weights(resumed), weights(at_2))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"restored checkpoint {store.describe('checkpoints/step_00000002')}, "
                                  "the newest that verifies: ") and why in warnings[0], warnings[0]

    save_steps(mgr, resumed, [3, 4])  # step 3 is committed over the bad one, not fenced
    assert read_latest(store)["step"] == 4
    assert [s.step for s in list_checkpoints(store)] == [4, 3, 2, 1]  # nothing committed was lost
    for step in (1, 2, 3, 4):
        verify_checkpoint(store, step, tmp_path / "verify")
    fresh = build()
    assert manager(store_url, tmp_path).restore(fresh).step == 4 and same(weights(fresh), weights(resumed))


def corrupted_run(url: str, tmp_path: Path) -> None:
    save_steps(manager(url, tmp_path), build(), [1, 2, 3])
    damage(open_store(url), 3, "corrupted data file")


def test_a_second_live_writer_is_still_fenced_after_the_first_superseded(store_url: str, tmp_path: Path) -> None:
    corrupted_run(store_url, tmp_path)
    a, b = manager(store_url, tmp_path, writer_id="a"), manager(store_url, tmp_path, writer_id="b")
    sa, sb = build(), build()
    a.restore(sa), b.restore(sb)  # both read the same latest.json and both found step 3 unverifiable
    save_steps(a, sa, [3])
    train(sb, 1)
    b.save(3, 12, sb)
    with pytest.raises(FencedError, match="latest.json was advanced to step 3 by a"):
        b.flush()
    with pytest.raises(FencedError):
        b.save(4, 16, sb)
    store = open_store(store_url)
    assert read_latest(store)["writer_id"] == "a" and manifest_of(store, 3)["writer_id"] == "a"


def test_of_two_writers_superseding_at_once_only_the_first_manifest_wins(store_url: str, tmp_path: Path) -> None:
    """Both passed the latest.json check; one has replaced the bad manifest but not yet moved
    latest.json: the other's replacement is conditional on the bad manifest, so it is fenced."""
    corrupted_run(store_url, tmp_path)
    store = open_store(store_url)
    b = manager(store_url, tmp_path, writer_id="b")
    sb = build()
    b.restore(sb)
    other = manifest_of(store, 3) | {"writer_id": "a"}
    store.put_bytes("checkpoints/step_00000003/manifest.json", json.dumps(other).encode())  # a's supersede
    before = store.get_bytes("latest.json")
    train(sb, 1)
    b.save(3, 12, sb)
    with pytest.raises(FencedError, match="manifest.json was changed by another writer"):
        b.flush()
    assert store.get_bytes("latest.json") == before and manifest_of(store, 3)["writer_id"] == "a"


def test_a_writer_that_restored_the_latest_does_not_overwrite_a_committed_step(tmp_path: Path) -> None:
    """Superseding is only for steps this writer's restore found bad: a good committed step that
    latest.json has reached still fences (here: another writer committed it meanwhile)."""
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(), [1, 2])
    a, b = manager(url, tmp_path, writer_id="a"), manager(url, tmp_path, writer_id="b")
    sa, sb = build(), build()
    a.restore(sa), b.restore(sb)
    save_steps(a, sa, [3])
    b._check_not_fenced = lambda: None  # b raced past the latest.json check before a committed
    train(sb, 1)
    b.save(3, 12, sb)
    with pytest.raises(FencedError, match="step_00000003/manifest.json was already committed by a"):
        b.flush()
    assert manifest_of(open_store(url), 3)["writer_id"] == "a"


def test_retention_never_lets_a_bad_checkpoint_push_a_good_one_out(store_url: str, tmp_path: Path) -> None:
    """Steps 2, 4 and an emergency save at 5 that does not verify: the writer restores 4 and commits
    6 with keep_last=2. The two kept are 6 and 4 (the bad 5 goes), not 6 and the bad 5."""
    state = build()
    save_steps(manager(store_url, tmp_path), state, [2, 4, 5])
    store = open_store(store_url)
    damage(store, 5, "corrupted data file")
    mgr = manager(store_url, tmp_path, keep_last=2)
    resumed = build()
    assert mgr.restore(resumed).step == 4
    save_steps(mgr, resumed, [6])
    assert [s.step for s in list_checkpoints(store)] == [6, 4]
    assert manager(store_url, tmp_path).restore(build()).step == 6


def test_retention_plan_does_not_count_a_checkpoint_whose_files_disagree_with_its_manifest(tmp_path: Path) -> None:
    """`checkpoints prune` (no manager, no verification): the listing shows the sizes."""
    url = str(tmp_path / "run")
    save_steps(manager(url, tmp_path), build(), [1, 2, 3])
    store = open_store(url)
    damage(store, 3, "manifest sizes disagree")
    plan = retention_plan(store, keep_last=1)
    assert plan.steps == [1]  # 3 is what latest.json names (always kept); 2 is the newest good one
    assert retention_plan(store, keep_last=1, unverifiable={2}).steps == [2]  # 1 is then the newest good one
