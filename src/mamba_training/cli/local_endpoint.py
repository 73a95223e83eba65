"""`python -m mamba_training.cli.local_endpoint NAME REGION`: deploy.sh --endpoint's AMI parameter.

Not a `mamba-training` command: only deploy.sh runs it (with AWS_ENDPOINT_URL set to the endpoint).
"""

from __future__ import annotations

import sys

from mamba_training.errors import MambaTrainingError, UsageError


def main(argv: list[str]) -> int:
    from mamba_training.aws.local_endpoint import publish_ami_parameter

    try:
        if len(argv) != 2:
            raise UsageError("usage: python -m mamba_training.cli.local_endpoint PARAMETER_NAME REGION")
        name, region = argv
        ami = publish_ami_parameter(name, region)
    except MambaTrainingError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    print(f"local endpoint: SSM parameter {name} = {ami}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
