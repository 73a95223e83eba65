"""The launcher's pure decisions, on tables: `--nnodes` and `--coordinator` parsing, exit codes."""

from __future__ import annotations

import pytest

from mamba_training.errors import UsageError
from mamba_training.fleet.nodes import NodeRange, Outcome, node_exit_code, parse_endpoint, parse_nnodes


@pytest.mark.parametrize("text, expected", [
    ("1:1", NodeRange(1, 1)), ("1:4", NodeRange(1, 4)), ("2:2", NodeRange(2, 2)), ("3", NodeRange(3, 3)),
    (" 1:2", NodeRange(1, 2)),
])
def test_nnodes_parses_min_max_or_one_number(text, expected):
    assert parse_nnodes(text) == expected


@pytest.mark.parametrize("text, culprit", [
    ("2:1", "MIN 2 is larger than MAX 1"), ("0:2", "at least 1"), ("a:2", "whole numbers"), ("1:b", "whole numbers"),
    ("", "whole numbers"), ("1:2:3", "whole numbers"), ("-1:2", "whole numbers"), ("1.5:2", "whole numbers"),
])
def test_nnodes_rejects_bad_ranges_naming_the_flag(text, culprit):
    with pytest.raises(UsageError, match=culprit) as error:
        parse_nnodes(text)
    assert "--nnodes" in str(error.value) and error.value.exit_code == 2


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:29400", ("127.0.0.1", 29400)), ("coordinator.mamba.internal:1", ("coordinator.mamba.internal", 1)),
    ("[::1]:29400", ("::1", 29400)),
])
def test_coordinator_endpoint_parses(text, expected):
    assert parse_endpoint(text) == expected


@pytest.mark.parametrize("text", ["host", ":29400", "host:", "host:0", "host:70000", "host:port"])
def test_coordinator_endpoint_rejects_bad_input(text):
    with pytest.raises(UsageError, match="--coordinator"):
        parse_endpoint(text)


@pytest.mark.parametrize("outcome, worker_codes, code", [
    (Outcome.SUCCEEDED, (), 0),
    (Outcome.LEFT, (), 75),  # the node left after the commit: never restarted in place
    (Outcome.WORKERS_FAILED, (1,), 1),
    (Outcome.WORKERS_FAILED, (75, 1), 1),
    (Outcome.WORKERS_FAILED, (2,), 2),  # a bad config fails on every restart: fail for good
    (Outcome.WORKERS_FAILED, (1, 2), 2),
    (Outcome.RENDEZVOUS_FAILED, (), 1),  # the coordinator vanished: systemd restarts the node
])
def test_node_exit_code(outcome, worker_codes, code):
    assert node_exit_code(outcome, worker_codes) == code


@pytest.mark.parametrize("batch, accum, nnodes, nproc, bad", [
    (12, 1, NodeRange(1, 3), 1, None), (12, 1, NodeRange(1, 5), 1, "for 5"), (4, 1, NodeRange(1, 3), 1, "for 3"),
    (16, 2, NodeRange(1, 2), 4, None), (16, 2, NodeRange(1, 2), 8, "for 16"), (8, 1, NodeRange(2, 2), 4, None),
])
def test_the_global_batch_must_split_over_every_world_size_the_run_can_take(batch, accum, nnodes, nproc, bad):
    from mamba_training.config import load_config
    from mamba_training.errors import ConfigError
    from mamba_training.fleet.launch import check_batch_fits

    config = load_config(None, [f"train.batch_size={batch}", f"train.grad_accum={accum}"])
    if bad is None:
        check_batch_fits(config, nnodes, nproc)
    else:
        with pytest.raises(ConfigError, match=f"train.batch_size {batch} .* {bad}$"):
            check_batch_fits(config, nnodes, nproc)


@pytest.mark.parametrize("batch, micro, nnodes, nproc, bad", [
    (16, 2, NodeRange(1, 2), 4, None),          # world 4: 2 micro-batches of 2; world 8: 1
    (16, 2, NodeRange(1, 2), 8, "16"),      # world 16: one sequence per rank, not a micro-batch of 2
    (12, 2, NodeRange(1, 4), 1, "4"),       # world 4: 3 sequences per rank do not make micro-batches of 2
    (12, 4, NodeRange(1, 3), 1, "2"),       # world 2: 6 per rank; worlds 1 and 3 fit (3 and 1 of 4)
])
def test_the_micro_batch_must_fit_every_world_size_the_run_can_take(batch, micro, nnodes, nproc, bad):
    from mamba_training.config import load_config
    from mamba_training.errors import ConfigError
    from mamba_training.fleet.launch import check_batch_fits

    config = load_config(None, [f"train.batch_size={batch}", f"train.micro_batch_size={micro}"])
    if bad is None:
        check_batch_fits(config, nnodes, nproc)
    else:
        with pytest.raises(ConfigError, match=f"train.micro_batch_size {micro} per rank; it does not for {bad}$"):
            check_batch_fits(config, nnodes, nproc)
