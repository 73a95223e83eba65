"""`mamba-training spot ...`: the IMDS emulator for rehearsing interruptions, and a watcher probe.

`spot emulate` serves a fake instance metadata service on loopback until Ctrl-C or SIGTERM;
`spot watch` runs the same watcher the trainer runs and prints what it sees.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Any, Optional

import typer

from mamba_training.errors import UsageError

app = typer.Typer(help="Spot interruption tools (IMDS emulator, watcher probe).", no_args_is_help=True)


@app.command("emulate")
def emulate(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless you mean it)."),
    port: int = typer.Option(1338, "--port", "-p", help="Port to listen on (0: any free port)."),
    interrupt_after: Optional[float] = typer.Option(
        None, "--interrupt-after", help="Serve a spot interruption notice this many seconds after start."),
    action: str = typer.Option("terminate", "--action", help="Interruption action: terminate, stop or hibernate."),
    rebalance_after: Optional[float] = typer.Option(
        None, "--rebalance-after", help="Serve a rebalance recommendation this many seconds after start."),
    no_token_required: bool = typer.Option(
        False, "--no-token-required", help="Also answer IMDSv1 requests (GETs without a token)."),
    instance_type: str = typer.Option("g5.xlarge", "--instance-type", help="Instance type to report."),
    lifecycle: str = typer.Option("spot", "--lifecycle", help="instance-life-cycle to report: spot or on-demand."),
) -> None:
    """Serve an emulated EC2 instance metadata service (IMDSv2) until Ctrl-C."""
    from mamba_training.spot.emulator import ImdsEmulator

    if port < 0 or port > 65535:
        raise UsageError(f"--port {port}: expected 0..65535")
    emulator = ImdsEmulator(
        host, port, token_required=not no_token_required, interrupt_after=interrupt_after, action=action,
        rebalance_after=rebalance_after, instance_type=instance_type, lifecycle=lifecycle,
    )
    emulator.start()
    url = emulator.url
    tokens = "IMDSv1 and IMDSv2" if no_token_required else "IMDSv2 tokens required"
    typer.echo(f"IMDS emulator listening on {url} ({tokens})")
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: bound to {host}, not loopback: other machines can reach it", err=True)
    if interrupt_after is not None:
        typer.echo(f"{action} notice in {interrupt_after:g} s (instance-action time = notice + 120 s)")
    if rebalance_after is not None:
        typer.echo(f"rebalance recommendation in {rebalance_after:g} s")
    typer.echo(f"train against it:  mamba-training train --set spot.imds_url={url}")
    typer.echo(f"notice now:        curl -X POST '{url}/control/interrupt?action=terminate'")
    typer.echo(f"state:             curl {url}/control/state")
    _serve_until_signal()
    emulator.stop()
    typer.echo("IMDS emulator stopped")


def _serve_until_signal() -> None:
    """Block until SIGTERM or SIGINT; both end the emulator cleanly with exit 0."""
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not done.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@app.command("watch")
def watch(
    imds_url: str = typer.Option("auto", "--imds-url", help="auto (EC2 only), or a metadata service URL."),
    poll_seconds: float = typer.Option(5.0, "--poll-seconds", help="Seconds between polls."),
    duration: Optional[float] = typer.Option(None, "--duration", help="Stop after this many seconds."),
    once: bool = typer.Option(False, "--once", help="One round of polling, then exit."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines instead of text."),
) -> None:
    """Run the trainer's spot watcher and print instance info and every event it sees."""
    from mamba_training.logging_setup import setup_logging
    from mamba_training.spot import make_watcher

    setup_logging("warning")  # IMDS failures show; events are printed below
    if poll_seconds <= 0:
        raise UsageError(f"--poll-seconds {poll_seconds}: must be > 0")
    watcher = make_watcher(imds_url, poll_seconds)
    if watcher is None:
        raise UsageError(f"--imds-url {imds_url}: no instance metadata service (not on EC2); "
                         "for the emulator use --imds-url http://127.0.0.1:1338")
    _show({"kind": "instance", "url": watcher.url, **watcher.instance_info()}, as_json)
    if once:
        watcher.check_once()
        for event in watcher.poll():
            _show(_event_dict(event), as_json)
        return
    watcher.on_event = lambda event: _show(_event_dict(event), as_json)
    watcher.start()
    done = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: done.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if duration is not None:
            done.wait(duration)
        else:
            _wait_forever(done)
    finally:
        watcher.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _wait_forever(done: threading.Event) -> None:
    while not done.wait(0.5):
        pass


def _event_dict(event: Any) -> dict[str, Any]:
    from mamba_training.spot import Interruption, LifecycleTerminating, Rebalance

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if isinstance(event, Interruption):
        return {"kind": "interruption", "seen": now, "action": event.action, "time": event.time.isoformat(),
                "seconds_left": round(event.seconds_left(), 1), "malformed": event.malformed}
    if isinstance(event, Rebalance):
        notice = event.notice_time.isoformat() if event.notice_time else None
        return {"kind": "rebalance", "seen": now, "notice_time": notice}
    if isinstance(event, LifecycleTerminating):
        return {"kind": "lifecycle", "seen": now, "state": event.state}
    return {"kind": type(event).__name__, "seen": now}


def _show(data: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data))
        return
    kind = data.pop("kind")
    typer.echo(f"{time.strftime('%H:%M:%S')} {kind}: " + "  ".join(f"{k}={v}" for k, v in data.items()))
