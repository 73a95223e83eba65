"""`mamba-training checkpoints list|show|verify|download|upload|prune` on a local and an S3 store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_training.checkpoint import CheckpointManager, CheckpointPolicy, list_checkpoints, open_store, read_latest
from mamba_training.cli.main import main
from tests.checkpoint.conftest import s3_url, store_url  # noqa: F401  (fixtures)
from tests.checkpoint.tiny import build, same, train, weights

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, *args: str, stdin: str | None = None, monkeypatch=None) -> tuple[int, str, str]:
    if stdin is not None:
        import io

        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    capsys.readouterr()  # what the test's own set-up printed (e.g. the log lines of write_run) is not the command's
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def write_run(url: str, tmp_path: Path, steps=(1, 2, 3)) -> dict:
    state = build()
    mgr = CheckpointManager(url, policy=CheckpointPolicy(keep_last=10), cache_dir=tmp_path / "wcache",
                            writer_id="cli-test")
    for step in steps:
        train(state, 1)
        mgr.save(step, step * 4, state)
    mgr.flush()
    return state


def test_list_show_verify_as_json_and_tables(store_url: str, tmp_path: Path, capsys, monkeypatch) -> None:
    write_run(store_url, tmp_path)
    code, out, _ = cli(capsys, "checkpoints", "list", store_url, "--json")
    listed = json.loads(out)
    assert code == 0 and [c["step"] for c in listed["checkpoints"]] == [3, 2, 1]
    assert [c["latest"] for c in listed["checkpoints"]] == [True, False, False]
    assert listed["checkpoints"][0]["tokens_seen"] == 12 and listed["checkpoints"][0]["writer_id"] == "cli-test"

    code, out, _ = cli(capsys, "checkpoints", "list", store_url)
    assert code == 0 and "latest" in out and "commit" in out and "writer" not in out  # 80 columns
    assert max(len(line) for line in out.splitlines()) <= 80
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = cli(capsys, "checkpoints", "list", store_url)
    assert code == 0 and "cli-test" in out

    code, out, _ = cli(capsys, "checkpoints", "show", store_url, "2", "--json")
    shown = json.loads(out)
    assert code == 0 and shown["step"] == 2 and shown["model_shapes"]["0.weight"] == [16, 8]
    code, out, _ = cli(capsys, "checkpoints", "show", store_url)
    assert code == 0 and "(latest)" in out and "212 parameters" in out

    code, out, _ = cli(capsys, "checkpoints", "verify", store_url, "--all")
    assert code == 0 and out.count("ok ") == 3


def test_verify_names_the_tampered_file_and_exits_1(store_url: str, tmp_path: Path, capsys) -> None:
    write_run(store_url, tmp_path, steps=(1,))
    store = open_store(store_url)
    manifest = json.loads(store.get_bytes("checkpoints/step_00000001/manifest.json"))
    key = f"checkpoints/step_00000001/{manifest['tensors']}"
    data = store.get_bytes(key)
    store.put_bytes(key, data[:-1] + bytes([data[-1] ^ 1]))
    code, out, err = cli(capsys, "checkpoints", "verify", store_url)
    assert code == 1 and f"{key} fails its sha256 check" in err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_download_from_local_upload_to_s3_then_restore_there(s3_url: str, tmp_path: Path, capsys) -> None:
    local = str(tmp_path / "run")
    state = write_run(local, tmp_path, steps=(1, 2))
    code, out, _ = cli(capsys, "checkpoints", "download", local, "latest", str(tmp_path / "copy"))
    assert code == 0 and "downloaded step 2" in out and (tmp_path / "copy" / "manifest.json").is_file()
    code, out, _ = cli(capsys, "checkpoints", "upload", str(tmp_path / "copy"), s3_url)
    assert code == 0 and "uploaded step 2" in out
    assert read_latest(open_store(s3_url))["step"] == 2
    fresh = build()
    info = CheckpointManager(s3_url, cache_dir=tmp_path / "rcache").restore(fresh)
    assert info.step == 2 and same(weights(fresh), weights(state))
    code, _, err = cli(capsys, "checkpoints", "upload", str(tmp_path / "copy"), s3_url)
    assert code == 1 and "already holds a committed checkpoint" in err


def test_prune_dry_run_confirmation_and_yes(store_url: str, tmp_path: Path, capsys, monkeypatch) -> None:
    write_run(store_url, tmp_path, steps=(1, 2, 3, 4))
    store = open_store(store_url)
    code, out, _ = cli(capsys, "checkpoints", "prune", store_url, "--keep-last", "1", "--keep-every", "2", "--dry-run")
    assert code == 0 and "would remove steps 1, 3" in out
    assert len(list_checkpoints(store)) == 4
    code, _, err = cli(capsys, "checkpoints", "prune", store_url, "--keep-last", "1", "--keep-every", "2",
                       stdin="n\n", monkeypatch=monkeypatch)
    assert code == 1 and "aborted" in err and len(list_checkpoints(store)) == 4
    code, out, _ = cli(capsys, "checkpoints", "prune", store_url, "--keep-last", "1", "--keep-every", "2", "--yes")
    assert code == 0 and [s.step for s in list_checkpoints(store)] == [4, 2]


@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local run with one checkpoint, and a plain file beside it; the bad-input cases only read them."""
    tmp_path = tmp_path_factory.mktemp("bad-input")
    write_run(str(tmp_path / "run"), tmp_path, steps=(1,))
    (tmp_path / "file").write_text("not a folder")
    return tmp_path / "run"


@pytest.mark.parametrize("args, code, culprit", [
    (["list", "ftp://host/run"], 2, "unknown scheme 'ftp'"),
    (["list", "s3:///run"], 2, "'s3:///run' names no bucket"),
    (["show", "{run}", "9"], 2, "{run} has no checkpoint step 9"),
    (["verify", "{run}", "9"], 2, "{run} has no checkpoint step 9"),
    (["show", "{run}", "last"], 2, "step 'last' is not a step number"),
    (["upload", "/does/not/exist", "{run}"], 2, "/does/not/exist is not a folder"),
    (["upload", "{tmp}", "{run}"], 1, "{tmp} is not a checkpoint folder"),
    (["download", "{empty}", "latest", "{tmp}/out"], 1, "{empty} holds no committed checkpoint"),
    (["download", "{run}", "1", "{tmp}/file/out"], 1, "cannot write {tmp}/file/out"),
])
def test_bad_input_is_one_line_naming_the_culprit(one_step_run: Path, capsys, args, code, culprit) -> None:
    tmp_path = one_step_run.parent
    names = {"run": one_step_run, "empty": tmp_path / "empty", "tmp": tmp_path}
    args = [a.format(**names) for a in args]
    culprit = culprit.format(**names)
    status, _, err = cli(capsys, "checkpoints", *args)
    assert status == code and culprit in err and err.startswith("error: ") and err.count("\n") == 1


def test_s3_missing_bucket_and_missing_credentials_are_one_line(aws: str, tmp_path: Path, capsys) -> None:
    code, _, err = cli(capsys, "checkpoints", "list", "s3://no-such-bucket/run")
    assert code == 1 and err.startswith("error: bucket 'no-such-bucket' does not exist (s3://no-such-bucket/run")
    assert err.count("\n") == 1
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ACCESS") and not k.startswith("AWS_SECRET")
           and k != "AWS_SESSION_TOKEN"}
    result = subprocess.run([sys.executable, "-m", "mamba_training", "checkpoints", "list", "s3://some-bucket/run"],
                            capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: no AWS credentials found for s3://some-bucket/run")
    assert result.stderr.count("\n") == 1


def test_transfers_draw_progress_bars_on_a_terminal(s3_url: str, tmp_path: Path, capsys, monkeypatch) -> None:
    write_run(s3_url, tmp_path, steps=(1,))
    monkeypatch.setenv("FORCE_COLOR", "1")  # rich treats stderr as a terminal
    code, out, err = cli(capsys, "checkpoints", "download", s3_url, "1", str(tmp_path / "copy"))
    assert code == 0 and "downloaded step 1" in out
    assert "download state-" in err and ".safetensors" in err
    code, _, err = cli(capsys, "checkpoints", "upload", str(tmp_path / "copy"), str(tmp_path / "local-run"))
    assert code == 0 and "upload state-" in err
    monkeypatch.delenv("FORCE_COLOR")
    code, out, err = cli(capsys, "checkpoints", "verify", s3_url)
    assert code == 0 and err == "" and "ok      step 1: 2 files match the manifest" in out
