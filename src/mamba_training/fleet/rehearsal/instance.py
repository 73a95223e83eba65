"""One simulated instance: `python -m mamba_training.fleet.rehearsal.instance [options] -- COMMAND...`.

The process is the instance's "machine": it serves the instance's own metadata service (the
IMDS emulator, with the spot notice's two-minute window compressed) and runs COMMAND under it
the way systemd runs the agent on EC2, with `{imds}` in COMMAND replaced by the emulator's URL
(also in MAMBA_IMDS_URL), `{instance}` by the instance id and `{dir}` by its folder. When COMMAND ends, the machine stays up
(an EC2 instance does not vanish when its service exits) until the fleet takes it away with
SIGTERM, which it passes on to COMMAND before it stops serving. It is the leader of its own
process group, so the fleet ends it and everything under it with one killpg.

Once serving it writes `ready.json` ({"imds_url", "pid"}); when COMMAND exits, `exit.json`
({"code"}).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import timedelta
from pathlib import Path

from mamba_training.spot.emulator import ImdsEmulator, _iso, _now


class CompressedImds(ImdsEmulator):
    """The emulator with the notice-to-reclaim window shortened from 120 s to `notice_seconds`."""

    def __init__(self, *args, notice_seconds: float = 120.0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.notice_seconds = notice_seconds

    def metadata_value(self, path: str) -> str | None:
        if path in ("spot/instance-action", "spot/termination-time"):
            with self._lock:
                interruption = self._interruption
            if interruption is None or interruption[1] > _now():
                return None
            action, notice = interruption
            when = _iso(notice + timedelta(seconds=self.notice_seconds))
            return json.dumps({"action": action, "time": when}) if path == "spot/instance-action" else when
        return super().metadata_value(path)


def _write(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # readers never see half a file


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mamba_training.fleet.rehearsal.instance")
    parser.add_argument("--instance-id", required=True)
    parser.add_argument("--instance-type", default="g4dn.xlarge")
    parser.add_argument("--availability-zone", default="us-east-1a")
    parser.add_argument("--notice-seconds", type=float, default=120.0)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command

    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    imds = CompressedImds(port=0, instance_id=args.instance_id, instance_type=args.instance_type,
                          availability_zone=args.availability_zone, notice_seconds=args.notice_seconds).start()
    args.dir.mkdir(parents=True, exist_ok=True)
    child = None
    if command:
        command = [part.replace("{imds}", imds.url).replace("{instance}", args.instance_id)
                   .replace("{dir}", str(args.dir.resolve())) for part in command]
        env = {**os.environ, "MAMBA_IMDS_URL": imds.url, "MAMBA_INSTANCE_ID": args.instance_id}
        child = subprocess.Popen(command, env=env, cwd=args.dir, stdin=subprocess.DEVNULL)
    _write(args.dir / "ready.json", {"imds_url": imds.url, "pid": os.getpid(),
                                     "command_pid": child.pid if child else None})
    reported = False
    while not stopping.wait(0.2):
        if child is not None and not reported and child.poll() is not None:
            _write(args.dir / "exit.json", {"code": child.returncode})
            reported = True
    if child is not None and child.poll() is None:
        child.send_signal(signal.SIGTERM)  # also sent to the group by the fleet; harmless twice
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()
        if not reported:
            _write(args.dir / "exit.json", {"code": child.returncode})
    imds.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
