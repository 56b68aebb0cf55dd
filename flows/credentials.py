"""Apply a run's `storage` section before anything touches its root: endpoint, and credentials from a Prefect block."""
from __future__ import annotations

import json

from tasks.config import StorageConfig
from storage.endpoints import configure_s3


def apply_storage(s: StorageConfig) -> None:
    """Point s3:// at `storage.endpoint_url`; read the key pair from the Secret block `storage.credentials_block`."""
    key = secret = None
    if s.credentials_block:
        from prefect.blocks.system import Secret

        try:
            value = Secret.load(s.credentials_block).get()
        except ValueError as err:
            raise ValueError(f"storage.credentials_block: no Secret block named {s.credentials_block!r} "
                             f"({type(err).__name__})") from None
        data = json.loads(value) if isinstance(value, str) else value
        if not isinstance(data, dict) or not {"aws_access_key_id", "aws_secret_access_key"} <= set(data):
            raise ValueError(f"storage.credentials_block: Secret {s.credentials_block!r} must hold JSON with "
                             "aws_access_key_id and aws_secret_access_key")
        key, secret = data["aws_access_key_id"], data["aws_secret_access_key"]
    configure_s3(s.endpoint_url, key, secret)
