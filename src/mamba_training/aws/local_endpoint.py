"""What a local AWS endpoint (a moto server, LocalStack) needs before the stack can be applied to it.

The stack reads its AMI id from an SSM parameter; a local endpoint has none of AWS's public
parameters (moto refuses to create /aws/service/... names), so `deploy.sh --endpoint URL` publishes
one under the project's own name, holding an image the endpoint knows.
"""

from __future__ import annotations

from mamba_training.aws.session import aws_errors, client
from mamba_training.errors import AwsError


def publish_ami_parameter(name: str, region: str) -> str:
    """Write SSM parameter `name` = the endpoint's first Amazon-owned image; returns the AMI id."""
    ec2, ssm = client("ec2", region=region), client("ssm", region=region)
    with aws_errors(f"listing the images of the endpoint in {region}"):
        images = ec2.describe_images(Owners=["amazon"]).get("Images", [])
    if not images:
        raise AwsError(f"the endpoint has no Amazon-owned image in {region} to launch instances from")
    ami = sorted(image["ImageId"] for image in images)[0]
    with aws_errors(f"writing SSM parameter {name}"):
        ssm.put_parameter(Name=name, Value=ami, Type="String", Overwrite=True)
    return ami
