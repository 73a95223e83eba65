"""What a rehearsal reports: lost steps from segments, goodput, bitwise weights, the JSON and the PNG."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from fleet.rehearsal.sample import a_result
from mamba_training.fleet.rehearsal.report import Segment, goodput, lost_steps, plot, read_segments, same_weights


def steps(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b + 1))


@pytest.mark.parametrize("segments, lost", [
    ([Segment("a", steps(1, 60), 0)], (0, 0)),  # straight through
    ([Segment("a", steps(1, 27), 75), Segment("b", steps(28, 60), 0)], (0, 0)),  # notice: resumed where it stopped
    ([Segment("a", steps(1, 27), None), Segment("b", steps(21, 60), 0)], (7, 0)),  # hard kill after commit 20
    ([Segment("a", steps(1, 27), 75), Segment("b", steps(25, 60), 0)], (3, 3)),  # a notice that lost steps
    ([Segment("b", steps(21, 40), None), Segment("a", steps(1, 25), None), Segment("c", steps(31, 60), 0)],
     (5 + 10, 0)),  # two kills, out of order on input
    ([Segment("a", (), None), Segment("b", steps(1, 10), 0)], (0, 0)),  # killed before its first step
])
def test_lost_steps_are_steps_trained_again_later(segments: list[Segment], lost: tuple[int, int]) -> None:
    assert lost_steps(segments) == lost


@pytest.mark.parametrize("final, trained, expected", [(60, 60, 1.0), (60, 67, 0.8955), (0, 0, 1.0)])
def test_goodput(final: int, trained: int, expected: float) -> None:
    assert goodput(final, trained) == expected


def write_records(run: Path, segment: str, steps_: range, exit_code: int | None, torn: bool = False) -> None:
    folder = run / "checkpoints" / "cache" / "records" / segment
    folder.mkdir(parents=True)
    lines = [json.dumps({"step": s, "loss": 1.0}) for s in steps_]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + ("\n{\"step\": 9" if torn else "\n"))
    events = [json.dumps({"kind": "start"})]
    if exit_code is not None:
        events.append(json.dumps({"kind": "exit", "exit_code": exit_code}))
    (folder / "events.jsonl").write_text("\n".join(events) + "\n")


def test_segments_are_read_from_every_instance_folder_torn_lines_skipped(tmp_path: Path) -> None:
    first, second = tmp_path / "i-1" / "job", tmp_path / "i-2" / "job"
    write_records(first, "seg-1", range(1, 28), None, torn=True)
    write_records(second, "seg-2", range(21, 61), 0)
    segments = sorted(read_segments([first, second]), key=lambda s: s.name)
    assert [(s.name, len(s.steps), s.exit_code) for s in segments] == [("seg-1", 27, None), ("seg-2", 40, 0)]
    assert lost_steps(segments) == (7, 0)


def safetensors(tensors: dict[str, tuple[str, list[int], bytes]], metadata: dict | None = None) -> bytes:
    header, offset, body = {}, 0, b""
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body += data
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


ONE = struct.pack("<2f", 1.0, 2.0)


@pytest.mark.parametrize("other, same", [
    ({"w": ("F32", [2], ONE)}, True),
    ({"w": ("F32", [2], struct.pack("<2f", 1.0, 2.0000002))}, False),  # one ulp off
    ({"w": ("F32", [1, 2], ONE)}, False),
    ({"w": ("F32", [2], ONE), "b": ("F32", [0], b"")}, False),
    ({"v": ("F32", [2], ONE)}, False),
])
def test_weights_compare_bit_for_bit(other: dict, same: bool) -> None:
    assert same_weights(safetensors({"w": ("F32", [2], ONE)}), safetensors(other)) is same


def test_metadata_does_not_make_weights_differ() -> None:
    assert same_weights(safetensors({"w": ("F32", [2], ONE)}), safetensors({"w": ("F32", [2], ONE)}, {"by": "x"}))


def test_the_json_document_counts_what_happened() -> None:
    result = a_result()
    assert (result["jobs_completed"], result["jobs_failed"], result["interruptions"]) == (1, 1, 2)
    assert (result["notices"], result["hard_kills"], result["rebalance_recommendations"]) == (1, 1, 1)
    assert result["lost_steps"] == 7 and result["trained_steps"] == 87
    assert result["goodput"] == round(60 / 87, 4)
    assert result["capacity_history"] == [0, 2, 0]
    assert (result["cost_spot_usd"], result["cost_on_demand_usd"], result["saving_percent"]) == (0.01, 0.03, 66.7)
    assert [j["identical_to_straight"] for j in result["jobs"]] == [True, None]
    assert {"final_step", "store"} <= set(result["jobs"][0])
    json.dumps(result)  # all of it serializes


def test_the_png_is_written(tmp_path: Path) -> None:
    path = plot(a_result(), tmp_path / "rehearsal.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
