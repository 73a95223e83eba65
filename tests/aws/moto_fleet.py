"""Helpers for the fleet/cost tests: build the Terraform stack's shape in moto, run the CLI,
and a loopback HTTP server that refuses every AWS request with 403 AccessDenied."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

from mamba_training.aws.session import client
from mamba_training.cli.main import main

PROJECT, ENV = "mamba-training", "dev"
ASG = f"{PROJECT}-{ENV}-training-asg"
LOG_GROUP = f"/aws/ec2/{PROJECT}-{ENV}/training"
FIXTURES = Path(__file__).parent / "fixtures"


def make_fleet(desired: int = 2, max_size: int = 4, project: str = PROJECT, env: str = ENV,
               instance_type: str = "g4dn.xlarge") -> None:
    """Launch template (with an InstanceType: moto needs one) + ASG tagged like the Terraform stack."""
    ec2, autoscaling = client("ec2"), client("autoscaling")
    name = f"{project}-{env}-lt"
    ec2.create_launch_template(LaunchTemplateName=name,
                               LaunchTemplateData={"ImageId": "ami-12c6146b", "InstanceType": instance_type})
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=f"{project}-{env}-training-asg", MinSize=0, MaxSize=max_size, DesiredCapacity=desired,
        LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
        AvailabilityZones=["us-east-1a", "us-east-1b"],
        Tags=[{"Key": "Project", "Value": project, "PropagateAtLaunch": True},
              {"Key": "Environment", "Value": env, "PropagateAtLaunch": True}],
    )


def run_instance(tags: dict[str, str], instance_type: str = "g5.xlarge") -> str:
    ec2 = client("ec2")
    made = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType=instance_type,
                             TagSpecifications=[{"ResourceType": "instance",
                                                 "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}])
    return made["Instances"][0]["InstanceId"]


def instance_states() -> dict[str, str]:
    reservations = client("ec2").describe_instances()["Reservations"]
    return {i["InstanceId"]: i["State"]["Name"] for r in reservations for i in r["Instances"]}


def group() -> dict:
    return client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[ASG])["AutoScalingGroups"][0]


def cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    """Run the real entry point; (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def spot_history_fixture() -> list[dict]:
    """Recorded-style spot price history (realistic prices; moto's are placeholders)."""
    return json.loads((FIXTURES / "spot_price_history.json").read_text())


class _Deny(http.server.BaseHTTPRequestHandler):
    def _deny(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        body = (b"<ErrorResponse><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User: "
                b"arn:aws:iam::123456789012:user/tester is not authorized to perform this action</Message>"
                b"</Error><RequestId>0</RequestId></ErrorResponse>")
        self.send_response(403)
        self.send_header("Content-Type", "text/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = _deny

    def log_message(self, *args) -> None:
        pass


@contextmanager
def denying_endpoint() -> Iterator[str]:
    """A loopback endpoint that answers every request with 403 AccessDenied."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def utc(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
