"""The IMDSv2 client against the emulator, and where the metadata service is taken to be."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from mamba_training.errors import SpotError
from mamba_training.spot import EC2_IMDS_URL, ImdsClient, ImdsUnavailable, make_watcher, resolve_imds_url
from mamba_training.spot import imds
from mamba_training.spot.emulator import ImdsEmulator


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def token_puts(emulator: ImdsEmulator) -> int:
    return emulator.state()["requests"].get("PUT token", 0)


def fake_dmi(tmp_path: Path, vendor: str, asset_tag: str) -> Path:
    folder = tmp_path / "dmi"
    folder.mkdir()
    (folder / "sys_vendor").write_text(vendor + "\n")
    (folder / "board_asset_tag").write_text(asset_tag + "\n")
    return folder


# ------------------------------------------------------------------ tokens
def test_client_fetches_one_token_and_sends_it_with_every_get(emulator: ImdsEmulator) -> None:
    client = ImdsClient(emulator.url)
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert client.get("meta-data/instance-type") == "g5.xlarge"
    assert token_puts(emulator) == 1
    assert emulator.state()["requests"].get("401", 0) == 0


def test_emulator_refuses_gets_without_a_token(emulator: ImdsEmulator) -> None:
    with pytest.raises(urllib.error.HTTPError) as error:
        urllib.request.urlopen(f"{emulator.url}/latest/meta-data/instance-id", timeout=2)
    assert error.value.code == 401


def test_token_is_renewed_when_15_seconds_or_less_remain(emulator: ImdsEmulator) -> None:
    clock = FakeClock()
    client = ImdsClient(emulator.url, token_ttl=100, clock=clock)
    client.get("meta-data/instance-id")
    clock.now += 84.0  # 16 s left: keep it
    client.get("meta-data/instance-id")
    assert token_puts(emulator) == 1
    clock.now += 1.0  # 15 s left: renew before it can expire mid-request
    client.get("meta-data/instance-id")
    assert token_puts(emulator) == 2


def test_a_401_gets_a_fresh_token_and_the_read_succeeds(emulator: ImdsEmulator) -> None:
    client = ImdsClient(emulator.url)
    client.get("meta-data/instance-id")
    emulator.revoke_tokens()
    assert client.get("meta-data/instance-id") == "i-0123456789abcdef0"
    assert token_puts(emulator) == 2
    assert emulator.state()["requests"]["401"] == 1


def test_a_token_the_service_keeps_refusing_is_reported_not_looped_on(emulator: ImdsEmulator) -> None:
    emulator.token_required = True
    client = ImdsClient(emulator.url)
    client._current_token = lambda: "not-a-token"  # type: ignore[method-assign]
    with pytest.raises(ImdsUnavailable, match="HTTP 401"):
        client.get("meta-data/instance-id")
    assert emulator.state()["requests"]["401"] == 2  # the first answer plus exactly one retry


@pytest.mark.parametrize("status", [403, 405])
def test_token_endpoint_refusing_put_raises_imds_unavailable(emulator: ImdsEmulator, status: int) -> None:
    emulator.set_fault("refuse-token", status=status)
    with pytest.raises(ImdsUnavailable, match=f"token refused \\(HTTP {status}\\)"):
        ImdsClient(emulator.url).get("meta-data/instance-id")


# ------------------------------------------------------------------ answers and failures
def test_404_means_nothing_there(emulator: ImdsEmulator) -> None:
    client = ImdsClient(emulator.url)
    assert client.get("meta-data/spot/instance-action") is None
    assert client.get("meta-data/events/recommendations/rebalance") is None


def test_500_raises_imds_unavailable(emulator: ImdsEmulator) -> None:
    emulator.set_fault("500")
    with pytest.raises(ImdsUnavailable, match="500"):
        ImdsClient(emulator.url).get("meta-data/instance-id")


def test_a_hung_service_times_out_quickly(emulator: ImdsEmulator) -> None:
    emulator.set_fault("timeout", seconds=3)
    start = time.monotonic()
    with pytest.raises(ImdsUnavailable, match="timed out"):
        ImdsClient(emulator.url, timeout=0.3).get("meta-data/instance-id")
    assert time.monotonic() - start < 1.5


def test_nothing_listening_raises_imds_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: connections are refused
        with pytest.raises(ImdsUnavailable, match="ConnectionRefused"):
            ImdsClient(f"http://127.0.0.1:{port}", timeout=0.5).get("meta-data/instance-id")


def test_instance_info_reads_id_type_zone_and_lifecycle() -> None:
    with ImdsEmulator(instance_type="p4d.24xlarge", lifecycle="on-demand") as emu:
        info = ImdsClient(emu.url).instance_info()
    assert info == {"instance_id": "i-0123456789abcdef0", "instance_type": "p4d.24xlarge",
                    "availability_zone": "us-east-1a", "lifecycle": "on-demand"}


def test_instance_info_is_all_none_when_the_service_fails(emulator: ImdsEmulator) -> None:
    emulator.set_fault("500")
    info = ImdsClient(emulator.url).instance_info()
    assert info == {"instance_id": None, "instance_type": None, "availability_zone": None, "lifecycle": None}


def test_a_malformed_imds_url_is_a_spot_error() -> None:
    with pytest.raises(SpotError, match="ftp://x"):
        ImdsClient("ftp://x")


# ------------------------------------------------------------------ where IMDS is
def test_off_means_no_watcher() -> None:
    assert resolve_imds_url("off") is None
    assert make_watcher("off") is None


def test_an_explicit_url_is_used_as_given() -> None:
    assert resolve_imds_url("http://127.0.0.1:1338/") == "http://127.0.0.1:1338"
    with pytest.raises(SpotError, match="spot.imds_url 'nonsense'"):
        resolve_imds_url("nonsense")


def test_auto_on_ec2_dmi_returns_the_link_local_url_without_contacting_it(
    tmp_path: Path, loopback_only: list[object]
) -> None:
    dmi = fake_dmi(tmp_path, "Amazon EC2", "i-0abc1234def567890")
    assert resolve_imds_url("auto", dmi) == EC2_IMDS_URL
    watcher = make_watcher("auto", 5.0, dmi_dir=str(dmi))  # creating it sends nothing
    assert watcher is not None and watcher.url == EC2_IMDS_URL
    assert loopback_only == []


def test_auto_reads_the_dmi_folder_named_by_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, loopback_only: list[object]
) -> None:
    monkeypatch.setenv(imds.DMI_DIR_ENV, str(fake_dmi(tmp_path, "Amazon EC2", "i-0abc1234def567890")))
    assert resolve_imds_url("auto") == EC2_IMDS_URL
    assert loopback_only == []


@pytest.mark.parametrize(
    ("vendor", "asset_tag"),
    [("QEMU", "i-0abc"), ("Amazon EC2", ""), ("Amazon EC2", "Not Specified"), ("Dell Inc.", "")],
)
def test_auto_off_ec2_is_off_and_says_so_once(
    tmp_path: Path, spot_logs, monkeypatch: pytest.MonkeyPatch, vendor: str, asset_tag: str
) -> None:
    monkeypatch.setattr(imds, "_said_not_on_ec2", False)
    dmi = fake_dmi(tmp_path, vendor, asset_tag)
    assert resolve_imds_url("auto", dmi) is None
    assert make_watcher("auto", dmi_dir=str(dmi)) is None
    assert spot_logs.messages().count("not on EC2: spot watcher off") == 1


def test_auto_without_dmi_data_is_off(tmp_path: Path) -> None:
    assert resolve_imds_url("auto", tmp_path / "absent") is None
