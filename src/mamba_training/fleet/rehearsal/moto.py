"""The rehearsal's AWS: a moto server subprocess on loopback, fresh for every rehearsal.

moto keeps its state in the server's memory, so a new server is a new, empty account: a second
rehearsal never sees the first one's buckets, queues or instances. The AWS environment the
rehearsal and its children use (dummy credentials, the endpoint, no profile, no IMDS for boto)
comes from `aws_env`, so nothing a rehearsal starts can reach real AWS.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
import urllib.request
from contextlib import contextmanager
from typing import Iterator

from mamba_training.fleet.rehearsal.procs import Child, Processes, RehearsalError, free_port, require_port

REGION = "us-east-1"
START_TIMEOUT = 60.0  # moto imports every service's backend on the first request: seconds on a busy machine


def aws_env(endpoint: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """`base` (default os.environ) pointed at the moto server, with nothing left that names real AWS."""
    env = dict(os.environ if base is None else base)
    for key in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        env.pop(key, None)
    for key in [k for k in env if k.startswith("AWS_ENDPOINT_URL_")]:
        env.pop(key)
    env.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
               AWS_REGION=REGION, AWS_DEFAULT_REGION=REGION, AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    return env


@contextmanager
def pointed_at(endpoint: str) -> Iterator[None]:
    """This process's boto3 clients talk to the moto server while inside; the environment is restored after."""
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(aws_env(endpoint, saved))
    from mamba_training.aws import session

    session._cached_session.cache_clear()  # sessions cache credentials read from the old environment
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        session._cached_session.cache_clear()


def check_installed() -> None:
    try:
        found = importlib.util.find_spec("moto.server") is not None and importlib.util.find_spec("flask") is not None
    except ModuleNotFoundError:  # no moto at all
        found = False
    if not found:
        raise RehearsalError("the moto server is not installed: pip install 'moto[server]' "
                             "(or `make install-dev`)")


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(f"{url}/moto-api/", timeout=2).read()
        return True
    except Exception:
        return False


def start(processes: Processes, port: int = 0, timeout: float = START_TIMEOUT) -> tuple[Child, str]:
    """A moto server on 127.0.0.1:`port` (0: a free one), answering; returns (child, base URL)."""
    check_installed()
    require_port(port, "--moto-port")
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing")
    child = processes.start("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while not _answers(url):
        if not child.alive():
            raise RehearsalError(f"the moto server exited {child.proc.returncode} at start (log {child.log})")
        if time.monotonic() > deadline:
            child.stop()
            raise RehearsalError(f"the moto server on {url} did not answer within {timeout:.0f} s (log {child.log})")
        time.sleep(0.1)
    return child, url


__all__ = ["start", "aws_env", "pointed_at", "check_installed", "REGION"]
