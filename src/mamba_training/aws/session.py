"""The one boto3 client factory, and the translation of boto errors into one-line `AwsError`s.

botocore reads AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>) itself, so a moto server or
any S3-compatible endpoint is reached exactly as AWS would be.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Iterator

from mamba_training.config import known_aws_regions, unknown_region_reason
from mamba_training.errors import AwsError, EXIT_USAGE

DEFAULT_REGION = "us-east-1"

# Error codes meaning "you may not", "who are you?" and "no such thing", across services.
_DENIED = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
           "AuthorizationError", "Forbidden", "403"}
_BAD_CREDENTIALS = {"InvalidClientTokenId", "AuthFailure", "UnrecognizedClientException",
                    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "InvalidAccessKeyId"}


class AwsSetupError(AwsError):
    """The local AWS setup is wrong (no credentials, unknown region or profile): a usage error."""

    exit_code = EXIT_USAGE


class ProfileNotFoundError(AwsSetupError):
    """The AWS profile asked for (--profile or AWS_PROFILE) is not in the AWS config."""


def profile_name(profile: str | None = None) -> str | None:
    """The profile to use: explicit, else AWS_PROFILE, else none (the default credential chain)."""
    return profile or os.environ.get("AWS_PROFILE") or None


def _session(profile: str | None, region: str | None):
    # The name is resolved here, not left to botocore: botocore reads AWS_PROFILE lazily and its
    # ProfileNotFound would surface deep inside the first call, without the name.
    return _cached_session(profile_name(profile), region)


@lru_cache(maxsize=16)
def _cached_session(profile: str | None, region: str | None):
    import boto3
    from botocore.exceptions import ProfileNotFound

    try:
        return boto3.session.Session(profile_name=profile, region_name=region)
    except ProfileNotFound:
        source = "" if profile is None or profile != os.environ.get("AWS_PROFILE") else " (AWS_PROFILE)"
        raise ProfileNotFoundError(f"AWS profile {profile!r}{source} not found in your AWS config "
                            f"({os.environ.get('AWS_CONFIG_FILE') or '~/.aws/config'})") from None


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
    session = _session(profile, None)
    return session.client(service, region_name=resolve_region(region, profile), config=Config(**settings))


def check_region(region: str | None = None, profile: str | None = None) -> str:
    """The resolved region, or AwsSetupError when it is not a region AWS has (or the profile is missing).

    Not done in `client()`: S3-compatible stores use made-up region names legitimately.
    MAMBA_TRAINING_EXTRA_REGIONS (comma-separated) admits regions newer than this botocore.
    """
    _session(profile, None)  # a missing profile is named now, before anything else goes wrong
    resolved = resolve_region(region, profile)
    reason = unknown_region_reason(resolved)
    if reason:
        raise AwsSetupError(reason)
    return resolved


def plain_http_hint(service: str = "s3") -> str:
    """Why S3 may deny everything: the endpoint speaks plain HTTP and the stack's bucket policy
    denies requests not made over TLS. Empty when the endpoint is AWS's own (HTTPS)."""
    url = os.environ.get(f"AWS_ENDPOINT_URL_{service.upper()}") or os.environ.get("AWS_ENDPOINT_URL") or ""
    if not url.startswith("http://"):
        return ""
    return (f"; the endpoint {url} is plain HTTP, and the stack's bucket policy denies requests not made over TLS "
            "(deploy to a local endpoint with `deploy.sh --endpoint URL`, which leaves that policy out)")


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
            return AwsError(f"{action}: access denied by AWS ({code}{': ' + message if message else ''})"
                            f"{plain_http_hint()}")
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
