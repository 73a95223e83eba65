"""The one boto3 client factory. Honours AWS_ENDPOINT_URL, AWS_PROFILE and the region settings.

botocore reads AWS_ENDPOINT_URL (and AWS_ENDPOINT_URL_<SERVICE>) itself, so a moto server or
any S3-compatible endpoint is reached exactly as AWS would be.
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

DEFAULT_REGION = "us-east-1"


@lru_cache(maxsize=16)
def _session(profile: str | None, region: str | None):
    import boto3

    return boto3.session.Session(profile_name=profile, region_name=region)


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
