"""Process-wide object-store settings: the S3 endpoint and credentials every `ArtifactStore` on s3:// uses.

They go into fsspec's configuration (applied to every s3fs instance made afterwards in this process) and into
the environment, so processes started from this one (torchrun ranks, local Dask workers) inherit them:
`FSSPEC_S3_ENDPOINT_URL` for the endpoint, the standard `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY` for
credentials. Nothing here logs or returns a credential.
"""
from __future__ import annotations

import os
from typing import Optional

import fsspec.config


def configure_s3(endpoint_url: Optional[str] = None, key: Optional[str] = None, secret: Optional[str] = None) -> None:
    """Use `endpoint_url` (and, when given, this key pair) for s3:// from now on, here and in child processes."""
    conf = fsspec.config.conf.setdefault("s3", {})
    if endpoint_url:
        conf["endpoint_url"] = endpoint_url
        os.environ["FSSPEC_S3_ENDPOINT_URL"] = endpoint_url
    if key and secret:
        conf["key"], conf["secret"] = key, secret
        os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = key, secret
