"""One rank of tests/train/test_distributed.py's two-process gloo group on loopback.

    python timeout_worker.py RANK PORT DIR

1. Rank 1 arrives at `wait_for_all` 5 s after rank 0 entered it (more than twice the 2 s
   collective timeout): the long-wait group must hold.
2. Both ranks all-reduce once (the short group works).
3. Rank 0 all-reduces alone (rank 1 never joins, like a frozen peer): it must raise. It writes
   DIR/result.json with how long that took and the error's first line; rank 1 waits for it.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

COLLECTIVE_TIMEOUT_S = 2.0
LATE_S = 5.0


def wait_for(path: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"rank gave up waiting for {path}")
        time.sleep(0.01)


def main(rank: int, port: int, directory: Path) -> None:
    import torch  # noqa: F401 - imported before the ranks agree to join, so the join is not racing it

    from mamba_training.train import distributed

    (directory / f"ready-{rank}").touch()
    wait_for(directory / f"ready-{1 - rank}")
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    info = distributed.setup("cpu", collective_timeout_s=COLLECTIVE_TIMEOUT_S, long_wait_timeout_s=120.0)
    assert info.waits is not None

    if rank == 0:  # "entered" is written once this thread is about to block in the barrier
        threading.Timer(0.0, (directory / "entered").touch).start()
    else:
        wait_for(directory / "entered")
        time.sleep(LATE_S)  # late on purpose: the barrier must outlast the collective timeout
    distributed.wait_for_all(info)
    assert distributed.all_reduce_max(float(rank), info) == 1.0

    if rank == 0:
        started = time.monotonic()
        try:
            distributed.all_reduce_max(0.0, info)
            outcome = {"raised": False}
        except RuntimeError as error:
            outcome = {"raised": True, "message": str(error).splitlines()[0]}
        outcome["seconds"] = round(time.monotonic() - started, 2)
        tmp = directory / "result.tmp"
        tmp.write_text(json.dumps(outcome))
        tmp.replace(directory / "result.json")
    else:
        wait_for(directory / "result.json")
    sys.stdout.flush()
    os._exit(0)  # the group is broken on purpose: skip its teardown


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3]))
