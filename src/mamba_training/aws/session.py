"""The one boto3 client factory, and the translation of boto errors into one-line `AwsError`s.

botocore reads AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>) itself, so a moto server or
any S3-compatible endpoint is reached exactly as AWS would be.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

from mamba_training.errors import AwsError, EXIT_USAGE

DEFAULT_REGION = "us-east-1"

# Error codes meaning "you may not", "who are you?" and "no such thing", across services.
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
           "AuthorizationError", "Forbidden", "403"}
_BAD_CREDENTIALS = {"InvalidClientTokenId", "AuthFailure", "UnrecognizedClientException",
                    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId"}
_REGION_PATTERN = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")


class AwsSetupError(AwsError):
    """The local AWS setup is wrong (no credentials, unknown region or profile): a usage error."""

    exit_code = EXIT_USAGE


@lru_cache(maxsize=16)
def _session(profile: str | None, region: str | None):
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session(profile_name=profile, region_name=region)
    except ProfileNotFound:
        raise AwsSetupError(f"AWS profile {profile!r} not found in your AWS config") from None


def resolve_region(region: str | None = None, profile: str | None = None) -> str:
    """The region to use: explicit, else the environment/profile, else us-east-1."""
    if region:
        return region
    env = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if env:
        return env
    return _session(profile, None).region_name or DEFAULT_REGION


def client(service: str, region: str | None = None, profile: str | None = None, **config: Any):
    """A boto3 client with standard retries; `config` goes into botocore's Config."""
    from botocore.config import Config

    settings = {"retries": {"mode": "standard", "max_attempts": 5}, **config}
    session = _session(profile or os.environ.get("AWS_PROFILE") or None, None)
    return session.client(service, region_name=resolve_region(region, profile), config=Config(**settings))


@lru_cache(maxsize=1)
def known_regions() -> frozenset[str]:
    """Every region botocore knows in any partition (aws, aws-cn, aws-us-gov, ...)."""
    import botocore.session

    session = botocore.session.get_session()
    regions: set[str] = set()
    for partition in session.get_available_partitions():
        regions.update(session.get_available_regions("ec2", partition_name=partition))
    return frozenset(regions)


def check_region(region: str | None = None, profile: str | None = None) -> str:
    """The resolved region, or AwsSetupError when it is not a region AWS has.

    Not done in `client()`: S3-compatible stores use made-up region names legitimately.
    MAMBA_TRAINING_EXTRA_REGIONS (comma-separated) admits regions newer than this botocore.
    """
    resolved = resolve_region(region, profile)
    extra = {r.strip() for r in os.environ.get("MAMBA_TRAINING_EXTRA_REGIONS", "").split(",") if r.strip()}
    if resolved in known_regions() | extra:
        return resolved
    hint = "" if _REGION_PATTERN.match(resolved) else " (regions look like us-east-1)"
    raise AwsSetupError(f"unknown AWS region {resolved!r}{hint}")


def describe_error(error: Exception, action: str) -> AwsError:
    """A one-line AwsError for a boto/botocore exception raised while doing `action`."""
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        EndpointConnectionError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
        ProfileNotFound,
    )

    if isinstance(error, (NoCredentialsError, PartialCredentialsError)):
        return AwsSetupError(f"{action}: no AWS credentials found (set AWS_PROFILE, run `aws configure`, "
                             "or export AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)")
    if isinstance(error, (NoRegionError, ProfileNotFound)):
        return AwsSetupError(f"{action}: {error}")
    if isinstance(error, EndpointConnectionError):
        return AwsError(f"{action}: cannot reach AWS at {error.kwargs.get('endpoint_url', '?')}")
    if isinstance(error, ClientError):
        info = error.response.get("Error", {})
        code = str(info.get("Code") or error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?"))
        message = " ".join(str(info.get("Message") or "").split())
        if code in _DENIED:
            return AwsError(f"{action}: access denied by AWS ({code}{': ' + message if message else ''})")
        if code in _BAD_CREDENTIALS:
            return AwsError(f"{action}: AWS rejected the credentials ({code})")
        return AwsError(f"{action}: AWS refused: {code}{': ' + message if message else ''}")
    if isinstance(error, BotoCoreError):
        return AwsError(f"{action}: {' '.join(str(error).split())}")
    return AwsError(f"{action}: {type(error).__name__}: {error}")


@contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn any boto error inside the block into a one-line AwsError naming `action`."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except (BotoCoreError, ClientError) as error:
        raise describe_error(error, action) from None
