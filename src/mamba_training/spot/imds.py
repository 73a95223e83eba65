"""The IMDSv2 client: where the metadata service is, tokens, and reads with short timeouts.

IMDSv2 only (docs/design.md, "Spot protocol"): `PUT /latest/api/token` with a TTL header, then GETs
carrying the token. The token is renewed when 15 s or less of its life remain (as
aws-node-termination-handler does) and once more when a GET answers 401. Every request has a
short timeout so a hung service never holds the caller for long.

Whether there is a metadata service at all is decided without touching the network: the
`auto` setting reads the machine's DMI data and only an Amazon EC2 machine gets the link-local
address. Tests and local runs pass an explicit loopback URL (the emulator) or `off`.
"""

from __future__ import annotations

import http.client
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from mamba_training.errors import SpotError

log = logging.getLogger(__name__)

EC2_IMDS_URL = "http://169.254.169.254"  # the only place this address may be written down
DMI_DIR = "/sys/devices/virtual/dmi/id"
DMI_DIR_ENV = "MAMBA_TRAINING_DMI_DIR"  # tests point this at a fake DMI folder

TOKEN_PATH = "/latest/api/token"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
DEFAULT_TOKEN_TTL = 21600  # the maximum AWS allows; renewal makes the length matter little
RENEW_MARGIN_S = 15.0
DEFAULT_TIMEOUT_S = 2.0

INSTANCE_ACTION = "meta-data/spot/instance-action"
REBALANCE = "meta-data/events/recommendations/rebalance"
LIFECYCLE_STATE = "meta-data/autoscaling/target-lifecycle-state"
_INFO_PATHS = {
    "instance_id": "meta-data/instance-id",
    "instance_type": "meta-data/instance-type",
    "availability_zone": "meta-data/placement/availability-zone",
    "lifecycle": "meta-data/instance-life-cycle",
}

_said_not_on_ec2 = False


class ImdsUnavailable(SpotError):
    """The metadata service could not answer: unreachable, timed out, 5xx, or refused a token."""


def on_ec2(dmi_dir: str | Path | None = None) -> bool:
    """True when the DMI data says this machine is an Amazon EC2 instance (no network involved)."""
    folder = Path(dmi_dir or os.environ.get(DMI_DIR_ENV) or DMI_DIR)
    vendor = _read_dmi(folder / "sys_vendor")
    asset_tag = _read_dmi(folder / "board_asset_tag")
    return vendor == "Amazon EC2" and asset_tag.startswith("i-")


def _read_dmi(path: Path) -> str:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:  # no such file, or not readable by this user: not evidence of EC2
        return ""


def resolve_imds_url(setting: str, dmi_dir: str | Path | None = None) -> str | None:
    """Map `spot.imds_url` to a base URL: "off" -> None, a URL -> itself, "auto" -> EC2 only."""
    global _said_not_on_ec2
    if setting == "off":
        return None
    if setting != "auto":
        if not setting.startswith(("http://", "https://")):
            raise SpotError(f"spot.imds_url {setting!r}: expected 'auto', 'off' or an http(s):// URL")
        return setting.rstrip("/")
    if on_ec2(dmi_dir):
        return EC2_IMDS_URL
    if not _said_not_on_ec2:
        _said_not_on_ec2 = True
        log.info("not on EC2: spot watcher off")
    return None


@dataclass(frozen=True)
class ImdsResponse:
    status: int
    body: str


class ImdsClient:
    """A thread-safe IMDSv2 client for one base URL.

    `get(path)` returns the body text, or None for 404 ("nothing there"); any failure to get an
    answer raises ImdsUnavailable. `clock` is injectable so token expiry can be tested quickly.
    """

    def __init__(
        self,
        base_url: str,
        *,
        timeout: float = DEFAULT_TIMEOUT_S,
        token_ttl: int = DEFAULT_TOKEN_TTL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SpotError(f"IMDS URL {base_url!r}: expected http(s)://host[:port]")
        self.base_url = base_url.rstrip("/")
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self.timeout = timeout
        self.token_ttl = token_ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._token: str | None = None
        self._token_expiry = 0.0
        self.tokens_fetched = 0

    # -------------------------------------------------------------- HTTP
    def _request(self, method: str, path: str, headers: dict[str, str]) -> ImdsResponse:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.request(method, self._prefix + path, headers=headers)
            response = conn.getresponse()
            body = response.read().decode("utf-8", errors="replace")
            return ImdsResponse(response.status, body)
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, garbled
            raise ImdsUnavailable(f"IMDS {self.base_url}{path}: {type(error).__name__}: {error}") from None
        finally:
            conn.close()

    # -------------------------------------------------------------- tokens
    def _current_token(self) -> str:
        with self._lock:
            if self._token is None or self._token_expiry - self._clock() <= RENEW_MARGIN_S:
                self._token = self._fetch_token()
                self._token_expiry = self._clock() + self.token_ttl
            return self._token

    def _fetch_token(self) -> str:
        answer = self._request("PUT", TOKEN_PATH, {TTL_HEADER: str(self.token_ttl)})
        if answer.status != 200 or not answer.body.strip():
            raise ImdsUnavailable(f"IMDS {self.base_url}{TOKEN_PATH}: token refused (HTTP {answer.status})")
        self.tokens_fetched += 1
        return answer.body.strip()

    def _forget_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    # -------------------------------------------------------------- reads
    def get(self, path: str) -> str | None:
        """GET /latest/<path>: the body, None on 404; ImdsUnavailable when there is no answer."""
        url_path = "/latest/" + path.lstrip("/")
        for attempt in (1, 2):
            token = self._current_token()
            answer = self._request("GET", url_path, {TOKEN_HEADER: token})
            if answer.status == 401 and attempt == 1:  # revoked or expired early: one fresh token
                self._forget_token(token)
                continue
            break
        if answer.status == 404:
            return None
        if answer.status != 200:
            raise ImdsUnavailable(f"IMDS {self.base_url}{url_path}: HTTP {answer.status}")
        return answer.body

    def instance_info(self) -> dict[str, str | None]:
        """Instance id, type, availability zone and lifecycle ("spot"/"on-demand"); None if unknown."""
        info: dict[str, str | None] = {}
        for key, path in _INFO_PATHS.items():
            try:
                value = self.get(path)
            except ImdsUnavailable as error:
                log.debug("instance info %s unavailable: %s", key, error)
                value = None
            info[key] = value.strip() if value and value.strip() else None
        if info["lifecycle"] not in (None, "spot"):  # scheduled, capacity-block: billed like on-demand
            info["lifecycle"] = "on-demand"
        return info


__all__ = [
    "EC2_IMDS_URL", "DMI_DIR_ENV", "ImdsClient", "ImdsUnavailable", "ImdsResponse",
    "INSTANCE_ACTION", "REBALANCE", "LIFECYCLE_STATE", "on_ec2", "resolve_imds_url",
]
