"""An instance metadata service emulator for rehearsing spot interruptions on loopback.

Modelled on AWS's amazon-ec2-metadata-mock: it serves `PUT /latest/api/token` and the metadata
paths the watcher reads, requires IMDSv2 tokens unless told otherwise (401 without one, or with
an expired or revoked one), and puts an interruption's termination time at notice + 120 s.
Notices come on a schedule (`interrupt_after`, `rebalance_after`) or on request through control
endpoints, which also inject the faults the watcher must survive:

    POST /control/interrupt?action=terminate|stop|hibernate[&after=S]
    POST /control/rebalance[?after=S]
    POST /control/lifecycle?state=Terminated
    POST /control/fault?mode=500|timeout|html|truncated|past-time|bad-time|refuse-token|none
                       [&count=N][&seconds=S][&status=403]
    POST /control/revoke-tokens        every issued token answers 401 from now on
    POST /control/reset                no notices, no fault, lifecycle InService, counters zeroed
    GET  /control/state                JSON: notices, fault, lifecycle, request counters

Faults html/truncated/past-time/bad-time replace the instance-action answer only (they model a
garbled notice); 500 and timeout hit every metadata request; refuse-token hits the token PUT.
With `count` a fault clears itself after that many affected requests.

It is a real HTTP server (stdlib `http.server`), bound to 127.0.0.1 unless told otherwise;
`ImdsEmulator(port=0).start()` picks a free port and `.url` says which.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from mamba_training.errors import UsageError
from mamba_training.spot.imds import TOKEN_HEADER, TOKEN_PATH, TTL_HEADER

log = logging.getLogger(__name__)

ACTIONS = ("terminate", "stop", "hibernate")
FAULTS = ("none", "500", "timeout", "html", "truncated", "past-time", "bad-time", "refuse-token")
NOTICE_FAULTS = ("html", "truncated", "past-time", "bad-time")
NOTICE_SECONDS = 120
MAX_TOKEN_TTL = 21600
META = "/latest/meta-data/"


def _iso(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now() -> datetime:
    return datetime.now(timezone.utc)


class ImdsEmulator:
    """The emulator's state and its HTTP server; every control endpoint has a method twin."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token_required: bool = True,
        interrupt_after: float | None = None,
        action: str = "terminate",
        rebalance_after: float | None = None,
        instance_id: str = "i-0123456789abcdef0",
        instance_type: str = "g5.xlarge",
        availability_zone: str = "us-east-1a",
        lifecycle: str = "spot",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if action not in ACTIONS:
            raise UsageError(f"--action {action!r}: expected one of {', '.join(ACTIONS)}")
        if lifecycle not in ("spot", "on-demand"):
            raise UsageError(f"--lifecycle {lifecycle!r}: expected spot or on-demand")
        for name, value in (("--interrupt-after", interrupt_after), ("--rebalance-after", rebalance_after)):
            if value is not None and value < 0:
                raise UsageError(f"{name} {value}: must be >= 0 seconds")
        self.host, self.port = host, port
        # Seconds since the epoch, for notice times and token expiry: tests pass a clock they move
        # by hand, so "not yet" and "now" are decided by them, not by how fast the machine runs.
        self._clock = clock
        self.token_required = token_required
        self.metadata = {
            "instance-id": instance_id,
            "instance-type": instance_type,
            "placement/availability-zone": availability_zone,
            "placement/region": availability_zone[:-1],
            "instance-life-cycle": lifecycle,
            "ami-id": "ami-0123456789abcdef0",
            "hostname": "ip-10-0-0-1.ec2.internal",
        }
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._tokens: dict[str, float] = {}  # token -> expiry on the clock
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._reset_state()
        if interrupt_after is not None:
            self.interrupt(action, after=interrupt_after)
        if rebalance_after is not None:
            self.rebalance(after=rebalance_after)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), timezone.utc)

    # -------------------------------------------------------------- server
    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> "ImdsEmulator":
        try:
            server = _Server((self.host, self.port), _Handler)
        except OSError as error:
            raise UsageError(f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        server.emulator = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="imds-emulator", daemon=True)
        self._thread.start()
        log.info("IMDS emulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ImdsEmulator":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- controls
    def interrupt(self, action: str = "terminate", after: float = 0.0) -> dict[str, Any]:
        if action not in ACTIONS:
            raise UsageError(f"action {action!r}: expected one of {', '.join(ACTIONS)}")
        notice = self.now() + timedelta(seconds=after)
        with self._lock:
            self._interruption = (action, notice)
        log.info("emulator: %s notice at %s", action, _iso(notice))
        return {"action": action, "notice_time": _iso(notice),
                "time": _iso(notice + timedelta(seconds=NOTICE_SECONDS))}

    def rebalance(self, after: float = 0.0) -> dict[str, Any]:
        notice = self.now() + timedelta(seconds=after)
        with self._lock:
            self._rebalance = notice
        log.info("emulator: rebalance recommendation at %s", _iso(notice))
        return {"noticeTime": _iso(notice)}

    def set_lifecycle(self, state: str) -> dict[str, Any]:
        if not state:
            raise UsageError("lifecycle state must not be empty")
        with self._lock:
            self._lifecycle = state
        return {"state": state}

    def set_fault(self, mode: str, count: int | None = None, seconds: float = 3.0, status: int = 403) -> dict[str, Any]:
        if mode not in FAULTS:
            raise UsageError(f"fault {mode!r}: expected one of {', '.join(FAULTS)}")
        with self._lock:
            self._fault = None if mode == "none" else {"mode": mode, "count": count, "seconds": seconds,
                                                       "status": status}
        return {"fault": self._fault}

    def revoke_tokens(self) -> dict[str, Any]:
        with self._lock:
            revoked = len(self._tokens)
            self._tokens.clear()
        return {"revoked": revoked}

    def reset(self) -> dict[str, Any]:
        with self._lock:
            self._reset_state()
        return {"reset": True}

    def _reset_state(self) -> None:
        self._interruption: tuple[str, datetime] | None = None
        self._rebalance: datetime | None = None
        self._lifecycle = "InService"
        self._fault: dict[str, Any] | None = None
        self.requests: Counter[str] = Counter()

    def state(self) -> dict[str, Any]:
        with self._lock:
            interruption = None
            if self._interruption is not None:
                action, notice = self._interruption
                interruption = {"action": action, "notice_time": _iso(notice), "active": notice <= self.now()}
            return {
                "url": self.url,
                "token_required": self.token_required,
                "interruption": interruption,
                "rebalance": None if self._rebalance is None else
                {"noticeTime": _iso(self._rebalance), "active": self._rebalance <= self.now()},
                "lifecycle": self._lifecycle,
                "fault": self._fault,
                "requests": dict(self.requests),
                "tokens": len(self._tokens),
            }

    # -------------------------------------------------------------- serving (called by the handler)
    def take_fault(self, kinds: tuple[str, ...]) -> dict[str, Any] | None:
        """The active fault if it is one of `kinds`, consuming one use of a counted fault."""
        with self._lock:
            fault = self._fault
            if fault is None or fault["mode"] not in kinds:
                return None
            if fault["count"] is not None:
                fault["count"] -= 1
                if fault["count"] <= 0:
                    self._fault = None
            return dict(fault)

    def count(self, key: str) -> None:
        with self._lock:
            self.requests[key] += 1

    def issue_token(self, ttl: int) -> str:
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = self._clock() + ttl
        return token

    def token_ok(self, token: str | None) -> bool:
        if token is None:
            return not self.token_required
        with self._lock:
            expiry = self._tokens.get(token)
        return expiry is not None and self._clock() < expiry

    def metadata_value(self, path: str) -> str | None:
        """The body for /latest/meta-data/<path>, or None for 404."""
        now = self.now()
        with self._lock:
            if path == "spot/instance-action":
                if self._interruption is None or self._interruption[1] > now:
                    return None
                action, notice = self._interruption
                return json.dumps({"action": action, "time": _iso(notice + timedelta(seconds=NOTICE_SECONDS))})
            if path == "spot/termination-time":  # the legacy path, still served by AWS
                if self._interruption is None or self._interruption[1] > now:
                    return None
                return _iso(self._interruption[1] + timedelta(seconds=NOTICE_SECONDS))
            if path == "events/recommendations/rebalance":
                if self._rebalance is None or self._rebalance > now:
                    return None
                return json.dumps({"noticeTime": _iso(self._rebalance)})
            if path == "autoscaling/target-lifecycle-state":
                return self._lifecycle
        if path in ("", "/"):
            return "\n".join(sorted({key.split("/")[0] + ("/" if "/" in key else "") for key in self.metadata}
                                    | {"spot/", "events/", "autoscaling/"}))
        return self.metadata.get(path)


def garbled_notice(mode: str) -> str:
    """The instance-action body a notice fault serves."""
    if mode == "html":
        return "<html><head><title>502 Bad Gateway</title></head><body>Bad Gateway</body></html>"
    if mode == "truncated":
        return '{"action": "terminate", "ti'
    if mode == "past-time":
        return json.dumps({"action": "terminate", "time": _iso(_now() - timedelta(minutes=10))})
    return json.dumps({"action": "terminate", "time": "soon"})  # bad-time


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a handler sleeping in a timeout fault must not hold up stop()
    allow_reuse_address = True
    emulator: ImdsEmulator

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (timeout fault) leaves a broken pipe behind: not worth a traceback.
        log.debug("emulator: request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "EC2ws"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("emulator %s - %s", self.address_string(), format % args)

    @property
    def emulator(self) -> ImdsEmulator:
        return self.server.emulator

    # -------------------------------------------------------------- replies
    def _reply(self, status: int, body: str = "", content_type: str = "text/plain",
               headers: dict[str, str] | None = None) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _json(self, status: int, data: Any) -> None:
        self._reply(status, json.dumps(data, indent=2) + "\n", "application/json")

    def _service_fault(self) -> bool:
        """Apply a 500 or timeout fault; True when the request has been answered (or abandoned)."""
        fault = self.emulator.take_fault(("500", "timeout"))
        if fault is None:
            return False
        if fault["mode"] == "timeout":
            self.emulator._stopping.wait(fault["seconds"])  # the client gives up first
        self._reply(500, "Internal Server Error")
        return True

    # -------------------------------------------------------------- methods
    def do_PUT(self) -> None:
        path = urlsplit(self.path).path
        if path != TOKEN_PATH:
            self._reply(405 if path.startswith("/latest/") else 404, "")
            return
        self.emulator.count("PUT token")
        if self._service_fault():
            return
        refused = self.emulator.take_fault(("refuse-token",))
        if refused is not None:
            self._reply(refused["status"], "Forbidden" if refused["status"] == 403 else "")
            return
        if self.headers.get("X-Forwarded-For"):  # AWS refuses tokens for proxied requests
            self._reply(403, "Forbidden")
            return
        try:
            ttl = int(self.headers.get(TTL_HEADER, ""))
        except ValueError:
            ttl = 0
        if not 1 <= ttl <= MAX_TOKEN_TTL:
            self._reply(400, "Bad Request")
            return
        self._reply(200, self.emulator.issue_token(ttl), headers={TTL_HEADER: str(ttl)})

    def do_GET(self) -> None:
        parts = urlsplit(self.path)
        if parts.path.startswith("/control/"):
            self._control("GET", parts.path, parse_qs(parts.query))
            return
        if not parts.path.startswith(META) and parts.path.rstrip("/") != META.rstrip("/"):
            self._reply(404, "Not Found")
            return
        key = parts.path[len(META):] if parts.path.startswith(META) else ""
        self.emulator.count(f"GET {key}")
        if self._service_fault():
            return
        if not self.emulator.token_ok(self.headers.get(TOKEN_HEADER)):
            self.emulator.count("401")
            self._reply(401, "Unauthorized")
            return
        if key == "spot/instance-action":
            fault = self.emulator.take_fault(NOTICE_FAULTS)
            if fault is not None:
                self._reply(200, garbled_notice(fault["mode"]),
                            "text/html" if fault["mode"] == "html" else "text/plain")
                return
        value = self.emulator.metadata_value(key)
        if value is None:
            self._reply(404, "Not Found")
        else:
            self._reply(200, value)

    def do_POST(self) -> None:
        parts = urlsplit(self.path)
        if not parts.path.startswith("/control/"):
            self._reply(405, "")
            return
        self._control("POST", parts.path, parse_qs(parts.query))

    def _control(self, method: str, path: str, query: dict[str, list[str]]) -> None:
        arg = {name: values[-1] for name, values in query.items()}
        name = path[len("/control/"):].strip("/")
        emulator = self.emulator
        actions = {
            "interrupt": lambda: emulator.interrupt(arg.get("action", "terminate"), float(arg.get("after", 0))),
            "rebalance": lambda: emulator.rebalance(float(arg.get("after", 0))),
            "lifecycle": lambda: emulator.set_lifecycle(arg.get("state", "Terminated")),
            "fault": lambda: emulator.set_fault(
                arg.get("mode", "none"), int(arg["count"]) if "count" in arg else None,
                float(arg.get("seconds", 3.0)), int(arg.get("status", 403))),
            "revoke-tokens": emulator.revoke_tokens,
            "reset": emulator.reset,
        }
        if method == "GET" and name == "state":
            self._json(200, emulator.state())
            return
        if method != "POST" or name not in actions:
            self._json(404, {"error": f"unknown control endpoint {method} {path}",
                             "endpoints": ["GET /control/state", *(f"POST /control/{a}" for a in actions)]})
            return
        try:
            self._json(200, actions[name]())
        except (UsageError, ValueError) as error:
            self._json(400, {"error": str(error)})


__all__ = ["ImdsEmulator", "ACTIONS", "FAULTS", "garbled_notice"]
