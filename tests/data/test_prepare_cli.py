"""`mamba-training prepare SRC... OUT` through the real entry point: output, exit codes, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from mamba_training.cli.main import main
from mamba_training.data import TokenDataset

BIN = Path(sys.executable).parent / "mamba-training"


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()  # only the command's own output counts
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_prepare_writes_shards_and_prints_a_summary(text_folder: Path, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "prepared"
    code, out, err = _run(["prepare", str(text_folder / "a.txt"), str(text_folder / "b_sub"), str(out_dir),
                           "--val-fraction", "0.1"], capsys)
    assert code == 0, err
    train, val = TokenDataset(out_dir, "train"), TokenDataset(out_dir, "val")
    assert f"{len(train):,}" in out and f"{len(val):,}" in out and "meta.json" in out
    assert "byte" in out and "uint16" in out
    assert train.meta.val_fraction == 0.1 and [Path(s["path"]).name for s in train.meta.sources] == ["a.txt", "c.md"]


def test_prepare_json_output_with_a_tokenizer_and_dtype(
    text_folder: Path, tmp_path: Path, bpe_tokenizer_file: Path, capsys
) -> None:
    out_dir = tmp_path / "prepared"
    code, out, _ = _run(["prepare", str(text_folder), str(out_dir), "--tokenizer", str(bpe_tokenizer_file),
                         "--dtype", "uint32", "--json"], capsys)
    assert code == 0
    meta = json.loads(out)
    assert meta == json.loads((out_dir / "meta.json").read_text())
    assert meta["dtype"] == "uint32" and meta["tokenizer"].startswith("hf:")


def test_bad_arguments_give_one_line_errors_and_exit_2(text_folder: Path, tmp_path: Path, capsys) -> None:
    cases = [
        (["prepare", str(tmp_path / "absent"), str(tmp_path / "o1")], str(tmp_path / "absent")),
        (["prepare", str(text_folder)], "prepare SRC... OUT"),
        (["prepare", str(text_folder), str(tmp_path / "o2"), "--dtype", "int8"], "'int8'"),
        (["prepare", str(text_folder), str(tmp_path / "o3"), "--val-fraction", "1.5"], "val_fraction 1.5"),
        (["prepare", str(text_folder), str(tmp_path / "o4"), "--tokenizer", str(tmp_path / "t.json")],
         str(tmp_path / "t.json")),
    ]
    for argv, culprit in cases:
        code, _, err = _run(argv, capsys)
        assert code == 2, argv
        assert err.startswith("error: ") and err.count("\n") == 1 and culprit in err, err


def test_console_script_reports_a_missing_source_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-corpus"
    proc = subprocess.run([str(BIN), "prepare", str(missing), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == f"error: corpus path {missing} does not exist\n"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()
