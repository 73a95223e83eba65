"""Custom checkov policy: every EBS volume of an aws_launch_template is encrypted.

checkov 3.3 checks EBS encryption for aws_instance and launch configurations (CKV_AWS_8) but
not for launch templates, which is what the training fleet uses. Run with
`checkov -d infrastructure/aws --external-checks-dir infrastructure/aws/checkov`.
"""

from __future__ import annotations

from typing import Any

from checkov.common.models.enums import CheckCategories, CheckResult
from checkov.terraform.checks.resource.base_resource_check import BaseResourceCheck


def _first(value: Any) -> Any:
    """HCL values arrive wrapped in one-element lists."""
    return value[0] if isinstance(value, list) and value else value


class LaunchTemplateEBSEncrypted(BaseResourceCheck):
    def __init__(self) -> None:
        super().__init__(
            name="Ensure every EBS volume in a launch template is encrypted",
            id="CKV_MAMBA_1",
            categories=[CheckCategories.ENCRYPTION],
            supported_resources=["aws_launch_template"],
        )

    def scan_resource_conf(self, conf: dict[str, Any]) -> CheckResult:
        mappings = conf.get("block_device_mappings") or []
        for mapping in mappings:
            mapping = _first(mapping) or {}
            if _first(mapping.get("virtual_name")) or _first(mapping.get("no_device")):
                continue  # instance-store or suppressed devices have no EBS volume
            ebs = _first(mapping.get("ebs")) or {}
            if _first(ebs.get("encrypted")) not in (True, "true"):
                return CheckResult.FAILED
        # No mappings: the AMI's own volumes are used, whose encryption this template cannot prove.
        return CheckResult.PASSED if mappings else CheckResult.FAILED


check = LaunchTemplateEBSEncrypted()
