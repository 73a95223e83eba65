"""The IMDS emulator over HTTP, as amazon-ec2-metadata-mock behaves: tokens, notices, controls."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import timedelta

import pytest

from mamba_training.errors import UsageError
from mamba_training.spot.emulator import ImdsEmulator
from mamba_training.spot.watcher import parse_time

TTL = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN = "X-aws-ec2-metadata-token"


class Clock:
    """Seconds since the epoch, moved by the test: the emulator's notion of now."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0  # a whole second: notice times print without a fraction

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def http(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


def token(emu: ImdsEmulator, ttl: int = 60) -> str:
    status, body, headers = http("PUT", f"{emu.url}/latest/api/token", {TTL: str(ttl)})
    assert status == 200 and headers[TTL] == str(ttl)
    return body


def get(emu: ImdsEmulator, path: str, tok: str | None) -> tuple[int, str]:
    status, body, _ = http("GET", f"{emu.url}/latest/meta-data/{path}", {TOKEN: tok} if tok else {})
    return status, body


def control(emu: ImdsEmulator, method: str, name: str) -> tuple[int, dict]:
    status, body, _ = http(method, f"{emu.url}/control/{name}")
    return status, json.loads(body)


def test_binds_loopback_by_default_and_reports_its_url(emulator: ImdsEmulator) -> None:
    assert emulator.url.startswith("http://127.0.0.1:") and emulator.port > 0


@pytest.mark.parametrize("ttl", [None, "0", "21601", "abc"])
def test_token_put_needs_a_ttl_between_1_and_21600(emulator: ImdsEmulator, ttl: str | None) -> None:
    status, _, _ = http("PUT", f"{emulator.url}/latest/api/token", {TTL: ttl} if ttl else {})
    assert status == 400


def test_token_put_behind_a_proxy_is_refused(emulator: ImdsEmulator) -> None:
    status, _, _ = http("PUT", f"{emulator.url}/latest/api/token", {TTL: "60", "X-Forwarded-For": "10.0.0.9"})
    assert status == 403


def test_metadata_needs_a_valid_token(emulator: ImdsEmulator) -> None:
    assert get(emulator, "instance-id", None)[0] == 401
    assert get(emulator, "instance-id", "forged")[0] == 401
    assert get(emulator, "instance-id", token(emulator)) == (200, "i-0123456789abcdef0")


def test_an_expired_token_is_refused() -> None:
    clock = Clock()
    with ImdsEmulator(clock=clock) as emu:
        tok = token(emu, ttl=1)
        assert get(emu, "instance-id", tok)[0] == 200
        clock.advance(0.999)
        assert get(emu, "instance-id", tok)[0] == 200
        clock.advance(0.001)
        assert get(emu, "instance-id", tok)[0] == 401


def test_no_token_required_also_answers_imdsv1() -> None:
    with ImdsEmulator(token_required=False) as emu:
        assert get(emu, "instance-type", None) == (200, "g5.xlarge")
        assert get(emu, "instance-type", "forged")[0] == 401  # a bad token is still refused


def test_serves_instance_identity_paths() -> None:
    with ImdsEmulator(instance_type="g6.12xlarge", lifecycle="on-demand") as emu:
        tok = token(emu)
        assert get(emu, "instance-type", tok) == (200, "g6.12xlarge")
        assert get(emu, "instance-life-cycle", tok) == (200, "on-demand")
        assert get(emu, "placement/availability-zone", tok) == (200, "us-east-1a")
        assert get(emu, "no/such/path", tok)[0] == 404


def test_interrupt_control_serves_a_notice_with_time_notice_plus_120s(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    assert get(emulator, "spot/instance-action", tok)[0] == 404
    status, answer = control(emulator, "POST", "interrupt?action=stop")
    assert status == 200
    code, body = get(emulator, "spot/instance-action", tok)
    notice = json.loads(body)
    assert code == 200 and notice["action"] == "stop"
    assert parse_time(notice["time"]) - parse_time(answer["notice_time"]) == timedelta(seconds=120)
    assert get(emulator, "spot/termination-time", tok) == (200, notice["time"])


def test_rebalance_and_lifecycle_controls(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    assert get(emulator, "events/recommendations/rebalance", tok)[0] == 404
    assert get(emulator, "autoscaling/target-lifecycle-state", tok) == (200, "InService")
    _, answer = control(emulator, "POST", "rebalance")
    assert json.loads(get(emulator, "events/recommendations/rebalance", tok)[1]) == answer
    control(emulator, "POST", "lifecycle?state=Terminated")
    assert get(emulator, "autoscaling/target-lifecycle-state", tok) == (200, "Terminated")


def test_scheduled_notices_appear_only_after_their_delay() -> None:
    clock = Clock()
    with ImdsEmulator(interrupt_after=30, action="hibernate", rebalance_after=0.0, clock=clock) as emu:
        tok = token(emu)
        assert get(emu, "spot/instance-action", tok)[0] == 404
        assert get(emu, "events/recommendations/rebalance", tok)[0] == 200
        clock.advance(29)
        assert get(emu, "spot/instance-action", tok)[0] == 404
        assert emu.state()["interruption"]["active"] is False
        clock.advance(1)
        code, body = get(emu, "spot/instance-action", tok)
        assert code == 200 and json.loads(body)["action"] == "hibernate"
        assert parse_time(json.loads(body)["time"]) == emu.now() + timedelta(seconds=120)


def test_reset_clears_notices_faults_and_counters(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    control(emulator, "POST", "interrupt")
    control(emulator, "POST", "lifecycle?state=Terminated")
    control(emulator, "POST", "fault?mode=html")
    control(emulator, "POST", "reset")
    assert get(emulator, "spot/instance-action", tok)[0] == 404
    status, state = control(emulator, "GET", "state")
    assert status == 200
    assert state["interruption"] is None and state["fault"] is None and state["lifecycle"] == "InService"
    assert state["requests"] == {"GET spot/instance-action": 1}


def test_state_counts_requests_and_shows_the_notice(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    get(emulator, "instance-id", None)
    get(emulator, "instance-id", tok)
    control(emulator, "POST", "interrupt?action=terminate")
    _, state = control(emulator, "GET", "state")
    assert state["requests"] == {"PUT token": 1, "GET instance-id": 2, "401": 1}
    assert state["interruption"]["action"] == "terminate" and state["interruption"]["active"]


@pytest.mark.parametrize(("mode", "expected"), [("html", "<html>"), ("truncated", '{"action": "terminate", "ti'),
                                                ("bad-time", '"time": "soon"')])
def test_notice_faults_garble_the_instance_action_only(emulator: ImdsEmulator, mode: str, expected: str) -> None:
    tok = token(emulator)
    control(emulator, "POST", f"fault?mode={mode}")
    code, body = get(emulator, "spot/instance-action", tok)
    assert code == 200 and expected in body
    assert get(emulator, "instance-id", tok)[0] == 200


def test_counted_faults_clear_themselves(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    control(emulator, "POST", "fault?mode=500&count=2")
    assert [get(emulator, "instance-id", tok)[0] for _ in range(3)] == [500, 500, 200]


def test_refuse_token_fault_answers_the_put_with_the_given_status(emulator: ImdsEmulator) -> None:
    control(emulator, "POST", "fault?mode=refuse-token&status=405")
    assert http("PUT", f"{emulator.url}/latest/api/token", {TTL: "60"})[0] == 405


def test_revoke_tokens_makes_issued_tokens_fail(emulator: ImdsEmulator) -> None:
    tok = token(emulator)
    control(emulator, "POST", "revoke-tokens")
    assert get(emulator, "instance-id", tok)[0] == 401


def test_bad_control_requests_are_4xx_not_crashes(emulator: ImdsEmulator) -> None:
    assert control(emulator, "POST", "interrupt?action=reboot")[0] == 400
    assert control(emulator, "POST", "fault?mode=explode")[0] == 400
    assert control(emulator, "POST", "rebalance?after=soon")[0] == 400
    status, body = control(emulator, "POST", "nonsense")
    assert status == 404 and "POST /control/interrupt" in body["endpoints"]
    assert get(emulator, "instance-id", token(emulator))[0] == 200  # still serving


def test_bad_constructor_arguments_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="--action 'reboot'"):
        ImdsEmulator(action="reboot")
    with pytest.raises(UsageError, match="--lifecycle 'reserved'"):
        ImdsEmulator(lifecycle="reserved")
    with pytest.raises(UsageError, match="--interrupt-after -1"):
        ImdsEmulator(interrupt_after=-1)


def test_a_port_in_use_is_a_usage_error(emulator: ImdsEmulator) -> None:
    with pytest.raises(UsageError, match=f"cannot listen on 127.0.0.1:{emulator.port}"):
        ImdsEmulator(port=emulator.port).start()
